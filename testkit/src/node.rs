//! The Node.js mail clients NocoBase uses (imapflow, nodemailer), driven by the
//! scripts in `tests/node/`, whose dependencies `tests/node/package-lock.json`
//! pins. [`modules`] installs them on first use, so that `cargo test` alone is
//! the whole test command.
//!
//! Test binaries run in parallel, so the install is guarded by a file lock:
//! `npm ci` runs under an exclusive lock, and only when the stamp in
//! `node_modules` does not name the current lock file's digest; every process
//! that uses the modules then holds a shared lock until it exits, so a changed
//! lock file never makes `npm ci` delete `node_modules` under a running test.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use serde_json::{Value, json};
use sha2::{Digest, Sha256};

/// Where the stamp lives: inside `node_modules`, so that it goes when they go.
const STAMP: &str = "node_modules/.installed-from-lock";

/// The folder of the Node.js drivers, `tests/node`, with its locked
/// dependencies installed. Panics with one sentence saying what to do when
/// Node.js or npm is missing or the install fails.
pub fn modules() -> &'static Path {
    static READY: OnceLock<(PathBuf, File)> = OnceLock::new();
    let (dir, _shared_lock) = READY.get_or_init(|| {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/node");
        let dir = dir.canonicalize().unwrap_or(dir);
        match install(&dir) {
            Ok(lock) => (dir, lock),
            Err(sentence) => panic!("{sentence}"),
        }
    });
    dir
}

/// Makes `node_modules` match the lock file; returns the lock file handle
/// holding a shared lock.
fn install(dir: &Path) -> Result<File, String> {
    for tool in ["node", "npm"] {
        let found = Command::new(tool)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !found {
            return Err(format!(
                "the tests that drive imapflow and nodemailer need `{tool}`, which is not on PATH: \
                 install Node.js 20 and npm, then run cargo test again"
            ));
        }
    }
    let lock_json = std::fs::read(dir.join("package-lock.json"))
        .map_err(|e| format!("cannot read {}/package-lock.json: {e}", dir.display()))?;
    let digest = hex(&Sha256::digest(&lock_json));
    let installed = || std::fs::read_to_string(dir.join(STAMP)).is_ok_and(|s| s.trim() == digest);
    let guard = dir.join("node_modules.lock");
    let lock = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&guard)
        .map_err(|e| format!("cannot open {}: {e}", guard.display()))?;
    loop {
        lock.lock_shared()
            .map_err(|e| format!("cannot lock {}: {e}", guard.display()))?;
        if installed() {
            return Ok(lock);
        }
        // Trade the shared lock for the exclusive one; whoever holds it may
        // have installed meanwhile, so look again before running npm.
        lock.unlock()
            .map_err(|e| format!("cannot unlock {}: {e}", guard.display()))?;
        lock.lock()
            .map_err(|e| format!("cannot lock {}: {e}", guard.display()))?;
        if !installed() {
            npm_ci(dir)?;
            std::fs::write(dir.join(STAMP), &digest)
                .map_err(|e| format!("cannot write {}/{STAMP}: {e}", dir.display()))?;
        }
        lock.unlock()
            .map_err(|e| format!("cannot unlock {}: {e}", guard.display()))?;
    }
}

fn npm_ci(dir: &Path) -> Result<(), String> {
    let out = Command::new("npm")
        .args(["ci", "--no-audit", "--no-fund", "--loglevel=error"])
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run npm ci in {}: {e}", dir.display()))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "npm ci in {} failed ({}), so the imapflow and nodemailer tests cannot run; \
             fix what npm says and run cargo test again:\n{}",
            dir.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// The repository's root, where the drivers have always been run from.
fn repository() -> &'static Path {
    modules()
        .parent()
        .and_then(Path::parent)
        .expect("tests/node lies two folders below the repository")
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `NODE_EXTRA_CA_CERTS` for a driver whose options name `nodeExtraCaCerts`:
/// how a deployment (NocoBase's container) makes Node trust an extra CA,
/// with every other certificate check left on.
fn extra_ca_certs(command: &mut tokio::process::Command, options: &Value) {
    command.env_remove("NODE_EXTRA_CA_CERTS");
    if let Some(path) = options.get("nodeExtraCaCerts").and_then(Value::as_str) {
        command.env("NODE_EXTRA_CA_CERTS", path);
    }
}

/// Runs `tests/node/imapflow_session.mjs <args>` and returns the JSON line it
/// printed. Never waits more than `timeout_secs` (the driver's own deadline is
/// shorter); a timeout or an unparsable output is returned as `{"ok":false,…}`.
pub async fn imapflow(args: &Value, timeout_secs: u64) -> Value {
    let mut command = tokio::process::Command::new("node");
    extra_ca_certs(&mut command, args);
    command
        .current_dir(repository())
        .arg(modules().join("imapflow_session.mjs"))
        .arg(args.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let child = match command.spawn() {
        Ok(c) => c,
        Err(e) => {
            return json!({"ok": false, "message": format!("cannot run node: {e}"), "code": "SPAWN"});
        }
    };
    let output = match tokio::time::timeout(
        Duration::from_secs(timeout_secs),
        child.wait_with_output(),
    )
    .await
    {
        Ok(Ok(o)) => o,
        Ok(Err(e)) => {
            return json!({"ok": false, "message": format!("node failed: {e}"), "code": "SPAWN"});
        }
        Err(_) => {
            return json!({"ok": false, "message": "imapflow driver timed out", "code": "TIMEOUT"});
        }
    };
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    stdout
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str::<Value>(l.trim()).ok())
        .unwrap_or_else(|| {
            json!({
                "ok": false,
                "message": "no JSON from the imapflow driver",
                "code": "NO_OUTPUT",
                "stdout": stdout.to_string(),
                "stderr": stderr.to_string(),
                "status": output.status.code(),
            })
        })
}

/// Runs `tests/node/nodemailer_send.mjs` with `opts`; returns its last line as
/// JSON. Panics when it does not finish within two minutes or prints no JSON.
pub async fn nodemailer(opts: Value) -> Value {
    let mut command = tokio::process::Command::new("node");
    extra_ca_certs(&mut command, &opts);
    let out = tokio::time::timeout(
        Duration::from_secs(120),
        command
            .arg(modules().join("nodemailer_send.mjs"))
            .arg(opts.to_string())
            .current_dir(repository())
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("nodemailer finished in time")
    .expect("run node");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let line = stdout
        .lines()
        .last()
        .unwrap_or_else(|| panic!("no output from nodemailer_send.mjs; stderr: {stderr}"));
    serde_json::from_str(line)
        .unwrap_or_else(|err| panic!("bad JSON from node ({err}): {stdout}; stderr: {stderr}"))
}
