//! Sending where SMTP AUTH as the mailbox does not work: a shared mailbox over
//! SMTP as the delegate who signed in, and Microsoft Graph `sendMail` for
//! tenants with SMTP AUTH off. nodemailer (pooled, as NocoBase configures it)
//! talks to the real binary; the test kit's mock identity provider issues the
//! tokens (and ID tokens) and serves the mock Graph; the mock SMTP upstream
//! applies Exchange's rules for shared mailboxes.

use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};
use testkit::idp::{GraphFault, GraphMessage};
use testkit::node::nodemailer;
use testkit::proxy::{AccountSpec, TestProxy};
use testkit::world::{LineClient, World};

const SHARED: &str = "shared@contoso.com";
const DELEGATE: &str = "delegate@contoso.com";
const USER: &str = "user@contoso.com";
const PASS: &str = "local-pw";
const T: Duration = Duration::from_secs(20);

/// Starts the proxy for one delegated account (`username` logs in, opens
/// `mailbox`) with `keys` added to its `[[accounts]]` table and the provider's
/// `graph_url` pointing at the mock Graph.
async fn proxy_with(world: &World, username: &str, mailbox: &str, keys: &[&str]) -> TestProxy {
    let spec = AccountSpec {
        mailbox: Some(mailbox.to_string()),
        ..AccountSpec::device(username, PASS)
    };
    let graph_url = world.idp.graph_url();
    let marker = format!("username = \"{username}\"\n");
    let extra = keys.iter().map(|k| format!("{k}\n")).collect::<String>();
    TestProxy::start_with(&world.endpoints, &[spec], "debug", |text| {
        text.replacen(&marker, &format!("{marker}{extra}"), 1)
            .replacen(
                "[providers.test]\n",
                &format!("[providers.test]\ngraph_url = \"{graph_url}\"\n"),
                1,
            )
    })
    .await
}

/// Writes `username`'s grant as `login` would: a refresh token issued to
/// `signed_in` (the user who signed in), and that user's name when `record`
/// (grants stored before the proxy recorded it have none).
fn write_grant(world: &World, state_dir: &Path, username: &str, signed_in: &str, record: bool) {
    let refresh = world.idp.issue_refresh_token(signed_in);
    let dir = state_dir.join("tokens");
    std::fs::create_dir_all(&dir).unwrap();
    let mut grant = json!({
        "account": username,
        "flow": "device_code",
        "refresh_token": refresh,
        "needs_login": false,
    });
    if record {
        grant["sign_in_user"] = json!(signed_in);
    }
    let file = dir.join(format!("{}.json", username.to_lowercase()));
    std::fs::write(file, grant.to_string()).unwrap();
}

fn read_grant(state_dir: &Path, username: &str) -> Value {
    let file = state_dir
        .join("tokens")
        .join(format!("{}.json", username.to_lowercase()));
    serde_json::from_slice(&std::fs::read(file).unwrap()).unwrap()
}

/// nodemailer as NocoBase configures it: pooled, plain login to the proxy.
fn nodemailer_opts(proxy: &TestProxy, user: &str, from: &str) -> Value {
    json!({
        "host": "127.0.0.1",
        "port": proxy.smtp_addr.port(),
        "secure": false,
        "user": user,
        "pass": PASS,
        "from": from,
        "pool": true,
    })
}

fn merged(mut base: Value, more: Value) -> Value {
    for (k, v) in more.as_object().unwrap() {
        base[k] = v.clone();
    }
    base
}

