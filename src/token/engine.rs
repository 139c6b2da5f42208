//! The token engine: in-memory access tokens per (identity, scope set), one
//! refresh per key at a time (concurrent callers wait on the same flight),
//! refreshes of one identity serialised (so a rotated refresh token is always
//! the one used next), refresh ahead of expiry, rotated refresh tokens
//! committed before the access token is handed out, and the failure policy:
//! needs-reauth is persisted and stops calls to the platform; transient
//! failures back off with jitter, honouring `Retry-After`. It also keeps
//! the state of the upstream-refusal policy ([`super::refusal`]): which
//! token was issued because its predecessor was refused, consecutive
//! refusals of such fresh tokens, and the backoff they start.

use super::error::IdpError;
use super::refusal::{Refusal, Verdict};
use crate::config::TokenConfig;
use crate::error::Origin;
use crate::identity::Identity;
use crate::metrics::{FailureReason, Metrics, Protocol, RefreshResult, StoreOperation};
use crate::secret::Secret;
use crate::singleflight::SingleFlight;
use crate::store::{
    now_unix, Lease, LeaseCommit, Mode, SealedToken, Sealer, Status, Store, StoreError, StoreHealth,
};
use crate::tenant::{Tenant, Tenants};
use dashmap::DashMap;
use rand::Rng;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// A scope set, normalised (sorted, deduplicated) with a precomputed key
/// and a small id: equal sets get the same id in a process, so the token
/// cache hashes a number per request instead of the scope string.
#[derive(Clone)]
pub struct Scopes {
    id: u32,
    key: Arc<str>,
    list: Arc<[String]>,
}

impl PartialEq for Scopes {
    fn eq(&self, other: &Self) -> bool {
        self.id == other.id
    }
}

impl Eq for Scopes {}

impl std::hash::Hash for Scopes {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.id.hash(state);
    }
}

/// Ids of the scope sets seen by this process (a handful: one per front end).
fn scope_id(key: &str) -> u32 {
    static IDS: std::sync::OnceLock<std::sync::Mutex<std::collections::HashMap<String, u32>>> =
        std::sync::OnceLock::new();
    let mut ids = IDS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let next = u32::try_from(ids.len()).expect("fewer than 2^32 scope sets");
    *ids.entry(key.to_owned()).or_insert(next)
}

impl Scopes {
    /// Normalises `scopes`.
    pub fn new<S: AsRef<str>>(scopes: &[S]) -> Scopes {
        let mut list: Vec<String> = scopes.iter().map(|s| s.as_ref().to_owned()).collect();
        list.sort();
        list.dedup();
        let key = list.join(" ");
        Scopes {
            id: scope_id(&key),
            key: key.into(),
            list: list.into(),
        }
    }

    /// The scopes.
    pub fn list(&self) -> &[String] {
        &self.list
    }

    /// The scopes, normalised and space-joined (how metrics name the set).
    pub fn key(&self) -> &str {
        &self.key
    }
}

impl fmt::Debug for Scopes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Scopes({})", self.key)
    }
}

/// The scopes one front end asks for: delegated identities' (a refresh
/// token's) and app-only identities' (a resource's `/.default`).
#[derive(Clone, Debug)]
pub struct ScopeSet {
    delegated: Scopes,
    app: Scopes,
}

impl ScopeSet {
    /// Normalises both sets.
    pub fn new<S: AsRef<str>>(delegated: &[S], app: &[S]) -> ScopeSet {
        ScopeSet {
            delegated: Scopes::new(delegated),
            app: Scopes::new(app),
        }
    }

    /// Both sets' keys (delegated, app-only), see [`Scopes::key`].
    pub fn keys(&self) -> [&str; 2] {
        [self.delegated.key(), self.app.key()]
    }

    /// The set for `identity`'s mode.
    pub fn of(&self, identity: &Identity) -> &Scopes {
        match identity.mode {
            Mode::Delegated => &self.delegated,
            Mode::App => &self.app,
        }
    }
}

/// An access token held in memory. `Debug` never shows it.
#[derive(Clone)]
pub struct AccessToken {
    id: u64,
    shared: Arc<Shared>,
    header: http::HeaderValue,
    /// When it stops working.
    pub expires_at: Instant,
    refresh_at: Instant,
    issued: Instant,
    /// Issued by a refresh that an upstream refusal caused.
    after_refusal: bool,
}

/// What the copies of one access token share.
struct Shared {
    secret: Secret,
    /// The upstream accepted it at least once.
    proven: AtomicBool,
}

impl AccessToken {
    /// `Err` when the token cannot be sent in an HTTP header (the platform
    /// sent something that is not a token).
    fn new(
        id: u64,
        secret: Secret,
        issued: Instant,
        lifetime: Duration,
        ahead: Duration,
    ) -> Result<Self, http::header::InvalidHeaderValue> {
        let mut header = http::HeaderValue::from_str(&format!("Bearer {}", secret.expose()))?;
        header.set_sensitive(true);
        // Refresh ahead of expiry, but never in the first half of the
        // token's life (short-lived tokens would otherwise refresh constantly).
        let ahead = ahead.min(lifetime / 2);
        Ok(AccessToken {
            id,
            shared: Arc::new(Shared {
                secret,
                proven: AtomicBool::new(false),
            }),
            header,
            expires_at: issued + lifetime,
            refresh_at: issued + lifetime - ahead,
            issued,
            after_refusal: false,
        })
    }

    /// The token itself (for XOAUTH2).
    pub fn secret(&self) -> &Secret {
        &self.shared.secret
    }

    /// Issued because its predecessor was refused, and not accepted by the
    /// upstream since: a refusal of it counts as a consecutive one.
    fn fresh_after_refusal(&self) -> bool {
        self.after_refusal && !self.shared.proven.load(Ordering::Relaxed)
    }

    /// `Bearer <token>`, marked sensitive.
    pub fn bearer_header(&self) -> &http::HeaderValue {
        &self.header
    }

