//! Local logins: username → account, and the local password check.
//!
//! Argon2 is slow on purpose (tens of milliseconds). After a password has
//! been verified once, a keyed SHA-256 of it is kept in memory, so later
//! logins cost microseconds; the key is random per process, so the cached
//! value is useless outside it. A wrong password costs the full argon2 check.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use argon2::{Argon2, PasswordHash, PasswordVerifier};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::config::{Account, Config, LocalPassword};

/// The configured accounts, by lower-cased username.
pub struct Accounts {
    by_name: HashMap<String, Arc<Entry>>,
    cache_key: [u8; 32],
}

struct Entry {
    account: Account,
    /// Keyed digest of the last password that verified.
    verified: Mutex<Option<[u8; 32]>>,
}

impl Accounts {
    pub fn new(config: &Config) -> Self {
        let by_name = config
            .accounts
            .iter()
            .map(|a| {
                let entry = Entry {
                    account: a.clone(),
                    verified: Mutex::new(None),
                };
                (a.username.to_lowercase(), Arc::new(entry))
            })
            .collect();
        Accounts {
            by_name,
            cache_key: rand::random(),
        }
    }

    /// Whether `username` is configured (for log lines only: clients are
    /// never told).
    pub fn knows(&self, username: &str) -> bool {
        self.by_name.contains_key(&username.to_lowercase())
    }

    /// The account for `username` if `password` is its local password.
    /// `None` for an unknown user and for a wrong password alike.
    pub async fn verify(&self, username: &str, password: &[u8]) -> Option<Account> {
        let entry = self.by_name.get(&username.to_lowercase())?.clone();
        let digest = self.digest(password);
        let known = *entry.verified.lock().expect("not poisoned");
        if let Some(known) = known
            && bool::from(known.ct_eq(&digest))
        {
            return Some(entry.account.clone());
        }
        let ok = match &entry.account.password {
            LocalPassword::Plain(expected) => {
                bool::from(expected.expose().as_bytes().ct_eq(password))
            }
            LocalPassword::Hash(phc) => {
                let phc = phc.clone();
                let password = password.to_vec();
                tokio::task::spawn_blocking(move || verify_hash(&phc, &password))
                    .await
                    .unwrap_or(false)
            }
        };
        if !ok {
            return None;
        }
        *entry.verified.lock().expect("not poisoned") = Some(digest);
        Some(entry.account.clone())
    }

    fn digest(&self, password: &[u8]) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(self.cache_key);
        h.update(password);
        h.finalize().into()
    }
}

fn verify_hash(phc: &str, password: &[u8]) -> bool {
    PasswordHash::new(phc)
        .map(|hash| Argon2::default().verify_password(password, &hash).is_ok())
        .unwrap_or(false)
}

/// An argon2id PHC string for `password`, for `xoauth2-proxy hash-password`.
pub fn hash_password(password: &[u8]) -> String {
    use argon2::password_hash::PasswordHasher;
    Argon2::default()
        .hash_password(password)
        .expect("argon2 with default parameters cannot fail")
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn config(password_line: &str) -> Config {
        let text = format!(
            "[providers.p]\nclient_id = \"c\"\n[[accounts]]\nusername = \"u@x.com\"\nprovider = \"p\"\n{password_line}\n"
        );
        Config::parse(Path::new("t.toml"), &text).unwrap()
    }

    #[tokio::test]
    async fn hashed_password_verifies_and_wrong_one_does_not() {
        let hash = hash_password(b"correct horse");
        assert!(hash.starts_with("$argon2id$"));
        let accounts = Accounts::new(&config(&format!("password_hash = \"{hash}\"")));
        assert!(accounts.verify("U@X.com", b"correct horse").await.is_some());
        // Served from the cache the second time, still exact.
        assert!(accounts.verify("u@x.com", b"correct horse").await.is_some());
        assert!(accounts.verify("u@x.com", b"correct horsE").await.is_none());
        assert!(
            accounts
                .verify("nobody@x.com", b"correct horse")
                .await
                .is_none()
        );
    }

    #[tokio::test]
    async fn plain_password_compares_exactly() {
        let accounts = Accounts::new(&config("password = \"pw\""));
        assert!(accounts.verify("u@x.com", b"pw").await.is_some());
        assert!(accounts.verify("u@x.com", b"pw ").await.is_none());
        assert!(accounts.verify("u@x.com", b"").await.is_none());
    }
}
