//! TLS client setup shared by every outgoing connection: the mail servers
//! (`upstream`) and the identity provider's HTTPS (`oauth::provider`). CA
//! files are read here and nowhere else; certificates are always verified.
//!
//! # Pinned certificates
//!
//! Each certificate in a provider's `ca_file` is two things for its mail
//! servers: a trust anchor (a CA whose certificates are accepted, as before)
//! and a pin (a server certificate accepted as it is). On-premises Dovecot or
//! Exchange often present a self-signed certificate, marked CA:TRUE when
//! `openssl req -x509` made it; webpki refuses that as an end entity whatever
//! the trust anchors, so without a pin such a server cannot be reached.
//!
//! The rules, in [`PinningVerifier`]:
//! - every certificate first goes through full webpki verification (chain to
//!   the system roots or `ca_file`, validity dates, the server's name, usage);
//!   what passes is accepted;
//! - what fails is accepted only if the server's own (end-entity) certificate
//!   is byte for byte one in `ca_file`: then neither its name, nor its dates,
//!   nor CA:TRUE matter. The user named exactly this certificate, as curl's
//!   `--pinnedpubkey` or a Thunderbird exception do, and self-made certificates
//!   often carry only a common name, which webpki never matches. The pin gives
//!   away nothing: a server proves it owns the certificate by signing the
//!   handshake with its key (that check always runs), and whoever holds the key
//!   of a CA in `ca_file` could issue itself a certificate for any name anyway;
//! - an expired or not yet valid pin is still accepted (mail keeps flowing;
//!   its key is no less the server's), with a warning once per process,
//!   so that the user renews it;
//! - anything else is refused with webpki's reason, which
//!   [`handshake_failure`] turns into a sentence that says what to do.
//!
//! The identity provider's HTTPS trusts `ca_file` as CAs only.
//!
//! # Session resumption
//!
//! A reconnect to a mail server resumes the last TLS session (a TLS 1.3
//! ticket, or a TLS 1.2 session id) where the server allows it, which skips
//! the certificate and the key exchange's signature. The tickets live in a
//! client config that lives as long as the process, one per set of trusted
//! certificates, so that a reload keeps them, and so that a session
//! verified under one `ca_file` is never resumed under another's trust
//! (rustls itself resumes only under the verifier that verified).

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, SignatureScheme};

/// The rustls client configuration for a provider's mail servers: the
/// system's trust anchors plus the certificates in `ca_file`, which are also
/// pins (see the module doc). The same certificates give the same config,
/// for the life of the process: rustls resumes a TLS session only under the
/// very verifier (the same `Arc`) that verified it, so a reload that reads an
/// unchanged `ca_file` keeps the config, and with it the resumable sessions.
pub fn client_config(ca_file: Option<&Path>) -> Result<Arc<rustls::ClientConfig>, String> {
    use sha2::{Digest, Sha256};
    use std::collections::HashMap;
    use std::sync::Mutex;
    type Configs = Mutex<HashMap<[u8; 32], Arc<rustls::ClientConfig>>>;
    static CONFIGS: OnceLock<Configs> = OnceLock::new();
    let pins = match ca_file {
        Some(path) => load_ca_file(path)?,
        None => Vec::new(),
    };
    let mut trust = Sha256::new();
    for pin in &pins {
        trust.update((pin.len() as u64).to_be_bytes());
        trust.update(pin);
    }
    let key: [u8; 32] = trust.finalize().into();
    let mut configs = CONFIGS
        .get_or_init(Configs::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if let Some(config) = configs.get(&key) {
        return Ok(config.clone());
    }
    let config = new_client_config(ca_file, pins)?;
    configs.insert(key, config.clone());
    Ok(config)
}

/// TLS sessions remembered per mail server name, at most this many per config.
const RESUMABLE_SESSIONS: usize = 256;

fn new_client_config(
    ca_file: Option<&Path>,
    pins: Vec<CertificateDer<'static>>,
) -> Result<Arc<rustls::ClientConfig>, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = PinningVerifier::new(ca_file, pins, provider.clone())?;
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("cannot set up TLS ({e}); please report this as a bug"))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    config.resumption = rustls::client::Resumption::in_memory_sessions(RESUMABLE_SESSIONS);
    Ok(Arc::new(config))
}

/// Full webpki verification, and the pins of `ca_file` for what it refuses.
#[derive(Debug)]
struct PinningVerifier {
    webpki: Arc<WebPkiServerVerifier>,
    pins: Vec<Pin>,
}

#[derive(Debug)]
struct Pin {
    der: CertificateDer<'static>,
    /// Whether its dates have been warned about (once per process).
    warned: AtomicBool,
}

