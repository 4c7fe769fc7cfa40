//! The benchmark harness: xoauth2-proxy side by side with a direct TLS
//! connection and with email-oauth2-proxy, in one run on one machine.
//!
//! ```text
//! cargo run --release --example bench            # the full run (≈ 8 minutes), prints the table
//! cargo run --release --example bench -- --quick # a smaller run to try the harness
//! cargo run --release --example bench -- --help
//! ```
//!
//! It builds and runs the release binary `target/release/xoauth2-proxy`
//! with a generated config; starts, in a process of its own, a fast TLS
//! IMAP/SMTP stand-in that checks XOAUTH2 (examples/bench/standin.rs) and the
//! tests' mock identity provider (testkit/src/idp/); installs
//! email-oauth2-proxy (PyPI `emailproxy`) into target/bench/ and runs it
//! headless against the same stand-in and identity provider; and drives all
//! the clients itself; the `tls` part also opens the proxy's IMAP over TLS
//! listener (`[tls]` with its self-made CA) and logs in and fetches through
//! it. Runs alternate between the paths; figures are medians
//! with min–max. Everything stays on loopback, and every loop is bounded in
//! count and time. See docs/benchmarks.md.

mod burst;
mod charts;
mod client;
mod dovecot;
mod guess;
mod latency;
mod measure;
mod procs;
mod report;
mod standin;
mod world;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use client::{Credentials, Imap, Route, Smtp};
use measure::Cpu;
use report::{Idle, Results, Via, slot};

/// Benchmarks xoauth2-proxy against a direct TLS connection and against
/// email-oauth2-proxy, on loopback, and prints a markdown table.
#[derive(Parser, Debug, Clone)]
#[command(name = "bench")]
struct Args {
    /// A smaller, faster run for trying the harness (not for the published table).
    #[arg(long)]
    quick: bool,
    /// Size of the message fetched with UID FETCH BODY.PEEK[], in MiB [default: 100; quick: 20].
    #[arg(long)]
    fetch_mib: Option<usize>,
    /// Size of the APPENDed message, in MiB [default: 50; quick: 10].
    #[arg(long)]
    append_mib: Option<usize>,
    /// Size of the message sent with SMTP DATA, in MiB [default: 30; quick: 10].
    #[arg(long)]
    smtp_mib: Option<usize>,
    /// Runs per path of each throughput figure [default: 5; quick: 3].
    #[arg(long)]
    reps: Option<usize>,
    /// Runs per throughput figure through email-oauth2-proxy [default: 3; quick: 2].
    #[arg(long)]
    peer_reps: Option<usize>,
    /// Login cycles per path, proxy and direct [default: 1000; quick: 200].
    #[arg(long)]
    login_cycles: Option<usize>,
    /// Login cycles through email-oauth2-proxy (each costs it ~0.25 s of PBKDF2) [default: 40; quick: 10].
    #[arg(long)]
    peer_login_cycles: Option<usize>,
    /// Idle-session tiers, comma-separated; a tier above what the file-descriptor
    /// limit allows is lowered to fit [default: 1000,10000; quick: 100,1000].
    #[arg(long, value_delimiter = ',')]
    sessions: Option<Vec<usize>>,
    /// Idle-session tiers for email-oauth2-proxy [default: 1000; quick: 100].
    #[arg(long, value_delimiter = ',')]
    peer_sessions: Option<Vec<usize>>,
    /// How long the sessions sit idle while CPU is measured, in seconds [default: 30; quick: 5].
    #[arg(long)]
    idle_secs: Option<u64>,
    /// Time allowed for opening one tier of email-oauth2-proxy sessions, in seconds [default: 120; quick: 30].
    #[arg(long)]
    peer_setup_secs: Option<u64>,
    /// Round-trip time the `latency` part's shim adds, in ms (half each way) [default: 20].
    #[arg(long, default_value_t = 20)]
    rtt_ms: u64,
    /// Cycles per path of the `latency` part [default: 200; quick: 40].
    #[arg(long)]
    latency_cycles: Option<usize>,
    /// Parallel wrong logins of each attack of the `guess` part [default: 1000; quick: 200].
    #[arg(long)]
    guess_logins: Option<usize>,
    /// Sessions of each tier of the `burst` part, comma-separated [default: 200,1000; quick: 50,200].
    #[arg(long, value_delimiter = ',')]
    burst_sessions: Option<Vec<usize>>,
    /// Size of each transfer of the `burst` part, in MiB [default: 4; quick: 2].
    #[arg(long)]
    burst_mib: Option<usize>,
    /// Parts to run, comma-separated: throughput, login, latency, tls, idle, burst, dovecot, guess [default: all].
    /// `burst` opens many sessions, has each transfer a few MiB at once, and
    /// reads the proxy's RSS before, at the peak and after, when all are idle again.
    /// `latency` puts a delay shim on the upstream hop and compares logins
    /// direct, through the proxy cold and through the proxy warm.
    /// `tls` adds the proxy's IMAP over TLS listener (a self-made CA) to the
    /// login cycles and to the FETCH runs, beside its plain listener.
    #[arg(long, value_delimiter = ',')]
    only: Option<Vec<String>>,
    /// Leave email-oauth2-proxy out.
    #[arg(long)]
    no_peer: bool,
    /// Leave the Dovecot run out.
    #[arg(long)]
    no_dovecot: bool,
    /// The proxy binary to measure [default: build and use target/release/xoauth2-proxy].
    #[arg(long)]
    proxy_bin: Option<PathBuf>,
    /// The Python that makes the virtualenv for email-oauth2-proxy.
    #[arg(long, default_value = "python3")]
    python: String,
    /// The emailproxy version to install.
    #[arg(long, default_value = procs::EMAILPROXY_VERSION)]
    emailproxy_version: String,
    /// Where to write the SVG charts (relative to the repository) [default: docs/benchmarks].
    #[arg(long)]
    charts: Option<PathBuf>,
    /// Write no charts.
    #[arg(long)]
    no_charts: bool,
    /// Also write the report (markdown) to this file.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Internal: run as the upstream side (the stand-in and the identity provider).
    #[arg(long, hide = true)]
    world: bool,
    /// Internal: the size of the stand-in's message, in bytes.
    #[arg(long, hide = true, default_value_t = 0)]
    fetch_bytes: usize,
}

