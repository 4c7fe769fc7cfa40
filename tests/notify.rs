//! Notifications when an account needs signing in again, through the real
//! binary: the test identity provider revokes a grant, the proxy runs a
//! notify command (a script this test writes, which keeps its environment)
//! and posts to a webhook (a hyper server in this test), repeats, recovers,
//! survives a reload, kills a command that hangs; `/metrics` says the same.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use testkit::proxy::{AccountSpec, TestProxy};
use testkit::world::{LineClient, World};
use tokio::sync::mpsc;

const USER: &str = "sales@contoso.com";
const PASS: &str = "pw";
const T: Duration = Duration::from_secs(20);

/// One run of the notify command: its whole environment.
type Env = BTreeMap<String, String>;

/// Starts the proxy for `USER` with `admin` lines added to `[admin]`; with
/// `granted`, the account holds a grant before the proxy starts (as after
/// `xoauth2-proxy login`).
async fn start(world: &World, granted: bool, admin: &str) -> TestProxy {
    let spec = AccountSpec::device(USER, PASS);
    TestProxy::start_with(
        &world.endpoints,
        std::slice::from_ref(&spec),
        "debug",
        |text| {
            if granted {
                world.grant_in(&state_dir_of(&text), &spec);
            }
            format!("{text}{admin}\n")
        },
    )
    .await
}

/// The `state_dir` a generated config names.
fn state_dir_of(config: &str) -> PathBuf {
    let line = config
        .lines()
        .find_map(|l| l.strip_prefix("state_dir = "))
        .expect("the generated config names its state_dir");
    PathBuf::from(line.trim_matches('"'))
}

/// Writes an executable script `name` in `dir` with `body` (sh).
fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(name);
    std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

/// A notify command that keeps its environment, one file per run, in
/// `events` (written whole, then renamed into place).
fn recording_command(dir: &Path) -> (String, PathBuf) {
    let events = dir.join("events");
    std::fs::create_dir_all(&events).unwrap();
    let path = script(
        dir,
        "record-event",
        r#"env > "$1/.partial.$$" && mv "$1/.partial.$$" "$1/event.$(date +%s%N).$$""#,
    );
    let admin = format!(
        "notify_command = [\"{}\", \"{}\"]",
        path.display(),
        events.display()
    );
    (admin, events)
}

/// The runs recorded so far, oldest first.
fn recorded(events: &Path) -> Vec<Env> {
    let mut names: Vec<_> = std::fs::read_dir(events)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with("event."))
        .collect();
    names.sort();
    names
        .iter()
        .map(|n| {
            let text = std::fs::read_to_string(events.join(n)).unwrap();
            text.lines()
                .filter_map(|l| l.split_once('='))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        })
        .collect()
}

