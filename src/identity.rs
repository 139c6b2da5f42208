//! Identities in memory and the local password check.
//!
//! [`Directory`] is the running server's view of the store (reloaded when the
//! CLI changes something). [`Authenticator`] checks a client's (name,
//! password): argon2id on first sight, then a verified-credential cache keyed
//! by a keyed BLAKE2b MAC (per-process random key, short TTL) so steady-state
//! requests never run argon2. A [`ConnectionMemo`] lets a keep-alive client
//! that resends the same header skip even that lookup. Guessing is
//! throttled, never answered with a refusal of a correct password: after
//! `auth.max_failures` failures for a name (known or not, the same state
//! either way) or from a non-loopback source address, each further check
//! waits a delay that doubles up to `auth.max_lockout`, and only a bounded
//! number of checks may wait at once (more are refused until one ends).
//! Unknown names cost the same argon2 run as known ones and fail the same
//! way.

use crate::config::AuthConfig;
use crate::metrics::{CredentialCheck, FailureReason, LockoutScope, Metrics, Protocol};
use crate::singleflight::SingleFlight;
use crate::store::{name_key, IdentityRecord, Mode, Status};
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};
use blake2::digest::{consts::U32, Mac};
use blake2::Blake2bMac;
use dashmap::DashMap;
use rand::RngCore;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;

/// An identity as the running server sees it.
#[derive(Debug)]
pub struct Identity {
    /// Store row id.
    pub id: i64,
    /// Name as configured (metric label, logs).
    pub name: String,
    /// Upstream mailbox (UPN), used as `user=` in XOAUTH2.
    pub mailbox: String,
    /// Bumped each time a person links the identity.
    pub token_generation: i64,
    /// Configured tenant name.
    pub tenant: String,
    /// Delegated or app-only.
    pub mode: Mode,
    password_hash: String,
    status: AtomicU8,
    last_error: Mutex<Option<String>>,
    /// The credential-cache MAC with this identity's id and password hash
    /// already absorbed, so a cache lookup hashes only the password.
    cache_prefix: MacPrefix,
    /// Set when the directory replaced or removed this object: whatever
    /// was proved against it no longer holds.
    retired: std::sync::atomic::AtomicBool,
}

/// A keyed BLAKE2b state, computed on first use (never printed).
#[derive(Default)]
struct MacPrefix(std::sync::OnceLock<Blake2bMac<U32>>);

impl std::fmt::Debug for MacPrefix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MacPrefix(..)")
    }
}

impl Identity {
    fn from_record(r: &IdentityRecord) -> Identity {
        Identity {
            id: r.id,
            name: r.name.clone(),
            mailbox: r.mailbox.clone(),
            token_generation: r.token_generation,
            tenant: r.tenant.clone(),
            mode: r.mode,
            password_hash: r.password_hash.clone(),
            status: AtomicU8::new(status_code(r.status)),
            last_error: Mutex::new(r.last_error.clone()),
            cache_prefix: MacPrefix::default(),
            retired: Default::default(),
        }
    }

    /// Whether the directory replaced or removed this object.
    pub fn is_retired(&self) -> bool {
        self.retired.load(Ordering::Acquire)
    }

    fn retire(&self) {
        self.retired.store(true, Ordering::Release);
    }

    /// Current link state.
    pub fn status(&self) -> Status {
        match self.status.load(Ordering::Acquire) {
            1 => Status::Linked,
            2 => Status::NeedsReauth,
            3 => Status::UpstreamRefused,
            _ => Status::Pending,
        }
    }

    /// A refresh succeeded: the identity is linked, unless the upstream
    /// refuses it for a reason a refresh does not cure (that status stays
    /// until the upstream accepts a token again).
    pub fn refreshed(&self) {
        if self.status() != Status::UpstreamRefused {
            self.set_status(Status::Linked, None);
        }
    }

    /// Marks the identity `upstream_refused` with `message`, unless it
    /// needs re-authentication (which says more). Whether it changed.
    pub fn mark_upstream_refused(&self, message: String) -> bool {
        let refused = status_code(Status::UpstreamRefused);
        let changed = self
            .status
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |s| {
                (s != status_code(Status::NeedsReauth)).then_some(refused)
            })
            .is_ok();
        if changed {
            if let Ok(mut g) = self.last_error.lock() {
                *g = Some(message);
            }
        }
        changed
    }

    /// Clears an `upstream_refused` status (the upstream accepted a token);
    /// whether this call cleared it.
    pub fn clear_upstream_refusal(&self) -> bool {
        let cleared = self
            .status
            .compare_exchange(
                status_code(Status::UpstreamRefused),
                status_code(Status::Linked),
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_ok();
        if cleared {
            if let Ok(mut g) = self.last_error.lock() {
                *g = None;
            }
        }
        cleared
    }

    /// Last error text recorded for the identity.
    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().ok().and_then(|g| g.clone())
    }

    /// Updates the in-memory state (the store is updated by the caller).
    pub fn set_status(&self, status: Status, error: Option<String>) {
        self.status.store(status_code(status), Ordering::Release);
        if let Ok(mut g) = self.last_error.lock() {
            *g = error;
        }
    }

    fn same_credentials(&self, r: &IdentityRecord) -> bool {
        self.id == r.id
            && self.password_hash == r.password_hash
            && self.mailbox == r.mailbox
            && self.token_generation == r.token_generation
            && self.name == r.name
            && self.tenant == r.tenant
            && self.mode == r.mode
    }
}

