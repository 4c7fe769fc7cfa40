//! Listeners, connection limits, reload and shutdown.
//!
//! Each accepted connection runs in its own task inside a span carrying a
//! connection id, the peer and (after login) the account. A semaphore caps the
//! connections open at once, and [`PreloginSlots`] the connections from one
//! client address that have not logged in yet, so that one address cannot
//! starve the others; past either, a client gets the protocol's "too busy"
//! answer and is closed, counted in `refused_connections` and logged once
//! per burst, not once per connection. The caller owns the process: it binds the
//! [`Listeners`], says when to reload the config and when to stop. On stop
//! the listeners stop accepting and live sessions get `shutdown_grace` to
//! finish.
//!
//! A `tls_listen` listener runs the TLS handshake (bounded by
//! `login_timeout`) in the connection's task, with the certificate in force
//! when the connection was accepted, then hands the TLS stream to the same
//! session as the plain listener. The proxy's own server certificate is
//! checked daily and renewed through a reload when its end is near.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, error, info, info_span, warn};

use crate::accounts::LoginGuard;
use crate::config::Config;
use crate::imap::Imap;
use crate::notify::Notifier;
use crate::oauth::{AccountHealth, AccountState, Health};
use crate::shared::{Busy, Connection, PreloginSlot, PreloginSlots, Protocol, RefusalLog, Shared};
use crate::smtp::Smtp;

/// The bound IMAP, SMTP and admin listeners, and the implicit TLS ones.
pub struct Listeners {
    imap: TcpListener,
    smtp: TcpListener,
    admin: TcpListener,
    imap_tls: Option<TcpListener>,
    smtp_tls: Option<TcpListener>,
}

/// What a listener's clients speak first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Transport {
    Plain,
    /// TLS from the first byte (`tls_listen`).
    ImplicitTls,
}

/// How often the proxy looks at its own server certificate's end.
const RENEWAL_CHECK: Duration = Duration::from_secs(24 * 3600);

impl Listeners {
    /// Binds the addresses in `[imap]`, `[smtp]` and `[admin]`.
    pub async fn bind(config: &Config) -> Result<Self, String> {
        let imap = bind(config.imap.listen, "IMAP", "imap.listen").await?;
        let smtp = bind(config.smtp.listen, "SMTP", "smtp.listen").await?;
        let with_tls_only = |require_tls| config.tls.is_some() && require_tls;
        for (what, addr, tls_only) in [
            (
                "IMAP",
                config.imap.listen,
                with_tls_only(config.imap.require_tls),
            ),
            (
                "SMTP",
                config.smtp.listen,
                with_tls_only(config.smtp.require_tls),
            ),
        ] {
            if !addr.ip().is_loopback() && !tls_only {
                warn!(
                    "the {what} listener on {addr} is not on loopback and takes logins without TLS: passwords may cross the network in clear (fine on a private container network; `require_tls` with [tls] stops it)"
                );
            }
        }
        let admin = bind(config.admin.listen, "admin HTTP", "admin.listen").await?;
        if !config.admin.listen.ip().is_loopback() {
            warn!(
                "the admin listener on {} is not on loopback: whoever reaches it reads /healthz and /metrics (account names, login counts, upstream servers); fine for kubelet probes and Prometheus inside a cluster, not behind a public Service or address",
                config.admin.listen
            );
        }
        let imap_tls = match config.imap.tls_listen {
            Some(addr) => Some(bind(addr, "IMAP over TLS", "imap.tls_listen").await?),
            None => None,
        };
        let smtp_tls = match config.smtp.tls_listen {
            Some(addr) => Some(bind(addr, "SMTP over TLS", "smtp.tls_listen").await?),
            None => None,
        };
        Ok(Listeners {
            imap,
            smtp,
            admin,
            imap_tls,
            smtp_tls,
        })
    }

    /// The addresses bound for implicit TLS, IMAP and SMTP, if any.
    pub fn tls_addrs(&self) -> std::io::Result<[Option<SocketAddr>; 2]> {
        let addr = |l: &Option<TcpListener>| l.as_ref().map(|l| l.local_addr()).transpose();
        Ok([addr(&self.imap_tls)?, addr(&self.smtp_tls)?])
    }

