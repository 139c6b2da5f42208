//! Persistent identity store: the [`Store`] trait that the rest of authswap
//! uses, its record types, the embedded SQLite implementation, the shared
//! PostgreSQL one, [`open`] choosing between them, and the sealing of
//! refresh tokens.

pub mod health;
pub mod migrate;
pub mod postgres;
pub mod seal;
pub mod sqlite;

pub use health::StoreHealth;
pub use postgres::{PgSettings, PostgresStore};
pub use seal::{open_sealer, KeyError, KeyUse, SealError, SealedToken, Sealer};
pub use sqlite::SqliteStore;

use std::fmt;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

/// Link state of an identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Created, never linked to a Microsoft account.
    Pending,
    /// Holds a refresh token that worked last time.
    Linked,
    /// The identity platform refused the refresh token; a person must sign in again.
    NeedsReauth,
    /// Linked, but the upstream refuses access for a reason no token cures
    /// (SMTP AUTH or EWS switched off for the tenant, app or mailbox), or
    /// keeps refusing freshly issued tokens; `last_error` has its words.
    /// Cleared by the next success upstream.
    UpstreamRefused,
}

impl Status {
    /// Every status.
    pub const ALL: [Status; 4] = [
        Status::Pending,
        Status::Linked,
        Status::NeedsReauth,
        Status::UpstreamRefused,
    ];

    /// Database and display form.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Pending => "pending",
            Status::Linked => "linked",
            Status::NeedsReauth => "needs_reauth",
            Status::UpstreamRefused => "upstream_refused",
        }
    }

    /// Parses the database form.
    pub fn parse(s: &str) -> Option<Status> {
        match s {
            "pending" => Some(Status::Pending),
            "linked" => Some(Status::Linked),
            "needs_reauth" => Some(Status::NeedsReauth),
            "upstream_refused" => Some(Status::UpstreamRefused),
            _ => None,
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How an identity gets its access tokens.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// A person consents once; their refresh token is stored (delegated
    /// permissions such as `SMTP.Send`).
    #[default]
    Delegated,
    /// The tenant's app credential gets client-credentials tokens for the
    /// identity's mailbox (application permissions such as
    /// `SMTP.SendAsApp`); no person signs in, nothing is stored.
    App,
}

impl Mode {
    /// Database and display form.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Delegated => "delegated",
            Mode::App => "app",
        }
    }

    /// Parses the database and command-line form.
    pub fn parse(s: &str) -> Option<Mode> {
        match s.trim() {
            "delegated" => Some(Mode::Delegated),
            "app" => Some(Mode::App),
            _ => None,
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The shown status of identities whose tenant's app credential is refused.
pub const APP_CREDENTIAL_STATUS: &str = "app_credential";

/// The tenant of identities created without one: `[identity_provider]`.
pub const DEFAULT_TENANT: &str = "default";

/// An identity to create.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewIdentity {
    /// Name the legacy client logs in with.
    pub name: String,
    /// Upstream mailbox (UPN or SMTP address).
    pub mailbox: String,
    /// argon2id PHC string of the local password.
    pub password_hash: String,
    /// Configured tenant name.
    pub tenant: String,
    /// Delegated or app-only.
    pub mode: Mode,
}

impl NewIdentity {
    /// A delegated identity of the default tenant.
    pub fn delegated(name: &str, mailbox: &str, password_hash: &str) -> NewIdentity {
        NewIdentity {
            name: name.to_owned(),
            mailbox: mailbox.to_owned(),
            password_hash: password_hash.to_owned(),
            tenant: DEFAULT_TENANT.to_owned(),
            mode: Mode::Delegated,
        }
    }
}

/// One identity as stored (without its refresh token).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityRecord {
    /// Row id; never reused, bound into the sealed token.
    pub id: i64,
    /// Name as entered by the admin (clients match it case-insensitively).
    pub name: String,
    /// Upstream mailbox (UPN).
    pub mailbox: String,
    /// argon2id PHC string of the local password.
    pub password_hash: String,
    /// Link state.
    pub status: Status,
    /// Last error text from the identity platform, if the last attempt failed.
    pub last_error: Option<String>,
    /// Unix seconds of the last successful token refresh.
    pub last_success_at: Option<i64>,
    /// Unix seconds of the last failed token refresh.
    pub last_failure_at: Option<i64>,
    /// Unix seconds of creation.
    pub created_at: i64,
    /// Whether a refresh token is stored.
    pub has_refresh_token: bool,
    /// Incremented each time a person links the identity (login, import).
    pub token_generation: i64,
    /// The Microsoft account that signed in to link it (browser sign-in).
    pub account: Option<LinkedAccount>,
    /// Unix seconds of the last time a person linked it.
    pub linked_at: Option<i64>,
    /// Configured tenant name.
    pub tenant: String,
    /// Delegated or app-only.
    pub mode: Mode,
    /// Why the tenant's app credential is refused, while it is: every
    /// identity of the tenant is blocked by it, not by its own link.
    pub tenant_block: Option<String>,
}

