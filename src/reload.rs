//! Live reload of the configuration (`SIGHUP`, `POST /api/v1/reload`):
//! which sections of a new configuration apply at runtime and which need a
//! restart, the report a reload gives, and the handle through which the
//! admin API asks the running server for one. Re-binding the listeners is
//! [`crate::server`]'s part.

use crate::config::{Config, ConfigError};
use futures_util::future::BoxFuture;
use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::Arc;

/// Sections that cannot change while serving: a reload keeps their running
/// value and says "restart required". `store` (database, key file: the
/// sealed tokens and open connections depend on them), `runtime` (threads
/// are started once), `auth` (the authenticator holds lockouts and the
/// credential cache, kept across reloads), `tokens` (the token engine, one
/// per process, kept across reloads with its cached tokens).
pub const RESTART_REQUIRED: &[&str] = &["store", "runtime", "auth", "tokens"];

/// What a reload did.
#[derive(Debug, Clone, Default, Serialize, utoipa::ToSchema)]
pub struct ReloadReport {
    /// Sections whose changes now apply (new connections and logins use
    /// them; open connections finish on the previous ones).
    pub applied: Vec<String>,
    /// Sections that changed but need a restart: their running values are
    /// kept.
    pub restart_required: Vec<String>,
    /// Listener addresses after the reload, by section (`admin`, `http`,
    /// `smtp`, `imap`, `pop3`, `onboarding`).
    pub listeners: BTreeMap<String, String>,
}

/// Why a reload was refused (the running configuration keeps serving).
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The file or environment does not make a valid configuration.
    #[error("the new configuration is invalid, keeping the running one: {0}")]
    Invalid(#[from] ConfigError),
    /// Valid, but it could not be put in place (a listener address in use,
    /// a certificate file missing, ...).
    #[error("cannot apply the new configuration, keeping the running one: {0}")]
    Apply(String),
    /// Nothing to reload (no server running with a configuration file).
    #[error("no running server to reload")]
    Unavailable,
}

type ReloadFn = dyn Fn() -> BoxFuture<'static, Result<ReloadReport, ReloadError>> + Send + Sync;

/// Asks the running server to reload its configuration.
#[derive(Clone)]
pub struct Reloader(Arc<ReloadFn>);

impl std::fmt::Debug for Reloader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Reloader")
    }
}

impl Reloader {
    /// A reloader that runs `f`.
    pub fn new(
        f: impl Fn() -> BoxFuture<'static, Result<ReloadReport, ReloadError>> + Send + Sync + 'static,
    ) -> Reloader {
        Reloader(Arc::new(f))
    }

    /// Reloads now.
    pub async fn reload(&self) -> Result<ReloadReport, ReloadError> {
        (self.0)().await
    }
}

/// Serialised value of a section plus its secrets (which serialise
/// redacted), to tell whether it changed.
fn fingerprint<T: Serialize>(section: &T, secrets: &[Option<&str>]) -> String {
    let mut s = serde_json::to_string(section).unwrap_or_default();
    for secret in secrets {
        s.push('\0');
        s.push_str(secret.unwrap_or("\u{1}"));
    }
    s
}

/// Fingerprints of every section of `c`, by section name.
fn sections(c: &Config) -> BTreeMap<&'static str, String> {
    let secret = |s: &Option<crate::secret::Secret>| s.as_ref().map(|s| s.expose().to_owned());
    let idp: Vec<_> = std::iter::once(&c.identity_provider)
        .chain(c.tenants.values())
        .map(|t| secret(&t.client_secret))
        .collect();
    let idp: Vec<Option<&str>> = idp.iter().map(|s| s.as_deref()).collect();
    let store = [secret(&c.store.key), secret(&c.store.password)];
    let store: Vec<Option<&str>> = store.iter().map(|s| s.as_deref()).collect();
    let admin = secret(&c.admin.token);
    let webhook = secret(&c.notifications.webhook_secret);
    BTreeMap::from([
        ("store", fingerprint(&c.store, &store)),
        (
            "identity_provider",
            fingerprint(&(&c.identity_provider, &c.tenants), &idp),
        ),
        ("tls", fingerprint(&c.tls, &[])),
        ("http", fingerprint(&c.http, &[])),
        ("admin", fingerprint(&c.admin, &[admin.as_deref()])),
        ("auth", fingerprint(&c.auth, &[])),
        ("tokens", fingerprint(&c.tokens, &[])),
        ("smtp", fingerprint(&c.smtp, &[])),
        ("imap", fingerprint(&c.imap, &[])),
        ("pop3", fingerprint(&c.pop3, &[])),
        ("runtime", fingerprint(&c.runtime, &[])),
        ("onboarding", fingerprint(&c.onboarding, &[])),
        (
            "notifications",
            fingerprint(&c.notifications, &[webhook.as_deref()]),
        ),
    ])
}

/// The sections that differ between `old` and `new`.
pub fn changed_sections(old: &Config, new: &Config) -> Vec<&'static str> {
    let (a, b) = (sections(old), sections(new));
    a.iter()
        .filter(|(k, v)| b.get(*k) != Some(*v))
        .map(|(k, _)| *k)
        .collect()
}

/// Puts the running values of the [`RESTART_REQUIRED`] sections into `new`
/// and returns the names of those that differed.
pub fn keep_restart_required(old: &Config, new: &mut Config) -> Vec<&'static str> {
    let changed = changed_sections(old, new);
    let kept: Vec<&'static str> = changed
        .into_iter()
        .filter(|s| RESTART_REQUIRED.contains(s))
        .collect();
    new.store = old.store.clone();
    new.runtime = old.runtime.clone();
    new.auth = old.auth.clone();
    new.tokens = old.tokens.clone();
    kept
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_count_as_changes_and_restart_sections_are_kept() {
        let old = Config::default();
        let mut new = Config::default();
        assert!(changed_sections(&old, &new).is_empty());
        new.identity_provider.client_secret = Some(crate::secret::Secret::new("s2"));
        new.smtp.listen = "127.0.0.1:2599".into();
        new.runtime.worker_threads = 7;
        new.tokens.retry_max = std::time::Duration::from_secs(1234);
        assert_eq!(
            changed_sections(&old, &new),
            vec!["identity_provider", "runtime", "smtp", "tokens"]
        );
        assert_eq!(
            keep_restart_required(&old, &mut new),
            vec!["runtime", "tokens"]
        );
        assert_eq!(new.runtime.worker_threads, old.runtime.worker_threads);
        assert_eq!(
            changed_sections(&old, &new),
            vec!["identity_provider", "smtp"]
        );
    }
}