/// The settings of one run, defaults filled in.
#[derive(Debug, Clone)]
struct Plan {
    fetch_bytes: usize,
    append_bytes: usize,
    smtp_bytes: usize,
    reps: usize,
    peer_reps: usize,
    login_cycles: usize,
    peer_login_cycles: usize,
    guess_logins: usize,
    rtt: Duration,
    latency_cycles: usize,
    sessions: Vec<usize>,
    peer_sessions: Vec<usize>,
    burst_sessions: Vec<usize>,
    burst_bytes: usize,
    idle_secs: u64,
    peer_setup: Duration,
    parts: Vec<String>,
    peer: bool,
    dovecot: bool,
}

impl Plan {
    fn from(a: &Args) -> Plan {
        let q = a.quick;
        let pick =
            |v: Option<usize>, full: usize, quick: usize| v.unwrap_or(if q { quick } else { full });
        const MIB: usize = 1024 * 1024;
        Plan {
            fetch_bytes: pick(a.fetch_mib, 100, 20) * MIB,
            append_bytes: pick(a.append_mib, 50, 10) * MIB,
            smtp_bytes: pick(a.smtp_mib, 30, 10) * MIB,
            reps: pick(a.reps, 5, 3).max(1),
            peer_reps: pick(a.peer_reps, 3, 2),
            login_cycles: pick(a.login_cycles, 1000, 200).max(10),
            peer_login_cycles: pick(a.peer_login_cycles, 40, 10),
            guess_logins: pick(a.guess_logins, 1000, 200).max(1),
            rtt: Duration::from_millis(a.rtt_ms),
            latency_cycles: pick(a.latency_cycles, 200, 40).max(1),
            sessions: a.sessions.clone().unwrap_or(if q {
                vec![100, 1000]
            } else {
                vec![1000, 10000]
            }),
            burst_sessions: a.burst_sessions.clone().unwrap_or(if q {
                vec![50, 200]
            } else {
                vec![200, 1000]
            }),
            burst_bytes: pick(a.burst_mib, 4, 2).max(1) * MIB,
            peer_sessions: a.peer_sessions.clone().unwrap_or(if q {
                vec![100]
            } else {
                vec![1000]
            }),
            idle_secs: a.idle_secs.unwrap_or(if q { 5 } else { 30 }),
            peer_setup: Duration::from_secs(a.peer_setup_secs.unwrap_or(if q { 30 } else { 120 })),
            parts: a.only.clone().unwrap_or_else(|| {
                [
                    "throughput",
                    "login",
                    "latency",
                    "tls",
                    "idle",
                    "burst",
                    "dovecot",
                    "guess",
                ]
                .map(String::from)
                .to_vec()
            }),
            peer: !a.no_peer,
            dovecot: !a.no_dovecot,
        }
    }

    fn runs(&self, part: &str) -> bool {
        self.parts.iter().any(|p| p == part)
    }
}

fn main() {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("the runtime starts");
    if args.world {
        runtime.block_on(world::serve(args.fetch_bytes));
        return;
    }
    if let Err(e) = runtime.block_on(run(args)) {
        eprintln!("bench: {e}");
        std::process::exit(1);
    }
}

fn say(text: &str) {
    eprintln!("bench: {text}");
}

/// Raises this process's soft RLIMIT_NOFILE to its hard limit (children
/// inherit it); returns (soft before, hard).
fn raise_fd_limit() -> (u64, u64) {
    let read = || -> Option<(u64, u64)> {
        let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
        let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
        let mut nums = line.split_whitespace().filter_map(|w| {
            w.parse::<u64>()
                .ok()
                .or((w == "unlimited").then_some(u64::MAX))
        });
        Some((nums.next()?, nums.next()?))
    };
    let Some((soft, hard)) = read() else {
        return (0, 0);
    };
    if soft < hard {
        let hard_text = if hard == u64::MAX {
            "unlimited".to_string()
        } else {
            hard.to_string()
        };
        let _ = std::process::Command::new("prlimit")
            .arg(format!("--pid={}", std::process::id()))
            .arg(format!("--nofile={hard_text}:{hard_text}"))
            .status();
    }
    (soft, hard)
}

