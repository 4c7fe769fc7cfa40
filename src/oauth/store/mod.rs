//! Where grants are kept: [`TokenStore`], the one door the rest of the proxy
//! uses, over a [`Backend`] that holds one document per account.
//!
//! The document is the same in every backend: the grant's JSON, sealed with
//! the token key when one is configured ([`crate::sealing`], the account as
//! associated data). Sealing, parsing and the sentences a user reads live
//! here, once; a backend only keeps bytes, says which revision it holds and
//! locks an account across processes. So a change of the grant's format
//! needs no change of any backend, `store migrate` copies documents as they
//! are (sealed ones stay sealed), and another backend (Redis, a Kubernetes
//! Secret) is one file implementing [`Backend`].
//!
//! - [`file`]: one file per account under `state_dir/tokens` (one replica);
//! - [`postgres`]: one row per account in PostgreSQL, shared by replicas,
//!   with an advisory lock per account so that one replica refreshes a grant
//!   at a time.

mod backend;
mod file;
mod postgres;

use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::config::{Config, Flow, StoreKind};
use crate::sealing::{SealError, TokenKey};
use crate::secret::Secret;

pub use backend::{Backend, Document, GrantLock, LoadError, LockError, Revision};
pub use file::FileStore;
pub use postgres::PostgresStore;

/// What the proxy knows about one account's grant.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StoredGrant {
    /// The account's `username`, for humans reading the file.
    pub account: String,
    pub flow: Option<Flow>,
    pub refresh_token: Option<Secret>,
    pub access_token: Option<Secret>,
    /// Unix seconds when `access_token` expires.
    pub expires_at: Option<u64>,
    /// Unix seconds when `access_token` was obtained.
    pub obtained_at: Option<u64>,
    /// Unix seconds of the last successful `login`.
    pub authorized_at: Option<u64>,
    /// Set when the identity provider said the grant is no longer valid.
    #[serde(default)]
    pub needs_login: bool,
    /// The last failure, as a sentence without secrets.
    pub last_error: Option<String>,
    /// Unix seconds of `last_error`.
    pub last_error_at: Option<u64>,
    /// Who signed in for a delegated grant (the ID token's
    /// `preferred_username`), learnt at `login` and at each refresh. Grants
    /// stored before this was recorded have none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sign_in_user: Option<String>,
}

/// A grant as read, and whether its document was sealed.
#[derive(Debug, Clone)]
pub struct GrantFile {
    pub grant: StoredGrant,
    pub sealed: bool,
}

/// The grants of one config, sealed with its token key if it has one.
#[derive(Clone)]
pub struct TokenStore {
    backend: Arc<dyn Backend>,
    key: Option<TokenKey>,
}

impl fmt::Debug for TokenStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenStore")
            .field("store", &self.backend.describe())
            .field("sealed", &self.key.is_some())
            .finish()
    }
}

impl TokenStore {
    /// The grant files under `state_dir`, unsealed.
    pub fn new(state_dir: &Path) -> Self {
        TokenStore::over(Arc::new(FileStore::new(state_dir)))
    }

    /// The grants in `backend`, unsealed.
    pub fn over(backend: Arc<dyn Backend>) -> Self {
        TokenStore { backend, key: None }
    }

    /// The grants of `config`: `[store]`'s kind (the state directory by
    /// default), sealed with its token key if it names one. A key file that
    /// is missing, unreadable, readable by every user or not a key, or a
    /// database URL that cannot be used, is an error (one sentence).
    pub fn for_config(config: &Config) -> Result<Self, String> {
        TokenStore::of_kind(config, config.store.kind)
    }

    /// The grants of `config` in a store of `kind`, whatever `[store]` says
    /// (`store migrate` opens both).
    pub fn of_kind(config: &Config, kind: StoreKind) -> Result<Self, String> {
        let backend: Arc<dyn Backend> = match kind {
            StoreKind::File => Arc::new(FileStore::new(&crate::config::state_dir(config))),
            StoreKind::Postgres => Arc::new(PostgresStore::for_config(config)?),
        };
        let store = TokenStore::over(backend);
        match crate::config::token_key_file(config) {
            Some(file) => Ok(store.with_key(TokenKey::read(&file)?)),
            None => Ok(store),
        }
    }

