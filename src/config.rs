//! The configuration file: its TOML model, defaults, and validation.
//!
//! Key names are public interface (see the README's config reference): users'
//! files depend on them, so keys are added, never renamed. Every problem is
//! reported as one sentence naming the file, the key and what is wrong, and the
//! process does not start with a config it could not fully check.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::secret::Secret;

/// The default IMAP listener: loopback only.
pub const DEFAULT_IMAP_LISTEN: &str = "127.0.0.1:1143";
/// The default SMTP listener: loopback only.
pub const DEFAULT_SMTP_LISTEN: &str = "127.0.0.1:1587";
/// The default admin (health and metrics) listener: loopback only.
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:8025";

/// Scopes for the delegated flows (device code, authorization code). Fully
/// qualified: a bare `IMAP.AccessAsUser.All` yields a Graph token that
/// Exchange rejects, and Graph scopes may not be mixed in (AADSTS700022).
///
/// `openid` and `profile` bring an ID token with the token response, whose
/// `preferred_username` names the user who signed in: SMTP must log in as
/// that user (the delegate) when the mailbox is a shared one.
pub const DELEGATED_SCOPES: &[&str] = &[
    "https://outlook.office.com/IMAP.AccessAsUser.All",
    "https://outlook.office.com/SMTP.Send",
    "offline_access",
    "openid",
    "profile",
];
/// Scope for the client credentials (app-only) flow.
pub const APP_ONLY_SCOPES: &[&str] = &["https://outlook.office365.com/.default"];
/// Microsoft Graph, where `sendMail` lives (`providers.NAME.graph_url`).
pub const DEFAULT_GRAPH_URL: &str = "https://graph.microsoft.com";

/// A configuration problem, already phrased for the user.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(String);

impl ConfigError {
    fn at(file: &Path, key: &str, what: impl fmt::Display) -> Self {
        ConfigError(format!("config {}: `{key}`: {what}", file.display()))
    }
}

