//! A real PostgreSQL server (Debian's `postgresql` package) for the tests of
//! the shared grant store: a new cluster in a temporary directory, on a free
//! loopback port, with a password (so tests can check it never reaches a
//! log), stopped and started again at will, removed when dropped.
//!
//! PostgreSQL refuses to run as root, and CI runs as root: then the cluster
//! belongs to `nobody` and the server runs as that user (the tests only talk
//! to it over TCP).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::process::{Child, Command};

use crate::proxy::{collect, free_port};

/// Where Debian puts the server's programs; `$PG_BIN` wins.
fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("PG_BIN") {
        return PathBuf::from(dir);
    }
    let root = Path::new("/usr/lib/postgresql");
    let mut versions: Vec<PathBuf> = std::fs::read_dir(root)
        .map(|d| d.filter_map(|e| Some(e.ok()?.path().join("bin"))).collect())
        .unwrap_or_default();
    versions.sort();
    versions.pop().unwrap_or_else(|| {
        panic!("PostgreSQL is not installed: `apt-get install postgresql` (or set PG_BIN)")
    })
}

/// The password of the cluster's `postgres` role (a secret the logs must
/// never show).
pub const PASSWORD: &str = "pg-Secret-7Hq2xW";

/// The server listens here too, so that one client's path to it can be cut
/// while the others keep theirs.
pub const SECOND_ADDRESS: std::net::Ipv4Addr = std::net::Ipv4Addr::new(127, 0, 0, 2);

/// The user the server runs as when the tests run as root.
const NOBODY: u32 = 65534;

/// A running (or stopped) PostgreSQL cluster.
pub struct TestPostgres {
    dir: tempfile::TempDir,
    pub port: u16,
    child: Option<Child>,
    log: Arc<Mutex<Vec<u8>>>,
    as_nobody: bool,
}

impl TestPostgres {
    /// Makes a cluster and starts its server.
    pub async fn start() -> TestPostgres {
        let dir = tempfile::tempdir().unwrap();
        let as_nobody = is_root();
        let pwfile = dir.path().join("pwfile");
        std::fs::write(&pwfile, PASSWORD).unwrap();
        if as_nobody {
            chown_nobody(dir.path());
            chown_nobody(&pwfile);
        }
        let mut initdb = Command::new(bin_dir().join("initdb"));
        initdb
            .arg("-D")
            .arg(dir.path().join("data"))
            .args(["-U", "postgres", "--auth=scram-sha-256", "--no-locale"])
            .args(["--encoding=UTF8", "--no-sync"])
            .arg(format!("--pwfile={}", pwfile.display()))
            .stdin(Stdio::null());
        if as_nobody {
            initdb.uid(NOBODY).gid(NOBODY);
        }
        let out = initdb.output().await.expect("initdb runs");
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut pg = TestPostgres {
            dir,
            port: free_port(),
            child: None,
            log: Arc::new(Mutex::new(Vec::new())),
            as_nobody,
        };
        pg.start_again().await;
        pg
    }

    /// The URL of the `postgres` database, with the password.
    pub fn url(&self) -> String {
        format!(
            "postgres://postgres:{PASSWORD}@127.0.0.1:{}/postgres?sslmode=disable",
            self.port
        )
    }

    /// [`url`](Self::url) through `addr`, another loopback address the
    /// server listens on ([`SECOND_ADDRESS`]): a client that connects
    /// through it can be cut off alone ([`crate::partition`]).
    pub fn url_at(&self, addr: std::net::Ipv4Addr) -> String {
        self.url().replace("@127.0.0.1:", &format!("@{addr}:"))
    }

    /// Everything the server logged since it was last started.
    pub fn logs(&self) -> String {
        String::from_utf8_lossy(&self.log.lock().unwrap()).into_owned()
    }

    /// Starts the stopped server again (same data, same port) and waits
    /// until it accepts connections.
    pub async fn start_again(&mut self) {
        assert!(self.child.is_none(), "already running");
        self.log.lock().unwrap().clear();
        let mut server = Command::new(bin_dir().join("postgres"));
        server
            .arg("-D")
            .arg(self.dir.path().join("data"))
            .arg("-p")
            .arg(self.port.to_string())
            .arg("-k")
            .arg(self.dir.path())
            .args([
                "-c",
                "listen_addresses=127.0.0.1,127.0.0.2",
                "-c",
                "fsync=off",
            ])
            .args(["-c", "max_connections=100"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        if self.as_nobody {
            server.uid(NOBODY).gid(NOBODY);
        }
        let mut child = server.spawn().expect("postgres starts");
        self.log = collect(child.stderr.take().unwrap());
        self.child = Some(child);
        self.wait_for_log("database system is ready to accept connections")
            .await;
    }

    async fn wait_for_log(&mut self, needle: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.logs().contains(needle) {
            let exited = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            if exited.is_some() || Instant::now() > deadline {
                panic!("PostgreSQL did not start; its log:\n{}", self.logs());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops the server (fast shutdown: sessions are ended) and waits for it.
    pub async fn stop(&mut self) {
        let mut child = self.child.take().expect("running");
        signal(child.id().unwrap(), "INT");
        tokio::time::timeout(Duration::from_secs(30), child.wait())
            .await
            .expect("PostgreSQL stops")
            .unwrap();
    }

    /// Restarts the server with TLS on, presenting `cert_pem` (the chain)
    /// and `key_pem`; clients may still connect without TLS.
    pub async fn use_tls(&mut self, cert_pem: &str, key_pem: &str) {
        self.stop().await;
        let data = self.dir.path().join("data");
        let (cert, key) = (data.join("server.crt"), data.join("server.key"));
        std::fs::write(&cert, cert_pem).unwrap();
        std::fs::write(&key, key_pem).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        if self.as_nobody {
            chown_nobody(&cert);
            chown_nobody(&key);
        }
        let conf = data.join("postgresql.conf");
        let mut text = std::fs::read_to_string(&conf).unwrap();
        text.push_str("\nssl = on\n");
        std::fs::write(&conf, text).unwrap();
        self.start_again().await;
    }

    /// Runs `sql` with psql as `postgres` and returns its output (rows one
    /// a line, columns split by `|`).
    pub async fn psql(&self, sql: &str) -> String {
        let out = Command::new(bin_dir().join("psql"))
            .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", sql])
            .arg(self.url())
            .stdin(Stdio::null())
            .output()
            .await
            .expect("psql runs");
        assert!(
            out.status.success(),
            "psql failed on {sql:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    }
}

impl Drop for TestPostgres {
    fn drop(&mut self) {
        // Immediate shutdown: the server ends its own processes.
        if let Some(pid) = self.child.as_ref().and_then(|c| c.id()) {
            signal(pid, "QUIT");
        }
    }
}

fn signal(pid: u32, name: &str) {
    let _ = std::process::Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .status();
}

fn is_root() -> bool {
    std::process::Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|out| out.stdout.starts_with(b"0\n"))
}

fn chown_nobody(path: &Path) {
    std::os::unix::fs::chown(path, Some(NOBODY), Some(NOBODY)).unwrap();
}
