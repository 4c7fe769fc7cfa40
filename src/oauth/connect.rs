//! Connecting an account from the console: the flows of `xoauth2-proxy
//! login` ([`super::authorize`]) split where a person must act, so that a
//! web page can show the device code, or send the browser to the identity
//! provider, while the proxy finishes on its own. The grant is stored through
//! [`TokenManager::signed_in`]: the same grant store, the same locks as a
//! refresh and as `login` in another process, and the same checks
//! ([`super::authorize::signed_in`]).

use std::time::Duration;

use oauth2::{PkceCodeVerifier, RedirectUrl, StandardDeviceAuthorizationResponse};

use super::TokenManager;
use super::authorize::device_error_retry;

/// How the console asks for another try.
const RETRY: &str = "press Connect again";

/// A device sign-in waiting for the person: what the page shows.
pub struct DeviceSignIn {
    /// The code the person types at `verification_uri`: shown by design,
    /// and worthless once the sign-in ends or expires.
    pub user_code: String,
    pub verification_uri: String,
    pub expires_in: Duration,
    details: StandardDeviceAuthorizationResponse,
}

/// Asks the identity provider for a device code for `username`.
pub async fn start_device(tokens: &TokenManager, username: &str) -> Result<DeviceSignIn, String> {
    let (_, provider, scopes) = tokens.sign_in_client(username).map_err(|e| e.to_string())?;
    let details = provider
        .device_authorize(&scopes)
        .await
        .map_err(|e| e.message)?;
    Ok(DeviceSignIn {
        user_code: details.user_code().secret().clone(),
        verification_uri: details.verification_uri().to_string(),
        expires_in: details.expires_in(),
        details,
    })
}

/// Polls until the person has signed in (or declined, or the code expired),
/// then stores the grant. The error is a sentence for the page.
pub async fn finish_device(
    tokens: &TokenManager,
    username: &str,
    sign_in: &DeviceSignIn,
) -> Result<(), String> {
    let (_, provider, _) = tokens.sign_in_client(username).map_err(|e| e.to_string())?;
    let grant = provider
        .device_poll(&sign_in.details, tokio::time::sleep)
        .await
        .map_err(|e| device_error_retry(&e, RETRY))?;
    tokens.signed_in(username, grant).await
}

/// A browser sign-in (authorization code with PKCE) under way: where to
/// send the browser, and what redeems the code when it comes back.
pub struct BrowserSignIn {
    /// The identity provider's authorize URL, with `state` and the PKCE challenge.
    pub url: String,
    /// Comes back with the code; the console finds the sign-in by it.
    pub state: String,
    verifier: PkceCodeVerifier,
    redirect: RedirectUrl,
}

/// Starts a browser sign-in for `username` that returns to `redirect_uri`.
pub fn start_browser(
    tokens: &TokenManager,
    username: &str,
    redirect_uri: &str,
) -> Result<BrowserSignIn, String> {
    let (_, provider, scopes) = tokens.sign_in_client(username).map_err(|e| e.to_string())?;
    let redirect = RedirectUrl::new(redirect_uri.to_string()).map_err(|e| {
        format!("the console's callback {redirect_uri} is not a URL ({e}); fix `admin.public_url`")
    })?;
    let (url, state, verifier) = provider.authorize_url(&scopes, Some(&redirect));
    Ok(BrowserSignIn {
        url,
        state,
        verifier,
        redirect,
    })
}

/// Redeems the code the browser brought back and stores the grant.
pub async fn finish_browser(
    tokens: &TokenManager,
    username: &str,
    sign_in: BrowserSignIn,
    code: String,
) -> Result<(), String> {
    let (_, provider, _) = tokens.sign_in_client(username).map_err(|e| e.to_string())?;
    let grant = provider
        .authorization_code(code, sign_in.verifier, Some(&sign_in.redirect))
        .await
        .map_err(|e| e.message)?;
    tokens.signed_in(username, grant).await
}
