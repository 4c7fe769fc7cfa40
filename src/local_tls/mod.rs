//! TLS towards the clients: the certificate the proxy's listeners present,
//! and the handshake that puts TLS under a client connection.
//!
//! With `[tls] cert_file` and `key_file` the proxy presents those files;
//! without them it presents a server certificate for `[tls] names` that it
//! made itself and signed with its own CA (`ca`), which clients are told to
//! trust (`xoauth2-proxy tls ca`). Either way the files are read when the
//! config is loaded, so a reload (SIGHUP) picks up a renewed certificate for
//! new connections, and a file that cannot be used refuses the reload while
//! the certificate in force stays.

mod ca;
mod certificate;

pub use ca::RENEW_BEFORE;
pub use certificate::Certificate;
use certificate::{parse_chain, parse_key, read_chain, read_key, summarise};

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

use crate::config::{Config, TlsSection};

/// The certificate in force for client connections.
pub struct LocalTls {
    acceptor: TlsAcceptor,
    certificate: Certificate,
    /// Whether the proxy made the certificate (and so renews it).
    self_made: bool,
}

impl LocalTls {
    /// The certificate `config` asks for, read (or made) now; `None`
    /// without a `[tls]` section.
    pub fn load(config: &Config) -> Result<Option<LocalTls>, String> {
        let Some(tls) = &config.tls else {
            return Ok(None);
        };
        let (chain, key, path, self_made) = match tls.files() {
            Some((cert_file, key_file)) => {
                let chain = read_chain(cert_file)?;
                let key = read_key(key_file)?;
                (chain, key, cert_file.to_path_buf(), false)
            }
            None => {
                let dir = ca::Dir::new(&crate::config::state_dir(config));
                let issued = dir.server_certificate(&tls.names, SystemTime::now())?;
                let chain = parse_chain(&issued.chain_pem, dir.server_path())?;
                let key = parse_key(&issued.key_pem, dir.server_key_path())?;
                (chain, key, dir.server_path().to_path_buf(), true)
            }
        };
        let certificate = summarise(&chain[0], &path)?;
        let acceptor = acceptor(chain, key, tls)?;
        Ok(Some(LocalTls {
            acceptor,
            certificate,
            self_made,
        }))
    }

    pub fn certificate(&self) -> &Certificate {
        &self.certificate
    }

    /// Whether the proxy should make a new server certificate by `now`:
    /// only its own, and only in the last [`RENEW_BEFORE`] of its life.
    pub fn renewal_due(&self, now: SystemTime) -> bool {
        self.self_made && self.certificate.not_after < now + RENEW_BEFORE
    }

    /// Runs the server side of the TLS handshake on `io`, within `timeout`.
    /// The error is a sentence for the log.
    pub async fn accept<IO>(&self, io: IO, timeout: Duration) -> Result<TlsStream<IO>, String>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        match tokio::time::timeout(timeout, self.acceptor.accept(io)).await {
            Ok(Ok(stream)) => Ok(stream),
            Ok(Err(e)) => Err(format!(
                "TLS handshake with the client failed: {}",
                crate::error::chain(&e)
            )),
            Err(_) => Err(format!(
                "the client did not complete the TLS handshake within {}",
                humantime::format_duration(timeout)
            )),
        }
    }
}

/// STARTTLS: puts TLS under `client`, whose STARTTLS command has just been
/// answered. Whatever the client sent after that command and the proxy has
/// already read (`pipelined` bytes) is plaintext that an attacker on the
/// path may have injected (CVE-2011-0411): the caller drops it with its
/// buffer, never reads it as a command, and it is reported here.
pub async fn start_tls<S>(
    tls: &LocalTls,
    client: S,
    pipelined: usize,
    timeout: Duration,
) -> Result<TlsStream<S>, String>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    if pipelined > 0 {
        tracing::warn!(
            "discarded {pipelined} bytes the client sent after STARTTLS in plaintext (never executed)"
        );
    }
    tls.accept(client, timeout).await
}