impl PinningVerifier {
    fn new(
        ca_file: Option<&Path>,
        ca_certificates: Vec<CertificateDer<'static>>,
        provider: Arc<rustls::crypto::CryptoProvider>,
    ) -> Result<Self, String> {
        let mut roots = rustls::RootCertStore::empty();
        for cert in system_roots() {
            let _ = roots.add(cert.clone());
        }
        let mut pins = Vec::new();
        if let Some(path) = ca_file {
            for cert in ca_certificates {
                roots.add(cert.clone()).map_err(|e| {
                    format!(
                        "{} holds a certificate rustls cannot use ({e}); put the CA's or the server's PEM certificate in `ca_file`",
                        path.display()
                    )
                })?;
                pins.push(Pin {
                    der: cert,
                    warned: AtomicBool::new(false),
                });
            }
        }
        if roots.is_empty() {
            return Err(
                "no trusted CA certificates found: install the system CA bundle or set `ca_file`"
                    .into(),
            );
        }
        let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .map_err(|e| format!("cannot set up TLS ({e}); please report this as a bug"))?;
        Ok(PinningVerifier { webpki, pins })
    }
}

impl ServerCertVerifier for PinningVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let refusal = match self.webpki.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        ) {
            Ok(verified) => return Ok(verified),
            Err(refusal) => refusal,
        };
        let Some(pin) = self.pins.iter().find(|pin| pin.der == *end_entity) else {
            return Err(refusal);
        };
        if let rustls::Error::InvalidCertificate(e) = &refusal
            && let Some(dates) = out_of_date(e)
            && !pin.warned.swap(true, Ordering::Relaxed)
        {
            tracing::warn!(
                "the certificate of {} {dates}; it is accepted because `ca_file` pins exactly this certificate, but renew it on the server and put the new one in `ca_file`",
                server_name.to_str()
            );
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}

/// What to do about a failed TLS handshake with a mail server, as the rest of
/// the sentence "TLS with HOST:PORT failed: …". `setting` is the config key
/// that names the server (`imap_server`), `provider` the provider's name.
pub fn handshake_failure(
    error: &std::io::Error,
    host: &str,
    setting: &str,
    provider: &str,
) -> String {
    match error
        .get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>())
    {
        Some(rustls::Error::InvalidCertificate(e)) => {
            certificate_advice(e, host, setting, provider)
        }
        _ => crate::error::chain(error),
    }
}

fn certificate_advice(e: &CertificateError, host: &str, setting: &str, provider: &str) -> String {
    let ca_file = format!("`ca_file` of provider `{provider}`");
    if let Some(dates) = out_of_date(e) {
        return format!(
            "the server's certificate {dates}; renew it on the server, or correct this machine's clock if that is wrong"
        );
    }
    match e {
        CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
            match certificate_names(e).as_slice() {
                [] => format!(
                    "the server's certificate is not valid for `{host}` (it has no subject alternative names); pin the certificate in {ca_file}"
                ),
                names => format!(
                    "the server's certificate is not valid for `{host}` (it names {}); set `{setting}` of provider `{provider}` to one of those names, or pin the certificate in {ca_file}",
                    names.join(", ")
                ),
            }
        }
        CertificateError::UnknownIssuer => format!(
            "the server's certificate is not signed by a CA this proxy trusts; add the server's CA, or the server's own certificate as a pin, to {ca_file}"
        ),
        CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. } => {
            format!(
                "the server's certificate is not meant for TLS servers (its extended key usage lacks serverAuth); reissue it, or pin it in {ca_file}"
            )
        }
        CertificateError::Other(other)
            if matches!(
                other.0.downcast_ref::<webpki::Error>(),
                Some(webpki::Error::CaUsedAsEndEntity)
            ) =>
        {
            format!(
                "the server presents a CA certificate (CA:TRUE, as `openssl req -x509` makes by default) as its own; to trust exactly this certificate, pin it: put it in {ca_file}"
            )
        }
        CertificateError::BadSignature => format!(
            "a signature in the server's certificate or handshake does not verify: the certificate is damaged, or the server lacks its key (someone may be intercepting the connection); check that `{setting}` of provider `{provider}` points at the right server"
        ),
        other => format!(
            "the server's certificate was refused ({other}); have it fixed on the server, or pin it in {ca_file}"
        ),
    }
}

/// The names a certificate refused for its name holds, as far as rustls
/// reports them (formatted with Debug: `DnsName("a")`, `IpAddress(127.0.0.1)`).
fn certificate_names(e: &CertificateError) -> Vec<&str> {
    let CertificateError::NotValidForNameContext { presented, .. } = e else {
        return Vec::new();
    };
    presented
        .iter()
        .map(|name| {
            let name = name.as_str();
            name.strip_prefix("DnsName(\"")
                .and_then(|n| n.strip_suffix("\")"))
                .or_else(|| name.strip_prefix("IpAddress(")?.strip_suffix(')'))
                .unwrap_or(name)
        })
        .collect()
}

