//! Grants sealed at rest with a token key from `xoauth2-proxy keygen`, and
//! the state and config checks at start and reload, through the real binary.

use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine;
use testkit::proxy::{AccountSpec, TestProxy, binary, config_text, free_port};
use testkit::world::{CLIENT_SECRET, LineClient, World};

const USER: &str = "sales@contoso.com";
const PASS: &str = "local-pass";

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// `xoauth2-proxy ARGS` with `config`, and `env` on top of a clean environment.
async fn cli(config: &Path, args: &[&str], env: &[(&str, &Path)]) -> std::process::Output {
    let mut command = tokio::process::Command::new(binary());
    command
        .args(args)
        .env("XOAUTH2_PROXY_CONFIG", config)
        .env_remove("XOAUTH2_PROXY_STATE_DIR")
        .env_remove("XOAUTH2_PROXY_TOKEN_KEY_FILE")
        .stdin(std::process::Stdio::null());
    for (name, value) in env {
        command.env(name, value);
    }
    command.output().await.unwrap()
}

/// `xoauth2-proxy keygen FILE`, which must succeed.
async fn keygen(file: &Path) {
    let out = cli(
        Path::new("/nonexistent"),
        &["keygen", file.to_str().unwrap()],
        &[],
    )
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
}

fn with_key(config: &str, key: &Path) -> String {
    let without: String = config
        .lines()
        .filter(|l| !l.starts_with("token_key_file"))
        .map(|l| format!("{l}\n"))
        .collect();
    without.replacen(
        "[server]\n",
        &format!("[server]\ntoken_key_file = \"{}\"\n", key.display()),
        1,
    )
}