/// The whole configuration, validated.
#[derive(Debug, Clone)]
pub struct Config {
    pub path: PathBuf,
    pub server: ServerSection,
    pub imap: ImapSection,
    pub smtp: SmtpSection,
    pub admin: AdminSection,
    /// TLS towards the clients; `None` keeps every listener plain.
    pub tls: Option<TlsSection>,
    /// Where grants are kept: files under the state directory, or PostgreSQL.
    pub store: StoreSection,
    pub providers: BTreeMap<String, Provider>,
    pub accounts: Vec<Account>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerSection {
    /// Where tokens live. Default: `$XOAUTH2_PROXY_STATE_DIR`, else the
    /// platform data directory.
    pub state_dir: Option<PathBuf>,
    /// Wait before answering a wrong password, to slow down guessing.
    #[serde(with = "humantime_serde")]
    pub auth_failure_delay: Duration,
    /// A client must have logged in within this long of connecting, whatever
    /// it sends meanwhile, or it is closed.
    #[serde(with = "humantime_serde")]
    pub login_timeout: Duration,
    /// Connecting to an upstream server, TLS and authentication included.
    #[serde(with = "humantime_serde")]
    pub upstream_timeout: Duration,
    /// One request to the identity provider.
    #[serde(with = "humantime_serde")]
    pub idp_timeout: Duration,
    /// Client connections open at once, across all listeners.
    pub max_connections: usize,
    /// On SIGTERM, how long live sessions may go on before they are closed.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// Connections from one client address that have not logged in yet.
    pub max_prelogin_per_address: usize,
    /// Failed logins from one address for one username before that address
    /// is throttled for that username.
    pub max_failed_logins: u32,
    /// Failed logins from one address, whatever the username, before the
    /// address is throttled for every username.
    pub max_failed_logins_per_address: u32,
    /// The longest a throttled address waits before it may try again.
    #[serde(with = "humantime_serde")]
    pub throttle_max_delay: Duration,
    /// Password hashings (argon2) run at once; 0 means one per CPU core.
    pub password_checks: usize,
    /// Logins waiting for a hashing slot; past it a login is told to retry.
    pub password_check_queue: usize,
    /// The 32-byte key that seals grant files at rest
    /// (`$XOAUTH2_PROXY_TOKEN_KEY_FILE` wins over it).
    pub token_key_file: Option<PathBuf>,
    /// A delegated grant not refreshed for this long is refreshed in the
    /// background, so that it does not expire unused; 0 turns it off.
    #[serde(with = "humantime_serde")]
    pub grant_keepalive: Duration,
}

impl Default for ServerSection {
    fn default() -> Self {
        ServerSection {
            state_dir: None,
            auth_failure_delay: Duration::from_secs(1),
            login_timeout: Duration::from_secs(60),
            upstream_timeout: Duration::from_secs(30),
            idp_timeout: Duration::from_secs(30),
            max_connections: 4096,
            shutdown_grace: Duration::from_secs(30),
            max_prelogin_per_address: 256,
            max_failed_logins: 5,
            max_failed_logins_per_address: 20,
            throttle_max_delay: Duration::from_secs(15 * 60),
            password_checks: 0,
            password_check_queue: 64,
            token_key_file: None,
            grant_keepalive: Duration::from_secs(7 * 24 * 3600),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ImapSection {
    pub listen: SocketAddr,
    /// IMAP over TLS from the first byte (IMAPS); only with `[tls]`.
    pub tls_listen: Option<SocketAddr>,
    /// Offer STARTTLS on `listen` (when `[tls]` is present).
    pub starttls: bool,
    /// No login on `listen` before STARTTLS.
    pub require_tls: bool,
    /// Authenticated upstream sessions kept ready per account that logged
    /// in recently; 0 turns warm sessions off.
    pub warm_sessions: usize,
    /// Warm sessions of an account close after this long without a login.
    #[serde(with = "humantime_serde")]
    pub warm_idle_timeout: Duration,
    /// Upstream IMAP connections per mailbox at most, warm ones included.
    pub max_connections_per_mailbox: usize,
}

impl Default for ImapSection {
    fn default() -> Self {
        ImapSection {
            listen: DEFAULT_IMAP_LISTEN.parse().expect("valid default"),
            tls_listen: None,
            starttls: true,
            require_tls: false,
            warm_sessions: 1,
            warm_idle_timeout: Duration::from_secs(600),
            max_connections_per_mailbox: 20,
        }
    }
}

/// The names the self-made server certificate is for, when `[tls]` gives none.
pub const DEFAULT_TLS_NAMES: &[&str] = &["localhost", "127.0.0.1", "xoauth2-proxy"];

/// `[tls]`: the certificate the listeners present to clients. With
/// `cert_file` and `key_file` those files; without them a CA and a server
/// certificate for `names` that the proxy makes itself under the state
/// directory.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsSection {
    /// The certificate chain, PEM, server certificate first.
    pub cert_file: Option<PathBuf>,
    /// Its private key, PEM (PKCS#8, RSA or EC).
    pub key_file: Option<PathBuf>,
    /// DNS names and IP addresses of the self-made server certificate.
    pub names: Vec<String>,
}

impl Default for TlsSection {
    fn default() -> Self {
        TlsSection {
            cert_file: None,
            key_file: None,
            names: DEFAULT_TLS_NAMES.iter().map(|n| n.to_string()).collect(),
        }
    }
}

impl TlsSection {
    /// The certificate and key files, when the user supplies them.
    pub fn files(&self) -> Option<(&Path, &Path)> {
        Some((self.cert_file.as_deref()?, self.key_file.as_deref()?))
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SmtpSection {
    pub listen: SocketAddr,
    /// SMTP submission over TLS from the first byte (SMTPS); only with `[tls]`.
    pub tls_listen: Option<SocketAddr>,
    /// Offer STARTTLS on `listen` (when `[tls]` is present).
    pub starttls: bool,
    /// No AUTH on `listen` before STARTTLS.
    pub require_tls: bool,
    /// Upstream connections per mailbox at most (Microsoft allows 3).
    pub max_connections_per_mailbox: usize,
    /// How long a transaction waits for a free upstream connection.
    #[serde(with = "humantime_serde")]
    pub pool_wait: Duration,
    /// An idle pooled upstream connection is closed after this long.
    #[serde(with = "humantime_serde")]
    pub pool_idle_timeout: Duration,
    /// A logged-in client that sends nothing for this long is disconnected.
    #[serde(with = "humantime_serde")]
    pub client_idle_timeout: Duration,
}

impl Default for SmtpSection {
    fn default() -> Self {
        SmtpSection {
            listen: DEFAULT_SMTP_LISTEN.parse().expect("valid default"),
            tls_listen: None,
            starttls: true,
            require_tls: false,
            max_connections_per_mailbox: 3,
            pool_wait: Duration::from_secs(60),
            pool_idle_timeout: Duration::from_secs(60),
            client_idle_timeout: Duration::from_secs(600),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminSection {
    /// `/healthz` and `/metrics` over HTTP.
    pub listen: SocketAddr,
    /// Admin connections open at once; more are closed at once.
    pub max_connections: usize,
    /// A request's headers must arrive within this long of the connection's
    /// start or of the previous response (so a kept-alive connection waiting
    /// this long for its next request is closed too).
    #[serde(with = "humantime_serde")]
    pub header_timeout: Duration,
    /// An admin connection silent this long either way, at any point (a
    /// client that stops reading its response), is closed.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// The web console on this listener (accounts, connect, disconnect, check).
    pub console: bool,
    /// The console's admin password, an argon2id PHC string from `hash-password`.
    pub password_hash: Option<String>,
    /// Lets the console run without `password_hash` when `listen` is loopback.
    pub console_allow_loopback_without_password: bool,
    /// The admin listener's address as people's browsers reach it: the
    /// link notifications carry, and where the console's browser sign-in
    /// returns (`{public_url}/oauth/callback`).
    pub public_url: String,
    /// A program (and its arguments) run, never through a shell, when an
    /// account starts needing `login`, again every `notify_repeat`, and once
    /// when it recovers; empty: none.
    pub notify_command: Vec<String>,
    /// A webhook that gets the same events as a JSON POST. A secret: Slack
    /// and Teams put their key in the URL.
    pub notify_url: Option<Secret>,
    /// PEM certificates the webhook's HTTPS trusts besides the system roots
    /// (a private CA's), as a provider's `ca_file` does for its HTTPS.
    pub notify_ca_file: Option<PathBuf>,
    /// How often a `needs_login` event is repeated while the account still
    /// needs login; 0: never.
    #[serde(with = "humantime_serde")]
    pub notify_repeat: Duration,
    /// How long `notify_command` may run (then it is killed), and one
    /// `notify_url` request may take.
    #[serde(with = "humantime_serde")]
    pub notify_timeout: Duration,
}

/// The default of `admin.public_url`.
pub const DEFAULT_PUBLIC_URL: &str = "http://localhost:8025";

impl Default for AdminSection {
    fn default() -> Self {
        AdminSection {
            listen: DEFAULT_ADMIN_LISTEN.parse().expect("valid default"),
            max_connections: 64,
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            console: false,
            password_hash: None,
            console_allow_loopback_without_password: false,
            public_url: DEFAULT_PUBLIC_URL.to_string(),
            notify_command: Vec::new(),
            notify_url: None,
            notify_ca_file: None,
            notify_repeat: Duration::from_secs(24 * 3600),
            notify_timeout: Duration::from_secs(30),
        }
    }
}

/// `[store]`: where grants are kept. Replicas that share one PostgreSQL
/// database share their grants and refresh each one once.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreSection {
    pub kind: StoreKind,
    /// The PostgreSQL connection URL; it may hold a password, so it is a
    /// secret (never logged).
    pub url: Option<Secret>,
    /// A file holding the URL (a Docker or Kubernetes secret); read at load.
    pub url_file: Option<PathBuf>,
    /// The schema the tables live in; created on first start.
    pub schema: String,
}

impl Default for StoreSection {
    fn default() -> Self {
        StoreSection {
            kind: StoreKind::File,
            url: None,
            url_file: None,
            schema: "xoauth2_proxy".into(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StoreKind {
    /// One file per account under `state_dir/tokens` (the default).
    File,
    /// One row per account in a PostgreSQL database.
    Postgres,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProviderKind {
    Microsoft,
    Google,
    Custom,
}

/// What a provider kind implies where the file is silent.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ProviderDefaults {
    pub authorize_url: Option<String>,
    pub token_url: Option<String>,
    pub device_code_url: Option<String>,
    pub imap_server: Option<&'static str>,
    pub smtp_server: Option<&'static str>,
}

impl ProviderKind {
    /// The endpoints and mail servers of a well-known kind; `tenant` is the
    /// Microsoft directory. A custom provider has none: the file gives them.
    pub fn defaults(self, tenant: &str) -> ProviderDefaults {
        match self {
            ProviderKind::Microsoft => {
                let base = format!("https://login.microsoftonline.com/{tenant}/oauth2/v2.0");
                ProviderDefaults {
                    authorize_url: Some(format!("{base}/authorize")),
                    token_url: Some(format!("{base}/token")),
                    device_code_url: Some(format!("{base}/devicecode")),
                    imap_server: Some("outlook.office365.com:993"),
                    smtp_server: Some("smtp.office365.com:587"),
                }
            }
            ProviderKind::Google => ProviderDefaults {
                authorize_url: Some("https://accounts.google.com/o/oauth2/v2/auth".to_string()),
                token_url: Some("https://oauth2.googleapis.com/token".to_string()),
                device_code_url: Some("https://oauth2.googleapis.com/device/code".to_string()),
                imap_server: Some("imap.gmail.com:993"),
                smtp_server: Some("smtp.gmail.com:587"),
            },
            ProviderKind::Custom => ProviderDefaults::default(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TlsMode {
    /// TLS from the first byte (IMAP 993, SMTP 465).
    Implicit,
    /// Plain connection upgraded with STARTTLS (SMTP 587).
    Starttls,
}

/// How an account's grant is obtained.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Flow {
    DeviceCode,
    AuthorizationCode,
    ClientCredentials,
}

impl Flow {
    /// Delegated flows act as a signed-in user and need `login` once.
    pub fn is_delegated(self) -> bool {
        !matches!(self, Flow::ClientCredentials)
    }
}

/// An upstream server: host name (for TLS verification) and port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerAddr {
    pub host: String,
    pub port: u16,
}

impl fmt::Display for ServerAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
    }
}

/// An identity provider with its upstream mail servers, validated.
#[derive(Debug, Clone)]
pub struct Provider {
    pub name: String,
    pub kind: ProviderKind,
    pub client_id: String,
    pub client_secret: Option<Secret>,
    /// The secret is written in the config file itself (`client_secret`),
    /// not read from `client_secret_file`.
    pub client_secret_inline: bool,
    pub authorize_url: String,
    pub token_url: String,
    pub device_code_url: Option<String>,
    pub redirect_uri: String,
    pub scopes: Option<Vec<String>>,
    pub imap_server: ServerAddr,
    pub imap_tls: TlsMode,
    pub smtp_server: ServerAddr,
    pub smtp_tls: TlsMode,
    pub ca_file: Option<PathBuf>,
    /// Microsoft Graph's base URL, without a trailing slash.
    pub graph_url: String,
}

impl Provider {
    /// The resource Graph scopes are named after: `graph_url`, except that
    /// an http loopback stand-in (tests, a local relay) is given tokens for
    /// Microsoft Graph itself.
    pub fn graph_resource(&self) -> &str {
        if self.graph_url.starts_with("https://") {
            &self.graph_url
        } else {
            DEFAULT_GRAPH_URL
        }
    }
}

/// How an account's mail leaves: `[[accounts]] send_via`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SendVia {
    /// SMTP AUTH XOAUTH2 (the default).
    Smtp,
    /// Microsoft Graph `sendMail`, for tenants with SMTP AUTH off.
    Graph,
    /// SMTP, and Graph for the mailbox once SMTP answers 5.7.139.
    Auto,
}

/// How a local password is checked.
#[derive(Clone)]
pub enum LocalPassword {
    /// An argon2 PHC string (`$argon2id$…`).
    Hash(String),
    /// A plain password in the config file (accepted, with a warning).
    Plain(Secret),
}

impl fmt::Debug for LocalPassword {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LocalPassword::Hash(_) => f.write_str("Hash(..)"),
            LocalPassword::Plain(_) => f.write_str("Plain(..)"),
        }
    }
}

/// A local login mapped to a mailbox behind a provider, validated.
#[derive(Debug, Clone)]
pub struct Account {
    pub username: String,
    pub password: LocalPassword,
    pub provider: String,
    pub mailbox: String,
    pub flow: Flow,
    pub scopes: Option<Vec<String>>,
    /// Who signs in for a delegated grant, when set in the config; else it
    /// is learnt at `login` from the ID token.
    pub sign_in_user: Option<String>,
    pub send_via: SendVia,
}

impl Account {
    /// The scopes this account asks for: its own, the provider's, or the
    /// defaults for its flow.
    pub fn scopes(&self, provider: &Provider) -> Vec<String> {
        if let Some(s) = self.scopes.as_ref().or(provider.scopes.as_ref()) {
            return s.clone();
        }
        let defaults = match (self.flow, provider.kind) {
            (Flow::ClientCredentials, _) => APP_ONLY_SCOPES,
            (_, ProviderKind::Google) => &["https://mail.google.com/"][..],
            _ => DELEGATED_SCOPES,
        };
        defaults.iter().map(|s| s.to_string()).collect()
    }
}

// ---- the file as written ----------------------------------------------------

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    server: ServerSection,
    #[serde(default)]
    imap: ImapSection,
    #[serde(default)]
    smtp: SmtpSection,
    #[serde(default)]
    admin: AdminSection,
    tls: Option<TlsSection>,
    #[serde(default)]
    store: StoreSection,
    #[serde(default)]
    providers: BTreeMap<String, RawProvider>,
    #[serde(default)]
    accounts: Vec<RawAccount>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProvider {
    #[serde(default = "default_kind")]
    kind: ProviderKind,
    tenant: Option<String>,
    client_id: String,
    client_secret: Option<Secret>,
    client_secret_file: Option<PathBuf>,
    authorize_url: Option<String>,
    token_url: Option<String>,
    device_code_url: Option<String>,
    redirect_uri: Option<String>,
    scopes: Option<Vec<String>>,
    imap_server: Option<String>,
    imap_tls: Option<TlsMode>,
    smtp_server: Option<String>,
    smtp_tls: Option<TlsMode>,
    ca_file: Option<PathBuf>,
    graph_url: Option<String>,
}

fn default_kind() -> ProviderKind {
    ProviderKind::Microsoft
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAccount {
    username: String,
    password_hash: Option<String>,
    password: Option<Secret>,
    provider: String,
    mailbox: Option<String>,
    #[serde(default = "default_flow")]
    flow: Flow,
    scopes: Option<Vec<String>>,
    sign_in_user: Option<String>,
    #[serde(default = "default_send_via")]
    send_via: SendVia,
}

fn default_send_via() -> SendVia {
    SendVia::Smtp
}

fn default_flow() -> Flow {
    Flow::DeviceCode
}

impl Config {
    /// Reads, parses and validates the file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigError(format!(
                "cannot read config {}: {}",
                path.display(),
                crate::error::io_reason(&e)
            ))
        })?;
        Config::parse(path, &text)
    }

    /// Parses and validates `text` as if read from `path`.
    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let raw = parse_raw(path, text)?;
        validate(path, raw)
    }

    pub fn provider(&self, name: &str) -> &Provider {
        // Validation guarantees every account's provider exists.
        &self.providers[name]
    }

    /// The account whose `username` is `name` (case-insensitive, as mail
    /// addresses are compared in practice).
    pub fn account(&self, name: &str) -> Option<&Account> {
        self.accounts
            .iter()
            .find(|a| a.username.eq_ignore_ascii_case(name))
    }
}

fn parse_raw(path: &Path, text: &str) -> Result<RawConfig, ConfigError> {
    let located = |message: &str, span: Option<std::ops::Range<usize>>| {
        let line = span
            .map(|s| text[..s.start.min(text.len())].lines().count().max(1))
            .map(|n| format!(" line {n}"))
            .unwrap_or_default();
        ConfigError(format!("config {}{line}: {message}", path.display()))
    };
    let de = toml::Deserializer::parse(text).map_err(|e| located(e.message(), e.span()))?;
    serde_path_to_error::deserialize(de).map_err(|e| {
        let key = e.path().to_string();
        let inner = e.into_inner();
        let message = if key.is_empty() || key == "." {
            inner.message().to_string()
        } else {
            format!("`{key}`: {}", inner.message())
        };
        located(&message, inner.span())
    })
}

fn validate(path: &Path, raw: RawConfig) -> Result<Config, ConfigError> {
    check_limits(path, &raw.server, &raw.smtp, &raw.admin)?;
    check_notify(path, &raw.admin)?;
    if raw.imap.max_connections_per_mailbox == 0 {
        return Err(ConfigError::at(
            path,
            "imap.max_connections_per_mailbox",
            "must be at least 1",
        ));
    }
    check_tls(path, &raw)?;
    check_console(path, &raw.admin)?;
    let mut providers = BTreeMap::new();
    for (name, p) in raw.providers {
        let provider = validate_provider(path, &name, p)?;
        providers.insert(name, provider);
    }
    let accounts = validate_accounts(path, raw.accounts, &providers)?;
    let store = validate_store(path, raw.store)?;
    Ok(Config {
        path: path.to_path_buf(),
        server: raw.server,
        imap: raw.imap,
        smtp: raw.smtp,
        admin: raw.admin,
        tls: raw.tls,
        store,
        providers,
        accounts,
    })
}

/// A table of the file (`providers.NAME`, `accounts[N]`), so that an error
/// names the key it is about.
struct Table<'a> {
    file: &'a Path,
    name: String,
}

impl Table<'_> {
    fn error(&self, field: &str, what: impl fmt::Display) -> ConfigError {
        ConfigError::at(self.file, &format!("{}.{field}", self.name), what)
    }
}

/// Limits of zero would refuse every client or every message.
fn check_limits(
    path: &Path,
    server: &ServerSection,
    smtp: &SmtpSection,
    admin: &AdminSection,
) -> Result<(), ConfigError> {
    let at_least_one = [
        (
            "smtp.max_connections_per_mailbox",
            smtp.max_connections_per_mailbox,
        ),
        ("server.max_connections", server.max_connections),
        (
            "server.max_prelogin_per_address",
            server.max_prelogin_per_address,
        ),
        (
            "server.max_failed_logins",
            server.max_failed_logins as usize,
        ),
        (
            "server.max_failed_logins_per_address",
            server.max_failed_logins_per_address as usize,
        ),
        ("admin.max_connections", admin.max_connections),
    ];
    match at_least_one.iter().find(|(_, value)| *value == 0) {
        Some((key, _)) => Err(ConfigError::at(path, key, "must be at least 1")),
        None => Ok(()),
    }
}

/// The console needs an admin password, unless it is on loopback and the
/// file says plainly that it may go without (`public_url` is checked with
/// the notification keys).
fn check_console(path: &Path, admin: &AdminSection) -> Result<(), ConfigError> {
    if !admin.console || admin.password_hash.is_some() {
        return Ok(());
    }
    if admin.listen.ip().is_loopback() && admin.console_allow_loopback_without_password {
        return Ok(());
    }
    Err(ConfigError::at(
        path,
        "admin.password_hash",
        "the console needs an admin password: set `password_hash` in [admin] to the output of `xoauth2-proxy hash-password` (or, on a loopback `listen` only, `console_allow_loopback_without_password = true`)",
    ))
}

/// The notification keys: a program named by its absolute path (no shell,
/// no `PATH` search), HTTP(S) URLs, a timeout. An error never quotes
/// `notify_url`: it may hold a webhook's key.
fn check_notify(path: &Path, admin: &AdminSection) -> Result<(), ConfigError> {
    if let Some(program) = admin.notify_command.first()
        && !Path::new(program).is_absolute()
    {
        return Err(ConfigError::at(
            path,
            "admin.notify_command",
            format!(
                "`{program}` is not an absolute path; name the program in full (e.g. \"/usr/local/bin/notify\"): it is run without a shell or a PATH search"
            ),
        ));
    }
    if let Some(url) = &admin.notify_url
        && !is_http_url(url.expose())
    {
        return Err(ConfigError::at(
            path,
            "admin.notify_url",
            "is not an http:// or https:// URL with a host; give the webhook's full address",
        ));
    }
    if let Some(ca) = &admin.notify_ca_file {
        crate::tls::load_ca_file(ca)
            .map_err(|e| ConfigError::at(path, "admin.notify_ca_file", e))?;
    }
    if !is_http_url(&admin.public_url) {
        return Err(ConfigError::at(
            path,
            "admin.public_url",
            format!(
                "`{}` is not an http:// or https:// URL with a host; give the address browsers use to reach the admin listener (e.g. \"{DEFAULT_PUBLIC_URL}\")",
                admin.public_url
            ),
        ));
    }
    if admin.notify_timeout.is_zero() {
        return Err(ConfigError::at(
            path,
            "admin.notify_timeout",
            "must be more than 0 (e.g. \"30s\")",
        ));
    }
    Ok(())
}

fn is_http_url(text: &str) -> bool {
    reqwest::Url::parse(text)
        .is_ok_and(|u| matches!(u.scheme(), "http" | "https") && u.host_str().is_some())
}

/// `[tls]` names both files or neither, and some names; a TLS listener
/// needs `[tls]`. The files themselves are read when the listeners start.
fn check_tls(path: &Path, raw: &RawConfig) -> Result<(), ConfigError> {
    let wants_tls = [
        ("imap.tls_listen", raw.imap.tls_listen),
        ("smtp.tls_listen", raw.smtp.tls_listen),
    ];
    let requires_tls = [
        ("imap.require_tls", raw.imap.require_tls),
        ("smtp.require_tls", raw.smtp.require_tls),
    ];
    let Some(tls) = &raw.tls else {
        if let Some((key, _)) = requires_tls.iter().find(|(_, on)| *on) {
            return Err(ConfigError::at(
                path,
                key,
                "needs a [tls] section, or no client could ever log in; add `[tls]`, with no keys for a self-made certificate",
            ));
        }
        if let Some((key, _)) = wants_tls.iter().find(|(_, addr)| addr.is_some()) {
            return Err(ConfigError::at(
                path,
                key,
                "needs a [tls] section (the certificate to present); add `[tls]`, with no keys for a self-made certificate",
            ));
        }
        return Ok(());
    };
    match (&tls.cert_file, &tls.key_file) {
        (Some(_), None) => Err(ConfigError::at(
            path,
            "tls.key_file",
            "is missing; give cert_file and key_file together, or neither for a self-made certificate",
        )),
        (None, Some(_)) => Err(ConfigError::at(
            path,
            "tls.cert_file",
            "is missing; give cert_file and key_file together, or neither for a self-made certificate",
        )),
        _ if tls.names.is_empty() => Err(ConfigError::at(
            path,
            "tls.names",
            "must be a non-empty list of host names or IP addresses",
        )),
        _ => match tls.names.iter().find(|n| !is_certificate_name(n)) {
            Some(bad) => Err(ConfigError::at(
                path,
                "tls.names",
                format!(
                    "`{bad}` is neither a host name (letters, digits, dots, hyphens; `*.` first for a wildcard) nor an IP address"
                ),
            )),
            None => Ok(()),
        },
    }
}

/// A DNS name a certificate may hold (a leading `*.` for a wildcard), or an
/// IP address.
fn is_certificate_name(name: &str) -> bool {
    if name.parse::<std::net::IpAddr>().is_ok() {
        return true;
    }
    let host = name.strip_prefix("*.").unwrap_or(name);
    !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        })
}

