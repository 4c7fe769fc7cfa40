//! One IMAP client connection: the pre-authentication dialogue (the proxy is
//! the server), then the relay, whose [`CapabilityFilter`] shows the
//! upstream's capability answers as the login's OK shows its list.
//!
//! The pre-login CAPABILITY is the proxy's own: Outlook may advertise
//! LOGINDISABLED with only AUTH=XOAUTH2, which would make clients refuse to
//! log in. STARTTLS is offered only with `[tls]` (clients upgrade
//! opportunistically, then refuse a certificate they do not trust); after it
//! the dialogue starts again over TLS, without a greeting, and what the
//! client pipelined in plaintext is dropped. With `require_tls` a plain
//! connection advertises LOGINDISABLED and no AUTH=, and a login gets
//! `NO [PRIVACYREQUIRED]`.
//!
//! `PreAuth::request` reads one command within the limits that hold before
//! login; `PreAuth::command` hands it to one small method per command. The
//! login deadline counts from the connection's start, whatever the client
//! sends meanwhile (NOOPs, SASL responses, STARTTLS): a client that has not
//! logged in by then gets `* BYE Autologout` and is closed.
//! AUTHENTICATE runs through [`crate::sasl`], which SMTP shares, and a failed
//! login becomes a reply in `refusal` alone.
//!
//! A login served by a warm session (`imap::warm`) is answered OK at once;
//! `PreAuth::once_proven` then proves the session, or opens a new one, before
//! the client's first command is relayed. Once the client holds an OK, no
//! tagged answer may be invented for it: when no session can be had, it gets
//! `* BYE [UNAVAILABLE]` with the sentence a cold login's NO would carry.

use std::sync::Arc;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tracing::{debug, info};

use super::filter::CapabilityFilter;
use super::framing::{FrameError, read_command};
use super::parser::{self, Command};
use super::warm::{Opened, Taken, Upstreams};
use crate::config::Account;
use crate::lines::{LineError, read_line, trim_eol};
use crate::login::{self, LoginError};
use crate::oauth::AccessToken;
use crate::sasl::{self, Challenge, SaslError};
use crate::shared::{ClientStream, Connection, Shared, TlsPolicy, until, write_before, write_by};

/// What the proxy offers before login, whatever the TLS state.
const BASE_CAPABILITIES: &str = "IMAP4rev1 LITERAL+ SASL-IR ID";

/// Syntax errors and unknown commands tolerated before the connection is closed.
const MAX_ERRORS: u32 = 10;
/// Failed logins tolerated on one connection.
const MAX_FAILED_LOGINS: u32 = 3;

/// Serves one client connection to the end.
pub async fn run<S: ClientStream>(
    shared: Arc<Shared>,
    upstreams: Arc<Upstreams>,
    stream: S,
    connection: Connection,
) {
    let imap = &shared.config.imap;
    let tls = TlsPolicy::new(
        &shared,
        imap.starttls,
        imap.require_tls,
        connection.over_tls,
    );
    let mut session = PreAuth::new(shared, upstreams, stream, tls, connection);
    // The dialogue's state (login, SASL, the upstream's opening) is the
    // larger part of this future; boxed, it is freed at login instead of
    // sitting in every idle session's task for the life of the relay. For
    // the same reason only the stream is kept of the upstream session (moved
    // straight into the relay: a helper taking it would hold a second copy),
    // and the session after STARTTLS is boxed: a session that never upgrades
    // holds one pointer for it, not a TLS session's state. The slot keeps the
    // connection's place in its mailbox's cap until the relay ends.
    let (upstream, _slot) = match Box::pin(session.dialogue(Greeting::Send)).await {
        Ok(Next::Relay(opened)) => {
            let Opened { upstream, slot } = *opened;
            (upstream.stream, slot)
        }
        Ok(Next::StartTls) => return Box::pin(after_starttls(session)).await,
        Ok(Next::Continue | Next::Close) => return,
        Err(e) => return debug!("client connection failed: {}", crate::error::io_reason(&e)),
    };
    if let Err(e) = crate::relay::splice::<CapabilityFilter>("imap", session.client, upstream).await
    {
        debug!("relay ended: {}", crate::error::io_reason(&e));
    }
}

