//! One IMAP client connection: the pre-authentication dialogue (the proxy is
//! the server), then the relay.
//!
//! The pre-login CAPABILITY is the proxy's own: Outlook may advertise
//! LOGINDISABLED with only AUTH=XOAUTH2, which would make clients refuse to
//! log in; and STARTTLS is never offered, because clients upgrade
//! opportunistically and the proxy listens on loopback in the clear.

use std::sync::Arc;

use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tracing::{debug, info};

use super::framing::{FrameError, read_command};
use super::parser::{self, Command};
use super::upstream::{self, ImapUpstream};
use crate::config::Account;
use crate::lines::{LineError, read_line, trim_eol};
use crate::login::{self, LoginError};
use crate::sasl::{self, SaslEnd};
use crate::secret::Secret;
use crate::shared::Shared;
use crate::upstream::UpstreamError;

/// What the proxy offers before login.
pub const CAPABILITIES: &str = "IMAP4rev1 LITERAL+ SASL-IR ID AUTH=PLAIN AUTH=LOGIN";

/// Syntax errors and unknown commands tolerated before the connection is closed.
const MAX_ERRORS: u32 = 10;
/// Failed logins tolerated on one connection.
const MAX_FAILED_LOGINS: u32 = 3;

/// Serves one client connection to the end.
pub async fn run(shared: Arc<Shared>, stream: TcpStream) {
    let mut session = PreAuth {
        client: BufReader::new(stream),
        shared,
        errors: 0,
        failed_logins: 0,
    };
    let upstream = match session.dialogue().await {
        Ok(Some(upstream)) => upstream,
        Ok(None) => return,
        Err(e) => {
            debug!("client connection failed: {}", crate::error::io_reason(&e));
            return;
        }
    };
    if let Err(e) = crate::relay::splice("imap", session.client, upstream.stream).await {
        debug!("relay ended: {}", crate::error::io_reason(&e));
    }
}

struct PreAuth {
    client: BufReader<TcpStream>,
    shared: Arc<Shared>,
    errors: u32,
    failed_logins: u32,
}

impl PreAuth {
    async fn send(&mut self, text: &str) -> std::io::Result<()> {
        let stream = self.client.get_mut();
        stream.write_all(text.as_bytes()).await?;
        stream.flush().await
    }

    async fn bye(&mut self, text: &str) -> std::io::Result<Option<ImapUpstream>> {
        self.send(&format!("* BYE {text}\r\n")).await?;
        let _ = self.client.get_mut().shutdown().await;
        Ok(None)
    }

