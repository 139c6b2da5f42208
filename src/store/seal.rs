//! Sealing of refresh tokens with XChaCha20-Poly1305 under a 256-bit key that
//! lives outside the database (a 0600 key file or the environment), with the
//! identity bound in as associated data so a sealed token cannot be moved to
//! another identity row.

use crate::secret::Secret;
use base64::Engine as _;
use blake2::{Blake2b, Digest};
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use rand::RngCore;
use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};
use zeroize::Zeroizing;

const VERSION: u8 = 1;
const NONCE_LEN: usize = 24;

/// Why sealing or unsealing failed. Never carries key or plaintext material.
#[derive(Debug, thiserror::Error)]
pub enum SealError {
    /// The key could not be read or created.
    #[error("sealing key {path}: {message}")]
    KeyFile {
        /// The key file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// The key in the configuration or environment is malformed.
    #[error("store.key: {0}")]
    BadKey(String),
    /// The token was sealed under a different key.
    #[error("refresh token was sealed with key {found}, but the configured key is {current}")]
    WrongKey {
        /// Key id recorded with the token.
        found: String,
        /// Key id of the configured key.
        current: String,
    },
    /// Authentication of the ciphertext failed (tampering, or wrong identity).
    #[error("sealed refresh token is corrupt or belongs to another identity")]
    Corrupt,
}

/// A sealed refresh token as stored: the key id and the ciphertext blob.
#[derive(Clone, PartialEq, Eq)]
pub struct SealedToken {
    /// Id of the key that sealed it (first bytes of a hash of the key).
    pub key_id: String,
    /// `version || nonce || ciphertext+tag`.
    pub blob: Vec<u8>,
}

impl fmt::Debug for SealedToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "SealedToken(key {}, {} bytes)",
            self.key_id,
            self.blob.len()
        )
    }
}

/// Seals and opens refresh tokens.
#[derive(Clone)]
pub struct Sealer {
    cipher: XChaCha20Poly1305,
    key_id: String,
}

impl fmt::Debug for Sealer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Sealer(key {})", self.key_id)
    }
}

impl Sealer {
    /// Builds a sealer from raw key bytes.
    pub fn from_key(key: &[u8; 32]) -> Sealer {
        let digest = Blake2b::<blake2::digest::consts::U32>::new()
            .chain_update(b"authswap key id v1")
            .chain_update(key)
            .finalize();
        let key_id = digest[..4].iter().map(|b| format!("{b:02x}")).collect();
        Sealer {
            cipher: XChaCha20Poly1305::new(key.into()),
            key_id,
        }
    }

    /// Uses `key` (hex or base64, from `AUTHSWAP_STORE__KEY`) when given,
    /// otherwise reads `key_file`, creating it with a fresh random key and
    /// mode 0600 when it does not exist.
    pub fn load(key: Option<&Secret>, key_file: &Path) -> Result<Sealer, SealError> {
        if let Some(key) = key {
            let bytes = decode_key(key.expose()).map_err(SealError::BadKey)?;
            return Ok(Sealer::from_key(&bytes));
        }
        let err = |message: String| SealError::KeyFile {
            path: key_file.to_owned(),
            message,
        };
        match std::fs::read_to_string(key_file) {
            Ok(text) => {
                let text = Zeroizing::new(text);
                warn_if_readable_by_others(key_file);
                let bytes = decode_key(text.trim()).map_err(err)?;
                Ok(Sealer::from_key(&bytes))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut key = Zeroizing::new([0u8; 32]);
                rand::rng().fill_bytes(key.as_mut());
                write_new_key_file(key_file, &key).map_err(|e| err(e.to_string()))?;
                tracing::info!(path = %key_file.display(), "created a new sealing key file (mode 0600); back it up with the database");
                Ok(Sealer::from_key(&key))
            }
            Err(e) => Err(err(e.to_string())),
        }
    }

