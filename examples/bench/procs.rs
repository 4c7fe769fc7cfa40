//! The proxies under test, each in its own process: xoauth2-proxy (the
//! release binary, with a generated config and a seeded grant, as after
//! `xoauth2-proxy login`) and email-oauth2-proxy (PyPI `emailproxy`,
//! headless, in a virtualenv of its own).

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::process::{Child, Command};

use crate::world::{CLIENT_ID, CLIENT_SECRET, MAILBOX, PASSWORD, TENANT, WorldInfo};

/// The peer's version this harness was written and checked against.
pub const EMAILPROXY_VERSION: &str = "2026.7.3";

/// A free loopback port (bound, then released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind a loopback port")
        .local_addr()
        .expect("bound")
        .port()
}

/// A proxy process: where it listens and its pid.
pub struct Running {
    pub imap: SocketAddr,
    pub smtp: SocketAddr,
    /// xoauth2-proxy with local TLS: its IMAP over TLS listener (`tls_listen`).
    pub imaps: Option<SocketAddr>,
    /// xoauth2-proxy: its generated config file.
    pub config: Option<PathBuf>,
    /// xoauth2-proxy: its admin listener (`/metrics`), if the build has one.
    pub admin: Option<SocketAddr>,
    pub pid: u32,
    pub log: PathBuf,
    child: Option<Child>,
    _dir: tempfile::TempDir,
}

impl Running {
    /// Starts `command` (its stdin and stdout closed, killed if dropped),
    /// listening on the loopback ports `(imap, smtp)`.
    fn spawn(
        mut command: Command,
        (imap, smtp): (u16, u16),
        log: PathBuf,
        dir: tempfile::TempDir,
    ) -> Result<Running, String> {
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| {
                let program = command.as_std().get_program().to_string_lossy();
                format!("cannot start {program}: {e}")
            })?;
        Ok(Running {
            imap: SocketAddr::from(([127, 0, 0, 1], imap)),
            smtp: SocketAddr::from(([127, 0, 0, 1], smtp)),
            imaps: None,
            config: None,
            admin: None,
            pid: child.id().unwrap_or(0),
            log,
            child: Some(child),
            _dir: dir,
        })
    }

    /// SIGTERM, then SIGKILL after 10 s.
    pub async fn stop(mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &self.pid.to_string()])
                .status();
            if tokio::time::timeout(Duration::from_secs(10), child.wait())
                .await
                .is_err()
            {
                let _ = child.kill().await;
            }
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn exited(&mut self) -> bool {
        self.child
            .as_mut()
            .is_none_or(|c| matches!(c.try_wait(), Ok(Some(_))))
    }
}