/// Puts TLS under the connection and runs the dialogue again over it.
async fn after_starttls<S: ClientStream>(session: PreAuth<S>) {
    let PreAuth {
        client,
        shared,
        upstreams,
        tls,
        connection,
        ..
    } = session;
    let pipelined = client.buffer().len();
    let client = client.into_inner();
    let Some(stream) = shared
        .start_tls("imap", client, pipelined, &connection)
        .await
    else {
        return;
    };
    let mut session = PreAuth::new(shared, upstreams, stream, tls.upgraded(), connection);
    let (upstream, _slot) = match Box::pin(session.dialogue(Greeting::None)).await {
        Ok(Next::Relay(opened)) => {
            let Opened { upstream, slot } = *opened;
            (upstream.stream, slot)
        }
        Ok(_) => return,
        Err(e) => return debug!("client connection failed: {}", crate::error::io_reason(&e)),
    };
    if let Err(e) = crate::relay::splice::<CapabilityFilter>("imap", session.client, upstream).await
    {
        debug!("relay ended: {}", crate::error::io_reason(&e));
    }
}

/// Whether the dialogue opens with the server greeting: not after
/// STARTTLS, where the client speaks first (RFC 9051 §6.2.1).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Greeting {
    Send,
    None,
}

struct PreAuth<S> {
    client: BufReader<S>,
    shared: Arc<Shared>,
    upstreams: Arc<Upstreams>,
    tls: TlsPolicy,
    /// The login deadline's start and the pre-login slot, given back at login.
    connection: Connection,
    errors: u32,
    failed_logins: u32,
}

/// Where the dialogue goes after a command.
enum Next {
    /// Read the next command.
    Continue,
    /// The client logged in: relay to this upstream session (boxed: it is
    /// large, and the other answers are not).
    Relay(Box<Opened>),
    /// Close the connection (the client was told why, or has left).
    Close,
    /// The client was told to begin TLS: put TLS under the connection.
    StartTls,
}

impl<S: ClientStream> PreAuth<S> {
    fn new(
        shared: Arc<Shared>,
        upstreams: Arc<Upstreams>,
        stream: S,
        tls: TlsPolicy,
        connection: Connection,
    ) -> Self {
        PreAuth {
            client: BufReader::new(stream),
            shared,
            upstreams,
            tls,
            connection,
            errors: 0,
            failed_logins: 0,
        }
    }

    /// The pre-login capabilities for the connection's TLS state.
    fn capabilities(&self) -> String {
        let mut caps = BASE_CAPABILITIES.to_string();
        if self.tls.offers_starttls() {
            caps.push_str(" STARTTLS");
        }
        caps.push_str(if self.tls.login_needs_tls() {
            " LOGINDISABLED"
        } else {
            " AUTH=PLAIN AUTH=LOGIN"
        });
        caps
    }

    /// Writes to the client, bounded by the login deadline ([`write_before`]).
    async fn send(&mut self, text: &str) -> std::io::Result<()> {
        let deadline = self.login_deadline();
        write_before(deadline, self.client.get_mut(), text.as_bytes()).await
    }

    /// Sends `text` and reads the next command.
    async fn answer(&mut self, text: &str) -> std::io::Result<Next> {
        self.send(text).await?;
        Ok(Next::Continue)
    }

    /// Answers a client's mistake; too many of them close the connection.
    async fn error(&mut self, text: &str) -> std::io::Result<Next> {
        self.send(text).await?;
        self.errors += 1;
        if self.errors >= MAX_ERRORS {
            return self.bye("Too many errors").await;
        }
        Ok(Next::Continue)
    }

    async fn bye(&mut self, text: &str) -> std::io::Result<Next> {
        self.send(&format!("* BYE {text}\r\n")).await?;
        let deadline = self.login_deadline();
        let _ = write_by(deadline, self.client.get_mut().shutdown()).await;
        Ok(Next::Close)
    }

