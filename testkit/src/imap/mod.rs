//! A mock IMAP server shaped like outlook.office365.com:993: implicit TLS, only
//! SASL XOAUTH2 (checked against the shared [`TokenBook`]), Outlook's greeting,
//! capability lists and failure texts, and enough IMAP4rev1 after authentication
//! for imapflow's connect sequence and everyday use (SELECT, FETCH, APPEND, IDLE…).
//!
//! Each authenticated mailbox (the `user=` of XOAUTH2, compared without case) has
//! its own store with the folders `INBOX` and `Sent`. Sequence numbers are the
//! current positions in the folder (no per-session snapshot): good enough for tests
//! that do not expunge concurrently.
//!
//! The session is a small state machine over a line/literal framed reader:
//! a command is one line, plus, for every line ending in `{n}`/`{n+}`, n literal
//! bytes and the rest of the command on the next line.
//!
//! This module holds the server (listener, faults, counters, the test-facing
//! [`MockImapUpstream`]); `session` reads commands, dispatches them and does
//! AUTHENTICATE and IDLE; `commands`, `fetch` and `search` answer the rest;
//! `mailbox` is the message store and `parse` the command syntax.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, BufReader};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use crate::pki::TestPki;
use crate::tokens::TokenBook;

mod commands;
mod fetch;
mod mailbox;
mod parse;
mod search;
mod session;

use mailbox::{Account, Folder};
use session::Session;

/// How a rejected XOAUTH2 attempt is answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailureStyle {
    /// `<tag> NO AUTHENTICATE failed.` at once (Exchange Online).
    Microsoft,
    /// `+ <base64 JSON>`, wait for the client's (empty) line, then
    /// `<tag> NO [AUTHENTICATIONFAILED] Authentication failed.` (Dovecot/Google).
    Challenge,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UpstreamStats {
    /// TCP connections accepted (not counting those dropped while stopped).
    pub connections: usize,
    pub auth_ok: usize,
    /// Failed AUTHENTICATE/LOGIN attempts, whatever the mechanism.
    pub auth_failed: usize,
    /// Connections open right now.
    pub active: usize,
    /// TLS handshakes that resumed an earlier session.
    pub tls_resumed: usize,
    /// The most connections that were open at once.
    pub most_active: usize,
    /// CAPABILITY commands before authentication.
    pub capabilities_before_login: usize,
}

pub const GREETING: &str = "* OK The Microsoft Exchange IMAP4 service is ready. [TQBOADIAUABSADAAMQBDAEEAMAAwADEAMgAuAG4AYQBtAHAAcgBkADAAMQAuAHAAcgBvAGQALgBvAHUAdABsAG8AbwBrAC4AYwBvAG0A]";
pub const PRE_AUTH_CAPABILITIES: &str = "IMAP4 IMAP4rev1 AUTH=XOAUTH2 SASL-IR UIDPLUS MOVE ID UNSELECT CHILDREN IDLE NAMESPACE LITERAL+ LOGINDISABLED";
/// Outlook's post-authentication list (it still names AUTH=* and SASL-IR), plus
/// `ENABLE UTF8=ACCEPT` so that imapflow's ENABLE step is exercised.
pub const POST_AUTH_CAPABILITIES: &str = "IMAP4 IMAP4rev1 AUTH=PLAIN AUTH=XOAUTH2 SASL-IR UIDPLUS MOVE ID UNSELECT CHILDREN IDLE NAMESPACE LITERAL+ ENABLE UTF8=ACCEPT";
const FLAGS: &str = r"\Seen \Answered \Flagged \Deleted \Draft $MDNSent";
const MAX_LINE: usize = 64 * 1024;
const MAX_LITERAL: usize = 512 * 1024 * 1024;
const LARGE_WRITE: usize = 64 * 1024;

struct Config {
    failure_style: FailureStyle,
    post_auth_capabilities: String,
    not_connected: bool,
    hang: bool,
    expire_sessions: bool,
    small_records: bool,
}