// ---- accounts -----------------------------------------------------------------

fn validate_accounts(
    path: &Path,
    raw: Vec<RawAccount>,
    providers: &BTreeMap<String, Provider>,
) -> Result<Vec<Account>, ConfigError> {
    let mut seen = HashSet::new();
    raw.into_iter()
        .enumerate()
        .map(|(i, a)| {
            let table = Table {
                file: path,
                name: format!("accounts[{i}]"),
            };
            validate_account(&table, a, providers, &mut seen)
        })
        .collect()
}

/// One account; `seen` holds the usernames before it, lower-cased.
fn validate_account(
    t: &Table,
    a: RawAccount,
    providers: &BTreeMap<String, Provider>,
    seen: &mut HashSet<String>,
) -> Result<Account, ConfigError> {
    check_username(t, &a.username, seen)?;
    let password = local_password(t, a.password_hash, a.password)?;
    let Some(provider) = providers.get(&a.provider) else {
        return Err(t.error(
            "provider",
            format!(
                "no provider `{}` is configured under [providers]",
                a.provider
            ),
        ));
    };
    check_flow(t, a.flow, provider)?;
    if a.send_via != SendVia::Smtp && provider.kind == ProviderKind::Google {
        return Err(t.error(
            "send_via",
            format!(
                "Microsoft Graph sends only for Microsoft providers, and provider `{}` is Google; use send_via = \"smtp\"",
                provider.name
            ),
        ));
    }
    if let Some(scopes) = &a.scopes {
        check_scopes(t, "scopes", scopes)?;
    }
    let mailbox = a.mailbox.unwrap_or_else(|| a.username.clone());
    if mailbox.trim().is_empty() {
        return Err(t.error("mailbox", "must not be empty"));
    }
    if a.sign_in_user
        .as_deref()
        .is_some_and(|u| u.trim().is_empty())
    {
        return Err(t.error(
            "sign_in_user",
            "must not be empty; remove it to use the user learnt at `login`",
        ));
    }
    Ok(Account {
        username: a.username,
        password,
        provider: a.provider,
        mailbox,
        flow: a.flow,
        scopes: a.scopes,
        sign_in_user: a.sign_in_user,
        send_via: a.send_via,
    })
}

