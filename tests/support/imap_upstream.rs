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

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

use super::pki::TestPki;
use super::tokens::TokenBook;

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

#[derive(Clone, Debug)]
struct Msg {
    uid: u32,
    flags: Vec<String>,
    internal_date: String,
    data: Arc<Vec<u8>>,
}

struct Folder {
    name: &'static str,
    special_use: &'static str,
    uid_validity: u32,
    uid_next: u32,
    msgs: Vec<Msg>,
}

impl Folder {
    fn new(name: &'static str, special_use: &'static str, uid_validity: u32) -> Folder {
        Folder {
            name,
            special_use,
            uid_validity,
            uid_next: 1,
            msgs: Vec::new(),
        }
    }

    fn add(&mut self, data: Vec<u8>, flags: Vec<String>, internal_date: Option<String>) -> u32 {
        let uid = self.uid_next;
        self.uid_next += 1;
        self.msgs.push(Msg {
            uid,
            flags,
            internal_date: internal_date.unwrap_or_else(now_internal_date),
            data: Arc::new(data),
        });
        uid
    }

    fn unseen(&self) -> usize {
        self.msgs
            .iter()
            .filter(|m| !has_flag(&m.flags, r"\Seen"))
            .count()
    }
}

struct Account {
    folders: Vec<Folder>,
}

impl Account {
    fn new() -> Account {
        Account {
            folders: vec![
                Folder::new("INBOX", "", 14),
                Folder::new("Sent", r"\Sent", 15),
            ],
        }
    }

    fn folder(&mut self, name: &str) -> Option<&mut Folder> {
        self.folders
            .iter_mut()
            .find(|f| folder_matches(f.name, name))
    }
}

fn folder_matches(folder: &str, name: &str) -> bool {
    if folder == "INBOX" {
        name.eq_ignore_ascii_case("INBOX")
    } else {
        folder == name
    }
}

