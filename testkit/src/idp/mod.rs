//! A mock Microsoft identity platform (Entra ID, v2.0 endpoints) on loopback HTTP.
//!
//! Endpoints, for any tenant segment:
//! - `POST /{tenant}/oauth2/v2.0/devicecode` — device authorization request.
//! - `POST /{tenant}/oauth2/v2.0/token` — grants `device_code`, `refresh_token`,
//!   `client_credentials`, `authorization_code`.
//! - `GET /{tenant}/oauth2/v2.0/authorize` — auto-approves as the device user and
//!   redirects (302) to `redirect_uri?code=…&state=…` (PKCE S256/plain is then checked at
//!   the token endpoint); with `DeviceOutcome::Decline` it redirects with
//!   `error=access_denied` instead.
//!
//! Deliberate strictness (each is something real Entra also does, or stricter):
//! - refresh tokens rotate and a used one is refused (`invalid_grant`, AADSTS70000);
//!   [`Rotation::SpentWhenSuccessorUsed`] keeps it working until its successor is used,
//!   and a superseded token presented again is counted either way (`rotation`);
//! - a delegated grant gets a refresh token only when `offline_access` was asked for;
//! - scopes of more than one resource in one request → `invalid_scope` AADSTS700022;
//!   client credentials need a `…/.default` scope (AADSTS1002012);
//! - a token whose scopes name no `outlook.office.com`/`outlook.office365.com` resource
//!   (e.g. a bare `IMAP.AccessAsUser.All`, which Entra reads as Graph) is handed out but is
//!   not in the [`TokenBook`], so the mock upstreams reject it like Exchange does.
//!
//! Microsoft Graph's `sendMail` (MIME), for `send_via = "graph"`: see `graph`;
//! its tokens come from this token endpoint (a scope of
//! `https://graph.microsoft.com`, delegated or `/.default`).
//!
//! For real mail servers (the end-to-end suite runs it as `examples/test_idp.rs`):
//! - `POST /introspect` — RFC 7662 token introspection, form `token=…` →
//!   `{"active":true,"email":"<mailbox>",…}` or `{"active":false}`, as Dovecot's `oauth2`
//!   passdb asks it. An app-only (client credentials) token is reported as the mailbox
//!   set with [`MockIdp::set_app_mailbox`], and as inactive when none is set.
//! - `/control/…` — test-only hooks: `GET counts`, `GET refresh-tokens?mailbox=…`,
//!   `GET requests`, `GET secrets`, `GET graph-messages` (what the mock Graph accepted,
//!   each `{mailbox, token_user, mime_base64}`), `POST revoke` (form `mailbox=…`: every grant and
//!   access token of the mailbox), `POST revoke-access-tokens` (form `mailbox=…`: its
//!   access tokens only; the refresh token still works), `POST device-user` (form
//!   `mailbox=…`).
//! - `GET`/`POST /devicelogin` — the page where a person enters the device code,
//!   with [`DeviceOutcome::ApproveInBrowser`] (which also names it as the
//!   `verification_uri`): polls stay pending until the code is entered there.
//!
//! HTTP is served by hyper (`http`: the endpoint table, requests, responses);
//! every response carries `Connection: close`, one request per connection. The
//! endpoints live in `token`, `authorize` and `control`; Microsoft's error shape
//! in `aadsts`.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::tokens::TokenBook;

mod aadsts;
mod authorize;
mod control;
mod devicelogin;
mod graph;
mod http;
mod rotation;
mod token;

pub use graph::{GRAPH_MAX_REQUEST, GraphFault, GraphMessage};
pub use rotation::Rotation;

use token::{new_refresh_token, new_secret};

/// The scopes a delegated grant seeded by the test hooks carries.
pub const DEFAULT_DELEGATED_SCOPES: &str = "https://outlook.office.com/IMAP.AccessAsUser.All https://outlook.office.com/SMTP.Send offline_access";

/// What happens to a device code when the client polls for it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeviceOutcome {
    /// The first `n` polls get `authorization_pending`, the next one the tokens.
    ApproveAfterPolls(u32),
    /// First poll `slow_down`, second `authorization_pending`, third the tokens.
    SlowDownThenApprove,
    /// Every poll gets `authorization_declined`.
    Decline,
    /// Every poll gets `expired_token`.
    Expire,
    /// Polls get `authorization_pending` until someone enters the user code
    /// at this identity provider's `/devicelogin` page (a browser test).
    ApproveInBrowser,
}

