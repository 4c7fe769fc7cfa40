//! More than one proxy on one PostgreSQL database (`[store] kind =
//! "postgres"`): real `xoauth2-proxy serve` processes, a real PostgreSQL
//! server (Debian's, started in a temporary directory), the test identity
//! provider counting every token request.

use std::time::Duration;

use testkit::idp::{DeviceOutcome, Rotation};
use testkit::partition::Partition;
use testkit::postgres::{PASSWORD, SECOND_ADDRESS, TestPostgres};
use testkit::proxy::{AccountSpec, TestProxy};
use testkit::world::{LineClient, World};

const USER: &str = "sales@contoso.com";
const OTHER: &str = "support@contoso.com";

/// A proxy of `world` for `accounts` whose grants are in `pg`.
async fn replica(world: &World, pg: &TestPostgres, accounts: &[AccountSpec]) -> TestProxy {
    patient_replica(world, pg, accounts, "3s").await
}

/// [`replica`], waiting up to `idp_timeout` for the identity provider.
async fn patient_replica(
    world: &World,
    pg: &TestPostgres,
    accounts: &[AccountSpec],
    idp_timeout: &str,
) -> TestProxy {
    let url = pg.url();
    TestProxy::start_with(&world.endpoints, accounts, "debug", |text| {
        let text = text.replace(
            "idp_timeout = \"3s\"",
            &format!("idp_timeout = \"{idp_timeout}\""),
        );
        format!("{text}\n[store]\nkind = \"postgres\"\nurl = \"{url}\"\n")
    })
    .await
}

/// A patient replica that reaches the database through the address a test
/// cuts ([`SECOND_ADDRESS`]), without warm sessions (each login uses a token).
async fn replica_to_cut_off(world: &World, pg: &TestPostgres) -> TestProxy {
    let url = pg.url_at(SECOND_ADDRESS);
    TestProxy::start_with(&world.endpoints, &accounts(), "debug", |text| {
        let text = text
            .replace("idp_timeout = \"3s\"", "idp_timeout = \"60s\"")
            .replace("[imap]\n", "[imap]\nwarm_sessions = 0\n");
        format!("{text}\n[store]\nkind = \"postgres\"\nurl = \"{url}\"\n")
    })
    .await
}

fn accounts() -> Vec<AccountSpec> {
    vec![
        AccountSpec::device(USER, "pw"),
        AccountSpec::device(OTHER, "pw2"),
    ]
}

/// Puts a grant holding only a refresh token (its access token long gone)
/// for each of `users` into the database, through `store migrate` from a
/// state directory written as `login` would.
async fn grants_without_access_tokens(world: &World, proxy: &TestProxy, users: &[&str]) {
    for user in users {
        world.grant_in(&proxy.state_dir, &AccountSpec::device(user, "pw"));
    }
    let out = proxy.cli(&["store", "migrate", "--to", "postgres"]).await;
    assert!(out.status.success(), "{out:?}");
}

async fn login(proxy: &TestProxy, user: &str, password: &str) -> String {
    LineClient::imap_login(proxy.imap_addr, user, password).await
}

/// The refresh token the database holds for `user` (grants are not sealed
/// here, so the document is the grant's JSON).
async fn stored_refresh_token(pg: &TestPostgres, user: &str) -> String {
    let json = pg
        .psql(&format!(
            "SELECT convert_from(document, 'UTF8') FROM xoauth2_proxy.grants WHERE account = '{user}'"
        ))
        .await;
    let grant: serde_json::Value = serde_json::from_str(&json).unwrap();
    grant["refresh_token"].as_str().unwrap().to_string()
}

/// The reply to an SMTP AUTH PLAIN as `user` (the last line of the reply).
async fn smtp_auth(proxy: &TestProxy, user: &str, password: &str) -> String {
    use base64::Engine;
    let mut c = LineClient::connect(proxy.smtp_addr).await;
    let mut last = String::new();
    let blob = base64::engine::general_purpose::STANDARD.encode(format!("\0{user}\0{password}"));
    for command in [
        None,
        Some("EHLO client.example".to_string()),
        Some(format!("AUTH PLAIN {blob}")),
    ] {
        if let Some(command) = command {
            c.line(&command).await;
        }
        // One reply: lines until one whose fourth byte is not '-'.
        loop {
            last = c.read().await.unwrap_or_default();
            if last.as_bytes().get(3) != Some(&b'-') {
                break;
            }
        }
    }
    last
}