/// Usernames are compared case-insensitively at login, so they must differ
/// in more than case.
fn check_username(
    t: &Table,
    username: &str,
    seen: &mut HashSet<String>,
) -> Result<(), ConfigError> {
    if username.trim().is_empty() {
        return Err(t.error("username", "must not be empty"));
    }
    if !seen.insert(username.to_ascii_lowercase()) {
        return Err(t.error("username", format!("`{username}` is configured twice")));
    }
    Ok(())
}

fn local_password(
    t: &Table,
    hash: Option<String>,
    plain: Option<Secret>,
) -> Result<LocalPassword, ConfigError> {
    match (hash, plain) {
        (Some(hash), None) => {
            argon2::PasswordHash::new(&hash).map_err(|_| {
                t.error(
                    "password_hash",
                    "is not an argon2 hash string; make one with `xoauth2-proxy hash-password`",
                )
            })?;
            Ok(LocalPassword::Hash(hash))
        }
        (None, Some(plain)) => Ok(LocalPassword::Plain(plain)),
        (Some(_), Some(_)) => Err(t.error(
            "password_hash",
            "give either password_hash or password, not both",
        )),
        (None, None) => Err(t.error(
            "password_hash",
            "is missing; make one with `xoauth2-proxy hash-password`",
        )),
    }
}

