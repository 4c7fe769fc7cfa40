//! TLS towards the clients, end to end through the real binary: the
//! self-made CA that `xoauth2-proxy tls ca` prints, the implicit TLS
//! listeners with imapflow and nodemailer as NocoBase configures them
//! (`secure: true`, the CA in `NODE_EXTRA_CA_CERTS`), certificate files
//! that are refused, renewed and re-read on SIGHUP, and handshakes that
//! never finish.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use rustls::pki_types::ServerName;
use serde_json::json;
use testkit::node::{imapflow, nodemailer};
use testkit::pki::TestPki;
use testkit::proxy::{AccountSpec, TestProxy, free_port};
use testkit::world::World;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

const USER: &str = "sales@contoso.com";
const PASS: &str = "local-pass-9f3k";

/// A proxy with `[tls]` (`tls` is its body) and both TLS listeners.
struct TlsProxy {
    proxy: TestProxy,
    imaps: SocketAddr,
    smtps: SocketAddr,
}

async fn start(world: &World, tls: &str, edit: impl FnOnce(String) -> String) -> TlsProxy {
    let (imaps, smtps) = (free_port(), free_port());
    let spec = AccountSpec::device(USER, PASS);
    let tls = tls.to_string();
    let proxy = TestProxy::start_with(
        &world.endpoints,
        std::slice::from_ref(&spec),
        "debug",
        |text| {
            let text = text
                .replace(
                    "[imap]\n",
                    &format!("[imap]\ntls_listen = \"127.0.0.1:{imaps}\"\n"),
                )
                .replace(
                    "[smtp]\n",
                    &format!("[smtp]\ntls_listen = \"127.0.0.1:{smtps}\"\n"),
                );
            edit(format!("{text}\n[tls]\n{tls}\n"))
        },
    )
    .await;
    world.grant(&proxy, &spec);
    TlsProxy {
        proxy,
        imaps: SocketAddr::from(([127, 0, 0, 1], imaps)),
        smtps: SocketAddr::from(([127, 0, 0, 1], smtps)),
    }
}

/// `xoauth2-proxy tls ca`, written to a file beside the config.
async fn ca_file(proxy: &TestProxy) -> std::path::PathBuf {
    let out = proxy.cli(&["tls", "ca"]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pem = String::from_utf8(out.stdout.clone()).unwrap();
    assert!(pem.starts_with("-----BEGIN CERTIFICATE-----"), "{pem}");
    assert!(!pem.contains("PRIVATE KEY"), "the CA's key stays private");
    let path = proxy.dir.path().join("ca.pem");
    std::fs::write(&path, &out.stdout).unwrap();
    path
}

/// A TLS client that trusts only the CAs in the PEM file `ca_pem`.
fn trusting(ca_pem: &Path) -> tokio_rustls::TlsConnector {
    let pem = std::fs::read(ca_pem).unwrap();
    let roots: Vec<_> = rustls_pemfile::certs(&mut &pem[..])
        .map(Result::unwrap)
        .collect();
    tokio_rustls::TlsConnector::from(testkit::pki::client_config_trusting(roots))
}

/// A TLS connection to `addr` for `name`, trusting only the CAs in `ca_pem`.
async fn tls_connect(
    addr: SocketAddr,
    name: &str,
    ca_pem: &Path,
) -> std::io::Result<BufReader<TlsStream<TcpStream>>> {
    let connector = trusting(ca_pem);
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from(name.to_string()).unwrap();
    let stream = tokio::time::timeout(Duration::from_secs(10), connector.connect(name, tcp))
        .await
        .expect("the handshake finishes")?;
    Ok(BufReader::new(stream))
}

async fn line<S: tokio::io::AsyncRead + Unpin>(stream: &mut BufReader<S>) -> String {
    let mut line = String::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_line(&mut line))
        .await
        .expect("a line within 10 s")
        .unwrap();
    line
}

