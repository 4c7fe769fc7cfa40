//! SMTP transactions that leave through Microsoft Graph (`send_via =
//! "graph"`, or `auto` once SMTP answered 5.7.139): the proxy answers MAIL
//! and RCPT itself, reads the whole message at DATA and gives the client its
//! `250` only after Graph accepted it (202). What each Graph failure becomes
//! for the client is decided here, in [`submit`], once.

use std::collections::HashSet;
use std::sync::Mutex;

use tracing::{info, warn};

use crate::config::{Account, SendVia};
use crate::graph::{MAX_MESSAGE, SendError, headers};
use crate::login::LoginError;
use crate::oauth::TokenError;
use crate::shared::Shared;

/// Exchange Online's default limit of recipients per message.
pub const MAX_RECIPIENTS: usize = 500;

/// How an account's transactions leave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    Smtp,
    Graph,
}

/// The mailboxes with `send_via = "auto"` that SMTP refused with 5.7.139:
/// they stay on Graph for as long as the listener lives (a restart tries
/// SMTP again).
#[derive(Default)]
pub struct Switched {
    mailboxes: Mutex<HashSet<String>>,
}

impl Switched {
    fn key(account: &Account) -> String {
        format!("{}\0{}", account.provider, account.mailbox.to_lowercase())
    }

    /// Where `account`'s transactions go now.
    pub fn route(&self, account: &Account) -> Route {
        match account.send_via {
            SendVia::Smtp => Route::Smtp,
            SendVia::Graph => Route::Graph,
            SendVia::Auto if self.contains(account) => Route::Graph,
            SendVia::Auto => Route::Smtp,
        }
    }

    fn contains(&self, account: &Account) -> bool {
        let mailboxes = self.mailboxes.lock().expect("not poisoned");
        mailboxes.contains(&Self::key(account))
    }

    /// Switches `account` to Graph if SMTP's refusal `reply` says SMTP AUTH
    /// is disabled and the account allows it; true if it now sends via
    /// Graph. The first switch of a mailbox is logged and counted.
    pub fn switch_after(&self, account: &Account, reply: &str) -> bool {
        let disabled = reply.contains("5.7.139") || reply.contains("SmtpClientAuthentication");
        if account.send_via != SendVia::Auto || !disabled {
            return false;
        }
        let new = {
            let mut mailboxes = self.mailboxes.lock().expect("not poisoned");
            mailboxes.insert(Self::key(account))
        };
        if new {
            warn!(
                mailbox = %account.mailbox,
                "SMTP AUTH is disabled for this mailbox (5.7.139); sending its mail through Microsoft Graph from now on (send_via = \"auto\")"
            );
            crate::metrics::get()
                .graph_switches
                .get_or_create(&crate::metrics::AccountLabels {
                    account: account.username.clone(),
                })
                .inc();
        }
        true
    }
}

/// A transaction on its way to Graph: the envelope's recipients.
#[derive(Debug, Default)]
pub struct Transaction {
    pub recipients: Vec<String>,
}

/// The address of a `MAIL FROM:<…>` or `RCPT TO:<…>` line (`prefix` the
/// command and colon), parameters after it ignored; `None` when malformed.
/// The null reverse-path `<>` is an empty address; any other must be a
/// `Mailbox` (RFC 5321 §4.1.2), since it is written into the `Bcc` field.
pub fn path_argument(line: &[u8], prefix: &str) -> Option<String> {
    let text = std::str::from_utf8(line).ok()?;
    let head = text.get(..prefix.len())?;
    if !head.eq_ignore_ascii_case(prefix) {
        return None;
    }
    let path = text[prefix.len()..].trim_start().strip_prefix('<')?;
    let path = &path[..path.find('>')?];
    // A source route (`@a,@b:user@c`) is ignored, as servers do.
    let address = match path.strip_prefix('@') {
        Some(_) => &path[path.find(':')? + 1..],
        None => path,
    };
    (address.is_empty() || mailbox(address)).then(|| address.to_string())
}

/// `Mailbox = Local-part "@" ( Domain / address-literal )` (RFC 5321
/// §4.1.2), with UTF-8 allowed where RFC 6531 allows it.
fn mailbox(address: &str) -> bool {
    let Some((local, domain)) = address.rsplit_once('@') else {
        return false;
    };
    (dot_string(local) || quoted_string(local)) && (domain_name(domain) || address_literal(domain))
}