    fn usable(&self, now: Instant) -> bool {
        now + Duration::from_secs(1) < self.expires_at
    }

    fn fresh(&self, now: Instant) -> bool {
        now < self.refresh_at
    }
}

impl fmt::Debug for AccessToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AccessToken(#{}, <redacted>)", self.id)
    }
}

/// Why no access token can be had.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// A person must sign in again (`authswap identity login NAME`).
    #[error("identity {identity} needs re-authentication: {message}")]
    ReauthRequired {
        /// Identity name.
        identity: String,
        /// The platform's reason.
        message: String,
    },
    /// Temporarily impossible; try again after `retry_after`.
    #[error("no access token available for {identity} (retry in {retry_after:?}): {message}")]
    Unavailable {
        /// Identity name.
        identity: String,
        /// When to try again.
        retry_after: Duration,
        /// What went wrong.
        message: String,
        /// Whose failure it is: the identity platform's or the store's.
        origin: Origin,
    },
    /// The identity platform refuses the app credential of the identity's
    /// tenant (secret expired or wrong, certificate refused): an admin
    /// must renew it; every identity of the tenant waits for that.
    #[error("the app credential of tenant {tenant} is refused (identity {identity}, retry in {retry_after:?}): {message}")]
    AppCredential {
        /// Identity name.
        identity: String,
        /// Tenant name.
        tenant: String,
        /// What the platform said, in plain words.
        message: String,
        /// When authswap tries again.
        retry_after: Duration,
    },
    /// The upstream refused freshly issued tokens of this identity and
    /// scope set: no token is handed out before `retry_after`.
    #[error("the upstream refused freshly issued access tokens of {identity} (retry in {retry_after:?})")]
    Refused {
        /// Identity name.
        identity: String,
        /// When to try again.
        retry_after: Duration,
    },
}

impl crate::error::Failure for TokenError {
    fn origin(&self) -> Origin {
        match self {
            TokenError::ReauthRequired { .. } | TokenError::AppCredential { .. } => {
                Origin::IdentityPlatform
            }
            TokenError::Unavailable { origin, .. } => *origin,
            TokenError::Refused { .. } => Origin::Upstream,
        }
    }

    fn retryable(&self) -> bool {
        !matches!(self, TokenError::ReauthRequired { .. })
    }
}

impl TokenError {
    /// The identity the error is about.
    pub fn identity(&self) -> &str {
        match self {
            TokenError::ReauthRequired { identity, .. }
            | TokenError::Unavailable { identity, .. }
            | TokenError::AppCredential { identity, .. }
            | TokenError::Refused { identity, .. } => identity,
        }
    }
}

/// (identity id, scope-set id); app-only tokens, shared by a tenant's app
/// identities, use a negative id derived from the tenant
/// ([`TokenEngine::token_key`]).
type Key = (i64, u32);

#[derive(Default)]
struct Slot {
    token: Option<AccessToken>,
    /// Identity-platform failures.
    backoff: Option<Backoff>,
    /// The next refresh is caused by an upstream refusal.
    refusal_refresh: bool,
    /// Consecutive refusals of fresh tokens, and the backoff they started.
    refused: Option<Backoff>,
    /// App identities (their tenant's token is shared): when the upstream
    /// last refused this identity a token, since its last success.
    last_refusal: Option<Instant>,
    /// SHA-256 of the token the upstream refused last: after a refusal,
    /// an access token another replica stored is taken only if it is
    /// another one.
    refused_digest: Option<[u8; 32]>,
}

/// The longest wait for another replica's refresh lease on an identity
/// (its refresh may take the identity platform's whole timeout, twice).
const LEASE_WAIT: Duration = Duration::from_secs(65);
/// First and longest pause between two tries for a lease another replica
/// holds (doubling, jittered).
const LEASE_POLL_MIN: Duration = Duration::from_millis(10);
const LEASE_POLL_MAX: Duration = Duration::from_millis(100);

struct Backoff {
    until: Instant,
    failures: u32,
    message: String,
    origin: Origin,
}

struct Inner {
    store: Arc<dyn Store>,
    sealer: Sealer,
    /// Swapped whole by a configuration reload ([`TokenEngine::set_tenants`]).
    tenants: std::sync::RwLock<Arc<Tenants>>,
    metrics: Arc<Metrics>,
    config: TokenConfig,
    slots: DashMap<Key, Slot>,
    flights: SingleFlight<Key, Result<AccessToken, TokenError>>,
    locks: DashMap<i64, Arc<tokio::sync::Mutex<()>>>,
    /// Rotated refresh tokens (sealed, with their token generation) that
    /// the store failed to commit, by identity id.
    unsaved: DashMap<i64, (i64, crate::store::SealedToken)>,
    refresh_permits: Arc<tokio::sync::Semaphore>,
    next_id: AtomicU64,
    /// Whether the store answers ([`StoreHealth`]).
    health: Arc<StoreHealth>,
}

/// Hands out access tokens; cheap to clone.
#[derive(Clone)]
pub struct TokenEngine {
    inner: Arc<Inner>,
}

impl Inner {
    fn tenants(&self) -> Arc<Tenants> {
        self.tenants
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

impl fmt::Debug for TokenEngine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenEngine")
            .field("cached", &self.inner.slots.len())
            .finish_non_exhaustive()
    }
}

enum Cached {
    Fresh(AccessToken),
    Ahead(AccessToken),
    BackingOff(Duration, String, Origin),
    /// The upstream refuses fresh tokens: nothing is handed out for a while.
    Refused(Duration),
    Missing,
}

