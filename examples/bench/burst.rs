//! The `burst` part: what the proxy's memory does after many large
//! transfers at once. The relay takes a 256 KiB buffer per direction while
//! data flows and gives it back at every pause, and the SMTP session's
//! reader does the same while DATA flows; freed memory goes back to the
//! allocator, which need not give it back to the system. So: `n` sessions
//! are opened and sit idle (RSS "open"), then each transfers a message of
//! a few MiB at the same moment (IMAP `UID FETCH` from the stand-in, or
//! SMTP `DATA` to it) while RSS is sampled (its peak), then all sit idle
//! again (RSS "after", read 12 s later: past the proxy's trim period), and
//! finally all close (RSS "closed").
//!
//! Each tier runs in a proxy of its own, started fresh, with a world of its
//! own whose stand-in serves a message of the burst's size.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::client::{self, Imap, Route, Smtp};
use crate::{measure, procs, say, world};

/// How the proxy's RSS went through one burst.
#[derive(Debug, Default, Clone)]
pub struct Burst {
    pub protocol: &'static str,
    pub sessions: usize,
    pub bytes_each: usize,
    pub failed: usize,
    pub first_error: Option<String>,
    /// KiB: the proxy with no session.
    pub base: u64,
    /// KiB: with the sessions open and idle, before any transfer.
    pub open: u64,
    /// KiB: the largest of the samples taken while the transfers ran.
    pub peak: u64,
    /// KiB: with the same sessions idle after the transfers.
    pub after: u64,
    /// KiB: after every session closed.
    pub closed: u64,
    pub secs: f64,
}

impl Burst {
    fn per_session(&self, rss: u64) -> f64 {
        rss.saturating_sub(self.base) as f64 / self.sessions.max(1) as f64
    }
}

/// Which transfer a burst makes.
#[derive(Clone, Copy, Debug)]
enum Kind {
    Fetch,
    Data,
}

/// An open client session of either protocol.
enum Session {
    Imap(Imap),
    Smtp(Smtp),
}

/// Runs a burst of each kind for each tier; the report's section.
pub async fn run(
    bin: &Path,
    password_hash: &str,
    tiers: &[usize],
    bytes_each: usize,
    fd_limit: u64,
) -> Result<String, String> {
    let mut world = world::World::spawn(bytes_each).await?;
    let info = world.info.clone();
    let mut bursts = Vec::new();
    let max_sessions = (fd_limit.saturating_sub(64) / 2) as usize;
    for &wanted in tiers {
        let n = wanted.min(max_sessions);
        for kind in [Kind::Fetch, Kind::Data] {
            let upstream = procs::Upstream::standin(&info, world.refresh_token().await?);
            // Every session sends at once: as many pooled SMTP connections,
            // closed soon after, so that "after" counts the sessions only.
            let smtp = format!(
                "max_connections_per_mailbox = {}\npool_idle_timeout = \"1s\"\n",
                n + 10
            );
            let ours =
                procs::start_ours_with_smtp(bin, password_hash, &upstream, n + 100, &smtp).await?;
            let route = match kind {
                Kind::Fetch => Route::Plain(ours.imap),
                Kind::Data => Route::Plain(ours.smtp),
            };
            let burst = one(kind, &route, ours.pid, n, bytes_each).await;
            ours.stop().await;
            bursts.push(burst?);
        }
    }
    Ok(section(&bursts))
}

/// One tier of one kind against a fresh proxy.
async fn one(
    kind: Kind,
    route: &Route,
    pid: u32,
    n: usize,
    bytes_each: usize,
) -> Result<Burst, String> {
    let credentials = crate::password_credentials();
    let protocol = match kind {
        Kind::Fetch => "IMAP FETCH",
        Kind::Data => "SMTP DATA",
    };
    say(&format!(
        "burst: {n} {protocol} transfers of {} MiB at once",
        bytes_each >> 20
    ));
    // The first login fetches a token and checks the password the slow way.
    for _ in 0..3 {
        let _ = open_session(kind, route, &credentials).await;
    }
    settle().await;
    let mut burst = Burst {
        protocol,
        sessions: n,
        bytes_each,
        base: measure::rss_kib(pid),
        ..Default::default()
    };
    let mut sessions = open_all(kind, route, &credentials, n).await?;
    settle().await;
    burst.open = measure::rss_kib(pid);

    let message = Arc::new(client::message(bytes_each, "burst"));
    let peak = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let sampler = tokio::spawn(sample_peak(pid, peak.clone(), done.clone()));
    let started = Instant::now();
    let mut tasks = JoinSet::new();
    for session in sessions.drain(..) {
        let message = message.clone();
        tasks.spawn(async move { transfer(session, &message, bytes_each).await });
    }
    while let Some(joined) = tasks.join_next().await {
        match joined.map_err(|e| e.to_string()).and_then(|r| r) {
            Ok(session) => sessions.push(session),
            Err(e) => {
                burst.failed += 1;
                burst.first_error.get_or_insert(e);
            }
        }
    }
    burst.secs = started.elapsed().as_secs_f64();
    done.store(true, Ordering::Relaxed);
    let _ = sampler.await;
    burst.peak = peak.load(Ordering::Relaxed);
    // The pooled SMTP connections close after their idle timeout (1 s), and
    // the proxy gives freed memory back within its trim period (10 s).
    tokio::time::sleep(AFTER).await;
    burst.after = measure::rss_kib(pid);
    drop(sessions);
    settle().await;
    burst.closed = measure::rss_kib(pid);
    Ok(burst)
}

