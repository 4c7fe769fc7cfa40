//! For real mail servers and test scripts: RFC 7662 token introspection and
//! the `/control/…` hooks.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use serde_json::{Value, json};

use super::Shared;
use super::http::{Request, Response, parse_form};
use crate::tokens::Subject;

/// The introspection endpoint and the control hooks; `None` for other paths.
pub(super) fn control(shared: &Arc<Shared>, req: &Request) -> Option<Response> {
    let form = || req.form();
    let resp = match (req.method.as_str(), req.path.as_str()) {
        ("POST", "/introspect") => introspect(shared, &form()),
        ("GET", "/control/counts") => {
            let c = shared.inner.lock().unwrap().counts.clone();
            Response::json(
                200,
                &json!({
                    "device_code_requests": c.device_code_requests,
                    "device_polls": c.device_polls,
                    "refresh_grants": c.refresh_grants,
                    "client_credentials_grants": c.client_credentials_grants,
                    "authorization_code_grants": c.authorization_code_grants,
                    "failed": c.failed,
                    "superseded_refresh_tokens_presented": c.superseded_refresh_tokens_presented,
                    "introspections": c.introspections,
                    "introspections_active": c.introspections_active,
                }),
            )
        }
        ("GET", "/control/refresh-tokens") => {
            let q = parse_form(&req.query);
            let mailbox = q.get("mailbox").cloned().unwrap_or_default();
            let inner = shared.inner.lock().unwrap();
            let valid: Vec<&String> = inner
                .refresh
                .iter()
                .filter(|(_, g)| g.mailbox.eq_ignore_ascii_case(&mailbox))
                .map(|(t, _)| t)
                .collect();
            Response::json(200, &json!({ "refresh_tokens": valid }))
        }
        ("GET", "/control/graph-messages") => {
            let sent = shared.inner.lock().unwrap().graph_sent.clone();
            let list: Vec<Value> = sent
                .iter()
                .map(|m| {
                    json!({
                        "mailbox": m.mailbox,
                        "token_user": m.token_user,
                        "mime_base64": base64::engine::general_purpose::STANDARD.encode(&m.mime),
                    })
                })
                .collect();
            Response::json(200, &json!({ "messages": list }))
        }
        ("GET", "/control/requests") => {
            let inner = shared.inner.lock().unwrap();
            let list: Vec<Value> = inner
                .requests
                .iter()
                .map(|r| {
                    json!({
                        "path": r.path,
                        "grant_type": r.grant_type,
                        "client_id": r.client_id,
                        "scope": r.scope,
                        "secret_presented": r.secret_presented,
                        "status": r.status,
                        "error": r.error,
                    })
                })
                .collect();
            Response::json(200, &json!({ "requests": list }))
        }
        ("GET", "/control/secrets") => {
            let mut all = shared.inner.lock().unwrap().secrets.clone();
            all.extend(shared.tokens.all_tokens());
            Response::json(200, &json!({ "secrets": all }))
        }
        ("POST", "/control/revoke") => match form().get("mailbox") {
            Some(mailbox) => {
                shared
                    .inner
                    .lock()
                    .unwrap()
                    .refresh
                    .retain(|_, g| !g.mailbox.eq_ignore_ascii_case(mailbox));
                shared.tokens.revoke_mailbox(mailbox);
                Response::json(200, &json!({ "revoked": mailbox }))
            }
            None => Response::json(400, &json!({ "error": "form field `mailbox` missing" })),
        },
        ("POST", "/control/revoke-access-tokens") => match form().get("mailbox") {
            Some(mailbox) => {
                shared.tokens.revoke_mailbox(mailbox);
                Response::json(200, &json!({ "revoked_access_tokens": mailbox }))
            }
            None => Response::json(400, &json!({ "error": "form field `mailbox` missing" })),
        },
        ("POST", "/control/device-user") => match form().get("mailbox") {
            Some(mailbox) => {
                shared.inner.lock().unwrap().device_user = mailbox.clone();
                Response::json(200, &json!({ "device_user": mailbox }))
            }
            None => Response::json(400, &json!({ "error": "form field `mailbox` missing" })),
        },
        (_, "/introspect") => Response::method_not_allowed(),
        _ if req.path.starts_with("/control/") => Response::not_found(),
        _ => return None,
    };
    Some(resp)
}

/// RFC 7662: is the token active, and whose mailbox may it open (`email`, which
/// Dovecot compares with the `user=` of the XOAUTH2 string).
pub(super) fn introspect(shared: &Arc<Shared>, form: &HashMap<String, String>) -> Response {
    let found = form
        .get("token")
        .and_then(|t| shared.tokens.lookup(t.trim()));
    let mut inner = shared.inner.lock().unwrap();
    inner.counts.introspections += 1;
    let mailbox = match found {
        Some((Subject::Mailbox(m), left)) => Some((m, left)),
        Some((Subject::App, left)) => inner.app_mailbox.clone().map(|m| (m, left)),
        None => None,
    };
    let Some((mailbox, left)) = mailbox else {
        return Response::json(200, &json!({ "active": false }));
    };
    inner.counts.introspections_active += 1;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    Response::json(
        200,
        &json!({
            "active": true,
            "email": mailbox,
            "sub": mailbox,
            "token_type": "Bearer",
            "exp": now + left.as_secs(),
            "iat": now,
        }),
    )
}
