//! What every session of one config shares, and the interface a protocol
//! offers the listener. Below the protocols and the listener: `imap` and
//! `smtp` import this module, `server` drives it, and neither side imports
//! the other.

use std::future::Future;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite};

use crate::accounts::Accounts;
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
    pub fn new(config: Config) -> Result<Self, String> {
        let store = TokenStore::new(&crate::config::state_dir(&config));
        Ok(Shared {
            accounts: Accounts::new(&config),
            tokens: TokenManager::new(&config, store)?,
            tls: UpstreamTls::new(&config)?,
            local_tls: LocalTls::load(&config)?,
            config,
        })
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
    ) -> impl Future<Output = ()> + Send;
    /// Tells a client that cannot be served now (too many connections), then closes.
    fn refuse_busy<S: ClientStream>(stream: S) -> impl Future<Output = ()> + Send;
}
