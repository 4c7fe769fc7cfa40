//! What every session of one config shares, and the interface a protocol
//! offers the listener. Below the protocols and the listener: `imap` and
//! `smtp` import this module, `server` drives it, and neither side imports
//! the other.
//!
//! The limits a connection lives under before login are here too, as both
//! sides see them: the listener counts connections not logged in yet per
//! client address ([`PreloginSlots`]) and hands each session its
//! [`Connection`], which holds the slot until the session logs in and carries
//! the login deadline, counted from the connection's start whatever the client
//! sends ([`until`]); what the session writes before login is bounded by
//! it too ([`write_by`]), so a client that sends and never reads cannot
//! hold its connection either.

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio_rustls::server::TlsStream;
use tracing::warn;

use crate::accounts::{Accounts, LoginGuard};
use crate::config::Config;
use crate::local_tls::LocalTls;
use crate::oauth::store::{LoadError, TokenStore};
use crate::oauth::{Health, TokenManager};
use crate::throttle;
use crate::upstream::UpstreamTls;

/// What every session needs, built once from the config and replaced whole
/// on reload. Only what follows the config belongs here; what lives as long
/// as a listener (the SMTP pools) belongs to that protocol's value.
pub struct Shared {
    pub config: Config,
    pub accounts: Accounts,
    pub tokens: TokenManager,
    pub tls: UpstreamTls,
    /// The certificate presented to clients; `None` without `[tls]`.
    pub local_tls: Option<LocalTls>,
    /// Microsoft Graph `sendMail`, for `send_via = "graph"` and `"auto"`.
    pub graph: crate::graph::Graph,
}

impl Shared {
    /// The handles of `config`; its accounts check passwords through
    /// `guard`, and its tokens report to `health`: both the process keeps
    /// across reloads.
    pub fn new(config: Config, guard: &LoginGuard, health: &Health) -> Result<Self, String> {
        let store = TokenStore::for_config(&config)?;
        Ok(Shared {
            accounts: Accounts::new(&config, guard.clone())?,
            tokens: TokenManager::new(&config, store, health)?,
            tls: UpstreamTls::new(&config)?,
            local_tls: LocalTls::load(&config)?,
            graph: crate::graph::Graph::new(&config)?,
            config,
        })
    }

    /// STARTTLS: TLS under `client` with the certificate in force, before
    /// the connection's login deadline; `None` (logged) when there is none or the
    /// handshake fails. See [`crate::local_tls::start_tls`] for what happens
    /// to the `pipelined` bytes of plaintext the client sent behind the command.
    pub async fn start_tls<S: ClientStream>(
        &self,
        protocol: &'static str,
        client: S,
        pipelined: usize,
        connection: &Connection,
    ) -> Option<TlsStream<S>> {
        let local_tls = self.local_tls.as_ref()?;
        let timeout = connection.login_time_left(self.config.server.login_timeout);
        let upgraded = crate::local_tls::start_tls(local_tls, client, pipelined, timeout).await;
        crate::metrics::get().client_tls(protocol, "starttls", upgraded.is_ok());
        match upgraded {
            Ok(stream) => Some(stream),
            Err(e) => {
                tracing::info!("STARTTLS: {e}; closing");
                None
            }
        }
    }

    /// At start and at reload: creates the state directory (private to the
    /// user) if it is missing, and refuses one that other users may write
    /// or a grant or lock file that is not the proxy's own (each sentence
    /// says the `chmod`, `chown` or `rm` that fixes it). A grant that does
    /// not open (wrong token key?) is logged; its clients are told to come
    /// back later until the right key is in force.
    pub async fn prepare_state_dir(&self) -> Result<(), String> {
        let store = self.tokens.store();
        store.prepare().await?;
        let accounts = &self.config.accounts;
        for account in accounts {
            store.check_lock(&account.username)?;
        }
        let usernames: Vec<String> = accounts.iter().map(|a| a.username.clone()).collect();
        let read = store.load_many(&usernames).await;
        for (username, loaded) in usernames.iter().zip(read) {
            match loaded {
                Ok(_) => {}
                Err(LoadError::Unsafe(e)) => return Err(e),
                Err(e) => warn!(account = %username, "{e}"),
            }
        }
        Ok(())
    }
}

/// A client connection as the sessions see it: plain TCP, or TLS over it.
pub trait ClientStream: AsyncRead + AsyncWrite + Unpin + Send + Sync + 'static {}

