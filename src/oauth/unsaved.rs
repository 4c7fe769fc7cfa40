//! Grants that could not be written: kept in memory, preferred over the
//! stale file, and written again in the background until the disk takes them.
//!
//! When the disk is full (or the state directory read-only, or failing) at
//! the moment a rotated refresh token must be saved, the file keeps the
//! previous grant (the write is atomic) and the new one lives in memory only.
//! The identity provider may already have spent the refresh token in the
//! file, so the memory holds the only copy that works. Three rules follow:
//!
//! - the next refresh presents the unsaved grant, never the stale file, even
//!   from a token manager made by a config reload: hence one record for the
//!   whole process, keyed by the grant file, that every token manager reads
//!   when it (re)loads the file;
//! - the grant reaches the disk as soon as the disk takes it, not at the next
//!   refresh (an hour or a week away): one retry task per unsaved file, with
//!   a back-off from 1 s to 1 min, under the same file lock as a refresh;
//! - a file that holds a refresh token other than the one the unsaved grant
//!   replaced (or the unsaved one itself) was written by someone else
//!   (`xoauth2-proxy login`): it is newer, and wins.
//!
//! The `grant_unsaved` gauge is 1 while an account has a record; the log says
//! so once when it starts and once when the grant is saved.

use std::collections::HashMap;
use std::sync::{LazyLock, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tracing::{debug, error, info, warn};

use super::store::{GrantLock, LockError, StoredGrant, TokenStore};
use crate::secret::Secret;

/// The first wait before writing an unsaved grant again; it doubles after
/// each failure up to [`LAST_RETRY`].
const FIRST_RETRY: Duration = Duration::from_secs(1);
const LAST_RETRY: Duration = Duration::from_secs(60);

/// A grant the process holds that its file does not.
struct Unsaved {
    /// Where it goes, for the last attempt at shutdown.
    store: TokenStore,
    account: String,
    grant: StoredGrant,
    /// The refresh token the file held when the first write failed.
    replaced: Option<Secret>,
    /// Bumped by each newer grant, so that a retry that wrote an older one
    /// does not clear the record.
    version: u64,
    since: Instant,
    failures: u32,
}

/// Every unsaved grant of the process, by where it goes ([`TokenStore::name_of`]).
static UNSAVED: LazyLock<Mutex<HashMap<String, Unsaved>>> = LazyLock::new(Default::default);

fn records() -> MutexGuard<'static, HashMap<String, Unsaved>> {
    // A panic elsewhere cannot leave a record half-written: use it anyway.
    UNSAVED.lock().unwrap_or_else(|e| e.into_inner())
}

/// Writing `grant` to `account`'s file failed with `reason`: keep it, say so
/// (once), and retry in the background.
pub(super) async fn failed(store: &TokenStore, account: &str, grant: &StoredGrant, reason: &str) {
    let path = store.name_of(account);
    if let Some(record) = records().get_mut(&path) {
        record.grant = grant.clone();
        record.version += 1;
        record.failures += 1;
        debug!(account, "grant still not saved: {reason}");
        return;
    }
    // Read before the record exists: a refresh holds the lock, so the grant
    // cannot change in between (a shared store remembers it from under the
    // lock, which the network may have taken since).
    let replaced = store
        .replaced_under_lock(account)
        .await
        .ok()
        .flatten()
        .and_then(|g| g.refresh_token);
    let record = Unsaved {
        store: store.clone(),
        account: account.to_string(),
        grant: grant.clone(),
        replaced,
        version: 0,
        since: Instant::now(),
        failures: 1,
    };
    records().insert(path, record);
    set_gauge(account, 1);
    warn!(
        account,
        "grant of {account} not saved: {reason}; kept in memory, retrying; {}",
        store.write_advice()
    );
    spawn_retries(store.clone(), account.to_string());
}

/// A grant of `account` was written: nothing of it is left unsaved.
pub(super) fn saved(store: &TokenStore, account: &str) {
    if let Some(record) = records().remove(&store.name_of(account)) {
        recovered(account, &record);
    }
}

/// What a token manager should hold after reading `account`'s file: the
/// unsaved grant while the file is the stale one it replaced, else the file.
pub(super) fn prefer_unsaved(
    store: &TokenStore,
    account: &str,
    on_file: Option<StoredGrant>,
) -> Option<StoredGrant> {
    unsaved_over(store, account, on_file.as_ref()).or(on_file)
}