impl IdentityRecord {
    /// The status shown to people: `app_credential` while the tenant's app
    /// credential is refused (an admin must renew it; nobody needs to sign
    /// in again), else the identity's own.
    pub fn shown_status(&self) -> &'static str {
        if self.tenant_block.is_some() {
            APP_CREDENTIAL_STATUS
        } else {
            self.status.as_str()
        }
    }

    /// The error shown with [`IdentityRecord::shown_status`].
    pub fn shown_error(&self) -> Option<&str> {
        self.tenant_block.as_deref().or(self.last_error.as_deref())
    }

    /// Linked, and the last refresh (if any) did not fail after the last
    /// success: what `identity list --status ok`, the API and the console
    /// call "ok"; everything else needs attention.
    pub fn is_ok(&self) -> bool {
        self.status == Status::Linked
            && self.tenant_block.is_none()
            && match (self.last_failure_at, self.last_success_at) {
                (Some(f), Some(s)) => s >= f,
                (Some(_), None) => false,
                _ => true,
            }
    }
}

/// The Microsoft account behind a link, read from the ID token.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize)]
pub struct LinkedAccount {
    /// `preferred_username` (or `upn`) of the account that signed in.
    pub upn: String,
    /// Object id of the account (`oid`).
    pub oid: String,
    /// Tenant id (`tid`).
    pub tid: String,
}

/// Life cycle of an invitation. `Expired` is never stored: a pending
/// invitation past its expiry reads as expired.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum InvitationState {
    /// Waiting for the user.
    Pending,
    /// The user signed in and the identity was linked with it.
    Completed,
    /// Past its expiry, unused.
    Expired,
    /// Revoked by an admin or replaced by a newer invitation.
    Revoked,
}

impl InvitationState {
    /// Display form.
    pub fn as_str(self) -> &'static str {
        match self {
            InvitationState::Pending => "pending",
            InvitationState::Completed => "completed",
            InvitationState::Expired => "expired",
            InvitationState::Revoked => "revoked",
        }
    }
}

impl fmt::Display for InvitationState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One invitation as stored (hashes only, never the link token or code).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct InvitationRecord {
    /// Row id.
    pub id: i64,
    /// Id of the invited identity.
    pub identity_id: i64,
    /// Name of the invited identity.
    pub identity: String,
    /// Its mailbox.
    pub mailbox: String,
    /// Its tenant (whose app registration signs the person in).
    pub tenant: String,
    /// State (expiry applied at read time).
    pub state: InvitationState,
    /// Unix seconds.
    pub created_at: i64,
    /// Unix seconds.
    pub expires_at: i64,
    /// When it was completed or revoked.
    pub finished_at: Option<i64>,
    /// Who created it.
    pub actor: String,
}

/// A new invitation: hashes of its link token and code.
#[derive(Debug, Clone)]
pub struct NewInvitation {
    /// The invited identity.
    pub identity_id: i64,
    /// SHA-256 of the link token.
    pub token_hash: Vec<u8>,
    /// SHA-256 of the normalised short code.
    pub code_hash: Vec<u8>,
    /// Unix seconds.
    pub created_at: i64,
    /// Unix seconds.
    pub expires_at: i64,
    /// Who creates it (`cli`, `admin`, `notifier`).
    pub actor: String,
}

/// A browser sign-in in progress (authorization code + PKCE).
#[derive(Clone, PartialEq, Eq)]
pub struct Signin {
    /// SHA-256 of the OAuth `state`.
    pub state_hash: Vec<u8>,
    /// The invitation it completes.
    pub invitation_id: i64,
    /// PKCE code verifier.
    pub verifier: crate::secret::Secret,
    /// OpenID Connect nonce expected in the ID token.
    pub nonce: String,
    /// Unix seconds.
    pub expires_at: i64,
}

