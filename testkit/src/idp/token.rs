//! The token and devicecode endpoints: client authentication, the grants
//! (device code, refresh token, client credentials, authorization code) and
//! the scope rules Entra applies.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{Value, json};
use tokio::sync::watch;

use super::aadsts::{aad_error, default_text};
use super::http::{Request, Response, url_decode};
use super::{DeviceGrant, DeviceOutcome, Grant, IdpMode, Inner, Shared, TokenRequest, rotation};
use crate::tokens::{Subject, TokenBook, random_text};

/// Handles a token or devicecode request; `None` means "never answer" (Hang).
pub(super) async fn token_like(
    shared: &Arc<Shared>,
    req: &Request,
    endpoint: &str,
    stop: &mut watch::Receiver<bool>,
) -> Option<Response> {
    let _in_flight = InFlight::new(shared);
    let form = req.form();
    let basic = basic_credentials(req);
    let grant_type = form.get("grant_type").cloned();
    let client_id = form
        .get("client_id")
        .cloned()
        .or_else(|| basic.as_ref().map(|(id, _)| id.clone()));
    let secret_presented =
        form.contains_key("client_secret") || basic.as_ref().is_some_and(|(_, s)| !s.is_empty());

    let (index, mode, delay) = {
        let mut inner = shared.inner.lock().unwrap();
        if endpoint == "devicecode" {
            inner.counts.device_code_requests += 1;
        } else {
            match grant_type.as_deref() {
                Some("urn:ietf:params:oauth:grant-type:device_code") => {
                    inner.counts.device_polls += 1
                }
                Some("refresh_token") => inner.counts.refresh_grants += 1,
                Some("client_credentials") => inner.counts.client_credentials_grants += 1,
                Some("authorization_code") => inner.counts.authorization_code_grants += 1,
                _ => {}
            }
        }
        inner.requests.push(TokenRequest {
            path: req.path.clone(),
            grant_type: if endpoint == "devicecode" {
                None
            } else {
                grant_type.clone()
            },
            client_id: client_id.clone(),
            scope: form.get("scope").cloned(),
            secret_presented,
            basic_auth: basic.is_some(),
            status: 0,
            error: None,
        });
        (inner.requests.len() - 1, inner.mode.clone(), inner.delay)
    };

    if mode == IdpMode::Hang {
        shared.inner.lock().unwrap().counts.failed += 1;
        return None;
    }
    if !delay.is_zero() {
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stop.wait_for(|s| *s) => return None,
        }
    }

    let resp = match mode {
        IdpMode::Hang => unreachable!(),
        IdpMode::Unavailable => Response::html(
            503,
            "<!DOCTYPE html><html><head><title>Service Unavailable</title></head><body><h2>Service Unavailable</h2><hr><p>HTTP Error 503. The service is unavailable.</p></body></html>",
        ),
        IdpMode::Garbage => Response::html(
            200,
            "<html><head><title>Sign in to your account</title></head><body>Working...</body></html>",
        ),
        IdpMode::Error {
            status,
            error,
            code,
        } => aad_error(
            status,
            &error,
            code,
            &default_text(code, client_id.as_deref().unwrap_or("")),
        ),
        IdpMode::Normal => {
            let mut inner = shared.inner.lock().unwrap();
            let outcome = if endpoint == "devicecode" {
                device_authorization(&mut inner, &form, client_id.as_deref(), basic.as_ref())
            } else {
                token_grant(
                    &shared.tokens,
                    &mut inner,
                    &form,
                    client_id.as_deref(),
                    basic.as_ref(),
                )
            };
            outcome.unwrap_or_else(|e| e)
        }
    };

    let garbage =
        matches!(resp.status, 200) && serde_json::from_slice::<Value>(&resp.body).is_err();
    let error = resp.error_name();
    let (answer_delay, held) = {
        let mut inner = shared.inner.lock().unwrap();
        let benign = matches!(
            error.as_deref(),
            Some("authorization_pending") | Some("slow_down")
        );
        if (error.is_some() && !benign) || garbage {
            inner.counts.failed += 1;
        }
        if let Some(r) = inner.requests.get_mut(index) {
            r.status = resp.status;
            r.error = error;
        }
        (inner.answer_delay, inner.held.take())
    };
    if !answer_delay.is_zero() {
        tokio::select! {
            _ = tokio::time::sleep(answer_delay) => {}
            _ = stop.wait_for(|s| *s) => return None,
        }
    }
    if let Some(held) = held {
        tokio::select! {
            _ = held => {}
            _ = stop.wait_for(|s| *s) => return None,
        }
    }
    Some(resp)
}

