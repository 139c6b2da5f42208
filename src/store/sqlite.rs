//! The embedded default store: one SQLite file (WAL, `synchronous=FULL` so a
//! committed rotated refresh token survives a crash or power loss), migrated
//! on open, shared safely between `serve` and concurrent CLI commands.

use super::{
    name_key, now_unix, AuditEntry, Completion, IdentityRecord, InvitationRecord, InvitationState,
    LinkedAccount, Mode, NewAudit, NewIdentity, NewInvitation, SealedToken, Signin, Status, Store,
    StoreError, ValidationRecord,
};
use sqlx::pool::PoolConnection;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow,
    SqliteSynchronous,
};
use sqlx::{Row, Sqlite, SqliteConnection};
use std::path::Path;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

const COLUMNS: &str = "id, name, mailbox, password_hash, status, last_error, last_success_at, \
     last_failure_at, created_at, refresh_token IS NOT NULL AS has_token, token_generation, \
     upstream_refusal, account_upn, account_oid, account_tid, linked_at, tenant, mode, \
     (SELECT reason FROM tenant_blocks b WHERE b.tenant = identities.tenant) AS tenant_block";

const INVITATION_COLUMNS: &str = "i.id, i.identity_id, d.name, d.mailbox, d.tenant, i.state, \
     i.created_at, i.expires_at, i.finished_at, i.actor";

/// SQLite-backed [`Store`].
#[derive(Clone, Debug)]
pub struct SqliteStore {
    pool: SqlitePool,
    rotations: mpsc::Sender<Rotation>,
}

/// A rotated refresh token waiting for the group commit.
#[derive(Debug)]
struct Rotation {
    id: i64,
    generation: i64,
    token: SealedToken,
    at: i64,
    done: oneshot::Sender<Result<bool, StoreError>>,
}

/// Most rotations committed in one transaction.
const MAX_BATCH: usize = 256;

/// Group commit: rotations that arrive while a commit is in progress are
/// written together in the next transaction, so many identities refreshing
/// at once cost a few fsyncs instead of one each. Each caller still returns
/// only after its own row is durably committed.
async fn rotation_writer(pool: SqlitePool, mut rx: mpsc::Receiver<Rotation>) {
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(r) => batch.push(r),
                Err(_) => break,
            }
        }
        match rotate_batch(&pool, &batch).await {
            Ok(outcomes) => {
                for (r, outcome) in batch.into_iter().zip(outcomes) {
                    let _ = r.done.send(outcome);
                }
            }
            Err(e) => {
                let msg = e.to_string();
                for r in batch {
                    let _ = r.done.send(Err(StoreError::Batch(msg.clone())));
                }
            }
        }
    }
}

async fn rotate_batch(
    pool: &SqlitePool,
    batch: &[Rotation],
) -> Result<Vec<Result<bool, StoreError>>, StoreError> {
    let mut tx = Tx::begin(pool).await?;
    let mut outcomes = Vec::with_capacity(batch.len());
    let mut changed_status = false;
    for r in batch {
        let row: Option<(String, i64)> =
            sqlx::query_as("SELECT status, token_generation FROM identities WHERE id = ?")
                .bind(r.id)
                .fetch_optional(&mut *tx)
                .await?;
        let Some((old, current_generation)) = row else {
            outcomes.push(Err(StoreError::NotFound(format!("#{}", r.id))));
            continue;
        };
        if current_generation != r.generation {
            outcomes.push(Ok(false));
            continue;
        }
        sqlx::query(
            "UPDATE identities SET refresh_token = ?, key_id = ?, status = 'linked', \
             last_error = NULL, last_success_at = ?, updated_at = ? WHERE id = ?",
        )
        .bind(&r.token.blob)
        .bind(&r.token.key_id)
        .bind(r.at)
        .bind(r.at)
        .bind(r.id)
        .execute(&mut *tx)
        .await?;
        if old != "linked" {
            changed_status = true;
            audit_status(&mut tx, r.id, "status.recovered", "linked", None, r.at).await?;
        }
        outcomes.push(Ok(true));
    }
    if changed_status {
        bump(&mut tx).await?;
    }
    tx.commit().await?;
    Ok(outcomes)
}

