//! Prometheus metrics, served on the admin listener at `/metrics`.
//!
//! One process-wide registry: counting must be possible from any corner of
//! the data path without threading a handle through it, and every counter is
//! an atomic add, cheap enough for the relay's hot path.

use std::sync::OnceLock;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// How a client login ended, as the `outcome` label of `logins` counts it.
/// The login path maps its errors to these; metrics knows nothing of logins.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoginOutcome {
    Ok,
    BadPassword,
    NotAuthorised,
    IdpRefused,
    UpstreamRejected,
    IdpUnavailable,
    UpstreamUnavailable,
    /// Refused unchecked: the client's address is throttled.
    Throttled,
    /// Every password check slot and queue place was taken: told to retry.
    Busy,
}

impl LoginOutcome {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            LoginOutcome::Ok => "ok",
            LoginOutcome::BadPassword => "bad_password",
            LoginOutcome::NotAuthorised => "not_authorised",
            LoginOutcome::IdpRefused => "idp_refused",
            LoginOutcome::UpstreamRejected => "upstream_rejected",
            LoginOutcome::IdpUnavailable => "idp_unavailable",
            LoginOutcome::UpstreamUnavailable => "upstream_unavailable",
            LoginOutcome::Throttled => "throttled",
            LoginOutcome::Busy => "busy",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LoginLabels {
    pub protocol: &'static str,
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProtocolLabels {
    pub protocol: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TlsLabels {
    pub protocol: &'static str,
    /// `plain` (accepted on a plain listener), `starttls` (of those, upgraded),
    /// `implicit` (TLS from the first byte).
    pub tls: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BytesLabels {
    pub protocol: &'static str,
    /// `upstream` (client to server) or `downstream` (server to client).
    pub direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TokenLabels {
    pub account: String,
    /// `ok`, `needs_login`, `refused`, `unavailable`.
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AccountLabels {
    pub account: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServerLabels {
    /// `host:port` of the upstream server.
    pub server: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusalLabels {
    /// `imap`, `smtp`, `admin`.
    pub protocol: &'static str,
    /// `max_connections` (the listener's cap), `per_address`
    /// (`server.max_prelogin_per_address`).
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WarmLabels {
    /// `hit`, `miss`, `discarded`, `opened`, `closed`: see [`Metrics::warm`].
    pub event: &'static str,
}

/// Every metric the proxy exports.
pub struct Metrics {
    registry: Registry,
    pub logins: Family<LoginLabels, Counter>,
    pub connections: Family<ProtocolLabels, Gauge>,
    pub client_connections: Family<TlsLabels, Counter>,
    pub tls_handshake_failures: Family<TlsLabels, Counter>,
    pub bytes: Family<BytesLabels, Counter<u64, AtomicU64>>,
    pub token_requests: Family<TokenLabels, Counter>,
    pub upstream_connect_seconds: Family<ServerLabels, Histogram>,
    pub upstream_login_seconds: Family<ServerLabels, Histogram>,
    pub refused_connections: Family<RefusalLabels, Counter>,
    /// Background refreshes of idle grants; `outcome` as in `token_requests`.
    pub grant_keepalive: Family<TokenLabels, Counter>,
    /// 1 while an account's newest grant is in memory only (its save failed).
    pub grant_unsaved: Family<AccountLabels, Gauge>,
    /// 1 while the grant store answers (always, for files); 0 while a
    /// shared store (PostgreSQL) cannot be reached.
    pub grant_store_up: Gauge,
    pub password_checks: Counter,
    /// 1 while the account needs `login` (no grant, or the grant was refused).
    pub account_needs_login: Family<AccountLabels, Gauge>,
    /// Unix seconds when the account's last access token expires.
    pub access_token_expiry: Family<AccountLabels, Gauge>,
    /// Messages submitted to Microsoft Graph `sendMail`, by account and
    /// outcome (`ok`, `refused`, `throttled`, `unavailable`, `too_large`).
    pub graph_sends: Family<TokenLabels, Counter>,
    /// Mailboxes with `send_via = "auto"` switched to Graph after 5.7.139.
    pub graph_switches: Family<AccountLabels, Counter>,
    pub warm: Family<WarmLabels, Counter>,
}

fn latency_histogram() -> Histogram {
    // 1 ms … ~16 s
    Histogram::new(exponential_buckets(0.001, 2.0, 15))
}

impl Metrics {
    fn new() -> Self {
        let mut registry = Registry::with_prefix("xoauth2_proxy");
        let logins = Family::<LoginLabels, Counter>::default();
        registry.register(
            "logins",
            "Client logins by protocol and outcome",
            logins.clone(),
        );
        let connections = Family::<ProtocolLabels, Gauge>::default();
        registry.register(
            "connections",
            "Client connections open now",
            connections.clone(),
        );
        let client_connections = Family::<TlsLabels, Counter>::default();
        registry.register(
            "client_connections",
            "Client connections by TLS mode: plain (accepted on a plain listener), starttls (of those, upgraded), implicit",
            client_connections.clone(),
        );
        let tls_handshake_failures = Family::<TlsLabels, Counter>::default();
        registry.register(
            "tls_handshake_failures",
            "Client TLS handshakes that failed or timed out, by TLS mode",
            tls_handshake_failures.clone(),
        );
        let bytes = Family::<BytesLabels, Counter<u64, AtomicU64>>::default();
        registry.register(
            "relayed_bytes",
            "Bytes relayed after login, by direction",
            bytes.clone(),
        );
        let token_requests = Family::<TokenLabels, Counter>::default();
        registry.register(
            "token_requests",
            "Access token requests to the identity provider, by account and outcome",
            token_requests.clone(),
        );
        let upstream_connect_seconds = Family::<ServerLabels, Histogram>::new_with_constructor(
            latency_histogram as fn() -> Histogram,
        );
        registry.register(
            "upstream_connect_seconds",
            "TCP connect to an upstream server",
            upstream_connect_seconds.clone(),
        );
        let upstream_login_seconds = Family::<ServerLabels, Histogram>::new_with_constructor(
            latency_histogram as fn() -> Histogram,
        );
        registry.register(
            "upstream_login_seconds",
            "Opening an authenticated upstream session, connect included",
            upstream_login_seconds.clone(),
        );
        let refused_connections = Family::<RefusalLabels, Counter>::default();
        registry.register(
            "refused_connections",
            "Connections closed before being served, by listener and reason: max_connections (the listener's cap), per_address (server.max_prelogin_per_address)",
            refused_connections.clone(),
        );
        let grant_keepalive = Family::<TokenLabels, Counter>::default();
        registry.register(
            "grant_keepalive_refreshes",
            "Background refreshes of delegated grants unused for server.grant_keepalive, by account and outcome",
            grant_keepalive.clone(),
        );
        let grant_unsaved = Family::<AccountLabels, Gauge>::default();
        registry.register(
            GRANT_UNSAVED,
            "1 while the account's newest grant is held in memory only because writing its file failed; the write is retried until it succeeds",
            grant_unsaved.clone(),
        );
        let grant_store_up = Gauge::default();
        grant_store_up.set(1);
        registry.register(
            "grant_store_up",
            "1 while the grant store answers; 0 while the shared store (PostgreSQL) cannot be reached: logins with a cached access token go on, those that need a refresh are told to come back",
            grant_store_up.clone(),
        );
        let password_checks = Counter::default();
        registry.register(
            "password_checks",
            "Argon2 password checks run (those against the stand-in hash for unknown usernames included)",
            password_checks.clone(),
        );
        let account_needs_login = Family::<AccountLabels, Gauge>::default();
        registry.register(
            "account_needs_login",
            "1 while the account needs `xoauth2-proxy login` (no grant yet, or the identity provider revoked, expired or refused it), else 0",
            account_needs_login.clone(),
        );
        let access_token_expiry = Family::<AccountLabels, Gauge>::default();
        registry.register(
            "access_token_expiry_seconds",
            "When the last access token obtained for the account expires, in Unix seconds (absent until one is known); tokens are renewed on use, so an idle account's may lie in the past",
            access_token_expiry.clone(),
        );
        let graph_sends = Family::<TokenLabels, Counter>::default();
        registry.register(
            "graph_sends",
            "Messages submitted to Microsoft Graph sendMail (send_via graph or auto), by account and outcome: ok, refused, throttled, unavailable, too_large",
            graph_sends.clone(),
        );
        let graph_switches = Family::<AccountLabels, Counter>::default();
        registry.register(
            "graph_switches",
            "Accounts with send_via = auto switched to Microsoft Graph after SMTP answered 5.7.139 (SMTP AUTH disabled)",
            graph_switches.clone(),
        );
        let warm = Family::<WarmLabels, Counter>::default();
        registry.register(
            "imap_warm_sessions",
            "Warm upstream IMAP sessions by event: hit (a login served from one), miss (a login that found none ready), discarded (found dead, stale or answering too late), opened, closed (unused for imap.warm_idle_timeout, or at reload and shutdown)",
            warm.clone(),
        );
        Metrics {
            registry,
            graph_sends,
            graph_switches,
            warm,
            logins,
            connections,
            client_connections,
            tls_handshake_failures,
            bytes,
            token_requests,
            upstream_connect_seconds,
            upstream_login_seconds,
            refused_connections,
            grant_keepalive,
            grant_unsaved,
            grant_store_up,
            password_checks,
            account_needs_login,
            access_token_expiry,
        }
    }

    /// The text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }

    /// Creates the per-protocol series at zero, so that a fresh proxy's
    /// `/metrics` already shows them.
    pub fn register_protocols(&self, protocols: &[&'static str]) {
        for &protocol in protocols {
            let _ = self.connections.get_or_create(&ProtocolLabels { protocol });
            let _ = self.logins.get_or_create(&LoginLabels {
                protocol,
                outcome: LoginOutcome::Ok.as_str(),
            });
            for direction in ["upstream", "downstream"] {
                self.relayed(protocol, direction);
            }
        }
    }

    /// Counts a client connection in TLS mode `tls` (`plain`, `starttls`,
    /// `implicit`), or a failed handshake in that mode when `!ok`.
    pub fn client_tls(&self, protocol: &'static str, tls: &'static str, ok: bool) {
        let family = if ok {
            &self.client_connections
        } else {
            &self.tls_handshake_failures
        };
        family.get_or_create(&TlsLabels { protocol, tls }).inc();
    }

    /// Counts a client login attempt.
    pub fn login(&self, protocol: &'static str, outcome: impl Into<LoginOutcome>) {
        let outcome = outcome.into().as_str();
        self.logins
            .get_or_create(&LoginLabels { protocol, outcome })
            .inc();
    }

    pub fn relayed(
        &self,
        protocol: &'static str,
        direction: &'static str,
    ) -> Counter<u64, AtomicU64> {
        self.bytes
            .get_or_create(&BytesLabels {
                protocol,
                direction,
            })
            .clone()
    }

    pub fn upstream_connect(&self, server: &str, took: Duration) {
        self.upstream_connect_seconds
            .get_or_create(&ServerLabels {
                server: server.to_string(),
            })
            .observe(took.as_secs_f64());
    }

    pub fn upstream_login(&self, server: &str, took: Duration) {
        self.upstream_login_seconds
            .get_or_create(&ServerLabels {
                server: server.to_string(),
            })
            .observe(took.as_secs_f64());
    }
}

/// The name of the unsaved-grant gauge, without the registry's prefix.
const GRANT_UNSAVED: &str = "grant_unsaved";

/// The accounts whose grant is not saved, read from the text exposition of
/// a running proxy's `/metrics` (what `xoauth2-proxy status` asks for).
pub fn unsaved_accounts(exposition: &str) -> Vec<String> {
    let series = format!("xoauth2_proxy_{GRANT_UNSAVED}{{account=\"");
    exposition
        .lines()
        .filter_map(|line| line.strip_prefix(&series))
        .filter_map(|rest| {
            let (label, value) = rest.rsplit_once("\"} ")?;
            (value.trim().parse::<f64>().ok()? > 0.0).then(|| unescape_label(label))
        })
        .collect()
}

/// A label value as the text format escapes it (`\\`, `\"`, `\n`), read back.
fn unescape_label(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    let mut chars = value.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('n') => out.push('\n'),
            Some(escaped) => out.push(escaped),
            None => out.push('\\'),
        }
    }
    out
}

impl Metrics {
    /// Counts a warm session event (`hit`, `miss`, `discarded`, `opened`, `closed`).
    pub fn warm(&self, event: &'static str) {
        self.warm.get_or_create(&WarmLabels { event }).inc();
    }

    /// Counts a connection refused before it was served.
    pub fn refused(&self, protocol: &'static str, reason: &'static str) {
        self.refused_connections
            .get_or_create(&RefusalLabels { protocol, reason })
            .inc();
    }
}

/// The process's metrics.
pub fn get() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(Metrics::new)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logins_are_counted_by_protocol_and_outcome() {
        let m = Metrics::new();
        m.login("imap", LoginOutcome::Ok);
        m.login("smtp", LoginOutcome::BadPassword);
        m.relayed("imap", "downstream").inc_by(42);
        m.upstream_connect("localhost:993", Duration::from_millis(3));
        m.client_tls("smtp", "starttls", true);
        m.client_tls("imap", "implicit", false);
        m.refused("smtp", "per_address");
        m.login("imap", LoginOutcome::Throttled);
        m.password_checks.inc();
        m.warm("hit");
        let text = m.encode();
        assert!(
            text.contains(r#"xoauth2_proxy_imap_warm_sessions_total{event="hit"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"xoauth2_proxy_logins_total{protocol="imap",outcome="ok"} 1"#),
            "{text}"
        );
        assert!(text.contains(r#"outcome="bad_password""#), "{text}");
        assert!(
            text.contains(r#"xoauth2_proxy_logins_total{protocol="imap",outcome="throttled"} 1"#)
                && text.contains("xoauth2_proxy_password_checks_total 1"),
            "{text}"
        );
        assert!(
            text.contains(
                r#"xoauth2_proxy_relayed_bytes_total{protocol="imap",direction="downstream"} 42"#
            ),
            "{text}"
        );
        assert!(
            text.contains(
                r#"xoauth2_proxy_client_connections_total{protocol="smtp",tls="starttls"} 1"#
            ) && text.contains(
                r#"xoauth2_proxy_tls_handshake_failures_total{protocol="imap",tls="implicit"} 1"#
            ),
            "{text}"
        );
        assert!(
            text.contains("xoauth2_proxy_upstream_connect_seconds_bucket"),
            "{text}"
        );
        assert!(
            text.contains(
                r#"xoauth2_proxy_refused_connections_total{protocol="smtp",reason="per_address"} 1"#
            ),
            "{text}"
        );
    }

    #[test]
    fn unsaved_grants_are_read_back_from_the_exposition() {
        let m = Metrics::new();
        let gauge = |account: &str| {
            m.grant_unsaved.get_or_create(&AccountLabels {
                account: account.into(),
            })
        };
        gauge("saved@contoso.com").set(0);
        gauge("full-disk@contoso.com").set(1);
        gauge(r#"odd"name\@contoso.com"#).set(1);
        let mut unsaved = unsaved_accounts(&m.encode());
        unsaved.sort();
        assert_eq!(
            unsaved,
            vec![
                "full-disk@contoso.com".to_string(),
                r#"odd"name\@contoso.com"#.to_string()
            ]
        );
    }
}
