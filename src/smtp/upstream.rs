//! Upstream SMTP connections: TLS (STARTTLS on 587, implicit on 465),
//! EHLO, AUTH XOAUTH2 as the account's [`login_user`], and replies read whole.
//!
//! Exchange Online accepts a shared mailbox's address as the XOAUTH2 user on
//! IMAP (with a delegate's token) but not on SMTP, where it answers
//! `535 5.7.3`: SMTP must log in as the delegate who signed in, and Exchange
//! applies the delegate's Send As right to `MAIL FROM` (the shared address).

use std::time::Duration;

use tokio::io::{AsyncBufRead, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};

use crate::config::{Account, Provider, TlsMode};
use crate::lines::{LineError, read_line, trim_eol};
use crate::oauth::TokenManager;
use crate::sasl::xoauth2;
use crate::secret::Secret;
use crate::upstream::{UpstreamError, UpstreamStream, UpstreamTls, quote_reply};

/// A reply line longer than this is a broken server.
const MAX_REPLY_LINE: usize = 8 * 1024;
/// Nor does a reply need more lines than this.
const MAX_REPLY_LINES: usize = 100;

const SMTP_AUTH_DISABLED_HINT: &str = "SMTP AUTH is disabled for this mailbox or tenant: run `Set-CASMailbox -Identity <mailbox> -SmtpClientAuthenticationDisabled $false` (or, tenant-wide, `Set-TransportConfig -SmtpClientAuthenticationDisabled $false`) in Exchange Online PowerShell, or set `send_via = \"graph\"` (or `\"auto\"`) for the account to send through Microsoft Graph instead";
const SMTP_HINT: &str = "check that the app has SMTP.Send (delegated) or SMTP.SendAsApp plus an Exchange service principal with rights on the mailbox (app-only), and that `mailbox` is right";

/// One complete reply: its code and its lines as received (CRLF included),
/// ready to be passed on to the client verbatim.
#[derive(Debug, Clone)]
pub struct Reply {
    pub code: u16,
    pub raw: Vec<u8>,
}

impl Reply {
    pub fn is_positive(&self) -> bool {
        (200..400).contains(&self.code)
    }

    /// The reply as one printable line for logs.
    pub fn text(&self) -> String {
        quote_reply(self.raw.split(|b| *b == b'\n').next().unwrap_or_default())
    }

    /// The lines after the first, without their `250-`/`250 ` prefix (EHLO
    /// keywords).
    pub(crate) fn ehlo_keywords(&self) -> Vec<String> {
        String::from_utf8_lossy(&self.raw)
            .lines()
            .skip(1)
            .filter_map(|l| l.get(4..))
            .map(|k| k.trim().to_string())
            .filter(|k| !k.is_empty())
            .collect()
    }
}

/// Why a reply could not be read, as a sentence: callers only report it.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ReplyError(String);

impl ReplyError {
    fn io(e: std::io::Error) -> Self {
        ReplyError(crate::error::io_reason(&e))
    }

    fn closed() -> Self {
        ReplyError("the server closed the connection".into())
    }

    fn malformed() -> Self {
        ReplyError("the server sent a malformed reply".into())
    }

    fn timed_out() -> Self {
        ReplyError("the server did not answer in time".into())
    }
}

/// Reads one (possibly multi-line) reply.
pub async fn read_reply<S: AsyncBufRead + Unpin>(stream: &mut S) -> Result<Reply, ReplyError> {
    let mut raw = Vec::new();
    for _ in 0..MAX_REPLY_LINES {
        let start = raw.len();
        read_line(stream, &mut raw, start + MAX_REPLY_LINE)
            .await
            .map_err(|e| match e {
                LineError::Closed => ReplyError::closed(),
                LineError::TooLong => ReplyError::malformed(),
                LineError::Io(e) => ReplyError::io(e),
            })?;
        let line = trim_eol(&raw[start..]);
        let code = line
            .get(..3)
            .and_then(|c| std::str::from_utf8(c).ok())
            .and_then(|c| c.parse::<u16>().ok())
            .filter(|c| (200..600).contains(c))
            .ok_or_else(ReplyError::malformed)?;
        match line.get(3) {
            Some(b'-') => continue,
            None | Some(b' ') => return Ok(Reply { code, raw }),
            Some(_) => return Err(ReplyError::malformed()),
        }
    }
    Err(ReplyError::malformed())
}

/// An authenticated upstream SMTP connection, between transactions or in one.
pub struct SmtpUpstream {
    pub stream: BufReader<UpstreamStream>,
    /// EHLO keywords after login (`SIZE 157286400`, `PIPELINING`, …).
    pub extensions: Vec<String>,
    timeout: Duration,
}

