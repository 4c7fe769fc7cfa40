//! Grants on disk: one file per account under `<state_dir>/tokens/`.
//!
//! Every write replaces the file atomically ([`crate::private_file`]), so a
//! crash at any moment leaves either the old grant or the new one, never
//! neither.
//!
//! A file the proxy cannot open is never replaced: a sealed grant under the
//! wrong key (or another account's, swapped in) stays byte for byte as it
//! is, so the right key brings it back. A plain file is read, and sealed at
//! its next write. Grant and lock files are opened without following a
//! symbolic link and must belong to the proxy's user; the state directory
//! and `tokens/` must not be writable by other users ([`FileStore::prepare`]).
//! The lock is an advisory lock on a file beside the grant: the operating
//! system releases it when the process dies.

use std::io::Read;
use std::path::{Path, PathBuf};

use super::backend::{Backend, Document, GrantLock, LoadError, LockError, Pending, Revision};
use crate::config::StoreKind;
use crate::private_file::{
    Exposure, create_private_dir, dir_exposure, file_exposure, is_link_refusal, no_follow,
    remove_stale_temporaries, write_atomically,
};

/// A grant file is a few kilobytes; one larger than this is not a grant.
const MAX_GRANT_FILE: u64 = 1 << 20;

/// The folder of grant files.
#[derive(Debug, Clone)]
pub struct FileStore {
    dir: PathBuf,
}

