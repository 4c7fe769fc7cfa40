//! Account health: whether each account can get tokens, as the process saw
//! it last, and a signal when an account starts or stops needing `login`.
//!
//! The token manager writes it only at the moments an account's standing may
//! change: a grant read from disk (at start, after a reload, after
//! `xoauth2-proxy login` wrote a new one), a token request that worked or
//! failed. A login served from the cached access token does not touch it, so
//! the login path pays nothing; an update takes one account's own short lock,
//! never held across an await, and moves the metric gauges with atomic stores.
//!
//! The record belongs to the process, not to one config: [`Health`] is made
//! once (as `accounts::LoginGuard` is) and every `TokenManager` a reload
//! builds picks up the same per-account slots. So a reload neither forgets
//! that an account needs login nor makes it look new to whoever is told.
//! A manager's accounts become the record's only when its config is put in
//! force ([`Health::adopt`]): a reload that is refused after the manager was
//! built leaves the record as it was.
//!
//! Readers (the notifier, the console) take a snapshot with [`Health::get`]
//! or [`Health::all`] and wait for transitions with [`Health::subscribe`]: a
//! `watch` channel whose number goes up at each needs-login ⇄ authorised
//! transition. A `watch` rather than a queue of events: a slow reader cannot
//! make it grow, and it reads the current state, which is what it acts on.

use std::any::Any;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError, Weak};

use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::watch;

use super::store::StoredGrant;
use crate::config::Account;
use crate::metrics::AccountLabels;

/// The health of one account, as [`Health::get`] returns it. Holds no
/// secret: reasons are the sentences the log shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountHealth {
    /// The account's `username`, as the config spells it.
    pub username: String,
    pub mailbox: String,
    /// A device-code or authorization-code account (one that can need `login`).
    pub delegated: bool,
    /// Set while the account needs `login`.
    pub needs_login: Option<NeedsLogin>,
    /// Unix seconds when the last access token obtained expires (it may lie
    /// in the past: tokens are renewed when used), if one is known.
    pub access_token_expires_at: Option<u64>,
    /// Unix seconds when the last access token was obtained.
    pub last_refresh: Option<u64>,
    /// The last failed token request that did not mean `login` (the app was
    /// refused, the identity provider was unreachable, a grant file does not
    /// open), as a sentence saying what to do.
    pub last_error: Option<String>,
    /// Unix seconds of `last_error`.
    pub last_error_at: Option<u64>,
    /// Unix seconds of the last client login through the proxy, by protocol.
    pub last_client_login: ClientLogins,
}

/// When a client last logged in through the proxy, per protocol (Unix
/// seconds): the console shows whether NocoBase still uses an account.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ClientLogins {
    pub imap: Option<u64>,
    pub smtp: Option<u64>,
}

/// Why an account needs `login`, and since when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NeedsLogin {
    /// What happened and what to do, e.g. "the grant is invalid, expired or
    /// revoked: run `xoauth2-proxy login sales@contoso.com`".
    pub reason: String,
    /// Unix seconds when the account started needing it.
    pub since: u64,
}

/// An account's state in one word, as the console shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccountState {
    /// Tokens can be had.
    Authorised,
    /// No grant, or the identity provider refused it: only `login` helps.
    NeedsLogin,
    /// The last token request failed for another reason (see `last_error`).
    Error,
}

impl AccountHealth {
    fn new(account: &Account) -> Self {
        AccountHealth {
            username: account.username.clone(),
            mailbox: account.mailbox.clone(),
            delegated: account.flow.is_delegated(),
            needs_login: None,
            access_token_expires_at: None,
            last_refresh: None,
            last_error: None,
            last_error_at: None,
            last_client_login: ClientLogins::default(),
        }
    }

    /// Needs login, else an error newer than the last token, else authorised.
    pub fn state(&self) -> AccountState {
        if self.needs_login.is_some() {
            return AccountState::NeedsLogin;
        }
        match (self.last_error_at, self.last_refresh) {
            (Some(error), Some(refresh)) if error < refresh => AccountState::Authorised,
            (Some(_), _) => AccountState::Error,
            (None, _) => AccountState::Authorised,
        }
    }
}

