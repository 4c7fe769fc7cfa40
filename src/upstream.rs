//! Connections to the real mail servers: TCP, TLS with verified certificates,
//! and the XOAUTH2 string. Shared by IMAP and SMTP.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use base64::Engine;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::config::{Config, Provider, ServerAddr};
use crate::secret::Secret;

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

/// One TLS client setup per provider: system roots plus its `ca_file`.
/// Certificates are always verified; nothing turns that off.
pub struct UpstreamTls {
    connectors: HashMap<String, TlsConnector>,
}

impl UpstreamTls {
    pub fn new(config: &Config) -> Result<Self, String> {
        let mut connectors = HashMap::new();
        for (name, provider) in &config.providers {
            let tls = client_config(provider.ca_file.as_deref())
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
            UpstreamError::Unreachable(format!(
                "TLS with {server} failed: {}",
                crate::error::chain(&e)
            ))
        })
    }
}

/// The rustls client configuration: the system's trust anchors plus the
/// certificates in `ca_file`.
pub fn client_config(ca_file: Option<&Path>) -> Result<Arc<rustls::ClientConfig>, String> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in system_roots() {
        let _ = roots.add(cert.clone());
    }
    if let Some(path) = ca_file {
        for cert in load_ca_file(path)? {
            roots
                .add(cert)
                .map_err(|e| format!("{}: {e}", path.display()))?;
        }
    }
    if roots.is_empty() {
        return Err(
            "no trusted CA certificates found: install the system CA bundle or set `ca_file`"
                .into(),
        );
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

fn system_roots() -> &'static [CertificateDer<'static>] {
    static ROOTS: OnceLock<Vec<CertificateDer<'static>>> = OnceLock::new();
    ROOTS.get_or_init(|| rustls_native_certs::load_native_certs().certs)
}

/// Reads the PEM certificates in `path`; at least one is required.
pub fn load_ca_file(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let pem = std::fs::read(path).map_err(|e| {
        format!(
            "cannot read {}: {}",
            path.display(),
            crate::error::io_reason(&e)
        )
    })?;
    let certs: Vec<_> = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{} is not PEM: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{} holds no PEM certificate", path.display()));
    }
    Ok(certs)
}

/// The SASL XOAUTH2 initial response, base64-encoded:
/// `user=<mailbox>^Aauth=Bearer <token>^A^A`. It holds the token: never log it.
pub fn xoauth2(mailbox: &str, token: &Secret) -> Secret {
    let raw = format!("user={mailbox}\x01auth=Bearer {}\x01\x01", token.expose());
    Secret::new(base64::engine::general_purpose::STANDARD.encode(raw))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xoauth2_string_has_microsofts_shape() {
        let b64 = xoauth2("shared@contoso.com", &Secret::new("tok".into()));
        let raw = base64::engine::general_purpose::STANDARD
            .decode(b64.expose())
            .unwrap();
        assert_eq!(raw, b"user=shared@contoso.com\x01auth=Bearer tok\x01\x01");
    }
}