impl fmt::Debug for Signin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Signin")
            .field("invitation_id", &self.invitation_id)
            .field("expires_at", &self.expires_at)
            .finish_non_exhaustive()
    }
}

/// Outcome of completing an invitation with a signed-in account.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Completion {
    /// Linked: the token is durably stored and the invitation completed.
    Linked,
    /// The invitation is no longer pending (used, revoked or expired).
    NotPending(InvitationState),
}

/// Result of proving one protocol end to end for an identity.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ValidationRecord {
    /// `ews`/`http`, `smtp`, `imap`, `pop3`.
    pub protocol: String,
    /// Unix seconds.
    pub at: i64,
    /// Whether the upstream accepted it.
    pub ok: bool,
    /// The upstream's own answer (or what failed before it).
    pub answer: String,
    /// What it means, in plain words.
    pub meaning: String,
}

/// An audit log entry to write. Never put a secret in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewAudit<'a> {
    /// `cli`, `admin`, `api`, `user` (the invited person), `system`.
    pub actor: &'a str,
    /// Dotted action name (`invitation.create`, `identity.forget`, ...).
    pub action: &'a str,
    /// Identity name concerned, if any.
    pub identity: Option<&'a str>,
    /// `ok`, `refused`, `failed`, or a state name.
    pub outcome: &'a str,
    /// Plain-words detail.
    pub detail: Option<&'a str>,
}

/// An audit log entry as stored.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct AuditEntry {
    /// Row id (increasing).
    pub id: i64,
    /// Unix seconds.
    pub at: i64,
    /// Who.
    pub actor: String,
    /// What.
    pub action: String,
    /// Which identity.
    pub identity: Option<String>,
    /// How it ended.
    pub outcome: String,
    /// Plain-words detail.
    pub detail: Option<String>,
}

/// Which key sealed one identity's stored refresh token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenKey {
    /// The identity's name.
    pub name: String,
    /// Id of the key recorded with the sealed token (empty when none was).
    pub key_id: String,
}

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// No identity with that name.
    #[error("no identity named `{0}`")]
    NotFound(String),
    /// The name is taken (names are case-insensitive).
    #[error("an identity named `{0}` already exists")]
    AlreadyExists(String),
    /// The database failed.
    #[error("store: {0}")]
    Database(#[from] sqlx::Error),
    /// A batched write failed (the message of the database error).
    #[error("store: {0}")]
    Batch(String),
    /// Migrations failed.
    #[error("store migration: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// The database holds a migration this binary does not know: a newer
    /// authswap migrated it. Running on it could lose what it stores.
    #[error("the database schema is newer than this authswap (migration {0}); upgrade authswap")]
    SchemaTooNew(i64),
    /// `[store]` cannot be used (names the key; never quotes a password).
    #[error("{0}")]
    Config(String),
    /// A file system problem around the database.
    #[error("store {path}: {source}")]
    Io {
        /// The path involved.
        path: std::path::PathBuf,
        /// Underlying error.
        source: std::io::Error,
    },
}

impl crate::error::Failure for StoreError {
    fn origin(&self) -> crate::error::Origin {
        crate::error::Origin::Store
    }

    fn retryable(&self) -> bool {
        matches!(
            self,
            StoreError::Database(_) | StoreError::Batch(_) | StoreError::Io { .. }
        )
    }
}

/// Applies `migrator` to `pool`, refusing a database that holds a
/// migration this binary does not know (a newer authswap ran on it).
async fn migrate<'a, A>(migrator: &sqlx::migrate::Migrator, pool: A) -> Result<(), StoreError>
where
    A: sqlx::Acquire<'a>,
    <A::Connection as std::ops::Deref>::Target: sqlx::migrate::Migrate,
{
    match migrator.run(pool).await {
        Err(sqlx::migrate::MigrateError::VersionMissing(v)) => Err(StoreError::SchemaTooNew(v)),
        other => Ok(other?),
    }
}

/// Opens the configured store: PostgreSQL when `store.url` is set, else
/// the SQLite file at `store.path`; migrated either way. Every command
/// that touches identities opens it through here.
pub async fn open(config: &crate::config::Config) -> Result<Arc<dyn Store>, StoreError> {
    match postgres_settings(&config.store, &config.tls)? {
        Some(settings) => Ok(Arc::new(PostgresStore::open(&settings).await?)),
        None => Ok(Arc::new(SqliteStore::open(&config.store.path).await?)),
    }
}