/// The CA certificate (PEM) clients must trust, for `xoauth2-proxy tls ca`:
/// made first if the proxy has none yet.
pub fn ca_certificate_pem(config: &Config) -> Result<String, String> {
    let Some(tls) = &config.tls else {
        return Err(format!(
            "{} has no [tls] section, so the proxy serves no TLS and has no CA; add `[tls]` (without cert_file and key_file the proxy makes its own CA)",
            config.path.display()
        ));
    };
    if let Some((cert_file, _)) = tls.files() {
        return Err(format!(
            "the proxy did not make a CA: `tls.cert_file` ({}) is presented as configured; clients must trust the CA that issued that certificate",
            cert_file.display()
        ));
    }
    ca::Dir::new(&crate::config::state_dir(config)).ca_pem()
}

/// The server certificate that `serve` presents (or will present), for
/// `xoauth2-proxy status`, without making anything: `Ok(None)` without
/// `[tls]` or before the proxy has made its own.
pub fn current_certificate(config: &Config) -> Result<Option<Certificate>, String> {
    let Some(tls) = &config.tls else {
        return Ok(None);
    };
    let path = match tls.files() {
        Some((cert_file, _)) => cert_file.to_path_buf(),
        None => {
            let dir = ca::Dir::new(&crate::config::state_dir(config));
            if !dir.server_path().exists() {
                return Ok(None);
            }
            dir.server_path().to_path_buf()
        }
    };
    let chain = read_chain(&path)?;
    summarise(&chain[0], &path).map(Some)
}

fn acceptor(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    tls: &TlsSection,
) -> Result<TlsAcceptor, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("cannot set up TLS ({e}); please report this as a bug"))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| match tls.files() {
            Some((cert_file, key_file)) => format!(
                "`tls.key_file` ({}) cannot be used with `tls.cert_file` ({}): {e}; give the private key of that certificate, PKCS#8 PEM",
                key_file.display(),
                cert_file.display()
            ),
            None => format!(
                "the proxy's own certificate cannot be used ({e}); delete the server*.pem files under the state directory's tls/ folder and start again"
            ),
        })?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn config(state: &Path, extra: &str) -> Config {
        let text = format!(
            "[server]\nstate_dir = \"{}\"\n\n[tls]\n{extra}\n",
            state.display()
        );
        Config::parse(Path::new("/etc/x.toml"), &text).unwrap()
    }

    #[test]
    fn self_made_certificate_covers_the_names_and_is_kept_across_loads() {
        let dir = tempfile::tempdir().unwrap();
        let config = config(dir.path(), "names = [\"mail.internal\", \"10.0.0.7\"]");
        let first = LocalTls::load(&config).unwrap().unwrap();
        assert_eq!(first.certificate().names, ["mail.internal", "10.0.0.7"]);
        assert!(!first.renewal_due(SystemTime::now()));
        assert!(first.renewal_due(SystemTime::now() + Duration::from_secs(340 * 86_400)));
        let again = LocalTls::load(&config).unwrap().unwrap();
        assert_eq!(again.certificate(), first.certificate(), "not made twice");
        assert_eq!(
            current_certificate(&config).unwrap().as_ref(),
            Some(first.certificate())
        );
        assert!(
            ca_certificate_pem(&config)
                .unwrap()
                .starts_with("-----BEGIN CERTIFICATE-----")
        );
    }

    #[test]
    fn supplied_files_that_cannot_be_used_are_named_in_one_sentence() {
        let dir = tempfile::tempdir().unwrap();
        let cert = dir.path().join("cert.pem");
        let key = dir.path().join("key.pem");
        let files = format!(
            "cert_file = \"{}\"\nkey_file = \"{}\"",
            cert.display(),
            key.display()
        );
        let config = config(dir.path(), &files);
        let err = LocalTls::load(&config).err().unwrap();
        assert!(err.contains("cannot read `tls.cert_file`"), "{err}");
        std::fs::write(&cert, "not a certificate").unwrap();
        let err = LocalTls::load(&config).err().unwrap();
        assert!(err.contains("holds no PEM certificate"), "{err}");
        assert!(
            ca_certificate_pem(&config)
                .unwrap_err()
                .contains("did not make a CA")
        );
    }
}
