//! Microsoft's error shape: `error`, an `AADSTS<code>: …` description with
//! trace and correlation IDs, and the texts Entra writes for the codes the
//! proxy is expected to know.

use serde_json::json;

use super::http::{Response, uuid};

pub(super) fn aad_error(status: u16, error: &str, code: u32, text: &str) -> Response {
    let trace = uuid();
    let correlation = uuid();
    let timestamp = utc_timestamp();
    Response::json(
        status,
        &json!({
            "error": error,
            "error_description": format!("AADSTS{code}: {text}\r\nTrace ID: {trace}\r\nCorrelation ID: {correlation}\r\nTimestamp: {timestamp}"),
            "error_codes": [code],
            "timestamp": timestamp,
            "trace_id": trace,
            "correlation_id": correlation,
            "error_uri": format!("https://login.microsoftonline.com/error?code={code}"),
        }),
    )
}

/// Realistic description text for the AADSTS codes the proxy is expected to know.
pub(super) fn default_text(code: u32, client_id: &str) -> String {
    match code {
        50011 => format!("The redirect URI specified in the request does not match the redirect URIs configured for the application '{client_id}'. Make sure the redirect URI sent in the request matches one added to your application in the Azure portal."),
        50076 => "Due to a configuration change made by your administrator, or because you moved to a new location, you must use multi-factor authentication to access '00000002-0000-0ff1-ce00-000000000000'.".to_string(),
        50173 => "The provided grant has expired due to it being revoked, a fresh auth token is needed. The user might have changed or reset their password.".to_string(),
        54005 => "OAuth2 Authorization code was already redeemed, please retry with a new valid code or use an existing refresh token.".to_string(),
        65001 => format!("The user or administrator has not consented to use the application with ID '{client_id}' named 'xoauth2-proxy'. Send an interactive authorization request for this user and resource."),
        65004 => "User declined to consent to access the app.".to_string(),
        70000 => "The provided value for the 'refresh_token' is not valid. The refresh token has been revoked, has already been used or was issued to another client.".to_string(),
        70008 => "The provided authorization code or refresh token has expired due to inactivity. Send a new interactive authorization request for this user and resource.".to_string(),
        70016 => "OAuth 2.0 device flow error. Authorization is pending. Continue polling.".to_string(),
        70019 => "Verification code expired.".to_string(),
        90002 => "Tenant not found. Check to make sure you have the correct tenant ID and are signing into the correct cloud.".to_string(),
        700016 => format!("Application with identifier '{client_id}' was not found in the directory 'Contoso'. This can happen if the application has not been installed by the administrator of the tenant or consented to by any user in the tenant. You may have sent your authentication request to the wrong tenant."),
        700022 => "The provided value for the input parameter scope is not valid because it contains more than one resource.".to_string(),
        700025 => "Client is public so neither 'client_assertion' nor 'client_secret' should be presented.".to_string(),
        700082 => "The refresh token has expired due to inactivity. The token was issued on 2024-01-01T00:00:00.0000000Z and was inactive for 90.00:00:00.".to_string(),
        501481 => "The Code_Verifier does not match the code_challenge supplied in the authorization request.".to_string(),
        7000215 => format!("Invalid client secret provided. Ensure the secret being sent in the request is the client secret value, not the client secret ID, for a secret added to app '{client_id}'."),
        7000218 => "The request body must contain the following parameter: 'client_assertion' or 'client_secret'.".to_string(),
        7000222 => format!("The provided client secret keys for app '{client_id}' are expired. Visit the Azure portal to create new keys for your app: https://aka.ms/NewClientSecret, or consider using certificate credentials for added security: https://aka.ms/certCreds."),
        _ => "The request could not be completed.".to_string(),
    }
}

/// `YYYY-MM-DD HH:MM:SSZ`, as Entra writes it.
pub(super) fn utc_timestamp() -> String {
    let t = crate::dates::utc_now();
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}Z",
        t.year, t.month, t.day, t.hour, t.minute, t.second
    )
}