/// `Dot-string = Atom *("." Atom)`.
fn dot_string(text: &str) -> bool {
    text.split('.')
        .all(|atom| !atom.is_empty() && atom.chars().all(atext))
}

/// `atext` (RFC 5322 §3.2.3), and any non-ASCII character (RFC 6531).
fn atext(c: char) -> bool {
    c.is_ascii_alphanumeric() || "!#$%&'*+-/=?^_`{|}~".contains(c) || !c.is_ascii()
}

/// `Quoted-string = DQUOTE *QcontentSMTP DQUOTE`: printable characters,
/// a backslash quoting the next one.
fn quoted_string(text: &str) -> bool {
    let Some(inner) = text.strip_prefix('"').and_then(|t| t.strip_suffix('"')) else {
        return false;
    };
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        let ok = match c {
            '\\' => chars
                .next()
                .is_some_and(|q| q == ' ' || q.is_ascii_graphic()),
            '"' => false,
            c => c == ' ' || c.is_ascii_graphic() || !c.is_ascii(),
        };
        if !ok {
            return false;
        }
    }
    true
}

/// `Domain = sub-domain *("." sub-domain)`, letters, digits and inner
/// hyphens (and UTF-8 labels, RFC 6531).
fn domain_name(text: &str) -> bool {
    text.split('.').all(|label| {
        !label.is_empty()
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || !c.is_ascii())
    })
}

/// `address-literal = "[" ( IPv4 / IPv6 / General ) "]"`, checked for
/// its brackets and printable content.
fn address_literal(text: &str) -> bool {
    text.strip_prefix('[')
        .and_then(|t| t.strip_suffix(']'))
        .is_some_and(|inner| {
            !inner.is_empty()
                && inner
                    .bytes()
                    .all(|b| b.is_ascii_graphic() && !matches!(b, b'[' | b']' | b'\\'))
        })
}

/// Checks at AUTH that a Graph token can be had for `account`, so that a
/// missing grant or permission surfaces at login, not at the first message.
pub async fn ready(shared: &Shared, account: &Account) -> Result<(), LoginError> {
    shared
        .tokens
        .graph_token(&account.username)
        .await
        .map(|_| ())
        .map_err(|e| match e {
            TokenError::NeedsLogin { .. } => LoginError::NotAuthorised,
            TokenError::Refused(_) => LoginError::Refused,
            TokenError::Unavailable(_) => LoginError::IdpUnavailable,
        })
}

/// The client's reply to a message submitted to Graph, and whether the
/// connection closes after it.
pub struct Verdict {
    pub code: u16,
    pub text: String,
    pub close: bool,
}

impl Verdict {
    fn new(code: u16, text: impl Into<String>) -> Self {
        Verdict {
            code,
            text: text.into(),
            close: code == 421,
        }
    }
}

/// What the operator adds in Entra when Graph answers 403.
const PERMISSION_FIX: &str = "the app needs the Microsoft Graph permission Mail.Send (delegated; plus Mail.Send.Shared for a shared mailbox, whose signed-in user needs Send As on it) or, for client_credentials, the Mail.Send application permission, with admin consent: add it under Entra > App registrations > API permissions and grant admin consent";

/// The verdict on a message longer than Graph takes, which was not read
/// whole: refused, never cut.
pub fn too_large(account: &Account) -> Verdict {
    let outcome = Err(Failure::Send(SendError::TooLarge));
    count(account, &outcome);
    send_verdict(account, SendError::TooLarge)
}

/// The reply to a message whose To, Cc or Bcc names an address its
/// envelope does not: Graph takes recipients from the header, so it would
/// deliver to addresses the client did not ask for (a resent or forwarded
/// message, a list expansion); refused, never sent.
const BEYOND_ENVELOPE: &str = "5.6.0 The message's To/Cc/Bcc names recipients that are not in the envelope (RCPT TO); Microsoft Graph would deliver to them too: send with matching recipients or use send_via = \"smtp\"";

