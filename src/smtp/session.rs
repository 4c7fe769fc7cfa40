//! One SMTP client connection.
//!
//! The proxy answers the greeting, EHLO and AUTH itself. After AUTH it follows
//! transactions: MAIL leases an upstream connection from the mailbox's pool,
//! RCPT and DATA go through it, and the end of DATA (or RSET) gives it back.
//! Commands and message content are forwarded as the client wrote them; the
//! upstream's replies go back verbatim, so its enhanced status codes reach the
//! client. A client may pipeline: commands are answered in order.
//!
//! STARTTLS is offered only with `[tls]`; after it the session starts
//! again over TLS (RFC 3207: the client must EHLO again) and what the client
//! pipelined in plaintext is dropped. With `require_tls` a plain connection
//! offers no AUTH, and AUTH gets 530.
//!
//! Before AUTH succeeds the client has until the login deadline, counted
//! from the connection's start whatever it sends (NOOP, RSET, a SASL
//! exchange, STARTTLS); after it, `client_idle_timeout` for each line.
//!
//! An account that sends through Microsoft Graph (`send_via = "graph"`, or
//! `auto` after SMTP answered 5.7.139) leases nothing: MAIL and RCPT are
//! answered here, DATA reads the whole message and `super::graph` submits
//! it (see there).
//!
//! `Session::command` hands each command to one small method; AUTH runs
//! through [`crate::sasl`], which IMAP shares, and a failed login becomes a
//! reply in `refusal` alone.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tracing::{debug, info, warn};

use super::command::{self, Command};
use super::extensions::Extensions;
use super::graph::{self, Route, Switched, Transaction};
use super::pool::{Lease, LeaseError, Opened, Pools};
use super::reader::Reader;
use super::upstream::{self, Reply, ReplyError, SmtpUpstream, enhanced_code};
use crate::config::Account;
use crate::lines::{LineError, read_line, trim_eol};
use crate::login::{self, LoginError, open_as};
use crate::sasl::{self, Challenge, Credentials, SaslError};
use crate::shared::{ClientStream, Connection, Shared, TlsPolicy, until, write_by};

/// The longest command line accepted (an AUTH PLAIN initial response of a
/// long address and password fits many times over).
pub(crate) const MAX_LINE: usize = 16 * 1024;
/// Errors tolerated before the connection is closed.
const MAX_ERRORS: u32 = 10;
const MAX_FAILED_LOGINS: u32 = 3;
/// How long the upstream may take to accept a message (RFC 5321 §4.5.3.2.6).
const DATA_END_TIMEOUT: Duration = Duration::from_secs(600);

/// The proxy's own host name in greetings.
const HOSTNAME: &str = "xoauth2-proxy";

/// Where transactions go: the per-mailbox SMTP pools, and which `auto`
/// mailboxes have switched to Graph. Both live as long as the listener.
#[derive(Clone)]
pub struct Routes {
    pub pools: Arc<Pools>,
    pub switched: Arc<Switched>,
}

/// Serves one client connection to the end.
pub async fn run<S: ClientStream>(
    shared: Arc<Shared>,
    routes: Routes,
    extensions: Arc<Extensions>,
    stream: S,
    connection: Connection,
) {
    let smtp = &shared.config.smtp;
    let tls = TlsPolicy::new(
        &shared,
        smtp.starttls,
        smtp.require_tls,
        connection.over_tls,
    );
    let mut session = Session::new(shared, routes, extensions, stream, tls, connection);
    let next = session.dialogue(Greeting::Send).await;
    session.end_transaction().await;
    match next {
        Ok(Next::StartTls) => Box::pin(after_starttls(session)).await,
        Ok(_) => {}
        Err(e) => debug!("client connection ended: {}", crate::error::io_reason(&e)),
    }
}

/// Puts TLS under the connection and starts the session again over it.
async fn after_starttls<S: ClientStream>(session: Session<S>) {
    let Session {
        client,
        shared,
        routes,
        extensions,
        tls,
        connection,
        ..
    } = session;
    let (client, pipelined) = client.into_parts();
    let Some(stream) = shared
        .start_tls("smtp", client, pipelined, &connection)
        .await
    else {
        return;
    };
    let upgraded = tls.upgraded();
    let mut session = Session::new(shared, routes, extensions, stream, upgraded, connection);
    if let Err(e) = session.dialogue(Greeting::None).await {
        debug!("client connection ended: {}", crate::error::io_reason(&e));
    }
    session.end_transaction().await;
}

/// Whether the dialogue opens with the 220 greeting: not after STARTTLS,
/// where the client speaks first (RFC 3207 §4.2).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Greeting {
    Send,
    None,
}

struct Session<S> {
    /// The client's stream, read through a buffer that exists only while
    /// bytes wait in it (see `super::reader`).
    client: Reader<S>,
    shared: Arc<Shared>,
    /// The process's upstream connection pools and Graph switches.
    routes: Routes,
    extensions: Arc<Extensions>,
    tls: TlsPolicy,
    /// The login deadline's start and the pre-login slot, given back at login.
    connection: Connection,
    account: Option<Account>,
    /// The upstream connection of the transaction in progress, if any.
    lease: Option<Lease>,
    /// The transaction in progress on its way to Graph, if any.
    graph: Option<Transaction>,
    errors: u32,
    failed_logins: u32,
    line: Vec<u8>,
}

/// Whether the dialogue goes on after a command.
enum Next {
    Continue,
    Close,
    /// The client was told to begin TLS: put TLS under the connection.
    StartTls,
}

/// What the proxy is waiting for, named in the log when it does not come.
#[derive(Clone, Copy)]
enum Awaiting {
    Command,
    SaslResponse,
}