    /// The same grants, sealed with `key` from now on.
    pub(crate) fn with_key(self, key: TokenKey) -> Self {
        TokenStore {
            key: Some(key),
            ..self
        }
    }

    /// The token key's file, when grants are sealed.
    pub fn key_file(&self) -> Option<&Path> {
        self.key.as_ref().map(TokenKey::file)
    }

    pub fn kind(&self) -> StoreKind {
        self.backend.kind()
    }

    /// Where the grants are, for people; never a password.
    pub fn describe(&self) -> String {
        self.backend.describe()
    }

    /// How sentences name `account`'s grant; also what tells two grants apart
    /// across stores (the record of unsaved grants is keyed by it).
    pub fn name_of(&self, account: &str) -> String {
        self.backend.name_of(account)
    }

    /// What to do when a write fails.
    pub fn write_advice(&self) -> String {
        self.backend.write_advice()
    }

    /// Replicas share these grants (see [`Backend::shared`]).
    pub fn shared(&self) -> bool {
        self.backend.shared()
    }

    /// The same place as `other` (same backend, same location).
    pub fn same_place(&self, other: &TokenStore) -> bool {
        self.backend.describe() == other.backend.describe()
    }

    /// Makes the store ready and checks it (at start, at reload, `check`).
    pub async fn prepare(&self) -> Result<(), String> {
        self.backend.prepare().await
    }

    /// Checks `username`'s lock as [`lock`](Self::lock) would take it.
    pub fn check_lock(&self, username: &str) -> Result<(), String> {
        self.backend.check_lock(username)
    }

    /// Whether the store answers now.
    pub async fn probe(&self) -> Result<(), String> {
        self.backend.probe().await
    }

    /// Reads `username`'s grant; `Ok(None)` when there is none yet.
    pub async fn load(&self, username: &str) -> Result<Option<StoredGrant>, LoadError> {
        Ok(self.read(username).await?.map(|file| file.grant))
    }

    /// Reads the grants of `usernames`, in that order, [`READ_AT_ONCE`] at
    /// a time: at start and reload every account's is read, and a store
    /// that drops packets makes each read wait its full time limit.
    pub async fn load_many(
        &self,
        usernames: &[String],
    ) -> Vec<Result<Option<StoredGrant>, LoadError>> {
        let turns = Arc::new(tokio::sync::Semaphore::new(READ_AT_ONCE));
        let mut reads = tokio::task::JoinSet::new();
        for (index, username) in usernames.iter().enumerate() {
            let (store, username, turns) = (self.clone(), username.clone(), turns.clone());
            reads.spawn(async move {
                let _turn = turns.acquire_owned().await;
                (index, store.load(&username).await)
            });
        }
        let mut read: Vec<_> = usernames
            .iter()
            .map(|u| {
                Err(LoadError::Unreadable(format!(
                    "the grant of {u} could not be read; please report this"
                )))
            })
            .collect();
        while let Some(done) = reads.join_next().await {
            if let Ok((index, loaded)) = done {
                read[index] = loaded;
            }
        }
        read
    }

    /// Reads `username`'s grant and whether it is sealed.
    pub async fn read(&self, username: &str) -> Result<Option<GrantFile>, LoadError> {
        Ok(self.read_revision(username).await?.map(|(file, _)| file))
    }

    /// Reads `username`'s grant, whether it is sealed, and its revision.
    pub async fn read_revision(
        &self,
        username: &str,
    ) -> Result<Option<(GrantFile, Revision)>, LoadError> {
        let Some(document) = self.backend.read(username).await? else {
            return Ok(None);
        };
        self.open(username, document).map(Some)
    }

    /// The grant a refresh under `username`'s lock replaces (the caller
    /// holds the lock): as the backend remembers it from under the lock
    /// (a shared store, whose lock may be lost with the network), else as
    /// stored now.
    pub async fn replaced_under_lock(
        &self,
        username: &str,
    ) -> Result<Option<StoredGrant>, LoadError> {
        match self.backend.read_under_lock(username) {
            Some(document) => Ok(Some(self.open(username, document)?.0.grant)),
            None => self.load(username).await,
        }
    }

