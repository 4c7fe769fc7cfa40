//! Runs the real `xoauth2-proxy` binary, as users do: a config file, a state
//! directory, the CLI. Its log (stderr) is captured for assertions and leak checks.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::{Child, Command};

/// The binary under test. Cargo names it to integration tests in
/// `CARGO_BIN_EXE_xoauth2-proxy`; elsewhere it is the `xoauth2-proxy` that
/// Cargo built beside the running test or example (`target/<profile>/deps/…`,
/// `target/<profile>/examples/…`).
pub fn binary() -> &'static Path {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY.get_or_init(|| {
        if let Some(path) = std::env::var_os("CARGO_BIN_EXE_xoauth2-proxy") {
            return PathBuf::from(path);
        }
        let running = std::env::current_exe().expect("the path of the running test");
        let profile = running
            .parent()
            .and_then(Path::parent)
            .expect("the test runs from target/<profile>/<folder>/");
        let binary = profile.join(format!("xoauth2-proxy{}", std::env::consts::EXE_SUFFIX));
        assert!(
            binary.exists(),
            "{} is not built: run the tests with `cargo test`, which builds it",
            binary.display()
        );
        binary
    })
}

/// A free loopback port for a listener the proxy will bind later.
///
/// Not an ephemeral port: one bound to port 0 and released can be taken,
/// before the proxy binds it, by the source port of any outgoing connection
/// (tests make thousands), and the proxy then fails with "address already in
/// use". Ports below the kernel's ephemeral range (`ip_local_port_range`,
/// 32768 and up by default) are never handed out that way; each is still
/// checked by binding it, and never handed out twice by one process. The
/// start depends on the process id so that test binaries run side by side
/// (`cargo test` runs them one after another, but people run two at once)
/// seldom try the same ports.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const FIRST: u32 = 20_000;
    const SPAN: u32 = 12_000;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let offset = std::process::id() % SPAN;
    for _ in 0..SPAN {
        // A step prime to SPAN visits every port of the span once.
        let n = NEXT.fetch_add(1, Ordering::Relaxed) % SPAN;
        let port = (FIRST + (offset + n * 7) % SPAN) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port between {FIRST} and {}", FIRST + SPAN)
}

/// One account line of the generated config.
#[derive(Clone, Debug)]
pub struct AccountSpec {
    pub username: String,
    pub password: String,
    /// `password_hash` instead of `password` when true.
    pub hashed: bool,
    pub mailbox: Option<String>,
    pub flow: &'static str,
    pub provider: &'static str,
}

impl AccountSpec {
    pub fn device(username: &str, password: &str) -> Self {
        AccountSpec {
            username: username.into(),
            password: password.into(),
            hashed: false,
            mailbox: None,
            flow: "device_code",
            provider: "test",
        }
    }

    pub fn app_only(username: &str, password: &str, mailbox: &str) -> Self {
        AccountSpec {
            mailbox: Some(mailbox.into()),
            flow: "client_credentials",
            ..AccountSpec::device(username, password)
        }
    }
}

/// What a generated config points at.
#[derive(Clone, Debug)]
pub struct Endpoints {
    pub idp_base: String,
    pub tenant: String,
    pub client_id: String,
    pub client_secret: Option<String>,
    pub imap_port: u16,
    pub smtp_port: u16,
    pub ca_file: PathBuf,
}

