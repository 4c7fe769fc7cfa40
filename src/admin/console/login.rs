//! Logging in to the console and out of it.

use std::net::SocketAddr;

use hyper::body::Incoming;
use hyper::{Request, StatusCode};
use tracing::{info, warn};

use super::{Console, Visit, http, pages, secure, session, stale_form, under};
use crate::accounts::Refused;
use crate::admin::exchange::Reply;
use crate::shared::Shared;

impl Console {
    /// `GET /login`: the form, with a session for its CSRF token.
    pub(super) fn login_page(&self, shared: &Shared, request: &Request<Incoming>) -> Reply {
        if shared.config.admin.password_hash.is_none() {
            if self.open_without_password(shared) {
                return http::redirect("/accounts");
            }
            return http::page(
                StatusCode::FORBIDDEN,
                pages::problem(
                    "No admin password",
                    "The console has no admin password: set `password_hash` in [admin] to the output of `xoauth2-proxy hash-password`, then reload the proxy.",
                ),
            );
        }
        let visit = self.visit(shared, request);
        if visit.as_ref().is_some_and(|v| v.session.signed_in) {
            return http::redirect("/accounts");
        }
        match visit {
            Some(v) => http::page(StatusCode::OK, pages::login(&v.session.csrf, None)),
            None => {
                let (id, session) = self.sessions.open(false, under(shared));
                let page = http::page(StatusCode::OK, pages::login(&session.csrf, None));
                http::with_cookie(page, &session::set_cookie(&id, secure(shared)))
            }
        }
    }

    /// `POST /login`: the admin password, checked through the throttle; a
    /// success replaces the session with a signed-in one.
    pub(super) async fn log_in(
        &self,
        shared: &Shared,
        request: Request<Incoming>,
        peer: SocketAddr,
    ) -> Reply {
        let started = tokio::time::Instant::now();
        let id = session::id_from_cookies(&http::cookies(&request)).map(str::to_string);
        let session = id
            .as_deref()
            .and_then(|id| self.sessions.find(id, under(shared)));
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
                let (new_id, _) = self.sessions.open(true, under(shared));
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
    pub(super) fn log_out(&self, visit: &Visit, shared: &Shared) -> Reply {
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
}