/// "expired on 2021-01-01" or "is valid only from …", for a certificate
/// refused for its dates.
fn out_of_date(e: &CertificateError) -> Option<String> {
    match e {
        CertificateError::ExpiredContext { not_after, .. } => {
            Some(format!("expired on {}", date(*not_after)))
        }
        CertificateError::Expired => Some("has expired".into()),
        CertificateError::NotValidYetContext { not_before, .. } => {
            Some(format!("is valid only from {}", date(*not_before)))
        }
        CertificateError::NotValidYet => Some("is not valid yet".into()),
        _ => None,
    }
}

/// The UTC day of `time`, as 2021-01-01.
fn date(time: UnixTime) -> String {
    let at = std::time::UNIX_EPOCH + std::time::Duration::from_secs(time.as_secs());
    let mut text = humantime::format_rfc3339_seconds(at).to_string();
    text.truncate(10);
    text
}

fn system_roots() -> &'static [CertificateDer<'static>] {
    static ROOTS: OnceLock<Vec<CertificateDer<'static>>> = OnceLock::new();
    ROOTS.get_or_init(|| rustls_native_certs::load_native_certs().certs)
}

/// Reads the PEM certificates in `path`; at least one is required.
pub fn load_ca_file(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let pem = std::fs::read(path).map_err(|e| {
        format!(
            "cannot read {}: {}; check the path given and the file's permissions",
            path.display(),
            crate::error::io_reason(&e)
        )
    })?;
    pem_certificates(&pem).map_err(|e| match e {
        PemError::NotPem(e) => format!(
            "{} is not PEM ({e}); the file must hold the CA's certificates in PEM",
            path.display()
        ),
        PemError::Empty => format!(
            "{} holds no PEM certificate; the file must hold at least one CA certificate in PEM",
            path.display()
        ),
    })
}

/// Why a PEM file gave no certificate. The callers name their own setting
/// in the sentence, so it is an enum they turn into one.
#[derive(Debug)]
pub enum PemError {
    NotPem(std::io::Error),
    Empty,
}

