//! What a store of grants is: the [`Backend`] trait its kinds implement,
//! and the types it speaks in. A file of its own so that the backends
//! ([`super::file`], [`super::postgres`]) import it and the store's façade
//! imports them, without a circle.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::time::SystemTime;

use crate::config::StoreKind;

/// Why a stored grant cannot be used. The callers branch: a sealed grant
/// that does not open and an unsafe file make a client wait ("unavailable")
/// and are never replaced; a damaged one is replaced by the next `login`;
/// a store that cannot be reached makes the client come back later.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LoadError {
    /// Sealed, and it does not open with the key in force (or there is none).
    #[error("{0}")]
    Sealed(String),
    /// A symbolic link, or a file another user owns or may write.
    #[error("{0}")]
    Unsafe(String),
    /// The file could not be read.
    #[error("{0}")]
    Unreadable(String),
    /// Read, but not a grant.
    #[error("{0}")]
    Damaged(String),
    /// The store (the database) cannot be reached now; nothing is known.
    #[error("{0}")]
    Unavailable(String),
}

/// Which write of an account's document a reader saw: a different revision
/// means another process (a replica, `login`) wrote it since.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Revision {
    /// Counts the writes where the backend counts them (a row's version).
    pub version: i64,
    /// When it was written (a file's modification time).
    pub written: SystemTime,
}

/// An account's document as a backend holds it.
#[derive(Debug, Clone)]
pub struct Document {
    pub bytes: Vec<u8>,
    pub revision: Revision,
}

/// Why the cross-process lock of an account could not be taken.
#[derive(Debug, Clone)]
pub enum LockError {
    /// The lock is a convenience here (a file store's lock file that cannot
    /// be made): the refresh may go on without it.
    Skippable(String),
    /// Without the lock another replica may spend the same refresh token:
    /// no refresh now (the database cannot be reached).
    Unavailable(String),
}

impl fmt::Display for LockError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LockError::Skippable(s) | LockError::Unavailable(s) => f.write_str(s),
        }
    }
}

/// Held while a grant is being redeemed; released when dropped (and by the
/// operating system or the database when the process dies).
pub struct GrantLock {
    _held: Box<dyn Send + Sync>,
}

impl GrantLock {
    pub(crate) fn new(held: impl Send + Sync + 'static) -> Self {
        GrantLock {
            _held: Box::new(held),
        }
    }
}

/// A boxed future: the trait is used as `dyn Backend`.
pub type Pending<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What keeps the documents. Implementations hold bytes; [`TokenStore`]
/// seals, parses and phrases.
pub trait Backend: Send + Sync + 'static {
    /// `file`, `postgres`: the `kind` of `[store]`.
    fn kind(&self) -> StoreKind;
    /// Where the grants are, for people ("files under /var/lib/…",
    /// "PostgreSQL db:5432/nocobase, schema xoauth2_proxy"); never a password.
    fn describe(&self) -> String;
    /// How a sentence names `account`'s document ("token file /…/a.json").
    fn name_of(&self, account: &str) -> String;
    /// What to do when a write fails ("free space in …").
    fn write_advice(&self) -> String;
    /// Every process of a deployment shares these grants: a cached access
    /// token is used without asking the store first (the store is asked
    /// under the lock, before any refresh).
    fn shared(&self) -> bool;
    /// Makes the store ready (folders, schema migrations) and checks it;
    /// at start, at reload and by `check`.
    fn prepare(&self) -> Pending<'_, Result<(), String>>;
    /// Checks `account`'s lock as [`lock`](Self::lock) would take it.
    fn check_lock(&self, account: &str) -> Result<(), String>;
    /// While this process holds `account`'s lock: the document as it last
    /// read or wrote it under that lock, which is what a refresh under the
    /// lock replaces, known even when the store cannot be reached now (a
    /// shared store's lock may have been lost with the network, and another
    /// process may have written since). `None`: read the store instead.
    fn read_under_lock(&self, _account: &str) -> Option<Document> {
        None
    }
    fn read<'a>(&'a self, account: &'a str) -> Pending<'a, Result<Option<Document>, LoadError>>;
    /// The revision of `account`'s document, without reading it.
    fn revision<'a>(&'a self, account: &'a str)
    -> Pending<'a, Result<Option<Revision>, LoadError>>;
    /// Replaces `account`'s document, atomically and durably.
    fn write<'a>(
        &'a self,
        account: &'a str,
        bytes: &'a [u8],
    ) -> Pending<'a, Result<Revision, String>>;
    /// Removes `account`'s document; none there is not an error.
    fn remove<'a>(&'a self, account: &'a str) -> Pending<'a, Result<(), String>>;
    /// Takes `account`'s lock across processes, waiting for it.
    fn lock<'a>(&'a self, account: &'a str) -> Pending<'a, Result<GrantLock, LockError>>;
    /// The accounts (lower-cased) that have a document, for `store migrate`.
    fn accounts(&self) -> Pending<'_, Result<Vec<String>, String>>;
    /// Whether the store answers now; the sentence says why not.
    fn probe(&self) -> Pending<'_, Result<(), String>>;
    /// The backend itself, so that the façade can reach a kind's own
    /// methods (the file store's paths).
    fn as_any(&self) -> &dyn std::any::Any;
}