struct Shared {
    tokens: TokenBook,
    acceptor: TlsAcceptor,
    config: Mutex<Config>,
    store: Mutex<HashMap<String, Account>>,
    connections: AtomicUsize,
    auth_ok: AtomicUsize,
    auth_failed: AtomicUsize,
    active: AtomicUsize,
    most_active: AtomicUsize,
    tls_resumed: AtomicUsize,
    capabilities_before_login: AtomicUsize,
    commands_seen: Mutex<Vec<String>>,
    tokens_seen: Mutex<Vec<String>>,
    changes: watch::Sender<u64>,
    kick: watch::Sender<u64>,
    /// What open connections are told to do now, outside any command.
    aside: watch::Sender<(u64, Aside)>,
}

/// Something the open connections do between commands, on the test's word.
#[derive(Clone, Debug, Default)]
pub(crate) enum Aside {
    #[default]
    Nothing,
    /// Send this untagged line.
    Untagged(String),
    /// Say `* BYE …` and close.
    Bye,
    /// Stop answering, but keep the connection open.
    Silence,
}

impl Shared {
    fn with_folder<R>(
        &self,
        user: &str,
        folder: &str,
        f: impl FnOnce(&mut Folder) -> R,
    ) -> Option<R> {
        let mut store = self.store.lock().unwrap();
        let account = store
            .entry(user.to_ascii_lowercase())
            .or_insert_with(Account::new);
        account.folder(folder).map(f)
    }

    fn changed(&self) {
        self.changes.send_modify(|v| *v += 1);
    }
}

pub struct MockImapUpstream {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stopped: watch::Sender<bool>,
    /// A listener bound by `set_stopped(false)`, for the accept task to pick up.
    rebound: Arc<Mutex<Option<TcpListener>>>,
    shutdown: watch::Sender<bool>,
}

impl Drop for MockImapUpstream {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
    }
}