impl Awaiting {
    /// What a line that is too long was meant to be.
    fn noun(self) -> &'static str {
        match self {
            Awaiting::Command => "line",
            Awaiting::SaslResponse => "SASL response",
        }
    }

    /// What the client sent when it sent nothing in time.
    fn silence(self) -> &'static str {
        match self {
            Awaiting::Command => "nothing",
            Awaiting::SaslResponse => "no SASL response",
        }
    }
}

/// How a bounded read of a client line ended.
enum Received {
    /// A whole line is in `Session::line`.
    Line,
    /// The client closed the connection.
    Hangup,
    /// The proxy closed the connection after telling the client why.
    Closed,
}

/// When a login is made: at AUTH, or at MAIL when the mailbox's pool opens
/// another upstream connection.
#[derive(Clone, Copy, PartialEq, Eq)]
enum LoginAt {
    Auth,
    Mail,
}

/// Why MAIL found no upstream to pass its reply on from.
enum MailError {
    /// No connection could be leased.
    Lease(LeaseError),
    /// A fresh connection failed at MAIL.
    Lost(ReplyError),
}

impl<S: ClientStream> Session<S> {
    fn new(
        shared: Arc<Shared>,
        routes: Routes,
        extensions: Arc<Extensions>,
        stream: S,
        tls: TlsPolicy,
        connection: Connection,
    ) -> Self {
        Session {
            client: Reader::new(stream),
            shared,
            routes,
            extensions,
            tls,
            connection,
            account: None,
            lease: None,
            graph: None,
            errors: 0,
            failed_logins: 0,
            line: Vec::new(),
        }
    }

