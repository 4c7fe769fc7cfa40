//! Access tokens: obtained, cached, refreshed ahead of expiry, and persisted.
//!
//! [`TokenManager::access_token`] is the one door the login path uses. Per
//! account it holds an async mutex, so however many clients log in at once,
//! one refresh runs and the others wait for its result (single flight). Each
//! rotated refresh token is saved atomically before the new access token is
//! handed out, so a crash never loses the grant.

mod aadsts;
pub mod authorize;
pub mod provider;
pub mod store;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::Mutex;
use tracing::{info, warn};

use crate::config::{Account, Config, Flow};
use crate::secret::Secret;
use aadsts::ErrorClass;
use provider::{Grant, GrantError, ProviderClient};
use store::{GrantLock, LoadError, StoredGrant, TokenStore, unix_now};

/// Why no access token could be had.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TokenError {
    /// No grant yet, or the identity provider says it is gone.
    #[error("account {account} is not authorised ({reason}); run `xoauth2-proxy login {account}`")]
    NeedsLogin { account: String, reason: String },
    /// The identity provider refuses the app registration.
    #[error("{0}")]
    Refused(String),
    /// The identity provider is unreachable, slow or confused: try later.
    #[error("{0}")]
    Unavailable(String),
}

/// An access token and whether it was obtained just now (a fresh token that
/// the upstream rejects is not worth refreshing again).
#[derive(Debug, Clone)]
pub struct AccessToken {
    pub token: Secret,
    pub fresh: bool,
}

/// The token state of every configured account.
pub struct TokenManager {
    accounts: HashMap<String, Arc<AccountTokens>>,
    store: TokenStore,
}

struct AccountTokens {
    account: Account,
    provider: Arc<ProviderClient>,
    scopes: Vec<String>,
    state: Mutex<Cached>,
}

#[derive(Default)]
struct Cached {
    grant: StoredGrant,
    /// The file's modification time when last read or written; a different
    /// one means `login` ran in another process.
    file_mtime: Option<SystemTime>,
    loaded: bool,
}

impl TokenManager {
    pub fn new(config: &Config, store: TokenStore) -> Result<Self, String> {
        let mut providers = HashMap::new();
        for (name, p) in &config.providers {
            let client = ProviderClient::new(p, config.server.idp_timeout)
                .map_err(|e| format!("provider `{name}`: {e}"))?;
            providers.insert(name.clone(), Arc::new(client));
        }
        let accounts = config
            .accounts
            .iter()
            .map(|a| {
                let provider = providers[&a.provider].clone();
                let scopes = a.scopes(&provider.config);
                let tokens = AccountTokens {
                    account: a.clone(),
                    provider,
                    scopes,
                    state: Mutex::new(Cached::default()),
                };
                (a.username.to_lowercase(), Arc::new(tokens))
            })
            .collect();
        Ok(TokenManager { accounts, store })
    }

    pub fn store(&self) -> &TokenStore {
        &self.store
    }

    /// A valid access token for `username`'s mailbox: the cached one while it
    /// is comfortably unexpired, else a new one from the identity provider.
    pub async fn access_token(&self, username: &str) -> Result<AccessToken, TokenError> {
        let entry = self.entry(username)?;
        // Held until the outcome is saved: concurrent logins for this account
        // wait here, then find the new token cached (single flight).
        let mut cached = entry.state.lock().await;
        if let Some(token) = self.cached_token(entry, &mut cached)? {
            return Ok(token);
        }
        // Another process may be redeeming this grant right now: wait for it,
        // then use what it stored rather than spend the refresh token twice.
        let _file_lock = self.lock_grant_file(entry).await;
        if let Some(token) = self.cached_token(entry, &mut cached)? {
            return Ok(token);
        }

        let result = match entry.account.flow {
            Flow::ClientCredentials => entry.provider.client_credentials(&entry.scopes).await,
            Flow::DeviceCode | Flow::AuthorizationCode => {
                let refresh_token = self.refresh_token(entry, &cached.grant)?;
                entry.provider.refresh(refresh_token, &entry.scopes).await
            }
        };
        match result {
            Ok(grant) => Ok(self.remember(entry, &mut cached, grant)),
            Err(e) => self.remember_failure(entry, &mut cached, e),
        }
    }

