//! The SMTP side, end to end through the real binary: mock identity provider
//! and mock STARTTLS/XOAUTH2 upstream on loopback, clients by hand and nodemailer.

use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

use testkit::idp::IdpMode;
use testkit::node::nodemailer;
use testkit::pki::TestPki;
use testkit::proxy::{AccountSpec, TestProxy};
use testkit::smtp::ReceivedMessage;
use testkit::world::{LineClient, World};

const USER: &str = "sales@contoso.com";
const PASS: &str = "local-pass-9f3k";
const T: Duration = Duration::from_secs(20);

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// The AUTH PLAIN blob for USER/PASS.
fn plain() -> String {
    b64(format!("\0{USER}\0{PASS}").as_bytes())
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// One SMTP reply, all its lines.
#[derive(Debug)]
struct Reply {
    code: u16,
    lines: Vec<String>,
}

impl Reply {
    fn last(&self) -> &str {
        self.lines.last().map(String::as_str).unwrap_or_default()
    }
}

/// Reads one (possibly multi-line) reply.
async fn reply(c: &mut LineClient) -> Reply {
    let mut lines = Vec::new();
    loop {
        let line = c
            .read()
            .await
            .unwrap_or_else(|| panic!("connection closed before a reply; got {lines:?}"));
        let more = line.as_bytes().get(3) == Some(&b'-');
        lines.push(line);
        if !more {
            break;
        }
    }
    let code = lines
        .last()
        .unwrap()
        .get(..3)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("not an SMTP reply: {lines:?}"));
    Reply { code, lines }
}

async fn cmd(c: &mut LineClient, line: &str) -> Reply {
    c.line(line).await;
    reply(c).await
}

/// Connects and reads the greeting.
async fn connect(proxy: &TestProxy) -> LineClient {
    let mut c = LineClient::connect(proxy.smtp_addr).await;
    let greeting = reply(&mut c).await;
    assert_eq!(greeting.code, 220, "{greeting:?}");
    c
}

/// Connects, says EHLO and logs in with AUTH PLAIN and an initial response.
async fn logged_in(proxy: &TestProxy) -> LineClient {
    let mut c = connect(proxy).await;
    assert_eq!(cmd(&mut c, "EHLO client.example").await.code, 250);
    let r = cmd(&mut c, &format!("AUTH PLAIN {}", plain())).await;
    assert_eq!(
        r.last(),
        "235 2.7.0 Authentication successful",
        "{}",
        proxy.logs()
    );
    c
}

/// A small message as it goes on the wire (dot-stuffed, CRLF) without the
/// final `.CRLF`, and as the server stores it.
fn message(subject: &str) -> (Vec<u8>, Vec<u8>) {
    let wire = format!(
        "From: <{USER}>\r\nTo: <rcpt@example.net>\r\nSubject: {subject}\r\n\r\nbody of {subject}\r\n..a stuffed dot\r\nend\r\n"
    );
    let data = wire.replace("\r\n..", "\r\n.");
    (wire.into_bytes(), data.into_bytes())
}

/// Runs one transaction by hand; returns the reply to the end of data.
async fn send_message(c: &mut LineClient, mail: &str, rcpts: &[&str], wire: &[u8]) -> Reply {
    let r = cmd(c, mail).await;
    assert_eq!(r.code, 250, "{mail}: {r:?}");
    for rcpt in rcpts {
        let r = cmd(c, rcpt).await;
        assert_eq!(r.code, 250, "{rcpt}: {r:?}");
    }
    let r = cmd(c, "DATA").await;
    assert_eq!(r.code, 354, "{r:?}");
    c.send(wire).await;
    c.send(b".\r\n").await;
    reply(c).await
}

/// Starts the proxy with USER/PASS (granted) and a last edit of its config.
async fn proxy_with(
    world: &World,
    rust_log: &str,
    edit: impl FnOnce(String) -> String,
) -> TestProxy {
    let spec = AccountSpec::device(USER, PASS);
    let proxy = TestProxy::start_with(
        &world.endpoints,
        std::slice::from_ref(&spec),
        rust_log,
        edit,
    )
    .await;
    world.grant(&proxy, &spec);
    proxy
}

/// nodemailer's options for the proxy, as NocoBase sets them.
fn nodemailer_opts(proxy: &TestProxy) -> Value {
    json!({
        "host": "127.0.0.1",
        "port": proxy.smtp_addr.port(),
        "secure": false,
        "user": USER,
        "pass": PASS,
    })
}

fn merged(mut base: Value, more: Value) -> Value {
    for (k, v) in more.as_object().unwrap() {
        base[k] = v.clone();
    }
    base
}