struct Config {
    failure_style: FailureStyle,
    not_connected: bool,
    hang: bool,
    expire_sessions: bool,
    extra_capabilities: Vec<String>,
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
    commands_seen: Mutex<Vec<String>>,
    tokens_seen: Mutex<Vec<String>>,
    changes: watch::Sender<u64>,
    kick: watch::Sender<u64>,
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
                not_connected: false,
                hang: false,
                expire_sessions: false,
                extra_capabilities: Vec::new(),
            }),
            store: Mutex::new(HashMap::new()),
            connections: AtomicUsize::new(0),
            auth_ok: AtomicUsize::new(0),
            auth_failed: AtomicUsize::new(0),
            active: AtomicUsize::new(0),
            commands_seen: Mutex::new(Vec::new()),
            tokens_seen: Mutex::new(Vec::new()),
            changes,
            kick: watch::channel(0u64).0,
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

    /// `127.0.0.1:<port>`, as a config's `imap_server` wants it.
    pub fn host_port(&self) -> String {
        self.addr.to_string()
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

    /// Drops every open connection at once, without a word (a network failure).
    pub fn kick_all(&self) {
        self.shared.kick.send_modify(|v| *v += 1);
    }

    pub fn set_hang(&self, on: bool) {
        self.shared.config.lock().unwrap().hang = on;
    }

    /// Extra capabilities appended to the post-auth CAPABILITY list (e.g. `IMAP4rev2`,
    /// `COMPRESS=DEFLATE`, to check that the proxy filters them). Advertised only.
    pub fn set_extra_capabilities(&self, caps: &[&str]) {
        self.shared.config.lock().unwrap().extra_capabilities =
            caps.iter().map(|c| c.to_string()).collect();
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
                shared.active.fetch_add(1, Ordering::SeqCst);
                let shared = shared.clone();
                tokio::spawn(async move {
                    let _guard = ActiveGuard(shared.clone());
                    run_connection(shared, tcp, conn_shutdown).await;
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

async fn run_connection(shared: Arc<Shared>, tcp: TcpStream, mut shutdown: watch::Receiver<bool>) {
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
    let hang = shared.config.lock().unwrap().hang;
    let mut session = Session {
        io: BufReader::with_capacity(64 * 1024, tls),
        line: Vec::new(),
        out: Vec::with_capacity(8 * 1024),
        changes: shared.changes.subscribe(),
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
}

// ---------------------------------------------------------------------------
// Command tokens

#[derive(Clone, Debug)]
enum Tok {
    Atom(String),
    Quoted(String),
    Literal(usize),
    List(Vec<Tok>),
}

struct Command {
    tag: String,
    name: String,
    args: Vec<Tok>,
    literals: Vec<Vec<u8>>,
}

impl Command {
    fn text(&self, tok: &Tok) -> Option<String> {
        match tok {
            Tok::Atom(s) | Tok::Quoted(s) => Some(s.clone()),
            Tok::Literal(i) => Some(String::from_utf8_lossy(&self.literals[*i]).to_string()),
            Tok::List(_) => None,
        }
    }

    fn arg(&self, i: usize) -> Option<String> {
        self.args.get(i).and_then(|t| self.text(t))
    }
}

/// Literal placeholders in the command text are `\0<index>\0`.
fn tokenize(s: &str) -> Option<Vec<Tok>> {
    let chars: Vec<char> = s.chars().collect();
    let mut pos = 0;
    let toks = parse_tokens(&chars, &mut pos, false)?;
    Some(toks)
}

fn parse_tokens(c: &[char], pos: &mut usize, in_list: bool) -> Option<Vec<Tok>> {
    let mut out = Vec::new();
    loop {
        while *pos < c.len() && c[*pos] == ' ' {
            *pos += 1;
        }
        if *pos >= c.len() {
            return if in_list { None } else { Some(out) };
        }
        match c[*pos] {
            ')' => {
                if in_list {
                    *pos += 1;
                    return Some(out);
                }
                return None;
            }
            '(' => {
                *pos += 1;
                out.push(Tok::List(parse_tokens(c, pos, true)?));
            }
            '"' => {
                *pos += 1;
                let mut s = String::new();
                loop {
                    let ch = *c.get(*pos)?;
                    *pos += 1;
                    match ch {
                        '\\' => {
                            s.push(*c.get(*pos)?);
                            *pos += 1;
                        }
                        '"' => break,
                        other => s.push(other),
                    }
                }
                out.push(Tok::Quoted(s));
            }
            '\0' => {
                *pos += 1;
                let mut n = String::new();
                while *c.get(*pos)? != '\0' {
                    n.push(c[*pos]);
                    *pos += 1;
                }
                *pos += 1;
                out.push(Tok::Literal(n.parse().ok()?));
            }
            _ => {
                let mut s = String::new();
                while *pos < c.len() && !matches!(c[*pos], ' ' | '(' | ')' | '"' | '\0') {
                    if c[*pos] == '[' {
                        // A section: everything up to the matching bracket.
                        let mut depth = 0;
                        while *pos < c.len() {
                            let ch = c[*pos];
                            s.push(ch);
                            *pos += 1;
                            if ch == '[' {
                                depth += 1;
                            } else if ch == ']' {
                                depth -= 1;
                                if depth == 0 {
                                    break;
                                }
                            }
                        }
                        continue;
                    }
                    s.push(c[*pos]);
                    *pos += 1;
                }
                out.push(Tok::Atom(s));
            }
        }
    }
}

/// `prefix{n}` / `prefix{n+}` / `prefix~{n}` at the end of a line.
fn trailing_literal(line: &str) -> Option<(&str, usize, bool)> {
    let body = line.strip_suffix('}')?;
    let open = body.rfind('{')?;
    let mut digits = &body[open + 1..];
    let plus = digits.ends_with('+');
    if plus {
        digits = &digits[..digits.len() - 1];
    }
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n = digits.parse().ok()?;
    let mut prefix = &line[..open];
    if let Some(p) = prefix.strip_suffix('~') {
        prefix = p;
    }
    Some((prefix, n, plus))
}

// ---------------------------------------------------------------------------
// The session

struct Selected {
    folder: String,
    read_only: bool,
    known_exists: usize,
}

struct Session {
    io: BufReader<TlsStream<TcpStream>>,
    line: Vec<u8>,
    out: Vec<u8>,
    shared: Arc<Shared>,
    changes: watch::Receiver<u64>,
    user: Option<String>,
    not_connected: bool,
    /// The bearer token this session authenticated with.
    token: Option<String>,
    selected: Option<Selected>,
}

type Io<T> = std::io::Result<T>;

fn io_err(msg: &str) -> std::io::Error {
    std::io::Error::other(msg.to_string())
}

impl Session {
    async fn run(&mut self) {
        let _ = self.run_inner().await;
        let _ = self.io.get_mut().shutdown().await;
    }

    async fn run_inner(&mut self) -> Io<()> {
        self.put(GREETING);
        self.flush().await?;
        loop {
            let Some(cmd) = self.read_command().await? else {
                return Ok(());
            };
            if self.token_expired() {
                self.put("* BYE Session invalidated - AccessTokenExpired");
                self.flush().await?;
                return Ok(());
            }
            let keep_going = self.dispatch(cmd).await?;
            self.flush().await?;
            if !keep_going {
                return Ok(());
            }
        }
    }

    // --- output

    fn put(&mut self, line: &str) {
        self.out.extend_from_slice(line.as_bytes());
        self.out.extend_from_slice(b"\r\n");
    }

    fn tagged(&mut self, tag: &str, rest: &str) {
        self.put(&format!("{tag} {rest}"));
    }

    async fn flush(&mut self) -> Io<()> {
        if !self.out.is_empty() {
            let out = std::mem::take(&mut self.out);
            self.io.get_mut().write_all(&out).await?;
            self.out = out;
            self.out.clear();
        }
        self.io.get_mut().flush().await
    }

    /// `{n}\r\n` and the bytes; large payloads go out in one write of their own.
    async fn literal(&mut self, data: &[u8]) -> Io<()> {
        self.out
            .extend_from_slice(format!("{{{}}}\r\n", data.len()).as_bytes());
        if data.len() >= LARGE_WRITE {
            let out = std::mem::take(&mut self.out);
            self.io.get_mut().write_all(&out).await?;
            self.out = out;
            self.out.clear();
            self.io.get_mut().write_all(data).await?;
        } else {
            self.out.extend_from_slice(data);
        }
        Ok(())
    }

    // --- input

    /// One line without its CRLF; `None` at end of stream. Cancel-safe: a partial
    /// line stays in `self.line`.
    async fn read_line(&mut self) -> Io<Option<Vec<u8>>> {
        loop {
            let buf = self.io.fill_buf().await?;
            if buf.is_empty() {
                return Ok(None);
            }
            if let Some(pos) = buf.iter().position(|&b| b == b'\n') {
                self.line.extend_from_slice(&buf[..pos]);
                self.io.consume(pos + 1);
                let mut line = std::mem::take(&mut self.line);
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                return Ok(Some(line));
            }
            let n = buf.len();
            self.line.extend_from_slice(buf);
            self.io.consume(n);
            if self.line.len() > MAX_LINE {
                self.put("* BAD Line is too long.");
                self.flush().await?;
                return Err(io_err("line too long"));
            }
        }
    }

    async fn read_command(&mut self) -> Io<Option<Command>> {
        let mut text = String::new();
        let mut literals = Vec::new();
        loop {
            let Some(line) = self.read_line().await? else {
                return Ok(None);
            };
            let line = String::from_utf8_lossy(&line).to_string();
            if let Some((prefix, n, plus)) = trailing_literal(&line) {
                if n > MAX_LITERAL {
                    self.put("* BAD Literal is too large.");
                    self.flush().await?;
                    return Err(io_err("literal too large"));
                }
                if !plus {
                    self.put("+ Ready for additional command text.");
                    self.flush().await?;
                }
                let mut data = vec![0u8; n];
                self.io.read_exact(&mut data).await?;
                text.push_str(prefix);
                text.push_str(&format!("\0{}\0", literals.len()));
                literals.push(data);
                continue;
            }
            text.push_str(&line);
            if text.trim().is_empty() && literals.is_empty() {
                text.clear();
                continue;
            }
            break;
        }
        let toks = tokenize(&text);
        let Some(mut toks) = toks else {
            let tag = text.split(' ').next().unwrap_or("*").to_string();
            return Ok(Some(Command {
                tag,
                name: "\0INVALID".to_string(),
                args: Vec::new(),
                literals,
            }));
        };
        let mut cmd = Command {
            tag: String::new(),
            name: String::new(),
            args: Vec::new(),
            literals,
        };
        if toks.is_empty() {
            return Ok(Some(cmd));
        }
        cmd.tag = cmd.text(&toks.remove(0)).unwrap_or_else(|| "*".into());
        if toks.is_empty() {
            cmd.name = "\0INVALID".to_string();
            return Ok(Some(cmd));
        }
        let mut name = cmd
            .text(&toks.remove(0))
            .unwrap_or_default()
            .to_ascii_uppercase();
        if name == "UID" && !toks.is_empty() {
            let sub = cmd
                .text(&toks.remove(0))
                .unwrap_or_default()
                .to_ascii_uppercase();
            name = format!("UID {sub}");
        }
        cmd.name = name;
        cmd.args = toks;
        Ok(Some(cmd))
    }

    // --- dispatch

    async fn dispatch(&mut self, cmd: Command) -> Io<bool> {
        let tag = cmd.tag.clone();
        if cmd.name == "\0INVALID" || tag.is_empty() {
            self.tagged(
                if tag.is_empty() { "*" } else { &tag },
                "BAD Command Error. 10",
            );
            return Ok(true);
        }
        let authed = self.user.is_some();
        if authed {
            self.shared
                .commands_seen
                .lock()
                .unwrap()
                .push(cmd.name.clone());
            if self.not_connected && cmd.name != "LOGOUT" {
                self.tagged(&tag, "BAD User is authenticated but not connected.");
                return Ok(true);
            }
        }
        match cmd.name.as_str() {
            "CAPABILITY" => {
                let caps = if authed {
                    let extra = self
                        .shared
                        .config
                        .lock()
                        .unwrap()
                        .extra_capabilities
                        .join(" ");
                    format!("{POST_AUTH_CAPABILITIES} {extra}")
                        .trim()
                        .to_string()
                } else {
                    PRE_AUTH_CAPABILITIES.to_string()
                };
                self.put(&format!("* CAPABILITY {caps}"));
                self.tagged(&tag, "OK CAPABILITY completed.");
            }
            "NOOP" | "CHECK" => {
                self.report_exists();
                self.tagged(&tag, &format!("OK {} completed.", cmd.name));
            }
            "LOGOUT" => {
                self.put("* BYE Microsoft Exchange Server IMAP4 server signing off.");
                self.tagged(&tag, "OK LOGOUT completed.");
                return Ok(false);
            }
            "ID" => {
                self.put(
                    r#"* ID ("name" "Microsoft.Exchange.Imap4.Imap4Server" "version" "15.20")"#,
                );
                self.tagged(&tag, "OK ID completed.");
            }
            "STARTTLS" => self.tagged(&tag, "BAD Command received in Invalid state."),
            "LOGIN" if !authed => {
                self.shared.auth_failed.fetch_add(1, Ordering::SeqCst);
                self.tagged(&tag, "NO LOGIN failed.");
            }
            "AUTHENTICATE" if !authed => self.authenticate(&cmd).await?,
            _ if !authed => self.tagged(&tag, "BAD Command received in Invalid state."),
            "LOGIN" | "AUTHENTICATE" => self.tagged(&tag, "BAD Command received in Invalid state."),
            "NAMESPACE" => {
                self.put(r#"* NAMESPACE (("" "/")) NIL NIL"#);
                self.tagged(&tag, "OK NAMESPACE completed.");
            }
            "ENABLE" => {
                let mut enabled = Vec::new();
                for i in 0..cmd.args.len() {
                    let ext = cmd.arg(i).unwrap_or_default().to_ascii_uppercase();
                    if ext == "UTF8=ACCEPT" {
                        enabled.push(ext);
                    }
                }
                let line = format!("* ENABLED {}", enabled.join(" "));
                self.put(line.trim_end());
                self.tagged(&tag, "OK ENABLE completed.");
            }
            "LIST" | "LSUB" => self.list(&cmd),
            "STATUS" => self.status(&cmd),
            "SELECT" | "EXAMINE" => self.select(&cmd),
            "APPEND" => self.append(cmd),
            "IDLE" => self.idle(&tag).await?,
            "CREATE" | "DELETE" | "RENAME" | "SUBSCRIBE" | "UNSUBSCRIBE" => self.tagged(
                &tag,
                &format!("NO {} is not supported by this mock.", cmd.name),
            ),
            "FETCH" | "UID FETCH" | "STORE" | "UID STORE" | "SEARCH" | "UID SEARCH" | "EXPUNGE"
            | "UID EXPUNGE" | "CLOSE" | "UNSELECT" | "COPY" | "UID COPY" | "MOVE" | "UID MOVE"
                if self.selected.is_none() =>
            {
                self.tagged(&tag, "BAD Command received in Invalid state.")
            }
            "FETCH" | "UID FETCH" => self.fetch(&cmd).await?,
            "STORE" | "UID STORE" => self.store(&cmd),
            "SEARCH" | "UID SEARCH" => self.search(&cmd),
            "EXPUNGE" | "UID EXPUNGE" => self.expunge(&cmd),
            "COPY" | "UID COPY" | "MOVE" | "UID MOVE" => self.copy_move(&cmd),
            "CLOSE" => {
                let sel = self.selected.take().unwrap();
                if !sel.read_only {
                    let user = self.user.clone().unwrap();
                    self.shared.with_folder(&user, &sel.folder, |f| {
                        f.msgs.retain(|m| !has_flag(&m.flags, r"\Deleted"))
                    });
                    self.shared.changed();
                }
                self.tagged(&tag, "OK CLOSE completed.");
            }
            "UNSELECT" => {
                self.selected = None;
                self.tagged(&tag, "OK UNSELECT completed.");
            }
            _ => self.tagged(&tag, "BAD Command Error. 12"),
        }
        Ok(true)
    }

    async fn authenticate(&mut self, cmd: &Command) -> Io<()> {
        let tag = &cmd.tag;
        let mech = cmd.arg(0).unwrap_or_default().to_ascii_uppercase();
        let initial = cmd.arg(1);
        let payload = match initial {
            Some(ir) if ir == "=" => String::new(),
            Some(ir) => ir,
            None => {
                self.put("+ ");
                self.flush().await?;
                let Some(line) = self.read_line().await? else {
                    return Err(io_err("eof in AUTHENTICATE"));
                };
                let line = String::from_utf8_lossy(&line).trim().to_string();
                if line == "*" {
                    self.tagged(tag, "BAD AUTHENTICATE aborted.");
                    return Ok(());
                }
                line
            }
        };
        if mech != "XOAUTH2" {
            self.shared.auth_failed.fetch_add(1, Ordering::SeqCst);
            self.tagged(tag, "NO AUTHENTICATE failed.");
            return Ok(());
        }
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(payload.as_bytes())
            .ok()
            .and_then(|b| String::from_utf8(b).ok());
        let parsed = decoded.as_deref().and_then(parse_xoauth2);
        if let Some((_, token)) = &parsed {
            self.shared.tokens_seen.lock().unwrap().push(token.clone());
        }
        let ok = parsed
            .as_ref()
            .is_some_and(|(user, token)| self.shared.tokens.check(user, token));
        if ok {
            let (user, token) = parsed.unwrap();
            self.token = Some(token);
            self.not_connected = self.shared.config.lock().unwrap().not_connected;
            self.user = Some(user);
            self.shared.auth_ok.fetch_add(1, Ordering::SeqCst);
            self.tagged(tag, "OK AUTHENTICATE completed.");
            return Ok(());
        }
        self.shared.auth_failed.fetch_add(1, Ordering::SeqCst);
        let style = self.shared.config.lock().unwrap().failure_style;
        match style {
            FailureStyle::Microsoft => self.tagged(tag, "NO AUTHENTICATE failed."),
            FailureStyle::Challenge => {
                let json = r#"{"status":"401","schemes":"bearer","scope":"https://outlook.office.com/IMAP.AccessAsUser.All"}"#;
                let b64 = base64::engine::general_purpose::STANDARD.encode(json);
                self.put(&format!("+ {b64}"));
                self.flush().await?;
                if self.read_line().await?.is_none() {
                    return Err(io_err("eof after challenge"));
                }
                self.tagged(tag, "NO [AUTHENTICATIONFAILED] Authentication failed.");
            }
        }
        Ok(())
    }

    /// True when session expiry is on and this session's token no longer passes.
    fn token_expired(&self) -> bool {
        let (Some(user), Some(token)) = (&self.user, &self.token) else {
            return false;
        };
        self.shared.config.lock().unwrap().expire_sessions && !self.shared.tokens.check(user, token)
    }

    fn user(&self) -> String {
        self.user.clone().unwrap_or_default()
    }

    /// `* n EXISTS` when the selected folder grew since this session last said so.
    fn report_exists(&mut self) {
        let user = self.user();
        let Some(sel) = self.selected.as_mut() else {
            return;
        };
        let exists = self
            .shared
            .with_folder(&user, &sel.folder, |f| f.msgs.len())
            .unwrap_or(0);
        if exists != sel.known_exists {
            sel.known_exists = exists;
            self.put(&format!("* {exists} EXISTS"));
        }
    }

    fn list(&mut self, cmd: &Command) {
        let tag = &cmd.tag;
        let (Some(reference), Some(pattern)) = (cmd.arg(0), cmd.arg(1)) else {
            self.tagged(tag, "BAD Command Argument Error. 11");
            return;
        };
        let verb = cmd.name.clone();
        if pattern.is_empty() {
            self.put(&format!(r#"* {verb} (\Noselect) "/" """#));
            self.tagged(tag, &format!("OK {verb} completed."));
            return;
        }
        let pattern = format!("{reference}{pattern}");
        let folders: Vec<(&'static str, &'static str)> = {
            let mut store = self.shared.store.lock().unwrap();
            let account = store
                .entry(self.user().to_ascii_lowercase())
                .or_insert_with(Account::new);
            account
                .folders
                .iter()
                .map(|f| (f.name, f.special_use))
                .collect()
        };
        for (name, special) in folders {
            let matches = if name == "INBOX" {
                glob(&pattern.to_ascii_uppercase(), name)
            } else {
                glob(&pattern, name)
            };
            if matches {
                let attrs = if special.is_empty() || verb == "LSUB" {
                    r"\HasNoChildren".to_string()
                } else {
                    format!(r"\HasNoChildren {special}")
                };
                self.put(&format!(r#"* {verb} ({attrs}) "/" {}"#, astring(name)));
            }
        }
        self.tagged(tag, &format!("OK {verb} completed."));
    }

    fn status(&mut self, cmd: &Command) {
        let tag = &cmd.tag;
        let Some(name) = cmd.arg(0) else {
            self.tagged(tag, "BAD Command Argument Error. 11");
            return;
        };
        let items: Vec<String> = match cmd.args.get(1) {
            Some(Tok::List(l)) => l.iter().filter_map(|t| cmd.text(t)).collect(),
            _ => Vec::new(),
        };
        let info = self.shared.with_folder(&self.user(), &name, |f| {
            (f.name, f.msgs.len(), f.uid_next, f.uid_validity, f.unseen())
        });
        let Some((fname, messages, uid_next, uid_validity, unseen)) = info else {
            self.tagged(
                tag,
                "NO [NONEXISTENT] The requested item could not be found.",
            );
            return;
        };
        let mut parts = Vec::new();
        for item in items {
            let item = item.to_ascii_uppercase();
            let value = match item.as_str() {
                "MESSAGES" => messages as u64,
                "RECENT" => 0,
                "UIDNEXT" => uid_next as u64,
                "UIDVALIDITY" => uid_validity as u64,
                "UNSEEN" => unseen as u64,
                _ => {
                    self.tagged(tag, "BAD Command Argument Error. 11");
                    return;
                }
            };
            parts.push(format!("{item} {value}"));
        }
        self.put(&format!(
            "* STATUS {} ({})",
            astring(fname),
            parts.join(" ")
        ));
        self.tagged(tag, "OK STATUS completed.");
    }

    fn select(&mut self, cmd: &Command) {
        let tag = &cmd.tag;
        self.selected = None;
        let Some(name) = cmd.arg(0) else {
            self.tagged(tag, "BAD Command Argument Error. 11");
            return;
        };
        let info = self.shared.with_folder(&self.user(), &name, |f| {
            let first_unseen = f
                .msgs
                .iter()
                .position(|m| !has_flag(&m.flags, r"\Seen"))
                .map(|i| i + 1);
            (
                f.name,
                f.msgs.len(),
                f.uid_validity,
                f.uid_next,
                first_unseen,
            )
        });
        let Some((fname, exists, uid_validity, uid_next, first_unseen)) = info else {
            self.tagged(
                tag,
                "NO [NONEXISTENT] The requested item could not be found.",
            );
            return;
        };
        let read_only = cmd.name == "EXAMINE";
        self.put(&format!("* {exists} EXISTS"));
        self.put("* 0 RECENT");
        self.put(&format!("* FLAGS ({FLAGS})"));
        self.put(&format!("* OK [PERMANENTFLAGS ({FLAGS})] Permanent flags"));
        if let Some(n) = first_unseen {
            self.put(&format!("* OK [UNSEEN {n}] Is the first unseen message"));
        }
        self.put(&format!(
            "* OK [UIDVALIDITY {uid_validity}] UIDVALIDITY value"
        ));
        self.put(&format!(
            "* OK [UIDNEXT {uid_next}] The next unique identifier value"
        ));
        self.selected = Some(Selected {
            folder: fname.to_string(),
            read_only,
            known_exists: exists,
        });
        let mode = if read_only { "READ-ONLY" } else { "READ-WRITE" };
        self.tagged(tag, &format!("OK [{mode}] {} completed.", cmd.name));
    }

    fn append(&mut self, mut cmd: Command) {
        let tag = &cmd.tag;
        let Some(name) = cmd.arg(0) else {
            self.tagged(tag, "BAD Command Argument Error. 11");
            return;
        };
        let mut flags = Vec::new();
        let mut date = None;
        let mut data = None;
        for tok in &cmd.args[1..] {
            match tok {
                Tok::List(l) => flags = l.iter().filter_map(|t| cmd.text(t)).collect(),
                Tok::Quoted(d) => date = Some(d.clone()),
                Tok::Literal(i) => data = Some(*i),
                Tok::Atom(_) => {}
            }
        }
        let Some(index) = data else {
            self.tagged(tag, "BAD Command Argument Error. 11");
            return;
        };
        let bytes = std::mem::take(&mut cmd.literals[index]);
        let result = self.shared.with_folder(&self.user(), &name, |f| {
            let uid = f.add(bytes, flags, date);
            (f.name, f.uid_validity, uid)
        });
        let Some((fname, uid_validity, uid)) = result else {
            self.tagged(tag, "NO [TRYCREATE] The requested item could not be found.");
            return;
        };
        self.shared.changed();
        if self.selected.as_ref().is_some_and(|s| s.folder == fname) {
            self.report_exists();
        }
        self.tagged(
            tag,
            &format!("OK [APPENDUID {uid_validity} {uid}] APPEND completed."),
        );
    }

    async fn idle(&mut self, tag: &str) -> Io<()> {
        self.put("+ IDLE accepted, awaiting DONE command.");
        self.flush().await?;
        let mut changes = self.changes.clone();
        changes.borrow_and_update();
        loop {
            tokio::select! {
                line = self.read_line() => {
                    let Some(line) = line? else { return Err(io_err("eof in IDLE")) };
                    if String::from_utf8_lossy(&line).trim().eq_ignore_ascii_case("DONE") {
                        self.tagged(tag, "OK IDLE completed.");
                    } else {
                        self.tagged(tag, "BAD Command Argument Error. 11");
                    }
                    return Ok(());
                }
                _ = tokio::time::sleep(Duration::from_millis(250)) => {
                    if self.token_expired() {
                        self.put("* BYE Session invalidated - AccessTokenExpired");
                        self.flush().await?;
                        return Err(io_err("token expired"));
                    }
                }
                r = changes.changed() => {
                    if r.is_err() {
                        return Err(io_err("store gone"));
                    }
                    self.report_exists();
                    self.flush().await?;
                }
            }
        }
    }

    /// The selected folder's messages with their sequence numbers that `set` names.
    fn resolve(&self, set: &str, uid: bool) -> Option<Vec<(usize, Msg)>> {
        let sel = self.selected.as_ref()?;
        self.shared
            .with_folder(&self.user(), &sel.folder, |f| {
                let max = if uid {
                    f.msgs.last().map(|m| m.uid).unwrap_or(0)
                } else {
                    f.msgs.len() as u32
                };
                let ranges = parse_set(set, max)?;
                Some(
                    f.msgs
                        .iter()
                        .enumerate()
                        .filter(|(i, m)| {
                            let n = if uid { m.uid } else { *i as u32 + 1 };
                            in_set(&ranges, n)
                        })
                        .map(|(i, m)| (i + 1, m.clone()))
                        .collect(),
                )
            })
            .flatten()
    }

    async fn fetch(&mut self, cmd: &Command) -> Io<()> {
        let tag = cmd.tag.clone();
        let uid_mode = cmd.name.starts_with("UID");
        let (Some(set), Some(items_tok)) = (cmd.arg(0), cmd.args.get(1)) else {
            self.tagged(&tag, "BAD Command Argument Error. 11");
            return Ok(());
        };
        let mut items: Vec<String> = match items_tok {
            Tok::List(l) => l.iter().filter_map(|t| cmd.text(t)).collect(),
            other => vec![cmd.text(other).unwrap_or_default()],
        };
        items = items
            .into_iter()
            .flat_map(|i| match i.to_ascii_uppercase().as_str() {
                "ALL" => vec!["FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE"]
                    .into_iter()
                    .map(String::from)
                    .collect(),
                "FAST" => vec!["FLAGS", "INTERNALDATE", "RFC822.SIZE"]
                    .into_iter()
                    .map(String::from)
                    .collect(),
                "FULL" => vec!["FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE", "BODY"]
                    .into_iter()
                    .map(String::from)
                    .collect(),
                _ => vec![i],
            })
            .collect();
        if uid_mode && !items.iter().any(|i| i.eq_ignore_ascii_case("UID")) {
            items.insert(0, "UID".to_string());
        }
        let mut parsed = Vec::new();
        for item in &items {
            match FetchItem::parse(item) {
                Some(fi) => parsed.push(fi),
                None => {
                    self.tagged(&tag, "BAD Command Argument Error. 11");
                    return Ok(());
                }
            }
        }
        let Some(msgs) = self.resolve(&set, uid_mode) else {
            self.tagged(&tag, "BAD Command Argument Error. 11");
            return Ok(());
        };
        let sets_seen = parsed.iter().any(|i| i.sets_seen());
        let read_only = self.selected.as_ref().is_some_and(|s| s.read_only);
        let folder = self.selected.as_ref().unwrap().folder.clone();
        for (seq, mut msg) in msgs {
            let mut flags_changed = false;
            if sets_seen && !read_only && !has_flag(&msg.flags, r"\Seen") {
                let uid = msg.uid;
                self.shared.with_folder(&self.user(), &folder, |f| {
                    if let Some(m) = f.msgs.iter_mut().find(|m| m.uid == uid) {
                        m.flags.push(r"\Seen".to_string());
                    }
                });
                msg.flags.push(r"\Seen".to_string());
                flags_changed = true;
            }
            self.out
                .extend_from_slice(format!("* {seq} FETCH (").as_bytes());
            let mut first = true;
            let mut wrote_flags = false;
            for item in &parsed {
                if !first {
                    self.out.push(b' ');
                }
                first = false;
                match item {
                    FetchItem::Uid => self
                        .out
                        .extend_from_slice(format!("UID {}", msg.uid).as_bytes()),
                    FetchItem::Flags => {
                        wrote_flags = true;
                        self.out.extend_from_slice(
                            format!("FLAGS ({})", msg.flags.join(" ")).as_bytes(),
                        )
                    }
                    FetchItem::Size => self
                        .out
                        .extend_from_slice(format!("RFC822.SIZE {}", msg.data.len()).as_bytes()),
                    FetchItem::InternalDate => self.out.extend_from_slice(
                        format!("INTERNALDATE \"{}\"", msg.internal_date).as_bytes(),
                    ),
                    FetchItem::Envelope => {
                        self.out.extend_from_slice(b"ENVELOPE ");
                        let env = envelope(&msg.data);
                        self.out.extend_from_slice(&env);
                    }
                    FetchItem::BodyStructure(ext) => {
                        self.out
                            .extend_from_slice(if *ext { b"BODYSTRUCTURE " } else { b"BODY " });
                        let bs = body_structure(&msg.data, *ext);
                        self.out.extend_from_slice(bs.as_bytes());
                    }
                    FetchItem::Section {
                        key,
                        section,
                        partial,
                        ..
                    } => {
                        let content = section_content(&msg.data, section);
                        let bytes: &[u8] = match &content {
                            Content::Range(a, b) => &msg.data[*a..*b],
                            Content::Owned(v) => v,
                        };
                        let (bytes, origin) = match partial {
                            Some((start, len)) => {
                                let s = (*start).min(bytes.len());
                                let e = s.saturating_add(*len).min(bytes.len());
                                (&bytes[s..e], Some(*start))
                            }
                            None => (bytes, None),
                        };
                        match origin {
                            Some(o) => self
                                .out
                                .extend_from_slice(format!("{key}<{o}> ").as_bytes()),
                            None => self.out.extend_from_slice(format!("{key} ").as_bytes()),
                        }
                        self.literal(bytes).await?;
                    }
                }
            }
            if flags_changed && !wrote_flags {
                self.out
                    .extend_from_slice(format!(" FLAGS ({})", msg.flags.join(" ")).as_bytes());
            }
            self.out.extend_from_slice(b")\r\n");
            if self.out.len() >= LARGE_WRITE {
                self.flush().await?;
            }
        }
        self.tagged(&tag, &format!("OK {} completed.", cmd.name));
        Ok(())
    }

    fn store(&mut self, cmd: &Command) {
        let tag = &cmd.tag;
        let uid_mode = cmd.name.starts_with("UID");
        let (Some(set), Some(op)) = (cmd.arg(0), cmd.arg(1)) else {
            self.tagged(tag, "BAD Command Argument Error. 11");
            return;
        };
        let op = op.to_ascii_uppercase();
        let silent = op.ends_with(".SILENT");
        let op = op.trim_end_matches(".SILENT").to_string();
        let mut flags = Vec::new();
        for tok in &cmd.args[2..] {
            match tok {
                Tok::List(l) => flags.extend(l.iter().filter_map(|t| cmd.text(t))),
                other => flags.extend(cmd.text(other)),
            }
        }
        if !matches!(op.as_str(), "FLAGS" | "+FLAGS" | "-FLAGS") {
            self.tagged(tag, "BAD Command Argument Error. 11");
            return;
        }
        let sel = self.selected.as_ref().unwrap();
        if sel.read_only {
            self.tagged(tag, "NO Command received in Invalid state.");
            return;
        }
        let folder = sel.folder.clone();
        let Some(targets) = self.resolve(&set, uid_mode) else {
            self.tagged(tag, "BAD Command Argument Error. 11");
            return;
        };
        let uids: Vec<u32> = targets.iter().map(|(_, m)| m.uid).collect();
        let updated = self
            .shared
            .with_folder(&self.user(), &folder, |f| {
                let mut updated = Vec::new();
                for (i, m) in f.msgs.iter_mut().enumerate() {
                    if !uids.contains(&m.uid) {
                        continue;
                    }
                    match op.as_str() {
                        "FLAGS" => m.flags = flags.clone(),
                        "+FLAGS" => {
                            for fl in &flags {
                                if !has_flag(&m.flags, fl) {
                                    m.flags.push(fl.clone());
                                }
                            }
                        }
                        _ => m
                            .flags
                            .retain(|x| !flags.iter().any(|f| f.eq_ignore_ascii_case(x))),
                    }
                    updated.push((i + 1, m.uid, m.flags.clone()));
                }
                updated
            })
            .unwrap_or_default();
        if !silent {
            for (seq, uid, fl) in updated {
                if uid_mode {
                    self.put(&format!(
                        "* {seq} FETCH (UID {uid} FLAGS ({}))",
                        fl.join(" ")
                    ));
                } else {
                    self.put(&format!("* {seq} FETCH (FLAGS ({}))", fl.join(" ")));
                }
            }
        }
        self.tagged(tag, &format!("OK {} completed.", cmd.name));
    }

    fn search(&mut self, cmd: &Command) {
        let tag = &cmd.tag;
        let uid_mode = cmd.name.starts_with("UID");
        let mut args = cmd.args.clone();
        if let Some(first) = args.first()
            && cmd
                .text(first)
                .is_some_and(|t| t.eq_ignore_ascii_case("CHARSET"))
        {
            args.drain(..2.min(args.len()));
        }
        let Some(all) = self.resolve("1:*", false) else {
            self.tagged(tag, "BAD Command Argument Error. 11");
            return;
        };
        let max_seq = all.len() as u32;
        let max_uid = all.last().map(|(_, m)| m.uid).unwrap_or(0);
        let ctx = SearchCtx {
            cmd,
            max_seq,
            max_uid,
        };
        let mut hits = Vec::new();
        for (seq, msg) in &all {
            let mut pos = 0;
            match ctx.all_of(&args, &mut pos, *seq as u32, msg) {
                Some(true) => hits.push(if uid_mode { msg.uid } else { *seq as u32 }),
                Some(false) => {}
                None => {
                    self.tagged(tag, "BAD Command Argument Error. 11");
                    return;
                }
            }
        }
        if all.is_empty() {
            // Still validate the criteria.
            let dummy = Msg {
                uid: 0,
                flags: Vec::new(),
                internal_date: now_internal_date(),
                data: Arc::new(Vec::new()),
            };
            let mut pos = 0;
            if ctx.all_of(&args, &mut pos, 0, &dummy).is_none() {
                self.tagged(tag, "BAD Command Argument Error. 11");
                return;
            }
        }
        let list: Vec<String> = hits.iter().map(|n| n.to_string()).collect();
        let line = format!("* SEARCH {}", list.join(" "));
        self.put(line.trim_end());
        self.tagged(tag, &format!("OK {} completed.", cmd.name));
    }

    fn expunge(&mut self, cmd: &Command) {
        let tag = &cmd.tag;
        let sel = self.selected.as_ref().unwrap();
        if sel.read_only {
            self.tagged(tag, "NO Command received in Invalid state.");
            return;
        }
        let folder = sel.folder.clone();
        let only: Option<Vec<u32>> = if cmd.name == "UID EXPUNGE" {
            let Some(targets) = cmd.arg(0).and_then(|s| self.resolve(&s, true)) else {
                self.tagged(tag, "BAD Command Argument Error. 11");
                return;
            };
            Some(targets.iter().map(|(_, m)| m.uid).collect())
        } else {
            None
        };
        let removed = self.remove_where(&folder, |m| {
            has_flag(&m.flags, r"\Deleted") && only.as_ref().is_none_or(|u| u.contains(&m.uid))
        });
        for seq in removed {
            self.put(&format!("* {seq} EXPUNGE"));
        }
        self.tagged(tag, &format!("OK {} completed.", cmd.name));
    }

    /// Removes matching messages; returns the EXPUNGE sequence numbers to report.
    fn remove_where(&mut self, folder: &str, pred: impl Fn(&Msg) -> bool) -> Vec<usize> {
        let removed = self
            .shared
            .with_folder(&self.user(), folder, |f| {
                let mut removed = Vec::new();
                let mut i = 0;
                while i < f.msgs.len() {
                    if pred(&f.msgs[i]) {
                        f.msgs.remove(i);
                        removed.push(i + 1);
                    } else {
                        i += 1;
                    }
                }
                removed
            })
            .unwrap_or_default();
        if !removed.is_empty() {
            self.shared.changed();
            if let Some(sel) = self.selected.as_mut() {
                sel.known_exists = sel.known_exists.saturating_sub(removed.len());
            }
        }
        removed
    }

    fn copy_move(&mut self, cmd: &Command) {
        let tag = &cmd.tag;
        let uid_mode = cmd.name.starts_with("UID");
        let is_move = cmd.name.ends_with("MOVE");
        let (Some(set), Some(dest)) = (cmd.arg(0), cmd.arg(1)) else {
            self.tagged(tag, "BAD Command Argument Error. 11");
            return;
        };
        let Some(targets) = self.resolve(&set, uid_mode) else {
            self.tagged(tag, "BAD Command Argument Error. 11");
            return;
        };
        let copied = self.shared.with_folder(&self.user(), &dest, |f| {
            let mut new_uids = Vec::new();
            for (_, m) in &targets {
                new_uids.push(f.add(
                    m.data.as_ref().clone(),
                    m.flags.clone(),
                    Some(m.internal_date.clone()),
                ));
            }
            (f.uid_validity, new_uids)
        });
        let Some((validity, new_uids)) = copied else {
            self.tagged(tag, "NO [TRYCREATE] The requested item could not be found.");
            return;
        };
        self.shared.changed();
        let src: Vec<String> = targets.iter().map(|(_, m)| m.uid.to_string()).collect();
        let dst: Vec<String> = new_uids.iter().map(|u| u.to_string()).collect();
        let code = format!("COPYUID {validity} {} {}", src.join(","), dst.join(","));
        if is_move && !targets.is_empty() {
            self.put(&format!("* OK [{code}] Moved"));
            let folder = self.selected.as_ref().unwrap().folder.clone();
            let uids: Vec<u32> = targets.iter().map(|(_, m)| m.uid).collect();
            for seq in self.remove_where(&folder, |m| uids.contains(&m.uid)) {
                self.put(&format!("* {seq} EXPUNGE"));
            }
            self.tagged(tag, &format!("OK {} completed.", cmd.name));
        } else if targets.is_empty() {
            self.tagged(tag, &format!("OK {} completed.", cmd.name));
        } else {
            self.tagged(tag, &format!("OK [{code}] {} completed.", cmd.name));
        }
    }
}

fn parse_xoauth2(s: &str) -> Option<(String, String)> {
    let rest = s.strip_suffix("\x01\x01")?;
    let (user, auth) = rest.split_once('\x01')?;
    let user = user.strip_prefix("user=")?;
    let auth = auth.strip_prefix("auth=")?;
    let (scheme, token) = auth.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("Bearer") || token.is_empty() || user.is_empty() {
        return None;
    }
    Some((user.to_string(), token.to_string()))
}

// ---------------------------------------------------------------------------
// FETCH items and message parsing

enum FetchItem {
    Uid,
    Flags,
    Size,
    InternalDate,
    Envelope,
    /// `true`: BODYSTRUCTURE, `false`: BODY.
    BodyStructure(bool),
    Section {
        /// The response key, e.g. `BODY[HEADER.FIELDS (FROM)]`.
        key: String,
        section: String,
        partial: Option<(usize, usize)>,
        peek: bool,
    },
}

impl FetchItem {
    fn parse(item: &str) -> Option<FetchItem> {
        let upper = item.to_ascii_uppercase();
        Some(match upper.as_str() {
            "UID" => FetchItem::Uid,
            "FLAGS" => FetchItem::Flags,
            "RFC822.SIZE" => FetchItem::Size,
            "INTERNALDATE" => FetchItem::InternalDate,
            "ENVELOPE" => FetchItem::Envelope,
            "BODYSTRUCTURE" => FetchItem::BodyStructure(true),
            "BODY" => FetchItem::BodyStructure(false),
            "RFC822" => FetchItem::Section {
                key: "RFC822".into(),
                section: String::new(),
                partial: None,
                peek: false,
            },
            "RFC822.HEADER" => FetchItem::Section {
                key: "RFC822.HEADER".into(),
                section: "HEADER".into(),
                partial: None,
                peek: true,
            },
            "RFC822.TEXT" => FetchItem::Section {
                key: "RFC822.TEXT".into(),
                section: "TEXT".into(),
                partial: None,
                peek: false,
            },
            _ => {
                let (name, rest) = upper.split_once('[')?;
                let peek = match name {
                    "BODY" => false,
                    "BODY.PEEK" => true,
                    _ => return None,
                };
                let close = rest.rfind(']')?;
                let section = rest[..close].to_string();
                let tail = &rest[close + 1..];
                let partial = if tail.is_empty() {
                    None
                } else {
                    let inner = tail.strip_prefix('<')?.strip_suffix('>')?;
                    let (o, n) = inner.split_once('.')?;
                    Some((o.parse().ok()?, n.parse().ok()?))
                };
                // Keep the client's spelling of the section in the key.
                let orig_open = item.find('[')?;
                let orig_close = item.rfind(']')?;
                let key = format!("BODY[{}]", &item[orig_open + 1..orig_close]);
                FetchItem::Section {
                    key,
                    section,
                    partial,
                    peek,
                }
            }
        })
    }

    fn sets_seen(&self) -> bool {
        matches!(self, FetchItem::Section { peek: false, .. })
    }
}

enum Content {
    Range(usize, usize),
    Owned(Vec<u8>),
}

/// Offset where the body starts (after the blank line), or the length if none.
fn body_start(data: &[u8]) -> usize {
    if let Some(p) = data.windows(4).position(|w| w == b"\r\n\r\n") {
        return p + 4;
    }
    if let Some(p) = data.windows(2).position(|w| w == b"\n\n") {
        return p + 2;
    }
    data.len()
}

/// Header fields as (name, raw lines incl. folding and line ends, unfolded value).
fn header_fields(data: &[u8]) -> Vec<(String, Vec<u8>, String)> {
    let head = &data[..body_start(data)];
    let mut fields: Vec<(String, Vec<u8>, String)> = Vec::new();
    for line in head.split_inclusive(|&b| b == b'\n') {
        let text = String::from_utf8_lossy(line);
        let trimmed = text.trim_end_matches(['\r', '\n']);
        if trimmed.is_empty() {
            break;
        }
        if line[0] == b' ' || line[0] == b'\t' {
            if let Some(last) = fields.last_mut() {
                last.1.extend_from_slice(line);
                last.2.push(' ');
                last.2.push_str(trimmed.trim());
            }
            continue;
        }
        if let Some((name, value)) = trimmed.split_once(':') {
            fields.push((
                name.trim().to_string(),
                line.to_vec(),
                value.trim().to_string(),
            ));
        }
    }
    fields
}

fn header<'a>(fields: &'a [(String, Vec<u8>, String)], name: &str) -> Option<&'a str> {
    fields
        .iter()
        .find(|(n, _, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, _, v)| v.as_str())
}

fn section_content(data: &[u8], section: &str) -> Content {
    let start = body_start(data);
    let section = section.trim();
    match section {
        "" => Content::Range(0, data.len()),
        "HEADER" | "1.MIME" | "MIME" => Content::Range(0, start),
        "TEXT" | "1" => Content::Range(start, data.len()),
        _ => {
            let (not, list) = if let Some(rest) = section.strip_prefix("HEADER.FIELDS.NOT") {
                (true, rest)
            } else if let Some(rest) = section.strip_prefix("HEADER.FIELDS") {
                (false, rest)
            } else {
                return Content::Owned(Vec::new());
            };
            let names: Vec<String> = list
                .trim()
                .trim_start_matches('(')
                .trim_end_matches(')')
                .split_whitespace()
                .map(|s| s.trim_matches('"').to_ascii_lowercase())
                .collect();
            let mut out = Vec::new();
            for (name, raw, _) in header_fields(data) {
                if names.contains(&name.to_ascii_lowercase()) != not {
                    out.extend_from_slice(&raw);
                    if !raw.ends_with(b"\n") {
                        out.extend_from_slice(b"\r\n");
                    }
                }
            }
            out.extend_from_slice(b"\r\n");
            Content::Owned(out)
        }
    }
}

/// An IMAP string: NIL, a quoted string, or a literal for 8-bit/control content.
fn nstring(out: &mut Vec<u8>, s: Option<&str>) {
    match s {
        None => out.extend_from_slice(b"NIL"),
        Some(s) if s.bytes().all(|b| (0x20..0x7f).contains(&b)) => {
            out.push(b'"');
            for b in s.bytes() {
                if b == b'"' || b == b'\\' {
                    out.push(b'\\');
                }
                out.push(b);
            }
            out.push(b'"');
        }
        Some(s) => {
            out.extend_from_slice(format!("{{{}}}\r\n", s.len()).as_bytes());
            out.extend_from_slice(s.as_bytes());
        }
    }
}

fn quoted(s: &str) -> String {
    let mut out = Vec::new();
    nstring(&mut out, Some(s));
    String::from_utf8_lossy(&out).to_string()
}

fn astring(s: &str) -> String {
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.+/&".contains(&b))
    {
        s.to_string()
    } else {
        quoted(s)
    }
}

/// Splits an address list on commas outside quotes, comments and angle brackets.
fn split_addresses(value: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let (mut in_quote, mut angle, mut paren) = (false, 0, 0);
    let mut escaped = false;
    for ch in value.chars() {
        if escaped {
            cur.push(ch);
            escaped = false;
            continue;
        }
        match ch {
            '\\' if in_quote => escaped = true,
            '"' => in_quote = !in_quote,
            '<' if !in_quote => angle += 1,
            '>' if !in_quote => angle -= 1,
            '(' if !in_quote => paren += 1,
            ')' if !in_quote => paren -= 1,
            ',' if !in_quote && angle == 0 && paren == 0 => {
                out.push(std::mem::take(&mut cur));
                continue;
            }
            _ => {}
        }
        cur.push(ch);
    }
    out.push(cur);
    out.into_iter()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect()
}

fn address_list(out: &mut Vec<u8>, value: Option<&str>) {
    let addrs: Vec<String> = value.map(split_addresses).unwrap_or_default();
    if addrs.is_empty() {
        out.extend_from_slice(b"NIL");
        return;
    }
    out.push(b'(');
    for a in addrs {
        let (name, addr) = match (a.find('<'), a.rfind('>')) {
            (Some(l), Some(r)) if l < r => {
                let name = a[..l].trim().trim_matches('"').trim().to_string();
                (
                    if name.is_empty() { None } else { Some(name) },
                    a[l + 1..r].trim().to_string(),
                )
            }
            _ => (None, a.clone()),
        };
        let (mailbox, host) = match addr.rsplit_once('@') {
            Some((m, h)) => (m.to_string(), Some(h.to_string())),
            None => (addr.clone(), None),
        };
        out.push(b'(');
        nstring(out, name.as_deref());
        out.extend_from_slice(b" NIL ");
        nstring(out, Some(&mailbox));
        out.push(b' ');
        nstring(out, host.as_deref());
        out.push(b')');
    }
    out.push(b')');
}

fn envelope(data: &[u8]) -> Vec<u8> {
    let fields = header_fields(data);
    let h = |n: &str| header(&fields, n);
    let mut out = Vec::new();
    out.push(b'(');
    nstring(&mut out, h("Date"));
    out.push(b' ');
    nstring(&mut out, h("Subject"));
    out.push(b' ');
    let from = h("From");
    address_list(&mut out, from);
    out.push(b' ');
    address_list(&mut out, h("Sender").or(from));
    out.push(b' ');
    address_list(&mut out, h("Reply-To").or(from));
    for name in ["To", "Cc", "Bcc"] {
        out.push(b' ');
        address_list(&mut out, h(name));
    }
    out.push(b' ');
    nstring(&mut out, h("In-Reply-To"));
    out.push(b' ');
    nstring(&mut out, h("Message-ID"));
    out.push(b')');
    out
}

/// A single-part body structure from Content-Type/Content-Transfer-Encoding;
/// multipart and message/* messages are described as text/plain.
fn body_structure(data: &[u8], extensible: bool) -> String {
    let fields = header_fields(data);
    let ctype = header(&fields, "Content-Type").unwrap_or("text/plain; charset=us-ascii");
    let mut parts = ctype.split(';');
    let mime = parts
        .next()
        .unwrap_or("text/plain")
        .trim()
        .to_ascii_uppercase();
    let (mut ty, mut sub) = mime
        .split_once('/')
        .map(|(a, b)| (a.trim().to_string(), b.trim().to_string()))
        .unwrap_or(("TEXT".into(), "PLAIN".into()));
    let mut params: Vec<(String, String)> = parts
        .filter_map(|p| {
            let (k, v) = p.split_once('=')?;
            Some((
                k.trim().to_ascii_uppercase(),
                v.trim().trim_matches('"').to_string(),
            ))
        })
        .collect();
    if ty == "MULTIPART" || ty == "MESSAGE" {
        ty = "TEXT".into();
        sub = "PLAIN".into();
        params.retain(|(k, _)| k == "CHARSET");
    }
    if ty == "TEXT" && params.is_empty() {
        params.push(("CHARSET".into(), "us-ascii".into()));
    }
    let params = if params.is_empty() {
        "NIL".to_string()
    } else {
        let inner: Vec<String> = params
            .iter()
            .map(|(k, v)| format!("{} {}", quoted(k), quoted(v)))
            .collect();
        format!("({})", inner.join(" "))
    };
    let encoding = header(&fields, "Content-Transfer-Encoding")
        .unwrap_or("7BIT")
        .to_ascii_uppercase();
    let id = header(&fields, "Content-ID")
        .map(quoted)
        .unwrap_or("NIL".into());
    let desc = header(&fields, "Content-Description")
        .map(quoted)
        .unwrap_or("NIL".into());
    let body = &data[body_start(data)..];
    let size = body.len();
    let mut s = format!(
        "({} {} {params} {id} {desc} {} {size}",
        quoted(&ty),
        quoted(&sub),
        quoted(&encoding)
    );
    if ty == "TEXT" {
        let lines = body.iter().filter(|&&b| b == b'\n').count();
        s.push_str(&format!(" {lines}"));
    }
    if extensible {
        s.push_str(" NIL NIL NIL NIL");
    }
    s.push(')');
    s
}

fn has_flag(flags: &[String], flag: &str) -> bool {
    flags.iter().any(|f| f.eq_ignore_ascii_case(flag))
}

// ---------------------------------------------------------------------------
// Sequence sets, SEARCH, patterns, dates

fn parse_set(set: &str, max: u32) -> Option<Vec<(u32, u32)>> {
    let num = |s: &str| -> Option<u32> {
        if s == "*" {
            Some(max)
        } else {
            s.parse().ok().filter(|&n| n > 0)
        }
    };
    set.split(',')
        .map(|part| match part.split_once(':') {
            Some((a, b)) => {
                let (a, b) = (num(a)?, num(b)?);
                Some((a.min(b), a.max(b)))
            }
            None => {
                let n = num(part)?;
                Some((n, n))
            }
        })
        .collect()
}

fn in_set(ranges: &[(u32, u32)], n: u32) -> bool {
    ranges.iter().any(|&(a, b)| a <= n && n <= b)
}

fn is_set(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit() || b":,*".contains(&b))
}

struct SearchCtx<'a> {
    cmd: &'a Command,
    max_seq: u32,
    max_uid: u32,
}

impl SearchCtx<'_> {
    /// All keys from `pos` to the end match; `None` for an unknown key.
    fn all_of(&self, toks: &[Tok], pos: &mut usize, seq: u32, msg: &Msg) -> Option<bool> {
        let mut result = true;
        while *pos < toks.len() {
            result &= self.one(toks, pos, seq, msg)?;
        }
        Some(result)
    }

    fn one(&self, toks: &[Tok], pos: &mut usize, seq: u32, msg: &Msg) -> Option<bool> {
        let tok = toks.get(*pos)?;
        *pos += 1;
        if let Tok::List(inner) = tok {
            let mut p = 0;
            return self.all_of(inner, &mut p, seq, msg);
        }
        let key = self.cmd.text(tok)?;
        let upper = key.to_ascii_uppercase();
        let mut arg = || -> Option<String> {
            let t = toks.get(*pos)?;
            *pos += 1;
            self.cmd.text(t)
        };
        let flag = |f: &str| has_flag(&msg.flags, f);
        Some(match upper.as_str() {
            "ALL" => true,
            "SEEN" => flag(r"\Seen"),
            "UNSEEN" | "NEW" => !flag(r"\Seen"),
            "DELETED" => flag(r"\Deleted"),
            "UNDELETED" => !flag(r"\Deleted"),
            "FLAGGED" => flag(r"\Flagged"),
            "UNFLAGGED" => !flag(r"\Flagged"),
            "ANSWERED" => flag(r"\Answered"),
            "UNANSWERED" => !flag(r"\Answered"),
            "DRAFT" => flag(r"\Draft"),
            "UNDRAFT" => !flag(r"\Draft"),
            "RECENT" => false,
            "OLD" => true,
            "KEYWORD" => flag(&arg()?),
            "UNKEYWORD" => !flag(&arg()?),
            "UID" => in_set(&parse_set(&arg()?, self.max_uid)?, msg.uid),
            "LARGER" => msg.data.len() > arg()?.parse::<usize>().ok()?,
            "SMALLER" => msg.data.len() < arg()?.parse::<usize>().ok()?,
            "SINCE" | "BEFORE" | "ON" | "SENTSINCE" | "SENTBEFORE" | "SENTON" => {
                let day = parse_imap_date(&arg()?)?;
                let own = parse_imap_date(&msg.internal_date).unwrap_or(0);
                match upper.trim_start_matches("SENT") {
                    "SINCE" => own >= day,
                    "BEFORE" => own < day,
                    _ => own == day,
                }
            }
            "SUBJECT" | "FROM" | "TO" | "CC" | "BCC" => {
                let needle = arg()?.to_ascii_lowercase();
                let fields = header_fields(&msg.data);
                header(&fields, &upper).is_some_and(|v| v.to_ascii_lowercase().contains(&needle))
            }
            "HEADER" => {
                let name = arg()?;
                let needle = arg()?.to_ascii_lowercase();
                let fields = header_fields(&msg.data);
                header(&fields, &name).is_some_and(|v| v.to_ascii_lowercase().contains(&needle))
            }
            "BODY" | "TEXT" => {
                let needle = arg()?.to_ascii_lowercase();
                let start = if upper == "BODY" {
                    body_start(&msg.data)
                } else {
                    0
                };
                String::from_utf8_lossy(&msg.data[start..])
                    .to_ascii_lowercase()
                    .contains(&needle)
            }
            "NOT" => !self.one(toks, pos, seq, msg)?,
            "OR" => {
                let a = self.one(toks, pos, seq, msg)?;
                let b = self.one(toks, pos, seq, msg)?;
                a || b
            }
            _ if is_set(&key) => in_set(&parse_set(&key, self.max_seq)?, seq),
            _ => return None,
        })
    }
}

/// `*` matches anything, `%` anything but the delimiter `/`.
fn glob(pattern: &str, name: &str) -> bool {
    fn go(p: &[char], n: &[char]) -> bool {
        match p.first() {
            None => n.is_empty(),
            Some('*') => (0..=n.len()).any(|i| go(&p[1..], &n[i..])),
            Some('%') => (0..=n.len())
                .take_while(|&i| i == 0 || n[i - 1] != '/')
                .any(|i| go(&p[1..], &n[i..])),
            Some(c) => n.first() == Some(c) && go(&p[1..], &n[1..]),
        }
    }
    let p: Vec<char> = pattern.chars().collect();
    let n: Vec<char> = name.chars().collect();
    go(&p, &n)
}

const MONTHS: [&str; 12] = [
    "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
];

/// `17-Jul-1996 02:44:25 +0000`, now, UTC.
fn now_internal_date() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs() as i64;
    let (y, m, d) = super::idp::civil_from_days(secs.div_euclid(86_400));
    let rem = secs.rem_euclid(86_400);
    format!(
        "{d:02}-{}-{y:04} {:02}:{:02}:{:02} +0000",
        MONTHS[m as usize - 1],
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

/// Days since 1970-01-01 of the date part of `d-Mon-yyyy[ …]`.
fn parse_imap_date(s: &str) -> Option<i64> {
    let date = s.trim().split(' ').next()?;
    let mut it = date.split('-');
    let d: i64 = it.next()?.trim().parse().ok()?;
    let mon = it.next()?;
    let m = MONTHS.iter().position(|x| x.eq_ignore_ascii_case(mon))? as i64 + 1;
    let y: i64 = it.next()?.parse().ok()?;
    // days_from_civil
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    Some(era * 146_097 + doe - 719_468)
}

// ---------------------------------------------------------------------------
// Running imapflow (tests/node/imapflow_session.mjs)

/// Runs `node tests/node/imapflow_session.mjs <args>` and returns the JSON line it
/// printed. Never waits more than `timeout_secs` (the driver's own deadline is
/// shorter); a timeout or an unparsable output is returned as `{"ok":false,…}`.
pub async fn run_imapflow(args: &serde_json::Value, timeout_secs: u64) -> serde_json::Value {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut command = tokio::process::Command::new("node");
    command
        .current_dir(dir)
        .arg("tests/node/imapflow_session.mjs")
        .arg(args.to_string())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let child = match command.spawn() {
        Ok(c) => c,
        Err(e) => {
            return serde_json::json!({"ok": false, "message": format!("cannot run node: {e}"), "code": "SPAWN"});
        }
    };
    let output = match tokio::time::timeout(
        Duration::from_secs(timeout_secs),
        child.wait_with_output(),
    )
    .await
    {
        Ok(Ok(o)) => o,
        Ok(Err(e)) => {
            return serde_json::json!({"ok": false, "message": format!("node failed: {e}"), "code": "SPAWN"});
        }
        Err(_) => {
            return serde_json::json!({"ok": false, "message": "imapflow driver timed out", "code": "TIMEOUT"});
        }
    };
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    stdout
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str::<serde_json::Value>(l.trim()).ok())
        .unwrap_or_else(|| {
            serde_json::json!({
                "ok": false,
                "message": "no JSON from the imapflow driver",
                "code": "NO_OUTPUT",
                "stdout": stdout.to_string(),
                "stderr": stderr.to_string(),
                "status": output.status.code(),
            })
        })
}
