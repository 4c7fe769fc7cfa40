//! The results and the markdown table they print as.

use std::fmt::Write as _;

use crate::measure::{Cpu, Summary, percentile, summary};

/// Issue 15's throughput targets, proxy ÷ direct: IMAP against the
/// memory-speed stand-in, SMTP DATA, and IMAP against Dovecot (whose
/// repetitions follow `--reps`: a Dovecot run of 100 MiB takes a second).
const STANDIN_IMAP_GOAL: f64 = 0.85;
const SMTP_GOAL: f64 = 0.9;
const DOVECOT_GOAL: f64 = 0.95;

/// Which way a client reaches the upstream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Via {
    /// Through xoauth2-proxy.
    Ours,
    /// Straight to the upstream over TLS with XOAUTH2.
    Direct,
    /// Through email-oauth2-proxy.
    Peer,
    /// Through xoauth2-proxy's IMAP over TLS listener (`tls_listen`, its
    /// self-made CA): TLS on both sides of the proxy.
    OursTls,
}

impl Via {
    pub fn name(self) -> &'static str {
        match self {
            Via::Ours => "xoauth2-proxy",
            Via::Direct => "direct",
            Via::Peer => "email-oauth2-proxy",
            Via::OursTls => "xoauth2-proxy over TLS",
        }
    }
}

/// One throughput figure for one path.
#[derive(Default, Debug)]
pub struct Throughput {
    /// MB/s (10^6 bytes per second) of each run.
    pub mbps: Vec<f64>,
    /// CPU of the proxy process during the timed part of the runs, summed.
    pub cpu: Cpu,
    /// CPU of the client (the benchmark process) during the same runs.
    pub client_cpu: Cpu,
    /// Bytes moved in the runs summed in `cpu`.
    pub bytes: u64,
    pub errors: Vec<String>,
    /// (proxy path only) proxy ÷ direct of the runs of the same repetition.
    pub paired_direct: Vec<f64>,
    /// (proxy path only) proxy ÷ peer of the runs of the same repetition.
    pub paired_peer: Vec<f64>,
    /// (TLS path only) TLS listener ÷ plain listener of the same repetition.
    pub paired_plain: Vec<f64>,
}

impl Throughput {
    pub fn summary(&self) -> Option<Summary> {
        summary(&self.mbps)
    }

    /// CPU seconds (user+sys) per GB (10^9 bytes).
    pub fn cpu_per_gb(&self) -> Option<(f64, f64, f64)> {
        if self.bytes == 0 || self.cpu.total().is_zero() && self.mbps.is_empty() {
            return None;
        }
        let gb = self.bytes as f64 / 1e9;
        Some((
            self.cpu.total().as_secs_f64() / gb,
            self.cpu.user.as_secs_f64() / gb,
            self.cpu.system.as_secs_f64() / gb,
        ))
    }
}

/// Login cycle times of one path, in milliseconds.
#[derive(Default, Debug)]
pub struct Logins {
    pub ms: Vec<f64>,
    pub errors: Vec<String>,
}

/// One idle-sessions tier of one proxy.
#[derive(Default, Debug, Clone)]
pub struct Idle {
    pub via: Option<Via>,
    pub wanted: usize,
    pub established: usize,
    pub failed: usize,
    pub first_error: Option<String>,
    pub setup_secs: f64,
    pub rss_base_kib: u64,
    pub rss_kib: u64,
    /// RSS with a first wave of sessions open (and how many), when the
    /// measured wave came second.
    pub rss_fresh_kib: Option<(u64, usize)>,
    pub idle_secs: u64,
    pub idle_cpu: Cpu,
    pub threads: u64,
    pub fds: usize,
    pub note: Option<String>,
}

impl Idle {
    pub fn kib_per_session(&self) -> Option<f64> {
        (self.established > 0).then(|| {
            self.rss_kib.saturating_sub(self.rss_base_kib) as f64 / self.established as f64
        })
    }

    /// KiB per session of the first wave, in a freshly started proxy.
    pub fn kib_per_session_fresh(&self) -> Option<f64> {
        let (rss, n) = self.rss_fresh_kib?;
        (n > 0).then(|| rss.saturating_sub(self.rss_base_kib) as f64 / n as f64)
    }

