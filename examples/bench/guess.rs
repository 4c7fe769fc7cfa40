//! The `guess` part: the proxy's memory and CPU under a password-guessing
//! attack, one fresh proxy process per attack.
//!
//! Each attack opens N IMAP connections (N = `--guess-logins`, 1,000 by
//! default; 64 handshakes at a time), then sends one LOGIN with a wrong
//! password on every one of them at once, for the configured account, whose local password is an argon2 `password_hash`
//! (19 MiB, tens of milliseconds per check). Read from /proc/PID/status:
//! VmRSS before (after three right logins, as a proxy in service), VmHWM
//! (the peak) and VmRSS three seconds after the last answer; from
//! /proc/PID/stat, the CPU the proxy used; from its `/metrics`, how many
//! argon2 checks ran. Three attacks:
//!
//! - from one address: the throttle's case (`max_failed_logins`);
//! - from N addresses (127.1.x.y, all loopback), one guess each, so no
//!   throttle applies: the bounded check queue's case;
//! - the same with `password_check_queue` = N, so that every guess is
//!   checked: what the memory bound alone holds.
//!
//! During the first, a login with the right password from another address
//! (127.0.0.2) is timed: the real user during the attack.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use std::sync::Arc;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::measure::{self, Cpu};
use crate::procs::{self, Running, Upstream};
use crate::say;
use crate::world::{MAILBOX, World};

/// Where an attack's connections come from.
#[derive(Clone, Copy)]
enum Sources {
    OneAddress,
    /// One address per guess.
    Many,
}

/// One attack: its label, its sources, the `[server]` lines it adds, and
/// whether it guesses at all (the baseline only opens and closes).
struct Attack {
    label: String,
    sources: Sources,
    server: String,
    guesses: bool,
}

/// What one attack measured.
struct Outcome {
    label: String,
    checks: Option<f64>,
    /// "refused / try later", or the baseline's LOGOUTs.
    answers: String,
    other: Vec<String>,
    rss_idle_kib: u64,
    rss_peak_kib: u64,
    rss_after_kib: u64,
    cpu: Cpu,
    secs: f64,
    /// The right password from another address during the attack: its answer and time.
    real_user: Option<(String, Duration)>,
}

const REAL_USER: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);

/// Runs the attacks, each against a fresh proxy, and returns the report section.
pub async fn run(
    bin: &Path,
    password_hash: &str,
    world: &mut World,
    n: usize,
) -> Result<String, String> {
    let attacks = [
        Attack {
            label: format!("baseline: {n} connections, LOGOUT without a login"),
            sources: Sources::OneAddress,
            server: String::new(),
            guesses: false,
        },
        Attack {
            label: format!("{n} guesses from one address"),
            sources: Sources::OneAddress,
            server: String::new(),
            guesses: true,
        },
        Attack {
            label: format!("{n} guesses from {n} addresses"),
            sources: Sources::Many,
            server: String::new(),
            guesses: true,
        },
        Attack {
            label: format!("{n} guesses from {n} addresses, `password_check_queue = {n}`"),
            sources: Sources::Many,
            server: format!("password_check_queue = {n}\n"),
            guesses: true,
        },
    ];
    let mut outcomes = Vec::new();
    for attack in &attacks {
        say(&format!("guess: {}", attack.label));
        let refresh_token = world.refresh_token().await?;
        let standin = Upstream::standin(&world.info, refresh_token);
        let proxy =
            procs::start_ours_with_server(bin, password_hash, &standin, n + 100, &attack.server)
                .await?;
        let outcome = measure_attack(&proxy, attack, n).await;
        proxy.stop().await;
        outcomes.push(outcome?);
    }
    Ok(section(&outcomes))
}

