//! The web console (`admin.console`): each account's state, and Connect,
//! Disconnect and Check, behind the admin password.
//!
//! One function per request. Every page but the login form, its sheet and
//! script and the identity provider's callback needs a signed-in session
//! ([`session`]); every POST must carry the session's CSRF token. The
//! callback cannot carry the session cookie (it arrives from the identity
//! provider's site, and the cookie is `SameSite=Strict`): the one-time
//! `state` of a sign-in the admin started is its proof instead.
//!
//! Admin logins go through the same throttle and bounded argon2 checks as
//! mail logins ([`crate::accounts::Accounts::verify_admin`]), and a failure
//! takes at least `auth_failure_delay`. Nothing secret reaches a page, a
//! URL or a log line: the log names the action, the account and the
//! client's address.
//!
//! Whether the console is on, and whether it may go without a password, is
//! judged per request against the config in force *and* the address the
//! listener really bound: `listen` changes only with a restart, so a reload
//! that sets `console_allow_loopback_without_password` beside a new
//! loopback `listen` must not open a console still bound to all addresses;
//! and a reload that turns the console off closes it at once.

mod accounts;
mod actions;
mod callback;
mod http;
mod login;
mod pages;
mod session;
mod sign_ins;

use std::net::SocketAddr;
use std::sync::Arc;

use hyper::body::Incoming;
use hyper::{Method, Request, StatusCode};
use tracing::warn;

use self::session::{Session, Sessions, Under};
use self::sign_ins::SignIns;
use crate::admin::exchange::{Current, Reply};
use crate::shared::Shared;

/// The console's state for the life of the listener: sessions and sign-ins
/// under way survive a reload; the config in force is read per request.
pub struct Console {
    current: Current,
    /// Whether the listener is bound to a loopback address.
    on_loopback: bool,
    sessions: Sessions,
    sign_ins: Arc<SignIns>,
}

/// A visitor with a session: its id (for logging out) and the session.
struct Visit {
    id: String,
    session: Session,
    /// A `Set-Cookie` to send: the session was made for this request.
    new_cookie: Option<String>,
}

impl Console {
    /// The console of a listener bound to `bound`.
    pub fn new(current: Current, bound: SocketAddr) -> Self {
        Console {
            current,
            on_loopback: bound.ip().is_loopback(),
            sessions: Sessions::default(),
            sign_ins: Arc::default(),
        }
    }

    /// Answers one console request.
    pub async fn handle(&self, request: Request<Incoming>, peer: SocketAddr) -> Reply {
        let shared = self.current.borrow().clone();
        if !shared.config.admin.console {
            return http::text(
                StatusCode::NOT_FOUND,
                "the console is off (admin.console = false); turn it on and restart the proxy to use it\n",
            );
        }
        let method = request.method().clone();
        let path = request.uri().path().to_string();
        match (&method, path.as_str()) {
            (&Method::GET, "/console.css") => http::asset("text/css; charset=utf-8", pages::CSS),
            (&Method::GET, "/console.js") => {
                http::asset("text/javascript; charset=utf-8", pages::JS)
            }
            (&Method::GET, "/oauth/callback") => self.callback(shared, &request).await,
            (&Method::GET, "/login") => self.login_page(&shared, &request),
            (&Method::POST, "/login") => self.log_in(&shared, request, peer).await,
            _ => self.signed_in(shared, request, peer).await,
        }
    }

    /// The requests that need a signed-in session.
    async fn signed_in(
        &self,
        shared: Arc<Shared>,
        request: Request<Incoming>,
        peer: SocketAddr,
    ) -> Reply {
        let method = request.method().clone();
        let path = request.uri().path().to_string();
        let Some(visit) = self
            .visit(&shared, &request)
            .filter(|v| v.session.signed_in)
        else {
            return match (&method, path.as_str()) {
                (&Method::GET, "/accounts/rows") => {
                    http::text(StatusCode::UNAUTHORIZED, "log in to the console first\n")
                }
                (&Method::GET, _) => http::redirect("/login"),
                _ => http::text(
                    StatusCode::UNAUTHORIZED,
                    "log in to the console first, then try again\n",
                ),
            };
        };
        let new_cookie = visit.new_cookie.clone();
        let reply = match (&method, path.as_str()) {
            (&Method::GET, "/" | "/accounts") => {
                self.accounts_page(&shared, &visit.session, None).await
            }
            (&Method::GET, "/accounts/rows") => self.account_rows(&shared, &visit.session).await,
            (&Method::POST, _) => self.post(shared, request, &visit, peer).await,
            _ => http::text(
                StatusCode::NOT_FOUND,
                "not found; the console is at /accounts\n",
            ),
        };
        match new_cookie {
            Some(cookie) => http::with_cookie(reply, &cookie),
            None => reply,
        }
    }

