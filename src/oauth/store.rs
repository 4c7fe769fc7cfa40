//! Grants on disk: one JSON file per account under `<state_dir>/tokens/`,
//! sealed with the token key when one is configured ([`crate::sealing`]).
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
//! and `tokens/` must not be writable by other users ([`TokenStore::prepare`]).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::config::{Config, Flow};
use crate::private_file::{
    Exposure, create_private_dir, dir_exposure, file_exposure, is_link_refusal, no_follow,
    remove_stale_temporaries, write_atomically,
};
use crate::sealing::{SealError, TokenKey};
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
    /// Who signed in for a delegated grant (the ID token's
    /// `preferred_username`), learnt at `login` and at each refresh. Grants
    /// stored before this was recorded have none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sign_in_user: Option<String>,
}

/// Why a grant file cannot be used. The callers branch: a sealed file that
/// does not open and an unsafe file make a client wait ("unavailable") and
/// are never replaced; a damaged one is replaced by the next `login`.
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
}

/// A grant as read from its file, and whether the file was sealed.
#[derive(Debug, Clone)]
pub struct GrantFile {
    pub grant: StoredGrant,
    pub sealed: bool,
}

/// A grant file is a few kilobytes; one larger than this is not a grant.
const MAX_GRANT_FILE: u64 = 1 << 20;

/// The folder of grant files, and the key that seals them.
#[derive(Debug, Clone)]
pub struct TokenStore {
    dir: PathBuf,
    key: Option<TokenKey>,
}

impl TokenStore {
    /// The grants under `state_dir`, unsealed.
    pub fn new(state_dir: &Path) -> Self {
        TokenStore {
            dir: state_dir.join("tokens"),
            key: None,
        }
    }

    /// The grants of `config`: its state directory, sealed with its token
    /// key if it names one. A key file that is missing, unreadable, readable
    /// by every user or not a key is an error (one sentence).
    pub fn for_config(config: &Config) -> Result<Self, String> {
        let store = TokenStore::new(&crate::config::state_dir(config));
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

    fn lock_path(&self, username: &str) -> PathBuf {
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

    /// Reads `username`'s grant; `Ok(None)` when there is none yet.
    pub fn load(&self, username: &str) -> Result<Option<StoredGrant>, LoadError> {
        Ok(self.read(username)?.map(|file| file.grant))
    }

    /// Reads `username`'s grant and whether its file is sealed.
    pub fn read(&self, username: &str) -> Result<Option<GrantFile>, LoadError> {
        let path = self.path(username);
        let Some(bytes) = read_own_file(&path)? else {
            return Ok(None);
        };
        let unsealed = crate::sealing::unseal(self.key.as_ref(), username, &bytes)
            .map_err(|e| LoadError::Sealed(self.does_not_open(username, &path, e)))?;
        let grant = serde_json::from_slice(&unsealed.plaintext).map_err(|e| {
            LoadError::Damaged(format!(
                "token file {} is damaged ({e}); run `xoauth2-proxy login {username}`",
                path.display()
            ))
        })?;
        Ok(Some(GrantFile {
            grant,
            sealed: unsealed.sealed,
        }))
    }

    /// Why a sealed grant does not open, and what to do: the file is left
    /// as it is, so the right key still opens it.
    fn does_not_open(&self, username: &str, path: &Path, e: SealError) -> String {
        let p = path.display();
        let or_login = format!("or move the file away and run `xoauth2-proxy login {username}`");
        match e {
            SealError::NoKey => format!(
                "token file {p} is sealed, but no token key is configured; set `token_key_file` in [server] (or $XOAUTH2_PROXY_TOKEN_KEY_FILE) to the key it was sealed with and reload, {or_login}"
            ),
            SealError::DoesNotOpen => format!(
                "token file {p} does not open with the token key in {}: that is not the key it was sealed with, or the file is another account's; put the right key there and reload, {or_login}",
                self.key_file().unwrap_or(Path::new("?")).display()
            ),
            SealError::UnknownVersion(v) => format!(
                "token file {p} is sealed in format {v}, which this version of xoauth2-proxy does not know; run the version that wrote it, {or_login}"
            ),
            SealError::Damaged(why) => format!(
                "token file {p} is sealed but damaged ({why}); restore it from a backup, {or_login}"
            ),
        }
    }

    /// The modification time of `username`'s file, to notice a `login` run by
    /// another process.
    pub fn modified(&self, username: &str) -> Option<SystemTime> {
        std::fs::symlink_metadata(self.path(username))
            .and_then(|m| m.modified())
            .ok()
    }

    /// Takes the account's lock file, held while a grant is redeemed, so that
    /// two processes (`serve` and `login`, `check`, or a config reloaded while
    /// sessions of the old one live) never spend the same refresh token.
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

    /// Replaces `username`'s grant atomically, sealed when there is a key.
    /// A file that is there and cannot be opened (sealed under another key,
    /// another account's, unsafe, unreadable) is left as it is: an error.
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
        match self.read(username) {
            Ok(_) | Err(LoadError::Damaged(_)) => {}
            Err(e) => return Err(format!("the new grant of {username} is not saved: {e}")),
        }
        let json = serde_json::to_vec_pretty(grant).expect("a grant always serialises");
        let bytes = match &self.key {
            Some(key) => key.seal(username, &json)?,
            None => json,
        };
        write_atomically(&path, &bytes).map_err(|e| fail("write", e))?;
        Ok(())
    }
}

/// The bytes of the grant file at `path`, opened without following a link,
/// if it belongs to the proxy's user and no one else may write it.
fn read_own_file(path: &Path) -> Result<Option<Vec<u8>>, LoadError> {
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
    Ok(Some(bytes))
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
        let e = store.load("x").unwrap_err();
        assert!(matches!(e, LoadError::Damaged(_)), "{e:?}");
        assert!(e.to_string().contains("xoauth2-proxy login x"), "{e}");
        store.save("x", &grant("x", "rt")).unwrap();
        assert!(store.load("x").unwrap().is_some(), "login replaces it");
    }