/// The health of every configured account, for the whole process: a cheap
/// clone of one shared value.
#[derive(Clone)]
pub struct Health {
    inner: Arc<Inner>,
}

struct Inner {
    /// By lower-case username, as the token manager keys accounts.
    slots: Mutex<BTreeMap<String, Arc<Slot>>>,
    transitions: watch::Sender<u64>,
}

impl Default for Health {
    fn default() -> Self {
        Health {
            inner: Arc::new(Inner {
                slots: Mutex::default(),
                transitions: watch::Sender::new(0),
            }),
        }
    }
}

impl Health {
    /// The health of `username` (case-insensitive), if it is configured.
    pub fn get(&self, username: &str) -> Option<AccountHealth> {
        let slots = lock(&self.inner.slots);
        let slot = slots.get(&username.to_lowercase())?;
        Some(slot.read().clone())
    }

    /// The health of every configured account, by username.
    pub fn all(&self) -> Vec<AccountHealth> {
        let slots: Vec<Arc<Slot>> = lock(&self.inner.slots).values().cloned().collect();
        slots.iter().map(|s| s.read().clone()).collect()
    }

    /// A receiver that changes each time an account starts or stops needing
    /// `login` (and when the configured accounts change); read the state
    /// with [`all`](Self::all) after it does.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.inner.transitions.subscribe()
    }

    /// The slot of `account`: the one the record holds (its state goes on
    /// across a reload), else a new one, not in the record until adopted.
    pub(super) fn slot(&self, account: &Account) -> Arc<Slot> {
        let slots = lock(&self.inner.slots);
        match slots.get(&account.username.to_lowercase()) {
            Some(slot) => slot.clone(),
            None => Arc::new(Slot::new(account, self.inner.transitions.clone())),
        }
    }

    /// Makes `slots` (a token manager's, by lower-case username) the
    /// accounts the record reports, with their metric series; the accounts
    /// no longer configured are forgotten, series and all.
    pub(super) fn adopt(&self, slots: impl IntoIterator<Item = (String, Arc<Slot>)>) {
        let adopted: BTreeMap<String, Arc<Slot>> = slots.into_iter().collect();
        for slot in adopted.values() {
            slot.show_metrics();
        }
        let before = std::mem::replace(&mut *lock(&self.inner.slots), adopted.clone());
        for (key, slot) in before {
            if !adopted.contains_key(&key) {
                slot.forget_metrics();
            }
        }
        self.inner.transitions.send_modify(|n| *n += 1);
    }
}

/// An account's token state, as the token manager keeps it.
pub(super) type InForce = dyn Any + Send + Sync;

/// One account's record and its metric series.
pub(super) struct Slot {
    record: Mutex<AccountHealth>,
    transitions: watch::Sender<u64>,
    labels: AccountLabels,
    /// Made when the record adopts the slot: an account of a config never
    /// put in force has no series.
    needs_login_gauge: OnceLock<Gauge>,
    /// Made at the first known expiry after that, so that an account
    /// without a token has no series (a 0 would read as an expiry in 1970).
    expiry_gauge: OnceLock<Gauge>,
    /// The account's token state in the manager in force, so that the
    /// manager a reload puts in force takes over its cached access token
    /// ([`super::TokenManager::publish_health`]). Opaque here (the record
    /// holds no secret it could show); weak, so that a manager no session
    /// uses any more is freed.
    in_force: Mutex<Option<Weak<InForce>>>,
}

impl Slot {
    fn new(account: &Account, transitions: watch::Sender<u64>) -> Self {
        Slot {
            record: Mutex::new(AccountHealth::new(account)),
            transitions,
            labels: AccountLabels {
                account: account.username.clone(),
            },
            needs_login_gauge: OnceLock::new(),
            expiry_gauge: OnceLock::new(),
            in_force: Mutex::new(None),
        }
    }

    /// Makes `tokens` the account's token state in force, and returns the
    /// one it replaces, if that still lives.
    pub(super) fn put_in_force(&self, tokens: Arc<InForce>) -> Option<Arc<InForce>> {
        let before = lock(&self.in_force).replace(Arc::downgrade(&tokens));
        before
            .and_then(|weak| weak.upgrade())
            .filter(|old| !Arc::ptr_eq(old, &tokens))
    }