    /// Runs the dialogue until the client logs in (the upstream session is
    /// returned) or the connection is to be closed (`None`).
    async fn dialogue(&mut self) -> std::io::Result<Option<ImapUpstream>> {
        self.send(&format!(
            "* OK [CAPABILITY {CAPABILITIES}] xoauth2-proxy ready\r\n"
        ))
        .await?;
        let login_timeout = self.shared.config.server.login_timeout;
        let mut buf = Vec::new();
        loop {
            let framed =
                tokio::time::timeout(login_timeout, read_command(&mut self.client, &mut buf)).await;
            match framed {
                Err(_) => {
                    info!(
                        "client sent nothing for {}; closing",
                        humantime::format_duration(login_timeout)
                    );
                    return self.bye("Autologout; idle for too long").await;
                }
                Ok(Err(FrameError::Closed)) => return Ok(None),
                Ok(Err(FrameError::Io(e))) => return Err(e),
                Ok(Err(FrameError::TooLong)) => {
                    info!("client sent an overlong command; closing");
                    self.send("* BAD Command line too long\r\n").await?;
                    return self.bye("Too much data before login").await;
                }
                Ok(Err(FrameError::LiteralRefused { line })) => {
                    let tag = parser::leading_tag(&line).unwrap_or_else(|| "*".into());
                    self.send(&format!("{tag} BAD Literal too large\r\n"))
                        .await?;
                    if self.count_error() {
                        return self.bye("Too many errors").await;
                    }
                    continue;
                }
                Ok(Ok(())) => {}
            }

            let request = match parser::command(&buf) {
                Ok((_, request)) => request,
                Err(_) => {
                    let tag = parser::leading_tag(&buf).unwrap_or_else(|| "*".into());
                    self.send(&format!("{tag} BAD Syntax error\r\n")).await?;
                    if self.count_error() {
                        return self.bye("Too many errors").await;
                    }
                    continue;
                }
            };
            let tag = request.tag;
            match request.command {
                Command::Capability => {
                    self.send(&format!(
                        "* CAPABILITY {CAPABILITIES}\r\n{tag} OK CAPABILITY completed\r\n"
                    ))
                    .await?
                }
                Command::Noop => self.send(&format!("{tag} OK NOOP completed\r\n")).await?,
                Command::Logout => {
                    self.send(&format!("* BYE Logging out\r\n{tag} OK LOGOUT completed\r\n"))
                        .await?;
                    return Ok(None);
                }
                Command::Id => {
                    self.send(&format!(
                        "* ID (\"name\" \"xoauth2-proxy\" \"version\" \"{}\")\r\n{tag} OK ID completed\r\n",
                        env!("CARGO_PKG_VERSION")
                    ))
                    .await?
                }
                Command::StartTls => {
                    self.send(&format!("{tag} BAD STARTTLS is not offered\r\n")).await?
                }
                Command::Login { username, password } => {
                    let Ok(username) = String::from_utf8(username) else {
                        self.send(&format!("{tag} NO [AUTHENTICATIONFAILED] Authentication failed\r\n"))
                            .await?;
                        continue;
                    };
                    if let Some(upstream) = self.login(&tag, "LOGIN", &username, &password).await? {
                        return Ok(Some(upstream));
                    }
                }
                Command::Authenticate {
                    mechanism,
                    initial_response,
                } => {
                    let credentials = match mechanism.as_str() {
                        "PLAIN" => self.sasl_plain(initial_response).await?,
                        "LOGIN" => self.sasl_login(initial_response).await?,
                        _ => {
                            self.send(&format!(
                                "{tag} NO Unsupported authentication mechanism (use PLAIN or LOGIN)\r\n"
                            ))
                            .await?;
                            continue;
                        }
                    };
                    match credentials {
                        Ok((username, password)) => {
                            if let Some(upstream) =
                                self.login(&tag, "AUTHENTICATE", &username, &password).await?
                            {
                                return Ok(Some(upstream));
                            }
                        }
                        Err(SaslEnd::Cancelled) => {
                            self.send(&format!("{tag} BAD AUTHENTICATE cancelled\r\n")).await?
                        }
                        Err(SaslEnd::Malformed) => {
                            self.send(&format!("{tag} BAD Invalid SASL response\r\n")).await?;
                            if self.count_error() {
                                return self.bye("Too many errors").await;
                            }
                        }
                    }
                }
                Command::Other(name) => {
                    self.send(&format!("{tag} BAD {name} is not valid before login\r\n"))
                        .await?;
                    if self.count_error() {
                        return self.bye("Too many errors").await;
                    }
                }
            }
            if self.failed_logins >= MAX_FAILED_LOGINS {
                return self.bye("Too many failed logins").await;
            }
        }
    }

    /// Counts an error; true when the client has made too many.
    fn count_error(&mut self) -> bool {
        self.errors += 1;
        self.errors >= MAX_ERRORS
    }