/// Waits until `n` runs are recorded; returns them.
async fn until_recorded(events: &Path, n: usize, proxy: &TestProxy) -> Vec<Env> {
    let deadline = Instant::now() + T;
    loop {
        let runs = recorded(events);
        if runs.len() >= n {
            return runs;
        }
        assert!(
            Instant::now() < deadline,
            "{} of {n} notifications ran; the proxy's log:\n{}",
            runs.len(),
            proxy.logs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn kinds(runs: &[Env]) -> Vec<&str> {
    runs.iter()
        .map(|env| env["XOAUTH2_PROXY_EVENT"].as_str())
        .collect()
}

/// Whether the proxy says `USER` needs `login` (1) or not (0).
async fn needs_login(proxy: &TestProxy) -> Option<f64> {
    let name = "xoauth2_proxy_account_needs_login";
    proxy.metric(name, &[("account", USER)]).await
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

fn assert_no_secret(world: &World, what: &str, text: &str) {
    for secret in world.secrets() {
        // Never printed: it is a secret.
        assert!(!text.contains(&secret), "a secret is in {what}");
    }
}

async fn imap_login(proxy: &TestProxy) -> String {
    LineClient::imap_login(proxy.imap_addr, USER, PASS).await
}

/// Whether a login gets no working session: `NO`, or, served by a warm
/// session (answered at once), `OK` and then `* BYE [UNAVAILABLE]` when
/// that session and a new one both turn out refused.
async fn login_gets_no_session(proxy: &TestProxy) -> bool {
    let mut c = LineClient::connect(proxy.imap_addr).await;
    c.read().await;
    c.line(&format!("a LOGIN {USER} {PASS}")).await;
    let reply = c.until("a ").await.pop().unwrap();
    if reply.starts_with("a NO") {
        return true;
    }
    c.line("b NOOP").await;
    c.read()
        .await
        .is_some_and(|l| l.starts_with("* BYE [UNAVAILABLE]"))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_revoked_grant_runs_the_command_with_needs_login_then_recovered_after_a_new_login() {
    let world = World::start().await;
    // Like Exchange, sessions end with their token: a warm session opened
    // with a revoked grant's token is not used.
    world.imap.set_expire_sessions(true);
    let dir = tempfile::tempdir().unwrap();
    let (command, events) = recording_command(dir.path());
    let admin = format!("{command}\npublic_url = \"https://mail-proxy.example.com/\"");
    let proxy = start(&world, true, &admin).await;
    assert!(imap_login(&proxy).await.starts_with("a OK"));
    assert_eq!(needs_login(&proxy).await, Some(0.0));
    let expiry_series = "xoauth2_proxy_access_token_expiry_seconds";
    let expiry = proxy.metric(expiry_series, &[("account", USER)]).await;
    let expiry = expiry.expect("an expiry");
    // The test identity provider's tokens live an hour.
    assert!(
        (now() + 3000.0..now() + 3700.0).contains(&expiry),
        "{expiry}"
    );

    world.idp.revoke_grants(USER);
    assert!(login_gets_no_session(&proxy).await);
    let runs = until_recorded(&events, 1, &proxy).await;
    let env = &runs[0];
    assert_eq!(env["XOAUTH2_PROXY_EVENT"], "needs_login");
    assert_eq!(env["XOAUTH2_PROXY_ACCOUNT"], USER);
    assert_eq!(env["XOAUTH2_PROXY_MAILBOX"], USER);
    assert_eq!(
        env["XOAUTH2_PROXY_CONSOLE_URL"],
        "https://mail-proxy.example.com"
    );
    let reason = &env["XOAUTH2_PROXY_REASON"];
    assert!(reason.contains("AADSTS70000"), "{reason}");
    assert!(
        reason.contains(&format!("run `xoauth2-proxy login {USER}`")),
        "{reason}"
    );
    // A clean environment: nothing of the proxy's own but PATH and the like.
    for key in ["XOAUTH2_PROXY_CONFIG", "RUST_LOG"] {
        assert!(!env.contains_key(key), "{key} was passed on: {env:?}");
    }
    assert!(env.contains_key("PATH"));
    assert_eq!(needs_login(&proxy).await, Some(1.0));

    // `xoauth2-proxy login` writes a new grant: recovered, with no client.
    world.grant(&proxy, &AccountSpec::device(USER, PASS));
    let runs = until_recorded(&events, 2, &proxy).await;
    assert_eq!(kinds(&runs), ["needs_login", "recovered"]);
    assert_eq!(runs[1]["XOAUTH2_PROXY_ACCOUNT"], USER);
    assert_eq!(needs_login(&proxy).await, Some(0.0));
    assert!(imap_login(&proxy).await.starts_with("a OK"));
    assert_eq!(recorded(&events).len(), 2, "no further event");

    for (i, run) in runs.iter().enumerate() {
        assert_no_secret(&world, &format!("notification {i}"), &format!("{run:?}"));
    }
    assert_no_secret(&world, "the log", &proxy.logs());
}

#[tokio::test(flavor = "multi_thread")]
async fn needs_login_is_announced_at_start_and_repeated_every_notify_repeat_until_fixed() {
    let world = World::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (command, events) = recording_command(dir.path());
    // No grant at all: the account needs login from the start.
    let proxy = start(&world, false, &format!("{command}\nnotify_repeat = \"1s\"")).await;
    let runs = until_recorded(&events, 3, &proxy).await;
    assert_eq!(kinds(&runs), ["needs_login"; 3]);
    let reason = &runs[0]["XOAUTH2_PROXY_REASON"];
    assert!(
        reason.starts_with("no grant yet: run `xoauth2-proxy login sales@contoso.com`"),
        "{reason}"
    );
    assert_eq!(
        runs[0]["XOAUTH2_PROXY_CONSOLE_URL"], "http://localhost:8025",
        "the default public_url"
    );

    world.grant(&proxy, &AccountSpec::device(USER, PASS));
    let deadline = Instant::now() + T;
    while kinds(&recorded(&events)).last() != Some(&"recovered") {
        assert!(Instant::now() < deadline, "{}", proxy.logs());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let runs = recorded(&events);
    assert_eq!(
        kinds(&runs).iter().filter(|k| **k == "recovered").count(),
        1
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reload_keeps_the_accounts_state_and_sends_no_duplicate() {
    let world = World::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (command, events) = recording_command(dir.path());
    let proxy = start(&world, false, &format!("{command}\nnotify_repeat = \"1h\"")).await;
    until_recorded(&events, 1, &proxy).await;

    for n in 1..=2 {
        proxy.reload();
        let deadline = Instant::now() + T;
        while proxy.logs().matches("config reloaded").count() < n {
            assert!(Instant::now() < deadline, "{}", proxy.logs());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    assert_eq!(needs_login(&proxy).await, Some(1.0));

    // A reload refused late (its [tls] files do not exist) that would add
    // an account without a grant: the record does not take the account.
    let config = std::fs::read_to_string(&proxy.config_path).unwrap();
    let refused = format!(
        "{config}\n[[accounts]]\nusername = \"new@contoso.com\"\npassword = \"pw\"\nprovider = \"test\"\n\n[tls]\ncert_file = \"/nonexistent/cert.pem\"\nkey_file = \"/nonexistent/key.pem\"\n"
    );
    std::fs::write(&proxy.config_path, refused).unwrap();
    proxy.reload();
    proxy.wait_for_log("reload refused", T).await;
    assert!(!proxy.metrics().await.contains("new@contoso.com"));

    // The next event is the recovery: a duplicate from the reloads, or an
    // event for the refused config's account, would have come before it.
    world.grant(&proxy, &AccountSpec::device(USER, PASS));
    let runs = until_recorded(&events, 2, &proxy).await;
    assert_eq!(kinds(&runs), ["needs_login", "recovered"]);
    assert!(runs.iter().all(|r| r["XOAUTH2_PROXY_ACCOUNT"] == USER));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hanging_notify_command_is_killed_at_its_timeout_with_what_it_started() {
    let world = World::start().await;
    let dir = tempfile::tempdir().unwrap();
    let pids = dir.path().join("pids");
    std::fs::create_dir_all(&pids).unwrap();
    // The script and a child of its own both hang.
    let hang = script(
        dir.path(),
        "hang",
        r#"sleep 300 &
echo "$$ $!" > "$1/.partial.$$" && mv "$1/.partial.$$" "$1/run.$(date +%s%N)"
wait"#,
    );
    let admin = format!(
        "notify_command = [\"{}\", \"{}\"]\nnotify_timeout = \"1s\"",
        hang.display(),
        pids.display()
    );
    let proxy = start(&world, false, &admin).await;
    proxy
        .wait_for_log("ran longer than admin.notify_timeout (1s)", T)
        .await;
    let runs: Vec<String> = std::fs::read_dir(&pids)
        .unwrap()
        .map(|e| std::fs::read_to_string(e.unwrap().path()).unwrap())
        .collect();
    assert_eq!(runs.len(), 1);
    for pid in runs[0].split_whitespace() {
        assert!(gone(pid), "process {pid} still runs after the timeout");
    }

    // The next event is not held up by the first.
    world.grant(&proxy, &AccountSpec::device(USER, PASS));
    let deadline = Instant::now() + T;
    while std::fs::read_dir(&pids).unwrap().count() < 2 {
        assert!(Instant::now() < deadline, "{}", proxy.logs());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_notify_command_that_exits_leaving_a_background_job_is_delivered_not_timed_out() {
    let world = World::start().await;
    let dir = tempfile::tempdir().unwrap();
    let events = dir.path().join("events");
    std::fs::create_dir_all(&events).unwrap();
    // Like `logger … &`: the job keeps the script's stdout and stderr open
    // long after the script itself exited 0.
    let command = script(
        dir.path(),
        "background",
        r#"sleep 30 &
{ env; echo "BACKGROUND=$!"; } > "$1/.partial.$$" && mv "$1/.partial.$$" "$1/event.$(date +%s%N).$$"
exit 0"#,
    );
    let admin = format!(
        "notify_command = [\"{}\", \"{}\"]\nnotify_timeout = \"10m\"",
        command.display(),
        events.display()
    );
    let proxy = start(&world, false, &admin).await;
    let runs = until_recorded(&events, 1, &proxy).await;
    assert_eq!(kinds(&runs), ["needs_login"]);
    let background = runs[0]["BACKGROUND"].clone();
    // Finished once the script exited, far inside the 10 minutes.
    proxy.wait_for_log("admin.notify_command finished", T).await;
    let logs = proxy.logs();
    assert!(!logs.contains("ran longer than"), "{logs}");
    assert!(
        !logs.contains("admin.notify_command `"),
        "no warning: {logs}"
    );
    // The job it left is the admin's business: not killed with the script.
    assert!(!gone(&background), "the background job was killed");
    let _ = std::process::Command::new("kill").arg(&background).status();
}

/// The process has exited (or is a zombie nobody reaped yet).
fn gone(pid: &str) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => {
            let state = stat.rsplit_once(") ").map(|(_, rest)| &rest[..1]);
            matches!(state, Some("Z" | "X"))
        }
    }
}

/// One request the test's webhook received.
struct Received {
    path: String,
    body: Vec<u8>,
}

/// A webhook on loopback that answers 500 to its first `failures` requests
/// and 200 after; each request is handed to the test. With `tls`, it speaks
/// HTTPS with that acceptor's certificate.
async fn webhook(
    failures: usize,
    tls: Option<tokio_rustls::TlsAcceptor>,
) -> (std::net::SocketAddr, mpsc::UnboundedReceiver<Received>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    let seen = Arc::new(AtomicUsize::new(0));
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (tx, seen) = (tx.clone(), seen.clone());
            let service = hyper::service::service_fn(move |req: hyper::Request<_>| {
                let (tx, seen) = (tx.clone(), seen.clone());
                async move {
                    let path = req.uri().path().to_string();
                    let body: hyper::body::Incoming = req.into_body();
                    let body = body.collect().await.unwrap().to_bytes().to_vec();
                    let status = if seen.fetch_add(1, Ordering::SeqCst) < failures {
                        500
                    } else {
                        200
                    };
                    let _ = tx.send(Received { path, body });
                    let response = hyper::Response::builder()
                        .status(status)
                        .body(Full::new(Bytes::new()))
                        .unwrap();
                    Ok::<_, Infallible>(response)
                }
            });
            let http = hyper::server::conn::http1::Builder::new();
            match tls.clone() {
                None => {
                    tokio::spawn(http.serve_connection(TokioIo::new(stream), service));
                }
                Some(acceptor) => {
                    tokio::spawn(async move {
                        if let Ok(stream) = acceptor.accept(stream).await {
                            let _ = http.serve_connection(TokioIo::new(stream), service).await;
                        }
                    });
                }
            }
        }
    });
    (addr, rx)
}

async fn next(requests: &mut mpsc::UnboundedReceiver<Received>, proxy: &TestProxy) -> Received {
    match tokio::time::timeout(T, requests.recv()).await {
        Ok(Some(r)) => r,
        _ => panic!(
            "the webhook got nothing; the proxy's log:\n{}",
            proxy.logs()
        ),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_webhook_that_answers_500_gets_the_event_again_and_its_url_is_never_logged() {
    let world = World::start().await;
    let (addr, mut requests) = webhook(1, None).await;
    let admin = format!("notify_url = \"http://{addr}/hooks/T0/B0/hook-key-Zq81\"");
    let proxy = start(&world, false, &admin).await;

    let first = next(&mut requests, &proxy).await;
    let second = next(&mut requests, &proxy).await;
    assert_eq!(first.path, "/hooks/T0/B0/hook-key-Zq81");
    assert_eq!(first.body, second.body, "the same event, retried");
    proxy.wait_for_log("took the needs_login event", T).await;

    let event: serde_json::Value = serde_json::from_slice(&second.body).unwrap();
    assert_eq!(event["event"], "needs_login");
    assert_eq!(event["account"], USER);
    assert_eq!(event["mailbox"], USER);
    assert_eq!(event["console_url"], "http://localhost:8025");
    assert!(
        event["reason"]
            .as_str()
            .unwrap()
            .contains("xoauth2-proxy login sales@contoso.com")
    );
    let at = humantime::parse_rfc3339(event["at"].as_str().unwrap()).expect("RFC 3339");
    let age = SystemTime::now().duration_since(at).unwrap_or_default();
    assert!(age < Duration::from_secs(600), "{age:?}");
    assert!(event["text"].as_str().unwrap().contains(USER));
    assert_no_secret(
        &world,
        "the webhook's body",
        &String::from_utf8_lossy(&second.body),
    );

    let logs = proxy.logs();
    assert!(logs.contains("answered 500"), "{logs}");
    assert!(
        !logs.contains("hook-key-Zq81") && !logs.contains("/hooks/"),
        "the webhook's URL is in the log:\n{logs}"
    );
    assert_no_secret(&world, "the log", &logs);

    // A recovery is posted once.
    world.grant(&proxy, &AccountSpec::device(USER, PASS));
    let third = next(&mut requests, &proxy).await;
    let event: serde_json::Value = serde_json::from_slice(&third.body).unwrap();
    assert_eq!(event["event"], "recovered");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_webhook_whose_certificate_is_not_trusted_is_never_sent_the_event() {
    let world = World::start().await;
    // A TLS webhook with the test CA's certificate, which the system roots
    // the proxy trusts do not include.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let acceptor = world.pki.acceptor();
    let (handshakes, mut outcomes) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let _ = handshakes.send(acceptor.accept(stream).await.is_ok());
        }
    });
    let admin = format!("notify_url = \"https://localhost:{port}/hooks/hook-key-Tt5\"");
    let proxy = start(&world, false, &admin).await;
    proxy
        .wait_for_log(
            "the webhook at localhost presented a TLS certificate that is not trusted",
            T,
        )
        .await;
    let handshake = tokio::time::timeout(T, outcomes.recv()).await.unwrap();
    assert_eq!(handshake, Some(false), "the proxy refused the certificate");
    let logs = proxy.logs();
    assert!(logs.contains("the needs_login event is not sent"), "{logs}");
    assert!(!logs.contains("hook-key-Tt5"), "{logs}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_webhook_with_a_private_ca_gets_the_event_once_notify_ca_file_names_that_ca() {
    let world = World::start().await;
    // The same kind of webhook the proxy refuses without the key: the test
    // CA's certificate, which the system roots do not include.
    let (addr, mut requests) = webhook(0, Some(world.pki.acceptor())).await;
    let admin = format!(
        "notify_url = \"https://localhost:{}/hooks/hook-key-Ca7\"\nnotify_ca_file = \"{}\"",
        addr.port(),
        world.pki.ca_pem_path.display()
    );
    let proxy = start(&world, false, &admin).await;

    let received = next(&mut requests, &proxy).await;
    assert_eq!(received.path, "/hooks/hook-key-Ca7");
    let event: serde_json::Value = serde_json::from_slice(&received.body).unwrap();
    assert_eq!(event["event"], "needs_login");
    assert_eq!(event["account"], USER);
    proxy.wait_for_log("took the needs_login event", T).await;
    let logs = proxy.logs();
    assert!(!logs.contains("not trusted"), "{logs}");
    assert!(!logs.contains("hook-key-Ca7"), "{logs}");
}
