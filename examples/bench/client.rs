//! The benchmark's IMAP and SMTP clients: just enough protocol to log in,
//! move big messages, idle, and log out, over plain TCP (to a proxy) or TLS
//! (straight to the upstream, or to xoauth2-proxy's IMAP over TLS listener).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

pub type Error = Box<dyn std::error::Error + Send + Sync>;
pub type Result<T> = std::result::Result<T, Error>;

/// Any byte stream a client can speak over.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// How a client reaches its server.
#[derive(Clone)]
pub enum Route {
    /// Plain TCP (a proxy on loopback).
    Plain(SocketAddr),
    /// Implicit TLS, verifying `name` with the CA the connector trusts: the
    /// test CA (the upstream itself) or the proxy's own (its `tls_listen`).
    Tls {
        addr: SocketAddr,
        name: String,
        connector: TlsConnector,
    },
}

/// How long any one protocol step may take before the run is declared broken.
const STEP: Duration = Duration::from_secs(120);

async fn within<T>(what: &str, f: impl Future<Output = Result<T>>) -> Result<T> {
    match tokio::time::timeout(STEP, f).await {
        Ok(r) => r,
        Err(_) => Err(format!("{what}: no answer within {}s", STEP.as_secs()).into()),
    }
}

impl Route {
    /// Connects, with a read buffer of `buffer` bytes.
    pub async fn connect(&self, buffer: usize) -> Result<BufReader<Box<dyn Io>>> {
        within("connect", async {
            match self {
                Route::Plain(addr) => {
                    let tcp = TcpStream::connect(addr).await?;
                    tcp.set_nodelay(true)?;
                    Ok(BufReader::with_capacity(
                        buffer,
                        Box::new(tcp) as Box<dyn Io>,
                    ))
                }
                Route::Tls {
                    addr,
                    name,
                    connector,
                } => {
                    let tcp = TcpStream::connect(addr).await?;
                    tcp.set_nodelay(true)?;
                    let name = ServerName::try_from(name.clone())?;
                    let tls = connector.connect(name, tcp).await?;
                    Ok(BufReader::with_capacity(
                        buffer,
                        Box::new(tls) as Box<dyn Io>,
                    ))
                }
            }
        })
        .await
    }
}

impl Route {
    /// For a TLS route, how the handshake of a new connection goes (`full`,
    /// or `resumed` from the client's session cache, as rustls does by
    /// default); the connection is closed right after.
    pub async fn handshake_kind(&self) -> Result<Option<String>> {
        let Route::Tls {
            addr,
            name,
            connector,
        } = self
        else {
            return Ok(None);
        };
        within("TLS handshake", async {
            let tcp = TcpStream::connect(addr).await?;
            let tls = connector
                .connect(ServerName::try_from(name.clone())?, tcp)
                .await?;
            Ok(tls
                .get_ref()
                .1
                .handshake_kind()
                .map(|k| format!("{k:?}").to_lowercase()))
        })
        .await
    }
}

/// How a client logs in.
#[derive(Clone)]
pub enum Credentials {
    /// A local password (to a proxy).
    Password { user: String, password: String },
    /// An access token (straight to the upstream).
    Token { user: String, token: String },
}

const MAX_LINE: u64 = 1 << 20;

async fn read_line(io: &mut BufReader<Box<dyn Io>>, line: &mut Vec<u8>) -> Result<()> {
    line.clear();
    let n = (&mut *io).take(MAX_LINE).read_until(b'\n', line).await?;
    if n == 0 {
        return Err("the server closed the connection".into());
    }
    Ok(())
}

/// A message of exactly `size` bytes: a few header lines, then 76-character
/// lines of base64-like text, CRLF-terminated (no line starts with a dot).
pub fn message(size: usize, subject: &str) -> Vec<u8> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = format!(
        "From: bench@bench.test\r\nTo: user@bench.test\r\nSubject: {subject}\r\n\
         MIME-Version: 1.0\r\nContent-Type: application/octet-stream\r\n\
         Content-Transfer-Encoding: base64\r\n\r\n"
    )
    .into_bytes();
    out.reserve(size.saturating_sub(out.len()));
    let mut k = 0usize;
    while out.len() + 78 <= size {
        for _ in 0..76 {
            out.push(ALPHABET[k % 64]);
            k = k.wrapping_mul(31).wrapping_add(7) % 1_000_003;
        }
        out.extend_from_slice(b"\r\n");
    }
    while out.len() + 2 < size {
        out.push(b'A');
    }
    while out.len() < size {
        out.extend_from_slice(b"\r\n");
    }
    out.truncate(size);
    if !out.ends_with(b"\r\n") {
        let n = out.len();
        out[n - 2..].copy_from_slice(b"\r\n");
    }
    out
}