/// Checks that every message nodemailer reports sent arrived byte for byte.
fn assert_delivered_verbatim(sent: &[Value], msgs: &[ReceivedMessage]) {
    assert_eq!(sent.len(), msgs.len(), "{msgs:?}");
    for s in sent {
        let id = s["messageId"].as_str().unwrap();
        let m = msgs
            .iter()
            .find(|m| String::from_utf8_lossy(&m.data).contains(&format!("Message-ID: {id}")))
            .unwrap_or_else(|| panic!("{id} did not arrive"));
        assert_eq!(m.auth_user, USER);
        assert!(
            m.mail_from.starts_with(&format!("<{USER}>")),
            "{}",
            m.mail_from
        );
        assert_eq!(
            m.rcpt_to,
            vec!["<rcpt1@example.net>", "<rcpt2@example.net>"]
        );
        assert_eq!(
            s["sha256OfRaw"].as_str().unwrap(),
            sha256_hex(&m.data),
            "{id}"
        );
        assert_eq!(
            s["sha256OfWire"].as_str().unwrap(),
            sha256_hex(&m.raw),
            "{id}"
        );
        assert_eq!(s["size"].as_u64().unwrap() as usize, m.data.len(), "{id}");
        let response = s["response"].as_str().unwrap();
        assert!(
            response.starts_with("250 2.0.0 OK <MOCK"),
            "the upstream's reply, verbatim: {response}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn nodemailer_sends_several_messages_on_one_connection_byte_for_byte() {
    let world = World::start().await;
    let proxy = world.proxy(&[AccountSpec::device(USER, PASS)]).await;
    // One pooled client connection carries every message: EHLO, AUTH PLAIN
    // inline, then MAIL + pipelined RCPTs + DATA for each, without RSET.
    let res = nodemailer(merged(
        nodemailer_opts(&proxy),
        json!({"pool": true, "maxConnections": 1, "count": 4, "attachmentSize": 20_000}),
    ))
    .await;
    assert_eq!(res["ok"], true, "{res}\n{}", proxy.logs());
    let sent = res["sent"].as_array().unwrap();
    assert_eq!(sent.len(), 4);
    let msgs = world.smtp.wait_for_messages(4, T).await;
    assert_delivered_verbatim(sent, &msgs);
    assert!(
        msgs.iter().any(|m| m.raw != m.data),
        "the messages had dots to stuff"
    );
    let stats = world.smtp.stats();
    assert_eq!(
        stats.auth_ok, 1,
        "one upstream login served every transaction: {stats:?}"
    );
    assert!(msgs.iter().all(|m| m.conn_id == msgs[0].conn_id));
    assert_eq!(stats.thread_limit_errors, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn nodemailer_single_message_without_pool() {
    let world = World::start().await;
    let proxy = world.proxy(&[AccountSpec::device(USER, PASS)]).await;
    let res = nodemailer(nodemailer_opts(&proxy)).await;
    assert_eq!(res["ok"], true, "{res}\n{}", proxy.logs());
    let msgs = world.smtp.wait_for_messages(1, T).await;
    assert_delivered_verbatim(res["sent"].as_array().unwrap(), &msgs);
    // verify() (EHLO, AUTH, QUIT) works too.
    let res = nodemailer(merged(nodemailer_opts(&proxy), json!({"verifyOnly": true}))).await;
    assert_eq!(res["ok"], true, "{res}");
    // A wrong password is a credential error to nodemailer.
    let res = nodemailer(merged(
        nodemailer_opts(&proxy),
        json!({"pass": "wrong", "verifyOnly": true}),
    ))
    .await;
    assert_eq!(res["ok"], false, "{res}");
    assert_eq!(res["code"], "EAUTH", "{res}");
    assert_eq!(res["responseCode"], 535, "{res}");
}

#[tokio::test(flavor = "multi_thread")]
async fn ehlo_offers_auth_and_only_what_the_upstream_offers() {
    let world = World::start().await;
    let proxy = world.proxy(&[AccountSpec::device(USER, PASS)]).await;
    let mut c = connect(&proxy).await;
    let ehlo = cmd(&mut c, "EHLO client.example").await;
    assert_eq!(ehlo.code, 250, "{ehlo:?}");
    let keywords: Vec<&str> = ehlo.lines[1..].iter().map(|l| &l[4..]).collect();
    for wanted in [
        "AUTH PLAIN LOGIN",
        "SIZE 157286400",
        "8BITMIME",
        "SMTPUTF8",
        "PIPELINING",
        "ENHANCEDSTATUSCODES",
    ] {
        assert!(keywords.contains(&wanted), "{wanted} missing: {keywords:?}");
    }
    for unwanted in ["STARTTLS", "CHUNKING", "BINARYMIME", "XOAUTH2"] {
        assert!(
            !keywords.iter().any(|k| k.contains(unwanted)),
            "{unwanted} offered: {keywords:?}"
        );
    }
    let r = cmd(&mut c, "STARTTLS").await;
    assert_eq!(r.code, 502, "{r:?}");
    let r = cmd(&mut c, "BDAT 10 LAST").await;
    assert_eq!(r.code, 502, "{r:?}");
    let r = cmd(&mut c, "NOOP").await;
    assert_eq!(r.code, 250, "{r:?}");
    // After AUTH, EHLO still says the same (nodemailer may say EHLO again).
    assert_eq!(
        cmd(&mut c, &format!("AUTH PLAIN {}", plain())).await.code,
        235
    );
    let again = cmd(&mut c, "EHLO client.example").await;
    assert_eq!(again.lines[1..], ehlo.lines[1..]);
    assert_eq!(cmd(&mut c, "QUIT").await.code, 221);
    assert!(c.closed().await);

    // An upstream with fewer extensions: the proxy offers only those.
    let port = minimal_upstream(
        &world.pki,
        &["SIZE 1000", "8BITMIME", "AUTH XOAUTH2", "CHUNKING"],
    )
    .await;
    let smtp_server = format!("smtp_server = \"localhost:{}\"", world.smtp.port());
    let proxy = proxy_with(&world, "debug", |t| {
        t.replace(
            &smtp_server,
            &format!("smtp_server = \"localhost:{port}\"\nsmtp_tls = \"implicit\""),
        )
    })
    .await;
    let mut c = connect(&proxy).await;
    let ehlo = cmd(&mut c, "EHLO client.example").await;
    let keywords: Vec<&str> = ehlo.lines[1..].iter().map(|l| &l[4..]).collect();
    assert_eq!(
        keywords,
        ["SIZE 1000", "8BITMIME", "AUTH PLAIN LOGIN"],
        "{ehlo:?}"
    );
}

/// A bare implicit-TLS SMTP server that greets, answers EHLO with `keywords`
/// and QUIT: enough for the proxy to learn the upstream's extensions.
async fn minimal_upstream(pki: &TestPki, keywords: &'static [&'static str]) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let acceptor = pki.acceptor();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut s = BufReader::new(tls);
                if s.get_mut()
                    .write_all(b"220 minimal ESMTP\r\n")
                    .await
                    .is_err()
                {
                    return;
                }
                let mut line = String::new();
                while s.read_line(&mut line).await.is_ok_and(|n| n > 0) {
                    let verb = line
                        .split_whitespace()
                        .next()
                        .unwrap_or_default()
                        .to_ascii_uppercase();
                    let answer = match verb.as_str() {
                        "EHLO" => {
                            let mut a = "250-minimal Hello\r\n".to_string();
                            for (i, k) in keywords.iter().enumerate() {
                                let sep = if i + 1 == keywords.len() { ' ' } else { '-' };
                                a.push_str(&format!("250{sep}{k}\r\n"));
                            }
                            a
                        }
                        "QUIT" => "221 bye\r\n".to_string(),
                        _ => "502 5.5.1 no\r\n".to_string(),
                    };
                    if s.get_mut().write_all(answer.as_bytes()).await.is_err() || verb == "QUIT" {
                        let _ = s.get_mut().shutdown().await;
                        return;
                    }
                    line.clear();
                }
            });
        }
    });
    port
}