    /// Writes to the client by the line deadline ([`write_by`]): a client
    /// that does not read its replies cannot hold the connection.
    async fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        // Pipelined commands still waiting get their replies in one go.
        let flush = self.client.buffer().is_empty();
        let deadline = self.line_deadline();
        let stream = self.client.get_mut();
        write_by(deadline, async {
            stream.write_all(bytes).await?;
            if flush {
                stream.flush().await?;
            }
            Ok(())
        })
        .await
    }

    /// Flushes what was written to the client, by the line deadline.
    async fn flush(&mut self) -> std::io::Result<()> {
        let deadline = self.line_deadline();
        write_by(deadline, self.client.get_mut().flush()).await
    }

    /// Passes an upstream reply on to the client verbatim.
    async fn pass_on(&mut self, reply: &Reply) -> std::io::Result<()> {
        count_relayed(DOWNSTREAM, reply.raw.len());
        self.send(&reply.raw).await
    }

    async fn reply(&mut self, code: u16, text: &str) -> std::io::Result<()> {
        self.send(format!("{code} {text}\r\n").as_bytes()).await
    }

    async fn close_with(&mut self, code: u16, text: &str) -> std::io::Result<Next> {
        self.reply(code, text).await?;
        self.flush().await?;
        let deadline = self.line_deadline();
        let _ = write_by(deadline, self.client.get_mut().shutdown()).await;
        Ok(Next::Close)
    }

    /// Sends one reply and reads the next command.
    async fn answer(&mut self, code: u16, text: &str) -> std::io::Result<Next> {
        self.reply(code, text).await?;
        Ok(Next::Continue)
    }

    async fn dialogue(&mut self, greeting: Greeting) -> std::io::Result<Next> {
        if greeting == Greeting::Send {
            self.reply(220, &format!("{HOSTNAME} ESMTP ready")).await?;
        }
        loop {
            let next = match self.read_line_within(Awaiting::Command).await? {
                Received::Line => self.command().await?,
                Received::Hangup | Received::Closed => Next::Close,
            };
            if let Next::Close | Next::StartTls = next {
                return Ok(next);
            }
        }
    }

    /// Reads one line into `self.line` before the login deadline, or after
    /// login within `client_idle_timeout`. A line too long or too late is
    /// answered here and the connection closed: the rest of such a line must
    /// not be read as commands.
    async fn read_line_within(&mut self, awaiting: Awaiting) -> std::io::Result<Received> {
        self.line.clear();
        let deadline = self.line_deadline();
        match until(
            deadline,
            read_line(&mut self.client, &mut self.line, MAX_LINE),
        )
        .await
        {
            Some(Ok(())) => Ok(Received::Line),
            Some(Err(LineError::Closed)) => Ok(Received::Hangup),
            Some(Err(LineError::Io(e))) => Err(e),
            Some(Err(LineError::TooLong)) => {
                info!("client sent an overlong {}; closing", awaiting.noun());
                self.reply(500, "5.5.2 Line too long").await?;
                self.close_with(421, "4.7.0 Closing").await?;
                Ok(Received::Closed)
            }
            None => self.too_late(awaiting).await,
        }
    }

    /// When the next line must have come: the login deadline (from the
    /// connection's start) before login, `client_idle_timeout` from now after.
    fn line_deadline(&self) -> tokio::time::Instant {
        match self.account {
            Some(_) => tokio::time::Instant::now() + self.shared.config.smtp.client_idle_timeout,
            None => {
                let login_timeout = self.shared.config.server.login_timeout;
                self.connection.login_deadline(login_timeout)
            }
        }
    }

    /// The line did not come in time: the client is told and closed.
    async fn too_late(&mut self, awaiting: Awaiting) -> std::io::Result<Received> {
        if self.account.is_some() {
            let idle = humantime::format_duration(self.shared.config.smtp.client_idle_timeout);
            info!("client sent {} for {idle}; closing", awaiting.silence());
            self.close_with(421, "4.4.2 Idle for too long; closing")
                .await?;
        } else {
            let login_timeout = humantime::format_duration(self.shared.config.server.login_timeout);
            info!("client did not log in within {login_timeout} of connecting; closing");
            let text = format!("4.4.2 Not logged in within {login_timeout} of connecting; closing");
            self.close_with(421, &text).await?;
        }
        Ok(Received::Closed)
    }

    /// Parses the command in `self.line` and dispatches it.
    async fn command(&mut self) -> std::io::Result<Next> {
        let line = trim_eol(&self.line).to_vec();
        let Some(command) = command::parse(&line) else {
            return self
                .error(501, "5.5.4 Syntax error in command or arguments")
                .await;
        };
        // AUTH, MAIL and DATA are boxed: their futures (a login, an
        // upstream's opening, a message on its way) are the largest states of
        // the session's, and held inline they would make every idle
        // session's task as large (`server`'s test on the task's size).
        match command {
            Command::Ehlo => self.ehlo().await,
            Command::Helo => self.helo().await,
            Command::Auth {
                mechanism,
                initial_response,
            } => Box::pin(self.auth(&mechanism, initial_response)).await,
            Command::Mail => Box::pin(self.mail(&line)).await,
            Command::Rcpt => self.rcpt(&line).await,
            Command::Data => Box::pin(self.data()).await,
            Command::Rset => self.rset().await,
            Command::Noop => self.answer(250, "2.0.0 OK").await,
            Command::Quit => self.quit().await,
            Command::Vrfy => {
                self.answer(252, "2.5.0 Cannot VRFY; send the message")
                    .await
            }
            Command::Help => self.answer(214, "2.0.0 See RFC 5321").await,
            Command::StartTls => self.starttls().await,
            Command::Bdat => self.error(502, "5.5.1 BDAT is not offered; use DATA").await,
            Command::Unknown => self.error(500, "5.5.2 Command not recognised").await,
        }
    }

    async fn error(&mut self, code: u16, text: &str) -> std::io::Result<Next> {
        self.reply(code, text).await?;
        // After a refused MAIL, a pipelining client's RCPTs and DATA get 503
        // in the normal course of things (nodemailer sends them all at once):
        // from a logged-in client that is no sign of hostility, and a pooled
        // connection lives long enough to collect many.
        if code == 503 && self.account.is_some() {
            return Ok(Next::Continue);
        }
        self.errors += 1;
        if self.errors >= MAX_ERRORS {
            return self.close_with(421, "4.7.0 Too many errors; closing").await;
        }
        Ok(Next::Continue)
    }

    /// EHLO ends a transaction in progress (RFC 5321 §4.1.4), like HELO.
    async fn ehlo(&mut self) -> std::io::Result<Next> {
        self.end_transaction().await;
        let ehlo = self.ehlo_reply().await;
        self.send(ehlo.as_bytes()).await?;
        Ok(Next::Continue)
    }

    /// The EHLO reply: the upstream's extensions the proxy can pass on,
    /// STARTTLS when offered, and AUTH unless TLS must come first (nodemailer
    /// only authenticates when AUTH is advertised).
    async fn ehlo_reply(&mut self) -> String {
        let mut lines = vec![format!("{HOSTNAME} Hello")];
        let (config, tls) = (&self.shared.config, &self.shared.tls);
        lines.extend(self.extensions.advertised(config, tls).await);
        if self.tls.offers_starttls() {
            lines.push("STARTTLS".to_string());
        }
        if !self.tls.login_needs_tls() {
            lines.push("AUTH PLAIN LOGIN".to_string());
        }
        let last = lines.len() - 1;
        lines
            .iter()
            .enumerate()
            .map(|(i, l)| format!("250{}{l}\r\n", if i == last { ' ' } else { '-' }))
            .collect()
    }

    async fn helo(&mut self) -> std::io::Result<Next> {
        self.end_transaction().await;
        self.answer(250, HOSTNAME).await
    }

    async fn rset(&mut self) -> std::io::Result<Next> {
        self.end_transaction().await;
        self.answer(250, "2.0.0 OK").await
    }

    async fn quit(&mut self) -> std::io::Result<Next> {
        self.end_transaction().await;
        self.close_with(221, "2.0.0 Bye").await
    }

    /// Begins TLS when offered: before AUTH, once. Where it is not offered
    /// at all the answer is 502, as for any command not implemented.
    async fn starttls(&mut self) -> std::io::Result<Next> {
        if self.tls.active {
            return self.error(503, "5.5.1 TLS is already active").await;
        }
        if !self.tls.offers_starttls() {
            return self.error(502, "5.5.1 STARTTLS is not offered").await;
        }
        if self.account.is_some() {
            return self
                .error(503, "5.5.1 STARTTLS must come before AUTH")
                .await;
        }
        self.reply(220, "2.0.0 Ready to start TLS").await?;
        self.flush().await?;
        Ok(Next::StartTls)
    }

    async fn auth(&mut self, mechanism: &str, initial: Option<Vec<u8>>) -> std::io::Result<Next> {
        if self.account.is_some() {
            return self.error(503, "5.5.1 Already authenticated").await;
        }
        if self.tls.login_needs_tls() {
            return self
                .error(530, "5.7.0 Must issue a STARTTLS command first")
                .await;
        }
        let Some(mechanism) = sasl::Mechanism::named(mechanism) else {
            return self
                .error(
                    504,
                    "5.5.4 Unrecognised authentication type; use PLAIN or LOGIN",
                )
                .await;
        };
        let credentials = match sasl::credentials(self, mechanism, initial).await {
            Ok(c) => c,
            Err(SaslError::Cancelled) => {
                return self.error(501, "5.0.0 Authentication cancelled").await;
            }
            Err(SaslError::Malformed) => {
                return self.error(501, "5.5.2 Invalid SASL response").await;
            }
            Err(SaslError::Closed) => return Ok(Next::Close),
            Err(SaslError::Io(e)) => return Err(e),
        };
        let outcome = log_in(
            &self.shared,
            &self.routes,
            self.connection.peer.ip(),
            &credentials,
        )
        .await;
        crate::metrics::get().login("smtp", &outcome);
        match outcome {
            Ok(account) => self.logged_in(account).await,
            Err(e) => self.login_failed(&e).await,
        }
    }

    async fn logged_in(&mut self, account: Account) -> std::io::Result<Next> {
        let tokens = &self.shared.tokens;
        tokens.client_logged_in(&account.username, "smtp");
        info!(mailbox = %account.mailbox, "logged in");
        self.connection.logged_in();
        self.account = Some(account);
        self.answer(235, "2.7.0 Authentication successful").await
    }

    /// An unavailable service ends the session; a refusal counts towards
    /// the failed logins a connection may have.
    async fn login_failed(&mut self, e: &LoginError) -> std::io::Result<Next> {
        let (code, text) = refusal(e, LoginAt::Auth);
        if code == 421 {
            return self.close_with(code, &text).await;
        }
        self.reply(code, &text).await?;
        self.failed_logins += 1;
        if self.failed_logins >= MAX_FAILED_LOGINS {
            return self
                .close_with(421, "4.7.0 Too many failed logins; closing")
                .await;
        }
        Ok(Next::Continue)
    }

    async fn mail(&mut self, line: &[u8]) -> std::io::Result<Next> {
        let Some(account) = self.account.clone() else {
            return self.error(530, "5.7.0 Authentication required").await;
        };
        if self.lease.is_some() || self.graph.is_some() {
            return self
                .error(503, "5.5.1 Sender already given; RSET first")
                .await;
        }
        if self.routes.switched.route(&account) == Route::Graph {
            return self.graph_mail(line).await;
        }
        match self.begin_transaction(&account, line).await {
            Ok((lease, reply)) => {
                count_relayed(UPSTREAM, line.len() + 2);
                self.mail_answered(lease, reply).await
            }
            Err(MailError::Lease(LeaseError::Login(LoginError::UpstreamRejected(reply))))
                if self.routes.switched.switch_after(&account, &reply) =>
            {
                self.graph_mail(line).await
            }
            Err(e) => self.mail_failed(&account, e).await,
        }
    }

    /// MAIL for Graph: the sender is checked for syntax only (Graph sends
    /// as the mailbox, and its `From` field says who wrote).
    async fn graph_mail(&mut self, line: &[u8]) -> std::io::Result<Next> {
        if graph::path_argument(line, "MAIL FROM:").is_none() {
            return self.error(501, "5.5.4 Syntax: MAIL FROM:<address>").await;
        }
        self.graph = Some(Transaction::default());
        self.answer(250, "2.1.0 Sender OK").await
    }

    /// RCPT for Graph: the address is remembered for the `Bcc` field.
    async fn graph_rcpt(&mut self, line: &[u8]) -> std::io::Result<Next> {
        let Some(address) = graph::path_argument(line, "RCPT TO:").filter(|a| a.contains('@'))
        else {
            return self.error(501, "5.1.3 Syntax: RCPT TO:<address>").await;
        };
        let transaction = self.graph.as_mut().expect("checked by the caller");
        if transaction.recipients.len() >= graph::MAX_RECIPIENTS {
            return self.answer(452, "4.5.3 Too many recipients").await;
        }
        transaction.recipients.push(address);
        self.answer(250, "2.1.5 Recipient OK").await
    }

    /// DATA for Graph: the whole message is read (bounded by what Graph
    /// takes), then submitted; the client's verdict waits for Graph's.
    async fn graph_data(&mut self) -> std::io::Result<Next> {
        let recipients = match self.graph.take() {
            Some(t) if !t.recipients.is_empty() => t.recipients,
            other => {
                self.graph = other;
                return self.error(503, "5.5.1 Need RCPT before DATA").await;
            }
        };
        self.reply(354, "Start mail input; end with <CRLF>.<CRLF>")
            .await?;
        self.flush().await?;
        let idle = self.shared.config.smtp.client_idle_timeout;
        let account = self.account.clone().expect("a transaction needs a login");
        let limit = crate::graph::MAX_MESSAGE;
        let verdict = match read_message(&mut self.client, idle, limit).await? {
            Some(message) => {
                count_relayed(UPSTREAM, message.len());
                graph::submit(&self.shared, &account, &recipients, &message).await
            }
            None => graph::too_large(&account),
        };
        if verdict.close {
            return self.close_with(verdict.code, &verdict.text).await;
        }
        self.answer(verdict.code, &verdict.text).await
    }

    /// Sends MAIL on a leased upstream connection; returns the lease with
    /// the upstream's reply. A pooled connection may have been closed by the
    /// server while idle (all of them, after a server restart): nothing is
    /// committed before MAIL succeeds, so another connection may be tried, as
    /// long as the failing one had waited in the pool. A fresh one failing
    /// is an answer.
    async fn begin_transaction(
        &self,
        account: &Account,
        line: &[u8],
    ) -> Result<(Lease, Reply), MailError> {
        let mut stale = 0;
        loop {
            let opener = || open_pooled(&self.shared, account);
            let pools = &self.routes.pools;
            let leased = pools.lease(account, opener).await;
            let mut lease = leased.map_err(MailError::Lease)?;
            let retry = lease.reused() && stale < pools.max_per_mailbox();
            match lease.conn().command(line).await {
                Ok(reply) if reply.code == 421 && retry => {
                    debug!("pooled connection was closed by the server; retrying with another");
                }
                Err(e) if retry => {
                    debug!("pooled connection failed ({e}); retrying with another");
                }
                Ok(reply) => return Ok((lease, reply)),
                Err(e) => return Err(MailError::Lost(e)),
            }
            stale += 1;
        }
    }

    /// Passes MAIL's reply on; a positive one begins the transaction.
    async fn mail_answered(&mut self, lease: Lease, reply: Reply) -> std::io::Result<Next> {
        if reply.is_positive() {
            self.lease = Some(lease);
        } else if reply.code != 421 {
            // No transaction began: the connection is clean.
            lease.release();
        }
        self.pass_on(&reply).await?;
        Ok(Next::Continue)
    }

    async fn mail_failed(&mut self, account: &Account, e: MailError) -> std::io::Result<Next> {
        let (code, text) = match e {
            MailError::Lease(LeaseError::Busy) => {
                warn!(mailbox = %account.mailbox, "every upstream connection stayed busy; try raising smtp.pool_wait");
                (
                    451,
                    "4.4.5 The mailbox's upstream connections are all busy; try again".to_string(),
                )
            }
            MailError::Lease(LeaseError::Login(e)) => refusal(&e, LoginAt::Mail),
            MailError::Lost(e) => {
                warn!("the SMTP server failed during MAIL: {e}");
                (
                    451,
                    "4.4.2 Lost the connection to the mail server; try again".to_string(),
                )
            }
        };
        self.answer(code, &text).await
    }

    async fn rcpt(&mut self, line: &[u8]) -> std::io::Result<Next> {
        if self.graph.is_some() {
            return self.graph_rcpt(line).await;
        }
        let Some(lease) = self.lease.as_mut() else {
            return self.error(503, "5.5.1 Need MAIL before RCPT").await;
        };
        let reply = lease.conn().command(line).await;
        count_relayed(UPSTREAM, line.len() + 2);
        self.relay_or_abort(reply).await
    }

    /// Passes an upstream reply on; a lost upstream aborts the transaction.
    async fn relay_or_abort(&mut self, reply: Result<Reply, ReplyError>) -> std::io::Result<Next> {
        match reply {
            Ok(reply) => {
                if reply.code == 421 {
                    self.lease = None;
                }
                self.pass_on(&reply).await?;
            }
            Err(e) => {
                warn!("the SMTP server failed mid-transaction: {e}");
                self.lease = None;
                self.reply(
                    451,
                    "4.4.2 Lost the connection to the mail server; transaction aborted",
                )
                .await?;
            }
        }
        Ok(Next::Continue)
    }

    async fn data(&mut self) -> std::io::Result<Next> {
        if self.graph.is_some() {
            return self.graph_data().await;
        }
        let Some(lease) = self.lease.as_mut() else {
            return self
                .error(503, "5.5.1 Need MAIL and RCPT before DATA")
                .await;
        };
        let data = lease.conn().command(b"DATA").await;
        count_relayed(UPSTREAM, b"DATA\r\n".len());
        let reply = match data {
            Ok(reply) if reply.code == 354 => reply,
            other => return self.relay_or_abort(other).await,
        };
        self.pass_on(&reply).await?;
        self.flush().await?;
        let lease = self.lease.take().expect("checked above");
        self.relay_message(lease).await?;
        Ok(Next::Continue)
    }

    /// Copies the message upstream and passes on the upstream's verdict. The
    /// connection goes back to the pool only if the transaction ended
    /// cleanly; otherwise the lease, dropped, closes it.
    async fn relay_message(&mut self, mut lease: Lease) -> std::io::Result<()> {
        let idle = self.shared.config.smtp.client_idle_timeout;
        let write_timeout = self.shared.config.server.upstream_timeout;
        let upstream_ok = pump_message(&mut self.client, &mut lease, idle, write_timeout).await?;
        if !upstream_ok {
            warn!("the SMTP server failed while receiving a message");
            drop(lease);
            return self
                .reply(
                    451,
                    "4.4.2 Lost the connection to the mail server; message not sent",
                )
                .await;
        }
        match lease.conn().reply_within(DATA_END_TIMEOUT).await {
            Ok(reply) => {
                if reply.code == 421 {
                    drop(lease);
                } else {
                    // The transaction is over, accepted or not: clean.
                    lease.release();
                }
                self.pass_on(&reply).await
            }
            Err(e) => {
                warn!("the SMTP server did not confirm a message: {e}");
                drop(lease);
                self.reply(
                    451,
                    "4.4.2 The mail server did not confirm the message; it may not have been sent",
                )
                .await
            }
        }
    }

    /// Ends a transaction in progress with RSET, returning a clean upstream
    /// connection to the pool (or closing one that fails).
    async fn end_transaction(&mut self) {
        self.graph = None;
        if let Some(mut lease) = self.lease.take() {
            match lease.conn().command(b"RSET").await {
                Ok(reply) if reply.code == 250 => lease.release(),
                _ => drop(lease),
            }
        }
    }
}

