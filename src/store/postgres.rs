//! The shared store: a PostgreSQL database that several authswap replicas
//! use at once, so every replica serves every identity.
//!
//! It behaves exactly like the embedded [`super::SqliteStore`] (same
//! schema, migrated side by side in `migrations/postgres/`, same sealed
//! token format, same revision bumps and audit rows written in the same
//! transaction as the change they record). Where SQLite relies on its
//! single writer, this store locks the rows it reads before changing them
//! (`SELECT … FOR UPDATE`), so two replicas acting on one identity at once
//! serialise instead of losing an update. Rotated refresh tokens are
//! committed one transaction each (PostgreSQL's own group commit batches
//! the WAL flushes); `rotate` is a compare-and-set on `token_generation`.
//!
//! Names are ordered with the `C` collation, as SQLite orders them, whatever
//! the database's default collation.
//!
//! Deleted rows (`remove`, `forget`) leave dead tuples until PostgreSQL
//! vacuums the table; the operator's vacuum and backup policies apply to
//! the tokens and personal data it holds.
//!
//! Not here yet (issue 14, later): the fleet-wide refresh lease and
//! `LISTEN`/`NOTIFY`; replicas see each other's changes through
//! [`Store::revision`].

use super::{
    name_key, now_unix, AuditEntry, Completion, IdentityRecord, InvitationRecord, InvitationState,
    LinkedAccount, Mode, NewAudit, NewIdentity, NewInvitation, SealedToken, Signin, Status, Store,
    StoreError, ValidationRecord,
};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions, PgRow};
use sqlx::{PgConnection, Postgres, Row};
use std::time::Duration;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

const COLUMNS: &str = "id, name, mailbox, password_hash, status, last_error, last_success_at, \
     last_failure_at, created_at, refresh_token IS NOT NULL AS has_token, token_generation, \
     upstream_refusal, account_upn, account_oid, account_tid, linked_at, tenant, mode, \
     (SELECT reason FROM tenant_blocks b WHERE b.tenant = identities.tenant) AS tenant_block";

const INVITATION_COLUMNS: &str = "i.id, i.identity_id, d.name, d.mailbox, d.tenant, i.state, \
     i.created_at, i.expires_at, i.finished_at, i.actor";

/// How to reach the database and how many connections to keep.
#[derive(Clone)]
pub struct PgSettings {
    /// Parsed from `store.url`, with the password, the extra CA and the
    /// statement timeout applied.
    pub options: PgConnectOptions,
    /// Most connections in the pool.
    pub pool_size: u32,
    /// How long to wait for a connection (connecting included).
    pub connect_timeout: Duration,
}

impl std::fmt::Debug for PgSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // PgConnectOptions' own Debug prints the password.
        f.debug_struct("PgSettings")
            .field("host", &self.options.get_host())
            .field("port", &self.options.get_port())
            .field("database", &self.options.get_database())
            .field("pool_size", &self.pool_size)
            .finish_non_exhaustive()
    }
}

/// PostgreSQL-backed [`Store`].
#[derive(Clone)]
pub struct PostgresStore {
    pool: PgPool,
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresStore").finish_non_exhaustive()
    }
}

type Tx = sqlx::Transaction<'static, Postgres>;

