//! IMAP: the proxy is the server until login, then a byte pipe.

mod framing;
mod parser;
mod session;
pub mod upstream;

use std::sync::Arc;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::shared::{Protocol, Shared};

/// The IMAP listener's protocol.
pub struct Imap;

impl Protocol for Imap {
    const NAME: &'static str = "imap";

    async fn serve(&self, shared: Arc<Shared>, stream: TcpStream) {
        session::run(shared, stream).await
    }

    async fn refuse_busy(mut stream: TcpStream) {
        let _ = stream
            .write_all(b"* BYE [UNAVAILABLE] Too many connections; try again later\r\n")
            .await;
        let _ = stream.shutdown().await;
    }
}