    /// The addresses bound, IMAP, SMTP and admin: with port 0 in the config
    /// (as in-process tests use) the system picked the ports.
    pub fn local_addrs(&self) -> std::io::Result<[SocketAddr; 3]> {
        Ok([
            self.imap.local_addr()?,
            self.smtp.local_addr()?,
            self.admin.local_addr()?,
        ])
    }
}

/// The current [`Shared`]: replaced whole on reload, while live sessions
/// keep the one they started with.
type Current = watch::Receiver<Arc<Shared>>;

/// Serves on `listeners` with `config` until `shutdown` completes, then
/// drains. Each message on `reloads` loads the config file again (a closed
/// channel just means no more reloads).
pub async fn run(
    listeners: Listeners,
    config: Config,
    shutdown: impl Future<Output = ()>,
    reloads: mpsc::Receiver<()>,
) -> Result<(), String> {
    // The password check slots and the failed-login counters hold for the
    // process: each reload's `Shared` gets the same guard. So do the
    // accounts' health and the notifications about it.
    let guard = LoginGuard::new(&config.server);
    let health = Health::default();
    let shared = Arc::new(Shared::new(config, &guard, &health)?);
    shared.prepare_state_dir().await?;
    shared.tokens.publish_health().await;

    let stop = CancellationToken::new();
    let tracker = TaskTracker::new();
    let (publish, current) = watch::channel(shared.clone());
    let accepting = Accepting {
        current,
        limit: Arc::new(Semaphore::new(shared.config.server.max_connections)),
        prelogin: PreloginSlots::default(),
        tracker: tracker.clone(),
        stop: stop.clone(),
    };
    let (imap, admin) = start_listeners(listeners, accepting, &shared.config);
    let admin_limits = shared.config.admin.clone();
    tokio::spawn(crate::admin::serve(
        admin,
        admin_limits,
        publish.subscribe(),
        stop.clone(),
    ));
    tokio::spawn(keep_grants_alive(publish.subscribe(), stop.clone()));
    tokio::spawn(look_for_new_grants(publish.subscribe(), stop.clone()));
    let notifier = Notifier::start(health.clone(), &shared.config.admin, stop.clone());
    let lasting = Lasting {
        guard,
        health,
        notifier,
    };
    say_ready(&shared);
    let config_path = shared.config.path.clone();
    let grace = shared.config.server.shutdown_grace;
    drop(shared);

    let in_force = InForce {
        path: config_path,
        publish,
        lasting,
        imap,
    };
    in_force.until(shutdown, reloads).await;
    info!("shutting down: no new connections; waiting for live sessions");
    stop.cancel();
    in_force.imap.close_warm();
    tracker.close();
    if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
        warn!(
            "{} session(s) still open after {}; closing them",
            tracker.len(),
            humantime::format_duration(grace)
        );
    }
    let shared = in_force.publish.borrow().clone();
    shared.tokens.save_before_exit().await;
    Ok(())
}

/// Spawns the accept loops of the mail listeners; gives back the IMAP
/// protocol (whose warm sessions a reload closes) and the admin listener.
fn start_listeners(
    listeners: Listeners,
    accepting: Accepting,
    config: &Config,
) -> (Arc<Imap>, TcpListener) {
    let Listeners {
        imap,
        smtp,
        admin,
        imap_tls,
        smtp_tls,
    } = listeners;
    let tracker = accepting.tracker.clone();
    let imap_protocol = Arc::new(Imap::new(&config.imap));
    let smtp_protocol = Arc::new(Smtp::new(&config.smtp));
    let imap_loop = accepting
        .clone()
        .accept_loop(imap, imap_protocol.clone(), Transport::Plain);
    tracker.spawn(imap_loop);
    if let Some(listener) = imap_tls {
        let protocol = imap_protocol.clone();
        tracker.spawn(
            accepting
                .clone()
                .accept_loop(listener, protocol, Transport::ImplicitTls),
        );
    }
    if let Some(listener) = smtp_tls {
        let protocol = smtp_protocol.clone();
        tracker.spawn(
            accepting
                .clone()
                .accept_loop(listener, protocol, Transport::ImplicitTls),
        );
    }
    tracker.spawn(accepting.accept_loop(smtp, smtp_protocol, Transport::Plain));
    crate::metrics::get().register_protocols(&[Imap::NAME, Smtp::NAME]);
    (imap_protocol, admin)
}

