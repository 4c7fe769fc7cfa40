//! A throw-away certificate authority and one server certificate for `localhost`
//! and `127.0.0.1`, for the mock upstreams (and a local TLS listener, if a test
//! wants one). Everything uses the ring crypto provider explicitly.

use std::path::PathBuf;
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// A test CA (its PEM also written to `ca_pem_path`) and a leaf it signed.
pub struct TestPki {
    /// The CA certificate as a PEM file inside a temporary directory this struct owns.
    pub ca_pem_path: PathBuf,
    /// The CA certificate, PEM.
    pub ca_pem: String,
    /// The leaf (server) certificate, PEM, also written to `cert_pem_path`.
    pub cert_pem: String,
    pub cert_pem_path: PathBuf,
    /// The leaf's private key (PKCS#8 PEM), also written to `key_pem_path`.
    pub key_pem: String,
    pub key_pem_path: PathBuf,
    ca_der: CertificateDer<'static>,
    leaf_der: CertificateDer<'static>,
    key_der: Vec<u8>,
    _dir: tempfile::TempDir,
}

impl TestPki {
    pub fn new() -> TestPki {
        let ca_key = KeyPair::generate().expect("generate CA key");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "xoauth2-proxy test CA");
        dn.push(DnType::OrganizationName, "xoauth2-proxy tests");
        ca_params.distinguished_name = dn;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_cert = ca_params.self_signed(&ca_key).expect("self-sign CA");
        let issuer = Issuer::new(ca_params, ca_key);

        let leaf_key = KeyPair::generate().expect("generate leaf key");
        let mut leaf_params =
            CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
                .expect("leaf params");
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "localhost");
        leaf_params.distinguished_name = dn;
        leaf_params.is_ca = IsCa::NoCa;
        leaf_params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        leaf_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        leaf_params.use_authority_key_identifier_extension = true;
        let leaf_cert = leaf_params
            .signed_by(&leaf_key, &issuer)
            .expect("sign leaf");

        let dir = tempfile::tempdir().expect("tempdir for the test PKI");
        let ca_pem = ca_cert.pem();
        let cert_pem = leaf_cert.pem();
        let key_pem = leaf_key.serialize_pem();
        let ca_pem_path = dir.path().join("test-ca.pem");
        let cert_pem_path = dir.path().join("localhost.pem");
        let key_pem_path = dir.path().join("localhost-key.pem");
        std::fs::write(&ca_pem_path, &ca_pem).expect("write CA PEM");
        std::fs::write(&cert_pem_path, &cert_pem).expect("write leaf PEM");
        std::fs::write(&key_pem_path, &key_pem).expect("write key PEM");

        TestPki {
            ca_pem_path,
            ca_pem,
            cert_pem,
            cert_pem_path,
            key_pem,
            key_pem_path,
            ca_der: ca_cert.der().clone(),
            leaf_der: leaf_cert.der().clone(),
            key_der: leaf_key.serialize_der(),
            _dir: dir,
        }
    }

    fn provider() -> Arc<rustls::crypto::CryptoProvider> {
        Arc::new(rustls::crypto::ring::default_provider())
    }

    /// A server configuration presenting the leaf certificate (chain: leaf, CA).
    pub fn server_config(&self) -> Arc<rustls::ServerConfig> {
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_der.clone()));
        let config = rustls::ServerConfig::builder_with_provider(Self::provider())
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_no_client_auth()
            .with_single_cert(vec![self.leaf_der.clone(), self.ca_der.clone()], key)
            .expect("server certificate");
        Arc::new(config)
    }

    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.server_config())
    }

    /// A client configuration that trusts only the test CA.
    pub fn client_config(&self) -> Arc<rustls::ClientConfig> {
        client_config_trusting([self.ca_der.clone()])
    }

    pub fn connector(&self) -> tokio_rustls::TlsConnector {
        tokio_rustls::TlsConnector::from(self.client_config())
    }
}

impl Default for TestPki {
    fn default() -> Self {
        Self::new()
    }
}

/// A client configuration that trusts `roots` and nothing else (for a
/// process that has only the test CA's PEM file).
pub fn client_config_trusting(
    roots: impl IntoIterator<Item = CertificateDer<'static>>,
) -> Arc<rustls::ClientConfig> {
    let mut store = rustls::RootCertStore::empty();
    for root in roots {
        store.add(root).expect("add a trust anchor");
    }
    let config = rustls::ClientConfig::builder_with_provider(TestPki::provider())
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_root_certificates(store)
        .with_no_client_auth();
    Arc::new(config)
}
