//! Each account's state as the grant store tells it: what `xoauth2-proxy
//! status` prints and the console's Accounts page shows, computed in one
//! place so that the two never disagree.

use serde::Serialize;

use super::health::AccountState;
use super::store::{LoadError, StoredGrant, TokenStore};
use crate::config::{Account, Config, Flow, SendVia};

/// One account's row.
#[derive(Debug, Clone, Serialize)]
pub struct AccountStatus {
    pub account: String,
    pub mailbox: String,
    pub provider: String,
    pub flow: Flow,
    pub state: &'static str,
    pub needs_login: bool,
    pub access_token_expires_at: Option<u64>,
    pub access_token_valid: bool,
    pub last_refresh: Option<u64>,
    pub authorized_at: Option<u64>,
    pub last_error: Option<String>,
    pub last_error_at: Option<u64>,
    /// Whether the grant file is sealed with the token key; `None` without a file.
    pub grant_sealed: Option<bool>,
    /// Why the grant file cannot be used (it does not open with the key).
    pub grant_error: Option<String>,
    /// False while the running proxy holds the newest grant in memory only
    /// (its save failed); `None` when no proxy answered.
    pub grant_saved: Option<bool>,
    /// The kind of store the grants are in (`file`, `postgres`).
    pub grant_store: &'static str,
    /// Whether that store answered.
    pub grant_store_up: bool,
    /// Who signed in for a delegated grant (`sign_in_user`, or learnt from
    /// the ID token): the user SMTP logs in as. `None` when not known.
    pub signed_in_as: Option<String>,
    /// `smtp`, `graph` or `auto`.
    pub send_via: &'static str,
}

/// What `status` and the console's Accounts page say when the grants are
/// stored unsealed (no token key): where their tokens lie in plain text, and
/// how to seal them. `None` when a token key seals them.
pub fn unsealed_warning(store: &TokenStore) -> Option<String> {
    store.key_file().is_none().then(|| {
        format!(
            "Grants are not sealed: their tokens are in plain text in {}. To seal them, run `xoauth2-proxy keygen FILE` with FILE outside the state directory (a Docker or Kubernetes secret), set `token_key_file` in [server] (or $XOAUTH2_PROXY_TOKEN_KEY_FILE) to it and restart; each grant is sealed at its next write.",
            store.describe()
        )
    })
}

/// Every account's status, and the grant files that could not be read: each
/// becomes a warning after the statuses, so one bad file hides no account.
pub async fn account_statuses(
    config: &Config,
    store: &TokenStore,
    now: u64,
) -> (Vec<AccountStatus>, Vec<String>) {
    let mut problems = Vec::new();
    let mut rows = Vec::new();
    for a in &config.accounts {
        let (row, problem) = account_status(a, store, now).await;
        problems.extend(problem);
        rows.push(row);
    }
    (rows, problems)
}

/// One account's status, and why its grant file could not be read.
pub async fn account_status(
    account: &Account,
    store: &TokenStore,
    now: u64,
) -> (AccountStatus, Option<String>) {
    match store.read(&account.username).await {
        Ok(file) => {
            let sealed = file.as_ref().map(|f| f.sealed);
            let row = AccountStatus::new(account, file.map(|f| f.grant), sealed, now);
            (row, None)
        }
        Err(LoadError::Sealed(e)) => (AccountStatus::undecryptable(account, store, e), None),
        Err(LoadError::Unavailable(e)) => (AccountStatus::store_down(account, e), None),
        Err(e) => (
            AccountStatus::new(account, None, None, now),
            Some(e.to_string()),
        ),
    }
}

