//! The post-login byte pipe.
//!
//! After login the proxy buffers no more than one chunk per direction, and
//! only while data flows. The protocol may look at what passes through a
//! [`Filter`]: it sees each chunk once, and may rewrite the upstream's bytes
//! in place and hold back the end of a line it cannot judge yet (IMAP
//! rewrites the capabilities the server announces); everything else passes
//! as it came. Bytes that the login dialogue had already read ahead on
//! either side are delivered first, through the filter, so nothing
//! pipelined by the client or sent early by the server is lost.
//!
//! A filter may also know that more of the upstream's bytes are sure to come
//! (the rest of an IMAP literal): after each turn the relay tells the
//! upstream stream ([`LowWater`]), which lets the kernel wake the relay once
//! per large batch instead of once per TLS record ([`crate::low_water`]).

use std::io;
use std::pin::Pin;
use std::sync::atomic::AtomicU64;
use std::task::{Context, Poll};

use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncRead, AsyncWrite, BufReader, ReadBuf};
use tracing::debug;

use crate::low_water::LowWater;
use crate::watched::{Watched, Watcher};

/// What a protocol does to the bytes it relays.
pub trait Filter {
    /// Sees bytes from the client on their way upstream; they pass as they are.
    fn client_sent(&mut self, bytes: &[u8]);

    /// Scans the upstream's bytes `buf[..len]`: first what it held back
    /// last time, then what has just been read. It may rewrite them in
    /// place, never longer, and returns the new length and how many bytes
    /// from the start may go to the client. The rest is held back and handed
    /// in again, at the start, with the next bytes; at the end of the stream
    /// it goes out as it is. It must hold back less than [`HOLD_MAX`] bytes.
    fn upstream_sent(&mut self, buf: &mut [u8], len: usize) -> Scanned;

    /// How many more bytes the upstream is sure to send, after what this
    /// filter has seen, before it waits for the client (the rest of a
    /// literal); 0 when it cannot tell. Too many stalls the session.
    fn upstream_owes(&self) -> u64 {
        0
    }
}

/// What [`Filter::upstream_sent`] made of a buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scanned {
    /// The length of the buffer after rewriting.
    pub len: usize,
    /// The bytes, from the start, that may go to the client now.
    pub ready: usize,
}

impl Scanned {
    /// Everything may go.
    pub fn all(len: usize) -> Self {
        Scanned { len, ready: len }
    }
}

/// Buffer per direction while data flows (none while the session is quiet).
/// 256 KiB rather than 64: a third of the reads and writes per GB, and in
/// paired runs 0.44 s of CPU per GB of FETCH instead of 0.48–0.69
/// (docs/benchmarks.md, issue 15). It is allocated without being zeroed, so
/// that taking it again after a pause costs no more than a `malloc`.
const CHUNK: usize = 256 * 1024;

/// The most a filter may hold back: well under the buffer, so that a read
/// always has room.
pub const HOLD_MAX: usize = 16 * 1024;

/// Relays between `client` and `upstream` until both directions are closed,
/// through a filter of type `F`. The filter is made here rather than
/// passed in: an async fn's future keeps its arguments twice, and every
/// byte of it lives as long as the session.
pub async fn splice<F: Filter + Default>(
    protocol: &'static str,
    client: BufReader<impl AsyncRead + AsyncWrite + Unpin>,
    upstream: BufReader<impl AsyncRead + AsyncWrite + LowWater + Unpin>,
) -> io::Result<()> {
    let metrics = crate::metrics::get();
    let client_ahead = client.buffer().to_vec();
    let upstream_ahead = upstream.buffer().to_vec();
    let mut client = Watched {
        inner: client.into_inner(),
        watcher: Relayed {
            read: metrics.relayed(protocol, "upstream"),
            written: metrics.relayed(protocol, "downstream"),
        },
    };
    let mut upstream = Coalesce(upstream.into_inner());
    let mut filter = F::default();
    let ahead = (client_ahead, upstream_ahead);
    let (up, down) = lazy_bidirectional(&mut client, &mut upstream, &mut filter, ahead).await?;
    debug!(
        client_to_upstream = up,
        upstream_to_client = down,
        "session closed"
    );
    Ok(())
}

/// The session's relayed bytes, counted as the client's stream moves them:
/// read from the client is what goes upstream.
struct Relayed {
    read: Counter<u64, AtomicU64>,
    written: Counter<u64, AtomicU64>,
}