impl TokenEngine {
    /// Creates an engine.
    pub fn new(
        store: Arc<dyn Store>,
        sealer: Sealer,
        tenants: Arc<Tenants>,
        metrics: Arc<Metrics>,
        config: TokenConfig,
    ) -> TokenEngine {
        // A store that coordinates replicas holds a connection per
        // refresh in flight: no more refreshes than it has connections.
        let permits = config
            .max_concurrent_refreshes
            .min(store.refresh_concurrency().unwrap_or(usize::MAX))
            .max(1);
        let health = Arc::new(StoreHealth::new(metrics.clone()));
        TokenEngine {
            inner: Arc::new(Inner {
                store,
                sealer,
                tenants: std::sync::RwLock::new(tenants),
                metrics,
                health,
                config,
                slots: DashMap::new(),
                flights: SingleFlight::default(),
                locks: DashMap::new(),
                unsaved: DashMap::new(),
                refresh_permits: Arc::new(tokio::sync::Semaphore::new(permits)),
                next_id: AtomicU64::new(1),
            }),
        }
    }

    /// Whether the store answers, as last seen.
    pub fn store_health(&self) -> &Arc<StoreHealth> {
        &self.inner.health
    }

    /// A store operation (`operation`) succeeded. When the store was down
    /// until now, the backoffs its failures started end at once: the
    /// identities they hold back are refreshed on their next request.
    pub fn store_answered(&self, operation: StoreOperation) {
        if self.inner.health.succeeded(operation) {
            for mut slot in self.inner.slots.iter_mut() {
                if slot
                    .backoff
                    .as_ref()
                    .is_some_and(|b| b.origin == Origin::Store)
                {
                    slot.backoff = None;
                }
            }
        }
    }

    /// A store operation (`operation`) failed with `error`.
    pub fn store_unreachable(&self, operation: StoreOperation, error: &dyn fmt::Display) {
        self.inner.health.failed(operation, error);
    }

    /// Tenant `name` (for logins), else the default tenant.
    pub fn tenant_or_default(&self, name: &str) -> Arc<Tenant> {
        let tenants = self.tenants();
        tenants
            .get(name)
            .unwrap_or_else(|| tenants.default_tenant())
            .clone()
    }

    /// The configured tenants.
    pub fn tenants(&self) -> Arc<Tenants> {
        self.inner.tenants()
    }

    /// Puts the tenants of a reloaded configuration in place. Cached
    /// app-only tokens (keyed by the tenant's position) are dropped;
    /// delegated identities' tokens stay valid and stay cached.
    pub fn set_tenants(&self, tenants: Arc<Tenants>) {
        *self
            .inner
            .tenants
            .write()
            .unwrap_or_else(|e| e.into_inner()) = tenants;
        self.inner.slots.retain(|key, _| key.0 >= 0);
    }

    /// The cache key of `identity`'s tokens for `scopes`: its own, or its
    /// tenant's shared app-only token.
    fn token_key(&self, identity: &Identity, scopes: &Scopes) -> Key {
        // Delegated identities (the hot path) never look the tenant up.
        if identity.mode == Mode::Delegated {
            return (identity.id, scopes.id);
        }
        match self.inner.tenants().get(&identity.tenant) {
            Some(t) => (-1 - i64::from(t.index), scopes.id),
            None => (identity.id, scopes.id),
        }
    }

    /// Time left on `identity`'s own refusal backoff (app identities keep
    /// it apart from their tenant's shared token).
    fn own_refusal(&self, identity: &Identity, scopes: &Scopes, now: Instant) -> Option<Duration> {
        let slot = self.inner.slots.get(&(identity.id, scopes.id))?;
        slot.refused
            .as_ref()
            .filter(|b| b.until > now)
            .map(|b| b.until - now)
    }

    fn lookup(&self, key: &Key, now: Instant) -> Cached {
        let Some(slot) = self.inner.slots.get(key) else {
            return Cached::Missing;
        };
        if let Some(b) = slot.refused.as_ref().filter(|b| b.until > now) {
            return Cached::Refused(b.until - now);
        }
        let backoff = slot
            .backoff
            .as_ref()
            .filter(|b| b.until > now)
            .map(|b| (b.until - now, b.message.clone(), b.origin));
        match (&slot.token, backoff) {
            (Some(t), _) if t.fresh(now) => Cached::Fresh(t.clone()),
            // Within the refresh window: keep serving it while it works.
            (Some(t), Some(_)) if t.usable(now) => Cached::Fresh(t.clone()),
            (Some(t), None) if t.usable(now) => Cached::Ahead(t.clone()),
            (_, Some((left, message, origin))) => Cached::BackingOff(left, message, origin),
            _ => Cached::Missing,
        }
    }

    /// An access token for `identity` with `scopes`: from memory when fresh,
    /// otherwise from the (shared) refresh flight.
    pub async fn access_token(
        &self,
        identity: &Arc<Identity>,
        scopes: &Scopes,
    ) -> Result<AccessToken, TokenError> {
        let key = self.token_key(identity, scopes);
        let now = Instant::now();
        if identity.mode == Mode::App {
            if let Some(left) = self.own_refusal(identity, scopes, now) {
                return Err(refused_error(identity, left));
            }
        }
        match self.lookup(&key, now) {
            Cached::Fresh(t) => return Ok(t),
            Cached::Ahead(t) => {
                if !self.inner.flights.is_flying(&key) {
                    let engine = self.clone();
                    let identity = identity.clone();
                    let scopes = scopes.clone();
                    tokio::spawn(async move {
                        let _ = engine.flight(key, identity, scopes).await;
                    });
                }
                return Ok(t);
            }
            Cached::BackingOff(left, message, origin) => {
                return Err(self.unavailable_or_reauth(identity, left, message, origin))
            }
            Cached::Refused(left) => return Err(refused_error(identity, left)),
            Cached::Missing => {}
        }
        if identity.mode == Mode::Delegated && identity.status() == Status::NeedsReauth {
            return Err(reauth_error(identity));
        }
        // Boxed: the refresh path is rare, and every request's future
        // would otherwise carry its state.
        Box::pin(self.flight(key, identity.clone(), scopes.clone())).await
    }

