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

use std::sync::Arc;

use tokio::io::{AsyncWriteExt, BufReader};
use tracing::{debug, info};

use super::filter::CapabilityFilter;
use super::framing::{FrameError, read_command};
use super::parser::{self, Command};
use super::warm::{Opened, Upstreams};
use crate::config::Account;
use crate::lines::{LineError, read_line, trim_eol};
use crate::login::{self, LoginError};
use crate::sasl::{self, Challenge, SaslError};
use crate::shared::{ClientStream, Connection, Shared, TlsPolicy, until};

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
    let Some(stream) = shared.start_tls("imap", client, &connection).await else {
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

    async fn send(&mut self, text: &str) -> std::io::Result<()> {
        let stream = self.client.get_mut();
        stream.write_all(text.as_bytes()).await?;
        stream.flush().await
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
        let _ = self.client.get_mut().shutdown().await;
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
    /// capabilities and relays, else tells it why not.
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
            Ok(account) => {
                let opened = self.open_upstream(&account).await;
                if opened.is_ok() {
                    shared.tokens.client_logged_in(&account.username, "imap");
                }
                opened
            }
            Err(e) => Err(e),
        };
        crate::metrics::get().login("imap", &outcome);
        match outcome {
            Ok(opened) => {
                self.connection.logged_in();
                self.send(&format!(
                    "{tag} OK [CAPABILITY {}] {command} completed\r\n",
                    opened.upstream.capabilities
                ))
                .await?;
                Ok(Next::Relay(Box::new(opened)))
            }
            Err(e) => self.login_failed(tag, &e).await,
        }
    }

    /// An upstream session for `account`, whose password was right: a warm
    /// one if the grant holds and one is ready, else a new one. Either way a
    /// warm one is then opened for the next login.
    async fn open_upstream(&self, account: &Account) -> Result<Opened, LoginError> {
        let (shared, upstreams) = (&self.shared, &self.upstreams);
        let tokens = &shared.tokens;
        let open =
            |account: Account, token| async move { upstreams.open(shared, &account, &token).await };
        let opened = if shared.config.imap.warm_sessions == 0 {
            login::open_as(tokens, account, open).await?
        } else {
            let token = login::grant_token(tokens, account).await?;
            match upstreams.take_warm(shared, account, &token.token).await {
                Some(opened) => {
                    info!(mailbox = %account.mailbox, "logged in (warm upstream session)");
                    upstreams.refill(shared, account);
                    return Ok(opened);
                }
                None => login::open_as_from(tokens, account, token, open).await?,
            }
        };
        info!(mailbox = %account.mailbox, "logged in");
        upstreams.refill(shared, account);
        Ok(opened)
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
    match e {
        LoginError::BadCredentials | LoginError::Throttled | LoginError::NotAuthorised => {
            "NO [AUTHENTICATIONFAILED] Authentication failed".to_string()
        }
        LoginError::Refused => {
            "NO [AUTHENTICATIONFAILED] The identity provider refused the proxy's app registration; see the proxy's log".to_string()
        }
        LoginError::UpstreamRejected(reply) => {
            format!("NO [AUTHENTICATIONFAILED] The mail server refused the login: {reply}")
        }
        LoginError::IdpUnavailable | LoginError::UpstreamUnavailable => {
            "NO [UNAVAILABLE] The mail server or identity provider is unavailable; try again later".to_string()
        }
        LoginError::Busy => {
            "NO [UNAVAILABLE] Too many logins are being checked at once; try again later".to_string()
        }
    }
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