fn status_code(s: Status) -> u8 {
    match s {
        Status::Pending => 0,
        Status::Linked => 1,
        Status::NeedsReauth => 2,
        Status::UpstreamRefused => 3,
    }
}

/// What changed in a [`Directory::apply`].
#[derive(Debug, Default)]
pub struct DirectoryChanges {
    /// Identities that are new or whose credentials or link changed.
    pub replaced: Vec<Arc<Identity>>,
    /// Identities that no longer exist.
    pub removed: Vec<Arc<Identity>>,
}

/// Identities by case-folded name.
#[derive(Debug, Default)]
pub struct Directory {
    by_key: DashMap<String, Arc<Identity>>,
}

impl Directory {
    /// Looks up a name case-insensitively.
    pub fn get(&self, name: &str) -> Option<Arc<Identity>> {
        // Fast path: most clients send the name as configured, in lower case.
        if let Some(e) = self.by_key.get(name) {
            return Some(e.clone());
        }
        self.by_key.get(&name_key(name)).map(|e| e.clone())
    }

    /// Every identity.
    pub fn all(&self) -> Vec<Arc<Identity>> {
        self.by_key.iter().map(|e| e.value().clone()).collect()
    }

    /// Number of identities.
    pub fn len(&self) -> usize {
        self.by_key.len()
    }

    /// True when no identity exists.
    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }

    /// Makes the directory match `records`, keeping `Identity` objects whose
    /// credentials did not change (their status is updated in place).
    pub fn apply(&self, records: &[IdentityRecord]) -> DirectoryChanges {
        let mut changes = DirectoryChanges::default();
        let mut seen = std::collections::HashSet::with_capacity(records.len());
        for r in records {
            let key = name_key(&r.name);
            seen.insert(key.clone());
            let unchanged = match self.by_key.get(&key) {
                Some(e) if e.same_credentials(r) => {
                    e.set_status(r.status, r.last_error.clone());
                    true
                }
                _ => false,
            };
            if !unchanged {
                let ident = Arc::new(Identity::from_record(r));
                if let Some(old) = self.by_key.insert(key, ident.clone()) {
                    old.retire();
                    if old.id != ident.id {
                        changes.removed.push(old);
                    }
                }
                changes.replaced.push(ident);
            }
        }
        let gone: Vec<String> = self
            .by_key
            .iter()
            .filter(|e| !seen.contains(e.key()))
            .map(|e| e.key().clone())
            .collect();
        for key in gone {
            if let Some((_, old)) = self.by_key.remove(&key) {
                old.retire();
                changes.removed.push(old);
            }
        }
        changes
    }
}

/// Why a local authentication failed. Deliberately coarse toward clients:
/// front ends answer every variant but `Locked` the same way.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No identity with that name.
    #[error("unknown identity")]
    UnknownIdentity,
    /// Wrong local password.
    #[error("wrong password for identity {0}")]
    BadPassword(String),
    /// Too many delayed checks for this name or source are waiting
    /// already; refused without checking. Try again after the duration.
    #[error("too many failed attempts; try again in {0:?}")]
    Locked(Duration),
}

/// What guessing is throttled by: a name (known or not; a keyed hash of
/// its lookup key, so attacker-chosen names are not kept), or a source
/// address that is not loopback (local processes all share loopback, so it
/// tells nothing apart; IPv6 sources count by /64).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum ThrottleKey {
    Name([u8; 16]),
    Source(IpAddr),
}

#[derive(Debug, Clone, Copy)]
struct Throttle {
    /// Failures in a row (reset by a success for a name, or after a quiet
    /// window).
    failures: u32,
    last: Instant,
    /// Checks waiting out their delay right now.
    waiting: u32,
}

/// Delayed checks that may wait at once for one name or source; more are
/// refused with [`AuthError::Locked`] until one ends. Bounds what a guesser
/// can have in flight without ever refusing the first correct password
/// that waits its turn.
const MAX_WAITING: u32 = 8;
/// Throttle entries kept at most (memory bound); beyond, new names share
/// one entry.
const MAX_THROTTLES: usize = 100_000;
/// The shared entry for names beyond [`MAX_THROTTLES`].
const OVERFLOW: ThrottleKey = ThrottleKey::Name([0xff; 16]);

