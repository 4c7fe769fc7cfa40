//! Tests of the mock SMTP upstream itself, so that proxy tests can trust it.

use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use rustls::pki_types::ServerName;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use testkit::node::nodemailer;
use testkit::pki::TestPki;
use testkit::smtp::{self, FailureStyle, MockSmtpUpstream, UpstreamTls};
use testkit::tokens::{Subject, TokenBook};
use testkit::xoauth2;

const USER: &str = "user@example.com";
const T: Duration = Duration::from_secs(10);

/// A minimal SMTP client: one reply = all lines up to the one with a space after the code.
struct Client<S> {
    r: BufReader<S>,
}

struct Reply {
    code: u16,
    lines: Vec<String>,
}

impl Reply {
    fn last(&self) -> &str {
        self.lines.last().map(String::as_str).unwrap_or("")
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Client<S> {
    fn new(s: S) -> Self {
        Client {
            r: BufReader::new(s),
        }
    }

    async fn reply(&mut self) -> Reply {
        let mut lines = Vec::new();
        loop {
            let mut line = String::new();
            let n = tokio::time::timeout(T, self.r.read_line(&mut line))
                .await
                .expect("reply in time")
                .expect("read reply");
            assert!(
                n > 0,
                "connection closed while waiting for a reply: {lines:?}"
            );
            let line = line.trim_end_matches(['\r', '\n']).to_string();
            let done = line.as_bytes().get(3) != Some(&b'-');
            lines.push(line);
            if done {
                break;
            }
        }
        let code = lines.last().unwrap()[..3].parse().expect("reply code");
        Reply { code, lines }
    }

    async fn write(&mut self, bytes: &[u8]) {
        self.r.get_mut().write_all(bytes).await.expect("write");
        self.r.get_mut().flush().await.expect("flush");
    }

    async fn cmd(&mut self, line: &str) -> Reply {
        self.write(format!("{line}\r\n").as_bytes()).await;
        self.reply().await
    }

    /// Reads until EOF or an error; true when the server closed without sending anything.
    async fn closed_silently(&mut self) -> bool {
        let mut rest = Vec::new();
        match tokio::time::timeout(T, self.r.read_to_end(&mut rest)).await {
            Ok(Ok(_)) | Ok(Err(_)) => rest.is_empty(),
            Err(_) => panic!("the server did not close the connection"),
        }
    }
}

type Tls = TlsStream<TcpStream>;

async fn connect_plain(mock: &MockSmtpUpstream) -> Client<TcpStream> {
    let tcp = TcpStream::connect(mock.addr()).await.expect("connect");
    let mut c = Client::new(tcp);
    let greeting = c.reply().await;
    assert_eq!(
        greeting.last(),
        "220 mock.outlook.office365.com Microsoft ESMTP MAIL Service ready"
    );
    c
}

async fn upgrade(pki: &TestPki, c: Client<TcpStream>) -> Client<Tls> {
    assert!(c.r.buffer().is_empty(), "bytes after the STARTTLS reply");
    let tcp = c.r.into_inner();
    let name = ServerName::try_from("localhost").unwrap();
    let tls = pki
        .connector()
        .connect(name, tcp)
        .await
        .expect("TLS handshake");
    Client::new(tls)
}

/// Connects, EHLO, STARTTLS, EHLO again; returns the TLS client and the second EHLO.
async fn connect_tls(pki: &TestPki, mock: &MockSmtpUpstream) -> (Client<Tls>, Reply) {
    let mut c = connect_plain(mock).await;
    assert_eq!(c.cmd("EHLO client.example").await.code, 250);
    let r = c.cmd("STARTTLS").await;
    assert_eq!(r.code, 220, "{:?}", r.lines);
    let mut c = upgrade(pki, c).await;
    let ehlo = c.cmd("EHLO client.example").await;
    assert_eq!(ehlo.code, 250);
    (c, ehlo)
}

async fn authed(pki: &TestPki, mock: &MockSmtpUpstream, token: &str) -> Client<Tls> {
    let (mut c, _) = connect_tls(pki, mock).await;
    let r = c
        .cmd(&format!("AUTH XOAUTH2 {}", xoauth2(USER, token)))
        .await;
    assert_eq!(r.last(), "235 2.7.0 Authentication successful");
    c
}

struct Env {
    pki: TestPki,
    tokens: TokenBook,
    mock: MockSmtpUpstream,
    token: String,
}

async fn env(tls: UpstreamTls) -> Env {
    let pki = TestPki::new();
    let tokens = TokenBook::default();
    let mock = smtp::start(&pki, tokens.clone(), tls).await;
    let token = tokens.issue(Subject::Mailbox(USER.into()), Duration::from_secs(600));
    Env {
        pki,
        tokens,
        mock,
        token,
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[tokio::test]
async fn starttls_capabilities_and_xoauth2_inline_and_after_334() {
    let e = env(UpstreamTls::StartTls).await;

    let mut c = connect_plain(&e.mock).await;
    let ehlo = c.cmd("EHLO client.example").await;
    assert_eq!(ehlo.code, 250);
    assert!(ehlo.lines[0].starts_with("250-mock.outlook.office365.com Hello"));
    let caps: Vec<&str> = ehlo.lines[1..].iter().map(|l| &l[4..]).collect();
    for cap in [
        "SIZE 157286400",
        "PIPELINING",
        "DSN",
        "ENHANCEDSTATUSCODES",
        "STARTTLS",
        "8BITMIME",
        "BINARYMIME",
        "CHUNKING",
        "SMTPUTF8",
    ] {
        assert!(caps.contains(&cap), "{cap} missing from {caps:?}");
    }
    assert!(!caps.iter().any(|c| c.starts_with("AUTH")), "{caps:?}");
    assert_eq!(
        c.cmd("MAIL FROM:<user@example.com>").await.last(),
        "530 5.7.57 Client not authenticated to send mail."
    );
    let r = c
        .cmd(&format!("AUTH XOAUTH2 {}", xoauth2(USER, &e.token)))
        .await;
    assert_eq!(r.code, 504, "no AUTH before TLS");
    assert_eq!(c.cmd("STARTTLS").await.code, 220);
    let mut c = upgrade(&e.pki, c).await;
    let ehlo = c.cmd("EHLO client.example").await;
    let caps: Vec<&str> = ehlo.lines[1..].iter().map(|l| &l[4..]).collect();
    assert!(caps.contains(&"AUTH LOGIN XOAUTH2"), "{caps:?}");
    assert!(!caps.contains(&"STARTTLS"), "{caps:?}");
    assert_eq!(
        c.cmd("MAIL FROM:<user@example.com>").await.last(),
        "530 5.7.57 Client not authenticated to send mail."
    );
    // Inline initial response.
    let r = c
        .cmd(&format!("AUTH XOAUTH2 {}", xoauth2(USER, &e.token)))
        .await;
    assert_eq!(r.last(), "235 2.7.0 Authentication successful");
    assert_eq!(c.cmd("NOOP").await.last(), "250 2.0.0 OK");
    assert_eq!(
        c.cmd("QUIT").await.last(),
        "221 2.0.0 Service closing transmission channel"
    );

    // After an empty 334, HELO instead of EHLO.
    let mut c = connect_plain(&e.mock).await;
    assert_eq!(c.cmd("EHLO client.example").await.code, 250);
    assert_eq!(c.cmd("STARTTLS").await.code, 220);
    let mut c = upgrade(&e.pki, c).await;
    assert_eq!(c.cmd("HELO client.example").await.code, 250);
    let r = c.cmd("AUTH XOAUTH2").await;
    assert_eq!(r.code, 334);
    assert_eq!(r.last().trim_end(), "334");
    let r = c.cmd(&xoauth2(USER, &e.token)).await;
    assert_eq!(r.last(), "235 2.7.0 Authentication successful");
    assert_eq!(
        c.cmd("MAIL FROM:<user@example.com>").await.last(),
        "250 2.1.0 Sender OK"
    );

    let stats = e.mock.stats();
    assert_eq!(stats.auth_ok, 2);
    assert_eq!(stats.auth_failed, 0);
    assert_eq!(stats.connections_total, 2);
    assert_eq!(stats.max_active_per_mailbox, 1);
}

#[tokio::test]
async fn implicit_tls_offers_auth_at_once() {
    let e = env(UpstreamTls::Implicit).await;
    let tcp = TcpStream::connect(e.mock.addr()).await.unwrap();
    let name = ServerName::try_from("localhost").unwrap();
    let tls = e.pki.connector().connect(name, tcp).await.expect("TLS");
    let mut c = Client::new(tls);
    assert_eq!(c.reply().await.code, 220);
    let ehlo = c.cmd("EHLO client.example").await;
    assert!(ehlo.lines.iter().any(|l| l.ends_with("AUTH LOGIN XOAUTH2")));
    assert!(!ehlo.lines.iter().any(|l| l.contains("STARTTLS")));
    assert_eq!(c.cmd("STARTTLS").await.code, 503);
    let r = c
        .cmd(&format!("AUTH XOAUTH2 {}", xoauth2(USER, &e.token)))
        .await;
    assert_eq!(r.code, 235);
}

#[tokio::test]
async fn bad_tokens_fail_in_both_styles() {
    let e = env(UpstreamTls::StartTls).await;
    let (mut c, _) = connect_tls(&e.pki, &e.mock).await;

    // Microsoft: 535 5.7.3 at once.
    let r = c
        .cmd(&format!("AUTH XOAUTH2 {}", xoauth2(USER, "not-a-token")))
        .await;
    assert!(
        r.last()
            .starts_with("535 5.7.3 Authentication unsuccessful"),
        "{:?}",
        r.lines
    );
    // A token for someone else is as bad.
    let other = e
        .tokens
        .issue(Subject::Mailbox("other@example.com".into()), T);
    let r = c
        .cmd(&format!("AUTH XOAUTH2 {}", xoauth2(USER, &other)))
        .await;
    assert_eq!(r.code, 535);

    // Google/Postfix: a 334 challenge carrying JSON, then 535 after the empty line.
    e.mock.set_failure_style(FailureStyle::Challenge);
    let r = c.cmd("AUTH XOAUTH2").await;
    assert_eq!(r.code, 334);
    let r = c.cmd(&xoauth2(USER, "not-a-token")).await;
    assert_eq!(r.code, 334, "{:?}", r.lines);
    let json = STANDARD.decode(&r.last()[4..]).expect("base64 challenge");
    let json: serde_json::Value = serde_json::from_slice(&json).expect("JSON challenge");
    assert_eq!(json["status"], "401");
    assert_eq!(json["schemes"], "bearer");
    assert_eq!(json["scope"], "https://mail.google.com/");
    assert_eq!(c.cmd("").await.last(), "535 5.7.8 Authentication failed");

    // Inline, challenge style.
    let r = c
        .cmd(&format!("AUTH XOAUTH2 {}", xoauth2(USER, "nope")))
        .await;
    assert_eq!(r.code, 334);
    assert_eq!(c.cmd("").await.code, 535);

    // Garbage and cancel.
    assert_eq!(c.cmd("AUTH XOAUTH2 %%%notbase64").await.code, 501);
    assert_eq!(c.cmd("AUTH XOAUTH2").await.code, 334);
    assert_eq!(c.cmd("*").await.code, 501);
    assert_eq!(c.cmd("AUTH PLAIN AGZvbwBiYXI=").await.code, 504);

    // The session still works with a good token.
    let r = c
        .cmd(&format!("AUTH XOAUTH2 {}", xoauth2(USER, &e.token)))
        .await;
    assert_eq!(r.code, 235);
    // Revoked tokens fail.
    e.tokens.revoke(&Subject::Mailbox(USER.into()));
    let (mut c2, _) = connect_tls(&e.pki, &e.mock).await;
    let r = c2
        .cmd(&format!("AUTH XOAUTH2 {}", xoauth2(USER, &e.token)))
        .await;
    assert_eq!(r.code, 334, "still challenge style");
    assert_eq!(c2.cmd("").await.code, 535);

    let stats = e.mock.stats();
    assert_eq!(stats.auth_ok, 1);
    assert_eq!(stats.auth_failed, 7);
}

#[tokio::test]
async fn smtp_client_authentication_disabled() {
    let e = env(UpstreamTls::StartTls).await;
    e.mock.set_auth_disabled("User@Example.com", true);
    let (mut c, _) = connect_tls(&e.pki, &e.mock).await;
    let r = c
        .cmd(&format!("AUTH XOAUTH2 {}", xoauth2(USER, &e.token)))
        .await;
    assert_eq!(
        r.last(),
        "535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Mailbox. Visit https://aka.ms/smtp_auth_disabled for more information."
    );
    e.mock.set_auth_disabled(USER, false);
    let r = c
        .cmd(&format!("AUTH XOAUTH2 {}", xoauth2(USER, &e.token)))
        .await;
    assert_eq!(r.code, 235);
}

#[tokio::test]
async fn pipelined_transaction_with_dot_stuffing() {
    let e = env(UpstreamTls::StartTls).await;
    let mut c = authed(&e.pki, &e.mock, &e.token).await;

    c.write(
        b"MAIL FROM:<user@example.com> SIZE=123 BODY=8BITMIME\r\n\
          RCPT TO:<a@example.net>\r\n\
          RCPT TO:<b@example.net> NOTIFY=NEVER\r\n\
          DATA\r\n",
    )
    .await;
    assert_eq!(c.reply().await.last(), "250 2.1.0 Sender OK");
    assert_eq!(c.reply().await.last(), "250 2.1.5 Recipient OK");
    assert_eq!(c.reply().await.last(), "250 2.1.5 Recipient OK");
    assert_eq!(
        c.reply().await.last(),
        "354 Start mail input; end with <CRLF>.<CRLF>"
    );
    let content: &[u8] =
        b"Subject: dots\r\n\r\n.hidden\r\n..\r\n.\r\nmid.dle\r\n. space\r\n.\rx\r\nend\r\n";
    let wire: &[u8] =
        b"Subject: dots\r\n\r\n..hidden\r\n...\r\n..\r\nmid.dle\r\n.. space\r\n..\rx\r\nend\r\n";
    let mut sent = wire.to_vec();
    sent.extend_from_slice(b".\r\n");
    // Dribble it in odd-sized pieces so that every boundary case is crossed.
    for piece in sent.chunks(3) {
        c.write(piece).await;
    }
    let r = c.reply().await;
    assert!(
        r.last().starts_with("250 2.0.0 OK <") && r.last().ends_with("> [Hostname=mock]"),
        "{:?}",
        r.lines
    );
    assert_eq!(c.cmd("RSET").await.last(), "250 2.0.0 Resetting");
    assert_eq!(c.cmd("RCPT TO:<a@example.net>").await.code, 503);

    // A second transaction in one write, content and QUIT included.
    c.write(b"MAIL FROM:<user@example.com>\r\nRCPT TO:<c@example.net>\r\nDATA\r\n")
        .await;
    for _ in 0..3 {
        c.reply().await;
    }
    c.write(b"Subject: two\r\n\r\nbody\r\n.\r\nQUIT\r\n").await;
    assert_eq!(c.reply().await.code, 250);
    assert_eq!(c.reply().await.code, 221);

    let msgs = e.mock.wait_for_messages(2, T).await;
    let m = &msgs[0];
    assert_eq!(m.auth_user, USER);
    assert_eq!(m.mail_from, "<user@example.com> SIZE=123 BODY=8BITMIME");
    assert_eq!(
        m.rcpt_to,
        vec!["<a@example.net>", "<b@example.net> NOTIFY=NEVER"]
    );
    assert_eq!(
        String::from_utf8_lossy(&m.data),
        String::from_utf8_lossy(content)
    );
    assert_eq!(m.raw, wire);
    assert_eq!(msgs[1].data, b"Subject: two\r\n\r\nbody\r\n");
    assert_eq!(msgs[1].rcpt_to, vec!["<c@example.net>"]);

    let stats = e.mock.stats();
    assert_eq!(stats.transactions_ok, 2);
    assert_eq!(stats.rsets, 1);
    e.mock.wait_for_stats(|s| s.active_now == 0, T).await;
}

#[tokio::test]
async fn bdat_and_empty_data() {
    let e = env(UpstreamTls::StartTls).await;
    let mut c = authed(&e.pki, &e.mock, &e.token).await;
    assert_eq!(c.cmd("MAIL FROM:<user@example.com>").await.code, 250);
    assert_eq!(c.cmd("RCPT TO:<a@example.net>").await.code, 250);
    c.write(b"BDAT 5\r\n.abc\nBDAT 3 LAST\r\nxyz").await;
    assert_eq!(c.reply().await.code, 250);
    assert_eq!(c.reply().await.code, 250);
    assert_eq!(c.cmd("MAIL FROM:<user@example.com>").await.code, 250);
    assert_eq!(c.cmd("RCPT TO:<a@example.net>").await.code, 250);
    assert_eq!(c.cmd("DATA").await.code, 354);
    assert_eq!(c.cmd(".").await.code, 250);
    let msgs = e.mock.wait_for_messages(2, T).await;
    assert_eq!(msgs[0].data, b".abc\nxyz");
    assert_eq!(msgs[0].raw, b".abc\nxyz");
    assert!(msgs[1].data.is_empty());
}

#[tokio::test]
async fn large_message_is_read_quickly_and_exactly() {
    let e = env(UpstreamTls::StartTls).await;
    let mut c = authed(&e.pki, &e.mock, &e.token).await;
    // 30 MB: base64-like 76-character lines, some with leading dots, and one
    // 3 MB line without any line break.
    let mut content = Vec::with_capacity(31 << 20);
    content.extend_from_slice(b"Subject: big\r\n\r\n");
    let mut i = 0u64;
    while content.len() < 27 << 20 {
        if i % 1000 == 7 {
            content.push(b'.');
        }
        content.extend(std::iter::repeat_n(b'A' + (i % 26) as u8, 75));
        content.extend_from_slice(b"\r\n");
        i += 1;
    }
    content.extend(std::iter::repeat_n(b'x', 3 << 20));
    content.extend_from_slice(b"\r\n");
    let mut wire = Vec::with_capacity(content.len() + 100_000);
    let mut at_line_start = true;
    for &b in &content {
        if at_line_start && b == b'.' {
            wire.push(b'.');
        }
        wire.push(b);
        at_line_start = b == b'\n';
    }
    assert_eq!(c.cmd("MAIL FROM:<user@example.com>").await.code, 250);
    assert_eq!(c.cmd("RCPT TO:<a@example.net>").await.code, 250);
    assert_eq!(c.cmd("DATA").await.code, 354);
    let started = Instant::now();
    c.write(&wire).await;
    c.write(b".\r\n").await;
    assert_eq!(c.reply().await.code, 250);
    let took = started.elapsed();
    eprintln!("30 MB through the mock in {took:?}");
    assert!(took < Duration::from_secs(20), "too slow: {took:?}");
    let msgs = e.mock.messages();
    assert_eq!(msgs[0].data.len(), content.len());
    assert!(msgs[0].data == content);
    assert!(msgs[0].raw == wire);
}

#[tokio::test]
async fn long_lines_up_to_16k_are_accepted() {
    let e = env(UpstreamTls::StartTls).await;
    let (mut c, _) = connect_tls(&e.pki, &e.mock).await;
    // A 12 KB XOAUTH2 line (a very long token) is just a bad token, not a protocol error.
    let long = "t".repeat(9000);
    let line = format!("AUTH XOAUTH2 {}", xoauth2(USER, &long));
    assert!(line.len() > 12_000);
    assert_eq!(c.cmd(&line).await.code, 535);
    // Beyond 16 KiB the server gives up.
    let r = c.cmd(&format!("NOOP {}", "x".repeat(17_000))).await;
    assert_eq!(r.code, 500);
    assert!(c.closed_silently().await);
}

#[tokio::test]
async fn fourth_connection_for_a_mailbox_hits_the_thread_limit() {
    let e = env(UpstreamTls::StartTls).await;
    let mut conns = Vec::new();
    for _ in 0..4 {
        conns.push(authed(&e.pki, &e.mock, &e.token).await);
    }
    for c in conns.iter_mut().take(3) {
        assert_eq!(c.cmd("MAIL FROM:<user@example.com>").await.code, 250);
    }
    let r = conns[3].cmd("MAIL FROM:<user@example.com>").await;
    assert_eq!(
        r.last(),
        "432 4.3.2 STOREDRV.ClientSubmit; sender thread limit exceeded [Hostname=mock]"
    );
    let stats = e.mock.stats();
    assert_eq!(stats.max_active_per_mailbox, 4);
    assert_eq!(stats.thread_limit_errors, 1);
    // Another mailbox is not affected.
    let other = e
        .tokens
        .issue(Subject::Mailbox("other@example.com".into()), T);
    let (mut o, _) = connect_tls(&e.pki, &e.mock).await;
    let r = o
        .cmd(&format!(
            "AUTH XOAUTH2 {}",
            xoauth2("other@example.com", &other)
        ))
        .await;
    assert_eq!(r.code, 235);
    assert_eq!(o.cmd("MAIL FROM:<other@example.com>").await.code, 250);

    // Once an older connection is gone, the fourth may send.
    let mut first = conns.remove(0);
    assert_eq!(first.cmd("QUIT").await.code, 221);
    let r = conns[2].cmd("MAIL FROM:<user@example.com>").await;
    assert_eq!(r.code, 250, "{:?}", r.lines);
    drop(first);
    drop(conns);
    drop(o);
    e.mock.wait_for_stats(|s| s.active_now == 0, T).await;

    // No limit at all.
    e.mock.set_max_sessions_per_mailbox(None);
    let mut conns = Vec::new();
    for _ in 0..5 {
        conns.push(authed(&e.pki, &e.mock, &e.token).await);
    }
    for c in conns.iter_mut() {
        assert_eq!(c.cmd("MAIL FROM:<user@example.com>").await.code, 250);
    }
    assert_eq!(e.mock.stats().max_active_per_mailbox, 5);
}

#[tokio::test]
async fn drop_during_next_data_cuts_the_connection_once() {
    let e = env(UpstreamTls::StartTls).await;
    e.mock.drop_during_next_data();
    let mut c = authed(&e.pki, &e.mock, &e.token).await;
    assert_eq!(c.cmd("MAIL FROM:<user@example.com>").await.code, 250);
    assert_eq!(c.cmd("RCPT TO:<a@example.net>").await.code, 250);
    assert_eq!(c.cmd("DATA").await.code, 354);
    // Send some content but not the end; the server must hang up without a word.
    let _ =
        c.r.get_mut()
            .write_all(b"Subject: doomed\r\n\r\nfirst part\r\n")
            .await;
    let _ = c.r.get_mut().flush().await;
    assert!(c.closed_silently().await, "no reply after the drop");
    e.mock.wait_for_stats(|s| s.dropped_data == 1, T).await;

    // One-shot: the next transaction goes through.
    let mut c = authed(&e.pki, &e.mock, &e.token).await;
    assert_eq!(c.cmd("MAIL FROM:<user@example.com>").await.code, 250);
    assert_eq!(c.cmd("RCPT TO:<a@example.net>").await.code, 250);
    assert_eq!(c.cmd("DATA").await.code, 354);
    assert_eq!(c.cmd("Subject: ok\r\n\r\nfine\r\n.").await.code, 250);
    let msgs = e.mock.wait_for_messages(1, T).await;
    assert_eq!(msgs.len(), 1);
    assert_eq!(msgs[0].data, b"Subject: ok\r\n\r\nfine\r\n");
}

#[tokio::test]
async fn stopped_refuses_and_hang_never_greets() {
    let e = env(UpstreamTls::StartTls).await;
    e.mock.set_stopped(true);
    let err = TcpStream::connect(e.mock.addr())
        .await
        .expect_err("connection refused while stopped");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);
    e.mock.set_stopped(false);
    let mut c = connect_plain(&e.mock).await;
    assert_eq!(c.cmd("QUIT").await.code, 221);

    e.mock.set_hang(true);
    let mut tcp = TcpStream::connect(e.mock.addr()).await.unwrap();
    let mut buf = [0u8; 16];
    let r = tokio::time::timeout(Duration::from_millis(500), tcp.read(&mut buf)).await;
    assert!(r.is_err(), "a hung server says nothing");
    e.mock.set_hang(false);
    let _c = connect_plain(&e.mock).await;
    let stats = e.mock.stats();
    assert_eq!(stats.connections_total, 3);
}

#[tokio::test]
async fn nodemailer_sends_through_a_pool_with_xoauth2() {
    let e = env(UpstreamTls::StartTls).await;
    let res = nodemailer(serde_json::json!({
        "host": "localhost",
        "port": e.mock.port(),
        "secure": false,
        "user": USER,
        "accessToken": e.token,
        "caFile": e.pki.ca_pem_path,
        "pool": true,
        "maxConnections": 2,
        "count": 5,
        "attachmentSize": 50_000,
    }))
    .await;
    assert_eq!(res["ok"], true, "{res}");
    let sent = res["sent"].as_array().unwrap();
    assert_eq!(sent.len(), 5);

    let msgs = e.mock.wait_for_messages(5, T).await;
    assert_eq!(msgs.len(), 5);
    for s in sent {
        let id = s["messageId"].as_str().unwrap();
        let m = msgs
            .iter()
            .find(|m| String::from_utf8_lossy(&m.data).contains(&format!("Message-ID: {id}")))
            .unwrap_or_else(|| panic!("{id} did not arrive"));
        assert_eq!(m.auth_user, USER);
        assert!(
            m.mail_from.starts_with("<user@example.com>"),
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
        assert_eq!(s["sha256OfMessage"], s["sha256OfRaw"]);
        assert_eq!(s["size"].as_u64().unwrap() as usize, m.data.len());
        assert!(s["response"].as_str().unwrap().starts_with("250 2.0.0 OK"));
    }
    // The message bodies had dots to stuff.
    assert!(msgs.iter().any(|m| m.raw != m.data));
    let stats = e.mock.stats();
    assert_eq!(stats.auth_ok, 2, "a pool of two connections: {stats:?}");
    assert_eq!(stats.max_active_per_mailbox, 2);
    assert_eq!(stats.transactions_ok, 5);
    // nodemailer 10 sends the next MAIL FROM right after a message's 250 (no RSET
    // between successful pooled messages), so connections carry several messages.
    let mut per_conn = std::collections::HashMap::new();
    for m in &msgs {
        *per_conn.entry(m.conn_id).or_insert(0) += 1;
    }
    assert_eq!(per_conn.len(), 2, "{per_conn:?}");
    assert!(per_conn.values().any(|&n| n > 1), "{per_conn:?}");
}

#[tokio::test]
async fn nodemailer_reports_auth_failures() {
    let e = env(UpstreamTls::StartTls).await;
    let res = nodemailer(serde_json::json!({
        "host": "127.0.0.1",
        "port": e.mock.port(),
        "secure": false,
        "user": USER,
        "accessToken": "wrong",
        "caFile": e.pki.ca_pem_path,
        "pool": false,
        "verifyOnly": true,
    }))
    .await;
    assert_eq!(res["ok"], false, "{res}");
    assert_eq!(res["code"], "EAUTH");
    assert_eq!(res["responseCode"], 535);

    let res = nodemailer(serde_json::json!({
        "host": "127.0.0.1",
        "port": e.mock.port(),
        "user": USER,
        "accessToken": e.token,
        "caFile": e.pki.ca_pem_path,
        "verifyOnly": true,
    }))
    .await;
    assert_eq!(res["ok"], true, "{res}");
}