    fn entry(&self, username: &str) -> Result<&AccountTokens, TokenError> {
        self.accounts
            .get(&username.to_lowercase())
            .map(Arc::as_ref)
            .ok_or_else(|| TokenError::NeedsLogin {
                account: username.to_string(),
                reason: "no such account".into(),
            })
    }

    /// The cached access token, once what another process stored is read,
    /// if it is outside the refresh-ahead window.
    fn cached_token(
        &self,
        entry: &AccountTokens,
        cached: &mut Cached,
    ) -> Result<Option<AccessToken>, TokenError> {
        self.sync_from_disk(entry, cached)?;
        Ok(
            usable_token(&cached.grant, unix_now(), true).map(|token| AccessToken {
                token,
                fresh: false,
            }),
        )
    }

    /// The lock on the account's grant file across processes. Without it (a
    /// state directory we cannot write) the refresh still goes ahead.
    async fn lock_grant_file(&self, entry: &AccountTokens) -> Option<GrantLock> {
        match self.store.lock(&entry.account.username).await {
            Ok(lock) => Some(lock),
            Err(e) => {
                warn!(account = %entry.account.username, "{e}; going on without it");
                None
            }
        }
    }

    /// The refresh token to redeem, unless there is none yet or the identity
    /// provider has refused it: then only `login` helps.
    fn refresh_token<'g>(
        &self,
        entry: &AccountTokens,
        grant: &'g StoredGrant,
    ) -> Result<&'g Secret, TokenError> {
        match &grant.refresh_token {
            None => Err(self.needs_login(entry, "no grant yet")),
            Some(_) if grant.needs_login => {
                let reason = grant
                    .last_error
                    .clone()
                    .unwrap_or_else(|| "the grant was refused".into());
                Err(self.needs_login(entry, &reason))
            }
            Some(rt) => Ok(rt),
        }
    }

    /// The upstream server refused `token`: forget it, so that the next
    /// [`access_token`](Self::access_token) asks the identity provider.
    pub async fn reject(&self, username: &str, token: &Secret) {
        let Some(entry) = self.accounts.get(&username.to_lowercase()) else {
            return;
        };
        let mut cached = entry.state.lock().await;
        if cached.grant.access_token.as_ref() == Some(token) {
            cached.grant.access_token = None;
            cached.grant.expires_at = None;
        }
    }

    fn needs_login(&self, entry: &AccountTokens, reason: &str) -> TokenError {
        TokenError::NeedsLogin {
            account: entry.account.username.clone(),
            reason: reason.to_string(),
        }
    }

    /// Re-reads the grant file when it is new to us or was changed by another
    /// process (`xoauth2-proxy login`). A sealed file that does not open
    /// (wrong key, another account's) or an unsafe one is not used, and the
    /// client is told to come back: it is tried again at the next login, so
    /// the right key (after a reload) or file brings the account back.
    fn sync_from_disk(&self, entry: &AccountTokens, cached: &mut Cached) -> Result<(), TokenError> {
        let username = &entry.account.username;
        let mtime = self.store.modified(username);
        if cached.loaded && mtime == cached.file_mtime {
            return Ok(());
        }
        match self.store.load(username) {
            Ok(grant) => {
                cached.grant = grant.unwrap_or_else(|| StoredGrant {
                    account: username.clone(),
                    flow: Some(entry.account.flow),
                    ..Default::default()
                });
                cached.file_mtime = mtime;
                cached.loaded = true;
            }
            Err(e @ (LoadError::Sealed(_) | LoadError::Unsafe(_))) => {
                warn!(account = %username, "{e}");
                return Err(TokenError::Unavailable(e.to_string()));
            }
            Err(e) => warn!(account = %username, "{e}"),
        }
        Ok(())
    }

    fn save(&self, entry: &AccountTokens, cached: &mut Cached) {
        let username = &entry.account.username;
        match self.store.save(username, &cached.grant) {
            Ok(()) => cached.file_mtime = self.store.modified(username),
            Err(e) => warn!(account = %username, "{e}"),
        }
    }

    /// Stores a new grant and hands out its access token, in that order: a
    /// rotated refresh token is on disk before anyone can use the new access
    /// token, so a crash never loses the grant.
    fn remember(&self, entry: &AccountTokens, cached: &mut Cached, grant: Grant) -> AccessToken {
        let token = grant.access_token.clone();
        let now = unix_now();
        let g = &mut cached.grant;
        g.account = entry.account.username.clone();
        g.flow = Some(entry.account.flow);
        g.access_token = Some(grant.access_token);
        g.obtained_at = Some(now);
        g.expires_at = Some(now + grant.expires_in.as_secs());
        let rotated = grant.refresh_token.is_some();
        if rotated {
            g.refresh_token = grant.refresh_token;
        }
        g.needs_login = false;
        g.last_error = None;
        g.last_error_at = None;
        self.save(entry, cached);
        count_token_request(&entry.account.username, "ok");
        info!(
            account = %entry.account.username,
            expires_in = grant.expires_in.as_secs(),
            refresh_token_rotated = rotated,
            "obtained a new access token"
        );
        AccessToken { token, fresh: true }
    }

    fn remember_failure(
        &self,
        entry: &AccountTokens,
        cached: &mut Cached,
        e: GrantError,
    ) -> Result<AccessToken, TokenError> {
        let username = &entry.account.username;
        cached.grant.last_error = Some(e.message.clone());
        cached.grant.last_error_at = Some(unix_now());
        count_token_request(
            username,
            match e.class {
                ErrorClass::GrantInvalid => "needs_login",
                ErrorClass::AppRefused => "refused",
                ErrorClass::Transient => "unavailable",
            },
        );
        let outcome = match e.class {
            ErrorClass::GrantInvalid if entry.account.flow.is_delegated() => {
                cached.grant.needs_login = true;
                warn!(
                    account = %username,
                    "{}; run `xoauth2-proxy login {username}`",
                    e.message
                );
                Err(self.needs_login(entry, &e.message))
            }
            ErrorClass::GrantInvalid | ErrorClass::AppRefused => {
                warn!(account = %username, "{}", e.message);
                Err(TokenError::Refused(e.message))
            }
            ErrorClass::Transient => {
                // A token that has not yet expired still works: use it and
                // try again at the next login.
                if let Some(token) = usable_token(&cached.grant, unix_now(), false) {
                    warn!(account = %username, "{}; using the current access token until it expires", e.message);
                    Ok(AccessToken {
                        token,
                        fresh: false,
                    })
                } else {
                    warn!(account = %username, "{}", e.message);
                    Err(TokenError::Unavailable(e.message))
                }
            }
        };
        self.save(entry, cached);
        outcome
    }
}

