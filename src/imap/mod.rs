//! IMAP: the proxy is the server until login, then a byte pipe.

mod capabilities;
pub(crate) mod filter;
pub(crate) mod framing;
pub(crate) mod parser;
mod session;
pub mod upstream;
mod warm;

use std::sync::Arc;

use tokio::io::AsyncWriteExt;

use crate::config::ImapSection;
use crate::shared::{Busy, ClientStream, Connection, Protocol, Shared};
use warm::Upstreams;

/// The IMAP listener's protocol, with what lives as long as the listener:
/// the upstream connections' cap per mailbox, what each server announced
/// before login, and the warm sessions.
pub struct Imap {
    upstreams: Arc<Upstreams>,
}

impl Imap {
    /// The cap on connections per mailbox is read from `settings` as the
    /// process starts; later changes apply from the next restart.
    pub fn new(settings: &ImapSection) -> Self {
        Imap {
            upstreams: Arc::new(Upstreams::new(settings.max_connections_per_mailbox)),
        }
    }

    /// Closes the warm sessions: at reload (none may outlive the config it
    /// was opened with) and at shutdown.
    pub fn close_warm(&self) {
        self.upstreams.close_warm();
    }
}

impl Protocol for Imap {
    const NAME: &'static str = "imap";

    async fn serve<S: ClientStream>(&self, shared: Arc<Shared>, stream: S, connection: Connection) {
        session::run(shared, self.upstreams.clone(), stream, connection).await
    }

    async fn refuse_busy<S: ClientStream>(mut stream: S, busy: Busy) {
        let bye: &[u8] = match busy {
            Busy::Server => b"* BYE [UNAVAILABLE] Too many connections; try again later\r\n",
            Busy::Address => {
                b"* BYE [UNAVAILABLE] Too many connections from your address; try again later\r\n"
            }
        };
        let _ = stream.write_all(bye).await;
        let _ = stream.shutdown().await;
    }
}
