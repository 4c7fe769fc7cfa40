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

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use crate::client::{self, Credentials, Imap, Route};
use crate::measure::percentile;

/// A TCP relay to `target` that delays each direction by `one_way`.
pub struct Shim {
    pub addr: SocketAddr,
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
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                tokio::spawn(relay(client, target, one_way));
            }
        });
        Ok(Shim { addr, task })
    }
}

/// One connection through the shim: a round trip for the TCP handshake,
/// then each direction delayed.
async fn relay(client: TcpStream, target: SocketAddr, one_way: Duration) {
    tokio::time::sleep(2 * one_way).await;
    let Ok(server) = TcpStream::connect(target).await else {
        return;
    };
    let _ = (client.set_nodelay(true), server.set_nodelay(true));
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    tokio::join!(
        delayed(client_read, server_write, one_way),
        delayed(server_read, client_write, one_way)
    );
}

/// Copies `from` to `to`, each chunk written `one_way` after it was read.
async fn delayed(
    mut from: impl tokio::io::AsyncRead + Unpin,
    mut to: impl tokio::io::AsyncWrite + Unpin,
    one_way: Duration,
) {
    let (queue, mut due) = mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();
    let read = async move {
        let mut buf = vec![0u8; 64 * 1024];
        while let Ok(n @ 1..) = from.read(&mut buf).await {
            let at = tokio::time::Instant::now() + one_way;
            if queue.send((at, buf[..n].to_vec())).is_err() {
                break;
            }
        }
    };
    let write = async move {
        while let Some((at, bytes)) = due.recv().await {
            tokio::time::sleep_until(at).await;
            if to.write_all(&bytes).await.is_err() {
                return;
            }
        }
        let _ = to.shutdown().await;
    };
    tokio::join!(read, write);
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
