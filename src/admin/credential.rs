//! The admin credential and what it unlocks: the token (configured, or
//! generated 0600 into `[admin] token_file` on first start), console
//! sessions with their CSRF tokens, and one-time sign-in links whose
//! nonces are kept (hashed) in the store so that `authswap admin
//! signin-link` and `serve` may be different processes.

use crate::config::{AdminConfig, Config};
use crate::secret::Secret;
use crate::store::{now_unix, Store, StoreError};
use base64::Engine as _;
use rand::Rng;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use subtle::ConstantTimeEq;

/// How long a one-time sign-in link works.
pub const SIGNIN_LINK_TTL: Duration = Duration::from_secs(60);
/// Most console sessions kept at once; the oldest go first beyond it.
const MAX_SESSIONS: usize = 1024;

/// Why the admin credential could not be loaded or created.
#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    /// Reading or creating the token file failed.
    #[error("admin token file {}: {message}", path.display())]
    File {
        /// The token file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// The token file may be read by group or others.
    #[error(
        "admin token file {} is readable by group or others (mode {mode:o}): run `chmod 600 {}` \
         (and keep it owned by the user authswap runs as)",
        path.display(),
        path.display()
    )]
    Insecure {
        /// The token file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The token file holds no token.
    #[error("admin token file {} is empty: put a token in it, or delete it to have one generated", path.display())]
    Empty {
        /// The token file.
        path: PathBuf,
    },
}

/// A fresh random secret: 32 bytes, base64url without padding.
pub fn random_token() -> String {
    let bytes: [u8; 32] = rand::rng().random();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn digest(s: &str) -> [u8; 32] {
    Sha256::digest(s.as_bytes()).into()
}

/// Constant-time equality of two secrets of any length (their SHA-256
/// digests are compared, so the length does not leak either).
pub fn secrets_equal(a: &str, b: &str) -> bool {
    digest(a).ct_eq(&digest(b)).into()
}

/// The admin token that API calls and console sign-ins present.
pub struct Credential {
    token: Secret,
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Credential(<redacted>)")
    }
}

impl Credential {
    /// `[admin] token` when set, else the content of `[admin] token_file`,
    /// which is created (mode 0600, its directory 0700) with a random
    /// token when missing.
    pub fn load(config: &AdminConfig) -> Result<Credential, CredentialError> {
        if let Some(token) = config.token.as_ref().filter(|t| !t.is_empty()) {
            if token.expose().chars().count() < 16 {
                tracing::warn!(
                    "admin.token is shorter than 16 characters: use a long random token"
                );
            }
            return Ok(Credential {
                token: token.clone(),
            });
        }
        let path = &config.token_file;
        let err = |message: String| CredentialError::File {
            path: path.to_owned(),
            message,
        };
        match std::fs::read_to_string(path) {
            Ok(text) => {
                let text = zeroize::Zeroizing::new(text);
                check_permissions(path)?;
                let token = text.trim();
                if token.is_empty() {
                    return Err(CredentialError::Empty {
                        path: path.to_owned(),
                    });
                }
                Ok(Credential {
                    token: Secret::new(token),
                })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let token = Secret::new(random_token());
                write_new_token_file(path, &token).map_err(|e| err(e.to_string()))?;
                tracing::info!(
                    path = %path.display(),
                    "created the admin token file (mode 0600): sign in to the console or call the API with the token in it"
                );
                Ok(Credential { token })
            }
            Err(e) => Err(err(e.to_string())),
        }
    }

    /// Whether `presented` is the admin token (constant time).
    pub fn matches(&self, presented: &str) -> bool {
        secrets_equal(self.token.expose(), presented)
    }
}

fn write_new_token_file(path: &Path, token: &Secret) -> std::io::Result<()> {
    crate::store::seal::write_new_secret_file(path, token.expose().as_bytes())
}

fn check_permissions(path: &Path) -> Result<(), CredentialError> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path).map_err(|e| CredentialError::File {
        path: path.to_owned(),
        message: e.to_string(),
    })?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(CredentialError::Insecure {
            path: path.to_owned(),
            mode,
        });
    }
    Ok(())
}

/// One signed-in browser.
struct Session {
    csrf: Secret,
    expires: Instant,
}

/// Console sessions in memory, keyed by the SHA-256 of the cookie value.
/// A restart signs everyone out.
pub struct Sessions {
    map: Mutex<HashMap<[u8; 32], Session>>,
    ttl: Duration,
}

impl std::fmt::Debug for Sessions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sessions")
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

/// A session just created: the cookie value and its CSRF token.
pub struct NewSession {
    /// Cookie value.
    pub id: Secret,
    /// Synchronizer token for the session's forms.
    pub csrf: Secret,
}

impl Sessions {
    /// Sessions that last `ttl`.
    pub fn new(ttl: Duration) -> Sessions {
        Sessions {
            map: Mutex::new(HashMap::new()),
            ttl,
        }
    }

    /// How long a session lasts.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Starts a session.
    pub fn create(&self) -> NewSession {
        let id = Secret::new(random_token());
        let csrf = Secret::new(random_token());
        let now = Instant::now();
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        map.retain(|_, s| s.expires > now);
        while map.len() >= MAX_SESSIONS {
            let Some(oldest) = map.iter().min_by_key(|(_, s)| s.expires).map(|(k, _)| *k) else {
                break;
            };
            map.remove(&oldest);
        }
        map.insert(
            digest(id.expose()),
            Session {
                csrf: csrf.clone(),
                expires: now + self.ttl,
            },
        );
        NewSession { id, csrf }
    }

