//! A mock SMTP submission server shaped like `smtp.office365.com:587`.
//!
//! It speaks enough ESMTP for nodemailer and for the proxy's upstream connector:
//! STARTTLS (or implicit TLS), `AUTH XOAUTH2` checked against the shared
//! [`TokenBook`], pipelined MAIL/RCPT/DATA, BDAT, RSET, NOOP, QUIT, and
//! Microsoft's per-mailbox limit on concurrent connections. Every accepted message
//! is recorded for the tests, and a few faults can be switched on.
//!
//! Decisions worth knowing when writing tests against it:
//!
//! - **Thread limit.** The limit is checked at `MAIL FROM` (where Microsoft reports
//!   it), not at AUTH: AUTH always succeeds, and a connection whose mailbox has at
//!   least N *other, earlier-authenticated* connections still open gets
//!   `432 4.3.2 STOREDRV.ClientSubmit; sender thread limit exceeded [Hostname=mock]`
//!   for its `MAIL FROM`. The connection stays open; once an older connection
//!   closes, the next `MAIL FROM` on it succeeds. A connection that says QUIT stops
//!   counting before the `221` is sent, so a client that closes a connection and at
//!   once opens another one does not trip the limit by racing the server.
//! - **Dot-stuffing.** Inside DATA a line starts after any LF; the terminator is the
//!   line `.<CR><LF>`; any other line starting with `.` loses that dot in `data`.
//! - **`drop_during_next_data`** is one-shot and global: the next DATA on any
//!   connection reads at least one chunk of content (whatever has arrived), then
//!   resets the TCP connection (SO_LINGER 0, no TLS close_notify, no reply). Nothing
//!   is recorded for that transaction. With a small message the chunk may already
//!   contain the terminator; the server still drops without answering.
//! - **`set_stopped(true)`** closes the listening socket synchronously (new
//!   connections are refused with ECONNREFUSED); `set_stopped(false)` re-binds the
//!   same port synchronously. Open connections are not touched.
//! - **Counters move after the fact.** `active_now` drops when the server has
//!   finished with a connection (after its `221` and TLS shutdown, or after it saw the
//!   client's EOF), so a test that has just closed a connection should use
//!   [`MockSmtpUpstream::wait_for_stats`] rather than read [`MockSmtpUpstream::stats`].
//! - **`set_hang(true)`** affects connections accepted afterwards: they are accepted
//!   and held open, but never greeted (they count in `connections_total`).

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::future::poll_fn;
use std::io::{self, BufRead};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Handle;
use tokio::sync::Notify;
use tokio::task::AbortHandle;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

use crate::parse_xoauth2;
use crate::pki::TestPki;
use crate::tokens::TokenBook;

/// The host name the mock announces.
pub const HOSTNAME: &str = "mock.outlook.office365.com";

/// Longest command line accepted, without its CRLF (XOAUTH2 lines are several KB).
pub const MAX_LINE: usize = 16 * 1024;

const GREETING: &str = "220 mock.outlook.office365.com Microsoft ESMTP MAIL Service ready";
const THREAD_LIMIT: &str =
    "432 4.3.2 STOREDRV.ClientSubmit; sender thread limit exceeded [Hostname=mock]";
const NOT_AUTHENTICATED: &str = "530 5.7.57 Client not authenticated to send mail.";
const AUTH_OK: &str = "235 2.7.0 Authentication successful";
const AUTH_FAILED_MICROSOFT: &str =
    "535 5.7.3 Authentication unsuccessful [mock.outlook.office365.com]";
const AUTH_FAILED_CHALLENGE: &str = "535 5.7.8 Authentication failed";
const AUTH_DISABLED: &str = "535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Mailbox. Visit https://aka.ms/smtp_auth_disabled for more information.";
const BASIC_AUTH_DISABLED: &str =
    "535 5.7.139 Authentication unsuccessful, basic authentication is disabled.";
const CHALLENGE_JSON: &str =
    r#"{"status":"401","schemes":"bearer","scope":"https://mail.google.com/"}"#;

/// How the upstream offers TLS.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UpstreamTls {
    /// Plain TCP, then `STARTTLS` (smtp.office365.com:587).
    StartTls,
    /// TLS from the first byte (port 465 style).
    Implicit,
}

/// How a rejected XOAUTH2 login is answered.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum FailureStyle {
    /// `535 5.7.3 Authentication unsuccessful [...]` at once (Microsoft).
    #[default]
    Microsoft,
    /// `334 <base64 JSON error>`, then, after the client's (empty) line,
    /// `535 5.7.8 Authentication failed` (Google, Postfix).
    Challenge,
}

