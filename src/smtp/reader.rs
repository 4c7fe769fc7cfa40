//! The SMTP session's buffered reader of the client.
//!
//! An SMTP session lives as long as its client keeps it, and a pooled one
//! (nodemailer keeps its connections) is quiet far longer than it talks. So
//! the buffer exists only while bytes wait in it: when everything read has
//! been consumed and the client has sent nothing more, the buffer is given
//! back, as the relay gives back its own (`crate::relay`), and a quiet
//! session holds none, even right after a large message.
//!
//! How much one read may take depends on what the client is sending:
//! commands a few KiB at a time (a pipelined group of them fits), message
//! content up to 256 KiB at a time (as much as the relay's chunk), so that a
//! message costs few reads from the client and few writes upstream. A buffer
//! is taken without being zeroed ([`tokio_util::io::poll_read_buf`] reads
//! into its spare capacity), so taking one again after a pause costs no more
//! than a `malloc`.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncBufRead, AsyncRead, ReadBuf};

/// How much one read takes while the client sends commands.
pub(crate) const COMMAND_CHUNK: usize = 4 * 1024;
/// How much one read takes while the client sends a message's content.
pub(crate) const CONTENT_CHUNK: usize = 256 * 1024;

/// A buffered reader over the client's stream whose buffer exists only
/// while bytes wait in it. `buf[pos..]` is what was read and not consumed.
pub(crate) struct Reader<S> {
    inner: S,
    buf: Vec<u8>,
    pos: usize,
    /// How much the next read may take: [`COMMAND_CHUNK`] or [`CONTENT_CHUNK`].
    chunk: usize,
}

impl<S> Reader<S> {
    /// A reader of commands, holding no buffer yet.
    pub(crate) fn new(inner: S) -> Self {
        Reader {
            inner,
            buf: Vec::new(),
            pos: 0,
            chunk: COMMAND_CHUNK,
        }
    }

    /// The client's stream, for writing replies.
    pub(crate) fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// What was read and not consumed yet.
    pub(crate) fn buffer(&self) -> &[u8] {
        &self.buf[self.pos..]
    }

    /// From now on reads take up to [`CONTENT_CHUNK`]: a message's content
    /// follows.
    pub(crate) fn reading_content(&mut self) {
        self.chunk = CONTENT_CHUNK;
    }

    /// From now on reads take up to [`COMMAND_CHUNK`]. What a content read
    /// brought beyond the message (pipelined commands) stays until consumed.
    pub(crate) fn reading_commands(&mut self) {
        self.chunk = COMMAND_CHUNK;
    }

    /// The stream, and how many bytes read from it were not consumed (the
    /// caller reports them: after STARTTLS they are dropped unread).
    pub(crate) fn into_parts(self) -> (S, usize) {
        let waiting = self.buffer().len();
        (self.inner, waiting)
    }

    /// The capacity of the buffer held now.
    #[cfg(test)]
    pub(crate) fn capacity(&self) -> usize {
        self.buf.capacity()
    }
}

impl<S: AsyncRead + Unpin> Reader<S> {
    /// Reads once into an empty buffer of the chunk size in force. Whatever
    /// the outcome, a buffer that received nothing is given back.
    fn poll_read_chunk(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.buf.clear();
        self.pos = 0;
        if self.buf.capacity() != self.chunk {
            self.buf = Vec::with_capacity(self.chunk);
        }
        let polled = tokio_util::io::poll_read_buf(Pin::new(&mut self.inner), cx, &mut self.buf);
        if self.buf.is_empty() {
            self.buf = Vec::new();
        }
        polled.map_ok(|_| ())
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Reader<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let waiting = ready!(Pin::new(&mut *this).poll_fill_buf(cx))?;
        let n = waiting.len().min(out.remaining());
        out.put_slice(&waiting[..n]);
        Pin::new(this).consume(n);
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + Unpin> AsyncBufRead for Reader<S> {
    fn poll_fill_buf(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<&[u8]>> {
        let this = self.get_mut();
        if this.pos == this.buf.len() {
            ready!(this.poll_read_chunk(cx))?;
        }
        Poll::Ready(Ok(&this.buf[this.pos..]))
    }

    fn consume(self: Pin<&mut Self>, amt: usize) {
        let this = self.get_mut();
        this.pos = (this.pos + amt).min(this.buf.len());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};

    /// Polls `fill_buf` once: what it gave, or `None` when it would wait.
    async fn fill_once<S: AsyncRead + Unpin>(reader: &mut Reader<S>) -> Option<Vec<u8>> {
        std::future::poll_fn(|cx| {
            Poll::Ready(match Pin::new(&mut *reader).poll_fill_buf(cx) {
                Poll::Ready(Ok(bytes)) => Some(bytes.to_vec()),
                Poll::Ready(Err(e)) => panic!("{e}"),
                Poll::Pending => None,
            })
        })
        .await
    }

    #[tokio::test]
    async fn a_quiet_session_holds_no_buffer() {
        let (mut client, near) = tokio::io::duplex(1024 * 1024);
        let mut reader = Reader::new(near);
        assert_eq!(reader.capacity(), 0, "none before the first read");
        assert_eq!(fill_once(&mut reader).await, None);
        assert_eq!(reader.capacity(), 0, "none while waiting for a command");

        client.write_all(b"EHLO client\r\n").await.unwrap();
        let mut line = String::new();
        reader.read_line(&mut line).await.unwrap();
        assert_eq!(line, "EHLO client\r\n");
        assert!(reader.capacity() <= COMMAND_CHUNK);
        assert_eq!(fill_once(&mut reader).await, None);
        assert_eq!(reader.capacity(), 0, "given back once consumed");

        // A large message, then quiet: the large buffer goes too.
        reader.reading_content();
        client.write_all(&vec![b'x'; 600 * 1024]).await.unwrap();
        let mut read = 0;
        while let Some(bytes) = fill_once(&mut reader).await {
            assert!(reader.capacity() <= CONTENT_CHUNK);
            read += bytes.len();
            Pin::new(&mut reader).consume(bytes.len());
        }
        assert_eq!(read, 600 * 1024);
        reader.reading_commands();
        assert_eq!(reader.capacity(), 0, "no buffer after the message");
    }

    #[tokio::test]
    async fn content_is_read_in_large_chunks_and_commands_in_small_ones() {
        let (mut client, near) = tokio::io::duplex(1024 * 1024);
        let mut reader = Reader::new(near);
        client.write_all(&vec![b'x'; 600 * 1024]).await.unwrap();
        let first = fill_once(&mut reader).await.unwrap();
        assert_eq!(first.len(), COMMAND_CHUNK);
        Pin::new(&mut reader).consume(first.len());
        reader.reading_content();
        let next = fill_once(&mut reader).await.unwrap();
        assert_eq!(next.len(), CONTENT_CHUNK);
    }

    #[tokio::test]
    async fn what_a_content_read_brought_beyond_the_message_is_read_next() {
        let (mut client, near) = tokio::io::duplex(1024 * 1024);
        let mut reader = Reader::new(near);
        reader.reading_content();
        client.write_all(b"body\r\n.\r\nQUIT\r\n").await.unwrap();
        let content = fill_once(&mut reader).await.unwrap();
        assert_eq!(content, b"body\r\n.\r\nQUIT\r\n");
        Pin::new(&mut reader).consume(b"body\r\n.\r\n".len());
        reader.reading_commands();
        let mut line = String::new();
        reader.read_line(&mut line).await.unwrap();
        assert_eq!(line, "QUIT\r\n");
        let (_, waiting) = reader.into_parts();
        assert_eq!(waiting, 0);
    }
}