/// How the token and device-code endpoints behave as a whole.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IdpMode {
    Normal,
    /// HTTP 503 with an HTML body.
    Unavailable,
    /// HTTP 200 with a body that is not JSON.
    Garbage,
    /// Read the request, never answer (the connection is held until the mock is dropped).
    Hang,
    /// Every token/device-code request answered with this AADSTS error.
    Error {
        status: u16,
        error: String,
        code: u32,
    },
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IdpCounts {
    /// Requests to the devicecode endpoint.
    pub device_code_requests: u32,
    /// Token requests with grant_type device_code (every poll, whatever its answer).
    pub device_polls: u32,
    /// Token requests with grant_type refresh_token (valid or not).
    pub refresh_grants: u32,
    pub client_credentials_grants: u32,
    pub authorization_code_grants: u32,
    /// Token/devicecode requests that got an error, a garbage body or no answer;
    /// `authorization_pending` and `slow_down` are not failures.
    pub failed: u32,
    /// Refresh tokens presented after a newer one took their place (a client
    /// that went back to an older grant); refused.
    pub superseded_refresh_tokens_presented: u32,
    /// Requests to the introspection endpoint (whatever their answer).
    pub introspections: u32,
    /// Introspections answered `"active": true`.
    pub introspections_active: u32,
}

/// An answer held by [`MockIdp::hold_next_answer`]; sent when released or dropped.
pub struct HeldAnswer(tokio::sync::oneshot::Sender<()>);

impl HeldAnswer {
    pub fn release(self) {
        let _ = self.0.send(());
    }
}

/// One request to the token or devicecode endpoint, as recorded (never the secret).
#[derive(Clone, Debug)]
pub struct TokenRequest {
    pub path: String,
    pub grant_type: Option<String>,
    pub client_id: Option<String>,
    pub scope: Option<String>,
    /// A client secret came with the request (form field or HTTP Basic).
    pub secret_presented: bool,
    /// The client authenticated with HTTP Basic.
    pub basic_auth: bool,
    /// The HTTP status answered; 0 while unanswered (delay, Hang).
    pub status: u16,
    /// The `error` of an error answer.
    pub error: Option<String>,
}

struct DeviceGrant {
    client_id: String,
    scope: String,
    expires_at: Instant,
    polls: u32,
    user_code: String,
    /// The user code was entered at `/devicelogin`.
    approved: bool,
}

#[derive(Clone)]
struct Grant {
    mailbox: String,
    client_id: Option<String>,
    scope: String,
}

struct CodeGrant {
    grant: Grant,
    redirect_uri: Option<String>,
    code_challenge: Option<(String, String)>,
}

struct Inner {
    clients: HashMap<String, Option<String>>,
    mode: IdpMode,
    delay: Duration,
    answer_delay: Duration,
    /// The next token answer waits until this resolves ([`MockIdp::hold_next_answer`]).
    held: Option<tokio::sync::oneshot::Receiver<()>>,
    in_flight: u32,
    lineage: rotation::Lineage,
    device_interval: u64,
    device_expires_in: u64,
    device_outcome: DeviceOutcome,
    device_user: String,
    access_lifetime: Duration,
    devices: HashMap<String, DeviceGrant>,
    refresh: HashMap<String, Grant>,
    codes: HashMap<String, CodeGrant>,
    redeemed_codes: HashSet<String>,
    counts: IdpCounts,
    requests: Vec<TokenRequest>,
    secrets: Vec<String>,
    app_mailbox: Option<String>,
    /// The Graph application permissions a client credentials token gets.
    graph_app_roles: Vec<String>,
    graph_sent: Vec<GraphMessage>,
    graph_faults: std::collections::VecDeque<GraphFault>,
    /// `sendMail` requests, whatever their answer.
    graph_requests: u32,
    /// Lower-cased mailbox → the `preferred_username` its ID tokens carry,
    /// when it is not the mailbox (a UPN other than the address).
    preferred_usernames: HashMap<String, String>,
    /// This identity provider's own address, for its `/devicelogin` page.
    base_url: String,
}

struct Shared {
    tokens: TokenBook,
    inner: Mutex<Inner>,
    /// Signalled after each `sendMail` answer.
    graph_changed: tokio::sync::Notify,
}

pub struct MockIdp {
    addr: SocketAddr,
    shared: Arc<Shared>,
    shutdown: watch::Sender<bool>,
}

impl Drop for MockIdp {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
    }
}