// ---- SMTP identity ------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn a_shared_mailbox_sends_over_smtp_as_the_delegate_learnt_at_refresh() {
    let world = World::start().await;
    world.tokens.share_mailbox(SHARED, DELEGATE, true);
    let proxy = proxy_with(&world, SHARED, SHARED, &[]).await;
    // A grant stored before the signed-in user was recorded: the refresh's
    // ID token names the delegate.
    write_grant(&world, &proxy.state_dir, SHARED, DELEGATE, false);

    let res = nodemailer(merged(
        nodemailer_opts(&proxy, SHARED, SHARED),
        json!({"count": 3}),
    ))
    .await;
    assert_eq!(res["ok"], true, "{res}\n{}", proxy.logs());
    let msgs = world.smtp.wait_for_messages(3, T).await;
    for m in &msgs {
        assert_eq!(m.auth_user, DELEGATE, "SMTP logs in as the delegate");
        assert!(m.mail_from.starts_with(&format!("<{SHARED}>")), "{m:?}");
    }
    assert_eq!(
        read_grant(&proxy.state_dir, SHARED)["sign_in_user"],
        DELEGATE
    );
    assert_eq!(world.smtp.stats().auth_failed, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn sign_in_user_in_the_config_overrides_the_learnt_user() {
    let world = World::start().await;
    world.tokens.share_mailbox(SHARED, DELEGATE, true);
    let proxy = proxy_with(
        &world,
        SHARED,
        SHARED,
        &[&format!("sign_in_user = \"{DELEGATE}\"")],
    )
    .await;
    // The ID token names the delegate's user principal name, which is not
    // its address: the config says which login SMTP takes.
    world
        .idp
        .set_preferred_username(DELEGATE, "d.upn@contoso.onmicrosoft.com");
    write_grant(&world, &proxy.state_dir, SHARED, DELEGATE, false);

    let res = nodemailer(nodemailer_opts(&proxy, SHARED, SHARED)).await;
    assert_eq!(res["ok"], true, "{res}\n{}", proxy.logs());
    let msgs = world.smtp.wait_for_messages(1, T).await;
    assert_eq!(msgs[0].auth_user, DELEGATE);
    let learnt = read_grant(&proxy.state_dir, SHARED)["sign_in_user"].clone();
    assert_eq!(
        learnt, "d.upn@contoso.onmicrosoft.com",
        "learnt, but overridden"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_delegate_without_send_as_gets_exchanges_550_5_7_60() {
    let world = World::start().await;
    world.tokens.share_mailbox(SHARED, DELEGATE, false);
    let proxy = proxy_with(&world, SHARED, SHARED, &[]).await;
    write_grant(&world, &proxy.state_dir, SHARED, DELEGATE, true);
    let res = nodemailer(nodemailer_opts(&proxy, SHARED, SHARED)).await;
    assert_eq!(res["ok"], false, "{res}");
    assert_eq!(res["responseCode"], 550, "{res}");
    assert!(
        res["response"].as_str().unwrap().contains("5.7.60"),
        "{res}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn status_shows_who_signed_in_or_that_a_shared_mailbox_needs_login_again() {
    let world = World::start().await;
    let proxy = proxy_with(&world, SHARED, SHARED, &[]).await;
    write_grant(&world, &proxy.state_dir, SHARED, DELEGATE, false);
    let out = proxy.cli(&["status"]).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(&format!(
            "if {SHARED} is a shared mailbox, run `xoauth2-proxy login {SHARED}` again"
        )),
        "{stdout}"
    );
    write_grant(&world, &proxy.state_dir, SHARED, DELEGATE, true);
    let out = proxy.cli(&["status"]).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(&format!("signed in as {DELEGATE}")),
        "{stdout}"
    );
    let out = proxy.cli(&["status", "--json"]).await;
    let rows: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(rows[0]["signed_in_as"], DELEGATE);
}

#[tokio::test(flavor = "multi_thread")]
async fn login_learns_the_signed_in_user_from_the_id_token() {
    let world = World::start().await;
    world.idp.set_device_user(DELEGATE);
    let proxy = proxy_with(&world, SHARED, SHARED, &[]).await;
    let out = proxy.cli(&["login", SHARED]).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains(&format!("Signed in as {DELEGATE}")),
        "{stdout}"
    );
    assert_eq!(
        read_grant(&proxy.state_dir, SHARED)["sign_in_user"],
        DELEGATE
    );
    let scopes = world.idp.requests()[0].scope.clone().unwrap_or_default();
    assert!(
        scopes.split(' ').any(|s| s == "openid") && scopes.split(' ').any(|s| s == "profile"),
        "{scopes}"
    );
}

// ---- Graph sending ------------------------------------------------------------

/// nodemailer's sha256 of the message it sent (unstuffed) is that of what
/// Graph received after the `Bcc` field the proxy put first.
fn assert_graph_got_verbatim(sent: &[Value], got: &[GraphMessage], bcc: &str) {
    assert_eq!(sent.len(), got.len(), "{got:?}");
    for s in sent {
        let id = s["messageId"].as_str().unwrap();
        let m = got
            .iter()
            .find(|m| String::from_utf8_lossy(&m.mime).contains(&format!("Message-ID: {id}")))
            .unwrap_or_else(|| panic!("{id} did not reach Graph"));
        let field = format!("Bcc: {bcc}\r\n");
        assert!(
            m.mime.starts_with(field.as_bytes()),
            "{}",
            String::from_utf8_lossy(&m.mime[..200.min(m.mime.len())])
        );
        assert_eq!(
            sha256_hex(&m.mime[field.len()..]),
            s["sha256OfRaw"].as_str().unwrap(),
            "{id}: the rest is the client's message, byte for byte"
        );
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn graph_gets_small_and_large_messages_byte_for_byte_with_bcc_recipients_added() {
    let world = World::start().await;
    let proxy = proxy_with(&world, USER, USER, &["send_via = \"graph\""]).await;
    write_grant(&world, &proxy.state_dir, USER, USER, true);
    let opts = merged(
        nodemailer_opts(&proxy, USER, USER),
        json!({"bcc": ["hidden@example.net"]}),
    );

    let small = nodemailer(merged(opts.clone(), json!({"count": 3}))).await;
    assert_eq!(small["ok"], true, "{small}\n{}", proxy.logs());
    let large = nodemailer(merged(opts, json!({"attachmentSize": 2_000_000}))).await;
    assert_eq!(large["ok"], true, "{large}\n{}", proxy.logs());

    let got = world.idp.wait_for_graph_messages(4, T).await;
    let mut sent = small["sent"].as_array().unwrap().clone();
    sent.extend(large["sent"].as_array().unwrap().iter().cloned());
    assert_graph_got_verbatim(&sent, &got, "hidden@example.net");
    assert!(got[3].mime.len() > 2_000_000, "the large one is large");
    for m in &got {
        assert_eq!(m.mailbox, USER);
        assert_eq!(m.token_user.as_deref(), Some(USER));
    }
    assert!(
        sent.iter()
            .all(|s| s["response"].as_str().unwrap().starts_with("250")),
        "{sent:?}"
    );
    let smtp = world.smtp.stats();
    assert_eq!(smtp.auth_ok + smtp.auth_failed, 0, "SMTP was never used");
    let logs = proxy.logs();
    for secret in world.secrets() {
        assert!(!logs.contains(&secret), "a secret reached the log");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_shared_mailbox_sends_through_graph_with_mail_send_shared() {
    let world = World::start().await;
    world.tokens.share_mailbox(SHARED, DELEGATE, true);
    let proxy = proxy_with(&world, SHARED, SHARED, &["send_via = \"graph\""]).await;
    write_grant(&world, &proxy.state_dir, SHARED, DELEGATE, true);
    let res = nodemailer(nodemailer_opts(&proxy, SHARED, SHARED)).await;
    assert_eq!(res["ok"], true, "{res}\n{}", proxy.logs());
    let got = world.idp.wait_for_graph_messages(1, T).await;
    assert_eq!(got[0].mailbox, SHARED);
    assert_eq!(got[0].token_user.as_deref(), Some(DELEGATE));
    let graph_request = world
        .idp
        .requests()
        .into_iter()
        .filter_map(|r| r.scope)
        .find(|s| s.contains("graph.microsoft.com"))
        .unwrap();
    assert!(
        graph_request.contains("https://graph.microsoft.com/Mail.Send.Shared")
            && !graph_request.contains("outlook.office.com"),
        "{graph_request}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_app_only_account_sends_through_graph_with_the_default_scope() {
    let world = World::start().await;
    let spec = AccountSpec::app_only("app@local", PASS, USER);
    let graph_url = world.idp.graph_url();
    let proxy = TestProxy::start_with(&world.endpoints, &[spec], "debug", |text| {
        text.replacen(
            "flow = \"client_credentials\"\n",
            "flow = \"client_credentials\"\nsend_via = \"graph\"\n",
            1,
        )
        .replacen(
            "[providers.test]\n",
            &format!("[providers.test]\ngraph_url = \"{graph_url}\"\n"),
            1,
        )
    })
    .await;
    let res = nodemailer(nodemailer_opts(&proxy, "app@local", USER)).await;
    assert_eq!(res["ok"], true, "{res}\n{}", proxy.logs());
    let got = world.idp.wait_for_graph_messages(1, T).await;
    assert_eq!(
        (got[0].mailbox.as_str(), got[0].token_user.as_deref()),
        (USER, None)
    );
}

// ---- what Graph's failures become ------------------------------------------------

/// Logs in over SMTP by hand (AUTH PLAIN) and returns the client, ready
/// for MAIL.
async fn logged_in(proxy: &TestProxy, user: &str) -> LineClient {
    use base64::Engine as _;
    let mut c = LineClient::connect(proxy.smtp_addr).await;
    c.until("220 ").await;
    c.line("EHLO client.example").await;
    c.until("250 ").await;
    let plain = base64::engine::general_purpose::STANDARD.encode(format!("\0{user}\0{PASS}"));
    c.line(&format!("AUTH PLAIN {plain}")).await;
    let reply = c.read().await.unwrap();
    assert!(reply.starts_with("235"), "{reply}\n{}", proxy.logs());
    c
}

/// One transaction; the reply to the end of DATA.
async fn send_one(c: &mut LineClient, from: &str, body: &str) -> String {
    c.line(&format!("MAIL FROM:<{from}>")).await;
    assert!(c.read().await.unwrap().starts_with("250"));
    c.line("RCPT TO:<rcpt@example.net>").await;
    assert!(c.read().await.unwrap().starts_with("250"));
    c.line("DATA").await;
    assert!(c.read().await.unwrap().starts_with("354"));
    c.send(format!("To: rcpt@example.net\r\nSubject: t\r\n\r\n{body}\r\n.\r\n").as_bytes())
        .await;
    c.read().await.unwrap_or_default()
}

async fn graph_proxy(world: &World) -> TestProxy {
    let proxy = proxy_with(world, USER, USER, &["send_via = \"graph\""]).await;
    write_grant(world, &proxy.state_dir, USER, USER, true);
    proxy
}

fn fault(status: u16, code: &str, retry_after: Option<u64>) -> GraphFault {
    GraphFault {
        status,
        code: code.to_string(),
        retry_after,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn each_graph_refusal_becomes_the_smtp_reply_that_says_what_to_do() {
    let world = World::start().await;
    let proxy = graph_proxy(&world).await;
    let mut c = logged_in(&proxy, USER).await;
    let cases = [
        (
            fault(429, "ApplicationThrottled", Some(7)),
            "451 4.7.0",
            "try again in 7 s",
        ),
        (
            fault(503, "ServiceUnavailable", Some(30)),
            "451 4.7.0",
            "try again in 30 s",
        ),
        (
            fault(503, "ServiceUnavailable", None),
            "451 4.7.0",
            "try again later",
        ),
        (
            fault(413, "RequestBodyTooLarge", None),
            "552 5.3.4",
            "at most 4 MB",
        ),
        (
            fault(403, "ErrorAccessDenied", None),
            "550 5.7.1",
            "Mail.Send.Shared",
        ),
        (
            fault(500, "InternalServerError", None),
            "451 4.4.0",
            "try again later",
        ),
        (
            fault(400, "ErrorMimeContentInvalid", None),
            "554 5.6.0",
            "ErrorMimeContentInvalid",
        ),
    ];
    for (fault, code, words) in cases {
        world.idp.push_graph_fault(fault);
        let reply = send_one(&mut c, USER, "hello").await;
        assert!(reply.starts_with(code) && reply.contains(words), "{reply}");
    }
    assert!(world.idp.graph_messages().is_empty());
    // The session goes on: the next message is accepted.
    let reply = send_one(&mut c, USER, "at last").await;
    assert!(reply.starts_with("250 2.0.0"), "{reply}");
    assert!(
        proxy.logs().contains("grant admin consent"),
        "the log has the fix for 403"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_refused_cached_graph_token_is_replaced_once_then_535() {
    let world = World::start().await;
    let proxy = graph_proxy(&world).await;
    let mut c = logged_in(&proxy, USER).await;
    // The cached token is revoked: one refresh, and the message goes.
    world.tokens.revoke_mailbox(USER);
    let refreshes = world.idp.counts().refresh_grants;
    let reply = send_one(&mut c, USER, "after revocation").await;
    assert!(reply.starts_with("250"), "{reply}\n{}", proxy.logs());
    assert_eq!(world.idp.counts().refresh_grants, refreshes + 1);
    // Graph refusing the new token too is final.
    world
        .idp
        .push_graph_fault(fault(401, "InvalidAuthenticationToken", None));
    world
        .idp
        .push_graph_fault(fault(401, "InvalidAuthenticationToken", None));
    let reply = send_one(&mut c, USER, "refused").await;
    assert!(reply.starts_with("535 5.7.8"), "{reply}");
    assert_eq!(world.idp.graph_requests(), 4);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_message_larger_than_graph_takes_is_refused_with_552_never_cut() {
    let world = World::start().await;
    let proxy = graph_proxy(&world).await;
    let res = nodemailer(merged(
        nodemailer_opts(&proxy, USER, USER),
        json!({"attachmentSize": 3_500_000}),
    ))
    .await;
    assert_eq!(res["ok"], false, "{res}");
    assert_eq!(res["responseCode"], 552, "{res}");
    assert!(res["response"].as_str().unwrap().contains("4 MB"), "{res}");
    assert_eq!(world.idp.graph_requests(), 0, "nothing was sent");
}

#[tokio::test(flavor = "multi_thread")]
async fn graph_unreachable_is_421_and_the_connection_closes() {
    let world = World::start().await;
    let proxy = proxy_with(&world, USER, USER, &["send_via = \"graph\""]).await;
    write_grant(&world, &proxy.state_dir, USER, USER, true);
    // The provider's graph_url names a port nobody listens on.
    let text = std::fs::read_to_string(&proxy.config_path).unwrap();
    let dead = format!("http://127.0.0.1:{}", testkit::proxy::free_port());
    let key = |url: &str| format!("graph_url = \"{url}\"");
    let text = text.replace(&key(&world.idp.graph_url()), &key(&dead));
    std::fs::write(&proxy.config_path, text).unwrap();
    proxy.reload();
    proxy.wait_for_log("config reloaded", T).await;
    let mut c = logged_in(&proxy, USER).await;
    let reply = send_one(&mut c, USER, "nowhere to go").await;
    assert!(reply.starts_with("421 4.4.1"), "{reply}");
    assert!(c.closed().await);
}

/// A Graph that takes requests and never answers: accepts, reads all it
/// is sent, and keeps the connection open. Returns its URL.
async fn silent_graph() -> String {
    use tokio::io::AsyncReadExt as _;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0; 64 * 1024];
                while matches!(stream.read(&mut buf).await, Ok(n) if n > 0) {}
            });
        }
    });
    url
}

#[tokio::test(flavor = "multi_thread")]
async fn a_graph_that_does_not_answer_in_time_may_have_sent_the_message_451_not_421() {
    use tokio::io::AsyncBufReadExt as _;
    let world = World::start().await;
    let proxy = graph_proxy(&world).await;
    let text = std::fs::read_to_string(&proxy.config_path).unwrap();
    let key = |url: &str| format!("graph_url = \"{url}\"");
    let text = text.replace(&key(&world.idp.graph_url()), &key(&silent_graph().await));
    std::fs::write(&proxy.config_path, text).unwrap();
    proxy.reload();
    proxy.wait_for_log("config reloaded", T).await;
    let mut c = logged_in(&proxy, USER).await;
    c.line(&format!("MAIL FROM:<{USER}>")).await;
    assert!(c.read().await.unwrap().starts_with("250"));
    c.line("RCPT TO:<rcpt@example.net>").await;
    assert!(c.read().await.unwrap().starts_with("250"));
    c.line("DATA").await;
    assert!(c.read().await.unwrap().starts_with("354"));
    c.send(b"To: rcpt@example.net\r\nSubject: t\r\n\r\nunanswered\r\n.\r\n")
        .await;
    // The proxy gives Graph at least 30 s.
    let mut reply = String::new();
    tokio::time::timeout(Duration::from_secs(90), c.stream.read_line(&mut reply))
        .await
        .expect("a reply once Graph's deadline passed")
        .unwrap();
    assert!(
        reply.starts_with("451 4.4.2") && reply.contains("may have been sent"),
        "{reply}"
    );
    assert!(!reply.contains("cannot be reached"), "{reply}");
}

/// One transaction to `rcpts` with `header` before the body; the reply to
/// the end of DATA.
async fn send_with(c: &mut LineClient, rcpts: &[&str], header: &str) -> String {
    c.line(&format!("MAIL FROM:<{USER}>")).await;
    assert!(c.read().await.unwrap().starts_with("250"));
    for rcpt in rcpts {
        c.line(&format!("RCPT TO:<{rcpt}>")).await;
        assert!(c.read().await.unwrap().starts_with("250"));
    }
    c.line("DATA").await;
    assert!(c.read().await.unwrap().starts_with("354"));
    c.send(format!("{header}Subject: t\r\n\r\nhello\r\n.\r\n").as_bytes())
        .await;
    c.read().await.unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread")]
async fn graph_refuses_a_header_recipient_outside_the_envelope_with_554_and_sends_nothing() {
    let world = World::start().await;
    let proxy = graph_proxy(&world).await;
    let mut c = logged_in(&proxy, USER).await;
    let header = "To: rcpt@example.net, Other@Example.net\r\n";
    let reply = send_with(&mut c, &["rcpt@example.net"], header).await;
    assert!(
        reply.starts_with("554 5.6.0") && reply.contains("not in the envelope"),
        "{reply}"
    );
    assert_eq!(world.idp.graph_requests(), 0, "nothing went to Graph");
    // The same header with every address in the envelope (case aside), plus
    // a Bcc recipient only there, goes.
    let rcpts = [
        "RCPT@example.net",
        "other@example.net",
        "hidden@example.net",
    ];
    let reply = send_with(&mut c, &rcpts, header).await;
    assert!(reply.starts_with("250"), "{reply}");
    let got = world.idp.graph_messages();
    assert_eq!(got.len(), 1);
    let mime = String::from_utf8_lossy(&got[0].mime);
    assert!(mime.starts_with("Bcc: hidden@example.net\r\n"), "{mime}");
}

#[tokio::test(flavor = "multi_thread")]
async fn ehlo_of_a_graph_only_proxy_does_not_wait_on_the_smtp_server() {
    let world = World::start().await;
    let proxy = graph_proxy(&world).await;
    // The provider's SMTP server accepts connections and never answers.
    world.smtp.set_hang(true);
    let mut c = LineClient::connect(proxy.smtp_addr).await;
    c.until("220 ").await;
    c.line("EHLO client.example").await;
    // Generous, yet well under the test config's upstream_timeout (5 s),
    // which a probe of the silent server would wait out.
    let ehlo = tokio::time::timeout(Duration::from_secs(3), c.until("250 ")).await;
    assert!(ehlo.is_ok(), "EHLO waited on the SMTP server");
    assert_eq!(world.smtp.stats().connections_total, 0, "SMTP was probed");
    drop(c);
    let mut c = logged_in(&proxy, USER).await;
    let reply = send_one(&mut c, USER, "through graph").await;
    assert!(reply.starts_with("250"), "{reply}");
}

#[tokio::test(flavor = "multi_thread")]
async fn auto_switches_a_mailbox_to_graph_after_5_7_139_and_stays_switched() {
    let world = World::start().await;
    world.smtp.set_auth_disabled(USER, true);
    let proxy = proxy_with(&world, USER, USER, &["send_via = \"auto\""]).await;
    write_grant(&world, &proxy.state_dir, USER, USER, true);
    let mut tried = Vec::new();
    for round in 0..2 {
        let res = nodemailer(merged(
            nodemailer_opts(&proxy, USER, USER),
            json!({"count": 2}),
        ))
        .await;
        assert_eq!(res["ok"], true, "round {round}: {res}\n{}", proxy.logs());
        tried.push(world.smtp.stats().auth_failed);
    }
    world.idp.wait_for_graph_messages(4, T).await;
    // The first round's logins, racing, may each have tried SMTP; once
    // switched, nothing tries it again.
    assert!(tried[0] >= 1 && tried[1] == tried[0], "{tried:?}");
    let logs = proxy.logs();
    assert_eq!(
        logs.matches("sending its mail through Microsoft Graph from now on")
            .count(),
        1,
        "{logs}"
    );
    let switches = "xoauth2_proxy_graph_switches_total";
    let switched = proxy.metric(switches, &[("account", USER)]).await;
    assert_eq!(switched, Some(1.0));
}

// ---- check ----------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn check_gets_a_graph_token_for_accounts_that_send_via_graph_without_sending() {
    let world = World::start().await;
    let proxy = graph_proxy(&world).await;
    let out = proxy.cli(&["check"]).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout.contains("Microsoft Graph") && stdout.contains(&format!("sending as {USER}")),
        "{stdout}"
    );
    assert_eq!(world.idp.graph_requests(), 0, "no mail was sent");

    // An auto account whose SMTP AUTH is off passes through Graph.
    world.smtp.set_auth_disabled(SHARED, true);
    let auto = proxy_with(&world, SHARED, SHARED, &["send_via = \"auto\""]).await;
    write_grant(&world, &auto.state_dir, SHARED, SHARED, true);
    let out = auto.cli(&["check"]).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout.contains("sends through Microsoft Graph instead"),
        "{stdout}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn auto_switches_at_mail_when_a_new_smtp_connection_meets_5_7_139() {
    let world = World::start().await;
    let mut proxy = proxy_with(&world, USER, USER, &["send_via = \"auto\""]).await;
    write_grant(&world, &proxy.state_dir, USER, USER, true);
    // Idle pooled connections close quickly, so that MAIL must open one.
    let text = std::fs::read_to_string(&proxy.config_path).unwrap();
    let text = text.replacen("[smtp]\n", "[smtp]\npool_idle_timeout = \"300ms\"\n", 1);
    std::fs::write(&proxy.config_path, text).unwrap();
    proxy.restart().await;

    let mut c = logged_in(&proxy, USER).await;
    let reply = send_one(&mut c, USER, "over SMTP").await;
    assert!(reply.starts_with("250"), "{reply}");
    world.smtp.wait_for_messages(1, T).await;
    // SMTP AUTH is switched off while the client stays logged in.
    world.smtp.set_auth_disabled(USER, true);
    world.smtp.wait_for_stats(|s| s.active_now == 0, T).await;
    let reply = send_one(&mut c, USER, "through Graph").await;
    assert!(reply.starts_with("250 2.0.0"), "{reply}\n{}", proxy.logs());
    let got = world.idp.wait_for_graph_messages(1, T).await;
    assert!(String::from_utf8_lossy(&got[0].mime).contains("through Graph"));
    assert_eq!(world.smtp.messages().len(), 1);
}