/// One message the mock accepted.
#[derive(Clone, PartialEq, Eq)]
pub struct ReceivedMessage {
    /// Which connection delivered it (1-based, in accept order).
    pub conn_id: u64,
    /// The `user=` of the XOAUTH2 login of that connection.
    pub auth_user: String,
    /// The argument text after `MAIL FROM:`, parameters included.
    pub mail_from: String,
    /// The argument texts after `RCPT TO:`, parameters included, in order.
    pub rcpt_to: Vec<String>,
    /// The content after dot-unstuffing, without the final `.<CR><LF>` line
    /// (so it keeps the CRLF that ends the last content line). For BDAT, the chunks.
    pub data: Vec<u8>,
    /// The content as it was on the wire, dot-stuffed, without the final `.<CR><LF>`.
    pub raw: Vec<u8>,
}

impl fmt::Debug for ReceivedMessage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReceivedMessage")
            .field("conn_id", &self.conn_id)
            .field("auth_user", &self.auth_user)
            .field("mail_from", &self.mail_from)
            .field("rcpt_to", &self.rcpt_to)
            .field("data_len", &self.data.len())
            .field("raw_len", &self.raw.len())
            .finish()
    }
}

/// Counters; see the field comments.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SmtpStats {
    /// Connections accepted (hung ones included).
    pub connections_total: usize,
    /// Connections open right now.
    pub active_now: usize,
    /// The most concurrently open *authenticated* connections ever seen for one mailbox.
    pub max_active_per_mailbox: usize,
    /// Successful XOAUTH2 logins.
    pub auth_ok: usize,
    /// Failed AUTH attempts of any kind (bad token, disabled, malformed, AUTH LOGIN).
    pub auth_failed: usize,
    /// Messages accepted (`250` after the end of data).
    pub transactions_ok: usize,
    /// RSET commands.
    pub rsets: usize,
    /// `432 4.3.2` answers given.
    pub thread_limit_errors: usize,
    /// Connections reset by `drop_during_next_data`.
    pub dropped_data: usize,
}

/// The running mock. Dropping it stops the listener and every connection task.
pub struct MockSmtpUpstream {
    shared: Arc<Shared>,
    addr: SocketAddr,
    accept_task: AbortHandle,
}

struct Shared {
    tokens: TokenBook,
    acceptor: TlsAcceptor,
    tls: UpstreamTls,
    runtime: Handle,
    addr: SocketAddr,
    listener: Mutex<ListenerSlot>,
    cfg: Mutex<Config>,
    drop_next_data: AtomicBool,
    state: Mutex<State>,
    changed: Notify,
    next_conn: AtomicU64,
    next_msg: AtomicU64,
    tasks: Mutex<Vec<AbortHandle>>,
}

#[derive(Default)]
struct ListenerSlot {
    listener: Option<TcpListener>,
    waker: Option<Waker>,
}

struct Config {
    failure_style: FailureStyle,
    auth_disabled: HashSet<String>,
    max_sessions: Option<usize>,
    hang: bool,
}

#[derive(Default)]
struct State {
    messages: Vec<ReceivedMessage>,
    stats: SmtpStats,
    /// Lower-cased mailbox → ids of its open authenticated connections, in AUTH order.
    authed: HashMap<String, Vec<u64>>,
}

/// Starts the mock on 127.0.0.1 with an ephemeral port.
pub async fn start(pki: &TestPki, tokens: TokenBook, tls: UpstreamTls) -> MockSmtpUpstream {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the mock SMTP upstream");
    let addr = listener
        .local_addr()
        .expect("local address of the mock SMTP upstream");
    let shared = Arc::new(Shared {
        tokens,
        acceptor: pki.acceptor(),
        tls,
        runtime: Handle::current(),
        addr,
        listener: Mutex::new(ListenerSlot {
            listener: Some(listener),
            waker: None,
        }),
        cfg: Mutex::new(Config {
            failure_style: FailureStyle::Microsoft,
            auth_disabled: HashSet::new(),
            max_sessions: Some(3),
            hang: false,
        }),
        drop_next_data: AtomicBool::new(false),
        state: Mutex::new(State::default()),
        changed: Notify::new(),
        next_conn: AtomicU64::new(1),
        next_msg: AtomicU64::new(1),
        tasks: Mutex::new(Vec::new()),
    });
    let accept_task = tokio::spawn(accept_loop(shared.clone())).abort_handle();
    MockSmtpUpstream {
        shared,
        addr,
        accept_task,
    }
}