impl PostgresStore {
    /// The connection pool (for `store migrate`).
    pub(crate) fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Connects and migrates the database (refusing one whose schema is
    /// newer than this authswap).
    pub async fn open(settings: &PgSettings) -> Result<PostgresStore, StoreError> {
        let pool = PgPoolOptions::new()
            .max_connections(settings.pool_size.max(1))
            .min_connections(0)
            .acquire_timeout(settings.connect_timeout)
            .connect_with(settings.options.clone())
            .await?;
        super::migrate(&MIGRATOR, &pool).await?;
        Ok(PostgresStore { pool })
    }

    async fn begin(&self) -> Result<Tx, StoreError> {
        Ok(self.pool.begin().await?)
    }

    async fn invitation_where(
        &self,
        condition: &str,
        hash: &[u8],
    ) -> Result<Option<InvitationRecord>, StoreError> {
        let row = sqlx::query(&format!(
            "SELECT {INVITATION_COLUMNS} FROM invitations i JOIN identities d \
             ON d.id = i.identity_id WHERE {condition}"
        ))
        .bind(hash)
        .fetch_optional(&self.pool)
        .await?;
        let now = now_unix();
        row.as_ref().map(|r| invitation_record(r, now)).transpose()
    }
}

fn record(row: &PgRow) -> Result<IdentityRecord, StoreError> {
    let status: String = row.try_get("status")?;
    let mut status = Status::parse(&status).unwrap_or(Status::Pending);
    let mut last_error: Option<String> = row.try_get("last_error")?;
    let refusal: Option<String> = row.try_get("upstream_refusal")?;
    if let (Status::Linked, Some(refusal)) = (status, refusal) {
        status = Status::UpstreamRefused;
        last_error = Some(refusal);
    }
    Ok(IdentityRecord {
        id: row.try_get("id")?,
        name: row.try_get("name")?,
        mailbox: row.try_get("mailbox")?,
        password_hash: row.try_get("password_hash")?,
        status,
        last_error,
        last_success_at: row.try_get("last_success_at")?,
        last_failure_at: row.try_get("last_failure_at")?,
        created_at: row.try_get("created_at")?,
        has_refresh_token: row.try_get("has_token")?,
        token_generation: row.try_get("token_generation")?,
        account: match row.try_get::<Option<String>, _>("account_upn")? {
            Some(upn) => Some(LinkedAccount {
                upn,
                oid: row
                    .try_get::<Option<String>, _>("account_oid")?
                    .unwrap_or_default(),
                tid: row
                    .try_get::<Option<String>, _>("account_tid")?
                    .unwrap_or_default(),
            }),
            None => None,
        },
        linked_at: row.try_get("linked_at")?,
        tenant: row.try_get("tenant")?,
        mode: Mode::parse(&row.try_get::<String, _>("mode")?).unwrap_or_default(),
        tenant_block: row.try_get("tenant_block")?,
    })
}

fn invitation_record(row: &PgRow, now: i64) -> Result<InvitationRecord, StoreError> {
    let state: String = row.try_get("state")?;
    let expires_at: i64 = row.try_get("expires_at")?;
    let state = match state.as_str() {
        "completed" => InvitationState::Completed,
        "revoked" => InvitationState::Revoked,
        _ if expires_at <= now => InvitationState::Expired,
        _ => InvitationState::Pending,
    };
    Ok(InvitationRecord {
        id: row.try_get("id")?,
        identity_id: row.try_get("identity_id")?,
        identity: row.try_get("name")?,
        mailbox: row.try_get("mailbox")?,
        tenant: row.try_get("tenant")?,
        state,
        created_at: row.try_get("created_at")?,
        expires_at,
        finished_at: row.try_get("finished_at")?,
        actor: row.try_get("actor")?,
    })
}

/// Inserts an identity inside `tx` (`pending` when delegated, `linked`
/// when app-only) and returns it as stored.
async fn insert_identity(
    tx: &mut PgConnection,
    new: &NewIdentity,
    now: i64,
) -> Result<IdentityRecord, StoreError> {
    let name = new.name.as_str();
    let status = match new.mode {
        Mode::Delegated => Status::Pending,
        Mode::App => Status::Linked,
    };
    let res = sqlx::query(
        "INSERT INTO identities (name, name_key, mailbox, password_hash, status, tenant, mode, \
         created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
    )
    .bind(name.trim())
    .bind(name_key(name))
    .bind(new.mailbox.trim())
    .bind(&new.password_hash)
    .bind(status.as_str())
    .bind(new.tenant.trim())
    .bind(new.mode.as_str())
    .bind(now)
    .bind(now)
    .execute(&mut *tx)
    .await;
    match res {
        Err(sqlx::Error::Database(e)) if e.is_unique_violation() => {
            return Err(StoreError::AlreadyExists(name.trim().to_owned()))
        }
        other => other?,
    };
    let row = sqlx::query(&format!(
        "SELECT {COLUMNS} FROM identities WHERE name_key = $1"
    ))
    .bind(name_key(name))
    .fetch_one(&mut *tx)
    .await?;
    record(&row)
}

/// Writes an audit entry inside `tx`.
async fn audit_in(tx: &mut PgConnection, e: &NewAudit<'_>, at: i64) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO audit_log (at, actor, action, identity, outcome, detail) \
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(at)
    .bind(e.actor)
    .bind(e.action)
    .bind(e.identity)
    .bind(e.outcome)
    .bind(e.detail)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// Audits a status change of identity `id` made by the token engine.
async fn audit_status(
    tx: &mut PgConnection,
    id: i64,
    action: &str,
    outcome: &str,
    detail: Option<&str>,
    at: i64,
) -> Result<(), StoreError> {
    let name: Option<String> = sqlx::query_scalar("SELECT name FROM identities WHERE id = $1")
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?;
    let entry = NewAudit {
        actor: "system",
        action,
        identity: name.as_deref(),
        outcome,
        detail,
    };
    audit_in(tx, &entry, at).await
}

/// Stores a token on identity `id` as a person's new link.
async fn link_in(
    tx: &mut PgConnection,
    id: i64,
    token: &SealedToken,
    account: Option<&LinkedAccount>,
    now: i64,
) -> Result<(), StoreError> {
    let n = sqlx::query(
        "UPDATE identities SET refresh_token = $1, key_id = $2, status = 'linked', \
         last_error = NULL, upstream_refusal = NULL, upstream_refused_at = NULL, \
         token_generation = token_generation + 1, last_success_at = $3, linked_at = $4, \
         account_upn = COALESCE($5, account_upn), account_oid = COALESCE($6, account_oid), \
         account_tid = COALESCE($7, account_tid), updated_at = $8 WHERE id = $9",
    )
    .bind(&token.blob)
    .bind(&token.key_id)
    .bind(now)
    .bind(now)
    .bind(account.map(|a| a.upn.as_str()))
    .bind(account.map(|a| a.oid.as_str()))
    .bind(account.map(|a| a.tid.as_str()))
    .bind(now)
    .bind(id)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if n == 0 {
        return Err(StoreError::NotFound(format!("#{id}")));
    }
    // Access tokens of the previous link are not this one's.
    sqlx::query("DELETE FROM access_tokens WHERE identity_id = $1")
        .bind(id)
        .execute(&mut *tx)
        .await?;
    audit_status(tx, id, "identity.linked", "linked", None, now).await
}

/// The channel every replica `LISTEN`s on ([`Store::changes`]).
const CHANGES_CHANNEL: &str = "authswap_changes";

async fn bump(tx: &mut PgConnection) -> Result<(), StoreError> {
    sqlx::query("UPDATE meta SET v = v + 1 WHERE k = 'revision'")
        .execute(&mut *tx)
        .await?;
    // Delivered to the listeners when (and only if) the change commits.
    sqlx::query("SELECT pg_notify($1, '')")
        .bind(CHANGES_CHANNEL)
        .execute(&mut *tx)
        .await?;
    Ok(())
}

/// Forwards the notifications on [`CHANGES_CHANNEL`] to `wake` until its
/// receiver is gone, reconnecting with backoff when the connection is
/// lost (the revision poll covers what is missed meanwhile).
async fn forward_changes(pool: PgPool, wake: tokio::sync::mpsc::Sender<()>) {
    let mut delay = std::time::Duration::from_millis(250);
    loop {
        let listener = async {
            let mut l = sqlx::postgres::PgListener::connect_with(&pool).await?;
            l.listen(CHANGES_CHANNEL).await?;
            Ok::<_, sqlx::Error>(l)
        };
        let mut listener = tokio::select! {
            l = listener => l,
            _ = wake.closed() => return,
        };
        match &mut listener {
            Ok(l) => {
                delay = std::time::Duration::from_millis(250);
                // Whatever changed while no one listened.
                let _ = wake.try_send(());
                loop {
                    tokio::select! {
                        n = l.try_recv() => match n {
                            Ok(Some(_)) => {
                                let _ = wake.try_send(());
                            }
                            // The connection was lost (and is re-made).
                            Ok(None) => {
                                let _ = wake.try_send(());
                            }
                            Err(e) => {
                                tracing::warn!(error = %e, "lost the store's change notifications; reconnecting");
                                break;
                            }
                        },
                        _ = wake.closed() => return,
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?delay, "cannot listen for the store's change notifications");
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = wake.closed() => return,
        }
        delay = (delay * 2).min(std::time::Duration::from_secs(30));
    }
}

/// A refresh lease: a transaction holding `pg_advisory_xact_lock(id)`.
struct PgLease {
    tx: Tx,
    id: i64,
}

#[async_trait::async_trait]
impl super::RefreshLease for PgLease {
    async fn refresh_token(&mut self) -> Result<Option<(SealedToken, i64)>, StoreError> {
        let row = sqlx::query(
            "SELECT refresh_token, key_id, token_generation FROM identities WHERE id = $1",
        )
        .bind(self.id)
        .fetch_optional(&mut *self.tx)
        .await?;
        let Some(row) = row else { return Ok(None) };
        let blob: Option<Vec<u8>> = row.try_get("refresh_token")?;
        let key_id: Option<String> = row.try_get("key_id")?;
        let generation: i64 = row.try_get("token_generation")?;
        Ok(blob.map(|blob| {
            (
                SealedToken {
                    key_id: key_id.unwrap_or_default(),
                    blob,
                },
                generation,
            )
        }))
    }

    async fn access_token(
        &mut self,
        scopes: &str,
    ) -> Result<Option<(SealedToken, i64)>, StoreError> {
        let row: Option<(Vec<u8>, String, i64)> = sqlx::query_as(
            "SELECT token, key_id, expires_at FROM access_tokens \
             WHERE identity_id = $1 AND scope_key = $2",
        )
        .bind(self.id)
        .bind(scopes)
        .fetch_optional(&mut *self.tx)
        .await?;
        Ok(row.map(|(blob, key_id, expires_at)| (SealedToken { key_id, blob }, expires_at)))
    }

    async fn commit(self: Box<Self>, done: super::LeaseCommit<'_>) -> Result<bool, StoreError> {
        let PgLease { mut tx, id } = *self;
        let row: Option<(String, i64)> = sqlx::query_as(
            "SELECT status, token_generation FROM identities WHERE id = $1 FOR UPDATE",
        )
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?;
        let Some((old, generation)) = row else {
            return Err(StoreError::NotFound(format!("#{id}")));
        };
        if generation != done.generation {
            return Ok(false);
        }
        if let Some(token) = done.rotated {
            sqlx::query("UPDATE identities SET refresh_token = $1, key_id = $2 WHERE id = $3")
                .bind(&token.blob)
                .bind(&token.key_id)
                .bind(id)
                .execute(&mut *tx)
                .await?;
        }
        sqlx::query(
            "UPDATE identities SET status = 'linked', last_error = NULL, last_success_at = $1, \
             updated_at = $2 WHERE id = $3",
        )
        .bind(done.at)
        .bind(done.at)
        .bind(id)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO access_tokens (identity_id, scope_key, token, key_id, expires_at) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (identity_id, scope_key) DO UPDATE \
             SET token = excluded.token, key_id = excluded.key_id, expires_at = excluded.expires_at",
        )
        .bind(id)
        .bind(done.scopes)
        .bind(&done.access.blob)
        .bind(&done.access.key_id)
        .bind(done.expires_at)
        .execute(&mut *tx)
        .await?;
        if old != "linked" {
            audit_status(&mut tx, id, "status.recovered", "linked", None, done.at).await?;
            bump(&mut tx).await?;
        }
        tx.commit().await?;
        Ok(true)
    }
}

#[async_trait::async_trait]
impl Store for PostgresStore {
    fn refresh_concurrency(&self) -> Option<usize> {
        // Two connections stay free for everything else (and for a
        // refresh's own failure records).
        let size = self.pool.options().get_max_connections() as usize;
        Some(size.saturating_sub(2).max(1))
    }

    async fn try_refresh_lease(
        &self,
        id: i64,
        max_hold: std::time::Duration,
    ) -> Result<super::Lease, StoreError> {
        let mut tx = self.begin().await?;
        // The holder's transaction is idle while the identity platform
        // answers. If it stays idle past `max_hold` (a frozen replica, or a
        // host gone without closing its connection, which TCP keepalive
        // would notice only after hours), the server ends the session and
        // the lock goes with it.
        let (_, held): (String, bool) = sqlx::query_as(
            "SELECT set_config('idle_in_transaction_session_timeout', $2, true), \
                    pg_try_advisory_xact_lock($1)",
        )
        .bind(id)
        .bind(max_hold.as_millis().max(1).to_string())
        .fetch_one(&mut *tx)
        .await?;
        if !held {
            tx.rollback().await?;
            return Ok(super::Lease::Busy);
        }
        Ok(super::Lease::Held(Box::new(PgLease { tx, id })))
    }

    async fn changes(&self) -> Result<Option<super::Changes>, StoreError> {
        let (wake, changes) = tokio::sync::mpsc::channel(1);
        tokio::spawn(forward_changes(self.pool.clone(), wake));
        Ok(Some(changes))
    }

    async fn list(&self) -> Result<Vec<IdentityRecord>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM identities ORDER BY name_key COLLATE \"C\""
        ))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(record).collect()
    }

