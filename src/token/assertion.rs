//! Certificate credentials of app-only access (issue 13): an
//! [`AppCertificate`] holds an app registration's certificate and RSA
//! private key, loaded from PEM files, and signs `client_assertion` JWTs for
//! the client-credentials grant (RFC 7523 as the Microsoft identity platform
//! expects it: RS256 or PS256, header `x5t#S256` = base64url(SHA-256 of the
//! certificate DER), `aud` = the token endpoint, `iss` = `sub` = client id,
//! a unique `jti`, `iat` = `nbf` = now and a ten-minute lifetime).
//!
//! Loading refuses keys that are not RSA, are shorter than 2048 bits, or do
//! not belong to the certificate. Neither the key nor the signed assertion is
//! ever shown by `Debug`, in errors or in logs: the key bytes are wiped on
//! drop and assertions are handed out as [`Secret`]s.

use std::fmt;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use rand::RngCore as _;
use sha2::{Digest as _, Sha256};
use x509_cert::der::{self, asn1::UintRef, Decode as _, Reader as _};
use zeroize::Zeroizing;

use crate::secret::Secret;

/// Lifetime of a client assertion. The identity platform accepts at most ten
/// minutes; an assertion is used at once, and the full ten minutes leaves the
/// most room for a local clock that runs behind the platform's.
pub const ASSERTION_LIFETIME: Duration = Duration::from_secs(600);

/// Smallest accepted RSA modulus, in bits.
pub const MIN_RSA_BITS: usize = 2048;

/// OID of `rsaEncryption` (PKCS #1).
const RSA_ENCRYPTION: der::asn1::ObjectIdentifier =
    der::asn1::ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.1");

/// JWT algorithm of client assertions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, Default)]
pub enum AssertionAlgorithm {
    /// RSASSA-PSS with SHA-256 (what Microsoft recommends).
    #[default]
    #[serde(rename = "PS256")]
    Ps256,
    /// RSASSA-PKCS1-v1_5 with SHA-256.
    #[serde(rename = "RS256")]
    Rs256,
}

impl AssertionAlgorithm {
    fn jwt(self) -> jsonwebtoken::Algorithm {
        match self {
            AssertionAlgorithm::Ps256 => jsonwebtoken::Algorithm::PS256,
            AssertionAlgorithm::Rs256 => jsonwebtoken::Algorithm::RS256,
        }
    }
}

/// Why a certificate credential could not be loaded or used. Messages name
/// the file (or "certificate PEM" / "private key PEM"), never key material.
#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// No `CERTIFICATE` block in the certificate file.
    #[error("{source_name} holds no PEM CERTIFICATE block")]
    NoCertificate { source_name: String },
    /// The certificate block does not parse as X.509.
    #[error("{source_name}: the certificate is not valid X.509 ({reason})")]
    BadCertificate { source_name: String, reason: String },
    /// The certificate's public key is not RSA.
    #[error("{source_name}: the certificate's public key is not RSA (only RSA certificates can sign client assertions)")]
    CertificateNotRsa { source_name: String },
    /// No private key block in the key file.
    #[error("{source_name} holds no PEM private key (expected PRIVATE KEY or RSA PRIVATE KEY)")]
    NoPrivateKey { source_name: String },
    /// The private key is of another kind than RSA.
    #[error("{source_name}: the private key is not an RSA key ({found})")]
    KeyNotRsa { source_name: String, found: String },
    /// The private key does not parse.
    #[error("{source_name}: the private key is not a valid RSA key ({reason})")]
    BadKey { source_name: String, reason: String },
    /// The RSA key is too short.
    #[error("{source_name}: the RSA key has {bits} bits; at least {MIN_RSA_BITS} are required")]
    KeyTooSmall { source_name: String, bits: usize },
    /// The private key is not the certificate's.
    #[error("the private key in {key_name} does not belong to the certificate in {cert_name}")]
    KeyMismatch { cert_name: String, key_name: String },
    /// Signing the assertion failed.
    #[error("cannot sign the client assertion: {0}")]
    Sign(String),
}

