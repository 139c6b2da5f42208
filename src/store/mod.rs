//! Persistent identity store: the [`Store`] trait that the rest of authswap
//! uses, its record types, the embedded SQLite implementation and the sealing
//! of refresh tokens.

pub mod seal;
pub mod sqlite;

pub use seal::{open_sealer, KeyError, KeyUse, SealError, SealedToken, Sealer};
pub use sqlite::SqliteStore;

use std::fmt;
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
    /// Creates a `pending` identity.
    async fn create(
        &self,
        name: &str,
        mailbox: &str,
        password_hash: &str,
    ) -> Result<IdentityRecord, StoreError>;
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
    /// For every identity with a stored refresh token, the id of the key
    /// that sealed it, ordered by name (read-only; checked against the
    /// configured key before it is used, see [`open_sealer`]).
    async fn token_keys(&self) -> Result<Vec<TokenKey>, StoreError>;
}
