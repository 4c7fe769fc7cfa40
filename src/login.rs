//! The login path both protocols share: local password → account → access
//! token → authenticated upstream connection.
//!
//! The protocol modules supply only `open`, which turns a token into an
//! authenticated upstream session; everything else (the failure delay, the
//! retry with a new token when the upstream refuses a cached one, what is
//! logged) happens here, once.

use std::future::Future;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use tracing::{debug, info, warn};

use crate::accounts::{Accounts, Refused};
use crate::config::Account;
use crate::metrics::LoginOutcome;
use crate::oauth::{AccessToken, TokenError, TokenManager};
use crate::secret::Secret;
use crate::throttle::Blocked;
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
    /// The identity provider cannot be reached now (or answers nonsense).
    IdpUnavailable,
    /// The upstream server cannot be reached now.
    UpstreamUnavailable,
    /// The upstream refused a fresh token; the server's reply.
    UpstreamRejected(String),
    /// The client's address is throttled after too many failed logins; it
    /// is told what a wrong password gets.
    Throttled,
    /// Every password check slot and queue place is taken: try again later.
    Busy,
}

/// The `logins` metric's outcome label for a login's result.
impl<T> From<&Result<T, LoginError>> for LoginOutcome {
    fn from(result: &Result<T, LoginError>) -> Self {
        match result {
            Ok(_) => LoginOutcome::Ok,
            Err(LoginError::BadCredentials) => LoginOutcome::BadPassword,
            Err(LoginError::NotAuthorised) => LoginOutcome::NotAuthorised,
            Err(LoginError::Refused) => LoginOutcome::IdpRefused,
            Err(LoginError::UpstreamRejected(_)) => LoginOutcome::UpstreamRejected,
            Err(LoginError::IdpUnavailable) => LoginOutcome::IdpUnavailable,
            Err(LoginError::UpstreamUnavailable) => LoginOutcome::UpstreamUnavailable,
            Err(LoginError::Throttled) => LoginOutcome::Throttled,
            Err(LoginError::Busy) => LoginOutcome::Busy,
        }
    }
}

/// The account for `username` if `password` is its local password and
/// `client` is not throttled. A refusal takes at least `failure_delay`
/// (`server.auth_failure_delay`), whatever the check cost, so unknown users,
/// wrong passwords and throttled addresses look alike; only "busy" (no
/// password check slot free) is answered at once.
pub async fn check_password(
    accounts: &Accounts,
    failure_delay: Duration,
    client: IpAddr,
    username: &str,
    password: &[u8],
) -> Result<Account, LoginError> {
    let started = Instant::now();
    let refused = match accounts.verify(client, username, password).await {
        Ok(account) => {
            tracing::Span::current().record("account", account.username.as_str());
            return Ok(account);
        }
        Err(refused) => refused,
    };
    let user = printable(username);
    let error = match refused {
        Refused::Busy => {
            debug!(user = %user, "login refused: every password check slot is taken; told to try again later");
            return Err(LoginError::Busy);
        }
        Refused::Throttled => {
            debug!(user = %user, "login refused unchecked: {client} is throttled");
            LoginError::Throttled
        }
        Refused::Wrong { known, blocked } => {
            let why = if known {
                "wrong password"
            } else {
                "unknown user"
            };
            info!(user = %user, "login refused: {why}");
            log_throttling(client, &user, blocked);
            LoginError::BadCredentials
        }
    };
    tokio::time::sleep_until((started + failure_delay).into()).await;
    Err(error)
}

/// One line for each back-off a failure started.
fn log_throttling(client: IpAddr, user: &str, blocked: Blocked) {
    let duration = |d| humantime::format_duration(d);
    if let Some(backoff) = blocked.user {
        warn!(
            "throttling logins as {user} from {client} for {} after repeated failures (server.max_failed_logins); other addresses are not affected",
            duration(backoff)
        );
    }
    if let Some(backoff) = blocked.address {
        warn!(
            "throttling every login from {client} for {} after repeated failures (server.max_failed_logins_per_address)",
            duration(backoff)
        );
    }
}

/// Why [`open_with_token`] produced no session.
#[derive(Debug)]
pub enum OpenError {
    Token(TokenError),
    Upstream(UpstreamError),
}