/// Waits until `addr` accepts a TCP connection (and closes it at once).
async fn wait_listening(
    addr: SocketAddr,
    running: &mut Running,
    timeout: Duration,
) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    loop {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        if running.exited() {
            return Err(format!(
                "it exited at start; its log:\n{}",
                running.log_text()
            ));
        }
        if Instant::now() > deadline {
            return Err(format!(
                "not listening after {timeout:?}; its log:\n{}",
                running.log_text()
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `xoauth2-proxy hash-password`.
pub fn hash_password(bin: &Path, password: &str) -> Result<String, String> {
    use std::io::Write;
    let mut child = std::process::Command::new(bin)
        .arg("hash-password")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{}: {e}", bin.display()))?;
    writeln!(child.stdin.take().expect("piped"), "{password}").map_err(|e| e.to_string())?;
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err("hash-password failed".into());
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Where a proxy's upstream is, for the config.
pub struct Upstream<'a> {
    pub world: &'a WorldInfo,
    /// A refresh token for the grant file (each is good for one proxy).
    pub refresh_token: String,
    pub imap: (String, u16),
    pub smtp: (String, u16),
    /// `implicit` or `starttls`.
    pub smtp_tls: &'a str,
}

impl<'a> Upstream<'a> {
    pub fn standin(world: &'a WorldInfo, refresh_token: String) -> Self {
        Upstream {
            world,
            refresh_token,
            imap: ("localhost".into(), world.imap_port),
            smtp: ("localhost".into(), world.smtp_port),
            smtp_tls: "implicit",
        }
    }
}

/// Starts `xoauth2-proxy serve` against `upstream` with room for
/// `max_connections` clients, its account holding a grant. With `tls`, the
/// config also has `[tls]` (the proxy makes its own CA under
/// state_dir/tls) and an IMAP `tls_listen`.
pub async fn start_ours(
    bin: &Path,
    password_hash: &str,
    upstream: &Upstream<'_>,
    max_connections: usize,
    tls: bool,
) -> Result<Running, String> {
    let settings = Settings {
        max_connections,
        tls,
        server: "",
        imap: Some(""),
        smtp: "",
    };
    start_ours_admin_or_not(bin, password_hash, upstream, &settings).await
}

/// Like [`start_ours`] without TLS, with `imap` (whole lines) added to the
/// config's `[imap]` section.
pub async fn start_ours_with_imap(
    bin: &Path,
    password_hash: &str,
    upstream: &Upstream<'_>,
    imap: &str,
) -> Result<Running, String> {
    let settings = Settings {
        max_connections: 4096,
        tls: false,
        server: "",
        imap: Some(imap),
        smtp: "",
    };
    start_ours_admin_or_not(bin, password_hash, upstream, &settings).await
}

/// Like [`start_ours`] without TLS, with `server` (whole lines) added to
/// the config's `[server]` section.
pub async fn start_ours_with_server(
    bin: &Path,
    password_hash: &str,
    upstream: &Upstream<'_>,
    max_connections: usize,
    server: &str,
) -> Result<Running, String> {
    let settings = Settings {
        max_connections,
        tls: false,
        server,
        imap: Some(""),
        smtp: "",
    };
    start_ours_admin_or_not(bin, password_hash, upstream, &settings).await
}

/// Like [`start_ours`] without TLS, with `smtp` (whole lines) added to the
/// config's `[smtp]` section.
pub async fn start_ours_with_smtp(
    bin: &Path,
    password_hash: &str,
    upstream: &Upstream<'_>,
    max_connections: usize,
    smtp: &str,
) -> Result<Running, String> {
    let settings = Settings {
        max_connections,
        tls: false,
        server: "",
        imap: Some(""),
        smtp,
    };
    start_ours_admin_or_not(bin, password_hash, upstream, &settings).await
}

/// What a generated config sets beyond the account and the upstream.
#[derive(Clone, Copy)]
struct Settings<'a> {
    max_connections: usize,
    tls: bool,
    /// Lines added to `[server]`.
    server: &'a str,
    /// Lines added to `[imap]` after [`IMAP_BENCH`]; `None` for a build
    /// that knows neither.
    imap: Option<&'a str>,
    /// Lines added to `[smtp]`.
    smtp: &'a str,
}

/// What every generated config's `[imap]` says: the bench opens thousands
/// of sessions to its one mailbox, which a real server would not allow.
const IMAP_BENCH: &str = "max_connections_per_mailbox = 1000000\n";

async fn start_ours_admin_or_not(
    bin: &Path,
    password_hash: &str,
    upstream: &Upstream<'_>,
    settings: &Settings<'_>,
) -> Result<Running, String> {
    // Newer builds have an admin listener (default 127.0.0.1:8025): give it a
    // free port; an older build that does not know the section is started
    // without; one that does not know the per-mailbox cap, without it.
    match start_ours_with(bin, password_hash, upstream, settings, true).await {
        Err(e) if e.contains("admin") => {
            start_ours_with(bin, password_hash, upstream, settings, false).await
        }
        Err(e) if e.contains("max_connections_per_mailbox") => {
            let settings = Settings {
                imap: None,
                ..*settings
            };
            let old = start_ours_with(bin, password_hash, upstream, &settings, true).await;
            match old {
                Err(e) if e.contains("admin") => {
                    start_ours_with(bin, password_hash, upstream, &settings, false).await
                }
                other => other,
            }
        }
        other => other,
    }
}

async fn start_ours_with(
    bin: &Path,
    password_hash: &str,
    upstream: &Upstream<'_>,
    settings: &Settings<'_>,
    admin: bool,
) -> Result<Running, String> {
    let Settings {
        max_connections,
        tls,
        server,
        imap: imap_lines,
        smtp: smtp_lines,
    } = *settings;
    let imap_lines = match imap_lines {
        Some(lines) => format!("{IMAP_BENCH}{lines}\n"),
        None => String::new(),
    };
    let w = upstream.world;
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let state = dir.path().join("state");
    let (imap, smtp) = (free_port(), free_port());
    let imaps = tls.then(free_port);
    let base = format!("{}/{TENANT}/oauth2/v2.0", w.idp_base);
    let admin_addr = admin.then(|| SocketAddr::from(([127, 0, 0, 1], free_port())));
    let admin = match admin_addr {
        Some(addr) => format!("\n[admin]\nlisten = \"{addr}\"\n"),
        None => String::new(),
    };
    // Local TLS: a self-made CA, a certificate for the names the client uses.
    let (tls_listen, tls) = match imaps {
        Some(port) => (
            format!("tls_listen = \"127.0.0.1:{port}\"\n"),
            "\n[tls]\nnames = [\"localhost\", \"127.0.0.1\"]\n".to_string(),
        ),
        None => (String::new(), String::new()),
    };
    let config = format!(
        r#"[server]
state_dir = "{state}"
max_connections = {max_connections}
shutdown_grace = "1s"
{server}
[imap]
listen = "127.0.0.1:{imap}"
{tls_listen}{imap_lines}
[smtp]
listen = "127.0.0.1:{smtp}"
{smtp_lines}
{admin}{tls}
[providers.bench]
kind = "microsoft"
tenant = "{TENANT}"
client_id = "{CLIENT_ID}"
client_secret = "{CLIENT_SECRET}"
authorize_url = "{base}/authorize"
token_url = "{base}/token"
device_code_url = "{base}/devicecode"
imap_server = "{ih}:{ip}"
smtp_server = "{sh}:{sp}"
smtp_tls = "{smtp_tls}"
ca_file = "{ca}"

[[accounts]]
username = "{MAILBOX}"
password_hash = "{password_hash}"
provider = "bench"
flow = "device_code"
"#,
        state = state.display(),
        ih = upstream.imap.0,
        ip = upstream.imap.1,
        sh = upstream.smtp.0,
        sp = upstream.smtp.1,
        smtp_tls = upstream.smtp_tls,
        ca = w.ca_file,
    );
    let config_path = dir.path().join("config.toml");
    std::fs::write(&config_path, config).map_err(|e| e.to_string())?;
    // The grant, as `xoauth2-proxy login` leaves it.
    let tokens = state.join("tokens");
    std::fs::create_dir_all(&tokens).map_err(|e| e.to_string())?;
    let grant = serde_json::json!({
        "account": MAILBOX,
        "flow": "device_code",
        "refresh_token": upstream.refresh_token,
        "needs_login": false,
    });
    std::fs::write(
        tokens.join(format!("{}.json", MAILBOX.to_lowercase())),
        grant.to_string(),
    )
    .map_err(|e| e.to_string())?;

    let log = dir.path().join("proxy.log");
    let log_file = std::fs::File::create(&log).map_err(|e| e.to_string())?;
    let mut command = Command::new(bin);
    command
        .arg("serve")
        .env("XOAUTH2_PROXY_CONFIG", &config_path)
        .env_remove("XOAUTH2_PROXY_STATE_DIR")
        .env("RUST_LOG", "info")
        .stderr(log_file);
    let mut running = Running::spawn(command, (imap, smtp), log, dir)?;
    running.imaps = imaps.map(|port| SocketAddr::from(([127, 0, 0, 1], port)));
    running.config = Some(config_path);
    running.admin = admin_addr;
    let deadline = Instant::now() + Duration::from_secs(20);
    while !running.log_text().contains("xoauth2-proxy is ready") {
        if running.exited() || Instant::now() > deadline {
            return Err(format!(
                "xoauth2-proxy did not start; its log:\n{}",
                running.log_text()
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(running)
}

/// The CA of a proxy started with local TLS, as `xoauth2-proxy tls ca
/// --config …` prints it (PEM).
pub fn proxy_ca(bin: &Path, running: &Running) -> Result<String, String> {
    let config = running.config.as_ref().ok_or("no config")?;
    let out = std::process::Command::new(bin)
        .args(["tls", "ca", "--config"])
        .arg(config)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{} tls ca: {e}", bin.display()))?;
    if !out.status.success() {
        return Err(format!(
            "`xoauth2-proxy tls ca` failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The virtualenv holding email-oauth2-proxy, made (with `pip install
/// emailproxy==VERSION`) if it is not there yet. Returns its `emailproxy` script.
pub fn ensure_emailproxy(python: &str, venv: &Path, version: &str) -> Result<PathBuf, String> {
    let script = venv.join("bin/emailproxy");
    let pip = venv.join("bin/pip");
    let installed = std::process::Command::new(&pip)
        .args(["show", "emailproxy"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).contains(&format!("Version: {version}")))
        .unwrap_or(false);
    if installed && script.exists() {
        return Ok(script);
    }
    eprintln!(
        "bench: installing emailproxy=={version} into {}",
        venv.display()
    );
    let status = std::process::Command::new(python)
        .args(["-m", "venv"])
        .arg(venv)
        .status()
        .map_err(|e| format!("{python} -m venv: {e}"))?;
    if !status.success() {
        return Err(format!("`{python} -m venv {}` failed", venv.display()));
    }
    let status = std::process::Command::new(&pip)
        .args(["install", "--quiet", "--disable-pip-version-check"])
        .arg(format!("emailproxy=={version}"))
        .status()
        .map_err(|e| format!("pip: {e}"))?;
    if !status.success() || !script.exists() {
        return Err(format!("`pip install emailproxy=={version}` failed"));
    }
    Ok(script)
}

/// Starts email-oauth2-proxy headless against the stand-in: IMAP (implicit
/// TLS upstream) and SMTP (implicit TLS upstream), one account using the
/// client-credentials flow at the mock identity provider.
pub async fn start_peer(script: &Path, world: &WorldInfo) -> Result<Running, String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let (imap, smtp) = (free_port(), free_port());
    let config = format!(
        "[IMAP-{imap}]\nserver_address = localhost\nserver_port = {wi}\nlocal_address = 127.0.0.1\n\n\
         [SMTP-{smtp}]\nserver_address = localhost\nserver_port = {ws}\nserver_starttls = False\nlocal_address = 127.0.0.1\n\n\
         [{MAILBOX}]\ntoken_url = {base}/{TENANT}/oauth2/v2.0/token\n\
         oauth2_scope = https://outlook.office365.com/.default\noauth2_flow = client_credentials\n\
         client_id = {CLIENT_ID}\nclient_secret = {CLIENT_SECRET}\n",
        wi = world.imap_port,
        ws = world.smtp_port,
        base = world.idp_base,
    );
    let config_path = dir.path().join("emailproxy.config");
    std::fs::write(&config_path, config).map_err(|e| e.to_string())?;
    let log = dir.path().join("emailproxy.log");
    let mut command = Command::new(script);
    command
        .arg("--no-gui")
        .arg("--config-file")
        .arg(&config_path)
        .arg("--log-file")
        .arg(&log)
        // Python's ssl module trusts the test CA through this.
        .env("SSL_CERT_FILE", &world.ca_file)
        .stderr(Stdio::null());
    let mut running = Running::spawn(command, (imap, smtp), log, dir)?;
    let imap_addr = running.imap;
    let smtp_addr = running.smtp;
    wait_listening(imap_addr, &mut running, Duration::from_secs(30))
        .await
        .map_err(|e| format!("email-oauth2-proxy: {e}"))?;
    wait_listening(smtp_addr, &mut running, Duration::from_secs(30))
        .await
        .map_err(|e| format!("email-oauth2-proxy: {e}"))?;
    Ok(running)
}

/// The password the clients use at either proxy.
pub fn password() -> &'static str {
    PASSWORD
}
