//! The embedded default store: one SQLite file (WAL, `synchronous=FULL` so a
//! committed rotated refresh token survives a crash or power loss), migrated
//! on open, shared safely between `serve` and concurrent CLI commands.

use super::{name_key, now_unix, IdentityRecord, SealedToken, Status, Store, StoreError};
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
     upstream_refusal";

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
        changed_status |= old != "linked";
        outcomes.push(Ok(true));
    }
    if changed_status {
        bump(&mut tx).await?;
    }
    tx.commit().await?;
    Ok(outcomes)
}

impl SqliteStore {
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
        MIGRATOR.run(&pool).await?;
        let (rotations, rx) = mpsc::channel(4 * MAX_BATCH);
        tokio::spawn(rotation_writer(pool.clone(), rx));
        Ok(SqliteStore { pool, rotations })
    }

    async fn begin(&self) -> Result<Tx, StoreError> {
        Tx::begin(&self.pool).await
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
    })
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

    async fn create(
        &self,
        name: &str,
        mailbox: &str,
        password_hash: &str,
    ) -> Result<IdentityRecord, StoreError> {
        let now = now_unix();
        let mut tx = self.begin().await?;
        let res = sqlx::query(
            "INSERT INTO identities (name, name_key, mailbox, password_hash, status, created_at, updated_at) \
             VALUES (?, ?, ?, ?, 'pending', ?, ?)",
        )
        .bind(name.trim())
        .bind(name_key(name))
        .bind(mailbox.trim())
        .bind(password_hash)
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
        bump(&mut tx).await?;
        let row = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM identities WHERE name_key = ?"
        ))
        .bind(name_key(name))
        .fetch_one(&mut *tx)
        .await?;
        let rec = record(&row)?;
        tx.commit().await?;
        Ok(rec)
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
        let n = sqlx::query(
            "UPDATE identities SET refresh_token = ?, key_id = ?, status = 'linked', \
             last_error = NULL, upstream_refusal = NULL, upstream_refused_at = NULL, \
             token_generation = token_generation + 1, \
             last_success_at = ?, updated_at = ? WHERE id = ?",
        )
        .bind(&token.blob)
        .bind(&token.key_id)
        .bind(now)
        .bind(now)
        .bind(id)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if n == 0 {
            return Err(StoreError::NotFound(format!("#{id}")));
        }
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
            bump(&mut tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn record_failure(
        &self,
        id: i64,
        needs_reauth: bool,
        error: &str,
        at: i64,
    ) -> Result<(), StoreError> {
        let mut tx = self.begin().await?;
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
            .create("Alice", "alice@contoso.com", "$hash")
            .await
            .unwrap();
        assert_eq!(rec.status, Status::Pending);
        assert!(store.revision().await.unwrap() > r0);
        assert!(matches!(
            store.create("ALICE", "x", "y").await,
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
            let rec = store.create(&format!("u{i}"), "m@x", "h").await.unwrap();
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