/// Checks the password and that the mailbox can be served now, so that a
/// refused token or disabled SMTP AUTH surfaces at AUTH, not at MAIL. An
/// `auto` account whose SMTP AUTH is disabled switches to Graph here.
async fn log_in(
    shared: &Shared,
    routes: &Routes,
    client: IpAddr,
    credentials: &Credentials,
) -> Result<Account, LoginError> {
    let delay = shared.config.server.auth_failure_delay;
    let (username, password) = (&credentials.username, &credentials.password);
    let accounts = &shared.accounts;
    let account = login::check_password(accounts, delay, client, username, password).await?;
    if routes.switched.route(&account) == Route::Graph {
        graph::ready(shared, &account).await?;
        return Ok(account);
    }
    // A pool already warm for the mailbox proves the mailbox works,
    // not that this account's grant is still good.
    let opener = || open_pooled(shared, &account);
    match routes.pools.ensure(&account, opener).await {
        Ok(Opened::No) => login::check_grant(&shared.tokens, &account).await?,
        Ok(Opened::Yes) => {}
        Err(LoginError::UpstreamRejected(reply))
            if routes.switched.switch_after(&account, &reply) =>
        {
            graph::ready(shared, &account).await?
        }
        Err(e) => return Err(e),
    }
    Ok(account)
}