impl<T: AsyncRead + AsyncWrite + Unpin + Send + Sync + 'static> ClientStream for T {}

/// Where one client connection stands with TLS, and what its listener's
/// section asks for: the one place that decides whether STARTTLS is offered
/// and whether a login may be taken.
#[derive(Debug, Clone, Copy)]
pub struct TlsPolicy {
    /// The connection runs over TLS (implicit, or after STARTTLS).
    pub active: bool,
    /// STARTTLS may be offered: `[tls]` is present and the section's `starttls`.
    starttls: bool,
    /// The section's `require_tls`.
    require: bool,
}

impl TlsPolicy {
    /// For a connection of the listener whose section says `starttls` and
    /// `require_tls`; `active` when it is TLS from the first byte.
    pub fn new(shared: &Shared, starttls: bool, require_tls: bool, active: bool) -> Self {
        TlsPolicy {
            active,
            starttls: shared.local_tls.is_some() && starttls,
            require: require_tls,
        }
    }

    /// STARTTLS is advertised and accepted now.
    pub fn offers_starttls(&self) -> bool {
        self.starttls && !self.active
    }

    /// A login must wait for TLS.
    pub fn login_needs_tls(&self) -> bool {
        self.require && !self.active
    }

    /// The same connection once STARTTLS has put TLS under it.
    pub fn upgraded(self) -> Self {
        TlsPolicy {
            active: true,
            ..self
        }
    }
}

/// What the listener knows of one client connection.
#[derive(Debug)]
pub struct Connection {
    /// The client's address: throttling and the per-address limits go by its IP.
    pub peer: SocketAddr,
    /// The stream is TLS from the first byte (`tls_listen`).
    pub over_tls: bool,
    /// When the connection was accepted: the login deadline counts from here.
    pub accepted: Instant,
    /// The connection's place among its address's connections not logged in
    /// yet; given back at login.
    prelogin: Option<PreloginSlot>,
}

impl Connection {
    /// A connection accepted now from `peer`, holding `prelogin`.
    pub fn new(peer: SocketAddr, over_tls: bool, prelogin: PreloginSlot) -> Self {
        Connection {
            peer,
            over_tls,
            accepted: Instant::now(),
            prelogin: Some(prelogin),
        }
    }

    /// The client has logged in: its slot goes back to its address, so that
    /// logged-in sessions (NocoBase keeps many from one address) never count
    /// against `server.max_prelogin_per_address`.
    pub fn logged_in(&mut self) {
        self.prelogin = None;
    }

    /// When a client that has not logged in is closed: `login_timeout` after
    /// the connection's start.
    pub fn login_deadline(&self, login_timeout: Duration) -> tokio::time::Instant {
        tokio::time::Instant::from_std(self.accepted + login_timeout)
    }

    /// What is left of the time to log in (a TLS handshake must fit in it),
    /// in whole milliseconds, as logs name it.
    pub fn login_time_left(&self, login_timeout: Duration) -> Duration {
        let left = self
            .login_deadline(login_timeout)
            .saturating_duration_since(tokio::time::Instant::now());
        Duration::from_millis(left.as_millis() as u64)
    }
}

/// Runs `read` until `deadline`; `None` once it has passed. The deadline is
/// looked at before `read` starts: a timeout alone polls `read` first and
/// would never fire for a client that always has its next line ready.
pub async fn until<F: Future>(deadline: tokio::time::Instant, read: F) -> Option<F::Output> {
    if tokio::time::Instant::now() >= deadline {
        return None;
    }
    tokio::time::timeout_at(deadline, read).await.ok()
}

/// How long a write to a client may take once its deadline has passed:
/// room for the goodbye, or for the OK of a login that ended late.
pub const WRITE_GRACE: Duration = Duration::from_secs(2);

/// Runs `write` (a write or a flush towards a client) by `deadline` or
/// [`WRITE_GRACE`] from now, whichever is later. A client that pipelines
/// commands and reads no answers fills the socket's buffers; past the
/// deadline the write fails with `TimedOut` and the connection closes, so
/// that it cannot hold its connection (and before login its slot) for ever.
pub async fn write_by<T>(
    deadline: tokio::time::Instant,
    write: impl Future<Output = std::io::Result<T>>,
) -> std::io::Result<T> {
    let deadline = deadline.max(tokio::time::Instant::now() + WRITE_GRACE);
    match tokio::time::timeout_at(deadline, write).await {
        Ok(written) => written,
        Err(_) => {
            tracing::info!("client did not read the answers in time; closing");
            Err(std::io::ErrorKind::TimedOut.into())
        }
    }
}

