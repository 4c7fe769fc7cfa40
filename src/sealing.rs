//! Grants sealed at rest: the token key, and the envelope a sealed grant
//! file holds.
//!
//! Why: the state volume is copied more often than it is guarded (backups,
//! snapshots, a disk attached elsewhere). With a token key, kept apart from
//! the state (a Docker or Kubernetes secret), a grant file holds only an
//! AES-256-GCM ciphertext: the files alone reveal no token, and a file
//! written by someone without the key does not open. Whoever holds both the
//! key and the files can read them; sealing does not hide grants from the
//! proxy's own user or from root on the running machine.
//!
//! Each write draws a fresh random 96-bit nonce: a key seals a grant about
//! once an hour per account, far below the 2^32 writes that random nonces
//! are safe for. The associated data is the account's lower-cased username,
//! so a file copied over another account's does not open there.
//!
//! The envelope is JSON with a version: `{"sealed": 1, "nonce": "…",
//! "ciphertext": "…"}` (base64); version 1 is AES-256-GCM with the username
//! as associated data. A file without `sealed` is a plain grant.

use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};

/// A token key is this many bytes.
pub const KEY_LEN: usize = 32;
/// The envelope version this proxy writes (and the only one it reads).
const VERSION: u64 = 1;
/// A key file is one line of base64; anything much longer is not a key.
const KEY_FILE_MAX: u64 = 1024;
/// How a key is written: what every key-file sentence ends with.
const KEY_FORM: &str = "a token key is 32 bytes written as base64 on one line (44 characters), as `xoauth2-proxy keygen FILE` writes it";

/// The key that seals grant files, and the file it came from (named in
/// sentences, never its contents).
#[derive(Clone)]
pub struct TokenKey {
    key: Arc<LessSafeKey>,
    file: PathBuf,
}

impl fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TokenKey({})", self.file.display())
    }
}

/// A fresh random key in the form key files hold: base64, then a newline
/// (what Docker and Kubernetes secrets carry unchanged).
pub fn new_key_text() -> Result<String, String> {
    let mut key = [0u8; KEY_LEN];
    random(&mut key)?;
    Ok(format!("{}\n", BASE64.encode(key)))
}

/// `xoauth2-proxy keygen FILE`: a fresh key in a new file, mode 0600. An
/// existing file is never replaced: grants sealed with it would be lost.
pub fn write_key_file(file: &Path) -> Result<(), String> {
    let text = new_key_text()?;
    crate::private_file::write_new(file, text.as_bytes()).map_err(|e| {
        let shown = file.display();
        match e.kind() {
            std::io::ErrorKind::AlreadyExists => format!(
                "{shown} already exists, and keygen never replaces a key (grants sealed with it could no longer be read); name a new file, or remove {shown} if nothing is sealed with it"
            ),
            _ => format!(
                "cannot write the new key to {shown}: {}; check that its folder exists and is writable",
                crate::error::io_reason(&e)
            ),
        }
    })
}

fn random(bytes: &mut [u8]) -> Result<(), String> {
    SystemRandom::new().fill(bytes).map_err(|_| {
        "the system's random number generator failed; check that /dev/urandom (getrandom) is available to the proxy".to_string()
    })
}