impl SqliteStore {
    /// The connection pool (for `store migrate`).
    pub(crate) fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    /// Opens (creating when missing, mode 0600) and migrates the database.
    pub async fn open(path: &Path) -> Result<SqliteStore, StoreError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|source| StoreError::Io {
                    path: dir.to_owned(),
                    source,
                })?;
        }
        if !path.exists() {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .open(path)
                .map_err(|source| StoreError::Io {
                    path: path.to_owned(),
                    source,
                })?;
        }
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(Duration::from_secs(10))
            .foreign_keys(true)
            // Deleted rows (tokens, personal data) are overwritten, not left
            // in free pages.
            .pragma("secure_delete", "ON");
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .min_connections(1)
            .connect_with(options)
            .await?;
        super::migrate(&MIGRATOR, &pool).await?;
        let (rotations, rx) = mpsc::channel(4 * MAX_BATCH);
        tokio::spawn(rotation_writer(pool.clone(), rx));
        Ok(SqliteStore { pool, rotations })
    }

    async fn begin(&self) -> Result<Tx, StoreError> {
        Tx::begin(&self.pool).await
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

fn record(row: &SqliteRow) -> Result<IdentityRecord, StoreError> {
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

fn invitation_record(row: &SqliteRow, now: i64) -> Result<InvitationRecord, StoreError> {
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
    tx: &mut SqliteConnection,
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
         created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
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
        "SELECT {COLUMNS} FROM identities WHERE name_key = ?"
    ))
    .bind(name_key(name))
    .fetch_one(&mut *tx)
    .await?;
    record(&row)
}

/// Writes an audit entry inside `tx`.
async fn audit_in(tx: &mut SqliteConnection, e: &NewAudit<'_>, at: i64) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO audit_log (at, actor, action, identity, outcome, detail) \
         VALUES (?, ?, ?, ?, ?, ?)",
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
    tx: &mut SqliteConnection,
    id: i64,
    action: &str,
    outcome: &str,
    detail: Option<&str>,
    at: i64,
) -> Result<(), StoreError> {
    let name: Option<String> = sqlx::query_scalar("SELECT name FROM identities WHERE id = ?")
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
    tx: &mut SqliteConnection,
    id: i64,
    token: &SealedToken,
    account: Option<&LinkedAccount>,
    now: i64,
) -> Result<(), StoreError> {
    let n = sqlx::query(
        "UPDATE identities SET refresh_token = ?, key_id = ?, status = 'linked', \
         last_error = NULL, upstream_refusal = NULL, upstream_refused_at = NULL, \
         token_generation = token_generation + 1, last_success_at = ?, linked_at = ?, \
         account_upn = COALESCE(?, account_upn), account_oid = COALESCE(?, account_oid), \
         account_tid = COALESCE(?, account_tid), updated_at = ? WHERE id = ?",
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
    sqlx::query("DELETE FROM access_tokens WHERE identity_id = ?")
        .bind(id)
        .execute(&mut *tx)
        .await?;
    audit_status(tx, id, "identity.linked", "linked", None, now).await
}

async fn bump(tx: &mut Tx) -> Result<(), StoreError> {
    sqlx::query("UPDATE meta SET v = v + 1 WHERE k = 'revision'")
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// A write transaction on a pooled connection that goes back to the pool
/// only when it committed. Whatever else ends it (an error in a statement,
/// a failed `COMMIT` when the disk is full, a dropped future) closes the
/// connection instead, and SQLite rolls back what was open: a connection
/// whose transaction state is unknown is never reused. (sqlx's own
/// `Transaction` keeps counting a transaction that SQLite already rolled
/// back after a failed `COMMIT`, and every later `BEGIN` on that pooled
/// connection then fails until a restart.)
struct Tx {
    conn: Option<PoolConnection<Sqlite>>,
}

impl Tx {
    /// `BEGIN IMMEDIATE`: takes the write lock up front, so two writers
    /// (serve and a CLI command) never deadlock upgrading read locks.
    async fn begin(pool: &SqlitePool) -> Result<Tx, StoreError> {
        let mut tx = Tx {
            conn: Some(pool.acquire().await?),
        };
        sqlx::query("BEGIN IMMEDIATE").execute(&mut *tx).await?;
        Ok(tx)
    }

    /// Commits; the connection returns to the pool only if that worked.
    async fn commit(mut self) -> Result<(), StoreError> {
        sqlx::query("COMMIT").execute(&mut *self).await?;
        // Clean: back to the pool.
        drop(self.conn.take());
        Ok(())
    }
}

impl std::ops::Deref for Tx {
    type Target = SqliteConnection;

    fn deref(&self) -> &SqliteConnection {
        self.conn
            .as_ref()
            .expect("a live transaction has its connection")
    }
}

impl std::ops::DerefMut for Tx {
    fn deref_mut(&mut self) -> &mut SqliteConnection {
        self.conn
            .as_mut()
            .expect("a live transaction has its connection")
    }
}

impl Drop for Tx {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            // Closing the connection rolls back its open transaction.
            drop(conn.detach());
        }
    }
}