/// A flow needs what its grant is obtained with from the provider.
fn check_flow(t: &Table, flow: Flow, provider: &Provider) -> Result<(), ConfigError> {
    let needs = match flow {
        Flow::ClientCredentials if provider.client_secret.is_none() => {
            "client_credentials needs a client_secret or client_secret_file"
        }
        Flow::DeviceCode if provider.device_code_url.is_none() => {
            "device_code needs device_code_url"
        }
        _ => return Ok(()),
    };
    Err(t.error("flow", format!("{needs} in provider `{}`", provider.name)))
}

// ---- providers ----------------------------------------------------------------

/// The Entra tenant when the file names none: any work or school account.
const DEFAULT_TENANT: &str = "organizations";
/// The authorization code flow's loopback redirect when the file names none.
const DEFAULT_REDIRECT_URI: &str = "http://localhost:8400/";

fn validate_provider(path: &Path, name: &str, mut p: RawProvider) -> Result<Provider, ConfigError> {
    let t = Table {
        file: path,
        name: format!("providers.{name}"),
    };
    if p.client_id.trim().is_empty() {
        return Err(t.error("client_id", "must not be empty"));
    }
    let client_secret_inline = p.client_secret.is_some();
    let client_secret = client_secret(&t, p.client_secret.take(), p.client_secret_file.take())?;
    let defaults = p
        .kind
        .defaults(p.tenant.as_deref().unwrap_or(DEFAULT_TENANT));
    let endpoints = endpoints(&t, &p, &defaults)?;
    let servers = mail_servers(&t, &p, &defaults)?;
    if let Some(scopes) = &p.scopes {
        check_scopes(&t, "scopes", scopes)?;
    }
    if let Some(ca) = &p.ca_file {
        crate::tls::load_ca_file(ca).map_err(|e| t.error("ca_file", e))?;
    }
    let graph_url = p
        .graph_url
        .take()
        .unwrap_or_else(|| DEFAULT_GRAPH_URL.into());
    check_url(&t, "graph_url", &graph_url)?;
    Ok(Provider {
        name: name.to_string(),
        kind: p.kind,
        client_id: p.client_id,
        client_secret,
        client_secret_inline,
        authorize_url: endpoints.authorize_url,
        token_url: endpoints.token_url,
        device_code_url: endpoints.device_code_url,
        redirect_uri: endpoints.redirect_uri,
        scopes: p.scopes,
        imap_server: servers.imap_server,
        imap_tls: servers.imap_tls,
        smtp_server: servers.smtp_server,
        smtp_tls: servers.smtp_tls,
        ca_file: p.ca_file,
        graph_url: graph_url.trim_end_matches('/').to_string(),
    })
}

/// `client_secret`, or the contents of `client_secret_file` (kept out of
/// a config file that may be shared), or neither.
fn client_secret(
    t: &Table,
    inline: Option<Secret>,
    file: Option<PathBuf>,
) -> Result<Option<Secret>, ConfigError> {
    match (inline, file) {
        (Some(_), Some(_)) => Err(t.error(
            "client_secret",
            "give either client_secret or client_secret_file, not both",
        )),
        (Some(s), None) => Ok(Some(s)),
        (None, Some(file)) => read_secret_file(t, &file).map(Some),
        (None, None) => Ok(None),
    }
}

fn read_secret_file(t: &Table, file: &Path) -> Result<Secret, ConfigError> {
    let text = std::fs::read_to_string(file).map_err(|e| {
        t.error(
            "client_secret_file",
            format!(
                "cannot read {}: {}",
                file.display(),
                crate::error::io_reason(&e)
            ),
        )
    })?;
    let secret = text.trim();
    if secret.is_empty() {
        return Err(t.error("client_secret_file", format!("{} is empty", file.display())));
    }
    Ok(Secret::new(secret.to_string()))
}

/// `[store]`: PostgreSQL needs its URL (inline or from `url_file`, which is
/// read here), and the schema must be a plain SQL name.
fn validate_store(path: &Path, mut store: StoreSection) -> Result<StoreSection, ConfigError> {
    let at = |key: &str, what: String| ConfigError::at(path, &format!("store.{key}"), what);
    let plain_name = |s: &str| {
        let mut chars = s.chars();
        chars
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
            && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
            && s.len() <= 63
    };
    if !plain_name(&store.schema) {
        return Err(at(
            "schema",
            format!(
                "{:?} is not a plain SQL name; use lower-case letters, digits and _ (like xoauth2_proxy)",
                store.schema
            ),
        ));
    }
    match (&store.url, store.url_file.take()) {
        (Some(_), Some(_)) => {
            return Err(at("url", "give either url or url_file, not both".into()));
        }
        (None, Some(file)) => {
            let text = std::fs::read_to_string(&file).map_err(|e| {
                at(
                    "url_file",
                    format!(
                        "cannot read {}: {}",
                        file.display(),
                        crate::error::io_reason(&e)
                    ),
                )
            })?;
            if text.trim().is_empty() {
                return Err(at("url_file", format!("{} is empty", file.display())));
            }
            store.url = Some(Secret::new(text.trim().to_string()));
            store.url_file = Some(file);
        }
        _ => {}
    }
    if store.kind == StoreKind::Postgres && store.url.is_none() {
        return Err(at(
            "url",
            "kind = \"postgres\" needs the database's URL: set url (postgres://USER:PASSWORD@HOST:5432/DB) or url_file".into(),
        ));
    }
    Ok(store)
}

/// A provider's identity provider endpoints, checked.
struct Endpoints {
    authorize_url: String,
    token_url: String,
    device_code_url: Option<String>,
    redirect_uri: String,
}

/// Each endpoint as given, else the kind's default; every URL is checked
/// before a missing one is reported.
fn endpoints(
    t: &Table,
    p: &RawProvider,
    defaults: &ProviderDefaults,
) -> Result<Endpoints, ConfigError> {
    let url = |field: &str, given: &Option<String>, default: &Option<String>| {
        let Some(url) = given.as_ref().or(default.as_ref()) else {
            return Ok(None);
        };
        check_url(t, field, url)?;
        Ok::<_, ConfigError>(Some(url.clone()))
    };
    let authorize_url = url("authorize_url", &p.authorize_url, &defaults.authorize_url)?;
    let token_url = url("token_url", &p.token_url, &defaults.token_url)?;
    let device_code_url = url(
        "device_code_url",
        &p.device_code_url,
        &defaults.device_code_url,
    )?;
    let redirect_uri = url(
        "redirect_uri",
        &p.redirect_uri,
        &Some(DEFAULT_REDIRECT_URI.into()),
    )?
    .expect("has a default");
    let required = |field: &str, v: Option<String>| {
        v.ok_or_else(|| t.error(field, "is required for kind = \"custom\""))
    };
    Ok(Endpoints {
        authorize_url: required("authorize_url", authorize_url)?,
        token_url: required("token_url", token_url)?,
        device_code_url,
        redirect_uri,
    })
}

/// A provider's upstream IMAP and SMTP servers with their TLS modes.
struct MailServers {
    imap_server: ServerAddr,
    imap_tls: TlsMode,
    smtp_server: ServerAddr,
    smtp_tls: TlsMode,
}

fn mail_servers(
    t: &Table,
    p: &RawProvider,
    defaults: &ProviderDefaults,
) -> Result<MailServers, ConfigError> {
    let server = |field: &str, given: &Option<String>, default: Option<&str>| {
        let text = given
            .as_deref()
            .or(default)
            .ok_or_else(|| t.error(field, "is required for kind = \"custom\""))?;
        parse_server_addr(text).ok_or_else(|| t.error(field, "must be HOST:PORT"))
    };
    let imap_server = server("imap_server", &p.imap_server, defaults.imap_server)?;
    let smtp_server = server("smtp_server", &p.smtp_server, defaults.smtp_server)?;
    // Port 465 is SMTP over TLS from the first byte; others start plain.
    let smtp_tls = p.smtp_tls.unwrap_or(if smtp_server.port == 465 {
        TlsMode::Implicit
    } else {
        TlsMode::Starttls
    });
    Ok(MailServers {
        imap_server,
        imap_tls: p.imap_tls.unwrap_or(TlsMode::Implicit),
        smtp_server,
        smtp_tls,
    })
}

