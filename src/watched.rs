//! A stream that tells a [`Watcher`] of every byte it moves: the relay counts
//! the bytes it relays into the metrics, the admin listener notes when a
//! connection last moved one (its idle timeout). One wrapper, two watchers.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// What is told of the bytes a [`Watched`] stream moves; never of none.
pub trait Watcher {
    /// `bytes` were read from the stream.
    fn read(&self, bytes: usize);
    /// `bytes` were written to the stream.
    fn written(&self, bytes: usize);
}

/// `inner`, with `watcher` told of every byte read from it or written to it.
pub struct Watched<S, W> {
    pub inner: S,
    pub watcher: W,
}

impl<S: AsyncRead + Unpin, W: Watcher + Unpin> AsyncRead for Watched<S, W> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            self.watcher.read(n);
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin, W: Watcher + Unpin> AsyncWrite for Watched<S, W> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &polled
            && *n > 0
        {
            self.watcher.written(*n);
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[derive(Default)]
    struct Tally {
        read: Cell<usize>,
        written: Cell<usize>,
        told: Cell<usize>,
    }

    impl Watcher for &Tally {
        fn read(&self, bytes: usize) {
            self.read.set(self.read.get() + bytes);
            self.told.set(self.told.get() + 1);
        }
        fn written(&self, bytes: usize) {
            self.written.set(self.written.get() + bytes);
            self.told.set(self.told.get() + 1);
        }
    }

    #[tokio::test]
    async fn every_byte_either_way_is_told_and_nothing_else() {
        let (near, mut far) = tokio::io::duplex(1024);
        let tally = Tally::default();
        let mut stream = Watched {
            inner: near,
            watcher: &tally,
        };
        stream.write_all(b"hello").await.unwrap();
        let mut got = [0u8; 5];
        far.read_exact(&mut got).await.unwrap();
        far.write_all(b"abc").await.unwrap();
        drop(far);
        let mut back = Vec::new();
        stream.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, b"abc");
        assert_eq!((tally.read.get(), tally.written.get()), (3, 5));
        assert_eq!(tally.told.get(), 2, "the end of the stream is not a read");
    }
}