    /// Takes the account's names and flow as the config in force spells
    /// them (a reload may have changed its mailbox).
    pub(super) fn identify(&self, account: &Account) {
        let mut record = self.write();
        record.username.clone_from(&account.username);
        record.mailbox.clone_from(&account.mailbox);
        record.delegated = account.flow.is_delegated();
    }

    /// Makes the slot's metric series (once) and sets them.
    fn show_metrics(&self) {
        self.needs_login_gauge.get_or_init(|| {
            crate::metrics::get()
                .account_needs_login
                .get_or_create_owned(&self.labels)
        });
        self.update(|_| {});
    }

    fn read(&self) -> MutexGuard<'_, AccountHealth> {
        lock(&self.record)
    }

    fn write(&self) -> MutexGuard<'_, AccountHealth> {
        lock(&self.record)
    }

    /// A client logged in over `protocol` (`imap` or `smtp`) at `now`. Not
    /// a transition: nobody is woken.
    pub(super) fn client_logged_in(&self, protocol: &str, now: u64) {
        let mut record = self.write();
        let logins = &mut record.last_client_login;
        match protocol {
            "imap" => logins.imap = Some(now),
            _ => logins.smtp = Some(now),
        }
    }

    /// A grant as read from its file (or its absence, as a default grant).
    pub(super) fn grant_read(&self, grant: &StoredGrant) {
        self.update(|h| {
            h.access_token_expires_at = grant.access_token.as_ref().and(grant.expires_at);
            h.last_refresh = grant.obtained_at.or(h.last_refresh);
            if !h.delegated {
                h.needs_login = None;
            } else if grant.refresh_token.is_none() {
                let reason = format!(
                    "no grant yet: run `xoauth2-proxy login {}` to sign the mailbox in",
                    h.username
                );
                enter(h, reason, grant.last_error_at);
            } else if grant.needs_login {
                let message = grant
                    .last_error
                    .as_deref()
                    .unwrap_or("the grant was refused");
                let reason = login_reason(message, &h.username);
                enter(h, reason, grant.last_error_at);
            } else {
                // A grant that works (or a new one from `login`).
                h.needs_login = None;
                if grant.last_error.is_none() {
                    h.last_error = None;
                    h.last_error_at = None;
                }
            }
        });
    }

    /// A new access token, valid until `expires_at`, obtained at `now`.
    pub(super) fn refreshed(&self, expires_at: u64, now: u64) {
        self.update(|h| {
            h.needs_login = None;
            h.access_token_expires_at = Some(expires_at);
            h.last_refresh = Some(now);
            h.last_error = None;
            h.last_error_at = None;
        });
    }

    /// The identity provider refused the grant with `message`: only `login`
    /// helps now.
    pub(super) fn refused(&self, message: &str, now: u64) {
        self.update(|h| {
            let reason = login_reason(message, &h.username);
            h.last_error = Some(reason.clone());
            h.last_error_at = Some(now);
            enter(h, reason, Some(now));
        });
    }

    /// A token request failed for a reason other than the grant.
    pub(super) fn failed(&self, message: &str, now: u64) {
        self.update(|h| {
            h.last_error = Some(message.to_string());
            h.last_error_at = Some(now);
        });
    }

    /// Whether the account needs `login` now.
    pub(super) fn needs_login(&self) -> bool {
        self.read().needs_login.is_some()
    }

    /// Applies `change`, moves the gauges (under the record's lock, so that
    /// two updates cannot leave them out of step with it), and signals a
    /// transition.
    fn update(&self, change: impl FnOnce(&mut AccountHealth)) {
        let mut record = self.write();
        let before = record.needs_login.is_some();
        change(&mut record);
        let after = record.needs_login.is_some();
        if let Some(gauge) = self.needs_login_gauge.get() {
            gauge.set(i64::from(after));
        }
        if let Some(expires_at) = record
            .access_token_expires_at
            .filter(|_| self.needs_login_gauge.get().is_some())
        {
            let gauge = self.expiry_gauge.get_or_init(|| {
                crate::metrics::get()
                    .access_token_expiry
                    .get_or_create_owned(&self.labels)
            });
            gauge.set(i64::try_from(expires_at).unwrap_or(i64::MAX));
        }
        drop(record);
        if before != after {
            self.transitions.send_modify(|n| *n += 1);
        }
    }

    fn forget_metrics(&self) {
        let metrics = crate::metrics::get();
        metrics.account_needs_login.remove(&self.labels);
        metrics.access_token_expiry.remove(&self.labels);
    }
}