/// Logs in over IMAPS; returns the tagged answer.
async fn imaps_login(addr: SocketAddr, name: &str, ca: &Path) -> std::io::Result<String> {
    let mut c = tls_connect(addr, name, ca).await?;
    let greeting = line(&mut c).await;
    assert!(greeting.starts_with("* OK"), "{greeting}");
    c.get_mut()
        .write_all(format!("a LOGIN {USER} {PASS}\r\n").as_bytes())
        .await?;
    loop {
        let l = line(&mut c).await;
        if l.starts_with("a ") {
            return Ok(l);
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn tls_ca_verifies_the_served_certificate_for_localhost_and_127_0_0_1() {
    let world = World::start().await;
    let p = start(&world, "", |t| t).await;
    let ca = ca_file(&p.proxy).await;
    for name in ["localhost", "127.0.0.1"] {
        let answer = imaps_login(p.imaps, name, &ca).await.unwrap();
        assert!(answer.starts_with("a OK"), "{name}: {answer}");
        let mut smtps = tls_connect(p.smtps, name, &ca).await.unwrap();
        let greeting = line(&mut smtps).await;
        assert!(greeting.starts_with("220 "), "{greeting}");
    }
    // Verification is real: a name the certificate lacks, or another CA, fails.
    assert!(tls_connect(p.imaps, "mail.example.com", &ca).await.is_err());
    assert!(
        tls_connect(p.imaps, "localhost", &world.pki.ca_pem_path)
            .await
            .is_err()
    );
    // The CA stays the same across restarts; `status` names the certificate.
    let status = p.proxy.cli(&["status"]).await;
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(
        text.contains("localhost, 127.0.0.1, xoauth2-proxy; valid until"),
        "{text}"
    );
    let mode = std::fs::metadata(p.proxy.state_dir.join("tls/ca-key.pem")).unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(mode.permissions().mode() & 0o777, 0o600);
    }
    let mut p = p;
    p.proxy.restart().await;
    let answer = imaps_login(p.imaps, "localhost", &ca).await.unwrap();
    assert!(answer.starts_with("a OK"), "after a restart: {answer}");
}

#[tokio::test(flavor = "multi_thread")]
async fn imapflow_secure_true_on_tls_listen_trusting_the_ca() {
    let world = World::start().await;
    world
        .imap
        .add_message(USER, b"Subject: over TLS\r\n\r\nhello\r\n".to_vec());
    let p = start(&world, "", |t| t).await;
    let ca = ca_file(&p.proxy).await;
    let out = imapflow(
        &json!({
            "host": "127.0.0.1", "port": p.imaps.port(), "secure": true,
            "user": USER, "pass": PASS,
            "nodeExtraCaCerts": ca,
            "steps": ["list", "select", "fetch", "append", "idle"],
        }),
        60,
    )
    .await;
    assert_eq!(out["ok"], true, "{out}\n{}", p.proxy.logs());
    assert_eq!(out["fetched"]["subject"], "over TLS", "{out}");
    // Without the CA, imapflow refuses the certificate, as it should.
    let out = imapflow(
        &json!({
            "host": "127.0.0.1", "port": p.imaps.port(), "secure": true,
            "user": USER, "pass": PASS, "steps": [],
        }),
        60,
    )
    .await;
    assert_eq!(out["ok"], false, "{out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn nodemailer_secure_true_on_smtp_tls_listen_as_nocobase_defaults() {
    let world = World::start().await;
    let p = start(&world, "", |t| t).await;
    let ca = ca_file(&p.proxy).await;
    let out = nodemailer(json!({
        "host": "localhost", "port": p.smtps.port(), "secure": true,
        "user": USER, "pass": PASS, "pool": true, "count": 3,
        "nodeExtraCaCerts": ca,
    }))
    .await;
    assert_eq!(out["ok"], true, "{out}\n{}", p.proxy.logs());
    assert_eq!(out["sent"].as_array().unwrap().len(), 3, "{out}");
    let received = world.smtp.messages();
    assert_eq!(received.len(), 3);
    assert!(received.iter().all(|m| m.auth_user == USER));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_handshake_that_never_completes_is_cut_by_login_timeout() {
    let world = World::start().await;
    let p = start(&world, "", |t| {
        t.replace("login_timeout = \"5s\"", "login_timeout = \"1s\"")
    })
    .await;
    // A client that says nothing, and one that stops inside its ClientHello.
    for first_bytes in [
        &b""[..],
        &b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"[..],
    ] {
        for addr in [p.imaps, p.smtps] {
            let started = Instant::now();
            let mut tcp = TcpStream::connect(addr).await.unwrap();
            tcp.write_all(first_bytes).await.unwrap();
            let mut rest = Vec::new();
            let read = tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut rest))
                .await
                .expect("the proxy closes a stalled handshake");
            let waited = started.elapsed();
            assert!(read.is_err() || rest.is_empty(), "{rest:?}");
            assert!(
                waited >= Duration::from_millis(900) && waited < Duration::from_secs(5),
                "closed after {waited:?}"
            );
        }
    }
    p.proxy
        .wait_for_log(
            "did not complete the TLS handshake within 1s",
            Duration::from_secs(5),
        )
        .await;
    for protocol in ["imap", "smtp"] {
        let failures = "xoauth2_proxy_tls_handshake_failures_total";
        let implicit = [("protocol", protocol), ("tls", "implicit")];
        let value = p.proxy.metric(failures, &implicit).await;
        assert_eq!(value, Some(2.0), "{protocol}");
    }
}

/// The `[tls]` body for certificate files.
fn files(cert: &Path, key: &Path) -> String {
    format!(
        "cert_file = \"{}\"\nkey_file = \"{}\"\n",
        cert.display(),
        key.display()
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wrong_certificate_file_is_refused_at_start_with_one_sentence() {
    let world = World::start().await;
    let dir = tempfile::tempdir().unwrap();
    let other = TestPki::new();
    let garbage = dir.path().join("garbage.pem");
    std::fs::write(&garbage, "this is not a certificate\n").unwrap();
    let cases = [
        (
            files(&dir.path().join("missing.pem"), &world.pki.key_pem_path),
            "cannot read `tls.cert_file`",
        ),
        (
            files(&garbage, &world.pki.key_pem_path),
            "`tls.cert_file` must hold the server certificate",
        ),
        (
            files(&world.pki.cert_pem_path, &garbage),
            "`tls.key_file` must hold the certificate's private key",
        ),
        (
            files(&world.pki.cert_pem_path, &other.key_pem_path),
            "`tls.key_file`",
        ),
    ];
    for (tls, expected) in cases {
        let state = dir.path().join("state");
        let mut text = testkit::proxy::config_text(
            &world.endpoints,
            &[AccountSpec::device(USER, PASS)],
            free_port(),
            free_port(),
            &state,
        );
        text.push_str(&format!(
            "\n[admin]\nlisten = \"127.0.0.1:{}\"\n\n[tls]\n{tls}",
            free_port()
        ));
        let config = dir.path().join("config.toml");
        std::fs::write(&config, text).unwrap();
        let out = tokio::time::timeout(
            Duration::from_secs(20),
            tokio::process::Command::new(testkit::proxy::binary())
                .args(["serve", "--config"])
                .arg(&config)
                .env("RUST_LOG", "warn")
                .output(),
        )
        .await
        .expect("the proxy exits at once")
        .unwrap();
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        let errors: Vec<_> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
        assert_eq!(errors.len(), 1, "{stderr}");
        assert!(errors[0].contains(expected), "{stderr}");
        assert!(!errors[0].contains("BEGIN"), "no key material: {stderr}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn reload_serves_a_renewed_certificate_and_keeps_the_old_one_when_the_new_is_bad() {
    let world = World::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert, &world.pki.cert_pem).unwrap();
    std::fs::write(&key, &world.pki.key_pem).unwrap();
    let p = start(&world, &files(&cert, &key), |t| t).await;
    let first_ca = &world.pki.ca_pem_path;
    assert!(
        imaps_login(p.imaps, "localhost", first_ca)
            .await
            .unwrap()
            .starts_with("a OK")
    );

    let out = p.proxy.cli(&["tls", "ca"]).await;
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("the proxy did not make a CA"), "{stderr}");

    // A renewed certificate (from another CA, to tell them apart).
    let renewed = TestPki::new();
    std::fs::write(&cert, &renewed.cert_pem).unwrap();
    std::fs::write(&key, &renewed.key_pem).unwrap();
    p.proxy.reload();
    p.proxy
        .wait_for_log(
            "new TLS connections get the certificate",
            Duration::from_secs(10),
        )
        .await;
    let answer = imaps_login(p.imaps, "localhost", &renewed.ca_pem_path).await;
    assert!(answer.unwrap().starts_with("a OK"));
    assert!(tls_connect(p.imaps, "localhost", first_ca).await.is_err());

    // A bad file is refused; the renewed certificate stays in force.
    std::fs::write(&cert, "-----BEGIN CERTIFICATE-----\nbroken\n").unwrap();
    p.proxy.reload();
    p.proxy
        .wait_for_log("reload refused", Duration::from_secs(10))
        .await;
    assert!(
        p.proxy.logs().contains("tls.cert_file"),
        "{}",
        p.proxy.logs()
    );
    let answer = imaps_login(p.imaps, "localhost", &renewed.ca_pem_path).await;
    assert!(answer.unwrap().starts_with("a OK"));
}

/// `require_tls = true` on both plain listeners.
fn require_tls(text: String) -> String {
    text.replace("[imap]\n", "[imap]\nrequire_tls = true\n")
        .replace("[smtp]\n", "[smtp]\nrequire_tls = true\n")
}

async fn send<S>(stream: &mut BufReader<S>, bytes: &[u8])
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    stream.get_mut().write_all(bytes).await.unwrap();
}

/// Reads lines until one starts with `prefix`; returns all of them.
async fn until<S: tokio::io::AsyncRead + Unpin>(
    stream: &mut BufReader<S>,
    prefix: &str,
) -> Vec<String> {
    let mut lines = Vec::new();
    loop {
        let l = line(stream).await;
        assert!(!l.is_empty(), "closed before {prefix:?}: {lines:?}");
        let done = l.starts_with(prefix);
        lines.push(l.trim_end().to_string());
        if done {
            return lines;
        }
    }
}

/// Puts TLS under a plain connection whose STARTTLS was just accepted.
async fn upgrade(plain: BufReader<TcpStream>, ca: &Path) -> BufReader<TlsStream<TcpStream>> {
    assert!(
        plain.buffer().is_empty(),
        "nothing may follow the STARTTLS answer"
    );
    let connector = trusting(ca);
    let name = ServerName::try_from("localhost").unwrap();
    let tls = tokio::time::timeout(
        Duration::from_secs(10),
        connector.connect(name, plain.into_inner()),
    )
    .await
    .expect("the handshake finishes")
    .unwrap();
    BufReader::new(tls)
}

#[tokio::test(flavor = "multi_thread")]
async fn imapflow_and_nodemailer_upgrade_with_starttls_when_tls_is_required() {
    let world = World::start().await;
    let p = start(&world, "", require_tls).await;
    let ca = ca_file(&p.proxy).await;
    // With require_tls, only a client that took STARTTLS can log in: imapflow
    // would throw at LOGINDISABLED, nodemailer would send without AUTH.
    let out = imapflow(
        &json!({
            "host": "127.0.0.1", "port": p.proxy.imap_addr.port(), "secure": false,
            "user": USER, "pass": PASS, "nodeExtraCaCerts": ca,
            "steps": ["select", "append", "idle"],
        }),
        60,
    )
    .await;
    assert_eq!(out["ok"], true, "{out}\n{}", p.proxy.logs());
    let out = nodemailer(json!({
        "host": "127.0.0.1", "port": p.proxy.smtp_addr.port(), "secure": false,
        "user": USER, "pass": PASS, "pool": true, "count": 2,
        "nodeExtraCaCerts": ca,
    }))
    .await;
    assert_eq!(out["ok"], true, "{out}\n{}", p.proxy.logs());
    assert_eq!(world.smtp.messages().len(), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn require_tls_refuses_logins_in_plaintext() {
    let world = World::start().await;
    let p = start(&world, "", require_tls).await;
    let mut imap = BufReader::new(TcpStream::connect(p.proxy.imap_addr).await.unwrap());
    let greeting = line(&mut imap).await;
    assert!(
        greeting.contains("STARTTLS") && greeting.contains("LOGINDISABLED"),
        "{greeting}"
    );
    assert!(!greeting.contains("AUTH="), "{greeting}");
    send(
        &mut imap,
        format!("a LOGIN {USER} {PASS}\r\nb AUTHENTICATE PLAIN\r\n").as_bytes(),
    )
    .await;
    let a = until(&mut imap, "a ").await;
    assert!(
        a.last().unwrap().starts_with("a NO [PRIVACYREQUIRED]"),
        "{a:?}"
    );
    let b = until(&mut imap, "b ").await;
    assert!(
        b.last().unwrap().starts_with("b NO [PRIVACYREQUIRED]"),
        "{b:?}"
    );

    let mut smtp = BufReader::new(TcpStream::connect(p.proxy.smtp_addr).await.unwrap());
    line(&mut smtp).await;
    send(&mut smtp, b"EHLO client\r\n").await;
    let ehlo = until(&mut smtp, "250 ").await;
    assert!(ehlo.iter().any(|l| l.ends_with("STARTTLS")), "{ehlo:?}");
    assert!(!ehlo.iter().any(|l| l.contains("AUTH")), "{ehlo:?}");
    send(
        &mut smtp,
        b"AUTH PLAIN AHNhbGVzQGNvbnRvc28uY29tAGxvY2FsLXBhc3MtOWYzaw==\r\n",
    )
    .await;
    let auth = line(&mut smtp).await;
    assert_eq!(
        auth.trim_end(),
        "530 5.7.0 Must issue a STARTTLS command first"
    );
    assert!(
        world.tokens.all_tokens().is_empty(),
        "no login went upstream"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn commands_pipelined_after_starttls_are_discarded_not_executed() {
    let world = World::start().await;
    let p = start(&world, "", |t| t).await;
    let ca = ca_file(&p.proxy).await;

    // IMAP: a LOGIN injected behind STARTTLS in the same packet.
    let mut imap = BufReader::new(TcpStream::connect(p.proxy.imap_addr).await.unwrap());
    let greeting = line(&mut imap).await;
    assert!(greeting.contains("STARTTLS"), "{greeting}");
    send(
        &mut imap,
        format!("a STARTTLS\r\nb LOGIN {USER} {PASS}\r\n").as_bytes(),
    )
    .await;
    let a = line(&mut imap).await;
    assert!(a.starts_with("a OK"), "{a}");
    let mut imap = upgrade(imap, &ca).await;
    send(&mut imap, b"c CAPABILITY\r\nd STARTTLS\r\n").await;
    let c = until(&mut imap, "c ").await;
    assert!(!c.iter().any(|l| l.starts_with("b ")), "b ran: {c:?}");
    assert!(
        c[0].contains("AUTH=PLAIN") && !c[0].contains("STARTTLS"),
        "{c:?}"
    );
    let d = until(&mut imap, "d ").await;
    assert!(
        d.last().unwrap().starts_with("d BAD"),
        "a second STARTTLS: {d:?}"
    );
    send(&mut imap, b"e NOOP\r\n").await;
    let e = until(&mut imap, "e ").await;
    assert!(!e.iter().any(|l| l.starts_with("b ")), "{e:?}");

    // SMTP: an AUTH injected behind STARTTLS.
    let mut smtp = BufReader::new(TcpStream::connect(p.proxy.smtp_addr).await.unwrap());
    line(&mut smtp).await;
    send(&mut smtp, b"EHLO client\r\n").await;
    let ehlo = until(&mut smtp, "250 ").await;
    assert!(ehlo.iter().any(|l| l.ends_with("STARTTLS")), "{ehlo:?}");
    send(
        &mut smtp,
        b"STARTTLS\r\nAUTH PLAIN AHNhbGVzQGNvbnRvc28uY29tAGxvY2FsLXBhc3MtOWYzaw==\r\n",
    )
    .await;
    let ready = line(&mut smtp).await;
    assert!(ready.starts_with("220 "), "{ready}");
    let mut smtp = upgrade(smtp, &ca).await;
    send(&mut smtp, b"MAIL FROM:<sales@contoso.com>\r\n").await;
    let mail = line(&mut smtp).await;
    assert!(
        mail.starts_with("530 "),
        "the injected AUTH must not have run: {mail}"
    );
    send(&mut smtp, b"EHLO client\r\n").await;
    let ehlo = until(&mut smtp, "250 ").await;
    assert!(
        ehlo.iter().any(|l| l.contains("AUTH PLAIN LOGIN")),
        "{ehlo:?}"
    );
    assert!(!ehlo.iter().any(|l| l.ends_with("STARTTLS")), "{ehlo:?}");
    send(&mut smtp, b"STARTTLS\r\n").await;
    let again = line(&mut smtp).await;
    assert!(again.starts_with("503 "), "a second STARTTLS: {again}");
    assert!(!p.proxy.logs().contains(PASS), "{}", p.proxy.logs());
    for protocol in ["imap", "smtp"] {
        for tls in ["plain", "starttls"] {
            let connections = "xoauth2_proxy_client_connections_total";
            let labels = [("protocol", protocol), ("tls", tls)];
            let value = p.proxy.metric(connections, &labels).await;
            assert_eq!(value, Some(1.0), "{protocol} {tls}");
        }
    }
    p.proxy
        .wait_for_log(
            "after STARTTLS in plaintext (never executed)",
            Duration::from_secs(5),
        )
        .await;
}

/// The days left that `status` shows for the served certificate.
async fn days_left(proxy: &TestProxy) -> u64 {
    let out = proxy.cli(&["status"]).await;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let days = text
        .split(" days left")
        .next()
        .and_then(|head| head.rsplit('(').next())
        .unwrap_or_else(|| panic!("no days left in {text}"));
    days.parse()
        .unwrap_or_else(|_| panic!("no days left in {text}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn the_self_made_certificate_is_renewed_at_start_and_on_reload_when_it_nears_its_end() {
    use rcgen::{CertificateParams, Issuer, KeyPair};
    let world = World::start().await;
    let mut p = start(&world, "", |t| t).await;
    let ca = ca_file(&p.proxy).await;
    assert!(days_left(&p.proxy).await > 360);
    let tls_dir = p.proxy.state_dir.join("tls");
    // A server certificate from the proxy's own CA with ten days left.
    let nearly_expired = || {
        let ca_both = std::fs::read_to_string(tls_dir.join("ca-key.pem")).unwrap();
        let ca_cert = std::fs::read_to_string(tls_dir.join("ca.pem")).unwrap();
        let issuer =
            Issuer::from_ca_cert_pem(&ca_cert, KeyPair::from_pem(&ca_both).unwrap()).unwrap();
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec![
            "localhost".to_string(),
            "127.0.0.1".to_string(),
            "xoauth2-proxy".to_string(),
        ])
        .unwrap();
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::days(1);
        params.not_after = now + time::Duration::days(10);
        let cert = params.signed_by(&key, &issuer).unwrap();
        let file = format!("{}{ca_cert}{}", cert.pem(), key.serialize_pem());
        std::fs::write(tls_dir.join("server.pem"), file).unwrap();
    };

    p.proxy.stop().await;
    nearly_expired();
    assert_eq!(days_left(&p.proxy).await, 9, "the planted certificate");
    p.proxy.start_again().await;
    assert!(days_left(&p.proxy).await > 360, "renewed at start");

    nearly_expired();
    let made = |proxy: &TestProxy| {
        proxy
            .logs()
            .matches("made a new server certificate")
            .count()
    };
    assert_eq!(made(&p.proxy), 1, "at start");
    p.proxy.reload();
    let deadline = Instant::now() + Duration::from_secs(10);
    while made(&p.proxy) < 2 {
        assert!(
            Instant::now() < deadline,
            "no renewal on reload: {}",
            p.proxy.logs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(days_left(&p.proxy).await > 360, "renewed on reload");
    let answer = imaps_login(p.imaps, "localhost", &ca).await.unwrap();
    assert!(answer.starts_with("a OK"), "the same CA signs it: {answer}");
}