    /// Unseals and parses `username`'s document.
    fn open(&self, username: &str, document: Document) -> Result<(GrantFile, Revision), LoadError> {
        let name = || self.backend.name_of(username);
        let unsealed = crate::sealing::unseal(self.key.as_ref(), username, &document.bytes)
            .map_err(|e| LoadError::Sealed(self.does_not_open(username, &name(), e)))?;
        let grant = serde_json::from_slice(&unsealed.plaintext).map_err(|e| {
            LoadError::Damaged(format!(
                "{} is damaged ({e}); run `xoauth2-proxy login {username}`",
                name()
            ))
        })?;
        let file = GrantFile {
            grant,
            sealed: unsealed.sealed,
        };
        Ok((file, document.revision))
    }

    /// Why a sealed grant does not open, and what to do: the document is
    /// left as it is, so the right key still opens it.
    fn does_not_open(&self, username: &str, name: &str, e: SealError) -> String {
        let or_login = format!("or move it away and run `xoauth2-proxy login {username}`");
        match e {
            SealError::NoKey => format!(
                "{name} is sealed, but no token key is configured; set `token_key_file` in [server] (or $XOAUTH2_PROXY_TOKEN_KEY_FILE) to the key it was sealed with and reload, {or_login}"
            ),
            SealError::DoesNotOpen => format!(
                "{name} does not open with the token key in {}: that is not the key it was sealed with, or the file is another account's; put the right key there and reload, {or_login}",
                self.key_file().unwrap_or(Path::new("?")).display()
            ),
            SealError::UnknownVersion(v) => format!(
                "{name} is sealed in format {v}, which this version of xoauth2-proxy does not know; run the version that wrote it, {or_login}"
            ),
            SealError::Damaged(why) => format!(
                "{name} is sealed but damaged ({why}); restore it from a backup, {or_login}"
            ),
        }
    }

    /// The revision of `username`'s grant, to notice a write by another
    /// process (a replica, `login`) without reading it.
    pub async fn revision(&self, username: &str) -> Result<Option<Revision>, LoadError> {
        self.backend.revision(username).await
    }

    /// When `username`'s grant was last written.
    pub async fn modified(&self, username: &str) -> Option<SystemTime> {
        let revision = self.backend.revision(username).await.ok()??;
        Some(revision.written)
    }

    /// Takes the account's lock, held while a grant is redeemed, so that two
    /// processes (replicas, `serve` and `login` or `check`, or a config
    /// reloaded while sessions of the old one live) never spend the same
    /// refresh token.
    pub async fn lock(&self, username: &str) -> Result<GrantLock, LockError> {
        self.backend.lock(username).await
    }

    /// Replaces `username`'s grant atomically, sealed when there is a key.
    /// A grant that is there and cannot be opened (sealed under another key,
    /// another account's, unsafe, unreadable) is left as it is: an error.
    pub async fn save(&self, username: &str, grant: &StoredGrant) -> Result<(), String> {
        self.save_revision(username, grant).await.map(|_| ())
    }

    /// [`save`](Self::save), returning the revision written.
    pub async fn save_revision(
        &self,
        username: &str,
        grant: &StoredGrant,
    ) -> Result<Revision, String> {
        match self.read(username).await {
            Ok(_) | Err(LoadError::Damaged(_)) => {}
            Err(e) => return Err(format!("the new grant of {username} is not saved: {e}")),
        }
        let bytes = self.document_of(username, grant)?;
        self.backend.write(username, &bytes).await
    }

    /// `grant` as this store writes it for `username`: JSON, sealed when
    /// there is a key.
    fn document_of(&self, username: &str, grant: &StoredGrant) -> Result<Vec<u8>, String> {
        let json = serde_json::to_vec_pretty(grant).expect("a grant always serialises");
        match &self.key {
            Some(key) => key.seal(username, &json),
            None => Ok(json),
        }
    }

    /// Deletes `username`'s grant (the account then needs `login`); none
    /// there is not an error.
    pub async fn forget(&self, username: &str) -> Result<(), String> {
        self.backend.remove(username).await
    }

    /// The file store under this store, if it is one (its paths).
    pub fn file(&self) -> Option<&FileStore> {
        self.backend.as_any().downcast_ref::<FileStore>()
    }
}

