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
//! - a delegated grant gets a refresh token only when `offline_access` was asked for;
//! - scopes of more than one resource in one request → `invalid_scope` AADSTS700022;
//!   client credentials need a `…/.default` scope (AADSTS1002012);
//! - a token whose scopes name no `outlook.office.com`/`outlook.office365.com` resource
//!   (e.g. a bare `IMAP.AccessAsUser.All`, which Entra reads as Graph) is handed out but is
//!   not in the [`TokenBook`], so the mock upstreams reject it like Exchange does.
//!
//! For real mail servers (the end-to-end suite runs it as `examples/test_idp.rs`):
//! - `POST /introspect` — RFC 7662 token introspection, form `token=…` →
//!   `{"active":true,"email":"<mailbox>",…}` or `{"active":false}`, as Dovecot's `oauth2`
//!   passdb asks it. An app-only (client credentials) token is reported as the mailbox
//!   set with [`MockIdp::set_app_mailbox`], and as inactive when none is set.
//! - `/control/…` — test-only hooks: `GET counts`, `GET refresh-tokens?mailbox=…`,
//!   `GET requests`, `GET secrets`, `POST revoke` (form `mailbox=…`: every grant and
//!   access token of the mailbox), `POST revoke-access-tokens` (form `mailbox=…`: its
//!   access tokens only; the refresh token still works), `POST device-user` (form
//!   `mailbox=…`).
//!
//! Every response carries `Connection: close`; one request per connection.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::tokens::{Subject, TokenBook, random_text};

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
    /// Requests to the introspection endpoint (whatever their answer).
    pub introspections: u32,
    /// Introspections answered `"active": true`.
    pub introspections_active: u32,
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
}

struct Shared {
    tokens: TokenBook,
    inner: Mutex<Inner>,
}

pub struct MockIdp {
    addr: SocketAddr,
    shared: Arc<Shared>,
    shutdown: watch::Sender<bool>,
}

