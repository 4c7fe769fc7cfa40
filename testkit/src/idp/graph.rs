//! A mock of Microsoft Graph's `sendMail` with MIME content, in the identity
//! provider's process so that one address serves tokens and Graph:
//! `POST /v1.0/users/{mailbox}/sendMail`, body the MIME message in base64,
//! `Content-Type: text/plain`, answered `202 Accepted` with no body.
//!
//! What it checks, as Graph does: a bearer token issued for Graph (an
//! Exchange token gets 401 `InvalidAuthenticationToken`); `Mail.Send` for the
//! token user's own mailbox, `Mail.Send.Shared` and Send As (the
//! [`TokenBook`](crate::tokens::TokenBook)'s shared mailboxes) for another,
//! the `Mail.Send` application role for app-only tokens (403
//! `ErrorAccessDenied` otherwise); the body base64 (400
//! `ErrorMimeContentInvalidBase64String`); at most 4 MB (413). Each accepted
//! message is recorded decoded, byte for byte. Faults queued with
//! [`MockIdp::push_graph_fault`](super::MockIdp::push_graph_fault) answer the
//! next requests first.

use std::sync::Arc;

use base64::Engine as _;
use hyper::Method;
use serde_json::json;

use super::Shared;
use super::http::{Request, Response, url_decode};
use crate::tokens::Subject;

/// Graph's limit on a request (the base64 body).
pub const GRAPH_MAX_REQUEST: usize = 4 * 1024 * 1024;

/// One message Graph accepted.
#[derive(Clone, Debug)]
pub struct GraphMessage {
    /// The `{mailbox}` of the URL, as sent.
    pub mailbox: String,
    /// The token's user (`None` for app-only).
    pub token_user: Option<String>,
    /// The MIME message, decoded from the body.
    pub mime: Vec<u8>,
}

/// An answer to give instead of handling the next `sendMail`.
#[derive(Clone, Debug)]
pub struct GraphFault {
    pub status: u16,
    /// Graph's `error.code`.
    pub code: String,
    pub retry_after: Option<u64>,
}

/// Handles `POST /v1.0/users/{mailbox}/sendMail`; `None` for other paths.
pub(super) fn send_mail(shared: &Arc<Shared>, req: &Request) -> Option<Response> {
    let path = req.path.strip_prefix("/v1.0/users/")?;
    let mailbox = url_decode(path.strip_suffix("/sendMail")?);
    if req.method != Method::POST {
        return Some(Response::method_not_allowed());
    }
    let response = answer(shared, req, &mailbox);
    shared.graph_changed.notify_waiters();
    Some(response)
}

fn answer(shared: &Shared, req: &Request, mailbox: &str) -> Response {
    let fault = {
        let mut inner = shared.inner.lock().unwrap();
        inner.graph_requests += 1;
        inner.graph_faults.pop_front()
    };
    if let Some(fault) = fault {
        let mut response = error(fault.status, &fault.code, "Injected by the test.");
        response.retry_after = fault.retry_after;
        return response;
    }
    let token = req
        .header("authorization")
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default();
    let Some((subject, permissions)) = shared.tokens.graph_lookup(token.trim()) else {
        return error(
            401,
            "InvalidAuthenticationToken",
            "Access token validation failure. Invalid audience.",
        );
    };
    if let Err(response) = allowed(shared, &subject, &permissions, mailbox) {
        return response;
    }
    if !req
        .header("content-type")
        .is_some_and(|t| t.starts_with("text/plain"))
    {
        return error(
            415,
            "UnsupportedMediaType",
            "MIME content must be sent as text/plain.",
        );
    }
    if req.body.len() > GRAPH_MAX_REQUEST {
        return error(413, "RequestBodyTooLarge", "The request is too large.");
    }
    let Ok(mime) = base64::engine::general_purpose::STANDARD.decode(req.body.trim_ascii()) else {
        return error(
            400,
            "ErrorMimeContentInvalidBase64String",
            "Invalid base64 string for MIME content.",
        );
    };
    let token_user = match subject {
        Subject::Mailbox(user) => Some(user),
        Subject::App => None,
    };
    shared.inner.lock().unwrap().graph_sent.push(GraphMessage {
        mailbox: mailbox.to_string(),
        token_user,
        mime,
    });
    Response::html(202, "")
}

/// Whether `subject` with `permissions` may send as `mailbox`.
fn allowed(
    shared: &Shared,
    subject: &Subject,
    permissions: &[String],
    mailbox: &str,
) -> Result<(), Response> {
    let has = |p: &str| permissions.iter().any(|g| g.eq_ignore_ascii_case(p));
    let denied = || {
        Err(error(
            403,
            "ErrorAccessDenied",
            "Access is denied. Check credentials and try again.",
        ))
    };
    match subject {
        Subject::App if has("Mail.Send") => Ok(()),
        Subject::App => denied(),
        Subject::Mailbox(user) if user.eq_ignore_ascii_case(mailbox) => {
            if has("Mail.Send") {
                Ok(())
            } else {
                denied()
            }
        }
        Subject::Mailbox(user) => {
            if !has("Mail.Send.Shared") {
                return denied();
            }
            if shared.tokens.send_as_granted(user, mailbox) {
                Ok(())
            } else {
                Err(error(
                    403,
                    "ErrorSendAsDenied",
                    "The user account which was used to submit this request does not have the right to send mail on behalf of the specified sending account.",
                ))
            }
        }
    }
}

/// Graph's error shape: `{"error": {"code", "message", "innerError"}}`.
fn error(status: u16, code: &str, message: &str) -> Response {
    Response::json(
        status,
        &json!({
            "error": {
                "code": code,
                "message": message,
                "innerError": {"request-id": super::http::uuid()},
            }
        }),
    )
}
