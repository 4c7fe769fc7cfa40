//! The buttons of an account's row: Connect, Disconnect, Check.

use std::net::SocketAddr;
use std::sync::Arc;

use hyper::StatusCode;
use tracing::{info, warn};

use super::session::Session;
use super::{Console, callback_url, http, pages};
use crate::admin::exchange::Reply;
use crate::config::{Account, Flow};
use crate::shared::Shared;

impl Console {
    /// `POST /accounts/connect`: the account's flow. A device code is shown
    /// in its row; a browser sign-in sends the browser to the identity
    /// provider; an app-only account gets a token now.
    pub(super) async fn connect(
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
                    .await
            }
        }
    }

    /// `POST /accounts/disconnect`: the grant is forgotten, through the
    /// token manager so that the cached access token goes too.
    pub(super) async fn disconnect(
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
                    .await
            }
        }
    }

    /// `POST /accounts/check`: what `xoauth2-proxy check` does, for one account.
    pub(super) async fn check(
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
}
