//! `/oauth/callback`: where the identity provider sends the browser back
//! after a browser sign-in the console started.

use std::sync::Arc;

use hyper::body::Incoming;
use hyper::{Request, StatusCode};
use tracing::{info, warn};

use super::{Console, http, pages};
use crate::admin::exchange::Reply;
use crate::shared::Shared;

impl Console {
    /// `GET /oauth/callback`: the browser back from the identity provider
    /// with a code (or a refusal) for a sign-in this console started.
    pub(super) async fn callback(&self, shared: Arc<Shared>, request: &Request<Incoming>) -> Reply {
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