/// Opens an upstream session as `account` with its access token. When the
/// upstream refuses a cached token, the token is replaced once and the open
/// retried; a fresh token that is refused is reported.
pub async fn open_with_token<T, F, Fut>(
    tokens: &TokenManager,
    account: &Account,
    open: F,
) -> Result<T, OpenError>
where
    F: Fn(Account, Secret) -> Fut,
    Fut: Future<Output = Result<T, UpstreamError>>,
{
    let token = tokens
        .access_token(&account.username)
        .await
        .map_err(OpenError::Token)?;
    open_from(tokens, account, token, open).await
}

/// [`open_with_token`] starting with `token`, which the caller has just got
/// from `tokens`.
async fn open_from<T, F, Fut>(
    tokens: &TokenManager,
    account: &Account,
    mut token: AccessToken,
    open: F,
) -> Result<T, OpenError>
where
    F: Fn(Account, Secret) -> Fut,
    Fut: Future<Output = Result<T, UpstreamError>>,
{
    let mut result = open(account.clone(), token.token.clone()).await;
    if let Err(UpstreamError::Rejected { reply, .. }) = &result
        && !token.fresh
    {
        info!(reply = %reply, "upstream refused the cached token; getting a new one");
        tokens.reject(&account.username, &token.token).await;
        token = tokens
            .access_token(&account.username)
            .await
            .map_err(OpenError::Token)?;
        result = open(account.clone(), token.token.clone()).await;
    }
    result.map_err(OpenError::Upstream)
}

/// [`open_with_token`] for a client login: the failure is logged and reduced
/// to what the client is told.
pub async fn open_as<T, F, Fut>(
    tokens: &TokenManager,
    account: &Account,
    open: F,
) -> Result<T, LoginError>
where
    F: Fn(Account, Secret) -> Fut,
    Fut: Future<Output = Result<T, UpstreamError>>,
{
    let opened = open_with_token(tokens, account, open).await;
    opened.map_err(|e| login_error(account, e))
}

/// [`open_as`] starting with `token` from [`grant_token`], so that a fresh
/// token is known as such (one the upstream refuses is not refreshed again).
pub async fn open_as_from<T, F, Fut>(
    tokens: &TokenManager,
    account: &Account,
    token: AccessToken,
    open: F,
) -> Result<T, LoginError>
where
    F: Fn(Account, Secret) -> Fut,
    Fut: Future<Output = Result<T, UpstreamError>>,
{
    let opened = open_from(tokens, account, token, open).await;
    opened.map_err(|e| login_error(account, e))
}

/// Logs why no session was opened for a client login and reduces it to what
/// the client is told.
fn login_error(account: &Account, e: OpenError) -> LoginError {
    match e {
        OpenError::Token(e) => token_error(e),
        OpenError::Upstream(UpstreamError::Rejected { reply, hint }) => {
            warn!(mailbox = %account.mailbox, "the upstream server refused the login: {reply} — {hint}");
            LoginError::UpstreamRejected(reply)
        }
        OpenError::Upstream(UpstreamError::Unreachable(reason)) => {
            warn!("{reason}");
            LoginError::UpstreamUnavailable
        }
    }
}

/// Checks that `account` still has a usable grant: free while the cached
/// access token is fresh, a refresh near its expiry. A login that will be
/// served by an already authenticated upstream connection (the SMTP pool)
/// must still not outlive a revoked grant.
pub async fn check_grant(tokens: &TokenManager, account: &Account) -> Result<(), LoginError> {
    tokens
        .access_token(&account.username)
        .await
        .map(|_| ())
        .map_err(token_error)
}

/// [`check_grant`], returning the access token in force: a session opened
/// with another token (an older one) is not to be handed out.
pub async fn grant_token(
    tokens: &TokenManager,
    account: &Account,
) -> Result<AccessToken, LoginError> {
    tokens
        .access_token(&account.username)
        .await
        .map_err(token_error)
}

/// Logs a token failure and reduces it to what the client is told.
fn token_error(e: TokenError) -> LoginError {
    match &e {
        TokenError::NeedsLogin { .. } => warn!("{e}"),
        TokenError::Refused(_) | TokenError::Unavailable(_) => info!("no access token: {e}"),
    }
    match e {
        TokenError::NeedsLogin { .. } => LoginError::NotAuthorised,
        TokenError::Refused(_) => LoginError::Refused,
        TokenError::Unavailable(_) => LoginError::IdpUnavailable,
    }
}

/// A username as it may appear in a log line: printable and bounded.
pub fn printable(username: &str) -> String {
    username
        .chars()
        .take(100)
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}