fn check_scopes(t: &Table, field: &str, scopes: &[String]) -> Result<(), ConfigError> {
    if scopes.is_empty()
        || scopes
            .iter()
            .any(|s| s.trim().is_empty() || s.contains(' '))
    {
        return Err(t.error(field, "must be a non-empty list of scopes without spaces"));
    }
    Ok(())
}

/// URLs must be https, except http to a loopback host (test and local IdPs).
fn check_url(t: &Table, field: &str, url: &str) -> Result<(), ConfigError> {
    let parsed = reqwest::Url::parse(url)
        .map_err(|e| t.error(field, format!("`{url}` is not a URL ({e})")))?;
    match parsed.scheme() {
        "https" => Ok(()),
        "http" if is_loopback_host(parsed.host_str().unwrap_or_default()) => Ok(()),
        _ => Err(t.error(
            field,
            format!("`{url}` must use https (http is allowed only for loopback hosts)"),
        )),
    }
}

fn is_loopback_host(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Parses `host:port` (or `[v6]:port`).
pub fn parse_server_addr(text: &str) -> Option<ServerAddr> {
    let (host, port) = text.trim().rsplit_once(':')?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return None;
    }
    Some(ServerAddr {
        host: host.to_string(),
        port: port.parse().ok().filter(|p| *p != 0)?,
    })
}

/// Where the config file is: `--config`, else `$XOAUTH2_PROXY_CONFIG`, else the
/// platform config directory.
pub fn default_config_path() -> PathBuf {
    directories::ProjectDirs::from("", "", "xoauth2-proxy")
        .map(|d| d.config_dir().join("config.toml"))
        .unwrap_or_else(|| PathBuf::from("xoauth2-proxy.toml"))
}

/// Where tokens live: `[server] state_dir`, else `$XOAUTH2_PROXY_STATE_DIR`,
/// else the platform data directory.
pub fn state_dir(config: &Config) -> PathBuf {
    if let Some(dir) = std::env::var_os("XOAUTH2_PROXY_STATE_DIR").filter(|v| !v.is_empty()) {
        return PathBuf::from(dir);
    }
    if let Some(dir) = &config.server.state_dir {
        return dir.clone();
    }
    directories::ProjectDirs::from("", "", "xoauth2-proxy")
        .map(|d| d.data_dir().to_path_buf())
        .unwrap_or_else(|| PathBuf::from("xoauth2-proxy-state"))
}

/// The file holding the token key that seals grants:
/// `$XOAUTH2_PROXY_TOKEN_KEY_FILE`, else `[server] token_key_file`, else
/// none (grants are stored unsealed).
pub fn token_key_file(config: &Config) -> Option<PathBuf> {
    std::env::var_os("XOAUTH2_PROXY_TOKEN_KEY_FILE")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| config.server.token_key_file.clone())
}

/// A warning when the config file holds a secret (a client secret, the
/// webhook URL of `admin.notify_url`, which carries the webhook's key) and
/// users other than its owner and the proxy's group may read it (a
/// root-owned 0640 file of the proxy's group, as the systemd unit sets up,
/// is private); `None` when it is private or holds none. Never the secret
/// itself.
pub fn exposed_secret_warning(config: &Config) -> Option<String> {
    let providers: Vec<&str> = config
        .providers
        .values()
        .filter(|p| p.client_secret_inline)
        .map(|p| p.name.as_str())
        .collect();
    let mut held = Vec::new();
    if !providers.is_empty() {
        let names = providers.join("`, `");
        held.push(format!("the client secret of provider `{names}`"));
    }
    if config.admin.notify_url.is_some() {
        held.push("the webhook URL of `admin.notify_url` (which carries its key)".to_string());
    }
    if held.is_empty() {
        return None;
    }
    let mode = readable_by_others(&config.path)?;
    let file = config.path.display();
    let or_move = if providers.is_empty() {
        ""
    } else {
        ", or move the client secret to a file named by `client_secret_file`"
    };
    Some(format!(
        "config {file} holds {} and other users may read it (mode {mode:04o}); run `chmod 600 {file}`{or_move}",
        held.join(" and ")
    ))
}

/// The file's mode if users beyond its owner and the proxy's group may read it.
fn readable_by_others(path: &Path) -> Option<u32> {
    crate::private_file::others_may_read(&std::fs::metadata(path).ok()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("/etc/x.toml"), text)
    }

    const MINIMAL: &str = r#"
[providers.contoso]
tenant = "contoso.onmicrosoft.com"
client_id = "abc"
client_secret = "s3cret"