fn current_fd_limit() -> u64 {
    std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|l| {
            l.lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(3)?.parse().ok())
        })
        .unwrap_or(1024)
}

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Builds the release binary (quick when it is up to date) and returns its path.
fn build_proxy() -> Result<PathBuf, String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    say("building target/release/xoauth2-proxy");
    let status = std::process::Command::new(cargo)
        .args(["build", "--release", "--quiet", "--bin", "xoauth2-proxy"])
        .current_dir(repo_root())
        .status()
        .map_err(|e| format!("cargo build: {e}"))?;
    if !status.success() {
        return Err("cargo build --release failed".into());
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target"));
    Ok(target.join("release/xoauth2-proxy"))
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map(|kib| format!("{:.1} GiB", kib as f64 / 1024.0 / 1024.0))
        .unwrap_or_default();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    format!("{cores} cores ({cpu}), {mem} RAM, Linux {kernel}")
}

fn git_version() -> String {
    let out = std::process::Command::new("git")
        .args(["describe", "--always", "--dirty"])
        .current_dir(repo_root())
        .output();
    match out {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).trim().to_string(),
        _ => "unknown".into(),
    }
}

/// The TLS client configuration of the direct path: trusts the test CA only.
fn tls_config(ca_file: &Path) -> Result<Arc<rustls::ClientConfig>, String> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let ca = CertificateDer::pem_file_iter(ca_file)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("{}: {e}", ca_file.display()))?;
    Ok(testkit::pki::client_config_trusting(ca))
}

/// One way to the mailbox: its routes, how it logs in, and whose CPU to count.
#[derive(Clone)]
struct Way {
    via: Via,
    imap: Route,
    smtp: Route,
    credentials: Credentials,
    /// The proxy process (none for the direct path).
    pid: Option<u32>,
}

fn password_credentials() -> Credentials {
    Credentials::Password {
        user: world::MAILBOX.into(),
        password: procs::password().into(),
    }
}

fn proxied(via: Via, running: &procs::Running) -> Way {
    Way {
        via,
        imap: Route::Plain(running.imap),
        smtp: Route::Plain(running.smtp),
        credentials: password_credentials(),
        pid: Some(running.pid),
    }
}