/// Logs where the proxy listens, its client certificate, and which
/// accounts need a login.
fn say_ready(shared: &Shared) {
    info!(
        imap = %shared.config.imap.listen,
        smtp = %shared.config.smtp.listen,
        admin = %shared.config.admin.listen,
        state_dir = %crate::config::state_dir(&shared.config).display(),
        accounts = shared.config.accounts.len(),
        "xoauth2-proxy is ready"
    );
    if let Some(tls) = &shared.local_tls {
        info!(
            imap_tls = ?shared.config.imap.tls_listen,
            smtp_tls = ?shared.config.smtp.tls_listen,
            "TLS certificate for clients: {}",
            tls.certificate().describe(std::time::SystemTime::now())
        );
    }
    say_who_needs_login(shared.tokens.healths());
}

/// The config in force, with what replaces it: the file it is read from
/// again, the channel new connections take it from, and what lasts across
/// reloads.
struct InForce {
    path: std::path::PathBuf,
    publish: watch::Sender<Arc<Shared>>,
    lasting: Lasting,
    imap: Arc<Imap>,
}

impl InForce {
    /// Reloads at each message on `reloads` and when the client
    /// certificate is due for renewal, until `shutdown` completes.
    async fn until(&self, shutdown: impl Future<Output = ()>, mut reloads: mpsc::Receiver<()>) {
        let first = tokio::time::Instant::now() + RENEWAL_CHECK;
        let mut renewal_check = tokio::time::interval_at(first, RENEWAL_CHECK);
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => return,
                Some(()) = reloads.recv() => self.reload().await,
                _ = renewal_check.tick() => {
                    let now = std::time::SystemTime::now();
                    let due = self.publish.borrow().local_tls.as_ref().is_some_and(|t| t.renewal_due(now));
                    if due {
                        info!("the proxy's server certificate ends within 30 days; renewing it");
                        self.reload().await;
                    }
                }
            }
        }
    }

    /// A reload: the new config for new connections, and no warm session
    /// left of the old one.
    async fn reload(&self) {
        let put_in_force = reload(&self.path, &self.publish, &self.lasting).await;
        self.imap.close_warm();
        if put_in_force {
            // Said once no warm session of the old config is left to take.
            let shared = self.publish.borrow().clone();
            info!(
                accounts = shared.config.accounts.len(),
                providers = shared.config.providers.len(),
                "config reloaded; live sessions keep the config they started with"
            );
        }
    }
}

/// Refreshes the idle grants of the config in force (`grant_keepalive`)
/// until shutdown; a reload changes both the accounts and the interval, and
/// the next look stays due a period after the last one however often the
/// config is reloaded.
async fn keep_grants_alive(mut current: Current, stop: CancellationToken) {
    let mut last_look = tokio::time::Instant::now();
    loop {
        let period = crate::oauth::keep_alive_period(
            current.borrow_and_update().config.server.grant_keepalive,
        );
        let due = async {
            match period {
                Some(period) => tokio::time::sleep_until(last_look + period).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = stop.cancelled() => return,
            changed = current.changed() => match changed {
                Ok(()) => continue,
                Err(_) => return,
            },
            () = due => {}
        }
        last_look = tokio::time::Instant::now();
        let shared = current.borrow().clone();
        let older_than = shared.config.server.grant_keepalive;
        tokio::select! {
            _ = stop.cancelled() => return,
            () = shared.tokens.keep_alive_all(older_than) => {}
        }
    }
}

/// One line per account that needs `login` as the proxy starts (or as a
/// reload adds it): its clients are refused until then. (The reason is
/// logged when a client or the keep-alive meets it, and `status` shows it.)
fn say_who_needs_login(accounts: impl IntoIterator<Item = AccountHealth>) {
    for health in accounts {
        if health.state() == AccountState::NeedsLogin {
            warn!(
                account = %health.username,
                "this account is not signed in: its clients are refused until it is; `xoauth2-proxy status` says why and what to run"
            );
        }
    }
}

/// How often the grant files of accounts that need `login` are looked at,
/// so that a grant `xoauth2-proxy login` wrote counts (and is announced as
/// recovered) before any client comes: a `stat` per such account.
const NEW_GRANT_LOOK: Duration = Duration::from_secs(5);

/// Looks for new grants of the accounts that need `login`, with the token
/// manager of the config in force, until shutdown.
async fn look_for_new_grants(current: Current, stop: CancellationToken) {
    let mut looks = tokio::time::interval(NEW_GRANT_LOOK);
    looks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = looks.tick() => {
                // Cloned out, so that a reload does not wait for the files.
                let shared = current.borrow().clone();
                shared.tokens.look_for_new_grants().await;
            }
        }
    }
}