    /// CPU while idle, in % of one core.
    pub fn cpu_percent(&self) -> Option<f64> {
        (self.established > 0 && self.idle_secs > 0)
            .then(|| self.idle_cpu.total().as_secs_f64() / self.idle_secs as f64 * 100.0)
    }
}

/// Everything measured against one upstream.
#[derive(Default, Debug)]
pub struct Results {
    pub fetch_bytes: usize,
    pub append_bytes: usize,
    pub smtp_bytes: usize,
    pub fetch: [Throughput; 4],
    pub append: [Throughput; 4],
    pub smtp: [Throughput; 4],
    pub logins: [Logins; 4],
    pub idle: Vec<Idle>,
    pub peer_present: bool,
    /// The stand-in's own CPU per GB while serving the direct runs (for scale).
    pub upstream_cpu: Option<(Cpu, u64)>,
    /// Login cycles through the plain listener and, alternating with them,
    /// through the IMAPS listener with a full TLS handshake each time.
    pub tls_full: Option<(Logins, Logins)>,
}

pub fn slot(via: Via) -> usize {
    match via {
        Via::Ours => 0,
        Via::Direct => 1,
        Via::Peer => 2,
        Via::OursTls => 3,
    }
}

fn mib(bytes: usize) -> String {
    format!("{} MiB", bytes / (1024 * 1024))
}

fn rate(s: Option<Summary>) -> String {
    match s {
        Some(s) => format!("{:.0} ({:.0}–{:.0}), n={}", s.median, s.min, s.max, s.n),
        None => "—".into(),
    }
}

fn times(x: f64) -> String {
    if x >= 100.0 {
        format!("×{x:.0}")
    } else if x >= 10.0 {
        format!("×{x:.1}")
    } else {
        format!("×{x:.2}")
    }
}

fn yes(ok: bool) -> &'static str {
    if ok { "yes" } else { "**no**" }
}

/// The target and "met" cells of a login row: the ≤ 1 ms target holds at p50
/// only; `added` is the latency added to the direct path.
fn login_target(q: f64, added: Option<f64>) -> (&'static str, &'static str) {
    if q != 50.0 {
        return ("", "");
    }
    let met = added.map(|a| yes(a <= 1.0)).unwrap_or("—");
    ("≤ 1 ms added at p50", met)
}

