//! Opening the upstream IMAP session: TLS, AUTHENTICATE XOAUTH2 as the
//! account's mailbox, and a check that the session really works.
//!
//! Outlook can accept AUTHENTICATE and then answer every command with
//! `BAD User is authenticated but not connected`, so an OK to AUTHENTICATE is
//! not proof: a NAMESPACE must succeed too. A failed XOAUTH2 may come back as
//! a challenge (`+ <base64 JSON>`, Dovecot and Google) that must be answered
//! with an empty line before the final NO arrives.
//!
//! The pre-login capabilities decide only whether the XOAUTH2 response may
//! go on the AUTHENTICATE line (SASL-IR). Outlook's greeting carries none, so
//! they cost a round trip; [`KnownCapabilities`] remembers them per server
//! for the life of the listener, and forgets a server's list when a login
//! made with it fails, so that the next login asks again.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::io::{
    AsyncBufRead, AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader,
};

use super::capabilities::filter_capabilities;
use crate::config::{Provider, TlsMode};
use crate::lines::{LineError, read_line, trim_eol};
use crate::sasl::xoauth2;
use crate::secret::Secret;
use crate::upstream::{UpstreamError, UpstreamStream, UpstreamTls, quote_reply};

/// Upstream response lines are bounded too: a server can misbehave.
const MAX_RESPONSE_LINE: usize = 64 * 1024;

/// What to change when Exchange refuses an IMAP login.
const IMAP_HINT: &str = "check that IMAP is enabled for the mailbox (Set-CASMailbox -ImapEnabled $true), that the app has IMAP.AccessAsUser.All (delegated) or IMAP.AccessAsApp plus an Exchange service principal with FullAccess to the mailbox (app-only), and that `mailbox` is right";

/// An authenticated, checked upstream session.
pub struct ImapUpstream {
    pub stream: BufReader<UpstreamStream>,
    /// The upstream's capabilities after login, as the client may see them.
    pub capabilities: String,
}

/// The capabilities each upstream server announced before login, by
/// `host:port`: a cheap handle, shared by the logins of one listener.
#[derive(Default)]
pub struct KnownCapabilities(Mutex<HashMap<String, Vec<String>>>);

impl KnownCapabilities {
    fn get(&self, server: &str) -> Option<Vec<String>> {
        let known = self.0.lock().unwrap_or_else(|e| e.into_inner());
        known.get(server).cloned()
    }

    fn remember(&self, server: &str, capabilities: &[String]) {
        let mut known = self.0.lock().unwrap_or_else(|e| e.into_inner());
        known.insert(server.to_string(), capabilities.to_vec());
    }

    fn forget(&self, server: &str) {
        let mut known = self.0.lock().unwrap_or_else(|e| e.into_inner());
        known.remove(server);
    }
}

/// Opens `mailbox` on `provider`'s IMAP server with `token`, all within
/// `timeout`, asking for the server's capabilities.
pub async fn open(
    tls: &UpstreamTls,
    provider: &Provider,
    timeout: Duration,
    mailbox: &str,
    token: &Secret,
) -> Result<ImapUpstream, UpstreamError> {
    open_with(
        tls,
        provider,
        timeout,
        mailbox,
        token,
        &KnownCapabilities::default(),
    )
    .await
}

