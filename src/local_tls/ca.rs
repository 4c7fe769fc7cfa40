//! The proxy's own CA and the server certificate it signs, under
//! `state_dir/tls/`, for when `[tls]` names no certificate files.
//!
//! - `ca-key.pem` (0600): the CA's private key and its certificate, one file,
//!   so that the two are always replaced together;
//! - `ca.pem`: the CA certificate alone, what clients trust (`tls ca`);
//! - `server.pem` (0600): the server certificate, the CA certificate after
//!   it, and the server's private key, again one file.
//!
//! Every file is written atomically ([`crate::private_file`]), and a lock
//! file keeps two processes (`serve` and `tls ca` on a first start) from
//! making two CAs. The server certificate is made again when it is missing,
//! no longer names exactly `[tls] names`, was signed by another CA, or has
//! less than [`RENEW_BEFORE`] left; the CA lasts ten years.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SerialNumber,
};

use super::certificate::summarise;
use crate::private_file::{create_private_dir, write_atomically};

/// How long before its end a self-made server certificate is replaced.
pub const RENEW_BEFORE: Duration = Duration::from_secs(30 * 86_400);
const CA_LIFETIME: Duration = Duration::from_secs(10 * 365 * 86_400);
const SERVER_LIFETIME: Duration = Duration::from_secs(365 * 86_400);
/// Certificates start a little in the past, for clocks slightly behind.
const BACKDATE: Duration = Duration::from_secs(3600);

/// The `tls/` folder of the state directory.
pub struct Dir {
    dir: PathBuf,
    server: PathBuf,
}

/// A server certificate chain and its key, PEM.
pub struct Issued {
    pub chain_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
}

impl Dir {
    pub fn new(state_dir: &Path) -> Self {
        let dir = state_dir.join("tls");
        Dir {
            server: dir.join("server.pem"),
            dir,
        }
    }

    pub fn server_path(&self) -> &Path {
        &self.server
    }

    /// The server key lives in the same file as its certificate.
    pub fn server_key_path(&self) -> &Path {
        &self.server
    }

    /// The CA certificate, PEM, made first if there is none.
    pub fn ca_pem(&self) -> Result<String, String> {
        let _lock = self.lock()?;
        Ok(self.ca()?.cert_pem)
    }

    /// The server certificate for `names`: the one on disk if it is still
    /// good at `now`, else a new one signed by the CA (made first if need be).
    pub fn server_certificate(&self, names: &[String], now: SystemTime) -> Result<Issued, String> {
        let _lock = self.lock()?;
        let ca = self.ca()?;
        if let Some(issued) = self.current_server(&ca, names, now) {
            return Ok(issued);
        }
        let issued = issue_server(&ca, names, now)
            .map_err(|e| self.cannot("make a server certificate", e))?;
        let mut file = issued.chain_pem.clone();
        file.extend_from_slice(&issued.key_pem);
        write_atomically(&self.server, &file).map_err(|e| self.cannot_write(&self.server, &e))?;
        tracing::info!(
            names = %names.join(", "),
            file = %self.server.display(),
            "made a new server certificate for the client listeners, signed by the proxy's CA"
        );
        Ok(issued)
    }

    /// The server certificate on disk, if it is whole, for exactly `names`,
    /// signed by `ca`, and not due for renewal at `now`.
    fn current_server(&self, ca: &Ca, names: &[String], now: SystemTime) -> Option<Issued> {
        let pem = std::fs::read(&self.server).ok()?;
        let chain = rustls_pemfile::certs(&mut &pem[..])
            .collect::<Result<Vec<_>, _>>()
            .ok()?;
        rustls_pemfile::private_key(&mut &pem[..]).ok()??;
        if chain.len() != 2 || chain[1].as_ref() != ca.cert_der.as_slice() {
            return None;
        }
        let current = summarise(&chain[0], &self.server).ok()?;
        let wanted: Vec<String> = names.iter().map(|n| normalise(n)).collect();
        if current.names != wanted || current.not_after < now + RENEW_BEFORE {
            return None;
        }
        Some(Issued {
            chain_pem: pem.clone(),
            key_pem: pem,
        })
    }

