//! Access tokens: obtained, cached, refreshed ahead of expiry, and persisted.
//!
//! [`TokenManager::access_token`] is the one door the login path uses. Per
//! account it holds an async mutex, so however many clients log in at once,
//! one refresh runs and the others wait for its result (single flight).
//! Across processes the store's lock does the same ([`store::TokenStore::lock`]:
//! a lock file, or a database lock that every replica sharing a PostgreSQL
//! store takes): under it the grant is read again, and refreshed only if the
//! process that held the lock before did not just do it. Each rotated refresh
//! token is saved (committed) before the new access token is handed out, so
//! a crash never loses the grant. A save that fails (disk full, database
//! gone) keeps the grant in memory and retries in the background
//! ([`unsaved`]).
//!
//! With a shared store a replica uses its cached access token without asking
//! the database, so logins go on while the database is down; a login that
//! needs a refresh then gets "unavailable" (the client comes back later),
//! never a refresh without the lock.
//!
//! [`TokenManager::graph_token`] is the same door for Microsoft Graph
//! (`send_via = "graph"`): Entra issues an access token per resource, so the
//! same refresh token is redeemed a second time with Graph's scopes alone
//! (mixing them with Exchange's is AADSTS700022). That token is cached in
//! memory beside the mail token, under the same lock, so it too is fetched
//! once however many senders wait.
//!
//! [`TokenManager::keep_alive`] goes through the same door for grants nobody
//! has used for a while: a refresh token unused for 90 days expires, and the
//! mailbox would need `login` again although nothing changed.
//!
//! Each account's standing (needs `login` or not, since when, the token's
//! expiry) is kept in the process-wide [`Health`] record as the manager
//! learns it; [`TokenManager::health`] reads it.

mod aadsts;
pub mod authorize;
pub mod connect;
pub mod health;
pub mod provider;
pub mod status;
pub mod store;
mod unsaved;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::Mutex;
use tracing::{debug, info, warn};

use crate::config::{Account, Config, Flow};
use crate::secret::Secret;
use aadsts::ErrorClass;
pub use health::{AccountHealth, AccountState, ClientLogins, Health};
use provider::{Grant, GrantError, ProviderClient};
use store::{GrantLock, LoadError, LockError, Revision, StoredGrant, TokenStore, unix_now};

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

/// What one keep-alive look at a grant did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeepAlive {
    /// Refreshed recently enough, not delegated, or not authorised: nothing to do.
    NotDue,
    Refreshed,
    /// The identity provider refused the grant: the account needs `login`.
    NeedsLogin,
    /// The app was refused or the identity provider was unavailable; tried
    /// again at the next look.
    Failed,
}

impl KeepAlive {
    /// The `outcome` label of the keep-alive metric (as `token_requests`).
    fn label(self) -> &'static str {
        match self {
            KeepAlive::NotDue => "not_due",
            KeepAlive::Refreshed => "ok",
            KeepAlive::NeedsLogin => "needs_login",
            KeepAlive::Failed => "failed",
        }
    }
}

/// How often the keep-alive looks for idle grants: a tenth of
/// `grant_keepalive`, between a second and an hour; `None` when it is off.
pub fn keep_alive_period(older_than: Duration) -> Option<Duration> {
    (!older_than.is_zero())
        .then(|| (older_than / 10).clamp(Duration::from_secs(1), Duration::from_secs(3600)))
}

/// The token state of every configured account.
pub struct TokenManager {
    accounts: HashMap<String, Arc<AccountTokens>>,
    store: TokenStore,
    health: Health,
}

struct AccountTokens {
    account: Account,
    provider: Arc<ProviderClient>,
    scopes: Vec<String>,
    state: Mutex<Cached>,
    /// This account's entry in the process's [`Health`] record.
    health: Arc<health::Slot>,
}

#[derive(Default)]
struct Cached {
    grant: StoredGrant,
    /// The access token for Microsoft Graph, in memory only.
    graph: Option<GraphToken>,
    /// The stored grant's revision when last read or written; a different
    /// one means another process (`login`, a replica) wrote it.
    revision: Option<Revision>,
    loaded: bool,
    /// Why the stored grant could not be used at the last look, as logged:
    /// the same reason at every login is logged once.
    trouble: Option<String>,
}

/// How much [`TokenManager::sync`] must know of the store.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Look {
    /// Before using a cached access token: a shared store is not asked once
    /// the grant is loaded (a replica's cached token is good until near
    /// expiry); a file is looked at (its time is cheap to read).
    Cached,
    /// Under the lock, before a refresh token is used: the store must say
    /// which revision it holds, or there is no refresh.
    Fresh,
}

/// An access token for Microsoft Graph and its lifetime (Unix seconds).
struct GraphToken {
    token: Secret,
    obtained_at: u64,
    expires_at: u64,
}

/// The permission Graph's `sendMail` needs, delegated, as a scope name.
const MAIL_SEND: &str = "Mail.Send";
/// …and to send as a mailbox other than the signed-in user's own.
const MAIL_SEND_SHARED: &str = "Mail.Send.Shared";

/// What to add in Entra when Graph refuses to issue a token.
const GRAPH_PERMISSIONS_HINT: &str = "for sending with Microsoft Graph the app needs Mail.Send (delegated; plus Mail.Send.Shared for a shared mailbox) or, for client_credentials, the Mail.Send application permission, with admin consent: add it under Entra > App registrations > API permissions > Microsoft Graph and grant consent";