/// What the process keeps across reloads: the login guard, the accounts'
/// health and the notifier watching it.
struct Lasting {
    guard: LoginGuard,
    health: Health,
    notifier: Notifier,
}

/// Loads the config again and, if it is good, puts it in force for new
/// connections. A bad config is refused and the old one stays; so is one
/// without accounts (an emptied or half-written file would fail every login).
/// True when the new config was put in force.
async fn reload(
    path: &std::path::Path,
    publish: &watch::Sender<Arc<Shared>>,
    lasting: &Lasting,
) -> bool {
    let Some(config) = load_again(path) else {
        return false;
    };
    let old = publish.borrow().clone();
    warn_of_restart_only_changes(&old.config, &config);
    let prepared = match Shared::new(config, &lasting.guard, &lasting.health) {
        Ok(s) => s.prepare_state_dir().await.map(|()| s),
        Err(e) => Err(e),
    };
    let shared = match prepared {
        Ok(s) => Arc::new(s),
        Err(e) => {
            error!("reload refused, the running config stays in force: {e}");
            return false;
        }
    };
    say_if_certificate_changed(&old, &shared);
    shared.tokens.publish_health().await;
    lasting.notifier.reconfigure(&shared.config.admin);
    let added = shared
        .config
        .accounts
        .iter()
        .filter(|a| old.config.account(&a.username).is_none())
        .filter_map(|a| shared.tokens.health(&a.username));
    say_who_needs_login(added);
    let _ = publish.send(shared);
    true
}

/// The config file read again, or `None` (logged) when it is refused.
fn load_again(path: &std::path::Path) -> Option<Config> {
    let config = match Config::load(path) {
        Ok(c) if c.accounts.is_empty() => {
            error!(
                "reload refused, the running config stays in force: {} has no [[accounts]], so every login would fail; put the accounts back and reload again (restart to run without any)",
                path.display()
            );
            return None;
        }
        Ok(c) => c,
        Err(e) => {
            error!("reload refused, the running config stays in force: {e}");
            return None;
        }
    };
    if let Some(warning) = crate::config::exposed_secret_warning(&config) {
        warn!("{warning}");
    }
    Some(config)
}

/// Warns of each change between `old` and `new` that a reload does not put
/// in force: listeners, the SMTP pools, the password check queue.
fn warn_of_restart_only_changes(old: &Config, new: &Config) {
    for (what, before, after) in [
        ("imap.listen", old.imap.listen, new.imap.listen),
        ("smtp.listen", old.smtp.listen, new.smtp.listen),
        ("admin.listen", old.admin.listen, new.admin.listen),
    ] {
        if before != after {
            warn!("`{what}` changed to {after}; listeners move only on restart, still on {before}");
        }
    }
    for (what, before, after) in [
        ("imap.tls_listen", old.imap.tls_listen, new.imap.tls_listen),
        ("smtp.tls_listen", old.smtp.tls_listen, new.smtp.tls_listen),
    ] {
        if before != after {
            warn!(
                "`{what}` changed to {after:?}; listeners move only on restart, still {before:?}"
            );
        }
    }
    let changed = |what: &str| {
        warn!("{what} changed; it applies from the next restart");
    };
    let pools = |s: &crate::config::SmtpSection| {
        (
            s.max_connections_per_mailbox,
            s.pool_wait,
            s.pool_idle_timeout,
        )
    };
    if pools(&old.smtp) != pools(&new.smtp) {
        changed(
            "the [smtp] pool settings (`max_connections_per_mailbox`, `pool_wait`, `pool_idle_timeout`)",
        );
    }
    if old.imap.max_connections_per_mailbox != new.imap.max_connections_per_mailbox {
        changed("`imap.max_connections_per_mailbox`");
    }
    let (a, b) = (&old.server, &new.server);
    if (a.password_checks, a.password_check_queue) != (b.password_checks, b.password_check_queue) {
        changed("`server.password_checks` or `password_check_queue`");
    }
    if a.max_connections != b.max_connections {
        changed("`server.max_connections`");
    }
    let limits =
        |s: &crate::config::AdminSection| (s.max_connections, s.header_timeout, s.idle_timeout);
    if limits(&old.admin) != limits(&new.admin) {
        changed(
            "the [admin] listener's limits (`max_connections`, `header_timeout`, `idle_timeout`)",
        );
    }
    if !old.admin.console && new.admin.console {
        changed("`admin.console` (turned on)");
    }
}

