//! `authswap identity ...`: add, log in (device code), import, list,
//! re-password and remove identities. Works while `serve` runs: the server
//! notices the store's revision change and reloads.

use super::{IdentityCommand, StatusFilter};
use crate::config::Config;
use crate::identity::hash_password;
use crate::names::{self, Shown};
use crate::secret::Secret;
use crate::store::{
    now_unix, open_sealer, IdentityRecord, KeyUse, Mode, NewIdentity, Store, ValidationRecord,
    DEFAULT_TENANT,
};
use crate::token::{IdpClient, IdpError};
use anyhow::{anyhow, bail, Context};
use std::io::{BufRead, IsTerminal, Write};
use std::path::Path;
use std::time::Duration;

pub(super) async fn run(path: &Path, cmd: IdentityCommand) -> anyhow::Result<()> {
    let config = super::load_config(path)?;
    let opened = crate::store::open(&config).await?;
    let store: &dyn Store = opened.as_ref();
    match cmd {
        IdentityCommand::Add {
            name,
            mailbox,
            password_stdin,
            tenant,
            mode,
        } => {
            let who = NewIdentity {
                name,
                mailbox,
                password_hash: String::new(),
                tenant,
                mode,
            };
            add(&config, store, who, password_stdin).await
        }
        IdentityCommand::Login { name } => login(&config, store, &name).await,
        IdentityCommand::Import {
            name,
            refresh_token_stdin: _,
            no_verify,
        } => import(&config, store, &name, no_verify).await,
        IdentityCommand::List { status, json } => list(store, status, json).await,
        IdentityCommand::SetPassword {
            name,
            password_stdin,
        } => set_password(&config, store, &name, password_stdin).await,
        IdentityCommand::Validate { name, json } => validate(config, &name, json).await,
        IdentityCommand::Remove { name } => {
            store.remove(&name).await?;
            audit_cli(store, "identity.remove", &name).await;
            println!("identity {name} removed (refresh token and personal data deleted)");
            Ok(())
        }
        IdentityCommand::Forget { name } => {
            store.forget(&name).await?;
            audit_cli(store, "identity.forget", &name).await;
            println!(
                "registration data of {name} deleted (refresh token, account, mailbox, \
                 validations, invitations); set a mailbox and invite again to re-link it"
            );
            Ok(())
        }
        IdentityCommand::ImportCsv { file, json } => {
            super::invite::import_csv(&config, store, &file, json).await
        }
    }
}

/// Records an admin action taken at the command line (best effort: the
/// action itself already happened).
pub(super) async fn audit_cli(store: &dyn Store, action: &str, name: &str) {
    let entry = crate::store::NewAudit {
        actor: "cli",
        action,
        identity: Some(name),
        outcome: "ok",
        detail: None,
    };
    if let Err(e) = store.audit(&entry).await {
        eprintln!("warning: cannot write the audit log: {e}");
    }
}

pub(super) fn read_stdin_line(what: &str) -> anyhow::Result<Secret> {
    let mut line = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut line)
        .with_context(|| format!("cannot read the {what} from stdin"))?;
    let value = line.trim_end_matches(['\r', '\n']).to_owned();
    // Wipe the buffer copy.
    drop(zeroize::Zeroizing::new(line));
    Ok(Secret::new(value))
}

pub(super) fn read_password(from_stdin: bool) -> anyhow::Result<Secret> {
    let password = if from_stdin {
        read_stdin_line("password")?
    } else if std::io::stdin().is_terminal() {
        let first = Secret::new(rpassword::prompt_password(
            "Local password for the legacy client: ",
        )?);
        let second = Secret::new(rpassword::prompt_password("Repeat it: ")?);
        if first != second {
            bail!("the passwords differ");
        }
        first
    } else {
        bail!("stdin is not a terminal: pass --password-stdin and write the password to stdin");
    };
    if password.is_empty() {
        bail!("the password must not be empty");
    }
    if password.expose().chars().count() < 12 {
        eprintln!("warning: passwords shorter than 12 characters are easy to guess");
    }
    Ok(password)
}