    /// Id of the current key, recorded beside each sealed token.
    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    /// Seals `token` for the identity with database id `identity_id`.
    pub fn seal(&self, identity_id: i64, token: &Secret) -> SealedToken {
        let mut nonce = [0u8; NONCE_LEN];
        rand::rng().fill_bytes(&mut nonce);
        let aad = aad(identity_id);
        let ct = self
            .cipher
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: token.expose().as_bytes(),
                    aad: aad.as_bytes(),
                },
            )
            .expect("XChaCha20-Poly1305 encryption cannot fail for in-memory buffers");
        let mut blob = Vec::with_capacity(1 + NONCE_LEN + ct.len());
        blob.push(VERSION);
        blob.extend_from_slice(&nonce);
        blob.extend_from_slice(&ct);
        SealedToken {
            key_id: self.key_id.clone(),
            blob,
        }
    }

    /// Opens a token sealed by [`Sealer::seal`] for the same identity.
    pub fn open(&self, identity_id: i64, sealed: &SealedToken) -> Result<Secret, SealError> {
        if sealed.key_id != self.key_id {
            return Err(SealError::WrongKey {
                found: sealed.key_id.clone(),
                current: self.key_id.clone(),
            });
        }
        let blob = &sealed.blob;
        if blob.len() < 1 + NONCE_LEN + 16 || blob[0] != VERSION {
            return Err(SealError::Corrupt);
        }
        let aad = aad(identity_id);
        let plain = Zeroizing::new(
            self.cipher
                .decrypt(
                    XNonce::from_slice(&blob[1..1 + NONCE_LEN]),
                    Payload {
                        msg: &blob[1 + NONCE_LEN..],
                        aad: aad.as_bytes(),
                    },
                )
                .map_err(|_| SealError::Corrupt)?,
        );
        let text = std::str::from_utf8(&plain).map_err(|_| SealError::Corrupt)?;
        Ok(Secret::new(text))
    }
}

fn aad(identity_id: i64) -> String {
    format!("authswap/refresh-token/v1/identity/{identity_id}")
}

fn decode_key(text: &str) -> Result<Zeroizing<[u8; 32]>, String> {
    let text = text.trim();
    let bytes = if text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit()) {
        (0..32)
            .map(|i| u8::from_str_radix(&text[2 * i..2 * i + 2], 16))
            .collect::<Result<Vec<u8>, _>>()
            .map_err(|_| "not valid hex".to_owned())?
    } else {
        base64::engine::general_purpose::STANDARD
            .decode(text)
            .map_err(|_| "expected 64 hex digits or base64 of 32 bytes".to_owned())?
    };
    let bytes = Zeroizing::new(bytes);
    let arr: [u8; 32] = bytes
        .as_slice()
        .try_into()
        .map_err(|_| format!("key must be 32 bytes, got {}", bytes.len()))?;
    Ok(Zeroizing::new(arr))
}

fn write_new_key_file(path: &Path, key: &[u8; 32]) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
    }
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    let hex: Zeroizing<String> = Zeroizing::new(key.iter().map(|b| format!("{b:02x}")).collect());
    file.write_all(hex.as_bytes())?;
    file.write_all(b"\n")?;
    file.sync_all()
}

fn warn_if_readable_by_others(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(path) {
        if meta.permissions().mode() & 0o077 != 0 {
            tracing::warn!(path = %path.display(), "sealing key file is readable by group or others; chmod 600 it");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_binding_to_identity() {
        let s = Sealer::from_key(&[7u8; 32]);
        let t = Secret::new("rt-0.AAAA-refresh");
        let sealed = s.seal(42, &t);
        assert!(!sealed.blob.windows(7).any(|w| w == b"rt-0.AA"));
        assert_eq!(s.open(42, &sealed).unwrap(), t);
        assert!(matches!(s.open(43, &sealed), Err(SealError::Corrupt)));
        let other = Sealer::from_key(&[8u8; 32]);
        assert!(matches!(
            other.open(42, &sealed),
            Err(SealError::WrongKey { .. })
        ));
        assert!(!format!("{sealed:?}").contains("rt-0"));
    }

    #[test]
    fn key_file_is_created_0600_and_reloaded() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/key");
        let a = Sealer::load(None, &path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let b = Sealer::load(None, &path).unwrap();
        assert_eq!(a.key_id(), b.key_id());
        let sealed = a.seal(1, &Secret::new("x"));
        assert_eq!(b.open(1, &sealed).unwrap().expose(), "x");
    }

    #[test]
    fn key_from_environment_hex_or_base64() {
        let hex = "00".repeat(32);
        let a = Sealer::load(Some(&Secret::new(hex)), Path::new("/nonexistent")).unwrap();
        let b64 = base64::engine::general_purpose::STANDARD.encode([0u8; 32]);
        let b = Sealer::load(Some(&Secret::new(b64)), Path::new("/nonexistent")).unwrap();
        assert_eq!(a.key_id(), b.key_id());
        assert!(Sealer::load(Some(&Secret::new("short")), Path::new("/x")).is_err());
    }
}