/// Says which certificate new TLS clients get, when a reload changed it.
fn say_if_certificate_changed(old: &Shared, new: &Shared) {
    let Some(tls) = &new.local_tls else {
        return;
    };
    let certificate = tls.certificate();
    if old.local_tls.as_ref().map(|t| t.certificate()) != Some(certificate) {
        info!(
            "new TLS connections get the certificate in {}: {}",
            certificate.path.display(),
            certificate.describe(std::time::SystemTime::now())
        );
    }
}

async fn bind(addr: SocketAddr, what: &str, key: &str) -> Result<TcpListener, String> {
    TcpListener::bind(addr).await.map_err(|e| {
        format!(
            "cannot listen for {what} on {addr}: {}; stop whatever holds that address or change `{key}`",
            crate::error::io_reason(&e)
        )
    })
}

/// What every listener's accept loop shares.
#[derive(Clone)]
struct Accepting {
    current: Current,
    limit: Arc<Semaphore>,
    /// Connections not logged in yet, per address, across the listeners.
    prelogin: PreloginSlots,
    tracker: TaskTracker,
    /// Cancelled when the caller's shutdown future completes.
    stop: CancellationToken,
}

/// What a connection holds while it is open: its share of
/// `server.max_connections` and, until login, its address's pre-login slot.
type Admitted = (OwnedSemaphorePermit, PreloginSlot);

impl Accepting {
    /// Accepts connections for `protocol`, whose value lives as long as the
    /// listener (across reloads), until shutdown.
    async fn accept_loop<P: Protocol>(
        self,
        listener: TcpListener,
        protocol: Arc<P>,
        transport: Transport,
    ) {
        static NEXT_ID: AtomicU64 = AtomicU64::new(1);
        let mut refusals = Refusals::default();
        while let Some((stream, peer)) = self.accept::<P>(&listener).await {
            let _ = stream.set_nodelay(true);
            let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
            let span =
                info_span!("conn", proto = P::NAME, id, %peer, account = tracing::field::Empty);
            let shared = self.current.borrow().clone();
            match self.admit(&shared, peer) {
                Ok(admitted) => {
                    let connection =
                        Connection::new(peer, transport == Transport::ImplicitTls, admitted.1);
                    // The session's future is the task itself, not awaited
                    // inside an `async` block that captured it: that block
                    // would hold it twice (the captured value and the awaited
                    // state), and every idle session keeps its task for life.
                    let session = serve(
                        protocol.clone(),
                        shared,
                        stream,
                        connection,
                        transport,
                        admitted.0,
                    );
                    self.tracker.spawn(session.instrument(span));
                }
                Err(busy) => {
                    if let Some(unlogged) = refusals.note(busy) {
                        span.in_scope(|| log_refusal(busy, &shared, unlogged));
                    }
                    crate::metrics::get().refused(P::NAME, busy.reason());
                    if transport == Transport::Plain {
                        self.tracker
                            .spawn(P::refuse_busy(stream, busy).instrument(span));
                    }
                    // A TLS client is closed without a handshake: that would
                    // cost the CPU the limit is there to save.
                }
            }
        }
    }

