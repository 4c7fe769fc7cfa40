//! IMAP: the proxy is the server until login, then a byte pipe.

mod capabilities;
mod filter;
pub(crate) mod framing;
pub(crate) mod parser;
mod session;
pub mod upstream;

use std::sync::Arc;

use tokio::io::AsyncWriteExt;

use crate::shared::{Busy, ClientStream, Connection, Protocol, Shared};

/// The IMAP listener's protocol.
pub struct Imap;

impl Protocol for Imap {
    const NAME: &'static str = "imap";

    async fn serve<S: ClientStream>(&self, shared: Arc<Shared>, stream: S, connection: Connection) {
        session::run(shared, stream, connection).await
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
