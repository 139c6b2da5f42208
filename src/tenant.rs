//! Tenants: one identity-platform client per configured tenant (`default`
//! is `[identity_provider]`, others are `[tenants.NAME]`), with its app
//! credential (none, a client secret, or a certificate and key) and what is
//! known about that credential: when it expires, and whether the identity
//! platform refuses it right now. While it is refused, every identity of
//! the tenant is shown as blocked by the app credential (an admin renews
//! it), not as needing each user's re-consent.

use crate::config::{Config, CredentialKind, IdpConfig};
use crate::metrics::Metrics;
use crate::store::{now_unix, Store};
use crate::tls::HttpsClient;
use crate::token::IdpClient;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

/// Why a tenant's client cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum TenantError {
    /// The certificate credential cannot be loaded.
    #[error("{section}: {source}")]
    Certificate {
        /// `identity_provider` or `tenants.NAME`.
        section: String,
        /// What is wrong with the files.
        source: crate::token::assertion::CredentialError,
    },
}

/// One configured tenant.
pub struct Tenant {
    /// Configured name (`default`, or the `[tenants.NAME]` key).
    pub name: String,
    /// Small number unique in this process (keys of the shared app tokens).
    pub index: u32,
    /// Its identity-platform client.
    pub idp: IdpClient,
    /// Which credential it has.
    pub kind: CredentialKind,
    /// When the credential expires, when known.
    pub expiry: Option<SystemTime>,
    block: Mutex<Option<String>>,
}

impl std::fmt::Debug for Tenant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tenant")
            .field("name", &self.name)
            .field("kind", &self.kind)
            .finish_non_exhaustive()
    }
}

impl Tenant {
    /// Why the identity platform refuses the app credential, while it does.
    pub fn blocked(&self) -> Option<String> {
        self.block.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Sets or clears the block in memory; whether it changed.
    fn set_block(&self, reason: Option<String>) -> bool {
        let mut g = self.block.lock().unwrap_or_else(|e| e.into_inner());
        if *g == reason {
            return false;
        }
        *g = reason;
        true
    }
}

/// Every configured tenant.
#[derive(Debug)]
pub struct Tenants {
    list: Vec<Arc<Tenant>>,
    by_name: HashMap<String, usize>,
}

/// The identity-platform client of one tenant's settings, with its
/// certificate credential loaded.
pub fn idp_client(config: &IdpConfig, http: HttpsClient) -> Result<IdpClient, TenantError> {
    Ok(build(config, http, "identity_provider")?.0)
}

fn build(
    config: &IdpConfig,
    http: HttpsClient,
    section: &str,
) -> Result<(IdpClient, Option<SystemTime>), TenantError> {
    let mut idp = IdpClient::new(config, http);
    let mut expiry = config.secret_expiry();
    if let (Some(cert), Some(key)) = (&config.certificate_file, &config.private_key_file) {
        let loaded =
            crate::token::assertion::AppCertificate::load(cert, key).map_err(|source| {
                TenantError::Certificate {
                    section: section.to_owned(),
                    source,
                }
            })?;
        expiry = Some(loaded.not_after());
        idp = idp.with_certificate(Arc::new(loaded), config.assertion_algorithm);
    }
    Ok((idp, expiry))
}

fn unix(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

impl Tenants {
    /// Builds every tenant's client (loading certificates).
    pub fn new(config: &Config, http: HttpsClient) -> Result<Tenants, TenantError> {
        let mut list = Vec::new();
        let mut by_name = HashMap::new();
        for (i, (name, section, idp)) in config.tenant_configs().into_iter().enumerate() {
            let (client, expiry) = build(idp, http.clone(), &section)?;
            by_name.insert(name.to_owned(), list.len());
            list.push(Arc::new(Tenant {
                name: name.to_owned(),
                index: u32::try_from(i).unwrap_or(u32::MAX),
                idp: client,
                kind: idp.credential_kind(),
                expiry,
                block: Mutex::new(None),
            }));
        }
        Ok(Tenants { list, by_name })
    }

    /// Tenant `name`, if configured.
    pub fn get(&self, name: &str) -> Option<&Arc<Tenant>> {
        self.by_name.get(name).map(|&i| &self.list[i])
    }

    /// The `default` tenant (`[identity_provider]`).
    pub fn default_tenant(&self) -> &Arc<Tenant> {
        &self.list[0]
    }

    /// Every tenant, `default` first.
    pub fn all(&self) -> &[Arc<Tenant>] {
        &self.list
    }

    /// Exports credential expiries and logs a warning for each credential
    /// that expires within [`crate::config::CREDENTIAL_WARNING`].
    pub fn report_expiry(&self, metrics: &Metrics) {
        let now = SystemTime::now();
        for t in &self.list {
            let Some(at) = t.expiry else { continue };
            metrics.set_credential_expiry(&t.name, unix(at));
            let what = match t.kind {
                CredentialKind::Certificate => "certificate",
                _ => "client secret",
            };
            if let Some(w) = crate::config::expiry_warning(&t.name, what, at, now) {
                tracing::warn!(tenant = %t.name, "app credential: {w}");
            }
        }
    }

    /// The identity platform refused (`Some`) or accepted (`None`) tenant
    /// `name`'s app credential: memory, metric, log and store follow.
    pub fn set_block(
        &self,
        name: &str,
        reason: Option<String>,
        metrics: &Metrics,
        store: &Arc<dyn Store>,
    ) {
        let Some(t) = self.get(name) else { return };
        if !t.set_block(reason.clone()) {
            return;
        }
        metrics.set_credential_blocked(name, reason.is_some());
        match &reason {
            Some(r) => {
                tracing::error!(tenant = %name, reason = %r, "the identity platform refuses the tenant's app credential: every identity of the tenant is blocked until an admin fixes it")
            }
            None => tracing::info!(tenant = %name, "the tenant's app credential works again"),
        }
        let store = store.clone();
        let name = name.to_owned();
        tokio::spawn(async move {
            if let Err(e) = store
                .set_tenant_block(&name, reason.as_deref(), now_unix())
                .await
            {
                tracing::warn!(tenant = %name, error = %e, "cannot record the app credential's state");
            }
        });
    }

    /// Adopts the blocks recorded in the store (by another process or
    /// replica, or before a restart) without writing them back.
    pub fn sync_blocks(&self, recorded: &[(String, String, i64)], metrics: &Metrics) {
        for t in &self.list {
            let reason = recorded
                .iter()
                .find(|(n, _, _)| *n == t.name)
                .map(|(_, r, _)| r.clone());
            t.set_block(reason.clone());
            metrics.set_credential_blocked(&t.name, reason.is_some());
        }
    }
}
