//! Sending where SMTP AUTH as the mailbox does not work: a shared mailbox over
//! SMTP as the delegate who signed in, and Microsoft Graph `sendMail` for
//! tenants with SMTP AUTH off. nodemailer (pooled, as NocoBase configures it)
//! talks to the real binary; the test kit's mock identity provider issues the
//! tokens (and ID tokens) and serves the mock Graph; the mock SMTP upstream
//! applies Exchange's rules for shared mailboxes.

use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};
use testkit::node::nodemailer;
use testkit::proxy::{AccountSpec, TestProxy};
use testkit::world::World;

const SHARED: &str = "shared@contoso.com";
const DELEGATE: &str = "delegate@contoso.com";
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