/// The one place a failed login becomes an SMTP reply. At AUTH an
/// unavailable service ends the session (421) and a refusal is final (535);
/// at MAIL the client has logged in already, so any failure is the
/// transaction's, and temporary (451).
fn refusal(e: &LoginError, at: LoginAt) -> (u16, String) {
    let unavailable = if at == LoginAt::Auth { 421 } else { 451 };
    match (e, at) {
        (LoginError::IdpUnavailable, _) => (
            unavailable,
            "4.7.0 The identity provider is unavailable; try again later".to_string(),
        ),
        (LoginError::UpstreamUnavailable, _) => (
            unavailable,
            "4.4.1 The mail server is unavailable; try again later".to_string(),
        ),
        (LoginError::Busy, _) => (
            unavailable,
            "4.7.0 Too many logins are being checked at once; try again later".to_string(),
        ),
        (_, LoginAt::Mail) => (
            451,
            "4.7.0 The mail server refused the mailbox's login; see the proxy's log".to_string(),
        ),
        (LoginError::UpstreamRejected(reply), LoginAt::Auth) => {
            let code = enhanced_code(reply)
                .filter(|c| c.starts_with('5'))
                .unwrap_or("5.7.8");
            let text = reply.get(4..).unwrap_or(reply);
            (
                535,
                format!("{code} The mail server refused the login: {text}"),
            )
        }
        (LoginError::Refused, LoginAt::Auth) => (
            535,
            "5.7.8 The identity provider refused the proxy's app registration; see the proxy's log"
                .to_string(),
        ),
        (
            LoginError::BadCredentials | LoginError::Throttled | LoginError::NotAuthorised,
            LoginAt::Auth,
        ) => (535, "5.7.8 Authentication credentials invalid".to_string()),
    }
}