fn count_token_request(account: &str, outcome: &'static str) {
    crate::metrics::get()
        .token_requests
        .get_or_create(&crate::metrics::TokenLabels {
            account: account.to_string(),
            outcome,
        })
        .inc();
}

/// The stored access token if it is valid now; with `ahead`, only if it is
/// also outside the refresh-ahead window.
fn usable_token(grant: &StoredGrant, now: u64, ahead: bool) -> Option<Secret> {
    let token = grant.access_token.as_ref()?;
    let expires_at = grant.expires_at?;
    let margin = if ahead {
        refresh_margin(grant.obtained_at.unwrap_or(now), expires_at)
    } else {
        0
    };
    (now + margin < expires_at).then(|| token.clone())
}

/// How long before expiry a token is replaced: a third of its lifetime, at
/// most five minutes (Entra tokens live 60–90 minutes).
pub fn refresh_margin(obtained_at: u64, expires_at: u64) -> u64 {
    let lifetime = expires_at.saturating_sub(obtained_at);
    (lifetime / 3).min(Duration::from_secs(300).as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_replaced_ahead_of_expiry() {
        let grant = StoredGrant {
            access_token: Some(Secret::new("t".into())),
            obtained_at: Some(1000),
            expires_at: Some(1000 + 3600),
            ..Default::default()
        };
        assert!(usable_token(&grant, 1000 + 3000, true).is_some());
        assert!(
            usable_token(&grant, 1000 + 3301, true).is_none(),
            "inside the 5 min window"
        );
        assert!(
            usable_token(&grant, 1000 + 3301, false).is_some(),
            "still valid"
        );
        assert!(
            usable_token(&grant, 1000 + 3600, false).is_none(),
            "expired"
        );
        assert_eq!(refresh_margin(0, 30), 10);
    }
}
