//! The `latency` part: logins as they cost over the Internet. A delay shim
//! (a TCP relay that holds every chunk for a fixed one-way delay, and the
//! connection itself for one round trip, as the TCP handshake would) sits
//! on the upstream hop of the proxies and on the direct path's only hop, so
//! that every round trip to the mail server counts as it does to a nearby
//! Microsoft datacentre. The client's hop to the proxy stays on loopback, as
//! NocoBase's next to its proxy does.
//!
//! Three paths alternate cycle by cycle: direct (TLS, `AUTHENTICATE XOAUTH2`
//! with SASL-IR), the proxy with warm sessions off (cold: every login opens
//! an upstream session) and the proxy as it ships (warm: one authenticated
//! upstream session waits). A cycle: connect, log in (timed to the tagged
//! OK), `SELECT INBOX`, `UID FETCH 1 (UID FLAGS RFC822.SIZE)` (timed from the
//! connect to the first byte of its answer), `LOGOUT`. Between two cycles of
//! the warm path run one of each other path, which leaves the proxy the time
//! to open the replacement, as a mail client's next sync would.
//!
//! The warm proxy answers the login's `OK` at once and proves its waiting
//! session with a `NOOP` behind it; the client's first command waits for
//! that proof. So a fourth, shorter series measures what a client feels when
//! the waiting session turns out dead: before each of its cycles the warm
//! proxy's shim severs every connection it carries at that connection's next
//! command (one round trip later, as a server that went away), so that the
//! proof fails and the proxy opens a new session behind the `OK`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use crate::client::{self, Credentials, Imap, Route};
use crate::measure::percentile;

/// A TCP relay to `target` that delays each direction by `one_way`.
pub struct Shim {
    pub addr: SocketAddr,
    /// Bumped by [`Shim::sever`]: connections accepted before it end at
    /// their next command.
    severed: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Shim {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Shim {
    pub async fn start(target: SocketAddr, one_way: Duration) -> std::io::Result<Shim> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let severed = Arc::new(AtomicU64::new(0));
        let epochs = severed.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let born = Born(epochs.clone(), epochs.load(Ordering::SeqCst));
                tokio::spawn(relay(client, target, one_way, born));
            }
        });
        Ok(Shim {
            addr,
            severed,
            task,
        })
    }

    /// Every connection open now ends at its next command, unanswered: the
    /// command is dropped and, a round trip later, both sides are closed.
    pub fn sever(&self) {
        self.severed.fetch_add(1, Ordering::SeqCst);
    }
}

/// The shim's sever count when a connection was accepted.
struct Born(Arc<AtomicU64>, u64);

impl Born {
    fn severed(&self) -> bool {
        self.0.load(Ordering::SeqCst) > self.1
    }
}

/// One connection through the shim: a round trip for the TCP handshake,
/// then each direction delayed.
async fn relay(client: TcpStream, target: SocketAddr, one_way: Duration, born: Born) {
    until(tokio::time::Instant::now() + 2 * one_way).await;
    let Ok(server) = TcpStream::connect(target).await else {
        return;
    };
    let _ = (client.set_nodelay(true), server.set_nodelay(true));
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    tokio::join!(
        delayed(client_read, server_write, one_way, Some(born)),
        delayed(server_read, client_write, one_way, None)
    );
}

/// Copies `from` to `to`, each chunk written `one_way` after it was read.
/// With `born`, a chunk read once the connection is severed is dropped, and
/// the copy ends a round trip later (closing `to`, whose peer then closes
/// the other direction).
async fn delayed(
    mut from: impl tokio::io::AsyncRead + Unpin,
    mut to: impl tokio::io::AsyncWrite + Unpin,
    one_way: Duration,
    born: Option<Born>,
) {
    let (queue, mut due) = mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();
    let read = async move {
        let mut buf = vec![0u8; 64 * 1024];
        while let Ok(n @ 1..) = from.read(&mut buf).await {
            if born.as_ref().is_some_and(Born::severed) {
                tokio::time::sleep(2 * one_way).await;
                break;
            }
            let at = tokio::time::Instant::now() + one_way;
            if queue.send((at, buf[..n].to_vec())).is_err() {
                break;
            }
        }
    };
    let write = async move {
        while let Some((at, bytes)) = due.recv().await {
            until(at).await;
            if to.write_all(&bytes).await.is_err() {
                return;
            }
        }
        let _ = to.shutdown().await;
    };
    tokio::join!(read, write);
}

