//! Metric families and their typed label sets (prometheus-client). Identity
//! labels exist only for configured identities and only on a few low-rate
//! families; unknown names share the `_unknown` series, and an identity's
//! series are removed with it. Identity names are escaped as the exposition
//! formats require (prometheus-client writes label values verbatim).
//! Families are initialised where their label values are bounded (per
//! front end, per configured identity for the refresh counter) so a quiet
//! instance exposes them; `/metrics` is rendered as OpenMetrics or, by
//! conversion, as the Prometheus text format 0.0.4 ([`Metrics::encode`],
//! [`Metrics::encode_prometheus`]).

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::sync::{Arc, OnceLock};

/// Identity label value for names that are not configured identities.
pub const UNKNOWN_IDENTITY: &str = "_unknown";

/// An identity name as a label value. prometheus-client 0.24 writes label
/// values as they are, so a name holding `"`, `\` or a line feed (possible
/// in stores written before names were restricted, see
/// [`crate::names`]) would break the whole scrape; this escapes them as the
/// Prometheus text format and OpenMetrics require (`\\`, `\"`, `\n`).
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
struct IdentityLabel(String);

impl IdentityLabel {
    fn new(name: &str) -> IdentityLabel {
        IdentityLabel(name.to_owned())
    }
}

impl EncodeLabelValue for IdentityLabel {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        use std::fmt::Write as _;
        let s = self.0.as_str();
        let mut plain = 0;
        for (i, c) in s.char_indices() {
            let escaped = match c {
                '\\' => "\\\\",
                '"' => "\\\"",
                '\n' => "\\n",
                _ => continue,
            };
            encoder.write_str(&s[plain..i])?;
            encoder.write_str(escaped)?;
            plain = i + c.len_utf8();
        }
        encoder.write_str(&s[plain..])
    }
}

/// Front end a request or connection came through.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Protocol {
    /// HTTP / EWS.
    http,
    /// SMTP submission.
    smtp,
    /// IMAP.
    imap,
    /// POP3.
    pop3,
}

impl Protocol {
    /// What the upstream of this front end is called in messages.
    pub fn upstream_name(self) -> &'static str {
        match self {
            Protocol::http => "HTTP upstream",
            Protocol::smtp => "SMTP server",
            Protocol::imap => "IMAP server",
            Protocol::pop3 => "POP3 server",
        }
    }

    /// Every protocol (to remove an identity's series).
    pub const ALL: [Protocol; 4] = [
        Protocol::http,
        Protocol::smtp,
        Protocol::imap,
        Protocol::pop3,
    ];
}

/// Why a client's authentication or request failed.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum FailureReason {
    /// No or unparsable credentials.
    bad_request,
    /// Known identity, wrong local password.
    bad_password,
    /// No identity with that name.
    unknown_identity,
    /// Too many failures: the attempt was refused without checking.
    locked_out,
    /// Upstream refused the access token (401 / 535 / NO).
    token_rejected,
    /// Upstream refused a freshly issued token again: the identity backs
    /// off and clients get temporary answers.
    fresh_token_refused,
    /// Upstream refused access for a reason an administrator must fix
    /// (SMTP AUTH or EWS switched off); its answer is passed through.
    upstream_refused,
    /// The identity platform failed transiently.
    refresh_failed,
    /// The identity needs a person to sign in again.
    reauth_required,
    /// The identity platform refuses the tenant's app credential (secret
    /// expired or wrong, certificate refused): an admin must renew it.
    app_credential,
}

impl FailureReason {
    /// Every reason (to remove an identity's series).
    pub const ALL: [FailureReason; 10] = [
        FailureReason::bad_request,
        FailureReason::bad_password,
        FailureReason::unknown_identity,
        FailureReason::locked_out,
        FailureReason::token_rejected,
        FailureReason::fresh_token_refused,
        FailureReason::upstream_refused,
        FailureReason::refresh_failed,
        FailureReason::reauth_required,
        FailureReason::app_credential,
    ];
}

/// What started being throttled after `auth.max_failures` failures.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum LockoutScope {
    /// A configured identity's name.
    identity,
    /// A name that is no configured identity.
    unknown_name,
    /// A (non-loopback) source address.
    source,
}

/// Result of a token refresh.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum RefreshResult {
    /// New access token obtained.
    success,
    /// Refresh token refused: re-authentication needed.
    reauth_required,
    /// Identity platform unavailable, throttled or timed out.
    transient_error,
}

impl RefreshResult {
    /// Every result.
    pub const ALL: [RefreshResult; 3] = [
        RefreshResult::success,
        RefreshResult::reauth_required,
        RefreshResult::transient_error,
    ];
}

/// How a client request ended.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Outcome {
    /// Forwarded upstream and answered (whatever the upstream status).
    forwarded,
    /// Refused: bad or missing credentials.
    unauthorized,
    /// Refused: identity needs re-authentication.
    reauth_required,
    /// No token could be had (identity platform down): temporary error.
    unavailable,
    /// Upstream unreachable or failed at the transport level.
    upstream_error,
    /// Malformed or oversized request.
    bad_request,
    /// The upstream refused access: freshly issued tokens refused again
    /// (temporary answer), or a permanent reason passed through.
    upstream_refused,
}