/// [`open`], with the server's pre-login capabilities taken from `known`
/// when it holds them (and put there when it does not).
pub async fn open_with(
    tls: &UpstreamTls,
    provider: &Provider,
    timeout: Duration,
    mailbox: &str,
    token: &Secret,
    known: &KnownCapabilities,
) -> Result<ImapUpstream, UpstreamError> {
    let server = &provider.imap_server;
    let key = server.to_string();
    let remembered = known.get(&key);
    let attempt = async {
        let tcp = tls.connect(server, timeout).await?;
        let mut session = Session::default();
        let stream = match provider.imap_tls {
            TlsMode::Implicit => {
                let mut stream = BufReader::new(tls.handshake(provider, server, tcp).await?);
                session.greeting(&mut stream).await?;
                stream
            }
            TlsMode::Starttls => {
                let mut plain = BufReader::new(tcp);
                session.greeting(&mut plain).await?;
                plain
                    .get_mut()
                    .write_all(b"x0 STARTTLS\r\n")
                    .await
                    .map_err(lost)?;
                session.expect_ok(&mut plain, "x0").await?;
                let mut stream =
                    BufReader::new(tls.handshake(provider, server, plain.into_inner()).await?);
                // The pre-TLS capabilities no longer count (RFC 3501 §6.2.1).
                session.capabilities.clear();
                if remembered.is_none() {
                    session.send(&mut stream, b"x1 CAPABILITY\r\n").await?;
                    session.expect_ok(&mut stream, "x1").await?;
                }
                stream
            }
        };
        if session.capabilities.is_empty()
            && let Some(capabilities) = &remembered
        {
            session.capabilities = capabilities.clone();
        }
        session
            .authenticate(stream, mailbox, token, |caps| {
                if remembered.is_none() {
                    known.remember(&key, caps)
                }
            })
            .await
    };
    let started = std::time::Instant::now();
    match tokio::time::timeout(timeout, attempt).await {
        Ok(result) => {
            match &result {
                Ok(_) => crate::metrics::get().upstream_login(&key, started.elapsed()),
                Err(_) => known.forget(&key),
            }
            result
        }
        Err(_) => Err(UpstreamError::Unreachable(format!(
            "the IMAP server {server} did not complete the login within {}",
            humantime::format_duration(timeout)
        ))),
    }
}

impl ImapUpstream {
    /// Proves that the session still answers: `NOOP`, and its tagged OK
    /// within `within`. Untagged lines on the way are read and dropped (a
    /// `BYE` fails it); bytes left behind the OK fail it too, so that the
    /// session goes to a client with nothing read ahead.
    pub async fn prove_alive(&mut self, tag: &str, within: Duration) -> Result<(), UpstreamError> {
        let mut session = Session::default();
        let command = format!("{tag} NOOP\r\n");
        let noop = async {
            session.send(&mut self.stream, command.as_bytes()).await?;
            session.expect_ok(&mut self.stream, tag).await
        };
        match tokio::time::timeout(within, noop).await {
            Ok(Ok(())) if self.stream.buffer().is_empty() => Ok(()),
            Ok(Ok(())) => Err(UpstreamError::Unreachable(
                "the IMAP server sent more after NOOP".into(),
            )),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(UpstreamError::Unreachable(format!(
                "the IMAP server did not answer NOOP within {}",
                humantime::format_duration(within)
            ))),
        }
    }

    /// Reads one response that the server sent unasked, within `within`:
    /// an error when it is `BYE`, or the connection ended.
    pub async fn read_unasked(&mut self, within: Duration) -> Result<(), UpstreamError> {
        let mut session = Session::default();
        let read = session.read_line(&mut self.stream);
        match tokio::time::timeout(within, read).await {
            Ok(Ok(())) if session.line.starts_with(b"* BYE") => Err(UpstreamError::Unreachable(
                format!("the IMAP server said `{}`", quote_reply(&session.line)),
            )),
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(UpstreamError::Unreachable(
                "the IMAP server sent half a line".into(),
            )),
        }
    }

    /// Logs out politely, waiting at most `within` for the answer and then
    /// for the server to close the connection.
    ///
    /// The server closes after its OK (RFC 9051 §6.1.3). Waiting for that
    /// close, not only for the OK, is what lets the caller give the
    /// connection's place in the mailbox's cap to the next one: until the
    /// server has closed, it may still count this connection against its own
    /// per-mailbox limit.
    pub async fn log_out(mut self, within: Duration) {
        let mut session = Session::default();
        let logout = async {
            session.send(&mut self.stream, b"w9 LOGOUT\r\n").await?;
            session.expect_ok(&mut self.stream, "w9").await?;
            until_closed(&mut self.stream).await
        };
        let _ = tokio::time::timeout(within, logout).await;
        let _ = tokio::time::timeout(within, self.stream.get_mut().shutdown()).await;
    }
}

