//! Bulk creation of identities from CSV (`authswap identity import-csv`,
//! the admin API and console): every row is checked before anything is
//! written, and the rows are written in one transaction, so a file with a
//! bad row imports nothing.

use crate::config::Config;
use crate::identity::hash_password;
use crate::names;
use crate::secret::Secret;
use crate::store::{IdentityRecord, Mode, NewIdentity, Store, StoreError, DEFAULT_TENANT};
use rand::Rng;
use std::collections::HashMap;
use std::fmt;

/// Largest CSV accepted (bytes).
pub const MAX_CSV_BYTES: usize = 4 << 20;
/// Most rows accepted in one import.
pub const MAX_ROWS: usize = 10_000;

/// The `password` column of one row.
#[derive(Clone, PartialEq, Eq)]
pub enum PasswordChoice {
    /// Empty: no local password yet (set it later).
    None,
    /// `generate`: a random one, shown once.
    Generate,
    /// This password.
    Given(Secret),
}

impl fmt::Debug for PasswordChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PasswordChoice::None => "None",
            PasswordChoice::Generate => "Generate",
            PasswordChoice::Given(_) => "Given(<redacted>)",
        })
    }
}

/// One checked row.
#[derive(Debug, Clone)]
pub struct ImportRow {
    /// Line number in the file (1 = header).
    pub line: u64,
    /// Identity name (validated, NFC).
    pub name: String,
    /// Mailbox (validated).
    pub mailbox: String,
    /// Password column.
    pub password: PasswordChoice,
    /// `tenant` column (default `default`).
    pub tenant: String,
    /// `mode` column (default `delegated`).
    pub mode: Mode,
}

/// A row that cannot be imported.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RowError {
    /// Line number in the file.
    pub line: u64,
    /// What is wrong, in plain words (never the password).
    pub message: String,
}

/// An identity created by an import.
#[derive(Clone)]
pub struct Imported {
    /// The stored record.
    pub record: IdentityRecord,
    /// The generated password, when the row asked for one.
    pub generated_password: Option<Secret>,
}

impl fmt::Debug for Imported {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Imported")
            .field("name", &self.record.name)
            .field("generated", &self.generated_password.is_some())
            .finish()
    }
}

/// Why an import did not happen (nothing was written).
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    /// The file is not usable CSV (no header, missing columns, too big).
    #[error("{0}")]
    File(String),
    /// Some rows are wrong; each is listed with its line number.
    #[error("{} row(s) cannot be imported, nothing was imported: {}", .0.len(), summary(.0))]
    Rows(Vec<RowError>),
    /// A password could not be hashed.
    #[error("cannot hash a password: {0}")]
    Hash(String),
    /// The store failed (nothing was written).
    #[error("{0}")]
    Store(#[from] StoreError),
}

fn summary(rows: &[RowError]) -> String {
    let mut out: Vec<String> = rows
        .iter()
        .take(5)
        .map(|r| format!("line {}: {}", r.line, r.message))
        .collect();
    if rows.len() > 5 {
        out.push(format!("and {} more", rows.len() - 5));
    }
    out.join("; ")
}

impl crate::error::Failure for ImportError {
    fn origin(&self) -> crate::error::Origin {
        match self {
            ImportError::File(_) | ImportError::Rows(_) => crate::error::Origin::Client,
            ImportError::Hash(_) => crate::error::Origin::Internal,
            ImportError::Store(_) => crate::error::Origin::Store,
        }
    }

    fn retryable(&self) -> bool {
        matches!(self, ImportError::Store(e) if e.retryable())
    }
}

/// A random local password: 20 characters from letters and digits without
/// look-alikes (about 115 bits).
pub fn generate_password() -> Secret {
    const ALPHABET: &[u8] = b"abcdefghijkmnpqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ23456789";
    let mut rng = rand::rng();
    Secret::new(
        (0..20)
            .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
            .collect::<String>(),
    )
}

/// Whether an identity of a mode may belong to a tenant
/// ([`crate::config::Config::check_identity_tenant`]).
pub type TenantCheck<'a> = &'a (dyn Fn(&str, Mode) -> Result<(), String> + Sync);