async fn admin(proxy: &TestProxy, path: &str) -> (u16, String) {
    let answer = reqwest::get(format!("http://{}{path}", proxy.admin_addr))
        .await
        .unwrap();
    let status = answer.status().as_u16();
    (status, answer.text().await.unwrap())
}

#[tokio::test(flavor = "multi_thread")]
async fn an_account_authorised_through_one_replica_serves_logins_on_all() {
    let (world, pg) = (World::start().await, TestPostgres::start().await);
    world.idp.set_device_user(USER);
    world
        .idp
        .set_device_outcome(DeviceOutcome::ApproveAfterPolls(1));
    let replicas = [
        replica(&world, &pg, &accounts()).await,
        replica(&world, &pg, &accounts()).await,
        replica(&world, &pg, &accounts()).await,
    ];
    let out = replicas[0].cli(&["login", USER]).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{out:?}");
    assert!(
        stdout.contains("stored in the grant of sales@contoso.com in PostgreSQL 127.0.0.1:"),
        "{stdout}"
    );

    for proxy in &replicas {
        let answer = login(proxy, USER, "pw").await;
        assert!(answer.starts_with("a OK"), "{answer}");
    }
    let counts = world.idp.counts();
    assert_eq!(counts.device_code_requests, 1, "one login for all");
    assert_eq!(
        counts.refresh_grants, 0,
        "the access token of `login` served every replica"
    );

    let status = replicas[2].cli(&["status"]).await;
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(text.contains(&format!("{USER} (")), "{text}");
    assert!(
        text.contains("Grants are stored in PostgreSQL 127.0.0.1:"),
        "{text}"
    );
    assert!(text.contains("schema xoauth2_proxy"), "{text}");
    let json = replicas[2].cli(&["status", "--json"]).await;
    let rows: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(rows[0]["grant_store"], "postgres");
    assert_eq!(rows[0]["grant_store_up"], true);

    // The database's password is in the URL: never in a log.
    for proxy in &replicas {
        assert!(!proxy.logs().contains(PASSWORD), "{}", proxy.logs());
    }
    assert!(!String::from_utf8_lossy(&out.stderr).contains(PASSWORD));
}

