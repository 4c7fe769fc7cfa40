//! Connection slots, through the real binary: the per-address cap on
//! connections not logged in yet, the login deadline counted from the
//! connection's start, the admin listener's limits, and SMTP's share of
//! `relayed_bytes`.
//!
//! Clients bind to a chosen loopback address (all of 127.0.0.0/8 is local)
//! to play an attacker at 127.0.0.2 beside a client at 127.0.0.1. Waits have
//! generous bounds; nothing here measures speed.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use base64::Engine;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpSocket, TcpStream};

use testkit::proxy::{AccountSpec, TestProxy};
use testkit::world::{LineClient, World};

const USER: &str = "sales@contoso.com";
const PASS: &str = "local-pass-9f3k";
const CLIENT: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 1);
const ATTACKER: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
/// The longest any expected event may take on a loaded machine.
const BOUND: Duration = Duration::from_secs(20);

/// Starts the proxy with USER/PASS (granted), `server` keys added to
/// `[server]` and `admin` keys to `[admin]`.
async fn proxy(world: &World, server: &str, admin: &str) -> TestProxy {
    let spec = AccountSpec::device(USER, PASS);
    let edit = |text: String| {
        let text = text.replace("[server]\n", &format!("[server]\n{server}\n"));
        // `login_timeout` given in `server` wins over the test kit's.
        let text = match server.contains("login_timeout") {
            true => text.replace("login_timeout = \"5s\"\n", ""),
            false => text,
        };
        // The test kit writes [admin] last.
        format!("{text}{admin}\n")
    };
    let proxy =
        TestProxy::start_with(&world.endpoints, std::slice::from_ref(&spec), "info", edit).await;
    world.grant(&proxy, &spec);
    proxy
}

/// A TCP connection to `to` from `from`.
async fn connect_from(from: Ipv4Addr, to: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::from((from, 0))).unwrap();
    socket.connect(to).await.expect("the proxy accepts")
}

async fn client_from(from: Ipv4Addr, to: SocketAddr) -> LineClient {
    LineClient {
        stream: BufReader::new(connect_from(from, to).await),
    }
}

/// Connects from `from` and returns the first line and the client.
async fn greeted(from: Ipv4Addr, to: SocketAddr) -> (String, LineClient) {
    let mut c = client_from(from, to).await;
    let first = c.read().await.unwrap_or_default();
    (first, c)
}

fn plain_sasl() -> String {
    base64::engine::general_purpose::STANDARD.encode(format!("\0{USER}\0{PASS}"))
}

/// Reads one SMTP reply, all its lines; the last is returned.
async fn smtp_reply(c: &mut LineClient) -> String {
    loop {
        let line = c.read().await.expect("an SMTP reply");
        if line.as_bytes().get(3) != Some(&b'-') {
            return line;
        }
    }
}

async fn smtp_cmd(c: &mut LineClient, line: &str) -> String {
    c.line(line).await;
    smtp_reply(c).await
}

/// An SMTP client logged in with AUTH PLAIN from `from`.
async fn smtp_logged_in(from: Ipv4Addr, proxy: &TestProxy) -> LineClient {
    let (greeting, mut c) = greeted(from, proxy.smtp_addr).await;
    assert!(greeting.starts_with("220 "), "{greeting}");
    assert!(
        smtp_cmd(&mut c, "EHLO client.example")
            .await
            .starts_with("250 ")
    );
    let auth = smtp_cmd(&mut c, &format!("AUTH PLAIN {}", plain_sasl())).await;
    assert!(auth.starts_with("235 "), "{auth}\n{}", proxy.logs());
    c
}

/// An IMAP client logged in with LOGIN from `from`.
async fn imap_logged_in(from: Ipv4Addr, proxy: &TestProxy) -> LineClient {
    let (greeting, mut c) = greeted(from, proxy.imap_addr).await;
    assert!(greeting.starts_with("* OK"), "{greeting}");
    c.line(&format!("a LOGIN {USER} {PASS}")).await;
    let ok = c.until("a ").await.pop().unwrap();
    assert!(ok.starts_with("a OK"), "{ok}\n{}", proxy.logs());
    c
}

