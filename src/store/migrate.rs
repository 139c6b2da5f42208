//! `authswap store migrate`: copies an embedded SQLite store into
//! PostgreSQL, row for row, in one PostgreSQL transaction: identities with
//! their sealed refresh tokens (the same sealing key serves both: give
//! every replica the key file the SQLite store used), invitations,
//! sign-ins in progress, validations, notification state, the audit log,
//! admin sign-in links and tenant blocks. Row ids are kept, so the sealed
//! tokens (bound to their identity's id) still open. A row already in
//! PostgreSQL is left as it is, so running it again copies only what is
//! new; an identity whose name is taken there by another row stops the
//! copy. Without `apply` the transaction is rolled back: a dry run that
//! checks everything and counts what would be copied.

use super::postgres::PostgresStore;
use super::sqlite::SqliteStore;
use super::StoreError;
use sqlx::Row;

/// A column's type in both schemas.
#[derive(Clone, Copy)]
enum Kind {
    Int,
    Text,
    Blob,
    /// INTEGER 0/1 in SQLite, BOOLEAN in PostgreSQL.
    Bool,
}

struct Table {
    name: &'static str,
    columns: &'static [(&'static str, Kind)],
    /// Its `BIGSERIAL` id column, whose sequence follows the copied ids.
    serial: bool,
}

use Kind::{Blob, Bool, Int, Text};

/// Every table, parents first.
const TABLES: &[Table] = &[
    Table {
        name: "identities",
        columns: &[
            ("id", Int),
            ("name", Text),
            ("name_key", Text),
            ("mailbox", Text),
            ("password_hash", Text),
            ("refresh_token", Blob),
            ("key_id", Text),
            ("token_generation", Int),
            ("status", Text),
            ("last_error", Text),
            ("last_success_at", Int),
            ("last_failure_at", Int),
            ("created_at", Int),
            ("updated_at", Int),
            ("upstream_refusal", Text),
            ("upstream_refused_at", Int),
            ("account_upn", Text),
            ("account_oid", Text),
            ("account_tid", Text),
            ("linked_at", Int),
            ("tenant", Text),
            ("mode", Text),
        ],
        serial: true,
    },
    Table {
        name: "invitations",
        columns: &[
            ("id", Int),
            ("identity_id", Int),
            ("token_hash", Blob),
            ("code_hash", Blob),
            ("state", Text),
            ("created_at", Int),
            ("expires_at", Int),
            ("finished_at", Int),
            ("actor", Text),
        ],
        serial: true,
    },
    Table {
        name: "signins",
        columns: &[
            ("state_hash", Blob),
            ("invitation_id", Int),
            ("verifier", Text),
            ("nonce", Text),
            ("expires_at", Int),
        ],
        serial: false,
    },
    Table {
        name: "validations",
        columns: &[
            ("identity_id", Int),
            ("protocol", Text),
            ("at", Int),
            ("ok", Bool),
            ("answer", Text),
            ("meaning", Text),
        ],
        serial: false,
    },
    Table {
        name: "notifications",
        columns: &[("identity_id", Int), ("kind", Text), ("last_sent_at", Int)],
        serial: false,
    },
    Table {
        name: "audit_log",
        columns: &[
            ("id", Int),
            ("at", Int),
            ("actor", Text),
            ("action", Text),
            ("identity", Text),
            ("outcome", Text),
            ("detail", Text),
        ],
        serial: true,
    },
    Table {
        name: "admin_links",
        columns: &[("nonce_hash", Blob), ("expires_at", Int)],
        serial: false,
    },
    Table {
        name: "tenant_blocks",
        columns: &[("tenant", Text), ("reason", Text), ("since", Int)],
        serial: false,
    },
];

/// What one table held and what of it was (or would be) copied.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct TableCount {
    /// Table name.
    pub table: &'static str,
    /// Rows in the SQLite store.
    pub source: u64,
    /// Rows not yet in PostgreSQL: copied (or, in a dry run, to copy).
    pub copied: u64,
}