/// Submits `message` (unstuffed, as the client sent it) for `account`,
/// with a `Bcc` field for the envelope recipients its header does not
/// name; refused when its header names recipients the envelope does not.
/// A cached token Graph refuses is replaced once.
pub async fn submit(
    shared: &Shared,
    account: &Account,
    recipients: &[String],
    message: &[u8],
) -> Verdict {
    let extra = headers::beyond_envelope(message, recipients);
    if !extra.is_empty() {
        warn!(mailbox = %account.mailbox, count = extra.len(), "refused a message for Microsoft Graph whose header names recipients outside its envelope");
        count(
            account,
            &Err(Failure::Send(SendError::Refused(554, String::new()))),
        );
        return Verdict::new(554, BEYOND_ENVELOPE);
    }
    let mime = headers::with_bcc(message, recipients);
    let outcome = if mime.len() > MAX_MESSAGE {
        Err(Failure::Send(SendError::TooLarge))
    } else {
        send_with_retry(shared, account, &mime).await
    };
    count(account, &outcome);
    match outcome {
        Ok(()) => {
            info!(mailbox = %account.mailbox, bytes = mime.len(), recipients = recipients.len(), "Microsoft Graph accepted a message");
            Verdict::new(250, "2.0.0 OK: Microsoft Graph accepted the message")
        }
        Err(Failure::Token(e)) => token_verdict(e),
        Err(Failure::Send(e)) => send_verdict(account, e),
    }
}

enum Failure {
    Token(TokenError),
    Send(SendError),
}

async fn send_with_retry(shared: &Shared, account: &Account, mime: &[u8]) -> Result<(), Failure> {
    let provider = shared.config.provider(&account.provider);
    let tokens = &shared.tokens;
    let username = &account.username;
    let mut token = tokens.graph_token(username).await.map_err(Failure::Token)?;
    let mut result = shared
        .graph
        .send_mime(provider, &account.mailbox, &token.token, mime)
        .await;
    if result == Err(SendError::Unauthorized) && !token.fresh {
        info!(mailbox = %account.mailbox, "Microsoft Graph refused the cached token; getting a new one");
        tokens.reject_graph(username, &token.token).await;
        token = tokens.graph_token(username).await.map_err(Failure::Token)?;
        result = shared
            .graph
            .send_mime(provider, &account.mailbox, &token.token, mime)
            .await;
    }
    result.map_err(Failure::Send)
}

/// No Graph token (the token manager has logged why).
fn token_verdict(e: TokenError) -> Verdict {
    match e {
        TokenError::NeedsLogin { .. } => Verdict::new(
            535,
            "5.7.8 The account is not authorised for Microsoft Graph; see the proxy's log",
        ),
        TokenError::Refused(_) => Verdict::new(
            535,
            "5.7.8 The identity provider refused a token for Microsoft Graph; see the proxy's log",
        ),
        TokenError::Unavailable(_) => Verdict::new(
            451,
            "4.7.0 The identity provider is unavailable; try again later",
        ),
    }
}

