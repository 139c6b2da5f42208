//! `authswap store migrate`: copy an embedded SQLite store into PostgreSQL
//! ([`crate::store::migrate`]), a dry run unless `--apply`.

use super::StoreCommand;
use crate::store::postgres::PostgresStore;
use crate::store::{migrate, postgres_settings, SqliteStore};
use anyhow::{anyhow, bail, Context};
use std::path::Path;

pub(super) async fn run(config_path: &Path, cmd: StoreCommand) -> anyhow::Result<()> {
    let StoreCommand::Migrate {
        from,
        to,
        apply,
        json,
    } = cmd;
    let config = super::load_config(config_path)?;
    let source = Path::new(from.strip_prefix("sqlite:").unwrap_or(&from));
    if !source.exists() {
        bail!("{}: no such SQLite store", source.display());
    }
    let mut store = config.store.clone();
    if let Some(url) = to {
        store.url = Some(url);
    }
    let settings = postgres_settings(&store, &config.tls)?.ok_or_else(|| {
        anyhow!("no PostgreSQL database: give --to postgres://... or set [store] url")
    })?;
    let from_store = SqliteStore::open(source)
        .await
        .with_context(|| format!("opening {}", source.display()))?;
    let to_store = PostgresStore::open(&settings)
        .await
        .context("opening the PostgreSQL database")?;
    let counts = migrate::copy(&from_store, &to_store, apply).await?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "applied": apply,
                "tables": counts,
            }))?
        );
        return Ok(());
    }
    println!(
        "{:<14} {:>8} {:>8}",
        "TABLE",
        "SQLITE",
        if apply { "COPIED" } else { "TO COPY" }
    );
    for c in &counts {
        println!("{:<14} {:>8} {:>8}", c.table, c.source, c.copied);
    }
    let total: u64 = counts.iter().map(|c| c.copied).sum();
    if apply {
        println!("copied {total} row(s); rows already in PostgreSQL were kept. Give every replica the same key file ([store] key_file) as this SQLite store.");
    } else {
        println!(
            "dry run: nothing was written; {total} row(s) would be copied. Run again with --apply."
        );
    }
    Ok(())
}