/// Counts a token or devicecode request from its arrival until it is
/// answered or dropped (its client went away).
struct InFlight(Arc<Shared>);

impl InFlight {
    fn new(shared: &Arc<Shared>) -> Self {
        shared.inner.lock().unwrap().in_flight += 1;
        InFlight(shared.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Ok(mut inner) = self.0.inner.lock() {
            inner.in_flight -= 1;
        }
    }
}

pub(super) type Basic = (String, String);

pub(super) fn basic_credentials(req: &Request) -> Option<Basic> {
    let value = req.header("authorization")?;
    let (scheme, b64) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let raw = base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .ok()?;
    let raw = String::from_utf8(raw).ok()?;
    let (id, secret) = raw.split_once(':')?;
    Some((url_decode(id), url_decode(secret)))
}

/// Client authentication: `Ok(true)` for a confidential client that proved itself
/// with its secret, `Ok(false)` for a public client (or, where the secret is not
/// required, a confidential client that sent none).
pub(super) fn authenticate_client(
    inner: &Inner,
    form: &HashMap<String, String>,
    client_id: Option<&str>,
    basic: Option<&Basic>,
    require_secret_for_confidential: bool,
) -> Result<bool, Response> {
    let Some(client_id) = client_id else {
        return Err(missing("client_id"));
    };
    if let (Some(form_id), Some((basic_id, _))) = (form.get("client_id"), basic)
        && form_id != basic_id
    {
        return Err(aad_error(
            400,
            "invalid_request",
            900144,
            "The client_id in the request body does not match the client_id in the Authorization header.",
        ));
    }
    let Some(registered) = inner.clients.get(client_id) else {
        return Err(aad_error(
            400,
            "unauthorized_client",
            700016,
            &default_text(700016, client_id),
        ));
    };
    let presented = form
        .get("client_secret")
        .cloned()
        .or_else(|| basic.map(|(_, s)| s.clone()))
        .filter(|s| !s.is_empty());
    match (registered, presented) {
        (Some(expected), Some(got)) => {
            if &got == expected {
                Ok(true)
            } else {
                Err(aad_error(
                    401,
                    "invalid_client",
                    7000215,
                    &default_text(7000215, client_id),
                ))
            }
        }
        (Some(_), None) => {
            if require_secret_for_confidential {
                Err(aad_error(
                    401,
                    "invalid_client",
                    7000218,
                    &default_text(7000218, client_id),
                ))
            } else {
                Ok(false)
            }
        }
        (None, Some(_)) => {
            if require_secret_for_confidential {
                Err(aad_error(
                    401,
                    "invalid_client",
                    700025,
                    &default_text(700025, client_id),
                ))
            } else {
                Ok(false)
            }
        }
        (None, None) => Ok(false),
    }
}

pub(super) fn device_authorization(
    inner: &mut Inner,
    form: &HashMap<String, String>,
    client_id: Option<&str>,
    basic: Option<&Basic>,
) -> Result<Response, Response> {
    // The devicecode endpoint does not require the secret, but a wrong one is refused.
    authenticate_client(inner, form, client_id, basic, false)?;
    let client_id = client_id.unwrap_or_default().to_string();
    let scope = required_scope(form, false)?;
    let device_code = new_secret(inner, "DAQABIQEAAADW6jl31mB3T7ugrWTT8pFe", 260);
    let user_code: String = random_text(9)
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                'K'
            }
        })
        .collect();
    let expires_in = inner.device_expires_in;
    inner.devices.insert(
        device_code.clone(),
        DeviceGrant {
            client_id,
            scope,
            expires_at: Instant::now() + Duration::from_secs(expires_in),
            polls: 0,
            user_code: user_code.clone(),
            approved: false,
        },
    );
    let verification_uri = match inner.device_outcome {
        DeviceOutcome::ApproveInBrowser => format!("{}/devicelogin", inner.base_url),
        _ => "https://microsoft.com/devicelogin".to_string(),
    };
    Ok(Response::json(
        200,
        &json!({
            "user_code": user_code,
            "device_code": device_code,
            "verification_uri": verification_uri,
            "expires_in": expires_in,
            "interval": inner.device_interval,
            "message": format!("To sign in, use a web browser to open the page {verification_uri} and enter the code {user_code} to authenticate."),
        }),
    ))
}