/// The whole login dialogue, greeting first, over any stream: the fuzz
/// target's way in (`open` adds the connection, TLS and the time limit).
pub(crate) async fn greet_and_log_in<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut BufReader<S>,
    mailbox: &str,
    token: &Secret,
) -> Result<String, UpstreamError> {
    let mut session = Session::default();
    session.greeting(stream).await?;
    session.log_in(stream, mailbox, token, |_| {}).await
}

/// Reads until the server closes the connection, dropping what it reads;
/// a server that sends more than [`AFTER_LOGOUT`] bytes after its OK is not
/// waited for.
async fn until_closed<S: AsyncRead + Unpin>(
    stream: &mut BufReader<S>,
) -> Result<(), UpstreamError> {
    let mut left = AFTER_LOGOUT;
    loop {
        let read = stream.fill_buf().await.map_err(lost)?.len();
        if read == 0 {
            return Ok(());
        }
        stream.consume(read);
        left = left.saturating_sub(read);
        if left == 0 {
            return Err(UpstreamError::Unreachable(
                "the IMAP server went on talking after LOGOUT".into(),
            ));
        }
    }
}

/// The most that is read after LOGOUT's OK while waiting for the close.
const AFTER_LOGOUT: usize = 4096;

fn lost(e: std::io::Error) -> UpstreamError {
    UpstreamError::Unreachable(format!(
        "the IMAP server closed the connection: {}",
        crate::error::io_reason(&e)
    ))
}

/// What is learnt from the upstream while logging in.
#[derive(Default)]
struct Session {
    capabilities: Vec<String>,
    line: Vec<u8>,
}

/// A tagged status.
enum Status {
    Ok,
    No,
    Bad,
}

impl Session {
    async fn greeting<S: AsyncBufRead + Unpin>(
        &mut self,
        stream: &mut S,
    ) -> Result<(), UpstreamError> {
        self.read_line(stream).await?;
        let line = trim_eol(&self.line).to_vec();
        if line.starts_with(b"* OK") {
            self.note_capabilities(&line);
            Ok(())
        } else {
            Err(UpstreamError::Unreachable(format!(
                "the IMAP server greeted with `{}`",
                quote_reply(&line)
            )))
        }
    }

