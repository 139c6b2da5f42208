//! Sealing of refresh tokens with XChaCha20-Poly1305 under a 256-bit key that
//! lives outside the database (a 0600 key file or the environment), with the
//! identity bound in as associated data so a sealed token cannot be moved to
//! another identity row.

use super::{Store, StoreError, TokenKey};
use crate::config::StoreConfig;
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
    /// The key file may be read by group or others, and
    /// `store.allow_insecure_key_file` is not set.
    #[error(
        "sealing key file {} is readable by group or others (mode {mode:o}): run `chmod 600 {}` \
         (and keep it owned by the user authswap runs as), or set \
         store.allow_insecure_key_file = true to accept it",
        path.display(),
        path.display()
    )]
    InsecureKeyFile {
        /// The key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
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

    /// The configured key: `store.key` (hex or base64, usually from
    /// `AUTHSWAP_STORE__KEY`) when given, else the content of
    /// `store.key_file`; `Ok(None)` when that file does not exist. Never
    /// creates a key: see [`open_sealer`].
    pub fn read(cfg: &StoreConfig) -> Result<Option<Sealer>, SealError> {
        if let Some(key) = &cfg.key {
            let bytes = decode_key(key.expose()).map_err(SealError::BadKey)?;
            return Ok(Some(Sealer::from_key(&bytes)));
        }
        let key_file = &cfg.key_file;
        let err = |message: String| SealError::KeyFile {
            path: key_file.to_owned(),
            message,
        };
        match std::fs::read_to_string(key_file) {
            Ok(text) => {
                let text = Zeroizing::new(text);
                check_permissions(key_file, cfg.allow_insecure_key_file)?;
                let bytes = decode_key(text.trim()).map_err(err)?;
                Ok(Some(Sealer::from_key(&bytes)))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(err(e.to_string())),
        }
    }

    /// Creates `key_file` (mode 0600, its directory 0700) with a fresh
    /// random key. Fails if the file exists.
    pub fn create(key_file: &Path) -> Result<Sealer, SealError> {
        let mut key = Zeroizing::new([0u8; 32]);
        rand::rng().fill_bytes(key.as_mut());
        write_new_key_file(key_file, &key).map_err(|e| SealError::KeyFile {
            path: key_file.to_owned(),
            message: e.to_string(),
        })?;
        tracing::info!(path = %key_file.display(), "created a new sealing key file (mode 0600); back it up with the database");
        Ok(Sealer::from_key(&key))
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

/// What the sealing key is opened for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyUse {
    /// `serve`: every stored refresh token must open with the key.
    Serve,
    /// `identity login` / `import`: the identity is about to be sealed
    /// (again) with the key, which is how identities whose tokens were
    /// sealed with a lost key are recovered; tokens of others sealed with
    /// another key are reported, not refused.
    Link,
}

/// Why the configured sealing key cannot be used with the store.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The key could not be read or created.
    #[error("{0}")]
    Seal(#[from] SealError),
    /// The store could not say which keys sealed its tokens.
    #[error("{0}")]
    Store(#[from] StoreError),
    /// The key file is missing while the store holds sealed tokens: a new
    /// key could not open them, so none is created.
    #[error(
        "sealing key file {} is missing, but the store holds refresh tokens of {identities} \
         sealed with key {key_ids}: restore the key file from your backup (or give the key in \
         AUTHSWAP_STORE__KEY); authswap does not create a new key while such tokens exist \
         (if the key is lost for good, see \"Back up the key\" in the README)",
        path.display()
    )]
    Missing {
        /// The configured key file.
        path: PathBuf,
        /// Which identities hold sealed tokens (a few names and a count).
        identities: String,
        /// The key ids recorded with them.
        key_ids: String,
    },
    /// Stored tokens were sealed with a key other than the configured one.
    #[error(
        "the store holds refresh tokens of {identities} sealed with key {found}, but the \
         configured key is {current}: restore the key that sealed them (store.key_file, or \
         AUTHSWAP_STORE__KEY); if it is lost for good, sign those identities in again with \
         `authswap identity login NAME` or remove them"
    )]
    Mismatch {
        /// Which identities (a few names and a count).
        identities: String,
        /// The key ids recorded with their tokens.
        found: String,
        /// Id of the configured key.
        current: String,
    },
}