/// The value of the series `name` with `labels`, 0 when absent.
async fn metric(proxy: &TestProxy, name: &str, labels: &[(&str, &str)]) -> u64 {
    proxy.metric(name, labels).await.unwrap_or(0.0) as u64
}

/// A client from `from` gets `prefix` as its first line and is then closed.
async fn refused(from: Ipv4Addr, to: SocketAddr, prefix: &str) {
    let (first, mut c) = greeted(from, to).await;
    assert!(
        first.starts_with(prefix),
        "expected {prefix:?}, got {first:?}"
    );
    assert!(c.closed().await, "closed after {first:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn one_address_past_its_prelogin_cap_is_refused_while_another_logs_in_and_works() {
    let world = World::start().await;
    let proxy = proxy(
        &world,
        "max_prelogin_per_address = 100\nlogin_timeout = \"120s\"",
        "",
    )
    .await;
    // The attacker fills its cap with silent connections, IMAP and SMTP together.
    let mut silent = Vec::new();
    for i in 0..100 {
        let (to, hello) = match i % 2 {
            0 => (proxy.imap_addr, "* OK"),
            _ => (proxy.smtp_addr, "220 "),
        };
        let (first, c) = greeted(ATTACKER, to).await;
        assert!(first.starts_with(hello), "connection {i}: {first:?}");
        silent.push(c);
    }
    // Hundreds more from it get the busy answer and are closed.
    for _ in 0..150 {
        let imap_busy = "* BYE [UNAVAILABLE] Too many connections from your address";
        refused(ATTACKER, proxy.imap_addr, imap_busy).await;
        let smtp_busy = "421 4.7.0 Too many connections from your address";
        refused(ATTACKER, proxy.smtp_addr, smtp_busy).await;
    }
    // Meanwhile another address logs in and works, and health answers.
    let mut imap = imap_logged_in(CLIENT, &proxy).await;
    imap.line("b NOOP").await;
    assert!(imap.until("b ").await.pop().unwrap().starts_with("b OK"));
    let mut smtp = smtp_logged_in(CLIENT, &proxy).await;
    let (wire, reply) = send_message(&mut smtp).await;
    assert!(reply.starts_with("250 "), "{reply} ({} bytes)", wire.len());
    let health = reqwest::get(format!("http://{}/healthz", proxy.admin_addr))
        .await
        .unwrap();
    assert_eq!(health.status().as_u16(), 200);

    // Every refusal is counted; the log has a line per burst, not per refusal.
    for protocol in ["imap", "smtp"] {
        let name = "xoauth2_proxy_refused_connections_total";
        let labels = [("protocol", protocol), ("reason", "per_address")];
        assert_eq!(metric(&proxy, name, &labels).await, 150, "{protocol}");
    }
    let lines = proxy
        .logs()
        .matches("(server.max_prelogin_per_address)")
        .count();
    assert!((1..=2).contains(&lines), "{lines} lines for 300 refusals");

    // A connection that ends gives its slot back to its address.
    drop(silent.pop());
    let deadline = tokio::time::Instant::now() + BOUND;
    loop {
        let (first, _c) = greeted(ATTACKER, proxy.smtp_addr).await;
        if first.starts_with("220 ") {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never freed: {first}"
        );
        tokio::task::yield_now().await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn logged_in_sessions_do_not_count_against_the_prelogin_cap() {
    let world = World::start().await;
    let proxy = proxy(&world, "max_prelogin_per_address = 3", "").await;
    let mut sessions = Vec::new();
    for _ in 0..3 {
        sessions.push(imap_logged_in(CLIENT, &proxy).await);
        sessions.push(smtp_logged_in(CLIENT, &proxy).await);
    }
    let mut waiting = Vec::new();
    for _ in 0..3 {
        let (first, c) = greeted(CLIENT, proxy.imap_addr).await;
        assert!(first.starts_with("* OK"), "{first}");
        waiting.push(c);
    }
    refused(CLIENT, proxy.imap_addr, "* BYE [UNAVAILABLE]").await;
    // The logged-in sessions still work.
    let imap = &mut sessions[0];
    imap.line("b NOOP").await;
    assert!(imap.until("b ").await.pop().unwrap().starts_with("b OK"));
    let smtp = &mut sessions[1];
    assert!(smtp_cmd(smtp, "NOOP").await.starts_with("250 "));
}

/// Sends NOOP every 300 ms (IMAP when `imap`, else SMTP) until the proxy
/// says goodbye; returns the goodbye, once the connection has closed.
async fn noop_until_closed(c: &mut LineClient, imap: bool) -> String {
    let goodbye = |line: &str| line.starts_with("* BYE") || line.starts_with("421");
    let deadline = tokio::time::Instant::now() + BOUND;
    for n in 0.. {
        assert!(
            tokio::time::Instant::now() < deadline,
            "still open after {n} NOOPs"
        );
        let (command, answered) = match imap {
            true => (format!("n{n} NOOP"), format!("n{n} OK")),
            false => ("NOOP".to_string(), "250 ".to_string()),
        };
        c.line(&command).await;
        let mut line = c.read().await.expect("an answer to NOOP");
        while !goodbye(&line) && !line.starts_with(&answered) {
            line = c.read().await.expect("an answer to NOOP");
        }
        // Between NOOPs, whatever the proxy says is read at once.
        let pause = Duration::from_millis(300);
        if !goodbye(&line)
            && tokio::time::timeout(pause, c.stream.fill_buf())
                .await
                .is_ok()
        {
            line = c.read().await.expect("a line");
        }
        if goodbye(&line) {
            assert!(c.closed().await, "closed after {line}");
            return line;
        }
    }
    unreachable!()
}

/// Sends one small message on a logged-in SMTP client; returns it as sent
/// and the reply to its end.
async fn send_message(c: &mut LineClient) -> (Vec<u8>, String) {
    let mail = smtp_cmd(c, &format!("MAIL FROM:<{USER}>")).await;
    assert!(mail.starts_with("250 "), "{mail}");
    let rcpt = smtp_cmd(c, "RCPT TO:<rcpt@example.net>").await;
    assert!(rcpt.starts_with("250 "), "{rcpt}");
    let data = smtp_cmd(c, "DATA").await;
    assert!(data.starts_with("354 "), "{data}");
    let body = "x".repeat(70);
    let mut wire = format!("From: <{USER}>\r\nTo: <rcpt@example.net>\r\nSubject: slots\r\n\r\n");
    for _ in 0..200 {
        wire.push_str(&body);
        wire.push_str("\r\n");
    }
    wire.push_str(".\r\n");
    c.send(wire.as_bytes()).await;
    (wire.into_bytes(), smtp_reply(c).await)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_never_logs_in_is_closed_at_the_deadline_whatever_it_sends() {
    let world = World::start().await;
    let proxy = proxy(&world, "login_timeout = \"2s\"", "").await;
    let imap_noop = async {
        let (_, mut c) = greeted(CLIENT, proxy.imap_addr).await;
        let bye = noop_until_closed(&mut c, true).await;
        assert!(bye.starts_with("* BYE Autologout"), "{bye}");
    };
    let smtp_noop = async {
        let (_, mut c) = greeted(CLIENT, proxy.smtp_addr).await;
        let bye = noop_until_closed(&mut c, false).await;
        assert!(
            bye.starts_with("421 4.4.2 Not logged in within 2s"),
            "{bye}"
        );
    };
    let smtp_sasl = async {
        let (_, mut c) = greeted(CLIENT, proxy.smtp_addr).await;
        assert!(smtp_cmd(&mut c, "AUTH LOGIN").await.starts_with("334 "));
        let user = base64::engine::general_purpose::STANDARD.encode(USER);
        assert!(smtp_cmd(&mut c, &user).await.starts_with("334 "));
        // The password never comes.
        let bye = smtp_reply(&mut c).await;
        assert!(
            bye.starts_with("421 4.4.2 Not logged in within 2s"),
            "{bye}"
        );
        assert!(c.closed().await);
    };
    let imap_sasl = async {
        let (_, mut c) = greeted(CLIENT, proxy.imap_addr).await;
        c.line("a AUTHENTICATE PLAIN").await;
        assert!(c.read().await.unwrap().starts_with('+'));
        let bye = c.read().await.unwrap();
        assert!(bye.starts_with("* BYE Autologout"), "{bye}");
        assert!(c.closed().await);
    };
    tokio::join!(imap_noop, smtp_noop, smtp_sasl, imap_sasl);
    // Logged in, the deadline no longer applies.
    let mut imap = imap_logged_in(CLIENT, &proxy).await;
    let mut smtp = smtp_logged_in(CLIENT, &proxy).await;
    for n in 0..10 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        imap.line(&format!("k{n} NOOP")).await;
        let ok = imap.until(&format!("k{n} ")).await.pop().unwrap();
        assert!(ok.starts_with(&format!("k{n} OK")), "{ok}");
        assert!(smtp_cmd(&mut smtp, "NOOP").await.starts_with("250 "));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn smtp_counts_the_bytes_it_relays() {
    let world = World::start().await;
    let proxy = proxy(&world, "", "").await;
    let name = "xoauth2_proxy_relayed_bytes_total";
    let series = |direction| [("protocol", "smtp"), ("direction", direction)];
    let mut c = smtp_logged_in(CLIENT, &proxy).await;
    let (wire, reply) = send_message(&mut c).await;
    assert!(reply.starts_with("250 "), "{reply}");
    let upstream = metric(&proxy, name, &series("upstream")).await;
    assert!(
        upstream >= wire.len() as u64,
        "{upstream} bytes counted upstream for a {}-byte message",
        wire.len()
    );
    let downstream = metric(&proxy, name, &series("downstream")).await;
    assert!(
        downstream > 0,
        "the upstream's replies are counted downstream"
    );
}

/// An HTTP/1.1 keep-alive request for `path` on `c`; returns the status line
/// and the body.
async fn http_get(c: &mut LineClient, path: &str) -> (String, String) {
    c.send(format!("GET {path} HTTP/1.1\r\nHost: admin\r\n\r\n").as_bytes())
        .await;
    let status = c.read().await.expect("a response");
    let mut length = 0;
    loop {
        let header = c.read().await.expect("a header");
        if header.is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':')
            && name.eq_ignore_ascii_case("content-length")
        {
            length = value.trim().parse().unwrap();
        }
    }
    let body = c.read_exact(length).await;
    (status, String::from_utf8(body).unwrap())
}

/// True when the server closes `stream` (EOF, or reset) within the bound
/// without sending a successful response.
async fn closed_without_200(stream: &mut (impl AsyncReadExt + Unpin)) -> bool {
    let mut got = Vec::new();
    match tokio::time::timeout(BOUND, stream.read_to_end(&mut got)).await {
        Ok(_) => !got.starts_with(b"HTTP/1.1 200"),
        Err(_) => false,
    }
}

async fn healthz(proxy: &TestProxy) -> Option<u16> {
    let url = format!("http://{}/healthz", proxy.admin_addr);
    Some(reqwest::get(url).await.ok()?.status().as_u16())
}

#[tokio::test(flavor = "multi_thread")]
async fn admin_connections_past_the_cap_are_closed_at_once() {
    let world = World::start().await;
    let admin = "max_connections = 4\nheader_timeout = \"60s\"\nidle_timeout = \"60s\"";
    let proxy = proxy(&world, "", admin).await;
    let mut held = Vec::new();
    for _ in 0..4 {
        let mut c = client_from(CLIENT, proxy.admin_addr).await;
        let (status, _) = http_get(&mut c, "/healthz").await;
        assert!(status.starts_with("HTTP/1.1 200"), "{status}");
        held.push(c);
    }
    for _ in 0..20 {
        let mut extra = connect_from(CLIENT, proxy.admin_addr).await;
        let _ = extra
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: admin\r\n\r\n")
            .await;
        assert!(closed_without_200(&mut extra).await);
    }
    // The held connections still work; one of them reads the count.
    let (_, metrics) = http_get(&mut held[0], "/metrics").await;
    let refused =
        r#"xoauth2_proxy_refused_connections_total{protocol="admin",reason="max_connections"} 20"#;
    assert!(metrics.contains(refused), "{metrics}");
    assert!(proxy.logs().matches("(admin.max_connections)").count() == 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn admin_clients_that_send_half_a_header_are_closed_and_healthz_answers_again() {
    let world = World::start().await;
    let admin = "max_connections = 4\nheader_timeout = \"1s\"\nidle_timeout = \"60s\"";
    let proxy = proxy(&world, "", admin).await;
    let mut half = Vec::new();
    for i in 0..4 {
        let mut c = connect_from(CLIENT, proxy.admin_addr).await;
        c.write_all(b"GET /healthz HTTP/1.1\r\nHost: admin\r\n")
            .await
            .unwrap();
        // Two of them go on trickling a header, a byte at a time: never
        // silent, so only the header timeout stops them.
        let trickle = i % 2 == 0;
        if trickle {
            c.write_all(b"X-Slow: ").await.unwrap();
        }
        let (mut read, mut write) = c.into_split();
        let writer = tokio::spawn(async move {
            while trickle && write.write_all(b"x").await.is_ok() {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            write
        });
        half.push(async move {
            let closed = closed_without_200(&mut read).await;
            writer.abort();
            closed
        });
    }
    for (i, closed) in futures_join(half).await.into_iter().enumerate() {
        assert!(closed, "half-header connection {i} was not closed");
    }
    let deadline = tokio::time::Instant::now() + BOUND;
    while healthz(&proxy).await != Some(200) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "/healthz never answered"
        );
        tokio::task::yield_now().await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_idle_kept_alive_admin_connection_is_closed() {
    let world = World::start().await;
    let admin = "header_timeout = \"60s\"\nidle_timeout = \"1s\"";
    let proxy = proxy(&world, "", admin).await;
    let mut c = client_from(CLIENT, proxy.admin_addr).await;
    let (status, body) = http_get(&mut c, "/healthz").await;
    assert!(
        status.starts_with("HTTP/1.1 200") && body == "ok\n",
        "{status}"
    );
    let mut rest = Vec::new();
    let read = tokio::time::timeout(BOUND, c.stream.read_to_end(&mut rest)).await;
    assert!(matches!(read, Ok(Ok(0))), "still open, or sent {rest:?}");
}

/// Awaits every future of `all`, concurrently.
async fn futures_join<F: std::future::Future + Send + 'static>(all: Vec<F>) -> Vec<F::Output>
where
    F::Output: Send,
{
    let handles: Vec<_> = all.into_iter().map(tokio::spawn).collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn past_the_cap_a_tls_listener_closes_without_a_handshake() {
    let world = World::start().await;
    let imaps = SocketAddr::from((CLIENT, testkit::proxy::free_port()));
    let spec = AccountSpec::device(USER, PASS);
    let proxy = TestProxy::start_with(&world.endpoints, &[spec], "info", |text| {
        let text = text
            .replace(
                "[server]\n",
                "[server]\nmax_prelogin_per_address = 2\nlogin_timeout = \"120s\"\n",
            )
            .replace("login_timeout = \"5s\"\n", "")
            .replace("[imap]\n", &format!("[imap]\ntls_listen = \"{imaps}\"\n"));
        format!("{text}\n[tls]\nnames = [\"localhost\", \"127.0.0.1\"]\n")
    })
    .await;
    let mut silent = Vec::new();
    for _ in 0..2 {
        let (first, c) = greeted(ATTACKER, proxy.imap_addr).await;
        assert!(first.starts_with("* OK"), "{first}");
        silent.push(c);
    }
    // The handshake would wait 120 s for a ClientHello: an end within the
    // bound, with nothing sent, is the refusal.
    let mut refused = connect_from(ATTACKER, imaps).await;
    let mut got = Vec::new();
    let read = tokio::time::timeout(BOUND, refused.read_to_end(&mut got)).await;
    assert!(matches!(read, Ok(Ok(0)) | Ok(Err(_))), "{read:?} {got:?}");
    // Another address still gets its handshake and greeting.
    let ca = proxy.cli(&["tls", "ca"]).await;
    assert!(ca.status.success());
    let roots: Vec<_> = rustls_pemfile::certs(&mut &ca.stdout[..])
        .map(Result::unwrap)
        .collect();
    let connector = tokio_rustls::TlsConnector::from(testkit::pki::client_config_trusting(roots));
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let tcp = connect_from(CLIENT, imaps).await;
    let tls = connector.connect(name, tcp).await.expect("a handshake");
    let mut greeting = String::new();
    BufReader::new(tls).read_line(&mut greeting).await.unwrap();
    assert!(greeting.starts_with("* OK"), "{greeting}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_admin_listener_off_loopback_is_warned_about() {
    let world = World::start().await;
    let warning = "the admin listener on 0.0.0.0";
    let on_loopback = proxy(&world, "", "").await;
    assert!(!on_loopback.logs().contains("the admin listener on"));
    let spec = AccountSpec::device(USER, PASS);
    let off_loopback = TestProxy::start_with(&world.endpoints, &[spec], "info", |text| {
        // The test kit writes the admin listener last.
        let at = text.rfind("127.0.0.1:").unwrap();
        format!(
            "{}0.0.0.0:{}",
            &text[..at],
            &text[at + "127.0.0.1:".len()..]
        )
    })
    .await;
    let logs = off_loopback.logs();
    let line = logs
        .lines()
        .find(|l| l.contains(warning))
        .unwrap_or_else(|| panic!("{logs}"));
    assert!(
        line.contains("/healthz and /metrics") && line.contains("public"),
        "{line}"
    );
}

/// Connects from `from` with a small receive buffer and sends `command`
/// over and over without reading a byte; returns the socket's reading half
/// once the proxy stops taking commands (or after 64 MiB).
async fn pipeline_without_reading(
    from: Ipv4Addr,
    to: SocketAddr,
    command: &'static str,
) -> tokio::net::tcp::OwnedReadHalf {
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.bind(SocketAddr::from((from, 0))).unwrap();
    let (read, mut write) = socket.connect(to).await.unwrap().into_split();
    tokio::spawn(async move {
        let batch = command.repeat(64 * 1024 / command.len());
        for _ in 0..1024 {
            if write.write_all(batch.as_bytes()).await.is_err() {
                break;
            }
        }
    });
    read
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_sends_and_never_reads_is_closed_at_the_deadline() {
    let world = World::start().await;
    let proxy = proxy(&world, "login_timeout = \"2s\"", "").await;
    let imap = pipeline_without_reading(ATTACKER, proxy.imap_addr, "a CAPABILITY\r\n").await;
    let smtp = pipeline_without_reading(ATTACKER, proxy.smtp_addr, "NOOP\r\n").await;
    let deadline = tokio::time::Instant::now() + BOUND;
    while proxy
        .logs()
        .matches("did not read the answers in time")
        .count()
        < 2
    {
        assert!(tokio::time::Instant::now() < deadline, "{}", proxy.logs());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for mut stream in [imap, smtp] {
        let mut rest = Vec::new();
        let drained = tokio::time::timeout(BOUND, stream.read_to_end(&mut rest)).await;
        assert!(drained.is_ok(), "the proxy closed the connection");
    }
    // The slots went with them: clients from the same address get in.
    let mut c = imap_logged_in(ATTACKER, &proxy).await;
    c.line("z NOOP").await;
    assert!(c.until("z ").await.pop().unwrap().starts_with("z OK"));
    let mut smtp = smtp_logged_in(ATTACKER, &proxy).await;
    assert!(smtp_cmd(&mut smtp, "NOOP").await.starts_with("250 "));
}