impl MockIdp {
    pub async fn start(tokens: TokenBook) -> MockIdp {
        Self::start_on(SocketAddr::from(([127, 0, 0, 1], 0)), tokens).await
    }

    /// Starts a mock IdP listening on `addr` (port 0: any free port).
    pub async fn start_on(addr: SocketAddr, tokens: TokenBook) -> MockIdp {
        let listener = TcpListener::bind(addr).await.expect("bind IdP");
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared {
            tokens,
            inner: Mutex::new(Inner {
                clients: HashMap::new(),
                mode: IdpMode::Normal,
                delay: Duration::ZERO,
                answer_delay: Duration::ZERO,
                held: None,
                in_flight: 0,
                lineage: rotation::Lineage::default(),
                device_interval: 1,
                device_expires_in: 900,
                device_outcome: DeviceOutcome::ApproveAfterPolls(2),
                device_user: "user@example.com".to_string(),
                access_lifetime: Duration::from_secs(3600),
                devices: HashMap::new(),
                refresh: HashMap::new(),
                codes: HashMap::new(),
                redeemed_codes: HashSet::new(),
                counts: IdpCounts::default(),
                requests: Vec::new(),
                secrets: Vec::new(),
                app_mailbox: None,
                graph_app_roles: vec!["Mail.Send".to_string()],
                graph_sent: Vec::new(),
                graph_faults: Default::default(),
                graph_requests: 0,
                preferred_usernames: HashMap::new(),
                base_url: format!("http://{addr}"),
            }),
            graph_changed: tokio::sync::Notify::new(),
        });
        let (shutdown, shutdown_rx) = watch::channel(false);
        tokio::spawn(http::serve(listener, shared.clone(), shutdown_rx));
        MockIdp {
            addr,
            shared,
            shutdown,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.shared.inner.lock().unwrap()
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn token_url(&self, tenant: &str) -> String {
        format!("{}/{tenant}/oauth2/v2.0/token", self.base_url())
    }

    pub fn device_code_url(&self, tenant: &str) -> String {
        format!("{}/{tenant}/oauth2/v2.0/devicecode", self.base_url())
    }

    pub fn authorize_url(&self, tenant: &str) -> String {
        format!("{}/{tenant}/oauth2/v2.0/authorize", self.base_url())
    }

    /// Registers an app: with a secret it is a confidential client (the secret is
    /// required on every token request), without one a public client.
    pub fn register_client(&self, client_id: &str, secret: Option<&str>) {
        let mut inner = self.lock();
        if let Some(secret) = secret {
            inner.secrets.push(secret.to_string());
        }
        inner
            .clients
            .insert(client_id.to_string(), secret.map(str::to_string));
    }

    pub fn set_device_interval(&self, secs: u64) {
        self.lock().device_interval = secs;
    }

    pub fn set_device_expires_in(&self, secs: u64) {
        self.lock().device_expires_in = secs;
    }

    /// Read at each poll (per device code, polls are counted from its first).
    pub fn set_device_outcome(&self, outcome: DeviceOutcome) {
        self.lock().device_outcome = outcome;
    }

    /// The mailbox whose grant a device-code (or authorize) approval creates.
    pub fn set_device_user(&self, mailbox: &str) {
        self.lock().device_user = mailbox.to_string();
    }

    pub fn set_access_token_lifetime(&self, lifetime: Duration) {
        self.lock().access_lifetime = lifetime;
    }

    /// The mailbox that introspection names for app-only (client credentials)
    /// tokens; `None`: such tokens are reported inactive.
    pub fn set_app_mailbox(&self, mailbox: Option<&str>) {
        self.lock().app_mailbox = mailbox.map(str::to_string);
    }

    pub fn set_mode(&self, mode: IdpMode) {
        self.lock().mode = mode;
    }

    /// Delays every token/devicecode answer by `delay` (the grant is processed after it).
    pub fn set_response_delay(&self, delay: Duration) {
        self.lock().delay = delay;
    }

    /// Delays every token/devicecode answer by `delay` after the grant is
    /// processed: a client that dies meanwhile has had its refresh token
    /// redeemed without seeing the new one.
    pub fn set_answer_delay(&self, delay: Duration) {
        self.lock().answer_delay = delay;
    }

    /// The next token/devicecode answer, once its grant is processed, waits
    /// until the returned [`HeldAnswer`] is released (or dropped): a client
    /// then holds its lock mid-refresh for as long as a test needs, and the
    /// answers after it are not held.
    pub fn hold_next_answer(&self) -> HeldAnswer {
        let (release, held) = tokio::sync::oneshot::channel();
        self.lock().held = Some(held);
        HeldAnswer(release)
    }

    /// When a redeemed refresh token stops working (see [`Rotation`]).
    pub fn set_rotation(&self, rotation: Rotation) {
        self.lock().lineage.rotation = rotation;
    }

    /// Token/devicecode requests received and not yet answered or dropped.
    pub fn requests_in_flight(&self) -> u32 {
        self.lock().in_flight
    }

    pub fn counts(&self) -> IdpCounts {
        self.lock().counts.clone()
    }

    pub fn requests(&self) -> Vec<TokenRequest> {
        self.lock().requests.clone()
    }

    /// Every refresh token, device code, authorization code and access token handed
    /// out, and every registered client secret.
    pub fn secrets_ever(&self) -> Vec<String> {
        self.lock().secrets.clone()
    }

    /// Seeds a delegated grant (default scopes, any client) and returns its refresh token.
    pub fn issue_refresh_token(&self, mailbox: &str) -> String {
        let mut inner = self.lock();
        let grant = Grant {
            mailbox: mailbox.to_string(),
            client_id: None,
            scope: DEFAULT_DELEGATED_SCOPES.to_string(),
        };
        new_refresh_token(&mut inner, grant)
    }

    /// The refresh tokens that are currently valid for `mailbox`.
    pub fn valid_refresh_tokens(&self, mailbox: &str) -> Vec<String> {
        self.lock()
            .refresh
            .iter()
            .filter(|(_, g)| g.mailbox.eq_ignore_ascii_case(mailbox))
            .map(|(t, _)| t.clone())
            .collect()
    }

    /// A single-use authorization code for `mailbox` (default scopes, any client, any
    /// redirect_uri, no PKCE binding).
    pub fn issue_authorization_code(&self, mailbox: &str) -> String {
        let mut inner = self.lock();
        let code = new_secret(&mut inner, "0.AUoA", 700);
        inner.codes.insert(
            code.clone(),
            CodeGrant {
                grant: Grant {
                    mailbox: mailbox.to_string(),
                    client_id: None,
                    scope: DEFAULT_DELEGATED_SCOPES.to_string(),
                },
                redirect_uri: None,
                code_challenge: None,
            },
        );
        code
    }

    /// ID tokens for `mailbox`'s grants name `username` (a user principal
    /// name other than the address) instead of the mailbox.
    pub fn set_preferred_username(&self, mailbox: &str, username: &str) {
        self.lock()
            .preferred_usernames
            .insert(mailbox.to_ascii_lowercase(), username.to_string());
    }

    /// Microsoft Graph's base URL here (`providers.NAME.graph_url`).
    pub fn graph_url(&self) -> String {
        self.base_url()
    }

    /// The Graph application permissions client credentials tokens carry
    /// (default `Mail.Send`).
    pub fn set_graph_app_roles(&self, roles: &[&str]) {
        self.lock().graph_app_roles = roles.iter().map(|r| r.to_string()).collect();
    }

    /// Answers the next `sendMail` with `fault` instead (faults queue up).
    pub fn push_graph_fault(&self, fault: GraphFault) {
        self.lock().graph_faults.push_back(fault);
    }

    /// Every message Graph accepted, in order.
    pub fn graph_messages(&self) -> Vec<GraphMessage> {
        self.lock().graph_sent.clone()
    }

    /// `sendMail` requests received, whatever their answer.
    pub fn graph_requests(&self) -> u32 {
        self.lock().graph_requests
    }

    /// Waits until Graph accepted at least `n` messages; panics after `timeout`.
    pub async fn wait_for_graph_messages(&self, n: usize, timeout: Duration) -> Vec<GraphMessage> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let changed = self.shared.graph_changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let sent = self.graph_messages();
            if sent.len() >= n {
                return sent;
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                panic!(
                    "mock Graph: waited {timeout:?} for {n} messages, got {}",
                    sent.len()
                );
            }
        }
    }

    /// Invalidates every refresh token of `mailbox` and revokes its access tokens.
    pub fn revoke_grants(&self, mailbox: &str) {
        self.lock()
            .refresh
            .retain(|_, g| !g.mailbox.eq_ignore_ascii_case(mailbox));
        self.shared.tokens.revoke_mailbox(mailbox);
    }
}