/// How long after the transfers "after" is read: past the pool's idle
/// timeout and the proxy's trim period (`allocator` in src/main.rs).
const AFTER: Duration = Duration::from_secs(12);

/// Lets the proxy see what just happened (clients gone, transfers ended).
async fn settle() {
    tokio::time::sleep(Duration::from_secs(2)).await;
}

async fn open_session(
    kind: Kind,
    route: &Route,
    credentials: &client::Credentials,
) -> Result<Session, String> {
    let e = |e: client::Error| e.to_string();
    Ok(match kind {
        // The client reads with a small buffer: a thousand of them at once.
        Kind::Fetch => Session::Imap(
            client::imap_session(route, credentials, 16 * 1024)
                .await
                .map_err(e)?,
        ),
        Kind::Data => Session::Smtp(Smtp::open(route, credentials).await.map_err(e)?),
    })
}

/// Opens `n` sessions, 64 at a time; an error if any fails.
async fn open_all(
    kind: Kind,
    route: &Route,
    credentials: &client::Credentials,
    n: usize,
) -> Result<Vec<Session>, String> {
    let gate = Arc::new(Semaphore::new(64));
    let mut tasks = JoinSet::new();
    for _ in 0..n {
        let permit = gate.clone().acquire_owned().await.expect("open");
        let (route, credentials) = (route.clone(), credentials.clone());
        tasks.spawn(async move {
            let _permit = permit;
            open_session(kind, &route, &credentials).await
        });
    }
    let mut sessions = Vec::with_capacity(n);
    while let Some(joined) = tasks.join_next().await {
        let session = joined.map_err(|e| e.to_string())??;
        sessions.push(session);
    }
    Ok(sessions)
}

/// One transfer; the session then sits idle as it sat before (selected,
/// no IDLE), so that "open" and "after" differ by the transfer alone.
async fn transfer(session: Session, message: &[u8], bytes_each: usize) -> Result<Session, String> {
    let e = |e: client::Error| e.to_string();
    match session {
        Session::Imap(mut imap) => {
            let got = imap.fetch_body(1).await.map_err(e)?;
            if got != bytes_each as u64 {
                return Err(format!("fetched {got} bytes, expected {bytes_each}"));
            }
            Ok(Session::Imap(imap))
        }
        Session::Smtp(mut smtp) => {
            smtp.send(message).await.map_err(e)?;
            Ok(Session::Smtp(smtp))
        }
    }
}

/// Samples the proxy's RSS every 20 ms into `peak` until `done`.
async fn sample_peak(pid: u32, peak: Arc<AtomicU64>, done: Arc<AtomicBool>) {
    while !done.load(Ordering::Relaxed) {
        peak.fetch_max(measure::rss_kib(pid), Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The report's section: one row per burst.
fn section(bursts: &[Burst]) -> String {
    let mib = |kib: u64| format!("{:.1}", kib as f64 / 1024.0);
    let mut out = String::from(
        "### Memory after a burst of large transfers\n\n\
         Each row: a fresh proxy; `n` sessions opened and idle (\"open\"), then every one transfers its \
         message at once (\"peak\" is the highest RSS sampled every 20 ms), then all idle again (\"after\", read 12 s later), \
         then all closed. Per session: (RSS − the proxy's RSS before any session) ÷ n.\n\n\
         | transfer | n × MiB | base MiB | open MiB | peak MiB | after MiB | closed MiB | KiB/session open | KiB/session after | s | failed |\n\
         |---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for b in bursts {
        out.push_str(&format!(
            "| {} | {} × {} | {} | {} | {} | {} | {} | {:.1} | {:.1} | {:.1} | {} |\n",
            b.protocol,
            b.sessions,
            b.bytes_each >> 20,
            mib(b.base),
            mib(b.open),
            mib(b.peak),
            mib(b.after),
            mib(b.closed),
            b.per_session(b.open),
            b.per_session(b.after),
            b.secs,
            b.failed,
        ));
    }
    for b in bursts.iter().filter(|b| b.first_error.is_some()) {
        out.push_str(&format!(
            "- {} × {}: first error: {}\n",
            b.protocol,
            b.sessions,
            b.first_error.as_deref().unwrap_or_default()
        ));
    }
    out
}
