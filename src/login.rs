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
    let account = check_password(shared, username, password).await?;
    let session = open_as(shared, &account, open).await?;
    info!(mailbox = %account.mailbox, "logged in");
    Ok((account, session))
}

/// The account for `username` if `password` is its local password. A
/// failure takes at least `auth_failure_delay`, whatever the check cost, so
/// unknown users and wrong passwords look alike.
pub async fn check_password(
    shared: &Shared,
    username: &str,
    password: &[u8],
) -> Result<Account, LoginError> {
    let started = Instant::now();
    let Some(account) = shared.accounts.verify(username, password).await else {
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
    Ok(account)
}

/// Opens an upstream session as `account` with its access token. When the
/// upstream refuses a cached token, the token is replaced once and the open
/// retried; a fresh token that is refused is reported.
pub async fn open_as<T, F, Fut>(
    shared: &Shared,
    account: &Account,
    open: F,
) -> Result<T, LoginError>
where
    F: Fn(Account, Secret) -> Fut,
    Fut: Future<Output = Result<T, UpstreamError>>,
{
    let mut token = access_token(shared, account).await?;
    let mut result = open(account.clone(), token.token.clone()).await;
    if let Err(UpstreamError::Rejected { reply, .. }) = &result {
        if !token.fresh {
            info!(reply = %reply, "upstream refused the cached token; getting a new one");
            shared.tokens.reject(&account.username, &token.token).await;
            token = access_token(shared, account).await?;
            result = open(account.clone(), token.token.clone()).await;
        }
    }
    result.map_err(|e| match e {
        UpstreamError::Rejected { reply, hint } => {
            warn!(mailbox = %account.mailbox, "the upstream server refused the login: {reply} — {hint}");
            LoginError::UpstreamRejected(reply)
        }
        UpstreamError::Unreachable(reason) => {
            warn!("{reason}");
            LoginError::Unavailable
        }
    })
}

async fn access_token(
    shared: &Shared,
    account: &Account,
) -> Result<crate::oauth::AccessToken, LoginError> {
    shared
        .tokens
        .access_token(&account.username)
        .await
        .map_err(|e| {
            match &e {
                TokenError::NeedsLogin { .. } => warn!("{e}"),
                TokenError::Refused(_) | TokenError::Unavailable(_) => {
                    info!("no access token: {e}")
                }
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