impl TokenKey {
    /// Reads the key in `file`. The error is one sentence naming the file,
    /// what is wrong with it and what to do.
    pub fn read(file: &Path) -> Result<TokenKey, String> {
        let shown = file.display();
        let meta = std::fs::metadata(file).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => format!(
                "token key file {shown} does not exist; make a key with `xoauth2-proxy keygen {shown}`, or point `token_key_file` (or $XOAUTH2_PROXY_TOKEN_KEY_FILE) at the key the grants were sealed with"
            ),
            _ => unreadable(file, &e),
        })?;
        if !meta.is_file() {
            return Err(format!(
                "token key file {shown} is not a file; point `token_key_file` (or $XOAUTH2_PROXY_TOKEN_KEY_FILE) at the key file itself"
            ));
        }
        check_not_world_readable(file, &meta)?;
        let mut text = Vec::new();
        std::fs::File::open(file)
            .and_then(|f| f.take(KEY_FILE_MAX + 1).read_to_end(&mut text))
            .map_err(|e| unreadable(file, &e))?;
        let key =
            parse_key(&text).map_err(|why| format!("token key file {shown} {why}: {KEY_FORM}"))?;
        Ok(TokenKey {
            key: Arc::new(key),
            file: file.to_path_buf(),
        })
    }

    /// The file the key was read from.
    pub fn file(&self) -> &Path {
        &self.file
    }

    /// `plaintext` sealed for `account`, as the bytes of a grant file.
    pub fn seal(&self, account: &str, plaintext: &[u8]) -> Result<Vec<u8>, String> {
        let mut nonce = [0u8; NONCE_LEN];
        random(&mut nonce)?;
        let mut sealed = plaintext.to_vec();
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                associated_data(account),
                &mut sealed,
            )
            .map_err(|_| "sealing a grant failed; please report this as a bug".to_string())?;
        let envelope = Envelope {
            sealed: VERSION,
            nonce: BASE64.encode(nonce),
            ciphertext: BASE64.encode(sealed),
        };
        Ok(serde_json::to_vec_pretty(&envelope).expect("an envelope always serialises"))
    }

    fn open(&self, account: &str, envelope: &Envelope) -> Result<Vec<u8>, SealError> {
        if envelope.sealed != VERSION {
            return Err(SealError::UnknownVersion(envelope.sealed));
        }
        let damaged = |what: &str| SealError::Damaged(what.to_string());
        let nonce = BASE64
            .decode(&envelope.nonce)
            .ok()
            .and_then(|n| Nonce::try_assume_unique_for_key(&n).ok())
            .ok_or_else(|| damaged("its nonce is not 12 bytes of base64"))?;
        let mut sealed = BASE64
            .decode(&envelope.ciphertext)
            .map_err(|_| damaged("its ciphertext is not base64"))?;
        let opened = self
            .key
            .open_in_place(nonce, associated_data(account), &mut sealed)
            .map_err(|_| SealError::DoesNotOpen)?;
        Ok(opened.to_vec())
    }
}

fn associated_data(account: &str) -> Aad<Vec<u8>> {
    Aad::from(account.to_lowercase().into_bytes())
}

fn unreadable(file: &Path, e: &std::io::Error) -> String {
    format!(
        "cannot read token key file {}: {}; make it readable by the user the proxy runs as",
        file.display(),
        crate::error::io_reason(e)
    )
}

#[cfg(unix)]
fn check_not_world_readable(file: &Path, meta: &std::fs::Metadata) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o004 == 0 {
        return Ok(());
    }
    Err(format!(
        "token key file {} is readable by every user (mode {mode:04o}); run `chmod 600 {}` (or 640 with the proxy's group)",
        file.display(),
        file.display()
    ))
}

#[cfg(not(unix))]
fn check_not_world_readable(_file: &Path, _meta: &std::fs::Metadata) -> Result<(), String> {
    Ok(())
}

/// The key in a key file's bytes, or what is wrong with them (a phrase
/// that follows the file's name; never any of the bytes).
fn parse_key(text: &[u8]) -> Result<LessSafeKey, String> {
    if text.len() as u64 > KEY_FILE_MAX {
        return Err(format!("is longer than {KEY_FILE_MAX} bytes"));
    }
    let text = text.trim_ascii();
    if text.is_empty() {
        return Err("is empty".into());
    }
    let bytes = BASE64.decode(text).map_err(|e| match e {
        base64::DecodeError::InvalidByte(at, _) => {
            format!("has a character that is not base64 at position {}", at + 1)
        }
        _ => "is not base64 (its length or padding is wrong)".to_string(),
    })?;
    if bytes.len() != KEY_LEN {
        return Err(format!("holds {} bytes, not {KEY_LEN}", bytes.len()));
    }
    let key = UnboundKey::new(&AES_256_GCM, &bytes).expect("32 bytes are an AES-256 key");
    Ok(LessSafeKey::new(key))
}

