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
//! - **Shared mailboxes** (Exchange's rule, from the [`TokenBook`]): XOAUTH2 logs in
//!   only as the token's own user, so a delegate's token with a shared mailbox as the
//!   user gets `535 5.7.3`; `MAIL FROM` a shared mailbox the logged-in user has no
//!   Send As on gets `550 5.7.60`. Addresses the book does not know as shared are not
//!   policed.
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
//!
//! This module holds the server and the test-facing [`MockSmtpUpstream`];
//! `session` is one connection's reader and command loop, `auth` its AUTH and
//! `transaction` MAIL, RCPT, DATA and BDAT.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::future::poll_fn;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Handle;
use tokio::sync::Notify;
use tokio::task::AbortHandle;
use tokio_rustls::TlsAcceptor;

use crate::pki::TestPki;
use crate::tokens::TokenBook;

mod auth;
mod session;
mod transaction;

use session::{Flow, Io, Session};

/// The host name the mock announces.
pub const HOSTNAME: &str = "mock.outlook.office365.com";

/// Longest command line accepted, without its CRLF (XOAUTH2 lines are several KB).
pub const MAX_LINE: usize = 16 * 1024;

const GREETING: &str = "220 mock.outlook.office365.com Microsoft ESMTP MAIL Service ready";
const THREAD_LIMIT: &str =
    "432 4.3.2 STOREDRV.ClientSubmit; sender thread limit exceeded [Hostname=mock]";
const NOT_AUTHENTICATED: &str = "530 5.7.57 Client not authenticated to send mail.";
const SEND_AS_DENIED: &str =
    "550 5.7.60 SMTP; Client does not have permissions to send as this sender";
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
    stall_next_data: AtomicBool,
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
        stall_next_data: AtomicBool::new(false),
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

    /// Arms a one-shot fault: the next DATA (on any connection) gets its
    /// 354, then the server never reads again and never answers (its TCP
    /// window fills; the connection stays open until the mock is dropped).
    pub fn stall_during_next_data(&self) {
        self.shared.stall_next_data.store(true, Ordering::SeqCst);
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