/// An IMAP client session.
pub struct Imap {
    io: BufReader<Box<dyn Io>>,
    next_tag: u32,
    line: Vec<u8>,
}

impl Imap {
    /// Connects and reads the greeting.
    pub async fn connect(route: &Route, buffer: usize) -> Result<Imap> {
        let io = route.connect(buffer).await?;
        let mut imap = Imap {
            io,
            next_tag: 1,
            line: Vec::new(),
        };
        within("greeting", async {
            read_line(&mut imap.io, &mut imap.line).await?;
            if !imap.line.starts_with(b"* OK") {
                return Err(format!(
                    "greeting: {}",
                    String::from_utf8_lossy(&imap.line).trim_end()
                )
                .into());
            }
            Ok(())
        })
        .await?;
        Ok(imap)
    }

    fn tag(&mut self) -> String {
        let tag = format!("b{}", self.next_tag);
        self.next_tag += 1;
        tag
    }

    async fn send(&mut self, bytes: &[u8]) -> Result<()> {
        let s = self.io.get_mut();
        s.write_all(bytes).await?;
        s.flush().await?;
        Ok(())
    }

    /// Reads until the tagged status for `tag`; an error unless it is OK.
    async fn until_tagged(&mut self, tag: &str) -> Result<()> {
        let prefix = format!("{tag} ");
        loop {
            read_line(&mut self.io, &mut self.line).await?;
            if self.line.starts_with(prefix.as_bytes()) {
                let status = &self.line[prefix.len()..];
                if status.starts_with(b"OK") {
                    return Ok(());
                }
                return Err(String::from_utf8_lossy(&self.line)
                    .trim_end()
                    .to_string()
                    .into());
            }
        }
    }

    /// Sends one simple command and runs it to its tagged OK; when the first
    /// byte of its answer arrived.
    pub async fn first_byte_at(&mut self, command: &str) -> Result<Instant> {
        let tag = self.tag();
        self.send(format!("{tag} {command}\r\n").as_bytes()).await?;
        within(command, async {
            if self.io.fill_buf().await?.is_empty() {
                return Err("the server closed the connection".into());
            }
            let at = Instant::now();
            self.until_tagged(&tag).await?;
            Ok(at)
        })
        .await
    }

    /// Runs one simple command (no literals) to its tagged OK.
    pub async fn run(&mut self, command: &str) -> Result<()> {
        let tag = self.tag();
        self.send(format!("{tag} {command}\r\n").as_bytes()).await?;
        within(command, self.until_tagged(&tag)).await
    }

    pub async fn login(&mut self, credentials: &Credentials) -> Result<()> {
        match credentials {
            Credentials::Password { user, password } => {
                self.run(&format!("LOGIN \"{user}\" \"{password}\"")).await
            }
            Credentials::Token { user, token } => {
                let ir = testkit::xoauth2(user, token);
                self.run(&format!("AUTHENTICATE XOAUTH2 {ir}")).await
            }
        }
    }

    /// `UID FETCH uid BODY.PEEK[]`; returns the literal's size.
    pub async fn fetch_body(&mut self, uid: u32) -> Result<u64> {
        let tag = self.tag();
        self.send(format!("{tag} UID FETCH {uid} BODY.PEEK[]\r\n").as_bytes())
            .await?;
        within("UID FETCH", async {
            let mut total = 0u64;
            loop {
                read_line(&mut self.io, &mut self.line).await?;
                if self.line.starts_with(format!("{tag} ").as_bytes()) {
                    if self.line[tag.len() + 1..].starts_with(b"OK") {
                        return Ok(total);
                    }
                    return Err(String::from_utf8_lossy(&self.line)
                        .trim_end()
                        .to_string()
                        .into());
                }
                let Some((n, _)) = testkit::literal_announced(&self.line) else {
                    continue;
                };
                let mut left = n;
                while left > 0 {
                    let buf = self.io.fill_buf().await?;
                    if buf.is_empty() {
                        return Err("the server closed the connection inside a literal".into());
                    }
                    let take = buf.len().min(left);
                    self.io.consume(take);
                    left -= take;
                }
                total += n as u64;
            }
        })
        .await
    }

    /// `APPEND INBOX {n}` with a synchronising literal.
    pub async fn append(&mut self, data: &[u8]) -> Result<()> {
        let tag = self.tag();
        self.send(format!("{tag} APPEND INBOX (\\Seen) {{{}}}\r\n", data.len()).as_bytes())
            .await?;
        within("APPEND", async {
            read_line(&mut self.io, &mut self.line).await?;
            if !self.line.starts_with(b"+") {
                return Err(
                    format!("APPEND: {}", String::from_utf8_lossy(&self.line).trim_end()).into(),
                );
            }
            let s = self.io.get_mut();
            s.write_all(data).await?;
            s.write_all(b"\r\n").await?;
            s.flush().await?;
            self.until_tagged(&tag).await
        })
        .await
    }