    /// Runs the dialogue until the client logs in ([`Next::Relay`]) or the
    /// connection is to be closed.
    async fn dialogue(&mut self, greeting: Greeting) -> std::io::Result<Next> {
        if greeting == Greeting::Send {
            let caps = self.capabilities();
            self.send(&format!("* OK [CAPABILITY {caps}] xoauth2-proxy ready\r\n"))
                .await?;
        }
        let mut buf = Vec::new();
        loop {
            match self.request(&mut buf).await? {
                Next::Continue => {}
                end => return Ok(end),
            }
        }
    }

    /// Reads one command before the login deadline and answers it.
    async fn request(&mut self, buf: &mut Vec<u8>) -> std::io::Result<Next> {
        let deadline = self.login_deadline();
        match until(deadline, read_command(&mut self.client, buf)).await {
            None => self.autologout().await,
            Some(Err(e)) => self.unframed(e).await,
            Some(Ok(())) => self.command(buf).await,
        }
    }

    /// `server.login_timeout` after the connection's start.
    fn login_deadline(&self) -> tokio::time::Instant {
        let login_timeout = self.shared.config.server.login_timeout;
        self.connection.login_deadline(login_timeout)
    }

    /// The login deadline has passed: the client is told and closed.
    async fn autologout(&mut self) -> std::io::Result<Next> {
        let login_timeout = humantime::format_duration(self.shared.config.server.login_timeout);
        info!("client did not log in within {login_timeout} of connecting; closing");
        self.bye(&format!(
            "Autologout; log in within {login_timeout} of connecting"
        ))
        .await
    }

    /// Answers input that is not a whole command within the limits.
    async fn unframed(&mut self, e: FrameError) -> std::io::Result<Next> {
        match e {
            FrameError::Closed => Ok(Next::Close),
            FrameError::Io(e) => Err(e),
            FrameError::TooLong { tag, bound } => {
                info!("client sent a command over {bound} bytes before login; closing");
                let tag = tag.as_deref().unwrap_or("*");
                self.send(&format!(
                    "{tag} BAD Command line too long (over {bound} bytes before login)\r\n"
                ))
                .await?;
                self.bye("Too much data before login").await
            }
            FrameError::LiteralRefused { line } => {
                let tag = parser::leading_tag(&line).unwrap_or_else(|| "*".into());
                self.error(&format!("{tag} BAD Literal too large\r\n"))
                    .await
            }
        }
    }

    /// Parses the framed command in `buf` and dispatches it.
    async fn command(&mut self, buf: &[u8]) -> std::io::Result<Next> {
        let request = match parser::command(buf) {
            Ok((_, request)) => request,
            Err(_) => {
                let tag = parser::leading_tag(buf).unwrap_or_else(|| "*".into());
                return self.error(&format!("{tag} BAD Syntax error\r\n")).await;
            }
        };
        let tag = request.tag;
        match request.command {
            Command::Capability => self.capability(&tag).await,
            Command::Noop => self.noop(&tag).await,
            Command::Logout => self.logout(&tag).await,
            Command::Id(params) => self.id(&tag, params).await,
            Command::StartTls => self.starttls(&tag).await,
            Command::Login { username, password } => self.login(&tag, username, &password).await,
            Command::Authenticate {
                mechanism,
                initial_response,
            } => self.authenticate(&tag, &mechanism, initial_response).await,
            Command::Other(name) => self.not_before_login(&tag, &name).await,
        }
    }

    async fn capability(&mut self, tag: &str) -> std::io::Result<Next> {
        let caps = self.capabilities();
        self.answer(&format!(
            "* CAPABILITY {caps}\r\n{tag} OK CAPABILITY completed\r\n"
        ))
        .await
    }

    async fn noop(&mut self, tag: &str) -> std::io::Result<Next> {
        self.answer(&format!("{tag} OK NOOP completed\r\n")).await
    }

    async fn logout(&mut self, tag: &str) -> std::io::Result<Next> {
        self.send(&format!(
            "* BYE Logging out\r\n{tag} OK LOGOUT completed\r\n"
        ))
        .await?;
        Ok(Next::Close)
    }

