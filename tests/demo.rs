//! The demo (`cargo run --example demo`, README "Try it without an Azure
//! tenant") does what it prints: with the settings it shows, a client reads
//! the welcome message over IMAP, sends a message over SMTP that arrives in
//! the INBOX, /metrics counts the logins, and Ctrl-C stops it cleanly.
//!
//! It runs the example's binary, which `cargo test` builds with the other
//! targets (alone, `cargo test --test demo` builds it first).

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use testkit::proxy::free_port;
use testkit::world::LineClient;

/// target/debug/examples/demo, beside the proxy binary's folder, built if it
/// is missing or older than its sources (`cargo test --test demo` alone does
/// not build examples).
fn demo_binary() -> PathBuf {
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_xoauth2-proxy"));
    let demo = bin.parent().unwrap().join("examples").join("demo");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = std::process::Command::new(cargo)
        .args(["build", "--example", "demo"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdout(Stdio::null())
        .status()
        .expect("cargo runs");
    assert!(status.success(), "`cargo build --example demo` failed");
    assert!(demo.exists(), "no {}", demo.display());
    demo
}

struct Demo {
    child: Child,
    stdout: Vec<String>,
    stderr: Arc<Mutex<Vec<u8>>>,
}

impl Demo {
    fn log(&self) -> String {
        format!(
            "stdout:\n{}\nstderr:\n{}",
            self.stdout.join("\n"),
            String::from_utf8_lossy(&self.stderr.lock().unwrap())
        )
    }

    /// The value after `label` on the printed line that starts with it.
    fn field(&self, label: &str) -> Vec<String> {
        let line = self
            .stdout
            .iter()
            .find(|l| l.trim_start().starts_with(label))
            .unwrap_or_else(|| panic!("the demo printed no {label:?} line; {}", self.log()));
        line.trim_start()[label.len()..]
            .split_whitespace()
            .map(str::to_string)
            .collect()
    }
}

async fn start(imap: u16, smtp: u16, admin: u16) -> Demo {
    let mut child = Command::new(demo_binary())
        .args(["--imap-port", &imap.to_string()])
        .args(["--smtp-port", &smtp.to_string()])
        .args(["--admin-port", &admin.to_string()])
        .env("RUST_LOG", "info")
        .env(
            "XOAUTH2_PROXY_STATE_DIR",
            "/nonexistent/the-demo-must-ignore-this",
        )
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("the demo starts");
    let stderr = testkit::proxy::collect(child.stderr.take().unwrap());
    let mut demo = Demo {
        child,
        stdout: Vec::new(),
        stderr,
    };
    let mut lines = BufReader::new(demo.child.stdout.take().unwrap()).lines();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let line = tokio::time::timeout_at(deadline.into(), lines.next_line()).await;
        match line {
            Ok(Ok(Some(line))) => {
                let done = line.contains("Press Ctrl-C to stop.");
                demo.stdout.push(line);
                if done {
                    break;
                }
            }
            _ => panic!("the demo did not get ready; {}", demo.log()),
        }
    }
    // Keep reading stdout, so that the demo never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    demo
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_serves_a_mailbox_with_the_settings_it_prints() {
    let (imap_port, smtp_port, admin_port) = (free_port(), free_port(), free_port());
    let mut demo = start(imap_port, smtp_port, admin_port).await;

    // What a newcomer copies into a mail client.
    let imap = demo.field("IMAP server");
    let smtp = demo.field("SMTP server");
    assert_eq!(imap[..3], ["127.0.0.1", "port", &imap_port.to_string()]);
    assert_eq!(smtp[..3], ["127.0.0.1", "port", &smtp_port.to_string()]);
    assert!(imap.join(" ").contains("secure: false"), "{}", demo.log());
    let user = demo.field("username")[0].clone();
    let pass = demo.field("password")[0].clone();
    let imap_addr = format!("{}:{}", imap[0], imap[2]).parse().unwrap();
    let smtp_addr = format!("{}:{}", smtp[0], smtp[2]).parse().unwrap();
    assert!(
        demo.stdout.iter().any(|l| l.contains("is authorised")),
        "the demo ran `login`; {}",
        demo.log()
    );

    // IMAP: log in with the printed password, read the welcome message.
    let mut c = LineClient::connect(imap_addr).await;
    assert!(c.read().await.unwrap().starts_with("* OK"));
    c.line(&format!("a LOGIN \"{user}\" \"{pass}\"")).await;
    let reply = c.until("a ").await;
    assert!(reply.last().unwrap().starts_with("a OK"), "{reply:?}");
    c.line("b SELECT INBOX").await;
    assert!(c.until("b ").await.last().unwrap().starts_with("b OK"));
    c.line("c FETCH 1 BODY[]").await;
    let message = c.until("c ").await.join("\n");
    assert!(
        message.contains("Subject: Welcome to the xoauth2-proxy demo"),
        "{message}"
    );

    // SMTP: send a message to the same mailbox, authenticated as nodemailer does.
    let mut s = LineClient::connect(smtp_addr).await;
    assert!(s.read().await.unwrap().starts_with("220"));
    s.line("EHLO demo-test").await;
    let ehlo = s.until("250 ").await;
    assert!(
        ehlo.iter()
            .any(|l| l.contains("AUTH") && l.contains("PLAIN"))
    );
    let plain =
        base64::engine::general_purpose::STANDARD.encode(format!("\0{user}\0{pass}").as_bytes());
    s.line(&format!("AUTH PLAIN {plain}")).await;
    assert!(s.read().await.unwrap().starts_with("235"));
    s.line(&format!("MAIL FROM:<{user}>")).await;
    assert!(s.read().await.unwrap().starts_with("250"));
    s.line(&format!("RCPT TO:<{user}>")).await;
    assert!(s.read().await.unwrap().starts_with("250"));
    s.line("DATA").await;
    assert!(s.read().await.unwrap().starts_with("354"));
    s.send(b"Subject: Sent through the demo\r\n\r\nHello.\r\n.\r\n")
        .await;
    let accepted = s.read().await.unwrap();
    assert!(accepted.starts_with("250"), "{accepted}");
    s.line("QUIT").await;

    // The demo delivers it to the INBOX.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut n = 0;
    loop {
        n += 1;
        c.line(&format!("d{n} FETCH 2 BODY[]")).await;
        let reply = c.until(&format!("d{n} ")).await.join("\n");
        if reply.contains("Subject: Sent through the demo") {
            break;
        }
        assert!(Instant::now() < deadline, "not delivered: {reply}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    c.line("z LOGOUT").await;

    // The admin listener the demo printed `curl` lines for.
    let metrics = reqwest::get(format!("http://127.0.0.1:{admin_port}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let imap_ok = [("protocol", "imap"), ("outcome", "ok")];
    let logins = testkit::metrics::value(&metrics, "xoauth2_proxy_logins_total", &imap_ok);
    assert!(logins >= Some(1.0), "{metrics}");

    // Ctrl-C stops it, with status 0.
    let pid = demo.child.id().unwrap();
    let kill = std::process::Command::new("kill")
        .args(["-INT", &pid.to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let status = tokio::time::timeout(Duration::from_secs(15), demo.child.wait())
        .await
        .expect("the demo stops after Ctrl-C")
        .unwrap();
    assert!(status.success(), "{status}; {}", demo.log());
}
