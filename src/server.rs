//! Listeners, connection limits and shutdown.
//!
//! Each accepted connection runs in its own task inside a span carrying a
//! connection id, the peer and (after login) the account. A semaphore caps the
//! connections open at once; past it a client gets the protocol's "too busy"
//! answer and is closed. On SIGTERM or SIGINT the listeners stop accepting and
//! live sessions get `shutdown_grace` to finish before the process exits 0.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, error, info, info_span, warn};

use crate::accounts::Accounts;
use crate::config::Config;
use crate::oauth::TokenManager;
use crate::oauth::store::TokenStore;
use crate::smtp::Extensions;
use crate::smtp::pool::Pools;
use crate::upstream::UpstreamTls;

/// What every session needs, built once from the config.
pub struct Shared {
    pub config: Config,
    pub accounts: Accounts,
    pub tokens: TokenManager,
    pub tls: UpstreamTls,
    /// Shared with the configs that replace this one on reload, so that a
    /// mailbox never has more upstream connections than its limit.
    pub smtp_pools: Arc<Pools>,
    smtp_extensions: Extensions,
}

impl Shared {
    pub fn new(config: Config) -> Result<Self, String> {
        let store = TokenStore::new(&crate::config::state_dir(&config));
        Ok(Shared {
            accounts: Accounts::new(&config),
            tokens: TokenManager::new(&config, store)?,
            tls: UpstreamTls::new(&config)?,
            smtp_pools: Arc::new(Pools::new(
                config.smtp.max_connections_per_mailbox,
                config.smtp.pool_idle_timeout,
                config.smtp.pool_wait,
            )),
            smtp_extensions: Extensions::default(),
            config,
        })
    }

    /// The SMTP extensions to advertise in EHLO.
    pub async fn smtp_extensions(&self) -> Vec<String> {
        self.smtp_extensions.advertised(self).await
    }
}

/// A protocol's entry point for one accepted connection.
pub trait Protocol: Send + Sync + 'static {
    /// Lower-case name for logs and spans: "imap", "smtp".
    const NAME: &'static str;
    /// Serves one client until it or the upstream closes.
    fn serve(shared: Arc<Shared>, stream: TcpStream) -> impl Future<Output = ()> + Send;
    /// Tells a client that cannot be served now (too many connections), then closes.
    fn refuse_busy(stream: TcpStream) -> impl Future<Output = ()> + Send;
}

/// The current [`Shared`]: replaced whole on reload, while live sessions
/// keep the one they started with.
type Current = watch::Receiver<Arc<Shared>>;

/// Runs the IMAP, SMTP and admin listeners until SIGTERM/SIGINT, then drains.
/// SIGHUP reloads the config file.
pub async fn run(config: Config) -> Result<(), String> {
    let shared = Arc::new(Shared::new(config)?);
    prepare_state_dir(&shared)?;

    let imap = bind(shared.config.imap.listen, "IMAP").await?;
    let smtp = bind(shared.config.smtp.listen, "SMTP").await?;
    for (what, addr) in [
        ("IMAP", shared.config.imap.listen),
        ("SMTP", shared.config.smtp.listen),
    ] {
        if !addr.ip().is_loopback() {
            warn!(
                "the {what} listener on {addr} is not on loopback and has no TLS: passwords cross the network in clear (fine on a private container network)"
            );
        }
    }
    let admin = bind(shared.config.admin.listen, "admin HTTP").await?;
    let shutdown = CancellationToken::new();
    let tracker = TaskTracker::new();
    let limit = Arc::new(Semaphore::new(shared.config.server.max_connections));
    let (publish, current) = watch::channel(shared.clone());

    tracker.spawn(accept_loop::<crate::imap::Imap>(
        imap,
        current.clone(),
        limit.clone(),
        tracker.clone(),
        shutdown.clone(),
    ));
    tracker.spawn(accept_loop::<crate::smtp::Smtp>(
        smtp,
        current.clone(),
        limit.clone(),
        tracker.clone(),
        shutdown.clone(),
    ));
    crate::metrics::get().register_protocols(&["imap", "smtp"]);
    tokio::spawn(crate::admin::serve(admin, shutdown.clone()));
    spawn_pool_reaper(&shared);
    info!(
        imap = %shared.config.imap.listen,
        smtp = %shared.config.smtp.listen,
        admin = %shared.config.admin.listen,
        state_dir = %crate::config::state_dir(&shared.config).display(),
        accounts = shared.config.accounts.len(),
        "xoauth2-proxy is ready"
    );
    let config_path = shared.config.path.clone();
    let grace = shared.config.server.shutdown_grace;
    drop(shared);

    loop {
        match next_signal().await {
            Signal::Stop => break,
            Signal::Reload => reload(&config_path, &publish),
        }
    }
    info!("shutting down: no new connections; waiting for live sessions");
    shutdown.cancel();
    tracker.close();
    if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
        warn!(
            "{} session(s) still open after {}; closing them",
            tracker.len(),
            humantime::format_duration(grace)
        );
    }
    Ok(())
}