    /// RFC 2971: the proxy names itself; the client's parameters are not
    /// used, but parameters over the RFC's limits are refused.
    async fn id(&mut self, tag: &str, params: parser::IdParams) -> std::io::Result<Next> {
        if let Some(limit) = params.broken_limit() {
            return self.error(&format!("{tag} BAD {limit}\r\n")).await;
        }
        self.answer(&format!(
            "* ID (\"name\" \"xoauth2-proxy\" \"version\" \"{}\")\r\n{tag} OK ID completed\r\n",
            env!("CARGO_PKG_VERSION")
        ))
        .await
    }

    /// Begins TLS when offered. Where it is not (no `[tls]`, `starttls =
    /// false`), a refusal that does not count as an error; over TLS already
    /// (a second STARTTLS, or on `tls_listen`), an error.
    async fn starttls(&mut self, tag: &str) -> std::io::Result<Next> {
        if self.tls.active {
            return self
                .error(&format!("{tag} BAD TLS is already active\r\n"))
                .await;
        }
        if !self.tls.offers_starttls() {
            return self
                .answer(&format!("{tag} BAD STARTTLS is not offered\r\n"))
                .await;
        }
        self.send(&format!("{tag} OK Begin TLS negotiation now\r\n"))
            .await?;
        Ok(Next::StartTls)
    }

    /// With `require_tls`, a login over plain text is refused before its
    /// credentials are looked at.
    async fn privacy_required(&mut self, tag: &str) -> std::io::Result<Next> {
        self.error(&format!(
            "{tag} NO [PRIVACYREQUIRED] Log in over TLS: STARTTLS first\r\n"
        ))
        .await
    }

    async fn not_before_login(&mut self, tag: &str, name: &str) -> std::io::Result<Next> {
        self.error(&format!("{tag} BAD {name} is not valid before login\r\n"))
            .await
    }

    /// A username that is not UTF-8 names no account: it is refused as an
    /// unknown user would be, at once, as there is nothing to look up.
    async fn login(
        &mut self,
        tag: &str,
        username: Vec<u8>,
        password: &[u8],
    ) -> std::io::Result<Next> {
        if self.tls.login_needs_tls() {
            return self.privacy_required(tag).await;
        }
        let Ok(username) = String::from_utf8(username) else {
            let refusal = refusal(&LoginError::BadCredentials);
            return self.answer(&format!("{tag} {refusal}\r\n")).await;
        };
        self.log_in(tag, "LOGIN", &username, password).await
    }

    async fn authenticate(
        &mut self,
        tag: &str,
        mechanism: &str,
        initial_response: Option<Vec<u8>>,
    ) -> std::io::Result<Next> {
        if self.tls.login_needs_tls() {
            return self.privacy_required(tag).await;
        }
        let Some(mechanism) = sasl::Mechanism::named(mechanism) else {
            return self
                .answer(&format!(
                    "{tag} NO Unsupported authentication mechanism (use PLAIN or LOGIN)\r\n"
                ))
                .await;
        };
        match sasl::credentials(self, mechanism, initial_response).await {
            Ok(c) => {
                self.log_in(tag, "AUTHENTICATE", &c.username, &c.password)
                    .await
            }
            Err(SaslError::Cancelled) => {
                self.answer(&format!("{tag} BAD AUTHENTICATE cancelled\r\n"))
                    .await
            }
            Err(SaslError::Malformed) => {
                self.error(&format!("{tag} BAD Invalid SASL response\r\n"))
                    .await
            }
            Err(SaslError::Closed) => Ok(Next::Close),
            Err(SaslError::Io(e)) => Err(e),
        }
    }

