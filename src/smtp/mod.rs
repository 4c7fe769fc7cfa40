//! SMTP submission: the proxy answers until AUTH, then lends each transaction
//! an upstream connection from the mailbox's pool.

pub(crate) mod command;
mod extensions;
pub(crate) mod graph;
mod pool;
mod reader;
pub(crate) mod session;
pub mod upstream;

use std::sync::Arc;

use tokio::io::AsyncWriteExt;

use crate::config::SmtpSection;
use crate::shared::{Busy, ClientStream, Connection, Protocol, Shared};
use extensions::Extensions;
use pool::Pools;

/// The SMTP listener's protocol, with what lives as long as the listener:
/// the per-mailbox connection pools (a reload does not empty them) and what
/// the upstream servers offer.
pub struct Smtp {
    pools: Arc<Pools>,
    extensions: Arc<Extensions>,
    /// `send_via = "auto"` mailboxes switched to Graph.
    switched: Arc<graph::Switched>,
}

impl Smtp {
    /// Pools sized by `[smtp]` as the process starts; later changes apply
    /// from the next restart. Starts the one task that closes idle pooled
    /// connections; it ends when this value is dropped. Call it inside the
    /// runtime.
    pub fn new(settings: &SmtpSection) -> Self {
        let pools = Arc::new(Pools::new(
            settings.max_connections_per_mailbox,
            settings.pool_idle_timeout,
            settings.pool_wait,
        ));
        let weak = Arc::downgrade(&pools);
        tokio::spawn(async move {
            loop {
                let Some(pools) = weak.upgrade() else { return };
                let pause = pools.reap_period();
                pools.reap_once();
                drop(pools);
                tokio::time::sleep(pause).await;
            }
        });
        Smtp {
            pools,
            extensions: Arc::default(),
            switched: Arc::default(),
        }
    }
}

impl Protocol for Smtp {
    const NAME: &'static str = "smtp";

    async fn serve<S: ClientStream>(&self, shared: Arc<Shared>, stream: S, connection: Connection) {
        let routes = session::Routes {
            pools: self.pools.clone(),
            switched: self.switched.clone(),
        };
        session::run(shared, routes, self.extensions.clone(), stream, connection).await
    }

    async fn refuse_busy<S: ClientStream>(mut stream: S, busy: Busy) {
        let reply: &[u8] = match busy {
            Busy::Server => b"421 4.3.2 Too many connections; try again later\r\n",
            Busy::Address => {
                b"421 4.7.0 Too many connections from your address; try again later\r\n"
            }
        };
        let _ = stream.write_all(reply).await;
        let _ = stream.shutdown().await;
    }
}