/// The PostgreSQL connection settings of `[store]`, `None` when `url` is
/// unset: the URL's own options (`sslmode`, default `prefer` as libpq),
/// the password from `password`/`password_file` when the URL has none,
/// `[tls] extra_ca_file` as an extra root, the pool size and timeouts.
pub fn postgres_settings(
    store: &crate::config::StoreConfig,
    tls: &crate::config::TlsConfig,
) -> Result<Option<PgSettings>, StoreError> {
    let Some(url) = store.url.as_deref().filter(|u| !u.trim().is_empty()) else {
        return Ok(None);
    };
    let mut options: sqlx::postgres::PgConnectOptions =
        url.trim().parse().map_err(|e: sqlx::Error| {
            // sqlx's message may quote the URL; redact its userinfo.
            StoreError::Config(format!(
                "store.url: {}",
                crate::config::redact_userinfo(&e.to_string())
            ))
        })?;
    let url_has_password = url::Url::parse(url.trim())
        .map(|u| u.password().is_some())
        .unwrap_or(false);
    if !url_has_password {
        if let Some(password) = &store.password {
            options = options.password(password.expose());
        }
    }
    if let Some(ca) = &tls.extra_ca_file {
        options = options.ssl_root_cert(ca);
    }
    let timeout_ms = store.statement_timeout.as_millis().to_string();
    options = options
        .options([("statement_timeout", timeout_ms.as_str())])
        .application_name("authswap");
    Ok(Some(PgSettings {
        options,
        pool_size: store.pool_size,
        connect_timeout: store.connect_timeout,
    }))
}

/// The key identities are looked up by: the name trimmed, in Unicode NFC,
/// case-folded (see [`crate::names::lookup_key`]).
pub fn name_key(name: &str) -> String {
    crate::names::lookup_key(name)
}

