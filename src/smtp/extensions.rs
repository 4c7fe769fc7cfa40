//! What the upstream SMTP servers offer, so that the proxy's own EHLO can
//! advertise it before any upstream connection of the client's exists.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use tracing::warn;

use super::upstream;
use crate::config::{Config, SendVia};
use crate::upstream::UpstreamTls;

/// EHLO keywords the proxy passes on when the upstream offers them. It does
/// not offer CHUNKING (BDAT) or BINARYMIME (clients use DATA), STARTTLS or
/// AUTH mechanisms of the upstream.
const PASSED_ON: &[&str] = &[
    "SIZE",
    "8BITMIME",
    "SMTPUTF8",
    "PIPELINING",
    "ENHANCEDSTATUSCODES",
    "DSN",
];

/// After a failed probe, EHLO goes without the upstream's extensions for
/// this long rather than make every client wait on an unreachable server.
const PROBE_RETRY: Duration = Duration::from_secs(10);

/// What the upstream SMTP servers offer, learnt once per provider and
/// server (address and TLS mode, each provider over its own TLS settings): a
/// reload that points a provider elsewhere asks the new server, and one that
/// keeps it asks nobody again.
#[derive(Default)]
pub struct Extensions {
    /// Never held across a probe: clients arriving together before the
    /// first answer (nodemailer's pool opens five connections at once) may
    /// each probe; the first answer is then cached for all.
    known: tokio::sync::Mutex<HashMap<String, Learnt>>,
}

enum Learnt {
    Keywords(Vec<String>),
    /// The probe failed at this time.
    Failed(Instant),
}

impl Extensions {
    /// The keywords to advertise: those every SMTP upstream of `config`'s
    /// accounts offers (the smallest SIZE); each upstream is asked once.
    pub async fn advertised(&self, config: &Config, tls: &UpstreamTls) -> Vec<String> {
        let mut servers: Vec<(String, &str)> = config
            .accounts
            .iter()
            // A Graph-only account never uses its provider's SMTP server.
            .filter(|a| a.send_via != SendVia::Graph)
            .map(|a| {
                let p = config.provider(&a.provider);
                let key = format!("{} {} {:?}", p.name, p.smtp_server, p.smtp_tls);
                (key, p.name.as_str())
            })
            .collect();
        servers.sort();
        servers.dedup_by(|a, b| a.0 == b.0);
        let mut sets = Vec::new();
        let mut to_probe = Vec::new();
        {
            let known = self.known.lock().await;
            for (key, provider) in servers {
                match known.get(&key) {
                    Some(Learnt::Keywords(k)) => sets.push(k.clone()),
                    Some(Learnt::Failed(at)) if at.elapsed() < PROBE_RETRY => sets.push(Vec::new()),
                    _ => to_probe.push((key, provider)),
                }
            }
        }
        // Probed without the lock: a slow server delays only the clients
        // that need its answer, not every EHLO of the proxy.
        let timeout = config.server.upstream_timeout;
        for (key, provider) in to_probe {
            let provider = config.provider(provider);
            let learnt = match upstream::probe_extensions(tls, provider, timeout).await {
                Ok(k) => Learnt::Keywords(k),
                Err(e) => {
                    warn!("cannot learn the SMTP server's extensions: {e}");
                    Learnt::Failed(Instant::now())
                }
            };
            sets.push(match &learnt {
                Learnt::Keywords(k) => k.clone(),
                Learnt::Failed(_) => Vec::new(),
            });
            self.known.lock().await.insert(key, learnt);
        }
        intersect(&sets)
    }
}

fn intersect(sets: &[Vec<String>]) -> Vec<String> {
    let keyword = |k: &str| {
        k.split_whitespace()
            .next()
            .unwrap_or_default()
            .to_ascii_uppercase()
    };
    let mut out = Vec::new();
    for wanted in PASSED_ON {
        let found: Vec<&String> = sets
            .iter()
            .filter_map(|set| set.iter().find(|k| keyword(k) == *wanted))
            .collect();
        if sets.is_empty() || found.len() != sets.len() {
            continue;
        }
        if *wanted == "SIZE" {
            let smallest = found
                .iter()
                .filter_map(|k| k.split_whitespace().nth(1)?.parse::<u64>().ok())
                .min();
            out.push(match smallest {
                Some(n) => format!("SIZE {n}"),
                None => "SIZE".to_string(),
            });
        } else {
            out.push(wanted.to_string());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offers_what_every_upstream_offers() {
        let ms: Vec<String> = [
            "SIZE 157286400",
            "PIPELINING",
            "DSN",
            "ENHANCEDSTATUSCODES",
            "AUTH LOGIN XOAUTH2",
            "8BITMIME",
            "BINARYMIME",
            "CHUNKING",
            "SMTPUTF8",
        ]
        .map(String::from)
        .to_vec();
        let small: Vec<String> = ["SIZE 1000", "8BITMIME"].map(String::from).to_vec();
        assert_eq!(
            intersect(std::slice::from_ref(&ms)),
            vec![
                "SIZE 157286400",
                "8BITMIME",
                "SMTPUTF8",
                "PIPELINING",
                "ENHANCEDSTATUSCODES",
                "DSN"
            ]
        );
        assert_eq!(intersect(&[ms, small]), vec!["SIZE 1000", "8BITMIME"]);
        assert!(intersect(&[]).is_empty());
    }
}