/// How many grants [`TokenStore::load_many`] reads at once.
const READ_AT_ONCE: usize = 8;

/// What `store migrate` did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Migrated {
    /// Accounts whose document was written to the target.
    pub copied: Vec<String>,
    /// Accounts the target already held a grant for: left as it is there,
    /// whatever it holds (it may be newer than the source's).
    pub left: Vec<String>,
}

/// Copies every grant of `from` to `to` as it is (a sealed document stays
/// sealed: sealing binds it to its account, not to its store). Running it
/// again copies nothing new: a grant the target already holds is left as it
/// is, even when it differs from the source's. Once replicas use the target,
/// its grant is the newer one (a refresh rotated its refresh token, `login`
/// or Connect replaced it, `store rekey` sealed it anew), and the source's
/// would bring back a spent refresh token or an old key.
pub async fn migrate(from: &TokenStore, to: &TokenStore) -> Result<Migrated, String> {
    to.prepare().await?;
    let mut done = Migrated::default();
    for account in from.backend.accounts().await? {
        let Some(document) = from
            .backend
            .read(&account)
            .await
            .map_err(|e| e.to_string())?
        else {
            continue;
        };
        if copy_if_absent(to, &account, &document).await? {
            done.copied.push(account);
        } else {
            done.left.push(account);
        }
    }
    Ok(done)
}

/// Writes `document` as `account`'s in `to` unless `to` holds one already:
/// looked at under the account's lock, so that a replica's refresh or a
/// `login` writing meanwhile is never overwritten. True when written.
async fn copy_if_absent(
    to: &TokenStore,
    account: &str,
    document: &Document,
) -> Result<bool, String> {
    let _lock = to.lock(account).await.map_err(|e| e.to_string())?;
    let there = to.backend.read(account).await;
    match there {
        // A file too large to be a grant is there too: left for the user.
        Ok(Some(_)) | Err(LoadError::Damaged(_)) => Ok(false),
        Ok(None) => {
            to.backend.write(account, &document.bytes).await?;
            Ok(true)
        }
        Err(e) => Err(e.to_string()),
    }
}

/// What `store rekey` did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Rekeyed {
    /// Accounts whose grant was sealed again with the current key.
    pub sealed: Vec<String>,
    /// Accounts whose grant the current key opened already.
    pub current: Vec<String>,
    /// Grants opened by neither key (or damaged), each with the sentence
    /// that says why; they are left as they are.
    pub left: Vec<String>,
}

/// Seals every grant of `store` with its token key, the one configured now:
/// a grant sealed with `old` (a token key being replaced), or not sealed at
/// all, is opened and written again under its account's lock; one that the
/// current key opens already is left. A grant neither key opens is never
/// written: `left` says which, and why.
///
/// Why a command and not only the next write: a grant is written when its
/// token is refreshed, and an account nobody uses is written only by the
/// keep-alive (`grant_keepalive`, a week): until then the old key would be
/// needed, which is what replacing a key is to end.
pub async fn rekey(store: &TokenStore, old: Option<TokenKey>) -> Result<Rekeyed, String> {
    if store.key.is_none() {
        return Err(
            "no token key is configured: set `token_key_file` in [server] (or $XOAUTH2_PROXY_TOKEN_KEY_FILE) to the new key, made with `xoauth2-proxy keygen FILE`, and run this again".into(),
        );
    }
    let before = TokenStore {
        key: old,
        ..store.clone()
    };
    store.prepare().await?;
    let mut done = Rekeyed::default();
    for account in store.backend.accounts().await? {
        let _lock = store.lock(&account).await.map_err(|e| e.to_string())?;
        let Some(document) = store
            .backend
            .read(&account)
            .await
            .map_err(|e| e.to_string())?
        else {
            continue;
        };
        if let Ok((file, _)) = store.open(&account, document.clone())
            && file.sealed
        {
            done.current.push(account);
            continue;
        }
        match before.open(&account, document) {
            Ok((file, _)) => {
                let bytes = store.document_of(&account, &file.grant)?;
                store.backend.write(&account, &bytes).await?;
                done.sealed.push(account);
            }
            Err(e) => done.left.push(e.to_string()),
        }
    }
    Ok(done)
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests;