/// "alice, bob and 3 more" (names escaped for display).
fn describe_identities(tokens: &[&TokenKey]) -> String {
    const SHOWN: usize = 5;
    let mut out = tokens
        .iter()
        .take(SHOWN)
        .map(|t| crate::names::Shown(&t.name).to_string())
        .collect::<Vec<_>>()
        .join(", ");
    if tokens.len() > SHOWN {
        out.push_str(&format!(" and {} more", tokens.len() - SHOWN));
    }
    format!(
        "{} identit{} ({out})",
        tokens.len(),
        if tokens.len() == 1 { "y" } else { "ies" }
    )
}

fn key_ids(tokens: &[&TokenKey]) -> String {
    let mut ids: Vec<&str> = tokens
        .iter()
        .map(|t| {
            if t.key_id.is_empty() {
                "(none)"
            } else {
                t.key_id.as_str()
            }
        })
        .collect();
    ids.sort_unstable();
    ids.dedup();
    ids.join(", ")
}

/// Opens the configured sealing key for use with `store`, which is where
/// both are known. A missing key file is created only while the store holds
/// no sealed refresh token (a new key could not open them: the file must be
/// restored instead), and for [`KeyUse::Serve`] every stored token must
/// have been sealed with the configured key.
pub async fn open_sealer(
    cfg: &StoreConfig,
    store: &dyn Store,
    purpose: KeyUse,
) -> Result<Sealer, KeyError> {
    let tokens = store.token_keys().await?;
    let all: Vec<&TokenKey> = tokens.iter().collect();
    let sealer = match Sealer::read(cfg)? {
        Some(sealer) => sealer,
        None if all.is_empty() => match Sealer::create(&cfg.key_file) {
            Ok(sealer) => sealer,
            // Created by another process in the meantime.
            Err(_) if cfg.key_file.exists() => {
                Sealer::read(cfg)?.ok_or_else(|| SealError::KeyFile {
                    path: cfg.key_file.clone(),
                    message: "disappeared while it was being created".into(),
                })?
            }
            Err(e) => return Err(e.into()),
        },
        None => {
            return Err(KeyError::Missing {
                path: cfg.key_file.clone(),
                identities: describe_identities(&all),
                key_ids: key_ids(&all),
            })
        }
    };
    let foreign: Vec<&TokenKey> = all
        .into_iter()
        .filter(|t| t.key_id != sealer.key_id)
        .collect();
    if !foreign.is_empty() {
        let err = KeyError::Mismatch {
            identities: describe_identities(&foreign),
            found: key_ids(&foreign),
            current: sealer.key_id.clone(),
        };
        match purpose {
            KeyUse::Serve => return Err(err),
            KeyUse::Link => tracing::warn!("{err}"),
        }
    }
    Ok(sealer)
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
    let hex: Zeroizing<String> = Zeroizing::new(key.iter().map(|b| format!("{b:02x}")).collect());
    write_new_secret_file(path, hex.as_bytes())
}

/// Creates `path` (never replacing a file) with mode 0600 in a 0700
/// directory, writes `secret` and a newline, and syncs it: the sealing key
/// and the admin token.
pub(crate) fn write_new_secret_file(path: &Path, secret: &[u8]) -> std::io::Result<()> {
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
    file.write_all(secret)?;
    file.write_all(b"\n")?;
    file.sync_all()
}