/// Current time in Unix seconds.
pub fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// What authswap keeps about identities. Writes that a running server must
/// notice bump a revision that [`Store::revision`] returns.
#[async_trait::async_trait]
pub trait Store: Send + Sync + 'static {
    /// Every identity, ordered by name.
    async fn list(&self) -> Result<Vec<IdentityRecord>, StoreError>;
    /// One identity by (case-insensitive) name.
    async fn get(&self, name: &str) -> Result<Option<IdentityRecord>, StoreError>;
    /// Creates an identity: `pending` when delegated (a person must link
    /// it), `linked` when app-only (nothing to link).
    async fn create(&self, new: &NewIdentity) -> Result<IdentityRecord, StoreError>;
    /// Creates several identities in one transaction: all of them or, on
    /// any error, none.
    async fn create_many(
        &self,
        rows: &[NewIdentity],
        actor: &str,
    ) -> Result<Vec<IdentityRecord>, StoreError>;
    /// Records that tenant `tenant`'s app credential is refused (`Some`,
    /// with the reason in plain words) or works again (`None`); whether
    /// this changed anything.
    async fn set_tenant_block(
        &self,
        tenant: &str,
        reason: Option<&str>,
        at: i64,
    ) -> Result<bool, StoreError>;
    /// Tenants whose app credential is refused: (tenant, reason, since).
    async fn tenant_blocks(&self) -> Result<Vec<(String, String, i64)>, StoreError>;
    /// Replaces the local password hash.
    async fn set_password(&self, name: &str, password_hash: &str) -> Result<(), StoreError>;
    /// Deletes the identity with its token and personal data.
    async fn remove(&self, name: &str) -> Result<(), StoreError>;
    /// The sealed refresh token of identity `id`, if any, with the token
    /// generation it belongs to.
    async fn refresh_token(&self, id: i64) -> Result<Option<(SealedToken, i64)>, StoreError>;
    /// A person linked the identity (device code, import): store the token,
    /// mark it `linked`, clear the last error, bump the token generation.
    async fn link(&self, id: i64, token: &SealedToken) -> Result<(), StoreError>;
    /// Durably replaces the refresh token after rotation and records success.
    /// Returns only after the commit is on disk. Returns `false` (and changes
    /// nothing) when the identity was re-linked since `generation` was read.
    async fn rotate(
        &self,
        id: i64,
        generation: i64,
        token: &SealedToken,
        at: i64,
    ) -> Result<bool, StoreError>;
    /// Records a successful refresh that did not rotate the token.
    async fn record_success(&self, id: i64, at: i64) -> Result<(), StoreError>;
    /// Records a failed refresh; with `needs_reauth` the status changes too
    /// (and the revision is bumped).
    async fn record_failure(
        &self,
        id: i64,
        needs_reauth: bool,
        error: &str,
        at: i64,
    ) -> Result<(), StoreError>;
    /// Records that the upstream refuses identity `id` (`Some(words)`:
    /// status `upstream_refused` with those words, unless the identity
    /// needs re-authentication) or accepts it again (`None`: back to
    /// `linked` if it was `upstream_refused`). Token refreshes leave this
    /// state alone.
    async fn set_upstream_refusal(
        &self,
        id: i64,
        refusal: Option<&str>,
        at: i64,
    ) -> Result<(), StoreError>;
    /// A number that changes whenever identities change in a way a running
    /// server must pick up.
    async fn revision(&self) -> Result<i64, StoreError>;
    /// Links identity `id` with a browser sign-in's account and token:
    /// stores the token (durably), marks it `linked`, bumps the token
    /// generation and records the account. Like [`Store::link`].
    async fn link_account(
        &self,
        id: i64,
        token: &SealedToken,
        account: &LinkedAccount,
    ) -> Result<(), StoreError>;
    /// Creates an invitation, revoking the identity's older pending ones in
    /// the same transaction.
    async fn create_invitation(&self, new: &NewInvitation) -> Result<InvitationRecord, StoreError>;
    /// The invitation whose link token hashes to `token_hash`.
    async fn invitation_by_token(
        &self,
        token_hash: &[u8],
    ) -> Result<Option<InvitationRecord>, StoreError>;
    /// The invitation whose short code hashes to `code_hash`.
    async fn invitation_by_code(
        &self,
        code_hash: &[u8],
    ) -> Result<Option<InvitationRecord>, StoreError>;
    /// One invitation by id.
    async fn invitation(&self, id: i64) -> Result<Option<InvitationRecord>, StoreError>;
    /// Every invitation, newest first.
    async fn list_invitations(&self) -> Result<Vec<InvitationRecord>, StoreError>;
    /// Revokes the identity's pending invitations; returns how many.
    async fn revoke_invitations(&self, identity_id: i64, at: i64) -> Result<u64, StoreError>;
    /// In one durable transaction: checks the invitation is still pending
    /// and unexpired, stores the token and account on its identity (as
    /// [`Store::link_account`]) and marks the invitation completed.
    async fn complete_invitation(
        &self,
        invitation_id: i64,
        token: &SealedToken,
        account: &LinkedAccount,
        at: i64,
    ) -> Result<Completion, StoreError>;
    /// Records a browser sign-in in progress (and drops expired ones).
    async fn put_signin(&self, signin: &Signin) -> Result<(), StoreError>;
    /// Takes (deletes and returns) the sign-in with this state hash, if it
    /// exists and has not expired: each `state` works once.
    async fn take_signin(&self, state_hash: &[u8], now: i64) -> Result<Option<Signin>, StoreError>;
    /// Stores the result of validating one protocol (replacing the last).
    async fn record_validation(&self, id: i64, v: &ValidationRecord) -> Result<(), StoreError>;
    /// The last validation results of every identity, by identity id.
    async fn validations(&self) -> Result<Vec<(i64, ValidationRecord)>, StoreError>;
    /// Claims the right to notify identity `id` about `kind`: true (and
    /// records `now`) when nothing of that kind was sent since
    /// `now - min_interval_secs`.
    async fn claim_notification(
        &self,
        id: i64,
        kind: &str,
        now: i64,
        min_interval_secs: i64,
    ) -> Result<bool, StoreError>;
    /// Deletes the identity's registration data: refresh token, account,
    /// mailbox, last errors, validations, invitations, notification state
    /// and the details of its audit entries. The name and local password
    /// stay, status `pending`; the revision is bumped so cached access
    /// tokens are dropped.
    async fn forget(&self, name: &str) -> Result<(), StoreError>;
    /// Sets the mailbox of an identity (after `forget`, or a correction).
    async fn set_mailbox(&self, name: &str, mailbox: &str) -> Result<(), StoreError>;
    /// Appends to the audit log.
    async fn audit(&self, entry: &NewAudit<'_>) -> Result<(), StoreError>;
    /// Audit entries, newest first: at most `limit`, with id below `before`
    /// when given, for one identity when given.
    async fn audit_log(
        &self,
        identity: Option<&str>,
        before: Option<i64>,
        limit: i64,
    ) -> Result<Vec<AuditEntry>, StoreError>;
    /// Records a one-time admin console sign-in link by the SHA-256 of its
    /// nonce, valid until `expires_at` (and drops expired ones).
    async fn put_admin_link(&self, nonce_hash: &[u8], expires_at: i64) -> Result<(), StoreError>;
    /// Takes (deletes) the admin sign-in link with this nonce hash: true
    /// when it existed and had not expired at `now`. Each link works once.
    async fn take_admin_link(&self, nonce_hash: &[u8], now: i64) -> Result<bool, StoreError>;
    /// For every identity with a stored refresh token, the id of the key
    /// that sealed it, ordered by name (read-only; checked against the
    /// configured key before it is used, see [`open_sealer`]).
    async fn token_keys(&self) -> Result<Vec<TokenKey>, StoreError>;
    /// Wake-ups when another process changed the store, where the store
    /// can push them (PostgreSQL `LISTEN`/`NOTIFY`); `None`: only the
    /// revision poll every `tokens.reload_interval` notices changes. A
    /// wake-up says only "reload": several changes may come as one.
    async fn changes(&self) -> Result<Option<Changes>, StoreError> {
        Ok(None)
    }
    /// How many refresh leases this store can hold at once (each holds a
    /// connection); `None`: no limit of its own.
    fn refresh_concurrency(&self) -> Option<usize> {
        None
    }
    /// Fleet-wide single flight: tries to take the exclusive right to
    /// refresh identity `id` among every process sharing the store, without
    /// waiting. A held lease is released by [`RefreshLease::commit`] or when
    /// dropped (and when the holder dies: PostgreSQL's advisory lock goes
    /// with its connection). [`Lease::Busy`]: another process holds it
    /// (the caller polls, holding no connection meanwhile). A holder that
    /// stays silent for longer than `max_hold` (a frozen process, a lost
    /// host whose connection never closes) loses the lease.
    /// [`Lease::NotNeeded`]: the store has no fleet to coordinate (SQLite:
    /// one process serves it; the engine's own flight suffices).
    async fn try_refresh_lease(
        &self,
        _id: i64,
        _max_hold: std::time::Duration,
    ) -> Result<Lease, StoreError> {
        Ok(Lease::NotNeeded)
    }
}