/// A certificate credential: the certificate and its private key. `Debug`
/// never shows the key.
pub struct AppCertificate {
    cert_der: Vec<u8>,
    /// PKCS #1 `RSAPrivateKey` DER, wiped on drop.
    key_pkcs1: Zeroizing<Vec<u8>>,
    not_after: SystemTime,
    thumbprint_s256: String,
    subject: String,
}

impl fmt::Debug for AppCertificate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AppCertificate")
            .field("subject", &self.subject)
            .field("thumbprint_s256", &self.thumbprint_s256)
            .field(
                "not_after",
                &humantime::format_rfc3339_seconds(self.not_after),
            )
            .field("key", &"<redacted>")
            .finish()
    }
}

/// JWT claims of a client assertion.
#[derive(serde::Serialize)]
struct AssertionClaims<'a> {
    aud: &'a str,
    iss: &'a str,
    sub: &'a str,
    jti: String,
    nbf: u64,
    iat: u64,
    exp: u64,
}

impl AppCertificate {
    /// Loads the certificate (the first `CERTIFICATE` block of `cert_file`;
    /// a chain is fine) and its RSA private key (`key_file`, PKCS #8 or
    /// PKCS #1 PEM; it may be the same file).
    pub fn load(cert_file: &Path, key_file: &Path) -> Result<AppCertificate, CredentialError> {
        let read = |p: &Path| {
            std::fs::read(p)
                .map(Zeroizing::new)
                .map_err(|source| CredentialError::Read {
                    path: p.display().to_string(),
                    source,
                })
        };
        let cert_pem = read(cert_file)?;
        let key_pem = read(key_file)?;
        Self::parse(
            &cert_pem,
            &key_pem,
            &cert_file.display().to_string(),
            &key_file.display().to_string(),
        )
    }

    /// Like [`AppCertificate::load`], from PEM text in memory.
    pub fn from_pem(cert_pem: &[u8], key_pem: &[u8]) -> Result<AppCertificate, CredentialError> {
        Self::parse(cert_pem, key_pem, "certificate PEM", "private key PEM")
    }

    fn parse(
        cert_pem: &[u8],
        key_pem: &[u8],
        cert_name: &str,
        key_name: &str,
    ) -> Result<AppCertificate, CredentialError> {
        // The certificate.
        let cert_der =
            first_certificate(cert_pem).ok_or_else(|| CredentialError::NoCertificate {
                source_name: cert_name.to_string(),
            })?;
        let cert = x509_cert::Certificate::from_der(&cert_der).map_err(|e| {
            CredentialError::BadCertificate {
                source_name: cert_name.to_string(),
                reason: e.to_string(),
            }
        })?;
        let tbs = &cert.tbs_certificate;
        let spki = &tbs.subject_public_key_info;
        if spki.algorithm.oid != RSA_ENCRYPTION {
            return Err(CredentialError::CertificateNotRsa {
                source_name: cert_name.to_string(),
            });
        }
        let cert_key = spki
            .subject_public_key
            .as_bytes()
            .and_then(rsa_public_components)
            .ok_or_else(|| CredentialError::BadCertificate {
                source_name: cert_name.to_string(),
                reason: "malformed RSA public key".to_string(),
            })?;
        let not_after = tbs.validity.not_after.to_system_time();
        let subject = tbs.subject.to_string();

        // The private key, as PKCS #1.
        let key_pkcs1 = private_key_pkcs1(key_pem, key_name)?;
        if let Some(bits) = pkcs1_modulus_bits(&key_pkcs1) {
            if bits < MIN_RSA_BITS {
                return Err(CredentialError::KeyTooSmall {
                    source_name: key_name.to_string(),
                    bits,
                });
            }
        }
        let pair = ring::signature::RsaKeyPair::from_der(&key_pkcs1).map_err(|e| {
            CredentialError::BadKey {
                source_name: key_name.to_string(),
                reason: e.to_string(),
            }
        })?;
        let key_pub = rsa_public_components(pair.public().as_ref()).ok_or_else(|| {
            CredentialError::BadKey {
                source_name: key_name.to_string(),
                reason: "malformed public part".to_string(),
            }
        })?;
        let bits = pair.public().modulus_len() * 8;
        if bits < MIN_RSA_BITS {
            return Err(CredentialError::KeyTooSmall {
                source_name: key_name.to_string(),
                bits,
            });
        }
        if key_pub != cert_key {
            return Err(CredentialError::KeyMismatch {
                cert_name: cert_name.to_string(),
                key_name: key_name.to_string(),
            });
        }

        let thumbprint_s256 =
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(Sha256::digest(&cert_der));
        Ok(AppCertificate {
            cert_der,
            key_pkcs1,
            not_after,
            thumbprint_s256,
            subject,
        })
    }