async fn add(
    config: &Config,
    store: &dyn Store,
    mut new: NewIdentity,
    password_stdin: bool,
) -> anyhow::Result<()> {
    let name = names::validate_name(&new.name)?;
    let mailbox = names::validate_mailbox(&new.mailbox)?;
    config
        .check_identity_tenant(&new.tenant, new.mode)
        .map_err(|e| anyhow!(e))?;
    // Compare with every existing name the way a person reads them: case,
    // Unicode normalisation and invisible characters (which older stores
    // may hold) do not make a name different.
    let key = names::same_name_key(&name);
    if let Some(existing) = store
        .list()
        .await?
        .into_iter()
        .find(|r| names::same_name_key(&r.name) == key)
    {
        if names::lookup_key(&existing.name) == names::lookup_key(&name) {
            bail!(
                "an identity named `{}` already exists",
                Shown(&existing.name)
            );
        }
        bail!(
            "an identity named `{}` already exists (the names differ only in case, Unicode normalisation or invisible characters)",
            Shown(&existing.name)
        );
    }
    let password = read_password(password_stdin)?;
    new.password_hash = hash_password(password.expose(), &config.auth).map_err(|e| anyhow!(e))?;
    new.name = name;
    new.mailbox = mailbox;
    let rec = store.create(&new).await?;
    let tenant = if rec.tenant == DEFAULT_TENANT {
        String::new()
    } else {
        format!(", tenant {}", rec.tenant)
    };
    match rec.mode {
        Mode::Delegated => println!(
            "identity {} added for {} (pending{tenant}); link it with: authswap identity login {}",
            Shown(&rec.name),
            Shown(&rec.mailbox),
            Shown(&rec.name)
        ),
        Mode::App => println!(
            "identity {} added for {} (app-only{tenant}): no sign-in needed; check it with: authswap identity validate {}",
            Shown(&rec.name),
            Shown(&rec.mailbox),
            Shown(&rec.name)
        ),
    }
    Ok(())
}

async fn set_password(
    config: &Config,
    store: &dyn Store,
    name: &str,
    password_stdin: bool,
) -> anyhow::Result<()> {
    let rec = get(store, name).await?;
    let password = read_password(password_stdin)?;
    let hash = hash_password(password.expose(), &config.auth).map_err(|e| anyhow!(e))?;
    store.set_password(&rec.name, &hash).await?;
    println!("password of identity {} changed", Shown(&rec.name));
    Ok(())
}

async fn get(store: &dyn Store, name: &str) -> anyhow::Result<IdentityRecord> {
    store
        .get(name)
        .await?
        .ok_or_else(|| anyhow!("no identity named `{name}`"))
}

/// The identity-platform client of `rec`'s tenant, for a person's link;
/// app-only identities have nothing to link.
fn idp(config: &Config, rec: &IdentityRecord) -> anyhow::Result<IdpClient> {
    if rec.mode == Mode::App {
        bail!(
            "identity {} is app-only: the tenant's app credential acts for its mailbox, nobody signs in",
            Shown(&rec.name)
        );
    }
    let Some(idp) = config.tenant(&rec.tenant) else {
        bail!(
            "identity {} belongs to tenant `{}`, which is not configured",
            Shown(&rec.name),
            rec.tenant
        );
    };
    if idp.client_id.trim().is_empty() {
        bail!("the client_id of tenant `{}` is not set: register an app in Entra ID and configure it first", rec.tenant);
    }
    let tls = crate::tls::client_config(&config.tls)?;
    let client = crate::tls::https_client(tls, crate::tls::CONNECT_TIMEOUT);
    Ok(crate::tenant::idp_client(idp, client)?)
}

/// Scopes requested at login.
fn login_scopes(config: &Config) -> Vec<String> {
    config.login_scopes()
}

fn format_left(d: Duration) -> String {
    let s = d.as_secs();
    format!("{}:{:02}", s / 60, s % 60)
}