    /// The next connection; `None` at shutdown. Errors (out of file
    /// descriptors and the like) are logged and waited out, not spun on.
    async fn accept<P: Protocol>(&self, listener: &TcpListener) -> Option<(TcpStream, SocketAddr)> {
        let mut backoff = Duration::from_millis(10);
        loop {
            let accepted = tokio::select! {
                _ = self.stop.cancelled() => return None,
                accepted = listener.accept() => accepted,
            };
            match accepted {
                Ok(pair) => return Some(pair),
                Err(e) => {
                    error!(
                        "accepting a {} connection failed: {}",
                        P::NAME,
                        crate::error::io_reason(&e)
                    );
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
            }
        }
    }

    /// A place for a connection from `peer` within `server.max_connections`
    /// and its address's `server.max_prelogin_per_address` (as in force now).
    fn admit(&self, shared: &Shared, peer: SocketAddr) -> Result<Admitted, Busy> {
        let permit = self
            .limit
            .clone()
            .try_acquire_owned()
            .map_err(|_| Busy::Server)?;
        let max = shared.config.server.max_prelogin_per_address;
        let slot = self
            .prelogin
            .try_acquire(peer.ip(), max)
            .ok_or(Busy::Address)?;
        Ok((permit, slot))
    }
}

/// One listener's refusal logs, one per reason.
#[derive(Default)]
struct Refusals {
    server: RefusalLog,
    address: RefusalLog,
}

impl Refusals {
    /// See [`RefusalLog::note`].
    fn note(&mut self, busy: Busy) -> Option<u64> {
        let log = match busy {
            Busy::Server => &mut self.server,
            Busy::Address => &mut self.address,
        };
        log.note(std::time::Instant::now())
    }
}

/// The one line a burst of refusals gets (inside the connection's span,
/// which names the peer).
fn log_refusal(busy: Busy, shared: &Shared, unlogged: u64) {
    let since = match unlogged {
        0 => String::new(),
        n => format!(" ({n} more refused since the last such line)"),
    };
    let server = &shared.config.server;
    match busy {
        Busy::Server => warn!(
            "{} connections are open (server.max_connections); refusing new ones{since}",
            server.max_connections
        ),
        Busy::Address => warn!(
            "{} connections from this address have not logged in (server.max_prelogin_per_address); refusing its new ones, other addresses are served{since}",
            server.max_prelogin_per_address
        ),
    }
}

/// Serves one admitted connection with `shared`, counted in the open
/// connections gauge; its place under `server.max_connections` (`permit`)
/// is given back at the end.
async fn serve<P: Protocol>(
    protocol: Arc<P>,
    shared: Arc<Shared>,
    stream: TcpStream,
    connection: Connection,
    transport: Transport,
    permit: OwnedSemaphorePermit,
) {
    let gauge = crate::metrics::get()
        .connections
        .get_or_create(&crate::metrics::ProtocolLabels { protocol: P::NAME })
        .clone();
    gauge.inc();
    match transport {
        Transport::Plain => {
            crate::metrics::get().client_tls(P::NAME, "plain", true);
            protocol.serve(shared, stream, connection).await
        }
        // Boxed: a future is as large as its largest state, and the TLS
        // handshake and the session over a `TlsStream` would otherwise make
        // every plain connection's task that large too.
        Transport::ImplicitTls => {
            Box::pin(serve_over_tls(&*protocol, shared, stream, connection)).await
        }
    }
    gauge.dec();
    drop(permit);
}

/// Runs the TLS handshake with the certificate of `shared`, within the
/// login timeout, then serves the client over TLS.
async fn serve_over_tls<P: Protocol>(
    protocol: &P,
    shared: Arc<Shared>,
    stream: TcpStream,
    connection: Connection,
) {
    let Some(tls) = &shared.local_tls else {
        // Only after a reload that removed [tls]; the listener stays until restart.
        warn!("a TLS client arrived but the config in force has no [tls]; closing");
        return;
    };
    // The handshake is the first thing the task does: the whole login
    // timeout is, to the spawn, what is left of it.
    let accepted = tls.accept(stream, shared.config.server.login_timeout).await;
    crate::metrics::get().client_tls(P::NAME, "implicit", accepted.is_ok());
    match accepted {
        Ok(stream) => protocol.serve(shared.clone(), stream, connection).await,
        Err(e) => info!("{e}; closing"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The size of what `f` returns, without calling it.
    fn returned_size<A, B, C, D, E, G, R>(_: impl FnOnce(A, B, C, D, E, G) -> R) -> usize {
        std::mem::size_of::<R>()
    }

    /// Every idle session keeps its task, whose size is that of the future
    /// `serve` returns, for its whole life: most of what an idle session
    /// costs (docs/benchmarks.md, idle sessions). A future is as large as
    /// its largest state, so one rare state held inline (a TLS handshake, a
    /// login, a message being sent) makes every session's task that large;
    /// such states are boxed. 8 KiB leaves room for growth, and fails the
    /// day a large state slips back inline (it once made each task 26 KB).
    #[test]
    fn a_sessions_task_stays_small() {
        const MOST: usize = 8 * 1024;
        let imap = returned_size(serve::<Imap>);
        let smtp = returned_size(serve::<Smtp>);
        assert!(imap <= MOST, "an IMAP session's task is {imap} bytes");
        assert!(smtp <= MOST, "an SMTP session's task is {smtp} bytes");
    }
}