impl SmtpUpstream {
    /// Sends one command line (`line` without CRLF) and reads its reply.
    pub async fn command(&mut self, line: &[u8]) -> Result<Reply, ReplyError> {
        let timeout = self.timeout;
        self.command_within(line, timeout).await
    }

    pub async fn command_within(
        &mut self,
        line: &[u8],
        timeout: Duration,
    ) -> Result<Reply, ReplyError> {
        let exchange = async {
            let stream = self.stream.get_mut();
            stream.write_all(line).await.map_err(ReplyError::io)?;
            stream.write_all(b"\r\n").await.map_err(ReplyError::io)?;
            stream.flush().await.map_err(ReplyError::io)?;
            read_reply(&mut self.stream).await
        };
        tokio::time::timeout(timeout, exchange)
            .await
            .unwrap_or_else(|_| Err(ReplyError::timed_out()))
    }

    /// Reads a reply without sending anything (the answer to DATA content).
    pub async fn reply_within(&mut self, timeout: Duration) -> Result<Reply, ReplyError> {
        tokio::time::timeout(timeout, read_reply(&mut self.stream))
            .await
            .unwrap_or_else(|_| Err(ReplyError::timed_out()))
    }

    /// Says goodbye; errors do not matter any more.
    pub async fn quit(mut self) {
        let _ = self.command_within(b"QUIT", Duration::from_secs(5)).await;
    }
}

/// Connects to the provider's SMTP server, upgrades to TLS, and says EHLO:
/// a connection ready for AUTH, with the server's EHLO keywords.
async fn hello(
    tls: &UpstreamTls,
    provider: &Provider,
    timeout: Duration,
) -> Result<SmtpUpstream, UpstreamError> {
    let server = &provider.smtp_server;
    let unreachable = |what: &str, e: ReplyError| {
        UpstreamError::Unreachable(format!("SMTP server {server}: {what}: {e}"))
    };
    let tcp = tls.connect(server, timeout).await?;
    let ehlo = format!("EHLO {}", address_literal(&tcp));
    let mut stream = match provider.smtp_tls {
        TlsMode::Implicit => {
            let mut stream = BufReader::new(tls.handshake(provider, server, tcp).await?);
            expect(&mut stream, None, 220)
                .await
                .map_err(|e| unreachable("greeting", e))?;
            stream
        }
        TlsMode::Starttls => {
            let mut plain = BufReader::new(tcp);
            expect(&mut plain, None, 220)
                .await
                .map_err(|e| unreachable("greeting", e))?;
            expect(&mut plain, Some(ehlo.as_bytes()), 250)
                .await
                .map_err(|e| unreachable("EHLO", e))?;
            expect(&mut plain, Some(b"STARTTLS"), 220)
                .await
                .map_err(|e| unreachable("STARTTLS", e))?;
            BufReader::new(tls.handshake(provider, server, plain.into_inner()).await?)
        }
    };
    let hello = expect(&mut stream, Some(ehlo.as_bytes()), 250)
        .await
        .map_err(|e| unreachable("EHLO", e))?;
    Ok(SmtpUpstream {
        stream,
        extensions: hello.ehlo_keywords(),
        timeout,
    })
}

/// The EHLO keywords of `provider`'s SMTP server, from a connection that
/// says EHLO and QUIT without logging in.
pub async fn probe_extensions(
    tls: &UpstreamTls,
    provider: &Provider,
    timeout: Duration,
) -> Result<Vec<String>, UpstreamError> {
    let upstream = tokio::time::timeout(timeout, hello(tls, provider, timeout))
        .await
        .unwrap_or_else(|_| {
            Err(UpstreamError::Unreachable(format!(
                "the SMTP server {} timed out",
                provider.smtp_server
            )))
        })?;
    let extensions = upstream.extensions.clone();
    tokio::spawn(upstream.quit());
    Ok(extensions)
}

/// The XOAUTH2 user of `account`'s SMTP logins: for a delegated grant the
/// user who signed in (`sign_in_user`, or learnt from the ID token), for an
/// app-only one the mailbox. A grant stored before the signed-in user was
/// recorded falls back to the mailbox, which is right unless it is shared
/// (`status` says so).
pub async fn login_user(tokens: &TokenManager, account: &Account) -> String {
    if !account.flow.is_delegated() {
        return account.mailbox.clone();
    }
    tokens
        .sign_in_user(&account.username)
        .await
        .unwrap_or_else(|| account.mailbox.clone())
}

