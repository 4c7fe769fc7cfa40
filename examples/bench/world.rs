//! The upstream side of the benchmark, in a process of its own (so that its
//! sockets, memory and CPU are not the client's): a throw-away CA, the tests'
//! mock identity provider (testkit/src/idp/) and the TLS IMAP/SMTP
//! stand-in, sharing one book of issued tokens.
//!
//! The benchmark starts it as `bench --world …`; it prints one JSON line
//! ([`WorldInfo`]) and serves until its standard input closes.

use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

use testkit::idp::MockIdp;
use testkit::pki::TestPki;
use testkit::tokens::{Subject, TokenBook};

pub const TENANT: &str = "contoso.onmicrosoft.com";
pub const CLIENT_ID: &str = "11111111-2222-3333-4444-555555555555";
pub const CLIENT_SECRET: &str = "bench-secret-Qx8~vL2pR7mN";
/// The one mailbox every path opens.
pub const MAILBOX: &str = "bench@contoso.test";
/// Its local password at the proxies.
pub const PASSWORD: &str = "local-password-for-the-bench";
/// Access tokens live this long: well past a run, and past both proxies'
/// refresh-ahead margins, so every login after the first uses a cached token.
const TOKEN_LIFETIME: Duration = Duration::from_secs(4 * 3600);

/// What the world process tells the benchmark.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorldInfo {
    pub imap_port: u16,
    pub smtp_port: u16,
    /// `http://127.0.0.1:PORT` of the mock identity provider.
    pub idp_base: String,
    pub ca_file: String,
    pub cert_file: String,
    pub key_file: String,
    /// An access token for MAILBOX, for the direct path.
    pub direct_token: String,
}

/// Runs the world in this process until standard input closes.
pub async fn serve(fetch_bytes: usize) {
    let pki = TestPki::new();
    let tokens = TokenBook::default();
    let idp = MockIdp::start(tokens.clone()).await;
    idp.register_client(CLIENT_ID, Some(CLIENT_SECRET));
    idp.set_access_token_lifetime(TOKEN_LIFETIME);
    let message = Arc::new(crate::client::message(fetch_bytes, "the big one"));
    let standin = crate::standin::start(pki.acceptor(), tokens.clone(), message).await;
    let info = WorldInfo {
        imap_port: standin.imap_port,
        smtp_port: standin.smtp_port,
        idp_base: idp.base_url(),
        ca_file: pki.ca_pem_path.display().to_string(),
        cert_file: pki.cert_pem_path.display().to_string(),
        key_file: pki.key_pem_path.display().to_string(),
        direct_token: tokens.issue(Subject::Mailbox(MAILBOX.into()), TOKEN_LIFETIME),
    };
    println!("{}", serde_json::to_string(&info).expect("serialisable"));
    // Serve until the benchmark closes our standard input (or dies). Each
    // line `refresh` is answered with a new refresh token for MAILBOX (a
    // refresh token is used once: each proxy started gets its own grant).
    let mut stdin = BufReader::new(tokio::io::stdin()).lines();
    while let Ok(Some(line)) = stdin.next_line().await {
        if line.trim() == "refresh" {
            println!("{}", idp.issue_refresh_token(MAILBOX));
        }
    }
    drop(idp);
    drop(pki);
}

/// The world process, seen from the benchmark.
pub struct World {
    pub info: WorldInfo,
    pub pid: u32,
    stdin: ChildStdin,
    stdout: Lines<BufReader<ChildStdout>>,
    _child: Child,
}

impl World {
    pub async fn spawn(fetch_bytes: usize) -> Result<World, String> {
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        let mut child = Command::new(exe)
            .args(["--world", "--fetch-bytes", &fetch_bytes.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("cannot start the world process: {e}"))?;
        let pid = child.id().unwrap_or(0);
        let stdout = child.stdout.take().expect("piped");
        let stdin = child.stdin.take().expect("piped");
        let mut lines = BufReader::new(stdout).lines();
        let line = tokio::time::timeout(Duration::from_secs(60), lines.next_line())
            .await
            .map_err(|_| "the world process did not start within 60 s".to_string())?
            .map_err(|e| e.to_string())?
            .ok_or("the world process exited at start")?;
        let info = serde_json::from_str(&line).map_err(|e| format!("world said {line:?}: {e}"))?;
        Ok(World {
            info,
            pid,
            stdin,
            stdout: lines,
            _child: child,
        })
    }

    /// A new refresh token for MAILBOX, for a proxy's grant file.
    pub async fn refresh_token(&mut self) -> Result<String, String> {
        self.stdin
            .write_all(b"refresh\n")
            .await
            .map_err(|e| e.to_string())?;
        self.stdin.flush().await.map_err(|e| e.to_string())?;
        tokio::time::timeout(Duration::from_secs(10), self.stdout.next_line())
            .await
            .map_err(|_| "the world process did not answer".to_string())?
            .map_err(|e| e.to_string())?
            .ok_or_else(|| "the world process exited".to_string())
    }
}