impl MockSmtpUpstream {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn set_failure_style(&self, style: FailureStyle) {
        self.shared.cfg.lock().unwrap().failure_style = style;
    }

    /// While set, XOAUTH2 for `mailbox` (case-insensitive) gets `535 5.7.139`,
    /// whatever the token.
    pub fn set_auth_disabled(&self, mailbox: &str, disabled: bool) {
        let mut cfg = self.shared.cfg.lock().unwrap();
        let key = mailbox.to_ascii_lowercase();
        if disabled {
            cfg.auth_disabled.insert(key);
        } else {
            cfg.auth_disabled.remove(&key);
        }
    }

    /// The per-mailbox connection limit enforced at `MAIL FROM` (default `Some(3)`);
    /// `None` disables it.
    pub fn set_max_sessions_per_mailbox(&self, limit: Option<usize>) {
        self.shared.cfg.lock().unwrap().max_sessions = limit;
    }

    /// Arms a one-shot fault: the next DATA (on any connection) is cut off by a TCP
    /// reset after some content has arrived, without a reply.
    pub fn drop_during_next_data(&self) {
        self.shared.drop_next_data.store(true, Ordering::SeqCst);
    }

    /// `true`: close the listening socket now (connections are refused).
    /// `false`: listen on the same port again, now.
    pub fn set_stopped(&self, stopped: bool) {
        let mut slot = self.shared.listener.lock().unwrap();
        if stopped {
            let old = slot.listener.take();
            // The accept loop may be waiting on the old listener, whose
            // registration is dropped without a wake-up: wake it, so that it
            // parks on the slot instead and sees the listener come back.
            let waker = slot.waker.take();
            drop(slot);
            drop(old);
            if let Some(waker) = waker {
                waker.wake();
            }
            return;
        }
        if slot.listener.is_some() {
            return;
        }
        let listener = rebind(&self.shared);
        slot.listener = Some(listener);
        if let Some(waker) = slot.waker.take() {
            waker.wake();
        }
    }

    /// While set, new connections are accepted but never greeted.
    pub fn set_hang(&self, hang: bool) {
        self.shared.cfg.lock().unwrap().hang = hang;
    }

    /// Every message accepted so far, in order of acceptance.
    pub fn messages(&self) -> Vec<ReceivedMessage> {
        self.shared.state.lock().unwrap().messages.clone()
    }

    /// Returns and forgets the messages accepted so far.
    pub fn take_messages(&self) -> Vec<ReceivedMessage> {
        std::mem::take(&mut self.shared.state.lock().unwrap().messages)
    }

    pub fn stats(&self) -> SmtpStats {
        self.shared.state.lock().unwrap().stats.clone()
    }