async fn run(args: Args) -> Result<(), String> {
    let plan = Plan::from(&args);
    let started = Instant::now();
    let (fd_before, fd_hard) = raise_fd_limit();
    let fd_limit = current_fd_limit();
    say(&format!(
        "file-descriptor limit: soft {fd_before} raised to {fd_limit} (hard limit {fd_hard})"
    ));
    let bin = match &args.proxy_bin {
        Some(p) => p.clone(),
        None => build_proxy()?,
    };
    let version = git_version();
    let password_hash = procs::hash_password(&bin, procs::password())?;

    say("starting the stand-in and the mock identity provider");
    let mut world = world::World::spawn(plan.fetch_bytes).await?;
    let info = world.info.clone();
    let tls = tls_config(Path::new(&info.ca_file))?;
    let connector = client::connector(tls.clone());
    let direct = Way {
        via: Via::Direct,
        imap: Route::Tls {
            addr: ([127, 0, 0, 1], info.imap_port).into(),
            name: "localhost".into(),
            connector: connector.clone(),
        },
        smtp: Route::Tls {
            addr: ([127, 0, 0, 1], info.smtp_port).into(),
            name: "localhost".into(),
            connector: connector.clone(),
        },
        credentials: Credentials::Token {
            user: world::MAILBOX.into(),
            token: info.direct_token.clone(),
        },
        pid: None,
    };

    let peer_script = if plan.peer {
        let venv = repo_root().join("target/bench/emailproxy-venv");
        match procs::ensure_emailproxy(&args.python, &venv, &args.emailproxy_version) {
            Ok(s) => Some(s),
            Err(e) => {
                say(&format!("email-oauth2-proxy is left out: {e}"));
                None
            }
        }
    } else {
        None
    };

    let mut results = Results {
        fetch_bytes: plan.fetch_bytes,
        append_bytes: plan.append_bytes,
        smtp_bytes: plan.smtp_bytes,
        peer_present: peer_script.is_some(),
        ..Default::default()
    };
    let mut notes: Vec<String> = Vec::new();

    if plan.runs("throughput") || plan.runs("login") || plan.runs("tls") {
        let standin = procs::Upstream::standin(&info, world.refresh_token().await?);
        let ours = if plan.runs("tls") {
            match procs::start_ours(&bin, &password_hash, &standin, 4096, true).await {
                Ok(ours) => ours,
                Err(e) => {
                    // A build without local TLS (measured with --proxy-bin).
                    notes.push(format!(
                        "the local TLS rows are left out: xoauth2-proxy did not start with [tls]: {}",
                        e.lines().next().unwrap_or_default()
                    ));
                    let standin = procs::Upstream::standin(&info, world.refresh_token().await?);
                    procs::start_ours(&bin, &password_hash, &standin, 4096, false).await?
                }
            }
        } else {
            procs::start_ours(&bin, &password_hash, &standin, 4096, false).await?
        };
        let peer = match &peer_script {
            Some(script) => match procs::start_peer(script, &info).await {
                Ok(p) => Some(p),
                Err(e) => {
                    notes.push(format!("email-oauth2-proxy did not start: {e}"));
                    results.peer_present = false;
                    None
                }
            },
            None => None,
        };
        let mut paths = vec![proxied(Via::Ours, &ours), direct.clone()];
        let mut full_handshake = None;
        if let Some(p) = &peer {
            paths.push(proxied(Via::Peer, p));
        }
        if let Some(imaps) = ours.imaps {
            // The client trusts the proxy's own CA, as `tls ca` prints it.
            use rustls::pki_types::pem::PemObject;
            let pem = procs::proxy_ca(&bin, &ours)?;
            let ca = rustls::pki_types::CertificateDer::pem_slice_iter(pem.as_bytes())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("the proxy's CA: {e}"))?;
            let config = testkit::pki::client_config_trusting(ca);
            let mut way = proxied(Via::OursTls, &ours);
            way.imap = Route::Tls {
                addr: imaps,
                name: "localhost".into(),
                connector: client::connector(config.clone()),
            };
            paths.push(way);
            // The same client without a session cache: a full handshake each time.
            let mut config = (*config).clone();
            config.resumption = rustls::client::Resumption::disabled();
            let mut way = proxied(Via::OursTls, &ours);
            way.imap = Route::Tls {
                addr: imaps,
                name: "localhost".into(),
                connector: client::connector(Arc::new(config)),
            };
            full_handshake = Some(way);
        }
        // Without the full parts, `tls` measures its path beside the plain
        // listener and the direct path only (no peer).
        let tls_only: Vec<Way> = paths
            .iter()
            .filter(|p| p.via != Via::Peer)
            .cloned()
            .collect();
        // Warm up: the first login of each proxy fetches a token (and checks argon2).
        for p in &paths {
            for _ in 0..3 {
                if let Err(e) = client::login_cycle(&p.imap, &p.credentials).await {
                    return Err(format!("a first login via {} failed: {e}", p.via.name()));
                }
            }
        }
        // Whether the client's TLS handshakes resume (rustls keeps a session
        // cache by default; both TLS paths get the same client settings).
        let mut kinds = Vec::new();
        for p in &paths {
            if let Ok(Some(kind)) = p.imap.handshake_kind().await {
                kinds.push(format!("{} {kind}", p.via.name()));
            }
        }
        if !kinds.is_empty() {
            notes.push(format!(
                "the client's TLS handshakes after the warm-up (rustls with its default session cache): {}",
                kinds.join(", ")
            ));
        }
        if plan.runs("throughput") {
            let kinds = [Transfer::Fetch, Transfer::Append, Transfer::Smtp];
            throughput(&plan, &paths, &kinds, &mut results, Some(world.pid)).await;
        } else if plan.runs("tls") {
            throughput(
                &plan,
                &tls_only,
                &[Transfer::Fetch],
                &mut results,
                Some(world.pid),
            )
            .await;
        }
        if plan.runs("login") {
            logins(&plan, &paths, &mut results).await;
        } else if plan.runs("tls") {
            logins(&plan, &tls_only, &mut results).await;
        }
        if let Some(full) = &full_handshake {
            let plain = proxied(Via::Ours, &ours);
            results.tls_full = Some(full_handshake_logins(&plan, &plain, full).await);
        }
        ours.stop().await;
        if let Some(p) = peer {
            p.stop().await;
        }
    }

    let mut latency_section = None;
    if plan.runs("latency") {
        match latency_part(&plan, &bin, &password_hash, &mut world, &direct).await {
            Ok(l) => latency_section = Some(l),
            Err(e) => notes.push(format!("the latency part did not run: {e}")),
        }
    }

    if plan.runs("idle") {
        let max_sessions = (fd_limit.saturating_sub(64) / 2) as usize;
        for &wanted in &plan.sessions {
            let n = wanted.min(max_sessions);
            if n < wanted {
                notes.push(format!(
                    "the {wanted}-session tier ran with {n} sessions: the proxy needs two file descriptors per \
                     session and this machine's hard RLIMIT_NOFILE is {fd_limit} (raising it needs CAP_SYS_RESOURCE, \
                     which this sandbox does not grant)"
                ));
            }
            let standin = procs::Upstream::standin(&info, world.refresh_token().await?);
            let ours = procs::start_ours(&bin, &password_hash, &standin, n + 100, false).await?;
            let path = proxied(Via::Ours, &ours);
            let mut tier = idle_tier(
                &path,
                n,
                plan.idle_secs,
                64,
                Duration::from_secs(300),
                usize::MAX,
                true,
            )
            .await;
            tier.wanted = n;
            results.idle.push(tier);
            ours.stop().await;
        }
        if let Some(script) = &peer_script {
            for &wanted in &plan.peer_sessions {
                let n = wanted.min(max_sessions);
                let peer = match procs::start_peer(script, &info).await {
                    Ok(p) => p,
                    Err(e) => {
                        notes.push(format!(
                            "email-oauth2-proxy did not start for the idle tier: {e}"
                        ));
                        break;
                    }
                };
                let path = proxied(Via::Peer, &peer);
                let mut tier =
                    idle_tier(&path, n, plan.idle_secs, 4, plan.peer_setup, 20, false).await;
                tier.wanted = n;
                results.idle.push(tier);
                peer.stop().await;
            }
        }
    }

    let mut burst_section = None;
    if plan.runs("burst") {
        let tiers = &plan.burst_sessions;
        match burst::run(&bin, &password_hash, tiers, plan.burst_bytes, fd_limit).await {
            Ok(section) => burst_section = Some(section),
            Err(e) => notes.push(format!("the burst part did not run: {e}")),
        }
    }

    let mut report = String::new();
    if plan.runs("throughput") || plan.runs("login") || plan.runs("tls") || plan.runs("idle") {
        report.push_str(&format!(
            "### Against the stand-in (TLS IMAP/SMTP at memory speed)\n\n{}\n{}",
            results.table(),
            results.notes()
        ));
    }
    for n in &notes {
        report.push_str(&format!("- {n}\n"));
    }
    if let Some(latency) = &latency_section {
        report.push_str(&format!("\n{}", latency.section()));
    }
    if let Some(burst) = &burst_section {
        report.push_str(&format!("\n{burst}"));
    }

    if plan.runs("dovecot") && plan.dovecot {
        let refresh = world.refresh_token().await?;
        match dovecot::run(
            &bin,
            &password_hash,
            &info,
            refresh,
            &plan_for_dovecot(&plan),
            &connector,
        )
        .await
        {
            Ok(section) => report.push_str(&format!("\n{section}")),
            Err(e) => report.push_str(&format!("\n### Against Dovecot\n\nNot run: {e}\n")),
        }
    }

    if plan.runs("guess") {
        match guess::run(&bin, &password_hash, &mut world, plan.guess_logins).await {
            Ok(section) => report.push_str(&format!("\n{section}")),
            Err(e) => report.push_str(&format!("\n### Under a guessing attack\n\nNot run: {e}\n")),
        }
    }

    let header = format!(
        "Machine: {}. Proxy: `{}` ({}). Peer: email-oauth2-proxy {}. \
         Run: `cargo run --release --example bench{}` took {:.0} s; file-descriptor limit {} (soft limit was {}).\n\n\
         MB/s are 10^6 bytes per second of message data; \"direct\" is the same client straight to the same \
         upstream over TLS with XOAUTH2; runs alternate between the paths.\n\n",
        machine(),
        bin.display(),
        version,
        if results.peer_present {
            args.emailproxy_version.as_str()
        } else {
            "(not run)"
        },
        {
            let extra: Vec<String> = std::env::args().skip(1).collect();
            if extra.is_empty() {
                String::new()
            } else {
                format!(" -- {}", extra.join(" "))
            }
        },
        started.elapsed().as_secs_f64(),
        fd_limit,
        fd_before,
    );
    if !args.no_charts {
        let dir = args
            .charts
            .clone()
            .unwrap_or_else(|| repo_root().join("docs/benchmarks"));
        let written = charts::draw(&dir, &results, latency_section.as_ref());
        if !written.is_empty() {
            let root = repo_root();
            let names: Vec<String> = written
                .iter()
                .map(|p| p.strip_prefix(&root).unwrap_or(p).display().to_string())
                .collect();
            report.push_str(&format!("\nCharts written: {}\n", names.join(", ")));
        }
    }
    let full = format!("{header}{report}");
    println!("{full}");
    if let Some(out) = &args.out {
        std::fs::write(out, &full).map_err(|e| format!("{}: {e}", out.display()))?;
    }
    drop(world);
    Ok(())
}

