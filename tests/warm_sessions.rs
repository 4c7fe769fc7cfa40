//! Warm upstream IMAP sessions (`imap.warm_sessions`), the per-mailbox cap
//! (`imap.max_connections_per_mailbox`), the remembered pre-login
//! capabilities and TLS resumption towards the upstream, through the real
//! binary against the mock identity provider and the mock TLS upstream.

use std::time::Duration;

use serde_json::json;
use testkit::node::imapflow as run_imapflow;
use testkit::proxy::{AccountSpec, TestProxy};
use testkit::world::{LineClient, World};

const USER: &str = "sales@contoso.com";
const PASS: &str = "local-pass-9f3k";
const T: Duration = Duration::from_secs(15);

/// The value of `xoauth2_proxy_imap_warm_sessions_total{event="EVENT"}`.
async fn warm(proxy: &TestProxy, event: &str) -> u64 {
    let name = "xoauth2_proxy_imap_warm_sessions_total";
    let value = proxy.metric(name, &[("event", event)]).await;
    value.unwrap_or(0.0) as u64
}

/// The proxy with `[imap]` settings added to the generated config.
async fn proxy_with(world: &World, imap: &str, server: &str) -> TestProxy {
    let account = AccountSpec::device(USER, PASS);
    let proxy = TestProxy::start_with(
        &world.endpoints,
        std::slice::from_ref(&account),
        "debug",
        |text| {
            text.replacen("[imap]\n", &format!("[imap]\n{imap}\n"), 1)
                .replacen("shutdown_grace = \"2s\"\n", server, 1)
        },
    )
    .await;
    world.grant(&proxy, &account);
    proxy
}

/// Logs in; the tagged answer.
async fn log_in(client: &mut LineClient) -> String {
    client.read().await.expect("a greeting");
    client.line(&format!("a1 LOGIN {USER} {PASS}")).await;
    client.until("a1 ").await.pop().unwrap()
}

async fn logged_in(proxy: &TestProxy) -> LineClient {
    let mut c = LineClient::connect(proxy.imap_addr).await;
    let answer = log_in(&mut c).await;
    assert!(answer.starts_with("a1 OK"), "{answer}\n{}", proxy.logs());
    c
}

async fn log_out(mut c: LineClient) {
    c.line("z LOGOUT").await;
    c.until("z ").await;
}