    fn grant(account: &str, refresh_token: &str) -> StoredGrant {
        StoredGrant {
            account: account.into(),
            flow: Some(Flow::DeviceCode),
            refresh_token: Some(Secret::new(refresh_token.into())),
            access_token: Some(Secret::new(format!("{refresh_token}-access"))),
            ..Default::default()
        }
    }

    /// A store under `dir` sealed with the key file `name` (made if missing).
    fn sealed_store(dir: &Path, name: &str) -> TokenStore {
        let file = dir.join(name);
        if !file.exists() {
            crate::sealing::write_key_file(&file).unwrap();
        }
        TokenStore::new(&dir.join("state")).with_key(TokenKey::read(&file).unwrap())
    }

    #[test]
    fn a_sealed_grant_round_trips_and_its_file_holds_no_token_text() {
        let dir = tempfile::tempdir().unwrap();
        let store = sealed_store(dir.path(), "key");
        store
            .save(
                "Sales@Contoso.com",
                &grant("sales@contoso.com", "rt-SECRET-1"),
            )
            .unwrap();
        let file = store.read("sales@contoso.com").unwrap().unwrap();
        assert!(file.sealed);
        assert_eq!(file.grant.refresh_token.unwrap().expose(), "rt-SECRET-1");
        assert_eq!(file.grant.account, "sales@contoso.com");
        let text = std::fs::read_to_string(store.path("sales@contoso.com")).unwrap();
        for clear in ["rt-SECRET-1", "access", "refresh_token", "contoso"] {
            assert!(!text.contains(clear), "{clear} in {text}");
        }
        let envelope: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(envelope["sealed"], 1);
    }