impl<S: ClientStream> Challenge for Session<S> {
    /// `334 prompt`, then one line before the login deadline. A response
    /// too long or too late closes the connection (see `read_line_within`).
    async fn challenge(&mut self, prompt: &str) -> Result<Vec<u8>, SaslError> {
        self.send(format!("334 {prompt}\r\n").as_bytes()).await?;
        self.flush().await?;
        match self.read_line_within(Awaiting::SaslResponse).await? {
            Received::Line => Ok(trim_eol(&self.line).to_vec()),
            Received::Hangup => Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into()),
            Received::Closed => Err(SaslError::Closed),
        }
    }
}

/// Logs in a new pooled upstream connection for `account` with the
/// handles of the config in force.
async fn open_pooled(shared: &Shared, account: &Account) -> Result<SmtpUpstream, LoginError> {
    let timeout = shared.config.server.upstream_timeout;
    open_as(&shared.tokens, account, |account, token| async move {
        let provider = shared.config.provider(&account.provider);
        let user = upstream::login_user(&shared.tokens, &account).await;
        upstream::open(&shared.tls, provider, timeout, &user, &token).await
    })
    .await
}

/// The `direction` labels of `relayed_bytes`.
const UPSTREAM: &str = "upstream";
const DOWNSTREAM: &str = "downstream";

/// Counts `n` bytes relayed after login (`relayed_bytes`), as IMAP's relay
/// counts its own: upstream, the transaction's commands and the message
/// content the client sent through; downstream, the upstream's replies
/// passed back. The proxy's own words (its EHLO, RSET, QUIT) are not relayed.
fn count_relayed(direction: &'static str, n: usize) {
    crate::metrics::get()
        .relayed("smtp", direction)
        .inc_by(n as u64);
}

/// Copies DATA content from the client to the lease's upstream connection
/// (see [`copy_message`]); returns whether the upstream took all of it.
async fn pump_message<S: ClientStream>(
    client: &mut Reader<S>,
    lease: &mut Lease,
    idle: Duration,
    write_timeout: Duration,
) -> std::io::Result<bool> {
    let relayed = crate::metrics::get().relayed("smtp", UPSTREAM);
    let upstream = lease.conn().stream.get_mut();
    copy_message(client, upstream, idle, write_timeout, |n| {
        relayed.inc_by(n as u64);
    })
    .await
}

