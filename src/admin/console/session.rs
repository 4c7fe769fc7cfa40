//! Console sessions: a random id in a cookie (`HttpOnly; SameSite=Strict`,
//! `Secure` when the console is reached over HTTPS), and per session a
//! random CSRF token that every POST must carry in its form.
//!
//! Every visitor gets a session, signed in or not, so that the login form
//! has a CSRF token too; signing in replaces the session (a new id), so an
//! id planted before the login is worth nothing after it. Ids are kept only
//! as their SHA-256, and the table is bounded: at most [`MAX_SESSIONS`],
//! the oldest not signed in (else the oldest) giving way to a new one.
//!
//! A signed-in session remembers the admin password it was signed in under
//! ([`Under`]): a reload that changes the password, sets one or removes it
//! ends every session signed in before, as changing a password should.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use base64::Engine;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// The cookie's name.
pub const COOKIE: &str = "xoauth2_console";
/// Sessions kept at once.
pub const MAX_SESSIONS: usize = 256;
/// A session not signed in lasts this long (time enough to type a password).
const ANONYMOUS_LIFETIME: Duration = Duration::from_secs(15 * 60);
/// A signed-in session unused this long ends.
const IDLE_LIFETIME: Duration = Duration::from_secs(60 * 60);
/// A signed-in session ends this long after the login, however busy.
const MAX_LIFETIME: Duration = Duration::from_secs(12 * 60 * 60);

/// What a request's cookie leads to.
#[derive(Debug, Clone)]
pub struct Session {
    /// The token this session's forms carry.
    pub csrf: String,
    pub signed_in: bool,
    under: Under,
    created: Instant,
    last_seen: Instant,
}

impl Session {
    fn expired(&self, now: Instant) -> bool {
        if self.signed_in {
            now >= self.last_seen + IDLE_LIFETIME || now >= self.created + MAX_LIFETIME
        } else {
            now >= self.created + ANONYMOUS_LIFETIME
        }
    }

    /// Whether `token` (from a form) is this session's CSRF token.
    pub fn csrf_matches(&self, token: Option<&str>) -> bool {
        token.is_some_and(|t| bool::from(t.as_bytes().ct_eq(self.csrf.as_bytes())))
    }
}

/// The admin password in force when a session signed in: a digest of its
/// `password_hash` (or of nothing, where the console needs none).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Under([u8; 32]);

impl Under {
    pub fn password(hash: Option<&str>) -> Self {
        Under(Sha256::digest(hash.unwrap_or_default().as_bytes()).into())
    }
}

/// The process's console sessions.
#[derive(Default)]
pub struct Sessions {
    by_digest: Mutex<HashMap<[u8; 32], Session>>,
}

impl Sessions {
    /// The live session the id `id` names, touched; a session signed in
    /// under another password than `under` has ended.
    pub fn find(&self, id: &str, under: Under) -> Option<Session> {
        let now = Instant::now();
        let mut sessions = self.lock();
        let key = digest(id);
        let session = sessions.get_mut(&key)?;
        if session.expired(now) || (session.signed_in && session.under != under) {
            sessions.remove(&key);
            return None;
        }
        session.last_seen = now;
        Some(session.clone())
    }

    /// A new session, signed in under `under` or not; returns its id (for
    /// the cookie) and the session.
    pub fn open(&self, signed_in: bool, under: Under) -> (String, Session) {
        let now = Instant::now();
        let id = random_token();
        let session = Session {
            csrf: random_token(),
            signed_in,
            under,
            created: now,
            last_seen: now,
        };
        let mut sessions = self.lock();
        if sessions.len() >= MAX_SESSIONS {
            sessions.retain(|_, s| !s.expired(now));
        }
        if sessions.len() >= MAX_SESSIONS {
            let oldest = sessions
                .iter()
                .min_by_key(|(_, s)| (s.signed_in, s.last_seen))
                .map(|(k, _)| *k);
            if let Some(oldest) = oldest {
                sessions.remove(&oldest);
            }
        }
        sessions.insert(digest(&id), session.clone());
        (id, session)
    }

    /// Ends the session `id` names (log out, or replaced at login).
    pub fn close(&self, id: &str) {
        self.lock().remove(&digest(id));
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<[u8; 32], Session>> {
        self.by_digest.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// 32 random bytes, base64url: a session id or a CSRF token.
fn random_token() -> String {
    let bytes: [u8; 32] = rand::random();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn digest(id: &str) -> [u8; 32] {
    Sha256::digest(id.as_bytes()).into()
}

/// The `Set-Cookie` value that gives the browser session `id`.
pub fn set_cookie(id: &str, secure: bool) -> String {
    let secure = if secure { "; Secure" } else { "" };
    format!("{COOKIE}={id}; Path=/; HttpOnly; SameSite=Strict{secure}")
}

/// The `Set-Cookie` value that makes the browser forget its session.
pub fn clear_cookie(secure: bool) -> String {
    let secure = if secure { "; Secure" } else { "" };
    format!("{COOKIE}=; Path=/; Max-Age=0; HttpOnly; SameSite=Strict{secure}")
}

/// The session id in a `Cookie` header's value, if it carries ours.
pub fn id_from_cookies(header: &str) -> Option<&str> {
    header
        .split(';')
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value)
        .filter(|v| !v.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn old() -> Under {
        Under::password(Some("$argon2id$old"))
    }

    #[test]
    fn a_session_is_found_by_its_id_only_and_ends_when_closed() {
        let sessions = Sessions::default();
        let (id, session) = sessions.open(true, old());
        assert!(sessions.find(&id, old()).is_some_and(|s| s.signed_in));
        assert!(sessions.find("forged", old()).is_none());
        assert!(session.csrf_matches(Some(&session.csrf)));
        assert!(!session.csrf_matches(Some("forged")));
        assert!(!session.csrf_matches(None));
        sessions.close(&id);
        assert!(sessions.find(&id, old()).is_none());
    }

    #[test]
    fn a_new_admin_password_ends_the_sessions_signed_in_under_the_old_one() {
        let sessions = Sessions::default();
        let (admin, _) = sessions.open(true, old());
        let (visitor, _) = sessions.open(false, old());
        let new = Under::password(Some("$argon2id$new"));
        assert!(sessions.find(&admin, new).is_none());
        assert!(sessions.find(&admin, old()).is_none(), "ended, not hidden");
        assert!(
            sessions.find(&visitor, new).is_some(),
            "a visitor not signed in keeps its form's token"
        );
        let (open, _) = sessions.open(true, Under::password(None));
        assert!(sessions.find(&open, old()).is_none(), "a password set");
    }

    #[test]
    fn the_table_is_bounded_and_anonymous_sessions_give_way_first() {
        let sessions = Sessions::default();
        let (admin, _) = sessions.open(true, old());
        for _ in 0..MAX_SESSIONS * 2 {
            sessions.open(false, old());
        }
        assert_eq!(sessions.lock().len(), MAX_SESSIONS);
        assert!(sessions.find(&admin, old()).is_some());
    }

    #[test]
    fn the_cookie_is_http_only_and_strict() {
        assert_eq!(
            set_cookie("abc", false),
            "xoauth2_console=abc; Path=/; HttpOnly; SameSite=Strict"
        );
        assert!(set_cookie("abc", true).ends_with("; Secure"));
        assert_eq!(
            id_from_cookies("a=1; xoauth2_console=abc; b=2"),
            Some("abc")
        );
        assert_eq!(id_from_cookies("a=1"), None);
    }
}