/// Waits until `at`, to well under a millisecond: tokio's timer rounds a
/// sleep up to its next millisecond tick and then some (≈ 1.4 ms late per
/// wait on this machine, measured), which over the eight or so delayed hops
/// of a login would add up to more than half a round trip and blur what is
/// counted in round trips. So the timer is used up to 2 ms before, and the
/// rest is waited out by yielding.
async fn until(at: tokio::time::Instant) {
    let early = at.checked_sub(Duration::from_millis(2)).unwrap_or(at);
    tokio::time::sleep_until(early).await;
    while tokio::time::Instant::now() < at {
        tokio::task::yield_now().await;
    }
}

/// What one cycle measured, in ms from the connect.
#[derive(Clone, Copy, Debug)]
pub struct Cycle {
    pub login: f64,
    pub first_fetch_byte: f64,
    pub whole: f64,
}

async fn cycle(route: &Route, credentials: &Credentials) -> client::Result<Cycle> {
    let started = Instant::now();
    let ms = |at: Instant| at.duration_since(started).as_secs_f64() * 1e3;
    let mut imap = Imap::connect(route, 4096).await?;
    imap.login(credentials).await?;
    let login = ms(Instant::now());
    imap.run("SELECT INBOX").await?;
    let first = imap
        .first_byte_at("UID FETCH 1 (UID FLAGS RFC822.SIZE)")
        .await?;
    imap.logout().await?;
    Ok(Cycle {
        login,
        first_fetch_byte: ms(first),
        whole: ms(Instant::now()),
    })
}

/// The cycles of one path.
#[derive(Default, Debug)]
pub struct Path {
    pub cycles: Vec<Cycle>,
    pub errors: Vec<String>,
}

impl Path {
    fn p(&self, q: f64, f: impl Fn(&Cycle) -> f64) -> Option<f64> {
        let v: Vec<f64> = self.cycles.iter().map(f).collect();
        percentile(&v, q)
    }
}

/// The part's results: direct, proxy cold, proxy warm.
#[derive(Default, Debug)]
pub struct Latency {
    pub rtt_ms: f64,
    pub paths: [Path; 3],
    /// The warm path with its waiting session found dead by the proof.
    pub dead_warm: Path,
    /// The warm proxy's discards during those cycles.
    pub dead_warm_discards: u64,
    /// The warm proxy's `imap_warm_sessions_total` by event, read at the end.
    pub warm_events: Vec<(String, u64)>,
}

pub const NAMES: [&str; 3] = ["direct", "proxy, cold", "proxy, warm"];

/// Runs `cycles` cycles on each of `routes` (direct, cold, warm), rotating
/// the order every round; a few warm-up cycles first.
pub async fn run(routes: [(&Route, &Credentials); 3], cycles: usize, rtt: Duration) -> Latency {
    let mut out = Latency {
        rtt_ms: rtt.as_secs_f64() * 1e3,
        ..Default::default()
    };
    for (route, credentials) in routes {
        for _ in 0..3 {
            let _ = cycle(route, credentials).await;
        }
    }
    for round in 0..cycles {
        for k in 0..3 {
            let which = (round + k) % 3;
            let (route, credentials) = routes[which];
            let path = &mut out.paths[which];
            if path.errors.len() >= 10 {
                continue;
            }
            match cycle(route, credentials).await {
                Ok(c) => path.cycles.push(c),
                Err(e) => path.errors.push(e.to_string()),
            }
        }
    }
    out
}