    async fn send<S>(
        &mut self,
        stream: &mut BufReader<S>,
        bytes: &[u8],
    ) -> Result<(), UpstreamError>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        stream.get_mut().write_all(bytes).await.map_err(lost)?;
        stream.get_mut().flush().await.map_err(lost)
    }

    /// Reads one response line; untagged literals are skipped whole.
    async fn read_line<S: AsyncBufRead + Unpin>(
        &mut self,
        stream: &mut S,
    ) -> Result<(), UpstreamError> {
        self.line.clear();
        read_line(stream, &mut self.line, MAX_RESPONSE_LINE)
            .await
            .map_err(|e| match e {
                LineError::TooLong => {
                    UpstreamError::Unreachable("the IMAP server sent an overlong line".into())
                }
                LineError::Closed => {
                    UpstreamError::Unreachable("the IMAP server closed the connection".into())
                }
                LineError::Io(e) => lost(e),
            })?;
        // A literal inside an untagged response (rare during login): skip it.
        // The line's rest joins it within the same bound, however many
        // literals it announces.
        while let Some((n, _)) = crate::lines::literal_announced(&self.line) {
            let mut skip = stream.take(n as u64);
            tokio::io::copy(&mut skip, &mut tokio::io::sink())
                .await
                .map_err(lost)?;
            self.line.truncate(trim_eol(&self.line).len());
            read_line(stream, &mut self.line, MAX_RESPONSE_LINE)
                .await
                .map_err(|_| {
                    UpstreamError::Unreachable("the IMAP server sent a broken literal".into())
                })?;
        }
        Ok(())
    }

    /// Reads until `tag`'s status line, collecting capabilities.
    async fn tagged<S: AsyncBufRead + Unpin>(
        &mut self,
        stream: &mut S,
        tag: &str,
    ) -> Result<(Status, Vec<u8>), UpstreamError> {
        loop {
            self.read_line(stream).await?;
            let line = trim_eol(&self.line).to_vec();
            if line.starts_with(b"* CAPABILITY ") {
                self.capabilities = words(&line[b"* CAPABILITY ".len()..]);
                continue;
            }
            if line.starts_with(b"* BYE") {
                return Err(UpstreamError::Unreachable(format!(
                    "the IMAP server said `{}`",
                    quote_reply(&line)
                )));
            }
            let Some(rest) = line
                .strip_prefix(tag.as_bytes())
                .and_then(|r| r.strip_prefix(b" "))
            else {
                continue;
            };
            let status = match rest.get(..3).map(|s| s.to_ascii_uppercase()) {
                Some(s) if s.starts_with(b"OK") => Status::Ok,
                Some(s) if s.starts_with(b"NO") => Status::No,
                _ => Status::Bad,
            };
            self.note_capabilities(&line);
            return Ok((status, line));
        }
    }

    async fn expect_ok<S: AsyncBufRead + Unpin>(
        &mut self,
        stream: &mut S,
        tag: &str,
    ) -> Result<(), UpstreamError> {
        match self.tagged(stream, tag).await? {
            (Status::Ok, _) => Ok(()),
            (_, line) => Err(UpstreamError::Unreachable(format!(
                "the IMAP server answered `{}`",
                quote_reply(&line)
            ))),
        }
    }

    /// `[CAPABILITY …]` in a greeting or tagged OK.
    fn note_capabilities(&mut self, line: &[u8]) {
        let upper = line.to_ascii_uppercase();
        let Some(start) = find(&upper, b"[CAPABILITY ") else {
            return;
        };
        let rest = &line[start + b"[CAPABILITY ".len()..];
        let end = rest.iter().position(|b| *b == b']').unwrap_or(rest.len());
        self.capabilities = words(&rest[..end]);
    }

    fn has(&self, capability: &str) -> bool {
        self.capabilities
            .iter()
            .any(|c| c.eq_ignore_ascii_case(capability))
    }

    /// Logs in with XOAUTH2 as `mailbox`, then proves that the session works.
    async fn authenticate(
        mut self,
        mut stream: BufReader<UpstreamStream>,
        mailbox: &str,
        token: &Secret,
        learnt: impl FnOnce(&[String]),
    ) -> Result<ImapUpstream, UpstreamError> {
        let capabilities = self.log_in(&mut stream, mailbox, token, learnt).await?;
        Ok(ImapUpstream {
            stream,
            capabilities,
        })
    }

    /// The login dialogue after the greeting, over any stream (the fuzz
    /// target drives it in memory): the capabilities a client may see.
    /// `learnt` is shown the pre-login capabilities the login went by.
    async fn log_in<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        stream: &mut BufReader<S>,
        mailbox: &str,
        token: &Secret,
        learnt: impl FnOnce(&[String]),
    ) -> Result<String, UpstreamError> {
        self.learn_capabilities(stream).await?;
        learnt(&self.capabilities);
        let sasl = xoauth2(mailbox, token);
        let sent_response = self.start_xoauth2(stream, &sasl).await?;
        self.capabilities.clear();
        if let Some(refusal) = self.xoauth2_result(stream, &sasl, sent_response).await? {
            return Err(rejected(&refusal));
        }
        self.prove_session(stream).await?;
        Ok(filter_capabilities(&self.capabilities))
    }

    /// Asks for the capabilities when the greeting did not carry them: they
    /// decide whether the XOAUTH2 response may go with the command.
    async fn learn_capabilities<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        stream: &mut BufReader<S>,
    ) -> Result<(), UpstreamError> {
        if self.capabilities.is_empty() {
            self.send(stream, b"x2 CAPABILITY\r\n").await?;
            self.expect_ok(stream, "x2").await?;
        }
        Ok(())
    }

    /// Sends AUTHENTICATE XOAUTH2, with the response inline when the server
    /// takes an initial response (SASL-IR, RFC 4959). True when the response
    /// went out with it.
    async fn start_xoauth2<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        stream: &mut BufReader<S>,
        sasl: &Secret,
    ) -> Result<bool, UpstreamError> {
        if self.has("SASL-IR") {
            let command = format!("x3 AUTHENTICATE XOAUTH2 {}\r\n", sasl.expose());
            self.send(stream, command.as_bytes()).await?;
            Ok(true)
        } else {
            self.send(stream, b"x3 AUTHENTICATE XOAUTH2\r\n").await?;
            Ok(false)
        }
    }

    /// Reads the answers to AUTHENTICATE up to its result, answering
    /// challenges on the way. `None` when the login is accepted, else the line
    /// that refused it (a tagged NO or BAD, or `* BYE`).
    async fn xoauth2_result<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        stream: &mut BufReader<S>,
        sasl: &Secret,
        mut sent_response: bool,
    ) -> Result<Option<Vec<u8>>, UpstreamError> {
        loop {
            self.read_line(stream).await?;
            let line = trim_eol(&self.line).to_vec();
            match AuthReply::of(&line) {
                AuthReply::Challenge => {
                    self.answer_challenge(stream, sasl, sent_response).await?;
                    sent_response = true;
                }
                AuthReply::Capabilities(words) => self.capabilities = words,
                AuthReply::Tagged { accepted } => {
                    self.note_capabilities(&line);
                    return Ok((!accepted).then_some(line));
                }
                AuthReply::Bye => return Ok(Some(line)),
                AuthReply::Other => {}
            }
        }
    }

    /// Answers a `+` challenge with the XOAUTH2 response when it has not gone
    /// out yet. A challenge after the response is an error report (base64
    /// JSON, Dovecot and Google): an empty line makes the server send the NO.
    async fn answer_challenge<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        stream: &mut BufReader<S>,
        sasl: &Secret,
        sent_response: bool,
    ) -> Result<(), UpstreamError> {
        if sent_response {
            self.send(stream, b"\r\n").await
        } else {
            let reply = format!("{}\r\n", sasl.expose());
            self.send(stream, reply.as_bytes()).await
        }
    }

    /// Proves the session works, since Outlook may accept AUTHENTICATE and
    /// refuse everything after; learns the capabilities if the OK did not
    /// carry them. Both in one round trip.
    async fn prove_session<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        stream: &mut BufReader<S>,
    ) -> Result<(), UpstreamError> {
        if self.capabilities.is_empty() {
            self.send(stream, b"x5 CAPABILITY\r\nx4 NAMESPACE\r\n")
                .await?;
            if let (Status::No | Status::Bad, line) = self.tagged(stream, "x5").await? {
                return Err(rejected(&line));
            }
        } else {
            self.send(stream, b"x4 NAMESPACE\r\n").await?;
        }
        let (status, line) = self.tagged(stream, "x4").await?;
        if self.namespace_shows_a_session(&status, &line) {
            Ok(())
        } else {
            Err(rejected(&line))
        }
    }

    /// Whether the answer to NAMESPACE shows a working session. A server
    /// without NAMESPACE may say BAD; Outlook's "not connected" comes to a
    /// server that advertises it.
    fn namespace_shows_a_session(&self, status: &Status, line: &[u8]) -> bool {
        match status {
            Status::Ok => true,
            Status::Bad => !self.has("NAMESPACE") && !is_not_connected(line),
            Status::No => false,
        }
    }
}