[[accounts]]
username = "sales@contoso.com"
password = "pw"
provider = "contoso"
"#;

    #[test]
    fn sending_keys_parse_and_refuse_what_cannot_work() {
        let c = parse(MINIMAL).unwrap();
        let (a, p) = (&c.accounts[0], c.provider("contoso"));
        assert_eq!(
            (a.send_via, a.sign_in_user.as_deref()),
            (SendVia::Smtp, None)
        );
        assert_eq!(p.graph_url, DEFAULT_GRAPH_URL);
        let text = MINIMAL.replace(
            "provider = \"contoso\"",
            "provider = \"contoso\"\nsend_via = \"auto\"\nsign_in_user = \"d@contoso.com\"",
        );
        let c = parse(&text.replace(
            "client_id",
            "graph_url = \"https://graph.microsoft.us/\"\nclient_id",
        ))
        .unwrap();
        assert_eq!(c.accounts[0].send_via, SendVia::Auto);
        assert_eq!(c.accounts[0].sign_in_user.as_deref(), Some("d@contoso.com"));
        let p = c.provider("contoso");
        assert_eq!(
            (p.graph_url.as_str(), p.graph_resource()),
            ("https://graph.microsoft.us", "https://graph.microsoft.us")
        );
        let local =
            parse(&MINIMAL.replace("client_id", "graph_url = \"http://127.0.0.1:9\"\nclient_id"))
                .unwrap();
        assert_eq!(
            local.provider("contoso").graph_resource(),
            DEFAULT_GRAPH_URL
        );
        for (edit, key) in [
            (
                (
                    "provider = \"contoso\"",
                    "provider = \"contoso\"\nsend_via = \"pigeon\"",
                ),
                "send_via",
            ),
            (
                (
                    "provider = \"contoso\"",
                    "provider = \"contoso\"\nsign_in_user = \" \"",
                ),
                "sign_in_user",
            ),
            (
                (
                    "client_id",
                    "graph_url = \"http://graph.example.com\"\nclient_id",
                ),
                "graph_url",
            ),
            (("client_id", "kind = \"google\"\nclient_id"), "send_via"),
        ] {
            let mut text = MINIMAL.replace(edit.0, edit.1);
            if key == "send_via" && edit.1.contains("google") {
                text = text.replace(
                    "provider = \"contoso\"",
                    "provider = \"contoso\"\nsend_via = \"graph\"",
                );
            }
            let err = parse(&text).unwrap_err().to_string();
            assert!(err.contains(key), "{err}");
        }
    }

    #[test]
    fn minimal_microsoft_config_gets_microsoft_defaults() {
        let c = parse(MINIMAL).unwrap();
        let p = c.provider("contoso");
        assert_eq!(
            p.token_url,
            "https://login.microsoftonline.com/contoso.onmicrosoft.com/oauth2/v2.0/token"
        );
        assert_eq!(p.imap_server.to_string(), "outlook.office365.com:993");
        assert_eq!(p.smtp_tls, TlsMode::Starttls);
        let a = c.account("SALES@contoso.com").unwrap();
        assert_eq!(a.mailbox, "sales@contoso.com");
        assert_eq!(a.flow, Flow::DeviceCode);
        assert_eq!(a.scopes(p).join(" "), DELEGATED_SCOPES.join(" "));
        assert_eq!(c.imap.listen.to_string(), DEFAULT_IMAP_LISTEN);
    }

    #[test]
    fn notify_keys_default_and_bad_ones_are_refused_without_quoting_the_webhook() {
        let c = parse(MINIMAL).unwrap();
        assert_eq!(c.admin.public_url, "http://localhost:8025");
        assert!(c.admin.notify_command.is_empty() && c.admin.notify_url.is_none());
        assert_eq!(c.admin.notify_repeat, Duration::from_secs(24 * 3600));
        let with = |admin: &str| parse(&format!("[admin]\n{admin}\n{MINIMAL}"));
        let c = with(
            "notify_command = [\"/usr/local/bin/alert\", \"ops\"]\nnotify_url = \"https://hooks.example.com/T/B/key\"\nnotify_repeat = \"1h\"",
        )
        .unwrap();
        assert_eq!(c.admin.notify_command, ["/usr/local/bin/alert", "ops"]);
        assert_eq!(c.admin.notify_repeat, Duration::from_secs(3600));
        assert!(
            !format!("{c:?}").contains("/T/B/key"),
            "the URL is a secret"
        );

        let err = with("notify_command = [\"alert\"]")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("admin.notify_command") && err.contains("absolute path"),
            "{err}"
        );
        let err = with("notify_url = \"hooks.example.com/T/B/hook-key\"")
            .unwrap_err()
            .to_string();
        assert!(err.contains("admin.notify_url"), "{err}");
        assert!(!err.contains("hook-key"), "{err}");
        let err = with("public_url = \"localhost:8025\"")
            .unwrap_err()
            .to_string();
        assert!(err.contains("admin.public_url"), "{err}");
        let err = with("notify_timeout = \"0s\"").unwrap_err().to_string();
        assert!(err.contains("admin.notify_timeout"), "{err}");
    }

    #[test]
    fn a_notify_ca_file_is_read_at_load_and_a_bad_one_refused_with_its_key() {
        let with = |line: &str| parse(&format!("[admin]\n{line}\n{MINIMAL}"));
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        let err = with(&format!("notify_ca_file = \"{}\"", missing.display()))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("admin.notify_ca_file") && err.contains("cannot read"),
            "{err}"
        );
        let not_pem = dir.path().join("not.pem");
        std::fs::write(&not_pem, "not a certificate").unwrap();
        let err = with(&format!("notify_ca_file = \"{}\"", not_pem.display()))
            .unwrap_err()
            .to_string();
        assert!(err.contains("admin.notify_ca_file"), "{err}");
        let pki = testkit::pki::TestPki::new();
        let c = with(&format!(
            "notify_ca_file = \"{}\"",
            pki.ca_pem_path.display()
        ))
        .unwrap();
        assert_eq!(
            c.admin.notify_ca_file.as_deref(),
            Some(pki.ca_pem_path.as_path())
        );
    }

    #[test]
    fn unknown_key_names_file_line_and_key() {
        let err = parse(&MINIMAL.replace(
            "provider = \"contoso\"",
            "provider = \"contoso\"\nflavour = 1",
        ))
        .unwrap_err()
        .to_string();
        assert!(err.starts_with("config /etc/x.toml line "), "{err}");
        assert!(err.contains("flavour"), "{err}");
    }

    #[test]
    fn bad_flow_names_the_key() {
        let err = parse(&MINIMAL.replace(
            "provider = \"contoso\"",
            "provider = \"contoso\"\nflow = \"devicecode\"",
        ))
        .unwrap_err()
        .to_string();
        assert!(err.contains("accounts[0].flow"), "{err}");
        assert!(err.contains("device_code"), "{err}");
    }

    #[test]
    fn missing_provider_is_refused() {
        let err = parse(&MINIMAL.replace("provider = \"contoso\"", "provider = \"fabrikam\""))
            .unwrap_err()
            .to_string();
        assert!(err.contains("accounts[0].provider"), "{err}");
        assert!(err.contains("fabrikam"), "{err}");
    }

    #[test]
    fn plain_http_endpoint_refused_unless_loopback() {
        let err = parse(&MINIMAL.replace(
            "client_id = \"abc\"",
            "client_id = \"abc\"\ntoken_url = \"http://idp.example.com/token\"",
        ))
        .unwrap_err()
        .to_string();
        assert!(err.contains("providers.contoso.token_url"), "{err}");
        parse(&MINIMAL.replace(
            "client_id = \"abc\"",
            "client_id = \"abc\"\ntoken_url = \"http://127.0.0.1:9/token\"",
        ))
        .unwrap();
    }

    #[test]
    fn secret_never_in_debug_or_errors() {
        let c = parse(MINIMAL).unwrap();
        assert!(!format!("{c:?}").contains("s3cret"));
        assert!(!format!("{c:?}").contains("\"pw\""));
        let err = parse(&MINIMAL.replace(
            "password = \"pw\"",
            "password = \"pw\"\npassword_hash = \"x\"",
        ))
        .unwrap_err()
        .to_string();
        assert!(!err.contains("s3cret") && !err.contains("pw\""), "{err}");
    }

    #[test]
    fn bad_hash_and_duplicate_usernames_refused() {
        let err = parse(&MINIMAL.replace("password = \"pw\"", "password_hash = \"nope\""))
            .unwrap_err()
            .to_string();
        assert!(err.contains("hash-password"), "{err}");
        let twice = format!(
            "{MINIMAL}\n[[accounts]]\nusername = \"Sales@contoso.com\"\npassword = \"x\"\nprovider = \"contoso\"\n"
        );
        assert!(parse(&twice).unwrap_err().to_string().contains("twice"));
    }

    #[test]
    fn the_store_is_files_unless_postgres_is_given_with_its_url() {
        let c = parse(MINIMAL).unwrap();
        assert_eq!(c.store.kind, StoreKind::File);
        assert_eq!(c.store.schema, "xoauth2_proxy");
        let no_url = format!("{MINIMAL}\n[store]\nkind = \"postgres\"\n");
        let e = parse(&no_url).unwrap_err().to_string();
        assert!(e.contains("`store.url`") && e.contains("url_file"), "{e}");
        let bad_schema = format!("{MINIMAL}\n[store]\nschema = \"a; DROP TABLE x\"\n");
        let e = parse(&bad_schema).unwrap_err().to_string();
        assert!(
            e.contains("`store.schema`") && e.contains("plain SQL name"),
            "{e}"
        );

        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("db-url");
        std::fs::write(&file, "postgres://u:SECRET@db/app\n").unwrap();
        let from_file = format!(
            "{MINIMAL}\n[store]\nkind = \"postgres\"\nurl_file = \"{}\"\n",
            file.display()
        );
        let c = parse(&from_file).unwrap();
        assert_eq!(c.store.kind, StoreKind::Postgres);
        let url = c.store.url.as_ref().unwrap();
        assert_eq!(url.expose(), "postgres://u:SECRET@db/app");
        assert!(!format!("{:?}", c.store).contains("SECRET"), "a secret");
        let both = from_file.replace("url_file", "url = \"x\"\nurl_file");
        let e = parse(&both).unwrap_err().to_string();
        assert!(e.contains("either url or url_file"), "{e}");
    }

    #[test]
    fn the_console_refuses_to_start_without_an_admin_password() {
        let with = |admin: &str| parse(&format!("[admin]\n{admin}\n{MINIMAL}"));
        let err = with("console = true").unwrap_err().to_string();
        assert!(
            err.contains("admin.password_hash") && err.contains("hash-password"),
            "{err}"
        );
        let open = "console = true\nconsole_allow_loopback_without_password = true";
        with(open).unwrap();
        let exposed = format!("{open}\nlisten = \"0.0.0.0:8025\"");
        assert!(with(&exposed).is_err());
        let hash = "$argon2id$v=19$m=19456,t=2,p=1$s5uJr8KYWB9dF8oZSlFvxg$vDc5OrYMf8ggcIkW8a0ts8kUrmsh+X0EfnK4z15Dox8";
        let c = with(&format!("console = true\npassword_hash = \"{hash}\"")).unwrap();
        assert_eq!(c.admin.public_url, "http://localhost:8025");
        let err = with("public_url = \"not a url\"").unwrap_err().to_string();
        assert!(err.contains("admin.public_url"), "{err}");
    }

    #[test]
    fn client_credentials_needs_a_secret() {
        let text = MINIMAL.replace("client_secret = \"s3cret\"", "").replace(
            "provider = \"contoso\"",
            "provider = \"contoso\"\nflow = \"client_credentials\"",
        );
        let err = parse(&text).unwrap_err().to_string();
        assert!(err.contains("client_secret"), "{err}");
    }

    #[test]
    fn the_example_config_parses_and_documents_every_key() {
        let text = include_str!("../config.example.toml");
        let c = Config::parse(Path::new("config.example.toml"), text).unwrap();
        assert_eq!(c.accounts.len(), 2);
        assert_eq!(c.smtp.max_connections_per_mailbox, 3);
        // Every key the file format knows, commented out or not.
        for key in [
            "state_dir",
            "auth_failure_delay",
            "login_timeout",
            "upstream_timeout",
            "idp_timeout",
            "max_connections",
            "shutdown_grace",
            "listen",
            "max_connections_per_mailbox",
            "warm_sessions",
            "warm_idle_timeout",
            "pool_wait",
            "pool_idle_timeout",
            "client_idle_timeout",
            "kind",
            "tenant",
            "client_id",
            "client_secret",
            "client_secret_file",
            "authorize_url",
            "token_url",
            "device_code_url",
            "redirect_uri",
            "scopes",
            "imap_server",
            "imap_tls",
            "smtp_server",
            "smtp_tls",
            "ca_file",
            "username",
            "password_hash",
            "password",
            "provider",
            "mailbox",
            "flow",
            "tls_listen",
            "starttls",
            "require_tls",
            "cert_file",
            "key_file",
            "names",
            "console",
            "console_allow_loopback_without_password",
            "public_url",
            "notify_command",
            "notify_url",
            "notify_ca_file",
            "notify_repeat",
            "notify_timeout",
            "url",
            "url_file",
            "schema",
            "sign_in_user",
            "send_via",
            "graph_url",
        ] {
            assert!(
                text.lines()
                    .any(|l| l.trim_start_matches("# ").starts_with(&format!("{key} "))),
                "config.example.toml does not document `{key}`"
            );
        }
    }

    #[test]
    fn each_kind_brings_its_endpoints_and_custom_needs_them_given() {
        let ms = ProviderKind::Microsoft.defaults("contoso.com");
        assert_eq!(
            ms.device_code_url.as_deref(),
            Some("https://login.microsoftonline.com/contoso.com/oauth2/v2.0/devicecode")
        );
        assert_eq!(
            ProviderKind::Google.defaults("ignored").imap_server,
            Some("imap.gmail.com:993")
        );
        assert_eq!(
            ProviderKind::Custom.defaults("ignored"),
            ProviderDefaults::default()
        );
        let err = parse(&MINIMAL.replace(
            "client_id = \"abc\"",
            "client_id = \"abc\"\nkind = \"custom\"",
        ))
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("providers.contoso.authorize_url")
                && err.contains("is required for kind = \"custom\""),
            "{err}"
        );
    }

    #[test]
    fn tls_listeners_need_a_tls_section_and_files_come_in_pairs() {
        let err = parse(&format!(
            "[imap]\ntls_listen = \"127.0.0.1:1993\"\n{MINIMAL}"
        ))
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("`imap.tls_listen`: needs a [tls] section"),
            "{err}"
        );
        let err = parse(&format!("[tls]\ncert_file = \"/c.pem\"\n{MINIMAL}"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("`tls.key_file`: is missing"), "{err}");
        let err = parse(&format!("[smtp]\nrequire_tls = true\n{MINIMAL}"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`smtp.require_tls`: needs a [tls] section"),
            "{err}"
        );
        let c = parse(&format!(
            "[smtp]\ntls_listen = \"127.0.0.1:1465\"\n[tls]\n{MINIMAL}"
        ))
        .unwrap();
        let tls = c.tls.unwrap();
        assert_eq!(tls.names, DEFAULT_TLS_NAMES);
        assert!(c.smtp.starttls && !c.smtp.require_tls && c.imap.starttls);
        assert!(tls.files().is_none());
        assert!(parse(MINIMAL).unwrap().tls.is_none());
    }

    #[cfg(unix)]
    #[test]
    fn a_config_others_may_read_with_an_inline_secret_is_warned_about() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        let load = |text: &str, mode: u32| {
            std::fs::write(&path, text).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            exposed_secret_warning(&Config::load(&path).unwrap())
        };
        let warning = load(MINIMAL, 0o644).expect("a warning");
        assert!(
            warning.contains("provider `contoso`")
                && warning.contains("(mode 0644)")
                && warning.contains(&format!("run `chmod 600 {}`", path.display()))
                && warning.contains("client_secret_file"),
            "{warning}"
        );
        assert!(!warning.contains("s3cret"), "{warning}");
        assert_eq!(load(MINIMAL, 0o600), None);
        assert_eq!(load(MINIMAL, 0o640), None, "the proxy's own group");
        let secret = dir.path().join("secret");
        std::fs::write(&secret, "s3cret").unwrap();
        let from_file = MINIMAL.replace(
            "client_secret = \"s3cret\"",
            &format!("client_secret_file = \"{}\"", secret.display()),
        );
        assert_eq!(load(&from_file, 0o644), None);
    }

    #[cfg(unix)]
    #[test]
    fn a_config_others_may_read_with_a_webhook_url_is_warned_about() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        let secret = dir.path().join("secret");
        std::fs::write(&secret, "s3cret").unwrap();
        let from_file = MINIMAL.replace(
            "client_secret = \"s3cret\"",
            &format!("client_secret_file = \"{}\"", secret.display()),
        );
        let webhook = "[admin]\nnotify_url = \"https://hooks.example.com/T/B/hook-key\"\n";
        let load = |text: &str, mode: u32| {
            std::fs::write(&path, text).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            exposed_secret_warning(&Config::load(&path).unwrap())
        };
        let warning = load(&format!("{webhook}{from_file}"), 0o644).expect("a warning");
        assert!(
            warning.contains("admin.notify_url")
                && warning.contains("(mode 0644)")
                && warning.contains(&format!("run `chmod 600 {}`", path.display())),
            "{warning}"
        );
        assert!(!warning.contains("hook-key"), "{warning}");
        assert!(!warning.contains("client_secret_file"), "{warning}");
        assert_eq!(load(&format!("{webhook}{from_file}"), 0o600), None);

        let both = load(&format!("{webhook}{MINIMAL}"), 0o644).expect("a warning");
        assert!(
            both.contains("provider `contoso`")
                && both.contains("admin.notify_url")
                && both.contains("client_secret_file"),
            "{both}"
        );
        assert!(
            !both.contains("hook-key") && !both.contains("s3cret"),
            "{both}"
        );
    }

    #[test]
    fn server_addr_parses_host_and_port() {
        assert_eq!(
            parse_server_addr("[::1]:993"),
            Some(ServerAddr {
                host: "::1".into(),
                port: 993
            })
        );
        assert_eq!(parse_server_addr("example.com"), None);
        assert_eq!(parse_server_addr("example.com:0"), None);
    }
}