/// Writes and flushes `bytes` to `stream` by `deadline` ([`write_by`]).
pub async fn write_before<W: AsyncWrite + Unpin>(
    deadline: tokio::time::Instant,
    stream: &mut W,
    bytes: &[u8],
) -> std::io::Result<()> {
    write_by(deadline, async {
        stream.write_all(bytes).await?;
        stream.flush().await
    })
    .await
}

/// The connections not logged in yet, counted per client address, so that
/// one address cannot hold every connection the proxy may have open
/// (`server.max_prelogin_per_address`, IMAP and SMTP together). An address
/// is counted as the login throttle counts it ([`throttle::address_key`]):
/// IPv6 by its /64, or a host holding a /64 would have 2^64 addresses'
/// worth of slots. A cheap
/// handle; clones count in the same map. An address has an entry only while
/// it has such connections, so the map is never larger than the number of
/// open connections.
#[derive(Clone, Default)]
pub struct PreloginSlots(Arc<Mutex<HashMap<IpAddr, usize>>>);

impl PreloginSlots {
    /// A slot for a new connection from `ip`, or `None` when `max`
    /// connections from its address (IPv6: its /64) have not logged in yet.
    /// An IPv4 client reached through an IPv6 socket counts as its IPv4
    /// address.
    pub fn try_acquire(&self, ip: IpAddr, max: usize) -> Option<PreloginSlot> {
        let ip = throttle::address_key(ip);
        let mut counts = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let count = counts.get(&ip).copied().unwrap_or(0);
        if count >= max {
            return None;
        }
        counts.insert(ip, count + 1);
        Some(PreloginSlot {
            slots: self.clone(),
            ip,
        })
    }

    /// Connections from `ip` holding a slot now.
    #[cfg(test)]
    fn held(&self, ip: IpAddr) -> usize {
        let counts = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        counts.get(&throttle::address_key(ip)).copied().unwrap_or(0)
    }

    /// Addresses with an entry in the map.
    #[cfg(test)]
    fn addresses(&self) -> usize {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).len()
    }
}

/// One connection's place among its address's connections not logged in
/// yet; dropping it gives the place back.
pub struct PreloginSlot {
    slots: PreloginSlots,
    ip: IpAddr,
}

impl std::fmt::Debug for PreloginSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PreloginSlot")
            .field("ip", &self.ip)
            .finish()
    }
}

impl Drop for PreloginSlot {
    fn drop(&mut self) {
        let mut counts = self.slots.0.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(count) = counts.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                counts.remove(&self.ip);
            }
        }
    }
}

/// Why a new connection is turned away before it is served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Busy {
    /// The listener's cap on open connections is reached.
    Server,
    /// Its address has `server.max_prelogin_per_address` connections that
    /// have not logged in yet.
    Address,
}

impl Busy {
    /// The `reason` label of the refused-connections metric.
    pub fn reason(self) -> &'static str {
        match self {
            Busy::Server => "max_connections",
            Busy::Address => "per_address",
        }
    }
}

/// Logs refused connections once per burst, not once per connection: the
/// first refusal is logged, then at most one a minute, saying how many went
/// unlogged in between, so that an attack cannot flood the log. The metric
/// counts every one.
#[derive(Debug, Default)]
pub struct RefusalLog {
    quiet_until: Option<Instant>,
    unlogged: u64,
}

impl RefusalLog {
    /// How long a logged refusal silences the next ones.
    const QUIET: Duration = Duration::from_secs(60);

    /// Notes a refusal at `now`. `Some(n)` when it is to be logged, `n`
    /// being the refusals left unlogged since the last line.
    pub fn note(&mut self, now: Instant) -> Option<u64> {
        match self.quiet_until {
            Some(until) if now < until => {
                self.unlogged += 1;
                None
            }
            _ => {
                self.quiet_until = Some(now + Self::QUIET);
                Some(std::mem::take(&mut self.unlogged))
            }
        }
    }
}