    fn unavailable_or_reauth(
        &self,
        identity: &Identity,
        left: Duration,
        message: String,
        origin: Origin,
    ) -> TokenError {
        if identity.mode == Mode::Delegated && identity.status() == Status::NeedsReauth {
            return reauth_error(identity);
        }
        if let Some(tenant) = self.inner.tenants().get(&identity.tenant) {
            if let Some(reason) = tenant.blocked() {
                return TokenError::AppCredential {
                    identity: identity.name.clone(),
                    tenant: tenant.name.clone(),
                    message: reason,
                    retry_after: left,
                };
            }
        }
        TokenError::Unavailable {
            identity: identity.name.clone(),
            retry_after: left,
            message,
            origin,
        }
    }

    async fn flight(
        &self,
        key: Key,
        identity: Arc<Identity>,
        scopes: Scopes,
    ) -> Result<AccessToken, TokenError> {
        let engine = self.clone();
        let k = key;
        self.inner
            .flights
            .run(key, move || async move {
                engine.refresh(k, identity, scopes).await
            })
            .await
    }

    async fn refresh(
        &self,
        key: Key,
        identity: Arc<Identity>,
        scopes: Scopes,
    ) -> Result<AccessToken, TokenError> {
        if identity.mode == Mode::App {
            return self.refresh_app(key, identity, scopes).await;
        }
        let inner = &self.inner;
        let Some(tenant) = inner.tenants().get(&identity.tenant).cloned() else {
            return Err(self.no_tenant(&key, &identity));
        };
        // Serialise refreshes of one identity across scope sets: each one
        // must start from the refresh token the previous one stored.
        let lock = inner
            .locks
            .entry(identity.id)
            .or_insert_with(|| Arc::new(tokio::sync::Mutex::new(())))
            .clone();
        let _guard = lock.lock().await;

        // Somebody may have refreshed while we waited.
        match self.lookup(&key, Instant::now()) {
            Cached::Fresh(t) => return Ok(t),
            Cached::BackingOff(left, message, origin) => {
                return Err(self.unavailable_or_reauth(&identity, left, message, origin))
            }
            Cached::Refused(left) => return Err(refused_error(&identity, left)),
            Cached::Ahead(_) | Cached::Missing => {}
        }
        if identity.status() == Status::NeedsReauth {
            return Err(reauth_error(&identity));
        }
        // The store is down (the background reload notices when it is
        // back): a temporary answer now, instead of waiting
        // `store.connect_timeout` for a connection, and a refresh permit
        // before that.
        if inner.health.known_down() {
            return Err(self.transient(
                &key,
                &identity,
                None,
                "the store is unreachable".to_owned(),
                false,
                Origin::Store,
            ));
        }

        // Fleet-wide single flight (PostgreSQL): the identity's lease, then
        // the access token another replica may have stored a moment ago.
        // While another replica holds the lease this one polls for it,
        // holding neither a refresh permit nor a store connection, so
        // waiting for other replicas never starves this one's refreshes.
        let mut poll = LEASE_POLL_MIN;
        let polling_since = Instant::now();
        let mut waited = false;
        let (mut lease, _permit) = loop {
            let permit = inner.refresh_permits.acquire().await;
            match inner.store.try_refresh_lease(identity.id, LEASE_WAIT).await {
                Ok(Lease::NotNeeded) => break (None, permit),
                Ok(Lease::Held(l)) => break (Some(l), permit),
                Ok(Lease::Busy) => {
                    drop(permit);
                    if !waited {
                        waited = true;
                        inner.metrics.refresh_lease_waited();
                    }
                    if polling_since.elapsed() >= LEASE_WAIT {
                        tracing::warn!(identity = %identity.name, waited = ?LEASE_WAIT, "another replica has held the refresh lease too long");
                        return Err(self.transient(
                            &key,
                            &identity,
                            None,
                            "another replica has held the refresh lease too long".into(),
                            false,
                            Origin::Store,
                        ));
                    }
                    let jitter = rand::rng().random_range(0.75..=1.25);
                    tokio::time::sleep(poll.mul_f64(jitter)).await;
                    poll = (poll * 2).min(LEASE_POLL_MAX);
                }
                Err(e) => {
                    return Err(self.store_failed(
                        &key,
                        &identity,
                        &e,
                        "cannot take the refresh lease",
                    ));
                }
            }
        };
        if let Some(l) = lease.as_mut() {
            match l.access_token(&scopes.key).await {
                Ok(Some((sealed, expires_at))) => {
                    if let Some(token) = self.adopt(&key, &identity, &scopes, &sealed, expires_at) {
                        return Ok(token);
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    return Err(self.store_failed(
                        &key,
                        &identity,
                        &e,
                        "cannot read the stored access token",
                    ));
                }
            }
        }
        let stored = match lease.as_mut() {
            Some(l) => l.refresh_token().await,
            None => inner.store.refresh_token(identity.id).await,
        };
        let stored = match stored {
            Ok(v) => {
                self.store_answered(StoreOperation::refresh);
                v
            }
            Err(e) => {
                return Err(self.store_failed(&key, &identity, &e, "cannot read refresh token"));
            }
        };
        let Some((sealed, generation)) = stored else {
            return Err(TokenError::ReauthRequired {
                identity: identity.name.clone(),
                message: format!(
                    "not linked to a Microsoft account yet; run `authswap identity login {}`",
                    identity.name
                ),
            });
        };
        // A rotated refresh token whose commit failed (disk full) is the
        // newest one: it goes to the store before anything relies on it.
        let unsaved = inner
            .unsaved
            .get(&identity.id)
            .filter(|u| u.0 == generation)
            .map(|u| u.1.clone());
        let sealed = match unsaved {
            None => sealed,
            Some(newer) => match inner
                .store
                .rotate(identity.id, generation, &newer, now_unix())
                .await
            {
                Ok(stored) => {
                    inner.unsaved.remove(&identity.id);
                    if stored {
                        tracing::info!(identity = %identity.name, "stored the rotated refresh token that an earlier commit failed to store");
                        newer
                    } else {
                        sealed
                    }
                }
                Err(e) => {
                    return Err(self.store_failed(
                        &key,
                        &identity,
                        &e,
                        "still cannot store the rotated refresh token",
                    ));
                }
            },
        };
        let refresh_token = match inner.sealer.open(identity.id, &sealed) {
            Ok(t) => t,
            Err(e) => {
                tracing::error!(identity = %identity.name, error = %e, "cannot unseal refresh token");
                return Err(self.transient(
                    &key,
                    &identity,
                    None,
                    e.to_string(),
                    true,
                    Origin::Store,
                ));
            }
        };

        let issued = Instant::now();
        let result = tenant.idp.refresh(&refresh_token, scopes.list()).await;
        inner
            .metrics
            .refresh_duration(issued.elapsed().as_secs_f64());
        if result.is_err() {
            // Failures are recorded on other connections: give this back.
            drop(lease.take());
        }
        match result {
            Ok(grant) => {
                self.credential_works(&tenant);
                let at = now_unix();
                let rotated = grant
                    .refresh_token
                    .filter(|new| new != &refresh_token)
                    .map(|new| inner.sealer.seal(identity.id, &new));
                let stored = match lease.take() {
                    // Everything the other replicas need, in one commit
                    // that also releases the lease.
                    Some(l) => {
                        let access = inner.sealer.seal(identity.id, &grant.access_token);
                        l.commit(LeaseCommit {
                            generation,
                            rotated: rotated.as_ref(),
                            scopes: &scopes.key,
                            access: &access,
                            expires_at: at.saturating_add(
                                i64::try_from(grant.expires_in.as_secs()).unwrap_or(0),
                            ),
                            at,
                        })
                        .await
                    }
                    None => match &rotated {
                        Some(sealed) => {
                            inner
                                .store
                                .rotate(identity.id, generation, sealed, at)
                                .await
                        }
                        None => inner
                            .store
                            .record_success(identity.id, at)
                            .await
                            .map(|()| true),
                    },
                };
                match (stored, rotated) {
                    (Ok(true), _) => {}
                    (Ok(false), _) => {
                        tracing::info!(identity = %identity.name, "identity was re-linked during a refresh; discarding the result");
                        return Err(TokenError::Unavailable {
                            identity: identity.name.clone(),
                            retry_after: Duration::from_secs(1),
                            message: "identity was re-linked during refresh".into(),
                            origin: Origin::Store,
                        });
                    }
                    (Err(e), Some(sealed)) => {
                        // Never rely on an access token whose rotated
                        // refresh token is not durably stored; keep the
                        // token to store it first next time (the platform
                        // may have retired its predecessor).
                        inner.unsaved.insert(identity.id, (generation, sealed));
                        return Err(self.store_failed(
                            &key,
                            &identity,
                            &e,
                            "cannot store rotated refresh token; not using the new access token",
                        ));
                    }
                    (Err(e), None) => {
                        tracing::warn!(identity = %identity.name, error = %e, "cannot record refresh success");
                    }
                }
                let Ok(mut token) = AccessToken::new(
                    inner.next_id.fetch_add(1, Ordering::Relaxed),
                    grant.access_token,
                    issued,
                    grant.expires_in,
                    inner.config.refresh_ahead,
                ) else {
                    tracing::error!(identity = %identity.name, "the identity platform returned an access token that cannot be sent in a header");
                    return Err(self.transient(
                        &key,
                        &identity,
                        None,
                        "the identity platform returned a malformed access token".into(),
                        false,
                        Origin::IdentityPlatform,
                    ));
                };
                let mut slot = inner.slots.entry(key).or_default();
                token.after_refusal = std::mem::take(&mut slot.refusal_refresh);
                slot.token = Some(token.clone());
                slot.backoff = None;
                drop(slot);
                identity.refreshed();
                inner
                    .metrics
                    .refresh(&identity.name, RefreshResult::success);
                inner.metrics.set_reauth_required(&identity.name, false);
                let expiry = SystemTime::now() + grant.expires_in;
                let unix = expiry
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_secs() as i64)
                    .unwrap_or(0);
                inner
                    .metrics
                    .set_token_expiry(&identity.name, &scopes.key, unix);
                tracing::info!(identity = %identity.name, scopes = %scopes.key, expires_in = ?grant.expires_in, "refreshed access token");
                Ok(token)
            }
            Err(IdpError::Reauth { error, message }) => {
                tracing::warn!(identity = %identity.name, scopes = %scopes.key, %error, %message, "refresh token refused: identity needs re-authentication");
                if let Err(e) = inner
                    .store
                    .record_failure(identity.id, true, &message, now_unix())
                    .await
                {
                    tracing::error!(identity = %identity.name, error = %e, "cannot record re-authentication status");
                }
                identity.set_status(Status::NeedsReauth, Some(message.clone()));
                if let Some(mut slot) = inner.slots.get_mut(&key) {
                    slot.token = slot.token.take().filter(|t| t.usable(Instant::now()));
                }
                inner
                    .metrics
                    .refresh(&identity.name, RefreshResult::reauth_required);
                inner.metrics.set_reauth_required(&identity.name, true);
                Err(TokenError::ReauthRequired {
                    identity: identity.name.clone(),
                    message,
                })
            }
            Err(IdpError::Transient {
                message,
                retry_after,
            }) => {
                tracing::warn!(identity = %identity.name, scopes = %scopes.key, %message, "token refresh failed; will retry");
                Err(self.transient(
                    &key,
                    &identity,
                    retry_after,
                    message,
                    false,
                    Origin::IdentityPlatform,
                ))
            }
            Err(IdpError::AppCredential { message, .. }) => {
                Err(self.credential_refused(&key, &identity, &tenant, message))
            }
            Err(e @ (IdpError::Configuration { .. } | IdpError::NotConfigured)) => {
                tracing::error!(identity = %identity.name, scopes = %scopes.key, error = %e, "token refresh refused: fix the app registration or configuration");
                Err(self.transient(
                    &key,
                    &identity,
                    None,
                    e.to_string(),
                    true,
                    Origin::IdentityPlatform,
                ))
            }
        }
    }