/// One cold login and logout; then waits until the warm session it left
/// behind is the only upstream connection.
async fn warmed_up(world: &World, proxy: &TestProxy) -> String {
    let mut c = LineClient::connect(proxy.imap_addr).await;
    let answer = log_in(&mut c).await;
    assert!(answer.starts_with("a1 OK"), "{answer}\n{}", proxy.logs());
    log_out(c).await;
    world
        .imap
        .wait_for_stats(|s| s.active == 1 && s.auth_ok == 2, T)
        .await;
    // The server counts the login before the proxy has proven the session
    // (NAMESPACE) and parked it: wait for the proxy's own word.
    let parked = tokio::time::Instant::now() + T;
    while warm(proxy, "opened").await < 1 {
        assert!(tokio::time::Instant::now() < parked, "{}", proxy.logs());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    answer
}

/// A proxy for USER whose INBOX holds one message, with a warm session
/// waiting after one cold login; and what that cold login was told.
async fn warm_proxy() -> (World, TestProxy, String) {
    let world = World::start().await;
    let proxy = world.proxy(&[AccountSpec::device(USER, PASS)]).await;
    world
        .imap
        .add_message(USER, b"Subject: hello\r\n\r\nfirst message\r\n".to_vec());
    let cold = warmed_up(&world, &proxy).await;
    (world, proxy, cold)
}

/// A client's commands and what it was told, through a logged-in session:
/// SELECT, FETCH, and IDLE seeing a new message.
async fn select_fetch_idle(world: &World, c: &mut LineClient) {
    c.line("a2 SELECT INBOX").await;
    let select = c.until("a2 ").await;
    assert!(select.last().unwrap().starts_with("a2 OK"), "{select:?}");
    assert!(select.iter().any(|l| l == "* 1 EXISTS"), "{select:?}");
    c.line("a3 UID FETCH 1 BODY.PEEK[]").await;
    let fetch = c.until("a3 ").await;
    assert!(fetch.last().unwrap().starts_with("a3 OK"), "{fetch:?}");
    assert!(fetch.iter().any(|l| l == "first message"), "{fetch:?}");
    c.line("a4 IDLE").await;
    assert!(c.read().await.unwrap().starts_with("+ "));
    world
        .imap
        .add_message(USER, b"Subject: two\r\n\r\nsecond\r\n".to_vec());
    assert_eq!(c.read().await.unwrap(), "* 2 EXISTS");
    c.line("DONE").await;
    assert!(c.until("a4 ").await.last().unwrap().starts_with("a4 OK"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_warm_login_looks_like_a_cold_one_and_opens_no_connection() {
    let (world, proxy, cold) = warm_proxy().await;
    assert_eq!(warm(&proxy, "miss").await, 1);
    let connections = world.imap.stats().connections;

    let mut c = LineClient::connect(proxy.imap_addr).await;
    let answer = log_in(&mut c).await;
    assert_eq!(answer, cold, "the same OK, capabilities and all");
    select_fetch_idle(&world, &mut c).await;
    // The session was proven alive before SELECT went to it.
    assert_eq!(warm(&proxy, "hit").await, 1, "{}", proxy.logs());
    assert!(
        world.imap.stats().connections <= connections + 1,
        "only the replacement may have been opened"
    );
    log_out(c).await;
    // The replacement is ready for the next login.
    world
        .imap
        .wait_for_stats(|s| s.active == 1 && s.auth_ok == 3, T)
        .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn what_the_server_says_to_a_waiting_warm_session_never_reaches_the_next_client() {
    let world = World::start().await;
    let proxy = world.proxy(&[AccountSpec::device(USER, PASS)]).await;
    warmed_up(&world, &proxy).await;
    world
        .imap
        .untagged_to_open_sessions("* OK [ALERT] maintenance at midnight");
    let mut c = logged_in(&proxy).await;
    c.line("a2 NOOP").await;
    let lines = c.until("a2 ").await;
    assert_eq!(lines, vec!["a2 OK NOOP completed."]);
    assert_eq!(warm(&proxy, "hit").await, 1, "{}", proxy.logs());
    log_out(c).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_warm_session_the_server_said_bye_to_is_discarded_and_the_login_goes_cold() {
    let (world, proxy, cold) = warm_proxy().await;
    world.imap.bye_open_sessions();
    world.imap.wait_for_stats(|s| s.active == 0, T).await;

    let mut c = LineClient::connect(proxy.imap_addr).await;
    assert_eq!(log_in(&mut c).await, cold);
    assert_eq!(warm(&proxy, "hit").await, 0);
    assert_eq!(warm(&proxy, "discarded").await, 1, "{}", proxy.logs());
    select_fetch_idle(&world, &mut c).await;
    log_out(c).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_silent_warm_session_is_replaced_behind_the_ok_without_the_client_noticing() {
    let (world, proxy, cold) = warm_proxy().await;
    world.imap.silence_open_sessions();

    // Answered at once; the proof fails behind the OK, and SELECT waits
    // for the new session opened instead.
    let mut c = LineClient::connect(proxy.imap_addr).await;
    assert_eq!(log_in(&mut c).await, cold);
    select_fetch_idle(&world, &mut c).await;
    assert_eq!(warm(&proxy, "hit").await, 0);
    assert_eq!(warm(&proxy, "discarded").await, 1, "{}", proxy.logs());
    log_out(c).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_warm_session_told_bye_by_its_proof_is_replaced_without_the_client_noticing() {
    let (world, proxy, cold) = warm_proxy().await;
    // Exchange ends a session whose token it no longer takes at the next
    // command: the NOOP that proves the warm session gets `* BYE`. The
    // proxy still holds the token as good.
    world.imap.set_expire_sessions(true);
    let token = world.imap.tokens_seen().pop().unwrap();
    assert!(world.tokens.expire(&token));

    let mut c = LineClient::connect(proxy.imap_addr).await;
    assert_eq!(log_in(&mut c).await, cold, "answered at once, as warm");
    select_fetch_idle(&world, &mut c).await;
    assert_eq!(warm(&proxy, "hit").await, 0);
    assert_eq!(warm(&proxy, "discarded").await, 1, "{}", proxy.logs());
    assert_ne!(
        world.imap.tokens_seen().pop().unwrap(),
        token,
        "a new token"
    );
    log_out(c).await;
    no_secret_in_the_log(&world, &proxy);
}

/// No token, grant or client secret in the proxy's log.
fn no_secret_in_the_log(world: &World, proxy: &TestProxy) {
    let logs = proxy.logs();
    for secret in world.secrets() {
        assert!(!logs.contains(&secret), "a secret in the log:\n{logs}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dead_warm_session_and_an_unreachable_server_end_in_bye_unavailable_and_free_the_cap() {
    let world = World::start().await;
    let proxy = proxy_with(
        &world,
        "max_connections_per_mailbox = 2",
        "shutdown_grace = \"2s\"\n",
    )
    .await;
    let cold = warmed_up(&world, &proxy).await;
    world.imap.silence_open_sessions();
    world.imap.set_stopped(true);

    // Told OK before the proof fails; then neither the warm session nor a
    // new one can be had: no invented answers, a BYE saying why.
    let mut c = LineClient::connect(proxy.imap_addr).await;
    assert_eq!(log_in(&mut c).await, cold);
    c.line("a2 SELECT INBOX").await;
    assert_eq!(
        c.read().await.as_deref(),
        Some(
            "* BYE [UNAVAILABLE] The mail server or identity provider is unavailable; try again later"
        ),
        "{}",
        proxy.logs()
    );
    assert!(c.closed().await);
    assert_eq!(warm(&proxy, "discarded").await, 1);
    world.imap.wait_for_stats(|s| s.active == 0, T).await;

    // Both places in the cap are free again: two clients at once.
    world.imap.set_stopped(false);
    let first = logged_in(&proxy).await;
    let second = logged_in(&proxy).await;
    log_out(first).await;
    log_out(second).await;
    assert!(world.imap.stats().most_active <= 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_grant_revoked_behind_a_warm_login_ends_in_bye_unavailable() {
    let world = World::start().await;
    let proxy = world.proxy(&[AccountSpec::device(USER, PASS)]).await;
    let cold = warmed_up(&world, &proxy).await;
    world.imap.set_expire_sessions(true);
    // The proxy's cached token still looks good to it: the login is served
    // warm; the proof and the new session both find the grant gone.
    world.idp.revoke_grants(USER);

    let mut c = LineClient::connect(proxy.imap_addr).await;
    assert_eq!(log_in(&mut c).await, cold);
    assert_eq!(
        c.read().await.as_deref(),
        Some(
            "* BYE [UNAVAILABLE] The account needs signing in again at the proxy (`xoauth2-proxy login`, or Connect in its console); try again after that"
        ),
        "{}",
        proxy.logs()
    );
    assert!(c.closed().await);
    proxy
        .wait_for_log(&format!("run `xoauth2-proxy login {USER}`"), T)
        .await;
    world.imap.wait_for_stats(|s| s.active == 0, T).await;
    no_secret_in_the_log(&world, &proxy);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_leaves_while_its_warm_session_is_proven_closes_it() {
    let world = World::start().await;
    let proxy = world.proxy(&[AccountSpec::device(USER, PASS)]).await;
    let cold = warmed_up(&world, &proxy).await;
    let connections = world.imap.stats().connections;
    world.imap.silence_open_sessions();

    let mut c = LineClient::connect(proxy.imap_addr).await;
    assert_eq!(log_in(&mut c).await, cold);
    drop(c);
    proxy
        .wait_for_log("the client left before its upstream session was ready", T)
        .await;
    world.imap.wait_for_stats(|s| s.active == 0, T).await;
    assert_eq!(
        world.imap.stats().connections,
        connections,
        "nothing opened for a client that has gone"
    );
    assert_eq!(warm(&proxy, "discarded").await, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn imapflow_syncs_through_a_warm_login_whose_session_turned_out_dead() {
    let (world, proxy, _) = warm_proxy().await;
    world.imap.silence_open_sessions();
    let args = json!({
        "host": "127.0.0.1", "port": proxy.imap_addr.port(), "secure": false,
        "user": USER, "pass": PASS,
        "steps": ["list", "select", "fetch", "idle"],
    });
    let run = run_imapflow(&args, 60).await;
    assert_eq!(run["ok"], true, "{run}\n{}", proxy.logs());
    assert_eq!(warm(&proxy, "discarded").await, 1, "{}", proxy.logs());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_revoked_grant_stops_warm_logins() {
    let world = World::start().await;
    world.idp.set_access_token_lifetime(Duration::from_secs(3));
    let proxy = world.proxy(&[AccountSpec::device(USER, PASS)]).await;
    warmed_up(&world, &proxy).await;

    world.idp.revoke_grants(USER);
    // Once the cached token is due for renewal, the grant is asked for again.
    tokio::time::sleep(Duration::from_millis(2200)).await;
    let mut c = LineClient::connect(proxy.imap_addr).await;
    assert_eq!(
        log_in(&mut c).await,
        "a1 NO [AUTHENTICATIONFAILED] Authentication failed"
    );
    assert_eq!(warm(&proxy, "hit").await, 0, "{}", proxy.logs());
    proxy
        .wait_for_log(&format!("run `xoauth2-proxy login {USER}`"), T)
        .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_mailbox_cap_holds_under_a_burst_of_logins() {
    let world = World::start().await;
    let proxy = proxy_with(
        &world,
        "max_connections_per_mailbox = 3\nwarm_sessions = 2",
        "shutdown_grace = \"2s\"\n",
    )
    .await;
    // Warm sessions first: they take places in the cap too.
    log_out(logged_in(&proxy).await).await;
    world.imap.wait_for_stats(|s| s.active == 2, T).await;

    let burst = (0..8).map(|_| {
        let addr = proxy.imap_addr;
        tokio::spawn(async move {
            let mut c = LineClient::connect(addr).await;
            let answer = log_in(&mut c).await;
            (c, answer)
        })
    });
    let mut held = Vec::new();
    for login in burst {
        held.push(login.await.unwrap());
    }
    let ok = held.iter().filter(|(_, a)| a.starts_with("a1 OK")).count();
    let unavailable = held
        .iter()
        .filter(|(_, a)| a.starts_with("a1 NO [UNAVAILABLE]"))
        .count();
    assert_eq!(
        (ok, unavailable),
        (3, 5),
        "{held:?}",
        held = held.iter().map(|h| &h.1).collect::<Vec<_>>()
    );
    let stats = world.imap.stats();
    assert!(stats.most_active <= 3, "{stats:?}");
    proxy
        .wait_for_log("imap.max_connections_per_mailbox", T)
        .await;
    for (c, _) in held {
        drop(c);
    }
    // The places come back: a login works again.
    world.imap.wait_for_stats(|s| s.active <= 2, T).await;
    log_out(logged_in(&proxy).await).await;
    assert!(world.imap.stats().most_active <= 3);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reload_and_sigterm_close_the_warm_sessions() {
    let world = World::start().await;
    let mut proxy = proxy_with(&world, "", "shutdown_grace = \"60s\"\n").await;
    warmed_up(&world, &proxy).await;

    proxy.reload();
    proxy.wait_for_log("config reloaded", T).await;
    world.imap.wait_for_stats(|s| s.active == 0, T).await;
    let logouts = |world: &World| {
        let seen = world.imap.commands_seen();
        seen.iter().filter(|c| *c == "LOGOUT").count()
    };
    assert_eq!(logouts(&world), 2, "the client's and the warm session's");

    // A client stays logged in across SIGTERM (the proxy drains it); the
    // warm session its login left behind closes at once.
    let c = logged_in(&proxy).await;
    world.imap.wait_for_stats(|s| s.active == 2, T).await;
    proxy.terminate();
    world.imap.wait_for_stats(|s| s.active == 1, T).await;
    assert_eq!(logouts(&world), 3);
    log_out(c).await;
    assert!(proxy.wait(T).await.success());
}

#[tokio::test(flavor = "multi_thread")]
async fn later_logins_skip_the_capability_round_trip_and_resume_tls() {
    let world = World::start().await;
    let proxy = proxy_with(&world, "warm_sessions = 0", "shutdown_grace = \"2s\"\n").await;
    for _ in 0..3 {
        log_out(logged_in(&proxy).await).await;
    }
    let stats = world.imap.stats();
    assert_eq!(stats.capabilities_before_login, 1, "{stats:?}");
    assert_eq!(stats.tls_resumed, 2, "{stats:?}");
    assert_eq!(warm(&proxy, "miss").await, 0, "warm sessions are off");

    proxy.reload();
    proxy.wait_for_log("config reloaded", T).await;
    log_out(logged_in(&proxy).await).await;
    assert_eq!(
        world.imap.stats().tls_resumed,
        3,
        "the session cache outlives a reload"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn imapflow_sees_the_same_session_warm_as_cold() {
    let world = World::start().await;
    let proxy = world.proxy(&[AccountSpec::device(USER, PASS)]).await;
    world
        .imap
        .add_message(USER, b"Subject: hello\r\n\r\nfirst message\r\n".to_vec());
    let args = json!({
        "host": "127.0.0.1", "port": proxy.imap_addr.port(), "secure": false,
        "user": USER, "pass": PASS,
        "steps": ["list", "select", "fetch", "idle"],
    });
    let run = || run_imapflow(&args, 60);
    let cold = run().await;
    assert_eq!(cold["ok"], true, "{cold}\n{}", proxy.logs());
    world
        .imap
        .wait_for_stats(|s| s.active == 1 && s.auth_ok == 2, T)
        .await;
    let warm_run = run().await;
    assert_eq!(warm_run["ok"], true, "{warm_run}\n{}", proxy.logs());
    assert_eq!(warm(&proxy, "hit").await, 1, "{}", proxy.logs());
    assert_eq!(cold["capabilities"], warm_run["capabilities"]);
}