    /// The CA on disk, or a new one. Call with the lock held.
    fn ca(&self) -> Result<Ca, String> {
        let key_path = self.dir.join("ca-key.pem");
        let ca_path = self.dir.join("ca.pem");
        let ca = match std::fs::read_to_string(&key_path) {
            Ok(pem) => Ca::parse(&pem).ok_or_else(|| {
                format!(
                    "{} is damaged; delete the folder {} to let the proxy make a new CA (clients must then trust the new `xoauth2-proxy tls ca`)",
                    key_path.display(),
                    self.dir.display()
                )
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let ca = Ca::generate().map_err(|e| self.cannot("make a CA", e))?;
                let both = format!("{}{}", ca.key_pem, ca.cert_pem);
                write_atomically(&key_path, both.as_bytes())
                    .map_err(|e| self.cannot_write(&key_path, &e))?;
                tracing::info!(file = %ca_path.display(), "made the proxy's CA; clients must trust it (`xoauth2-proxy tls ca`)");
                ca
            }
            Err(e) => return Err(self.cannot_read(&key_path, &e)),
        };
        if std::fs::read_to_string(&ca_path).ok().as_deref() != Some(ca.cert_pem.as_str()) {
            write_atomically(&ca_path, ca.cert_pem.as_bytes())
                .map_err(|e| self.cannot_write(&ca_path, &e))?;
        }
        Ok(ca)
    }

    /// Creates the folder and takes its lock, released when dropped.
    fn lock(&self) -> Result<std::fs::File, String> {
        create_private_dir(&self.dir).map_err(|e| self.cannot_write(&self.dir, &e))?;
        let path = self.dir.join(".lock");
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| self.cannot_write(&path, &e))?;
        file.lock().map_err(|e| self.cannot_write(&path, &e))?;
        Ok(file)
    }

    fn cannot(&self, what: &str, e: rcgen::Error) -> String {
        format!(
            "cannot {what} in {} ({e}); please report this as a bug",
            self.dir.display()
        )
    }

    fn cannot_write(&self, path: &Path, e: &std::io::Error) -> String {
        format!(
            "cannot write {}: {}; the state directory must be writable by the user the proxy runs as (or set `state_dir` in [server])",
            path.display(),
            crate::error::io_reason(e)
        )
    }

    fn cannot_read(&self, path: &Path, e: &std::io::Error) -> String {
        format!(
            "cannot read {}: {}; the state directory must be readable by the user the proxy runs as",
            path.display(),
            crate::error::io_reason(e)
        )
    }
}

/// A name as a certificate holds it: IP addresses in their canonical form.
fn normalise(name: &str) -> String {
    match name.parse::<std::net::IpAddr>() {
        Ok(ip) => ip.to_string(),
        Err(_) => name.to_string(),
    }
}

/// The proxy's CA: its key and certificate.
struct Ca {
    key_pem: String,
    cert_pem: String,
    cert_der: Vec<u8>,
}

impl Ca {
    fn generate() -> Result<Ca, rcgen::Error> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "xoauth2-proxy local CA");
        dn.push(DnType::OrganizationName, "xoauth2-proxy");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        validity(&mut params, SystemTime::now(), CA_LIFETIME);
        let cert = params.self_signed(&key)?;
        Ok(Ca {
            key_pem: key.serialize_pem(),
            cert_pem: cert.pem(),
            cert_der: cert.der().to_vec(),
        })
    }

    /// The CA from `ca-key.pem`: its key, then its certificate.
    fn parse(pem: &str) -> Option<Ca> {
        KeyPair::from_pem(pem).ok()?;
        let cert_der = rustls_pemfile::certs(&mut pem.as_bytes()).next()?.ok()?;
        let start = pem.find("-----BEGIN CERTIFICATE-----")?;
        Some(Ca {
            key_pem: pem[..start].to_string(),
            cert_pem: pem[start..].to_string(),
            cert_der: cert_der.to_vec(),
        })
    }

    fn issuer(&self) -> Result<Issuer<'static, KeyPair>, rcgen::Error> {
        Issuer::from_ca_cert_pem(&self.cert_pem, KeyPair::from_pem(&self.key_pem)?)
    }
}

