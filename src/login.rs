//! The login path both protocols share: local password → account → access
//! token → authenticated upstream connection.
//!
//! The protocol modules supply only `open`, which turns a token into an
//! authenticated upstream session; everything else (the failure delay, the
//! retry with a new token when the upstream refuses a cached one, what is
//! logged) happens here, once.

use std::future::Future;
use std::time::Instant;

use tracing::{info, warn};

use crate::config::Account;
use crate::oauth::TokenError;
use crate::secret::Secret;
use crate::server::Shared;
use crate::upstream::UpstreamError;

/// What went wrong, in the terms the client is told about.
#[derive(Debug)]
pub enum LoginError {
    /// Unknown user or wrong local password (indistinguishable to the client).
    BadCredentials,
    /// The account has no grant, or it was revoked: run `login`.
    NotAuthorised,
    /// The identity provider refuses the app registration.
    Refused,
    /// The identity provider or the upstream server cannot be reached now.
    Unavailable,
    /// The upstream refused a fresh token; the server's reply.
    UpstreamRejected(String),
}

/// Checks the local password and opens an authenticated upstream session for
/// the account with `open(account, token)`.
pub async fn login<T, F, Fut>(
    shared: &Shared,
    username: &str,
    password: &[u8],
    open: F,
) -> Result<(Account, T), LoginError>
where
    F: Fn(Account, Secret) -> Fut,
    Fut: Future<Output = Result<T, UpstreamError>>,
{
    let started = Instant::now();
    let Some(account) = shared.accounts.verify(username, password).await else {
        // Both cases take the same time, whatever the password check cost.
        tokio::time::sleep_until((started + shared.config.server.auth_failure_delay).into()).await;
        let why = if shared.accounts.knows(username) {
            "wrong password"
        } else {
            "unknown user"
        };
        info!(user = %printable(username), "login refused: {why}");
        return Err(LoginError::BadCredentials);
    };
    tracing::Span::current().record("account", account.username.as_str());

    let mut token = access_token(shared, &account).await?;
    let mut result = open(account.clone(), token.token.clone()).await;
    if let Err(UpstreamError::Rejected { reply, .. }) = &result {
        if !token.fresh {
            info!(reply = %reply, "upstream refused the cached token; getting a new one");
            shared.tokens.reject(&account.username, &token.token).await;
            token = access_token(shared, &account).await?;
            result = open(account.clone(), token.token.clone()).await;
        }
    }
    match result {
        Ok(session) => {
            info!(mailbox = %account.mailbox, "logged in");
            Ok((account, session))
        }
        Err(UpstreamError::Rejected { reply, hint }) => {
            warn!(mailbox = %account.mailbox, "the upstream server refused the login: {reply} — {hint}");
            Err(LoginError::UpstreamRejected(reply))
        }
        Err(UpstreamError::Unreachable(reason)) => {
            warn!("{reason}");
            Err(LoginError::Unavailable)
        }
    }
}

async fn access_token(shared: &Shared, account: &Account) -> Result<crate::oauth::AccessToken, LoginError> {
    shared
        .tokens
        .access_token(&account.username)
        .await
        .map_err(|e| {
            match &e {
                TokenError::NeedsLogin { .. } => warn!("{e}"),
                TokenError::Refused(_) | TokenError::Unavailable(_) => info!("no access token: {e}"),
            }
            match e {
                TokenError::NeedsLogin { .. } => LoginError::NotAuthorised,
                TokenError::Refused(_) => LoginError::Refused,
                TokenError::Unavailable(_) => LoginError::Unavailable,
            }
        })
}

/// A username as it may appear in a log line: printable and bounded.
pub fn printable(username: &str) -> String {
    username
        .chars()
        .take(100)
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}