/// The `latency` part: a delay shim in front of the stand-in's IMAP port,
/// the direct path through it, and two proxies whose upstream is the shim,
/// one with warm sessions off and one as it ships.
async fn latency_part(
    plan: &Plan,
    bin: &Path,
    password_hash: &str,
    world: &mut world::World,
    direct: &Way,
) -> Result<latency::Latency, String> {
    let info = world.info.clone();
    let standin: std::net::SocketAddr = ([127, 0, 0, 1], info.imap_port).into();
    let one_way = plan.rtt / 2;
    let shim = latency::Shim::start(standin, one_way)
        .await
        .map_err(|e| format!("the delay shim: {e}"))?;
    let mut upstream = procs::Upstream::standin(&info, world.refresh_token().await?);
    upstream.imap.1 = shim.addr.port();
    let cold =
        procs::start_ours_with_imap(bin, password_hash, &upstream, "warm_sessions = 0").await?;
    // The warm proxy has a shim of its own, which severs its waiting
    // session for the dead-session cycles.
    let warm_shim = latency::Shim::start(standin, one_way)
        .await
        .map_err(|e| format!("the delay shim: {e}"))?;
    let mut upstream = procs::Upstream::standin(&info, world.refresh_token().await?);
    upstream.imap.1 = warm_shim.addr.port();
    let warm =
        procs::start_ours_with_imap(bin, password_hash, &upstream, "warm_sessions = 1").await?;
    let mut direct_route = direct.imap.clone();
    if let Route::Tls { addr, .. } = &mut direct_route {
        *addr = shim.addr;
    }
    say(&format!(
        "latency: {} cycles per path over a {} ms round trip",
        plan.latency_cycles,
        plan.rtt.as_millis()
    ));
    let password = password_credentials();
    let (cold_route, warm_route) = (Route::Plain(cold.imap), Route::Plain(warm.imap));
    let routes = [
        (&direct_route, &direct.credentials),
        (&cold_route, &password),
        (&warm_route, &password),
    ];
    let mut result = latency::run(routes, plan.latency_cycles, plan.rtt).await;
    if let Some(admin) = warm.admin {
        let url = format!("http://{admin}/metrics");
        let events = || async {
            match async { reqwest::get(&url).await?.text().await }.await {
                Ok(text) => latency::warm_events(&text),
                Err(_) => Vec::new(),
            }
        };
        result.warm_events = events().await;
        let cycles = (plan.latency_cycles / 5).max(10);
        say(&format!(
            "latency: {cycles} warm cycles with the waiting session severed"
        ));
        (result.dead_warm, result.dead_warm_discards) =
            latency::run_dead_warm(&warm_route, &password, &warm_shim, cycles, events).await;
    }
    cold.stop().await;
    warm.stop().await;
    Ok(result)
}