#[async_trait::async_trait]
impl Store for SqliteStore {
    async fn list(&self) -> Result<Vec<IdentityRecord>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM identities ORDER BY name_key"
        ))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(record).collect()
    }

    async fn get(&self, name: &str) -> Result<Option<IdentityRecord>, StoreError> {
        let row = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM identities WHERE name_key = ?"
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
            "UPDATE identities SET password_hash = ?, updated_at = ? WHERE name_key = ?",
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
        let n = sqlx::query("DELETE FROM identities WHERE name_key = ?")
            .bind(name_key(name))
            .execute(&mut *tx)
            .await?
            .rows_affected();
        if n == 0 {
            return Err(StoreError::NotFound(name.to_owned()));
        }
        bump(&mut tx).await?;
        tx.commit().await?;
        // Earlier versions of the row live on in WAL frames until a
        // checkpoint: copy the (zeroed) pages back and truncate the WAL.
        sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn refresh_token(&self, id: i64) -> Result<Option<(SealedToken, i64)>, StoreError> {
        let row = sqlx::query(
            "SELECT refresh_token, key_id, token_generation FROM identities WHERE id = ?",
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
        let (done, wait) = oneshot::channel();
        let request = Rotation {
            id,
            generation,
            token: token.clone(),
            at,
            done,
        };
        self.rotations
            .send(request)
            .await
            .map_err(|_| StoreError::Batch("store writer stopped".into()))?;
        wait.await
            .map_err(|_| StoreError::Batch("store writer stopped".into()))?
    }

    async fn record_success(&self, id: i64, at: i64) -> Result<(), StoreError> {
        let mut tx = self.begin().await?;
        let old: Option<String> = sqlx::query_scalar("SELECT status FROM identities WHERE id = ?")
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?;
        let Some(old) = old else {
            return Err(StoreError::NotFound(format!("#{id}")));
        };
        sqlx::query(
            "UPDATE identities SET status = 'linked', last_error = NULL, last_success_at = ?, \
             updated_at = ? WHERE id = ?",
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
                "UPDATE identities SET upstream_refusal = ?, upstream_refused_at = ?, \
                 updated_at = ? WHERE id = ? AND upstream_refusal IS NOT ?",
            )
            .bind(text)
            .bind(at)
            .bind(at)
            .bind(id)
            .bind(text),
            None => sqlx::query(
                "UPDATE identities SET upstream_refusal = NULL, upstream_refused_at = NULL, \
                 last_success_at = ?, updated_at = ? WHERE id = ? AND upstream_refusal IS NOT NULL",
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
                "INSERT INTO tenant_blocks (tenant, reason, since) VALUES (?, ?, ?) \
                 ON CONFLICT (tenant) DO UPDATE SET reason = excluded.reason \
                 WHERE tenant_blocks.reason IS NOT excluded.reason",
            )
            .bind(tenant)
            .bind(reason)
            .bind(at),
            None => sqlx::query("DELETE FROM tenant_blocks WHERE tenant = ?").bind(tenant),
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
        Ok(
            sqlx::query_as("SELECT tenant, reason, since FROM tenant_blocks ORDER BY tenant")
                .fetch_all(&self.pool)
                .await?,
        )
    }

    async fn record_failure(
        &self,
        id: i64,
        needs_reauth: bool,
        error: &str,
        at: i64,
    ) -> Result<(), StoreError> {
        let mut tx = self.begin().await?;
        let was: Option<String> = sqlx::query_scalar("SELECT status FROM identities WHERE id = ?")
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?;
        let n = if needs_reauth {
            sqlx::query(
                "UPDATE identities SET status = 'needs_reauth', last_error = ?, \
                 last_failure_at = ?, updated_at = ? WHERE id = ?",
            )
        } else {
            sqlx::query(
                "UPDATE identities SET last_error = ?, last_failure_at = ?, updated_at = ? \
                 WHERE id = ?",
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
        sqlx::query(
            "UPDATE invitations SET state = 'revoked', finished_at = ? \
             WHERE identity_id = ? AND state = 'pending'",
        )
        .bind(new.created_at)
        .bind(new.identity_id)
        .execute(&mut *tx)
        .await?;
        let id = sqlx::query(
            "INSERT INTO invitations (identity_id, token_hash, code_hash, state, created_at, \
             expires_at, actor) VALUES (?, ?, ?, 'pending', ?, ?, ?)",
        )
        .bind(new.identity_id)
        .bind(&new.token_hash)
        .bind(&new.code_hash)
        .bind(new.created_at)
        .bind(new.expires_at)
        .bind(&new.actor)
        .execute(&mut *tx)
        .await?
        .last_insert_rowid();
        let row = sqlx::query(&format!(
            "SELECT {INVITATION_COLUMNS} FROM invitations i JOIN identities d \
             ON d.id = i.identity_id WHERE i.id = ?"
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
        self.invitation_where("i.token_hash = ?", token_hash).await
    }

    async fn invitation_by_code(
        &self,
        code_hash: &[u8],
    ) -> Result<Option<InvitationRecord>, StoreError> {
        self.invitation_where("i.code_hash = ?", code_hash).await
    }

    async fn invitation(&self, id: i64) -> Result<Option<InvitationRecord>, StoreError> {
        let row = sqlx::query(&format!(
            "SELECT {INVITATION_COLUMNS} FROM invitations i JOIN identities d \
             ON d.id = i.identity_id WHERE i.id = ?"
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
            "UPDATE invitations SET state = 'revoked', finished_at = ? \
             WHERE identity_id = ? AND state = 'pending'",
        )
        .bind(at)
        .bind(identity_id)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        sqlx::query(
            "DELETE FROM signins WHERE invitation_id IN \
             (SELECT id FROM invitations WHERE identity_id = ?)",
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
        let row = sqlx::query(&format!(
            "SELECT {INVITATION_COLUMNS} FROM invitations i JOIN identities d \
             ON d.id = i.identity_id WHERE i.id = ?"
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
        sqlx::query("UPDATE invitations SET state = 'completed', finished_at = ? WHERE id = ?")
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
        sqlx::query("DELETE FROM signins WHERE expires_at <= ?")
            .bind(now_unix())
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "INSERT INTO signins (state_hash, invitation_id, verifier, nonce, expires_at) \
             VALUES (?, ?, ?, ?, ?)",
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
            "DELETE FROM signins WHERE state_hash = ? \
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
             VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (identity_id, protocol) DO UPDATE SET \
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
             ORDER BY identity_id, protocol",
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
            "INSERT INTO notifications (identity_id, kind, last_sent_at) VALUES (?, ?, ?) \
             ON CONFLICT (identity_id, kind) DO UPDATE SET last_sent_at = excluded.last_sent_at \
             WHERE notifications.last_sent_at <= ?",
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
            sqlx::query_as("SELECT id, name FROM identities WHERE name_key = ?")
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
             token_generation = token_generation + 1, updated_at = ? WHERE id = ?",
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
            sqlx::query(&format!("DELETE FROM {table} WHERE identity_id = ?"))
                .bind(id)
                .execute(&mut *tx)
                .await?;
        }
        sqlx::query("UPDATE audit_log SET detail = NULL WHERE identity = ?")
            .bind(&stored_name)
            .execute(&mut *tx)
            .await?;
        bump(&mut tx).await?;
        tx.commit().await?;
        // Old row versions live on in WAL frames until a checkpoint.
        sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn set_mailbox(&self, name: &str, mailbox: &str) -> Result<(), StoreError> {
        let mut tx = self.begin().await?;
        let n = sqlx::query("UPDATE identities SET mailbox = ?, updated_at = ? WHERE name_key = ?")
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
             WHERE (?1 IS NULL OR identity = ?1) AND (?2 IS NULL OR id < ?2) \
             ORDER BY id DESC LIMIT ?3",
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
        sqlx::query("DELETE FROM admin_links WHERE expires_at <= ?")
            .bind(now_unix())
            .execute(&mut *tx)
            .await?;
        sqlx::query("INSERT INTO admin_links (nonce_hash, expires_at) VALUES (?, ?)")
            .bind(nonce_hash)
            .bind(expires_at)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn take_admin_link(&self, nonce_hash: &[u8], now: i64) -> Result<bool, StoreError> {
        let mut tx = self.begin().await?;
        let expires_at: Option<i64> =
            sqlx::query_scalar("DELETE FROM admin_links WHERE nonce_hash = ? RETURNING expires_at")
                .bind(nonce_hash)
                .fetch_optional(&mut *tx)
                .await?;
        tx.commit().await?;
        Ok(expires_at.is_some_and(|e| e > now))
    }

    async fn token_keys(&self) -> Result<Vec<super::TokenKey>, StoreError> {
        let rows: Vec<(String, Option<String>)> = sqlx::query_as(
            "SELECT name, key_id FROM identities WHERE refresh_token IS NOT NULL \
             ORDER BY name_key",
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::Secret;
    use crate::store::Sealer;

    #[tokio::test]
    async fn lifecycle_and_revision() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("db/a.db"))
            .await
            .unwrap();
        let r0 = store.revision().await.unwrap();
        let rec = store
            .create(&NewIdentity::delegated(
                "Alice",
                "alice@contoso.com",
                "$hash",
            ))
            .await
            .unwrap();
        assert_eq!(rec.status, Status::Pending);
        assert!(store.revision().await.unwrap() > r0);
        assert!(matches!(
            store
                .create(&NewIdentity::delegated("ALICE", "x", "y"))
                .await,
            Err(StoreError::AlreadyExists(_))
        ));
        let sealer = Sealer::from_key(&[1; 32]);
        let sealed = sealer.seal(rec.id, &Secret::new("rt-1"));
        store.link(rec.id, &sealed).await.unwrap();
        let got = store.get("alice").await.unwrap().unwrap();
        assert_eq!(got.status, Status::Linked);
        assert_eq!(got.token_generation, 1);
        assert_eq!(
            store.refresh_token(rec.id).await.unwrap().unwrap(),
            (sealed.clone(), 1)
        );

        store
            .record_failure(rec.id, true, "AADSTS70008", 5)
            .await
            .unwrap();
        let got = store.get("alice").await.unwrap().unwrap();
        assert_eq!(got.status, Status::NeedsReauth);
        assert_eq!(got.last_error.as_deref(), Some("AADSTS70008"));

        let r1 = store.revision().await.unwrap();
        let sealed2 = sealer.seal(rec.id, &Secret::new("rt-2"));
        assert!(store.rotate(rec.id, 1, &sealed2, 6).await.unwrap());
        assert!(
            !store.rotate(rec.id, 0, &sealed2, 6).await.unwrap(),
            "stale generation"
        );
        assert!(
            store.revision().await.unwrap() > r1,
            "status change is visible"
        );
        let r2 = store.revision().await.unwrap();
        store.rotate(rec.id, 1, &sealed, 7).await.unwrap();
        assert_eq!(store.revision().await.unwrap(), r2, "plain rotation is not");

        // The upstream's refusal shows until a success clears it; token
        // refreshes leave it alone.
        store
            .set_upstream_refusal(rec.id, Some("535 5.7.139 SMTP AUTH is disabled"), 8)
            .await
            .unwrap();
        assert!(store.revision().await.unwrap() > r2);
        store.rotate(rec.id, 1, &sealed2, 9).await.unwrap();
        let got = store.get("alice").await.unwrap().unwrap();
        assert_eq!(got.status, Status::UpstreamRefused);
        assert_eq!(
            got.last_error.as_deref(),
            Some("535 5.7.139 SMTP AUTH is disabled")
        );
        let r3 = store.revision().await.unwrap();
        store
            .set_upstream_refusal(rec.id, Some("535 5.7.139 SMTP AUTH is disabled"), 10)
            .await
            .unwrap();
        assert_eq!(store.revision().await.unwrap(), r3, "same words: no change");
        store.set_upstream_refusal(rec.id, None, 11).await.unwrap();
        let got = store.get("alice").await.unwrap().unwrap();
        assert_eq!((got.status, got.last_error), (Status::Linked, None));
        assert!(store.revision().await.unwrap() > r3);

        store.remove("Alice").await.unwrap();
        assert!(store.get("alice").await.unwrap().is_none());
        // Nothing of the identity is left on disk.
        let dir_path = dir.path().join("db");
        for file in ["a.db", "a.db-wal"] {
            let bytes = std::fs::read(dir_path.join(file)).unwrap_or_default();
            for needle in [&b"alice@contoso.com"[..], &sealed.blob[..16]] {
                assert!(
                    !bytes.windows(needle.len()).any(|w| w == needle),
                    "{file} still holds identity data"
                );
            }
        }
        assert!(matches!(
            store.remove("alice").await,
            Err(StoreError::NotFound(_))
        ));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_rotations_are_group_committed_and_all_durable() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.db");
        let store = SqliteStore::open(&path).await.unwrap();
        let sealer = Sealer::from_key(&[3; 32]);
        let mut ids = Vec::new();
        for i in 0..50 {
            let rec = store
                .create(&NewIdentity::delegated(&format!("u{i}"), "m@x", "h"))
                .await
                .unwrap();
            store
                .link(rec.id, &sealer.seal(rec.id, &Secret::new("rt-0")))
                .await
                .unwrap();
            ids.push(rec.id);
        }
        let tasks: Vec<_> = ids
            .iter()
            .map(|&id| {
                let store = store.clone();
                let sealed = sealer.seal(id, &Secret::new(format!("rt-new-{id}")));
                tokio::spawn(async move { store.rotate(id, 1, &sealed, 9).await })
            })
            .collect();
        for t in tasks {
            assert!(t.await.unwrap().unwrap());
        }
        // A stale generation is refused inside a batch too.
        let stale = sealer.seal(ids[0], &Secret::new("rt-stale"));
        assert!(!store.rotate(ids[0], 0, &stale, 9).await.unwrap());
        drop(store);
        let reopened = SqliteStore::open(&path).await.unwrap();
        for &id in &ids {
            let (sealed, _) = reopened.refresh_token(id).await.unwrap().unwrap();
            assert_eq!(
                sealer.open(id, &sealed).unwrap().expose(),
                format!("rt-new-{id}")
            );
        }
    }

    #[tokio::test]
    async fn database_file_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.db");
        SqliteStore::open(&path).await.unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0);
    }
}