    async fn get(&self, name: &str) -> Result<Option<IdentityRecord>, StoreError> {
        let row = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM identities WHERE name_key = $1"
        ))
        .bind(name_key(name))
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(record).transpose()
    }

    async fn create(&self, new: &NewIdentity) -> Result<IdentityRecord, StoreError> {
        let mut tx = self.begin().await?;
        let rec = insert_identity(&mut tx, new, now_unix()).await?;
        bump(&mut tx).await?;
        tx.commit().await?;
        Ok(rec)
    }

    async fn create_many(
        &self,
        rows: &[NewIdentity],
        actor: &str,
    ) -> Result<Vec<IdentityRecord>, StoreError> {
        let now = now_unix();
        let mut tx = self.begin().await?;
        let mut out = Vec::with_capacity(rows.len());
        for new in rows {
            out.push(insert_identity(&mut tx, new, now).await?);
            audit_in(
                &mut tx,
                &NewAudit {
                    actor,
                    action: "identity.create",
                    identity: Some(new.name.trim()),
                    outcome: "ok",
                    detail: Some("imported"),
                },
                now,
            )
            .await?;
        }
        bump(&mut tx).await?;
        tx.commit().await?;
        Ok(out)
    }

    async fn set_password(&self, name: &str, password_hash: &str) -> Result<(), StoreError> {
        let mut tx = self.begin().await?;
        let n = sqlx::query(
            "UPDATE identities SET password_hash = $1, updated_at = $2 WHERE name_key = $3",
        )
        .bind(password_hash)
        .bind(now_unix())
        .bind(name_key(name))
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if n == 0 {
            return Err(StoreError::NotFound(name.to_owned()));
        }
        bump(&mut tx).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn remove(&self, name: &str) -> Result<(), StoreError> {
        let mut tx = self.begin().await?;
        let n = sqlx::query("DELETE FROM identities WHERE name_key = $1")
            .bind(name_key(name))
            .execute(&mut *tx)
            .await?
            .rows_affected();
        if n == 0 {
            return Err(StoreError::NotFound(name.to_owned()));
        }
        bump(&mut tx).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn refresh_token(&self, id: i64) -> Result<Option<(SealedToken, i64)>, StoreError> {
        let row = sqlx::query(
            "SELECT refresh_token, key_id, token_generation FROM identities WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        let Some(row) = row else { return Ok(None) };
        let blob: Option<Vec<u8>> = row.try_get("refresh_token")?;
        let key_id: Option<String> = row.try_get("key_id")?;
        let generation: i64 = row.try_get("token_generation")?;
        Ok(blob.map(|blob| {
            (
                SealedToken {
                    key_id: key_id.unwrap_or_default(),
                    blob,
                },
                generation,
            )
        }))
    }

    async fn link(&self, id: i64, token: &SealedToken) -> Result<(), StoreError> {
        let now = now_unix();
        let mut tx = self.begin().await?;
        link_in(&mut tx, id, token, None, now).await?;
        bump(&mut tx).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn rotate(
        &self,
        id: i64,
        generation: i64,
        token: &SealedToken,
        at: i64,
    ) -> Result<bool, StoreError> {
        let mut tx = self.begin().await?;
        // The row lock makes the compare-and-set on the token generation
        // hold against another replica linking or rotating at once.
        let row: Option<(String, i64)> = sqlx::query_as(
            "SELECT status, token_generation FROM identities WHERE id = $1 FOR UPDATE",
        )
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?;
        let Some((old, current_generation)) = row else {
            return Err(StoreError::NotFound(format!("#{id}")));
        };
        if current_generation != generation {
            return Ok(false);
        }
        sqlx::query(
            "UPDATE identities SET refresh_token = $1, key_id = $2, status = 'linked', \
             last_error = NULL, last_success_at = $3, updated_at = $4 WHERE id = $5",
        )
        .bind(&token.blob)
        .bind(&token.key_id)
        .bind(at)
        .bind(at)
        .bind(id)
        .execute(&mut *tx)
        .await?;
        if old != "linked" {
            audit_status(&mut tx, id, "status.recovered", "linked", None, at).await?;
            bump(&mut tx).await?;
        }
        tx.commit().await?;
        Ok(true)
    }

    async fn record_success(&self, id: i64, at: i64) -> Result<(), StoreError> {
        let mut tx = self.begin().await?;
        let old: Option<String> =
            sqlx::query_scalar("SELECT status FROM identities WHERE id = $1 FOR UPDATE")
                .bind(id)
                .fetch_optional(&mut *tx)
                .await?;
        let Some(old) = old else {
            return Err(StoreError::NotFound(format!("#{id}")));
        };
        sqlx::query(
            "UPDATE identities SET status = 'linked', last_error = NULL, last_success_at = $1, \
             updated_at = $2 WHERE id = $3",
        )
        .bind(at)
        .bind(at)
        .bind(id)
        .execute(&mut *tx)
        .await?;
        if old != "linked" {
            audit_status(&mut tx, id, "status.recovered", "linked", None, at).await?;
            bump(&mut tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn set_upstream_refusal(
        &self,
        id: i64,
        refusal: Option<&str>,
        at: i64,
    ) -> Result<(), StoreError> {
        let mut tx = self.begin().await?;
        let n = match refusal {
            Some(text) => sqlx::query(
                "UPDATE identities SET upstream_refusal = $1, upstream_refused_at = $2, \
                 updated_at = $3 WHERE id = $4 AND upstream_refusal IS DISTINCT FROM $5",
            )
            .bind(text)
            .bind(at)
            .bind(at)
            .bind(id)
            .bind(text),
            None => sqlx::query(
                "UPDATE identities SET upstream_refusal = NULL, upstream_refused_at = NULL, \
                 last_success_at = $1, updated_at = $2 WHERE id = $3 AND upstream_refusal IS NOT NULL",
            )
            .bind(at)
            .bind(at)
            .bind(id),
        }
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if n > 0 {
            match refusal {
                Some(text) => {
                    audit_status(
                        &mut tx,
                        id,
                        "status.upstream_refused",
                        "upstream_refused",
                        Some(text),
                        at,
                    )
                    .await?
                }
                None => audit_status(&mut tx, id, "status.recovered", "linked", None, at).await?,
            }
            bump(&mut tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn set_tenant_block(
        &self,
        tenant: &str,
        reason: Option<&str>,
        at: i64,
    ) -> Result<bool, StoreError> {
        let mut tx = self.begin().await?;
        let n = match reason {
            Some(reason) => sqlx::query(
                "INSERT INTO tenant_blocks (tenant, reason, since) VALUES ($1, $2, $3) \
                 ON CONFLICT (tenant) DO UPDATE SET reason = excluded.reason \
                 WHERE tenant_blocks.reason IS DISTINCT FROM excluded.reason",
            )
            .bind(tenant)
            .bind(reason)
            .bind(at),
            None => sqlx::query("DELETE FROM tenant_blocks WHERE tenant = $1").bind(tenant),
        }
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if n > 0 {
            let entry = NewAudit {
                actor: "system",
                action: match reason {
                    Some(_) => "tenant.blocked",
                    None => "tenant.recovered",
                },
                identity: None,
                outcome: tenant,
                detail: reason,
            };
            audit_in(&mut tx, &entry, at).await?;
            bump(&mut tx).await?;
        }
        tx.commit().await?;
        Ok(n > 0)
    }

    async fn tenant_blocks(&self) -> Result<Vec<(String, String, i64)>, StoreError> {
        Ok(sqlx::query_as(
            "SELECT tenant, reason, since FROM tenant_blocks ORDER BY tenant COLLATE \"C\"",
        )
        .fetch_all(&self.pool)
        .await?)
    }

    async fn record_failure(
        &self,
        id: i64,
        needs_reauth: bool,
        error: &str,
        at: i64,
    ) -> Result<(), StoreError> {
        let mut tx = self.begin().await?;
        let was: Option<String> =
            sqlx::query_scalar("SELECT status FROM identities WHERE id = $1 FOR UPDATE")
                .bind(id)
                .fetch_optional(&mut *tx)
                .await?;
        let n = if needs_reauth {
            sqlx::query(
                "UPDATE identities SET status = 'needs_reauth', last_error = $1, \
                 last_failure_at = $2, updated_at = $3 WHERE id = $4",
            )
        } else {
            sqlx::query(
                "UPDATE identities SET last_error = $1, last_failure_at = $2, updated_at = $3 \
                 WHERE id = $4",
            )
        }
        .bind(error)
        .bind(at)
        .bind(at)
        .bind(id)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if n == 0 {
            return Err(StoreError::NotFound(format!("#{id}")));
        }
        if needs_reauth {
            if was.as_deref() != Some("needs_reauth") {
                audit_status(
                    &mut tx,
                    id,
                    "status.needs_reauth",
                    "needs_reauth",
                    Some(error),
                    at,
                )
                .await?;
            }
            bump(&mut tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn revision(&self) -> Result<i64, StoreError> {
        Ok(
            sqlx::query_scalar("SELECT v FROM meta WHERE k = 'revision'")
                .fetch_one(&self.pool)
                .await?,
        )
    }

    async fn link_account(
        &self,
        id: i64,
        token: &SealedToken,
        account: &LinkedAccount,
    ) -> Result<(), StoreError> {
        let now = now_unix();
        let mut tx = self.begin().await?;
        link_in(&mut tx, id, token, Some(account), now).await?;
        bump(&mut tx).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn create_invitation(&self, new: &NewInvitation) -> Result<InvitationRecord, StoreError> {
        let mut tx = self.begin().await?;
        // Two replicas inviting one identity at once: the second waits, then
        // revokes the first one's invitation.
        sqlx::query("SELECT id FROM identities WHERE id = $1 FOR UPDATE")
            .bind(new.identity_id)
            .fetch_optional(&mut *tx)
            .await?;
        sqlx::query(
            "UPDATE invitations SET state = 'revoked', finished_at = $1 \
             WHERE identity_id = $2 AND state = 'pending'",
        )
        .bind(new.created_at)
        .bind(new.identity_id)
        .execute(&mut *tx)
        .await?;
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO invitations (identity_id, token_hash, code_hash, state, created_at, \
             expires_at, actor) VALUES ($1, $2, $3, 'pending', $4, $5, $6) RETURNING id",
        )
        .bind(new.identity_id)
        .bind(&new.token_hash)
        .bind(&new.code_hash)
        .bind(new.created_at)
        .bind(new.expires_at)
        .bind(&new.actor)
        .fetch_one(&mut *tx)
        .await?;
        let row = sqlx::query(&format!(
            "SELECT {INVITATION_COLUMNS} FROM invitations i JOIN identities d \
             ON d.id = i.identity_id WHERE i.id = $1"
        ))
        .bind(id)
        .fetch_one(&mut *tx)
        .await?;
        let rec = invitation_record(&row, new.created_at)?;
        bump(&mut tx).await?;
        tx.commit().await?;
        Ok(rec)
    }

    async fn invitation_by_token(
        &self,
        token_hash: &[u8],
    ) -> Result<Option<InvitationRecord>, StoreError> {
        self.invitation_where("i.token_hash = $1", token_hash).await
    }

    async fn invitation_by_code(
        &self,
        code_hash: &[u8],
    ) -> Result<Option<InvitationRecord>, StoreError> {
        self.invitation_where("i.code_hash = $1", code_hash).await
    }

    async fn invitation(&self, id: i64) -> Result<Option<InvitationRecord>, StoreError> {
        let row = sqlx::query(&format!(
            "SELECT {INVITATION_COLUMNS} FROM invitations i JOIN identities d \
             ON d.id = i.identity_id WHERE i.id = $1"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        let now = now_unix();
        row.as_ref().map(|r| invitation_record(r, now)).transpose()
    }

    async fn list_invitations(&self) -> Result<Vec<InvitationRecord>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {INVITATION_COLUMNS} FROM invitations i JOIN identities d \
             ON d.id = i.identity_id ORDER BY i.id DESC"
        ))
        .fetch_all(&self.pool)
        .await?;
        let now = now_unix();
        rows.iter().map(|r| invitation_record(r, now)).collect()
    }

    async fn revoke_invitations(&self, identity_id: i64, at: i64) -> Result<u64, StoreError> {
        let mut tx = self.begin().await?;
        let n = sqlx::query(
            "UPDATE invitations SET state = 'revoked', finished_at = $1 \
             WHERE identity_id = $2 AND state = 'pending'",
        )
        .bind(at)
        .bind(identity_id)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        sqlx::query(
            "DELETE FROM signins WHERE invitation_id IN \
             (SELECT id FROM invitations WHERE identity_id = $1)",
        )
        .bind(identity_id)
        .execute(&mut *tx)
        .await?;
        if n > 0 {
            bump(&mut tx).await?;
        }
        tx.commit().await?;
        Ok(n)
    }

    async fn complete_invitation(
        &self,
        invitation_id: i64,
        token: &SealedToken,
        account: &LinkedAccount,
        at: i64,
    ) -> Result<Completion, StoreError> {
        let mut tx = self.begin().await?;
        // Locks in the order every writer takes them: the identity, then
        // its invitation (so a replica completing and another inviting or
        // revoking at once serialise instead of deadlocking).
        sqlx::query(
            "SELECT d.id FROM identities d JOIN invitations i ON d.id = i.identity_id \
             WHERE i.id = $1 FOR UPDATE OF d",
        )
        .bind(invitation_id)
        .fetch_optional(&mut *tx)
        .await?;
        let row = sqlx::query(&format!(
            "SELECT {INVITATION_COLUMNS} FROM invitations i JOIN identities d \
             ON d.id = i.identity_id WHERE i.id = $1 FOR UPDATE OF i"
        ))
        .bind(invitation_id)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else {
            return Ok(Completion::NotPending(InvitationState::Revoked));
        };
        let inv = invitation_record(&row, at)?;
        if inv.state != InvitationState::Pending {
            return Ok(Completion::NotPending(inv.state));
        }
        link_in(&mut tx, inv.identity_id, token, Some(account), at).await?;
        sqlx::query("UPDATE invitations SET state = 'completed', finished_at = $1 WHERE id = $2")
            .bind(at)
            .bind(invitation_id)
            .execute(&mut *tx)
            .await?;
        bump(&mut tx).await?;
        tx.commit().await?;
        Ok(Completion::Linked)
    }

    async fn put_signin(&self, signin: &Signin) -> Result<(), StoreError> {
        let mut tx = self.begin().await?;
        sqlx::query("DELETE FROM signins WHERE expires_at <= $1")
            .bind(now_unix())
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "INSERT INTO signins (state_hash, invitation_id, verifier, nonce, expires_at) \
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(&signin.state_hash)
        .bind(signin.invitation_id)
        .bind(signin.verifier.expose())
        .bind(&signin.nonce)
        .bind(signin.expires_at)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn take_signin(&self, state_hash: &[u8], now: i64) -> Result<Option<Signin>, StoreError> {
        let mut tx = self.begin().await?;
        let row = sqlx::query(
            "DELETE FROM signins WHERE state_hash = $1 \
             RETURNING invitation_id, verifier, nonce, expires_at",
        )
        .bind(state_hash)
        .fetch_optional(&mut *tx)
        .await?;
        tx.commit().await?;
        let Some(row) = row else { return Ok(None) };
        let expires_at: i64 = row.try_get("expires_at")?;
        if expires_at <= now {
            return Ok(None);
        }
        Ok(Some(Signin {
            state_hash: state_hash.to_vec(),
            invitation_id: row.try_get("invitation_id")?,
            verifier: crate::secret::Secret::new(row.try_get::<String, _>("verifier")?),
            nonce: row.try_get("nonce")?,
            expires_at,
        }))
    }

    async fn record_validation(&self, id: i64, v: &ValidationRecord) -> Result<(), StoreError> {
        let mut tx = self.begin().await?;
        sqlx::query(
            "INSERT INTO validations (identity_id, protocol, at, ok, answer, meaning) \
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (identity_id, protocol) DO UPDATE SET \
             at = excluded.at, ok = excluded.ok, answer = excluded.answer, \
             meaning = excluded.meaning",
        )
        .bind(id)
        .bind(&v.protocol)
        .bind(v.at)
        .bind(v.ok)
        .bind(&v.answer)
        .bind(&v.meaning)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn validations(&self) -> Result<Vec<(i64, ValidationRecord)>, StoreError> {
        let rows = sqlx::query(
            "SELECT identity_id, protocol, at, ok, answer, meaning FROM validations \
             ORDER BY identity_id, protocol COLLATE \"C\"",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok((
                    r.try_get("identity_id")?,
                    ValidationRecord {
                        protocol: r.try_get("protocol")?,
                        at: r.try_get("at")?,
                        ok: r.try_get("ok")?,
                        answer: r.try_get("answer")?,
                        meaning: r.try_get("meaning")?,
                    },
                ))
            })
            .collect()
    }

    async fn claim_notification(
        &self,
        id: i64,
        kind: &str,
        now: i64,
        min_interval_secs: i64,
    ) -> Result<bool, StoreError> {
        let mut tx = self.begin().await?;
        let n = sqlx::query(
            "INSERT INTO notifications (identity_id, kind, last_sent_at) VALUES ($1, $2, $3) \
             ON CONFLICT (identity_id, kind) DO UPDATE SET last_sent_at = excluded.last_sent_at \
             WHERE notifications.last_sent_at <= $4",
        )
        .bind(id)
        .bind(kind)
        .bind(now)
        .bind(now - min_interval_secs)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        tx.commit().await?;
        Ok(n > 0)
    }

    async fn forget(&self, name: &str) -> Result<(), StoreError> {
        let now = now_unix();
        let mut tx = self.begin().await?;
        let row: Option<(i64, String)> =
            sqlx::query_as("SELECT id, name FROM identities WHERE name_key = $1 FOR UPDATE")
                .bind(name_key(name))
                .fetch_optional(&mut *tx)
                .await?;
        let Some((id, stored_name)) = row else {
            return Err(StoreError::NotFound(name.to_owned()));
        };
        sqlx::query(
            "UPDATE identities SET refresh_token = NULL, key_id = NULL, mailbox = '', \
             status = 'pending', last_error = NULL, last_success_at = NULL, \
             last_failure_at = NULL, upstream_refusal = NULL, upstream_refused_at = NULL, \
             account_upn = NULL, account_oid = NULL, account_tid = NULL, linked_at = NULL, \
             token_generation = token_generation + 1, updated_at = $1 WHERE id = $2",
        )
        .bind(now)
        .bind(id)
        .execute(&mut *tx)
        .await?;
        for table in [
            "validations",
            "notifications",
            "invitations",
            "access_tokens",
        ] {
            sqlx::query(&format!("DELETE FROM {table} WHERE identity_id = $1"))
                .bind(id)
                .execute(&mut *tx)
                .await?;
        }
        sqlx::query("UPDATE audit_log SET detail = NULL WHERE identity = $1")
            .bind(&stored_name)
            .execute(&mut *tx)
            .await?;
        bump(&mut tx).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn set_mailbox(&self, name: &str, mailbox: &str) -> Result<(), StoreError> {
        let mut tx = self.begin().await?;
        let n =
            sqlx::query("UPDATE identities SET mailbox = $1, updated_at = $2 WHERE name_key = $3")
                .bind(mailbox.trim())
                .bind(now_unix())
                .bind(name_key(name))
                .execute(&mut *tx)
                .await?
                .rows_affected();
        if n == 0 {
            return Err(StoreError::NotFound(name.to_owned()));
        }
        bump(&mut tx).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn audit(&self, entry: &NewAudit<'_>) -> Result<(), StoreError> {
        let mut tx = self.begin().await?;
        audit_in(&mut tx, entry, now_unix()).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn audit_log(
        &self,
        identity: Option<&str>,
        before: Option<i64>,
        limit: i64,
    ) -> Result<Vec<AuditEntry>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, at, actor, action, identity, outcome, detail FROM audit_log \
             WHERE ($1::TEXT IS NULL OR identity = $1) AND ($2::BIGINT IS NULL OR id < $2) \
             ORDER BY id DESC LIMIT $3",
        )
        .bind(identity)
        .bind(before)
        .bind(limit.clamp(1, 10_000))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(AuditEntry {
                    id: r.try_get("id")?,
                    at: r.try_get("at")?,
                    actor: r.try_get("actor")?,
                    action: r.try_get("action")?,
                    identity: r.try_get("identity")?,
                    outcome: r.try_get("outcome")?,
                    detail: r.try_get("detail")?,
                })
            })
            .collect()
    }

    async fn put_admin_link(&self, nonce_hash: &[u8], expires_at: i64) -> Result<(), StoreError> {
        let mut tx = self.begin().await?;
        sqlx::query("DELETE FROM admin_links WHERE expires_at <= $1")
            .bind(now_unix())
            .execute(&mut *tx)
            .await?;
        sqlx::query("INSERT INTO admin_links (nonce_hash, expires_at) VALUES ($1, $2)")
            .bind(nonce_hash)
            .bind(expires_at)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn take_admin_link(&self, nonce_hash: &[u8], now: i64) -> Result<bool, StoreError> {
        let mut tx = self.begin().await?;
        let expires_at: Option<i64> = sqlx::query_scalar(
            "DELETE FROM admin_links WHERE nonce_hash = $1 RETURNING expires_at",
        )
        .bind(nonce_hash)
        .fetch_optional(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(expires_at.is_some_and(|e| e > now))
    }

    async fn token_keys(&self) -> Result<Vec<super::TokenKey>, StoreError> {
        let rows: Vec<(String, Option<String>)> = sqlx::query_as(
            "SELECT name, key_id FROM identities WHERE refresh_token IS NOT NULL \
             ORDER BY name_key COLLATE \"C\"",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(name, key_id)| super::TokenKey {
                name,
                key_id: key_id.unwrap_or_default(),
            })
            .collect())
    }
}