#[tokio::test(flavor = "multi_thread")]
async fn thirty_logins_over_three_replicas_refresh_an_expired_grant_once() {
    let (world, pg) = (World::start().await, TestPostgres::start().await);
    let replicas = [
        replica(&world, &pg, &accounts()).await,
        replica(&world, &pg, &accounts()).await,
        replica(&world, &pg, &accounts()).await,
    ];
    grants_without_access_tokens(&world, &replicas[0], &[USER]).await;
    let before = stored_refresh_token(&pg, USER).await;
    // A slow answer, so that every replica wants the refresh at once.
    world.idp.set_answer_delay(Duration::from_millis(1500));

    let mut logins = tokio::task::JoinSet::new();
    for i in 0..30 {
        let addr = replicas[i % 3].imap_addr;
        logins.spawn(async move { LineClient::imap_login(addr, USER, "pw").await });
    }
    while let Some(answer) = logins.join_next().await {
        let answer = answer.unwrap();
        assert!(answer.starts_with("a OK"), "{answer}");
    }
    let counts = world.idp.counts();
    assert_eq!(counts.refresh_grants, 1, "one refresh for every replica");
    assert_eq!(counts.superseded_refresh_tokens_presented, 0);
    let after = stored_refresh_token(&pg, USER).await;
    assert_ne!(before, after, "the rotated refresh token is stored");
    assert_eq!(world.idp.valid_refresh_tokens(USER), vec![after]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_replica_killed_while_it_refreshes_loses_no_grant_and_spends_no_token_twice() {
    let (world, pg) = (World::start().await, TestPostgres::start().await);
    world.idp.set_rotation(Rotation::SpentWhenSuccessorUsed);
    let mut doomed = patient_replica(&world, &pg, &accounts(), "60s").await;
    let others = [
        patient_replica(&world, &pg, &accounts(), "60s").await,
        patient_replica(&world, &pg, &accounts(), "60s").await,
    ];
    grants_without_access_tokens(&world, &doomed, &[USER]).await;

    // The doomed replica holds the lock while the identity provider, having
    // redeemed its refresh token, takes its time to answer.
    world.idp.set_answer_delay(Duration::from_secs(50));
    let addr = doomed.imap_addr;
    let stranded = tokio::spawn(async move { LineClient::imap_login(addr, USER, "pw").await });
    let redeemed = || {
        world
            .idp
            .requests()
            .iter()
            .any(|r| r.grant_type.as_deref() == Some("refresh_token") && r.status == 200)
    };
    until(redeemed).await;
    world.idp.set_answer_delay(Duration::ZERO);
    // The others wait for its lock.
    let waiting: Vec<_> = others
        .iter()
        .map(|p| {
            let addr = p.imap_addr;
            tokio::spawn(async move { LineClient::imap_login(addr, USER, "pw").await })
        })
        .collect();
    let blocked = "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted";
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while pg.psql(blocked).await != "2" {
        assert!(
            std::time::Instant::now() < deadline,
            "the others never waited for the lock"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    doomed.kill().await;
    let _ = stranded.await;

    for login in waiting {
        let answer = login.await.unwrap();
        assert!(answer.starts_with("a OK"), "{answer}");
    }
    let counts = world.idp.counts();
    assert_eq!(counts.superseded_refresh_tokens_presented, 0);
    assert_eq!(
        counts.refresh_grants, 2,
        "the killed replica's refresh, then one for the others"
    );
    let stored = stored_refresh_token(&pg, USER).await;
    assert!(
        world.idp.valid_refresh_tokens(USER).contains(&stored),
        "the stored grant still works"
    );
}

/// How long the database may take to notice a replica that went silent
/// while it holds a lock, and end its session: the keepalive settings of the
/// lock's connection (10 s idle, then 3 probes 5 s apart: 25 s), with room
/// for a loaded machine. Past it, the waiting logins would fail (60 s).
const PARTITION_NOTICED_WITHIN: Duration = Duration::from_secs(40);

#[tokio::test(flavor = "multi_thread")]
async fn a_replica_cut_off_while_it_refreshes_loses_its_lock_and_never_brings_back_an_older_grant()
{
    let (world, pg) = (World::start().await, TestPostgres::start().await);
    world.idp.set_rotation(Rotation::SpentWhenSuccessorUsed);
    // A reaches the database through the address the test cuts; B through
    // the one that stays.
    let a = replica_to_cut_off(&world, &pg).await;
    let b = patient_replica(&world, &pg, &accounts(), "60s").await;
    grants_without_access_tokens(&world, &b, &[USER]).await;
    let first = stored_refresh_token(&pg, USER).await;

    // A takes the lock and redeems the refresh token; the identity provider
    // holds its answer, so A holds the lock mid-refresh.
    let held = world.idp.hold_next_answer();
    let stranded = tokio::spawn(patient_login(a.imap_addr, USER, "pw"));
    until(|| refreshes_redeemed(&world) == 1).await;
    let holder = pg
        .psql("SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted")
        .await;
    assert!(
        !holder.is_empty() && !holder.contains('\n'),
        "A alone holds a lock: {holder:?}"
    );

    // The network between A and the database breaks: nothing is closed.
    let cut = Partition::cut(SECOND_ADDRESS, pg.port);
    let cut_at = std::time::Instant::now();
    // B's access token will be due for renewal after 6 s (in its last
    // third), so that A has to refresh the grant B stores, later.
    world.idp.set_access_token_lifetime(Duration::from_secs(9));
    let waiting: Vec<_> = (0..3)
        .map(|_| tokio::spawn(patient_login(b.imap_addr, USER, "pw")))
        .collect();
    for login in waiting {
        let answer = login.await.unwrap();
        assert!(answer.starts_with("a OK"), "{answer}");
    }
    let b_refreshed = std::time::Instant::now();
    world
        .idp
        .set_access_token_lifetime(Duration::from_secs(3600));
    let waited = cut_at.elapsed();
    assert!(
        waited < PARTITION_NOTICED_WITHIN,
        "B waited {waited:?} for the lock of a replica cut off"
    );
    assert!(cut.dropped() > 0, "A's packets were dropped");
    let sessions = pg
        .psql(&format!(
            "SELECT (SELECT count(*) FROM pg_locks WHERE pid = {holder})
                  + (SELECT count(*) FROM pg_stat_activity WHERE pid = {holder})"
        ))
        .await;
    assert_eq!(sessions, "0", "A's session and its lock are gone");
    let counts = world.idp.counts();
    assert_eq!(counts.refresh_grants, 2, "A's refresh, then B's once");
    assert_eq!(counts.superseded_refresh_tokens_presented, 0);
    let newer = stored_refresh_token(&pg, USER).await;
    assert_ne!(newer, first, "B stored its rotated refresh token");

    // The network comes back, then A hears from the identity provider at
    // last: its grant is older than the one B stored, and must not return.
    drop(cut);
    held.release();
    let answer = stranded.await.unwrap();
    assert!(answer.starts_with("a OK"), "{answer}");
    assert_eq!(
        stored_refresh_token(&pg, USER).await,
        newer,
        "A wrote its older grant over B's"
    );
    // Its retry finds B's grant stored and drops its own.
    a.wait_for_log(
        "replaced by another process (another replica",
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(stored_refresh_token(&pg, USER).await, newer);
    assert!(world.idp.valid_refresh_tokens(USER).contains(&newer));

    // A recovers without a restart: when its access token is refused, it
    // takes the stored grant (B's token, due by now) and refreshes it, never
    // its own superseded one.
    world.tokens.revoke_mailbox(USER);
    until_elapsed(b_refreshed, Duration::from_secs(7)).await;
    let answer = patient_login(a.imap_addr, USER, "pw").await;
    assert!(answer.starts_with("a OK"), "{answer}");
    let counts = world.idp.counts();
    assert_eq!(counts.superseded_refresh_tokens_presented, 0);
    assert_eq!(counts.refresh_grants, 3);
    let latest = stored_refresh_token(&pg, USER).await;
    assert_ne!(latest, newer, "A stored the grant it refreshed");
    assert!(world.idp.valid_refresh_tokens(USER).contains(&latest));
    let answer = patient_login(b.imap_addr, USER, "pw").await;
    assert!(answer.starts_with("a OK"), "B uses what A stored: {answer}");
    assert_eq!(world.idp.counts().refresh_grants, 3);
}

/// Waits until `since` is `age` old: a token lifetime running out has no
/// event to await.
async fn until_elapsed(since: std::time::Instant, age: Duration) {
    tokio::time::sleep(age.saturating_sub(since.elapsed())).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_replica_cut_off_before_it_stored_a_refresh_stores_it_once_the_network_returns() {
    // The strictest rotation: the refresh token in the database is spent
    // once A redeems it, so A's new one is the only copy that works.
    let (world, pg) = (World::start().await, TestPostgres::start().await);
    let a = replica_to_cut_off(&world, &pg).await;
    let b = patient_replica(&world, &pg, &accounts(), "60s").await;
    grants_without_access_tokens(&world, &b, &[USER]).await;

    // A redeems the grant under the lock; the network breaks before the
    // identity provider's answer reaches it, so A cannot store the result.
    let held = world.idp.hold_next_answer();
    let stranded = tokio::spawn(patient_login(a.imap_addr, USER, "pw"));
    until(|| refreshes_redeemed(&world) == 1).await;
    let cut = Partition::cut(SECOND_ADDRESS, pg.port);
    held.release();
    let answer = stranded.await.unwrap();
    assert!(answer.starts_with("a OK"), "the new token serves: {answer}");
    drop(cut);

    // Nobody stored anything since: A stores what it holds, under the lock.
    a.wait_for_log(
        "grant of sales@contoso.com saved after",
        Duration::from_secs(60),
    )
    .await;
    let stored = stored_refresh_token(&pg, USER).await;
    assert_eq!(world.idp.valid_refresh_tokens(USER), vec![stored]);
    let answer = patient_login(b.imap_addr, USER, "pw").await;
    assert!(answer.starts_with("a OK"), "B uses what A stored: {answer}");
    let counts = world.idp.counts();
    assert_eq!(counts.refresh_grants, 1);
    assert_eq!(counts.superseded_refresh_tokens_presented, 0);
}

#[test]
fn a_partition_drops_only_its_own_address_and_port_and_heals_when_dropped() {
    use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
    let connects =
        |addr: SocketAddr| TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_ok();
    let server = TcpListener::bind((SECOND_ADDRESS, 0)).unwrap();
    let beside = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let (addr, other) = (server.local_addr().unwrap(), beside.local_addr().unwrap());
    assert!(connects(addr));
    let cut = Partition::cut(SECOND_ADDRESS, addr.port());
    assert!(!connects(addr), "the cut address is unreachable");
    assert!(cut.dropped() > 0, "its packets were dropped");
    assert!(connects(other), "other traffic flows");
    drop(cut);
    assert!(connects(addr), "healed");
    let rules = std::process::Command::new("tc")
        .args(["filter", "show", "dev", "lo", "ingress"])
        .output()
        .unwrap();
    let rules = String::from_utf8_lossy(&rules.stdout);
    assert!(
        !rules.contains(&format!("pref {} ", addr.port())),
        "a rule left behind: {rules}"
    );
}

/// Refresh requests the identity provider has processed (answered or held).
fn refreshes_redeemed(world: &World) -> usize {
    world
        .idp
        .requests()
        .iter()
        .filter(|r| r.grant_type.as_deref() == Some("refresh_token") && r.status == 200)
        .count()
}

/// An IMAP login that waits as long as the proxy takes (a refresh may wait
/// for another replica's lock), up to 90 s.
async fn patient_login(
    addr: std::net::SocketAddr,
    user: &'static str,
    pass: &'static str,
) -> String {
    use tokio::io::AsyncBufReadExt;
    let mut c = LineClient::connect(addr).await;
    c.read().await;
    c.line(&format!("a LOGIN {user} {pass}")).await;
    loop {
        let mut line = String::new();
        let read = tokio::time::timeout(Duration::from_secs(90), c.stream.read_line(&mut line));
        read.await.expect("an answer within 90 s").unwrap();
        if line.is_empty() || line.starts_with("a ") {
            return line.trim_end().to_string();
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn with_the_database_down_cached_logins_go_on_refreshes_wait_and_all_recovers() {
    let (world, mut pg) = (World::start().await, TestPostgres::start().await);
    let replicas = [
        replica(&world, &pg, &accounts()).await,
        replica(&world, &pg, &accounts()).await,
    ];
    grants_without_access_tokens(&world, &replicas[0], &[USER, OTHER]).await;
    // USER's token is cached on both replicas; OTHER's refresh is left for
    // the outage.
    for proxy in &replicas {
        assert!(login(proxy, USER, "pw").await.starts_with("a OK"));
    }
    let refreshes = world.idp.counts().refresh_grants;

    // Load: logins on both replicas all along the outage.
    let stop = stop_flag();
    let load: Vec<_> = replicas
        .iter()
        .map(|p| {
            let (addr, stop) = (p.imap_addr, stop.clone());
            tokio::spawn(async move {
                let mut answers = Vec::new();
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    answers.push(LineClient::imap_login(addr, USER, "pw").await);
                }
                answers
            })
        })
        .collect();

    pg.stop().await;
    for proxy in &replicas {
        let answer = login(proxy, OTHER, "pw2").await;
        assert!(answer.starts_with("a NO [UNAVAILABLE]"), "{answer}");
        let answer = smtp_auth(proxy, OTHER, "pw2").await;
        assert!(answer.starts_with("421 "), "{answer}");
        let answer = smtp_auth(proxy, USER, "pw").await;
        assert!(
            answer.starts_with("235 "),
            "cached, over SMTP too: {answer}"
        );
        let (health, _) = admin(proxy, "/healthz").await;
        assert_eq!(health, 200, "mail still flows");
        let store_up = proxy.metric("xoauth2_proxy_grant_store_up", &[]).await;
        assert_eq!(store_up, Some(0.0), "the store is counted as down");
    }
    let status = replicas[0].cli(&["status"]).await;
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(text.contains("cannot be reached now"), "{text}");
    assert!(!text.contains(PASSWORD), "{text}");

    pg.start_again().await;
    for proxy in &replicas {
        let answer = login(proxy, OTHER, "pw2").await;
        assert!(answer.starts_with("a OK"), "{answer}");
        let store_up = proxy.metric("xoauth2_proxy_grant_store_up", &[]).await;
        assert_eq!(store_up, Some(1.0), "the store is counted as up again");
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for answers in load {
        let answers = answers.await.unwrap();
        assert!(!answers.is_empty());
        for answer in answers {
            assert!(
                answer.starts_with("a OK"),
                "a cached login failed: {answer}"
            );
        }
    }
    let counts = world.idp.counts();
    assert_eq!(
        counts.refresh_grants,
        refreshes + 1,
        "OTHER refreshed once, after"
    );
    assert_eq!(counts.superseded_refresh_tokens_presented, 0);
    for proxy in &replicas {
        assert!(!proxy.logs().contains(PASSWORD));
    }
}

fn stop_flag() -> std::sync::Arc<std::sync::atomic::AtomicBool> {
    std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false))
}

/// Waits until `done` says so (the parties here have no event to await).
async fn until(done: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !done() {
        assert!(std::time::Instant::now() < deadline, "timed out");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn store_migrate_both_ways_keeps_every_grant_sealed_too() {
    let (world, pg) = (World::start().await, TestPostgres::start().await);
    let keys = tempfile::tempdir().unwrap();
    let key = keys.path().join("token.key");
    let url = pg.url();
    let sealed = |kind: &'static str| {
        let (url, key) = (url.clone(), key.clone());
        move |text: String| {
            format!(
                "{}\n[store]\nkind = \"{kind}\"\nurl = \"{url}\"\n",
                text.replacen(
                    "[server]\n",
                    &format!("[server]\ntoken_key_file = \"{}\"\n", key.display()),
                    1
                )
            )
        }
    };
    // A proxy on files, its grants sealed by a first refresh.
    let out = std::process::Command::new(testkit::proxy::binary())
        .arg("keygen")
        .arg(&key)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let files = TestProxy::start_with(&world.endpoints, &accounts(), "debug", sealed("file")).await;
    for user in [USER, OTHER] {
        world.grant_in(&files.state_dir, &AccountSpec::device(user, "pw"));
    }
    assert!(login(&files, USER, "pw").await.starts_with("a OK"));
    assert!(login(&files, OTHER, "pw2").await.starts_with("a OK"));

    let out = files.cli(&["store", "migrate", "--to", "postgres"]).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{out:?}");
    assert!(stdout.contains("2 grant(s) copied"), "{stdout}");
    assert!(
        stdout.contains("set `kind = \"postgres\"` in [store]"),
        "{stdout}"
    );
    let again = files.cli(&["store", "migrate", "--to", "postgres"]).await;
    let stdout = String::from_utf8_lossy(&again.stdout);
    assert!(
        stdout.contains("0 grant(s) copied") && stdout.contains("2 already there"),
        "{stdout}"
    );
    let rows = pg
        .psql("SELECT convert_from(document, 'UTF8') FROM xoauth2_proxy.grants")
        .await;
    assert!(
        rows.contains("\"sealed\":1") || rows.contains("\"sealed\": 1"),
        "{rows}"
    );
    for secret in world.secrets() {
        assert!(!rows.contains(&secret), "a token in clear in the database");
    }

    // A replica on the database serves both accounts from the copies.
    let db =
        TestProxy::start_with(&world.endpoints, &accounts(), "debug", sealed("postgres")).await;
    assert!(login(&db, USER, "pw").await.starts_with("a OK"));
    assert!(login(&db, OTHER, "pw2").await.starts_with("a OK"));

    // And back, into an emptied state directory.
    std::fs::remove_dir_all(files.state_dir.join("tokens")).unwrap();
    let out = files.cli(&["store", "migrate", "--to", "file"]).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{out:?}");
    assert!(stdout.contains("2 grant(s) copied"), "{stdout}");
    let json = files.cli(&["status", "--json"]).await;
    let rows: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    for row in rows.as_array().unwrap() {
        assert_eq!(row["grant_store"], "file", "{row}");
        assert_eq!(row["state"], "authorised", "{row}");
        assert_eq!(row["grant_sealed"], true, "{row}");
    }
    let restored = files.state_dir.join("tokens");
    let names: Vec<_> = std::fs::read_dir(&restored)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".json"))
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");
    let refreshes = world.idp.counts().refresh_grants;
    assert_eq!(refreshes, 2, "one refresh per account, before the copies");

    // A new token key for the rows in the database: `store rekey`, then a
    // reload puts the key in force for the replica.
    let new_key = keys.path().join("new.key");
    let out = std::process::Command::new(testkit::proxy::binary())
        .arg("keygen")
        .arg(&new_key)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let before = pg
        .psql("SELECT convert_from(document, 'UTF8') FROM xoauth2_proxy.grants")
        .await;
    let config = std::fs::read_to_string(&db.config_path).unwrap();
    let config = config.replace(&key.display().to_string(), &new_key.display().to_string());
    std::fs::write(&db.config_path, config).unwrap();
    let out = db
        .cli(&["store", "rekey", "--old-key", key.to_str().unwrap()])
        .await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{out:?}");
    assert!(stdout.contains("2 grant(s) sealed again"), "{stdout}");
    let after = pg
        .psql("SELECT convert_from(document, 'UTF8') FROM xoauth2_proxy.grants")
        .await;
    assert_ne!(before, after, "the rows are sealed anew");
    db.reload();
    db.wait_for_log("config reloaded", Duration::from_secs(10))
        .await;
    assert!(login(&db, USER, "pw").await.starts_with("a OK"));
    assert!(login(&db, OTHER, "pw2").await.starts_with("a OK"));
    let json = db.cli(&["status", "--json"]).await;
    let rows: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    for row in rows.as_array().unwrap() {
        assert_eq!(row["state"], "authorised", "{row}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn tls_to_the_database_verifies_its_certificate() {
    let (world, mut pg) = (World::start().await, TestPostgres::start().await);
    let chain = format!("{}{}", world.pki.cert_pem, world.pki.ca_pem);
    pg.use_tls(&chain, &world.pki.key_pem).await;
    let plain = pg.url();
    let url = |query: &str| plain.replace("sslmode=disable", query);
    let trusting = url(&format!(
        "sslmode=verify-full&sslrootcert={}",
        world.pki.ca_pem_path.display()
    ));
    let proxy = TestProxy::start_with(&world.endpoints, &accounts(), "debug", |text| {
        format!("{text}\n[store]\nkind = \"postgres\"\nurl = \"{trusting}\"\n")
    })
    .await;
    grants_without_access_tokens(&world, &proxy, &[USER]).await;
    assert!(login(&proxy, USER, "pw").await.starts_with("a OK"));
    let over_tls = pg
        .psql(
            "SELECT count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid)
             WHERE a.application_name = 'xoauth2-proxy' AND s.ssl",
        )
        .await;
    assert_ne!(over_tls, "0", "the proxy's connections use TLS");

    // The test CA is not among the system's: without sslrootcert the
    // server's certificate is refused, whatever sslmode says.
    let untrusting = url("sslmode=require");
    let stranger = TestProxy::start_with(&world.endpoints, &accounts(), "debug", |text| {
        format!("{text}\n[store]\nkind = \"postgres\"\nurl = \"{untrusting}\"\n")
    })
    .await;
    let out = stranger.cli(&["store", "migrate", "--to", "file"]).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("certificate"), "{stderr}");
    assert!(!stderr.contains(PASSWORD), "{stderr}");
    let answer = login(&stranger, USER, "pw").await;
    assert!(answer.starts_with("a NO [UNAVAILABLE]"), "{answer}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_documented_sql_gives_the_proxy_a_role_and_schema_of_its_own() {
    let (world, pg) = (World::start().await, TestPostgres::start().await);
    let snippet = include_str!("../packaging/shared-store.sql");
    pg.psql(&snippet.replace("CHANGE-ME", "role-Secret-9x"))
        .await;
    // NocoBase's own table, which the proxy's role must not reach.
    pg.psql("CREATE TABLE public.users (id int)").await;
    let own_role = pg.url().replace(
        &format!("postgres:{PASSWORD}@"),
        "xoauth2_proxy:role-Secret-9x@",
    );
    let proxy = TestProxy::start_with(&world.endpoints, &accounts(), "debug", |text| {
        format!("{text}\n[store]\nkind = \"postgres\"\nurl = \"{own_role}\"\n")
    })
    .await;
    grants_without_access_tokens(&world, &proxy, &[USER]).await;
    assert!(login(&proxy, USER, "pw").await.starts_with("a OK"));
    let tables = pg
        .psql("SELECT tablename FROM pg_tables WHERE tableowner = 'xoauth2_proxy' ORDER BY 1")
        .await;
    assert_eq!(tables, "grants\nschema_migrations");
    let reach = pg
        .psql("SELECT has_table_privilege('xoauth2_proxy', 'public.users', 'SELECT')")
        .await;
    assert_eq!(reach, "f");
    assert!(!proxy.logs().contains("role-Secret-9x"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reload_while_the_database_is_down_keeps_the_cached_tokens_serving() {
    let (world, mut pg) = (World::start().await, TestPostgres::start().await);
    // Without warm sessions: every login asks the token manager.
    let url = pg.url();
    let proxy = TestProxy::start_with(&world.endpoints, &accounts(), "debug", |text| {
        let text = text.replace("[imap]\n", "[imap]\nwarm_sessions = 0\n");
        format!("{text}\n[store]\nkind = \"postgres\"\nurl = \"{url}\"\n")
    })
    .await;
    grants_without_access_tokens(&world, &proxy, &[USER, OTHER]).await;
    assert!(login(&proxy, USER, "pw").await.starts_with("a OK"));

    pg.stop().await;
    // SIGHUP (or the reload after a certificate renewal) during the outage.
    proxy.reload();
    proxy
        .wait_for_log("config reloaded", Duration::from_secs(10))
        .await;
    let answer = login(&proxy, USER, "pw").await;
    assert!(
        answer.starts_with("a OK"),
        "cached before the reload: {answer}"
    );
    let answer = login(&proxy, OTHER, "pw2").await;
    assert!(
        answer.starts_with("a NO [UNAVAILABLE]"),
        "nothing cached, no refresh without the database: {answer}"
    );
    assert_eq!(world.idp.counts().refresh_grants, 1, "USER's first, only");
}

/// A "database" whose port accepts connections and then says nothing (a
/// server behind a network that drops its answers, a paused machine),
/// counting the most connections it held open at once.
async fn stalled_database() -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::AsyncReadExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (open, most) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let seen = most.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let now = open.fetch_add(1, Ordering::SeqCst) + 1;
            most.fetch_max(now, Ordering::SeqCst);
            let open = open.clone();
            tokio::spawn(async move {
                // Never answers; notices when the client gives up.
                let mut sink = [0u8; 1024];
                while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
                open.fetch_sub(1, Ordering::SeqCst);
            });
        }
    });
    let url = format!("postgres://u:pw@127.0.0.1:{port}/app?sslmode=disable");
    (url, seen)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_start_with_the_database_silent_reads_the_grants_side_by_side() {
    let world = World::start().await;
    let (url, most_at_once) = stalled_database().await;
    let accounts: Vec<_> = ["a", "b", "c", "d"]
        .map(|name| AccountSpec::device(&format!("{name}@contoso.com"), "pw"))
        .into();
    let dir = tempfile::tempdir().unwrap();
    let text = testkit::proxy::config_text(
        &world.endpoints,
        &accounts,
        testkit::proxy::free_port(),
        testkit::proxy::free_port(),
        &dir.path().join("state"),
    );
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        format!("{text}\n[store]\nkind = \"postgres\"\nurl = \"{url}\"\n"),
    )
    .unwrap();
    let mut proxy = tokio::process::Command::new(testkit::proxy::binary())
        .arg("serve")
        .env("XOAUTH2_PROXY_CONFIG", &config)
        .env_remove("XOAUTH2_PROXY_STATE_DIR")
        .env_remove("XOAUTH2_PROXY_TOKEN_KEY_FILE")
        .env("RUST_LOG", "info")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let log = testkit::proxy::collect(proxy.stderr.take().unwrap());
    let ready = || String::from_utf8_lossy(&log.lock().unwrap()).contains("xoauth2-proxy is ready");
    // Far beyond the start's bound (a few of the store's 5 s limits): only
    // a start that waits for one account after another reaches it.
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while !ready() {
        assert!(std::time::Instant::now() < deadline, "never ready");
        assert!(proxy.try_wait().unwrap().is_none(), "the proxy stopped");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // One after another, the reads overlap only with the store's probe
    // (and a connection closing): 3 at most. Side by side, the pool's 4.
    let most = most_at_once.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        most >= 4,
        "the grants were read one after another ({most} at once)"
    );
}

/// The process id of the PostgreSQL server's postmaster, which starts
/// every new session.
async fn postmaster(pg: &TestPostgres) -> String {
    let data = pg.psql("SHOW data_directory").await;
    let pid_file = std::path::Path::new(&data).join("postmaster.pid");
    let pid_file = std::fs::read_to_string(pid_file).unwrap();
    pid_file.lines().next().unwrap().trim().to_string()
}

/// Stops (`STOP`) or resumes (`CONT`) the process `pid`. The postmaster
/// stopped accepts no new session (the kernel still completes the TCP
/// connect), while the sessions it started go on answering.
fn signal(pid: &str, signal: &str) {
    let status = std::process::Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid)
        .status()
        .unwrap();
    assert!(status.success());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_refresh_facing_a_stalled_database_answers_unavailable_instead_of_hanging() {
    let (world, pg) = (World::start().await, TestPostgres::start().await);
    let proxy = replica_to_cut_off(&world, &pg).await;
    grants_without_access_tokens(&world, &proxy, &[USER]).await;
    assert!(login(&proxy, USER, "pw").await.starts_with("a OK"));

    // The database's server stalls; the mailbox refuses the cached token,
    // so the next login needs a refresh, under a lock on a new connection.
    let postmaster = postmaster(&pg).await;
    signal(&postmaster, "STOP");
    world.tokens.revoke_mailbox(USER);
    let answer = tokio::time::timeout(
        Duration::from_secs(60),
        patient_login(proxy.imap_addr, USER, "pw"),
    )
    .await;
    signal(&postmaster, "CONT");
    let answer = answer.expect("an answer, not a hang");
    assert!(answer.starts_with("a NO [UNAVAILABLE]"), "{answer}");
    assert!(
        proxy.logs().contains("check that the database is up"),
        "{}",
        proxy.logs()
    );
    // The server answers again: the refresh goes ahead.
    let answer = patient_login(proxy.imap_addr, USER, "pw").await;
    assert!(answer.starts_with("a OK"), "{answer}");
}