/// One line of the server's answer to AUTHENTICATE (tag `x3`).
#[derive(Debug, PartialEq)]
enum AuthReply {
    /// `+ …`: the server waits for the response, or reports an error.
    Challenge,
    /// `* CAPABILITY …`
    Capabilities(Vec<String>),
    /// The tagged result: OK, or a refusal.
    Tagged { accepted: bool },
    /// `* BYE`: the server hangs up instead of answering.
    Bye,
    /// Any other untagged line; nothing to learn from it.
    Other,
}

impl AuthReply {
    fn of(line: &[u8]) -> Self {
        if line.starts_with(b"+") {
            AuthReply::Challenge
        } else if let Some(list) = line.strip_prefix(b"* CAPABILITY ") {
            AuthReply::Capabilities(words(list))
        } else if let Some(rest) = line.strip_prefix(b"x3 ") {
            AuthReply::Tagged {
                accepted: rest.len() >= 2 && rest[..2].eq_ignore_ascii_case(b"OK"),
            }
        } else if line.starts_with(b"* BYE") {
            AuthReply::Bye
        } else {
            AuthReply::Other
        }
    }
}

/// The login was refused: the server's words and what to change in Exchange.
fn rejected(line: &[u8]) -> UpstreamError {
    UpstreamError::Rejected {
        reply: quote_reply(line),
        hint: IMAP_HINT,
    }
}