impl TokenManager {
    /// The token state of `config`'s accounts, their grants in `store`.
    /// Their standing goes to `health`, which the process keeps across
    /// reloads (known accounts keep theirs) once
    /// [`publish_health`](Self::publish_health) puts them in it.
    pub fn new(config: &Config, store: TokenStore, health: &Health) -> Result<Self, String> {
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
                    health: health.slot(a),
                };
                (a.username.to_lowercase(), Arc::new(tokens))
            })
            .collect();
        Ok(TokenManager {
            accounts,
            store,
            health: health.clone(),
        })
    }

    /// Makes this manager's accounts the ones the health record reports,
    /// when its config is put in force (at start, at a reload that is
    /// accepted): removed accounts are forgotten, and every grant is read
    /// once, so that an account that needs `login` shows it before any
    /// client comes.
    ///
    /// Each account also takes over the access token the manager in force
    /// before (a reload's) has cached, if its grant is the same: until the
    /// new manager has read the store, a login goes on with it, so that a
    /// reload while the store is out of reach does not refuse logins the
    /// old config served.
    pub async fn publish_health(&self) {
        for entry in self.accounts.values() {
            entry.health.identify(&entry.account);
            let before = entry.health.put_in_force(entry.clone());
            if let Some(before) = before.and_then(|b| b.downcast::<AccountTokens>().ok()) {
                take_over_token(&before, entry).await;
            }
        }
        let entries: Vec<&Arc<AccountTokens>> = self.accounts.values().collect();
        let usernames: Vec<String> = entries.iter().map(|e| e.account.username.clone()).collect();
        let read = self.store.load_many(&usernames).await;
        for (entry, loaded) in entries.into_iter().zip(read) {
            survey(&self.store, entry, loaded);
        }
        let slots = self.accounts.iter();
        self.health
            .adopt(slots.map(|(key, entry)| (key.clone(), entry.health.clone())));
    }

    /// The health of `username`'s account (case-insensitive): whether it
    /// needs `login` and why, its access token's expiry, its last refresh
    /// and last error. `None` for an account not in the config.
    pub fn health(&self, username: &str) -> Option<AccountHealth> {
        self.health.get(username)
    }

    /// Notes that a client logged in as `username` over `protocol` (`imap`
    /// or `smtp`), for the console's "last client login".
    pub fn client_logged_in(&self, username: &str, protocol: &str) {
        if let Ok(entry) = self.entry(username) {
            entry.health.client_logged_in(protocol, unix_now());
        }
    }

    /// The health of every configured account, by username.
    pub fn healths(&self) -> Vec<AccountHealth> {
        self.health.all()
    }

    /// Reads again the grant file of each account that needs `login`, if it
    /// changed: a grant written by `xoauth2-proxy login` brings the account
    /// back even before a client uses it. Costs a file `stat` per such
    /// account; an account busy with a refresh is left to it.
    pub async fn look_for_new_grants(&self) {
        for entry in self.accounts.values() {
            if entry.health.needs_login() {
                self.look_at_grant(entry).await;
            }
        }
    }

    /// Reads `entry`'s grant file if it changed, unless a refresh holds it.
    async fn look_at_grant(&self, entry: &AccountTokens) {
        if let Ok(mut cached) = entry.state.try_lock() {
            // A grant that does not open is logged and noted by sync.
            let _ = self.sync(entry, &mut cached, Look::Fresh).await;
        }
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
        match self.cached_token(entry, &mut cached, Look::Cached).await {
            Ok(Some(token)) => return Ok(token),
            Ok(None) => {}
            // The stored grant cannot be read now (a `store rekey` before the
            // reload that brings its key, a database out of reach): a token
            // still valid serves meanwhile.
            Err(e) => return still_valid(&cached, e),
        }
        // Another process may be redeeming this grant right now: wait for it,
        // then use what it stored rather than spend the refresh token twice.
        let _lock = match self.lock_grant(entry).await {
            Ok(lock) => lock,
            Err(e) => return self.without_lock(entry, &cached, e),
        };
        match self.cached_token(entry, &mut cached, Look::Fresh).await {
            Ok(Some(token)) => return Ok(token),
            Ok(None) => {}
            Err(e) => return self.without_lock(entry, &cached, e),
        }

        self.redeem(entry, &mut cached).await
    }

    /// Asks the identity provider for a new token (the caller holds both
    /// locks) and remembers the outcome.
    async fn redeem(
        &self,
        entry: &AccountTokens,
        cached: &mut Cached,
    ) -> Result<AccessToken, TokenError> {
        let result = match entry.account.flow {
            Flow::ClientCredentials => entry.provider.client_credentials(&entry.scopes).await,
            Flow::DeviceCode | Flow::AuthorizationCode => {
                let refresh_token = self.refresh_token(entry, &cached.grant)?;
                entry.provider.refresh(refresh_token, &entry.scopes).await
            }
        };
        match result {
            Ok(grant) => Ok(self.remember(entry, cached, grant).await),
            Err(e) => self.remember_failure(entry, cached, e).await,
        }
    }

    /// Refreshes `username`'s delegated grant if its last refresh (or
    /// `login`) is `older_than` ago, through the same locks as
    /// [`access_token`](Self::access_token), so that it never races a login.
    pub async fn keep_alive(&self, username: &str, older_than: Duration) -> KeepAlive {
        let Ok(entry) = self.entry(username) else {
            return KeepAlive::NotDue;
        };
        if !entry.account.flow.is_delegated() {
            return KeepAlive::NotDue;
        }
        let mut cached = entry.state.lock().await;
        if !self.keep_alive_due(entry, &mut cached, older_than).await {
            return KeepAlive::NotDue;
        }
        let Ok(_lock) = self.lock_grant(entry).await else {
            count_keep_alive(&entry.account.username, KeepAlive::Failed);
            return KeepAlive::Failed;
        };
        // A login may have refreshed it while this waited for the lock.
        if !self.keep_alive_due(entry, &mut cached, older_than).await {
            return KeepAlive::NotDue;
        }
        let outcome = match self.redeem(entry, &mut cached).await {
            Ok(token) if token.fresh => KeepAlive::Refreshed,
            Err(TokenError::NeedsLogin { .. }) => KeepAlive::NeedsLogin,
            Ok(_) | Err(TokenError::Refused(_) | TokenError::Unavailable(_)) => KeepAlive::Failed,
        };
        if outcome == KeepAlive::Refreshed {
            let idle = humantime::format_duration(older_than);
            info!(account = %username, "refreshed a grant unused for {idle}, so that it does not expire");
        }
        count_keep_alive(&entry.account.username, outcome);
        outcome
    }

    /// Stores the grant a sign-in (the console's Connect) brought for
    /// `username`, through the same locks as a refresh, so that it never
    /// races one; the cached token is replaced at once.
    pub async fn signed_in(&self, username: &str, grant: Grant) -> Result<(), String> {
        let entry = self.entry(username).map_err(|e| e.to_string())?;
        let mut cached = entry.state.lock().await;
        let _lock = self.lock_grant(entry).await.map_err(|e| e.to_string())?;
        // What another process stored counts; a grant that does not open is
        // refused by the save below, and stays as it is.
        let _ = self.sync(entry, &mut cached, Look::Fresh).await;
        let stored = authorize::signed_in(cached.grant.clone(), &entry.account, grant, unix_now())?;
        self.replace(entry, &mut cached, stored).await?;
        info!(account = %entry.account.username, "signed in from the console");
        Ok(())
    }

    /// Forgets `username`'s grant (the console's Disconnect): the stored
    /// refresh token and the cached access token go, and the account needs
    /// a sign-in again. The grant itself stays valid at the identity
    /// provider until it expires or is revoked there.
    pub async fn forget(&self, username: &str) -> Result<(), String> {
        let entry = self.entry(username).map_err(|e| e.to_string())?;
        let mut cached = entry.state.lock().await;
        let _lock = self.lock_grant(entry).await.map_err(|e| e.to_string())?;
        let empty = StoredGrant {
            account: entry.account.username.clone(),
            flow: Some(entry.account.flow),
            ..Default::default()
        };
        self.replace(entry, &mut cached, empty).await?;
        info!(account = %entry.account.username, "grant forgotten from the console");
        Ok(())
    }

    /// Writes `grant` as the account's, then caches it; a failed write
    /// changes nothing and is the caller's error.
    async fn replace(
        &self,
        entry: &AccountTokens,
        cached: &mut Cached,
        grant: StoredGrant,
    ) -> Result<(), String> {
        let username = &entry.account.username;
        let revision = self.store.save_revision(username, &grant).await?;
        unsaved::saved(&self.store, username);
        cached.grant = grant;
        cached.graph = None;
        cached.revision = Some(revision);
        cached.loaded = true;
        // A sign-in recovers the account, a forgotten grant needs login: the
        // health record (and so the notifications) learn it at once.
        entry.health.grant_read(&cached.grant);
        Ok(())
    }

    /// The provider and scopes `username` signs in with, for the console's
    /// Connect.
    pub fn sign_in_client(
        &self,
        username: &str,
    ) -> Result<(Account, Arc<ProviderClient>, Vec<String>), TokenError> {
        let entry = self.entry(username)?;
        Ok((
            entry.account.clone(),
            entry.provider.clone(),
            entry.scopes.clone(),
        ))
    }

    /// Writes the grants whose save failed one last time, as the proxy stops.
    pub async fn save_before_exit(&self) {
        unsaved::save_before_exit(&self.store).await;
    }

    /// Looks at every delegated grant with [`keep_alive`](Self::keep_alive),
    /// one after another.
    pub async fn keep_alive_all(&self, older_than: Duration) {
        let mut refreshed = 0;
        for entry in self.accounts.values() {
            let outcome = self.keep_alive(&entry.account.username, older_than).await;
            refreshed += usize::from(outcome == KeepAlive::Refreshed);
        }
        debug!(
            accounts = self.accounts.len(),
            refreshed, "grant keep-alive looked at every account"
        );
    }

    /// The grant (as stored now) is authorised and was last refreshed, or
    /// authorised, `older_than` ago or longer. A grant that records neither
    /// goes by its file's age.
    async fn keep_alive_due(
        &self,
        entry: &AccountTokens,
        cached: &mut Cached,
        older_than: Duration,
    ) -> bool {
        if self.sync(entry, cached, Look::Fresh).await.is_err() {
            // A sealed grant that does not open, or a store out of reach:
            // its account says so at login.
            return false;
        }
        let grant = &cached.grant;
        if grant.refresh_token.is_none() || grant.needs_login {
            return false;
        }
        let file_age = cached.revision.map(|r| unix_seconds(r.written));
        let last = grant.obtained_at.max(grant.authorized_at).or(file_age);
        last.is_none_or(|t| unix_now().saturating_sub(t) >= older_than.as_secs())
    }

    /// Who signs in for `username`'s delegated grant: `sign_in_user` from
    /// the config, else the user learnt from the ID token at `login` or at a
    /// refresh; `None` when neither is known (a grant stored before the
    /// proxy recorded it).
    pub async fn sign_in_user(&self, username: &str) -> Option<String> {
        let entry = self.entry(username).ok()?;
        if let Some(user) = &entry.account.sign_in_user {
            return Some(user.clone());
        }
        let mut cached = entry.state.lock().await;
        let _ = self.sync(entry, &mut cached, Look::Cached).await;
        cached.grant.sign_in_user.clone()
    }

    /// A valid access token for Microsoft Graph for `username`'s mailbox,
    /// from the same grant as the mail token: cached, or redeemed once
    /// however many senders wait (the same locks as
    /// [`access_token`](Self::access_token)).
    pub async fn graph_token(&self, username: &str) -> Result<AccessToken, TokenError> {
        let entry = self.entry(username)?;
        let mut cached = entry.state.lock().await;
        let synced = self.sync(entry, &mut cached, Look::Cached).await;
        if let Some(token) = usable_graph_token(&cached, unix_now()) {
            return Ok(token);
        }
        synced?;
        let _lock = self.lock_grant(entry).await?;
        // Another process may have rotated the refresh token meanwhile.
        self.sync(entry, &mut cached, Look::Fresh).await?;
        let scopes = graph_scopes(&entry.account, &entry.provider.config, &cached.grant);
        let result = match entry.account.flow {
            Flow::ClientCredentials => entry.provider.client_credentials(&scopes).await,
            Flow::DeviceCode | Flow::AuthorizationCode => {
                let refresh_token = self.refresh_token(entry, &cached.grant)?;
                entry.provider.refresh(refresh_token, &scopes).await
            }
        };
        match result {
            Ok(grant) => Ok(self.remember_graph(entry, &mut cached, grant).await),
            Err(e) => Err(self.remember_graph_failure(entry, &mut cached, e).await),
        }
    }

    /// Microsoft Graph refused `token`: forget it, so that the next
    /// [`graph_token`](Self::graph_token) asks the identity provider.
    pub async fn reject_graph(&self, username: &str, token: &Secret) {
        let Ok(entry) = self.entry(username) else {
            return;
        };
        let mut cached = entry.state.lock().await;
        if cached.graph.as_ref().is_some_and(|g| &g.token == token) {
            cached.graph = None;
        }
    }

    /// Keeps a Graph token in memory and what came with it on file: a
    /// rotated refresh token (saved before the token is handed out, as for
    /// the mail token) and the signed-in user.
    async fn remember_graph(
        &self,
        entry: &AccountTokens,
        cached: &mut Cached,
        grant: Grant,
    ) -> AccessToken {
        let now = unix_now();
        let got = take_grant(&entry.account, &mut cached.grant, grant);
        cached.graph = Some(GraphToken {
            token: got.token.clone(),
            obtained_at: now,
            expires_at: now + got.expires_in.as_secs(),
        });
        // The Graph token itself stays in memory: the store is written only
        // when the grant changed.
        if entry.account.flow.is_delegated() && (got.rotated || got.changed_user) {
            self.save(entry, cached).await;
        }
        got.counted(&entry.account, Audience::Graph)
    }

    /// A refused Graph token request. Only a grant the identity provider
    /// says is gone marks the account for `login`: a missing Graph
    /// permission must not stop its IMAP.
    async fn remember_graph_failure(
        &self,
        entry: &AccountTokens,
        cached: &mut Cached,
        e: GrantError,
    ) -> TokenError {
        let username = &entry.account.username;
        match e.class {
            ErrorClass::GrantInvalid if entry.account.flow.is_delegated() => self
                .remember_failure(entry, cached, e)
                .await
                .err()
                .unwrap_or_else(|| self.needs_login(entry, "the grant was refused")),
            ErrorClass::GrantInvalid | ErrorClass::AppRefused => {
                count_token_request(username, "refused");
                let message = format!(
                    "no token for Microsoft Graph: {}; {GRAPH_PERMISSIONS_HINT}",
                    e.message
                );
                warn!(account = %username, "{message}");
                TokenError::Refused(message)
            }
            ErrorClass::Transient => {
                count_token_request(username, "unavailable");
                warn!(account = %username, "no token for Microsoft Graph: {}", e.message);
                TokenError::Unavailable(e.message)
            }
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
    async fn cached_token(
        &self,
        entry: &AccountTokens,
        cached: &mut Cached,
        look: Look,
    ) -> Result<Option<AccessToken>, TokenError> {
        self.sync(entry, cached, look).await?;
        Ok(
            usable_token(&cached.grant, unix_now(), true).map(|token| AccessToken {
                token,
                fresh: false,
            }),
        )
    }

    /// The lock on the account's grant across processes. Without a file
    /// store's lock (a state directory we cannot write) the refresh still
    /// goes ahead; without a shared store's, it does not: another replica
    /// might spend the same refresh token.
    async fn lock_grant(&self, entry: &AccountTokens) -> Result<Option<GrantLock>, TokenError> {
        match self.store.lock(&entry.account.username).await {
            Ok(lock) => Ok(Some(lock)),
            Err(LockError::Skippable(e)) => {
                warn!(account = %entry.account.username, "{e}; going on without it");
                Ok(None)
            }
            Err(LockError::Unavailable(e)) => Err(TokenError::Unavailable(e)),
        }
    }

    /// No refresh now (the store is out of reach): the cached access token
    /// while it is still valid, else `e` (the client comes back later).
    fn without_lock(
        &self,
        entry: &AccountTokens,
        cached: &Cached,
        e: TokenError,
    ) -> Result<AccessToken, TokenError> {
        let username = &entry.account.username;
        match usable_token(&cached.grant, unix_now(), false) {
            Some(token) if matches!(e, TokenError::Unavailable(_)) => {
                warn!(account = %username, "{e}; using the current access token until it expires");
                Ok(AccessToken {
                    token,
                    fresh: false,
                })
            }
            // Already logged where it was found (the store logs an outage once).
            _ => {
                debug!(account = %username, "no refresh: {e}");
                Err(e)
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

    /// Re-reads the stored grant when it is new to us or was written by
    /// another process (`xoauth2-proxy login`, another replica). A sealed
    /// grant that does not open (wrong key, another account's), an unsafe
    /// file or a store out of reach is not used, and the client is told to
    /// come back: it is tried again at the next login, so the right key
    /// (after a reload), file or database brings the account back.
    async fn sync(
        &self,
        entry: &AccountTokens,
        cached: &mut Cached,
        look: Look,
    ) -> Result<(), TokenError> {
        if look == Look::Cached && cached.loaded && self.store.shared() {
            return Ok(());
        }
        let username = &entry.account.username;
        let revision = match self.store.revision(username).await {
            Ok(revision) => revision,
            Err(e) => return Err(self.unusable(entry, cached, e)),
        };
        if cached.loaded && revision == cached.revision {
            cached.trouble = None;
            return Ok(());
        }
        match self.store.read_revision(username).await {
            Ok(read) => {
                let (grant, revision) = match read {
                    Some((file, revision)) => (Some(file.grant), Some(revision)),
                    None => (None, None),
                };
                let grant = unsaved::prefer_unsaved(&self.store, username, grant);
                cached.grant = grant.unwrap_or_else(|| StoredGrant {
                    account: username.clone(),
                    flow: Some(entry.account.flow),
                    ..Default::default()
                });
                cached.revision = revision;
                cached.loaded = true;
                cached.trouble = None;
                entry.health.grant_read(&cached.grant);
            }
            Err(e @ (LoadError::Damaged(_) | LoadError::Unreadable(_))) => {
                warn!(account = %username, "{e}")
            }
            Err(e) => return Err(self.unusable(entry, cached, e)),
        }
        Ok(())
    }

    /// A stored grant that cannot be used now: logged (once for the same
    /// reason), and the client told to come back unless an access token
    /// still valid serves meanwhile ([`still_valid`]).
    fn unusable(&self, entry: &AccountTokens, cached: &mut Cached, e: LoadError) -> TokenError {
        let username = &entry.account.username;
        let message = e.to_string();
        entry.health.failed(&message, unix_now());
        let again = cached.trouble.as_ref() == Some(&message);
        match &e {
            // The store says so once when it goes away, not at every login.
            LoadError::Unavailable(_) => debug!(account = %username, "{e}"),
            _ if again => debug!(account = %username, "{e}"),
            _ if usable_token(&cached.grant, unix_now(), false).is_some() => warn!(
                account = %username,
                "{e}; until then logins use the access token obtained before, while it is valid"
            ),
            _ => warn!(account = %username, "{e}"),
        }
        cached.trouble = Some(message);
        TokenError::Unavailable(e.to_string())
    }

    /// Writes the cached grant. When that fails the grant stays in memory,
    /// the store keeps the one before (and the cached revision, so that it
    /// is not read back over the memory), and [`unsaved`] writes it later.
    async fn save(&self, entry: &AccountTokens, cached: &mut Cached) {
        let username = &entry.account.username;
        match self.store.save_revision(username, &cached.grant).await {
            Ok(revision) => {
                cached.revision = Some(revision);
                unsaved::saved(&self.store, username);
            }
            // An app-only account's file only caches its access token.
            Err(e) if !entry.account.flow.is_delegated() => warn!(account = %username, "{e}"),
            Err(e) => unsaved::failed(&self.store, username, &cached.grant, &e).await,
        }
    }

    /// Stores a new grant and hands out its access token, in that order: a
    /// rotated refresh token is stored (committed) before anyone can use the
    /// new access token, so a crash never loses the grant.
    async fn remember(
        &self,
        entry: &AccountTokens,
        cached: &mut Cached,
        grant: Grant,
    ) -> AccessToken {
        let now = unix_now();
        let got = take_grant(&entry.account, &mut cached.grant, grant);
        let expires_at = now + got.expires_in.as_secs();
        let g = &mut cached.grant;
        g.account = entry.account.username.clone();
        g.flow = Some(entry.account.flow);
        g.access_token = Some(got.token.clone());
        g.obtained_at = Some(now);
        g.expires_at = Some(expires_at);
        g.needs_login = false;
        g.last_error = None;
        g.last_error_at = None;
        entry.health.refreshed(expires_at, now);
        self.save(entry, cached).await;
        got.counted(&entry.account, Audience::Mail)
    }

    async fn remember_failure(
        &self,
        entry: &AccountTokens,
        cached: &mut Cached,
        e: GrantError,
    ) -> Result<AccessToken, TokenError> {
        let username = &entry.account.username;
        let now = unix_now();
        cached.grant.last_error = Some(e.message.clone());
        cached.grant.last_error_at = Some(now);
        match e.class {
            ErrorClass::GrantInvalid if entry.account.flow.is_delegated() => {
                entry.health.refused(&e.message, now)
            }
            _ => entry.health.failed(&e.message, now),
        }
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
        self.save(entry, cached).await;
        outcome
    }
}

/// Notes in the health record what `entry`'s grant, as `loaded` from
/// `store` (or the grant kept unsaved), says, leaving the cache alone: it is
/// filled at first use, so that a grant another manager (before a reload)
/// could not save meanwhile is still preferred then.
fn survey(
    store: &TokenStore,
    entry: &AccountTokens,
    loaded: Result<Option<StoredGrant>, LoadError>,
) {
    let username = &entry.account.username;
    match loaded {
        Ok(grant) => {
            let grant = unsaved::prefer_unsaved(store, username, grant);
            entry.health.grant_read(&grant.unwrap_or_default());
        }
        // Logged by the state directory's check at start and reload. A
        // damaged or unreadable file is no grant to a client either.
        Err(e) => {
            if matches!(e, LoadError::Damaged(_) | LoadError::Unreadable(_)) {
                entry.health.grant_read(&StoredGrant::default());
            }
            entry.health.failed(&e.to_string(), unix_now());
        }
    }
}

/// Copies the access token `before` (the manager a reload replaces) holds
/// for the account into `after`, when both use the same grant: the same
/// flow, mailbox, app and scopes. Only the access token and its times: the
/// rest of the grant is read from the store before any refresh. An account
/// whose refresh takes longer than [`TAKE_OVER_WAIT`] is left (the store
/// will have its outcome): a reload does not wait for a slow one.
async fn take_over_token(before: &AccountTokens, after: &AccountTokens) {
    if !same_grant(before, after) {
        return;
    }
    let Ok(old) = tokio::time::timeout(TAKE_OVER_WAIT, before.state.lock()).await else {
        return;
    };
    let mut new = after.state.lock().await;
    if new.loaded || usable_token(&old.grant, unix_now(), false).is_none() {
        return;
    }
    new.grant.access_token.clone_from(&old.grant.access_token);
    new.grant.expires_at = old.grant.expires_at;
    new.grant.obtained_at = old.grant.obtained_at;
}

/// How long a reload waits for a refresh in flight in the manager it
/// replaces, to take over its access token.
const TAKE_OVER_WAIT: Duration = Duration::from_secs(2);

/// Whether an access token obtained for `a` serves `b`: the same account
/// redeemed with the same app at the same identity provider, for the same
/// mailbox and scopes.
fn same_grant(a: &AccountTokens, b: &AccountTokens) -> bool {
    let (pa, pb) = (&a.provider.config, &b.provider.config);
    a.account.username.eq_ignore_ascii_case(&b.account.username)
        && a.account.flow == b.account.flow
        && a.account.mailbox.eq_ignore_ascii_case(&b.account.mailbox)
        && a.account.sign_in_user == b.account.sign_in_user
        && a.scopes == b.scopes
        && pa.client_id == pb.client_id
        && pa.token_url == pb.token_url
}

/// A redeemed grant once [`take_grant`] has kept the rest of it: its
/// access token, and what changed in the stored grant.
struct Obtained {
    token: Secret,
    expires_in: Duration,
    rotated: bool,
    changed_user: bool,
}

/// Takes a grant redeemed for the mail or for Microsoft Graph apart, and
/// keeps in `stored` what it brings besides its access token: a rotated
/// refresh token (the old one may be spent already), and for a delegated
/// account the user who signed in (an app-only token names no user).
fn take_grant(account: &Account, stored: &mut StoredGrant, grant: Grant) -> Obtained {
    let rotated = grant.refresh_token.is_some();
    if rotated {
        stored.refresh_token = grant.refresh_token;
    }
    let learnt = grant.sign_in_user.filter(|_| account.flow.is_delegated());
    let changed_user = learnt.is_some() && learnt != stored.sign_in_user;
    if changed_user {
        stored.sign_in_user = learnt;
    }
    Obtained {
        token: grant.access_token,
        expires_in: grant.expires_in,
        rotated,
        changed_user,
    }
}

/// What an access token is for, as the log names it.
#[derive(Clone, Copy)]
enum Audience {
    Mail,
    Graph,
}

impl Obtained {
    /// Counts and logs the token obtained for `account`, and hands it out.
    fn counted(self, account: &Account, audience: Audience) -> AccessToken {
        count_token_request(&account.username, "ok");
        let message = match audience {
            Audience::Mail => "obtained a new access token",
            Audience::Graph => "obtained a new access token for Microsoft Graph",
        };
        info!(
            account = %account.username,
            expires_in = self.expires_in.as_secs(),
            refresh_token_rotated = self.rotated,
            "{message}"
        );
        AccessToken {
            token: self.token,
            fresh: true,
        }
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

fn count_keep_alive(account: &str, outcome: KeepAlive) {
    crate::metrics::get()
        .grant_keepalive
        .get_or_create(&crate::metrics::TokenLabels {
            account: account.to_string(),
            outcome: outcome.label(),
        })
        .inc();
}

fn unix_seconds(t: SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
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

/// The access token in `cached` while it is valid, though the stored grant
/// could not be read (`e`, already logged): logins go on with it, as they
/// did before the store changed; without one, `e`.
fn still_valid(cached: &Cached, e: TokenError) -> Result<AccessToken, TokenError> {
    match usable_token(&cached.grant, unix_now(), false) {
        Some(token) => Ok(AccessToken {
            token,
            fresh: false,
        }),
        None => Err(e),
    }
}

/// The cached Graph token if it is outside the refresh-ahead window.
fn usable_graph_token(cached: &Cached, now: u64) -> Option<AccessToken> {
    let g = cached.graph.as_ref()?;
    (now + refresh_margin(g.obtained_at, g.expires_at) < g.expires_at).then(|| AccessToken {
        token: g.token.clone(),
        fresh: false,
    })
}

/// The scopes of a Graph token for `account`. App-only: Graph's
/// `.default` (the application permissions the admin granted). Delegated:
/// `Mail.Send`, and `Mail.Send.Shared` when the mailbox is not the signed-in
/// user's own; with `openid profile` so that the answer names that user, and
/// nothing of Exchange's (one resource per request, or AADSTS700022).
fn graph_scopes(
    account: &Account,
    provider: &crate::config::Provider,
    grant: &StoredGrant,
) -> Vec<String> {
    let resource = provider.graph_resource();
    if !account.flow.is_delegated() {
        return vec![format!("{resource}/.default")];
    }
    let mut scopes = vec![format!("{resource}/{MAIL_SEND}")];
    let user = account
        .sign_in_user
        .as_ref()
        .or(grant.sign_in_user.as_ref());
    if user.is_some_and(|u| !u.eq_ignore_ascii_case(&account.mailbox)) {
        scopes.push(format!("{resource}/{MAIL_SEND_SHARED}"));
    }
    scopes.extend(["offline_access", "openid", "profile"].map(String::from));
    scopes
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
    use testkit::idp::MockIdp;
    use testkit::tokens::TokenBook;

    const USER: &str = "sales@contoso.com";

    /// A token manager for one device-code account against `idp`, its
    /// grants under `dir`.
    fn manager(idp: &MockIdp, dir: &std::path::Path) -> TokenManager {
        manager_of(idp, dir, "app", &Health::default())
    }

    /// [`manager`] for the app `client_id`, reporting to `health`.
    fn manager_of(
        idp: &MockIdp,
        dir: &std::path::Path,
        client_id: &str,
        health: &Health,
    ) -> TokenManager {
        let base = format!("{}/contoso/oauth2/v2.0", idp.base_url());
        let text = format!(
            r#"
[server]
state_dir = "{state}"

[providers.test]
tenant = "contoso"
client_id = "{client_id}"
client_secret = "secret"
token_url = "{base}/token"
device_code_url = "{base}/devicecode"

[[accounts]]
username = "{USER}"
password = "pw"
provider = "test"
flow = "device_code"
"#,
            state = dir.display()
        );
        let config = Config::parse(&dir.join("config.toml"), &text).unwrap();
        TokenManager::new(&config, TokenStore::new(dir), health).unwrap()
    }

    /// The access token `manager` holds for the account, without reading
    /// the store.
    async fn cached_access_token(manager: &TokenManager) -> Option<String> {
        let entry = manager.entry(USER).unwrap();
        let cached = entry.state.lock().await;
        cached
            .grant
            .access_token
            .as_ref()
            .map(|t| t.expose().to_string())
    }

    #[tokio::test]
    async fn a_reload_takes_over_the_cached_token_only_for_the_same_grant() {
        let (idp, dir) = (idp().await, tempfile::tempdir().unwrap());
        idp.register_client("other-app", Some("secret"));
        let health = Health::default();
        TokenStore::new(dir.path())
            .save(USER, &grant(&idp.issue_refresh_token(USER)))
            .await
            .unwrap();
        let first = manager_of(&idp, dir.path(), "app", &health);
        first.publish_health().await;
        let token = first.access_token(USER).await.unwrap().token;

        // The same config reloaded: the token goes on, unread from the store.
        let same = manager_of(&idp, dir.path(), "app", &health);
        same.publish_health().await;
        let carried = cached_access_token(&same).await;
        assert!(carried.as_deref() == Some(token.expose()), "taken over");
        // Another app registration: a token of the old one is not its.
        let other = manager_of(&idp, dir.path(), "other-app", &health);
        other.publish_health().await;
        assert!(cached_access_token(&other).await.is_none(), "another app's");
        // A reload refused before it is put in force takes nothing.
        let refused = manager_of(&idp, dir.path(), "app", &health);
        assert!(
            cached_access_token(&refused).await.is_none(),
            "not in force"
        );
    }

    async fn idp() -> MockIdp {
        let idp = MockIdp::start(TokenBook::default()).await;
        idp.register_client("app", Some("secret"));
        idp
    }

    fn grant(refresh_token: &str) -> StoredGrant {
        StoredGrant {
            account: USER.into(),
            flow: Some(Flow::DeviceCode),
            refresh_token: Some(Secret::new(refresh_token.into())),
            ..Default::default()
        }
    }

    /// What `manager` holds for the account after reading the file.
    async fn held_refresh_token(manager: &TokenManager) -> String {
        let entry = manager.entry(USER).unwrap();
        let mut cached = entry.state.lock().await;
        manager.sync(entry, &mut cached, Look::Fresh).await.unwrap();
        let rt = cached.grant.refresh_token.as_ref().map(Secret::expose);
        rt.unwrap_or_default().to_string()
    }

    #[tokio::test]
    async fn a_refresh_presents_the_unsaved_refresh_token_not_the_spent_one_on_file() {
        let (idp, dir) = (idp().await, tempfile::tempdir().unwrap());
        let store = TokenStore::new(dir.path());
        // The file holds a refresh token the IdP has spent; the newer one
        // could not be written (what `save` records when the disk is full).
        store.save(USER, &grant("spent")).await.unwrap();
        let newer = idp.issue_refresh_token(USER);
        unsaved::failed(&store, USER, &grant(&newer), "no space left on device").await;

        // A manager made after the failure (a config reload) uses it.
        let manager = manager(&idp, dir.path());
        let token = manager.access_token(USER).await.unwrap();
        assert!(token.fresh);
        assert_eq!(
            idp.counts().failed,
            0,
            "the spent token was never presented"
        );
        // That refresh was saved: nothing is left unsaved.
        let on_file = store
            .load(USER)
            .await
            .unwrap()
            .unwrap()
            .refresh_token
            .unwrap();
        assert!(idp.valid_refresh_tokens(USER) == vec![on_file.expose().to_string()]);
        assert!(!unsaved::is_unsaved(&store, USER));
    }

    #[tokio::test]
    async fn a_stale_file_rewritten_or_touched_never_replaces_the_unsaved_grant() {
        let (idp, dir) = (idp().await, tempfile::tempdir().unwrap());
        let store = TokenStore::new(dir.path());
        store.save(USER, &grant("old")).await.unwrap();
        let manager = manager(&idp, dir.path());
        assert_eq!(held_refresh_token(&manager).await, "old");
        unsaved::failed(&store, USER, &grant("new"), "no space left on device").await;
        // The same stale grant written again (a backup restored, a touch):
        // the file's time changes, its refresh token does not.
        store.save(USER, &grant("old")).await.unwrap();
        assert_eq!(held_refresh_token(&manager).await, "new");
        assert_eq!(
            held_refresh_token(&super::tests::manager(&idp, dir.path())).await,
            "new"
        );
    }

    #[tokio::test]
    async fn a_grant_written_by_login_wins_over_an_unsaved_one() {
        let (idp, dir) = (idp().await, tempfile::tempdir().unwrap());
        let store = TokenStore::new(dir.path());
        store.save(USER, &grant("old")).await.unwrap();
        let manager = manager(&idp, dir.path());
        unsaved::failed(&store, USER, &grant("unsaved"), "no space left on device").await;
        assert_eq!(held_refresh_token(&manager).await, "unsaved");
        // `xoauth2-proxy login` in another process writes a new grant.
        store.save(USER, &grant("from-login")).await.unwrap();
        assert_eq!(held_refresh_token(&manager).await, "from-login");
        assert!(!unsaved::is_unsaved(&store, USER), "forgotten");
    }

    #[tokio::test]
    async fn keep_alive_refreshes_only_grants_idle_since_their_last_refresh_or_login() {
        let (idp, dir) = (idp().await, tempfile::tempdir().unwrap());
        let store = TokenStore::new(dir.path());
        let day = Duration::from_secs(24 * 3600);
        let now = unix_now();
        let cases = [
            // (obtained_at, authorized_at, needs_login, refreshed)
            (Some(now - 3 * 86400), None, false, true),
            (Some(now - 3 * 86400), Some(now - 3600), false, false),
            (None, Some(now - 3600), false, false),
            (None, Some(now - 3 * 86400), false, true),
            (None, Some(now - 3 * 86400), true, false),
        ];
        for (obtained_at, authorized_at, needs_login, refreshed) in cases {
            let rt = idp.issue_refresh_token(USER);
            let grant = StoredGrant {
                obtained_at,
                authorized_at,
                needs_login,
                ..grant(&rt)
            };
            store.save(USER, &grant).await.unwrap();
            let outcome = manager(&idp, dir.path()).keep_alive(USER, 2 * day).await;
            let expected = if refreshed {
                KeepAlive::Refreshed
            } else {
                KeepAlive::NotDue
            };
            assert_eq!(
                outcome, expected,
                "{obtained_at:?} {authorized_at:?} {needs_login}"
            );
        }
        assert_eq!(keep_alive_period(Duration::ZERO), None, "off");
        assert_eq!(keep_alive_period(7 * day), Some(Duration::from_secs(3600)));
        assert_eq!(
            keep_alive_period(Duration::from_secs(30)),
            Some(Duration::from_secs(3))
        );
        assert_eq!(
            keep_alive_period(Duration::from_secs(2)),
            Some(Duration::from_secs(1))
        );
    }

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