/// The checks one verification holds a waiting slot in; given back when
/// dropped.
struct Waiting<'a> {
    throttles: &'a DashMap<ThrottleKey, Throttle>,
    keys: Vec<ThrottleKey>,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        for key in &self.keys {
            if let Some(mut t) = self.throttles.get_mut(key) {
                t.waiting = t.waiting.saturating_sub(1);
            }
        }
    }
}

type CacheKey = [u8; 32];

/// What one client connection last proved, so that a keep-alive client
/// resending the same credentials on every request costs one short keyed
/// hash and a comparison instead of decoding, a BLAKE2b MAC and a shared
/// map lookup. It holds a 64-bit SipHash of the raw credentials under a
/// per-process random key (never the credentials), the identity, and a
/// deadline one `credential_cache_ttl` after the proof. Only the client
/// that owns the connection can ever present a header to it. Invalid once
/// the identity is replaced or removed (password change, unlink, delete).
#[derive(Default)]
pub struct ConnectionMemo {
    memo: Mutex<Option<Memo>>,
    /// Raised once the connection proved credentials (see
    /// [`crate::proxy::slots`]).
    proved: Arc<std::sync::atomic::AtomicBool>,
}

impl ConnectionMemo {
    /// A memo that raises `proved` when the connection proves credentials.
    pub fn new(proved: Arc<std::sync::atomic::AtomicBool>) -> ConnectionMemo {
        ConnectionMemo {
            memo: Mutex::default(),
            proved,
        }
    }
}

struct Memo {
    tag: u64,
    identity: Arc<Identity>,
    until: Instant,
}

impl std::fmt::Debug for ConnectionMemo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ConnectionMemo(..)")
    }
}

/// The memo's hash of raw credentials (see [`ConnectionMemo`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoTag(u64);

/// Upper bound on cached verified credentials (memory bound).
const CACHE_CAP: usize = 100_000;

/// Proven credentials: cache key → end of validity, bounded in size.
#[derive(Default)]
struct VerifiedCache(DashMap<CacheKey, Instant>);

impl VerifiedCache {
    /// Whether `key` was proven and its proof still holds at `now`.
    fn holds(&self, key: &CacheKey, now: Instant) -> bool {
        self.0.get(key).is_some_and(|exp| *exp > now)
    }

    fn remember(&self, key: CacheKey, until: Instant) {
        if self.0.len() >= CACHE_CAP {
            self.prune(Instant::now());
            if self.0.len() >= CACHE_CAP {
                return;
            }
        }
        self.0.insert(key, until);
    }

    fn prune(&self, now: Instant) {
        self.0.retain(|_, exp| *exp > now);
    }
}

/// The address a client counts under for per-source limits (throttling,
/// connection shares), if any: none for loopback (every local process
/// shares it, so it tells nothing apart), IPv4 for IPv4-mapped IPv6, and
/// the /64 for IPv6 (what one host usually holds).
pub fn source_address(ip: IpAddr) -> Option<IpAddr> {
    if ip.is_loopback() {
        return None;
    }
    let ip = match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let mut o = v6.octets();
                o[8..].fill(0);
                IpAddr::V6(o.into())
            }
        },
        v4 => v4,
    };
    (!ip.is_loopback()).then_some(ip)
}

/// The throttle key of a source address (see [`source_address`]).
fn source_key(ip: IpAddr) -> Option<ThrottleKey> {
    source_address(ip).map(ThrottleKey::Source)
}

/// Checks local credentials; see the module docs.
pub struct Authenticator {
    directory: Arc<Directory>,
    metrics: Arc<Metrics>,
    mac_key: [u8; 32],
    cache: Arc<VerifiedCache>,
    throttles: DashMap<ThrottleKey, Throttle>,
    flights: SingleFlight<CacheKey, bool>,
    hashing: Arc<Semaphore>,
    dummy_hash: Arc<str>,
    memo_key: std::collections::hash_map::RandomState,
    config: AuthConfig,
    /// When it was made, and the second (since then, plus one) of the last
    /// "locked out" log line.
    started: Instant,
    locked_logged: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field("cached", &self.cache.0.len())
            .finish_non_exhaustive()
    }
}

/// Hashes a new local password with argon2id under the configured costs.
pub fn hash_password(password: &str, config: &AuthConfig) -> Result<String, String> {
    let params = Params::new(
        config.argon2_memory_kib,
        config.argon2_iterations,
        config.argon2_parallelism,
        None,
    )
    .map_err(|e| e.to_string())?;
    let mut salt = [0u8; 16];
    rand::rng().fill_bytes(&mut salt);
    let salt = SaltString::encode_b64(&salt).map_err(|e| e.to_string())?;
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| e.to_string())
}

fn verify_hash(hash: &str, password: &[u8]) -> bool {
    match PasswordHash::new(hash) {
        Ok(parsed) => Argon2::default().verify_password(password, &parsed).is_ok(),
        Err(_) => false,
    }
}