impl Results {
    /// The markdown table.
    pub fn table(&self) -> String {
        let mut t = String::new();
        let peer = self.peer_present;
        t.push_str("| # | figure | xoauth2-proxy | direct | proxy ÷ direct | email-oauth2-proxy | proxy vs peer | target | met |\n");
        t.push_str("|---|---|---|---|---|---|---|---|---|\n");
        let row = |t: &mut String, cells: [&str; 9]| {
            let _ = writeln!(t, "| {} |", cells.join(" | "));
        };

        // 1–2: throughput.
        for (no, label, set, size, goal) in [
            (
                "1",
                "IMAP `UID FETCH BODY.PEEK[]`",
                &self.fetch,
                self.fetch_bytes,
                STANDIN_IMAP_GOAL,
            ),
            (
                "1",
                "IMAP `APPEND`",
                &self.append,
                self.append_bytes,
                STANDIN_IMAP_GOAL,
            ),
            ("2", "SMTP `DATA`", &self.smtp, self.smtp_bytes, SMTP_GOAL),
        ] {
            let ours = set[0].summary();
            let direct = set[1].summary();
            let theirs = set[2].summary();
            let ratio = summary(&set[0].paired_direct);
            let vs = summary(&set[0].paired_peer);
            row(
                &mut t,
                [
                    no,
                    &format!("{label} {}, MB/s median (min–max)", mib(size)),
                    &rate(ours),
                    &rate(direct),
                    &ratio
                        .map(|r| format!("{:.2} ({:.2}–{:.2})", r.median, r.min, r.max))
                        .unwrap_or("—".into()),
                    &if peer { rate(theirs) } else { "not run".into() },
                    &vs.map(|r| format!("{} ({}–{})", times(r.median), times(r.min), times(r.max)))
                        .unwrap_or("—".into()),
                    &format!("≥ {goal:.2} × direct"),
                    &ratio
                        .map(|r| yes(r.median >= goal).to_string())
                        .unwrap_or("—".into()),
                ],
            );
        }

        // 1, with local TLS: FETCH through the proxy's IMAP over TLS listener.
        let tls = &self.fetch[slot(Via::OursTls)];
        if !tls.mbps.is_empty() || !tls.errors.is_empty() {
            let ratio = summary(&tls.paired_direct);
            row(
                &mut t,
                [
                    "1",
                    &format!(
                        "IMAP `UID FETCH BODY.PEEK[]` {} through the proxy's IMAPS listener (TLS on both sides), MB/s median (min–max)",
                        mib(self.fetch_bytes)
                    ),
                    &rate(tls.summary()),
                    &rate(self.fetch[slot(Via::Direct)].summary()),
                    &ratio
                        .map(|r| format!("{:.2} ({:.2}–{:.2})", r.median, r.min, r.max))
                        .unwrap_or("—".into()),
                    "n/a",
                    "",
                    &format!("≥ {STANDIN_IMAP_GOAL:.2} × direct"),
                    &ratio
                        .map(|r| yes(r.median >= STANDIN_IMAP_GOAL).to_string())
                        .unwrap_or("—".into()),
                ],
            );
        }

        // 3: login latency.
        let p = |via: Via, q: f64| percentile(&self.logins[slot(via)].ms, q);
        for (label, q) in [("p50", 50.0), ("p99", 99.0)] {
            let (o, d, x) = (p(Via::Ours, q), p(Via::Direct, q), p(Via::Peer, q));
            let n = |via: Via| self.logins[slot(via)].ms.len();
            let ms = |v: Option<f64>, via: Via| {
                v.map(|v| format!("{v:.3} ms (n={})", n(via)))
                    .unwrap_or("—".into())
            };
            let added = o.zip(d).map(|(o, d)| o - d);
            let (target, met) = login_target(q, added);
            let added_peer = x.zip(d).map(|(x, d)| x - d);
            row(
                &mut t,
                [
                    "3",
                    &format!("connect + login + LOGOUT, {label}"),
                    &ms(o, Via::Ours),
                    &ms(d, Via::Direct),
                    &added
                        .map(|a| format!("{a:+.3} ms added"))
                        .unwrap_or("—".into()),
                    &if peer {
                        format!(
                            "{} ({})",
                            ms(x, Via::Peer),
                            added_peer
                                .map(|a| format!("{a:+.1} ms added"))
                                .unwrap_or("—".into())
                        )
                    } else {
                        "not run".into()
                    },
                    &o.zip(x)
                        .map(|(o, x)| format!("{} faster", times(x / o)))
                        .unwrap_or("—".into()),
                    target,
                    met,
                ],
            );
        }

        // 3, with local TLS: the same cycle through the proxy's IMAPS listener;
        // the direct path is TLS too, so "added" is like for like.
        let tls = &self.logins[slot(Via::OursTls)];
        if !tls.ms.is_empty() || !tls.errors.is_empty() {
            for (label, q) in [("p50", 50.0), ("p99", 99.0)] {
                let (o, d) = (p(Via::OursTls, q), p(Via::Direct, q));
                let ms = |v: Option<f64>, via: Via| {
                    v.map(|v| format!("{v:.3} ms (n={})", self.logins[slot(via)].ms.len()))
                        .unwrap_or("—".into())
                };
                let added = o.zip(d).map(|(o, d)| o - d);
                let (target, met) = login_target(q, added);
                row(
                    &mut t,
                    [
                        "3",
                        &format!(
                            "connect + TLS + login + LOGOUT through the proxy's IMAPS listener, {label}"
                        ),
                        &ms(o, Via::OursTls),
                        &ms(d, Via::Direct),
                        &added
                            .map(|a| format!("{a:+.3} ms added"))
                            .unwrap_or("—".into()),
                        "n/a",
                        "",
                        target,
                        met,
                    ],
                );
            }
        }

        // 4: idle sessions.
        let tiers: Vec<usize> = {
            let mut v: Vec<usize> = self
                .idle
                .iter()
                .filter(|i| i.via == Some(Via::Ours))
                .map(|i| i.wanted)
                .collect();
            v.dedup();
            v
        };
        for wanted in tiers {
            let ours = self
                .idle
                .iter()
                .find(|i| i.via == Some(Via::Ours) && i.wanted == wanted);
            let theirs = self
                .idle
                .iter()
                .find(|i| i.via == Some(Via::Peer) && i.wanted == wanted);
            let est = |i: &Idle| {
                if i.established == i.wanted {
                    String::new()
                } else {
                    format!(", {} of {} up", i.established, i.wanted)
                }
            };
            let kib = |i: Option<&Idle>| match i {
                Some(i) => match i.kib_per_session() {
                    Some(k) => match i.kib_per_session_fresh() {
                        Some(f) => format!("{k:.1} KiB{} ({f:.1} KiB in a fresh process)", est(i)),
                        None => format!("{k:.1} KiB{}", est(i)),
                    },
                    None => format!(
                        "none up{}",
                        i.note
                            .as_ref()
                            .map(|n| format!(" ({n})"))
                            .unwrap_or_default()
                    ),
                },
                None => "not run".into(),
            };
            let cpu = |i: Option<&Idle>| match i {
                Some(i) => match i.cpu_percent() {
                    Some(c) => format!("{c:.2} % of a core over {} s{}", i.idle_secs, est(i)),
                    None => "—".into(),
                },
                None => "not run".into(),
            };
            let ours_kib = ours.and_then(Idle::kib_per_session);
            let their_kib = theirs.and_then(Idle::kib_per_session);
            row(
                &mut t,
                [
                    "4",
                    &format!(
                        "{wanted} idle sessions (SELECT + IDLE): RSS per session, after a first wave came and went"
                    ),
                    &kib(ours),
                    "n/a",
                    "",
                    &if peer { kib(theirs) } else { "not run".into() },
                    &ours_kib
                        .zip(their_kib)
                        .map(|(o, p)| format!("{} less", times(p / o)))
                        .unwrap_or("—".into()),
                    "≤ 64 KiB at 10,000",
                    &ours_kib
                        .map(|k| yes(k <= 64.0).to_string())
                        .unwrap_or("—".into()),
                ],
            );
            let ours_cpu = ours.and_then(Idle::cpu_percent);
            row(
                &mut t,
                [
                    "4",
                    &format!("{wanted} idle sessions: proxy CPU while idle"),
                    &cpu(ours),
                    "n/a",
                    "",
                    &if peer { cpu(theirs) } else { "not run".into() },
                    "",
                    "near zero",
                    &ours_cpu
                        .map(|c| yes(c < 1.0).to_string())
                        .unwrap_or("—".into()),
                ],
            );
        }

        // 5: CPU per GB.
        for (label, set) in [
            ("FETCH", &self.fetch),
            ("APPEND", &self.append),
            ("SMTP DATA", &self.smtp),
        ] {
            let cell = |th: &Throughput| match th.cpu_per_gb() {
                Some((total, user, sys)) => format!("{total:.2} s (user {user:.2} + sys {sys:.2})"),
                None => "—".into(),
            };
            let o = set[0].cpu_per_gb().map(|c| c.0);
            let x = set[2].cpu_per_gb().map(|c| c.0);
            row(
                &mut t,
                [
                    "5",
                    &format!("proxy CPU per GB relayed, {label}"),
                    &cell(&set[0]),
                    "n/a",
                    "",
                    &if peer {
                        cell(&set[2])
                    } else {
                        "not run".into()
                    },
                    &o.zip(x)
                        .map(|(o, x)| format!("{} less", times(x / o)))
                        .unwrap_or("—".into()),
                    "≤ 1.0 s",
                    &o.map(|o| yes(o <= 1.0).to_string()).unwrap_or("—".into()),
                ],
            );
        }
        let tls = &self.fetch[slot(Via::OursTls)];
        if let Some((total, user, sys)) = tls.cpu_per_gb() {
            row(
                &mut t,
                [
                    "5",
                    "proxy CPU per GB relayed, FETCH through the IMAPS listener (TLS on both sides)",
                    &format!("{total:.2} s (user {user:.2} + sys {sys:.2})"),
                    "n/a",
                    "",
                    "n/a",
                    "",
                    "",
                    "",
                ],
            );
        }
        t
    }