/// Outlook's answer when the token is good but the mailbox cannot be opened.
fn is_not_connected(line: &[u8]) -> bool {
    find(&line.to_ascii_lowercase(), b"not connected").is_some()
}

fn words(bytes: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(bytes)
        .split_ascii_whitespace()
        .map(str::to_string)
        .collect()
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    memchr::memmem::find(haystack, needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capability_code_is_read_from_a_status_line() {
        let mut s = Session::default();
        s.note_capabilities(b"x3 OK [CAPABILITY IMAP4rev1 IDLE] Logged in");
        assert_eq!(s.capabilities, vec!["IMAP4rev1", "IDLE"]);
        assert!(s.has("idle"));
    }

    #[tokio::test]
    async fn untagged_literals_cannot_grow_a_line_past_the_bound() {
        let mut input = b"* ID (".to_vec();
        while input.len() <= 2 * MAX_RESPONSE_LINE {
            input.extend_from_slice(b"\"x\" {0}\r\n");
        }
        input.extend_from_slice(b")\r\n");
        let mut s = Session::default();
        assert!(s.read_line(&mut &input[..]).await.is_err());
        assert!(s.line.len() <= MAX_RESPONSE_LINE);
    }

    #[tokio::test]
    async fn untagged_literals_are_skipped_whole() {
        let mut input: &[u8] = b"* ID (\"name\" {4}\r\nDove) (\"v\" {1+}\n2)\r\nx2 OK\r\n";
        let mut s = Session::default();
        s.read_line(&mut input).await.unwrap();
        assert_eq!(s.line, b"* ID (\"name\" {4}) (\"v\" {1+})\r\n");
        s.read_line(&mut input).await.unwrap();
        assert_eq!(s.line, b"x2 OK\r\n");
    }

    #[test]
    fn answers_to_authenticate_are_told_apart() {
        assert_eq!(
            AuthReply::of(b"+ eyJzdGF0dXMiOiI0MDAifQ=="),
            AuthReply::Challenge
        );
        assert_eq!(
            AuthReply::of(b"* CAPABILITY IMAP4rev1 IDLE"),
            AuthReply::Capabilities(vec!["IMAP4rev1".into(), "IDLE".into()])
        );
        assert_eq!(
            AuthReply::of(b"x3 ok AUTHENTICATE completed"),
            AuthReply::Tagged { accepted: true }
        );
        assert_eq!(
            AuthReply::of(b"x3 NO AUTHENTICATE failed"),
            AuthReply::Tagged { accepted: false }
        );
        assert_eq!(AuthReply::of(b"* BYE going away"), AuthReply::Bye);
        assert_eq!(AuthReply::of(b"* OK still here"), AuthReply::Other);
    }
}