/// The outcome of [`Store::try_refresh_lease`].
pub enum Lease {
    /// No fleet to coordinate.
    NotNeeded,
    /// Held until committed or dropped.
    Held(Box<dyn RefreshLease>),
    /// Another process holds it now.
    Busy,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Lease::NotNeeded => "NotNeeded",
            Lease::Held(_) => "Held",
            Lease::Busy => "Busy",
        })
    }
}

/// What a refresh under a [`Store::try_refresh_lease`] stores before the lease
/// is released.
#[derive(Debug)]
pub struct LeaseCommit<'a> {
    /// The token generation the refresh started from.
    pub generation: i64,
    /// The rotated refresh token, when the platform sent one.
    pub rotated: Option<&'a SealedToken>,
    /// The scope set the access token is for.
    pub scopes: &'a str,
    /// The new access token, sealed.
    pub access: &'a SealedToken,
    /// When it expires (Unix seconds).
    pub expires_at: i64,
    /// Now (Unix seconds).
    pub at: i64,
}

/// A held refresh lease ([`Store::try_refresh_lease`]).
#[async_trait::async_trait]
pub trait RefreshLease: Send {
    /// The stored refresh token and its generation, read under the lease
    /// (another process may have rotated it a moment ago).
    async fn refresh_token(&mut self) -> Result<Option<(SealedToken, i64)>, StoreError>;
    /// The access token for `scopes` another process stored, with its
    /// expiry (Unix seconds).
    async fn access_token(
        &mut self,
        scopes: &str,
    ) -> Result<Option<(SealedToken, i64)>, StoreError>;
    /// Stores the rotated refresh token (compare-and-set on the
    /// generation: `Ok(false)` and nothing stored when the identity was
    /// re-linked meanwhile), the success and the access token, then
    /// releases the lease.
    async fn commit(self: Box<Self>, done: LeaseCommit<'_>) -> Result<bool, StoreError>;
}

/// See [`Store::changes`].
pub type Changes = tokio::sync::mpsc::Receiver<()>;