/// A protocol's entry point for the connections of one listener. The value
/// lives as long as the listener; each connection gets the [`Shared`] in
/// force when it was accepted.
pub trait Protocol: Send + Sync + 'static {
    /// Lower-case name for logs, spans and metrics: "imap", "smtp".
    const NAME: &'static str;
    /// Serves one client until it or the upstream closes.
    fn serve<S: ClientStream>(
        &self,
        shared: Arc<Shared>,
        stream: S,
        connection: Connection,
    ) -> impl Future<Output = ()> + Send;
    /// Tells a client that cannot be served now why (`busy`), then closes.
    fn refuse_busy<S: ClientStream>(stream: S, busy: Busy) -> impl Future<Output = ()> + Send;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_gets_at_most_max_slots_and_others_are_not_affected() {
        let slots = PreloginSlots::default();
        let (a, b): (IpAddr, IpAddr) = ("127.0.0.2".parse().unwrap(), "127.0.0.1".parse().unwrap());
        let mut held: Vec<_> = (0..3).map(|_| slots.try_acquire(a, 3).unwrap()).collect();
        assert!(slots.try_acquire(a, 3).is_none());
        let other = slots
            .try_acquire(b, 3)
            .expect("another address has its own slots");
        held.pop();
        assert_eq!(slots.held(a), 2);
        assert!(
            slots.try_acquire(a, 3).is_some(),
            "a slot given back can be taken"
        );
        drop(other);
        assert_eq!(slots.held(b), 0);
    }

    #[test]
    fn an_address_leaves_the_map_with_its_last_slot() {
        let slots = PreloginSlots::default();
        for last in 0..1000u32 {
            let ip = IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + last));
            drop(slots.try_acquire(ip, 1).unwrap());
        }
        assert_eq!(slots.addresses(), 0);
    }

    #[test]
    fn an_ipv4_client_on_an_ipv6_socket_counts_as_its_ipv4_address() {
        let slots = PreloginSlots::default();
        let _v4 = slots.try_acquire("192.0.2.7".parse().unwrap(), 1).unwrap();
        assert!(
            slots
                .try_acquire("::ffff:192.0.2.7".parse().unwrap(), 1)
                .is_none()
        );
    }

    #[test]
    fn ipv6_clients_share_the_slots_of_their_64() {
        let slots = PreloginSlots::default();
        let ip = |text: &str| -> IpAddr { text.parse().unwrap() };
        let _held = slots.try_acquire(ip("2001:db8:1:2::1"), 2).unwrap();
        let _also = slots.try_acquire(ip("2001:db8:1:2:ffff::9"), 2).unwrap();
        assert!(
            slots.try_acquire(ip("2001:db8:1:2::abcd"), 2).is_none(),
            "another address of the same /64 gets no third slot"
        );
        assert!(
            slots.try_acquire(ip("2001:db8:1:3::1"), 2).is_some(),
            "the next /64 has its own slots"
        );
        assert_eq!(slots.held(ip("2001:db8:1:2::7")), 2);
    }

    #[test]
    fn ipv4_clients_are_counted_per_address() {
        let slots = PreloginSlots::default();
        let ip = |text: &str| -> IpAddr { text.parse().unwrap() };
        let _held = slots.try_acquire(ip("192.0.2.7"), 1).unwrap();
        assert!(
            slots.try_acquire(ip("192.0.2.8"), 1).is_some(),
            "a neighbour has its own slot"
        );
    }

    #[test]
    fn a_burst_of_refusals_is_logged_once_a_minute_with_the_count_left_out() {
        let mut log = RefusalLog::default();
        let start = Instant::now();
        assert_eq!(log.note(start), Some(0));
        for i in 1..=500 {
            assert_eq!(log.note(start + Duration::from_millis(i)), None);
        }
        assert_eq!(log.note(start + RefusalLog::QUIET), Some(500));
        assert_eq!(log.note(start + RefusalLog::QUIET), None);
    }

    #[tokio::test]
    async fn a_read_ready_at_once_is_not_started_past_the_deadline() {
        let later = tokio::time::Instant::now() + Duration::from_secs(60);
        assert_eq!(until(later, async { "line" }).await, Some("line"));
        let passed = tokio::time::Instant::now();
        assert_eq!(until(passed, async { "line" }).await, None);
        let soon = tokio::time::Instant::now() + Duration::from_millis(20);
        assert_eq!(until(soon, std::future::pending::<()>()).await, None);
    }
}