    /// The certificate's `notAfter`.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// base64url (no padding) of the SHA-256 of the certificate DER: the
    /// `x5t#S256` header of assertions.
    pub fn thumbprint_s256(&self) -> &str {
        &self.thumbprint_s256
    }

    /// The certificate's subject (RFC 4514 form), for messages.
    pub fn subject(&self) -> String {
        self.subject.clone()
    }

    /// The certificate, DER.
    pub fn certificate_der(&self) -> &[u8] {
        &self.cert_der
    }

    /// A fresh client assertion: unique `jti` (128 random bits), `iat` =
    /// `nbf` = now, `exp` = now + [`ASSERTION_LIFETIME`], `aud` =
    /// `token_endpoint`, `iss` = `sub` = `client_id`.
    pub fn assertion(
        &self,
        client_id: &str,
        token_endpoint: &str,
        alg: AssertionAlgorithm,
    ) -> Result<Secret, CredentialError> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let mut jti = [0u8; 16];
        rand::rng().fill_bytes(&mut jti);
        let claims = AssertionClaims {
            aud: token_endpoint,
            iss: client_id,
            sub: client_id,
            jti: uuid_from(jti),
            nbf: now,
            iat: now,
            exp: now + ASSERTION_LIFETIME.as_secs(),
        };
        let mut header = jsonwebtoken::Header::new(alg.jwt());
        header.x5t_s256 = Some(self.thumbprint_s256.clone());
        let key = jsonwebtoken::EncodingKey::from_rsa_der(&self.key_pkcs1);
        jsonwebtoken::encode(&header, &claims, &key)
            .map(Secret::new)
            .map_err(|e| CredentialError::Sign(e.to_string()))
    }
}

