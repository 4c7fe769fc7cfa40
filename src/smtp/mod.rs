//! SMTP submission: the proxy answers until AUTH, then lends each transaction
//! an upstream connection from the mailbox's pool.

pub mod command;
pub mod pool;
pub mod session;
pub mod upstream;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tracing::warn;

use crate::server::{Protocol, Shared};

/// The SMTP listener's protocol.
pub struct Smtp;

impl Protocol for Smtp {
    const NAME: &'static str = "smtp";

    async fn serve(shared: Arc<Shared>, stream: TcpStream) {
        session::run(shared, stream).await
    }

    async fn refuse_busy(mut stream: TcpStream) {
        let _ = stream
            .write_all(b"421 4.3.2 Too many connections; try again later\r\n")
            .await;
        let _ = stream.shutdown().await;
    }
}

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

/// What the upstream SMTP servers offer, learnt once per provider.
#[derive(Default)]
pub struct Extensions {
    /// Held across a probe, so that clients arriving together (nodemailer's
    /// pool opens five connections at once) share one.
    known: tokio::sync::Mutex<HashMap<String, Learnt>>,
}

enum Learnt {
    Keywords(Vec<String>),
    /// The probe failed at this time.
    Failed(Instant),
}

impl Extensions {
    /// The keywords to advertise: those every configured SMTP upstream
    /// offers (the smallest SIZE); each upstream is asked once.
    pub async fn advertised(&self, shared: &Shared) -> Vec<String> {
        let mut providers: Vec<&str> = shared
            .config
            .accounts
            .iter()
            .map(|a| a.provider.as_str())
            .collect();
        providers.sort();
        providers.dedup();
        let mut known = self.known.lock().await;
        let mut sets = Vec::new();
        for name in providers {
            match known.get(name) {
                Some(Learnt::Keywords(k)) => {
                    sets.push(k.clone());
                    continue;
                }
                Some(Learnt::Failed(at)) if at.elapsed() < PROBE_RETRY => {
                    sets.push(Vec::new());
                    continue;
                }
                _ => {}
            }
            match upstream::probe_extensions(shared, shared.config.provider(name)).await {
                Ok(k) => {
                    known.insert(name.to_string(), Learnt::Keywords(k.clone()));
                    sets.push(k);
                }
                Err(e) => {
                    warn!("cannot learn the SMTP server's extensions: {e}");
                    known.insert(name.to_string(), Learnt::Failed(Instant::now()));
                    sets.push(Vec::new());
                }
            }
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