/// What a sealed grant file holds.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Envelope {
    sealed: u64,
    nonce: String,
    ciphertext: String,
}

/// Just enough of a grant file to tell a sealed one from a plain one.
#[derive(Deserialize)]
struct Probe {
    sealed: Option<serde_json::Value>,
}

/// Why a sealed grant file does not open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SealError {
    /// The file is sealed and no token key is configured.
    NoKey,
    /// Not with this key: a wrong key, another account's file, or altered
    /// bytes (AES-GCM cannot tell these apart).
    DoesNotOpen,
    /// Sealed in a format this version does not know.
    UnknownVersion(u64),
    /// The envelope itself is broken.
    Damaged(String),
}

/// The plaintext of a grant file, and whether it was sealed.
#[derive(Debug)]
pub struct Unsealed {
    pub plaintext: Vec<u8>,
    pub sealed: bool,
}

/// The grant in `bytes`, a file of `account`: the bytes themselves when the
/// file is plain, opened with `key` when it is sealed.
pub fn unseal(key: Option<&TokenKey>, account: &str, bytes: &[u8]) -> Result<Unsealed, SealError> {
    let is_sealed = serde_json::from_slice::<Probe>(bytes).is_ok_and(|p| p.sealed.is_some());
    if !is_sealed {
        return Ok(Unsealed {
            plaintext: bytes.to_vec(),
            sealed: false,
        });
    }
    let envelope: Envelope = serde_json::from_slice(bytes)
        .map_err(|e| SealError::Damaged(format!("its envelope is not as expected ({e})")))?;
    let key = key.ok_or(SealError::NoKey)?;
    Ok(Unsealed {
        plaintext: key.open(account, &envelope)?,
        sealed: true,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A fresh key, as `keygen` writes it, read back from `dir`.
    pub(crate) fn key_in(dir: &Path, name: &str) -> TokenKey {
        let file = dir.join(name);
        write_key_file(&file).unwrap();
        TokenKey::read(&file).unwrap()
    }

    #[test]
    fn keygen_writes_a_private_key_and_never_replaces_one() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("key");
        write_key_file(&file).unwrap();
        let first = std::fs::read(&file).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&file).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let e = write_key_file(&file).unwrap_err();
        assert!(
            e.contains("already exists, and keygen never replaces a key"),
            "{e}"
        );
        assert_eq!(std::fs::read(&file).unwrap(), first);
        let e = write_key_file(&dir.path().join("no/such/folder/key")).unwrap_err();
        assert!(e.contains("check that its folder exists"), "{e}");
    }

    #[test]
    fn a_sealed_grant_opens_only_with_its_key_and_account() {
        let dir = tempfile::tempdir().unwrap();
        let key = key_in(dir.path(), "key");
        let sealed = key.seal("A@B.c", b"{\"refresh_token\":\"rt\"}").unwrap();
        let text = String::from_utf8(sealed.clone()).unwrap();
        assert!(
            text.contains("\"sealed\": 1") && !text.contains("rt\""),
            "{text}"
        );
        let opened = unseal(Some(&key), "a@b.C", &sealed).unwrap();
        assert!(opened.sealed);
        assert_eq!(opened.plaintext, b"{\"refresh_token\":\"rt\"}");
        let other = key_in(dir.path(), "other");
        assert_eq!(
            unseal(Some(&other), "a@b.c", &sealed).unwrap_err(),
            SealError::DoesNotOpen
        );
        assert_eq!(
            unseal(Some(&key), "x@b.c", &sealed).unwrap_err(),
            SealError::DoesNotOpen
        );
        assert_eq!(
            unseal(None, "a@b.c", &sealed).unwrap_err(),
            SealError::NoKey
        );
        assert_ne!(
            sealed,
            key.seal("a@b.c", b"{\"refresh_token\":\"rt\"}").unwrap()
        );
    }

    #[test]
    fn plain_grants_pass_through_and_unknown_envelopes_are_refused() {
        let plain = unseal(None, "a", b"{\"account\":\"a\"}").unwrap();
        assert!(!plain.sealed);
        assert_eq!(plain.plaintext, b"{\"account\":\"a\"}");
        let future = br#"{"sealed": 2, "nonce": "", "ciphertext": ""}"#;
        let dir = tempfile::tempdir().unwrap();
        let key = key_in(dir.path(), "key");
        assert_eq!(
            unseal(Some(&key), "a", future).unwrap_err(),
            SealError::UnknownVersion(2)
        );
        let broken = br#"{"sealed": 1, "nonce": "AAAA", "ciphertext": ""}"#;
        assert!(matches!(
            unseal(Some(&key), "a", broken).unwrap_err(),
            SealError::Damaged(_)
        ));
    }

    #[test]
    fn keygen_text_is_base64_on_one_line() {
        let text = new_key_text().unwrap();
        assert_eq!(text.len(), 45);
        assert!(text.ends_with('\n'));
        assert_eq!(BASE64.decode(text.trim_end()).unwrap().len(), KEY_LEN);
        assert_ne!(text, new_key_text().unwrap());
    }

    #[test]
    fn a_bad_key_file_is_named_with_what_is_wrong() {
        let dir = tempfile::tempdir().unwrap();
        let cases: [(&[u8], &str); 5] = [
            (b"", "is empty"),
            (b"\n  \n", "is empty"),
            (b"c2hvcnQ=\n", "holds 5 bytes, not 32"),
            (
                b"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA$=\n",
                "has a character that is not base64 at position 43",
            ),
            (b"AAA\n", "is not base64 (its length or padding is wrong)"),
        ];
        for (n, (text, why)) in cases.into_iter().enumerate() {
            let file = dir.path().join(format!("key{n}"));
            crate::private_file::write_new(&file, text).unwrap();
            let e = TokenKey::read(&file).unwrap_err();
            assert!(e.contains(&format!("{} {why}: ", file.display())), "{e}");
            assert!(e.contains("xoauth2-proxy keygen FILE"), "{e}");
        }
        // A Docker or Kubernetes secret may end in CRLF or carry no newline.
        let key = new_key_text().unwrap();
        for text in [key.trim_end().to_string(), key.replace('\n', "\r\n")] {
            let file = dir.path().join(format!("ok{}", text.len()));
            crate::private_file::write_new(&file, text.as_bytes()).unwrap();
            TokenKey::read(&file).unwrap();
        }
        let missing = TokenKey::read(&dir.path().join("nope")).unwrap_err();
        assert!(missing.contains("does not exist; make a key with `xoauth2-proxy keygen"));
        let not_a_file = TokenKey::read(dir.path()).unwrap_err();
        assert!(not_a_file.contains("is not a file"), "{not_a_file}");
    }

    #[cfg(unix)]
    #[test]
    fn a_world_readable_key_file_is_refused_with_the_chmod() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("key");
        crate::private_file::write_new(&file, new_key_text().unwrap().as_bytes()).unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = TokenKey::read(&file).unwrap_err();
        assert!(
            e.contains("readable by every user (mode 0644)")
                && e.contains(&format!("`chmod 600 {}`", file.display())),
            "{e}"
        );
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o640)).unwrap();
        TokenKey::read(&file).unwrap();
        // A Kubernetes Secret's file is a link into `..data/`: followed.
        let link = dir.path().join("token-key");
        std::os::unix::fs::symlink(&file, &link).unwrap();
        TokenKey::read(&link).unwrap();
    }
}