impl Outcome {
    /// Number of outcomes.
    pub const COUNT: usize = 7;

    /// Every outcome (initialised at zero per front end).
    pub const ALL: [Outcome; Outcome::COUNT] = [
        Outcome::forwarded,
        Outcome::unauthorized,
        Outcome::reauth_required,
        Outcome::unavailable,
        Outcome::upstream_error,
        Outcome::bad_request,
        Outcome::upstream_refused,
    ];
}

/// Channel a notification went through.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum NotifyChannel {
    /// JSON POST to `[notifications] webhook_url`.
    webhook,
    /// E-mail through the SMTP upstream.
    email,
}

/// Result of one notification delivery attempt.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum NotifyResult {
    /// Delivered (webhook 2xx, message accepted by the SMTP upstream).
    sent,
    /// The attempt failed (it may be retried).
    failed,
}

/// Outcome of a local password check.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum CredentialCheck {
    /// Served from the verified-credential cache (no argon2).
    cache_hit,
    /// argon2id ran and the password matched.
    verified,
    /// argon2id ran and the password did not match (or the name is unknown).
    rejected,
    /// Waited for an argon2id check of the same name and password that
    /// another request had already started (one run serves both).
    shared,
}

/// How a sign-in on the onboarding listener ended.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum SigninResult {
    /// The identity was linked.
    linked,
    /// Someone signed in with another account than the invited mailbox.
    wrong_account,
    /// The identity platform refused (error redirect, code or ID token refused).
    idp_error,
    /// Missing, unknown, reused, expired or foreign `state` on the callback.
    invalid_state,
    /// The invitation was expired, revoked or already used.
    expired_invitation,
    /// An invitation link that matches no invitation.
    unknown_invitation,
    /// A typed code that matches no invitation.
    bad_code,
    /// Code attempts from a source over the limit.
    throttled,
    /// Store or internal failure.
    failed,
}

/// What authswap was doing with its store when an operation failed.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum StoreOperation {
    /// The background reload (revision poll, identity list): every
    /// `tokens.reload_interval`, so it doubles as the store's probe.
    reload,
    /// A `/readyz` probe.
    readiness,
    /// A token refresh on the request path (refresh lease, stored tokens,
    /// the commit of a rotated refresh token).
    refresh,
}