async fn measure_attack(proxy: &Running, attack: &Attack, n: usize) -> Result<Outcome, String> {
    warm_up(proxy).await?;
    let pid = proxy.pid;
    let rss_idle_kib = measure::rss_kib(pid);
    let checks_before = password_checks(proxy).await;
    let cpu_before = measure::cpu(pid);
    let connections = open_connections(proxy.imap, attack.sources, n).await;
    let unopened = n - connections.len();
    let started = Instant::now();
    let answers = send_all(connections, attack.guesses);
    let real_user = match (attack.sources, attack.guesses) {
        (Sources::OneAddress, true) => Some(timed_login(proxy.imap).await),
        _ => None,
    };
    let tally = Tally::of(answers, unopened).await;
    let secs = started.elapsed().as_secs_f64();
    let cpu = measure::cpu(pid).since(&cpu_before);
    let rss_peak_kib = measure::hwm_kib(pid);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let checks = password_checks(proxy).await;
    Ok(Outcome {
        label: attack.label.clone(),
        answers: match attack.guesses {
            true => format!("{} / {}", tally.expected, tally.try_later),
            false => format!("{} logged out", tally.expected),
        },
        checks: checks.zip(checks_before).map(|(a, b)| a - b),
        other: tally.other,
        rss_idle_kib,
        rss_peak_kib,
        rss_after_kib: measure::rss_kib(pid),
        cpu,
        secs,
        real_user,
    })
}

/// Three right logins from the real user's address, as a proxy in service
/// has seen (a token fetched, the password checked once and cached).
async fn warm_up(proxy: &Running) -> Result<(), String> {
    for _ in 0..3 {
        let answer = login_from(proxy.imap, REAL_USER, procs::password()).await;
        if !answer.starts_with("a OK") {
            return Err(format!("the warm-up login failed: {answer}"));
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    Ok(())
}

/// Sends on every connection at once a LOGIN with a wrong password
/// (`guesses`), or only LOGOUT.
fn send_all(connections: Vec<Greeted>, guesses: bool) -> JoinSet<String> {
    let mut answers = JoinSet::new();
    for (i, stream) in connections.into_iter().enumerate() {
        let request = match guesses {
            true => format!("a LOGIN {MAILBOX} guess-{i}\r\nb LOGOUT\r\n"),
            false => "a LOGOUT\r\n".to_string(),
        };
        answers.spawn(exchange(stream, request));
    }
    answers
}

/// The right password from the real user's address: its answer and time.
async fn timed_login(imap: SocketAddr) -> (String, Duration) {
    let t = Instant::now();
    let answer = login_from(imap, REAL_USER, procs::password()).await;
    (answer, t.elapsed())
}

/// The answers of one attack, sorted.
struct Tally {
    /// A wrong password refused (or, in the baseline, LOGOUT answered).
    expected: usize,
    try_later: usize,
    other: Vec<String>,
}

impl Tally {
    async fn of(mut answers: JoinSet<String>, unopened: usize) -> Tally {
        let mut tally = Tally {
            expected: 0,
            try_later: 0,
            other: vec!["not opened".to_string(); unopened],
        };
        while let Some(answer) = answers.join_next().await {
            let answer = answer.unwrap_or_else(|e| e.to_string());
            if answer.starts_with("a NO [AUTHENTICATIONFAILED]") || answer.starts_with("a OK") {
                tally.expected += 1;
            } else if answer.starts_with("a NO [UNAVAILABLE]") {
                tally.try_later += 1;
            } else {
                tally.other.push(answer);
            }
        }
        tally
    }
}

type Greeted = BufReader<TcpStream>;

/// How long one guess may take, greeting or answer.
const PATIENCE: Duration = Duration::from_secs(120);

/// A connection from `from`, its greeting read.
async fn greeted(imap: SocketAddr, from: Ipv4Addr) -> std::io::Result<Greeted> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(IpAddr::V4(from), 0))?;
    let mut stream = BufReader::new(socket.connect(imap).await?);
    let mut greeting = String::new();
    stream.read_line(&mut greeting).await?;
    Ok(stream)
}