/// Copies DATA content from the client to `upstream` up to and including
/// the `CRLF . CRLF` terminator, unaltered (dot-stuffing stays as it is),
/// in chunks of up to [`super::reader::CONTENT_CHUNK`]; `written` hears of
/// each chunk the upstream took. Returns whether the upstream took all of
/// it (flushed); the client's content is read to its end either way, so the
/// dialogue stays in step, and what the client sent after the terminator
/// stays in `client` for the dialogue. An error is the client's (it stalled
/// or left): the caller then drops the upstream connection rather than
/// deliver a partial message.
///
/// Each write and the flush to `upstream` may take at most `write_timeout`:
/// a server that stops reading (its TCP window at zero) would otherwise
/// hold the session, and the mailbox's upstream slot, until TCP gives up.
/// A write that times out counts as the upstream failing.
async fn copy_message<S, W>(
    client: &mut Reader<S>,
    upstream: &mut W,
    idle: Duration,
    write_timeout: Duration,
    mut written: impl FnMut(usize),
) -> std::io::Result<bool>
where
    S: ClientStream,
    W: tokio::io::AsyncWrite + Unpin,
{
    let mut end = EndOfData::default();
    let mut upstream_ok = true;
    client.reading_content();
    loop {
        let chunk = data_chunk(client, idle).await?;
        let (n, done) = end.scan(chunk);
        if upstream_ok {
            match tokio::time::timeout(write_timeout, upstream.write_all(&chunk[..n])).await {
                Ok(Ok(())) => written(n),
                Ok(Err(_)) | Err(_) => upstream_ok = false,
            }
        }
        client.consume(n);
        if done {
            break;
        }
    }
    client.reading_commands();
    if upstream_ok
        && !matches!(
            tokio::time::timeout(write_timeout, upstream.flush()).await,
            Ok(Ok(()))
        )
    {
        upstream_ok = false;
    }
    Ok(upstream_ok)
}

