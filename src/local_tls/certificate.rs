//! Reading certificates and keys from PEM, and what a certificate says of
//! itself (its names and its end), for the log and `status`.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};

use crate::tls::PemError;

/// What `status` and the log say about a server certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Certificate {
    /// The subject alternative names: DNS names and IP addresses.
    pub names: Vec<String>,
    /// When it stops being valid.
    pub not_after: SystemTime,
    /// The file it was read from.
    pub path: PathBuf,
    /// SHA-256 of the certificate (DER), in hex: what tells two apart.
    pub sha256: String,
}

impl Certificate {
    /// "localhost, 127.0.0.1; valid until 2027-01-01T00:00:00Z (364 days left)".
    pub fn describe(&self, now: SystemTime) -> String {
        let until = humantime::format_rfc3339_seconds(self.not_after);
        let left = match self.not_after.duration_since(now) {
            Ok(left) => format!("{} days left", left.as_secs() / 86_400),
            Err(_) => "EXPIRED".to_string(),
        };
        format!("{}; valid until {until} ({left})", self.names.join(", "))
    }
}

/// Reads the file of the `[tls]` setting `key`.
fn read(path: &Path, key: &str) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| {
        format!(
            "cannot read `tls.{key}` {}: {}; fix the path or its permissions",
            path.display(),
            crate::error::io_reason(&e)
        )
    })
}

/// Reads the PEM certificate chain of `tls.cert_file`.
pub fn read_chain(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    parse_chain(&read(path, "cert_file")?, path)
}

pub fn parse_chain(pem: &[u8], path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    crate::tls::pem_certificates(pem).map_err(|e| match e {
        PemError::NotPem(e) => format!(
            "{} is not PEM ({e}); `tls.cert_file` must hold the server certificate and its chain in PEM",
            path.display()
        ),
        PemError::Empty => format!(
            "{} holds no PEM certificate; `tls.cert_file` must hold the server certificate (first) and its chain in PEM",
            path.display()
        ),
    })
}

/// Reads the PEM private key of `tls.key_file`.
pub fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    parse_key(&read(path, "key_file")?, path)
}

pub fn parse_key(pem: &[u8], path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    let no_key = || {
        format!(
            "{} holds no PEM private key; `tls.key_file` must hold the certificate's private key (PKCS#8 PEM, RSA or EC)",
            path.display()
        )
    };
    match rustls_pemfile::private_key(&mut &pem[..]) {
        Ok(Some(key)) => Ok(key),
        Ok(None) | Err(_) => Err(no_key()),
    }
}

/// The names and end of validity of `cert`, read from `path`.
pub fn summarise(cert: &CertificateDer<'_>, path: &Path) -> Result<Certificate, String> {
    let unreadable = |e: &dyn std::fmt::Display| {
        format!(
            "{} holds a certificate that cannot be read ({e}); give an X.509 certificate in PEM",
            path.display()
        )
    };
    let (_, parsed) = x509_parser::parse_x509_certificate(cert).map_err(|e| unreadable(&e))?;
    let not_after = u64::try_from(parsed.validity().not_after.timestamp()).unwrap_or(0);
    let mut names = Vec::new();
    if let Ok(Some(san)) = parsed.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                x509_parser::extensions::GeneralName::DNSName(n) => names.push(n.to_string()),
                x509_parser::extensions::GeneralName::IPAddress(bytes) => {
                    if let Some(ip) = ip_from_bytes(bytes) {
                        names.push(ip.to_string());
                    }
                }
                _ => {}
            }
        }
    }
    Ok(Certificate {
        names,
        not_after: UNIX_EPOCH + Duration::from_secs(not_after),
        path: path.to_path_buf(),
        sha256: Sha256::digest(cert.as_ref())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect(),
    })
}

fn ip_from_bytes(bytes: &[u8]) -> Option<std::net::IpAddr> {
    match bytes.len() {
        4 => Some(<[u8; 4]>::try_from(bytes).ok()?.into()),
        16 => Some(<[u8; 16]>::try_from(bytes).ok()?.into()),
        _ => None,
    }
}
