//! Connections to the real mail servers: TCP, and TLS with verified
//! certificates. Shared by IMAP and SMTP.

use std::collections::HashMap;
use std::time::Duration;

use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::config::{Config, Provider, ServerAddr};

/// A TLS connection to an upstream server.
pub type UpstreamStream = tokio_rustls::client::TlsStream<TcpStream>;

/// Why an upstream login did not produce a working session.
#[derive(Debug, Clone, thiserror::Error)]
pub enum UpstreamError {
    /// Could not connect, TLS failed, timed out, or the server hung up.
    #[error("{0}")]
    Unreachable(String),
    /// The server refused the XOAUTH2 login or the session after it; `reply`
    /// is the server's own answer (it never contains the token), `hint` what
    /// to change in Exchange or Entra.
    #[error("the server refused the login: {reply} ({hint})")]
    Rejected { reply: String, hint: &'static str },
}

/// One TLS client setup per provider: system roots plus its `ca_file`, whose
/// certificates are also pins (`tls` says how). Certificates are always
/// verified; nothing turns that off.
pub struct UpstreamTls {
    connectors: HashMap<String, TlsConnector>,
}

impl UpstreamTls {
    pub fn new(config: &Config) -> Result<Self, String> {
        let mut connectors = HashMap::new();
        for (name, provider) in &config.providers {
            let tls = crate::tls::client_config(provider.ca_file.as_deref())
                .map_err(|e| format!("provider `{name}`: {e}"))?;
            connectors.insert(name.clone(), TlsConnector::from(tls));
        }
        Ok(UpstreamTls { connectors })
    }

    /// Opens a TCP connection to `server`.
    pub async fn connect(
        &self,
        server: &ServerAddr,
        timeout: Duration,
    ) -> Result<TcpStream, UpstreamError> {
        let started = std::time::Instant::now();
        let connect = TcpStream::connect((server.host.as_str(), server.port));
        match tokio::time::timeout(timeout, connect).await {
            Ok(Ok(stream)) => {
                let _ = stream.set_nodelay(true);
                crate::metrics::get().upstream_connect(&server.to_string(), started.elapsed());
                Ok(stream)
            }
            Ok(Err(e)) => Err(UpstreamError::Unreachable(format!(
                "cannot connect to {server}: {}",
                crate::error::io_reason(&e)
            ))),
            Err(_) => Err(UpstreamError::Unreachable(format!(
                "connecting to {server} timed out"
            ))),
        }
    }

    /// Runs the TLS handshake on `tcp`, verifying `server.host`.
    pub async fn handshake(
        &self,
        provider: &Provider,
        server: &ServerAddr,
        tcp: TcpStream,
    ) -> Result<UpstreamStream, UpstreamError> {
        let connector = &self.connectors[&provider.name];
        let name = ServerName::try_from(server.host.clone()).map_err(|_| {
            UpstreamError::Unreachable(format!("`{}` is not a valid server name", server.host))
        })?;
        connector.connect(name, tcp).await.map_err(|e| {
            let setting = if *server == provider.smtp_server {
                "smtp_server"
            } else {
                "imap_server"
            };
            UpstreamError::Unreachable(format!(
                "TLS with {server} failed: {}",
                crate::tls::handshake_failure(&e, &server.host, setting, &provider.name)
            ))
        })
    }
}

/// The text of an upstream reply to quote in logs and client messages:
/// printable and bounded. Callers never pass SASL challenge lines.
pub fn quote_reply(line: &[u8]) -> String {
    let text = String::from_utf8_lossy(crate::lines::trim_eol(line));
    let mut quoted: String = text
        .chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .take(300)
        .collect();
    if text.chars().count() > 300 {
        quoted.push('…');
    }
    quoted
}