    /// Waits until at least `n` messages were accepted and returns them all.
    /// Panics after `timeout`.
    pub async fn wait_for_messages(&self, n: usize, timeout: Duration) -> Vec<ReceivedMessage> {
        let deadline = Instant::now() + timeout;
        loop {
            let notified = self.shared.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let state = self.shared.state.lock().unwrap();
                if state.messages.len() >= n {
                    return state.messages.clone();
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || tokio::time::timeout(left, notified).await.is_err() {
                let state = self.shared.state.lock().unwrap();
                if state.messages.len() >= n {
                    return state.messages.clone();
                }
                panic!(
                    "mock SMTP upstream: waited {timeout:?} for {n} messages, got {} (stats: {:?})",
                    state.messages.len(),
                    state.stats
                );
            }
        }
    }

    /// Waits until `pred(stats)` holds and returns those stats. Panics after `timeout`.
    pub async fn wait_for_stats(
        &self,
        pred: impl Fn(&SmtpStats) -> bool,
        timeout: Duration,
    ) -> SmtpStats {
        let deadline = Instant::now() + timeout;
        loop {
            let notified = self.shared.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let stats = self.stats();
            if pred(&stats) {
                return stats;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || tokio::time::timeout(left, notified).await.is_err() {
                let stats = self.stats();
                if pred(&stats) {
                    return stats;
                }
                panic!(
                    "mock SMTP upstream: condition not reached in {timeout:?}; stats: {stats:?}"
                );
            }
        }
    }
}

impl Drop for MockSmtpUpstream {
    fn drop(&mut self) {
        self.accept_task.abort();
        for task in self.shared.tasks.lock().unwrap().drain(..) {
            task.abort();
        }
        let old = self.shared.listener.lock().unwrap().listener.take();
        drop(old);
    }
}

fn rebind(shared: &Shared) -> TcpListener {
    let _guard = shared.runtime.enter();
    let mut last_err = None;
    for _ in 0..50 {
        // std sets SO_REUSEADDR on Unix, so lingering TIME_WAIT sockets don't block this.
        match std::net::TcpListener::bind(shared.addr) {
            Ok(std_listener) => {
                std_listener
                    .set_nonblocking(true)
                    .expect("non-blocking listener");
                return TcpListener::from_std(std_listener).expect("register the listener");
            }
            Err(e) => {
                last_err = Some(e);
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
    panic!(
        "mock SMTP upstream: could not listen on {} again: {:?}",
        shared.addr, last_err
    );
}

async fn accept_loop(shared: Arc<Shared>) {
    loop {
        let accepted = poll_fn(|cx| {
            let mut slot = shared.listener.lock().unwrap();
            slot.waker = Some(cx.waker().clone());
            match slot.listener.as_ref() {
                Some(listener) => listener.poll_accept(cx),
                None => Poll::Pending,
            }
        })
        .await;
        match accepted {
            Ok((tcp, peer)) => {
                let id = shared.next_conn.fetch_add(1, Ordering::SeqCst);
                let task =
                    tokio::spawn(handle_connection(shared.clone(), tcp, peer, id)).abort_handle();
                let mut tasks = shared.tasks.lock().unwrap();
                tasks.retain(|t| !t.is_finished());
                tasks.push(task);
            }
            // Out of file descriptors and the like: don't spin.
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

/// Keeps `active_now` and the per-mailbox registry right however a connection ends.
struct ConnGuard {
    shared: Arc<Shared>,
    id: u64,
}

impl ConnGuard {
    fn new(shared: &Arc<Shared>, id: u64) -> Self {
        {
            let mut state = shared.state.lock().unwrap();
            state.stats.connections_total += 1;
            state.stats.active_now += 1;
        }
        shared.changed.notify_waiters();
        ConnGuard {
            shared: shared.clone(),
            id,
        }
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        {
            let mut state = self.shared.state.lock().unwrap();
            state.stats.active_now -= 1;
            unregister_auth(&mut state, self.id);
        }
        self.shared.changed.notify_waiters();
    }
}

fn unregister_auth(state: &mut State, id: u64) {
    for ids in state.authed.values_mut() {
        ids.retain(|&other| other != id);
    }
    state.authed.retain(|_, ids| !ids.is_empty());
}

async fn handle_connection(shared: Arc<Shared>, tcp: TcpStream, peer: SocketAddr, id: u64) {
    let _guard = ConnGuard::new(&shared, id);
    let _ = tcp.set_nodelay(true);
    let hang = shared.cfg.lock().unwrap().hang;
    if hang {
        let mut tcp = tcp;
        let mut sink = [0u8; 4096];
        while let Ok(n) = tcp.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
        return;
    }
    let io = match shared.tls {
        UpstreamTls::StartTls => Io::Plain(tcp),
        UpstreamTls::Implicit => match shared.acceptor.accept(tcp).await {
            Ok(tls) => Io::Tls(Box::new(tls)),
            Err(_) => return,
        },
    };
    let mut session = Session {
        tls: shared.tls == UpstreamTls::Implicit,
        shared,
        id,
        peer,
        io,
        buf: Vec::with_capacity(64 * 1024),
        pos: 0,
        out: Vec::new(),
        hello: false,
        auth_user: None,
        mail_from: None,
        rcpts: Vec::new(),
        bdat: None,
    };
    match session.run().await {
        Ok(Flow::Drop) => session.io.reset(),
        Ok(_) => {}
        Err(e) => {
            if !matches!(
                e.kind(),
                io::ErrorKind::UnexpectedEof
                    | io::ErrorKind::ConnectionReset
                    | io::ErrorKind::BrokenPipe
                    | io::ErrorKind::ConnectionAborted
            ) {
                eprintln!("mock SMTP upstream: connection {id}: {e}");
            }
        }
    }
}

enum Io {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
    Gone,
}

impl Io {
    async fn read_into(&mut self, buf: &mut Vec<u8>) -> io::Result<usize> {
        buf.reserve(64 * 1024);
        match self {
            Io::Plain(s) => s.read_buf(buf).await,
            Io::Tls(s) => s.read_buf(buf).await,
            Io::Gone => Ok(0),
        }
    }

    async fn write_all(&mut self, data: &[u8]) -> io::Result<()> {
        match self {
            Io::Plain(s) => {
                s.write_all(data).await?;
                s.flush().await
            }
            Io::Tls(s) => {
                s.write_all(data).await?;
                s.flush().await
            }
            Io::Gone => Err(io::ErrorKind::NotConnected.into()),
        }
    }

    async fn shutdown(&mut self) {
        match self {
            Io::Plain(s) => {
                let _ = s.shutdown().await;
            }
            Io::Tls(s) => {
                let _ = s.shutdown().await;
            }
            Io::Gone => {}
        }
    }

    /// Closes with a TCP reset: no reply, no close_notify.
    fn reset(&mut self) {
        match std::mem::replace(self, Io::Gone) {
            Io::Plain(s) => {
                let _ = s.set_zero_linger();
            }
            Io::Tls(s) => {
                let _ = s.get_ref().0.set_zero_linger();
            }
            Io::Gone => {}
        }
    }
}

enum Flow {
    Continue,
    Close,
    /// Reset the connection without another word.
    Drop,
}

struct Session {
    shared: Arc<Shared>,
    id: u64,
    peer: SocketAddr,
    io: Io,
    /// Bytes read and not yet consumed are `buf[pos..]`.
    buf: Vec<u8>,
    pos: usize,
    /// Replies not yet written (flushed before every read, so pipelined
    /// commands get their replies in one write).
    out: Vec<u8>,
    tls: bool,
    hello: bool,
    auth_user: Option<String>,
    mail_from: Option<String>,
    rcpts: Vec<String>,
    bdat: Option<Vec<u8>>,
}

/// Position of the first LF (std's `read_until` machinery, which uses an optimised
/// memchr even in debug builds).
fn find_lf(hay: &[u8]) -> Option<usize> {
    let mut reader = hay;
    let n = reader.skip_until(b'\n').unwrap_or(0);
    (n > 0 && hay[n - 1] == b'\n').then(|| n - 1)
}

fn strip_prefix_ci<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    let head = s.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &s[prefix.len()..])
}

fn decode_b64(text: &str) -> Option<Vec<u8>> {
    let text = text.trim();
    STANDARD
        .decode(text)
        .or_else(|_| STANDARD_NO_PAD.decode(text))
        .ok()
}

impl Session {
    fn reply(&mut self, line: &str) {
        self.out.extend_from_slice(line.as_bytes());
        self.out.extend_from_slice(b"\r\n");
    }

    async fn flush(&mut self) -> io::Result<()> {
        if !self.out.is_empty() {
            let out = std::mem::take(&mut self.out);
            self.io.write_all(&out).await?;
            self.out = out;
            self.out.clear();
        }
        Ok(())
    }

    /// Reads more input (after flushing pending replies); 0 means EOF.
    async fn fill(&mut self) -> io::Result<usize> {
        self.flush().await?;
        if self.pos > 0 {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        self.io.read_into(&mut self.buf).await
    }

    /// The next command line without its line ending; `None` at EOF or after a
    /// line that was too long (answered, then the connection is closed).
    async fn next_line(&mut self) -> io::Result<Option<String>> {
        loop {
            if let Some(i) = find_lf(&self.buf[self.pos..]) {
                let start = self.pos;
                let mut end = start + i;
                self.pos = end + 1;
                if end > start && self.buf[end - 1] == b'\r' {
                    end -= 1;
                }
                if end - start > MAX_LINE {
                    self.reply("500 5.5.6 Line too long");
                    self.flush().await?;
                    return Ok(None);
                }
                return Ok(Some(
                    String::from_utf8_lossy(&self.buf[start..end]).into_owned(),
                ));
            }
            if self.buf.len() - self.pos > MAX_LINE + 2 {
                self.reply("500 5.5.6 Line too long");
                self.flush().await?;
                return Ok(None);
            }
            if self.fill().await? == 0 {
                return Ok(None);
            }
        }
    }

    async fn run(&mut self) -> io::Result<Flow> {
        self.reply(GREETING);
        loop {
            let Some(line) = self.next_line().await? else {
                return Ok(Flow::Close);
            };
            match self.command(&line).await? {
                Flow::Continue => {}
                Flow::Close => {
                    self.flush().await?;
                    self.io.shutdown().await;
                    return Ok(Flow::Close);
                }
                Flow::Drop => return Ok(Flow::Drop),
            }
        }
    }

    fn reset_transaction(&mut self) {
        self.mail_from = None;
        self.rcpts.clear();
        self.bdat = None;
    }

    async fn command(&mut self, line: &str) -> io::Result<Flow> {
        let (verb, arg) = match line.find(' ') {
            Some(i) => (&line[..i], line[i + 1..].trim()),
            None => (line, ""),
        };
        match verb.to_ascii_uppercase().as_str() {
            "EHLO" | "HELO" if arg.is_empty() => self.reply("501 5.5.4 Invalid domain name"),
            "EHLO" => {
                self.reset_transaction();
                self.hello = true;
                let mut lines = vec![
                    format!("{HOSTNAME} Hello [{}]", self.peer.ip()),
                    "SIZE 157286400".to_string(),
                    "PIPELINING".to_string(),
                    "DSN".to_string(),
                    "ENHANCEDSTATUSCODES".to_string(),
                ];
                if self.tls {
                    lines.push("AUTH LOGIN XOAUTH2".to_string());
                } else {
                    lines.push("STARTTLS".to_string());
                }
                for ext in ["8BITMIME", "BINARYMIME", "CHUNKING", "SMTPUTF8"] {
                    lines.push(ext.to_string());
                }
                let last = lines.len() - 1;
                for (i, l) in lines.iter().enumerate() {
                    let sep = if i == last { ' ' } else { '-' };
                    self.out
                        .extend_from_slice(format!("250{sep}{l}\r\n").as_bytes());
                }
            }
            "HELO" => {
                self.reset_transaction();
                self.hello = true;
                let text = format!("250 {HOSTNAME} Hello [{}]", self.peer.ip());
                self.reply(&text);
            }
            "STARTTLS" => return self.starttls().await,
            "AUTH" => return self.auth(arg).await,
            "MAIL" => self.mail(arg),
            "RCPT" => {
                if self.mail_from.is_none() {
                    self.reply("503 5.5.1 Need mail command");
                } else if let Some(to) = strip_prefix_ci(arg, "TO:") {
                    self.rcpts.push(to.trim().to_string());
                    self.reply("250 2.1.5 Recipient OK");
                } else {
                    self.reply("501 5.5.4 Invalid arguments");
                }
            }
            "DATA" => return self.data().await,
            "BDAT" => return self.bdat(arg).await,
            "RSET" => {
                self.reset_transaction();
                self.shared.state.lock().unwrap().stats.rsets += 1;
                self.shared.changed.notify_waiters();
                self.reply("250 2.0.0 Resetting");
            }
            "NOOP" => self.reply("250 2.0.0 OK"),
            "QUIT" => {
                // Stop counting against the mailbox's limit before the client can
                // see the 221 and open its next connection.
                unregister_auth(&mut self.shared.state.lock().unwrap(), self.id);
                self.reply("221 2.0.0 Service closing transmission channel");
                return Ok(Flow::Close);
            }
            _ => self.reply("500 5.3.3 Unrecognized command"),
        }
        Ok(Flow::Continue)
    }

    async fn starttls(&mut self) -> io::Result<Flow> {
        if self.tls {
            self.reply("503 5.5.1 Bad sequence of commands");
            return Ok(Flow::Continue);
        }
        self.reply("220 2.0.0 SMTP server ready");
        self.flush().await?;
        // Anything pipelined after STARTTLS in plaintext is discarded (RFC 3207).
        self.buf.clear();
        self.pos = 0;
        let Io::Plain(tcp) = std::mem::replace(&mut self.io, Io::Gone) else {
            return Ok(Flow::Close);
        };
        match self.shared.acceptor.accept(tcp).await {
            Ok(tls) => self.io = Io::Tls(Box::new(tls)),
            Err(_) => return Ok(Flow::Close),
        }
        self.tls = true;
        self.hello = false;
        self.auth_user = None;
        self.reset_transaction();
        Ok(Flow::Continue)
    }

    fn auth_failed(&self) {
        self.shared.state.lock().unwrap().stats.auth_failed += 1;
        self.shared.changed.notify_waiters();
    }

    async fn auth(&mut self, arg: &str) -> io::Result<Flow> {
        if !self.tls {
            self.reply("504 5.7.4 Unrecognized authentication type");
            return Ok(Flow::Continue);
        }
        if !self.hello {
            self.reply("503 5.5.1 Send hello first");
            return Ok(Flow::Continue);
        }
        if self.auth_user.is_some() {
            self.reply("503 5.5.1 Already authenticated");
            return Ok(Flow::Continue);
        }
        if self.mail_from.is_some() {
            self.reply("503 5.5.1 Bad sequence of commands");
            return Ok(Flow::Continue);
        }
        let (mechanism, initial) = match arg.find(' ') {
            Some(i) => (&arg[..i], Some(arg[i + 1..].trim().to_string())),
            None => (arg, None),
        };
        match mechanism.to_ascii_uppercase().as_str() {
            "XOAUTH2" => self.auth_xoauth2(initial).await,
            "LOGIN" => {
                // Basic authentication is off at Microsoft; go through the motions.
                if initial.is_none() {
                    self.reply("334 VXNlcm5hbWU6");
                    if self.next_line().await?.is_none() {
                        return Ok(Flow::Close);
                    }
                }
                self.reply("334 UGFzc3dvcmQ6");
                if self.next_line().await?.is_none() {
                    return Ok(Flow::Close);
                }
                self.auth_failed();
                self.reply(BASIC_AUTH_DISABLED);
                Ok(Flow::Continue)
            }
            _ => {
                self.reply("504 5.7.4 Unrecognized authentication type");
                Ok(Flow::Continue)
            }
        }
    }

    async fn auth_xoauth2(&mut self, initial: Option<String>) -> io::Result<Flow> {
        let response = match initial {
            Some(r) if r != "=" => r,
            Some(_) => String::new(),
            None => {
                self.reply("334 ");
                match self.next_line().await? {
                    Some(line) => line,
                    None => return Ok(Flow::Close),
                }
            }
        };
        if response.trim() == "*" {
            self.auth_failed();
            self.reply("501 5.7.0 Authentication cancelled");
            return Ok(Flow::Continue);
        }
        let Some(decoded) = decode_b64(&response) else {
            self.auth_failed();
            self.reply("501 5.5.2 Cannot Decode response");
            return Ok(Flow::Continue);
        };
        let parsed = parse_xoauth2(&decoded);
        let (disabled, style) = {
            let cfg = self.shared.cfg.lock().unwrap();
            let disabled = parsed
                .as_ref()
                .is_some_and(|(user, _)| cfg.auth_disabled.contains(&user.to_ascii_lowercase()));
            (disabled, cfg.failure_style)
        };
        if disabled {
            self.auth_failed();
            self.reply(AUTH_DISABLED);
            return Ok(Flow::Continue);
        }
        let accepted = parsed.filter(|(user, token)| self.shared.tokens.check(user, token));
        if let Some((user, _)) = accepted {
            {
                let mut state = self.shared.state.lock().unwrap();
                state.stats.auth_ok += 1;
                let ids = state.authed.entry(user.to_ascii_lowercase()).or_default();
                ids.push(self.id);
                let now = ids.len();
                let max = &mut state.stats.max_active_per_mailbox;
                *max = (*max).max(now);
            }
            self.shared.changed.notify_waiters();
            self.auth_user = Some(user);
            self.reply(AUTH_OK);
            return Ok(Flow::Continue);
        }
        self.auth_failed();
        match style {
            FailureStyle::Microsoft => self.reply(AUTH_FAILED_MICROSOFT),
            FailureStyle::Challenge => {
                let challenge = format!("334 {}", STANDARD.encode(CHALLENGE_JSON));
                self.reply(&challenge);
                if self.next_line().await?.is_none() {
                    return Ok(Flow::Close);
                }
                self.reply(AUTH_FAILED_CHALLENGE);
            }
        }
        Ok(Flow::Continue)
    }

    fn mail(&mut self, arg: &str) {
        let Some(user) = self.auth_user.clone() else {
            self.reply(NOT_AUTHENTICATED);
            return;
        };
        if self.mail_from.is_some() {
            self.reply("503 5.5.1 Sender already specified");
            return;
        }
        let Some(from) = strip_prefix_ci(arg, "FROM:") else {
            self.reply("501 5.5.4 Invalid arguments");
            return;
        };
        let over_limit = {
            let limit = self.shared.cfg.lock().unwrap().max_sessions;
            let mut state = self.shared.state.lock().unwrap();
            let position = state
                .authed
                .get(&user.to_ascii_lowercase())
                .and_then(|ids| ids.iter().position(|&id| id == self.id))
                .unwrap_or(0);
            let over = limit.is_some_and(|n| position >= n);
            if over {
                state.stats.thread_limit_errors += 1;
            }
            over
        };
        if over_limit {
            self.shared.changed.notify_waiters();
            self.reply(THREAD_LIMIT);
            return;
        }
        self.mail_from = Some(from.trim().to_string());
        self.reply("250 2.1.0 Sender OK");
    }

    /// Checks the state for DATA/BDAT; on a problem answers and returns false.
    fn transaction_ready(&mut self) -> bool {
        if self.mail_from.is_none() {
            self.reply("503 5.5.1 Need mail command");
            false
        } else if self.rcpts.is_empty() {
            self.reply("503 5.5.1 Need rcpt command");
            false
        } else {
            true
        }
    }

    fn accept_message(&mut self, data: Vec<u8>, raw: Vec<u8>) {
        let n = self.shared.next_msg.fetch_add(1, Ordering::SeqCst);
        let message = ReceivedMessage {
            conn_id: self.id,
            auth_user: self.auth_user.clone().unwrap_or_default(),
            mail_from: self.mail_from.take().unwrap_or_default(),
            rcpt_to: std::mem::take(&mut self.rcpts),
            data,
            raw,
        };
        self.reset_transaction();
        {
            let mut state = self.shared.state.lock().unwrap();
            state.stats.transactions_ok += 1;
            state.messages.push(message);
        }
        self.shared.changed.notify_waiters();
        let text = format!(
            "250 2.0.0 OK <MOCK{:04}{:06}.{}@{HOSTNAME}> [Hostname=mock]",
            self.id,
            n,
            super::tokens::random_text(12)
        );
        self.reply(&text);
    }

    async fn data(&mut self) -> io::Result<Flow> {
        if self.bdat.is_some() {
            self.reply("503 5.5.1 Bad sequence of commands");
            return Ok(Flow::Continue);
        }
        if !self.transaction_ready() {
            return Ok(Flow::Continue);
        }
        self.reply("354 Start mail input; end with <CRLF>.<CRLF>");
        if self.shared.drop_next_data.swap(false, Ordering::SeqCst) {
            if self.pos == self.buf.len() && self.fill().await? == 0 {
                return Ok(Flow::Close);
            }
            self.shared.state.lock().unwrap().stats.dropped_data += 1;
            self.shared.changed.notify_waiters();
            return Ok(Flow::Drop);
        }
        match self.read_data().await? {
            Some((data, raw)) => {
                self.accept_message(data, raw);
                Ok(Flow::Continue)
            }
            None => Ok(Flow::Close),
        }
    }

    /// Reads dot-stuffed content up to and including the `.<CR><LF>` line;
    /// returns (unstuffed, as on the wire), both without that line, or `None` at EOF.
    async fn read_data(&mut self) -> io::Result<Option<(Vec<u8>, Vec<u8>)>> {
        let mut data = Vec::new();
        let mut raw = Vec::new();
        let mut line_start = true;
        loop {
            while self.pos < self.buf.len() {
                let avail = &self.buf[self.pos..];
                if line_start && avail[0] == b'.' {
                    match (avail.get(1), avail.get(2)) {
                        (None, _) | (Some(b'\r'), None) => break, // undecided: need more
                        (Some(b'\r'), Some(b'\n')) => {
                            self.pos += 3;
                            return Ok(Some((data, raw)));
                        }
                        _ => {
                            // A stuffed dot: on the wire, not in the content.
                            raw.push(b'.');
                            self.pos += 1;
                            line_start = false;
                            continue;
                        }
                    }
                }
                let (n, found) = match find_lf(avail) {
                    Some(i) => (i + 1, true),
                    None => (avail.len(), false),
                };
                raw.extend_from_slice(&avail[..n]);
                data.extend_from_slice(&avail[..n]);
                self.pos += n;
                line_start = found;
            }
            if self.fill().await? == 0 {
                return Ok(None);
            }
        }
    }

    async fn bdat(&mut self, arg: &str) -> io::Result<Flow> {
        let mut parts = arg.split_ascii_whitespace();
        let size = parts.next().and_then(|s| s.parse::<usize>().ok());
        let last = match parts.next() {
            None => false,
            Some(p) if p.eq_ignore_ascii_case("LAST") => true,
            Some(_) => {
                self.reply("501 5.5.4 Invalid arguments");
                return Ok(Flow::Continue);
            }
        };
        let Some(size) = size else {
            self.reply("501 5.5.4 Invalid arguments");
            return Ok(Flow::Continue);
        };
        // The chunk follows the command at once, whatever we answer: read it first.
        let mut chunk = Vec::with_capacity(size.min(1 << 20));
        while chunk.len() < size {
            if self.pos == self.buf.len() && self.fill().await? == 0 {
                return Ok(Flow::Close);
            }
            let take = (size - chunk.len()).min(self.buf.len() - self.pos);
            chunk.extend_from_slice(&self.buf[self.pos..self.pos + take]);
            self.pos += take;
        }
        if !self.transaction_ready() {
            return Ok(Flow::Continue);
        }
        let mut content = self.bdat.take().unwrap_or_default();
        content.extend_from_slice(&chunk);
        if last {
            self.accept_message(content.clone(), content);
        } else {
            self.bdat = Some(content);
            let text = format!("250 2.0.0 {size} octets received");
            self.reply(&text);
        }
        Ok(Flow::Continue)
    }
}