    /// Logs in upstream; on success tells the client OK with the upstream's
    /// capabilities and relays, else tells it why not. A warm session is
    /// proven alive after the OK, before the client's first command is
    /// relayed ([`Self::once_proven`]).
    async fn log_in(
        &mut self,
        tag: &str,
        command: &str,
        username: &str,
        password: &[u8],
    ) -> std::io::Result<Next> {
        let shared = self.shared.clone();
        let delay = shared.config.server.auth_failure_delay;
        let peer = self.connection.peer.ip();
        let checked =
            login::check_password(&shared.accounts, delay, peer, username, password).await;
        let outcome = match checked {
            Ok(account) => self.open_upstream(&account).await.map(|u| (account, u)),
            Err(e) => Err(e),
        };
        crate::metrics::get().login("imap", &outcome);
        let (account, upstream) = match outcome {
            Ok(opened) => opened,
            Err(e) => return self.login_failed(tag, &e).await,
        };
        shared.tokens.client_logged_in(&account.username, "imap");
        self.connection.logged_in();
        self.send(&format!(
            "{tag} OK [CAPABILITY {}] {command} completed\r\n",
            upstream.capabilities()
        ))
        .await?;
        match upstream {
            Upstream::Ready(opened) => Ok(Next::Relay(opened)),
            Upstream::Warm(taken) => self.once_proven(taken, &account).await,
        }
    }

    /// An upstream session for `account`, whose password was right: a warm
    /// one, still to be proven, if the grant holds and one is ready; else a
    /// new one, after which a warm one is opened for the next login.
    async fn open_upstream(&self, account: &Account) -> Result<Upstream, LoginError> {
        let (shared, upstreams) = (&self.shared, &self.upstreams);
        let token = login::grant_token(&shared.tokens, account).await?;
        if let Some(taken) = upstreams.take_warm(shared, account, &token.token).await {
            info!(mailbox = %account.mailbox, "logged in (warm upstream session)");
            return Ok(Upstream::Warm(taken));
        }
        let opened = open_cold(shared, upstreams, account, token).await?;
        info!(mailbox = %account.mailbox, "logged in");
        upstreams.refill(shared, account);
        Ok(Upstream::Ready(Box::new(opened)))
    }

    /// After a warm login's OK: proves the session alive, or opens a new
    /// one when it is not, while the client's first command waits in its
    /// buffer. When no session can be had, the client, told OK already, is
    /// told `* BYE [UNAVAILABLE]` and why; a client that leaves meanwhile
    /// takes the upstream session with it.
    async fn once_proven(&mut self, taken: Taken, account: &Account) -> std::io::Result<Next> {
        let (shared, upstreams) = (self.shared.clone(), self.upstreams.clone());
        let settled = proven_or_cold(&shared, &upstreams, taken, account);
        let Some(settled) = while_client_stays(&mut self.client, settled).await else {
            info!(mailbox = %account.mailbox, "the client left before its upstream session was ready; closed");
            return Ok(Next::Close);
        };
        match settled {
            Ok(opened) => {
                upstreams.refill(&shared, account);
                Ok(Next::Relay(Box::new(opened)))
            }
            Err(e) => {
                let why = reason_after_ok(&e);
                info!(mailbox = %account.mailbox, "no upstream session after a warm login's OK; the client is told BYE");
                self.bye(&format!("[UNAVAILABLE] {why}")).await
            }
        }
    }

    async fn login_failed(&mut self, tag: &str, e: &LoginError) -> std::io::Result<Next> {
        self.failed_logins += 1;
        self.send(&format!("{tag} {}\r\n", refusal(e))).await?;
        if self.failed_logins >= MAX_FAILED_LOGINS {
            return self.bye("Too many failed logins").await;
        }
        Ok(Next::Continue)
    }
}

/// The one place a failed login becomes an IMAP reply (after the tag).
fn refusal(e: &LoginError) -> String {
    let (code, why) = refusal_reason(e);
    format!("NO [{code}] {why}")
}