/// The client's next bytes of DATA content, waiting at most `idle`; the
/// client closing before the terminator is an error.
async fn data_chunk<S: ClientStream>(
    client: &mut Reader<S>,
    idle: Duration,
) -> std::io::Result<&[u8]> {
    let chunk = match tokio::time::timeout(idle, client.fill_buf()).await {
        Ok(chunk) => chunk?,
        Err(_) => return Err(std::io::ErrorKind::TimedOut.into()),
    };
    if chunk.is_empty() {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    Ok(chunk)
}

/// Reads DATA content from the client up to the `CRLF . CRLF` terminator
/// and undoes dot-stuffing (RFC 5321 §4.5.2): the message as the client
/// composed it, for Graph. `None` when it is longer than `limit`: the rest
/// is read and dropped, so the dialogue stays in step and memory bounded.
async fn read_message<S: ClientStream>(
    client: &mut Reader<S>,
    idle: Duration,
    limit: usize,
) -> std::io::Result<Option<Vec<u8>>> {
    let mut end = EndOfData::default();
    let mut wire = Vec::new();
    let mut too_large = false;
    client.reading_content();
    loop {
        let chunk = data_chunk(client, idle).await?;
        let (n, done) = end.scan(chunk);
        // Dot-stuffing adds at most a byte per line: a little slack.
        if wire.len() + n > limit + limit / 8 + END_OF_DATA.len() {
            too_large = true;
            wire = Vec::new();
        }
        if !too_large {
            wire.extend_from_slice(&chunk[..n]);
        }
        client.consume(n);
        if done {
            break;
        }
    }
    client.reading_commands();
    if too_large {
        return Ok(None);
    }
    let message = unstuff(&wire[..wire.len() - b".\r\n".len()]);
    Ok((message.len() <= limit).then_some(message))
}

/// Removes the dot that dot-stuffing put before each line starting with one.
fn unstuff(wire: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(wire.len());
    let mut line_start = true;
    for &b in wire {
        if !(line_start && b == b'.') {
            out.push(b);
        }
        line_start = b == b'\n';
    }
    out
}

/// The end of DATA content (RFC 5321 §4.1.1.4).
const END_OF_DATA: &[u8] = b"\r\n.\r\n";

/// Finds `CRLF . CRLF` across chunk boundaries with `memmem`, remembering
/// the last four bytes of what came before. The CRLF that ended the DATA
/// command counts, so a message may end at once with `.CRLF`.
#[derive(Debug)]
pub(crate) struct EndOfData {
    tail: [u8; 4],
    tail_len: usize,
}

impl Default for EndOfData {
    fn default() -> Self {
        EndOfData {
            tail: *b"\r\n\0\0",
            tail_len: 2,
        }
    }
}

impl EndOfData {
    /// How many bytes of `chunk` belong to the message (terminator included),
    /// and whether the terminator was among them.
    pub(crate) fn scan(&mut self, chunk: &[u8]) -> (usize, bool) {
        // A terminator that begins before this chunk ends within its first
        // four bytes.
        let head = &chunk[..chunk.len().min(4)];
        let mut joined = [0u8; 8];
        joined[..self.tail_len].copy_from_slice(&self.tail[..self.tail_len]);
        joined[self.tail_len..self.tail_len + head.len()].copy_from_slice(head);
        let joined = &joined[..self.tail_len + head.len()];
        if let Some(p) = memchr::memmem::find(joined, END_OF_DATA) {
            // Five bytes cannot fit in `head`: the match starts in the tail.
            let end = p + END_OF_DATA.len() - self.tail_len;
            *self = EndOfData::default();
            return (end, true);
        }
        if let Some(p) = memchr::memmem::find(chunk, END_OF_DATA) {
            *self = EndOfData::default();
            return (p + END_OF_DATA.len(), true);
        }
        let mut last = [0u8; 8];
        let n = joined.len().min(4);
        if chunk.len() >= 4 {
            last[..4].copy_from_slice(&chunk[chunk.len() - 4..]);
            self.tail_len = 4;
        } else {
            // `joined` is the old tail plus the whole (short) chunk.
            last[..n].copy_from_slice(&joined[joined.len() - n..]);
            self.tail_len = n;
        }
        self.tail.copy_from_slice(&last[..4]);
        (chunk.len(), false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;
    use std::pin::Pin;
    use std::task::{Context, Poll};
    use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

    /// A client whose bytes arrive in the given pieces, one piece (or as
    /// much of it as the reader's buffer takes) per read.
    struct Pieces(VecDeque<Vec<u8>>);

    impl AsyncRead for Pieces {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            if let Some(mut piece) = self.0.pop_front() {
                let n = piece.len().min(buf.remaining());
                buf.put_slice(&piece[..n]);
                if n < piece.len() {
                    self.0.push_front(piece.split_off(n));
                }
            }
            Poll::Ready(Ok(()))
        }
    }

    impl AsyncWrite for Pieces {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            Poll::Ready(Ok(buf.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    /// Relays `parts` (the client's bytes as they arrive) as DATA content;
    /// returns what the upstream got and the client's next line.
    async fn relayed(parts: &[&[u8]]) -> (Vec<u8>, String) {
        // An empty read would be the end of the stream.
        let parts = parts.iter().filter(|p| !p.is_empty());
        let pieces = Pieces(parts.map(|p| p.to_vec()).collect());
        let mut client = Reader::new(pieces);
        let mut upstream = Vec::new();
        let mut counted = 0;
        let five = Duration::from_secs(5);
        let ok = copy_message(&mut client, &mut upstream, five, five, |n| counted += n)
            .await
            .unwrap();
        assert!(ok);
        assert_eq!(counted, upstream.len());
        let mut next = String::new();
        client.read_line(&mut next).await.unwrap();
        (upstream, next)
    }

    /// An upstream that stops reading (its receive window at zero): the
    /// write times out, the client's content is still read to its end, and
    /// the relay reports the upstream as failed.
    #[tokio::test]
    async fn an_upstream_that_stops_reading_fails_the_relay_after_the_write_timeout() {
        let mut message = b"Subject: big\r\n\r\n".to_vec();
        message.extend(std::iter::repeat_n(b'x', 1 << 20));
        message.extend_from_slice(b"\r\n.\r\nQUIT\r\n");
        let pieces = Pieces(message.chunks(8192).map(|p| p.to_vec()).collect());
        let mut client = Reader::new(pieces);
        // Nobody reads the other end: writes stall once its buffer is full.
        let (mut upstream, _unread) = tokio::io::duplex(64 * 1024);
        let ok = copy_message(
            &mut client,
            &mut upstream,
            Duration::from_secs(5),
            Duration::from_millis(200),
            |_| {},
        )
        .await
        .unwrap();
        assert!(!ok, "a stalled upstream is a failed relay");
        let mut next = String::new();
        client.read_line(&mut next).await.unwrap();
        assert_eq!(next, "QUIT\r\n", "the client's content was read to its end");
    }

    #[tokio::test]
    async fn data_is_relayed_byte_for_byte_across_every_split() {
        let message: &[u8] = b"Subject: s\r\n\r\n..a\r\n.b\r\n\r\nend.\r\n.\r\nQUIT\r\n";
        let content = &message[..message.len() - b"QUIT\r\n".len()];
        for i in 0..message.len() {
            for j in i..message.len() {
                let parts = [&message[..i], &message[i..j], &message[j..]];
                let (upstream, next) = relayed(&parts).await;
                assert_eq!(upstream, content, "split at {i} and {j}");
                assert_eq!(next, "QUIT\r\n", "split at {i} and {j}");
            }
        }
    }

    #[tokio::test]
    async fn a_large_message_ends_where_its_terminator_straddles_a_chunk() {
        let chunk = super::super::reader::CONTENT_CHUNK;
        for end_at in [chunk - 3, chunk - 2, chunk, 2 * chunk + 1] {
            let mut content: Vec<u8> = b"x\r\n..y\r\n".repeat(end_at / 9 + 1);
            content.truncate(end_at - 2);
            content.extend_from_slice(b"\r\n.\r\n");
            // The same `\r\n.\r\n` must not be found early in the dots above.
            let mut wire = content.clone();
            wire.extend_from_slice(b"RSET\r\n");
            let (upstream, next) = relayed(&[&wire]).await;
            assert!(
                upstream == content,
                "ending at {end_at}: {} bytes",
                upstream.len()
            );
            assert_eq!(next, "RSET\r\n");
        }
    }

    fn ends(parts: &[&[u8]]) -> Option<usize> {
        let mut end = EndOfData::default();
        let mut total = 0;
        for part in parts {
            let (n, done) = end.scan(part);
            total += n;
            if done {
                return Some(total);
            }
        }
        None
    }

    #[test]
    fn every_split_finds_the_same_end() {
        let message: &[u8] = b"a\r\n..b\r\n.c\r\n\r\n.\r\nNEXT";
        let expected = Some(17);
        assert_eq!(ends(&[message]), expected);
        for i in 0..message.len() {
            for j in i..message.len() {
                assert_eq!(
                    ends(&[&message[..i], &message[i..j], &message[j..]]),
                    expected,
                    "{i} {j}"
                );
            }
        }
        let bytes: Vec<&[u8]> = message.chunks(1).collect();
        assert_eq!(ends(&bytes), expected);
    }

    #[test]
    fn finds_the_terminator_across_chunks() {
        assert_eq!(
            ends(&[b"Subject: x\r\n\r\nbody\r\n.\r\nQUIT\r\n"]),
            Some(23)
        );
        assert_eq!(ends(&[b"body\r", b"\n.", b"\r", b"\nQUIT"]), Some(9));
        assert_eq!(ends(&[b".\r\n"]), Some(3), "an empty message");
        assert_eq!(ends(&[b"a\r\n..stuffed\r\n.x\r\n"]), None);
        assert_eq!(ends(&[b"a\n.\r\n"]), None, "a bare LF does not end a line");
        assert_eq!(ends(&[b"a\r\r\n.\r\n"]), Some(7));
    }
}
