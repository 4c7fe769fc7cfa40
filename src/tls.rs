//! TLS client setup shared by every outgoing connection: the mail servers
//! (`upstream`) and the identity provider's HTTPS (`oauth::provider`). CA
//! files are read here and nowhere else; certificates are always verified.

use std::path::Path;
use std::sync::{Arc, OnceLock};

use rustls::pki_types::CertificateDer;

/// The rustls client configuration: the system's trust anchors plus the
/// certificates in `ca_file`.
pub fn client_config(ca_file: Option<&Path>) -> Result<Arc<rustls::ClientConfig>, String> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in system_roots() {
        let _ = roots.add(cert.clone());
    }
    if let Some(path) = ca_file {
        for cert in load_ca_file(path)? {
            roots.add(cert).map_err(|e| {
                format!(
                    "{} holds a certificate rustls cannot use ({e}); put the CA's PEM certificate in `ca_file`",
                    path.display()
                )
            })?;
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
        .map_err(|e| format!("cannot set up TLS ({e}); please report this as a bug"))?
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
            "cannot read {}: {}; check the `ca_file` path and its permissions",
            path.display(),
            crate::error::io_reason(&e)
        )
    })?;
    let certs: Vec<_> = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<_, _>>()
        .map_err(|e| {
            format!(
                "{} is not PEM ({e}); `ca_file` must hold PEM certificates",
                path.display()
            )
        })?;
    if certs.is_empty() {
        return Err(format!(
            "{} holds no PEM certificate; `ca_file` must hold at least one",
            path.display()
        ));
    }
    Ok(certs)
}
