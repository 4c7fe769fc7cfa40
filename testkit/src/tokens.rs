//! The access tokens the mock identity provider has issued, shared with the mock
//! upstreams so that they accept exactly the tokens a real server would.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Who a token speaks for: one mailbox (delegated grants) or the application
/// itself (client credentials), which may open any mailbox.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Subject {
    Mailbox(String),
    App,
}

#[derive(Clone, Debug)]
struct Issued {
    subject: Subject,
    expires_at: Instant,
}

/// Shared, cloneable book of issued access tokens.
#[derive(Clone, Default)]
pub struct TokenBook {
    inner: Arc<Mutex<HashMap<String, Issued>>>,
    ever: Arc<Mutex<Vec<String>>>,
}

impl TokenBook {
    /// Issues a new random access token for `subject`, valid for `lifetime`.
    /// Tokens are long, like Entra's (about 2,000 characters).
    pub fn issue(&self, subject: Subject, lifetime: Duration) -> String {
        let token = format!("eyJ0eXAi.{}", random_text(2000));
        self.inner.lock().unwrap().insert(
            token.clone(),
            Issued {
                subject,
                expires_at: Instant::now() + lifetime,
            },
        );
        self.ever.lock().unwrap().push(token.clone());
        token
    }

    /// True when `token` was issued, is unexpired and unrevoked, and may open `mailbox`.
    pub fn check(&self, mailbox: &str, token: &str) -> bool {
        let book = self.inner.lock().unwrap();
        match book.get(token) {
            Some(issued) if issued.expires_at > Instant::now() => match &issued.subject {
                Subject::Mailbox(m) => m.eq_ignore_ascii_case(mailbox),
                Subject::App => true,
            },
            _ => false,
        }
    }

    /// Who `token` speaks for and how long it has left, while it is unexpired
    /// and unrevoked (what an RFC 7662 introspection endpoint reports).
    pub fn lookup(&self, token: &str) -> Option<(Subject, Duration)> {
        let book = self.inner.lock().unwrap();
        let issued = book.get(token)?;
        let left = issued.expires_at.checked_duration_since(Instant::now())?;
        (!left.is_zero()).then(|| (issued.subject.clone(), left))
    }

    /// Revokes every token issued for `subject`.
    pub fn revoke(&self, subject: &Subject) {
        self.inner
            .lock()
            .unwrap()
            .retain(|_, issued| &issued.subject != subject);
    }

    /// Revokes every token issued for the mailbox `mailbox` (compared without case).
    pub fn revoke_mailbox(&self, mailbox: &str) {
        self.inner
            .lock()
            .unwrap()
            .retain(|_, issued| match &issued.subject {
                Subject::Mailbox(m) => !m.eq_ignore_ascii_case(mailbox),
                Subject::App => true,
            });
    }

    /// Makes `token` expire now (as if its lifetime had run out); true if it was known.
    pub fn expire(&self, token: &str) -> bool {
        match self.inner.lock().unwrap().get_mut(token) {
            Some(issued) => {
                issued.expires_at = Instant::now();
                true
            }
            None => false,
        }
    }

    /// Every token ever issued, revoked or not (for leak checks).
    pub fn all_tokens(&self) -> Vec<String> {
        self.ever.lock().unwrap().clone()
    }
}

/// Random URL-safe text of `len` characters.
pub fn random_text(len: usize) -> String {
    use rand::Rng;
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut rng = rand::rng();
    (0..len)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect()
}
