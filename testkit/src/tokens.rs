//! The access tokens the mock identity provider has issued, shared with the mock
//! upstreams so that they accept exactly the tokens a real server would.
//!
//! Each token has an audience, as Entra's do: Exchange (IMAP, SMTP) or
//! Microsoft Graph, and the one is refused where the other is expected. The
//! book also knows shared mailboxes and their delegates, the way Exchange
//! applies them: IMAP opens a shared mailbox with a delegate's token; SMTP
//! logs in only as the token's own user and lets it send as a shared mailbox
//! it has Send As on.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Who a token speaks for: one mailbox (delegated grants) or the application
/// itself (client credentials), which may open any mailbox.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Subject {
    Mailbox(String),
    App,
}

/// The resource a token was issued for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Audience {
    /// `https://outlook.office.com` (IMAP, SMTP).
    Exchange,
    /// `https://graph.microsoft.com`.
    Graph,
}

#[derive(Clone, Debug)]
struct Issued {
    subject: Subject,
    expires_at: Instant,
    audience: Audience,
    /// The permissions granted (`Mail.Send`, `Mail.Send.Shared`), without
    /// their resource; empty for Exchange tokens.
    scopes: Vec<String>,
}

/// A delegate's rights on a shared mailbox.
#[derive(Clone, Debug, Default)]
struct Delegates {
    full_access: HashSet<String>,
    send_as: HashSet<String>,
}

/// Shared, cloneable book of issued access tokens.
#[derive(Clone, Default)]
pub struct TokenBook {
    inner: Arc<Mutex<HashMap<String, Issued>>>,
    ever: Arc<Mutex<Vec<String>>>,
    /// Lower-cased shared mailbox → its delegates (lower-cased).
    shared: Arc<Mutex<HashMap<String, Delegates>>>,
}

impl TokenBook {
    /// Issues a new random access token for `subject`, valid for `lifetime`.
    /// Tokens are long, like Entra's (about 2,000 characters).
    pub fn issue(&self, subject: Subject, lifetime: Duration) -> String {
        self.issue_for(subject, Audience::Exchange, Vec::new(), lifetime)
    }

    /// Issues a token for Microsoft Graph with the permissions `scopes`
    /// (`Mail.Send`, …; app-only tokens carry the app's roles instead).
    pub fn issue_graph(&self, subject: Subject, scopes: Vec<String>, lifetime: Duration) -> String {
        self.issue_for(subject, Audience::Graph, scopes, lifetime)
    }

    fn issue_for(
        &self,
        subject: Subject,
        audience: Audience,
        scopes: Vec<String>,
        lifetime: Duration,
    ) -> String {
        let token = format!("eyJ0eXAi.{}", random_text(2000));
        self.inner.lock().unwrap().insert(
            token.clone(),
            Issued {
                subject,
                expires_at: Instant::now() + lifetime,
                audience,
                scopes,
            },
        );
        self.ever.lock().unwrap().push(token.clone());
        token
    }

    /// True when `token` is an unexpired, unrevoked Exchange token whose own
    /// user is `user` (or an app-only token): SMTP's rule, under which a
    /// delegate's token does not log in as a shared mailbox.
    pub fn check(&self, user: &str, token: &str) -> bool {
        match self.exchange_subject(token) {
            Some(Subject::Mailbox(m)) => m.eq_ignore_ascii_case(user),
            Some(Subject::App) => true,
            None => false,
        }
    }

    /// [`check`](Self::check), or a delegate's token opening a shared
    /// mailbox it has Full Access to: IMAP's rule.
    pub fn check_mailbox(&self, mailbox: &str, token: &str) -> bool {
        match self.exchange_subject(token) {
            Some(Subject::Mailbox(m)) => {
                m.eq_ignore_ascii_case(mailbox) || self.has_full_access(&m, mailbox)
            }
            Some(Subject::App) => true,
            None => false,
        }
    }

    fn exchange_subject(&self, token: &str) -> Option<Subject> {
        let book = self.inner.lock().unwrap();
        book.get(token)
            .filter(|i| i.expires_at > Instant::now() && i.audience == Audience::Exchange)
            .map(|i| i.subject.clone())
    }

    /// Who an unexpired Graph token speaks for and its permissions.
    pub fn graph_lookup(&self, token: &str) -> Option<(Subject, Vec<String>)> {
        let book = self.inner.lock().unwrap();
        book.get(token)
            .filter(|i| i.expires_at > Instant::now() && i.audience == Audience::Graph)
            .map(|i| (i.subject.clone(), i.scopes.clone()))
    }

    /// Makes `shared` a shared mailbox that `delegate` has Full Access to,
    /// and Send As when `send_as`.
    pub fn share_mailbox(&self, shared: &str, delegate: &str, send_as: bool) {
        let mut book = self.shared.lock().unwrap();
        let entry = book.entry(shared.to_ascii_lowercase()).or_default();
        entry.full_access.insert(delegate.to_ascii_lowercase());
        if send_as {
            entry.send_as.insert(delegate.to_ascii_lowercase());
        }
    }

    fn has_full_access(&self, user: &str, mailbox: &str) -> bool {
        let book = self.shared.lock().unwrap();
        book.get(&mailbox.to_ascii_lowercase())
            .is_some_and(|d| d.full_access.contains(&user.to_ascii_lowercase()))
    }

    /// Whether `user` has Send As on the shared mailbox `address` (or it is
    /// its own): Graph's rule, which knows every mailbox.
    pub fn send_as_granted(&self, user: &str, address: &str) -> bool {
        user.eq_ignore_ascii_case(address)
            || self
                .shared
                .lock()
                .unwrap()
                .get(&address.to_ascii_lowercase())
                .is_some_and(|d| d.send_as.contains(&user.to_ascii_lowercase()))
    }

    /// Whether `user` may send as `address`: its own, an address the book
    /// does not know as a shared mailbox, or one it has Send As on.
    pub fn may_send_as(&self, user: &str, address: &str) -> bool {
        if user.eq_ignore_ascii_case(address) {
            return true;
        }
        let book = self.shared.lock().unwrap();
        match book.get(&address.to_ascii_lowercase()) {
            Some(d) => d.send_as.contains(&user.to_ascii_lowercase()),
            None => true,
        }
    }

    /// Who `token` speaks for and how long it has left, while it is unexpired
    /// and unrevoked (what an RFC 7662 introspection endpoint reports).
    pub fn lookup(&self, token: &str) -> Option<(Subject, Duration)> {
        let book = self.inner.lock().unwrap();
        let issued = book
            .get(token)
            .filter(|i| i.audience == Audience::Exchange)?;
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
