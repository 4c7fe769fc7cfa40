//! The proxy run inside the test process, as `server::run` lets its caller do:
//! the test binds the listeners (port 0), decides when to reload and when to
//! stop. Faster than starting the binary, and it pins the contract the binary
//! and the demo rely on: a reload request puts a new config in force for new
//! logins, and the shutdown future ends `run` after the live sessions drain.

use std::path::Path;
use std::time::Duration;

use testkit::proxy::{AccountSpec, config_text};
use testkit::world::{LineClient, World};
use tokio::sync::{mpsc, oneshot};
use xoauth2_proxy::{Config, Listeners};

const USER: &str = "sales@contoso.com";

/// Writes the config for `password` at `path`, with every listener on port 0.
fn write_config(world: &World, path: &Path, state_dir: &Path, password: &str) {
    let mut text = config_text(
        &world.endpoints,
        &[AccountSpec::device(USER, password)],
        0,
        0,
        state_dir,
    );
    text.push_str("\n[admin]\nlisten = \"127.0.0.1:0\"\n");
    std::fs::write(path, text).unwrap();
}

async fn login(addr: std::net::SocketAddr, password: &str) -> String {
    LineClient::imap_login(addr, USER, password).await
}

#[tokio::test(flavor = "multi_thread")]
async fn the_caller_reloads_and_stops_a_proxy_running_in_process() {
    let world = World::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (path, state_dir) = (dir.path().join("config.toml"), dir.path().join("state"));
    write_config(&world, &path, &state_dir, "first-pass");
    world.grant_in(&state_dir, &AccountSpec::device(USER, "first-pass"));

    let config = Config::load(&path).unwrap();
    let listeners = Listeners::bind(&config).await.unwrap();
    let [imap, _smtp, admin] = listeners.local_addrs().unwrap();
    let (reload, reloads) = mpsc::channel(1);
    let (stop, stopped) = oneshot::channel::<()>();
    let shutdown = async {
        let _ = stopped.await;
    };
    let server = tokio::spawn(xoauth2_proxy::run(listeners, config, shutdown, reloads));

    let health = reqwest::get(format!("http://{admin}/healthz"))
        .await
        .unwrap();
    assert_eq!(health.status().as_u16(), 200);
    assert!(login(imap, "first-pass").await.starts_with("a OK"));

    // A session that is open across the reload keeps working on the old config.
    let mut live = LineClient::connect(imap).await;
    live.read().await;
    live.line(&format!("a LOGIN {USER} first-pass")).await;
    assert!(live.until("a ").await.pop().unwrap().starts_with("a OK"));

    write_config(&world, &path, &state_dir, "second-pass");
    reload.send(()).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !login(imap, "second-pass").await.starts_with("a OK") {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the new password never took effect"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(login(imap, "first-pass").await.starts_with("a NO"));
    live.line("b NOOP").await;
    assert!(live.until("b ").await.pop().unwrap().starts_with("b OK"));

    // Stopping: no new connections, and `run` returns once the live session ends.
    stop.send(()).unwrap();
    live.line("c LOGOUT").await;
    live.until("c ").await;
    let ended = tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .expect("run returns after the shutdown future completes");
    ended.unwrap().unwrap();
    assert!(
        tokio::net::TcpStream::connect(imap).await.is_err(),
        "the IMAP listener is closed after run returns"
    );
}