/// A failed login's response code and sentence: the tagged NO's, and the
/// `* BYE`'s after a warm login's OK whose session could not be had.
fn refusal_reason(e: &LoginError) -> (&'static str, String) {
    match e {
        LoginError::BadCredentials | LoginError::Throttled | LoginError::NotAuthorised => {
            ("AUTHENTICATIONFAILED", "Authentication failed".to_string())
        }
        LoginError::Refused => (
            "AUTHENTICATIONFAILED",
            "The identity provider refused the proxy's app registration; see the proxy's log"
                .to_string(),
        ),
        LoginError::UpstreamRejected(reply) => (
            "AUTHENTICATIONFAILED",
            format!("The mail server refused the login: {reply}"),
        ),
        LoginError::IdpUnavailable | LoginError::UpstreamUnavailable => (
            "UNAVAILABLE",
            "The mail server or identity provider is unavailable; try again later".to_string(),
        ),
        LoginError::Busy => (
            "UNAVAILABLE",
            "Too many logins are being checked at once; try again later".to_string(),
        ),
    }
}

/// Why a client told OK has no session after all, for its `* BYE`. Its
/// password was right, so unlike a login's `NO` this may say what the
/// proxy's administrator must do.
fn reason_after_ok(e: &LoginError) -> String {
    match e {
        LoginError::NotAuthorised => "The account needs signing in again at the proxy (`xoauth2-proxy login`, or Connect in its console); try again after that".to_string(),
        e => refusal_reason(e).1,
    }
}

/// The upstream session a login got.
enum Upstream {
    /// Opened for it, and proven.
    Ready(Box<Opened>),
    /// A warm one, to be proven after the OK.
    Warm(Taken),
}

impl Upstream {
    fn capabilities(&self) -> &str {
        match self {
            Upstream::Ready(opened) => &opened.upstream.capabilities,
            Upstream::Warm(taken) => taken.capabilities(),
        }
    }
}

/// A new upstream session for `account` as a cold login opens one: within
/// the mailbox's cap, with `token` (replaced once if the server refuses it
/// as cached), proven with `NAMESPACE`.
async fn open_cold(
    shared: &Shared,
    upstreams: &Upstreams,
    account: &Account,
    token: AccessToken,
) -> Result<Opened, LoginError> {
    let open =
        |account: Account, token| async move { upstreams.open(shared, &account, &token).await };
    login::open_as_from(&shared.tokens, account, token, open).await
}

/// The warm session `taken` if it proves alive, else a cold one (its place
/// in the cap is free by then), with the token in force now.
async fn proven_or_cold(
    shared: &Shared,
    upstreams: &Upstreams,
    taken: Taken,
    account: &Account,
) -> Result<Opened, LoginError> {
    if let Some(opened) = taken.prove().await {
        return Ok(opened);
    }
    let token = login::grant_token(&shared.tokens, account).await?;
    open_cold(shared, upstreams, account, token).await
}

/// `work`, unless the client closes its connection first (`None`). What the
/// client sends meanwhile stays in its reader's buffer, for the relay; the
/// buffer's capacity bounds it, as the client is not read again until
/// `work` is done.
async fn while_client_stays<S: ClientStream, T>(
    client: &mut BufReader<S>,
    work: impl Future<Output = T>,
) -> Option<T> {
    let mut work = std::pin::pin!(work);
    tokio::select! {
        biased;
        done = &mut work => return Some(done),
        filled = client.fill_buf() => match filled {
            Ok(bytes) if !bytes.is_empty() => {}
            _ => return None,
        },
    }
    Some(work.await)
}

impl<S: ClientStream> Challenge for PreAuth<S> {
    /// `+ prompt`, then one line before the login deadline. A response too
    /// long is malformed: the client is told so and may go on. Past the
    /// deadline the client is told and closed.
    async fn challenge(&mut self, prompt: &str) -> Result<Vec<u8>, SaslError> {
        self.send(&format!("+ {prompt}\r\n")).await?;
        let mut line = Vec::new();
        let deadline = self.login_deadline();
        let max = super::framing::MAX_COMMAND;
        match until(deadline, read_line(&mut self.client, &mut line, max)).await {
            Some(Ok(())) => Ok(trim_eol(&line).to_vec()),
            Some(Err(LineError::Io(e))) => Err(e.into()),
            Some(Err(LineError::Closed)) => {
                Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into())
            }
            Some(Err(LineError::TooLong)) => Err(SaslError::Malformed),
            None => {
                self.autologout().await?;
                Err(SaslError::Closed)
            }
        }
    }
}