/// Starts a mock IdP on `127.0.0.1:0` (same as [`MockIdp::start`]).
pub async fn start(tokens: TokenBook) -> MockIdp {
    MockIdp::start(tokens).await
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
            }),
        });
        let (shutdown, shutdown_rx) = watch::channel(false);
        let accept_shared = shared.clone();
        tokio::spawn(async move {
            let mut stop = shutdown_rx.clone();
            loop {
                tokio::select! {
                    _ = stop.changed() => break,
                    accepted = listener.accept() => {
                        let Ok((stream, _)) = accepted else { continue };
                        let shared = accept_shared.clone();
                        let stop = shutdown_rx.clone();
                        tokio::spawn(async move {
                            serve_connection(shared, stream, stop).await;
                        });
                    }
                }
            }
        });
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

    pub fn counts(&self) -> IdpCounts {
        self.lock().counts.clone()
    }

    /// Waits until `pred(counts)` holds and returns those counts. Panics after `timeout`.
    pub async fn wait_for_counts(
        &self,
        pred: impl Fn(&IdpCounts) -> bool,
        timeout: Duration,
    ) -> IdpCounts {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let counts = self.counts();
            if pred(&counts) {
                return counts;
            }
            if tokio::time::Instant::now() >= deadline {
                panic!("mock IdP: condition not reached in {timeout:?}; counts: {counts:?}");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
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

    /// Invalidates every refresh token of `mailbox` and revokes its access tokens.
    pub fn revoke_grants(&self, mailbox: &str) {
        self.lock()
            .refresh
            .retain(|_, g| !g.mailbox.eq_ignore_ascii_case(mailbox));
        self.shared.tokens.revoke_mailbox(mailbox);
    }
}

// ---------------------------------------------------------------------------
// HTTP plumbing

struct Request {
    method: String,
    target: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Request {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

struct Response {
    status: u16,
    content_type: &'static str,
    body: Vec<u8>,
    location: Option<String>,
}

impl Response {
    fn json(status: u16, value: &Value) -> Response {
        Response {
            status,
            content_type: "application/json; charset=utf-8",
            body: value.to_string().into_bytes(),
            location: None,
        }
    }

    fn text(status: u16, content_type: &'static str, body: &str) -> Response {
        Response {
            status,
            content_type,
            body: body.as_bytes().to_vec(),
            location: None,
        }
    }

    fn error_name(&self) -> Option<String> {
        if self.status < 400 {
            return None;
        }
        serde_json::from_slice::<Value>(&self.body)
            .ok()
            .and_then(|v| v.get("error").and_then(Value::as_str).map(str::to_string))
            .or_else(|| Some(format!("http_{}", self.status)))
    }
}

const MAX_HEAD: usize = 64 * 1024;
const MAX_BODY: usize = 1024 * 1024;

async fn read_request(stream: &mut TcpStream) -> Option<Request> {
    let mut buf = Vec::with_capacity(4096);
    let head_end = loop {
        if let Some(pos) = find(&buf, b"\r\n\r\n") {
            break pos;
        }
        if buf.len() > MAX_HEAD {
            return None;
        }
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let mut rest = buf[head_end + 4..].to_vec();
    let mut lines = head.split("\r\n");
    let mut first = lines.next()?.split(' ');
    let method = first.next()?.to_string();
    let target = first.next()?.to_string();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| {
            let (n, v) = l.split_once(':')?;
            Some((n.trim().to_string(), v.trim().to_string()))
        })
        .collect();
    let mut req = Request {
        method,
        target,
        headers,
        body: Vec::new(),
    };
    let chunked = req
        .header("transfer-encoding")
        .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
    if chunked {
        // Decode chunked framing: size line, data, CRLF; a zero size ends it.
        let mut body = Vec::new();
        loop {
            let line_end = loop {
                if let Some(p) = find(&rest, b"\r\n") {
                    break p;
                }
                read_more(stream, &mut rest).await?;
            };
            let size_text = String::from_utf8_lossy(&rest[..line_end]).to_string();
            let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
            rest.drain(..line_end + 2);
            if size == 0 {
                break;
            }
            if body.len() + size > MAX_BODY {
                return None;
            }
            while rest.len() < size + 2 {
                read_more(stream, &mut rest).await?;
            }
            body.extend_from_slice(&rest[..size]);
            rest.drain(..size + 2);
        }
        req.body = body;
    } else {
        let len: usize = req
            .header("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        if len > MAX_BODY {
            return None;
        }
        while rest.len() < len {
            read_more(stream, &mut rest).await?;
        }
        rest.truncate(len);
        req.body = rest;
    }
    Some(req)
}

async fn read_more(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Option<()> {
    let mut chunk = [0u8; 8192];
    let n = stream.read(&mut chunk).await.ok()?;
    if n == 0 {
        return None;
    }
    buf.extend_from_slice(&chunk[..n]);
    Some(())
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

async fn write_response(stream: &mut TcpStream, resp: &Response) {
    let reason = match resp.status {
        200 => "OK",
        302 => "Found",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Status",
    };
    let mut head = format!(
        "HTTP/1.1 {} {reason}\r\nContent-Type: {}\r\nContent-Length: {}\r\nCache-Control: no-store, no-cache\r\nPragma: no-cache\r\nx-ms-request-id: {}\r\nConnection: close\r\n",
        resp.status,
        resp.content_type,
        resp.body.len(),
        uuid()
    );
    if let Some(location) = &resp.location {
        head.push_str(&format!("Location: {location}\r\n"));
    }
    head.push_str("\r\n");
    let mut out = head.into_bytes();
    out.extend_from_slice(&resp.body);
    let _ = stream.write_all(&out).await;
    let _ = stream.flush().await;
    let _ = stream.shutdown().await;
}

async fn serve_connection(
    shared: Arc<Shared>,
    mut stream: TcpStream,
    mut stop: watch::Receiver<bool>,
) {
    let req = match tokio::time::timeout(Duration::from_secs(10), read_request(&mut stream)).await {
        Ok(Some(req)) => req,
        _ => return,
    };
    let (path, query) = match req.target.split_once('?') {
        Some((p, q)) => (p.to_string(), q.to_string()),
        None => (req.target.clone(), String::new()),
    };
    if let Some(resp) = test_hooks(&shared, &req, &path, &query) {
        write_response(&mut stream, &resp).await;
        return;
    }
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let endpoint = match segments.as_slice() {
        [tenant, "oauth2", "v2.0", ep] if !tenant.is_empty() => *ep,
        _ => "",
    };
    let resp = match (req.method.as_str(), endpoint) {
        ("POST", "token") | ("POST", "devicecode") => {
            match token_like(&shared, &req, &path, endpoint, &mut stop).await {
                Some(resp) => resp,
                None => {
                    // Hang: keep the connection open, unanswered, until the mock goes away.
                    let _ = stop.wait_for(|s| *s).await;
                    return;
                }
            }
        }
        ("GET", "authorize") => authorize(&shared, &query),
        (_, "token") | (_, "devicecode") | (_, "authorize") => Response::text(
            405,
            "text/html; charset=utf-8",
            "<html><body>Method not allowed</body></html>",
        ),
        _ => Response::text(
            404,
            "text/html; charset=utf-8",
            "<html><body>Not found</body></html>",
        ),
    };
    write_response(&mut stream, &resp).await;
}

/// The introspection endpoint and the control hooks; `None` for other paths.
fn test_hooks(shared: &Arc<Shared>, req: &Request, path: &str, query: &str) -> Option<Response> {
    let form = || parse_form(&String::from_utf8_lossy(&req.body));
    let resp = match (req.method.as_str(), path) {
        ("POST", "/introspect") => introspect(shared, &form()),
        ("GET", "/control/counts") => {
            let c = shared.inner.lock().unwrap().counts.clone();
            Response::json(
                200,
                &json!({
                    "device_code_requests": c.device_code_requests,
                    "device_polls": c.device_polls,
                    "refresh_grants": c.refresh_grants,
                    "client_credentials_grants": c.client_credentials_grants,
                    "authorization_code_grants": c.authorization_code_grants,
                    "failed": c.failed,
                    "introspections": c.introspections,
                    "introspections_active": c.introspections_active,
                }),
            )
        }
        ("GET", "/control/refresh-tokens") => {
            let q = parse_form(query);
            let mailbox = q.get("mailbox").cloned().unwrap_or_default();
            let inner = shared.inner.lock().unwrap();
            let valid: Vec<&String> = inner
                .refresh
                .iter()
                .filter(|(_, g)| g.mailbox.eq_ignore_ascii_case(&mailbox))
                .map(|(t, _)| t)
                .collect();
            Response::json(200, &json!({ "refresh_tokens": valid }))
        }
        ("GET", "/control/requests") => {
            let inner = shared.inner.lock().unwrap();
            let list: Vec<Value> = inner
                .requests
                .iter()
                .map(|r| {
                    json!({
                        "path": r.path,
                        "grant_type": r.grant_type,
                        "client_id": r.client_id,
                        "scope": r.scope,
                        "secret_presented": r.secret_presented,
                        "status": r.status,
                        "error": r.error,
                    })
                })
                .collect();
            Response::json(200, &json!({ "requests": list }))
        }
        ("GET", "/control/secrets") => {
            let mut all = shared.inner.lock().unwrap().secrets.clone();
            all.extend(shared.tokens.all_tokens());
            Response::json(200, &json!({ "secrets": all }))
        }
        ("POST", "/control/revoke") => match form().get("mailbox") {
            Some(mailbox) => {
                shared
                    .inner
                    .lock()
                    .unwrap()
                    .refresh
                    .retain(|_, g| !g.mailbox.eq_ignore_ascii_case(mailbox));
                shared.tokens.revoke_mailbox(mailbox);
                Response::json(200, &json!({ "revoked": mailbox }))
            }
            None => Response::json(400, &json!({ "error": "form field `mailbox` missing" })),
        },
        ("POST", "/control/revoke-access-tokens") => match form().get("mailbox") {
            Some(mailbox) => {
                shared.tokens.revoke_mailbox(mailbox);
                Response::json(200, &json!({ "revoked_access_tokens": mailbox }))
            }
            None => Response::json(400, &json!({ "error": "form field `mailbox` missing" })),
        },
        ("POST", "/control/device-user") => match form().get("mailbox") {
            Some(mailbox) => {
                shared.inner.lock().unwrap().device_user = mailbox.clone();
                Response::json(200, &json!({ "device_user": mailbox }))
            }
            None => Response::json(400, &json!({ "error": "form field `mailbox` missing" })),
        },
        (_, "/introspect") => Response::text(
            405,
            "text/html; charset=utf-8",
            "<html><body>Method not allowed</body></html>",
        ),
        _ if path.starts_with("/control/") => Response::text(
            404,
            "text/html; charset=utf-8",
            "<html><body>Not found</body></html>",
        ),
        _ => return None,
    };
    Some(resp)
}

/// RFC 7662: is the token active, and whose mailbox may it open (`email`, which
/// Dovecot compares with the `user=` of the XOAUTH2 string).
fn introspect(shared: &Arc<Shared>, form: &HashMap<String, String>) -> Response {
    let found = form
        .get("token")
        .and_then(|t| shared.tokens.lookup(t.trim()));
    let mut inner = shared.inner.lock().unwrap();
    inner.counts.introspections += 1;
    let mailbox = match found {
        Some((Subject::Mailbox(m), left)) => Some((m, left)),
        Some((Subject::App, left)) => inner.app_mailbox.clone().map(|m| (m, left)),
        None => None,
    };
    let Some((mailbox, left)) = mailbox else {
        return Response::json(200, &json!({ "active": false }));
    };
    inner.counts.introspections_active += 1;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    Response::json(
        200,
        &json!({
            "active": true,
            "email": mailbox,
            "sub": mailbox,
            "token_type": "Bearer",
            "exp": now + left.as_secs(),
            "iat": now,
        }),
    )
}

/// Handles a token or devicecode request; `None` means "never answer" (Hang).
async fn token_like(
    shared: &Arc<Shared>,
    req: &Request,
    path: &str,
    endpoint: &str,
    stop: &mut watch::Receiver<bool>,
) -> Option<Response> {
    let form = parse_form(&String::from_utf8_lossy(&req.body));
    let basic = basic_credentials(req);
    let grant_type = form.get("grant_type").cloned();
    let client_id = form
        .get("client_id")
        .cloned()
        .or_else(|| basic.as_ref().map(|(id, _)| id.clone()));
    let secret_presented =
        form.contains_key("client_secret") || basic.as_ref().is_some_and(|(_, s)| !s.is_empty());

    let (index, mode, delay) = {
        let mut inner = shared.inner.lock().unwrap();
        if endpoint == "devicecode" {
            inner.counts.device_code_requests += 1;
        } else {
            match grant_type.as_deref() {
                Some("urn:ietf:params:oauth:grant-type:device_code") => {
                    inner.counts.device_polls += 1
                }
                Some("refresh_token") => inner.counts.refresh_grants += 1,
                Some("client_credentials") => inner.counts.client_credentials_grants += 1,
                Some("authorization_code") => inner.counts.authorization_code_grants += 1,
                _ => {}
            }
        }
        inner.requests.push(TokenRequest {
            path: path.to_string(),
            grant_type: if endpoint == "devicecode" {
                None
            } else {
                grant_type.clone()
            },
            client_id: client_id.clone(),
            scope: form.get("scope").cloned(),
            secret_presented,
            basic_auth: basic.is_some(),
            status: 0,
            error: None,
        });
        (inner.requests.len() - 1, inner.mode.clone(), inner.delay)
    };

    if mode == IdpMode::Hang {
        shared.inner.lock().unwrap().counts.failed += 1;
        return None;
    }
    if !delay.is_zero() {
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stop.wait_for(|s| *s) => return None,
        }
    }

    let resp = match mode {
        IdpMode::Hang => unreachable!(),
        IdpMode::Unavailable => Response::text(
            503,
            "text/html; charset=utf-8",
            "<!DOCTYPE html><html><head><title>Service Unavailable</title></head><body><h2>Service Unavailable</h2><hr><p>HTTP Error 503. The service is unavailable.</p></body></html>",
        ),
        IdpMode::Garbage => Response::text(
            200,
            "text/html; charset=utf-8",
            "<html><head><title>Sign in to your account</title></head><body>Working...</body></html>",
        ),
        IdpMode::Error {
            status,
            error,
            code,
        } => aad_error(
            status,
            &error,
            code,
            &default_text(code, client_id.as_deref().unwrap_or("")),
        ),
        IdpMode::Normal => {
            let mut inner = shared.inner.lock().unwrap();
            let outcome = if endpoint == "devicecode" {
                device_authorization(&mut inner, &form, client_id.as_deref(), basic.as_ref())
            } else {
                token_grant(
                    &shared.tokens,
                    &mut inner,
                    &form,
                    client_id.as_deref(),
                    basic.as_ref(),
                )
            };
            outcome.unwrap_or_else(|e| e)
        }
    };

    let garbage =
        matches!(resp.status, 200) && serde_json::from_slice::<Value>(&resp.body).is_err();
    let error = resp.error_name();
    let mut inner = shared.inner.lock().unwrap();
    let benign = matches!(
        error.as_deref(),
        Some("authorization_pending") | Some("slow_down")
    );
    if (error.is_some() && !benign) || garbage {
        inner.counts.failed += 1;
    }
    if let Some(r) = inner.requests.get_mut(index) {
        r.status = resp.status;
        r.error = error;
    }
    Some(resp)
}

type Basic = (String, String);

fn basic_credentials(req: &Request) -> Option<Basic> {
    let value = req.header("authorization")?;
    let (scheme, b64) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let raw = base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .ok()?;
    let raw = String::from_utf8(raw).ok()?;
    let (id, secret) = raw.split_once(':')?;
    Some((url_decode(id), url_decode(secret)))
}

/// Client authentication: `Ok(true)` for a confidential client that proved itself
/// with its secret, `Ok(false)` for a public client (or, where the secret is not
/// required, a confidential client that sent none).
fn authenticate_client(
    inner: &Inner,
    form: &HashMap<String, String>,
    client_id: Option<&str>,
    basic: Option<&Basic>,
    require_secret_for_confidential: bool,
) -> Result<bool, Response> {
    let Some(client_id) = client_id else {
        return Err(aad_error(
            400,
            "invalid_request",
            900144,
            "The request body must contain the following parameter: 'client_id'.",
        ));
    };
    if let (Some(form_id), Some((basic_id, _))) = (form.get("client_id"), basic)
        && form_id != basic_id
    {
        return Err(aad_error(
            400,
            "invalid_request",
            900144,
            "The client_id in the request body does not match the client_id in the Authorization header.",
        ));
    }
    let Some(registered) = inner.clients.get(client_id) else {
        return Err(aad_error(
            400,
            "unauthorized_client",
            700016,
            &default_text(700016, client_id),
        ));
    };
    let presented = form
        .get("client_secret")
        .cloned()
        .or_else(|| basic.map(|(_, s)| s.clone()))
        .filter(|s| !s.is_empty());
    match (registered, presented) {
        (Some(expected), Some(got)) => {
            if &got == expected {
                Ok(true)
            } else {
                Err(aad_error(
                    401,
                    "invalid_client",
                    7000215,
                    &default_text(7000215, client_id),
                ))
            }
        }
        (Some(_), None) => {
            if require_secret_for_confidential {
                Err(aad_error(
                    401,
                    "invalid_client",
                    7000218,
                    &default_text(7000218, client_id),
                ))
            } else {
                Ok(false)
            }
        }
        (None, Some(_)) => {
            if require_secret_for_confidential {
                Err(aad_error(
                    401,
                    "invalid_client",
                    700025,
                    &default_text(700025, client_id),
                ))
            } else {
                Ok(false)
            }
        }
        (None, None) => Ok(false),
    }
}

fn device_authorization(
    inner: &mut Inner,
    form: &HashMap<String, String>,
    client_id: Option<&str>,
    basic: Option<&Basic>,
) -> Result<Response, Response> {
    // The devicecode endpoint does not require the secret, but a wrong one is refused.
    authenticate_client(inner, form, client_id, basic, false)?;
    let client_id = client_id.unwrap_or_default().to_string();
    let scope = form.get("scope").cloned().unwrap_or_default();
    if scope.trim().is_empty() {
        return Err(aad_error(
            400,
            "invalid_request",
            900144,
            "The request body must contain the following parameter: 'scope'.",
        ));
    }
    check_scope(&scope, false)?;
    let device_code = new_secret(inner, "DAQABIQEAAADW6jl31mB3T7ugrWTT8pFe", 260);
    let user_code: String = random_text(9)
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                'K'
            }
        })
        .collect();
    let expires_in = inner.device_expires_in;
    inner.devices.insert(
        device_code.clone(),
        DeviceGrant {
            client_id,
            scope,
            expires_at: Instant::now() + Duration::from_secs(expires_in),
            polls: 0,
        },
    );
    Ok(Response::json(
        200,
        &json!({
            "user_code": user_code,
            "device_code": device_code,
            "verification_uri": "https://microsoft.com/devicelogin",
            "expires_in": expires_in,
            "interval": inner.device_interval,
            "message": format!("To sign in, use a web browser to open the page https://microsoft.com/devicelogin and enter the code {user_code} to authenticate."),
        }),
    ))
}

fn token_grant(
    tokens: &TokenBook,
    inner: &mut Inner,
    form: &HashMap<String, String>,
    client_id: Option<&str>,
    basic: Option<&Basic>,
) -> Result<Response, Response> {
    let grant_type = form.get("grant_type").map(String::as_str).unwrap_or("");
    if grant_type.is_empty() {
        return Err(aad_error(
            400,
            "invalid_request",
            900144,
            "The request body must contain the following parameter: 'grant_type'.",
        ));
    }
    let confidential = authenticate_client(inner, form, client_id, basic, true)?;
    let client_id = client_id.unwrap_or_default().to_string();
    match grant_type {
        "urn:ietf:params:oauth:grant-type:device_code" => {
            let Some(code) = form.get("device_code") else {
                return Err(aad_error(
                    400,
                    "invalid_request",
                    900144,
                    "The request body must contain the following parameter: 'device_code'.",
                ));
            };
            let outcome = inner.device_outcome.clone();
            let Some(device) = inner.devices.get_mut(code) else {
                return Err(aad_error(
                    400,
                    "invalid_grant",
                    70000,
                    "The provided value for the 'device_code' is not valid. The device code may have already been redeemed.",
                ));
            };
            if device.client_id != client_id {
                return Err(aad_error(
                    400,
                    "invalid_grant",
                    70000,
                    "The provided value for the 'device_code' is not valid. It was issued to a different client.",
                ));
            }
            if Instant::now() >= device.expires_at {
                return Err(aad_error(
                    400,
                    "expired_token",
                    70019,
                    &default_text(70019, ""),
                ));
            }
            device.polls += 1;
            let poll = device.polls;
            let pending = || {
                aad_error(
                    400,
                    "authorization_pending",
                    70016,
                    &default_text(70016, ""),
                )
            };
            match outcome {
                DeviceOutcome::ApproveAfterPolls(n) if poll <= n => return Err(pending()),
                DeviceOutcome::SlowDownThenApprove if poll == 1 => {
                    return Err(aad_error(
                        400,
                        "slow_down",
                        70016,
                        "OAuth 2.0 device flow error. Polling too frequently; slow down.",
                    ));
                }
                DeviceOutcome::SlowDownThenApprove if poll == 2 => return Err(pending()),
                DeviceOutcome::Decline => {
                    return Err(aad_error(
                        400,
                        "authorization_declined",
                        65004,
                        &default_text(65004, ""),
                    ));
                }
                DeviceOutcome::Expire => {
                    return Err(aad_error(
                        400,
                        "expired_token",
                        70019,
                        &default_text(70019, ""),
                    ));
                }
                _ => {}
            }
            let device = inner.devices.remove(code).unwrap();
            let grant = Grant {
                mailbox: inner.device_user.clone(),
                client_id: Some(client_id),
                scope: device.scope,
            };
            Ok(delegated_tokens(tokens, inner, grant, None))
        }
        "refresh_token" => {
            let Some(rt) = form.get("refresh_token") else {
                return Err(aad_error(
                    400,
                    "invalid_request",
                    900144,
                    "The request body must contain the following parameter: 'refresh_token'.",
                ));
            };
            let valid = inner
                .refresh
                .get(rt)
                .is_some_and(|g| g.client_id.as_deref().is_none_or(|c| c == client_id));
            if !valid {
                return Err(aad_error(
                    400,
                    "invalid_grant",
                    70000,
                    &default_text(70000, ""),
                ));
            }
            let requested = form.get("scope").cloned().filter(|s| !s.trim().is_empty());
            if let Some(scope) = &requested {
                check_scope(scope, false)?;
            }
            let mut grant = inner.refresh.remove(rt).unwrap();
            grant.client_id = Some(client_id);
            // The new refresh token keeps the grant's scopes (offline_access included).
            Ok(delegated_tokens(tokens, inner, grant, requested))
        }
        "client_credentials" => {
            if !confidential {
                return Err(aad_error(
                    401,
                    "invalid_client",
                    7000218,
                    &default_text(7000218, &client_id),
                ));
            }
            let scope = form.get("scope").cloned().unwrap_or_default();
            if scope.trim().is_empty() {
                return Err(aad_error(
                    400,
                    "invalid_request",
                    900144,
                    "The request body must contain the following parameter: 'scope'.",
                ));
            }
            check_scope(&scope, true)?;
            let lifetime = inner.access_lifetime;
            let access = if targets_exchange(&scope) {
                tokens.issue(Subject::App, lifetime)
            } else {
                foreign_token()
            };
            inner.secrets.push(access.clone());
            let secs = lifetime_secs(lifetime);
            Ok(Response::json(
                200,
                &json!({
                    "token_type": "Bearer",
                    "expires_in": secs,
                    "ext_expires_in": secs,
                    "access_token": access,
                }),
            ))
        }
        "authorization_code" => {
            let Some(code) = form.get("code") else {
                return Err(aad_error(
                    400,
                    "invalid_request",
                    900144,
                    "The request body must contain the following parameter: 'code'.",
                ));
            };
            if inner.redeemed_codes.contains(code) {
                return Err(aad_error(
                    400,
                    "invalid_grant",
                    54005,
                    &default_text(54005, ""),
                ));
            }
            let Some(entry) = inner.codes.get(code) else {
                return Err(aad_error(
                    400,
                    "invalid_grant",
                    70000,
                    "The provided value for the 'code' parameter is not valid.",
                ));
            };
            if entry
                .grant
                .client_id
                .as_deref()
                .is_some_and(|c| c != client_id)
            {
                return Err(aad_error(
                    400,
                    "invalid_grant",
                    70000,
                    "The provided value for the 'code' parameter is not valid. The code was issued to a different client.",
                ));
            }
            if let Some(expected) = &entry.redirect_uri
                && form.get("redirect_uri") != Some(expected)
            {
                return Err(aad_error(
                    400,
                    "invalid_grant",
                    50011,
                    &default_text(50011, &client_id),
                ));
            }
            if let Some((challenge, method)) = &entry.code_challenge {
                let verifier = form.get("code_verifier").cloned().unwrap_or_default();
                let computed = if method.eq_ignore_ascii_case("S256") {
                    use sha2::Digest;
                    base64::engine::general_purpose::URL_SAFE_NO_PAD
                        .encode(sha2::Sha256::digest(verifier.as_bytes()))
                } else {
                    verifier.clone()
                };
                if verifier.is_empty() || &computed != challenge {
                    return Err(aad_error(
                        400,
                        "invalid_grant",
                        501481,
                        &default_text(501481, ""),
                    ));
                }
            }
            let entry = inner.codes.remove(code).unwrap();
            inner.redeemed_codes.insert(code.clone());
            let mut grant = entry.grant;
            grant.client_id = Some(client_id);
            Ok(delegated_tokens(tokens, inner, grant, None))
        }
        other => Err(aad_error(
            400,
            "unsupported_grant_type",
            70003,
            &format!("The app requested an unsupported grant type '{other}'."),
        )),
    }
}

/// Issues an access token (and a refresh token if the grant has offline_access).
fn delegated_tokens(
    tokens: &TokenBook,
    inner: &mut Inner,
    grant: Grant,
    requested_scope: Option<String>,
) -> Response {
    let scope = requested_scope.unwrap_or_else(|| grant.scope.clone());
    let lifetime = inner.access_lifetime;
    let access = if targets_exchange(&scope) {
        tokens.issue(Subject::Mailbox(grant.mailbox.clone()), lifetime)
    } else {
        foreign_token()
    };
    inner.secrets.push(access.clone());
    let granted: Vec<&str> = scope
        .split_whitespace()
        .filter(|s| !s.eq_ignore_ascii_case("offline_access"))
        .collect();
    let secs = lifetime_secs(lifetime);
    let mut body = json!({
        "token_type": "Bearer",
        "scope": granted.join(" "),
        "expires_in": secs,
        "ext_expires_in": secs,
        "access_token": access,
    });
    let offline = grant
        .scope
        .split_whitespace()
        .any(|s| s.eq_ignore_ascii_case("offline_access"));
    if offline {
        let rt = new_refresh_token(inner, grant);
        body["refresh_token"] = Value::String(rt);
    }
    Response::json(200, &body)
}

fn new_refresh_token(inner: &mut Inner, grant: Grant) -> String {
    let rt = new_secret(inner, "0.AXEAk9", 900);
    inner.refresh.insert(rt.clone(), grant);
    rt
}

fn new_secret(inner: &mut Inner, prefix: &str, len: usize) -> String {
    let s = format!("{prefix}{}", random_text(len));
    inner.secrets.push(s.clone());
    s
}

/// A token for some other resource (Graph): valid-looking, but not in the book.
fn foreign_token() -> String {
    format!("eyJ0eXAi.{}", random_text(1800))
}

fn lifetime_secs(lifetime: Duration) -> u64 {
    lifetime.as_secs().max(1)
}

/// The resource a scope belongs to; `None` for OpenID scopes.
fn scope_resource(scope: &str) -> Option<String> {
    let lower = scope.to_ascii_lowercase();
    if ["openid", "profile", "email", "offline_access"].contains(&lower.as_str()) {
        return None;
    }
    if lower.contains("://") {
        let cut = lower.rfind('/').unwrap_or(lower.len());
        Some(lower[..cut].to_string())
    } else {
        // A bare scope name means Microsoft Graph.
        Some("https://graph.microsoft.com".to_string())
    }
}

fn targets_exchange(scope: &str) -> bool {
    scope
        .split_whitespace()
        .filter_map(scope_resource)
        .any(|r| r == "https://outlook.office.com" || r == "https://outlook.office365.com")
}

fn check_scope(scope: &str, client_credentials: bool) -> Result<(), Response> {
    let resources: HashSet<String> = scope
        .split_whitespace()
        .filter_map(scope_resource)
        .collect();
    if resources.len() > 1 {
        return Err(aad_error(
            400,
            "invalid_scope",
            700022,
            &format!(
                "The provided value for the input parameter scope is not valid because it contains more than one resource. Scope {scope} is not valid."
            ),
        ));
    }
    if client_credentials {
        let all_default = scope
            .split_whitespace()
            .all(|s| s.to_ascii_lowercase().ends_with("/.default"));
        if !all_default {
            return Err(aad_error(
                400,
                "invalid_scope",
                1002012,
                &format!(
                    "The provided value for scope {scope} is not valid. Client credential flows must have a scope value with /.default suffixed to the resource identifier (application ID URI)."
                ),
            ));
        }
    }
    Ok(())
}

fn authorize(shared: &Arc<Shared>, query: &str) -> Response {
    let q = parse_form(query);
    let mut inner = shared.inner.lock().unwrap();
    let page = |status: u16, text: &str| {
        Response::text(
            status,
            "text/html; charset=utf-8",
            &format!("<html><body><h1>Sign in</h1><p>{text}</p></body></html>"),
        )
    };
    let Some(client_id) = q.get("client_id") else {
        return page(
            400,
            "AADSTS900144: The request body must contain the following parameter: 'client_id'.",
        );
    };
    if !inner.clients.contains_key(client_id) {
        return page(
            400,
            &format!("AADSTS{}: {}", 700016, default_text(700016, client_id)),
        );
    }
    let Some(redirect_uri) = q.get("redirect_uri").cloned() else {
        return page(
            400,
            "AADSTS900144: The request body must contain the following parameter: 'redirect_uri'.",
        );
    };
    if q.get("response_type").map(String::as_str) != Some("code") {
        return page(
            400,
            "AADSTS900144: The request body must contain the following parameter: 'response_type'.",
        );
    }
    let state = q.get("state").cloned();
    let sep = if redirect_uri.contains('?') { '&' } else { '?' };
    let mut location = if inner.device_outcome == DeviceOutcome::Decline {
        format!(
            "{redirect_uri}{sep}error=access_denied&error_description={}",
            url_encode(&format!("AADSTS65004: {}", default_text(65004, "")))
        )
    } else {
        let scope = q
            .get("scope")
            .cloned()
            .unwrap_or_else(|| DEFAULT_DELEGATED_SCOPES.to_string());
        let code = new_secret(&mut inner, "0.AUoA", 700);
        let challenge = q.get("code_challenge").cloned().map(|c| {
            let method = q
                .get("code_challenge_method")
                .cloned()
                .unwrap_or_else(|| "plain".to_string());
            (c, method)
        });
        let grant = Grant {
            mailbox: inner.device_user.clone(),
            client_id: Some(client_id.clone()),
            scope,
        };
        inner.codes.insert(
            code.clone(),
            CodeGrant {
                grant,
                redirect_uri: Some(redirect_uri.clone()),
                code_challenge: challenge,
            },
        );
        format!("{redirect_uri}{sep}code={}", url_encode(&code))
    };
    if let Some(state) = state {
        location.push_str(&format!("&state={}", url_encode(&state)));
    }
    location.push_str(&format!("&session_state={}", uuid()));
    let mut resp = page(302, "Redirecting");
    resp.location = Some(location);
    resp
}

// ---------------------------------------------------------------------------
// Microsoft's error shape

fn aad_error(status: u16, error: &str, code: u32, text: &str) -> Response {
    let trace = uuid();
    let correlation = uuid();
    let timestamp = utc_timestamp();
    Response::json(
        status,
        &json!({
            "error": error,
            "error_description": format!("AADSTS{code}: {text}\r\nTrace ID: {trace}\r\nCorrelation ID: {correlation}\r\nTimestamp: {timestamp}"),
            "error_codes": [code],
            "timestamp": timestamp,
            "trace_id": trace,
            "correlation_id": correlation,
            "error_uri": format!("https://login.microsoftonline.com/error?code={code}"),
        }),
    )
}

/// Realistic description text for the AADSTS codes the proxy is expected to know.
pub fn default_text(code: u32, client_id: &str) -> String {
    match code {
        50011 => format!("The redirect URI specified in the request does not match the redirect URIs configured for the application '{client_id}'. Make sure the redirect URI sent in the request matches one added to your application in the Azure portal."),
        50076 => "Due to a configuration change made by your administrator, or because you moved to a new location, you must use multi-factor authentication to access '00000002-0000-0ff1-ce00-000000000000'.".to_string(),
        50173 => "The provided grant has expired due to it being revoked, a fresh auth token is needed. The user might have changed or reset their password.".to_string(),
        54005 => "OAuth2 Authorization code was already redeemed, please retry with a new valid code or use an existing refresh token.".to_string(),
        65001 => format!("The user or administrator has not consented to use the application with ID '{client_id}' named 'xoauth2-proxy'. Send an interactive authorization request for this user and resource."),
        65004 => "User declined to consent to access the app.".to_string(),
        70000 => "The provided value for the 'refresh_token' is not valid. The refresh token has been revoked, has already been used or was issued to another client.".to_string(),
        70008 => "The provided authorization code or refresh token has expired due to inactivity. Send a new interactive authorization request for this user and resource.".to_string(),
        70016 => "OAuth 2.0 device flow error. Authorization is pending. Continue polling.".to_string(),
        70019 => "Verification code expired.".to_string(),
        90002 => "Tenant not found. Check to make sure you have the correct tenant ID and are signing into the correct cloud.".to_string(),
        700016 => format!("Application with identifier '{client_id}' was not found in the directory 'Contoso'. This can happen if the application has not been installed by the administrator of the tenant or consented to by any user in the tenant. You may have sent your authentication request to the wrong tenant."),
        700022 => "The provided value for the input parameter scope is not valid because it contains more than one resource.".to_string(),
        700025 => "Client is public so neither 'client_assertion' nor 'client_secret' should be presented.".to_string(),
        700082 => "The refresh token has expired due to inactivity. The token was issued on 2024-01-01T00:00:00.0000000Z and was inactive for 90.00:00:00.".to_string(),
        501481 => "The Code_Verifier does not match the code_challenge supplied in the authorization request.".to_string(),
        7000215 => format!("Invalid client secret provided. Ensure the secret being sent in the request is the client secret value, not the client secret ID, for a secret added to app '{client_id}'."),
        7000218 => "The request body must contain the following parameter: 'client_assertion' or 'client_secret'.".to_string(),
        7000222 => format!("The provided client secret keys for app '{client_id}' are expired. Visit the Azure portal to create new keys for your app: https://aka.ms/NewClientSecret, or consider using certificate credentials for added security: https://aka.ms/certCreds."),
        _ => "The request could not be completed.".to_string(),
    }
}

// ---------------------------------------------------------------------------
// small helpers

fn parse_form(s: &str) -> HashMap<String, String> {
    s.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (url_decode(k), url_decode(v)),
            None => (url_decode(p), String::new()),
        })
        .collect()
}

fn url_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = |c: u8| (c as char).to_digit(16);
                match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                    (Some(h), Some(l)) => {
                        out.push((h * 16 + l) as u8);
                        i += 2;
                    }
                    _ => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).to_string()
}

fn url_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn uuid() -> String {
    let hex = |n: usize| -> String {
        use rand::Rng;
        let mut rng = rand::rng();
        (0..n)
            .map(|_| char::from_digit(rng.random_range(0..16), 16).unwrap())
            .collect()
    };
    format!("{}-{}-4{}-a{}-{}", hex(8), hex(4), hex(3), hex(3), hex(12))
}

/// `YYYY-MM-DD HH:MM:SSZ`, as Entra writes it.
fn utc_timestamp() -> String {
    let t = crate::dates::utc_now();
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}Z",
        t.year, t.month, t.day, t.hour, t.minute, t.second
    )
}