/// `cycles` cycles of the warm path at `route`, each after `shim` severed
/// the proxy's waiting session, so that the proof behind the `OK` fails and
/// the proxy opens a new session. `events` reads the warm proxy's
/// warm-session counters; before each cycle the replacement opened after
/// the one before is awaited (a warm-up cycle first), for at most 10 s.
pub async fn run_dead_warm<F, Fut>(
    route: &Route,
    credentials: &Credentials,
    shim: &Shim,
    cycles: usize,
    events: F,
) -> (Path, u64)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Vec<(String, u64)>>,
{
    let count = |events: &[(String, u64)], name: &str| {
        events
            .iter()
            .find(|(e, _)| e == name)
            .map_or(0, |(_, v)| *v)
    };
    let mut path = Path::default();
    let discarded_before = count(&events().await, "discarded");
    for i in 0..=cycles {
        let opened_before = count(&events().await, "opened");
        let measured = i > 0;
        if measured {
            shim.sever();
        }
        match cycle(route, credentials).await {
            Ok(c) if measured => path.cycles.push(c),
            Ok(_) => {}
            Err(e) => path.errors.push(e.to_string()),
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while count(&events().await, "opened") <= opened_before {
            if Instant::now() > deadline || path.errors.len() >= 10 {
                path.errors
                    .push("no replacement warm session within 10 s".into());
                return (path, 0);
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    let discards = count(&events().await, "discarded") - discarded_before;
    (path, discards)
}

/// `event="…"} n` lines of the warm-session counter in a `/metrics` text.
pub fn warm_events(exposition: &str) -> Vec<(String, u64)> {
    let prefix = "xoauth2_proxy_imap_warm_sessions_total{event=\"";
    exposition
        .lines()
        .filter_map(|l| l.strip_prefix(prefix))
        .filter_map(|rest| {
            let (event, value) = rest.split_once("\"} ")?;
            Some((event.to_string(), value.trim().parse().ok()?))
        })
        .collect()
}

impl Latency {
    /// p50 and p99 of `f` per path.
    pub fn quantiles(&self, f: impl Fn(&Cycle) -> f64 + Copy) -> [(Option<f64>, Option<f64>); 3] {
        [0, 1, 2].map(|i| (self.paths[i].p(50.0, f), self.paths[i].p(99.0, f)))
    }

    /// The markdown section.
    pub fn section(&self) -> String {
        let rtt = self.rtt_ms;
        let n = |i: usize| self.paths[i].cycles.len();
        let ms = |v: Option<f64>| v.map_or("—".into(), |v| format!("{v:.1} ms"));
        let mut out = format!(
            "### Logins over a {rtt:.0} ms round trip (delay shim on the upstream hop)\n\n\
             {} cycles per path (direct n={}, cold n={}, warm n={}), alternating cycle by cycle.\n\n\
             | figure | direct | proxy, cold | proxy, warm | cold − direct | warm ÷ direct | target | met |\n\
             |---|---|---|---|---|---|---|---|\n",
            n(0).max(n(1)).max(n(2)),
            n(0),
            n(1),
            n(2)
        );
        type Pick = fn(&Cycle) -> f64;
        let rows: [(&str, Pick); 3] = [
            ("login (connect → tagged OK)", |c| c.login),
            (
                "first FETCH byte after connect (login, SELECT, UID FETCH)",
                |c| c.first_fetch_byte,
            ),
            ("the whole cycle, LOGOUT included", |c| c.whole),
        ];
        for (r, (what, pick)) in rows.iter().enumerate() {
            let q = self.quantiles(*pick);
            for (label, k) in [("p50", 0), ("p99", 1)] {
                let get = |i: usize| if k == 0 { q[i].0 } else { q[i].1 };
                let (d, c, w) = (get(0), get(1), get(2));
                let added = match (c, d) {
                    (Some(c), Some(d)) => format!("{:+.1} ms ({:+.2} RTT)", c - d, (c - d) / rtt),
                    _ => "—".into(),
                };
                let ratio = match (w, d) {
                    (Some(w), Some(d)) if d > 0.0 => format!("{:.2}", w / d),
                    _ => "—".into(),
                };
                let (target, met) = if r == 0 && k == 0 {
                    let warm_ok = matches!((w, d), (Some(w), Some(d)) if w <= 0.25 * d);
                    let cold_ok = matches!((c, d), (Some(c), Some(d)) if c <= d + rtt);
                    (
                        "warm ≤ 0.25 × direct; cold ≤ direct + 1 RTT".to_string(),
                        format!(
                            "warm {}, cold {}",
                            if warm_ok { "yes" } else { "**no**" },
                            if cold_ok { "yes" } else { "**no**" }
                        ),
                    )
                } else {
                    (String::new(), String::new())
                };
                out.push_str(&format!(
                    "| {what}, {label} | {} | {} | {} | {added} | {ratio} | {target} | {met} |\n",
                    ms(d),
                    ms(c),
                    ms(w)
                ));
            }
        }
        out.push('\n');
        if !self.warm_events.is_empty() {
            let events: Vec<String> = self
                .warm_events
                .iter()
                .map(|(e, v)| format!("{e} {v}"))
                .collect();
            out.push_str(&format!(
                "- the warm proxy's `imap_warm_sessions_total` at the end (warm-up included): {}\n",
                events.join(", ")
            ));
        }
        out.push_str(&self.dead_warm_section());
        for (i, path) in self.paths.iter().enumerate() {
            if let Some(e) = path.errors.first() {
                out.push_str(&format!(
                    "- {}: {} failed cycles, the first: {e}\n",
                    NAMES[i],
                    path.errors.len()
                ));
            }
        }
        out
    }
}

impl Latency {
    /// The table of the warm path with its session found dead, beside the
    /// cold and the sound warm path.
    fn dead_warm_section(&self) -> String {
        let dead = &self.dead_warm;
        if dead.cycles.is_empty() && dead.errors.is_empty() {
            return String::new();
        }
        let ms = |v: Option<f64>| v.map_or("—".into(), |v| format!("{v:.1} ms"));
        let mut out = format!(
            "\n#### When the warm session turns out dead\n\n\
             {} cycles of the warm path, each after the shim severed the waiting session \
             (its next command dropped, the connection closed a round trip later): the \
             `NOOP` behind the `OK` fails and the proxy opens a new session; {} discards counted.\n\n\
             | figure | proxy, cold | proxy, warm | proxy, warm, session dead | dead − cold |\n\
             |---|---|---|---|---|\n",
            dead.cycles.len(),
            self.dead_warm_discards
        );
        type Pick = fn(&Cycle) -> f64;
        let rows: [(&str, Pick); 3] = [
            ("login (connect → tagged OK)", |c| c.login),
            ("first FETCH byte after connect", |c| c.first_fetch_byte),
            ("the whole cycle", |c| c.whole),
        ];
        for (what, pick) in rows {
            for (label, q) in [("p50", 50.0), ("p99", 99.0)] {
                let (c, w, d) = (
                    self.paths[1].p(q, pick),
                    self.paths[2].p(q, pick),
                    dead.p(q, pick),
                );
                let added = match (d, c) {
                    (Some(d), Some(c)) => {
                        format!("{:+.1} ms ({:+.2} RTT)", d - c, (d - c) / self.rtt_ms)
                    }
                    _ => "—".into(),
                };
                out.push_str(&format!(
                    "| {what}, {label} | {} | {} | {} | {added} |\n",
                    ms(c),
                    ms(w),
                    ms(d)
                ));
            }
        }
        if let Some(e) = dead.errors.first() {
            out.push_str(&format!(
                "\n- {} failed cycles, the first: {e}\n",
                dead.errors.len()
            ));
        }
        out
    }
}