/// Refuses a key file that group or others may read, unless `allow` (then
/// only warns): anyone who can read it can open every stored refresh token.
fn check_permissions(path: &Path, allow: bool) -> Result<(), SealError> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path).map_err(|e| SealError::KeyFile {
        path: path.to_owned(),
        message: e.to_string(),
    })?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 == 0 {
        return Ok(());
    }
    if !allow {
        return Err(SealError::InsecureKeyFile {
            path: path.to_owned(),
            mode,
        });
    }
    tracing::warn!(path = %path.display(), mode = %format!("{mode:o}"), "sealing key file is readable by group or others (accepted: store.allow_insecure_key_file = true); chmod 600 it");
    Ok(())
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

    fn config(key_file: &Path, key: Option<&str>) -> StoreConfig {
        StoreConfig {
            key_file: key_file.to_owned(),
            key: key.map(Secret::new),
            ..StoreConfig::default()
        }
    }

    #[test]
    fn key_file_is_created_0600_and_reloaded() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/key");
        let cfg = config(&path, None);
        assert!(Sealer::read(&cfg).unwrap().is_none(), "read never creates");
        assert!(!path.exists());
        let a = Sealer::create(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(Sealer::create(&path).is_err(), "never overwritten");
        let b = Sealer::read(&cfg).unwrap().unwrap();
        assert_eq!(a.key_id(), b.key_id());
        let sealed = a.seal(1, &Secret::new("x"));
        assert_eq!(b.open(1, &sealed).unwrap().expose(), "x");
    }

    #[test]
    fn key_from_environment_hex_or_base64() {
        let nowhere = Path::new("/nonexistent");
        let hex = "00".repeat(32);
        let a = Sealer::read(&config(nowhere, Some(&hex))).unwrap().unwrap();
        let b64 = base64::engine::general_purpose::STANDARD.encode([0u8; 32]);
        let b = Sealer::read(&config(nowhere, Some(&b64))).unwrap().unwrap();
        assert_eq!(a.key_id(), b.key_id());
        assert!(Sealer::read(&config(nowhere, Some("short"))).is_err());
    }

    #[test]
    fn a_key_file_readable_by_others_is_refused_unless_allowed() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        let created = Sealer::create(&path).unwrap();
        for mode in [0o640, 0o604, 0o644] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            let err = Sealer::read(&config(&path, None)).unwrap_err();
            assert!(matches!(err, SealError::InsecureKeyFile { .. }), "{err}");
            assert!(err.to_string().contains("chmod 600"), "{err}");
            let mut allowed = config(&path, None);
            allowed.allow_insecure_key_file = true;
            let s = Sealer::read(&allowed).unwrap().unwrap();
            assert_eq!(s.key_id(), created.key_id());
        }
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o400)).unwrap();
        assert!(Sealer::read(&config(&path, None)).unwrap().is_some());
    }

    #[tokio::test]
    async fn a_key_is_created_only_while_no_token_is_sealed() {
        use crate::store::SqliteStore;
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("a.db")).await.unwrap();
        let key_file = dir.path().join("key");
        let cfg = config(&key_file, None);
        let rec = store
            .create(&crate::store::NewIdentity::delegated(
                "alice",
                "a@contoso.com",
                "h",
            ))
            .await
            .unwrap();
        store
            .create(&crate::store::NewIdentity::delegated(
                "bob",
                "b@contoso.com",
                "h",
            ))
            .await
            .unwrap();
        // No sealed token yet: the key is created.
        let first = open_sealer(&cfg, &store, KeyUse::Serve).await.unwrap();
        store
            .link(rec.id, &first.seal(rec.id, &Secret::new("rt")))
            .await
            .unwrap();
        // The key file disappears: refused, and not recreated.
        std::fs::remove_file(&key_file).unwrap();
        for purpose in [KeyUse::Serve, KeyUse::Link] {
            let err = open_sealer(&cfg, &store, purpose).await.unwrap_err();
            assert!(matches!(err, KeyError::Missing { .. }), "{err}");
            let msg = err.to_string();
            assert!(msg.contains("restore the key file"), "{msg}");
            assert!(
                msg.contains(first.key_id()) && msg.contains("alice"),
                "{msg}"
            );
            assert!(!key_file.exists());
        }
        // Another key: serve refuses; linking (the way back) is allowed.
        let other = config(&key_file, Some(&"11".repeat(32)));
        let err = open_sealer(&other, &store, KeyUse::Serve)
            .await
            .unwrap_err();
        assert!(matches!(err, KeyError::Mismatch { .. }), "{err}");
        assert!(err.to_string().contains("1 identity (alice)"), "{err}");
        let second = open_sealer(&other, &store, KeyUse::Link).await.unwrap();
        store
            .link(rec.id, &second.seal(rec.id, &Secret::new("rt2")))
            .await
            .unwrap();
        open_sealer(&other, &store, KeyUse::Serve).await.unwrap();
    }
}
