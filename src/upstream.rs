//! Connections to the real mail servers: TCP, and TLS with verified
//! certificates. Shared by IMAP and SMTP.
//!
//! rustls reads the socket 4 KiB at a time; during a bulk transfer that is
//! a `recvfrom` per 4 KiB. [`ReadAhead`] sits between rustls and the socket:
//! once a read fills what rustls asked for (data is flowing), it reads 256 KiB
//! at a time and serves rustls from that, and frees the buffer as soon as the
//! socket has nothing more, so that an idle session holds none. The other
//! way, rustls may queue up to [`SEND_BUFFER`] of encrypted records, so that
//! one relayed chunk goes out in one `writev`.
//!
//! While a large IMAP literal streams in, the relay tells the stream how many
//! bytes are sure to come ([`LowWater`]); the TLS stream takes off what
//! rustls may hold, [`ReadAhead`] what it has read ahead, and the rest
//! becomes the socket's receive low-water mark ([`crate::low_water`] says
//! why that is safe).

use std::collections::HashMap;
use std::io;
use std::os::fd::AsFd;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::config::{Config, Provider, ServerAddr};
use crate::low_water::{LowWater, Mark, TLS_HOLDS};

/// A TLS connection to an upstream server.
pub type UpstreamStream = tokio_rustls::client::TlsStream<ReadAhead<TcpStream>>;

/// How much [`ReadAhead`] reads at once while data flows: as much as the
/// relay writes at once (`relay::CHUNK`); 256 KiB measured fewer wake-ups
/// and less CPU per GB than 64 KiB (docs/benchmarks.md, issue 15).
const READ_AHEAD: usize = 256 * 1024;

/// The most rustls queues for the socket (its default is 64 KiB): a 256 KiB
/// chunk from the relay becomes sixteen records sent with one `writev`.
/// It holds memory only while the socket is slower than the relay.
const SEND_BUFFER: usize = 256 * 1024;

/// A stream whose reads, while data flows, take [`READ_AHEAD`] bytes from
/// the socket at a time (see the module doc). Writes pass through.
pub struct ReadAhead<S> {
    inner: S,
    /// No allocation unless data is flowing; `buf[pos..]` is still to be
    /// handed out (the capacity beyond `buf.len()` is not initialised).
    buf: Vec<u8>,
    pos: usize,
    /// The socket's receive low-water mark.
    mark: Mark,
}

impl<S> ReadAhead<S> {
    pub fn new(inner: S) -> Self {
        ReadAhead {
            inner,
            buf: Vec::new(),
            pos: 0,
            mark: Mark::default(),
        }
    }

    /// Hands out what was read ahead; false when nothing is left.
    fn serve(&mut self, out: &mut ReadBuf<'_>) -> bool {
        if self.pos == self.buf.len() {
            return false;
        }
        let n = out.remaining().min(self.buf.len() - self.pos);
        out.put_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        true
    }

