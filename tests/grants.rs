//! Grants over time and under stress, through the real binary: kept alive
//! when nobody uses them, kept in memory and written later when the disk is
//! full, and never lost to a SIGKILL in the middle of a refresh.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;
use testkit::idp::Rotation;
use testkit::proxy::{AccountSpec, TestProxy};
use testkit::world::{LineClient, World};

const USER: &str = "sales@contoso.com";

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn grant_file(state_dir: &Path, user: &str) -> PathBuf {
    state_dir.join("tokens").join(format!("{user}.json"))
}

/// The grant file, which must always be whole JSON.
fn stored(state_dir: &Path, user: &str) -> Value {
    let bytes = std::fs::read(grant_file(state_dir, user)).unwrap();
    // Its contents are secrets: the length says enough.
    serde_json::from_slice(&bytes).unwrap_or_else(|e| {
        panic!(
            "the grant file of {user} is damaged ({e}; {} bytes)",
            bytes.len()
        )
    })
}

fn stored_refresh_token(state_dir: &Path, user: &str) -> String {
    stored(state_dir, user)["refresh_token"]
        .as_str()
        .expect("a refresh token in the grant file")
        .to_string()
}

/// Writes `user`'s grant as `login` would, with the given times.
fn seed_grant(world: &World, state_dir: &Path, user: &str, times: &[(&str, u64)]) -> String {
    world.grant_in(state_dir, &AccountSpec::device(user, "pw"));
    let mut grant = stored(state_dir, user);
    for (key, value) in times {
        grant[key] = Value::from(*value);
    }
    std::fs::write(grant_file(state_dir, user), grant.to_string()).unwrap();
    stored_refresh_token(state_dir, user)
}

/// `text` with `key = value` in [server], replacing any value it had.
fn set_server_key(text: &str, key: &str, value: &str) -> String {
    let kept: Vec<&str> = text
        .lines()
        .filter(|l| !l.starts_with(&format!("{key} = ")))
        .collect();
    kept.join("\n")
        .replacen("[server]\n", &format!("[server]\n{key} = {value}\n"), 1)
}