async fn login(config: &Config, store: &dyn Store, name: &str) -> anyhow::Result<()> {
    let rec = get(store, name).await?;
    let idp = idp(config, &rec)?;
    let sealer = open_sealer(&config.store, store, KeyUse::Link).await?;
    // `openid profile`: the ID token names the account that signed in.
    let scopes = crate::token::idp::with_signin_scopes(&login_scopes(config));
    let login = idp
        .start_device_login(&scopes)
        .await
        .map_err(|e| anyhow!("cannot start the device-code login: {e}"))?;
    println!(
        "To link identity {} ({}), open {} in a browser and enter the code {}",
        Shown(&rec.name),
        Shown(&rec.mailbox),
        login.verification_uri(),
        login.user_code()
    );
    println!(
        "Sign in as {}. The code expires in {}.",
        Shown(&rec.mailbox),
        format_left(login.expires_in())
    );
    let _ = std::io::stdout().flush();
    let terminal = std::io::stderr().is_terminal();
    let grant = idp
        .finish_device_login(&login, |left| {
            if terminal {
                eprint!("\rwaiting for sign-in… {} left ", format_left(left));
                let _ = std::io::stderr().flush();
            }
        })
        .await;
    if terminal {
        eprintln!();
    }
    let grant = grant.map_err(|e| match e {
        IdpError::Reauth { message, .. } => anyhow!("login failed: {message}"),
        other => anyhow!("login failed: {other}"),
    })?;
    let id_token = grant.id_token.as_ref().ok_or_else(|| {
        anyhow!("the identity platform returned no ID token, so the account that signed in is unknown; nothing was stored (the app registration must allow the openid and profile scopes)")
    })?;
    let idp_config = config
        .tenant(&rec.tenant)
        .ok_or_else(|| anyhow!("tenant `{}` is not configured", rec.tenant))?;
    let claims = crate::token::id_token::validate(
        id_token.expose(),
        &crate::token::id_token::Expected {
            authority: &idp_config.authority,
            tenant: &idp_config.tenant,
            client_id: idp_config.client_id.trim(),
            nonce: None,
            now: now_unix(),
        },
    )
    .map_err(|e| anyhow!("cannot verify the sign-in: {e}; nothing was stored"))?;
    if !config.onboarding.accepts(&rec.mailbox, &claims.account) {
        bail!(
            "signed in as {} but identity {} is for {}; nothing was stored. Run the login again and sign in as {} (or add the account to [onboarding] aliases)",
            Shown(&claims.account),
            Shown(&rec.name),
            Shown(&rec.mailbox),
            Shown(&rec.mailbox)
        );
    }
    let refresh = grant.refresh_token.ok_or_else(|| {
        anyhow!("the identity platform returned no refresh token; include offline_access in identity_provider.login_scopes")
    })?;
    let account = crate::store::LinkedAccount {
        upn: claims.account,
        oid: claims.oid,
        tid: claims.tid,
    };
    store
        .link_account(rec.id, &sealer.seal(rec.id, &refresh), &account)
        .await?;
    println!(
        "identity {} linked to {}",
        Shown(&rec.name),
        Shown(&rec.mailbox)
    );
    Ok(())
}

async fn import(
    config: &Config,
    store: &dyn Store,
    name: &str,
    no_verify: bool,
) -> anyhow::Result<()> {
    let rec = get(store, name).await?;
    let idp = idp(config, &rec)?;
    let sealer = open_sealer(&config.store, store, KeyUse::Link).await?;
    let token = read_stdin_line("refresh token")?;
    let token = Secret::new(token.expose().trim().to_owned());
    if token.is_empty() {
        bail!("no refresh token on stdin");
    }
    store.link(rec.id, &sealer.seal(rec.id, &token)).await?;
    let generation = rec.token_generation + 1;
    if no_verify {
        println!(
            "identity {} linked with the imported refresh token (not verified)",
            Shown(&rec.name)
        );
        return Ok(());
    }
    match idp.refresh(&token, &login_scopes(config)).await {
        Ok(grant) => {
            if let Some(new) = grant.refresh_token.filter(|n| n != &token) {
                store
                    .rotate(rec.id, generation, &sealer.seal(rec.id, &new), now_unix())
                    .await?;
            } else {
                store.record_success(rec.id, now_unix()).await?;
            }
            println!(
                "identity {} linked with the imported refresh token (verified)",
                Shown(&rec.name)
            );
            Ok(())
        }
        Err(IdpError::Reauth { message, .. }) => {
            store
                .record_failure(rec.id, true, &message, now_unix())
                .await?;
            bail!("the identity platform refused the imported refresh token: {message}")
        }
        Err(e) => {
            eprintln!("warning: imported, but could not verify the token now: {e}");
            println!(
                "identity {} linked with the imported refresh token (not verified)",
                Shown(&rec.name)
            );
            Ok(())
        }
    }
}

/// `identity validate NAME`: one line per protocol (or JSON); fails (exit
/// 1) unless every protocol passed.
async fn validate(config: Config, name: &str, json: bool) -> anyhow::Result<()> {
    let app = crate::app::App::open(config).await?;
    let results = crate::validate::validate(&app, name, "cli").await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&results)?);
    } else {
        for r in &results {
            println!(
                "{:<5} {:<6} {}  ({})",
                r.protocol,
                if r.ok { "ok" } else { "FAILED" },
                Shown(&r.answer),
                r.meaning
            );
        }
    }
    if results.is_empty() {
        bail!("no front end is enabled: nothing to validate");
    }
    let failed: Vec<&str> = results
        .iter()
        .filter(|r| !r.ok)
        .map(|r| r.protocol.as_str())
        .collect();
    if !failed.is_empty() {
        bail!(
            "identity {} failed validation: {}",
            Shown(name),
            failed.join(", ")
        );
    }
    Ok(())
}

