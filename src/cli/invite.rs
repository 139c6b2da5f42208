//! `authswap invite ...` and `identity import-csv`: invitations issued on
//! the store directly (a running `serve` sees them at once), listed and
//! revoked; identities created in bulk from CSV.

use super::identity::{audit_cli, read_password, time};
use super::{InviteArgs, InviteCommand};
use crate::app::App;
use crate::config::Config;
use crate::identity::hash_password;
use crate::names::{self, Shown};
use crate::onboarding::import::{self, generate_password, ImportError};
use crate::onboarding::invite::{self, IssuedInvitation};
use crate::store::{
    now_unix, IdentityRecord, Mode, NewAudit, NewIdentity, Status, Store, DEFAULT_TENANT,
};
use anyhow::{anyhow, bail};
use std::path::Path;

pub(super) async fn run(path: &Path, args: InviteArgs) -> anyhow::Result<()> {
    let config = super::load_config(path)?;
    let opened = crate::store::open(&config).await?;
    let store: &dyn Store = opened.as_ref();
    match args.command {
        Some(InviteCommand::List { json }) => return list(store, json).await,
        Some(InviteCommand::Revoke { name }) => {
            let rec = store
                .get(&name)
                .await?
                .ok_or_else(|| anyhow!("no identity named `{name}`"))?;
            let n = store.revoke_invitations(rec.id, now_unix()).await?;
            audit_cli(store, "invitation.revoke", &rec.name).await;
            println!("{n} pending invitation(s) of {} revoked", Shown(&rec.name));
            return Ok(());
        }
        None => {}
    }
    let targets: Vec<IdentityRecord> = if args.all_pending {
        store
            .list()
            .await?
            .into_iter()
            .filter(|r| matches!(r.status, Status::Pending | Status::NeedsReauth))
            .filter(|r| !r.mailbox.is_empty())
            .collect()
    } else {
        let name = args.name.as_deref().expect("clap requires a name");
        vec![target(&config, store, name, &args).await?]
    };
    if targets.is_empty() {
        eprintln!("every identity is linked: nobody to invite");
    }
    // E-mail goes out through the SMTP upstream as the sender identity:
    // that needs the token engine.
    let app = if args.email {
        if config.notifications.email_sender.is_none() {
            bail!("--email needs [notifications] email_sender: the identity whose mailbox sends invitations");
        }
        Some(App::open(config.clone()).await?)
    } else {
        None
    };
    let mut failed = 0;
    for rec in &targets {
        let issued = invite::issue(store, &config, rec, "cli").await?;
        print_invitation(rec, &issued, args.json)?;
        if let Some(app) = &app {
            let outcome = crate::notify::send_invitation_email(app, rec, &issued).await;
            let entry = NewAudit {
                actor: "cli",
                action: "notification.email",
                identity: Some(&rec.name),
                outcome: if outcome.is_ok() { "ok" } else { "failed" },
                detail: Some("invitation e-mail"),
            };
            if let Err(e) = store.audit(&entry).await {
                eprintln!("warning: cannot write the audit log: {e}");
            }
            match outcome {
                Ok(()) => eprintln!("invitation e-mailed to {}", Shown(&rec.mailbox)),
                Err(e) => {
                    failed += 1;
                    eprintln!(
                        "cannot e-mail the invitation to {}: {e}",
                        Shown(&rec.mailbox)
                    );
                }
            }
        }
    }
    if failed > 0 {
        bail!("{failed} invitation e-mail(s) not sent (the invitations are valid: pass the links on another way)");
    }
    Ok(())
}

