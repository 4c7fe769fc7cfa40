//! The post-login byte pipe.
//!
//! After login the proxy neither parses nor buffers more than one chunk per
//! direction: IDLE, APPEND literals, COMPRESS=DEFLATE all pass untouched.
//! Bytes that the login dialogue had already read ahead on either side are
//! delivered first, so nothing pipelined by the client or sent early by the
//! server is lost.

use std::io;
use std::pin::Pin;
use std::sync::atomic::AtomicU64;
use std::task::{Context, Poll};

use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, BufReader, ReadBuf};
use tracing::debug;

/// Chunk size per direction: one TLS record's worth of plaintext.
const CHUNK: usize = 16 * 1024;

/// Relays between `client` and `upstream` until both directions are closed.
pub async fn splice<C, U>(
    protocol: &'static str,
    client: BufReader<C>,
    upstream: BufReader<U>,
) -> io::Result<()>
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let metrics = crate::metrics::get();
    let client_ahead = client.buffer().to_vec();
    let upstream_ahead = upstream.buffer().to_vec();
    let mut client = Counted {
        inner: client.into_inner(),
        read: metrics.relayed(protocol, "upstream"),
        written: metrics.relayed(protocol, "downstream"),
    };
    let mut upstream = upstream.into_inner();
    if !client_ahead.is_empty() {
        upstream.write_all(&client_ahead).await?;
        upstream.flush().await?;
    }
    if !upstream_ahead.is_empty() {
        client.write_all(&upstream_ahead).await?;
        client.flush().await?;
    }
    let (up, down) =
        tokio::io::copy_bidirectional_with_sizes(&mut client, &mut upstream, CHUNK, CHUNK).await?;
    debug!(
        client_to_upstream = up,
        upstream_to_client = down,
        "session closed"
    );
    Ok(())
}

/// A stream that counts the bytes read from it and written to it.
struct Counted<S> {
    inner: S,
    read: Counter<u64, AtomicU64>,
    written: Counter<u64, AtomicU64>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            self.read.inc_by(n as u64);
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &polled {
            self.written.inc_by(*n as u64);
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
