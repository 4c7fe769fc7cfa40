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

mod http;
mod pages;
mod session;
mod sign_ins;

use std::net::SocketAddr;
use std::sync::Arc;

use hyper::body::Incoming;
use hyper::{Method, Request, StatusCode};
use serde_json::json;
use tracing::{info, warn};

use self::session::{Session, Sessions};
use self::sign_ins::SignIns;
use crate::accounts::Refused;
use crate::admin::exchange::{Current, Reply};
use crate::config::{Account, Flow};
use crate::oauth::status::{Health, account_status};
use crate::oauth::store::unix_now;
use crate::shared::Shared;

/// The console's state for the life of the listener: sessions and sign-ins
/// under way survive a reload; the config in force is read per request.
pub struct Console {
    current: Current,
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
    pub fn new(current: Current) -> Self {
        Console {
            current,
            sessions: Sessions::default(),
            sign_ins: Arc::default(),
        }
    }

    /// Answers one console request.
    pub async fn handle(&self, request: Request<Incoming>, peer: SocketAddr) -> Reply {
        let shared = self.current.borrow().clone();
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
            (&Method::GET, "/" | "/accounts") => self.accounts_page(&shared, &visit.session, None),
            (&Method::GET, "/accounts/rows") => self.account_rows(&shared, &visit.session),
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
    /// config lets the console go without a password, a visitor without
    /// one gets a signed-in session (and its cookie, for the CSRF token).
    fn visit(&self, shared: &Shared, request: &Request<Incoming>) -> Option<Visit> {
        let cookies = http::cookies(request);
        if let Some(id) = session::id_from_cookies(&cookies)
            && let Some(session) = self.sessions.find(id)
        {
            return Some(Visit {
                id: id.to_string(),
                session,
                new_cookie: None,
            });
        }
        if shared.config.admin.password_hash.is_some() || request.method() != Method::GET {
            return None;
        }
        let (id, session) = self.sessions.open(true);
        Some(Visit {
            new_cookie: Some(session::set_cookie(&id, secure(shared))),
            id,
            session,
        })
    }

    /// `GET /login`: the form, with a session for its CSRF token.
    fn login_page(&self, shared: &Shared, request: &Request<Incoming>) -> Reply {
        if shared.config.admin.password_hash.is_none() {
            return http::redirect("/accounts");
        }
        let visit = self.visit(shared, request);
        if visit.as_ref().is_some_and(|v| v.session.signed_in) {
            return http::redirect("/accounts");
        }
        match visit {
            Some(v) => http::page(StatusCode::OK, pages::login(&v.session.csrf, None)),
            None => {
                let (id, session) = self.sessions.open(false);
                let page = http::page(StatusCode::OK, pages::login(&session.csrf, None));
                http::with_cookie(page, &session::set_cookie(&id, secure(shared)))
            }
        }
    }

    /// `POST /login`: the admin password, checked through the throttle; a
    /// success replaces the session with a signed-in one.
    async fn log_in(&self, shared: &Shared, request: Request<Incoming>, peer: SocketAddr) -> Reply {
        let started = tokio::time::Instant::now();
        let id = session::id_from_cookies(&http::cookies(&request)).map(str::to_string);
        let session = id.as_deref().and_then(|id| self.sessions.find(id));
        let Some(form) = http::form(request).await else {
            return http::text(StatusCode::PAYLOAD_TOO_LARGE, "the form is too large\n");
        };
        let (Some(id), Some(session)) = (id, session) else {
            return stale_form();
        };
        if !session.csrf_matches(form.get("csrf").map(String::as_str)) {
            return stale_form();
        }
        let password = form
            .get("password")
            .map(String::as_bytes)
            .unwrap_or_default();
        let refused = match shared.accounts.verify_admin(peer.ip(), password).await {
            Ok(()) => {
                self.sessions.close(&id);
                let (new_id, _) = self.sessions.open(true);
                info!(client = %peer.ip(), "console: admin logged in");
                let cookie = session::set_cookie(&new_id, secure(shared));
                return http::with_cookie(http::redirect("/accounts"), &cookie);
            }
            Err(refused) => refused,
        };
        tokio::time::sleep_until(started + shared.config.server.auth_failure_delay).await;
        let (status, notice) = match refused {
            Refused::Wrong { .. } => {
                warn!(client = %peer.ip(), "console: wrong admin password");
                (StatusCode::UNAUTHORIZED, "Wrong password; try again.")
            }
            Refused::Throttled => {
                warn!(client = %peer.ip(), "console: admin login refused, too many wrong passwords from this address");
                (
                    StatusCode::TOO_MANY_REQUESTS,
                    "Too many wrong passwords from your address: wait a few minutes, then try again.",
                )
            }
            Refused::Busy => (
                StatusCode::SERVICE_UNAVAILABLE,
                "The proxy is busy checking passwords; try again in a moment.",
            ),
        };
        http::page(status, pages::login(&session.csrf, Some(notice)))
    }

    /// `POST /logout`.
    fn log_out(&self, visit: &Visit, shared: &Shared) -> Reply {
        self.sessions.close(&visit.id);
        let reply = if shared.config.admin.password_hash.is_some() {
            http::redirect("/login")
        } else {
            http::page(
                StatusCode::OK,
                pages::problem("Logged out", "You are logged out of the console."),
            )
        };
        http::with_cookie(reply, &session::clear_cookie(secure(shared)))
    }

    /// `GET /accounts`: a row per account.
    fn accounts_page(
        &self,
        shared: &Shared,
        session: &Session,
        notice: Option<(&str, bool)>,
    ) -> Reply {
        let rows = self.rows(shared, &session.csrf);
        let rows: Vec<_> = rows
            .into_iter()
            .map(|(_, (_, html))| (String::new(), html))
            .collect();
        let status = match notice {
            Some((_, true)) => StatusCode::BAD_GATEWAY,
            _ => StatusCode::OK,
        };
        http::page(status, pages::accounts(&rows, &session.csrf, notice))
    }

    /// `GET /accounts/rows`: the rows again, for the page's poll.
    fn account_rows(&self, shared: &Shared, session: &Session) -> Reply {
        let rows: Vec<_> = self
            .rows(shared, &session.csrf)
            .into_iter()
            .map(|(account, (version, html))| json!({"account": account, "version": version, "html": html}))
            .collect();
        http::json(&json!({ "rows": rows }))
    }

    /// Each account's row: (username, (version, HTML)).
    fn rows(&self, shared: &Shared, csrf: &str) -> Vec<(String, (String, String))> {
        let now = unix_now();
        shared
            .config
            .accounts
            .iter()
            .map(|account| {
                let (status, problem) = account_status(account, shared.tokens.store(), now);
                let health = match problem {
                    Some(_) => Health::Error,
                    None => status.health(),
                };
                let row = pages::Row {
                    status: &status,
                    health,
                    device: self.sign_ins.device(&account.username),
                    problem: problem.as_deref(),
                };
                (
                    account.username.clone(),
                    pages::account_row(&row, csrf, now),
                )
            })
            .collect()
    }

    /// `POST /accounts/connect`: the account's flow. A device code is shown
    /// in its row; a browser sign-in sends the browser to the identity
    /// provider; an app-only account gets a token now.
    async fn connect(
        &self,
        shared: Arc<Shared>,
        account: &Account,
        session: &Session,
        peer: SocketAddr,
    ) -> Reply {
        info!(client = %peer.ip(), account = %account.username, flow = ?account.flow, "console: connect");
        let started = match account.flow {
            Flow::DeviceCode => self
                .sign_ins
                .start_device(shared.clone(), &account.username)
                .await
                .map(|()| None),
            Flow::AuthorizationCode => self
                .sign_ins
                .start_browser(&shared, &account.username, &callback_url(&shared))
                .map(Some),
            Flow::ClientCredentials => shared
                .tokens
                .access_token(&account.username)
                .await
                .map(|_| None)
                .map_err(|e| e.to_string()),
        };
        match started {
            Ok(Some(identity_provider)) => http::redirect(&identity_provider),
            Ok(None) => http::redirect("/accounts"),
            Err(e) => {
                warn!(account = %account.username, "console: connect failed: {e}");
                let notice = format!("Connect {} failed: {e}", account.username);
                self.accounts_page(&shared, session, Some((&notice, true)))
            }
        }
    }

    /// `POST /accounts/disconnect`: the grant is forgotten, through the
    /// token manager so that the cached access token goes too.
    async fn disconnect(
        &self,
        shared: &Shared,
        account: &Account,
        session: &Session,
        peer: SocketAddr,
    ) -> Reply {
        info!(client = %peer.ip(), account = %account.username, "console: disconnect");
        self.sign_ins.cancel_device(&account.username);
        match shared.tokens.forget(&account.username).await {
            Ok(()) => http::redirect("/accounts"),
            Err(e) => {
                let notice = format!("Disconnect {} failed: {e}", account.username);
                self.accounts_page(shared, session, Some((&notice, true)))
            }
        }
    }

    /// `POST /accounts/check`: what `xoauth2-proxy check` does, for one account.
    async fn check(
        &self,
        shared: &Shared,
        account: &Account,
        session: &Session,
        peer: SocketAddr,
    ) -> Reply {
        info!(client = %peer.ip(), account = %account.username, "console: check");
        let steps = crate::check::account_steps(shared, account).await;
        http::page(
            StatusCode::OK,
            pages::check(&account.username, &steps, &session.csrf),
        )
    }

    /// `GET /oauth/callback`: the browser back from the identity provider
    /// with a code (or a refusal) for a sign-in this console started.
    async fn callback(&self, shared: Arc<Shared>, request: &Request<Incoming>) -> Reply {
        let query = http::query(request);
        let unknown = || {
            http::page(
                StatusCode::BAD_REQUEST,
                pages::problem(
                    "Unknown sign-in",
                    "This sign-in is unknown, used already or older than 10 minutes: press Connect in the console again.",
                ),
            )
        };
        let Some((account, sign_in)) = query
            .get("state")
            .and_then(|s| self.sign_ins.take_browser(s))
        else {
            return unknown();
        };
        let outcome = match (query.get("code"), query.get("error")) {
            (Some(code), _) => {
                crate::oauth::connect::finish_browser(
                    &shared.tokens,
                    &account,
                    sign_in,
                    code.clone(),
                )
                .await
            }
            (None, Some(error)) => {
                let description = query
                    .get("error_description")
                    .map(String::as_str)
                    .unwrap_or_default();
                Err(format!(
                    "{error}: {}",
                    description.lines().next().unwrap_or_default()
                ))
            }
            (None, None) => return unknown(),
        };
        match outcome {
            Ok(()) => {
                info!(account = %account, "connected from the console (browser sign-in)");
                http::page(StatusCode::OK, pages::callback_done(Ok(&account)))
            }
            Err(e) => {
                warn!(account = %account, "console: browser sign-in failed: {e}");
                http::page(StatusCode::BAD_GATEWAY, pages::callback_done(Err(&e)))
            }
        }
    }
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