impl Watcher for Relayed {
    fn read(&self, bytes: usize) {
        self.read.inc_by(bytes as u64);
    }

    fn written(&self, bytes: usize) {
        self.written.inc_by(bytes as u64);
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

impl<S: LowWater> LowWater for Coalesce<S> {
    fn sure_to_come(&mut self, bytes: u64) -> io::Result<()> {
        self.0.sure_to_come(bytes)
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

/// One direction of the relay. Its buffer exists only while data flows
/// (or holds a few bytes a filter held back): whenever the reader has
/// nothing more and everything read is written, it is given back, so an
/// idle session holds none, even right after a large transfer.
///
/// `buf[pos..ready]` is waiting to be written, `buf[ready..]` is held back
/// by the filter; `buf.len()` is what has been read (the capacity beyond it
/// is not initialised).
#[derive(Default)]
struct Half {
    buf: Vec<u8>,
    pos: usize,
    ready: usize,
    eof: bool,
    done: bool,
    total: u64,
}

impl Half {
    /// A direction that starts with `bytes` read ahead (by the login
    /// dialogue), scanned by `scan` as if they had just been read.
    fn read_ahead(mut bytes: Vec<u8>, scan: impl FnOnce(&mut [u8], usize) -> Scanned) -> Self {
        let len = bytes.len();
        let scanned = scan(&mut bytes, len);
        bytes.truncate(scanned.len);
        Half {
            buf: bytes,
            ready: scanned.ready,
            ..Half::default()
        }
    }

    fn poll<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        mut r: Pin<&mut R>,
        mut w: Pin<&mut W>,
        mut scan: impl FnMut(&mut [u8], usize) -> Scanned,
    ) -> Poll<io::Result<u64>>
    where
        R: AsyncRead + ?Sized,
        W: AsyncWrite + ?Sized,
    {
        loop {
            if self.done {
                return Poll::Ready(Ok(self.total));
            }
            if self.pos < self.ready {
                match w.as_mut().poll_write(cx, &self.buf[self.pos..self.ready]) {
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
                if self.ready < self.buf.len() {
                    // The stream ended inside what the filter held: it goes as it is.
                    self.ready = self.buf.len();
                    continue;
                }
                match w.as_mut().poll_shutdown(cx) {
                    Poll::Ready(_) => {
                        self.done = true;
                        self.buf = Vec::new();
                        return Poll::Ready(Ok(self.total));
                    }
                    Poll::Pending => return Poll::Pending,
                }
            }
            self.make_room();
            let before = self.buf.len();
            let mut rb = ReadBuf::uninit(self.buf.spare_capacity_mut());
            let polled = r.as_mut().poll_read(cx, &mut rb);
            let n = rb.filled().len();
            // SAFETY: `ReadBuf` guarantees that its first `n` bytes, the
            // spare capacity just after `before`, were written by the read.
            unsafe { self.buf.set_len(before + n) };
            match polled {
                Poll::Ready(Ok(())) if n == 0 => self.eof = true,
                Poll::Ready(Ok(())) => {
                    let len = self.buf.len();
                    let scanned = scan(&mut self.buf, len);
                    self.buf.truncate(scanned.len);
                    self.ready = scanned.ready;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {
                    // Nothing to write: flush what was written, and give the
                    // buffer back (taking it again costs a `malloc`).
                    self.give_back();
                    if let Poll::Ready(Err(e)) = w.as_mut().poll_flush(cx) {
                        return Poll::Ready(Err(e));
                    }
                    return Poll::Pending;
                }
            }
        }
    }

    /// Once everything ready is written: moves what the filter held to the
    /// front of a buffer with room for [`CHUNK`] bytes.
    fn make_room(&mut self) {
        if self.ready > 0 {
            self.buf.drain(..self.ready);
            self.pos = 0;
            self.ready = 0;
        }
        if self.buf.capacity() < CHUNK {
            self.buf.reserve_exact(CHUNK - self.buf.len());
        }
        debug_assert!(
            self.buf.len() < HOLD_MAX,
            "a filter held {} bytes",
            self.buf.len()
        );
    }

    /// Frees the buffer but for the bytes the filter holds (none, mostly).
    fn give_back(&mut self) {
        self.buf.shrink_to_fit();
    }
}

/// Copies both ways until both directions have ended, like
/// `tokio::io::copy_bidirectional`, with buffers that exist only while data
/// flows, through `filter`; `ahead` is what the client and the upstream had
/// sent before the relay began, delivered first. After each turn `b` hears
/// how many bytes the filter is sure are still to come from it: at that
/// point its reads have either waited (then the count is what the relay
/// sleeps on) or stopped for the client.
async fn lazy_bidirectional<A, B, F>(
    a: &mut A,
    b: &mut B,
    filter: &mut F,
    ahead: (Vec<u8>, Vec<u8>),
) -> io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + LowWater + Unpin + ?Sized,
    F: Filter,
{
    let (client_ahead, upstream_ahead) = ahead;
    let mut up = Half::read_ahead(client_ahead, |buf, len| {
        filter.client_sent(&buf[..len]);
        Scanned::all(len)
    });
    let mut down = Half::read_ahead(upstream_ahead, |buf, len| filter.upstream_sent(buf, len));
    std::future::poll_fn(|cx| {
        let u = up.poll(cx, Pin::new(&mut *a), Pin::new(&mut *b), |buf, len| {
            filter.client_sent(&buf[..len]);
            Scanned::all(len)
        })?;
        let d = down.poll(cx, Pin::new(&mut *b), Pin::new(&mut *a), |buf, len| {
            filter.upstream_sent(buf, len)
        })?;
        b.sure_to_come(filter.upstream_owes())?;
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
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// An in-memory upstream has no socket to set a mark on.
    impl LowWater for tokio::io::DuplexStream {
        fn sure_to_come(&mut self, _: u64) -> io::Result<()> {
            Ok(())
        }
    }

    /// Lets everything pass.
    struct Verbatim;

    impl Filter for Verbatim {
        fn client_sent(&mut self, _: &[u8]) {}
        fn upstream_sent(&mut self, _: &mut [u8], len: usize) -> Scanned {
            Scanned::all(len)
        }
    }

    /// Upper-cases whole lines from the upstream, drops `#` from them, and
    /// holds back a line until its end; counts the client's bytes.
    #[derive(Default)]
    struct Shout {
        held: usize,
        client_sent: usize,
    }

    impl Filter for Shout {
        fn client_sent(&mut self, bytes: &[u8]) {
            self.client_sent += bytes.len();
        }
        fn upstream_sent(&mut self, buf: &mut [u8], len: usize) -> Scanned {
            let Some(end) = buf[..len].iter().rposition(|b| *b == b'\n').map(|i| i + 1) else {
                self.held = len;
                return Scanned { len, ready: 0 };
            };
            let kept: Vec<u8> = buf[..end]
                .iter()
                .filter(|b| **b != b'#')
                .map(u8::to_ascii_uppercase)
                .collect();
            buf[..kept.len()].copy_from_slice(&kept);
            buf.copy_within(end..len, kept.len());
            let len = len - (end - kept.len());
            self.held = len - kept.len();
            Scanned {
                len,
                ready: kept.len(),
            }
        }
    }

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
        let relay = tokio::spawn(async move {
            let ahead = (Vec::new(), Vec::new());
            lazy_bidirectional(&mut client_side, &mut upstream_side, &mut Verbatim, ahead).await
        });
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

    #[tokio::test]
    async fn a_half_gives_its_buffer_back_as_soon_as_a_large_transfer_pauses() {
        let (mut far, mut near) = tokio::io::duplex(4 * CHUNK);
        let data: Vec<u8> = (0..CHUNK as u32 + 44_000)
            .map(|i| (i % 241) as u8)
            .collect();
        far.write_all(&data).await.unwrap();
        let mut half = Half::default();
        let mut out = Vec::new();
        let polled = std::future::poll_fn(|cx| {
            let scan = |_: &mut [u8], len| Scanned::all(len);
            Poll::Ready(half.poll(cx, Pin::new(&mut near), Pin::new(&mut out), scan))
        })
        .await;
        assert!(polled.is_pending(), "the stream is quiet, not ended");
        assert!(out == data, "every byte, in order");
        assert_eq!(half.buf.capacity(), 0, "no buffer while quiet");
    }

    #[tokio::test]
    async fn a_filter_rewrites_and_holds_back_and_the_end_goes_out_as_it_is() {
        let (client, mut client_side) = tokio::io::duplex(64);
        let (mut upstream_side, upstream) = tokio::io::duplex(64);
        let relay = tokio::spawn(async move {
            let mut filter = Shout::default();
            let ahead = (b"ahead ".to_vec(), b"he#ld ".to_vec());
            let counts =
                lazy_bidirectional(&mut client_side, &mut upstream_side, &mut filter, ahead).await;
            (counts.unwrap(), filter.client_sent)
        });
        let mut down = b"line #1\n".repeat(5_000);
        down.extend_from_slice(b"unfinished #");
        let (got_down, got_up) = tokio::join!(talk(client, b"up".to_vec()), talk(upstream, down));
        assert_eq!(got_up, b"ahead up", "what the client sent ahead goes first");
        // Held from before the relay began, then finished by the first read.
        let mut expected = b"HELD LINE 1\n".to_vec();
        expected.extend_from_slice(&b"LINE 1\n".repeat(4_999));
        expected.extend_from_slice(b"unfinished #");
        assert!(
            got_down == expected,
            "{}",
            String::from_utf8_lossy(&got_down[..64])
        );
        let ((_, written), client_sent) = relay.await.unwrap();
        assert_eq!(written, expected.len() as u64);
        assert_eq!(client_sent, 8, "the filter saw every byte from the client");
    }
}

/// The relay over real sockets and real TLS, from a server that cuts its
/// records and writes as the test says, while the low-water mark is in play
/// (`crate::low_water`). A stall shows as a read that never completes; the
/// reads' deadlines only turn that into a failure.
#[cfg(test)]
mod over_tls {
    use std::io::{Read, Write};
    use std::os::fd::{AsFd, OwnedFd};
    use std::time::Duration;

    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};
    use testkit::pki::TestPki;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader, DuplexStream};
    use tokio::net::{TcpListener, TcpStream};
    use tokio::task::JoinHandle;

    use super::splice;
    use crate::imap::filter::CapabilityFilter;
    use crate::low_water::{self, MOST};
    use crate::upstream::{ReadAhead, UpstreamStream};

    /// How long a read may take before the session counts as stalled.
    const STALLED: Duration = Duration::from_secs(30);

    /// How the server sends: up to `record` bytes of plaintext per TLS
    /// record, up to `piece` bytes of ciphertext per TCP write (so records
    /// are cut anywhere), and a pause of a millisecond after one write in
    /// `pause_one_in` (0: none).
    #[derive(Clone, Copy, Debug)]
    struct Pace {
        record: usize,
        piece: usize,
        pause_one_in: u32,
    }

    /// Like Dovecot: 8 KiB records, one per write, at a pace the relay outruns.
    const DOVECOT: Pace = Pace {
        record: 8 * 1024,
        piece: 8 * 1024 + 22,
        pause_one_in: 4,
    };

    /// The server's end: TLS driven by hand, so that the test decides where
    /// records end, how they are cut into writes, and where it pauses.
    struct Server {
        tcp: TcpStream,
        tls: rustls::ServerConnection,
        rng: StdRng,
        received: Vec<u8>,
    }

    impl Server {
        /// Encrypts `plain` into records of random sizes up to
        /// `pace.record`, and writes them in pieces of random sizes up to
        /// `pace.piece`, pausing now and then.
        async fn send(&mut self, plain: &[u8], pace: Pace) {
            let mut at = 0;
            while at < plain.len() {
                let n = self.rng.random_range(1..=pace.record).min(plain.len() - at);
                self.tls.writer().write_all(&plain[at..at + n]).unwrap();
                at += n;
            }
            let mut wire = Vec::new();
            while self.tls.wants_write() {
                self.tls.write_tls(&mut wire).unwrap();
            }
            self.write(&wire, pace).await;
        }

        async fn write(&mut self, wire: &[u8], pace: Pace) {
            let mut at = 0;
            while at < wire.len() {
                let n = self.rng.random_range(1..=pace.piece).min(wire.len() - at);
                self.tcp.write_all(&wire[at..at + n]).await.unwrap();
                at += n;
                if pace.pause_one_in > 0 && self.rng.random_ratio(1, pace.pause_one_in) {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
        }

        /// The client's next line, as the server reads it.
        async fn line(&mut self) -> Vec<u8> {
            loop {
                if let Some(i) = memchr::memchr(b'\n', &self.received) {
                    return self.received.drain(..=i).collect();
                }
                let mut wire = [0u8; 4096];
                let n = self.tcp.read(&mut wire).await.unwrap();
                assert!(n > 0, "the relay closed the upstream");
                self.tls.read_tls(&mut &wire[..n]).unwrap();
                self.tls.process_new_packets().unwrap();
                let _ = self.tls.reader().read_to_end(&mut self.received);
            }
        }
    }

    /// A TLS server on loopback, the proxy's upstream stream connected to
    /// it, and a second handle on that stream's socket to read its mark.
    async fn connected(seed: u64) -> (Server, UpstreamStream, OwnedFd) {
        let pki = TestPki::new();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let acceptor = pki.acceptor();
        let accepted = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            acceptor.accept(tcp).await.unwrap().into_inner()
        });
        let tcp = TcpStream::connect(addr).await.unwrap();
        let probe = tcp.as_fd().try_clone_to_owned().unwrap();
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let upstream = pki
            .connector()
            .connect(name, ReadAhead::new(tcp))
            .await
            .unwrap();
        let (tcp, mut tls) = accepted.await.unwrap();
        tls.set_buffer_limit(None);
        let server = Server {
            tcp,
            tls,
            rng: StdRng::seed_from_u64(seed),
            received: Vec::new(),
        };
        (server, upstream, probe)
    }

    /// The relay between `upstream` and an in-memory client: the client's end.
    fn relay(upstream: UpstreamStream) -> (DuplexStream, JoinHandle<std::io::Result<()>>) {
        let (client, near) = tokio::io::duplex(64 * 1024);
        let relay = tokio::spawn(splice::<CapabilityFilter>(
            "imap",
            BufReader::new(near),
            BufReader::new(upstream),
        ));
        (client, relay)
    }

    /// Reads exactly `expected.len()` bytes and compares them.
    async fn expect(client: &mut DuplexStream, expected: &[u8], what: &str) {
        let mut got = vec![0u8; expected.len()];
        tokio::time::timeout(STALLED, client.read_exact(&mut got))
            .await
            .unwrap_or_else(|_| panic!("stalled: {what}"))
            .unwrap();
        assert!(got == expected, "{what}: not byte for byte");
    }

    fn message(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| match i % 71 {
                69 => b'\r',
                70 => b'\n',
                n => b'!' + ((n + seed as usize) % 90) as u8,
            })
            .collect()
    }

    fn fetch_head(n: usize, len: usize) -> Vec<u8> {
        format!("* {n} FETCH (UID {n} BODY[] {{{len}}}\r\n").into_bytes()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn large_literals_arrive_whole_however_records_are_cut_and_paused() {
        let (mut server, upstream, _probe) = connected(15).await;
        let (mut client, _relay) = relay(upstream);
        let fine = Pace {
            record: 16 * 1024,
            piece: 20_000,
            pause_one_in: 3,
        };
        let tiny = Pace {
            record: 700,
            piece: 3_000,
            pause_one_in: 20,
        };
        let literals: Vec<(usize, Pace)> = vec![
            (3_000_000, DOVECOT),
            (1_000_000, fine),
            (300_000, tiny),
            (200_000, DOVECOT),
            (150_000, fine),
            (5 * MOST as usize + 1, fine),
            (70_000, DOVECOT),
        ];
        let plan = literals.clone();
        let talk = tokio::spawn(async move {
            // Each literal ends where the server stops: it sends the rest of
            // the response only once the client has said it got it all.
            for (i, (len, pace)) in plan.into_iter().enumerate() {
                let mut sent = fetch_head(i + 1, len);
                sent.extend_from_slice(&message(len, i as u8));
                server.send(&sent, pace).await;
                assert_eq!(server.line().await, format!("a{i} NOOP\r\n").as_bytes());
                server
                    .send(format!(")\r\na{i} OK done\r\n").as_bytes(), pace)
                    .await;
            }
            server
        });
        for (i, (len, _)) in literals.into_iter().enumerate() {
            let mut expected = fetch_head(i + 1, len);
            expected.extend_from_slice(&message(len, i as u8));
            expect(
                &mut client,
                &expected,
                &format!("literal {i} of {len} bytes"),
            )
            .await;
            client
                .write_all(format!("a{i} NOOP\r\n").as_bytes())
                .await
                .unwrap();
            let tail = format!(")\r\na{i} OK done\r\n");
            expect(&mut client, tail.as_bytes(), "the end of the response").await;
        }
        talk.await.unwrap();
    }

    #[tokio::test]
    async fn the_mark_is_raised_inside_a_large_literal_and_back_to_1_after_it() {
        let (mut server, upstream, probe) = connected(16).await;
        let (mut client, _relay) = relay(upstream);
        assert_eq!(low_water::get(&probe).unwrap(), 1);
        let len = 2_000_000;
        let literal = message(len, 3);
        let mut first = fetch_head(1, len);
        first.extend_from_slice(&literal[..600_000]);
        server.send(&first, DOVECOT).await;
        // One thread: by the time the client reads, the relay's turn that
        // wrote those bytes has set the mark.
        expect(&mut client, &first[..1000], "the start of the literal").await;
        assert_eq!(low_water::get(&probe).unwrap(), MOST as u32);
        let talk = tokio::spawn(async move {
            server.send(&literal[600_000..], DOVECOT).await;
            server.send(b")\r\n", DOVECOT).await;
            server
        });
        let mut rest = first[1000..].to_vec();
        rest.extend_from_slice(&message(len, 3)[600_000..]);
        rest.extend_from_slice(b")\r\n");
        expect(&mut client, &rest, "the rest of the literal").await;
        assert_eq!(low_water::get(&probe).unwrap(), 1, "no literal pending");
        let mut server = talk.await.unwrap();
        server.send(b"a1 OK done\r\n", DOVECOT).await;
        expect(&mut client, b"a1 OK done\r\n", "the tagged answer").await;
        assert_eq!(low_water::get(&probe).unwrap(), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_server_that_pauses_mid_literal_is_relayed_in_full_when_it_goes_on() {
        let (mut server, upstream, _probe) = connected(17).await;
        let (mut client, _relay) = relay(upstream);
        let len = 1_500_000;
        let mut sent = fetch_head(1, len);
        sent.extend_from_slice(&message(len, 9));
        sent.extend_from_slice(b")\r\na1 OK done\r\n");
        let expected = sent.clone();
        let talk = tokio::spawn(async move {
            // Longer than anything in the proxy might wait for.
            server.send(&sent[..700_000], DOVECOT).await;
            tokio::time::sleep(Duration::from_secs(3)).await;
            server.send(&sent[700_000..], DOVECOT).await;
            server
        });
        expect(&mut client, &expected, "the paused literal").await;
        talk.await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_upstream_that_closes_mid_literal_ends_the_relay() {
        for clean in [false, true] {
            let (mut server, upstream, _probe) = connected(18).await;
            let (mut client, relay) = relay(upstream);
            let len = 2_000_000;
            let mut sent = fetch_head(1, len);
            sent.extend_from_slice(&message(len, 1)[..900_000]);
            server.send(&sent, DOVECOT).await;
            if clean {
                server.tls.send_close_notify();
                let mut wire = Vec::new();
                server.tls.write_tls(&mut wire).unwrap();
                server.write(&wire, DOVECOT).await;
            }
            drop(server);
            let mut got = Vec::new();
            tokio::time::timeout(STALLED, client.read_to_end(&mut got))
                .await
                .expect("the client sees the end")
                .unwrap();
            assert!(got == sent, "what came before the close, byte for byte");
            // The client hangs up in turn, and the relay is over.
            client.shutdown().await.unwrap();
            tokio::time::timeout(STALLED, relay)
                .await
                .expect("the relay ends")
                .unwrap()
                .ok();
        }
    }

    #[tokio::test]
    async fn after_compress_the_mark_stays_1() {
        let (mut server, upstream, probe) = connected(19).await;
        let (mut client, _relay) = relay(upstream);
        client.write_all(b"c1 COMPRESS DEFLATE\r\n").await.unwrap();
        assert_eq!(server.line().await, b"c1 COMPRESS DEFLATE\r\n");
        // Deflated bytes may look like anything, a literal announced included.
        let mut sent = b"c1 OK DEFLATE active\r\n".to_vec();
        sent.extend_from_slice(&fetch_head(1, 3_000_000));
        sent.extend_from_slice(&message(400_000, 5));
        server.send(&sent, DOVECOT).await;
        expect(&mut client, &sent, "what follows COMPRESS").await;
        assert_eq!(low_water::get(&probe).unwrap(), 1);
    }
}