/// The Dovecot run: fewer repetitions, no peer, no idle tiers.
fn plan_for_dovecot(plan: &Plan) -> dovecot::Plan {
    dovecot::Plan {
        fetch_bytes: plan.fetch_bytes,
        append_bytes: plan.append_bytes,
        reps: plan.reps,
        login_cycles: (plan.login_cycles / 5).max(20),
    }
}

/// The order of the paths for repetition `rep`: rotated, so that each path
/// runs first, second and last equally often.
fn rotated(paths: &[Way], rep: usize) -> Vec<Way> {
    let mut v = paths.to_vec();
    if !v.is_empty() {
        let k = rep % v.len();
        v.rotate_left(k);
    }
    v
}

#[derive(Clone, Copy, Debug)]
enum Transfer {
    Fetch,
    Append,
    Smtp,
}

/// With BENCH_VERBOSE set, one line per timed transfer: rate and the CPU
/// (% of one core) of the proxy, the client and the upstream.
/// What one timed transfer measured.
struct Sample {
    /// 10^6 bytes per second.
    mbps: f64,
    /// CPU of the proxy process (zero for the direct path).
    proxy: Cpu,
    bytes: u64,
    /// CPU of the upstream process (when asked for).
    upstream: Cpu,
    /// CPU of this process, the client.
    client: Cpu,
}

/// The CPU the proxy, the upstream and this process (the client) have used
/// so far; a missing process counts as zero.
#[derive(Clone, Copy)]
struct CpuNow {
    proxy: Cpu,
    upstream: Cpu,
    client: Cpu,
}

impl CpuNow {
    fn read(proxy: Option<u32>, upstream: Option<u32>) -> CpuNow {
        let of = |pid: Option<u32>| pid.map(measure::cpu).unwrap_or_default();
        CpuNow {
            proxy: of(proxy),
            upstream: of(upstream),
            client: measure::cpu(std::process::id()),
        }
    }
}

impl Sample {
    /// Counts this transfer in a path's throughput figures.
    fn add_to(&self, th: &mut report::Throughput) {
        th.mbps.push(self.mbps);
        th.cpu.add(&self.proxy);
        th.client_cpu.add(&self.client);
        th.bytes += self.bytes;
    }

    /// `bytes` moved in `elapsed` between the CPU readings `before` and
    /// `after`; with `BENCH_VERBOSE` set, says so.
    fn between(
        via: Via,
        kind: Transfer,
        bytes: u64,
        elapsed: Duration,
        before: &CpuNow,
        after: &CpuNow,
    ) -> Sample {
        let sample = Sample {
            mbps: bytes as f64 / elapsed.as_secs_f64() / 1e6,
            proxy: after.proxy.since(&before.proxy),
            bytes,
            upstream: after.upstream.since(&before.upstream),
            client: after.client.since(&before.client),
        };
        if std::env::var_os("BENCH_VERBOSE").is_some() {
            let pct = |c: Cpu| c.total().as_secs_f64() / elapsed.as_secs_f64() * 100.0;
            say(&format!(
                "{kind:?} via {}: {:.0} MB/s; CPU: proxy {:.0} %, client {:.0} %, upstream {:.0} %",
                via.name(),
                sample.mbps,
                pct(sample.proxy),
                pct(sample.client),
                pct(sample.upstream)
            ));
        }
        sample
    }
}

/// One timed transfer on a fresh, logged-in session: (MB/s, proxy CPU during it, bytes).
async fn transfer_once(
    path: &Way,
    kind: Transfer,
    data: &[u8],
    fetch_bytes: usize,
    upstream_pid: Option<u32>,
) -> Result<Sample, String> {
    let e = |e: client::Error| e.to_string();
    match kind {
        Transfer::Fetch | Transfer::Append => {
            let mut imap = client::imap_session(&path.imap, &path.credentials, 256 * 1024)
                .await
                .map_err(e)?;
            let before = CpuNow::read(path.pid, upstream_pid);
            let t = Instant::now();
            let bytes = match kind {
                Transfer::Fetch => imap.fetch_body(1).await.map_err(e)?,
                _ => {
                    imap.append(data).await.map_err(e)?;
                    data.len() as u64
                }
            };
            let elapsed = t.elapsed();
            let after = CpuNow::read(path.pid, upstream_pid);
            let sample = Sample::between(path.via, kind, bytes, elapsed, &before, &after);
            imap.logout().await.map_err(e)?;
            if matches!(kind, Transfer::Fetch) && bytes != fetch_bytes as u64 {
                return Err(format!("fetched {bytes} bytes, expected {fetch_bytes}"));
            }
            Ok(sample)
        }
        Transfer::Smtp => {
            let mut smtp = Smtp::open(&path.smtp, &path.credentials).await.map_err(e)?;
            let before = CpuNow::read(path.pid, upstream_pid);
            let elapsed = smtp.send(data).await.map_err(e)?;
            let after = CpuNow::read(path.pid, upstream_pid);
            let bytes = data.len() as u64;
            let sample = Sample::between(path.via, kind, bytes, elapsed, &before, &after);
            smtp.quit().await.map_err(e)?;
            Ok(sample)
        }
    }
}

