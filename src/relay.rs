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

/// Buffer per direction while data flows (none while the session is quiet).
const CHUNK: usize = 64 * 1024;

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
    let mut upstream = Coalesce(upstream.into_inner());
    if !client_ahead.is_empty() {
        upstream.write_all(&client_ahead).await?;
        upstream.flush().await?;
    }
    if !upstream_ahead.is_empty() {
        client.write_all(&upstream_ahead).await?;
        client.flush().await?;
    }
    let (up, down) = lazy_bidirectional(&mut client, &mut upstream).await?;
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
/// Reads as many TLS records as are ready into the caller's buffer, so that
/// one write to the client carries several records' worth of plaintext.
struct Coalesce<S>(S);

impl<S: AsyncRead + Unpin> AsyncRead for Coalesce<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        while buf.remaining() > 0 {
            let at = buf.filled().len();
            match Pin::new(&mut self.0).poll_read(cx, buf) {
                Poll::Ready(Ok(())) if buf.filled().len() == at => break,
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(e)) if buf.filled().len() == before => return Poll::Ready(Err(e)),
                Poll::Ready(Err(_)) => break,
                Poll::Pending if buf.filled().len() == before => return Poll::Pending,
                Poll::Pending => break,
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Coalesce<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// One direction of the relay. Its buffer exists only while data flows:
/// an idle session holds none.
#[derive(Default)]
struct Half {
    buf: Vec<u8>,
    pos: usize,
    len: usize,
    eof: bool,
    done: bool,
    total: u64,
}

impl Half {
    fn poll<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        mut r: Pin<&mut R>,
        mut w: Pin<&mut W>,
    ) -> Poll<io::Result<u64>>
    where
        R: AsyncRead + ?Sized,
        W: AsyncWrite + ?Sized,
    {
        loop {
            if self.done {
                return Poll::Ready(Ok(self.total));
            }
            if self.pos < self.len {
                match w.as_mut().poll_write(cx, &self.buf[self.pos..self.len]) {
                    Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                    Poll::Ready(Ok(n)) => {
                        self.pos += n;
                        self.total += n as u64;
                        continue;
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => return Poll::Pending,
                }
            }
            if self.eof {
                match w.as_mut().poll_shutdown(cx) {
                    Poll::Ready(_) => {
                        self.done = true;
                        return Poll::Ready(Ok(self.total));
                    }
                    Poll::Pending => return Poll::Pending,
                }
            }
            let last = self.len;
            self.pos = 0;
            self.len = 0;
            if self.buf.is_empty() {
                self.buf = vec![0; CHUNK];
            }
            let mut rb = ReadBuf::new(&mut self.buf);
            match r.as_mut().poll_read(cx, &mut rb) {
                Poll::Ready(Ok(())) => {
                    let n = rb.filled().len();
                    if n == 0 {
                        self.eof = true;
                        self.buf = Vec::new();
                    } else {
                        self.len = n;
                    }
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {
                    // Nothing to write yet. Flush what was written, and give the
                    // buffer back unless a bulk transfer is under way.
                    if last < CHUNK / 4 {
                        self.buf = Vec::new();
                    }
                    if let Poll::Ready(Err(e)) = w.as_mut().poll_flush(cx) {
                        return Poll::Ready(Err(e));
                    }
                    return Poll::Pending;
                }
            }
        }
    }
}

/// Copies both ways until both directions have ended, like
/// `tokio::io::copy_bidirectional`, with buffers that exist only while data flows.
async fn lazy_bidirectional<A, B>(a: &mut A, b: &mut B) -> io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let mut up = Half::default();
    let mut down = Half::default();
    std::future::poll_fn(|cx| {
        let u = up.poll(cx, Pin::new(&mut *a), Pin::new(&mut *b))?;
        let d = down.poll(cx, Pin::new(&mut *b), Pin::new(&mut *a))?;
        match (u, d) {
            (Poll::Ready(u), Poll::Ready(d)) => Poll::Ready(Ok((u, d))),
            _ => Poll::Pending,
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    /// Writes `data` and reads until EOF at the same time, as a peer does.
    async fn talk(stream: tokio::io::DuplexStream, data: Vec<u8>) -> Vec<u8> {
        let (mut reader, mut writer) = tokio::io::split(stream);
        let write = async move {
            writer.write_all(&data).await.unwrap();
            writer.shutdown().await.unwrap();
        };
        let read = async move {
            let mut got = Vec::new();
            reader.read_to_end(&mut got).await.unwrap();
            got
        };
        tokio::join!(write, read).1
    }

    #[tokio::test]
    async fn relays_both_ways_byte_for_byte_and_ends_on_both_eofs() {
        let (client, mut client_side) = tokio::io::duplex(8 * 1024);
        let (mut upstream_side, upstream) = tokio::io::duplex(8 * 1024);
        let relay =
            tokio::spawn(
                async move { lazy_bidirectional(&mut client_side, &mut upstream_side).await },
            );
        let up: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let down: Vec<u8> = up.iter().rev().copied().collect();
        let (got_down, got_up) =
            tokio::join!(talk(client, up.clone()), talk(upstream, down.clone()));
        assert!(got_up == up, "client to upstream, byte for byte");
        assert!(got_down == down, "upstream to client, byte for byte");
        let (n_up, n_down) = relay.await.unwrap().unwrap();
        assert_eq!((n_up, n_down), (up.len() as u64, down.len() as u64));
    }

    #[test]
    fn a_quiet_half_holds_no_buffer() {
        let half = Half::default();
        assert_eq!(half.buf.capacity(), 0);
    }
}