/// The unsaved grant of `account`, if there is one and `on_file` is older;
/// a newer file ends the record.
fn unsaved_over(
    store: &TokenStore,
    account: &str,
    on_file: Option<&StoredGrant>,
) -> Option<StoredGrant> {
    let path = store.name_of(account);
    let mut records = records();
    let record = records.get(&path)?;
    if is_stale(record, on_file) {
        return Some(record.grant.clone());
    }
    records.remove(&path);
    drop(records);
    replaced_by_another(account);
    None
}

/// The file holds the grant the unsaved one replaced, or the unsaved one's
/// own refresh token: nothing newer than the memory.
fn is_stale(record: &Unsaved, on_file: Option<&StoredGrant>) -> bool {
    let on_file = on_file.and_then(|g| g.refresh_token.as_ref());
    on_file == record.replaced.as_ref() || on_file == record.grant.refresh_token.as_ref()
}

fn replaced_by_another(account: &str) {
    set_gauge(account, 0);
    warn!(
        account,
        "the stored grant of {account} was replaced by another process (another replica, or `xoauth2-proxy login`) while this one could not save its newer grant; the stored grant is used"
    );
}

fn recovered(account: &str, record: &Unsaved) {
    set_gauge(account, 0);
    info!(
        account,
        failed_writes = record.failures,
        "grant of {account} saved after {} in memory only",
        humantime::format_duration(Duration::from_secs(record.since.elapsed().as_secs()))
    );
}

/// One last attempt to write every unsaved grant of `store`, when the proxy
/// stops: what is still unsaved then is lost with the process, and the log
/// says which accounts may need `login`.
pub(super) async fn save_before_exit(store: &TokenStore) {
    let pending: Vec<(TokenStore, String)> = records()
        .values()
        .filter(|r| r.store.same_place(store))
        .map(|r| (r.store.clone(), r.account.clone()))
        .collect();
    for (store, account) in pending {
        let locked = lock(&store, &account).await;
        if locked.is_err() || !retry_once(&store, &account).await {
            error!(
                account,
                "the newest grant of {account} could not be saved before exit; {} before starting again, and if the proxy then says it needs login, run `xoauth2-proxy login {account}`",
                store.write_advice()
            );
        }
    }
}

/// Whether `account` has a grant not yet written.
#[cfg(test)]
pub(super) fn is_unsaved(store: &TokenStore, account: &str) -> bool {
    records().contains_key(&store.name_of(account))
}

fn set_gauge(account: &str, value: i64) {
    crate::metrics::get()
        .grant_unsaved
        .get_or_create(&crate::metrics::AccountLabels {
            account: account.to_string(),
        })
        .set(value);
}

/// Starts the retries on the running async runtime (a token manager only
/// saves inside one).
fn spawn_retries(store: TokenStore, account: String) {
    match tokio::runtime::Handle::try_current() {
        Ok(runtime) => drop(runtime.spawn(retry_until_saved(store, account))),
        Err(_) => warn!(account, "no runtime to retry saving the grant on"),
    }
}

/// Writes the unsaved grant again, waiting longer after each failure, until
/// it is saved or no longer needed.
async fn retry_until_saved(store: TokenStore, account: String) {
    let mut wait = FIRST_RETRY;
    loop {
        tokio::time::sleep(wait).await;
        let locked = lock(&store, &account).await;
        if locked.is_ok() && retry_once(&store, &account).await {
            return;
        }
        wait = next_wait(wait);
    }
}

/// The lock a refresh takes, so that no refresh runs while the grant is
/// written. A file store's lock may be skipped (the write is still atomic);
/// a shared store's may not: without it another replica may be refreshing,
/// and a grant written now could replace the newer one it is storing.
async fn lock(store: &TokenStore, account: &str) -> Result<Option<GrantLock>, ()> {
    match store.lock(account).await {
        Ok(lock) => Ok(Some(lock)),
        Err(LockError::Skippable(_)) => Ok(None),
        Err(LockError::Unavailable(e)) => {
            debug!(account, "grant still not saved: {e}");
            Err(())
        }
    }
}

fn next_wait(wait: Duration) -> Duration {
    (wait * 2).min(LAST_RETRY)
}