/// A config text in the public format, with loopback listeners on free ports.
pub fn config_text(
    endpoints: &Endpoints,
    accounts: &[AccountSpec],
    imap_listen: u16,
    smtp_listen: u16,
    state_dir: &Path,
) -> String {
    let e = endpoints;
    let base = format!("{}/{}/oauth2/v2.0", e.idp_base, e.tenant);
    let secret = e
        .client_secret
        .as_ref()
        .map(|s| format!("client_secret = \"{s}\"\n"))
        .unwrap_or_default();
    let mut text = format!(
        r#"[server]
state_dir = "{state}"
auth_failure_delay = "200ms"
login_timeout = "5s"
upstream_timeout = "5s"
idp_timeout = "3s"
shutdown_grace = "2s"

[imap]
listen = "127.0.0.1:{imap_listen}"

[smtp]
listen = "127.0.0.1:{smtp_listen}"

[providers.test]
kind = "microsoft"
tenant = "{tenant}"
client_id = "{client_id}"
{secret}authorize_url = "{base}/authorize"
token_url = "{base}/token"
device_code_url = "{base}/devicecode"
imap_server = "localhost:{imap_port}"
smtp_server = "localhost:{smtp_port}"
ca_file = "{ca}"
"#,
        state = state_dir.display(),
        tenant = e.tenant,
        client_id = e.client_id,
        imap_port = e.imap_port,
        smtp_port = e.smtp_port,
        ca = e.ca_file.display(),
    );
    for a in accounts {
        let password = if a.hashed {
            format!("password_hash = \"{}\"", hash_password(&a.password))
        } else {
            format!("password = \"{}\"", a.password)
        };
        let mailbox = a
            .mailbox
            .as_ref()
            .map(|m| format!("mailbox = \"{m}\"\n"))
            .unwrap_or_default();
        text.push_str(&format!(
            "\n[[accounts]]\nusername = \"{}\"\n{password}\nprovider = \"{}\"\n{mailbox}flow = \"{}\"\n",
            a.username, a.provider, a.flow
        ));
    }
    text
}

/// `xoauth2-proxy hash-password`, through the real CLI.
pub fn hash_password(password: &str) -> String {
    use std::io::Write;
    let mut child = std::process::Command::new(binary())
        .arg("hash-password")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    writeln!(child.stdin.take().unwrap(), "{password}").unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// A config text from [`TestProxy::start_with`] (its `[admin]` section last)
/// with the web console on, behind `password` (hashed by the real CLI), and
/// its public URL the admin listener's own address.
pub fn with_console(text: String, password: &str) -> String {
    let listen = text
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("listen = \""))
        .and_then(|l| l.strip_suffix('"'))
        .expect("the [admin] section's listen line comes last");
    let public_url = format!("http://{listen}");
    format!(
        "{text}console = true\npassword_hash = \"{}\"\npublic_url = \"{public_url}\"\n",
        hash_password(password)
    )
}

/// A running `xoauth2-proxy serve`.
pub struct TestProxy {
    pub dir: tempfile::TempDir,
    pub config_path: PathBuf,
    pub state_dir: PathBuf,
    pub imap_addr: SocketAddr,
    pub smtp_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    child: Option<Child>,
    log: Arc<Mutex<Vec<u8>>>,
    rust_log: String,
}

impl TestProxy {
    /// Writes a config for `accounts` against `endpoints` and starts the proxy.
    pub async fn start(endpoints: &Endpoints, accounts: &[AccountSpec]) -> TestProxy {
        Self::start_with(endpoints, accounts, "debug", |t| t).await
    }

    /// Like [`start`](Self::start), with a log filter and a last edit of the config text.
    pub async fn start_with(
        endpoints: &Endpoints,
        accounts: &[AccountSpec],
        rust_log: &str,
        edit: impl FnOnce(String) -> String,
    ) -> TestProxy {
        let dir = tempfile::tempdir().unwrap();
        let state_dir = dir.path().join("state");
        let (imap, smtp, admin) = (free_port(), free_port(), free_port());
        let mut text = config_text(endpoints, accounts, imap, smtp, &state_dir);
        text.push_str(&format!("\n[admin]\nlisten = \"127.0.0.1:{admin}\"\n"));
        let text = edit(text);
        let config_path = dir.path().join("config.toml");
        std::fs::write(&config_path, text).unwrap();
        let mut proxy = TestProxy {
            dir,
            config_path,
            state_dir,
            imap_addr: SocketAddr::from(([127, 0, 0, 1], imap)),
            smtp_addr: SocketAddr::from(([127, 0, 0, 1], smtp)),
            admin_addr: SocketAddr::from(([127, 0, 0, 1], admin)),
            child: None,
            log: Arc::new(Mutex::new(Vec::new())),
            rust_log: rust_log.to_string(),
        };
        proxy.spawn().await;
        proxy
    }

