//! What every session of one config shares, and the interface a protocol
//! offers the listener. Below the protocols and the listener: `imap` and
//! `smtp` import this module, `server` drives it, and neither side imports
//! the other.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use tokio::io::{AsyncRead, AsyncWrite, BufReader};
use tokio_rustls::server::TlsStream;

use crate::accounts::{Accounts, LoginGuard};
use crate::config::Config;
use crate::local_tls::LocalTls;
use crate::oauth::TokenManager;
use crate::oauth::store::TokenStore;
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
}

impl Shared {
    /// The handles of `config`; its accounts check passwords through
    /// `guard`, which the process keeps across reloads.
    pub fn new(config: Config, guard: &LoginGuard) -> Result<Self, String> {
        let store = TokenStore::new(&crate::config::state_dir(&config));
        Ok(Shared {
            accounts: Accounts::new(&config, guard.clone())?,
            tokens: TokenManager::new(&config, store)?,
            tls: UpstreamTls::new(&config)?,
            local_tls: LocalTls::load(&config)?,
            config,
        })
    }

    /// STARTTLS: TLS under `client` with the certificate in force, within
    /// the login timeout; `None` (logged) when there is none or the
    /// handshake fails. See [`crate::local_tls::start_tls`] for what happens
    /// to plaintext the client sent behind the command.
    pub async fn start_tls<S: ClientStream>(
        &self,
        protocol: &'static str,
        client: BufReader<S>,
    ) -> Option<TlsStream<S>> {
        let local_tls = self.local_tls.as_ref()?;
        let timeout = self.config.server.login_timeout;
        let upgraded = crate::local_tls::start_tls(local_tls, client, timeout).await;
        crate::metrics::get().client_tls(protocol, "starttls", upgraded.is_ok());
        match upgraded {
            Ok(stream) => Some(stream),
            Err(e) => {
                tracing::info!("STARTTLS: {e}; closing");
                None
            }
        }
    }

    /// Creates the state directory (private to the user) if it is missing.
    pub fn prepare_state_dir(&self) -> Result<(), String> {
        crate::private_file::create_private_dir(self.tokens.store().dir()).map_err(|e| {
            format!(
                "cannot create the state directory {}: {}; create it or set `server.state_dir` to a writable directory",
                crate::config::state_dir(&self.config).display(),
                crate::error::io_reason(&e)
            )
        })
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
#[derive(Debug, Clone, Copy)]
pub struct Connection {
    /// The client's address: throttling and the per-address limits go by its IP.
    pub peer: SocketAddr,
    /// The stream is TLS from the first byte (`tls_listen`).
    pub over_tls: bool,
    /// When the connection was accepted: the login deadline counts from here.
    pub accepted: Instant,
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
    /// Tells a client that cannot be served now (too many connections), then closes.
    fn refuse_busy<S: ClientStream>(stream: S) -> impl Future<Output = ()> + Send;
}