    #[test]
    fn swapped_sealed_files_do_not_open_and_stay_as_they_are() {
        let dir = tempfile::tempdir().unwrap();
        let store = sealed_store(dir.path(), "key");
        store.save("a@x.com", &grant("a@x.com", "rt-a")).unwrap();
        store.save("b@x.com", &grant("b@x.com", "rt-b")).unwrap();
        let (a, b) = (store.path("a@x.com"), store.path("b@x.com"));
        let swap = dir.path().join("swap");
        std::fs::rename(&a, &swap).unwrap();
        std::fs::rename(&b, &a).unwrap();
        std::fs::rename(&swap, &b).unwrap();
        let (bytes_a, bytes_b) = (std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
        for (user, path) in [("a@x.com", &a), ("b@x.com", &b)] {
            let e = store.load(user).unwrap_err();
            assert!(matches!(e, LoadError::Sealed(_)), "{e:?}");
            assert!(
                e.to_string().contains("or the file is another account's"),
                "{e}"
            );
            let refused = store.save(user, &grant(user, "rt-new")).unwrap_err();
            assert!(refused.contains("is not saved"), "{refused}");
            assert!(refused.contains(&path.display().to_string()), "{refused}");
        }
        assert_eq!(std::fs::read(&a).unwrap(), bytes_a);
        assert_eq!(std::fs::read(&b).unwrap(), bytes_b);
    }

    #[test]
    fn a_wrong_key_leaves_the_file_intact_and_the_right_key_opens_it() {
        let dir = tempfile::tempdir().unwrap();
        let right = sealed_store(dir.path(), "right");
        right.save("a@x.com", &grant("a@x.com", "rt-a")).unwrap();
        let path = right.path("a@x.com");
        let before = std::fs::read(&path).unwrap();

        let wrong = sealed_store(dir.path(), "wrong");
        let e = wrong.load("a@x.com").unwrap_err();
        assert!(matches!(e, LoadError::Sealed(_)), "{e:?}");
        let wrong_key = dir.path().join("wrong").display().to_string();
        assert!(
            e.to_string()
                .contains(&format!("does not open with the token key in {wrong_key}")),
            "{e}"
        );
        assert!(wrong.save("a@x.com", &grant("a@x.com", "rt-x")).is_err());
        let unsealed = TokenStore::new(&dir.path().join("state"));
        let e = unsealed.load("a@x.com").unwrap_err();
        assert!(e.to_string().contains("no token key is configured"), "{e}");
        assert!(unsealed.save("a@x.com", &grant("a@x.com", "rt-x")).is_err());
        assert_eq!(std::fs::read(&path).unwrap(), before);

        let back = right.load("a@x.com").unwrap().unwrap();
        assert_eq!(back.refresh_token.unwrap().expose(), "rt-a");
    }

    #[test]
    fn a_plain_grant_is_read_and_sealed_at_its_next_save() {
        let dir = tempfile::tempdir().unwrap();
        let plain = TokenStore::new(&dir.path().join("state"));
        plain.save("a@x.com", &grant("a@x.com", "rt-a")).unwrap();
        let sealed = sealed_store(dir.path(), "key");
        let file = sealed.read("a@x.com").unwrap().unwrap();
        assert!(!file.sealed);
        sealed.save("a@x.com", &file.grant).unwrap();
        let file = sealed.read("a@x.com").unwrap().unwrap();
        assert!(file.sealed);
        assert_eq!(file.grant.refresh_token.unwrap().expose(), "rt-a");
        let text = std::fs::read_to_string(sealed.path("a@x.com")).unwrap();
        assert!(!text.contains("rt-a"), "{text}");
    }

    #[cfg(unix)]
    #[tokio::test]
    async fn symlinked_grant_and_lock_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = TokenStore::new(&dir.path().join("state"));
        store.prepare().unwrap();
        // A grant planted elsewhere, linked in: not read, not written through.
        let planted = dir.path().join("planted.json");
        std::fs::write(&planted, br#"{"account":"a@x.com","refresh_token":"evil"}"#).unwrap();
        std::os::unix::fs::symlink(&planted, store.path("a@x.com")).unwrap();
        let e = store.load("a@x.com").unwrap_err();
        assert!(matches!(e, LoadError::Unsafe(_)), "{e:?}");
        assert!(e.to_string().contains("is a symbolic link"), "{e}");
        assert!(e.to_string().contains("remove it with `rm "), "{e}");
        assert!(store.save("a@x.com", &grant("a@x.com", "rt")).is_err());
        assert!(std::fs::read_to_string(&planted).unwrap().contains("evil"));
        // A lock file linked to a file the proxy would create (as root: anywhere).
        let target = dir.path().join("created-through-the-link");
        std::os::unix::fs::symlink(&target, store.lock_path("b@x.com")).unwrap();
        let e = store.check_lock("b@x.com").unwrap_err();
        assert!(
            e.contains("lock file") && e.contains("symbolic link"),
            "{e}"
        );
        let e = store.lock("b@x.com").await.err().unwrap();
        assert!(e.contains("symbolic link"), "{e}");
        assert!(!target.exists(), "the link was not followed");
    }

    #[cfg(unix)]
    #[test]
    fn a_folder_other_users_may_write_is_refused_with_the_chmod() {
        use std::os::unix::fs::PermissionsExt;
        let mode = |path: &Path, mode| {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap()
        };
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let store = TokenStore::new(&state);
        store.prepare().unwrap();
        mode(store.dir(), 0o777);
        let e = store.prepare().unwrap_err();
        let tokens = store.dir().display();
        assert!(
            e.contains(&format!("the folder of grants {tokens} can be written by users other than its owner (mode 0777); run `chmod 700 {tokens}`")),
            "{e}"
        );
        mode(store.dir(), 0o700);
        mode(&state, 0o757);
        let e = store.prepare().unwrap_err();
        assert!(
            e.contains(&format!("run `chmod 700 {}`", state.display())),
            "{e}"
        );
        // Group-writable for a group that is not the proxy's own (if this
        // user may hand the folder to one; the rule itself is unit-tested in
        // private_file).
        mode(&state, 0o770);
        store.prepare().unwrap();
        if std::os::unix::fs::chown(&state, None, Some(u32::MAX - 7)).is_ok() {
            let e = store.prepare().unwrap_err();
            assert!(e.contains("(mode 0770)"), "{e}");
        }
    }

    #[cfg(unix)]
    #[test]
    fn a_grant_file_another_user_owns_or_may_write_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let store = TokenStore::new(&dir.path().join("state"));
        store.save("a@x.com", &grant("a@x.com", "rt")).unwrap();
        let path = store.path("a@x.com");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o646)).unwrap();
        let e = store.load("a@x.com").unwrap_err();
        assert!(matches!(e, LoadError::Unsafe(_)), "{e:?}");
        assert!(
            e.to_string()
                .contains(&format!("run `chmod 600 {}`", path.display()))
        );
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        // Owned by another user (only root may give a file away).
        if std::os::unix::fs::chown(&path, Some(u32::MAX - 7), None).is_ok() {
            let e = store.load("a@x.com").unwrap_err();
            assert!(e.to_string().contains("belongs to uid"), "{e}");
            assert!(store.save("a@x.com", &grant("a@x.com", "rt2")).is_err());
        }
    }
}