/// The last validation per protocol of identity `id`, compact:
/// `ews:ok smtp:FAILED`, or `-`.
fn validation_summary(all: &[(i64, ValidationRecord)], id: i64) -> String {
    let parts: Vec<String> = all
        .iter()
        .filter(|(i, _)| *i == id)
        .map(|(_, v)| format!("{}:{}", v.protocol, if v.ok { "ok" } else { "FAILED" }))
        .collect();
    if parts.is_empty() {
        "-".into()
    } else {
        parts.join(" ")
    }
}

/// Widest column of the `identity list` table, in characters.
const MAX_COLUMN: usize = 64;

pub(super) fn time(t: Option<i64>) -> String {
    t.and_then(|s| u64::try_from(s).ok())
        .map(|s| {
            humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_secs(s))
                .to_string()
        })
        .unwrap_or_else(|| "-".into())
}

async fn list(store: &dyn Store, filter: StatusFilter, json: bool) -> anyhow::Result<()> {
    let records: Vec<IdentityRecord> = store
        .list()
        .await?
        .into_iter()
        .filter(|r| match filter {
            StatusFilter::All => true,
            StatusFilter::Ok => r.is_ok(),
            StatusFilter::Error => !r.is_ok(),
        })
        .collect();
    print_list(store, &records, json).await?;
    // `--status error` lists only identities that need attention: exit 1
    // when there is any, so that scripts and cron jobs notice.
    if filter == StatusFilter::Error && !records.is_empty() {
        anyhow::bail!(
            "{} identit{} need{} attention",
            records.len(),
            if records.len() == 1 { "y" } else { "ies" },
            if records.len() == 1 { "s" } else { "" }
        );
    }
    Ok(())
}

async fn print_list(
    store: &dyn Store,
    records: &[IdentityRecord],
    json: bool,
) -> anyhow::Result<()> {
    let validations = store.validations().await?;
    if json {
        let rows: Vec<serde_json::Value> = records
            .iter()
            .map(|r| {
                let last: Vec<&ValidationRecord> = validations
                    .iter()
                    .filter(|(i, _)| *i == r.id)
                    .map(|(_, v)| v)
                    .collect();
                serde_json::json!({
                    "validation": last,
                    "name": r.name,
                    "mailbox": r.mailbox,
                    "tenant": r.tenant,
                    "mode": r.mode,
                    "status": r.shown_status(),
                    "tenant_block": r.tenant_block,
                    "ok": r.is_ok(),
                    "linked": r.has_refresh_token,
                    "last_error": r.last_error,
                    "last_success_at": r.last_success_at.map(|t| time(Some(t))),
                    "last_failure_at": r.last_failure_at.map(|t| time(Some(t))),
                    "created_at": time(Some(r.created_at)),
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    if records.is_empty() {
        println!("no identities");
        return Ok(());
    }
    // Column widths in characters, capped: a longer value (only possible
    // in stores written before names and mailboxes were bounded) runs past
    // its column rather than stretch every row (or exceed the formatter's
    // largest width).
    let width = |value: fn(&IdentityRecord) -> &str, header: usize| {
        records
            .iter()
            .map(|r| Shown(value(r)).chars())
            .max()
            .unwrap_or(0)
            .clamp(header, MAX_COLUMN)
    };
    let w_name = width(|r| &r.name, 4);
    let w_mail = width(|r| &r.mailbox, 7);
    let w_tenant = width(|r| &r.tenant, 6);
    let summaries: Vec<String> = records
        .iter()
        .map(|r| validation_summary(&validations, r.id))
        .collect();
    let w_val = summaries.iter().map(|s| s.len()).max().unwrap_or(0).max(10);
    println!(
        "{:<w_name$}  {:<w_mail$}  {:<w_tenant$}  {:<9}  {:<16}  {:<20}  {:<20}  {:<w_val$}  LAST ERROR",
        "NAME", "MAILBOX", "TENANT", "MODE", "STATUS", "LAST SUCCESS", "LAST FAILURE", "VALIDATION"
    );
    for (r, summary) in records.iter().zip(&summaries) {
        // Padding by hand: `{:<w$}` pads by `char`s of the value, not of
        // its escaped display.
        let pad = |shown: Shown, w: usize| {
            let n = shown.chars();
            format!("{shown}{}", " ".repeat(w.saturating_sub(n)))
        };
        println!(
            "{}  {}  {:<w_tenant$}  {:<9}  {:<16}  {:<20}  {:<20}  {:<w_val$}  {}",
            pad(Shown(&r.name), w_name),
            pad(Shown(&r.mailbox), w_mail),
            r.tenant,
            r.mode.as_str(),
            r.shown_status(),
            time(r.last_success_at),
            time(r.last_failure_at),
            summary,
            Shown(r.shown_error().unwrap_or("-"))
        );
    }
    Ok(())
}
