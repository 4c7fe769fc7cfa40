//! Running the proxy as a service: health and metrics, reload on SIGHUP.

use std::time::Duration;

use testkit::proxy::AccountSpec;
use testkit::world::{LineClient, World};

const USER: &str = "sales@contoso.com";
const PASS: &str = "first-pass";

async fn get(addr: std::net::SocketAddr, path: &str) -> (u16, String, String) {
    let response = reqwest::get(format!("http://{addr}{path}")).await.unwrap();
    let status = response.status().as_u16();
    let content_type = response
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    (status, content_type, response.text().await.unwrap())
}

async fn login(addr: std::net::SocketAddr, user: &str, pass: &str) -> String {
    LineClient::imap_login(addr, user, pass).await
}

#[tokio::test(flavor = "multi_thread")]
async fn health_and_metrics_are_served_on_the_admin_listener() {
    let world = World::start().await;
    let proxy = world.proxy(&[AccountSpec::device(USER, PASS)]).await;
    let (status, _, body) = get(proxy.admin_addr, "/healthz").await;
    assert_eq!((status, body.as_str()), (200, "ok\n"));

    assert!(login(proxy.imap_addr, USER, PASS).await.starts_with("a OK"));
    let mut c = LineClient::connect(proxy.imap_addr).await;
    c.read().await;
    c.line(&format!("a LOGIN {USER} {PASS}")).await;
    c.until("a ").await;
    c.line("b NOOP").await;
    c.until("b ").await;
    assert!(
        login(proxy.imap_addr, USER, "wrong")
            .await
            .starts_with("a NO")
    );

    let (status, content_type, text) = get(proxy.admin_addr, "/metrics").await;
    assert_eq!(status, 200);
    assert!(
        content_type.starts_with("application/openmetrics-text"),
        "{content_type}"
    );
    for expected in [
        r#"xoauth2_proxy_logins_total{protocol="imap",outcome="ok"} 2"#,
        r#"xoauth2_proxy_logins_total{protocol="imap",outcome="bad_password"} 1"#,
        r#"xoauth2_proxy_token_requests_total{account="sales@contoso.com",outcome="ok"} 1"#,
        r#"xoauth2_proxy_connections{protocol="imap"} "#,
        "xoauth2_proxy_upstream_login_seconds_count",
        "xoauth2_proxy_upstream_connect_seconds_bucket",
    ] {
        assert!(text.contains(expected), "missing {expected}:\n{text}");
    }
    let upstream = [("protocol", "imap"), ("direction", "upstream")];
    let relayed = testkit::metrics::value(&text, "xoauth2_proxy_relayed_bytes_total", &upstream);
    assert_eq!(relayed, Some(8.0), "b NOOP\\r\\n is 8 bytes");
    assert_eq!(get(proxy.admin_addr, "/nothing").await.0, 404);
}

#[tokio::test(flavor = "multi_thread")]
async fn reload_applies_a_changed_account_and_keeps_live_sessions() {
    let world = World::start().await;
    let proxy = world.proxy(&[AccountSpec::device(USER, PASS)]).await;
    let mut live = LineClient::connect(proxy.imap_addr).await;
    live.read().await;
    live.line(&format!("a LOGIN {USER} {PASS}")).await;
    assert!(live.until("a ").await.pop().unwrap().starts_with("a OK"));

    let original = std::fs::read_to_string(&proxy.config_path).unwrap();
    let changed = format!(
        "{}\n[[accounts]]\nusername = \"app@local\"\npassword = \"app-pass\"\nprovider = \"test\"\nmailbox = \"shared@contoso.com\"\nflow = \"client_credentials\"\n",
        original.replace(
            &format!("password = \"{PASS}\""),
            "password = \"second-pass\""
        )
    );
    std::fs::write(&proxy.config_path, changed).unwrap();
    proxy.reload();
    proxy
        .wait_for_log("config reloaded", Duration::from_secs(10))
        .await;

    live.line("b NOOP").await;
    assert!(
        live.until("b ").await.pop().unwrap().starts_with("b OK"),
        "the live session survived"
    );
    assert!(login(proxy.imap_addr, USER, PASS).await.starts_with("a NO"));
    assert!(
        login(proxy.imap_addr, USER, "second-pass")
            .await
            .starts_with("a OK")
    );
    assert!(
        login(proxy.imap_addr, "app@local", "app-pass")
            .await
            .starts_with("a OK")
    );

    // A broken config is refused; the running one stays.
    std::fs::write(&proxy.config_path, "[[accounts]]\nusername = 1\n").unwrap();
    proxy.reload();
    proxy
        .wait_for_log("reload refused", Duration::from_secs(10))
        .await;
    assert!(
        login(proxy.imap_addr, USER, "second-pass")
            .await
            .starts_with("a OK")
    );
    live.line("c NOOP").await;
    assert!(live.until("c ").await.pop().unwrap().starts_with("c OK"));
}

#[tokio::test(flavor = "multi_thread")]
async fn health_subcommand_probes_the_running_proxy() {
    let world = World::start().await;
    let mut proxy = world.proxy(&[AccountSpec::device(USER, PASS)]).await;
    let smtp = [("protocol", "smtp")];
    let connections = proxy.metric("xoauth2_proxy_connections", &smtp).await;
    assert_eq!(
        connections,
        Some(0.0),
        "a fresh proxy has no SMTP connection"
    );
    assert!(proxy.cli(&["health"]).await.status.success());
    proxy.stop().await;
    let out = proxy.cli(&["health"]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no proxy answers"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reload_says_which_changes_wait_for_a_restart() {
    let world = World::start().await;
    let proxy = world.proxy(&[AccountSpec::device(USER, PASS)]).await;
    let original = std::fs::read_to_string(&proxy.config_path).unwrap();
    let changed = original
        .replace("[server]\n", "[server]\nmax_connections = 77\n")
        .replace("[imap]\n", "[imap]\nmax_connections_per_mailbox = 3\n")
        + "idle_timeout = \"7s\"\nmax_connections = 9\n";
    std::fs::write(&proxy.config_path, changed).unwrap();
    proxy.reload();
    proxy
        .wait_for_log("config reloaded", Duration::from_secs(10))
        .await;
    let logs = proxy.logs();
    for setting in [
        "`server.max_connections` changed; it applies from the next restart",
        "`imap.max_connections_per_mailbox` changed; it applies from the next restart",
        "the [admin] listener's limits",
    ] {
        assert!(logs.contains(setting), "no warning for {setting}:\n{logs}");
    }
    assert!(!logs.contains("pool settings"), "{logs}");
}