    /// Starts IDLE and waits for the continuation; the session then sits.
    pub async fn idle(&mut self) -> Result<()> {
        let tag = self.tag();
        self.send(format!("{tag} IDLE\r\n").as_bytes()).await?;
        within("IDLE", async {
            read_line(&mut self.io, &mut self.line).await?;
            if self.line.starts_with(b"+") {
                Ok(())
            } else {
                Err(format!("IDLE: {}", String::from_utf8_lossy(&self.line).trim_end()).into())
            }
        })
        .await
    }

    /// LOGOUT, waiting for its tagged OK.
    pub async fn logout(mut self) -> Result<()> {
        self.run("LOGOUT").await
    }
}

/// Opens, logs in, selects INBOX: a session ready for FETCH, APPEND or IDLE.
pub async fn imap_session(route: &Route, credentials: &Credentials, buffer: usize) -> Result<Imap> {
    let mut imap = Imap::connect(route, buffer).await?;
    imap.login(credentials).await?;
    imap.run("SELECT INBOX").await?;
    Ok(imap)
}

/// One connect + login + LOGOUT cycle; its wall time.
pub async fn login_cycle(route: &Route, credentials: &Credentials) -> Result<Duration> {
    let started = Instant::now();
    let mut imap = Imap::connect(route, 4096).await?;
    imap.login(credentials).await?;
    imap.logout().await?;
    Ok(started.elapsed())
}

/// An SMTP client session.
pub struct Smtp {
    io: BufReader<Box<dyn Io>>,
    line: Vec<u8>,
}

impl Smtp {
    /// Connects, reads the greeting, says EHLO and authenticates.
    pub async fn open(route: &Route, credentials: &Credentials) -> Result<Smtp> {
        let io = route.connect(16 * 1024).await?;
        let mut smtp = Smtp {
            io,
            line: Vec::new(),
        };
        smtp.expect(None, 220).await?;
        smtp.expect(Some("EHLO bench.client"), 250).await?;
        match credentials {
            Credentials::Password { user, password } => {
                let ir = base64::engine::general_purpose::STANDARD
                    .encode(format!("\0{user}\0{password}"));
                smtp.expect(Some(&format!("AUTH PLAIN {ir}")), 235).await?;
            }
            Credentials::Token { user, token } => {
                let ir = testkit::xoauth2(user, token);
                smtp.expect(Some(&format!("AUTH XOAUTH2 {ir}")), 235)
                    .await?;
            }
        }
        Ok(smtp)
    }

    /// Sends `command` (if any) and reads the whole reply; an error unless its code is `code`.
    async fn expect(&mut self, command: Option<&str>, code: u16) -> Result<()> {
        if let Some(command) = command {
            let s = self.io.get_mut();
            s.write_all(command.as_bytes()).await?;
            s.write_all(b"\r\n").await?;
            s.flush().await?;
        }
        within("SMTP reply", self.reply(code)).await
    }

    async fn reply(&mut self, code: u16) -> Result<()> {
        loop {
            read_line(&mut self.io, &mut self.line).await?;
            if self.line.get(3) == Some(&b'-') {
                continue;
            }
            let got: u16 = std::str::from_utf8(self.line.get(..3).unwrap_or_default())
                .ok()
                .and_then(|c| c.parse().ok())
                .unwrap_or(0);
            if got == code {
                return Ok(());
            }
            return Err(format!(
                "expected {code}, got {}",
                String::from_utf8_lossy(&self.line).trim_end()
            )
            .into());
        }
    }

    /// One transaction: MAIL, RCPT, then DATA with `message` (CRLF lines,
    /// no leading dots); returns the time from DATA to the final reply.
    pub async fn send(&mut self, message: &[u8]) -> Result<Duration> {
        self.expect(Some("MAIL FROM:<user@bench.test>"), 250)
            .await?;
        self.expect(Some("RCPT TO:<someone@bench.test>"), 250)
            .await?;
        let started = Instant::now();
        self.expect(Some("DATA"), 354).await?;
        let s = self.io.get_mut();
        s.write_all(message).await?;
        s.write_all(b".\r\n").await?;
        s.flush().await?;
        within("end of DATA", self.reply(250)).await?;
        Ok(started.elapsed())
    }

    pub async fn quit(mut self) -> Result<()> {
        self.expect(Some("QUIT"), 221).await
    }
}

/// The TLS connector for the direct route: trusts the test CA only.
pub fn connector(config: Arc<rustls::ClientConfig>) -> TlsConnector {
    TlsConnector::from(config)
}