enum Value {
    Int(Option<i64>),
    Text(Option<String>),
    Blob(Option<Vec<u8>>),
    Bool(Option<bool>),
}

/// Copies `from` into `to` (see the module documentation); rolled back
/// unless `apply`.
pub async fn copy(
    from: &SqliteStore,
    to: &PostgresStore,
    apply: bool,
) -> Result<Vec<TableCount>, StoreError> {
    let mut tx = to.pool().begin().await?;
    let mut counts = Vec::with_capacity(TABLES.len());
    for table in TABLES {
        let names: Vec<&str> = table.columns.iter().map(|c| c.0).collect();
        let list = names.join(", ");
        let rows = sqlx::query(&format!("SELECT {list} FROM {} ORDER BY 1", table.name))
            .fetch_all(from.pool())
            .await?;
        let marks: Vec<String> = (1..=names.len()).map(|i| format!("${i}")).collect();
        let insert = format!(
            "INSERT INTO {} ({list}) VALUES ({}) ON CONFLICT DO NOTHING",
            table.name,
            marks.join(", ")
        );
        let mut copied = 0u64;
        for row in &rows {
            let mut values = Vec::with_capacity(names.len());
            for (name, kind) in table.columns {
                values.push(match kind {
                    Int => Value::Int(row.try_get(*name)?),
                    Text => Value::Text(row.try_get(*name)?),
                    Blob => Value::Blob(row.try_get(*name)?),
                    Bool => Value::Bool(row.try_get::<Option<i64>, _>(*name)?.map(|v| v != 0)),
                });
            }
            if table.name == "identities" {
                check_identity(&mut tx, &values).await?;
            }
            let mut q = sqlx::query(&insert);
            for v in values {
                q = match v {
                    Value::Int(x) => q.bind(x),
                    Value::Text(x) => q.bind(x),
                    Value::Blob(x) => q.bind(x),
                    Value::Bool(x) => q.bind(x),
                };
            }
            copied += q.execute(&mut *tx).await?.rows_affected();
        }
        if table.serial {
            sqlx::query(&format!(
                "SELECT setval(pg_get_serial_sequence('{t}', 'id'), \
                 COALESCE((SELECT MAX(id) FROM {t}), 0) + 1, false)",
                t = table.name
            ))
            .execute(&mut *tx)
            .await?;
        }
        counts.push(TableCount {
            table: table.name,
            source: rows.len() as u64,
            copied,
        });
    }
    if apply {
        // Running servers on PostgreSQL pick the copy up.
        sqlx::query("UPDATE meta SET v = v + 1 WHERE k = 'revision'")
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
    } else {
        tx.rollback().await?;
    }
    Ok(counts)
}

/// An identity row may be new, or the very row copied before (same id and
/// name); an identity of the same name under another id stops the copy:
/// its sealed token and links would belong to the wrong row.
async fn check_identity(
    tx: &mut sqlx::Transaction<'static, sqlx::Postgres>,
    values: &[Value],
) -> Result<(), StoreError> {
    let (Value::Int(Some(id)), Value::Text(Some(name)), Value::Text(Some(key))) =
        (&values[0], &values[1], &values[2])
    else {
        return Err(StoreError::Batch(
            "an identity row without id or name".into(),
        ));
    };
    let other: Option<i64> =
        sqlx::query_scalar("SELECT id FROM identities WHERE name_key = $1 AND id <> $2")
            .bind(key)
            .bind(id)
            .fetch_optional(&mut **tx)
            .await?;
    let taken: Option<String> =
        sqlx::query_scalar("SELECT name FROM identities WHERE id = $1 AND name_key <> $2")
            .bind(id)
            .bind(key)
            .fetch_optional(&mut **tx)
            .await?;
    if other.is_some() || taken.is_some() {
        return Err(StoreError::Batch(format!(
            "identity `{}` (id {id}) clashes with another identity already in PostgreSQL; nothing was copied: copy into an empty database, or remove the clashing identity there first",
            crate::names::Shown(name)
        )));
    }
    Ok(())
}
