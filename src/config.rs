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
pub const DELEGATED_SCOPES: &[&str] = &[
    "https://outlook.office.com/IMAP.AccessAsUser.All",
    "https://outlook.office.com/SMTP.Send",
    "offline_access",
];
/// Scope for the client credentials (app-only) flow.
pub const APP_ONLY_SCOPES: &[&str] = &["https://outlook.office365.com/.default"];

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
    /// How long a client may stay silent before it has logged in.
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
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ImapSection {
    pub listen: SocketAddr,
}

impl Default for ImapSection {
    fn default() -> Self {
        ImapSection {
            listen: DEFAULT_IMAP_LISTEN.parse().expect("valid default"),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SmtpSection {
    pub listen: SocketAddr,
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
}

impl Default for AdminSection {
    fn default() -> Self {
        AdminSection {
            listen: DEFAULT_ADMIN_LISTEN.parse().expect("valid default"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProviderKind {
    Microsoft,
    Google,
    Custom,
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
    if raw.smtp.max_connections_per_mailbox == 0 {
        return Err(ConfigError::at(
            path,
            "smtp.max_connections_per_mailbox",
            "must be at least 1",
        ));
    }
    if raw.server.max_connections == 0 {
        return Err(ConfigError::at(
            path,
            "server.max_connections",
            "must be at least 1",
        ));
    }
    let mut providers = BTreeMap::new();
    for (name, p) in raw.providers {
        let provider = validate_provider(path, &name, p)?;
        providers.insert(name, provider);
    }

    let mut seen = HashSet::new();
    let mut accounts = Vec::new();
    for (i, a) in raw.accounts.into_iter().enumerate() {
        let key = |field: &str| format!("accounts[{i}].{field}");
        if a.username.trim().is_empty() {
            return Err(ConfigError::at(path, &key("username"), "must not be empty"));
        }
        if !seen.insert(a.username.to_ascii_lowercase()) {
            return Err(ConfigError::at(
                path,
                &key("username"),
                format!("`{}` is configured twice", a.username),
            ));
        }
        let password = match (a.password_hash, a.password) {
            (Some(hash), None) => {
                argon2::PasswordHash::new(&hash).map_err(|_| {
                    ConfigError::at(
                        path,
                        &key("password_hash"),
                        "is not an argon2 hash string; make one with `xoauth2-proxy hash-password`",
                    )
                })?;
                LocalPassword::Hash(hash)
            }
            (None, Some(plain)) => LocalPassword::Plain(plain),
            (Some(_), Some(_)) => {
                return Err(ConfigError::at(
                    path,
                    &key("password_hash"),
                    "give either password_hash or password, not both",
                ));
            }
            (None, None) => {
                return Err(ConfigError::at(
                    path,
                    &key("password_hash"),
                    "is missing; make one with `xoauth2-proxy hash-password`",
                ));
            }
        };
        let Some(provider) = providers.get(&a.provider) else {
            return Err(ConfigError::at(
                path,
                &key("provider"),
                format!(
                    "no provider `{}` is configured under [providers]",
                    a.provider
                ),
            ));
        };
        if a.flow == Flow::ClientCredentials && provider.client_secret.is_none() {
            return Err(ConfigError::at(
                path,
                &key("flow"),
                format!(
                    "client_credentials needs a client_secret or client_secret_file in provider `{}`",
                    a.provider
                ),
            ));
        }
        if a.flow == Flow::DeviceCode && provider.device_code_url.is_none() {
            return Err(ConfigError::at(
                path,
                &key("flow"),
                format!(
                    "device_code needs device_code_url in provider `{}`",
                    a.provider
                ),
            ));
        }
        if let Some(scopes) = &a.scopes {
            check_scopes(path, &key("scopes"), scopes)?;
        }
        let mailbox = a.mailbox.unwrap_or_else(|| a.username.clone());
        if mailbox.trim().is_empty() {
            return Err(ConfigError::at(path, &key("mailbox"), "must not be empty"));
        }
        accounts.push(Account {
            username: a.username,
            password,
            provider: a.provider,
            mailbox,
            flow: a.flow,
            scopes: a.scopes,
        });
    }

    Ok(Config {
        path: path.to_path_buf(),
        server: raw.server,
        imap: raw.imap,
        smtp: raw.smtp,
        admin: raw.admin,
        providers,
        accounts,
    })
}

fn validate_provider(path: &Path, name: &str, p: RawProvider) -> Result<Provider, ConfigError> {
    let key = |field: &str| format!("providers.{name}.{field}");
    if p.client_id.trim().is_empty() {
        return Err(ConfigError::at(
            path,
            &key("client_id"),
            "must not be empty",
        ));
    }
    let client_secret = match (p.client_secret, p.client_secret_file) {
        (Some(_), Some(_)) => {
            return Err(ConfigError::at(
                path,
                &key("client_secret"),
                "give either client_secret or client_secret_file, not both",
            ));
        }
        (Some(s), None) => Some(s),
        (None, Some(file)) => {
            let text = std::fs::read_to_string(&file).map_err(|e| {
                ConfigError::at(
                    path,
                    &key("client_secret_file"),
                    format!(
                        "cannot read {}: {}",
                        file.display(),
                        crate::error::io_reason(&e)
                    ),
                )
            })?;
            let secret = text.trim();
            if secret.is_empty() {
                return Err(ConfigError::at(
                    path,
                    &key("client_secret_file"),
                    format!("{} is empty", file.display()),
                ));
            }
            Some(Secret::new(secret.to_string()))
        }
        (None, None) => None,
    };

    let tenant = p.tenant.unwrap_or_else(|| "organizations".to_string());
    let (authorize_url, token_url, device_code_url, imap_default, smtp_default) = match p.kind {
        ProviderKind::Microsoft => {
            let base = format!("https://login.microsoftonline.com/{tenant}/oauth2/v2.0");
            (
                Some(format!("{base}/authorize")),
                Some(format!("{base}/token")),
                Some(format!("{base}/devicecode")),
                Some("outlook.office365.com:993"),
                Some("smtp.office365.com:587"),
            )
        }
        ProviderKind::Google => (
            Some("https://accounts.google.com/o/oauth2/v2/auth".to_string()),
            Some("https://oauth2.googleapis.com/token".to_string()),
            Some("https://oauth2.googleapis.com/device/code".to_string()),
            Some("imap.gmail.com:993"),
            Some("smtp.gmail.com:587"),
        ),
        ProviderKind::Custom => (None, None, None, None, None),
    };
    let url = |field: &str, given: Option<String>, default: Option<String>| {
        let Some(url) = given.or(default) else {
            return Ok(None);
        };
        check_url(path, &key(field), &url)?;
        Ok::<_, ConfigError>(Some(url))
    };
    let authorize_url = url("authorize_url", p.authorize_url, authorize_url)?;
    let token_url = url("token_url", p.token_url, token_url)?;
    let device_code_url = url("device_code_url", p.device_code_url, device_code_url)?;
    let redirect_uri = url(
        "redirect_uri",
        p.redirect_uri,
        Some("http://localhost:8400/".to_string()),
    )?
    .expect("has a default");

    let required = |field: &str, v: Option<String>| {
        v.ok_or_else(|| ConfigError::at(path, &key(field), "is required for kind = \"custom\""))
    };
    let authorize_url = required("authorize_url", authorize_url)?;
    let token_url = required("token_url", token_url)?;

    let server = |field: &str, given: Option<String>, default: Option<&str>| {
        let text = given.or(default.map(str::to_string)).ok_or_else(|| {
            ConfigError::at(path, &key(field), "is required for kind = \"custom\"")
        })?;
        parse_server_addr(&text)
            .ok_or_else(|| ConfigError::at(path, &key(field), "must be HOST:PORT"))
    };
    let imap_server = server("imap_server", p.imap_server, imap_default)?;
    let smtp_server = server("smtp_server", p.smtp_server, smtp_default)?;
    let imap_tls = p.imap_tls.unwrap_or(TlsMode::Implicit);
    let smtp_tls = p.smtp_tls.unwrap_or(if smtp_server.port == 465 {
        TlsMode::Implicit
    } else {
        TlsMode::Starttls
    });

    if let Some(scopes) = &p.scopes {
        check_scopes(path, &key("scopes"), scopes)?;
    }
    if let Some(ca) = &p.ca_file {
        crate::tls::load_ca_file(ca).map_err(|e| ConfigError::at(path, &key("ca_file"), e))?;
    }

    Ok(Provider {
        name: name.to_string(),
        kind: p.kind,
        client_id: p.client_id,
        client_secret,
        authorize_url,
        token_url,
        device_code_url,
        redirect_uri,
        scopes: p.scopes,
        imap_server,
        imap_tls,
        smtp_server,
        smtp_tls,
        ca_file: p.ca_file,
    })
}

fn check_scopes(path: &Path, key: &str, scopes: &[String]) -> Result<(), ConfigError> {
    if scopes.is_empty()
        || scopes
            .iter()
            .any(|s| s.trim().is_empty() || s.contains(' '))
    {
        return Err(ConfigError::at(
            path,
            key,
            "must be a non-empty list of scopes without spaces",
        ));
    }
    Ok(())
}

/// URLs must be https, except http to a loopback host (test and local IdPs).
fn check_url(path: &Path, key: &str, url: &str) -> Result<(), ConfigError> {
    let parsed = reqwest::Url::parse(url)
        .map_err(|e| ConfigError::at(path, key, format!("`{url}` is not a URL ({e})")))?;
    match parsed.scheme() {
        "https" => Ok(()),
        "http" if is_loopback_host(parsed.host_str().unwrap_or_default()) => Ok(()),
        _ => Err(ConfigError::at(
            path,
            key,
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
        ] {
            assert!(
                text.lines()
                    .any(|l| l.trim_start_matches("# ").starts_with(&format!("{key} "))),
                "config.example.toml does not document `{key}`"
            );
        }
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
