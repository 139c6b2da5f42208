//! The application core shared by every front end: configuration, store,
//! directory of identities, authenticator, token engine, outbound client and
//! metrics, plus the reload that makes CLI changes visible to a running
//! server without a restart.

use crate::config::Config;
use crate::identity::{Authenticator, Directory};
use crate::metrics::{Metrics, StoreOperation};
use crate::store::{open_sealer, KeyError, KeyUse, SealError, Sealer, Status, Store, StoreError};
use crate::tenant::{TenantError, Tenants};
use crate::tls::{HttpsClient, TlsError};
use crate::token::TokenEngine;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

/// Why the application could not be assembled.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// The store could not be opened.
    #[error("{0}")]
    Store(#[from] StoreError),
    /// The sealing key could not be loaded.
    #[error("{0}")]
    Seal(#[from] SealError),
    /// The sealing key does not fit the store (missing, or another key
    /// sealed the stored tokens).
    #[error("{0}")]
    Key(#[from] KeyError),
    /// TLS setup failed.
    #[error("{0}")]
    Tls(#[from] TlsError),
    /// A tenant's app credential cannot be loaded.
    #[error("{0}")]
    Tenant(#[from] TenantError),
}

/// The longest a `/readyz` probe waits for the store (or
/// `store.connect_timeout`, when shorter): a dead database answers "not
/// ready" in bounded time instead of holding the probe.
pub const READY_PROBE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// Everything a front end needs.
pub struct App {
    /// Effective configuration.
    pub config: Arc<Config>,
    /// Persistent store.
    pub store: Arc<dyn Store>,
    /// Sealing of refresh tokens.
    pub sealer: Sealer,
    /// Metric families.
    pub metrics: Arc<Metrics>,
    /// Identities in memory.
    pub directory: Arc<Directory>,
    /// Local password checks (shared across configuration reloads, so
    /// lockouts survive them).
    pub auth: Arc<Authenticator>,
    /// Access tokens.
    pub tokens: TokenEngine,
    /// Pooled outbound HTTPS client.
    pub client: HttpsClient,
    /// The TLS client configuration behind `client` (roots + extra CA),
    /// for front ends that open their own upstream connections.
    pub client_tls: rustls::ClientConfig,
    /// Store revision the directory reflects; shared with the apps that
    /// configuration reloads build from this one (same directory).
    revision: Arc<AtomicI64>,
    /// How the admin API asks the running server to reload its
    /// configuration (set by `serve`; shared across reloads).
    pub reloader: Arc<std::sync::OnceLock<crate::reload::Reloader>>,
}

impl std::fmt::Debug for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("App")
            .field("identities", &self.directory.len())
            .finish_non_exhaustive()
    }
}

impl App {
    /// Opens the store and key, builds the clients, loads identities.
    pub async fn open(config: Config) -> Result<Arc<App>, AppError> {
        let config = Arc::new(config);
        let store: Arc<dyn Store> = crate::store::open(&config).await?;
        let sealer = open_sealer(&config.store, store.as_ref(), KeyUse::Serve).await?;
        let client_config = crate::tls::client_config(&config.tls)?;
        let client = crate::tls::https_client(client_config.clone(), crate::tls::CONNECT_TIMEOUT);
        let tenants = Arc::new(Tenants::new(&config, client.clone())?);
        let metrics = Arc::new(Metrics::new());
        tenants.report_expiry(&metrics);
        let directory = Arc::new(Directory::default());
        let auth = Arc::new(Authenticator::new(
            directory.clone(),
            metrics.clone(),
            config.auth.clone(),
        ));
        let tokens = TokenEngine::new(
            store.clone(),
            sealer.clone(),
            tenants,
            metrics.clone(),
            config.tokens.clone(),
        );
        let app = Arc::new(App {
            config,
            store,
            sealer,
            metrics,
            directory,
            auth,
            tokens,
            client,
            client_tls: client_config,
            revision: Arc::new(AtomicI64::new(-1)),
            reloader: Arc::default(),
        });
        app.reload().await?;
        Ok(app)
    }

    /// The application for a reloaded `config`: the same store, key,
    /// metrics, identities, lockouts and token engine (one engine per
    /// process: refreshes of an identity stay serialised across a reload)
    /// as `self`. With `new_tenants` (its `[identity_provider]`,
    /// `[tenants]` or `[tls]` changed), the outbound TLS client and the
    /// tenants' clients are built from `config`; the tenants are returned
    /// for [`TokenEngine::set_tenants`] once the reload is committed.
    pub async fn reconfigured(
        &self,
        config: Config,
        new_tenants: bool,
    ) -> Result<(Arc<App>, Option<Arc<Tenants>>), AppError> {
        let config = Arc::new(config);
        let (tenants, client, client_tls) = if new_tenants {
            let client_config = crate::tls::client_config(&config.tls)?;
            let client =
                crate::tls::https_client(client_config.clone(), crate::tls::CONNECT_TIMEOUT);
            let tenants = Arc::new(Tenants::new(&config, client.clone())?);
            tenants.sync_blocks(&self.store.tenant_blocks().await?, &self.metrics);
            (Some(tenants), client, client_config)
        } else {
            (None, self.client.clone(), self.client_tls.clone())
        };
        let app = Arc::new(App {
            config,
            store: self.store.clone(),
            sealer: self.sealer.clone(),
            metrics: self.metrics.clone(),
            directory: self.directory.clone(),
            auth: self.auth.clone(),
            tokens: self.tokens.clone(),
            client,
            client_tls,
            revision: self.revision.clone(),
            reloader: self.reloader.clone(),
        });
        Ok((app, tenants))
    }

    /// Picks up identity changes made elsewhere (CLI, other replicas) when
    /// the store's revision moved. Returns whether anything was reloaded.
    pub async fn reload(&self) -> Result<bool, StoreError> {
        let revision = self.store.revision().await?;
        if revision == self.revision.load(Ordering::Acquire) {
            return Ok(false);
        }
        let records = self.store.list().await?;
        let blocks = self.store.tenant_blocks().await?;
        self.tokens.tenants().sync_blocks(&blocks, &self.metrics);
        let changes = self.directory.apply(&records);
        for gone in &changes.removed {
            self.tokens.forget(gone.id);
            if self.directory.get(&gone.name).is_none() {
                self.metrics.forget_identity(&gone.name);
            }
            tracing::info!(identity = %gone.name, "identity removed");
        }
        for changed in &changes.replaced {
            // New, re-passworded or re-linked: cached tokens may belong to
            // the previous link.
            self.tokens.forget(changed.id);
            // Stores written before names were restricted may hold names
            // that `identity add` refuses today (e.g. `_unknown`, which
            // would share the unknown names' metric series).
            let rule = match crate::names::validate_name(&changed.name) {
                Err(e) => Some(e.to_string()),
                Ok(n) if n != changed.name => Some("not in Unicode NFC".to_owned()),
                Ok(_) => None,
            };
            if let Some(rule) = rule {
                tracing::warn!(
                    identity = %crate::names::Shown(&changed.name),
                    problem = %rule,
                    "identity name breaks the naming rules; remove the identity and add it again under a valid name"
                );
            }
        }
        let mut counts = Status::ALL.map(|s| (s.as_str(), 0i64));
        for r in &records {
            if let Some(c) = counts.iter_mut().find(|(s, _)| *s == r.status.as_str()) {
                c.1 += 1;
            }
            // A person must sign in before the identity works: never
            // linked, or its refresh token was refused.
            self.metrics.set_reauth_required(
                &r.name,
                matches!(r.status, Status::NeedsReauth | Status::Pending),
            );
            self.metrics
                .set_identity_info(&r.name, &r.tenant, r.mode.as_str());
        }
        self.metrics.set_identity_counts(&counts);
        if !changes.replaced.is_empty() || !changes.removed.is_empty() {
            tracing::info!(
                identities = records.len(),
                changed = changes.replaced.len(),
                removed = changes.removed.len(),
                "identities reloaded"
            );
        }
        self.revision.store(revision, Ordering::Release);
        Ok(true)
    }

    /// Whether the store answers (`/readyz`), within
    /// [`READY_PROBE_TIMEOUT`]; the outcome updates the store's health.
    pub async fn readiness_probe(&self) -> Result<(), ()> {
        let limit = READY_PROBE_TIMEOUT.min(self.config.store.connect_timeout);
        match tokio::time::timeout(limit, self.store.revision()).await {
            Ok(Ok(_)) => {
                self.tokens.store_answered(StoreOperation::readiness);
                Ok(())
            }
            Ok(Err(e)) => {
                self.tokens.store_unreachable(StoreOperation::readiness, &e);
                Err(())
            }
            Err(_) => {
                self.tokens.store_unreachable(
                    StoreOperation::readiness,
                    &format_args!("no answer within {limit:?}"),
                );
                Err(())
            }
        }
    }

    /// Reloads when the store pushes a change (PostgreSQL `LISTEN`) and
    /// every `tokens.reload_interval`, and prunes caches, until `shutdown`
    /// fires. Each reload is also the store's probe: its outcome sets
    /// `authswap_store_up` ([`crate::store::StoreHealth`]); a failed one is
    /// retried on the next tick, so the server reconnects by itself.
    pub fn spawn_background(
        self: &Arc<Self>,
        mut shutdown: tokio::sync::watch::Receiver<bool>,
    ) -> tokio::task::JoinHandle<()> {
        let app = self.clone();
        app.tokens.store_health().set_probed();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(app.config.tokens.reload_interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            // Pushed changes (PostgreSQL): reload at once; the tick stays
            // as the safety net.
            let mut changes = match app.store.changes().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot subscribe to the store's changes; polling only");
                    None
                }
            };
            let mut n: u64 = 0;
            loop {
                let pushed = async {
                    match changes.as_mut() {
                        Some(c) => c.recv().await,
                        None => std::future::pending().await,
                    }
                };
                let ticked = tokio::select! {
                    _ = tick.tick() => true,
                    woke = pushed => {
                        if woke.is_none() {
                            changes = None;
                        }
                        false
                    }
                    _ = shutdown.changed() => return,
                };
                // Bounded by store.connect_timeout and statement_timeout.
                let reloaded = tokio::select! {
                    r = app.reload() => r,
                    _ = shutdown.changed() => return,
                };
                match reloaded {
                    Ok(_) => app.tokens.store_answered(StoreOperation::reload),
                    Err(e) => app.tokens.store_unreachable(StoreOperation::reload, &e),
                }
                if !ticked {
                    continue;
                }
                n += 1;
                if n.is_multiple_of(60) {
                    app.auth.prune();
                }
                // Expiring app credentials: warned about again every day.
                if n.is_multiple_of(
                    (86_400 / app.config.tokens.reload_interval.as_secs().max(1)).max(1),
                ) {
                    app.tokens.tenants().report_expiry(&app.metrics);
                }
            }
        })
    }
}