impl FileStore {
    /// The grants under `state_dir`.
    pub fn new(state_dir: &Path) -> Self {
        FileStore {
            dir: state_dir.join("tokens"),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The file that holds `username`'s grant. Names are the lower-cased
    /// username with anything outside `[a-z0-9@._-]` percent-encoded, so that
    /// no username can escape the folder.
    pub fn path(&self, username: &str) -> PathBuf {
        let mut name = String::new();
        for b in username.to_lowercase().bytes() {
            match b {
                b'a'..=b'z' | b'0'..=b'9' | b'@' | b'_' | b'-' => name.push(b as char),
                b'.' if !name.is_empty() => name.push('.'),
                _ => name.push_str(&format!("%{b:02X}")),
            }
        }
        self.dir.join(format!("{name}.json"))
    }

    pub(crate) fn lock_path(&self, username: &str) -> PathBuf {
        self.path(username).with_extension("lock")
    }

    /// Creates the folder of grants if it is missing, then checks that it
    /// and the state directory are the proxy's own and that no other user
    /// may write them (at start and at reload).
    pub fn prepare(&self) -> Result<(), String> {
        let state_dir = self.dir.parent().unwrap_or(Path::new("."));
        create_private_dir(&self.dir).map_err(|e| {
            format!(
                "cannot create the state directory {}: {}; create it or set `server.state_dir` to a writable directory",
                state_dir.display(),
                crate::error::io_reason(&e)
            )
        })?;
        for (what, dir) in [
            ("state directory", state_dir),
            ("folder of grants", &self.dir),
        ] {
            let meta = std::fs::metadata(dir).map_err(|e| {
                format!(
                    "cannot inspect the {what} {}: {}; {FIX_PERMISSIONS}",
                    dir.display(),
                    crate::error::io_reason(&e)
                )
            })?;
            if let Some(exposure) = dir_exposure(&meta) {
                return Err(exposure.sentence(&format!("the {what}"), dir));
            }
        }
        let removed = remove_stale_temporaries(&self.dir);
        if removed > 0 {
            tracing::info!(
                "removed {removed} temporary grant file(s) left by a process that was killed while writing"
            );
        }
        Ok(())
    }

    /// Checks `username`'s lock file, if there is one, as [`lock`](Self::lock)
    /// would: no link, the proxy's own.
    pub fn check_lock(&self, username: &str) -> Result<(), String> {
        let path = self.lock_path(username);
        match std::fs::symlink_metadata(&path) {
            Ok(meta) => match file_exposure(&meta) {
                Some(exposure) => Err(exposure.sentence("lock file", &path)),
                None => Ok(()),
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(format!(
                "cannot inspect lock file {}: {}; {FIX_PERMISSIONS}",
                path.display(),
                crate::error::io_reason(&e)
            )),
        }
    }

    /// The bytes of `username`'s file and its revision.
    fn read_document(&self, username: &str) -> Result<Option<Document>, LoadError> {
        let path = self.path(username);
        let Some((bytes, meta)) = read_own_file(&path)? else {
            return Ok(None);
        };
        Ok(Some(Document {
            bytes,
            revision: revision_of(&meta),
        }))
    }

    fn file_revision(&self, username: &str) -> Option<Revision> {
        std::fs::symlink_metadata(self.path(username))
            .ok()
            .map(|m| revision_of(&m))
    }

    /// Replaces `username`'s file atomically.
    fn write_document(&self, username: &str, bytes: &[u8]) -> Result<Revision, String> {
        let path = self.path(username);
        let fail = |what: &str, e: std::io::Error| {
            format!(
                "cannot {what} token file {}: {}; {FIX_PERMISSIONS}",
                path.display(),
                crate::error::io_reason(&e)
            )
        };
        create_private_dir(&self.dir).map_err(|e| fail("create the folder of", e))?;
        write_atomically(&path, bytes).map_err(|e| fail("write", e))?;
        let meta = std::fs::symlink_metadata(&path).map_err(|e| fail("inspect", e))?;
        Ok(revision_of(&meta))
    }

    /// Takes the account's lock file.
    pub async fn lock(&self, username: &str) -> Result<GrantLock, String> {
        let path = self.lock_path(username);
        create_private_dir(&self.dir).map_err(|e| {
            format!(
                "cannot create the state directory {}: {}; {FIX_PERMISSIONS}",
                self.dir.display(),
                crate::error::io_reason(&e)
            )
        })?;
        let file = open_lock_file(&path)?;
        tokio::task::spawn_blocking(move || file.lock().map(|()| GrantLock::new(file)))
            .await
            .map_err(|e| format!("waiting for the lock on {} failed: {e}", path.display()))?
            .map_err(|e| {
                format!(
                    "cannot lock {}: {}; {FIX_PERMISSIONS}",
                    path.display(),
                    crate::error::io_reason(&e)
                )
            })
    }

    /// Removes `username`'s grant file, if there is one.
    fn remove_file(&self, username: &str) -> Result<(), String> {
        let path = self.path(username);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(format!(
                "cannot remove token file {}: {}; {FIX_PERMISSIONS}",
                path.display(),
                crate::error::io_reason(&e)
            )),
        }
    }

    /// The accounts with a grant file: the names decoded (lower-cased).
    fn list(&self) -> Result<Vec<String>, String> {
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => {
                return Err(format!(
                    "cannot list {}: {}; {FIX_PERMISSIONS}",
                    self.dir.display(),
                    crate::error::io_reason(&e)
                ));
            }
        };
        let mut accounts: Vec<String> = entries
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter_map(|name| decode_name(name.strip_suffix(".json")?))
            .collect();
        accounts.sort();
        Ok(accounts)
    }
}

/// The username a file name stands for (the inverse of [`FileStore::path`]).
fn decode_name(name: &str) -> Option<String> {
    let bytes = name.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok().filter(|s| !s.is_empty())
}

fn revision_of(meta: &std::fs::Metadata) -> Revision {
    Revision {
        version: 0,
        written: meta.modified().unwrap_or(std::time::UNIX_EPOCH),
    }
}

fn ready<'a, T: Send + 'a>(value: T) -> Pending<'a, T> {
    Box::pin(std::future::ready(value))
}

impl Backend for FileStore {
    fn kind(&self) -> StoreKind {
        StoreKind::File
    }

    fn describe(&self) -> String {
        format!("files under {}", self.dir.display())
    }

    fn name_of(&self, account: &str) -> String {
        format!("token file {}", self.path(account).display())
    }

    fn write_advice(&self) -> String {
        format!("free space in {}", self.dir.display())
    }

    fn shared(&self) -> bool {
        false
    }

