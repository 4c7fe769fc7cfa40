//! Microsoft Graph `sendMail` with MIME content: how mail leaves for tenants
//! where SMTP AUTH is off (`send_via = "graph"`, or `auto` after 5.7.139).
//!
//! The message goes as the client wrote it: `POST
//! {graph_url}/v1.0/users/{mailbox}/sendMail`, the MIME in base64 as a
//! `text/plain` body, answered `202 Accepted` (queued for delivery, saved to
//! Sent Items). Graph takes its recipients from the MIME headers, not from an
//! envelope, so envelope recipients the headers do not name (Bcc, which
//! nodemailer strips from the header) are added as a `Bcc` header first
//! ([`headers::with_bcc`]); nothing else of the message changes. The
//! other way round, a header naming an address the envelope does not is
//! refused (554) before any request: Graph would deliver to it too.
//!
//! Graph refuses a request larger than 4 MB ([`MAX_REQUEST`]); the base64 body
//! makes that about 3 MB of message ([`MAX_MESSAGE`]). Larger messages would
//! need a draft and upload sessions; they are refused instead (552), never cut.

pub mod headers;

use std::collections::HashMap;
use std::time::Duration;

use base64::Engine as _;

use crate::config::{Config, Provider};
use crate::secret::Secret;

/// Graph's limit on one request's body.
pub const MAX_REQUEST: usize = 4 * 1024 * 1024;
/// The largest message whose base64 fits in [`MAX_REQUEST`].
pub const MAX_MESSAGE: usize = MAX_REQUEST / 4 * 3;

/// Why Graph did not accept a message; the session turns each into a reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SendError {
    /// 401: the token was not accepted.
    Unauthorized,
    /// 403: the app or the user lacks a permission; Graph's error code.
    Forbidden(String),
    /// 429, or 503 and the like: try again, after `Retry-After` if given.
    Throttled(Option<Duration>),
    /// 413: larger than Graph takes.
    TooLarge,
    /// Graph could not be reached: the message was not sent.
    Unreachable(String),
    /// Graph did not answer in time after the request went out: the message
    /// may have been sent.
    Unconfirmed(String),
    /// Any other refusal: the status and Graph's error code.
    Refused(u16, String),
}

/// One HTTPS client per provider (its `ca_file` and timeouts).
pub struct Graph {
    clients: HashMap<String, reqwest::Client>,
    /// A request's deadline before its body's share ([`request_timeout`]).
    timeout: Duration,
}

/// Each this many bytes of request body add a second to its deadline.
const BYTES_PER_SECOND: usize = 64 * 1024;

/// The deadline of a request with `body_len` bytes of body: `base`, plus a
/// second per 64 KiB, so that a large message on a slow uplink is not cut
/// off while it is still being sent (4 MB: about a minute more).
fn request_timeout(base: Duration, body_len: usize) -> Duration {
    base + Duration::from_secs((body_len / BYTES_PER_SECOND) as u64)
}

impl Graph {
    pub fn new(config: &Config) -> Result<Self, String> {
        let timeout = config.server.upstream_timeout.max(Duration::from_secs(30));
        let mut clients = HashMap::new();
        for (name, provider) in &config.providers {
            let client = crate::tls::https_client(provider.ca_file.as_deref(), timeout)
                .map_err(|e| format!("provider `{name}`: {e}"))?;
            clients.insert(name.clone(), client);
        }
        Ok(Graph { clients, timeout })
    }

    /// Submits `mime` (at most [`MAX_MESSAGE`] bytes) as `mailbox` with
    /// `token`.
    pub async fn send_mime(
        &self,
        provider: &Provider,
        mailbox: &str,
        token: &Secret,
        mime: &[u8],
    ) -> Result<(), SendError> {
        let url = send_mail_url(&provider.graph_url, mailbox)?;
        let body = base64::engine::general_purpose::STANDARD.encode(mime);
        let client = &self.clients[&provider.name];
        let response = client
            .post(url)
            .bearer_auth(token.expose())
            .header(reqwest::header::CONTENT_TYPE, "text/plain")
            .timeout(request_timeout(self.timeout, body.len()))
            .body(body)
            .send()
            .await
            .map_err(|e| failed(&e, &provider.graph_url))?;
        let status = response.status().as_u16();
        if status == 202 || status == 200 {
            return Ok(());
        }
        let retry_after = retry_after(response.headers());
        let code = error_code(response).await;
        Err(match status {
            401 => SendError::Unauthorized,
            403 => SendError::Forbidden(code),
            413 => SendError::TooLarge,
            429 | 503 | 504 => SendError::Throttled(retry_after),
            _ => SendError::Refused(status, code),
        })
    }
}