    /// The CSRF token of the live session with cookie value `id`.
    pub fn csrf(&self, id: &str) -> Option<Secret> {
        let key = digest(id);
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        match map.get(&key) {
            Some(s) if s.expires > Instant::now() => Some(s.csrf.clone()),
            Some(_) => {
                map.remove(&key);
                None
            }
            None => None,
        }
    }

    /// Ends the session with cookie value `id`.
    pub fn remove(&self, id: &str) {
        self.map
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&digest(id));
    }
}

/// Creates a one-time sign-in link nonce valid for [`SIGNIN_LINK_TTL`];
/// only its hash is stored.
pub async fn issue_signin_link(store: &dyn Store) -> Result<Secret, StoreError> {
    let nonce = Secret::new(random_token());
    let ttl = SIGNIN_LINK_TTL.as_secs() as i64;
    store
        .put_admin_link(&digest(nonce.expose()), now_unix() + ttl)
        .await?;
    Ok(nonce)
}

/// Redeems a one-time sign-in link nonce: true once, within its lifetime.
pub async fn redeem_signin_link(store: &dyn Store, nonce: &str) -> Result<bool, StoreError> {
    // Nonces are base64url; anything else was never issued.
    if nonce.is_empty()
        || nonce.len() > 128
        || !nonce
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Ok(false);
    }
    store.take_admin_link(&digest(nonce), now_unix()).await
}

/// The base URL of the admin listener as configured (`http://` or
/// `https://` with TLS); an unspecified address (`0.0.0.0`, `[::]`) is
/// shown as loopback.
pub fn admin_base_url(config: &Config) -> String {
    let scheme = if config.admin.tls_cert_file.is_some() {
        "https"
    } else {
        "http"
    };
    let host = match crate::config::parse_listen("admin.listen", &config.admin.listen) {
        Ok(addr) if addr.ip().is_unspecified() => {
            let ip: std::net::IpAddr = if addr.is_ipv4() {
                std::net::Ipv4Addr::LOCALHOST.into()
            } else {
                std::net::Ipv6Addr::LOCALHOST.into()
            };
            std::net::SocketAddr::new(ip, addr.port()).to_string()
        }
        Ok(addr) => addr.to_string(),
        Err(_) => config.admin.listen.clone(),
    };
    format!("{scheme}://{host}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn admin(path: &Path) -> AdminConfig {
        AdminConfig {
            token_file: path.to_owned(),
            ..AdminConfig::default()
        }
    }

    #[test]
    fn token_file_is_generated_0600_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/admin.token");
        let first = Credential::load(&admin(&path)).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.trim().len(), 43);
        assert!(first.matches(text.trim()));
        let again = Credential::load(&admin(&path)).unwrap();
        assert!(again.matches(text.trim()));
        assert!(!again.matches("wrong"));
        assert!(!format!("{again:?}").contains(text.trim()));
    }

    #[test]
    fn a_readable_token_file_or_an_empty_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("admin.token");
        std::fs::write(&path, "abcdefghijklmnopqrstuvwxyz").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = Credential::load(&admin(&path)).unwrap_err();
        assert!(matches!(err, CredentialError::Insecure { .. }), "{err}");
        assert!(!err.to_string().contains("abcdefghij"));
        std::fs::write(&path, "\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let err = Credential::load(&admin(&path)).unwrap_err();
        assert!(matches!(err, CredentialError::Empty { .. }), "{err}");
    }

    #[test]
    fn a_configured_token_wins_over_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("admin.token");
        let mut config = admin(&path);
        config.token = Some(Secret::new("configured-token-0123456789"));
        let c = Credential::load(&config).unwrap();
        assert!(c.matches("configured-token-0123456789"));
        assert!(!path.exists());
    }

    #[test]
    fn sessions_expire_and_end() {
        let sessions = Sessions::new(Duration::from_secs(60));
        let s = sessions.create();
        assert_eq!(sessions.csrf(s.id.expose()), Some(s.csrf.clone()));
        assert!(sessions.csrf("nope").is_none());
        sessions.remove(s.id.expose());
        assert!(sessions.csrf(s.id.expose()).is_none());
        let short = Sessions::new(Duration::ZERO);
        let s = short.create();
        assert!(short.csrf(s.id.expose()).is_none());
    }

    #[tokio::test]
    async fn signin_links_work_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::SqliteStore::open(&dir.path().join("a.db"))
            .await
            .unwrap();
        let nonce = issue_signin_link(&store).await.unwrap();
        assert!(!redeem_signin_link(&store, "other").await.unwrap());
        assert!(redeem_signin_link(&store, nonce.expose()).await.unwrap());
        assert!(!redeem_signin_link(&store, nonce.expose()).await.unwrap());
        // Expired links do not work.
        store
            .put_admin_link(&digest("late"), now_unix() - 1)
            .await
            .unwrap();
        assert!(!redeem_signin_link(&store, "late").await.unwrap());
    }
}