    async fn spawn(&mut self) {
        let mut child = Command::new(binary())
            .arg("serve")
            .env("XOAUTH2_PROXY_CONFIG", &self.config_path)
            .env_remove("XOAUTH2_PROXY_STATE_DIR")
            .env_remove("XOAUTH2_PROXY_TOKEN_KEY_FILE")
            .env("RUST_LOG", &self.rust_log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("the proxy binary starts");
        self.log = collect(child.stderr.take().unwrap());
        self.child = Some(child);
        self.wait_for_log("xoauth2-proxy is ready", Duration::from_secs(10))
            .await;
    }

    /// The admin listener's `/metrics` text.
    pub async fn metrics(&self) -> String {
        let url = format!("http://{}/metrics", self.admin_addr);
        let response = reqwest::get(url).await.expect("the admin listener answers");
        assert!(response.status().is_success(), "/metrics: {response:?}");
        response.text().await.expect("/metrics is text")
    }

    /// The value of the series `name` with (at least) `labels` in `/metrics`,
    /// summed over the series that match; see [`crate::metrics::value`].
    pub async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        crate::metrics::value(&self.metrics().await, name, labels)
    }

    /// Everything the proxy has logged so far.
    pub fn logs(&self) -> String {
        String::from_utf8_lossy(&self.log.lock().unwrap()).into_owned()
    }

    /// Waits until the log contains `needle` (panics with the log otherwise).
    pub async fn wait_for_log(&self, needle: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !self.logs().contains(needle) {
            if Instant::now() > deadline {
                panic!(
                    "the proxy never logged {needle:?}; its log:\n{}",
                    self.logs()
                );
            }
            if let Some(child) = &self.child {
                let _ = child.id().expect("the proxy is still running");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops the proxy with SIGTERM and waits for it; returns its exit status.
    pub async fn stop(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        let pid = child.id().unwrap() as i32;
        send_signal(pid, 15);
        tokio::time::timeout(Duration::from_secs(10), child.wait())
            .await
            .expect("the proxy exits after SIGTERM")
            .unwrap()
    }

    /// Sends SIGTERM without waiting: the proxy drains its live sessions
    /// (`shutdown_grace`); [`wait`](Self::wait) for it to exit.
    pub fn terminate(&self) {
        let pid = self.child.as_ref().and_then(|c| c.id()).expect("running");
        send_signal(pid as i32, 15);
    }

    /// Waits up to `timeout` for the proxy to exit; its exit status.
    pub async fn wait(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        tokio::time::timeout(timeout, child.wait())
            .await
            .expect("the proxy exits")
            .unwrap()
    }

    /// Kills the proxy with SIGKILL, as a crash or the OOM killer would, and
    /// waits for it to be gone.
    pub async fn kill(&mut self) {
        let mut child = self.child.take().expect("running");
        send_signal(child.id().unwrap() as i32, 9);
        let _ = child.wait().await;
    }

    /// Sends SIGHUP: reload the config file.
    pub fn reload(&self) {
        let pid = self.child.as_ref().and_then(|c| c.id()).expect("running");
        send_signal(pid as i32, 1);
    }

    /// Stops and starts the proxy again with the same config and state.
    pub async fn restart(&mut self) {
        self.stop().await;
        self.start_again().await;
    }

    /// Starts a stopped proxy again with the same config and state.
    pub async fn start_again(&mut self) {
        self.log.lock().unwrap().clear();
        self.spawn().await;
    }

    /// Runs another CLI subcommand against the same config and state.
    pub async fn cli(&self, args: &[&str]) -> Output {
        Command::new(binary())
            .args(args)
            .env("XOAUTH2_PROXY_CONFIG", &self.config_path)
            .env_remove("XOAUTH2_PROXY_STATE_DIR")
            .env_remove("XOAUTH2_PROXY_TOKEN_KEY_FILE")
            .env("RUST_LOG", &self.rust_log)
            .stdin(Stdio::null())
            .output()
            .await
            .unwrap()
    }
}

fn send_signal(pid: i32, signal: i32) {
    let status = std::process::Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()
        .unwrap();
    assert!(status.success());
}

/// Collects everything `output` (a child's stderr) writes, in the background,
/// so that a test can read the log at any time and print it when it fails.
pub fn collect(mut output: impl AsyncRead + Unpin + Send + 'static) -> Arc<Mutex<Vec<u8>>> {
    let log = Arc::new(Mutex::new(Vec::new()));
    let sink = log.clone();
    tokio::spawn(async move {
        let mut chunk = [0u8; 8192];
        while let Ok(n) = output.read(&mut chunk).await {
            if n == 0 {
                break;
            }
            sink.lock().unwrap().extend_from_slice(&chunk[..n]);
        }
    });
    log
}