    /// Gives the buffer back (an idle session holds none).
    fn give_back(&mut self) {
        self.buf = Vec::new();
        self.pos = 0;
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for ReadAhead<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.serve(out) {
            return Poll::Ready(Ok(()));
        }
        if this.buf.capacity() == 0 {
            // Quiet so far: read what is asked; a read that fills it means
            // more is coming, and the next reads go through the buffer.
            let want = out.remaining();
            let before = out.filled().len();
            let polled = Pin::new(&mut this.inner).poll_read(cx, out);
            if let Poll::Ready(Ok(())) = polled
                && want > 0
                && out.filled().len() - before == want
                && want < READ_AHEAD
            {
                this.buf = Vec::with_capacity(READ_AHEAD);
            }
            return polled;
        }
        this.buf.clear();
        this.pos = 0;
        let mut ahead = ReadBuf::uninit(this.buf.spare_capacity_mut());
        let polled = Pin::new(&mut this.inner).poll_read(cx, &mut ahead);
        let n = ahead.filled().len();
        // SAFETY: `ReadBuf` guarantees that its first `n` bytes, the start
        // of the spare capacity of the empty buffer, were written by the read.
        unsafe { this.buf.set_len(n) };
        match polled {
            Poll::Ready(Ok(())) => {
                if n == 0 {
                    this.give_back();
                }
                this.serve(out);
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => {
                this.give_back();
                Poll::Ready(Err(e))
            }
            Poll::Pending => {
                // The socket is drained: an idle session keeps no buffer.
                this.give_back();
                Poll::Pending
            }
        }
    }
}

/// What is sure to come on the socket: what is sure to come out of this
/// stream, less what it has read ahead and not handed out yet.
impl<S: AsFd> LowWater for ReadAhead<S> {
    fn sure_to_come(&mut self, bytes: u64) -> io::Result<()> {
        let ahead = (self.buf.len() - self.pos) as u64;
        self.mark.apply(&self.inner, bytes.saturating_sub(ahead))
    }
}

/// What is sure to come out of the TLS stream, less what rustls may hold.
impl LowWater for UpstreamStream {
    fn sure_to_come(&mut self, bytes: u64) -> io::Result<()> {
        self.get_mut()
            .0
            .sure_to_come(bytes.saturating_sub(TLS_HOLDS))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for ReadAhead<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Why an upstream login did not produce a working session.
#[derive(Debug, Clone, thiserror::Error)]
pub enum UpstreamError {
    /// Could not connect, TLS failed, timed out, or the server hung up.
    #[error("{0}")]
    Unreachable(String),
    /// The server refused the XOAUTH2 login or the session after it; `reply`
    /// is the server's own answer (it never contains the token), `hint` what
    /// to change in Exchange or Entra.
    #[error("the server refused the login: {reply} ({hint})")]
    Rejected { reply: String, hint: &'static str },
}

/// One TLS client setup per provider: system roots plus its `ca_file`, whose
/// certificates are also pins (`tls` says how). Certificates are always
/// verified; nothing turns that off.
pub struct UpstreamTls {
    connectors: HashMap<String, TlsConnector>,
}

impl UpstreamTls {
    pub fn new(config: &Config) -> Result<Self, String> {
        let mut connectors = HashMap::new();
        for (name, provider) in &config.providers {
            let tls = crate::tls::client_config(provider.ca_file.as_deref())
                .map_err(|e| format!("provider `{name}`: {e}"))?;
            connectors.insert(name.clone(), TlsConnector::from(tls));
        }
        Ok(UpstreamTls { connectors })
    }

    /// Opens a TCP connection to `server`.
    pub async fn connect(
        &self,
        server: &ServerAddr,
        timeout: Duration,
    ) -> Result<TcpStream, UpstreamError> {
        let started = std::time::Instant::now();
        let connect = TcpStream::connect((server.host.as_str(), server.port));
        match tokio::time::timeout(timeout, connect).await {
            Ok(Ok(stream)) => {
                let _ = stream.set_nodelay(true);
                crate::metrics::get().upstream_connect(&server.to_string(), started.elapsed());
                Ok(stream)
            }
            Ok(Err(e)) => Err(UpstreamError::Unreachable(format!(
                "cannot connect to {server}: {}",
                crate::error::io_reason(&e)
            ))),
            Err(_) => Err(UpstreamError::Unreachable(format!(
                "connecting to {server} timed out"
            ))),
        }
    }

    /// Runs the TLS handshake on `tcp`, verifying `server.host`.
    pub async fn handshake(
        &self,
        provider: &Provider,
        server: &ServerAddr,
        tcp: TcpStream,
    ) -> Result<UpstreamStream, UpstreamError> {
        let connector = &self.connectors[&provider.name];
        let name = ServerName::try_from(server.host.clone()).map_err(|_| {
            UpstreamError::Unreachable(format!("`{}` is not a valid server name", server.host))
        })?;
        let mut stream = connector
            .connect(name, ReadAhead::new(tcp))
            .await
            .map_err(|e| {
                let setting = if *server == provider.smtp_server {
                    "smtp_server"
                } else {
                    "imap_server"
                };
                UpstreamError::Unreachable(format!(
                    "TLS with {server} failed: {}",
                    crate::tls::handshake_failure(&e, &server.host, setting, &provider.name)
                ))
            })?;
        stream.get_mut().1.set_buffer_limit(Some(SEND_BUFFER));
        Ok(stream)
    }
}

/// The text of an upstream reply to quote in logs and client messages:
/// printable and bounded. Callers never pass SASL challenge lines.
pub fn quote_reply(line: &[u8]) -> String {
    let text = String::from_utf8_lossy(crate::lines::trim_eol(line));
    let mut quoted: String = text
        .chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .take(300)
        .collect();
    if text.chars().count() > 300 {
        quoted.push('…');
    }
    quoted
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// The low-water mark counts on rustls holding at most
    /// [`TLS_HOLDS`](crate::low_water::TLS_HOLDS) of the server's stream
    /// (`crate::low_water`): here the socket has everything at once, records
    /// are as large as TLS allows, and the reader takes little at a time,
    /// so that rustls holds all it ever does.
    #[tokio::test]
    async fn rustls_holds_no_more_of_the_stream_than_the_low_water_mark_allows() {
        use crate::low_water::TLS_HOLDS;
        use crate::watched::{Watched, Watcher};
        use std::cell::Cell;
        use std::io::Write;
        use std::rc::Rc;

        struct Taken(Rc<Cell<u64>>);
        impl Watcher for Taken {
            fn read(&self, bytes: usize) {
                self.0.set(self.0.get() + bytes as u64);
            }
            fn written(&self, _: usize) {}
        }

        let pki = testkit::pki::TestPki::new();
        let mut config = (*pki.server_config()).clone();
        // No tickets after the handshake: every byte after it is a record below.
        config.send_tls13_tickets = 0;
        let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
        let (near, far) = tokio::io::duplex(8 << 20);
        let taken = Rc::new(Cell::new(0));
        let below = Watched {
            inner: near,
            watcher: Taken(taken.clone()),
        };
        let name = ServerName::try_from("localhost").unwrap();
        let (client, server) =
            tokio::join!(pki.connector().connect(name, below), acceptor.accept(far));
        let (mut client, server) = (client.unwrap(), server.unwrap());
        let start = taken.get();
        let (mut far, mut tls) = server.into_inner();
        tls.set_buffer_limit(None);

        // Records of every size up to the largest; `starts[i]` is where
        // record i begins on the wire, `plain[i]` what it carries.
        let mut wire = Vec::new();
        let (mut starts, mut plain) = (Vec::new(), Vec::new());
        for i in 0..400usize {
            let len = if i % 3 == 0 {
                16 * 1024
            } else {
                1 + i * 97 % 16384
            };
            starts.push(wire.len() as u64);
            plain.push(len as u64);
            tls.writer().write_all(&vec![b'x'; len]).unwrap();
            while tls.wants_write() {
                tls.write_tls(&mut wire).unwrap();
            }
        }
        far.write_all(&wire).await.unwrap();
        let total: u64 = plain.iter().sum();

        let (mut handed, mut most) = (0u64, 0u64);
        let mut buf = vec![0u8; 64 * 1024];
        let mut i = 0usize;
        while handed < total {
            let want = [1, 7, 300, 4096, 65536][i % 5];
            i += 1;
            handed += client.read(&mut buf[..want]).await.unwrap() as u64;
            let on_wire = taken.get() - start;
            // What rustls has of the stream: the plaintext of the records it
            // has taken whole, and of the one it has begun, as many bytes
            // as it has taken of it (its plaintext is shorter still).
            let had: u64 = (0..starts.len())
                .map(|i| {
                    let end = starts.get(i + 1).copied().unwrap_or(wire.len() as u64);
                    match on_wire {
                        w if w >= end => plain[i],
                        w if w > starts[i] => plain[i].min(w - starts[i]),
                        _ => 0,
                    }
                })
                .sum();
            most = most.max(had - handed);
        }
        assert!(
            most > 16 * 1024,
            "the test made rustls hold a record: {most}"
        );
        assert!(
            most <= TLS_HOLDS,
            "rustls held {most} bytes, more than the {TLS_HOLDS} the mark allows for"
        );
    }

    #[tokio::test]
    async fn read_ahead_passes_every_byte_and_keeps_no_buffer_when_quiet() {
        let (mut far, near) = tokio::io::duplex(256 * 1024);
        let mut stream = ReadAhead::new(near);
        let data: Vec<u8> = (0..1_000_000u32).map(|i| (i % 253) as u8).collect();
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            far.write_all(&sent).await.unwrap();
            far
        });
        let mut got = vec![0u8; data.len()];
        let mut at = 0;
        while at < got.len() {
            // rustls's request size.
            let end = (at + 4096).min(got.len());
            let n = stream.read(&mut got[at..end]).await.unwrap();
            assert!(n > 0);
            at += n;
        }
        assert!(got == data, "byte for byte");
        let mut far = writer.await.unwrap();
        // Quiet now: the next read waits, and gives the buffer back first.
        let mut one = [0u8; 4096];
        let polled = std::future::poll_fn(|cx| {
            let mut out = ReadBuf::new(&mut one);
            Poll::Ready(Pin::new(&mut stream).poll_read(cx, &mut out).is_pending())
        })
        .await;
        assert!(polled, "nothing to read");
        assert_eq!(stream.buf.capacity(), 0, "no buffer while quiet");
        far.write_all(b"x").await.unwrap();
        assert_eq!(stream.read(&mut one).await.unwrap(), 1);
    }
}