/// 16 random bytes as a version-4 UUID string.
fn uuid_from(mut b: [u8; 16]) -> String {
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// DER of the first `CERTIFICATE` block.
fn first_certificate(pem: &[u8]) -> Option<Vec<u8>> {
    let mut rd = pem;
    for item in rustls_pemfile::read_all(&mut rd) {
        match item {
            Ok(rustls_pemfile::Item::X509Certificate(c)) => return Some(c.as_ref().to_vec()),
            Ok(_) => continue,
            Err(_) => return None,
        }
    }
    None
}

/// The first private key of `pem` as PKCS #1 DER (RSA only).
fn private_key_pkcs1(pem: &[u8], name: &str) -> Result<Zeroizing<Vec<u8>>, CredentialError> {
    let bad = |reason: &str| CredentialError::BadKey {
        source_name: name.to_string(),
        reason: reason.to_string(),
    };
    let not_rsa = |found: &str| CredentialError::KeyNotRsa {
        source_name: name.to_string(),
        found: found.to_string(),
    };
    let mut rd = pem;
    for item in rustls_pemfile::read_all(&mut rd) {
        match item {
            Ok(rustls_pemfile::Item::Pkcs1Key(k)) => {
                return Ok(Zeroizing::new(k.secret_pkcs1_der().to_vec()))
            }
            Ok(rustls_pemfile::Item::Pkcs8Key(k)) => {
                let info = pkcs8::PrivateKeyInfo::try_from(k.secret_pkcs8_der())
                    .map_err(|_| bad("malformed PKCS #8 structure"))?;
                if info.algorithm.oid != RSA_ENCRYPTION {
                    return Err(not_rsa(&format!(
                        "PKCS #8 algorithm {}",
                        info.algorithm.oid
                    )));
                }
                return Ok(Zeroizing::new(info.private_key.to_vec()));
            }
            Ok(rustls_pemfile::Item::Sec1Key(_)) => return Err(not_rsa("EC PRIVATE KEY")),
            Ok(_) => continue,
            Err(_) => return Err(bad("malformed PEM")),
        }
    }
    Err(CredentialError::NoPrivateKey {
        source_name: name.to_string(),
    })
}

/// Size in bits of the modulus of a PKCS #1 `RSAPrivateKey`.
fn pkcs1_modulus_bits(der_bytes: &[u8]) -> Option<usize> {
    let mut r = der::SliceReader::new(der_bytes).ok()?;
    let _outer = der::Header::decode(&mut r).ok()?;
    let _version = UintRef::decode(&mut r).ok()?;
    let n = UintRef::decode(&mut r).ok()?.as_bytes();
    let first = *n.first()?;
    Some((n.len() - 1) * 8 + (8 - first.leading_zeros() as usize))
}

/// `(modulus, exponent)` of a PKCS #1 `RSAPublicKey`, without leading zeros.
fn rsa_public_components(der_bytes: &[u8]) -> Option<(Vec<u8>, Vec<u8>)> {
    let mut r = der::SliceReader::new(der_bytes).ok()?;
    let parts = r
        .sequence(|r| {
            let n = UintRef::decode(r)?;
            let e = UintRef::decode(r)?;
            Ok((n.as_bytes().to_vec(), e.as_bytes().to_vec()))
        })
        .ok()?;
    r.is_finished().then_some(parts)
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{Algorithm, DecodingKey, Validation};

    const KEY_1: &str = include_str!("../../tests/fixtures/app-key-1.pem");
    const KEY_2: &str = include_str!("../../tests/fixtures/app-key-2.pem");

    fn cert_for(key_pem: &str, days: i64) -> String {
        let key = rcgen::KeyPair::from_pem_and_sign_algo(key_pem, &rcgen::PKCS_RSA_SHA256)
            .expect("fixture key");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "authswap app test");
        let not_after = SystemTime::now() + Duration::from_secs(days as u64 * 86_400);
        let secs = not_after.duration_since(UNIX_EPOCH).unwrap().as_secs();
        params.not_after = time_from_unix(secs);
        params.self_signed(&key).expect("self-sign").pem()
    }

    fn time_from_unix(secs: u64) -> time::OffsetDateTime {
        time::OffsetDateTime::from_unix_timestamp(secs as i64).expect("time")
    }

    fn decode(cert: &AppCertificate, jwt: &str, alg: Algorithm) -> serde_json::Value {
        let x509 = x509_cert::Certificate::from_der(cert.certificate_der()).unwrap();
        let pk = x509
            .tbs_certificate
            .subject_public_key_info
            .subject_public_key
            .as_bytes()
            .unwrap()
            .to_vec();
        let mut v = Validation::new(alg);
        v.set_audience(&["https://login.example/tenant/oauth2/v2.0/token"]);
        v.set_issuer(&["app-1"]);
        v.set_required_spec_claims(&["exp", "nbf", "aud", "iss", "sub"]);
        jsonwebtoken::decode::<serde_json::Value>(jwt, &DecodingKey::from_rsa_der(&pk), &v)
            .expect("assertion verifies")
            .claims
    }

    #[test]
    fn assertion_has_header_and_claims_and_verifies_for_both_algorithms() {
        let pem = cert_for(KEY_1, 10);
        let cert = AppCertificate::from_pem(pem.as_bytes(), KEY_1.as_bytes()).unwrap();
        let endpoint = "https://login.example/tenant/oauth2/v2.0/token";
        for (alg, jalg) in [
            (AssertionAlgorithm::Ps256, Algorithm::PS256),
            (AssertionAlgorithm::Rs256, Algorithm::RS256),
        ] {
            let jwt = cert.assertion("app-1", endpoint, alg).unwrap();
            let header = jsonwebtoken::decode_header(jwt.expose()).unwrap();
            assert_eq!(header.alg, jalg);
            assert_eq!(header.typ.as_deref(), Some("JWT"));
            let expected = base64::engine::general_purpose::URL_SAFE_NO_PAD
                .encode(Sha256::digest(cert.certificate_der()));
            assert_eq!(header.x5t_s256.as_deref(), Some(expected.as_str()));
            assert_eq!(cert.thumbprint_s256(), expected);
            let claims = decode(&cert, jwt.expose(), jalg);
            assert_eq!(claims["aud"], endpoint);
            assert_eq!(claims["iss"], "app-1");
            assert_eq!(claims["sub"], "app-1");
            let (iat, nbf, exp) = (
                claims["iat"].as_u64().unwrap(),
                claims["nbf"].as_u64().unwrap(),
                claims["exp"].as_u64().unwrap(),
            );
            assert_eq!(iat, nbf);
            assert_eq!(exp - nbf, 600);
            assert_eq!(claims["jti"].as_str().unwrap().len(), 36);
        }
        // A signature by another key does not verify with this certificate.
        let other_pem = cert_for(KEY_2, 10);
        let other = AppCertificate::from_pem(other_pem.as_bytes(), KEY_2.as_bytes()).unwrap();
        let jwt = other
            .assertion("app-1", endpoint, AssertionAlgorithm::Ps256)
            .unwrap();
        let x509 = x509_cert::Certificate::from_der(cert.certificate_der()).unwrap();
        let pk = x509
            .tbs_certificate
            .subject_public_key_info
            .subject_public_key
            .as_bytes()
            .unwrap()
            .to_vec();
        let mut v = Validation::new(Algorithm::PS256);
        v.validate_aud = false;
        assert!(jsonwebtoken::decode::<serde_json::Value>(
            jwt.expose(),
            &DecodingKey::from_rsa_der(&pk),
            &v
        )
        .is_err());
    }

    #[test]
    fn two_assertions_have_different_jti() {
        let pem = cert_for(KEY_1, 10);
        let cert = AppCertificate::from_pem(pem.as_bytes(), KEY_1.as_bytes()).unwrap();
        let ep = "https://login.example/tenant/oauth2/v2.0/token";
        let a = cert
            .assertion("app-1", ep, AssertionAlgorithm::Rs256)
            .unwrap();
        let b = cert
            .assertion("app-1", ep, AssertionAlgorithm::Rs256)
            .unwrap();
        let ca = decode(&cert, a.expose(), Algorithm::RS256);
        let cb = decode(&cert, b.expose(), Algorithm::RS256);
        assert_ne!(ca["jti"], cb["jti"]);
    }

    #[test]
    fn not_after_subject_and_chain() {
        let pem = cert_for(KEY_1, 10);
        let chain = format!("{pem}{}", cert_for(KEY_2, 3));
        let cert = AppCertificate::from_pem(chain.as_bytes(), KEY_1.as_bytes()).unwrap();
        let left = cert
            .not_after()
            .duration_since(SystemTime::now())
            .unwrap()
            .as_secs();
        assert!((9 * 86_400..=10 * 86_400).contains(&left), "{left}");
        assert!(cert.subject().contains("authswap app test"));
    }

    #[test]
    fn pkcs1_keys_load_too() {
        let der = private_key_pkcs1(KEY_1.as_bytes(), "k").unwrap();
        let info_key: &[u8] = &der;
        let b64 = base64::engine::general_purpose::STANDARD.encode(info_key);
        let mut pem = String::from("-----BEGIN RSA PRIVATE KEY-----\n");
        for chunk in b64.as_bytes().chunks(64) {
            pem.push_str(std::str::from_utf8(chunk).unwrap());
            pem.push('\n');
        }
        pem.push_str("-----END RSA PRIVATE KEY-----\n");
        let cert = cert_for(KEY_1, 10);
        AppCertificate::from_pem(cert.as_bytes(), pem.as_bytes()).expect("PKCS #1 key");
    }

    #[test]
    fn short_keys_are_refused_and_files_load() {
        let pem = cert_for(KEY_1, 10);
        let short = include_str!("../../tests/fixtures/app-key-1024.pem");
        let err = AppCertificate::from_pem(pem.as_bytes(), short.as_bytes()).unwrap_err();
        assert!(
            matches!(err, CredentialError::KeyTooSmall { bits: 1024, .. }),
            "{err}"
        );
        let dir = tempfile::tempdir().unwrap();
        let (c, k) = (dir.path().join("app.crt"), dir.path().join("app.key"));
        std::fs::write(&c, &pem).unwrap();
        std::fs::write(&k, KEY_1).unwrap();
        let cert = AppCertificate::load(&c, &k).unwrap();
        assert_eq!(cert.thumbprint_s256().len(), 43);
        let err = AppCertificate::load(&c, &dir.path().join("missing.key")).unwrap_err();
        assert!(err.to_string().contains("missing.key"), "{err}");
    }

    #[test]
    fn mismatched_key_is_refused() {
        let pem = cert_for(KEY_1, 10);
        let err = AppCertificate::from_pem(pem.as_bytes(), KEY_2.as_bytes()).unwrap_err();
        assert!(matches!(err, CredentialError::KeyMismatch { .. }), "{err}");
        assert!(err.to_string().contains("does not belong"));
    }

    #[test]
    fn non_rsa_and_garbage_are_refused() {
        let pem = cert_for(KEY_1, 10);
        let ec = rcgen::KeyPair::generate().unwrap(); // ECDSA P-256
        let err =
            AppCertificate::from_pem(pem.as_bytes(), ec.serialize_pem().as_bytes()).unwrap_err();
        assert!(matches!(err, CredentialError::KeyNotRsa { .. }), "{err}");
        // An EC certificate.
        let ec_cert = rcgen::CertificateParams::new(vec!["x".to_string()])
            .unwrap()
            .self_signed(&ec)
            .unwrap()
            .pem();
        let err = AppCertificate::from_pem(ec_cert.as_bytes(), KEY_1.as_bytes()).unwrap_err();
        assert!(
            matches!(err, CredentialError::CertificateNotRsa { .. }),
            "{err}"
        );
        // Garbage.
        let err = AppCertificate::from_pem(b"not a pem", KEY_1.as_bytes()).unwrap_err();
        assert!(
            matches!(err, CredentialError::NoCertificate { .. }),
            "{err}"
        );
        let err = AppCertificate::from_pem(pem.as_bytes(), b"nothing here").unwrap_err();
        assert!(matches!(err, CredentialError::NoPrivateKey { .. }), "{err}");
        let junk = "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n";
        let err = AppCertificate::from_pem(pem.as_bytes(), junk.as_bytes()).unwrap_err();
        assert!(matches!(err, CredentialError::BadKey { .. }), "{err}");
        // Missing files name the file.
        let err =
            AppCertificate::load(Path::new("/nonexistent/c.pem"), Path::new("k.pem")).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/c.pem"), "{err}");
    }

    #[test]
    fn debug_and_errors_show_no_key_material() {
        let pem = cert_for(KEY_1, 10);
        let cert = AppCertificate::from_pem(pem.as_bytes(), KEY_1.as_bytes()).unwrap();
        let dbg = format!("{cert:?}");
        assert!(dbg.contains("<redacted>"));
        let body: String = KEY_1.lines().filter(|l| !l.starts_with("-----")).collect();
        for window in [&body[..24], &body[100..124], &body[400..424]] {
            assert!(!dbg.contains(window));
        }
        let jwt = cert
            .assertion(
                "app-1",
                "https://x/t/oauth2/v2.0/token",
                AssertionAlgorithm::Ps256,
            )
            .unwrap();
        assert!(!format!("{jwt:?}").contains(jwt.expose()));
        let err = AppCertificate::from_pem(pem.as_bytes(), KEY_2.as_bytes()).unwrap_err();
        let key2: String = KEY_2.lines().filter(|l| !l.starts_with("-----")).collect();
        assert!(!format!("{err} {err:?}").contains(&key2[..24]));
    }

    #[test]
    fn algorithm_serde_names() {
        assert_eq!(
            serde_json::to_string(&AssertionAlgorithm::Ps256).unwrap(),
            "\"PS256\""
        );
        let a: AssertionAlgorithm = serde_json::from_str("\"RS256\"").unwrap();
        assert_eq!(a, AssertionAlgorithm::Rs256);
        assert_eq!(AssertionAlgorithm::default(), AssertionAlgorithm::Ps256);
    }
}