/// Parses and checks a CSV file with a header row naming the columns
/// `name`, `mailbox` and optionally `password`, `tenant` and `mode` (any
/// order, any case). `existing` are the identities already stored (their
/// names are taken); `tenants` checks each row's tenant and mode.
pub fn parse(
    bytes: &[u8],
    existing: &[IdentityRecord],
    tenants: TenantCheck<'_>,
) -> Result<Vec<ImportRow>, ImportError> {
    if bytes.len() > MAX_CSV_BYTES {
        return Err(ImportError::File(format!(
            "the file is larger than {} MiB",
            MAX_CSV_BYTES >> 20
        )));
    }
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(true)
        .flexible(true)
        .trim(csv::Trim::All)
        .from_reader(bytes);
    let headers = reader
        .headers()
        .map_err(|e| ImportError::File(format!("cannot read the header row: {}", csv_error(&e))))?
        .clone();
    let column = |want: &str| headers.iter().position(|h| h.eq_ignore_ascii_case(want));
    let (Some(name_col), Some(mailbox_col)) = (column("name"), column("mailbox")) else {
        return Err(ImportError::File(
            "the first row must name the columns: name, mailbox and optionally password".into(),
        ));
    };
    let password_col = column("password");
    let tenant_col = column("tenant");
    let mode_col = column("mode");
    let taken: HashMap<String, String> = existing
        .iter()
        .map(|r| (names::same_name_key(&r.name), r.name.clone()))
        .collect();
    let mut seen: HashMap<String, u64> = HashMap::new();
    let mut rows = Vec::new();
    let mut errors = Vec::new();
    for record in reader.records() {
        let record = match record {
            Ok(r) => r,
            Err(e) => {
                let line = e.position().map_or(0, |p| p.line());
                errors.push(RowError {
                    line,
                    message: csv_error(&e),
                });
                continue;
            }
        };
        let line = record.position().map_or(0, |p| p.line());
        if record.iter().all(str::is_empty) {
            continue;
        }
        if rows.len() + errors.len() >= MAX_ROWS {
            return Err(ImportError::File(format!(
                "more than {MAX_ROWS} rows: split the file"
            )));
        }
        let field = |i: usize| record.get(i).unwrap_or("");
        let name = match names::validate_name(field(name_col)) {
            Ok(n) => n,
            Err(e) => {
                errors.push(RowError {
                    line,
                    message: format!("name: {e}"),
                });
                continue;
            }
        };
        let mailbox = match names::validate_mailbox(field(mailbox_col)) {
            Ok(m) => m,
            Err(e) => {
                errors.push(RowError {
                    line,
                    message: format!("mailbox: {e}"),
                });
                continue;
            }
        };
        let key = names::same_name_key(&name);
        if let Some(other) = taken.get(&key) {
            errors.push(RowError {
                line,
                message: format!("an identity named `{}` already exists", names::Shown(other)),
            });
            continue;
        }
        if let Some(first) = seen.insert(key, line) {
            errors.push(RowError {
                line,
                message: format!("the name `{}` is also on line {first}", names::Shown(&name)),
            });
            continue;
        }
        let password = match password_col.map(field).unwrap_or("") {
            "" => PasswordChoice::None,
            p if p.eq_ignore_ascii_case("generate") => PasswordChoice::Generate,
            p => PasswordChoice::Given(Secret::new(p)),
        };
        let tenant = match tenant_col.map(field).unwrap_or("") {
            "" => DEFAULT_TENANT.to_owned(),
            t => t.to_owned(),
        };
        let mode = match mode_col.map(field).unwrap_or("") {
            "" => Mode::Delegated,
            m => match Mode::parse(&m.to_ascii_lowercase()) {
                Some(m) => m,
                None => {
                    errors.push(RowError {
                        line,
                        message: format!("mode: `{}` is not `delegated` or `app`", names::Shown(m)),
                    });
                    continue;
                }
            },
        };
        if let Err(e) = tenants(&tenant, mode) {
            errors.push(RowError {
                line,
                message: format!("tenant: {e}"),
            });
            continue;
        }
        rows.push(ImportRow {
            line,
            name,
            mailbox,
            password,
            tenant,
            mode,
        });
    }
    if !errors.is_empty() {
        return Err(ImportError::Rows(errors));
    }
    Ok(rows)
}

/// A CSV error in plain words, without the field's content.
fn csv_error(e: &csv::Error) -> String {
    match e.kind() {
        csv::ErrorKind::Utf8 { .. } => "not valid UTF-8 (save the file as UTF-8)".into(),
        csv::ErrorKind::UnequalLengths { .. } => "wrong number of fields".into(),
        csv::ErrorKind::Io(e) => format!("read error: {e}"),
        _ => "malformed CSV".into(),
    }
}