/// A server certificate for `names` (IP addresses as IP SANs): CA:FALSE,
/// serverAuth, signed by `ca`; the chain is the certificate, then the CA's.
fn issue_server(ca: &Ca, names: &[String], now: SystemTime) -> Result<Issued, rcgen::Error> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(names.to_vec())?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, names[0].as_str());
    params.distinguished_name = dn;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    validity(&mut params, now, SERVER_LIFETIME);
    let cert = params.signed_by(&key, &ca.issuer()?)?;
    Ok(Issued {
        chain_pem: format!("{}{}", cert.pem(), ca.cert_pem).into_bytes(),
        key_pem: key.serialize_pem().into_bytes(),
    })
}

/// From a little before `now` for `lifetime`, with a random serial number
/// (a renewed certificate must not repeat its predecessor's).
fn validity(params: &mut CertificateParams, now: SystemTime, lifetime: Duration) {
    let now = time::OffsetDateTime::from(now);
    params.not_before = now - BACKDATE;
    params.not_after = now + lifetime;
    let mut serial: [u8; 16] = rand::random();
    serial[0] &= 0x7f;
    params.serial_number = Some(SerialNumber::from_slice(&serial));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names() -> Vec<String> {
        crate::config::DEFAULT_TLS_NAMES
            .iter()
            .map(|n| n.to_string())
            .collect()
    }

    #[test]
    fn keys_are_private_and_the_certificate_is_renewed_near_its_end() {
        let state = tempfile::tempdir().unwrap();
        let dir = Dir::new(state.path());
        let now = SystemTime::now();
        let first = dir.server_certificate(&names(), now).unwrap();
        #[cfg(unix)]
        for file in ["ca-key.pem", "server.pem"] {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.dir.join(file))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{file}");
        }
        let same = dir.server_certificate(&names(), now).unwrap();
        assert_eq!(same.chain_pem, std::fs::read(dir.server_path()).unwrap());
        assert!(first.chain_pem.starts_with(&same.chain_pem[..64]));
        let later = now + SERVER_LIFETIME - Duration::from_secs(29 * 86_400);
        let renewed = dir.server_certificate(&names(), later).unwrap();
        assert_ne!(renewed.chain_pem[..200], same.chain_pem[..200], "renewed");
        let other_names = dir
            .server_certificate(&["mail.internal".to_string()], now)
            .unwrap();
        assert_ne!(other_names.chain_pem[..200], renewed.chain_pem[..200]);
        let ca_pem = dir.ca_pem().unwrap();
        assert!(
            String::from_utf8(other_names.chain_pem)
                .unwrap()
                .ends_with(&ca_pem)
        );
    }

    #[test]
    fn the_server_certificate_is_a_leaf_for_server_auth() {
        let state = tempfile::tempdir().unwrap();
        let dir = Dir::new(state.path());
        let issued = dir.server_certificate(&names(), SystemTime::now()).unwrap();
        let der = rustls_pemfile::certs(&mut &issued.chain_pem[..])
            .next()
            .unwrap()
            .unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        let constraints = cert.basic_constraints().unwrap().map(|b| b.value.ca);
        assert_ne!(constraints, Some(true), "CA:FALSE");
        let eku = cert.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth);
        let ca_pem = dir.ca_pem().unwrap();
        let ca_der = rustls_pemfile::certs(&mut ca_pem.as_bytes())
            .next()
            .unwrap()
            .unwrap();
        let (_, ca) = x509_parser::parse_x509_certificate(&ca_der).unwrap();
        assert_eq!(cert.issuer(), ca.subject());
        assert!(ca.basic_constraints().unwrap().unwrap().value.ca);
    }
}