async fn status(proxy: &TestProxy) -> String {
    let out = proxy.cli(&["status"]).await;
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Polls `done` until it holds: for states the proxy reaches in the
/// background with no log line of their own to wait for.
async fn until(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "never happened: {what}");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Logs in and has a NOOP answered: a login served by a warm session is
/// answered at once, and its upstream session (proven, or opened anew with
/// a refreshed token) is settled before the first command is relayed.
async fn imap_login_ok(proxy: &TestProxy, user: &str) {
    let mut c = LineClient::connect(proxy.imap_addr).await;
    c.read().await;
    c.line(&format!("a LOGIN {user} pw")).await;
    let reply = c.until("a ").await.pop().unwrap();
    assert!(reply.starts_with("a OK"), "{reply}\n{}", proxy.logs());
    c.line("b NOOP").await;
    let reply = c.until("b ").await.pop().unwrap();
    assert!(reply.starts_with("b OK"), "{reply}\n{}", proxy.logs());
}

// --- keep-alive ---

/// Starts the proxy for `users` with `grant_keepalive`.
async fn keep_alive_proxy(world: &World, users: &[&str], keepalive: &str) -> TestProxy {
    let accounts: Vec<_> = users.iter().map(|u| AccountSpec::device(u, "pw")).collect();
    let keepalive = format!("\"{keepalive}\"");
    TestProxy::start_with(&world.endpoints, &accounts, "debug", |t| {
        set_server_key(&t, "grant_keepalive", &keepalive)
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn keep_alive_refreshes_an_idle_grant_and_leaves_a_recent_one_alone() {
    let world = World::start().await;
    let (idle, recent) = ("idle@contoso.com", "recent@contoso.com");
    // A look every 3 s; "idle" was authorised an hour ago and never refreshed,
    // "recent" was refreshed just now.
    let proxy = keep_alive_proxy(&world, &[idle, recent], "30s").await;
    let idle_rt = seed_grant(
        &world,
        &proxy.state_dir,
        idle,
        &[("authorized_at", now() - 3600)],
    );
    let recent_rt = seed_grant(
        &world,
        &proxy.state_dir,
        recent,
        &[("authorized_at", now() - 3600), ("obtained_at", now())],
    );

    proxy
        .wait_for_log(
            "grant keep-alive looked at every account",
            Duration::from_secs(15),
        )
        .await;
    assert!(
        proxy.logs().contains("refreshed a grant unused for 30s"),
        "{}",
        proxy.logs()
    );
    assert_eq!(world.idp.counts().refresh_grants, 1, "only the idle grant");
    let saved = stored_refresh_token(&proxy.state_dir, idle);
    // Compared, never printed: they are secrets.
    assert!(saved != idle_rt, "the rotated refresh token is saved");
    assert!(world.idp.valid_refresh_tokens(idle) == vec![saved]);
    assert!(stored(&proxy.state_dir, idle)["obtained_at"].as_u64() >= Some(now() - 60));
    assert!(stored_refresh_token(&proxy.state_dir, recent) == recent_rt);

    let keepalive = "xoauth2_proxy_grant_keepalive_refreshes_total";
    let ok = [("account", idle), ("outcome", "ok")];
    assert_eq!(proxy.metric(keepalive, &ok).await, Some(1.0));
    let untouched = proxy.metric(keepalive, &[("account", recent)]).await;
    assert_eq!(untouched, None, "a recently used grant is left alone");
}

#[tokio::test(flavor = "multi_thread")]
async fn keep_alive_marks_a_revoked_grant_as_needing_login_without_any_client() {
    let world = World::start().await;
    let proxy = keep_alive_proxy(&world, &[USER], "30s").await;
    seed_grant(
        &world,
        &proxy.state_dir,
        USER,
        &[("authorized_at", now() - 3600)],
    );
    world.idp.revoke_grants(USER);

    proxy
        .wait_for_log(
            &format!("run `xoauth2-proxy login {USER}`"),
            Duration::from_secs(15),
        )
        .await;
    // That look is over (and its outcome saved) when it says so.
    proxy
        .wait_for_log(
            "grant keep-alive looked at every account",
            Duration::from_secs(15),
        )
        .await;
    assert_eq!(stored(&proxy.state_dir, USER)["needs_login"], true);
    assert!(status(&proxy).await.contains("needs login"));
    let keepalive = "xoauth2_proxy_grant_keepalive_refreshes_total";
    let needs_login = [("account", USER), ("outcome", "needs_login")];
    assert_eq!(proxy.metric(keepalive, &needs_login).await, Some(1.0));
    let imap_ok = [("protocol", "imap"), ("outcome", "ok")];
    let logins = proxy.metric("xoauth2_proxy_logins_total", &imap_ok).await;
    assert_eq!(logins, Some(0.0), "no client logged in");
}

#[tokio::test(flavor = "multi_thread")]
async fn keep_alive_follows_the_interval_of_a_reloaded_config() {
    let world = World::start().await;
    let proxy = keep_alive_proxy(&world, &[USER], "0s").await;
    seed_grant(
        &world,
        &proxy.state_dir,
        USER,
        &[("authorized_at", now() - 3600)],
    );

    let text = std::fs::read_to_string(&proxy.config_path).unwrap();
    std::fs::write(
        &proxy.config_path,
        set_server_key(&text, "grant_keepalive", "\"30s\""),
    )
    .unwrap();
    proxy.reload();
    proxy
        .wait_for_log("refreshed a grant unused for 30s", Duration::from_secs(15))
        .await;
    assert_eq!(world.idp.counts().refresh_grants, 1);
}

// --- a full disk ---

/// A tmpfs mounted for one test, unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    /// Mounts a tmpfs of `size` at `dir`; `None`, said loudly, when not root.
    fn mount(dir: &Path, size: &str) -> Option<Tmpfs> {
        let uid = std::process::Command::new("id").arg("-u").output().unwrap();
        if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
            eprintln!(
                "\n*** SKIPPED: this test mounts a small tmpfs to fill the disk and needs root; run it as root (CI does) ***\n"
            );
            return None;
        }
        std::fs::create_dir_all(dir).unwrap();
        let out = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "mounting a tmpfs failed as root: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Some(Tmpfs(dir.to_path_buf()))
    }

    /// Writes `name` until the file system is full.
    fn fill(&self, name: &str) -> PathBuf {
        use std::io::Write;
        let path = self.0.join(name);
        let mut file = std::fs::File::create(&path).unwrap();
        let chunk = vec![0u8; 64 * 1024];
        loop {
            if let Err(e) = file.write_all(&chunk).and_then(|()| file.sync_all()) {
                assert_eq!(e.raw_os_error(), Some(28), "ENOSPC expected: {e}");
                return path;
            }
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_grant_that_cannot_be_saved_is_served_from_memory_and_saved_when_space_returns() {
    let world = World::start().await;
    // Like Exchange, sessions end with their token: a warm session
    // opened with a token the upstream forgot is not used.
    world.imap.set_expire_sessions(true);
    let base = tempfile::tempdir().unwrap();
    let state_dir = base.path().join("state");
    let Some(disk) = Tmpfs::mount(&state_dir, "1m") else {
        return;
    };
    let quoted = format!("\"{}\"", state_dir.display());
    let mut proxy = TestProxy::start_with(
        &world.endpoints,
        &[AccountSpec::device(USER, "pw")],
        "debug",
        |t| set_server_key(&t, "state_dir", &quoted),
    )
    .await;
    seed_grant(&world, &state_dir, USER, &[("authorized_at", now())]);

    // The first refresh is saved; then the disk fills up.
    imap_login_ok(&proxy, USER).await;
    let saved_rt = stored_refresh_token(&state_dir, USER);
    let filler = disk.fill("filler");

    // The upstream now refuses the cached token, so the next login refreshes:
    // the rotated grant cannot be written, and is used from memory.
    world.tokens.revoke_mailbox(USER);
    imap_login_ok(&proxy, USER).await;
    assert_eq!(world.idp.counts().refresh_grants, 2);
    assert!(
        stored_refresh_token(&state_dir, USER) == saved_rt,
        "the file keeps the last grant it could take, whole"
    );
    let logs = proxy.logs();
    let tokens_dir = state_dir.join("tokens");
    assert!(
        logs.contains(&format!(
            "grant of {USER} not saved: cannot write token file"
        )) && logs.contains(&format!(
            "kept in memory, retrying; free space in {}",
            tokens_dir.display()
        )),
        "{logs}"
    );
    let unsaved = || proxy.metric("xoauth2_proxy_grant_unsaved", &[("account", USER)]);
    assert_eq!(unsaved().await, Some(1.0));
    assert!(status(&proxy).await.contains("grant not saved"));

    // A later refresh presents the newer refresh token from memory, not the
    // spent one in the file (the mock refuses a refresh token used before).
    world.tokens.revoke_mailbox(USER);
    imap_login_ok(&proxy, USER).await;
    let refreshes = world.idp.counts().refresh_grants;
    assert_eq!(refreshes, 3);
    assert_eq!(world.idp.counts().failed, 0);
    assert_eq!(
        proxy
            .logs()
            .matches(&format!("grant of {USER} not saved: "))
            .count(),
        1,
        "said once when it starts"
    );

    // Space comes back: the grant is written without asking the IdP again.
    std::fs::remove_file(filler).unwrap();
    proxy
        .wait_for_log(
            &format!("grant of {USER} saved after"),
            Duration::from_secs(90),
        )
        .await;
    assert_eq!(world.idp.counts().refresh_grants, refreshes);
    let current = world.idp.valid_refresh_tokens(USER);
    assert!(
        vec![stored_refresh_token(&state_dir, USER)] == current,
        "the file holds the newest refresh token"
    );
    assert_eq!(unsaved().await, Some(0.0));
    assert!(!status(&proxy).await.contains("grant not saved"));

    // With no proxy running, `status` says it cannot tell.
    proxy.stop().await;
    assert!(
        status(&proxy)
            .await
            .contains("Whether every grant is saved is not known: no proxy answers at")
    );

    // After a restart the saved grant is the one in use.
    proxy.start_again().await;
    world.tokens.revoke_mailbox(USER);
    imap_login_ok(&proxy, USER).await;
    assert_eq!(world.idp.counts().refresh_grants, refreshes + 1);
    assert_eq!(world.idp.counts().failed, 0);
    drop(proxy);
    drop(disk);
}

// --- SIGKILL during refreshes ---

/// Starts a login and forgets it: the proxy may die under it.
fn start_login(addr: std::net::SocketAddr) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let Ok(mut stream) = tokio::net::TcpStream::connect(addr).await else {
            return;
        };
        let _ = stream
            .write_all(format!("a LOGIN {USER} pw\r\n").as_bytes())
            .await;
        let mut sink = Vec::new();
        let _ = stream.read_to_end(&mut sink).await;
    })
}

/// Where in a refresh a kill landed, as seen afterwards.
#[derive(Default, Debug)]
struct KillPoints {
    /// Before the IdP redeemed the refresh token.
    before_redeemed: u32,
    /// After the IdP redeemed it; the new grant never reached the file.
    redeemed_not_saved: u32,
    /// A temporary file was left beside the grant file.
    during_save: u32,
    /// The new grant was in the file.
    after_save: u32,
}

fn temporary_files(tokens_dir: &Path) -> usize {
    std::fs::read_dir(tokens_dir)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .ends_with(".tmp")
        })
        .count()
}