pub(super) fn token_grant(
    tokens: &TokenBook,
    inner: &mut Inner,
    form: &HashMap<String, String>,
    client_id: Option<&str>,
    basic: Option<&Basic>,
) -> Result<Response, Response> {
    let grant_type = form.get("grant_type").map(String::as_str).unwrap_or("");
    if grant_type.is_empty() {
        return Err(missing("grant_type"));
    }
    let confidential = authenticate_client(inner, form, client_id, basic, true)?;
    let client_id = client_id.unwrap_or_default().to_string();
    match grant_type {
        "urn:ietf:params:oauth:grant-type:device_code" => {
            let Some(code) = form.get("device_code") else {
                return Err(missing("device_code"));
            };
            let outcome = inner.device_outcome.clone();
            let Some(device) = inner.devices.get_mut(code) else {
                return Err(aad_error(
                    400,
                    "invalid_grant",
                    70000,
                    "The provided value for the 'device_code' is not valid. The device code may have already been redeemed.",
                ));
            };
            if device.client_id != client_id {
                return Err(aad_error(
                    400,
                    "invalid_grant",
                    70000,
                    "The provided value for the 'device_code' is not valid. It was issued to a different client.",
                ));
            }
            if Instant::now() >= device.expires_at {
                return Err(aad_error(
                    400,
                    "expired_token",
                    70019,
                    &default_text(70019, ""),
                ));
            }
            device.polls += 1;
            let poll = device.polls;
            let pending = || {
                aad_error(
                    400,
                    "authorization_pending",
                    70016,
                    &default_text(70016, ""),
                )
            };
            match outcome {
                DeviceOutcome::ApproveAfterPolls(n) if poll <= n => return Err(pending()),
                DeviceOutcome::ApproveInBrowser if !device.approved => return Err(pending()),
                DeviceOutcome::SlowDownThenApprove if poll == 1 => {
                    return Err(aad_error(
                        400,
                        "slow_down",
                        70016,
                        "OAuth 2.0 device flow error. Polling too frequently; slow down.",
                    ));
                }
                DeviceOutcome::SlowDownThenApprove if poll == 2 => return Err(pending()),
                DeviceOutcome::Decline => {
                    return Err(aad_error(
                        400,
                        "authorization_declined",
                        65004,
                        &default_text(65004, ""),
                    ));
                }
                DeviceOutcome::Expire => {
                    return Err(aad_error(
                        400,
                        "expired_token",
                        70019,
                        &default_text(70019, ""),
                    ));
                }
                _ => {}
            }
            let device = inner.devices.remove(code).unwrap();
            let grant = Grant {
                mailbox: inner.device_user.clone(),
                client_id: Some(client_id),
                scope: device.scope,
            };
            Ok(delegated_tokens(tokens, inner, grant, None, None))
        }
        "refresh_token" => {
            let Some(rt) = form.get("refresh_token") else {
                return Err(missing("refresh_token"));
            };
            let valid = inner
                .refresh
                .get(rt)
                .is_some_and(|g| g.client_id.as_deref().is_none_or(|c| c == client_id));
            if !valid {
                rotation::refused(inner, rt);
                return Err(aad_error(
                    400,
                    "invalid_grant",
                    70000,
                    &default_text(70000, ""),
                ));
            }
            let requested = form.get("scope").cloned().filter(|s| !s.trim().is_empty());
            if let Some(scope) = &requested {
                check_scope(scope, false)?;
            }
            let mut grant = rotation::redeem(inner, rt);
            grant.client_id = Some(client_id);
            // The new refresh token keeps the grant's scopes (offline_access included).
            Ok(delegated_tokens(tokens, inner, grant, requested, Some(rt)))
        }
        "client_credentials" => {
            if !confidential {
                return Err(aad_error(
                    401,
                    "invalid_client",
                    7000218,
                    &default_text(7000218, &client_id),
                ));
            }
            let scope = required_scope(form, true)?;
            let lifetime = inner.access_lifetime;
            let access = if targets_exchange(&scope) {
                tokens.issue(Subject::App, lifetime)
            } else if targets_graph(&scope) {
                // The application permissions an admin granted the app.
                let roles = inner.graph_app_roles.clone();
                tokens.issue_graph(Subject::App, roles, lifetime)
            } else {
                foreign_token()
            };
            inner.secrets.push(access.clone());
            let secs = lifetime_secs(lifetime);
            Ok(Response::json(
                200,
                &json!({
                    "token_type": "Bearer",
                    "expires_in": secs,
                    "ext_expires_in": secs,
                    "access_token": access,
                }),
            ))
        }
        "authorization_code" => {
            let Some(code) = form.get("code") else {
                return Err(missing("code"));
            };
            if inner.redeemed_codes.contains(code) {
                return Err(aad_error(
                    400,
                    "invalid_grant",
                    54005,
                    &default_text(54005, ""),
                ));
            }
            let Some(entry) = inner.codes.get(code) else {
                return Err(aad_error(
                    400,
                    "invalid_grant",
                    70000,
                    "The provided value for the 'code' parameter is not valid.",
                ));
            };
            if entry
                .grant
                .client_id
                .as_deref()
                .is_some_and(|c| c != client_id)
            {
                return Err(aad_error(
                    400,
                    "invalid_grant",
                    70000,
                    "The provided value for the 'code' parameter is not valid. The code was issued to a different client.",
                ));
            }
            if let Some(expected) = &entry.redirect_uri
                && form.get("redirect_uri") != Some(expected)
            {
                return Err(aad_error(
                    400,
                    "invalid_grant",
                    50011,
                    &default_text(50011, &client_id),
                ));
            }
            if let Some((challenge, method)) = &entry.code_challenge {
                let verifier = form.get("code_verifier").cloned().unwrap_or_default();
                let computed = if method.eq_ignore_ascii_case("S256") {
                    use sha2::Digest;
                    base64::engine::general_purpose::URL_SAFE_NO_PAD
                        .encode(sha2::Sha256::digest(verifier.as_bytes()))
                } else {
                    verifier.clone()
                };
                if verifier.is_empty() || &computed != challenge {
                    return Err(aad_error(
                        400,
                        "invalid_grant",
                        501481,
                        &default_text(501481, ""),
                    ));
                }
            }
            let entry = inner.codes.remove(code).unwrap();
            inner.redeemed_codes.insert(code.clone());
            let mut grant = entry.grant;
            grant.client_id = Some(client_id);
            Ok(delegated_tokens(tokens, inner, grant, None, None))
        }
        other => Err(aad_error(
            400,
            "unsupported_grant_type",
            70003,
            &format!("The app requested an unsupported grant type '{other}'."),
        )),
    }
}

