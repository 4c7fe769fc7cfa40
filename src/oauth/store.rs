//! Grants on disk: one JSON file per account under `<state_dir>/tokens/`.
//!
//! Every write replaces the file atomically ([`crate::private_file`]), so a
//! crash at any moment leaves either the old grant or the new one, never
//! neither.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::config::Flow;
use crate::private_file::{create_private_dir, write_atomically};
use crate::secret::Secret;

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
}

/// The folder of grant files.
#[derive(Debug, Clone)]
pub struct TokenStore {
    dir: PathBuf,
}

impl TokenStore {
    pub fn new(state_dir: &Path) -> Self {
        TokenStore {
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

    /// Reads `username`'s grant; `Ok(None)` when there is none yet.
    pub fn load(&self, username: &str) -> Result<Option<StoredGrant>, String> {
        let path = self.path(username);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| {
                format!(
                    "token file {} is damaged ({e}); run `xoauth2-proxy login {username}`",
                    path.display()
                )
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(format!(
                "cannot read token file {}: {}; {FIX_PERMISSIONS}",
                path.display(),
                crate::error::io_reason(&e)
            )),
        }
    }

    /// The modification time of `username`'s file, to notice a `login` run by
    /// another process.
    pub fn modified(&self, username: &str) -> Option<SystemTime> {
        std::fs::metadata(self.path(username))
            .and_then(|m| m.modified())
            .ok()
    }

    /// Takes the account's lock file, held while a grant is redeemed, so that
    /// two processes (`serve` and `login`, `check`, or a config reloaded while
    /// sessions of the old one live) never spend the same refresh token.
    pub async fn lock(&self, username: &str) -> Result<GrantLock, String> {
        let path = self.path(username).with_extension("lock");
        create_private_dir(&self.dir).map_err(|e| {
            format!(
                "cannot create the state directory {}: {}; {FIX_PERMISSIONS}",
                self.dir.display(),
                crate::error::io_reason(&e)
            )
        })?;
        let mut options = std::fs::OpenOptions::new();
        options.read(true).write(true).create(true).truncate(false);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        let file = options.open(&path).map_err(|e| {
            format!(
                "cannot open lock file {}: {}; {FIX_PERMISSIONS}",
                path.display(),
                crate::error::io_reason(&e)
            )
        })?;
        tokio::task::spawn_blocking(move || file.lock().map(|()| GrantLock { _file: file }))
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

    /// Replaces `username`'s grant atomically.
    pub fn save(&self, username: &str, grant: &StoredGrant) -> Result<(), String> {
        let path = self.path(username);
        let fail = |what: &str, e: std::io::Error| {
            format!(
                "cannot {what} token file {}: {}; {FIX_PERMISSIONS}",
                path.display(),
                crate::error::io_reason(&e)
            )
        };
        create_private_dir(&self.dir).map_err(|e| fail("create the folder of", e))?;
        let json = serde_json::to_vec_pretty(grant).expect("a grant always serialises");
        write_atomically(&path, &json).map_err(|e| fail("write", e))?;
        Ok(())
    }
}

/// What to do when the state directory or a file in it cannot be used.
const FIX_PERMISSIONS: &str = "check that the state directory is writable by the user the proxy runs as (or set `state_dir` in [server])";

/// Held while a grant is being redeemed; released when dropped.
pub struct GrantLock {
    _file: std::fs::File,
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn save_replaces_atomically_with_private_mode() {
        let dir = tempfile::tempdir().unwrap();
        let store = TokenStore::new(dir.path());
        let mut grant = StoredGrant {
            account: "a@b.c".into(),
            refresh_token: Some(Secret::new("rt1".into())),
            ..Default::default()
        };
        store.save("a@b.c", &grant).unwrap();
        grant.refresh_token = Some(Secret::new("rt2".into()));
        store.save("A@B.C", &grant).unwrap();
        let loaded = store.load("a@b.c").unwrap().unwrap();
        assert_eq!(loaded.refresh_token.unwrap().expose(), "rt2");
        let names: Vec<_> = std::fs::read_dir(store.dir())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(
            names,
            vec!["a@b.c.json".to_string()],
            "no temporary files left"
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(store.path("a@b.c"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }

    #[test]
    fn usernames_cannot_escape_the_folder() {
        let store = TokenStore::new(Path::new("/state"));
        assert_eq!(
            store.path("../x/y").parent().unwrap(),
            Path::new("/state/tokens")
        );
        assert_eq!(
            store.path("../x/y").file_name().unwrap().to_str().unwrap(),
            "%2E.%2Fx%2Fy.json"
        );
    }

    #[test]
    fn missing_file_is_no_grant_and_damaged_file_says_login() {
        let dir = tempfile::tempdir().unwrap();
        let store = TokenStore::new(dir.path());
        assert!(store.load("x").unwrap().is_none());
        create_private_dir(store.dir()).unwrap();
        std::fs::write(store.path("x"), b"{not json").unwrap();
        assert!(
            store
                .load("x")
                .unwrap_err()
                .contains("xoauth2-proxy login x")
        );
    }
}