/// Marks `h` as needing login for `reason`; an account that already does
/// keeps its `since` (and takes the newer reason).
fn enter(h: &mut AccountHealth, reason: String, at: Option<u64>) {
    let since = h
        .needs_login
        .as_ref()
        .map(|n| n.since)
        .or(at)
        .unwrap_or_else(super::store::unix_now);
    h.needs_login = Some(NeedsLogin { reason, since });
}

/// The identity provider's sentence with the `login` command that fixes it
/// spelled out for `username`.
fn login_reason(message: &str, username: &str) -> String {
    if message.contains("xoauth2-proxy login ACCOUNT") {
        message.replace(
            "xoauth2-proxy login ACCOUNT",
            &format!("xoauth2-proxy login {username}"),
        )
    } else if message.contains("xoauth2-proxy login") {
        message.to_string()
    } else {
        format!("{message}; run `xoauth2-proxy login {username}`")
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every update is whole before its guard drops: a panic elsewhere leaves
    // nothing half-written.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Flow, LocalPassword};
    use crate::secret::Secret;

    fn account(username: &str, flow: Flow) -> Account {
        Account {
            username: username.into(),
            password: LocalPassword::Plain(Secret::new("pw".into())),
            provider: "p".into(),
            mailbox: username.into(),
            flow,
            scopes: None,
            sign_in_user: None,
            send_via: crate::config::SendVia::Smtp,
        }
    }

    /// The slot of `account` in `health`, put in force alone (what a token
    /// manager of one account does at start).
    fn adopted(health: &Health, account: &Account) -> Arc<Slot> {
        let slot = health.slot(account);
        health.adopt([(account.username.to_lowercase(), slot.clone())]);
        slot
    }

    fn grant(refresh_token: Option<&str>, needs_login: bool) -> StoredGrant {
        StoredGrant {
            refresh_token: refresh_token.map(|t| Secret::new(t.into())),
            needs_login,
            last_error: needs_login.then(|| {
                "the identity provider answered `invalid_grant`: AADSTS70000 — the grant is invalid, expired or revoked: run `xoauth2-proxy login ACCOUNT`".to_string()
            }),
            last_error_at: needs_login.then_some(1000),
            ..Default::default()
        }
    }

    #[test]
    fn an_account_needs_login_without_a_grant_or_after_a_refusal_and_not_after_a_refresh() {
        let health = Health::default();
        let mut changes = health.subscribe();
        let slot = adopted(&health, &account("Sales@contoso.com", Flow::DeviceCode));
        changes.mark_unchanged();

        slot.grant_read(&grant(None, false));
        let h = health.get("sales@contoso.com").unwrap();
        assert_eq!(h.state(), AccountState::NeedsLogin);
        assert!(
            h.needs_login
                .unwrap()
                .reason
                .contains("xoauth2-proxy login Sales@contoso.com"),
        );
        assert!(changes.has_changed().unwrap());
        changes.mark_unchanged();

        slot.refreshed(5000, 1500);
        let h = health.get("SALES@contoso.com").unwrap();
        assert_eq!(h.state(), AccountState::Authorised);
        assert_eq!(
            (h.access_token_expires_at, h.last_refresh),
            (Some(5000), Some(1500))
        );
        assert!(changes.has_changed().unwrap());
        changes.mark_unchanged();

        slot.refreshed(9000, 2000);
        assert!(!changes.has_changed().unwrap(), "no transition");

        slot.refused("the identity provider answered `invalid_grant`", 3000);
        let h = health.get("sales@contoso.com").unwrap();
        let needs = h.needs_login.unwrap();
        assert_eq!(needs.since, 3000);
        assert_eq!(
            needs.reason,
            "the identity provider answered `invalid_grant`; run `xoauth2-proxy login Sales@contoso.com`"
        );
        // Refused again later: still the same episode.
        slot.refused("again", 4000);
        assert_eq!(
            health
                .get("sales@contoso.com")
                .unwrap()
                .needs_login
                .unwrap()
                .since,
            3000
        );
    }

    #[test]
    fn a_grant_marked_refused_on_disk_needs_login_with_its_sentence() {
        let health = Health::default();
        let slot = adopted(&health, &account("a@contoso.com", Flow::DeviceCode));
        slot.grant_read(&grant(Some("rt"), true));
        let needs = health.get("a@contoso.com").unwrap().needs_login.unwrap();
        assert_eq!(needs.since, 1000);
        assert!(
            needs
                .reason
                .ends_with("run `xoauth2-proxy login a@contoso.com`"),
            "{}",
            needs.reason
        );
        slot.grant_read(&grant(Some("new"), false));
        assert_eq!(
            health.get("a@contoso.com").unwrap().state(),
            AccountState::Authorised
        );
    }

    #[test]
    fn app_only_accounts_never_need_login_and_errors_show_until_the_next_token() {
        let health = Health::default();
        let slot = adopted(
            &health,
            &account("app@contoso.com", Flow::ClientCredentials),
        );
        slot.grant_read(&grant(None, false));
        assert_eq!(
            health.get("app@contoso.com").unwrap().state(),
            AccountState::Authorised
        );
        slot.failed("the client secret has expired", 100);
        assert_eq!(
            health.get("app@contoso.com").unwrap().state(),
            AccountState::Error
        );
        slot.refreshed(4000, 200);
        assert_eq!(
            health.get("app@contoso.com").unwrap().state(),
            AccountState::Authorised
        );
    }

    #[test]
    fn a_reload_keeps_the_state_of_known_accounts_and_forgets_removed_ones() {
        let health = Health::default();
        let first = [
            account("kept@contoso.com", Flow::DeviceCode),
            account("gone@contoso.com", Flow::DeviceCode),
        ];
        let slots: Vec<_> = first.iter().map(|a| health.slot(a)).collect();
        health.adopt(
            first
                .iter()
                .zip(&slots)
                .map(|(a, s)| (a.username.clone(), s.clone())),
        );
        slots[0].refused("revoked", 10);
        let series = |name: &str| {
            let text = crate::metrics::get().encode();
            text.contains(&format!("needs_login{{account=\"{name}\"}}"))
        };
        assert!(series("gone@contoso.com"));

        // A new token manager's slots, of a config that may yet be refused:
        // the record does not change until they are adopted.
        let new = account("new@contoso.com", Flow::DeviceCode);
        let kept = account("KEPT@contoso.com", Flow::DeviceCode);
        let (new_slot, kept_slot) = (health.slot(&new), health.slot(&kept));
        assert!(Arc::ptr_eq(&kept_slot, &slots[0]), "the same state");
        new_slot.grant_read(&grant(None, false));
        assert!(health.get("new@contoso.com").is_none());
        assert!(!series("new@contoso.com"), "no series before adoption");

        let mut changes = health.subscribe();
        changes.mark_unchanged();
        kept_slot.identify(&kept);
        health.adopt([
            ("kept@contoso.com".to_string(), kept_slot),
            ("new@contoso.com".to_string(), new_slot),
        ]);
        assert!(changes.has_changed().unwrap(), "the accounts changed");
        let names: Vec<_> = health.all().into_iter().map(|h| h.username).collect();
        assert_eq!(names, ["KEPT@contoso.com", "new@contoso.com"]);
        assert_eq!(
            health
                .get("kept@contoso.com")
                .unwrap()
                .needs_login
                .unwrap()
                .since,
            10
        );
        assert!(
            !series("gone@contoso.com"),
            "a removed account's series goes"
        );
        assert!(series("new@contoso.com"));
    }
}