/// Issues an access token (and a refresh token if the grant has
/// offline_access, in place of `replaces` when a refresh token was redeemed).
pub(super) fn delegated_tokens(
    tokens: &TokenBook,
    inner: &mut Inner,
    grant: Grant,
    requested_scope: Option<String>,
    replaces: Option<&str>,
) -> Response {
    let scope = requested_scope.unwrap_or_else(|| grant.scope.clone());
    let lifetime = inner.access_lifetime;
    let subject = Subject::Mailbox(grant.mailbox.clone());
    let access = if targets_exchange(&scope) {
        tokens.issue(subject, lifetime)
    } else if targets_graph(&scope) {
        tokens.issue_graph(subject, graph_permissions(&scope), lifetime)
    } else {
        foreign_token()
    };
    inner.secrets.push(access.clone());
    let granted: Vec<&str> = scope
        .split_whitespace()
        .filter(|s| !s.eq_ignore_ascii_case("offline_access"))
        .collect();
    let secs = lifetime_secs(lifetime);
    let mut body = json!({
        "token_type": "Bearer",
        "scope": granted.join(" "),
        "expires_in": secs,
        "ext_expires_in": secs,
        "access_token": access,
    });
    if has_scope(&scope, "openid") {
        let user = inner
            .preferred_usernames
            .get(&grant.mailbox.to_ascii_lowercase())
            .unwrap_or(&grant.mailbox);
        body["id_token"] = Value::String(id_token(user, grant.client_id.as_deref()));
    }
    let offline = has_scope(&grant.scope, "offline_access");
    if offline {
        let rt = new_refresh_token(inner, grant);
        if let Some(replaced) = replaces {
            rotation::issued(inner, replaced, &rt);
        }
        body["refresh_token"] = Value::String(rt);
    }
    Response::json(200, &body)
}

pub(super) fn new_refresh_token(inner: &mut Inner, grant: Grant) -> String {
    let rt = new_secret(inner, "0.AXEAk9", 900);
    inner.refresh.insert(rt.clone(), grant);
    rt
}

pub(super) fn new_secret(inner: &mut Inner, prefix: &str, len: usize) -> String {
    let s = format!("{prefix}{}", random_text(len));
    inner.secrets.push(s.clone());
    s
}