impl StoreOperation {
    /// Every operation.
    pub const ALL: [StoreOperation; 3] = [
        StoreOperation::reload,
        StoreOperation::readiness,
        StoreOperation::refresh,
    ];
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StoreLabels {
    operation: StoreOperation,
}

impl SigninResult {
    /// Every result (initialised at zero).
    pub const ALL: [SigninResult; 9] = [
        SigninResult::linked,
        SigninResult::wrong_account,
        SigninResult::idp_error,
        SigninResult::invalid_state,
        SigninResult::expired_invitation,
        SigninResult::unknown_invitation,
        SigninResult::bad_code,
        SigninResult::throttled,
        SigninResult::failed,
    ];
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SigninLabels {
    result: SigninResult,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FailureLabels {
    identity: IdentityLabel,
    protocol: Protocol,
    reason: FailureReason,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefreshLabels {
    identity: IdentityLabel,
    result: RefreshResult,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LockoutLabels {
    scope: LockoutScope,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    protocol: Protocol,
    outcome: Outcome,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProtocolLabels {
    protocol: Protocol,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct IdentityLabels {
    identity: IdentityLabel,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ExpiryLabels {
    identity: IdentityLabel,
    protocol: Protocol,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CheckLabels {
    result: CredentialCheck,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NotifyLabels {
    channel: NotifyChannel,
    result: NotifyResult,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct IdentityProtocolLabels {
    identity: IdentityLabel,
    protocol: Protocol,
}

/// How a login that had to wait for one of its identity's sessions ended.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum SessionWait {
    /// A session ended in time: the login went on.
    admitted,
    /// `session_wait` passed: refused with a temporary answer.
    refused,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SessionWaitLabels {
    identity: IdentityLabel,
    protocol: Protocol,
    result: SessionWait,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EwsLabels {
    identity: IdentityLabel,
    operation: crate::proxy::http::ews_ops::Operation,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabels {
    status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct InfoLabels {
    identity: IdentityLabel,
    tenant: String,
    mode: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TenantLabels {
    tenant: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReloadLabels {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: String,
}

type HistogramCtor = fn() -> Histogram;

fn duration_histogram() -> Histogram {
    // 100 µs .. ~13 s
    Histogram::new(exponential_buckets(0.0001, 2.0, 18))
}

/// All metric families, registered once at start.
pub struct Metrics {
    registry: Registry,
    auth_failures: Family<FailureLabels, Counter>,
    refreshes: Family<RefreshLabels, Counter>,
    requests: Family<RequestLabels, Counter>,
    upstream_duration: Family<ProtocolLabels, Histogram, HistogramCtor>,
    reauth_required: Family<IdentityLabels, Gauge>,
    token_expiry: Family<ExpiryLabels, Gauge>,
    /// The front ends using each token scope set (normalised, space-joined):
    /// a token's expiry is shown under each of them.
    token_scopes: std::sync::RwLock<std::collections::HashMap<String, Vec<Protocol>>>,
    /// Configured identities whose refresh series were initialised.
    known: std::sync::Mutex<std::collections::HashSet<String>>,
    credential_checks: Family<CheckLabels, Counter>,
    identities: Family<StatusLabels, Gauge>,
    connections: Family<ProtocolLabels, Gauge>,
    lockouts: Family<LockoutLabels, Counter>,
    notifications: Family<NotifyLabels, Counter>,
    onboarding_signins: Family<SigninLabels, Counter>,
    identity_info: Family<InfoLabels, Gauge>,
    credential_expiry: Family<TenantLabels, Gauge>,
    credential_blocked: Family<TenantLabels, Gauge>,
    lease_waits: Counter,
    refresh_duration: Histogram,
    config_reloads: Family<ReloadLabels, Counter>,
    config_reload_success: Gauge,
    mail_sessions: Family<IdentityProtocolLabels, Gauge>,
    session_waits: Family<SessionWaitLabels, Counter>,
    session_wait_seconds: Family<ProtocolLabels, Histogram, HistogramCtor>,
    message_delays: Family<IdentityProtocolLabels, Counter>,
    ews_operations: Family<EwsLabels, Counter>,
    /// Each identity's EWS operation counters, resolved once (one lock per
    /// request instead of a family lookup), also read by the console.
    ews_by_identity: std::sync::Mutex<std::collections::HashMap<String, Arc<EwsCounters>>>,
    /// The (tenant, mode) each identity's info series carries.
    info: std::sync::Mutex<std::collections::HashMap<String, (String, String)>>,
    /// Request-body bytes buffered for replay (HTTP), all connections.
    pub replay_buffered: Gauge,
    /// Idle HTTP/1.1 upstream connections parked in the pool.
    pub upstream_idle: Gauge,
    /// 1 while the store answers, 0 while it is unreachable.
    store_up: Gauge,
    store_errors: Family<StoreLabels, Counter>,
    /// Failures per (configured identity, protocol), all reasons together,
    /// for the admin console (the registry is write-only).
    failure_counts: std::sync::Mutex<std::collections::HashMap<(String, Protocol), u64>>,
    /// Handles of the per-request series, resolved once: the families hash
    /// their labels and take a lock on every lookup, which the hot path
    /// would otherwise pay two or three times per request.
    hot: HotHandles,
}

// The handle arrays are indexed by these enums' discriminants.
const _: () = assert!(Outcome::upstream_refused as usize + 1 == Outcome::COUNT);
const _: () = assert!(CredentialCheck::shared as usize == 3);

#[derive(Default)]
struct HotHandles {
    requests: [[OnceLock<Counter>; Outcome::COUNT]; Protocol::ALL.len()],
    upstream: [OnceLock<Histogram>; Protocol::ALL.len()],
    checks: [OnceLock<Counter>; 4],
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Creates and registers every family.
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("authswap");
        let auth_failures = Family::<FailureLabels, Counter>::default();
        registry.register(
            "auth_failures",
            "Client authentications or requests that failed, by identity (configured names only; others are _unknown), protocol and reason",
            auth_failures.clone(),
        );
        let refreshes = Family::<RefreshLabels, Counter>::default();
        registry.register(
            "token_refreshes",
            "Access-token refreshes against the identity platform, by identity and result",
            refreshes.clone(),
        );
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "Client requests (HTTP) or sessions (mail) by protocol and outcome",
            requests.clone(),
        );
        let upstream_duration =
            Family::<ProtocolLabels, Histogram, HistogramCtor>::new_with_constructor(
                duration_histogram as HistogramCtor,
            );
        registry.register_with_unit(
            "upstream_request_duration",
            "Time from sending a request upstream to receiving its response head",
            prometheus_client::registry::Unit::Seconds,
            upstream_duration.clone(),
        );
        let reauth_required = Family::<IdentityLabels, Gauge>::default();
        registry.register(
            "identity_reauth_required",
            "1 when the identity needs a person to sign in again, else 0",
            reauth_required.clone(),
        );
        let token_expiry = Family::<ExpiryLabels, Gauge>::default();
        registry.register_with_unit(
            "access_token_expiry_timestamp",
            "Unix time at which the newest access token the identity holds for the protocol's front end expires (front ends with the same scopes share one token)",
            prometheus_client::registry::Unit::Seconds,
            token_expiry.clone(),
        );
        let credential_checks = Family::<CheckLabels, Counter>::default();
        for result in [
            CredentialCheck::cache_hit,
            CredentialCheck::verified,
            CredentialCheck::rejected,
            CredentialCheck::shared,
        ] {
            let _ = credential_checks.get_or_create(&CheckLabels { result });
        }
        registry.register(
            "credential_checks",
            "Local password checks: cache_hit (no argon2), verified or rejected (one argon2 run each), shared (waited for a concurrent argon2 run of the same credentials)",
            credential_checks.clone(),
        );
        let identities = Family::<StatusLabels, Gauge>::default();
        registry.register(
            "identities",
            "Configured identities by status",
            identities.clone(),
        );
        let connections = Family::<ProtocolLabels, Gauge>::default();
        registry.register(
            "open_connections",
            "Client connections currently open, by protocol",
            connections.clone(),
        );
        let lockouts = Family::<LockoutLabels, Counter>::default();
        for scope in [
            LockoutScope::identity,
            LockoutScope::unknown_name,
            LockoutScope::source,
        ] {
            let _ = lockouts.get_or_create(&LockoutLabels { scope });
        }
        registry.register(
            "auth_lockouts",
            "Names (identity or unknown_name) and source addresses whose failed logins reached auth.max_failures, so that their further checks are delayed",
            lockouts.clone(),
        );
        let notifications = Family::<NotifyLabels, Counter>::default();
        for channel in [NotifyChannel::webhook, NotifyChannel::email] {
            for result in [NotifyResult::sent, NotifyResult::failed] {
                let _ = notifications.get_or_create(&NotifyLabels { channel, result });
            }
        }
        registry.register(
            "notifications",
            "Re-authentication notification delivery attempts (webhook, e-mail), by channel and result",
            notifications.clone(),
        );
        let onboarding_signins = Family::<SigninLabels, Counter>::default();
        for result in SigninResult::ALL {
            let _ = onboarding_signins.get_or_create(&SigninLabels { result });
        }
        registry.register(
            "onboarding_signins",
            "Sign-ins and code look-ups on the onboarding listener, by result",
            onboarding_signins.clone(),
        );
        let identity_info = Family::<InfoLabels, Gauge>::default();
        registry.register(
            "identity_info",
            "1 per configured identity, naming its tenant and mode (delegated or app); join on identity",
            identity_info.clone(),
        );
        let credential_expiry = Family::<TenantLabels, Gauge>::default();
        registry.register_with_unit(
            "app_credential_expiry_timestamp",
            "Unix time at which the tenant's app credential expires (certificate notAfter, or the configured client_secret_expires)",
            prometheus_client::registry::Unit::Seconds,
            credential_expiry.clone(),
        );
        let credential_blocked = Family::<TenantLabels, Gauge>::default();
        registry.register(
            "app_credential_blocked",
            "1 while the identity platform refuses the tenant's app credential (every identity of the tenant is blocked), else 0",
            credential_blocked.clone(),
        );
        let replay_buffered = Gauge::default();
        registry.register_with_unit(
            "http_replay_buffer",
            "Request-body bytes buffered for a replay after a token refresh, across all HTTP connections (bounded by http.replay_buffer_total)",
            prometheus_client::registry::Unit::Bytes,
            replay_buffered.clone(),
        );
        let upstream_idle = Gauge::default();
        registry.register(
            "http_upstream_idle_connections",
            "Idle HTTP/1.1 upstream connections parked for the next request (both HTTP halves share them)",
            upstream_idle.clone(),
        );
        let refresh_duration = duration_histogram();
        registry.register_with_unit(
            "token_refresh_duration",
            "Time of one token request to the identity platform (refresh or client-credentials grant), whatever its result",
            prometheus_client::registry::Unit::Seconds,
            refresh_duration.clone(),
        );
        let lease_waits = Counter::default();
        registry.register(
            "refresh_lease_waits",
            "Refreshes that found another replica refreshing the same identity (its refresh lease in PostgreSQL held) and waited for its result",
            lease_waits.clone(),
        );
        let store_up = Gauge::default();
        // Up until an operation fails: `App::open` has just used it.
        store_up.set(1);
        registry.register(
            "store_up",
            "1 while the store (database) answers, 0 while it is unreachable (access tokens in memory are still served)",
            store_up.clone(),
        );
        let store_errors = Family::<StoreLabels, Counter>::default();
        for operation in StoreOperation::ALL {
            let _ = store_errors.get_or_create(&StoreLabels { operation });
        }
        registry.register(
            "store_errors",
            "Store operations that failed (database unreachable, timed out or failing), by operation: reload (the background poll), readiness (/readyz), refresh (a token refresh)",
            store_errors.clone(),
        );
        let config_reloads = Family::<ReloadLabels, Counter>::default();
        for result in ["success", "failure"] {
            let _ = config_reloads.get_or_create(&ReloadLabels { result });
        }
        registry.register(
            "config_reloads",
            "Configuration reloads (SIGHUP or POST /api/v1/reload), by result: failure means the new configuration was refused and the running one kept",
            config_reloads.clone(),
        );
        let config_reload_success = Gauge::default();
        config_reload_success.set(crate::store::now_unix());
        registry.register_with_unit(
            "config_last_reload_success_timestamp",
            "Unix time at which the configuration was last loaded successfully (at start, then by each successful reload)",
            prometheus_client::registry::Unit::Seconds,
            config_reload_success.clone(),
        );
        let mail_sessions = Family::<IdentityProtocolLabels, Gauge>::default();
        registry.register(
            "mail_sessions_active",
            "Logged-in mail sessions currently open upstream, by identity and protocol (bounded by max_sessions_per_identity)",
            mail_sessions.clone(),
        );
        let session_waits = Family::<SessionWaitLabels, Counter>::default();
        registry.register(
            "mail_session_waits",
            "Mail logins that waited because their identity had max_sessions_per_identity sessions open, by identity, protocol and result (admitted, or refused after session_wait)",
            session_waits.clone(),
        );
        let session_wait_seconds =
            Family::<ProtocolLabels, Histogram, HistogramCtor>::new_with_constructor(
                duration_histogram as HistogramCtor,
            );
        registry.register_with_unit(
            "mail_session_wait",
            "Time mail logins waited for a session of their identity to end",
            prometheus_client::registry::Unit::Seconds,
            session_wait_seconds.clone(),
        );
        let message_delays = Family::<IdentityProtocolLabels, Counter>::default();
        registry.register(
            "mail_message_delays",
            "SMTP MAIL FROM commands held back because the identity had sent messages_per_minute messages in the last minute",
            message_delays.clone(),
        );
        let ews_operations = Family::<EwsLabels, Counter>::default();
        registry.register(
            "ews_operations",
            "EWS requests by identity and SOAP operation (known operation names, else other), for planning the EWS retirement",
            ews_operations.clone(),
        );
        let build = Family::<BuildLabels, Gauge>::default();
        build
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION").to_owned(),
            })
            .set(1);
        registry.register("build_info", "authswap version", build);
        Metrics {
            registry,
            lease_waits,
            refresh_duration,
            config_reloads,
            config_reload_success,
            mail_sessions,
            session_waits,
            session_wait_seconds,
            message_delays,
            ews_operations,
            ews_by_identity: Default::default(),
            auth_failures,
            refreshes,
            requests,
            upstream_duration,
            reauth_required,
            token_expiry,
            token_scopes: Default::default(),
            known: Default::default(),
            credential_checks,
            identities,
            connections,
            lockouts,
            notifications,
            onboarding_signins,
            identity_info,
            credential_expiry,
            credential_blocked,
            info: Default::default(),
            replay_buffered,
            upstream_idle,
            store_up,
            store_errors,
            failure_counts: Default::default(),
            hot: HotHandles::default(),
        }
    }

    /// Counts a configuration reload; a success also sets the
    /// last-success timestamp.
    pub fn config_reload(&self, success: bool) {
        let result = if success { "success" } else { "failure" };
        self.config_reloads
            .get_or_create(&ReloadLabels { result })
            .inc();
        if success {
            self.config_reload_success.set(crate::store::now_unix());
        }
    }

    /// Counts a sign-in outcome on the onboarding listener.
    pub fn onboarding_signin(&self, result: SigninResult) {
        self.onboarding_signins
            .get_or_create(&SigninLabels { result })
            .inc();
    }

    /// Counts a failed authentication or request. `identity` is the configured
    /// identity's name, or `None` for names that are not configured.
    pub fn auth_failure(&self, identity: Option<&str>, protocol: Protocol, reason: FailureReason) {
        self.auth_failures
            .get_or_create(&FailureLabels {
                identity: IdentityLabel::new(identity.unwrap_or(UNKNOWN_IDENTITY)),
                protocol,
                reason,
            })
            .inc();
        if let Some(name) = identity {
            let mut counts = self
                .failure_counts
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            *counts.entry((name.to_owned(), protocol)).or_insert(0) += 1;
        }
    }

    /// Failures counted for `identity` since start (or since it was
    /// forgotten), per protocol, all reasons together; protocols without
    /// failures are left out.
    pub fn failure_counts(&self, identity: &str) -> Vec<(Protocol, u64)> {
        let counts = self
            .failure_counts
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        Protocol::ALL
            .iter()
            .filter_map(|p| counts.get(&(identity.to_owned(), *p)).map(|n| (*p, *n)))
            .collect()
    }

    /// Counts a name or source that started being throttled.
    pub fn lockout(&self, scope: LockoutScope) {
        self.lockouts.get_or_create(&LockoutLabels { scope }).inc();
    }

    /// Counts a refresh that waited for another replica's lease.
    pub fn refresh_lease_waited(&self) {
        self.lease_waits.inc();
    }

    /// Records the duration of one token request to the identity platform.
    pub fn refresh_duration(&self, seconds: f64) {
        self.refresh_duration.observe(seconds);
    }

    /// Counts a token refresh.
    pub fn refresh(&self, identity: &str, result: RefreshResult) {
        self.refreshes
            .get_or_create(&RefreshLabels {
                identity: IdentityLabel::new(identity),
                result,
            })
            .inc();
    }

    /// Counts a finished client request.
    pub fn request(&self, protocol: Protocol, outcome: Outcome) {
        self.hot.requests[protocol as usize][outcome as usize]
            .get_or_init(|| {
                self.requests
                    .get_or_create(&RequestLabels { protocol, outcome })
                    .clone()
            })
            .inc();
    }

    /// Records an upstream round trip.
    pub fn upstream_duration(&self, protocol: Protocol, seconds: f64) {
        self.hot.upstream[protocol as usize]
            .get_or_init(|| {
                self.upstream_duration
                    .get_or_create(&ProtocolLabels { protocol })
                    .clone()
            })
            .observe(seconds);
    }

    /// Sets the re-auth gauge of an identity.
    pub fn set_reauth_required(&self, identity: &str, required: bool) {
        self.reauth_required
            .get_or_create(&IdentityLabels {
                identity: IdentityLabel::new(identity),
            })
            .set(i64::from(required));
    }

    /// Declares a served front end: its series (requests, upstream
    /// latency, connections, unknown names' failures) start at zero, and
    /// the expiry of tokens with `scopes` (normalised, space-joined; the
    /// delegated and the app-only set) is shown under `protocol`.
    pub fn front_end(&self, protocol: Protocol, scopes: &[&str]) {
        {
            let mut map = self.token_scopes.write().unwrap_or_else(|e| e.into_inner());
            for key in scopes {
                let list = map.entry((*key).to_owned()).or_default();
                if !list.contains(&protocol) {
                    list.push(protocol);
                }
            }
        }
        for outcome in Outcome::ALL {
            let _ = self
                .requests
                .get_or_create(&RequestLabels { protocol, outcome });
        }
        let _ = self
            .upstream_duration
            .get_or_create(&ProtocolLabels { protocol });
        let _ = self.connections.get_or_create(&ProtocolLabels { protocol });
        let _ = self.auth_failures.get_or_create(&FailureLabels {
            identity: IdentityLabel::new(UNKNOWN_IDENTITY),
            protocol,
            reason: FailureReason::unknown_identity,
        });
    }

    /// Sets the expiry of `identity`'s newest access token for `scopes`
    /// (normalised, space-joined), under each front end using that set.
    pub fn set_token_expiry(&self, identity: &str, scopes: &str, unix_seconds: i64) {
        let map = self.token_scopes.read().unwrap_or_else(|e| e.into_inner());
        for protocol in map.get(scopes).into_iter().flatten() {
            self.token_expiry
                .get_or_create(&ExpiryLabels {
                    identity: IdentityLabel::new(identity),
                    protocol: *protocol,
                })
                .set(unix_seconds);
        }
    }

    /// Counts a local password check.
    pub fn credential_check(&self, result: CredentialCheck) {
        self.hot.checks[result as usize]
            .get_or_init(|| {
                self.credential_checks
                    .get_or_create(&CheckLabels { result })
                    .clone()
            })
            .inc();
    }

    /// Sets the number of identities per status (all statuses, zero included).
    pub fn set_identity_counts(&self, counts: &[(&str, i64)]) {
        for (status, n) in counts {
            self.identities
                .get_or_create(&StatusLabels {
                    status: (*status).to_owned(),
                })
                .set(*n);
        }
    }

    /// Tracks an open client connection until the guard is dropped.
    pub fn connection(&self, protocol: Protocol) -> ConnectionGuard {
        let gauge = self
            .connections
            .get_or_create(&ProtocolLabels { protocol })
            .clone();
        gauge.inc();
        ConnectionGuard(gauge)
    }

    /// Sets `authswap_identity_info{identity,tenant,mode}` (replacing the
    /// series of an identity whose tenant or mode changed).
    pub fn set_identity_info(&self, identity: &str, tenant: &str, mode: &str) {
        if self
            .known
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(identity.to_owned())
        {
            for result in RefreshResult::ALL {
                let _ = self.refreshes.get_or_create(&RefreshLabels {
                    identity: IdentityLabel::new(identity),
                    result,
                });
            }
        }
        let mut info = self.info.lock().unwrap_or_else(|e| e.into_inner());
        let now = (tenant.to_owned(), mode.to_owned());
        if let Some(old) = info.insert(identity.to_owned(), now.clone()) {
            if old == now {
                return;
            }
            self.identity_info.remove(&InfoLabels {
                identity: IdentityLabel::new(identity),
                tenant: old.0,
                mode: old.1,
            });
        }
        self.identity_info
            .get_or_create(&InfoLabels {
                identity: IdentityLabel::new(identity),
                tenant: now.0,
                mode: now.1,
            })
            .set(1);
    }

    /// Sets when tenant `tenant`'s app credential expires.
    pub fn set_credential_expiry(&self, tenant: &str, unix_seconds: i64) {
        self.credential_expiry
            .get_or_create(&TenantLabels {
                tenant: tenant.to_owned(),
            })
            .set(unix_seconds);
    }

    /// Sets whether tenant `tenant`'s app credential is refused.
    pub fn set_credential_blocked(&self, tenant: &str, blocked: bool) {
        self.credential_blocked
            .get_or_create(&TenantLabels {
                tenant: tenant.to_owned(),
            })
            .set(i64::from(blocked));
    }

    /// Removes every series labelled with `identity` (it was deleted).
    pub fn forget_identity(&self, identity: &str) {
        if let Some((tenant, mode)) = self
            .info
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(identity)
        {
            self.identity_info.remove(&InfoLabels {
                identity: IdentityLabel::new(identity),
                tenant,
                mode,
            });
        }
        self.failure_counts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|(name, _), _| name != identity);
        self.known
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(identity);
        let id = IdentityLabel::new(identity);
        for protocol in Protocol::ALL {
            for reason in FailureReason::ALL {
                self.auth_failures.remove(&FailureLabels {
                    identity: id.clone(),
                    protocol,
                    reason,
                });
            }
        }
        for result in RefreshResult::ALL {
            self.refreshes.remove(&RefreshLabels {
                identity: id.clone(),
                result,
            });
        }
        for protocol in Protocol::ALL {
            self.token_expiry.remove(&ExpiryLabels {
                identity: id.clone(),
                protocol,
            });
            let labels = IdentityProtocolLabels {
                identity: id.clone(),
                protocol,
            };
            self.mail_sessions.remove(&labels);
            self.message_delays.remove(&labels);
            for result in [SessionWait::admitted, SessionWait::refused] {
                self.session_waits.remove(&SessionWaitLabels {
                    identity: id.clone(),
                    protocol,
                    result,
                });
            }
        }
        if self
            .ews_by_identity
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(identity)
            .is_some()
        {
            for operation in crate::proxy::http::ews_ops::Operation::ALL {
                self.ews_operations.remove(&EwsLabels {
                    identity: id.clone(),
                    operation,
                });
            }
        }
        let labels = IdentityLabels { identity: id };
        self.reauth_required.remove(&labels);
    }

    /// Sets `authswap_store_up`.
    pub fn set_store_up(&self, up: bool) {
        self.store_up.set(i64::from(up));
    }

    /// Counts a failed store operation.
    pub fn store_error(&self, operation: StoreOperation) {
        self.store_errors
            .get_or_create(&StoreLabels { operation })
            .inc();
    }

    /// A logged-in mail session of `identity`: counted in
    /// `mail_sessions_active` until the guard is dropped.
    pub fn mail_session(&self, identity: &str, protocol: Protocol) -> ConnectionGuard {
        let gauge = self
            .mail_sessions
            .get_or_create(&IdentityProtocolLabels {
                identity: IdentityLabel::new(identity),
                protocol,
            })
            .clone();
        gauge.inc();
        ConnectionGuard(gauge)
    }

    /// A login of `identity` waited `seconds` for one of its sessions.
    pub fn session_waited(
        &self,
        identity: &str,
        protocol: Protocol,
        result: SessionWait,
        seconds: f64,
    ) {
        self.session_waits
            .get_or_create(&SessionWaitLabels {
                identity: IdentityLabel::new(identity),
                protocol,
                result,
            })
            .inc();
        self.session_wait_seconds
            .get_or_create(&ProtocolLabels { protocol })
            .observe(seconds);
    }

    /// A message of `identity` was held back by `messages_per_minute`.
    pub fn message_delayed(&self, identity: &str, protocol: Protocol) {
        self.message_delays
            .get_or_create(&IdentityProtocolLabels {
                identity: IdentityLabel::new(identity),
                protocol,
            })
            .inc();
    }

    /// Counts one EWS request of `identity` (a configured identity) by its
    /// SOAP operation. A series appears with its first request.
    pub fn ews_operation(&self, identity: &str, operation: crate::proxy::http::ews_ops::Operation) {
        let counters = {
            let mut map = self
                .ews_by_identity
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            match map.get(identity) {
                Some(c) => c.clone(),
                None => {
                    let c = Arc::new(EwsCounters(std::array::from_fn(|_| OnceLock::new())));
                    map.insert(identity.to_owned(), c.clone());
                    c
                }
            }
        };
        counters.0[operation as usize]
            .get_or_init(|| {
                self.ews_operations
                    .get_or_create(&EwsLabels {
                        identity: IdentityLabel::new(identity),
                        operation,
                    })
                    .clone()
            })
            .inc();
    }

    /// The EWS operations `identity` used, with their counts (most used
    /// first; operations never used are left out).
    pub fn ews_operations(&self, identity: &str) -> Vec<(&'static str, u64)> {
        let counters = self
            .ews_by_identity
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(identity)
            .cloned();
        let Some(counters) = counters else {
            return Vec::new();
        };
        let mut used: Vec<(&'static str, u64)> = crate::proxy::http::ews_ops::Operation::ALL
            .iter()
            .zip(counters.0.iter())
            .filter_map(|(op, c)| Some((op.name(), c.get()?.get())))
            .filter(|(_, n)| *n > 0)
            .collect();
        used.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
        used
    }

    /// Counts one notification delivery attempt.
    pub fn notification(&self, channel: NotifyChannel, result: NotifyResult) {
        self.notifications
            .get_or_create(&NotifyLabels { channel, result })
            .inc();
    }

    /// Renders OpenMetrics text.
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(8192);
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }

    /// Renders the Prometheus text format 0.0.4 (for scrapers and tools
    /// that do not ask for OpenMetrics, e.g. `promtool check metrics`).
    pub fn encode_prometheus(&self) -> String {
        openmetrics_to_prometheus(&self.encode())
    }

    /// Value of `credential_checks_total{result}` (for tests and benchmarks).
    pub fn credential_check_count(&self, result: CredentialCheck) -> u64 {
        self.credential_checks
            .get_or_create(&CheckLabels { result })
            .get()
    }
}

/// Content type of the Prometheus text format 0.0.4.
pub const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Converts prometheus-client's OpenMetrics text to the Prometheus text
/// format 0.0.4: counters' `HELP`/`TYPE` name the `_total` series, types
/// without a 0.0.4 equivalent become `untyped`, and `# UNIT` and `# EOF`
/// are dropped (0.0.4 has neither). No family here records exemplars;
/// sample lines are the same in both formats.
fn openmetrics_to_prometheus(om: &str) -> String {
    let mut out = String::with_capacity(om.len());
    let mut help: Option<&str> = None;
    for line in om.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            help = Some(rest);
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, "unknown"));
            let (name, kind) = match kind {
                "counter" => (format!("{name}_total"), "counter"),
                "gauge" | "histogram" | "summary" => (name.to_owned(), kind),
                _ => (name.to_owned(), "untyped"),
            };
            if let Some(h) = help.take() {
                let text = h.split_once(' ').map(|(_, t)| t).unwrap_or("");
                out.push_str(&format!("# HELP {name} {text}\n"));
            }
            out.push_str(&format!("# TYPE {name} {kind}\n"));
            continue;
        }
        if line.starts_with('#') {
            // `# UNIT`, `# EOF`.
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// One identity's `ews_operations_total` counters, by operation.
struct EwsCounters([OnceLock<Counter>; crate::proxy::http::ews_ops::Operation::ALL.len()]);

/// Decrements the open-connections gauge when dropped.
#[derive(Debug)]
pub struct ConnectionGuard(Gauge);

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_conventions_and_series_can_be_forgotten() {
        let m = Metrics::new();
        m.auth_failure(Some("alice"), Protocol::http, FailureReason::bad_password);
        m.auth_failure(None, Protocol::http, FailureReason::unknown_identity);
        m.refresh("alice", RefreshResult::success);
        m.set_reauth_required("alice", false);
        m.upstream_duration(Protocol::http, 0.01);
        let text = m.encode();
        assert!(text.contains(
            "authswap_auth_failures_total{identity=\"alice\",protocol=\"http\",reason=\"bad_password\"} 1"
        ), "{text}");
        assert!(text.contains("identity=\"_unknown\""));
        assert!(text.contains("authswap_upstream_request_duration_seconds_bucket"));
        assert!(text
            .contains("authswap_token_refreshes_total{identity=\"alice\",result=\"success\"} 1"));
        m.auth_failure(Some("alice"), Protocol::smtp, FailureReason::token_rejected);
        let _guard = m.mail_session("alice", Protocol::smtp);
        m.ews_operation("alice", crate::proxy::http::ews_ops::Operation::GetItem);
        assert!(m
            .encode()
            .contains("authswap_ews_operations_total{identity=\"alice\",operation=\"GetItem\"} 1"));
        assert_eq!(m.ews_operations("alice"), vec![("GetItem", 1)]);
        assert_eq!(
            m.failure_counts("alice"),
            vec![(Protocol::http, 1), (Protocol::smtp, 1)]
        );
        m.forget_identity("alice");
        assert!(!m.encode().contains("\"alice\""));
        assert!(m.failure_counts("alice").is_empty());
        assert!(m.ews_operations("alice").is_empty());
    }

    #[test]
    fn prometheus_text_names_every_family_and_token_expiry_has_its_front_end() {
        let m = Metrics::new();
        m.front_end(Protocol::http, &["a b", "c/.default"]);
        m.front_end(Protocol::imap, &["a b", "d/.default"]);
        m.set_identity_info("alice", "default", "delegated");
        m.set_token_expiry("alice", "a b", 1234);
        m.set_token_expiry("alice", "not served", 99);
        m.request(Protocol::http, Outcome::forwarded);
        let text = m.encode_prometheus();
        assert!(
            !text.contains("# EOF") && !text.contains("# UNIT"),
            "{text}"
        );
        assert!(text.contains("# HELP authswap_requests_total Client requests"));
        assert!(text.contains("# TYPE authswap_requests_total counter\n"));
        assert!(text.contains("# TYPE authswap_upstream_request_duration_seconds histogram\n"));
        assert!(text.contains(
            "authswap_requests_total{protocol=\"http\",outcome=\"upstream_refused\"} 0\n"
        ));
        assert!(text.contains(
            "authswap_token_refreshes_total{identity=\"alice\",result=\"transient_error\"} 0\n"
        ));
        // One token per scope set, shown under each front end using it.
        for p in ["http", "imap"] {
            assert!(text.contains(&format!(
                "authswap_access_token_expiry_timestamp_seconds{{identity=\"alice\",protocol=\"{p}\"}} 1234\n"
            )), "{text}");
        }
        assert!(!text.contains(" 99\n"));
        // Every sample's family has HELP and TYPE right before its samples.
        let mut family = String::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                family = rest.split(' ').next().unwrap().to_owned();
            } else if !line.starts_with('#') {
                let name = line.split(['{', ' ']).next().unwrap();
                let base = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|s| name.strip_suffix(s))
                    .filter(|b| *b == family)
                    .unwrap_or(name);
                assert_eq!(base, family, "{line}");
                assert!(text.contains(&format!("# HELP {family} ")), "{family}");
            }
        }
        m.forget_identity("alice");
        assert!(!m.encode_prometheus().contains("alice"));
    }

    #[test]
    fn identity_label_values_are_escaped() {
        let m = Metrics::new();
        let odd = "a\"b\\c\nd{e}";
        m.set_reauth_required(odd, true);
        m.auth_failure(Some(odd), Protocol::smtp, FailureReason::bad_password);
        let text = m.encode();
        assert!(
            text.contains("authswap_identity_reauth_required{identity=\"a\\\"b\\\\c\\nd{e}\"} 1\n"),
            "{text}"
        );
        m.forget_identity(odd);
        assert!(!m.encode().contains("d{e}"));
    }
}