    /// What local TLS costs, from the runs through the same proxy process's
    /// plain and TLS listeners: one line each for login and FETCH.
    pub fn tls_cost(&self) -> String {
        let mut n = String::new();
        let (plain, tls) = (
            &self.logins[slot(Via::Ours)].ms,
            &self.logins[slot(Via::OursTls)].ms,
        );
        if !plain.is_empty() && !tls.is_empty() {
            let at = |q: f64| {
                percentile(tls, q)
                    .zip(percentile(plain, q))
                    .map(|(t, p)| t - p)
            };
            let _ = writeln!(
                n,
                "- local TLS per login (IMAPS listener − plain listener of the same proxy, cycles interleaved): {:+.3} ms at p50, {:+.3} ms at p99",
                at(50.0).unwrap_or(f64::NAN),
                at(99.0).unwrap_or(f64::NAN),
            );
        }
        if let Some((plain, full)) = &self.tls_full {
            let at = |v: &[f64], q: f64| percentile(v, q);
            if let (Some(f50), Some(p50), Some(f99), Some(p99)) = (
                at(&full.ms, 50.0),
                at(&plain.ms, 50.0),
                at(&full.ms, 99.0),
                at(&plain.ms, 99.0),
            ) {
                let _ = writeln!(
                    n,
                    "- local TLS per login with a full handshake each time (a client without a TLS session cache; {} cycles, alternating in blocks with {} through the plain listener): p50 {f50:.3} ms against {p50:.3} ms, {:+.3} ms; p99 {f99:.3} ms against {p99:.3} ms, {:+.3} ms",
                    full.ms.len(),
                    plain.ms.len(),
                    f50 - p50,
                    f99 - p99,
                );
            }
            for (what, l) in [("plain", plain), ("full handshake", full)] {
                if let Some(e) = l.errors.first() {
                    let _ = writeln!(
                        n,
                        "- logins ({what}, beside the full-handshake cycles): {} failed; first: {e}",
                        l.errors.len()
                    );
                }
            }
        }
        let (plain, tls) = (
            &self.fetch[slot(Via::Ours)],
            &self.fetch[slot(Via::OursTls)],
        );
        if let (Some((p, pu, ps)), Some((t, tu, ts))) = (plain.cpu_per_gb(), tls.cpu_per_gb()) {
            let ratio = summary(&tls.paired_plain)
                .map(|r| {
                    format!(
                        "; MB/s IMAPS ÷ plain {:.2} ({:.2}–{:.2})",
                        r.median, r.min, r.max
                    )
                })
                .unwrap_or_default();
            let _ = writeln!(
                n,
                "- local TLS per GB of FETCH (proxy CPU): {t:.2} s over TLS (user {tu:.2} + sys {ts:.2}) against {p:.2} s plain (user {pu:.2} + sys {ps:.2}), {:+.2} s per GB{ratio}",
                t - p
            );
        }
        n
    }