impl Authenticator {
    /// Creates an authenticator over `directory`.
    pub fn new(directory: Arc<Directory>, metrics: Arc<Metrics>, config: AuthConfig) -> Self {
        let mut mac_key = [0u8; 32];
        rand::rng().fill_bytes(&mut mac_key);
        let mut dummy = [0u8; 24];
        rand::rng().fill_bytes(&mut dummy);
        let dummy_pw: String = dummy.iter().map(|b| format!("{b:02x}")).collect();
        let dummy_hash = hash_password(&dummy_pw, &config).unwrap_or_default();
        let lanes = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2);
        Authenticator {
            directory,
            metrics,
            mac_key,
            cache: Default::default(),
            throttles: DashMap::new(),
            flights: SingleFlight::default(),
            hashing: Arc::new(Semaphore::new(lanes)),
            dummy_hash: dummy_hash.into(),
            memo_key: Default::default(),
            config,
            started: Instant::now(),
            locked_logged: Default::default(),
        }
    }

    fn cache_key(&self, identity: &Identity, password: &[u8]) -> CacheKey {
        let mut mac = identity
            .cache_prefix
            .0
            .get_or_init(|| {
                let mut mac = <Blake2bMac<U32> as Mac>::new_from_slice(&self.mac_key)
                    .expect("32-byte key is valid for BLAKE2b");
                mac.update(&identity.id.to_le_bytes());
                mac.update(identity.password_hash.as_bytes());
                mac.update(&[0]);
                mac
            })
            .clone();
        mac.update(password);
        mac.finalize().into_bytes().into()
    }

    /// The memo tag of raw credentials as the client sent them (the whole
    /// header value or SASL response).
    pub fn memo_tag(&self, raw: &[u8]) -> MemoTag {
        use std::hash::BuildHasher;
        MemoTag(self.memo_key.hash_one(raw))
    }

    /// The identity `memo` proved with the credentials of `tag`, when it
    /// still holds; counted as a cache hit.
    pub fn recall(&self, memo: &ConnectionMemo, tag: MemoTag) -> Option<Arc<Identity>> {
        let guard = memo.memo.lock().ok()?;
        let m = guard.as_ref()?;
        if m.tag != tag.0 || m.identity.is_retired() || m.until <= Instant::now() {
            return None;
        }
        self.metrics.credential_check(CredentialCheck::cache_hit);
        Some(m.identity.clone())
    }

    /// Records that the credentials of `tag` proved `identity` just now.
    pub fn memorize(&self, memo: &ConnectionMemo, tag: MemoTag, identity: &Arc<Identity>) {
        memo.proved.store(true, Ordering::Release);
        if let Ok(mut guard) = memo.memo.lock() {
            *guard = Some(Memo {
                tag: tag.0,
                identity: identity.clone(),
                until: Instant::now() + self.config.credential_cache_ttl,
            });
        }
    }

    /// Checks `name`/`password` from a client at `source`.
    ///
    /// Records metrics for failures under `protocol`.
    pub async fn authenticate(
        &self,
        name: &str,
        password: &[u8],
        source: IpAddr,
        protocol: Protocol,
    ) -> Result<Arc<Identity>, AuthError> {
        let identity = self.directory.get(name);
        if let Some(identity) = &identity {
            let key = self.cache_key(identity, password);
            if self.cache.holds(&key, Instant::now()) {
                self.metrics.credential_check(CredentialCheck::cache_hit);
                return Ok(identity.clone());
            }
        }
        // The slow path (lockout, argon2) is boxed so the futures of every
        // request stay small: they are moved on each request.
        Box::pin(self.verify(identity, name, password, source, protocol)).await
    }

    async fn verify(
        &self,
        identity: Option<Arc<Identity>>,
        name: &str,
        password: &[u8],
        source: IpAddr,
        protocol: Protocol,
    ) -> Result<Arc<Identity>, AuthError> {
        let keys: Vec<ThrottleKey> = [Some(self.name_key(name)), source_key(source)]
            .into_iter()
            .flatten()
            .collect();
        // The same throttle, delays and answers for every name, known or
        // not: nothing here tells them apart.
        let waiting = match self.admit(&keys) {
            Ok(w) => w,
            Err(retry) => {
                self.metrics.auth_failure(
                    identity.as_ref().map(|i| i.name.as_str()),
                    protocol,
                    FailureReason::locked_out,
                );
                // At most one line a second: refusals without a check cost
                // nothing, so they can come faster than any log should.
                let now = self.started.elapsed().as_secs() + 1;
                let last = self.locked_logged.swap(now, Ordering::Relaxed);
                if last != now {
                    tracing::info!(
                        identity = identity.as_ref().map(|i| i.name.as_str()).unwrap_or(crate::metrics::UNKNOWN_IDENTITY),
                        protocol = ?protocol,
                        %source,
                        retry_after = ?retry,
                        "login refused: locked out after too many failed logins (not checked; at most one such line a second)"
                    );
                }
                return Err(AuthError::Locked(retry));
            }
        };
        if let Some((delay, _)) = &waiting {
            tokio::time::sleep(*delay).await;
        }

        let ok = match &identity {
            Some(identity) => {
                let key = self.cache_key(identity, password);
                // No local password yet (invited, set later): never
                // matches, and costs the same argon2 run as any name.
                let hash: Arc<str> = if identity.password_hash.is_empty() {
                    self.dummy_hash.clone()
                } else {
                    identity.password_hash.as_str().into()
                };
                let pw = zeroize::Zeroizing::new(password.to_vec());
                let sem = self.hashing.clone();
                // Only the request that starts the flight runs argon2 and
                // counts its result; those that join it count as `shared`.
                let metrics = self.metrics.clone();
                let cache = self.cache.clone();
                let ttl = self.config.credential_cache_ttl;
                let led = Arc::new(std::sync::atomic::AtomicBool::new(false));
                let leader = led.clone();
                let ok = self
                    .flights
                    .run(key, move || async move {
                        leader.store(true, Ordering::Relaxed);
                        let _permit = sem.acquire_owned().await;
                        let ok = tokio::task::spawn_blocking(move || verify_hash(&hash, &pw))
                            .await
                            .unwrap_or(false);
                        // Cached inside the flight, before it lands: a
                        // request arriving between the landing and the
                        // callers' wake-up must find the proof, not start
                        // a second argon2 run.
                        if ok {
                            cache.remember(key, Instant::now() + ttl);
                        }
                        metrics.credential_check(if ok {
                            CredentialCheck::verified
                        } else {
                            CredentialCheck::rejected
                        });
                        ok
                    })
                    .await;
                if !led.load(Ordering::Relaxed) {
                    self.metrics.credential_check(CredentialCheck::shared);
                }
                ok
            }
            None => {
                // Same work as a real check, so names cannot be probed by timing.
                let hash = self.dummy_hash.clone();
                let pw = zeroize::Zeroizing::new(password.to_vec());
                let _permit = self.hashing.clone().acquire_owned().await;
                let _ = tokio::task::spawn_blocking(move || verify_hash(&hash, &pw)).await;
                self.metrics.credential_check(CredentialCheck::rejected);
                false
            }
        };

        drop(waiting);
        if ok {
            let identity = identity.expect("ok implies a known identity");
            self.throttles.remove(&keys[0]);
            return Ok(identity);
        }
        for key in &keys {
            self.record_failure(*key, identity.as_deref(), source);
        }
        match identity {
            Some(identity) => {
                tracing::info!(identity = %identity.name, protocol = ?protocol, %source, "login failed: wrong local password");
                self.metrics.auth_failure(
                    Some(&identity.name),
                    protocol,
                    FailureReason::bad_password,
                );
                Err(AuthError::BadPassword(identity.name.clone()))
            }
            None => {
                let shown: String = name.chars().take(64).collect();
                tracing::info!(name = %crate::names::Shown(&shown), protocol = ?protocol, %source, "login failed: no identity of that name");
                self.metrics
                    .auth_failure(None, protocol, FailureReason::unknown_identity);
                Err(AuthError::UnknownIdentity)
            }
        }
    }

    /// The throttle key of a name (known or not).
    fn name_key(&self, name: &str) -> ThrottleKey {
        let mut mac = <Blake2bMac<U32> as Mac>::new_from_slice(&self.mac_key)
            .expect("32-byte key is valid for BLAKE2b");
        mac.update(b"throttle\0");
        mac.update(name_key(name).as_bytes());
        let digest: [u8; 32] = mac.finalize().into_bytes().into();
        let mut key = [0u8; 16];
        key.copy_from_slice(&digest[..16]);
        let key = ThrottleKey::Name(key);
        if self.throttles.len() >= MAX_THROTTLES && !self.throttles.contains_key(&key) {
            return OVERFLOW;
        }
        key
    }

    /// The delay a check waits after `failures` failures in a row, if any.
    fn delay_after(&self, failures: u32) -> Option<Duration> {
        let max = self.config.max_failures;
        (failures >= max).then(|| {
            let exp = (failures - max).min(20);
            self.config
                .lockout
                .saturating_mul(1u32 << exp)
                .min(self.config.max_lockout)
        })
    }

    fn window(&self) -> Duration {
        self.config.max_lockout.max(Duration::from_secs(900))
    }

    /// Admits a check under `keys`: `Ok(None)` at once, `Ok(Some((delay,
    /// slots)))` after waiting `delay` (holding a waiting slot of each
    /// throttled key), or `Err(retry)` when a throttled key has
    /// [`MAX_WAITING`] checks waiting already.
    fn admit<'s>(
        &'s self,
        keys: &[ThrottleKey],
    ) -> Result<Option<(Duration, Waiting<'s>)>, Duration> {
        let now = Instant::now();
        let window = self.window();
        let mut delay = Duration::ZERO;
        let mut slots = Waiting {
            throttles: &self.throttles,
            keys: Vec::new(),
        };
        for key in keys {
            let Some(mut t) = self.throttles.get_mut(key) else {
                continue;
            };
            if now.duration_since(t.last) > window {
                continue;
            }
            let Some(d) = self.delay_after(t.failures) else {
                continue;
            };
            if t.waiting >= MAX_WAITING {
                // `slots` gives back what was taken so far.
                return Err(d);
            }
            t.waiting += 1;
            slots.keys.push(*key);
            delay = delay.max(d);
        }
        Ok((!slots.keys.is_empty()).then_some((delay, slots)))
    }

    /// Counts a failure under `key`; logs and counts the moment it starts
    /// being throttled.
    fn record_failure(&self, key: ThrottleKey, identity: Option<&Identity>, source: IpAddr) {
        let now = Instant::now();
        let window = self.window();
        let mut t = self.throttles.entry(key).or_insert(Throttle {
            failures: 0,
            last: now,
            waiting: 0,
        });
        if now.duration_since(t.last) > window {
            t.failures = 0;
        }
        t.failures = t.failures.saturating_add(1);
        t.last = now;
        if t.failures != self.config.max_failures {
            return;
        }
        drop(t);
        let scope = match (key, identity) {
            (ThrottleKey::Source(_), _) => LockoutScope::source,
            (ThrottleKey::Name(_), Some(_)) => LockoutScope::identity,
            (ThrottleKey::Name(_), None) => LockoutScope::unknown_name,
        };
        self.metrics.lockout(scope);
        match scope {
            LockoutScope::identity => tracing::warn!(
                identity = %identity.map(|i| i.name.as_str()).unwrap_or_default(),
                failures = self.config.max_failures,
                "failed logins for this identity: further checks are delayed"
            ),
            LockoutScope::unknown_name => tracing::warn!(
                failures = self.config.max_failures,
                "failed logins for an unknown name: further checks for it are delayed"
            ),
            LockoutScope::source => tracing::warn!(
                %source,
                failures = self.config.max_failures,
                "failed logins from this address: further checks from it are delayed"
            ),
        }
    }

    /// Drops expired cache entries and stale failure counters.
    pub fn prune(&self) {
        let now = Instant::now();
        self.cache.prune(now);
        let window = self.window();
        self.throttles
            .retain(|_, t| t.waiting > 0 || now.duration_since(t.last) <= window);
    }

    /// Forgets every cached credential (after the directory changed).
    pub fn clear_cache(&self) {
        self.cache.0.clear();
    }

    /// Number of cached verified credentials.
    pub fn cached(&self) -> usize {
        self.cache.0.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn cheap() -> AuthConfig {
        AuthConfig {
            argon2_memory_kib: 256,
            argon2_iterations: 1,
            argon2_parallelism: 1,
            max_failures: 3,
            lockout: Duration::from_millis(200),
            max_lockout: Duration::from_secs(1),
            ..AuthConfig::default()
        }
    }

    /// Identity 1, "Alice", with `password_hash` and `status`.
    fn alice_record(password_hash: String, status: Status) -> IdentityRecord {
        IdentityRecord {
            id: 1,
            name: "Alice".into(),
            mailbox: "alice@contoso.com".into(),
            password_hash,
            status,
            last_error: None,
            last_success_at: None,
            last_failure_at: None,
            created_at: 0,
            has_refresh_token: true,
            token_generation: 1,
            account: None,
            linked_at: None,
            tenant: "default".into(),
            mode: Default::default(),
            tenant_block: None,
        }
    }

    fn setup() -> (Arc<Directory>, Arc<Metrics>, Authenticator) {
        let dir = Arc::new(Directory::default());
        let hash = hash_password("pw-alice", &cheap()).unwrap();
        dir.apply(&[alice_record(hash, Status::Linked)]);
        let metrics = Arc::new(Metrics::new());
        let auth = Authenticator::new(dir.clone(), metrics.clone(), cheap());
        (dir, metrics, auth)
    }

    const SRC: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

    #[tokio::test]
    async fn verifies_once_then_serves_from_cache() {
        let (_d, m, a) = setup();
        for _ in 0..5 {
            let id = a
                .authenticate("ALICE", b"pw-alice", SRC, Protocol::http)
                .await
                .unwrap();
            assert_eq!(id.name, "Alice");
        }
        assert_eq!(m.credential_check_count(CredentialCheck::verified), 1);
        assert_eq!(m.credential_check_count(CredentialCheck::cache_hit), 4);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_first_requests_share_one_argon2_run() {
        let (_d, m, a) = setup();
        let a = Arc::new(a);
        // Hold every argon2 permit so the first check cannot finish before
        // the other fifteen requests have arrived.
        let permits = a.hashing.available_permits() as u32;
        let held = a.hashing.clone().acquire_many_owned(permits).await.unwrap();
        let calls: Vec<_> = (0..16)
            .map(|_| {
                let a = a.clone();
                tokio::spawn(async move {
                    a.authenticate("alice", b"pw-alice", SRC, Protocol::http)
                        .await
                        .is_ok()
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(200)).await;
        drop(held);
        for c in calls {
            assert!(c.await.unwrap());
        }
        assert_eq!(m.credential_check_count(CredentialCheck::verified), 1);
        assert_eq!(m.credential_check_count(CredentialCheck::shared), 15);
        assert_eq!(m.credential_check_count(CredentialCheck::cache_hit), 0);
        // The next one is served from the cache.
        a.authenticate("alice", b"pw-alice", SRC, Protocol::http)
            .await
            .unwrap();
        assert_eq!(m.credential_check_count(CredentialCheck::cache_hit), 1);
        assert_eq!(m.credential_check_count(CredentialCheck::verified), 1);
    }

    #[tokio::test]
    async fn a_proof_is_cached_before_its_flight_lands() {
        use futures_util::FutureExt;
        let (_d, m, a) = setup();
        // The first request starts the argon2 flight, then is not polled
        // again (as when its task waits in the run queue).
        let permits = a.hashing.available_permits() as u32;
        let held = a.hashing.clone().acquire_many_owned(permits).await.unwrap();
        let mut first = Box::pin(a.authenticate("alice", b"pw-alice", SRC, Protocol::http));
        assert!((&mut first).now_or_never().is_none());
        assert_eq!(a.flights.in_flight(), 1);
        drop(held);
        for _ in 0..500 {
            if a.flights.in_flight() == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(a.flights.in_flight(), 0, "the flight landed");
        // A request arriving now, before the first one resumed, is served
        // from the cache: no second argon2 run.
        a.authenticate("alice", b"pw-alice", SRC, Protocol::http)
            .await
            .unwrap();
        assert_eq!(m.credential_check_count(CredentialCheck::verified), 1);
        assert_eq!(m.credential_check_count(CredentialCheck::cache_hit), 1);
        assert!(first.await.is_ok());
    }

    #[tokio::test]
    async fn guessing_is_delayed_and_a_correct_password_still_gets_through() {
        let (_d, m, a) = setup();
        assert_eq!(
            a.authenticate("alice", b"nope", SRC, Protocol::http)
                .await
                .unwrap_err(),
            AuthError::BadPassword("Alice".into())
        );
        assert_eq!(
            a.authenticate("mallory", b"x", SRC, Protocol::http)
                .await
                .unwrap_err(),
            AuthError::UnknownIdentity
        );
        let _ = a.authenticate("alice", b"nope", SRC, Protocol::http).await;
        let _ = a.authenticate("alice", b"nope", SRC, Protocol::http).await;
        // Three failures: checks are delayed now, but the right password
        // (never cached) is not refused.
        let started = Instant::now();
        a.authenticate("ALICE", b"pw-alice", SRC, Protocol::http)
            .await
            .unwrap();
        assert!(started.elapsed() >= Duration::from_millis(200));
        // The success ended the throttle.
        let started = Instant::now();
        assert!(a
            .authenticate("alice", b"nope", SRC, Protocol::http)
            .await
            .is_err());
        assert!(started.elapsed() < Duration::from_millis(200));
        assert_eq!(
            m.encode()
                .lines()
                // The other scopes are there at zero.
                .filter(|l| l.starts_with("authswap_auth_lockouts_total") && !l.ends_with(" 0"))
                .collect::<Vec<_>>(),
            ["authswap_auth_lockouts_total{scope=\"identity\"} 1"]
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn known_and_unknown_names_are_throttled_alike() {
        let (_d, m, a) = setup();
        let a = Arc::new(a);
        for name in ["alice", "mallory"] {
            for _ in 0..3 {
                assert!(a
                    .authenticate(name, b"nope", SRC, Protocol::http)
                    .await
                    .is_err());
            }
        }
        let rejected = m.credential_check_count(CredentialCheck::rejected);
        assert_eq!(rejected, 6, "argon2 ran for both names");
        let mut answers = Vec::new();
        for name in ["alice", "mallory"] {
            // MAX_WAITING checks wait out their delay; the next is refused
            // at once, the same way for both names.
            let waiting: Vec<_> = (0..MAX_WAITING)
                .map(|i| {
                    let a = a.clone();
                    let pw = format!("guess-{i}");
                    tokio::spawn(async move {
                        a.authenticate(name, pw.as_bytes(), SRC, Protocol::http)
                            .await
                    })
                })
                .collect();
            tokio::time::sleep(Duration::from_millis(50)).await;
            let refused = a.authenticate(name, b"one more", SRC, Protocol::http).await;
            assert!(matches!(refused, Err(AuthError::Locked(_))), "{name}");
            answers.push(refused.unwrap_err());
            for w in waiting {
                assert!(w.await.unwrap().is_err());
            }
        }
        assert_eq!(answers[0], answers[1], "nothing tells the names apart");
        assert_eq!(
            m.credential_check_count(CredentialCheck::rejected),
            rejected + 2 * u64::from(MAX_WAITING),
            "the same work for both"
        );
        let text = m.encode();
        for scope in ["identity", "unknown_name"] {
            assert!(
                text.contains(&format!(
                    "authswap_auth_lockouts_total{{scope=\"{scope}\"}} 1"
                )),
                "{text}"
            );
        }
    }

    #[test]
    fn sources_are_throttled_by_the_address_they_really_come_from() {
        use std::net::Ipv6Addr;
        assert_eq!(source_key(SRC), None, "loopback tells nothing apart");
        assert_eq!(source_key(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2))), None);
        assert_eq!(source_key(IpAddr::V6(Ipv6Addr::LOCALHOST)), None);
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().unwrap();
        assert_eq!(
            source_key(mapped),
            Some(ThrottleKey::Source("192.0.2.7".parse().unwrap()))
        );
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::9".parse().unwrap();
        assert_eq!(source_key(a), source_key(b), "one /64");
    }

    #[tokio::test]
    async fn a_connection_memo_serves_its_own_credentials_until_they_change() {
        let (d, m, a) = setup();
        let memo = ConnectionMemo::default();
        let tag = a.memo_tag(b"Basic alice:pw-alice");
        assert!(a.recall(&memo, tag).is_none(), "empty memo");
        let alice = a
            .authenticate("alice", b"pw-alice", SRC, Protocol::http)
            .await
            .unwrap();
        a.memorize(&memo, tag, &alice);
        assert_eq!(a.recall(&memo, tag).unwrap().id, 1);
        assert_eq!(m.credential_check_count(CredentialCheck::cache_hit), 1);
        // Other credentials on the same connection are not recalled.
        assert!(a.recall(&memo, a.memo_tag(b"Basic alice:other")).is_none());
        assert!(!format!("{memo:?}").contains("alice"));
        // Same credentials, unchanged identity (status update in place): still valid.
        let rec = |hash: String| alice_record(hash, Status::NeedsReauth);
        d.apply(&[rec(alice.password_hash.clone())]);
        assert!(a.recall(&memo, tag).is_some());
        // A password change retires the identity the memo holds.
        d.apply(&[rec(hash_password("new-pw", &cheap()).unwrap())]);
        assert!(alice.is_retired());
        assert!(a.recall(&memo, tag).is_none());
        // And a memo expires with the credential cache's TTL.
        let short = Authenticator::new(
            d.clone(),
            m.clone(),
            AuthConfig {
                credential_cache_ttl: Duration::from_millis(50),
                ..cheap()
            },
        );
        let current = d.get("alice").unwrap();
        let tag = short.memo_tag(b"Basic alice:pw-alice");
        assert_ne!(
            tag,
            a.memo_tag(b"Basic alice:pw-alice"),
            "keyed per process"
        );
        short.memorize(&memo, tag, &current);
        assert!(short.recall(&memo, tag).is_some());
        tokio::time::sleep(Duration::from_millis(80)).await;
        assert!(short.recall(&memo, tag).is_none());
        // Deleting the identity retires it too.
        short.memorize(&memo, tag, &current);
        d.apply(&[]);
        assert!(short.recall(&memo, tag).is_none());
    }

    #[tokio::test]
    async fn password_change_invalidates_cached_credentials() {
        let (d, _m, a) = setup();
        a.authenticate("alice", b"pw-alice", SRC, Protocol::http)
            .await
            .unwrap();
        let mut rec = alice_record(hash_password("new-pw", &cheap()).unwrap(), Status::Linked);
        let ch = d.apply(std::slice::from_ref(&rec));
        assert_eq!(ch.replaced.len(), 1);
        assert!(a
            .authenticate("alice", b"pw-alice", SRC, Protocol::http)
            .await
            .is_err());
        a.authenticate("alice", b"new-pw", SRC, Protocol::http)
            .await
            .unwrap();
        rec.status = Status::NeedsReauth;
        let ch = d.apply(std::slice::from_ref(&rec));
        assert!(ch.replaced.is_empty());
        assert_eq!(d.get("alice").unwrap().status(), Status::NeedsReauth);
        let ch = d.apply(&[]);
        assert_eq!(ch.removed.len(), 1);
        assert!(a
            .authenticate("alice", b"new-pw", SRC, Protocol::http)
            .await
            .is_err());
    }
}