    /// Logs in upstream; on success tells the client OK with the upstream's
    /// capabilities and returns the session, else tells it why not.
    async fn login(
        &mut self,
        tag: &str,
        command: &str,
        username: &str,
        password: &[u8],
    ) -> std::io::Result<Option<ImapUpstream>> {
        let shared = self.shared.clone();
        let (accounts, tokens) = (&shared.accounts, &shared.tokens);
        let delay = shared.config.server.auth_failure_delay;
        let open = |account, token| open_upstream(shared.clone(), account, token);
        let outcome = login::login(accounts, delay, tokens, username, password, open).await;
        crate::metrics::get().login("imap", &outcome);
        let answer = match outcome {
            Ok((_, upstream)) => {
                self.send(&format!(
                    "{tag} OK [CAPABILITY {}] {command} completed\r\n",
                    upstream.capabilities
                ))
                .await?;
                return Ok(Some(upstream));
            }
            Err(LoginError::BadCredentials | LoginError::NotAuthorised) => {
                "NO [AUTHENTICATIONFAILED] Authentication failed".to_string()
            }
            Err(LoginError::Refused) => {
                "NO [AUTHENTICATIONFAILED] The identity provider refused the proxy's app registration; see the proxy's log".to_string()
            }
            Err(LoginError::UpstreamRejected(reply)) => {
                format!("NO [AUTHENTICATIONFAILED] The mail server refused the login: {reply}")
            }
            Err(LoginError::IdpUnavailable | LoginError::UpstreamUnavailable) => {
                "NO [UNAVAILABLE] The mail server or identity provider is unavailable; try again later".to_string()
            }
        };
        self.failed_logins += 1;
        self.send(&format!("{tag} {answer}\r\n")).await?;
        Ok(None)
    }

    /// Reads one SASL response line (base64, or `*` to cancel).
    async fn sasl_response(&mut self, prompt: &str) -> std::io::Result<Result<Vec<u8>, SaslEnd>> {
        self.send(&format!("+ {prompt}\r\n")).await?;
        let mut line = Vec::new();
        let read = tokio::time::timeout(
            self.shared.config.server.login_timeout,
            read_line(&mut self.client, &mut line, super::framing::MAX_COMMAND),
        )
        .await;
        match read {
            Ok(Ok(())) => {}
            Ok(Err(LineError::Io(e))) => return Err(e),
            Ok(Err(LineError::Closed)) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            Ok(Err(LineError::TooLong)) | Err(_) => return Ok(Err(SaslEnd::Malformed)),
        }
        Ok(sasl::decode(trim_eol(&line)))
    }

    /// RFC 4616: `[authzid] NUL authcid NUL passwd`.
    async fn sasl_plain(
        &mut self,
        initial: Option<Vec<u8>>,
    ) -> std::io::Result<Result<(String, Vec<u8>), SaslEnd>> {
        let message = match initial {
            Some(ir) => sasl::decode(&ir),
            None => self.sasl_response("").await?,
        };
        Ok(message.and_then(|m| sasl::parse_plain(&m)))
    }

    /// The LOGIN mechanism: username, then password, each on request.
    async fn sasl_login(
        &mut self,
        initial: Option<Vec<u8>>,
    ) -> std::io::Result<Result<(String, Vec<u8>), SaslEnd>> {
        let username = match initial {
            Some(ir) => sasl::decode(&ir),
            None => self.sasl_response(sasl::LOGIN_USERNAME_PROMPT).await?,
        };
        let username = match sasl::login_username(username) {
            Ok(u) => u,
            Err(e) => return Ok(Err(e)),
        };
        let password = self.sasl_response(sasl::LOGIN_PASSWORD_PROMPT).await?;
        Ok(password.map(|p| (username, p)))
    }
}

/// Opens `account`'s mailbox upstream with `token` and the handles of the
/// config in force.
async fn open_upstream(
    shared: Arc<Shared>,
    account: Account,
    token: Secret,
) -> Result<ImapUpstream, UpstreamError> {
    let provider = shared.config.provider(&account.provider);
    let timeout = shared.config.server.upstream_timeout;
    upstream::open(&shared.tls, provider, timeout, &account.mailbox, &token).await
}