#[tokio::test(flavor = "multi_thread")]
async fn sigkill_during_refreshes_never_loses_the_grant_nor_goes_back_to_a_spent_token() {
    const KILLS: u32 = 200;
    let world = World::start().await;
    // Like Exchange, sessions end with their token: a warm session
    // opened with a token the upstream forgot is not used.
    world.imap.set_expire_sessions(true);
    world.idp.set_rotation(Rotation::SpentWhenSuccessorUsed);
    // A refresh takes 8 ms before the IdP redeems the token and 8 ms more
    // before the answer; the kill lands 0–24 ms after the request is seen.
    world.idp.set_response_delay(Duration::from_millis(8));
    world.idp.set_answer_delay(Duration::from_millis(8));
    let mut proxy = world.proxy(&[AccountSpec::device(USER, "pw")]).await;
    let tokens_dir = proxy.state_dir.join("tokens");
    let mut points = KillPoints::default();
    let started = Instant::now();

    for kill in 1..=KILLS {
        let before_rt = stored_refresh_token(&proxy.state_dir, USER);
        let (refreshes, temps) = (
            world.idp.counts().refresh_grants,
            temporary_files(&tokens_dir),
        );
        world.tokens.revoke_mailbox(USER);
        let login = start_login(proxy.imap_addr);
        until(
            "the proxy asks for a refresh",
            Duration::from_secs(20),
            || world.idp.counts().refresh_grants > refreshes,
        )
        .await;
        tokio::time::sleep(Duration::from_micros(rand::random_range(0..24_000))).await;
        proxy.kill().await;
        let redeemed = world.idp.requests().last().unwrap().status != 0;
        login.abort();
        until(
            "the IdP is done with the dead proxy's request",
            Duration::from_secs(10),
            || world.idp.requests_in_flight() == 0,
        )
        .await;

        let after_rt = stored_refresh_token(&proxy.state_dir, USER);
        let valid = world.idp.valid_refresh_tokens(USER);
        assert!(
            valid.contains(&after_rt),
            "kill {kill}: the stored refresh token is no longer accepted: the grant is lost"
        );
        match () {
            _ if temporary_files(&tokens_dir) > temps => points.during_save += 1,
            _ if after_rt != before_rt => points.after_save += 1,
            _ if redeemed => points.redeemed_not_saved += 1,
            _ => points.before_redeemed += 1,
        }
        proxy.start_again().await;
        assert_eq!(
            world.idp.counts().superseded_refresh_tokens_presented,
            0,
            "kill {kill}: a superseded refresh token was presented"
        );
        assert_eq!(
            temporary_files(&tokens_dir),
            0,
            "kill {kill}: the restarted proxy left a killed writer's temporary grant file"
        );
    }

    // The grant still works after all that.
    world.tokens.revoke_mailbox(USER);
    imap_login_ok(&proxy, USER).await;
    let counts = world.idp.counts();
    assert_eq!(counts.superseded_refresh_tokens_presented, 0);
    eprintln!(
        "{KILLS} kills in {:.0?}: {points:?}; {} refreshes",
        started.elapsed(),
        counts.refresh_grants,
    );
}