/// `{graph_url}/v1.0/users/{mailbox}/sendMail`, the mailbox one encoded
/// path segment.
fn send_mail_url(graph_url: &str, mailbox: &str) -> Result<reqwest::Url, SendError> {
    let mut url = reqwest::Url::parse(graph_url)
        .map_err(|e| SendError::Unreachable(format!("graph_url {graph_url} is not a URL ({e})")))?;
    url.path_segments_mut()
        .map_err(|_| SendError::Unreachable(format!("graph_url {graph_url} cannot be a base")))?
        .pop_if_empty()
        .extend(["v1.0", "users", mailbox, "sendMail"]);
    Ok(url)
}

/// `Retry-After` in seconds (Graph sends seconds, not dates).
fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let value = headers.get(reqwest::header::RETRY_AFTER)?.to_str().ok()?;
    value.trim().parse::<u64>().ok().map(Duration::from_secs)
}

/// Graph's `error.code` (`ErrorAccessDenied`, …), printable and bounded; the
/// body is read at most 64 KiB deep and never quoted whole.
async fn error_code(mut response: reqwest::Response) -> String {
    let mut body = Vec::new();
    while let Ok(Some(chunk)) = response.chunk().await {
        body.extend_from_slice(&chunk);
        if body.len() > 64 * 1024 {
            break;
        }
    }
    serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v.pointer("/error/code")?.as_str().map(str::to_string))
        .map(|c| {
            c.chars()
                .filter(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == '.')
                .take(80)
                .collect()
        })
        .filter(|c: &String| !c.is_empty())
        .unwrap_or_else(|| "no error code".to_string())
}

/// A request that got no answer: a timeout once connected may have
/// delivered the request, and Graph may have sent the message.
fn failed(e: &reqwest::Error, graph_url: &str) -> SendError {
    if e.is_timeout() && !e.is_connect() {
        SendError::Unconfirmed(describe(e, graph_url))
    } else {
        SendError::Unreachable(describe(e, graph_url))
    }
}

/// Why Graph could not be reached, without the URL's secrets (it has none,
/// but reqwest's text names the URL: the chain's tail says why).
fn describe(e: &reqwest::Error, graph_url: &str) -> String {
    if e.is_timeout() {
        return format!("Microsoft Graph at {graph_url} did not answer in time");
    }
    let text = crate::error::chain(e);
    let why = text.rsplit(": ").next().unwrap_or(&text);
    format!("cannot reach Microsoft Graph at {graph_url}: {why}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mailbox_is_one_path_segment_of_the_send_mail_url() {
        let url = send_mail_url("https://graph.microsoft.com", "shared@contoso.com").unwrap();
        assert_eq!(
            url.as_str(),
            "https://graph.microsoft.com/v1.0/users/shared@contoso.com/sendMail"
        );
        let odd = send_mail_url("http://127.0.0.1:8080/", "a/b?c#d@x").unwrap();
        assert_eq!(
            odd.as_str(),
            "http://127.0.0.1:8080/v1.0/users/a%2Fb%3Fc%23d@x/sendMail"
        );
    }

    #[test]
    fn a_larger_body_gets_a_longer_deadline() {
        let base = Duration::from_secs(30);
        assert_eq!(request_timeout(base, 1000), base);
        assert_eq!(
            request_timeout(base, MAX_REQUEST),
            base + Duration::from_secs(64)
        );
    }

    #[test]
    fn the_largest_message_fits_graphs_request_limit_in_base64() {
        let b64 = |n: usize| n.div_ceil(3) * 4;
        assert!(b64(MAX_MESSAGE) <= MAX_REQUEST);
        assert!(b64(MAX_MESSAGE + 1) > MAX_REQUEST);
    }
}