/// Graph's refusal, told to the client and, with what to fix, to the log.
fn send_verdict(account: &Account, e: SendError) -> Verdict {
    let mailbox = &account.mailbox;
    match e {
        SendError::Unauthorized => {
            warn!(mailbox = %mailbox, "Microsoft Graph refused a new access token (401); check that the app registration is in the mailbox's tenant and that graph_url is right");
            Verdict::new(
                535,
                "5.7.8 Microsoft Graph refused the access token; see the proxy's log",
            )
        }
        SendError::Forbidden(code) => {
            warn!(mailbox = %mailbox, "Microsoft Graph refused to send as {mailbox} ({code}): {PERMISSION_FIX}");
            Verdict::new(
                550,
                format!(
                    "5.7.1 Microsoft Graph refused to send as {mailbox} ({code}); {PERMISSION_FIX}"
                ),
            )
        }
        SendError::Throttled(after) => {
            let when = after
                .map(|d| format!("in {} s", d.as_secs().max(1)))
                .unwrap_or_else(|| "later".to_string());
            info!(mailbox = %mailbox, "Microsoft Graph asked to try again {when}");
            Verdict::new(
                451,
                format!(
                    "4.7.0 Microsoft Graph is busy or throttling this mailbox; try again {when}"
                ),
            )
        }
        SendError::TooLarge => Verdict::new(
            552,
            format!(
                "5.3.4 Message too large for Microsoft Graph, which takes at most 4 MB per request, about {} KB of message; it was not sent",
                MAX_MESSAGE / 1024
            ),
        ),
        SendError::Unreachable(why) => {
            warn!(mailbox = %mailbox, "{why}");
            Verdict::new(
                421,
                "4.4.1 Microsoft Graph cannot be reached; try again later",
            )
        }
        SendError::Unconfirmed(why) => {
            warn!(mailbox = %mailbox, "{why}; the message may have been sent");
            Verdict::new(
                451,
                "4.4.2 Microsoft Graph did not confirm the message; it may have been sent: check the Sent Items before sending it again",
            )
        }
        SendError::Refused(status, code) if status >= 500 => {
            warn!(mailbox = %mailbox, "Microsoft Graph failed with HTTP {status} ({code})");
            Verdict::new(
                451,
                format!("4.4.0 Microsoft Graph failed (HTTP {status}, {code}); try again later"),
            )
        }
        SendError::Refused(status, code) => {
            warn!(mailbox = %mailbox, "Microsoft Graph refused a message with HTTP {status} ({code})");
            Verdict::new(
                554,
                format!("5.6.0 Microsoft Graph refused the message (HTTP {status}, {code})"),
            )
        }
    }
}

/// Counts a submission in `graph_sends`.
fn count(account: &Account, outcome: &Result<(), Failure>) {
    let outcome = match outcome {
        Ok(()) => "ok",
        Err(Failure::Send(SendError::TooLarge)) => "too_large",
        Err(Failure::Send(SendError::Throttled(_))) => "throttled",
        Err(Failure::Send(SendError::Unreachable(_)))
        | Err(Failure::Send(SendError::Unconfirmed(_)))
        | Err(Failure::Token(TokenError::Unavailable(_))) => "unavailable",
        Err(Failure::Send(SendError::Refused(status, _))) if *status >= 500 => "unavailable",
        Err(_) => "refused",
    };
    crate::metrics::get()
        .graph_sends
        .get_or_create(&crate::metrics::TokenLabels {
            account: account.username.clone(),
            outcome,
        })
        .inc();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_of_mail_and_rcpt() {
        let cases: &[(&[u8], &str, Option<&str>)] = &[
            (
                b"MAIL FROM:<a@b.com> SIZE=10",
                "MAIL FROM:",
                Some("a@b.com"),
            ),
            (b"mail from: <a@b.com>", "MAIL FROM:", Some("a@b.com")),
            (b"MAIL FROM:<>", "MAIL FROM:", Some("")),
            (
                b"RCPT TO:<@relay:c@d.com> NOTIFY=NEVER",
                "RCPT TO:",
                Some("c@d.com"),
            ),
            (b"RCPT TO:c@d.com", "RCPT TO:", None),
            (b"RCPT TO:<c@d.com", "RCPT TO:", None),
            (b"RCPT TO:<c d@x>", "RCPT TO:", None),
            (b"RCPT", "RCPT TO:", None),
            (
                br#"RCPT TO:<"c d"@x.org>"#,
                "RCPT TO:",
                Some(r#""c d"@x.org"#),
            ),
            (br#"RCPT TO:<a@"x.com>"#, "RCPT TO:", None),
            (br#"RCPT TO:<"a"b"@x.com>"#, "RCPT TO:", None),
            (b"RCPT TO:<a..b@x.com>", "RCPT TO:", None),
            (
                b"RCPT TO:<a@[192.0.2.1]>",
                "RCPT TO:",
                Some("a@[192.0.2.1]"),
            ),
            (
                "RCPT TO:<jörg@bücher.de>".as_bytes(),
                "RCPT TO:",
                Some("jörg@bücher.de"),
            ),
            (b"RCPT TO:<a@-x.com>", "RCPT TO:", None),
            (b"RCPT TO:<a@>", "RCPT TO:", None),
        ];
        for (line, prefix, expected) in cases {
            assert_eq!(
                path_argument(line, prefix).as_deref(),
                *expected,
                "{}",
                String::from_utf8_lossy(line)
            );
        }
    }
}