/// Opens the attack's `n` connections, `OPENING` at a time, so that the
/// burst measured is one of logins, not of TCP handshakes (a burst of a
/// thousand SYNs overflows a listen queue, and the connections lost there
/// would never be greeted).
async fn open_connections(imap: SocketAddr, sources: Sources, n: usize) -> Vec<Greeted> {
    const OPENING: usize = 64;
    let gate = Arc::new(Semaphore::new(OPENING));
    let mut opening = JoinSet::new();
    for i in 0..n {
        let from = match sources {
            Sources::OneAddress => Ipv4Addr::LOCALHOST,
            Sources::Many => Ipv4Addr::new(127, 1, (i / 250) as u8, (i % 250 + 1) as u8),
        };
        let gate = gate.clone();
        opening.spawn(async move {
            let _turn = gate.acquire_owned().await;
            tokio::time::timeout(PATIENCE, greeted(imap, from)).await
        });
    }
    let mut open = Vec::with_capacity(n);
    while let Some(done) = opening.join_next().await {
        match done {
            Ok(Ok(Ok(stream))) => open.push(stream),
            Ok(Ok(Err(e))) => say(&format!("guess: a connection failed: {e}")),
            Ok(Err(_)) => say("guess: a connection was not greeted in time"),
            Err(e) => say(&format!("guess: {e}")),
        }
    }
    open
}

/// Sends `request` on `stream`: the answer tagged `a`, or what went wrong.
async fn exchange(mut stream: Greeted, request: String) -> String {
    let attempt = async {
        stream.get_mut().write_all(request.as_bytes()).await?;
        let mut line = String::new();
        loop {
            line.clear();
            if stream.read_line(&mut line).await? == 0 {
                return Ok::<_, std::io::Error>("closed before an answer".to_string());
            }
            if line.starts_with("a ") {
                return Ok(line.trim_end().to_string());
            }
        }
    };
    match tokio::time::timeout(PATIENCE, attempt).await {
        Ok(Ok(answer)) => answer,
        Ok(Err(e)) => format!("error: {e}"),
        Err(_) => format!("no answer within {} s", PATIENCE.as_secs()),
    }
}

/// One whole login from `from`: connect, greeting, LOGIN.
async fn login_from(imap: SocketAddr, from: Ipv4Addr, password: &str) -> String {
    match tokio::time::timeout(PATIENCE, greeted(imap, from)).await {
        Ok(Ok(stream)) => exchange(stream, format!("a LOGIN {MAILBOX} {password}\r\n")).await,
        Ok(Err(e)) => format!("error: {e}"),
        Err(_) => "not greeted in time".into(),
    }
}

/// The proxy's `xoauth2_proxy_password_checks_total`; `None` for a build
/// without it (or without an admin listener).
async fn password_checks(proxy: &Running) -> Option<f64> {
    let admin = proxy.admin?;
    let text = reqwest::get(format!("http://{admin}/metrics"))
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    testkit::metrics::value(&text, "xoauth2_proxy_password_checks_total", &[])
}

fn mib(kib: u64) -> String {
    format!("{:.0} MiB", kib as f64 / 1024.0)
}

/// The markdown section: one row per attack, then what else was seen.
fn section(outcomes: &[Outcome]) -> String {
    let mut s = String::from("### Under a guessing attack\n\n");
    s.push_str("| attack | argon2 checks | refused / try later | RSS before | RSS peak | RSS 3 s after | proxy CPU | took |\n");
    s.push_str("|---|---|---|---|---|---|---|---|\n");
    for o in outcomes {
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {:.1} s (user {:.1} + sys {:.1}) | {:.1} s |\n",
            o.label,
            o.checks.map_or("—".into(), |c| format!("{c:.0}")),
            o.answers,
            mib(o.rss_idle_kib),
            mib(o.rss_peak_kib),
            mib(o.rss_after_kib),
            o.cpu.total().as_secs_f64(),
            o.cpu.user.as_secs_f64(),
            o.cpu.system.as_secs_f64(),
            o.secs,
        ));
    }
    s.push('\n');
    for o in outcomes {
        if let Some((answer, took)) = &o.real_user {
            s.push_str(&format!(
                "- during \"{}\", the right password from 127.0.0.2: `{}` after {:.0} ms\n",
                o.label,
                answer.split(' ').take(2).collect::<Vec<_>>().join(" "),
                took.as_secs_f64() * 1e3
            ));
        }
        if let Some(first) = o.other.first() {
            s.push_str(&format!(
                "- \"{}\": {} other answers, the first: {first}\n",
                o.label,
                o.other.len()
            ));
        }
    }
    s
}