    fn prepare(&self) -> Pending<'_, Result<(), String>> {
        ready(FileStore::prepare(self))
    }

    fn check_lock(&self, account: &str) -> Result<(), String> {
        FileStore::check_lock(self, account)
    }

    fn read<'a>(&'a self, account: &'a str) -> Pending<'a, Result<Option<Document>, LoadError>> {
        ready(self.read_document(account))
    }

    fn revision<'a>(
        &'a self,
        account: &'a str,
    ) -> Pending<'a, Result<Option<Revision>, LoadError>> {
        ready(Ok(self.file_revision(account)))
    }

    fn write<'a>(
        &'a self,
        account: &'a str,
        bytes: &'a [u8],
    ) -> Pending<'a, Result<Revision, String>> {
        ready(self.write_document(account, bytes))
    }

    fn remove<'a>(&'a self, account: &'a str) -> Pending<'a, Result<(), String>> {
        ready(self.remove_file(account))
    }

    fn lock<'a>(&'a self, account: &'a str) -> Pending<'a, Result<GrantLock, LockError>> {
        Box::pin(async move {
            FileStore::lock(self, account)
                .await
                .map_err(LockError::Skippable)
        })
    }

    fn accounts(&self) -> Pending<'_, Result<Vec<String>, String>> {
        ready(self.list())
    }

    fn probe(&self) -> Pending<'_, Result<(), String>> {
        ready(Ok(()))
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

/// The bytes of the grant file at `path`, opened without following a link,
/// if it belongs to the proxy's user and no one else may write it.
fn read_own_file(path: &Path) -> Result<Option<(Vec<u8>, std::fs::Metadata)>, LoadError> {
    let unreadable = |e: &std::io::Error| {
        LoadError::Unreadable(format!(
            "cannot read token file {}: {}; {FIX_PERMISSIONS}",
            path.display(),
            crate::error::io_reason(e)
        ))
    };
    let file = match no_follow(std::fs::OpenOptions::new().read(true)).open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) if is_link_refusal(&e) => {
            return Err(LoadError::Unsafe(
                Exposure::Link.sentence("token file", path),
            ));
        }
        Err(e) => return Err(unreadable(&e)),
    };
    let meta = file.metadata().map_err(|e| unreadable(&e))?;
    if let Some(exposure) = file_exposure(&meta) {
        return Err(LoadError::Unsafe(exposure.sentence("token file", path)));
    }
    let mut bytes = Vec::new();
    file.take(MAX_GRANT_FILE + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| unreadable(&e))?;
    if bytes.len() as u64 > MAX_GRANT_FILE {
        return Err(LoadError::Damaged(format!(
            "token file {} is larger than a grant can be; move it away and run `xoauth2-proxy login`",
            path.display()
        )));
    }
    Ok(Some((bytes, meta)))
}

/// Opens (or creates, mode 0600) the lock file at `path`: never through a
/// link, and only if it is the proxy's own.
fn open_lock_file(path: &Path) -> Result<std::fs::File, String> {
    let mut options = std::fs::OpenOptions::new();
    options.read(true).write(true).create(true).truncate(false);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let file = no_follow(&mut options).open(path).map_err(|e| {
        if is_link_refusal(&e) {
            return Exposure::Link.sentence("lock file", path);
        }
        format!(
            "cannot open lock file {}: {}; {FIX_PERMISSIONS}",
            path.display(),
            crate::error::io_reason(&e)
        )
    })?;
    let exposure = file.metadata().ok().and_then(|m| file_exposure(&m));
    match exposure {
        Some(exposure) => Err(exposure.sentence("lock file", path)),
        None => Ok(file),
    }
}

/// What to do when the state directory or a file in it cannot be used.
const FIX_PERMISSIONS: &str = "check that the state directory is writable by the user the proxy runs as (or set `state_dir` in [server])";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names_decode_back_to_their_accounts() {
        let store = FileStore::new(Path::new("/state"));
        for account in ["sales@contoso.com", ".hidden@x.com", "a b/c%d@x.com"] {
            let path = store.path(account);
            let name = path.file_name().unwrap().to_str().unwrap();
            let decoded = decode_name(name.strip_suffix(".json").unwrap());
            assert_eq!(decoded.as_deref(), Some(account));
        }
        assert_eq!(decode_name("%4"), None);
        assert_eq!(decode_name("%ZZ"), None);
    }
}