    /// The smaller table of the Dovecot run: IMAP throughput, logins, CPU per GB.
    pub fn table_dovecot(&self) -> String {
        let mut t = String::new();
        t.push_str("| # | figure | xoauth2-proxy | direct | proxy ÷ direct | target | met |\n");
        t.push_str("|---|---|---|---|---|---|---|\n");
        for (label, set, size) in [
            (
                "IMAP `UID FETCH BODY.PEEK[]`",
                &self.fetch,
                self.fetch_bytes,
            ),
            ("IMAP `APPEND`", &self.append, self.append_bytes),
        ] {
            let (o, d) = (set[0].summary(), set[1].summary());
            let ratio = summary(&set[0].paired_direct);
            let _ = writeln!(
                t,
                "| 1 | {label} {}, MB/s median (min–max) | {} | {} | {} | ≥ {DOVECOT_GOAL:.2} × direct | {} |",
                mib(size),
                rate(o),
                rate(d),
                ratio
                    .map(|r| format!("{:.2} ({:.2}–{:.2})", r.median, r.min, r.max))
                    .unwrap_or("—".into()),
                ratio.map(|r| yes(r.median >= DOVECOT_GOAL)).unwrap_or("—"),
            );
        }
        let p = |via: Via, q: f64| percentile(&self.logins[slot(via)].ms, q);
        for (label, q) in [("p50", 50.0), ("p99", 99.0)] {
            let (o, d) = (p(Via::Ours, q), p(Via::Direct, q));
            let added = o.zip(d).map(|(o, d)| o - d);
            let (target, met) = login_target(q, added);
            let ms = |v: Option<f64>, via: Via| {
                v.map(|v| format!("{v:.3} ms (n={})", self.logins[slot(via)].ms.len()))
                    .unwrap_or("—".into())
            };
            let _ = writeln!(
                t,
                "| 3 | connect + login + LOGOUT, {label} | {} | {} | {} | {} | {} |",
                ms(o, Via::Ours),
                ms(d, Via::Direct),
                added
                    .map(|a| format!("{a:+.3} ms added"))
                    .unwrap_or("—".into()),
                target,
                met,
            );
        }
        for (label, set) in [("FETCH", &self.fetch), ("APPEND", &self.append)] {
            if let Some((total, user, sys)) = set[0].cpu_per_gb() {
                let _ = writeln!(
                    t,
                    "| 5 | proxy CPU per GB relayed, {label} | {total:.2} s (user {user:.2} + sys {sys:.2}) | n/a | | | |"
                );
            }
        }
        t
    }