/// Every certificate in `pem`, in order; at least one.
pub fn pem_certificates(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, PemError> {
    let certs: Vec<_> = rustls_pemfile::certs(&mut &pem[..])
        .collect::<Result<_, _>>()
        .map_err(PemError::NotPem)?;
    if certs.is_empty() {
        return Err(PemError::Empty);
    }
    Ok(certs)
}

/// An HTTPS client for the identity provider, Microsoft Graph and the
/// notification webhook: system roots plus `ca_file` (the webhook's:
/// `admin.notify_ca_file`), no redirects followed, every phase within
/// `timeout`.
pub fn https_client(
    ca_file: Option<&Path>,
    timeout: std::time::Duration,
) -> Result<reqwest::Client, String> {
    let mut http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(timeout)
        .connect_timeout(timeout)
        .user_agent(concat!("xoauth2-proxy/", env!("CARGO_PKG_VERSION")));
    if let Some(ca) = ca_file {
        for der in load_ca_file(ca)? {
            let cert = reqwest::Certificate::from_der(&der).map_err(|e| {
                format!(
                    "{} holds a certificate the HTTPS client cannot use ({e}); put the CA's certificate there in PEM",
                    ca.display()
                )
            })?;
            http = http.add_root_certificate(cert);
        }
    }
    http.build().map_err(|e| {
        format!(
            "cannot set up HTTPS: {}; check `ca_file`, else please report this as a bug",
            crate::error::chain(&e)
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use testkit::pki::{ServerCert, TestPki};

    /// The client's verdict on a TLS handshake, run in memory, between the
    /// proxy's setup for a `ca_file` holding `pems` and `server`, reached as
    /// `name`: `None` when it is accepted, else the sentence the user reads.
    fn verdict(pems: &[&str], server: Arc<rustls::ServerConfig>, name: &str) -> Option<String> {
        let ca_file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(ca_file.path(), pems.concat()).unwrap();
        let config = client_config(Some(ca_file.path())).unwrap();
        let server_name = ServerName::try_from(name.to_string()).unwrap();
        let mut client = rustls::ClientConnection::new(config, server_name).unwrap();
        let mut server = rustls::ServerConnection::new(server).unwrap();
        for _ in 0..10 {
            let mut wire = Vec::new();
            while client.wants_write() {
                client.write_tls(&mut wire).unwrap();
            }
            server.read_tls(&mut wire.as_slice()).unwrap();
            // The server's own complaint (the client's alert) is not the verdict.
            let _ = server.process_new_packets();
            let mut wire = Vec::new();
            while server.wants_write() {
                server.write_tls(&mut wire).unwrap();
            }
            client.read_tls(&mut wire.as_slice()).unwrap();
            if let Err(e) = client.process_new_packets() {
                let e = std::io::Error::new(std::io::ErrorKind::InvalidData, e);
                return Some(handshake_failure(&e, name, "imap_server", "onprem"));
            }
            if !client.is_handshaking() {
                return None;
            }
        }
        panic!("the handshake did not finish")
    }

    /// What the server is, what `ca_file` holds, the server, the name the
    /// proxy reaches it by, and what the user reads (`None`: accepted).
    type Row<'a> = (
        &'a str,
        &'a [&'a str],
        Arc<rustls::ServerConfig>,
        &'a str,
        Option<&'a str>,
    );

    #[test]
    fn verifier_accepts_what_verifies_or_is_pinned_and_says_what_to_do_otherwise() {
        let issued = TestPki::new();
        let expired = TestPki::serving(ServerCert {
            expired: true,
            ..ServerCert::ISSUED
        });
        let other_name = TestPki::serving(ServerCert {
            names: &["mail.example.net"],
            ..ServerCert::ISSUED
        });
        let self_signed = TestPki::serving(ServerCert::SELF_SIGNED_CA);
        let another_self_signed = TestPki::serving(ServerCert::SELF_SIGNED_CA);
        let expired_self_signed = TestPki::serving(ServerCert {
            expired: true,
            ..ServerCert::SELF_SIGNED_CA
        });
        let impostor = TestPki::impostor_config(self_signed.cert_der());
        let pin_it = "put it in `ca_file` of provider `onprem`";
        #[rustfmt::skip]
        let table: &[Row] = &[
            ("issued by a CA in ca_file", &[&issued.ca_pem], issued.server_config(), "localhost", None),
            ("issued, reached by address", &[&issued.ca_pem], issued.server_config(), "127.0.0.1", None),
            ("issued, the CA in ca_file besides a pin", &[&self_signed.cert_pem, &issued.ca_pem], issued.server_config(), "localhost", None),
            ("issued by a CA nobody trusts", &[&self_signed.cert_pem], issued.server_config(), "localhost",
                Some("the server's certificate is not signed by a CA this proxy trusts; add the server's CA, or the server's own certificate as a pin, to `ca_file` of provider `onprem`")),
            ("issued, expired", &[&expired.ca_pem], expired.server_config(), "localhost",
                Some("the server's certificate expired on 2021-01-01; renew it on the server, or correct this machine's clock")),
            ("issued for another name", &[&other_name.ca_pem], other_name.server_config(), "localhost",
                Some("the server's certificate is not valid for `localhost` (it names mail.example.net); set `imap_server` of provider `onprem` to one of those names, or pin the certificate in `ca_file` of provider `onprem`")),
            ("issued, the leaf pinned without its CA", &[&issued.cert_pem], issued.server_config(), "localhost", None),
            ("issued, pinned, reached by another name", &[&other_name.cert_pem], other_name.server_config(), "localhost", None),
            ("self-signed CA:TRUE, pinned", &[&self_signed.cert_pem], self_signed.server_config(), "localhost", None),
            ("self-signed, pinned, reached by another name", &[&self_signed.cert_pem], self_signed.server_config(), "mail.example.org", None),
            ("self-signed, pinned, expired", &[&expired_self_signed.cert_pem], expired_self_signed.server_config(), "localhost", None),
            ("self-signed CA:TRUE, another one pinned", &[&self_signed.cert_pem], another_self_signed.server_config(), "localhost",
                Some(pin_it)),
            ("self-signed CA:TRUE, nothing pinned", &[&issued.ca_pem], self_signed.server_config(), "localhost",
                Some("the server presents a CA certificate (CA:TRUE, as `openssl req -x509` makes by default) as its own; to trust exactly this certificate, pin it: put it in `ca_file` of provider `onprem`")),
            ("the pinned certificate without its key", &[&self_signed.cert_pem], impostor, "localhost",
                Some("a signature in the server's certificate or handshake does not verify")),
        ];
        for (what, pems, server, name, expected) in table {
            let got = verdict(pems, server.clone(), name);
            match (expected, &got) {
                (None, None) => {}
                (Some(sentence), Some(said)) if said.contains(sentence) => {}
                _ => panic!("{what}: expected {expected:?}, got {got:?}"),
            }
        }
    }
}