    /// Takes the access token another replica stored under the lease, when
    /// it is not due for a refresh itself and (after a refusal) is newer
    /// than the refused one.
    fn adopt(
        &self,
        key: &Key,
        identity: &Identity,
        scopes: &Scopes,
        sealed: &SealedToken,
        expires_at: i64,
    ) -> Option<AccessToken> {
        let inner = &self.inner;
        let left = Duration::from_secs(u64::try_from(expires_at - now_unix()).ok()?);
        if left <= inner.config.refresh_ahead + Duration::from_secs(1) {
            return None;
        }
        let now = Instant::now();
        let secret = inner.sealer.open(identity.id, sealed).ok()?;
        let mut slot = inner.slots.entry(*key).or_default();
        if slot.refusal_refresh && slot.refused_digest == Some(digest(&secret)) {
            return None;
        }
        let mut token = AccessToken::new(
            inner.next_id.fetch_add(1, Ordering::Relaxed),
            secret,
            now,
            left,
            inner.config.refresh_ahead,
        )
        .ok()?;
        token.after_refusal = std::mem::take(&mut slot.refusal_refresh);
        slot.token = Some(token.clone());
        slot.backoff = None;
        drop(slot);
        identity.refreshed();
        inner
            .metrics
            .set_token_expiry(&identity.name, &scopes.key, expires_at);
        tracing::debug!(identity = %identity.name, expires_in = ?left, "using the access token another replica stored");
        Some(token)
    }