    /// Failures and context worth printing under the table.
    pub fn notes(&self) -> String {
        let mut n = String::new();
        for (label, set) in [
            ("FETCH", &self.fetch),
            ("APPEND", &self.append),
            ("SMTP", &self.smtp),
        ] {
            for via in [Via::Ours, Via::OursTls, Via::Direct, Via::Peer] {
                for e in set[slot(via)].errors.iter().take(3) {
                    let _ = writeln!(n, "- {label} via {}: failed run: {e}", via.name());
                }
            }
        }
        for via in [Via::Ours, Via::OursTls, Via::Direct, Via::Peer] {
            let l = &self.logins[slot(via)];
            if !l.errors.is_empty() {
                let _ = writeln!(
                    n,
                    "- logins via {}: {} failed; first: {}",
                    via.name(),
                    l.errors.len(),
                    l.errors[0]
                );
            }
        }
        for i in &self.idle {
            let via = i.via.map(Via::name).unwrap_or("?");
            let _ = writeln!(
                n,
                "- idle {} via {via}: {} up, {} failed{}, opened in {:.1} s; RSS {} KiB before, {} KiB with them; {} threads, {} fds{}",
                i.wanted,
                i.established,
                i.failed,
                i.first_error
                    .as_ref()
                    .map(|e| format!(" (first failure: {e})"))
                    .unwrap_or_default(),
                i.setup_secs,
                i.rss_base_kib,
                i.rss_kib,
                i.threads,
                i.fds,
                i.note
                    .as_ref()
                    .map(|x| format!("; {x}"))
                    .unwrap_or_default(),
            );
        }
        for (label, set) in [
            ("FETCH", &self.fetch),
            ("APPEND", &self.append),
            ("SMTP DATA", &self.smtp),
        ] {
            let per_gb = |th: &Throughput| {
                (th.bytes > 0)
                    .then(|| th.client_cpu.total().as_secs_f64() / (th.bytes as f64 / 1e9))
            };
            let cells: Vec<String> = [Via::Ours, Via::OursTls, Via::Direct, Via::Peer]
                .into_iter()
                .filter_map(|via| {
                    per_gb(&set[slot(via)]).map(|c| format!("{} {c:.2} s", via.name()))
                })
                .collect();
            if !cells.is_empty() {
                let _ = writeln!(
                    n,
                    "- the client's own CPU per GB, {label}: {}",
                    cells.join(", ")
                );
            }
        }
        if let Some((cpu, bytes)) = self.upstream_cpu
            && bytes > 0
        {
            let _ = writeln!(
                n,
                "- for scale: the upstream's own CPU while serving the direct runs: {:.2} s per GB",
                cpu.total().as_secs_f64() / (bytes as f64 / 1e9)
            );
        }
        n.push_str(&self.tls_cost());
        n
    }
}