// --- `login` beside a running proxy ---

#[tokio::test(flavor = "multi_thread")]
async fn login_waits_for_a_refresh_in_flight_and_its_grant_is_the_one_kept() {
    use tokio::io::AsyncBufReadExt;
    let world = World::start().await;
    world.idp.set_device_user(USER);
    world.idp.set_device_interval(1);
    world
        .idp
        .set_device_outcome(testkit::idp::DeviceOutcome::ApproveAfterPolls(0));
    let account = AccountSpec::device(USER, "pw");
    let proxy = TestProxy::start_with(
        &world.endpoints,
        std::slice::from_ref(&account),
        "debug",
        |t| t.replace("[imap]\n", "[imap]\nwarm_sessions = 0\n"),
    )
    .await;
    // A grant without an access token: the first login refreshes it, and
    // the identity provider holds its answer, so the proxy holds the
    // account's lock mid-refresh.
    world.grant(&proxy, &account);
    let held = world.idp.hold_next_answer();
    let addr = proxy.imap_addr;
    let client = tokio::spawn(async move { LineClient::imap_login(addr, USER, "pw").await });
    until(
        "the proxy redeems the grant",
        Duration::from_secs(20),
        || world.idp.counts().refresh_grants == 1,
    )
    .await;
    let before_login = world.idp.valid_refresh_tokens(USER);

    // `login` signs in meanwhile, then waits for the proxy's lock.
    let mut login = tokio::process::Command::new(testkit::proxy::binary())
        .args(["login", USER])
        .env("XOAUTH2_PROXY_CONFIG", &proxy.config_path)
        .env_remove("XOAUTH2_PROXY_STATE_DIR")
        .env_remove("XOAUTH2_PROXY_TOKEN_KEY_FILE")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut said = tokio::io::BufReader::new(login.stdout.take().unwrap()).lines();
    let mut lines = Vec::new();
    while let Some(line) = said.next_line().await.unwrap() {
        lines.push(line);
        if lines
            .last()
            .unwrap()
            .contains("Waiting for a running proxy")
        {
            break;
        }
    }
    assert!(
        lines
            .last()
            .is_some_and(|l| l.contains("Waiting for a running proxy")),
        "login never waited for the refresh in flight: {lines:?}"
    );

    // The proxy's refresh ends and is saved; then `login` saves its grant.
    held.release();
    let answer = client.await.unwrap();
    assert!(answer.starts_with("a OK"), "{answer}");
    while let Some(line) = said.next_line().await.unwrap() {
        lines.push(line);
    }
    assert!(login.wait().await.unwrap().success(), "{lines:?}");
    let from_login: Vec<_> = world
        .idp
        .valid_refresh_tokens(USER)
        .into_iter()
        .filter(|t| !before_login.contains(t))
        .collect();
    assert_eq!(from_login.len(), 1, "one grant from the sign-in");
    // Compared, not printed: tokens stay out of the test's output.
    assert!(
        stored_refresh_token(&proxy.state_dir, USER) == from_login[0],
        "the refresh's save landed over the new grant"
    );
    assert_eq!(stored(&proxy.state_dir, USER)["needs_login"], false);
}
