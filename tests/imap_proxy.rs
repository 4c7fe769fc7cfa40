//! The IMAP side, end to end through the real binary: mock identity provider
//! and mock TLS upstream on loopback, clients by hand and imapflow.

use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::json;
use testkit::idp::{DeviceOutcome, IdpMode};
use testkit::imap::FailureStyle;
use testkit::node::imapflow as run_imapflow;
use testkit::proxy::AccountSpec;
use testkit::tokens::Subject;
use testkit::world::{LineClient, World};

const USER: &str = "sales@contoso.com";
const PASS: &str = "local-pass-9f3k";

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

async fn logged_in(client: &mut LineClient) {
    client.line(&format!("a1 LOGIN {USER} {PASS}")).await;
    let lines = client.until("a1 ").await;
    assert!(lines.last().unwrap().starts_with("a1 OK"), "{lines:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn imapflow_connect_sequence_works_through_the_proxy() {
    let world = World::start().await;
    let proxy = world.proxy(&[AccountSpec::device(USER, PASS)]).await;
    world
        .imap
        .add_message(USER, b"Subject: hello\r\n\r\nfirst message\r\n".to_vec());

    let out = run_imapflow(
        &json!({
            "host": "127.0.0.1", "port": proxy.imap_addr.port(), "secure": false,
            "user": USER, "pass": PASS,
            "steps": ["list", "select", "fetch", "append", "idle"],
            "appendSize": 4096,
        }),
        60,
    )
    .await;
    assert_eq!(out["ok"], true, "{out}\n{}", proxy.logs());
    let caps: Vec<String> = serde_json::from_value(out["capabilities"].clone()).unwrap();
    assert!(caps.iter().any(|c| c == "IDLE"), "{caps:?}");
    assert!(
        !caps
            .iter()
            .any(|c| c.starts_with("AUTH=") || c == "LOGINDISABLED" || c == "STARTTLS"),
        "filtered capabilities: {caps:?}"
    );
    let seen = world.imap.commands_seen();
    for expected in ["NAMESPACE", "ENABLE", "SELECT", "IDLE", "FETCH", "APPEND"] {
        assert!(
            seen.iter()
                .any(|c| c.trim_start_matches("UID ") == expected),
            "upstream never saw {expected}: {seen:?}"
        );
    }
    assert_eq!(world.imap.messages(USER).len(), 2, "the append arrived");
}

#[tokio::test(flavor = "multi_thread")]
async fn preauth_commands_are_answered_by_the_proxy() {
    let world = World::start().await;
    let proxy = world.proxy(&[AccountSpec::device(USER, PASS)]).await;
    let mut c = LineClient::connect(proxy.imap_addr).await;
    let greeting = c.read().await.unwrap();
    assert!(
        greeting.starts_with("* OK [CAPABILITY IMAP4rev1"),
        "{greeting}"
    );
    assert!(
        greeting.contains("AUTH=PLAIN")
            && !greeting.contains("STARTTLS")
            && !greeting.contains("LOGINDISABLED")
    );

    c.line("c1 CAPABILITY").await;
    let lines = c.until("c1 ").await;
    assert!(
        lines[0].starts_with("* CAPABILITY ") && lines[0].contains("LITERAL+"),
        "{lines:?}"
    );
    assert!(lines[1].starts_with("c1 OK"));
    c.line("c2 NOOP").await;
    assert!(c.read().await.unwrap().starts_with("c2 OK"));
    c.line("c3 ID (\"name\" \"imapflow\")").await;
    let lines = c.until("c3 ").await;
    assert!(
        lines[0].starts_with("* ID (\"name\" \"xoauth2-proxy\""),
        "{lines:?}"
    );
    c.line("c4 SELECT INBOX").await;
    assert!(c.read().await.unwrap().starts_with("c4 BAD"));
    c.line("c5 STARTTLS").await;
    assert!(c.read().await.unwrap().starts_with("c5 BAD"));
    c.line("c6 LOGOUT").await;
    let lines = c.until("c6 ").await;
    assert!(
        lines[0].starts_with("* BYE") && lines[1].starts_with("c6 OK"),
        "{lines:?}"
    );
    assert!(c.closed().await);
    assert_eq!(
        world.imap.stats().connections,
        0,
        "no upstream connection before login"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn every_login_form_is_understood() {
    let world = World::start().await;
    let user = "o\"brien\\x@contoso.com";
    let pass = "p\\a\"ss {word}";
    // An account with an awkward username and password, written by hand.
    let proxy = testkit::proxy::TestProxy::start_with(
        &world.endpoints,
        &[AccountSpec::device(USER, PASS)],
        "debug",
        |text| {
            format!(
                "{text}\n[[accounts]]\nusername = '{user}'\npassword = '{pass}'\nprovider = \"test\"\nmailbox = \"{USER}\"\n"
            )
        },
    )
    .await;
    world.grant(&proxy, &AccountSpec::device(USER, PASS));
    // The awkward account gets its grant through the real `login` command.
    world.idp.set_device_user(USER);
    world
        .idp
        .set_device_outcome(DeviceOutcome::ApproveAfterPolls(0));
    let login = proxy.cli(&["login", user]).await;
    assert!(
        login.status.success(),
        "{}",
        String::from_utf8_lossy(&login.stderr)
    );

    let quoted = |s: &str| format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""));
    // LOGIN with quoted strings and escapes.
    let mut c = LineClient::connect(proxy.imap_addr).await;
    c.read().await;
    c.line(&format!("q1 LOGIN {} {}", quoted(user), quoted(pass)))
        .await;
    assert!(c.until("q1 ").await.last().unwrap().starts_with("q1 OK"));

    // LOGIN with synchronising literals: the proxy asks for each with `+`.
    let mut c = LineClient::connect(proxy.imap_addr).await;
    c.read().await;
    c.send(format!("s1 LOGIN {{{}}}\r\n", user.len()).as_bytes())
        .await;
    assert!(c.read().await.unwrap().starts_with("+ "));
    c.send(format!("{user} {{{}}}\r\n", pass.len()).as_bytes())
        .await;
    assert!(c.read().await.unwrap().starts_with("+ "));
    c.send(format!("{pass}\r\n").as_bytes()).await;
    assert!(c.until("s1 ").await.last().unwrap().starts_with("s1 OK"));

    // LOGIN with LITERAL+ literals, all in one write.
    let mut c = LineClient::connect(proxy.imap_addr).await;
    c.read().await;
    c.send(
        format!(
            "n1 LOGIN {{{}+}}\r\n{user} {{{}+}}\r\n{pass}\r\n",
            user.len(),
            pass.len()
        )
        .as_bytes(),
    )
    .await;
    assert!(c.until("n1 ").await.last().unwrap().starts_with("n1 OK"));

    // LOGIN with atoms.
    let mut c = LineClient::connect(proxy.imap_addr).await;
    c.read().await;
    logged_in(&mut c).await;

    let plain = b64(format!("\0{user}\0{pass}").as_bytes());
    // AUTHENTICATE PLAIN with a `+` continuation.
    let mut c = LineClient::connect(proxy.imap_addr).await;
    c.read().await;
    c.line("p1 AUTHENTICATE PLAIN").await;
    assert_eq!(c.read().await.unwrap(), "+ ");
    c.line(&plain).await;
    assert!(
        c.until("p1 ")
            .await
            .last()
            .unwrap()
            .starts_with("p1 OK [CAPABILITY ")
    );

    // AUTHENTICATE PLAIN with SASL-IR.
    let mut c = LineClient::connect(proxy.imap_addr).await;
    c.read().await;
    c.line(&format!("p2 AUTHENTICATE PLAIN {plain}")).await;
    assert!(c.until("p2 ").await.last().unwrap().starts_with("p2 OK"));

    // `*` cancels, and the session goes on.
    let mut c = LineClient::connect(proxy.imap_addr).await;
    c.read().await;
    c.line("p3 AUTHENTICATE PLAIN").await;
    c.read().await;
    c.line("*").await;
    assert!(c.read().await.unwrap().starts_with("p3 BAD"));
    c.line("p4 NOOP").await;
    assert!(c.read().await.unwrap().starts_with("p4 OK"));

    // AUTHENTICATE LOGIN: username, then password.
    c.line("l1 AUTHENTICATE LOGIN").await;
    assert_eq!(c.read().await.unwrap(), "+ VXNlcm5hbWU6");
    c.line(&b64(user.as_bytes())).await;
    assert_eq!(c.read().await.unwrap(), "+ UGFzc3dvcmQ6");
    c.line(&b64(pass.as_bytes())).await;
    assert!(c.until("l1 ").await.last().unwrap().starts_with("l1 OK"));
}

#[tokio::test(flavor = "multi_thread")]
async fn wrong_password_and_unknown_user_get_authenticationfailed_after_a_delay() {
    let world = World::start().await;
    let proxy = world.proxy(&[AccountSpec::device(USER, PASS)]).await;
    for (user, pass) in [(USER, "wrong"), ("nobody@contoso.com", PASS)] {
        let mut c = LineClient::connect(proxy.imap_addr).await;
        c.read().await;
        let started = Instant::now();
        c.line(&format!("w1 LOGIN {user} {pass}")).await;
        let reply = c.read().await.unwrap();
        assert_eq!(reply, "w1 NO [AUTHENTICATIONFAILED] Authentication failed");
        assert!(
            started.elapsed() >= Duration::from_millis(190),
            "answered without the delay"
        );
    }
    assert_eq!(
        world.imap.stats().connections,
        0,
        "the upstream never sees a wrong password"
    );
    assert_eq!(world.idp.counts().refresh_grants, 0);
    proxy
        .wait_for_log("wrong password", Duration::from_secs(5))
        .await;
    proxy
        .wait_for_log("unknown user", Duration::from_secs(5))
        .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn unauthorised_account_is_refused_at_once_and_told_to_login() {
    let world = World::start().await;
    let spec = AccountSpec::device(USER, PASS);
    let proxy = testkit::proxy::TestProxy::start(&world.endpoints, &[spec]).await;
    let mut c = LineClient::connect(proxy.imap_addr).await;
    c.read().await;
    c.line(&format!("u1 LOGIN {USER} {PASS}")).await;
    assert_eq!(
        c.read().await.unwrap(),
        "u1 NO [AUTHENTICATIONFAILED] Authentication failed"
    );
    proxy
        .wait_for_log(
            &format!("run `xoauth2-proxy login {USER}`"),
            Duration::from_secs(5),
        )
        .await;
    assert_eq!(
        world.idp.counts().device_code_requests,
        0,
        "a client login never starts a device flow"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn revoked_grant_needs_login_and_status_says_so() {
    let world = World::start().await;
    let proxy = world.proxy(&[AccountSpec::device(USER, PASS)]).await;
    world.idp.revoke_grants(USER);
    let mut c = LineClient::connect(proxy.imap_addr).await;
    c.read().await;
    c.line(&format!("r1 LOGIN {USER} {PASS}")).await;
    assert_eq!(
        c.read().await.unwrap(),
        "r1 NO [AUTHENTICATIONFAILED] Authentication failed"
    );
    proxy
        .wait_for_log("AADSTS70000", Duration::from_secs(5))
        .await;

    let status = proxy.cli(&["status", "--json"]).await;
    assert!(status.status.success());
    let rows: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(rows[0]["state"], "needs login", "{rows}");
    assert_eq!(rows[0]["needs_login"], true);
    let text = proxy.cli(&["status"]).await;
    assert!(
        String::from_utf8_lossy(&text.stdout)
            .contains(&format!("run `xoauth2-proxy login {USER}`"))
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn unreachable_identity_provider_gets_unavailable() {
    let world = World::start().await;
    let proxy = world.proxy(&[AccountSpec::device(USER, PASS)]).await;
    for mode in [IdpMode::Unavailable, IdpMode::Garbage, IdpMode::Hang] {
        world.idp.set_mode(mode);
        let mut c = LineClient::connect(proxy.imap_addr).await;
        c.read().await;
        c.line(&format!("i1 LOGIN {USER} {PASS}")).await;
        let reply = c.read().await.unwrap();
        assert!(reply.starts_with("i1 NO [UNAVAILABLE]"), "{reply}");
    }
    // The grant survives passing failures.
    world.idp.set_mode(IdpMode::Normal);
    let mut c = LineClient::connect(proxy.imap_addr).await;
    c.read().await;
    logged_in(&mut c).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn unreachable_upstream_gets_unavailable_and_recovers() {
    let world = World::start().await;
    let proxy = world.proxy(&[AccountSpec::device(USER, PASS)]).await;
    world.imap.set_stopped(true);
    let mut c = LineClient::connect(proxy.imap_addr).await;
    c.read().await;
    c.line(&format!("d1 LOGIN {USER} {PASS}")).await;
    assert!(c.read().await.unwrap().starts_with("d1 NO [UNAVAILABLE]"));
    world.imap.set_stopped(false);
    world.imap.set_hang(true);
    c.line(&format!("d2 LOGIN {USER} {PASS}")).await;
    assert!(c.read().await.unwrap().starts_with("d2 NO [UNAVAILABLE]"));
    world.imap.set_hang(false);
    let mut c = LineClient::connect(proxy.imap_addr).await;
    c.read().await;
    logged_in(&mut c).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn app_registration_errors_log_a_fix_it_sentence() {
    let world = World::start().await;
    let proxy = world.proxy(&[AccountSpec::device(USER, PASS)]).await;
    world.idp.set_mode(IdpMode::Error {
        status: 401,
        error: "invalid_client".into(),
        code: 7000215,
    });
    let mut c = LineClient::connect(proxy.imap_addr).await;
    c.read().await;
    c.line(&format!("e1 LOGIN {USER} {PASS}")).await;
    let reply = c.read().await.unwrap();
    assert!(reply.starts_with("e1 NO [AUTHENTICATIONFAILED]"), "{reply}");
    proxy
        .wait_for_log("AADSTS7000215", Duration::from_secs(5))
        .await;
    proxy
        .wait_for_log("Secret ID", Duration::from_secs(5))
        .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn authenticated_but_not_connected_is_an_authentication_failure() {
    let world = World::start().await;
    let proxy = world.proxy(&[AccountSpec::device(USER, PASS)]).await;
    world.imap.set_not_connected(true);
    let mut c = LineClient::connect(proxy.imap_addr).await;
    c.read().await;
    c.line(&format!("n1 LOGIN {USER} {PASS}")).await;
    let reply = c.until("n1 ").await.pop().unwrap();
    assert!(reply.starts_with("n1 NO [AUTHENTICATIONFAILED]"), "{reply}");
    assert!(reply.contains("not connected"), "{reply}");
    proxy
        .wait_for_log("Set-CASMailbox", Duration::from_secs(5))
        .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn upstream_that_rejects_the_cached_token_gets_a_fresh_one() {
    let world = World::start().await;
    let proxy = world.proxy(&[AccountSpec::device(USER, PASS)]).await;
    // Like Exchange, sessions end with the token: a warm session opened
    // with the token the upstream forgets is not used.
    world.imap.set_expire_sessions(true);
    for style in [FailureStyle::Microsoft, FailureStyle::Challenge] {
        world.imap.set_failure_style(style);
        let mut c = LineClient::connect(proxy.imap_addr).await;
        c.read().await;
        logged_in(&mut c).await;
        let before = world.idp.counts().refresh_grants;
        // The upstream forgets the access token (as after a password reset);
        // the refresh token still works.
        world.tokens.revoke(&Subject::Mailbox(USER.into()));
        let mut c = LineClient::connect(proxy.imap_addr).await;
        c.read().await;
        logged_in(&mut c).await;
        // Served warm, the login is answered at once and its session is
        // replaced behind the OK: the NOOP is answered once it is.
        c.line("a2 NOOP").await;
        assert!(c.until("a2 ").await.last().unwrap().starts_with("a2 OK"));
        assert_eq!(world.idp.counts().refresh_grants, before + 1);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_fresh_token_that_is_refused_is_reported() {
    let world = World::start().await;
    let proxy = world.proxy(&[AccountSpec::device(USER, PASS)]).await;
    world.imap.set_failure_style(FailureStyle::Challenge);
    // A mailbox the token does not cover: every token is refused.
    let proxy2 = testkit::proxy::TestProxy::start_with(&world.endpoints, &[], "debug", |t| {
        format!("{t}\n[[accounts]]\nusername = \"x@contoso.com\"\npassword = \"pw\"\nprovider = \"test\"\nmailbox = \"other@contoso.com\"\n")
    })
    .await;
    let mut x = AccountSpec::device("x@contoso.com", "pw");
    x.mailbox = Some(USER.into());
    world.grant(&proxy2, &x);
    drop(proxy);
    let mut c = LineClient::connect(proxy2.imap_addr).await;
    c.read().await;
    c.line("f1 LOGIN x@contoso.com pw").await;
    let reply = c.until("f1 ").await.pop().unwrap();
    assert!(
        reply.starts_with("f1 NO [AUTHENTICATIONFAILED] The mail server refused"),
        "{reply}"
    );
    assert_eq!(
        world.imap.stats().auth_failed,
        1,
        "a fresh token is not retried"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn hostile_input_gets_bad_and_a_closed_connection() {
    let world = World::start().await;
    let proxy = testkit::proxy::TestProxy::start_with(
        &world.endpoints,
        &[AccountSpec::device(USER, PASS)],
        "debug",
        |t| t.replace("login_timeout = \"5s\"", "login_timeout = \"1s\""),
    )
    .await;

    // An endless line.
    let mut c = LineClient::connect(proxy.imap_addr).await;
    c.read().await;
    c.send(&vec![b'a'; 100 * 1024]).await;
    assert!(
        c.read()
            .await
            .unwrap()
            .starts_with("* BAD Command line too long")
    );
    assert!(c.read().await.unwrap().starts_with("* BYE"));
    assert!(c.closed().await);

    // A literal announced far too large, then one sent without asking.
    let mut c = LineClient::connect(proxy.imap_addr).await;
    c.read().await;
    c.line("l1 LOGIN {99999999}").await;
    assert_eq!(c.read().await.unwrap(), "l1 BAD Literal too large");
    c.line("l2 LOGIN {99999999+}").await;
    assert!(c.read().await.unwrap().starts_with("l2 BAD"));
    assert!(c.closed().await);

    // Garbage bytes: BAD each time, then BYE.
    let mut c = LineClient::connect(proxy.imap_addr).await;
    c.read().await;
    for _ in 0..10 {
        c.send(b"\x00\xff\x13garbage\r\n").await;
    }
    let lines = c.until("* BYE").await;
    assert!(
        lines.iter().filter(|l| l.starts_with("* BAD")).count() >= 9,
        "{lines:?}"
    );
    assert!(c.closed().await);

    // A client that stalls.
    let mut c = LineClient::connect(proxy.imap_addr).await;
    c.read().await;
    c.send(b"s1 LOG").await;
    let started = Instant::now();
    assert!(c.read().await.unwrap().starts_with("* BYE"));
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(c.closed().await);
}

#[tokio::test(flavor = "multi_thread")]
async fn access_tokens_are_refreshed_ahead_of_expiry_and_rotation_is_persisted() {
    let world = World::start().await;
    world.idp.set_access_token_lifetime(Duration::from_secs(3));
    let proxy = world.proxy(&[AccountSpec::device(USER, PASS)]).await;
    let mut c = LineClient::connect(proxy.imap_addr).await;
    c.read().await;
    logged_in(&mut c).await;
    assert_eq!(world.idp.counts().refresh_grants, 1);
    // Inside the token's last third: replaced before it expires.
    tokio::time::sleep(Duration::from_millis(2200)).await;
    let mut c = LineClient::connect(proxy.imap_addr).await;
    c.read().await;
    logged_in(&mut c).await;
    assert_eq!(world.idp.counts().refresh_grants, 2);

    // The file holds the refresh token the provider considers current.
    let file = proxy.state_dir.join("tokens").join(format!("{USER}.json"));
    let stored: serde_json::Value = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    let valid = world.idp.valid_refresh_tokens(USER);
    assert_eq!(valid.len(), 1);
    assert_eq!(stored["refresh_token"], valid[0]);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&file).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_logins_share_one_refresh() {
    let world = World::start().await;
    world.idp.set_response_delay(Duration::from_millis(500));
    let proxy = world.proxy(&[AccountSpec::device(USER, PASS)]).await;
    let mut tasks = Vec::new();
    for i in 0..20 {
        let addr = proxy.imap_addr;
        tasks.push(tokio::spawn(async move {
            let mut c = LineClient::connect(addr).await;
            c.read().await;
            c.line(&format!("c{i} LOGIN {USER} {PASS}")).await;
            c.until(&format!("c{i} ")).await.pop().unwrap()
        }));
    }
    for t in tasks {
        let reply = t.await.unwrap();
        assert!(reply.contains(" OK "), "{reply}");
    }
    assert_eq!(world.idp.counts().refresh_grants, 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restart_keeps_the_tokens() {
    let world = World::start().await;
    let mut proxy = world.proxy(&[AccountSpec::device(USER, PASS)]).await;
    let mut c = LineClient::connect(proxy.imap_addr).await;
    c.read().await;
    logged_in(&mut c).await;
    drop(c);
    let exit = proxy.stop().await;
    assert!(exit.success(), "SIGTERM ends the proxy with 0: {exit:?}");
    proxy.start_again().await;
    let mut c = LineClient::connect(proxy.imap_addr).await;
    c.read().await;
    logged_in(&mut c).await;
    assert_eq!(
        world.idp.counts().refresh_grants,
        1,
        "the stored access token was used after the restart"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn client_credentials_account_needs_no_login() {
    let world = World::start().await;
    let shared = "shared@contoso.com";
    let proxy = world
        .proxy(&[AccountSpec::app_only("app@local", "app-pass", shared)])
        .await;
    let mut c = LineClient::connect(proxy.imap_addr).await;
    c.read().await;
    c.line("a1 LOGIN app@local app-pass").await;
    assert!(c.until("a1 ").await.last().unwrap().starts_with("a1 OK"));
    assert_eq!(world.idp.counts().client_credentials_grants, 1);
    let scope = world.idp.requests().last().unwrap().scope.clone();
    assert_eq!(
        scope.as_deref(),
        Some("https://outlook.office365.com/.default")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn large_append_and_fetch_are_relayed_byte_for_byte() {
    let world = World::start().await;
    let proxy = world.proxy(&[AccountSpec::device(USER, PASS)]).await;
    let big: Vec<u8> = (0..30 * 1024 * 1024u32)
        .map(|i| {
            if i % 77 == 76 {
                b'\n'
            } else {
                b'a' + (i % 23) as u8
            }
        })
        .collect();
    let uid = world.imap.add_message(USER, big.clone());
    let mut c = LineClient::connect(proxy.imap_addr).await;
    c.read().await;
    logged_in(&mut c).await;
    c.line("x1 SELECT INBOX").await;
    c.until("x1 ").await;

    c.line(&format!("f1 UID FETCH {uid} BODY.PEEK[]")).await;
    let head = c.read().await.unwrap();
    assert!(head.ends_with(&format!("{{{}}}", big.len())), "{head}");
    let body = c.read_exact(big.len()).await;
    assert!(body == big, "FETCH relayed byte for byte");
    c.until("f1 ").await;

    let appended: Vec<u8> = big.iter().rev().copied().take(20 * 1024 * 1024).collect();
    c.line(&format!("p1 APPEND INBOX {{{}}}", appended.len()))
        .await;
    assert!(c.read().await.unwrap().starts_with("+"));
    c.send(&appended).await;
    c.send(b"\r\n").await;
    assert!(c.until("p1 ").await.last().unwrap().starts_with("p1 OK"));
    assert!(
        *world.imap.messages(USER).last().unwrap() == appended,
        "APPEND relayed byte for byte"
    );
}

/// A server slower than the proxy that writes a large message in small TLS
/// records, as Dovecot does: the proxy sleeps on the socket's low-water mark
/// inside the literal, and imapflow must still get every byte, both as one
/// FETCH and as the partial FETCHes of a download.
#[tokio::test(flavor = "multi_thread")]
async fn imapflow_gets_a_large_message_whole_from_a_server_writing_small_records() {
    use sha2::Digest;
    let world = World::start().await;
    let proxy = world.proxy(&[AccountSpec::device(USER, PASS)]).await;
    world.imap.set_small_records(true);
    let mut big = b"From: big@example.com\r\nSubject: twelve megabytes\r\n\r\n".to_vec();
    while big.len() < 12 * 1024 * 1024 {
        big.extend_from_slice(b"The quick brown fox jumps over the lazy dog, 0123456789.\r\n");
    }
    let sha: String = sha2::Sha256::digest(&big)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let uid = world.imap.add_message(USER, big.clone());
    let out = run_imapflow(
        &json!({
            "host": "127.0.0.1", "port": proxy.imap_addr.port(), "secure": false,
            "user": USER, "pass": PASS,
            "steps": ["select", "fetch", "download"],
            "fetchUid": uid,
            "timeoutMs": 80000,
        }),
        90,
    )
    .await;
    assert_eq!(out["ok"], true, "{out}\n{}", proxy.logs());
    assert_eq!(out["fetched"]["size"], big.len());
    assert_eq!(out["fetched"]["sha256"], sha);
    assert_eq!(out["fetched"]["subject"], "twelve megabytes");
    assert_eq!(out["downloaded"]["size"], big.len());
    assert_eq!(out["downloaded"]["sha256"], sha);
}

#[tokio::test(flavor = "multi_thread")]
async fn no_secret_reaches_the_log_at_any_level() {
    let world = World::start().await;
    world.idp.set_access_token_lifetime(Duration::from_secs(2));
    let proxy = testkit::proxy::TestProxy::start_with(
        &world.endpoints,
        &[
            AccountSpec::device(USER, PASS),
            AccountSpec::app_only("app@local", "app-pass-77", "shared@contoso.com"),
        ],
        "trace",
        |t| t,
    )
    .await;
    world.grant(&proxy, &AccountSpec::device(USER, PASS));
    let plain = b64(format!("\0{USER}\0{PASS}").as_bytes());
    for round in 0..2 {
        let mut c = LineClient::connect(proxy.imap_addr).await;
        c.read().await;
        c.line(&format!("a{round} AUTHENTICATE PLAIN {plain}"))
            .await;
        c.until(&format!("a{round} ")).await;
        c.line("l1 LOGOUT").await;
        let mut c = LineClient::connect(proxy.imap_addr).await;
        c.read().await;
        c.line("b1 LOGIN app@local app-pass-77").await;
        c.until("b1 ").await;
        c.line(&format!("b2 LOGIN {USER} wrong-{PASS}")).await;
        c.until("b2 ").await;
        tokio::time::sleep(Duration::from_millis(1500)).await;
    }
    world.idp.revoke_grants(USER);
    let mut c = LineClient::connect(proxy.imap_addr).await;
    c.read().await;
    c.line(&format!("r1 LOGIN {USER} {PASS}")).await;
    c.until("r1 ").await;
    assert!(
        world.idp.counts().refresh_grants >= 2,
        "tokens were refreshed during the run"
    );

    let logs = proxy.logs();
    assert!(
        logs.contains("TRACE") || logs.contains("DEBUG"),
        "the log ran at a verbose level"
    );
    let status = proxy.cli(&["status", "--json"]).await;
    let status = String::from_utf8_lossy(&status.stdout).into_owned();
    let mut secrets = world.secrets();
    secrets.extend([PASS.to_string(), "app-pass-77".to_string(), plain.clone()]);
    for token in world.tokens.all_tokens() {
        secrets.push(testkit::xoauth2(USER, &token));
    }
    for secret in secrets.iter().filter(|s| s.len() >= 8) {
        assert!(
            !logs.contains(secret.as_str()),
            "a secret reached the log: {}…",
            &secret[..8]
        );
        assert!(
            !status.contains(secret.as_str()),
            "a secret reached status: {}…",
            &secret[..8]
        );
    }
}

/// The pre-login bounds: ID's (RFC 2971's largest, written the longest way,
/// with a tag of up to 2,109 bytes) and every other command's.
const MAX_ID_COMMAND: usize = 64 * 1024;
const MAX_COMMAND: usize = 16 * 1024;

/// The pairs of a maximal RFC 2971 ID: 30 fields of 30 octets, 30 values of
/// 1,024, each octet a `"` or `\\`.
fn maximal_id_pairs() -> Vec<(Vec<u8>, Vec<u8>)> {
    (0..30)
        .map(|_| (vec![b'"'; 30], vec![b'\\'; 1024]))
        .collect()
}

/// `s` as a quoted string, escaped.
fn quoted(s: &[u8]) -> Vec<u8> {
    let mut out = vec![b'"'];
    for &b in s {
        if b == b'"' || b == b'\\' {
            out.push(b'\\');
        }
        out.push(b);
    }
    out.push(b'"');
    out
}

/// `s` as a LITERAL+ literal.
fn literal(s: &[u8]) -> Vec<u8> {
    [format!("{{{}+}}\r\n", s.len()).as_bytes(), s].concat()
}

/// How the `i`th string of a command is written.
type StringForm = fn(usize, &[u8]) -> Vec<u8>;

/// `tag ID (…)` CRLF with each string written by `write`.
fn id_command(
    tag: &str,
    pairs: &[(Vec<u8>, Vec<u8>)],
    write: impl Fn(usize, &[u8]) -> Vec<u8>,
) -> Vec<u8> {
    let mut out = format!("{tag} ID (").into_bytes();
    for (i, (field, value)) in pairs.iter().enumerate() {
        if i > 0 {
            out.push(b' ');
        }
        out.extend(write(2 * i, field));
        out.push(b' ');
        out.extend(write(2 * i + 1, value));
    }
    out.extend_from_slice(b")\r\n");
    out
}

/// Reads the answer to an ID: `* ID (…)`, then the tagged line, returned.
async fn id_answer(c: &mut LineClient, tag: &str) -> String {
    let lines = c.until(&format!("{tag} ")).await;
    assert!(
        lines.len() == 2 && lines[0].starts_with("* ID (\"name\" \"xoauth2-proxy\""),
        "{lines:?}"
    );
    lines[1].clone()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_maximal_id_is_answered_however_its_strings_are_written() {
    let world = World::start().await;
    let proxy = world.proxy(&[AccountSpec::device(USER, PASS)]).await;
    let pairs = maximal_id_pairs();
    let forms: [(&str, StringForm); 3] = [
        ("quoted", |_, s| quoted(s)),
        ("literal", |_, s| literal(s)),
        (
            "mixed",
            |i, s| if i % 3 == 0 { literal(s) } else { quoted(s) },
        ),
    ];
    let mut c = LineClient::connect(proxy.imap_addr).await;
    c.read().await;
    for (form, write) in &forms {
        let command = id_command("i1", &pairs, *write);
        assert!(command.len() > MAX_COMMAND, "{form}: {}", command.len());
        c.send(&command).await;
        let tagged = id_answer(&mut c, "i1").await;
        assert!(tagged.starts_with("i1 OK"), "{form}: {tagged}");
    }
    // Synchronising literals: each waits for the proxy's `+`.
    c.send(b"i2 ID ({30}\r\n").await;
    assert!(c.read().await.unwrap().starts_with("+ "));
    c.send(&[b'f'; 30]).await;
    c.send(b" {1024}\r\n").await;
    assert!(c.read().await.unwrap().starts_with("+ "));
    c.send(&[b'v'; 1024]).await;
    c.send(b")\r\n").await;
    assert!(id_answer(&mut c, "i2").await.starts_with("i2 OK"));
    logged_in(&mut c).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_id_a_byte_over_its_bound_gets_a_tagged_bad_and_bye() {
    let world = World::start().await;
    let proxy = world.proxy(&[AccountSpec::device(USER, PASS)]).await;
    let pairs = maximal_id_pairs();
    let at_bound = id_command(&"t".repeat(2_109), &pairs, |_, s| quoted(s));
    assert_eq!(at_bound.len(), MAX_ID_COMMAND);
    let mut c = LineClient::connect(proxy.imap_addr).await;
    c.read().await;
    c.send(&at_bound).await;
    assert!(id_answer(&mut c, &"t".repeat(2_109)).await.contains(" OK "));

    let tag = "t".repeat(2_110);
    c.send(&id_command(&tag, &pairs, |_, s| quoted(s))).await;
    assert_eq!(
        c.read().await.unwrap(),
        format!("{tag} BAD Command line too long (over {MAX_ID_COMMAND} bytes before login)")
    );
    assert!(c.read().await.unwrap().starts_with("* BYE"));
    assert!(c.closed().await);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_id_over_the_limits_of_rfc_2971_gets_bad_and_the_connection_stays() {
    let world = World::start().await;
    let proxy = world.proxy(&[AccountSpec::device(USER, PASS)]).await;
    let pair = |field: usize, value: usize| (vec![b'f'; field], vec![b'v'; value]);
    let mut c = LineClient::connect(proxy.imap_addr).await;
    c.read().await;
    for (pairs, expected) in [
        (vec![pair(3, 3); 31], "30 field-value pairs"),
        (vec![pair(31, 3)], "fields are at most 30 octets"),
        (vec![pair(3, 1025)], "values are at most 1024 octets"),
    ] {
        c.send(&id_command("i1", &pairs, |_, s| quoted(s))).await;
        let answer = c.read().await.unwrap();
        assert!(
            answer.starts_with("i1 BAD ") && answer.contains(expected),
            "{answer}"
        );
    }
    c.line("i2 ID NIL").await;
    assert!(id_answer(&mut c, "i2").await.starts_with("i2 OK"));
    logged_in(&mut c).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn login_and_authenticate_keep_the_tight_bound() {
    let world = World::start().await;
    let proxy = world.proxy(&[AccountSpec::device(USER, PASS)]).await;
    for command in [
        format!("l1 LOGIN {USER} {}\r\n", "p".repeat(MAX_COMMAND)),
        format!("l1 AUTHENTICATE PLAIN {}\r\n", "A".repeat(MAX_COMMAND)),
        format!("l1 LOGIN {{{}+}}\r\n", MAX_COMMAND),
    ] {
        let mut c = LineClient::connect(proxy.imap_addr).await;
        c.read().await;
        c.send(command.as_bytes()).await;
        assert_eq!(
            c.read().await.unwrap(),
            format!("l1 BAD Command line too long (over {MAX_COMMAND} bytes before login)")
        );
        assert!(c.read().await.unwrap().starts_with("* BYE"));
        assert!(c.closed().await);
    }
    assert_eq!(world.imap.stats().connections, 0);
}

/// What a server that offers more after login announces, all but IMAP4rev1
/// and IDLE to be hidden from a logged-in client.
const UPSTREAM_CAPABILITIES: &str =
    "IMAP4rev1 AUTH=PLAIN AUTH=XOAUTH2 SASL-IR STARTTLS IDLE LOGINDISABLED LOGIN-REFERRALS";

#[tokio::test(flavor = "multi_thread")]
async fn capabilities_after_login_are_filtered_like_the_logins() {
    let world = World::start().await;
    world.imap.set_post_auth_capabilities(UPSTREAM_CAPABILITIES);
    let proxy = world.proxy(&[AccountSpec::device(USER, PASS)]).await;
    let mut c = LineClient::connect(proxy.imap_addr).await;
    c.read().await;
    c.line(&format!("a1 LOGIN {USER} {PASS}")).await;
    assert_eq!(
        c.until("a1 ").await,
        ["a1 OK [CAPABILITY IMAP4rev1 IDLE] LOGIN completed"]
    );
    c.line("c1 CAPABILITY").await;
    assert_eq!(
        c.until("c1 ").await,
        ["* CAPABILITY IMAP4rev1 IDLE", "c1 OK CAPABILITY completed."]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_message_that_reads_like_a_capability_response_is_fetched_unchanged() {
    let world = World::start().await;
    world.imap.set_post_auth_capabilities(UPSTREAM_CAPABILITIES);
    let proxy = world.proxy(&[AccountSpec::device(USER, PASS)]).await;
    let message = b"Subject: caps\r\n\r\n* CAPABILITY IMAP4rev1 AUTH=PLAIN\r\nf1 OK [CAPABILITY AUTH=PLAIN] done\r\nends with {5}\r\n".to_vec();
    let uid = world.imap.add_message(USER, message.clone());
    let mut c = LineClient::connect(proxy.imap_addr).await;
    c.read().await;
    logged_in(&mut c).await;
    c.line("s1 SELECT INBOX").await;
    c.until("s1 ").await;
    for _ in 0..2 {
        c.line(&format!("f1 UID FETCH {uid} BODY.PEEK[]")).await;
        let head = c.read().await.unwrap();
        assert!(head.ends_with(&format!("{{{}}}", message.len())), "{head}");
        assert!(
            c.read_exact(message.len()).await == message,
            "FETCH byte for byte"
        );
        assert!(c.until("f1 ").await.last().unwrap().starts_with("f1 OK"));
        c.line("c1 CAPABILITY").await;
        assert_eq!(c.read().await.unwrap(), "* CAPABILITY IMAP4rev1 IDLE");
        c.until("c1 ").await;
    }
}
