//! A throw-away certificate authority and the certificate a test server
//! presents: by default one the CA issued for `localhost` and `127.0.0.1`, for
//! the mock upstreams (and a local TLS listener, if a test wants one); or, to
//! test the proxy's upstream verification, an expired one, one for another
//! name, or a self-signed one marked CA:TRUE as on-premises servers often
//! have. Everything uses the ring crypto provider explicitly.

use std::path::PathBuf;
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, date_time_ymd,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// What the certificate a test server presents looks like.
#[derive(Clone, Copy, Debug)]
pub struct ServerCert {
    /// Self-signed and marked CA:TRUE, as `openssl req -x509` makes by
    /// default, instead of a CA:FALSE certificate issued by the test CA.
    pub self_signed_ca: bool,
    /// Its subject alternative names.
    pub names: &'static [&'static str],
    /// Valid only in 2020, so expired now.
    pub expired: bool,
}

impl ServerCert {
    /// Issued by the test CA for `localhost` and `127.0.0.1`: what a mail
    /// server normally presents.
    pub const ISSUED: ServerCert = ServerCert {
        self_signed_ca: false,
        names: &["localhost", "127.0.0.1"],
        expired: false,
    };
    /// Self-signed, CA:TRUE, for `localhost` and `127.0.0.1`.
    pub const SELF_SIGNED_CA: ServerCert = ServerCert {
        self_signed_ca: true,
        ..ServerCert::ISSUED
    };
}

/// A test CA (its PEM also written to `ca_pem_path`) and the server
/// certificate (issued by it unless self-signed).
pub struct TestPki {
    /// The CA certificate as a PEM file inside a temporary directory this struct owns.
    pub ca_pem_path: PathBuf,
    /// The CA certificate, PEM.
    pub ca_pem: String,
    /// The server certificate, PEM, also written to `cert_pem_path`.
    pub cert_pem: String,
    pub cert_pem_path: PathBuf,
    /// The server's private key (PKCS#8 PEM), also written to `key_pem_path`.
    pub key_pem: String,
    pub key_pem_path: PathBuf,
    ca_der: CertificateDer<'static>,
    /// What the server presents: its certificate, then the CA's if it issued it.
    chain: Vec<CertificateDer<'static>>,
    key_der: Vec<u8>,
    _dir: tempfile::TempDir,
}

impl TestPki {
    /// A CA and a server certificate it issued for `localhost` and `127.0.0.1`.
    pub fn new() -> TestPki {
        TestPki::serving(ServerCert::ISSUED)
    }

    /// A CA and a server certificate shaped as `server` says.
    pub fn serving(server: ServerCert) -> TestPki {
        let ca_key = KeyPair::generate().expect("generate CA key");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca_params.distinguished_name = name("xoauth2-proxy test CA");
        make_ca(&mut ca_params);
        let ca_cert = ca_params.self_signed(&ca_key).expect("self-sign CA");
        let issuer = Issuer::new(ca_params, ca_key);

        let leaf_key = KeyPair::generate().expect("generate server key");
        let names: Vec<String> = server.names.iter().map(|n| n.to_string()).collect();
        let mut params = CertificateParams::new(names).expect("server certificate params");
        params.distinguished_name = name(server.names.first().unwrap_or(&"test server"));
        if server.expired {
            params.not_before = date_time_ymd(2020, 1, 1);
            params.not_after = date_time_ymd(2021, 1, 1);
        }
        let (leaf_cert, chain_tail) = if server.self_signed_ca {
            make_ca(&mut params);
            let cert = params.self_signed(&leaf_key).expect("self-sign server");
            (cert, None)
        } else {
            params.is_ca = IsCa::NoCa;
            params.key_usages = vec![
                KeyUsagePurpose::DigitalSignature,
                KeyUsagePurpose::KeyEncipherment,
            ];
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
            params.use_authority_key_identifier_extension = true;
            let cert = params
                .signed_by(&leaf_key, &issuer)
                .expect("issue server certificate");
            (cert, Some(ca_cert.der().clone()))
        };

        let dir = tempfile::tempdir().expect("tempdir for the test PKI");
        let ca_pem = ca_cert.pem();
        let cert_pem = leaf_cert.pem();
        let key_pem = leaf_key.serialize_pem();
        let ca_pem_path = dir.path().join("test-ca.pem");
        let cert_pem_path = dir.path().join("server.pem");
        let key_pem_path = dir.path().join("server-key.pem");
        std::fs::write(&ca_pem_path, &ca_pem).expect("write CA PEM");
        std::fs::write(&cert_pem_path, &cert_pem).expect("write server PEM");
        std::fs::write(&key_pem_path, &key_pem).expect("write key PEM");

        TestPki {
            ca_pem_path,
            ca_pem,
            cert_pem,
            cert_pem_path,
            key_pem,
            key_pem_path,
            ca_der: ca_cert.der().clone(),
            chain: std::iter::once(leaf_cert.der().clone())
                .chain(chain_tail)
                .collect(),
            key_der: leaf_key.serialize_der(),
            _dir: dir,
        }
    }

    fn provider() -> Arc<rustls::crypto::CryptoProvider> {
        Arc::new(rustls::crypto::ring::default_provider())
    }

    /// The server certificate, DER.
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.chain[0]
    }

    /// A server configuration presenting the server certificate (and the CA
    /// after it, when the CA issued it).
    pub fn server_config(&self) -> Arc<rustls::ServerConfig> {
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_der.clone()));
        let config = rustls::ServerConfig::builder_with_provider(Self::provider())
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_no_client_auth()
            .with_single_cert(self.chain.clone(), key)
            .expect("server certificate");
        Arc::new(config)
    }

    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.server_config())
    }

    /// A server configuration of an impostor: it presents `stolen` (a
    /// certificate is public) but signs the handshake with a key of its own,
    /// since it lacks the certificate's.
    pub fn impostor_config(stolen: &CertificateDer<'static>) -> Arc<rustls::ServerConfig> {
        let own_key = KeyPair::generate().expect("generate impostor key");
        let own_key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(own_key.serialize_der()));
        let signer = Self::provider()
            .key_provider
            .load_private_key(own_key)
            .expect("load impostor key");
        let certified = rustls::sign::CertifiedKey::new(vec![stolen.clone()], signer);
        let config = rustls::ServerConfig::builder_with_provider(Self::provider())
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(certified)));
        Arc::new(config)
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

fn name(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn.push(DnType::OrganizationName, "xoauth2-proxy tests");
    dn
}

/// Marks `params` as a CA certificate's.
fn make_ca(params: &mut CertificateParams) {
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
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