fn prepare_state_dir(shared: &Shared) -> Result<(), String> {
    crate::oauth::store::create_private_dir(shared.tokens.store().dir()).map_err(|e| {
        format!(
            "cannot create the state directory {}: {}",
            crate::config::state_dir(&shared.config).display(),
            crate::error::io_reason(&e)
        )
    })
}

/// Loads the config again and, if it is good, puts it in force for new
/// connections. A bad config is refused and the old one stays.
fn reload(path: &std::path::Path, publish: &watch::Sender<Arc<Shared>>) {
    let config = match Config::load(path) {
        Ok(c) => c,
        Err(e) => {
            error!("reload refused, the running config stays in force: {e}");
            return;
        }
    };
    let old = publish.borrow().clone();
    for (what, before, after) in [
        ("imap.listen", old.config.imap.listen, config.imap.listen),
        ("smtp.listen", old.config.smtp.listen, config.smtp.listen),
        ("admin.listen", old.config.admin.listen, config.admin.listen),
    ] {
        if before != after {
            warn!("`{what}` changed to {after}; listeners move only on restart, still on {before}");
        }
    }
    let pools_unchanged = {
        let (a, b) = (&old.config.smtp, &config.smtp);
        a.max_connections_per_mailbox == b.max_connections_per_mailbox
            && a.pool_wait == b.pool_wait
            && a.pool_idle_timeout == b.pool_idle_timeout
    };
    if !pools_unchanged {
        warn!("the [smtp] pool settings changed; they apply from the next restart");
    }
    let shared = match Shared::new(config).and_then(|s| prepare_state_dir(&s).map(|_| s)) {
        Ok(mut s) => {
            s.smtp_pools = old.smtp_pools.clone();
            Arc::new(s)
        }
        Err(e) => {
            error!("reload refused, the running config stays in force: {e}");
            return;
        }
    };
    spawn_pool_reaper(&shared);
    info!(
        accounts = shared.config.accounts.len(),
        providers = shared.config.providers.len(),
        "config reloaded; live sessions keep the config they started with"
    );
    let _ = publish.send(shared);
}

/// Closes idle pooled SMTP connections; ends once that config is replaced
/// and its last session is gone.
fn spawn_pool_reaper(shared: &Arc<Shared>) {
    let weak = Arc::downgrade(shared);
    tokio::spawn(async move {
        loop {
            let Some(shared) = weak.upgrade() else { return };
            let pause = shared.smtp_pools.reap_period();
            shared.smtp_pools.reap_once();
            drop(shared);
            tokio::time::sleep(pause).await;
        }
    });
}

async fn bind(addr: SocketAddr, what: &str) -> Result<TcpListener, String> {
    let listener = TcpListener::bind(addr).await.map_err(|e| {
        format!(
            "cannot listen for {what} on {addr}: {}",
            crate::error::io_reason(&e)
        )
    })?;
    Ok(listener)
}

async fn accept_loop<P: Protocol>(
    listener: TcpListener,
    current: Current,
    limit: Arc<Semaphore>,
    tracker: TaskTracker,
    shutdown: CancellationToken,
) {
    static NEXT_ID: AtomicU64 = AtomicU64::new(1);
    let mut backoff = Duration::from_millis(10);
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(pair) => {
                backoff = Duration::from_millis(10);
                pair
            }
            Err(e) => {
                // Out of file descriptors and the like: wait, do not spin.
                error!(
                    "accepting a {} connection failed: {}",
                    P::NAME,
                    crate::error::io_reason(&e)
                );
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        let span = info_span!("conn", proto = P::NAME, id, %peer, account = tracing::field::Empty);
        match limit.clone().try_acquire_owned() {
            Ok(permit) => {
                let shared = current.borrow().clone();
                let gauge = crate::metrics::get()
                    .connections
                    .get_or_create(&crate::metrics::ProtocolLabels { protocol: P::NAME })
                    .clone();
                gauge.inc();
                tracker.spawn(
                    async move {
                        P::serve(shared, stream).await;
                        gauge.dec();
                        drop(permit);
                    }
                    .instrument(span),
                );
            }
            Err(_) => {
                warn!(parent: &span, "too many connections; refusing this one");
                tracker.spawn(P::refuse_busy(stream).instrument(span));
            }
        }
    }
}

enum Signal {
    Stop,
    Reload,
}

async fn next_signal() -> Signal {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).expect("can install a SIGTERM handler");
        let mut hup = signal(SignalKind::hangup()).expect("can install a SIGHUP handler");
        tokio::select! {
            _ = term.recv() => Signal::Stop,
            _ = tokio::signal::ctrl_c() => Signal::Stop,
            _ = hup.recv() => Signal::Reload,
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
        Signal::Stop
    }
}