    /// Gets the app-only token shared by `identity`'s tenant for `scopes`
    /// (client-credentials grant); `key` is the tenant's.
    async fn refresh_app(
        &self,
        key: Key,
        identity: Arc<Identity>,
        scopes: Scopes,
    ) -> Result<AccessToken, TokenError> {
        let inner = &self.inner;
        let Some(tenant) = inner.tenants().get(&identity.tenant).cloned() else {
            return Err(self.no_tenant(&key, &identity));
        };
        let _permit = inner.refresh_permits.acquire().await;
        let issued = Instant::now();
        let result = tenant.idp.app_token(scopes.list()).await;
        inner
            .metrics
            .refresh_duration(issued.elapsed().as_secs_f64());
        match result {
            Ok(grant) => {
                self.credential_works(&tenant);
                let Ok(mut token) = AccessToken::new(
                    inner.next_id.fetch_add(1, Ordering::Relaxed),
                    grant.access_token,
                    issued,
                    grant.expires_in,
                    inner.config.refresh_ahead,
                ) else {
                    return Err(self.transient(
                        &key,
                        &identity,
                        None,
                        "the identity platform returned a malformed access token".into(),
                        false,
                        Origin::IdentityPlatform,
                    ));
                };
                let mut slot = inner.slots.entry(key).or_default();
                token.after_refusal = std::mem::take(&mut slot.refusal_refresh);
                slot.token = Some(token.clone());
                slot.backoff = None;
                drop(slot);
                inner
                    .metrics
                    .refresh(&identity.name, RefreshResult::success);
                let expiry = SystemTime::now() + grant.expires_in;
                let unix = expiry
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_secs() as i64)
                    .unwrap_or(0);
                inner
                    .metrics
                    .set_token_expiry(&identity.name, &scopes.key, unix);
                tracing::info!(tenant = %tenant.name, identity = %identity.name, scopes = %scopes.key, expires_in = ?grant.expires_in, "obtained an app-only access token for the tenant");
                Ok(token)
            }
            Err(IdpError::AppCredential { message, .. }) => {
                Err(self.credential_refused(&key, &identity, &tenant, message))
            }
            Err(IdpError::Transient {
                message,
                retry_after,
            }) => {
                tracing::warn!(tenant = %tenant.name, identity = %identity.name, scopes = %scopes.key, %message, "app-only token request failed; will retry");
                Err(self.transient(
                    &key,
                    &identity,
                    retry_after,
                    message,
                    false,
                    Origin::IdentityPlatform,
                ))
            }
            Err(e) => {
                tracing::error!(tenant = %tenant.name, identity = %identity.name, scopes = %scopes.key, error = %e, "app-only token request refused: fix the app registration or configuration");
                Err(self.transient(
                    &key,
                    &identity,
                    None,
                    e.to_string(),
                    true,
                    Origin::IdentityPlatform,
                ))
            }
        }
    }

    /// The identity's tenant is not configured (any more).
    fn no_tenant(&self, key: &Key, identity: &Identity) -> TokenError {
        tracing::error!(identity = %identity.name, tenant = %identity.tenant, "the identity's tenant is not configured");
        self.transient(
            key,
            identity,
            None,
            format!(
                "tenant `{}` is not configured: add [tenants.{}] or move the identity",
                identity.tenant, identity.tenant
            ),
            true,
            Origin::Internal,
        )
    }

    /// A token grant of `tenant` worked: a block of its app credential ends.
    fn credential_works(&self, tenant: &Tenant) {
        if tenant.blocked().is_some() {
            let inner = &self.inner;
            inner
                .tenants()
                .set_block(&tenant.name, None, &inner.metrics, &inner.store);
        }
    }

    /// The identity platform refused `tenant`'s app credential: the tenant
    /// is blocked (every identity of it shows it), and this key backs off
    /// slowly.
    fn credential_refused(
        &self,
        key: &Key,
        identity: &Identity,
        tenant: &Tenant,
        message: String,
    ) -> TokenError {
        let inner = &self.inner;
        inner.tenants().set_block(
            &tenant.name,
            Some(format!("tenant {}: {message}", tenant.name)),
            &inner.metrics,
            &inner.store,
        );
        let retry_after = match self.transient(
            key,
            identity,
            None,
            message.clone(),
            true,
            Origin::IdentityPlatform,
        ) {
            TokenError::Unavailable { retry_after, .. } => retry_after,
            _ => inner.config.retry_max,
        };
        TokenError::AppCredential {
            identity: identity.name.clone(),
            tenant: tenant.name.clone(),
            message,
            retry_after,
        }
    }

    /// A store failure during a refresh: logged with `what`, and a
    /// transient failure (backoff, clients get a temporary answer).
    fn store_failed(
        &self,
        key: &Key,
        identity: &Identity,
        e: &StoreError,
        what: &str,
    ) -> TokenError {
        if self.inner.health.is_up() {
            tracing::error!(identity = %identity.name, error = %e, "{what}");
        } else {
            // Logged once, when the store was lost.
            tracing::debug!(identity = %identity.name, error = %e, "{what}");
        }
        self.store_unreachable(StoreOperation::refresh, e);
        self.transient(
            key,
            identity,
            None,
            format!("store: {e}"),
            false,
            Origin::Store,
        )
    }

    /// Records a transient failure: backoff (jittered exponential, at least
    /// `retry_after`; the maximum when `slow`), metrics and the store.
    fn transient(
        &self,
        key: &Key,
        identity: &Identity,
        retry_after: Option<Duration>,
        message: String,
        slow: bool,
        origin: Origin,
    ) -> TokenError {
        let inner = &self.inner;
        let cfg = &inner.config;
        let mut slot = inner.slots.entry(*key).or_default();
        let failures = slot.backoff.as_ref().map_or(0, |b| b.failures) + 1;
        let delay = if slow {
            cfg.retry_max
        } else {
            let exp = cfg
                .retry_min
                .saturating_mul(1u32 << (failures - 1).min(16))
                .min(cfg.retry_max);
            let jitter = rand::rng().random_range(0.5..=1.0);
            exp.mul_f64(jitter).max(cfg.retry_min)
        };
        let delay = delay.max(retry_after.unwrap_or_default());
        slot.backoff = Some(Backoff {
            until: Instant::now() + delay,
            failures,
            message: message.clone(),
            origin,
        });
        drop(slot);
        inner
            .metrics
            .refresh(&identity.name, RefreshResult::transient_error);
        // An app identity's tokens are its tenant's: their failures are
        // the tenant's (see `credential_refused`), not the identity's.
        // Not recorded in a store that is unreachable (the next success
        // clears the record anyway).
        let unreachable = origin == Origin::Store && !inner.health.is_up();
        if identity.mode == Mode::Delegated && !unreachable {
            let store = inner.store.clone();
            let id = identity.id;
            let msg = message.clone();
            tokio::spawn(async move {
                let _ = store.record_failure(id, false, &msg, now_unix()).await;
            });
        }
        TokenError::Unavailable {
            identity: identity.name.clone(),
            retry_after: delay,
            message,
            origin,
        }
    }

    /// The upstream refused `token` for a request of `identity` through
    /// `protocol`: applies the refusal policy ([`super::refusal`]) and says
    /// what the front end does next. A token refusal forgets `token` so
    /// that the next [`TokenEngine::access_token`] refreshes (once, for
    /// every request that met the refusal); a consecutive refusal of a
    /// fresh token starts the backoff instead; a permanent refusal marks
    /// the identity `upstream_refused`.
    pub fn refused(
        &self,
        identity: &Identity,
        scopes: &Scopes,
        token: &AccessToken,
        protocol: Protocol,
        refusal: &Refusal,
    ) -> Verdict {
        let inner = &self.inner;
        let (retry_after, text) = match refusal {
            Refusal::Permanent { text } => {
                inner.metrics.auth_failure(
                    Some(&identity.name),
                    protocol,
                    FailureReason::upstream_refused,
                );
                tracing::warn!(identity = %identity.name, ?protocol, upstream = %text, "the upstream refused access for a reason an administrator must fix; passing its answer through");
                self.mark_upstream_refused(
                    identity,
                    format!("the {} refused access: {text}", protocol.upstream_name()),
                );
                return Verdict::PassThrough;
            }
            Refusal::Token { retry_after, text } => (*retry_after, text),
        };
        inner.metrics.auth_failure(
            Some(&identity.name),
            protocol,
            FailureReason::token_rejected,
        );
        let app = identity.mode == Mode::App;
        let tkey = self.token_key(identity, scopes);
        let rkey: Key = (identity.id, scopes.id);
        let now = Instant::now();
        // The token's slot (the tenant's, for an app identity): forget the
        // refused token so the next request refreshes, unless it is a shared
        // app token other mailboxes use: then the refusal is this mailbox's.
        // An app identity refused a token issued after its previous
        // refusal: a new token did not help it, so the refusal is about
        // this mailbox (its permissions), not the token other mailboxes
        // share, which stays.
        let own = app && {
            let mut slot = inner.slots.entry(rkey).or_default();
            let own = slot.last_refusal.is_some_and(|at| token.issued >= at);
            slot.last_refusal = Some(now);
            own
        };
        let current = {
            let mut slot = inner.slots.entry(tkey).or_default();
            let current = slot.token.as_ref().is_some_and(|t| t.id == token.id);
            if current && !own {
                slot.token = None;
                slot.refusal_refresh = true;
                slot.refused_digest = Some(digest(token.secret()));
            }
            current
        };
        if own || (current && token.fresh_after_refusal()) {
            // Refused again although freshly issued (or refused for this
            // mailbox only): this identity backs off.
            let cfg = &inner.config;
            let mut slot = inner.slots.entry(rkey).or_default();
            let failures = slot.refused.as_ref().map_or(0, |b| b.failures) + 1;
            let delay = cfg
                .refused_backoff_min
                .saturating_mul(1u32 << (failures - 1).min(16))
                .min(cfg.refused_backoff_max)
                .max(retry_after.unwrap_or_default());
            let message = if own {
                format!(
                    "the {} refused the app's access to mailbox {} {failures} time(s) in a row, with a freshly issued token too (check the app's mailbox permissions: RBAC for Applications scope, application access policy, Add-MailboxPermission): {text}",
                    protocol.upstream_name(),
                    identity.mailbox
                )
            } else {
                format!(
                    "the {} refused freshly issued access tokens {failures} time(s) in a row: {text}",
                    protocol.upstream_name()
                )
            };
            slot.refused = Some(Backoff {
                until: now + delay,
                failures,
                message: message.clone(),
                origin: Origin::Upstream,
            });
            drop(slot);
            tracing::warn!(identity = %identity.name, ?protocol, upstream = %text, failures, retry_in = ?delay, "the upstream refused a freshly issued access token too; answering temporary errors until the backoff ends (check the mailbox's permissions and protocol settings)");
            self.mark_upstream_refused(identity, message);
            return Verdict::Backoff { retry_after: delay };
        }
        if current {
            tracing::info!(identity = %identity.name, ?protocol, upstream = %text, "upstream refused the access token; refreshing");
        }
        // Another request met the same refusal first and decided.
        match self.own_refusal(identity, scopes, now) {
            Some(left) => Verdict::Backoff { retry_after: left },
            None => Verdict::Retry,
        }
    }

    /// The upstream accepted `token` for `identity`: a fresh token that
    /// works ends the count of consecutive refusals, and an identity marked
    /// `upstream_refused` is linked again. Costs two atomic loads when
    /// there is nothing to do (every request calls it).
    pub fn accepted(&self, identity: &Identity, scopes: &Scopes, token: &AccessToken) {
        let first = !token.shared.proven.load(Ordering::Relaxed)
            && !token.shared.proven.swap(true, Ordering::Relaxed);
        if (first && token.after_refusal) || identity.mode == Mode::App {
            if let Some(mut slot) = self.inner.slots.get_mut(&(identity.id, scopes.id)) {
                if slot.refused.is_some() || slot.last_refusal.is_some() {
                    slot.refused = None;
                    slot.last_refusal = None;
                }
            }
        }
        if identity.status() == Status::UpstreamRefused && identity.clear_upstream_refusal() {
            tracing::info!(identity = %identity.name, "the upstream accepts the identity's tokens again");
            let store = self.inner.store.clone();
            let id = identity.id;
            tokio::spawn(async move {
                let _ = store.set_upstream_refusal(id, None, now_unix()).await;
            });
        }
    }

    /// Shows `message` as the identity's `upstream_refused` status (in
    /// memory at once, in the store in the background).
    fn mark_upstream_refused(&self, identity: &Identity, message: String) {
        if identity.status() == Status::UpstreamRefused
            && identity.last_error().as_deref() == Some(message.as_str())
        {
            return;
        }
        if !identity.mark_upstream_refused(message.clone()) {
            return;
        }
        let store = self.inner.store.clone();
        let id = identity.id;
        tokio::spawn(async move {
            if let Err(e) = store
                .set_upstream_refusal(id, Some(&message), now_unix())
                .await
            {
                tracing::warn!(error = %e, "cannot record the upstream's refusal");
            }
        });
    }

    /// Drops everything cached for identity `id` (removed or re-linked).
    pub fn forget(&self, id: i64) {
        self.inner.slots.retain(|(i, _), _| *i != id);
        self.inner.locks.remove(&id);
        // `unsaved` stays: a re-passworded identity still needs its token,
        // and a re-linked one's is ignored (older generation).
    }

    /// When the latest-expiring access token cached for identity `id`
    /// expires (wall-clock), if one is cached (read-only; for the admin
    /// console).
    pub fn cached_expiry(&self, id: i64) -> Option<SystemTime> {
        let latest = self
            .inner
            .slots
            .iter()
            .filter(|e| e.key().0 == id)
            .filter_map(|e| e.value().token.as_ref().map(|t| t.expires_at))
            .max()?;
        let now = Instant::now();
        Some(match latest.checked_duration_since(now) {
            Some(left) => SystemTime::now() + left,
            None => SystemTime::now() - now.saturating_duration_since(latest),
        })
    }

    /// Number of cached (identity, scopes) slots.
    pub fn cached(&self) -> usize {
        self.inner.slots.len()
    }
}