fn set_of(results: &mut Results, kind: Transfer) -> &mut [report::Throughput; 4] {
    match kind {
        Transfer::Fetch => &mut results.fetch,
        Transfer::Append => &mut results.append,
        Transfer::Smtp => &mut results.smtp,
    }
}

async fn throughput(
    plan: &Plan,
    paths: &[Way],
    kinds: &[Transfer],
    results: &mut Results,
    upstream_pid: Option<u32>,
) {
    let append = client::message(plan.append_bytes, "appended");
    let mail = client::message(plan.smtp_bytes, "sent");
    let mut upstream_cpu = Cpu::default();
    let mut upstream_bytes = 0u64;
    for &kind in kinds {
        say(&format!("throughput: {kind:?}"));
        let data: &[u8] = match kind {
            Transfer::Fetch => &[],
            Transfer::Append => &append,
            Transfer::Smtp => &mail,
        };
        for rep in 0..plan.reps {
            let mut this_rep: [Option<f64>; 4] = [None; 4];
            for path in rotated(paths, rep) {
                if path.via == Via::Peer && rep >= plan.peer_reps {
                    continue;
                }
                // Local TLS is measured on FETCH only (IMAP's tls_listen).
                if path.via == Via::OursTls && !matches!(kind, Transfer::Fetch) {
                    continue;
                }
                let th = &mut set_of(results, kind)[slot(path.via)];
                if th.errors.len() >= 2 {
                    continue; // a path that failed twice is not tried again
                }
                let upstream = (path.via == Via::Direct).then_some(upstream_pid).flatten();
                match transfer_once(&path, kind, data, plan.fetch_bytes, upstream).await {
                    Ok(sample) => {
                        this_rep[slot(path.via)] = Some(sample.mbps);
                        sample.add_to(th);
                        if path.via == Via::Direct {
                            upstream_cpu.add(&sample.upstream);
                            upstream_bytes += sample.bytes;
                        }
                    }
                    Err(e) => {
                        say(&format!("{kind:?} via {} failed: {e}", path.via.name()));
                        th.errors.push(e);
                    }
                }
            }
            let set = set_of(results, kind);
            if let [Some(o), Some(d), p, _] = this_rep {
                set[slot(Via::Ours)].paired_direct.push(o / d);
                if let Some(p) = p {
                    set[slot(Via::Ours)].paired_peer.push(o / p);
                }
            }
            if let [o, Some(d), _, Some(t)] = this_rep {
                set[slot(Via::OursTls)].paired_direct.push(t / d);
                if let Some(o) = o {
                    set[slot(Via::OursTls)].paired_plain.push(t / o);
                }
            }
        }
    }
    results.upstream_cpu = Some((upstream_cpu, upstream_bytes));
}

async fn logins(plan: &Plan, paths: &[Way], results: &mut Results) {
    const BLOCKS: usize = 10;
    say(&format!(
        "login latency: {} cycles per path ({} through email-oauth2-proxy)",
        plan.login_cycles, plan.peer_login_cycles
    ));
    let per_block = |via: Via| {
        let total = if via == Via::Peer {
            plan.peer_login_cycles
        } else {
            plan.login_cycles
        };
        total.div_ceil(BLOCKS)
    };
    for block in 0..BLOCKS {
        for path in rotated(paths, block) {
            let l = &mut results.logins[slot(path.via)];
            let total = if path.via == Via::Peer {
                plan.peer_login_cycles
            } else {
                plan.login_cycles
            };
            for _ in 0..per_block(path.via) {
                if l.ms.len() + l.errors.len() >= total || l.errors.len() >= 10 {
                    break;
                }
                match client::login_cycle(&path.imap, &path.credentials).await {
                    Ok(d) => l.ms.push(d.as_secs_f64() * 1e3),
                    Err(e) => l.errors.push(e.to_string()),
                }
            }
        }
    }
}