/// One attempt; true when nothing is left to save.
async fn retry_once(store: &TokenStore, account: &str) -> bool {
    let path = store.name_of(account);
    let Some((grant, version)) = records().get(&path).map(|r| (r.grant.clone(), r.version)) else {
        return true;
    };
    if let Ok(on_file) = store.load(account).await
        && unsaved_over(store, account, on_file.as_ref()).is_none()
    {
        return true;
    }
    if let Err(e) = store.save(account, &grant).await {
        if let Some(record) = records().get_mut(&path) {
            record.failures += 1;
        }
        debug!(account, "grant still not saved: {e}");
        return false;
    }
    let mut records = records();
    if records.get(&path).is_some_and(|r| r.version != version) {
        // A newer grant arrived while this one was written: write that too.
        return false;
    }
    let record = records.remove(&path);
    drop(records);
    if let Some(record) = record {
        recovered(account, &record);
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_wait_longer_each_time_up_to_a_minute() {
        let mut wait = FIRST_RETRY;
        let mut waits = vec![wait];
        for _ in 0..8 {
            wait = next_wait(wait);
            waits.push(wait);
        }
        let secs: Vec<u64> = waits.iter().map(Duration::as_secs).collect();
        assert_eq!(secs, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
    }

    fn grant(refresh_token: &str) -> StoredGrant {
        StoredGrant {
            refresh_token: Some(Secret::new(refresh_token.into())),
            ..Default::default()
        }
    }

    async fn on_file(store: &TokenStore, account: &str) -> Option<String> {
        let grant = store.load(account).await.ok()??;
        Some(grant.refresh_token?.expose().to_string())
    }

    /// The unsaved-grant gauge of `account` (each test has its own: the
    /// metrics are the process's).
    fn gauge(account: &str) -> i64 {
        crate::metrics::get()
            .grant_unsaved
            .get_or_create(&crate::metrics::AccountLabels {
                account: account.into(),
            })
            .get()
    }

    #[tokio::test]
    async fn a_failed_write_is_retried_until_it_succeeds() {
        const USER: &str = "retried@contoso.com";
        let dir = tempfile::tempdir().unwrap();
        let store = TokenStore::new(dir.path());
        // Where the folder of grants should be, a file: every write fails.
        std::fs::write(store.file().unwrap().dir(), b"in the way").unwrap();
        failed(&store, USER, &grant("rt1"), "cannot write").await;
        assert_eq!(gauge(USER), 1);
        assert!(!retry_once(&store, USER).await, "still failing");
        assert_eq!(gauge(USER), 1);
        // A newer grant arrives while the disk still refuses it.
        failed(&store, USER, &grant("rt2"), "cannot write").await;
        std::fs::remove_file(store.file().unwrap().dir()).unwrap();
        assert!(retry_once(&store, USER).await, "written");
        assert_eq!(on_file(&store, USER).await.as_deref(), Some("rt2"));
        assert_eq!(gauge(USER), 0);
        assert!(retry_once(&store, USER).await, "nothing left to write");
    }

    #[tokio::test]
    async fn a_retry_never_overwrites_a_grant_written_by_login() {
        const USER: &str = "overtaken@contoso.com";
        let dir = tempfile::tempdir().unwrap();
        let store = TokenStore::new(dir.path());
        store.save(USER, &grant("rt1")).await.unwrap();
        failed(&store, USER, &grant("rt2"), "cannot write").await;
        store.save(USER, &grant("from-login")).await.unwrap();
        assert!(retry_once(&store, USER).await, "nothing left to write");
        assert_eq!(on_file(&store, USER).await.as_deref(), Some("from-login"));
        assert_eq!(gauge(USER), 0);
    }

    #[tokio::test]
    async fn the_proxy_tries_once_more_when_it_stops() {
        const USER: &str = "stopping@contoso.com";
        let dir = tempfile::tempdir().unwrap();
        let store = TokenStore::new(dir.path());
        std::fs::write(store.file().unwrap().dir(), b"in the way").unwrap();
        failed(&store, USER, &grant("rt1"), "cannot write").await;
        std::fs::remove_file(store.file().unwrap().dir()).unwrap();
        save_before_exit(&store).await;
        assert_eq!(on_file(&store, USER).await.as_deref(), Some("rt1"));
        assert!(!is_unsaved(&store, USER));
    }
}