fn bind_reusable(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

pub async fn start(pki: &TestPki, tokens: TokenBook) -> MockImapUpstream {
    MockImapUpstream::start(pki, tokens).await
}

impl MockImapUpstream {
    pub async fn start(pki: &TestPki, tokens: TokenBook) -> MockImapUpstream {
        let listener =
            bind_reusable("127.0.0.1:0".parse().unwrap()).expect("bind mock IMAP upstream");
        let addr = listener.local_addr().unwrap();
        let (changes, _) = watch::channel(0u64);
        let shared = Arc::new(Shared {
            tokens,
            acceptor: pki.acceptor(),
            config: Mutex::new(Config {
                failure_style: FailureStyle::Microsoft,
                post_auth_capabilities: POST_AUTH_CAPABILITIES.to_string(),
                not_connected: false,
                hang: false,
                expire_sessions: false,
                small_records: false,
            }),
            store: Mutex::new(HashMap::new()),
            connections: AtomicUsize::new(0),
            auth_ok: AtomicUsize::new(0),
            auth_failed: AtomicUsize::new(0),
            active: AtomicUsize::new(0),
            most_active: AtomicUsize::new(0),
            tls_resumed: AtomicUsize::new(0),
            capabilities_before_login: AtomicUsize::new(0),
            commands_seen: Mutex::new(Vec::new()),
            tokens_seen: Mutex::new(Vec::new()),
            changes,
            kick: watch::channel(0u64).0,
            aside: watch::channel((0u64, Aside::Nothing)).0,
        });
        let (stopped, stopped_rx) = watch::channel(false);
        let (shutdown, shutdown_rx) = watch::channel(false);
        let rebound = Arc::new(Mutex::new(None));
        tokio::spawn(accept_loop(
            shared.clone(),
            listener,
            stopped_rx,
            rebound.clone(),
            shutdown_rx,
        ));
        MockImapUpstream {
            addr,
            shared,
            stopped,
            rebound,
            shutdown,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Waits until `pred(stats)` holds and returns those stats. Panics after `timeout`.
    pub async fn wait_for_stats(
        &self,
        pred: impl Fn(&UpstreamStats) -> bool,
        timeout: Duration,
    ) -> UpstreamStats {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let stats = self.stats();
            if pred(&stats) {
                return stats;
            }
            if tokio::time::Instant::now() >= deadline {
                panic!(
                    "mock IMAP upstream: condition not reached in {timeout:?}; stats: {stats:?}"
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    pub fn set_failure_style(&self, style: FailureStyle) {
        self.shared.config.lock().unwrap().failure_style = style;
    }

    /// The list `CAPABILITY` answers after login ([`POST_AUTH_CAPABILITIES`]
    /// by default), as a server that offers more after login does.
    pub fn set_post_auth_capabilities(&self, capabilities: &str) {
        self.shared.config.lock().unwrap().post_auth_capabilities = capabilities.to_string();
    }

    /// Sessions that authenticate while this is true answer every command but
    /// LOGOUT with `BAD User is authenticated but not connected.`
    pub fn set_not_connected(&self, on: bool) {
        self.shared.config.lock().unwrap().not_connected = on;
    }

    /// New connections complete TLS and then hear nothing (no greeting).
    /// Like Exchange, end an authenticated session whose access token has expired or
    /// been revoked: the next command (or an IDLE, within 250 ms) gets
    /// `* BYE Session invalidated - AccessTokenExpired` and the connection closes.
    /// Off by default.
    pub fn set_expire_sessions(&self, on: bool) {
        self.shared.config.lock().unwrap().expire_sessions = on;
    }

    /// Large literals go out as Dovecot (OpenSSL) sends them: TLS records of
    /// 8 KiB, each written and flushed on its own, with a pause of a
    /// millisecond every 32 records, so that the proxy outruns the server
    /// and finds one record or two at a time. Off by default.
    pub fn set_small_records(&self, on: bool) {
        self.shared.config.lock().unwrap().small_records = on;
    }

    /// Drops every open connection at once, without a word (a network failure).
    pub fn kick_all(&self) {
        self.shared.kick.send_modify(|v| *v += 1);
    }

    /// Every open connection sends `line` (untagged, e.g. `* OK [ALERT] …`)
    /// as soon as it is not in the middle of a command.
    pub fn untagged_to_open_sessions(&self, line: &str) {
        self.aside(Aside::Untagged(line.to_string()));
    }

    /// Every open connection says `* BYE` and closes, as a server going down does.
    pub fn bye_open_sessions(&self) {
        self.aside(Aside::Bye);
    }

    /// Every open connection stops answering and stays open (a server or
    /// network that hangs); new connections are served as usual.
    pub fn silence_open_sessions(&self) {
        self.aside(Aside::Silence);
    }

    fn aside(&self, aside: Aside) {
        self.shared.aside.send_modify(|(n, a)| {
            *n += 1;
            *a = aside;
        });
    }

    pub fn set_hang(&self, on: bool) {
        self.shared.config.lock().unwrap().hang = on;
    }

    /// `true`: close the listener (new connections are refused; any that slip in are
    /// dropped at once). `false`: listen again on the same port, bound before this
    /// returns. Must be called inside the Tokio runtime.
    pub fn set_stopped(&self, stopped: bool) {
        if !stopped && *self.stopped.borrow() {
            let mut listener = None;
            for _ in 0..100 {
                match bind_reusable(self.addr) {
                    Ok(l) => {
                        listener = Some(l);
                        break;
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
            let listener = listener.expect("rebind the mock IMAP upstream's port");
            *self.rebound.lock().unwrap() = Some(listener);
        }
        let _ = self.stopped.send(stopped);
    }

    /// Adds a message to the INBOX of `mailbox`; returns its UID.
    pub fn add_message(&self, mailbox: &str, bytes: Vec<u8>) -> u32 {
        let uid = self
            .shared
            .with_folder(mailbox, "INBOX", |f| f.add(bytes, Vec::new(), None))
            .unwrap();
        self.shared.changed();
        uid
    }

    /// The INBOX of `mailbox`, in order (appended messages included).
    pub fn messages(&self, mailbox: &str) -> Vec<Vec<u8>> {
        self.folder_messages(mailbox, "INBOX")
    }

    /// The messages of any folder (`INBOX`, `Sent`) of `mailbox`.
    pub fn folder_messages(&self, mailbox: &str, folder: &str) -> Vec<Vec<u8>> {
        self.shared
            .with_folder(mailbox, folder, |f| {
                f.msgs.iter().map(|m| m.data.as_ref().clone()).collect()
            })
            .unwrap_or_default()
    }

    /// The flags of the INBOX messages of `mailbox`, by UID.
    pub fn flags(&self, mailbox: &str) -> Vec<(u32, Vec<String>)> {
        self.shared
            .with_folder(mailbox, "INBOX", |f| {
                f.msgs.iter().map(|m| (m.uid, m.flags.clone())).collect()
            })
            .unwrap_or_default()
    }

    pub fn stats(&self) -> UpstreamStats {
        UpstreamStats {
            connections: self.shared.connections.load(Ordering::SeqCst),
            auth_ok: self.shared.auth_ok.load(Ordering::SeqCst),
            auth_failed: self.shared.auth_failed.load(Ordering::SeqCst),
            active: self.shared.active.load(Ordering::SeqCst),
            tls_resumed: self.shared.tls_resumed.load(Ordering::SeqCst),
            most_active: self.shared.most_active.load(Ordering::SeqCst),
            capabilities_before_login: self.shared.capabilities_before_login.load(Ordering::SeqCst),
        }
    }

    /// Command names (upper case, e.g. `UID FETCH`) sent by authenticated sessions.
    pub fn commands_seen(&self) -> Vec<String> {
        self.shared.commands_seen.lock().unwrap().clone()
    }

    /// The bearer tokens of every XOAUTH2 attempt, accepted or not.
    pub fn tokens_seen(&self) -> Vec<String> {
        self.shared.tokens_seen.lock().unwrap().clone()
    }
}

async fn accept_loop(
    shared: Arc<Shared>,
    listener: TcpListener,
    mut stopped: watch::Receiver<bool>,
    rebound: Arc<Mutex<Option<TcpListener>>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut listener = Some(listener);
    loop {
        if *stopped.borrow_and_update() {
            listener = None;
        } else if listener.is_none() {
            listener = rebound.lock().unwrap().take();
        }
        let Some(active_listener) = listener.as_ref() else {
            tokio::select! {
                _ = shutdown.wait_for(|s| *s) => return,
                r = stopped.changed() => if r.is_err() { return },
            }
            continue;
        };
        let conn_shutdown = shutdown.clone();
        tokio::select! {
            _ = shutdown.wait_for(|s| *s) => return,
            r = stopped.changed() => if r.is_err() { return },
            accepted = active_listener.accept() => {
                let Ok((tcp, _)) = accepted else { continue };
                if *stopped.borrow() {
                    drop(tcp);
                    continue;
                }
                shared.connections.fetch_add(1, Ordering::SeqCst);
                let now = shared.active.fetch_add(1, Ordering::SeqCst) + 1;
                shared.most_active.fetch_max(now, Ordering::SeqCst);
                let shared = shared.clone();
                tokio::spawn(async move {
                    let active = ActiveGuard(shared.clone());
                    run_connection(shared, tcp, conn_shutdown, active).await;
                });
            }
        }
    }
}

struct ActiveGuard(Arc<Shared>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn run_connection(
    shared: Arc<Shared>,
    tcp: TcpStream,
    mut shutdown: watch::Receiver<bool>,
    active: ActiveGuard,
) {
    let mut kick = shared.kick.subscribe();
    kick.borrow_and_update();
    let _ = tcp.set_nodelay(true);
    let tls = tokio::select! {
        _ = shutdown.wait_for(|s| *s) => return,
        r = tokio::time::timeout(Duration::from_secs(10), shared.acceptor.accept(tcp)) => match r {
            Ok(Ok(tls)) => tls,
            _ => return,
        },
    };
    if tls.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed) {
        shared.tls_resumed.fetch_add(1, Ordering::SeqCst);
    }
    let hang = shared.config.lock().unwrap().hang;
    let mut session = Session {
        io: BufReader::with_capacity(64 * 1024, tls),
        line: Vec::new(),
        out: Vec::with_capacity(8 * 1024),
        changes: shared.changes.subscribe(),
        aside: {
            let mut aside = shared.aside.subscribe();
            aside.borrow_and_update();
            aside
        },
        shared,
        user: None,
        not_connected: false,
        token: None,
        selected: None,
    };
    if hang {
        // Say nothing; swallow whatever comes until the peer or the mock goes away.
        let mut sink = vec![0u8; 16 * 1024];
        loop {
            tokio::select! {
                _ = shutdown.wait_for(|s| *s) => return,
                _ = kick.changed() => return,
                r = session.io.read(&mut sink) => match r {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                },
            }
        }
    }
    tokio::select! {
        _ = shutdown.wait_for(|s| *s) => {}
        _ = kick.changed() => {}
        _ = session.run() => {}
    }
    // Like a server that counts sessions, not sockets: the session is no
    // longer counted by the time its close reaches the client, which may
    // then count on its place under a per-mailbox limit being free.
    drop(active);
    drop(session);
}