/// Login cycles through the IMAPS listener with a client that keeps no TLS
/// sessions (a full handshake each time), alternating in blocks with cycles
/// through the plain listener of the same proxy: (plain, full handshake).
async fn full_handshake_logins(
    plan: &Plan,
    plain: &Way,
    full: &Way,
) -> (report::Logins, report::Logins) {
    const BLOCKS: usize = 10;
    let total = (plan.login_cycles / 5).max(20);
    say(&format!(
        "login latency with a full TLS handshake: {total} cycles, and as many through the plain listener"
    ));
    let mut out = (report::Logins::default(), report::Logins::default());
    for block in 0..BLOCKS {
        // Which goes first alternates from block to block.
        let order = if block % 2 == 0 { [0, 1] } else { [1, 0] };
        for which in order {
            let (way, l) = if which == 0 {
                (plain, &mut out.0)
            } else {
                (full, &mut out.1)
            };
            for _ in 0..total.div_ceil(BLOCKS) {
                if l.ms.len() + l.errors.len() >= total || l.errors.len() >= 10 {
                    break;
                }
                match client::login_cycle(&way.imap, &way.credentials).await {
                    Ok(d) => l.ms.push(d.as_secs_f64() * 1e3),
                    Err(e) => l.errors.push(e.to_string()),
                }
            }
        }
    }
    out
}

/// A batch of open sessions and how opening them went.
struct Wave {
    sessions: Vec<Imap>,
    failed: usize,
    first_error: Option<String>,
    note: Option<String>,
    secs: f64,
}

/// Opens `n` sessions (login, SELECT INBOX, IDLE) with `parallel` at a
/// time. Gives up opening more after `setup` or after `max_failures`
/// failures in a row.
async fn open_wave(
    path: &Way,
    n: usize,
    parallel: usize,
    setup: Duration,
    max_failures: usize,
) -> Wave {
    let started = Instant::now();
    let deadline = started + setup;
    let gate = Arc::new(Semaphore::new(parallel));
    let mut tasks: JoinSet<Result<Imap, String>> = JoinSet::new();
    let mut wave = Wave {
        sessions: Vec::with_capacity(n),
        failed: 0,
        first_error: None,
        note: None,
        secs: 0.0,
    };
    let mut launched = 0usize;
    let mut failures_in_a_row = 0usize;
    loop {
        while launched < n && wave.note.is_none() && gate.available_permits() > 0 {
            let permit = gate.clone().acquire_owned().await.expect("open");
            let (route, credentials) = (path.imap.clone(), path.credentials.clone());
            tasks.spawn(async move {
                let _permit = permit;
                let open = async {
                    let mut imap = client::imap_session(&route, &credentials, 1024).await?;
                    imap.idle().await?;
                    Ok::<_, client::Error>(imap)
                };
                match tokio::time::timeout(Duration::from_secs(30), open).await {
                    Ok(Ok(imap)) => Ok(imap),
                    Ok(Err(e)) => Err(e.to_string()),
                    Err(_) => Err("no IDLE continuation within 30 s".into()),
                }
            });
            launched += 1;
        }
        let Some(done) = tasks.join_next().await else {
            break;
        };
        match done.unwrap_or_else(|e| Err(e.to_string())) {
            Ok(imap) => {
                failures_in_a_row = 0;
                wave.sessions.push(imap);
            }
            Err(e) => {
                wave.failed += 1;
                failures_in_a_row += 1;
                wave.first_error.get_or_insert(e);
                if failures_in_a_row >= max_failures && wave.note.is_none() {
                    wave.note = Some(format!(
                        "stopped opening after {max_failures} failures in a row"
                    ));
                }
            }
        }
        if Instant::now() > deadline && wave.note.is_none() {
            wave.note = Some(format!("stopped opening after {} s", setup.as_secs()));
        }
    }
    wave.secs = started.elapsed().as_secs_f64();
    wave
}

/// Opens `n` idle sessions, lets them sit for `idle_secs`, and reads the
/// proxy's memory and CPU. With `churn`, a first wave of `n` sessions is
/// opened and closed before the measured one, so that the figure is the
/// steady state of a proxy whose sessions come and go (freed memory that is
/// reused has been written to, and counts in RSS).
async fn idle_tier(
    path: &Way,
    n: usize,
    idle_secs: u64,
    parallel: usize,
    setup: Duration,
    max_failures: usize,
    churn: bool,
) -> Idle {
    let pid = path.pid.expect("a proxy");
    say(&format!("idle sessions: {n} through {}", path.via.name()));
    // The first login fetches a token and checks the password the slow way:
    // not part of what a session costs.
    for _ in 0..3 {
        let _ = client::login_cycle(&path.imap, &path.credentials).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut tier = Idle {
        via: Some(path.via),
        wanted: n,
        rss_base_kib: measure::rss_kib(pid),
        idle_secs,
        ..Default::default()
    };
    if churn {
        let first = open_wave(path, n, parallel, setup, max_failures).await;
        tier.rss_fresh_kib = Some((measure::rss_kib(pid), first.sessions.len()));
        drop(first);
        // Let the proxy see the clients go and close its side.
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
    let wave = open_wave(path, n, parallel, setup, max_failures).await;
    tier.failed = wave.failed;
    tier.first_error = wave.first_error;
    tier.note = wave.note;
    tier.setup_secs = wave.secs;
    tier.established = wave.sessions.len();
    // Let the dust settle, then sit.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let c0 = measure::cpu(pid);
    tokio::time::sleep(Duration::from_secs(idle_secs)).await;
    let c1 = measure::cpu(pid);
    tier.idle_cpu = c1.since(&c0);
    tier.rss_kib = measure::rss_kib(pid);
    tier.threads = measure::threads(pid);
    tier.fds = measure::fds(pid);
    drop(wave.sessions);
    tier
}