#[tokio::test(flavor = "multi_thread")]
async fn every_auth_form_is_understood_and_parameters_pass_through() {
    let world = World::start().await;
    let proxy = world.proxy(&[AccountSpec::device(USER, PASS)]).await;

    // MAIL before AUTH.
    let mut c = connect(&proxy).await;
    assert_eq!(cmd(&mut c, "EHLO client.example").await.code, 250);
    let r = cmd(&mut c, &format!("MAIL FROM:<{USER}>")).await;
    assert!(r.last().starts_with("530 5.7.0"), "{r:?}");
    let r = cmd(&mut c, "RCPT TO:<rcpt@example.net>").await;
    assert_eq!(r.code, 503, "{r:?}");
    assert_eq!(
        world.smtp.stats().auth_ok,
        0,
        "no upstream login before AUTH"
    );

    // `*` cancels, in both mechanisms; the session goes on.
    let r = cmd(&mut c, "AUTH PLAIN").await;
    assert_eq!(r.last(), "334 ");
    let r = cmd(&mut c, "*").await;
    assert_eq!(r.code, 501, "{r:?}");
    assert_eq!(cmd(&mut c, "NOOP").await.code, 250);
    assert_eq!(cmd(&mut c, "AUTH LOGIN").await.last(), "334 VXNlcm5hbWU6");
    assert_eq!(
        cmd(&mut c, &b64(USER.as_bytes())).await.last(),
        "334 UGFzc3dvcmQ6"
    );
    let r = cmd(&mut c, "*").await;
    assert_eq!(r.code, 501, "{r:?}");
    let r = cmd(&mut c, &format!("MAIL FROM:<{USER}>")).await;
    assert_eq!(r.code, 530, "cancelled means not logged in: {r:?}");
    // An unknown mechanism.
    let r = cmd(&mut c, "AUTH CRAM-MD5").await;
    assert_eq!(r.code, 504, "{r:?}");

    // AUTH LOGIN in two steps.
    assert_eq!(cmd(&mut c, "AUTH LOGIN").await.last(), "334 VXNlcm5hbWU6");
    assert_eq!(
        cmd(&mut c, &b64(USER.as_bytes())).await.last(),
        "334 UGFzc3dvcmQ6"
    );
    let r = cmd(&mut c, &b64(PASS.as_bytes())).await;
    assert_eq!(r.last(), "235 2.7.0 Authentication successful");
    let r = cmd(&mut c, &format!("AUTH PLAIN {}", plain())).await;
    assert_eq!(r.code, 503, "already authenticated: {r:?}");

    // MAIL FROM / RCPT TO parameters go through untouched.
    let (wire, data) = message("params");
    let mail = format!(
        "MAIL FROM:<{USER}> SIZE={} BODY=8BITMIME RET=HDRS ENVID=abc+2Bdef",
        wire.len()
    );
    let rcpt = "RCPT TO:<rcpt@example.net> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;rcpt@example.net";
    let r = send_message(
        &mut c,
        &mail,
        &[rcpt, "RCPT TO:<second@example.net>"],
        &wire,
    )
    .await;
    assert!(r.last().starts_with("250 2.0.0 OK <MOCK"), "{r:?}");
    let msgs = world.smtp.wait_for_messages(1, T).await;
    assert_eq!(msgs[0].mail_from, mail["MAIL FROM:".len()..]);
    assert_eq!(
        msgs[0].rcpt_to,
        [&rcpt["RCPT TO:".len()..], "<second@example.net>"]
    );
    assert_eq!(msgs[0].raw, wire);
    assert_eq!(msgs[0].data, data);
    assert_eq!(msgs[0].auth_user, USER);

    // The upstream's refusals come back verbatim, and RSET ends a transaction.
    assert_eq!(cmd(&mut c, &format!("MAIL FROM:<{USER}>")).await.code, 250);
    let r = cmd(&mut c, &format!("MAIL FROM:<{USER}>")).await;
    assert_eq!(r.code, 503, "{r:?}");
    assert_eq!(cmd(&mut c, "RSET").await.code, 250);
    let r = cmd(&mut c, "DATA").await;
    assert_eq!(r.code, 503, "{r:?}");
    assert_eq!(cmd(&mut c, "QUIT").await.last(), "221 2.0.0 Bye");
    assert!(c.closed().await);

    // AUTH PLAIN with the response after `334`.
    let mut c = connect(&proxy).await;
    assert_eq!(cmd(&mut c, "EHLO client.example").await.code, 250);
    assert_eq!(cmd(&mut c, "AUTH PLAIN").await.last(), "334 ");
    assert_eq!(cmd(&mut c, &plain()).await.code, 235);
    // Pipelined: MAIL, RCPTs and DATA in one write, answered in order.
    let (wire, _) = message("pipelined");
    c.send(format!("MAIL FROM:<{USER}>\r\nRCPT TO:<rcpt1@example.net>\r\nRCPT TO:<rcpt2@example.net>\r\nDATA\r\n").as_bytes())
        .await;
    for code in [250, 250, 250, 354] {
        assert_eq!(reply(&mut c).await.code, code);
    }
    c.send(&wire).await;
    c.send(b".\r\nNOOP\r\n").await;
    assert_eq!(reply(&mut c).await.code, 250);
    assert_eq!(reply(&mut c).await.code, 250);
    let msgs = world.smtp.wait_for_messages(2, T).await;
    assert_eq!(msgs[1].raw, wire);
    assert_eq!(
        msgs[1].rcpt_to,
        ["<rcpt1@example.net>", "<rcpt2@example.net>"]
    );
    assert_eq!(
        world.smtp.stats().auth_ok,
        1,
        "one upstream connection served both clients"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn refused_transactions_get_the_upstream_reply_and_the_session_goes_on() {
    let world = World::start().await;
    let proxy = world.proxy(&[AccountSpec::device(USER, PASS)]).await;
    let mut c = logged_in(&proxy).await;
    // Every MAIL now hits the upstream's thread limit; nodemailer's pipelined
    // RCPTs and DATA then get 503. Many such failures do not end the session.
    world.smtp.set_max_sessions_per_mailbox(Some(0));
    for round in 0..6 {
        c.send(
            format!("MAIL FROM:<{USER}>\r\nRCPT TO:<a@example.net>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n")
                .as_bytes(),
        )
        .await;
        let r = reply(&mut c).await;
        assert_eq!(
            r.lines,
            ["432 4.3.2 STOREDRV.ClientSubmit; sender thread limit exceeded [Hostname=mock]"],
            "round {round}: the upstream's reply, verbatim"
        );
        for _ in 0..3 {
            let r = reply(&mut c).await;
            assert_eq!(r.code, 503, "round {round}: {r:?}");
        }
    }
    world.smtp.set_max_sessions_per_mailbox(Some(3));
    let (wire, _) = message("after the refusals");
    let r = send_message(
        &mut c,
        &format!("MAIL FROM:<{USER}>"),
        &["RCPT TO:<a@example.net>"],
        &wire,
    )
    .await;
    assert_eq!(r.code, 250, "{r:?}");
    assert_eq!(
        world.smtp.stats().auth_ok,
        1,
        "the refusals left the upstream connection clean"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn wrong_password_and_unknown_user_get_535_after_the_delay() {
    let world = World::start().await;
    let proxy = world.proxy(&[AccountSpec::device(USER, PASS)]).await;
    let mut c = connect(&proxy).await;
    assert_eq!(cmd(&mut c, "EHLO client.example").await.code, 250);
    let attempts = [
        format!("AUTH PLAIN {}", b64(format!("\0{USER}\0wrong").as_bytes())),
        format!(
            "AUTH PLAIN {}",
            b64(format!("\0nobody@contoso.com\0{PASS}").as_bytes())
        ),
    ];
    for attempt in &attempts {
        let started = Instant::now();
        let r = cmd(&mut c, attempt).await;
        assert_eq!(r.lines, ["535 5.7.8 Authentication credentials invalid"]);
        assert!(
            started.elapsed() >= Duration::from_millis(190),
            "answered without the delay"
        );
    }
    proxy.wait_for_log("wrong password", T).await;
    proxy.wait_for_log("unknown user", T).await;
    // A third failure ends the connection.
    let r = cmd(&mut c, &attempts[0]).await;
    assert_eq!(r.code, 535);
    let r = reply(&mut c).await;
    assert_eq!(r.code, 421, "{r:?}");
    assert!(c.closed().await);
    assert_eq!(
        world.smtp.stats().auth_ok,
        0,
        "the upstream never sees a wrong password"
    );
    assert_eq!(world.idp.counts().refresh_grants, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn unauthorised_and_revoked_accounts_get_535_and_the_log_says_login() {
    let world = World::start().await;
    // No grant at all.
    let proxy = TestProxy::start(&world.endpoints, &[AccountSpec::device(USER, PASS)]).await;
    let mut c = connect(&proxy).await;
    let r = cmd(&mut c, &format!("AUTH PLAIN {}", plain())).await;
    assert!(r.last().starts_with("535 5.7.8"), "{r:?}");
    proxy
        .wait_for_log(&format!("run `xoauth2-proxy login {USER}`"), T)
        .await;
    assert_eq!(
        world.idp.counts().device_code_requests,
        0,
        "a client login never starts a device flow"
    );
    drop(proxy);

    // A revoked grant.
    let proxy = world.proxy(&[AccountSpec::device(USER, PASS)]).await;
    world.idp.revoke_grants(USER);
    let mut c = connect(&proxy).await;
    let r = cmd(&mut c, &format!("AUTH PLAIN {}", plain())).await;
    assert!(r.last().starts_with("535 5.7.8"), "{r:?}");
    proxy.wait_for_log("AADSTS70000", T).await;
    proxy
        .wait_for_log(&format!("run `xoauth2-proxy login {USER}`"), T)
        .await;
    let r = cmd(&mut c, &format!("MAIL FROM:<{USER}>")).await;
    assert_eq!(r.code, 530, "{r:?}");
    assert_eq!(world.smtp.stats().auth_ok, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn unreachable_identity_provider_gets_421_and_a_closed_connection() {
    let world = World::start().await;
    let proxy = world.proxy(&[AccountSpec::device(USER, PASS)]).await;
    for mode in [IdpMode::Unavailable, IdpMode::Hang] {
        world.idp.set_mode(mode.clone());
        let mut c = connect(&proxy).await;
        assert_eq!(cmd(&mut c, "EHLO client.example").await.code, 250);
        let r = cmd(&mut c, &format!("AUTH PLAIN {}", plain())).await;
        assert!(r.last().starts_with("421 4.7.0"), "{mode:?}: {r:?}");
        assert!(c.closed().await, "{mode:?}");
    }
    // The grant survives passing failures.
    world.idp.set_mode(IdpMode::Normal);
    let mut c = logged_in(&proxy).await;
    let (wire, _) = message("after the outage");
    let r = send_message(
        &mut c,
        &format!("MAIL FROM:<{USER}>"),
        &["RCPT TO:<a@example.net>"],
        &wire,
    )
    .await;
    assert_eq!(r.code, 250, "{r:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn unreachable_upstream_gets_421_and_a_closed_connection() {
    let world = World::start().await;
    let proxy = world.proxy(&[AccountSpec::device(USER, PASS)]).await;
    world.smtp.set_stopped(true);
    let mut c = connect(&proxy).await;
    let ehlo = cmd(&mut c, "EHLO client.example").await;
    assert_eq!(ehlo.code, 250);
    assert_eq!(
        ehlo.last(),
        "250 AUTH PLAIN LOGIN",
        "AUTH is offered whatever: {ehlo:?}"
    );
    let r = cmd(&mut c, &format!("AUTH PLAIN {}", plain())).await;
    assert!(r.last().starts_with("421 4.4.1"), "{r:?}");
    assert!(c.closed().await);
    proxy
        .wait_for_log(&format!("localhost:{}", world.smtp.port()), T)
        .await;

    // An upstream that accepts and never answers: the same after upstream_timeout.
    world.smtp.set_stopped(false);
    world.smtp.set_hang(true);
    let mut c = connect(&proxy).await;
    // EHLO does not wait on the server that just failed to answer the probe.
    let started = Instant::now();
    assert_eq!(cmd(&mut c, "EHLO client.example").await.code, 250);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    let r = cmd(&mut c, &format!("AUTH PLAIN {}", plain())).await;
    assert!(r.last().starts_with("421 4."), "{r:?}");
    assert!(c.closed().await);

    world.smtp.set_hang(false);
    let mut c = logged_in(&proxy).await;
    let (wire, _) = message("after the outage");
    let r = send_message(
        &mut c,
        &format!("MAIL FROM:<{USER}>"),
        &["RCPT TO:<a@example.net>"],
        &wire,
    )
    .await;
    assert_eq!(r.code, 250, "{r:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn disabled_smtp_auth_fails_at_auth_with_5_7_139_and_names_the_setting() {
    let world = World::start().await;
    let proxy = world.proxy(&[AccountSpec::device(USER, PASS)]).await;
    world.smtp.set_auth_disabled(USER, true);
    let mut c = connect(&proxy).await;
    assert_eq!(cmd(&mut c, "EHLO client.example").await.code, 250);
    let r = cmd(&mut c, &format!("AUTH PLAIN {}", plain())).await;
    assert!(r.last().starts_with("535 5.7.139 "), "{r:?}");
    proxy.wait_for_log("Set-CASMailbox", T).await;
    proxy
        .wait_for_log("SmtpClientAuthenticationDisabled", T)
        .await;
    let r = cmd(&mut c, &format!("MAIL FROM:<{USER}>")).await;
    assert_eq!(r.code, 530, "AUTH failed, not MAIL: {r:?}");
    assert_eq!(
        world.smtp.stats().auth_failed,
        1,
        "a fresh token is not retried"
    );

    // 235 only with an authenticated upstream connection in hand.
    world.smtp.set_auth_disabled(USER, false);
    let r = cmd(&mut c, &format!("AUTH PLAIN {}", plain())).await;
    assert_eq!(r.code, 235, "{r:?}");
    let stats = world.smtp.stats();
    assert_eq!(stats.auth_ok, 1, "{stats:?}");
    assert!(stats.active_now >= 1, "{stats:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn upstream_lost_mid_data_gets_4xx_and_the_next_transaction_a_new_connection() {
    let world = World::start().await;
    let proxy = world.proxy(&[AccountSpec::device(USER, PASS)]).await;
    let mut c = logged_in(&proxy).await;
    let mail = format!("MAIL FROM:<{USER}>");
    let rcpt = ["RCPT TO:<rcpt@example.net>"];
    let (wire, _) = message("first");
    assert_eq!(send_message(&mut c, &mail, &rcpt, &wire).await.code, 250);

    // A small message (the upstream may get all of it before it drops) and
    // a large one (the proxy is still writing when it drops).
    let large: Vec<u8> = b"Subject: large\r\n\r\n"
        .iter()
        .copied()
        .chain(
            (0..40_000).flat_map(|i| format!("line {i:06} of a larger message\r\n").into_bytes()),
        )
        .collect();
    for (round, wire) in [message("dropped").0, large].into_iter().enumerate() {
        world.smtp.drop_during_next_data();
        let r = send_message(&mut c, &mail, &rcpt, &wire).await;
        assert!(r.code / 100 == 4, "round {round}: never a false 250: {r:?}");
        assert_eq!(world.smtp.stats().dropped_data, round + 1);
        let (wire, _) = message("after the drop");
        let r = send_message(&mut c, &mail, &rcpt, &wire).await;
        assert_eq!(r.code, 250, "round {round}: {r:?}");
    }
    let msgs = world.smtp.wait_for_messages(3, T).await;
    assert_eq!(msgs.len(), 3);
    assert_ne!(
        msgs[0].conn_id, msgs[1].conn_id,
        "a new upstream connection after the drop"
    );
    assert_ne!(
        msgs[1].conn_id, msgs[2].conn_id,
        "a new upstream connection after the drop"
    );
    assert!(
        msgs.iter()
            .all(|m| !String::from_utf8_lossy(&m.data).contains("dropped"))
    );
    let stats = world.smtp.stats();
    assert_eq!(stats.transactions_ok, 3, "{stats:?}");
    assert_eq!(stats.thread_limit_errors, 0, "{stats:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_upstream_that_stops_reading_mid_data_gets_451_not_sent_and_the_session_goes_on() {
    let world = World::start().await;
    let proxy = world.proxy(&[AccountSpec::device(USER, PASS)]).await;
    let mut c = logged_in(&proxy).await;
    let mail = format!("MAIL FROM:<{USER}>");
    let rcpt = ["RCPT TO:<rcpt@example.net>"];
    // Far larger than the socket buffers between the proxy and the server,
    // so that the proxy's writes stall once the server stops reading.
    let large: Vec<u8> = b"Subject: stalled\r\n\r\n"
        .iter()
        .copied()
        .chain(
            (0..400_000).flat_map(|i| format!("line {i:06} of a stalled message\r\n").into_bytes()),
        )
        .collect();
    world.smtp.stall_during_next_data();
    // The proxy gives up after upstream_timeout (5 s in the test config),
    // reads the rest of the message and answers.
    let r = tokio::time::timeout(
        Duration::from_secs(60),
        send_message(&mut c, &mail, &rcpt, &large),
    )
    .await
    .expect("the proxy reads on and answers once upstream_timeout passed");
    assert_eq!(r.code, 451, "{r:?}");
    assert!(r.last().contains("message not sent"), "{r:?}");
    let (wire, _) = message("after the stall");
    let r = send_message(&mut c, &mail, &rcpt, &wire).await;
    assert_eq!(r.code, 250, "{r:?}");
    let msgs = world.smtp.wait_for_messages(1, T).await;
    assert_eq!(msgs.len(), 1, "only the second message was delivered");
}

#[tokio::test(flavor = "multi_thread")]
async fn hostile_input_gets_an_error_and_a_closed_connection() {
    let world = World::start().await;
    let proxy = proxy_with(&world, "debug", |t| {
        t.replace("login_timeout = \"5s\"", "login_timeout = \"1s\"")
    })
    .await;

    // An endless line.
    let mut c = connect(&proxy).await;
    c.send(&vec![b'a'; 100 * 1024]).await;
    let r = reply(&mut c).await;
    assert_eq!(r.last(), "500 5.5.2 Line too long");
    assert_eq!(reply(&mut c).await.code, 421);
    assert!(c.closed().await);

    // An endless SASL response.
    let mut c = connect(&proxy).await;
    assert_eq!(cmd(&mut c, "AUTH PLAIN").await.code, 334);
    c.send(&vec![b'A'; 100 * 1024]).await;
    let r = reply(&mut c).await;
    assert_eq!(r.code / 100, 5, "{r:?}");
    let r = reply(&mut c).await;
    assert_eq!(r.code, 421, "{r:?}");
    assert!(c.closed().await);

    // Garbage: an error each time, then 421 and the end.
    let mut c = connect(&proxy).await;
    for _ in 0..10 {
        c.send(b"\x00\xff\x13garbage\r\n").await;
    }
    let mut codes = Vec::new();
    loop {
        let r = reply(&mut c).await;
        codes.push(r.code);
        if r.code == 421 {
            break;
        }
    }
    assert!(
        codes[..codes.len() - 1]
            .iter()
            .all(|c| *c == 500 || *c == 501),
        "{codes:?}"
    );
    assert!(codes.len() >= 10, "{codes:?}");
    assert!(c.closed().await);

    // A client that stalls, mid-line or at a SASL prompt.
    for stall in ["EHL", "AUTH LOGIN\r\n"] {
        let mut c = connect(&proxy).await;
        c.send(stall.as_bytes()).await;
        let started = Instant::now();
        let mut r = reply(&mut c).await;
        if r.code == 334 {
            r = reply(&mut c).await;
        }
        assert_eq!(r.code, 421, "{stall:?}: {r:?}");
        assert!(
            started.elapsed() < Duration::from_secs(4),
            "{stall:?}: {:?}",
            started.elapsed()
        );
        assert!(c.closed().await);
    }
    assert_eq!(world.smtp.stats().auth_ok, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn nodemailer_pool_of_five_never_takes_more_than_three_upstream_connections() {
    let world = World::start().await;
    let proxy = world.proxy(&[AccountSpec::device(USER, PASS)]).await;
    let res = nodemailer(merged(
        nodemailer_opts(&proxy),
        json!({"pool": true, "maxConnections": 5, "count": 20, "attachmentSize": 30_000}),
    ))
    .await;
    assert_eq!(res["ok"], true, "{res}\n{}", proxy.logs());
    let sent = res["sent"].as_array().unwrap();
    assert_eq!(sent.len(), 20);
    let msgs = world.smtp.wait_for_messages(20, T).await;
    assert_delivered_verbatim(sent, &msgs);
    let stats = world.smtp.stats();
    assert!(stats.max_active_per_mailbox <= 3, "{stats:?}");
    assert_eq!(stats.thread_limit_errors, 0, "{stats:?}");
    assert_eq!(stats.transactions_ok, 20, "{stats:?}");
    assert!(
        stats.auth_ok <= 3,
        "pooled upstream connections were reused: {stats:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_lower_connection_limit_is_respected_and_transactions_wait_for_a_slot() {
    let world = World::start().await;
    world.smtp.set_max_sessions_per_mailbox(Some(1));
    let proxy = proxy_with(&world, "debug", |t| {
        t.replace("[smtp]\n", "[smtp]\nmax_connections_per_mailbox = 1\n")
    })
    .await;
    // nodemailer's pool and clients by hand, all at once.
    let node = tokio::spawn(nodemailer(merged(
        nodemailer_opts(&proxy),
        json!({"pool": true, "maxConnections": 4, "count": 8}),
    )));
    let mut hands = Vec::new();
    for i in 0..3 {
        let mut c = logged_in(&proxy).await;
        hands.push(tokio::spawn(async move {
            for j in 0..2 {
                let (wire, _) = message(&format!("by hand {i}.{j}"));
                let r = send_message(
                    &mut c,
                    &format!("MAIL FROM:<{USER}>"),
                    &["RCPT TO:<x@example.net>"],
                    &wire,
                )
                .await;
                assert_eq!(r.code, 250, "{r:?}");
            }
        }));
    }
    for h in hands {
        h.await.unwrap();
    }
    let res = node.await.unwrap();
    assert_eq!(res["ok"], true, "{res}\n{}", proxy.logs());
    world.smtp.wait_for_messages(14, T).await;
    let stats = world.smtp.stats();
    assert_eq!(stats.max_active_per_mailbox, 1, "{stats:?}");
    assert_eq!(stats.thread_limit_errors, 0, "{stats:?}");
    assert_eq!(stats.transactions_ok, 14, "{stats:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn idle_upstream_connections_are_closed_after_the_idle_timeout() {
    let world = World::start().await;
    let proxy = proxy_with(&world, "debug", |t| {
        t.replace("[smtp]\n", "[smtp]\npool_idle_timeout = \"500ms\"\n")
    })
    .await;
    let mut c = logged_in(&proxy).await;
    let (wire, _) = message("before idling");
    let mail = format!("MAIL FROM:<{USER}>");
    assert_eq!(
        send_message(&mut c, &mail, &["RCPT TO:<a@example.net>"], &wire)
            .await
            .code,
        250
    );
    assert!(world.smtp.stats().active_now >= 1);
    let started = Instant::now();
    world.smtp.wait_for_stats(|s| s.active_now == 0, T).await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    // The client, still connected, sends again over a new upstream connection.
    let (wire, _) = message("after idling");
    assert_eq!(
        send_message(&mut c, &mail, &["RCPT TO:<a@example.net>"], &wire)
            .await
            .code,
        250
    );
    let msgs = world.smtp.wait_for_messages(2, T).await;
    assert_ne!(msgs[0].conn_id, msgs[1].conn_id);
    assert_eq!(world.smtp.stats().auth_ok, 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_vanishes_mid_data_delivers_nothing() {
    let world = World::start().await;
    let proxy = world.proxy(&[AccountSpec::device(USER, PASS)]).await;
    let mail = format!("MAIL FROM:<{USER}>");
    for partial in [
        &b"Subject: partial\r\n\r\nthe first half"[..],
        b"Subject: partial\r\n\r\nfirst half\r\n",
    ] {
        let mut c = logged_in(&proxy).await;
        assert_eq!(cmd(&mut c, &mail).await.code, 250);
        assert_eq!(cmd(&mut c, "RCPT TO:<a@example.net>").await.code, 250);
        assert_eq!(cmd(&mut c, "DATA").await.code, 354);
        c.send(partial).await;
        drop(c);
        // The upstream connection of the broken transaction is closed, not reused.
        world.smtp.wait_for_stats(|s| s.active_now == 0, T).await;
    }
    let stats = world.smtp.stats();
    assert_eq!(
        stats.transactions_ok, 0,
        "no partial message accepted: {stats:?}"
    );
    assert!(world.smtp.messages().is_empty());

    let mut c = logged_in(&proxy).await;
    let (wire, data) = message("whole");
    let r = send_message(&mut c, &mail, &["RCPT TO:<a@example.net>"], &wire).await;
    assert_eq!(r.code, 250, "{r:?}");
    let msgs = world.smtp.wait_for_messages(1, T).await;
    assert_eq!(msgs.len(), 1);
    assert_eq!(msgs[0].data, data);
    assert_eq!(msgs[0].mail_from, format!("<{USER}>"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_30_mb_message_is_relayed_byte_for_byte() {
    let world = World::start().await;
    let proxy = world.proxy(&[AccountSpec::device(USER, PASS)]).await;
    let mut wire = Vec::with_capacity(31 * 1024 * 1024);
    let mut data = Vec::with_capacity(31 * 1024 * 1024);
    wire.extend_from_slice(b"Subject: big\r\nContent-Type: text/plain\r\n\r\n");
    data.extend_from_slice(&wire);
    const LETTERS: &str = "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ";
    let mut i = 0u64;
    while wire.len() < 30 * 1024 * 1024 {
        let line = format!("{i:08} {}\r\n", &LETTERS[..(i % 60) as usize]);
        // Now and then a line that starts with a dot, stuffed on the wire.
        if i % 1000 == 7 {
            wire.extend_from_slice(b"..");
            data.push(b'.');
        }
        wire.extend_from_slice(line.as_bytes());
        data.extend_from_slice(line.as_bytes());
        i += 1;
    }
    let mut c = logged_in(&proxy).await;
    let started = Instant::now();
    let r = send_message(
        &mut c,
        &format!("MAIL FROM:<{USER}> SIZE={}", wire.len()),
        &["RCPT TO:<big@example.net>"],
        &wire,
    )
    .await;
    assert_eq!(r.code, 250, "{r:?}");
    let msgs = world.smtp.wait_for_messages(1, T).await;
    assert!(
        msgs[0].raw == wire,
        "relayed byte for byte ({} vs {} bytes)",
        msgs[0].raw.len(),
        wire.len()
    );
    assert!(msgs[0].data == data);
    eprintln!("30 MB through the proxy in {:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread")]
async fn no_secret_reaches_the_log_at_trace_level() {
    let world = World::start().await;
    world.idp.set_access_token_lifetime(Duration::from_secs(2));
    let proxy = proxy_with(&world, "trace", |t| {
        t.replace("[smtp]\n", "[smtp]\npool_idle_timeout = \"300ms\"\n")
    })
    .await;
    let mail = format!("MAIL FROM:<{USER}>");
    for round in 0..2 {
        // AUTH PLAIN inline, then a message.
        let mut c = logged_in(&proxy).await;
        let (wire, _) = message(&format!("round {round}"));
        assert_eq!(
            send_message(&mut c, &mail, &["RCPT TO:<a@example.net>"], &wire)
                .await
                .code,
            250
        );
        cmd(&mut c, "QUIT").await;
        // AUTH PLAIN after 334, AUTH LOGIN, and a wrong password.
        let mut c = connect(&proxy).await;
        cmd(&mut c, "AUTH PLAIN").await;
        assert_eq!(cmd(&mut c, &plain()).await.code, 235);
        let mut c = connect(&proxy).await;
        cmd(&mut c, "AUTH LOGIN").await;
        cmd(&mut c, &b64(USER.as_bytes())).await;
        assert_eq!(cmd(&mut c, &b64(PASS.as_bytes())).await.code, 235);
        let r = cmd(
            &mut c,
            &format!(
                "AUTH PLAIN {}",
                b64(format!("\0{USER}\0wrong-{PASS}").as_bytes())
            ),
        )
        .await;
        assert_eq!(r.code, 503);
        let mut c = connect(&proxy).await;
        let r = cmd(
            &mut c,
            &format!(
                "AUTH PLAIN {}",
                b64(format!("\0{USER}\0wrong-{PASS}").as_bytes())
            ),
        )
        .await;
        assert_eq!(r.code, 535);
        // Let the pooled connection and the access token expire.
        tokio::time::sleep(Duration::from_millis(1500)).await;
    }
    world.idp.revoke_grants(USER);
    world.smtp.wait_for_stats(|s| s.active_now == 0, T).await;
    let mut c = connect(&proxy).await;
    let r = cmd(&mut c, &format!("AUTH PLAIN {}", plain())).await;
    assert_eq!(r.code, 535, "{r:?}");
    assert!(
        world.idp.counts().refresh_grants >= 2,
        "tokens were refreshed during the run"
    );
    assert!(
        world.smtp.stats().auth_ok >= 2,
        "the upstream saw several XOAUTH2 logins"
    );

    let logs = proxy.logs();
    assert!(
        logs.contains("TRACE") || logs.contains("DEBUG"),
        "the log ran at a verbose level"
    );
    let mut secrets = world.secrets();
    secrets.extend([
        PASS.to_string(),
        plain(),
        b64(PASS.as_bytes()),
        b64(format!("\0{USER}\0wrong-{PASS}").as_bytes()),
    ]);
    for token in world.tokens.all_tokens() {
        secrets.push(testkit::xoauth2(USER, &token));
    }
    for secret in secrets.iter().filter(|s| s.len() >= 8) {
        assert!(
            !logs.contains(secret.as_str()),
            "a secret reached the log: {}…",
            &secret[..8]
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_warm_pool_does_not_outlive_a_revoked_grant() {
    let world = World::start().await;
    world.idp.set_access_token_lifetime(Duration::from_secs(3));
    let proxy = world.proxy(&[AccountSpec::device(USER, PASS)]).await;
    // Warm the mailbox's pool: one authenticated upstream connection stays idle.
    let mut c = logged_in(&proxy).await;
    let (wire, _) = message("before the revocation");
    let r = send_message(
        &mut c,
        &format!("MAIL FROM:<{USER}>"),
        &["RCPT TO:<a@example.net>"],
        &wire,
    )
    .await;
    assert_eq!(r.code, 250, "{r:?}");
    cmd(&mut c, "QUIT").await;

    world.idp.revoke_grants(USER);
    // Once the cached token is due for renewal, the grant is asked for again.
    tokio::time::sleep(Duration::from_millis(2200)).await;
    let mut c = connect(&proxy).await;
    cmd(&mut c, "EHLO client.example").await;
    let r = cmd(&mut c, &format!("AUTH PLAIN {}", plain())).await;
    assert!(r.last().starts_with("535 5.7.8"), "{r:?}");
    proxy
        .wait_for_log(&format!("run `xoauth2-proxy login {USER}`"), T)
        .await;
}
