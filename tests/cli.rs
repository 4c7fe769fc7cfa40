//! The command line as scripts and users meet it: `login` (device code),
//! `status`, `hash-password`, and config errors.

use std::time::Duration;

use testkit::idp::DeviceOutcome;
use testkit::proxy::{AccountSpec, TestProxy, binary, config_text};
use testkit::world::World;

const USER: &str = "sales@contoso.com";

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A config file for `accounts` and no running proxy.
fn config_file(world: &World, accounts: &[AccountSpec]) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let path = dir.path().join("config.toml");
    std::fs::write(&path, config_text(&world.endpoints, accounts, 1, 2, &state)).unwrap();
    (dir, path)
}

async fn run(config: &std::path::Path, args: &[&str]) -> std::process::Output {
    tokio::process::Command::new(binary())
        .args(args)
        .arg("--config")
        .arg(config)
        .env_remove("XOAUTH2_PROXY_CONFIG")
        .env_remove("XOAUTH2_PROXY_STATE_DIR")
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn login_runs_the_device_flow_and_stores_the_grant() {
    let world = World::start().await;
    world.idp.set_device_user(USER);
    world
        .idp
        .set_device_outcome(DeviceOutcome::ApproveAfterPolls(2));
    let (dir, config) = config_file(&world, &[AccountSpec::device(USER, "pw")]);

    let out = run(&config, &["login", USER]).await;
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    assert!(
        stdout.contains("https://microsoft.com/devicelogin"),
        "{stdout}"
    );
    assert!(stdout.contains("enter the code "), "{stdout}");
    assert!(stdout.contains("expires in 15 min"), "{stdout}");
    assert!(
        stdout.contains(&format!("Account {USER} is authorised")),
        "{stdout}"
    );

    let request = world
        .idp
        .requests()
        .into_iter()
        .find(|r| r.path.ends_with("/devicecode"))
        .unwrap();
    assert_eq!(
        request.scope.as_deref(),
        Some(
            "https://outlook.office.com/IMAP.AccessAsUser.All https://outlook.office.com/SMTP.Send offline_access openid profile"
        )
    );
    assert!(
        request.secret_presented,
        "a confidential app sends its secret (else AADSTS7000218)"
    );

    // The stored grant is the provider's current one, in a private file.
    let file = dir.path().join("state/tokens").join(format!("{USER}.json"));
    let stored: serde_json::Value = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    assert_eq!(
        stored["refresh_token"],
        world.idp.valid_refresh_tokens(USER)[0]
    );
    assert_eq!(stored["needs_login"], false);

    let status = run(&config, &["status", "--json"]).await;
    let rows: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(rows[0]["state"], "authorised");
    assert_eq!(rows[0]["access_token_valid"], true);
    assert!(!text(&status.stdout).contains(world.idp.valid_refresh_tokens(USER)[0].as_str()));
}

#[tokio::test(flavor = "multi_thread")]
async fn login_honours_slow_down() {
    let world = World::start().await;
    world.idp.set_device_user(USER);
    world
        .idp
        .set_device_outcome(DeviceOutcome::SlowDownThenApprove);
    let (_dir, config) = config_file(&world, &[AccountSpec::device(USER, "pw")]);
    let out = run(&config, &["login", USER]).await;
    assert!(
        out.status.success(),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    assert!(world.idp.counts().device_polls >= 3);
}

#[tokio::test(flavor = "multi_thread")]
async fn login_reports_a_declined_or_expired_sign_in() {
    let world = World::start().await;
    world.idp.set_device_user(USER);
    let (_dir, config) = config_file(&world, &[AccountSpec::device(USER, "pw")]);

    world.idp.set_device_outcome(DeviceOutcome::Decline);
    let out = run(&config, &["login", USER]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("declined"),
        "{}",
        text(&out.stderr)
    );

    world.idp.set_device_outcome(DeviceOutcome::Expire);
    let out = run(&config, &["login", USER]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("expired"),
        "{}",
        text(&out.stderr)
    );

    let status = run(&config, &["status"]).await;
    assert!(text(&status.stdout).contains("needs login"));
}

#[tokio::test(flavor = "multi_thread")]
async fn login_of_an_unknown_account_is_a_usage_error() {
    let world = World::start().await;
    let (_dir, config) = config_file(&world, &[AccountSpec::device(USER, "pw")]);
    let out = run(&config, &["login", "nobody@contoso.com"]).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("no account `nobody@contoso.com`"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bad_config_names_the_file_and_key_and_nothing_starts() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        "[providers.p]\nclient_id = \"c\"\n\n[[accounts]]\nusername = \"u@x.com\"\npassword = \"pw\"\nprovider = \"p\"\nflow = \"devicecode\"\n",
    )
    .unwrap();
    let out = run(&path, &["serve"]).await;
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(err.contains(&path.display().to_string()), "{err}");
    assert!(err.contains("accounts[0].flow"), "{err}");
    assert_eq!(err.lines().count(), 1, "one sentence: {err}");

    let missing = run(&dir.path().join("none.toml"), &["status"]).await;
    assert_eq!(missing.status.code(), Some(2));
    assert!(text(&missing.stderr).contains("cannot read config"));
}

#[tokio::test(flavor = "multi_thread")]
async fn hash_password_prints_a_hash_the_proxy_accepts() {
    let world = World::start().await;
    let mut spec = AccountSpec::device(USER, "correct horse battery");
    spec.hashed = true;
    let proxy = world.proxy(&[spec]).await;
    let config = std::fs::read_to_string(&proxy.config_path).unwrap();
    assert!(config.contains("password_hash = \"$argon2id$"));
    let mut c = testkit::world::LineClient::connect(proxy.imap_addr).await;
    c.read().await;
    c.line(&format!("a LOGIN {USER} \"correct horse battery\""))
        .await;
    assert!(c.until("a ").await.last().unwrap().starts_with("a OK"));
    c.line("b LOGOUT").await;
    let mut c = testkit::world::LineClient::connect(proxy.imap_addr).await;
    c.read().await;
    c.line(&format!("a LOGIN {USER} \"correct horse\"")).await;
    assert!(
        c.read()
            .await
            .unwrap()
            .starts_with("a NO [AUTHENTICATIONFAILED]")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_drains_and_exits_zero() {
    let world = World::start().await;
    let mut proxy: TestProxy = world.proxy(&[AccountSpec::device(USER, "pw")]).await;
    let mut c = testkit::world::LineClient::connect(proxy.imap_addr).await;
    c.read().await;
    let started = std::time::Instant::now();
    let status = proxy.stop().await;
    assert!(status.success(), "{status:?}");
    // The open session held the proxy up to shutdown_grace (2 s), no longer.
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(
        tokio::net::TcpStream::connect(proxy.imap_addr)
            .await
            .is_err(),
        "no longer listening"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn login_runs_the_authorization_code_flow_with_a_loopback_redirect() {
    use tokio::io::AsyncBufReadExt;
    let world = World::start().await;
    world.idp.set_device_user(USER);
    let port = testkit::proxy::free_port();
    let mut spec = AccountSpec::device(USER, "pw");
    spec.flow = "authorization_code";
    let (_dir, config) = config_file(&world, &[spec]);
    let text = std::fs::read_to_string(&config).unwrap().replace(
        "ca_file = ",
        &format!("redirect_uri = \"http://127.0.0.1:{port}/\"\nca_file = "),
    );
    std::fs::write(&config, text).unwrap();

    let mut child = tokio::process::Command::new(binary())
        .args(["login", USER, "--config"])
        .arg(&config)
        .env_remove("XOAUTH2_PROXY_STATE_DIR")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let url = loop {
        let line = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
            .await
            .unwrap()
            .unwrap()
            .expect("login prints the URL");
        if line.starts_with("http") {
            break line;
        }
    };
    assert!(url.contains("code_challenge="), "PKCE: {url}");
    // The browser: the provider signs the user in and redirects to the loopback listener.
    let page = reqwest::get(&url).await.unwrap();
    assert!(page.status().is_success());
    assert!(page.text().await.unwrap().contains("Signed in"));
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success());
    assert_eq!(world.idp.counts().authorization_code_grants, 1);
    let status = run(&config, &["status", "--json"]).await;
    let rows: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(rows[0]["state"], "authorised", "{rows}");
}

#[tokio::test(flavor = "multi_thread")]
async fn check_reaches_every_party_and_says_what_to_fix() {
    let world = World::start().await;
    let proxy = world
        .proxy(&[
            AccountSpec::device(USER, "pw"),
            AccountSpec::app_only("app@local", "pw2", "shared@contoso.com"),
        ])
        .await;
    let out = proxy.cli(&["check"]).await;
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    assert_eq!(
        stdout.matches("logged in with XOAUTH2").count(),
        4,
        "{stdout}\n{:?}\n{:?}",
        world.idp.requests(),
        world
            .imap
            .tokens_seen()
            .iter()
            .map(|t| t.len())
            .collect::<Vec<_>>()
    );
    assert!(!stdout.contains("PROBLEM"), "{stdout}");

    world.smtp.set_auth_disabled(USER, true);
    world.idp.revoke_grants("shared@contoso.com");
    let out = proxy.cli(&["check"]).await;
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains("SmtpClientAuthenticationDisabled"),
        "{stdout}"
    );
    assert!(stdout.contains("IMAP localhost:"), "{stdout}");

    world.idp.revoke_grants(USER);
    world.smtp.set_auth_disabled(USER, false);
    let out = proxy.cli(&["check"]).await;
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains(&format!("run `xoauth2-proxy login {USER}`")),
        "{stdout}"
    );

    // A folder of grants other users may write is what `serve` refuses at
    // start: `check` says so, with the fix.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let tokens = proxy.state_dir.join("tokens");
        std::fs::set_permissions(&tokens, std::fs::Permissions::from_mode(0o777)).unwrap();
        let out = proxy.cli(&["check"]).await;
        let stdout = text(&out.stdout);
        assert_eq!(out.status.code(), Some(1), "{stdout}");
        assert!(stdout.contains("chmod 700"), "{stdout}");
        std::fs::set_permissions(&tokens, std::fs::Permissions::from_mode(0o700)).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn two_processes_never_spend_the_same_refresh_token() {
    let world = World::start().await;
    world.idp.set_response_delay(Duration::from_millis(800));
    let proxy = world.proxy(&[AccountSpec::device(USER, "pw")]).await;
    // `check` in another process and a client login through `serve`, at once:
    // both need a new access token from the one rotating refresh token.
    let check = proxy.cli(&["check"]);
    let client = async {
        let mut c = testkit::world::LineClient::connect(proxy.imap_addr).await;
        c.read().await;
        c.line(&format!("a LOGIN {USER} pw")).await;
        c.until("a ").await.pop().unwrap()
    };
    let (check, reply) = tokio::join!(check, client);
    assert!(reply.starts_with("a OK"), "{reply}");
    assert!(check.status.success(), "{}", text(&check.stdout));
    assert_eq!(
        world.idp.counts().refresh_grants,
        1,
        "one redemption, shared through the store"
    );
}
