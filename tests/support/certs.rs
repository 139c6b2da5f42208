//! Test PKI: a throw-away self-signed CA plus a `localhost` / `127.0.0.1` /
//! `::1` server leaf signed by it, and the rustls configs built from them.
//!
//! All doubles in one test binary share the lazily created [`pki()`]
//! instance, so a client that trusts `pki().ca_pem()` trusts every double.
//! rustls configs always use the ring provider explicitly (never the
//! process-wide default provider).

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// A CA and one server leaf certificate (SANs: `localhost`, `127.0.0.1`, `::1`).
pub struct TestPki {
    ca_pem: String,
    ca_der: CertificateDer<'static>,
    leaf_pem: String,
    leaf_der: CertificateDer<'static>,
    leaf_key_pem: String,
    leaf_key_der: Vec<u8>,
}

/// The process-wide shared PKI (created on first use).
pub fn pki() -> &'static TestPki {
    static PKI: OnceLock<TestPki> = OnceLock::new();
    PKI.get_or_init(TestPki::new)
}

/// The ring crypto provider, chosen explicitly for every config built here.
pub fn ring_provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl Default for TestPki {
    fn default() -> Self {
        Self::new()
    }
}

impl TestPki {
    /// Generates a fresh CA and server leaf. Panics on failure (test code).
    pub fn new() -> Self {
        let ca_key = KeyPair::generate().expect("generate CA key");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "authswap test CA");
        dn.push(DnType::OrganizationName, "authswap tests");
        ca_params.distinguished_name = dn;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_cert = ca_params.self_signed(&ca_key).expect("self-sign CA");

        let leaf_key = KeyPair::generate().expect("generate leaf key");
        let mut leaf_params = CertificateParams::new(vec![
            "localhost".to_string(),
            "127.0.0.1".to_string(),
            "::1".to_string(),
        ])
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
            .signed_by(&leaf_key, &ca_cert, &ca_key)
            .expect("sign leaf");

        TestPki {
            ca_pem: ca_cert.pem(),
            ca_der: ca_cert.der().clone(),
            leaf_pem: leaf_cert.pem(),
            leaf_der: leaf_cert.der().clone(),
            leaf_key_pem: leaf_key.serialize_pem(),
            leaf_key_der: leaf_key.serialize_der(),
        }
    }

    /// CA certificate, PEM.
    pub fn ca_pem(&self) -> String {
        self.ca_pem.clone()
    }

    /// CA certificate, DER.
    pub fn ca_der(&self) -> CertificateDer<'static> {
        self.ca_der.clone()
    }

    /// Writes the CA PEM to `dir/test-ca.pem` and returns the path.
    pub fn write_ca_file(&self, dir: &Path) -> PathBuf {
        let path = dir.join("test-ca.pem");
        std::fs::write(&path, &self.ca_pem).expect("write CA file");
        path
    }

    /// Server leaf certificate, PEM.
    pub fn cert_pem(&self) -> String {
        self.leaf_pem.clone()
    }

    /// Server leaf private key, PEM (PKCS#8, `-----BEGIN PRIVATE KEY-----`).
    pub fn key_pem(&self) -> String {
        self.leaf_key_pem.clone()
    }

    /// Writes `dir/server-cert.pem` (leaf only) and `dir/server-key.pem`;
    /// returns `(cert_path, key_path)`.
    pub fn write_server_cert_files(&self, dir: &Path) -> (PathBuf, PathBuf) {
        let cert = dir.join("server-cert.pem");
        let key = dir.join("server-key.pem");
        std::fs::write(&cert, &self.leaf_pem).expect("write server cert");
        std::fs::write(&key, &self.leaf_key_pem).expect("write server key");
        (cert, key)
    }

    /// Root store containing only the test CA.
    pub fn root_store(&self) -> rustls::RootCertStore {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca_der.clone()).expect("add test CA");
        roots
    }

    /// Server config presenting the leaf, advertising `alpn` (in order).
    pub fn server_config(&self, alpn: &[&[u8]]) -> Arc<rustls::ServerConfig> {
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.leaf_key_der.clone()));
        let mut cfg = rustls::ServerConfig::builder_with_provider(ring_provider())
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_no_client_auth()
            .with_single_cert(vec![self.leaf_der.clone()], key)
            .expect("server cert");
        cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Arc::new(cfg)
    }

    /// Client config trusting only the test CA, ALPN `http/1.1`.
    pub fn client_config(&self) -> Arc<rustls::ClientConfig> {
        self.client_config_with_alpn(&[b"http/1.1"])
    }

    /// Client config trusting only the test CA with no ALPN set. Use this
    /// one with `hyper_rustls::HttpsConnectorBuilder::with_tls_config`, which
    /// panics if ALPN protocols are pre-set (it sets them itself).
    pub fn client_config_no_alpn(&self) -> Arc<rustls::ClientConfig> {
        self.client_config_with_alpn(&[])
    }

    /// Client config trusting only the test CA, with the given ALPN list.
    pub fn client_config_with_alpn(&self, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
        let mut cfg = rustls::ClientConfig::builder_with_provider(ring_provider())
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_root_certificates(self.root_store())
            .with_no_client_auth();
        cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Arc::new(cfg)
    }
}

// ---- app-only certificate credentials ----------------------------------------

/// Test-only RSA 2048 key (PKCS #8 PEM), `tests/fixtures/app-key-1.pem`.
pub const APP_KEY_1: &str = include_str!("../fixtures/app-key-1.pem");
/// A second, different test-only RSA 2048 key, `tests/fixtures/app-key-2.pem`.
pub const APP_KEY_2: &str = include_str!("../fixtures/app-key-2.pem");

/// A self-signed app certificate (CN `authswap test app`) for `key_pem` (an
/// RSA PKCS #8 PEM such as [`APP_KEY_1`]), valid until `not_after_days` days
/// from now (negative: already expired). Returns `(cert_pem, cert_der)`.
pub fn app_certificate(key_pem: &str, not_after_days: i64) -> (String, Vec<u8>) {
    let key =
        KeyPair::from_pem_and_sign_algo(key_pem, &rcgen::PKCS_RSA_SHA256).expect("RSA fixture key");
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("app cert params");
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "authswap test app");
    params.distinguished_name = dn;
    let not_after = time::OffsetDateTime::now_utc() + time::Duration::days(not_after_days);
    params.not_before = not_after - time::Duration::days(365);
    params.not_after = not_after;
    let cert = params.self_signed(&key).expect("self-sign app cert");
    (cert.pem(), cert.der().to_vec())
}