/// SHA-256 of a token (to recognise a refused one without keeping it).
fn digest(token: &Secret) -> [u8; 32] {
    use sha2::Digest as _;
    sha2::Sha256::digest(token.expose().as_bytes()).into()
}

fn refused_error(identity: &Identity, left: Duration) -> TokenError {
    TokenError::Refused {
        identity: identity.name.clone(),
        retry_after: left,
    }
}

fn reauth_error(identity: &Identity) -> TokenError {
    TokenError::ReauthRequired {
        identity: identity.name.clone(),
        message: identity
            .last_error()
            .unwrap_or_else(|| "the refresh token was refused".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_are_normalised() {
        let a = Scopes::new(&["offline_access", "b", "a", "b"]);
        let b = Scopes::new(&["a", "b", "offline_access"]);
        assert_eq!(a, b);
        assert_eq!(a.id, b.id);
        assert_eq!(a.list(), ["a", "b", "offline_access"]);
        let c = Scopes::new(&["a", "offline_access"]);
        assert_ne!(a, c, "different sets have different ids");
        assert_ne!(a.id, c.id);
    }

    #[test]
    fn access_tokens_never_show_in_debug_and_refresh_at_half_life_at_most() {
        let now = Instant::now();
        let t = AccessToken::new(
            1,
            Secret::new("eyJ0eXAiOiJKV1Qi.secret"),
            now,
            Duration::from_secs(10),
            Duration::from_secs(300),
        )
        .unwrap();
        assert!(
            AccessToken::new(
                2,
                Secret::new("not\na token"),
                now,
                Duration::from_secs(10),
                Duration::from_secs(1)
            )
            .is_err(),
            "never sent as something else"
        );
        assert!(!format!("{t:?}").contains("eyJ0"));
        assert!(!format!("{:?}", t.bearer_header()).contains("eyJ0"));
        assert!(t.fresh(now + Duration::from_secs(4)));
        assert!(!t.fresh(now + Duration::from_secs(6)));
        assert!(t.usable(now + Duration::from_secs(6)));
        assert!(!t.usable(now + Duration::from_secs(10)));
    }
}