    /// A POST of a signed-in visitor: its CSRF token first, then the action.
    async fn post(
        &self,
        shared: Arc<Shared>,
        request: Request<Incoming>,
        visit: &Visit,
        peer: SocketAddr,
    ) -> Reply {
        let path = request.uri().path().to_string();
        let Some(form) = http::form(request).await else {
            return http::text(StatusCode::PAYLOAD_TOO_LARGE, "the form is too large\n");
        };
        if !visit
            .session
            .csrf_matches(form.get("csrf").map(String::as_str))
        {
            warn!(client = %peer.ip(), "console: a POST to {path} without this session's CSRF token; refused");
            return stale_form();
        }
        if path == "/logout" {
            return self.log_out(visit, &shared);
        }
        let name = form.get("account").map(String::as_str).unwrap_or_default();
        let Some(account) = shared.config.account(name).cloned() else {
            return http::page(
                StatusCode::NOT_FOUND,
                pages::problem(
                    "No such account",
                    "That account is not in the config (was it reloaded?); go back to the accounts and try again.",
                ),
            );
        };
        let session = &visit.session;
        match path.as_str() {
            "/accounts/connect" => self.connect(shared, &account, session, peer).await,
            "/accounts/disconnect" => self.disconnect(&shared, &account, session, peer).await,
            "/accounts/check" => self.check(&shared, &account, session, peer).await,
            _ => http::text(
                StatusCode::NOT_FOUND,
                "not found; the console is at /accounts\n",
            ),
        }
    }

    /// The visitor's session, if its cookie names a live one. Where the
    /// console may go without a password, a visitor without one gets a
    /// signed-in session (and its cookie, for the CSRF token).
    fn visit(&self, shared: &Shared, request: &Request<Incoming>) -> Option<Visit> {
        let cookies = http::cookies(request);
        let under = under(shared);
        if let Some(id) = session::id_from_cookies(&cookies)
            && let Some(session) = self.sessions.find(id, under)
        {
            return Some(Visit {
                id: id.to_string(),
                session,
                new_cookie: None,
            });
        }
        if !self.open_without_password(shared) || request.method() != Method::GET {
            return None;
        }
        let (id, session) = self.sessions.open(true, under);
        Some(Visit {
            new_cookie: Some(session::set_cookie(&id, secure(shared))),
            id,
            session,
        })
    }
}

impl Console {
    /// Whether a visitor is signed in without a password: only where the
    /// config in force has none and allows it, and the listener is bound to
    /// loopback (not merely configured so by a reload).
    fn open_without_password(&self, shared: &Shared) -> bool {
        let admin = &shared.config.admin;
        admin.password_hash.is_none()
            && admin.console_allow_loopback_without_password
            && self.on_loopback
    }
}

/// The admin password that sessions sign in under now.
fn under(shared: &Shared) -> Under {
    Under::password(shared.config.admin.password_hash.as_deref())
}

/// A POST whose CSRF token is missing or not the session's.
fn stale_form() -> Reply {
    http::page(
        StatusCode::FORBIDDEN,
        pages::problem(
            "Form refused",
            "The form is stale or did not come from this console: reload the page and try again.",
        ),
    )
}

/// The console is reached over HTTPS (a TLS proxy in front): the cookie is `Secure`.
fn secure(shared: &Shared) -> bool {
    shared.config.admin.public_url.starts_with("https:")
}

/// Where the identity provider sends the browser back.
fn callback_url(shared: &Shared) -> String {
    format!(
        "{}/oauth/callback",
        shared.config.admin.public_url.trim_end_matches('/')
    )
}