/// The identity to invite: existing (its mailbox set when it has none), or
/// created with `--mailbox`.
async fn target(
    config: &Config,
    store: &dyn Store,
    name: &str,
    args: &InviteArgs,
) -> anyhow::Result<IdentityRecord> {
    let mailbox = args
        .mailbox
        .as_deref()
        .map(names::validate_mailbox)
        .transpose()?;
    if let Some(rec) = store.get(name).await? {
        if rec.mode == Mode::App {
            bail!(
                "identity `{}` is app-only: the tenant's app credential acts for its mailbox, nobody signs in, so there is nothing to invite to",
                Shown(&rec.name)
            );
        }
        if let Some(t) = args.tenant.as_deref().filter(|t| *t != rec.tenant) {
            bail!(
                "identity `{}` belongs to tenant `{}`, not `{t}`",
                Shown(&rec.name),
                rec.tenant
            );
        }
        return match mailbox {
            Some(m) if rec.mailbox.is_empty() => {
                store.set_mailbox(&rec.name, &m).await?;
                audit_cli(store, "identity.set_mailbox", &rec.name).await;
                Ok(store.get(&rec.name).await?.expect("just updated"))
            }
            Some(m) if !m.eq_ignore_ascii_case(&rec.mailbox) => bail!(
                "identity `{}` is for {}, not {}; remove it or invite without --mailbox",
                Shown(&rec.name),
                Shown(&rec.mailbox),
                Shown(&m)
            ),
            _ => Ok(rec),
        };
    }
    let Some(mailbox) = mailbox else {
        bail!("no identity named `{name}`: give its mailbox with --mailbox to create it");
    };
    let name = names::validate_name(name)?;
    let (hash, generated) = if args.generate_password {
        let pw = generate_password();
        (
            hash_password(pw.expose(), &config.auth).map_err(|e| anyhow!(e))?,
            Some(pw),
        )
    } else if args.password_stdin {
        let pw = read_password(true)?;
        (
            hash_password(pw.expose(), &config.auth).map_err(|e| anyhow!(e))?,
            None,
        )
    } else {
        // No local password yet: `identity set-password` later.
        (String::new(), None)
    };
    let tenant = args
        .tenant
        .clone()
        .unwrap_or_else(|| DEFAULT_TENANT.to_owned());
    config
        .check_identity_tenant(&tenant, Mode::Delegated)
        .map_err(|e| anyhow!(e))?;
    let rec = store
        .create(&NewIdentity {
            name,
            mailbox,
            password_hash: hash.clone(),
            tenant,
            mode: Mode::Delegated,
        })
        .await?;
    audit_cli(store, "identity.create", &rec.name).await;
    match generated {
        Some(pw) => eprintln!(
            "identity {} created; its local password (shown once): {}",
            Shown(&rec.name),
            pw.expose()
        ),
        None if hash.is_empty() => eprintln!(
            "identity {} created without a local password; set one with: authswap identity set-password {}",
            Shown(&rec.name),
            Shown(&rec.name)
        ),
        None => eprintln!("identity {} created", Shown(&rec.name)),
    }
    Ok(rec)
}

fn print_invitation(
    rec: &IdentityRecord,
    issued: &IssuedInvitation,
    json: bool,
) -> anyhow::Result<()> {
    if json {
        println!(
            "{}",
            serde_json::json!({
                "identity": rec.name,
                "mailbox": rec.mailbox,
                "url": issued.url.expose(),
                "code": issued.code.expose(),
                "expires_at": time(Some(issued.record.expires_at)),
            })
        );
    } else {
        println!(
            "invitation for {} ({}), valid until {}:\n  link: {}\n  code: {}",
            Shown(&rec.name),
            Shown(&rec.mailbox),
            time(Some(issued.record.expires_at)),
            issued.url.expose(),
            issued.code.expose()
        );
    }
    Ok(())
}

async fn list(store: &dyn Store, json: bool) -> anyhow::Result<()> {
    let all = store.list_invitations().await?;
    if json {
        let rows: Vec<serde_json::Value> = all
            .iter()
            .map(|i| {
                serde_json::json!({
                    "identity": i.identity,
                    "mailbox": i.mailbox,
                    "state": i.state,
                    "created_at": time(Some(i.created_at)),
                    "expires_at": time(Some(i.expires_at)),
                    "finished_at": i.finished_at.map(|t| time(Some(t))),
                    "created_by": i.actor,
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    if all.is_empty() {
        println!("no invitations");
        return Ok(());
    }
    println!(
        "{:<24}  {:<32}  {:<10}  {:<20}  EXPIRES",
        "IDENTITY", "MAILBOX", "STATE", "CREATED"
    );
    for i in &all {
        println!(
            "{:<24}  {:<32}  {:<10}  {:<20}  {}",
            Shown(&i.identity).to_string(),
            Shown(&i.mailbox).to_string(),
            i.state.as_str(),
            time(Some(i.created_at)),
            time(Some(i.expires_at))
        );
    }
    Ok(())
}

/// `identity import-csv FILE`.
pub(super) async fn import_csv(
    config: &Config,
    store: &dyn Store,
    file: &Path,
    json: bool,
) -> anyhow::Result<()> {
    let bytes = std::fs::read(file).map_err(|e| anyhow!("cannot read {}: {e}", file.display()))?;
    let imported = match import::import(store, config, &bytes, "cli").await {
        Ok(v) => v,
        Err(ImportError::Rows(rows)) => {
            for r in &rows {
                eprintln!("{}:{}: {}", file.display(), r.line, r.message);
            }
            bail!(
                "{} row(s) cannot be imported; nothing was imported",
                rows.len()
            );
        }
        Err(e) => return Err(e.into()),
    };
    for i in &imported {
        let pw = i.generated_password.as_ref().map(|p| p.expose());
        if json {
            println!(
                "{}",
                serde_json::json!({
                    "identity": i.record.name,
                    "mailbox": i.record.mailbox,
                    "generated_password": pw,
                })
            );
        } else {
            match pw {
                Some(pw) => println!(
                    "{}  {}  password (shown once): {pw}",
                    Shown(&i.record.name),
                    Shown(&i.record.mailbox)
                ),
                None => println!("{}  {}", Shown(&i.record.name), Shown(&i.record.mailbox)),
            }
        }
    }
    eprintln!(
        "{} identities imported (pending); invite them with: authswap invite --all-pending",
        imported.len()
    );
    Ok(())
}