/// A token for some other resource (Graph): valid-looking, but not in the book.
pub(super) fn foreign_token() -> String {
    format!("eyJ0eXAi.{}", random_text(1800))
}

pub(super) fn lifetime_secs(lifetime: Duration) -> u64 {
    lifetime.as_secs().max(1)
}

/// The resource a scope belongs to; `None` for OpenID scopes.
pub(super) fn scope_resource(scope: &str) -> Option<String> {
    let lower = scope.to_ascii_lowercase();
    if ["openid", "profile", "email", "offline_access"].contains(&lower.as_str()) {
        return None;
    }
    if lower.contains("://") {
        let cut = lower.rfind('/').unwrap_or(lower.len());
        Some(lower[..cut].to_string())
    } else {
        // A bare scope name means Microsoft Graph.
        Some("https://graph.microsoft.com".to_string())
    }
}

fn has_scope(scope: &str, name: &str) -> bool {
    scope
        .split_whitespace()
        .any(|s| s.eq_ignore_ascii_case(name))
}

/// An OpenID Connect ID token naming `user` as Entra's v2.0 endpoint does
/// (`preferred_username`). Its signature is random bytes: the proxy reads
/// the claims of a token it got over TLS from the token endpoint, and does
/// not check it.
fn id_token(user: &str, client_id: Option<&str>) -> String {
    let b64 = |v: &Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let header = json!({"typ": "JWT", "alg": "RS256", "kid": "mock"});
    let claims = json!({
        "aud": client_id.unwrap_or_default(),
        "iss": "https://login.microsoftonline.com/00000000-0000-0000-0000-000000000000/v2.0",
        "iat": now,
        "nbf": now,
        "exp": now + 3600,
        "name": user.split('@').next().unwrap_or(user),
        "preferred_username": user,
        "oid": crate::idp::http::uuid(),
        "tid": "00000000-0000-0000-0000-000000000000",
        "ver": "2.0",
    });
    format!("{}.{}.{}", b64(&header), b64(&claims), random_text(86))
}

/// Whether `scope` names Microsoft Graph (fully qualified or bare).
pub(super) fn targets_graph(scope: &str) -> bool {
    scope
        .split_whitespace()
        .filter_map(scope_resource)
        .any(|r| r == "https://graph.microsoft.com")
}

/// The Graph permissions of `scope`, without their resource.
fn graph_permissions(scope: &str) -> Vec<String> {
    scope
        .split_whitespace()
        .filter(|s| scope_resource(s).is_some_and(|r| r == "https://graph.microsoft.com"))
        .map(|s| s.rsplit('/').next().unwrap_or(s).to_string())
        .collect()
}

pub(super) fn targets_exchange(scope: &str) -> bool {
    scope
        .split_whitespace()
        .filter_map(scope_resource)
        .any(|r| r == "https://outlook.office.com" || r == "https://outlook.office365.com")
}

/// AADSTS900144: a required parameter is missing from the request.
fn missing(parameter: &str) -> Response {
    aad_error(
        400,
        "invalid_request",
        900144,
        &format!("The request body must contain the following parameter: '{parameter}'."),
    )
}

/// The request's `scope`, present and valid for the grant.
fn required_scope(
    form: &HashMap<String, String>,
    client_credentials: bool,
) -> Result<String, Response> {
    let scope = form.get("scope").cloned().unwrap_or_default();
    if scope.trim().is_empty() {
        return Err(missing("scope"));
    }
    check_scope(&scope, client_credentials)?;
    Ok(scope)
}

pub(super) fn check_scope(scope: &str, client_credentials: bool) -> Result<(), Response> {
    let resources: HashSet<String> = scope
        .split_whitespace()
        .filter_map(scope_resource)
        .collect();
    if resources.len() > 1 {
        return Err(aad_error(
            400,
            "invalid_scope",
            700022,
            &format!(
                "The provided value for the input parameter scope is not valid because it contains more than one resource. Scope {scope} is not valid."
            ),
        ));
    }
    if client_credentials {
        let all_default = scope
            .split_whitespace()
            .all(|s| s.to_ascii_lowercase().ends_with("/.default"));
        if !all_default {
            return Err(aad_error(
                400,
                "invalid_scope",
                1002012,
                &format!(
                    "The provided value for scope {scope} is not valid. Client credential flows must have a scope value with /.default suffixed to the resource identifier (application ID URI)."
                ),
            ));
        }
    }
    Ok(())
}