/// Rewrites the proxy's config file through `edit`, readable by all (0644).
fn edit_config(proxy: &TestProxy, edit: impl FnOnce(&str) -> String) {
    let config = std::fs::read_to_string(&proxy.config_path).unwrap();
    std::fs::write(&proxy.config_path, edit(&config)).unwrap();
    set_mode(&proxy.config_path, 0o644);
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

async fn imap_login(proxy: &TestProxy) -> String {
    LineClient::imap_login(proxy.imap_addr, USER, PASS).await
}

/// The answer to SMTP AUTH PLAIN as USER.
async fn smtp_auth(proxy: &TestProxy) -> String {
    let mut c = LineClient::connect(proxy.smtp_addr).await;
    c.until("220 ").await;
    c.line("EHLO client").await;
    c.until("250 ").await;
    let blob = base64::engine::general_purpose::STANDARD.encode(format!("\0{USER}\0{PASS}"));
    c.line(&format!("AUTH PLAIN {blob}")).await;
    c.read().await.unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn grants_are_sealed_with_the_key_and_a_wrong_key_never_destroys_them() {
    let world = World::start().await;
    let keys = tempfile::tempdir().unwrap();
    let (right, wrong) = (keys.path().join("right.key"), keys.path().join("wrong.key"));
    keygen(&right).await;
    keygen(&wrong).await;
    let again = cli(
        Path::new("/nonexistent"),
        &["keygen", right.to_str().unwrap()],
        &[],
    )
    .await;
    assert_eq!(again.status.code(), Some(1));
    assert!(
        text(&again.stderr).contains("already exists"),
        "{}",
        text(&again.stderr)
    );

    let account = AccountSpec::device(USER, PASS);
    let mut proxy = TestProxy::start_with(
        &world.endpoints,
        std::slice::from_ref(&account),
        "debug",
        |t| with_key(&t, &right),
    )
    .await;
    // A plain grant, as an older version or an unsealed proxy wrote it.
    world.grant(&proxy, &account);
    assert!(imap_login(&proxy).await.starts_with("a OK"));
    let file = proxy.state_dir.join("tokens").join(format!("{USER}.json"));
    let sealed = std::fs::read(&file).unwrap();
    let envelope: serde_json::Value = serde_json::from_slice(&sealed).unwrap();
    assert_eq!(envelope["sealed"], 1, "{envelope}");
    let on_disk = text(&sealed);
    for secret in world.secrets() {
        assert!(!on_disk.contains(&secret), "a token in the sealed file");
    }
    let status = proxy.cli(&["status"]).await;
    let out = text(&status.stdout);
    assert!(
        out.contains(&format!("{USER} (")) && out.contains("authorised"),
        "{out}"
    );
    assert!(
        out.contains(&format!(
            "Grants are sealed with the token key in {}",
            right.display()
        )),
        "{out}"
    );

    // The wrong key: clients are told to come back, the file stays as it is.
    proxy.stop().await;
    edit_config(&proxy, |t| with_key(t, &wrong));
    proxy.start_again().await;
    let refused = imap_login(&proxy).await;
    assert!(refused.starts_with("a NO [UNAVAILABLE]"), "{refused}");
    assert!(
        smtp_auth(&proxy).await.starts_with("421"),
        "SMTP says come back"
    );
    let status = proxy.cli(&["status"]).await;
    let out = text(&status.stdout);
    assert!(status.status.success(), "{}", text(&status.stderr));
    assert!(
        out.contains("cannot decrypt its grant: wrong token key?"),
        "{out}"
    );
    assert!(out.contains("put the right key there and reload"), "{out}");
    let json = proxy.cli(&["status", "--json"]).await;
    let rows: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(
        rows[0]["state"],
        "cannot decrypt its grant: wrong token key?"
    );
    assert_eq!(rows[0]["needs_login"], false);
    assert_eq!(
        std::fs::read(&file).unwrap(),
        sealed,
        "the file is untouched"
    );
    assert!(proxy.logs().contains("does not open with the token key in"));

    // $XOAUTH2_PROXY_TOKEN_KEY_FILE wins over the config's key.
    let env = cli(
        &proxy.config_path,
        &["status"],
        &[("XOAUTH2_PROXY_TOKEN_KEY_FILE", &right)],
    )
    .await;
    assert!(
        text(&env.stdout).contains("authorised"),
        "{}",
        text(&env.stdout)
    );

    // The right key, put in force by a reload: the account works again.
    edit_config(&proxy, |t| with_key(t, &right));
    proxy.reload();
    proxy
        .wait_for_log("config reloaded", Duration::from_secs(10))
        .await;
    assert!(imap_login(&proxy).await.starts_with("a OK"));

    let logs = proxy.logs();
    for secret in world.secrets() {
        assert!(!logs.contains(&secret), "a secret in the log");
    }
    for key in [&right, &wrong] {
        let text = std::fs::read_to_string(key).unwrap();
        assert!(!logs.contains(text.trim()), "a token key in the log");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reload_without_accounts_is_refused_and_logins_go_on() {
    let world = World::start().await;
    let proxy = world.proxy(&[AccountSpec::device(USER, PASS)]).await;
    assert!(imap_login(&proxy).await.starts_with("a OK"));
    let full = std::fs::read_to_string(&proxy.config_path).unwrap();

    std::fs::write(&proxy.config_path, "").unwrap();
    proxy.reload();
    proxy
        .wait_for_log("has no [[accounts]]", Duration::from_secs(10))
        .await;
    assert!(imap_login(&proxy).await.starts_with("a OK"));

    let without_accounts = full.split("\n[[accounts]]").next().unwrap().to_string();
    std::fs::write(&proxy.config_path, format!("{without_accounts}\n")).unwrap();
    proxy.reload();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while proxy.logs().matches("has no [[accounts]]").count() < 2 {
        assert!(tokio::time::Instant::now() < deadline, "{}", proxy.logs());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(imap_login(&proxy).await.starts_with("a OK"));
    assert!(!proxy.logs().contains("config reloaded"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_config_others_may_read_is_warned_about_without_its_secret() {
    let world = World::start().await;
    let mut proxy = world.proxy(&[AccountSpec::device(USER, PASS)]).await;
    proxy.stop().await;
    set_mode(&proxy.config_path, 0o644);
    proxy.start_again().await;
    let warning = format!(
        "holds the client secret of provider `test` and other users may read it (mode 0644); run `chmod 600 {}`",
        proxy.config_path.display()
    );
    assert!(proxy.logs().contains(&warning), "{}", proxy.logs());
    proxy.reload();
    proxy
        .wait_for_log("config reloaded", Duration::from_secs(10))
        .await;
    assert_eq!(proxy.logs().matches(&warning).count(), 2, "at reload too");
    assert!(!proxy.logs().contains(CLIENT_SECRET));

    proxy.stop().await;
    set_mode(&proxy.config_path, 0o600);
    proxy.start_again().await;
    assert!(!proxy.logs().contains("other users may read it"));
}

/// A config for USER with free ports and state under `dir`; returns its path.
fn config_in(world: &World, dir: &Path, extra_server: &str) -> PathBuf {
    let text = config_text(
        &world.endpoints,
        &[AccountSpec::device(USER, PASS)],
        free_port(),
        free_port(),
        &dir.join("state"),
    );
    let text = text.replacen("[server]\n", &format!("[server]\n{extra_server}"), 1);
    let path = dir.join("config.toml");
    std::fs::write(
        &path,
        format!("{text}\n[admin]\nlisten = \"127.0.0.1:{}\"\n", free_port()),
    )
    .unwrap();
    path
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unusable_key_or_state_directory_stops_the_start_with_the_fix() {
    let world = World::start().await;
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("token.key");

    let config = config_in(
        &world,
        dir.path(),
        &format!("token_key_file = \"{}\"\n", key.display()),
    );
    for command in ["serve", "status"] {
        let out = cli(&config, &[command], &[]).await;
        assert_eq!(out.status.code(), Some(2), "{command}");
        let err = text(&out.stderr);
        assert!(
            err.contains(&format!(
                "does not exist; make a key with `xoauth2-proxy keygen {}`",
                key.display()
            )),
            "{err}"
        );
    }

    keygen(&key).await;
    set_mode(&key, 0o644);
    let out = cli(&config, &["serve"], &[]).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains(&format!("run `chmod 600 {}`", key.display())),
        "{}",
        text(&out.stderr)
    );

    std::fs::write(&key, "not a key\n").unwrap();
    set_mode(&key, 0o600);
    let out = cli(&config, &["login", USER], &[]).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("has a character that is not base64 at position 4"),
        "{}",
        text(&out.stderr)
    );

    // A state directory every user may write.
    let plain = config_in(&world, dir.path(), "");
    let state = dir.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    set_mode(&state, 0o777);
    let out = cli(&plain, &["serve"], &[]).await;
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains(&format!("run `chmod 700 {}`", state.display())),
        "{}",
        text(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn store_rekey_seals_every_grant_with_the_new_key_and_never_writes_one_it_cannot_open() {
    const OTHER: &str = "ops@contoso.com";
    let world = World::start().await;
    let keys = tempfile::tempdir().unwrap();
    let [old, new, unrelated] =
        ["old.key", "new.key", "unrelated.key"].map(|k| keys.path().join(k));
    for key in [&old, &new, &unrelated] {
        keygen(key).await;
    }
    let accounts = [
        AccountSpec::device(USER, PASS),
        AccountSpec::device(OTHER, "other-pass"),
    ];
    let mut proxy =
        TestProxy::start_with(&world.endpoints, &accounts, "debug", |t| with_key(&t, &old)).await;
    // USER's grant gets sealed with the old key by a login; OTHER's stays
    // plain, as an older version wrote it.
    world.grant(&proxy, &accounts[0]);
    world.grant(&proxy, &accounts[1]);
    assert!(imap_login(&proxy).await.starts_with("a OK"));
    proxy.stop().await;
    let tokens = proxy.state_dir.join("tokens");
    let file = |user: &str| tokens.join(format!("{user}.json"));
    let sealed_with_old = std::fs::read(file(USER)).unwrap();
    assert!(text(&sealed_with_old).contains("\"sealed\""));
    assert!(!text(&std::fs::read(file(OTHER)).unwrap()).contains("\"sealed\""));

    edit_config(&proxy, |t| with_key(t, &new));
    // The wrong old key: USER's grant opens with neither and is left byte for
    // byte, the plain one is sealed, and the command says what to do.
    let out = proxy
        .cli(&["store", "rekey", "--old-key", unrelated.to_str().unwrap()])
        .await;
    let said = format!("{}{}", text(&out.stdout), text(&out.stderr));
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(
        said.contains(&format!("sealed the grant of {OTHER}")),
        "{said}"
    );
    assert!(said.contains("left as it is"), "{said}");
    assert!(said.contains("`--old-key`"), "{said}");
    assert_eq!(std::fs::read(file(USER)).unwrap(), sealed_with_old);

    // The right old key: every grant is sealed with the new key; again, nothing to do.
    let out = proxy
        .cli(&["store", "rekey", "--old-key", old.to_str().unwrap()])
        .await;
    let said = text(&out.stdout);
    assert!(out.status.success(), "{said}{}", text(&out.stderr));
    assert!(
        said.contains(&format!("sealed the grant of {USER}")),
        "{said}"
    );
    assert!(
        said.contains("1 grant(s) sealed again, 1 already sealed"),
        "{said}"
    );
    assert_ne!(std::fs::read(file(USER)).unwrap(), sealed_with_old);
    let out = proxy.cli(&["store", "rekey"]).await;
    assert!(
        text(&out.stdout).contains("0 grant(s) sealed again, 2 already sealed"),
        "{}",
        text(&out.stdout)
    );

    // The proxy with only the new key serves both accounts.
    proxy.start_again().await;
    assert!(imap_login(&proxy).await.starts_with("a OK"));
    let other = LineClient::imap_login(proxy.imap_addr, OTHER, "other-pass").await;
    assert!(other.starts_with("a OK"), "{other}");
    let status = text(&proxy.cli(&["status"]).await.stdout);
    assert!(!status.contains("cannot decrypt"), "{status}");
    for key in [&old, &new, &unrelated] {
        let key = std::fs::read_to_string(key).unwrap();
        assert!(!said.contains(key.trim()) && !proxy.logs().contains(key.trim()));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn after_store_rekey_a_running_proxy_serves_cached_logins_until_its_reload() {
    let world = World::start().await;
    let keys = tempfile::tempdir().unwrap();
    let [old, new] = ["old.key", "new.key"].map(|k| keys.path().join(k));
    keygen(&old).await;
    keygen(&new).await;
    let account = AccountSpec::device(USER, PASS);
    // Without warm sessions, so that every login asks for a token.
    let proxy = TestProxy::start_with(
        &world.endpoints,
        std::slice::from_ref(&account),
        "debug",
        |t| with_key(&t, &old).replace("[imap]\n", "[imap]\nwarm_sessions = 0\n"),
    )
    .await;
    world.grant(&proxy, &account);
    assert!(imap_login(&proxy).await.starts_with("a OK"));
    let refreshes = world.idp.counts().refresh_grants;

    // The operator seals the grants with a new key; the proxy still runs
    // with the old one, and its grant file no longer opens with it.
    edit_config(&proxy, |t| with_key(t, &new));
    let out = proxy
        .cli(&["store", "rekey", "--old-key", old.to_str().unwrap()])
        .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    for _ in 0..2 {
        let answer = imap_login(&proxy).await;
        assert!(
            answer.starts_with("a OK"),
            "cached token, before the reload: {answer}"
        );
    }
    let logs = proxy.logs();
    let said = "until then logins use the access token obtained before";
    assert_eq!(logs.matches(said).count(), 1, "said once: {logs}");
    assert!(
        logs.contains("put the right key there and reload"),
        "{logs}"
    );

    // The reload puts the new key in force: the grant opens again.
    proxy.reload();
    proxy
        .wait_for_log("config reloaded", Duration::from_secs(10))
        .await;
    assert!(imap_login(&proxy).await.starts_with("a OK"));
    assert_eq!(
        world.idp.counts().refresh_grants,
        refreshes,
        "no refresh was needed"
    );
    let status = text(&proxy.cli(&["status"]).await.stdout);
    assert!(!status.contains("cannot decrypt"), "{status}");
}