impl AccountStatus {
    pub fn new(
        account: &Account,
        grant: Option<StoredGrant>,
        sealed: Option<bool>,
        now: u64,
    ) -> Self {
        let state = describe(grant.as_ref(), account.flow);
        let g = grant.unwrap_or_default();
        AccountStatus {
            account: account.username.clone(),
            mailbox: account.mailbox.clone(),
            provider: account.provider.clone(),
            flow: account.flow,
            state,
            needs_login: state == "needs login",
            access_token_expires_at: g.expires_at,
            access_token_valid: g.access_token.is_some() && g.expires_at.is_some_and(|t| t > now),
            last_refresh: g.obtained_at,
            authorized_at: g.authorized_at,
            last_error: g.last_error,
            last_error_at: g.last_error_at,
            grant_saved: None,
            grant_sealed: sealed,
            grant_error: None,
            grant_store: "file",
            grant_store_up: true,
            signed_in_as: account.sign_in_user.clone().or(g.sign_in_user),
            send_via: send_via_name(account.send_via),
        }
    }

    /// An account whose grant cannot be read: the store is out of reach.
    fn store_down(account: &Account, error: String) -> Self {
        AccountStatus {
            state: "unknown: the grant store cannot be reached",
            needs_login: false,
            grant_error: Some(error),
            ..AccountStatus::new(account, None, None, 0)
        }
    }

    /// An account whose sealed grant does not open: the file stays as it
    /// is, and `error` says what to do.
    fn undecryptable(account: &Account, store: &TokenStore, error: String) -> Self {
        let state = match store.key_file() {
            Some(_) => "cannot decrypt its grant: wrong token key?",
            None => "cannot decrypt its grant: no token key is configured",
        };
        AccountStatus {
            state,
            needs_login: false,
            grant_sealed: Some(true),
            grant_error: Some(error),
            ..AccountStatus::new(account, None, None, 0)
        }
    }

    /// Which of the console's three states the account is in, by its grant
    /// file: needs login, else an error since the last token, else authorised.
    pub fn health(&self) -> AccountState {
        if self.needs_login {
            AccountState::NeedsLogin
        } else if self.grant_error.is_some() || self.last_error.is_some() {
            AccountState::Error
        } else {
            AccountState::Authorised
        }
    }
}

/// How `status` and the console name an account's `send_via`.
pub fn send_via_name(send_via: SendVia) -> &'static str {
    match send_via {
        SendVia::Smtp => "smtp",
        SendVia::Graph => "graph",
        SendVia::Auto => "auto",
    }
}

/// How `status` names the state of an account's grant.
fn describe(grant: Option<&StoredGrant>, flow: Flow) -> &'static str {
    match (flow, grant) {
        (Flow::ClientCredentials, _) => "app-only (no login needed)",
        (_, None) => "needs login",
        (_, Some(g)) if g.needs_login || g.refresh_token.is_none() => "needs login",
        (_, Some(_)) => "authorised",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::Secret;

    fn account(flow: Flow) -> Account {
        let text = format!(
            "[providers.p]\nclient_id = \"c\"\nclient_secret = \"s\"\n[[accounts]]\nusername = \"u@x.com\"\npassword = \"pw\"\nprovider = \"p\"\nflow = \"{}\"\n",
            match flow {
                Flow::DeviceCode => "device_code",
                Flow::AuthorizationCode => "authorization_code",
                Flow::ClientCredentials => "client_credentials",
            }
        );
        let config = Config::parse(std::path::Path::new("/x.toml"), &text).unwrap();
        config.accounts[0].clone()
    }

    fn authorised() -> StoredGrant {
        StoredGrant {
            refresh_token: Some(Secret::new("rt".into())),
            ..Default::default()
        }
    }

    #[test]
    fn health_follows_the_grant() {
        let device = account(Flow::DeviceCode);
        let health =
            |grant: Option<StoredGrant>| AccountStatus::new(&device, grant, None, 0).health();
        assert_eq!(health(None), AccountState::NeedsLogin);
        assert_eq!(health(Some(authorised())), AccountState::Authorised);
        let refused = StoredGrant {
            needs_login: true,
            last_error: Some("revoked".into()),
            ..authorised()
        };
        assert_eq!(health(Some(refused)), AccountState::NeedsLogin);
        let failing = StoredGrant {
            last_error: Some("the identity provider is unreachable".into()),
            ..authorised()
        };
        assert_eq!(health(Some(failing)), AccountState::Error);
        let app = AccountStatus::new(&account(Flow::ClientCredentials), None, None, 0);
        assert_eq!(app.health(), AccountState::Authorised);
    }
}
