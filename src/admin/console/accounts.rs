//! The Accounts page, and its rows for the page's poll.

use hyper::StatusCode;
use serde_json::json;

use super::session::Session;
use super::{Console, http, pages};
use crate::admin::exchange::Reply;
use crate::oauth::AccountState;
use crate::oauth::status::{account_status, unsealed_warning};
use crate::oauth::store::unix_now;
use crate::shared::Shared;

impl Console {
    /// `GET /accounts`: a row per account.
    pub(super) async fn accounts_page(
        &self,
        shared: &Shared,
        session: &Session,
        notice: Option<(&str, bool)>,
    ) -> Reply {
        let rows = self.rows(shared, &session.csrf).await;
        let rows: Vec<String> = rows.into_iter().map(|(_, (_, html))| html).collect();
        let status = match notice {
            Some((_, true)) => StatusCode::BAD_GATEWAY,
            _ => StatusCode::OK,
        };
        let unsealed = unsealed_warning(shared.tokens.store());
        let page = pages::accounts(&rows, &session.csrf, notice, unsealed.as_deref());
        http::page(status, page)
    }

    /// `GET /accounts/rows`: the rows again, for the page's poll.
    pub(super) async fn account_rows(&self, shared: &Shared, session: &Session) -> Reply {
        let rows: Vec<_> = self
            .rows(shared, &session.csrf)
            .await
            .into_iter()
            .map(|(account, (version, html))| json!({"account": account, "version": version, "html": html}))
            .collect();
        http::json(&json!({ "rows": rows }))
    }

    /// Each account's row: (username, (version, HTML)).
    pub(super) async fn rows(
        &self,
        shared: &Shared,
        csrf: &str,
    ) -> Vec<(String, (String, String))> {
        let now = unix_now();
        let mut rows = Vec::new();
        for account in &shared.config.accounts {
            let (status, problem) = account_status(account, shared.tokens.store(), now).await;
            let health = match problem {
                Some(_) => AccountState::Error,
                None => status.health(),
            };
            let row = pages::Row {
                status: &status,
                health,
                device: self.sign_ins.device(&account.username),
                problem: problem.as_deref(),
                client_logins: shared
                    .tokens
                    .health(&account.username)
                    .map(|h| h.last_client_login)
                    .unwrap_or_default(),
            };
            rows.push((
                account.username.clone(),
                pages::account_row(&row, csrf, now),
            ));
        }
        rows
    }
}