/// Opens an upstream SMTP connection to `provider`'s server and
/// authenticates as `user` (see [`login_user`]) with `token`, all within
/// `timeout`.
pub async fn open(
    tls: &UpstreamTls,
    provider: &Provider,
    timeout: Duration,
    user: &str,
    token: &Secret,
) -> Result<SmtpUpstream, UpstreamError> {
    let server = &provider.smtp_server;
    let unreachable = |what: &str, e: ReplyError| {
        UpstreamError::Unreachable(format!("SMTP server {server}: {what}: {e}"))
    };
    let attempt = async {
        let mut upstream = hello(tls, provider, timeout).await?;
        // AUTH XOAUTH2, the response after the 334 as Microsoft documents it.
        let sasl = xoauth2(user, token);
        let mut reply = upstream
            .command(b"AUTH XOAUTH2")
            .await
            .map_err(|e| unreachable("AUTH", e))?;
        if reply.code == 334 {
            reply = upstream
                .command(sasl.expose().as_bytes())
                .await
                .map_err(|e| unreachable("AUTH", e))?;
        }
        if reply.code == 334 {
            // A challenge after our response reports an error (base64 JSON,
            // Google and Postfix): an empty line fetches the final reply.
            reply = upstream
                .command(b"")
                .await
                .map_err(|e| unreachable("AUTH", e))?;
        }
        match reply.code {
            235 => Ok(upstream),
            421 | 450..=499 => Err(UpstreamError::Unreachable(format!(
                "SMTP server {server} answered AUTH with `{}`",
                reply.text()
            ))),
            _ => {
                let text = reply.text();
                let hint = if text.contains("5.7.139") || text.contains("SmtpClientAuthentication")
                {
                    SMTP_AUTH_DISABLED_HINT
                } else {
                    SMTP_HINT
                };
                Err(UpstreamError::Rejected { reply: text, hint })
            }
        }
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(result) => result,
        Err(_) => Err(UpstreamError::Unreachable(format!(
            "the SMTP server {server} did not complete the login within {}",
            humantime::format_duration(timeout)
        ))),
    }
}

/// Sends `command` (if any) and expects a reply with `code`.
async fn expect<S>(
    stream: &mut BufReader<S>,
    command: Option<&[u8]>,
    code: u16,
) -> Result<Reply, ReplyError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    if let Some(command) = command {
        let s = stream.get_mut();
        s.write_all(command).await.map_err(ReplyError::io)?;
        s.write_all(b"\r\n").await.map_err(ReplyError::io)?;
        s.flush().await.map_err(ReplyError::io)?;
    }
    let reply = read_reply(stream).await?;
    if reply.code == code {
        Ok(reply)
    } else {
        Err(ReplyError(format!("unexpected reply `{}`", reply.text())))
    }
}

/// `[127.0.0.1]`: the EHLO name of a host without a public name (RFC 5321 §4.1.3).
fn address_literal(tcp: &tokio::net::TcpStream) -> String {
    match tcp.local_addr().map(|a| a.ip()) {
        Ok(std::net::IpAddr::V4(ip)) => format!("[{ip}]"),
        Ok(std::net::IpAddr::V6(ip)) => format!("[IPv6:{ip}]"),
        Err(_) => "[127.0.0.1]".to_string(),
    }
}

/// The enhanced status code (`5.7.139`) in a reply text, if any.
pub fn enhanced_code(text: &str) -> Option<&str> {
    let candidate = text.get(4..)?.split_whitespace().next()?;
    let mut parts = candidate.split('.');
    let ok = parts.next().is_some_and(|c| matches!(c, "2" | "4" | "5"))
        && parts.clone().count() == 2
        && parts.all(|p| !p.is_empty() && p.len() <= 3 && p.bytes().all(|b| b.is_ascii_digit()));
    ok.then_some(candidate)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn multi_line_replies_are_read_whole() {
        let mut input: &[u8] =
            b"250-mock Hello\r\n250-SIZE 157286400\r\n250 PIPELINING\r\n354 go\r\n";
        let reply = read_reply(&mut input).await.unwrap();
        assert_eq!(reply.code, 250);
        assert_eq!(reply.ehlo_keywords(), vec!["SIZE 157286400", "PIPELINING"]);
        assert_eq!(read_reply(&mut input).await.unwrap().code, 354);
        let mut bad: &[u8] = b"hello\r\n";
        assert_eq!(
            read_reply(&mut bad).await.unwrap_err().to_string(),
            "the server sent a malformed reply"
        );
    }

    #[test]
    fn enhanced_codes() {
        assert_eq!(
            enhanced_code(
                "535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled"
            ),
            Some("5.7.139")
        );
        assert_eq!(enhanced_code("535 Authentication failed"), None);
    }
}