/// Parses, checks, hashes and stores: all rows, or nothing.
pub async fn import(
    store: &dyn Store,
    config: &Config,
    bytes: &[u8],
    actor: &str,
) -> Result<Vec<Imported>, ImportError> {
    let existing = store.list().await?;
    let rows = parse(bytes, &existing, &|t, m| config.check_identity_tenant(t, m))?;
    let auth = config.auth.clone();
    // argon2 runs off the async threads.
    let prepared = tokio::task::spawn_blocking(move || {
        rows.into_iter()
            .map(|row| {
                let (hash, generated) = match &row.password {
                    PasswordChoice::None => (String::new(), None),
                    PasswordChoice::Generate => {
                        let pw = generate_password();
                        (hash_password(pw.expose(), &auth)?, Some(pw))
                    }
                    PasswordChoice::Given(pw) => (hash_password(pw.expose(), &auth)?, None),
                };
                Ok((row, hash, generated))
            })
            .collect::<Result<Vec<_>, String>>()
    })
    .await
    .map_err(|e| ImportError::Hash(e.to_string()))?
    .map_err(ImportError::Hash)?;
    let new: Vec<NewIdentity> = prepared
        .iter()
        .map(|(row, hash, _)| NewIdentity {
            name: row.name.clone(),
            mailbox: row.mailbox.clone(),
            password_hash: hash.clone(),
            tenant: row.tenant.clone(),
            mode: row.mode,
        })
        .collect();
    let records = store.create_many(&new, actor).await?;
    Ok(records
        .into_iter()
        .zip(prepared)
        .map(|(record, (_, _, generated_password))| Imported {
            record,
            generated_password,
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::SqliteStore;

    fn cheap() -> Config {
        Config {
            auth: crate::config::AuthConfig {
                argon2_memory_kib: 256,
                argon2_iterations: 1,
                ..crate::config::AuthConfig::default()
            },
            ..Config::default()
        }
    }

    #[tokio::test]
    async fn a_bad_row_imports_nothing_and_is_reported_by_line() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("a.db")).await.unwrap();
        store
            .create(&crate::store::NewIdentity::delegated(
                "carol",
                "carol@contoso.com",
                "$h",
            ))
            .await
            .unwrap();
        let csv = "name,mailbox,password\n\
                   alice,alice@contoso.com,generate\n\
                   bob,not-a-mailbox,\n\
                   Carol,carol2@contoso.com,\n\
                   dave,dave@contoso.com,secret-pw-123\n\
                   ALICE,alice2@contoso.com,\n";
        let err = import(&store, &cheap(), csv.as_bytes(), "cli")
            .await
            .unwrap_err();
        let ImportError::Rows(rows) = &err else {
            panic!("{err}")
        };
        let lines: Vec<u64> = rows.iter().map(|r| r.line).collect();
        assert_eq!(lines, vec![3, 4, 6], "{rows:?}");
        assert!(!err.to_string().contains("secret-pw-123"));
        assert_eq!(store.list().await.unwrap().len(), 1, "nothing imported");
    }

    #[tokio::test]
    async fn imports_with_generated_given_and_no_password() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("a.db")).await.unwrap();
        let csv = "\u{feff}Mailbox;Name\n"; // wrong delimiter: one column
        assert!(matches!(
            import(&store, &cheap(), csv.as_bytes(), "cli").await,
            Err(ImportError::File(_))
        ));
        let csv = "Mailbox,Name,Password\n\
                   alice@contoso.com,alice,generate\n\
                   \n\
                   \"bob@contoso.com\",\"bob\",\"pw, with comma 123\"\n\
                   carol@contoso.com,carol,\n";
        let out = import(&store, &cheap(), csv.as_bytes(), "cli")
            .await
            .unwrap();
        assert_eq!(out.len(), 3);
        assert_eq!(
            out[0].generated_password.as_ref().unwrap().expose().len(),
            20
        );
        assert!(out[1].generated_password.is_none());
        let list = store.list().await.unwrap();
        let bob = list.iter().find(|r| r.name == "bob").unwrap();
        assert!(crate::identity::hash_password("x", &cheap().auth).is_ok());
        assert!(bob.password_hash.starts_with("$argon2id$"));
        let carol = list.iter().find(|r| r.name == "carol").unwrap();
        assert!(carol.password_hash.is_empty());
        assert!(
            !format!("{:?}", out[0]).contains(out[0].generated_password.as_ref().unwrap().expose())
        );
    }

    #[test]
    fn invalid_utf8_is_reported_with_its_line() {
        let bytes = b"name,mailbox\nalice,alice@contoso.com\nb\xffb,bob@contoso.com\n";
        let Err(ImportError::Rows(rows)) = parse(bytes, &[], &|_, _| Ok(())) else {
            panic!()
        };
        assert_eq!(rows[0].line, 3);
        assert!(rows[0].message.contains("UTF-8"));
    }
}
