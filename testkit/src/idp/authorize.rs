//! The authorize endpoint: a sign-in that approves (or declines) at once and
//! redirects with a code for the authorization code flow.

use std::sync::Arc;

use super::aadsts::default_text;
use super::http::{Response, parse_form, url_encode, uuid};
use super::token::new_secret;
use super::{CodeGrant, DEFAULT_DELEGATED_SCOPES, DeviceOutcome, Grant, Shared};

pub(super) fn authorize(shared: &Arc<Shared>, query: &str) -> Response {
    let q = parse_form(query);
    let mut inner = shared.inner.lock().unwrap();
    let page = |status: u16, text: &str| {
        Response::html(
            status,
            &format!("<html><body><h1>Sign in</h1><p>{text}</p></body></html>"),
        )
    };
    let Some(client_id) = q.get("client_id") else {
        return page(
            400,
            "AADSTS900144: The request body must contain the following parameter: 'client_id'.",
        );
    };
    if !inner.clients.contains_key(client_id) {
        return page(
            400,
            &format!("AADSTS{}: {}", 700016, default_text(700016, client_id)),
        );
    }
    let Some(redirect_uri) = q.get("redirect_uri").cloned() else {
        return page(
            400,
            "AADSTS900144: The request body must contain the following parameter: 'redirect_uri'.",
        );
    };
    if q.get("response_type").map(String::as_str) != Some("code") {
        return page(
            400,
            "AADSTS900144: The request body must contain the following parameter: 'response_type'.",
        );
    }
    let state = q.get("state").cloned();
    let sep = if redirect_uri.contains('?') { '&' } else { '?' };
    let mut location = if inner.device_outcome == DeviceOutcome::Decline {
        format!(
            "{redirect_uri}{sep}error=access_denied&error_description={}",
            url_encode(&format!("AADSTS65004: {}", default_text(65004, "")))
        )
    } else {
        let scope = q
            .get("scope")
            .cloned()
            .unwrap_or_else(|| DEFAULT_DELEGATED_SCOPES.to_string());
        let code = new_secret(&mut inner, "0.AUoA", 700);
        let challenge = q.get("code_challenge").cloned().map(|c| {
            let method = q
                .get("code_challenge_method")
                .cloned()
                .unwrap_or_else(|| "plain".to_string());
            (c, method)
        });
        let grant = Grant {
            mailbox: inner.device_user.clone(),
            client_id: Some(client_id.clone()),
            scope,
        };
        inner.codes.insert(
            code.clone(),
            CodeGrant {
                grant,
                redirect_uri: Some(redirect_uri.clone()),
                code_challenge: challenge,
            },
        );
        format!("{redirect_uri}{sep}code={}", url_encode(&code))
    };
    if let Some(state) = state {
        location.push_str(&format!("&state={}", url_encode(&state)));
    }
    location.push_str(&format!("&session_state={}", uuid()));
    let mut resp = page(302, "Redirecting");
    resp.location = Some(location);
    resp
}
