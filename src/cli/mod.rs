//! Command-line interface: argument definitions (clap), logging set-up and
//! dispatch to one file per subcommand. `anyhow` is used only here, at the
//! edge.

mod admin;
mod config_cmd;
mod docs;
mod doctor;
mod healthcheck;
mod identity;
mod invite;
mod serve;
mod store_cmd;

use crate::store::Mode;
use clap::{Args, Parser, Subcommand, ValueEnum};
use std::io::IsTerminal;
use std::path::PathBuf;

/// authswap: Basic-auth front ends for OAuth 2.0-only mail and EWS servers.
#[derive(Debug, Parser)]
#[command(name = "authswap", version, about, long_about = None)]
pub struct Cli {
    /// Configuration file.
    #[arg(short = 'c', long = "config", global = true, env = "AUTHSWAP_CONFIG", default_value = crate::config::DEFAULT_CONFIG_PATH)]
    pub config: PathBuf,
    /// Log format: `auto` is human on a terminal, else human without colour.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Auto)]
    pub log_format: LogFormat,
    /// The command.
    #[command(subcommand)]
    pub command: Command,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable; colours only on a terminal.
    Auto,
    /// Human-readable.
    Human,
    /// One JSON object per line.
    Json,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the proxy (HTTP, SMTP, IMAP, POP3 front ends and the admin listener) until SIGTERM/SIGINT; SIGHUP reloads the configuration.
    Serve,
    /// Manage identities.
    #[command(subcommand)]
    Identity(IdentityCommand),
    /// Invite people to link identities in their browser; list and revoke invitations.
    Invite(InviteArgs),
    /// Inspect the configuration.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Admin console helpers.
    #[command(subcommand)]
    Admin(AdminCommand),
    /// Store maintenance.
    #[command(subcommand)]
    Store(StoreCommand),
    /// Probe the admin listener's /healthz (for container HEALTHCHECKs; over TLS when the admin listener serves it or the URL is https://, the certificate verified); exit 0 when healthy.
    Healthcheck(HealthcheckArgs),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell) on stdout.
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff) on stdout: `authswap man | man -l -`.
    Man,
    /// Check the setup end to end (configuration, key file, store, identity platform and app registration, upstreams and their TLS certificates, identities); one line per check (ok/warn/fail); exit 1 when a check fails.
    Doctor(DoctorArgs),
}

/// `doctor` arguments.
#[derive(Debug, Args)]
pub struct DoctorArgs {
    /// JSON output: an array of `{check, level, message}`.
    #[arg(long)]
    pub json: bool,
}

/// `identity` subcommands.
#[derive(Debug, Subcommand)]
pub enum IdentityCommand {
    /// Create an identity: the name the legacy client sends, its mailbox and a local password.
    Add {
        /// Name the legacy client uses (case-insensitive).
        name: String,
        /// Upstream mailbox (UPN), e.g. user@contoso.com.
        #[arg(long)]
        mailbox: String,
        /// Read the local password from the first line of stdin.
        #[arg(long)]
        password_stdin: bool,
        /// Configured tenant the mailbox belongs to (`default` is
        /// `[identity_provider]`).
        #[arg(long, default_value = "default")]
        tenant: String,
        /// `delegated` (a person consents once) or `app` (the tenant's app
        /// credential acts for the mailbox; no sign-in).
        #[arg(long, default_value = "delegated", value_parser = parse_mode)]
        mode: Mode,
    },
    /// Link an identity to its Microsoft account with the device-code flow.
    Login {
        /// Identity name.
        name: String,
    },
    /// Link an identity with an existing refresh token (migration from other tools).
    Import {
        /// Identity name.
        name: String,
        /// Read the refresh token from stdin.
        #[arg(long, required = true)]
        refresh_token_stdin: bool,
        /// Do not try the token against the identity platform.
        #[arg(long)]
        no_verify: bool,
    },
    /// List identities and their status.
    List {
        /// Which identities: all, ok (linked, last refresh fine) or error (anything needing attention).
        #[arg(long, value_enum, default_value_t = StatusFilter::All)]
        status: StatusFilter,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Change an identity's local password.
    SetPassword {
        /// Identity name.
        name: String,
        /// Read the new password from the first line of stdin.
        #[arg(long)]
        password_stdin: bool,
    },
    /// Prove the identity end to end: an access token per enabled front end, tried against its upstream (EWS GetFolder or the HTTP probe path, SMTP/IMAP/POP3 XOAUTH2 login). Exit 0 when every protocol passes.
    Validate {
        /// Identity name.
        name: String,
        /// JSON output (an array, one object per protocol).
        #[arg(long)]
        json: bool,
    },
    /// Delete an identity with its tokens and personal data.
    Remove {
        /// Identity name.
        name: String,
    },
    /// Delete an identity's registration data (refresh token, cached
    /// access tokens, Microsoft account, mailbox, validations,
    /// invitations); the name and local password stay, status pending.
    Forget {
        /// Identity name.
        name: String,
    },
    /// Create identities from a CSV file (header row: name, mailbox,
    /// password; password `generate` makes one and prints it once, empty
    /// sets none yet). A file with a bad row imports nothing.
    ImportCsv {
        /// The CSV file (UTF-8).
        file: PathBuf,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
}

/// `invite` arguments: `invite NAME`, `invite --all-pending`, or a subcommand.
#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct InviteArgs {
    /// List or revoke invitations.
    #[command(subcommand)]
    pub command: Option<InviteCommand>,
    /// Identity to invite (created when `--mailbox` is given and it does not exist).
    #[arg(required_unless_present = "all_pending")]
    pub name: Option<String>,
    /// Mailbox (UPN) of the identity; required when the identity does not exist yet.
    #[arg(long)]
    pub mailbox: Option<String>,
    /// Invite every identity that is not linked (pending, needs re-authentication).
    #[arg(long, conflicts_with_all = ["name", "mailbox"])]
    pub all_pending: bool,
    /// For a new identity: read its local password from the first line of stdin.
    #[arg(long, conflicts_with = "generate_password")]
    pub password_stdin: bool,
    /// For a new identity: generate a local password and print it once.
    #[arg(long)]
    pub generate_password: bool,
    /// For a new identity: its configured tenant (`default` is
    /// `[identity_provider]`).
    #[arg(long, conflicts_with = "all_pending")]
    pub tenant: Option<String>,
    /// Also e-mail the invitation to the mailbox (needs `[notifications] email_sender`).
    #[arg(long)]
    pub email: bool,
    /// One JSON object per invitation (`url`, `code`, `expires_at`, `identity`).
    #[arg(long)]
    pub json: bool,
}

/// `invite` subcommands.
#[derive(Debug, Subcommand)]
pub enum InviteCommand {
    /// List invitations (newest first) with their state.
    List {
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Revoke an identity's pending invitations.
    Revoke {
        /// Identity name.
        name: String,
    },
}

/// Filter for `identity list`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StatusFilter {
    /// Every identity.
    All,
    /// Linked, and the last refresh (if any) succeeded.
    Ok,
    /// Pending, needing re-authentication, or whose last refresh failed.
    Error,
}

/// `admin` subcommands.
#[derive(Debug, Subcommand)]
pub enum AdminCommand {
    /// Print a one-time link that signs a browser in to the admin console (valid 60 s, single use).
    SigninLink {
        /// Page to open after signing in (a path such as /identities?status=error).
        #[arg(long, default_value = "/identities")]
        next: String,
    },
}

/// `config` subcommands.
#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Validate the configuration and print it with secrets redacted.
    Check,
}

/// `store` subcommands.
#[derive(Debug, Subcommand)]
pub enum StoreCommand {
    /// Copy an embedded SQLite store into PostgreSQL (a dry run unless
    /// --apply; rows already there are kept, so it can run again).
    Migrate {
        /// The SQLite store: `sqlite:PATH` (or a plain path).
        #[arg(long)]
        from: String,
        /// The PostgreSQL database (`postgres://...`); default: `[store] url`.
        /// Its password comes from `[store] password`/`password_file` or
        /// AUTHSWAP_STORE__PASSWORD when the URL has none.
        #[arg(long)]
        to: Option<String>,
        /// Write (without it, nothing is written: counts only).
        #[arg(long)]
        apply: bool,
        /// Counts as JSON.
        #[arg(long)]
        json: bool,
    },
}

/// `healthcheck` arguments.
#[derive(Debug, Args)]
pub struct HealthcheckArgs {
    /// URL to probe instead of http(s)://<admin.listen>/healthz; https:// URLs are verified against the built-in roots and tls.extra_ca_file.
    #[arg(long)]
    pub url: Option<String>,
}

/// Sets up tracing: filter from `AUTHSWAP_LOG` or `RUST_LOG` (default `info`
/// for `serve`, `warn` otherwise), output on stderr.
pub fn init_logging(cli: &Cli) {
    use tracing_subscriber::EnvFilter;
    let default = if matches!(cli.command, Command::Serve) {
        "info"
    } else {
        "warn"
    };
    // An invalid filter is not ignored silently: the default applies and
    // the first log line says why.
    let mut refused = None;
    let filter = [
        ("AUTHSWAP_LOG", std::env::var("AUTHSWAP_LOG")),
        ("RUST_LOG", std::env::var("RUST_LOG")),
    ]
    .into_iter()
    .find_map(|(var, value)| value.ok().map(|v| (var, v)))
    .and_then(|(var, value)| match EnvFilter::try_new(&value) {
        Ok(f) => Some(f),
        Err(e) => {
            refused = Some((var, value, e.to_string()));
            None
        }
    })
    .unwrap_or_else(|| EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let result = match cli.log_format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Human => builder.with_ansi(false).try_init(),
        LogFormat::Auto => builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init(),
    };
    let _ = result;
    if let Some((var, value, error)) = refused {
        let value = value.escape_debug().to_string();
        tracing::error!(
            "{var}={value} is not a valid log filter ({error}); logging at the default level `{default}` instead. Use tracing EnvFilter syntax, e.g. {var}=authswap=debug,info"
        );
    }
}

/// Runs the parsed command to completion on its own runtime. `serve` loads
/// the configuration first, so that its runtime has `[runtime]
/// worker_threads`; the other commands are short and use one worker.
pub fn execute(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve => {
            let config = load_config(&cli.config)?;
            let rt = runtime(config.runtime.worker_threads)?;
            let path = cli.config.clone();
            // On a thread of its own rather than `main`: its allocations
            // then come from a glibc thread arena, which kept a logged-in
            // mail session at ~37 KiB resident against ~51 KiB from the
            // main arena (benches/footprint.rs).
            std::thread::Builder::new()
                .name("authswap".into())
                .spawn(move || rt.block_on(serve::run(config, path)))?
                .join()
                .map_err(|_| anyhow::anyhow!("the server thread panicked"))?
        }
        Command::Identity(cmd) => runtime(1)?.block_on(identity::run(&cli.config, cmd)),
        Command::Admin(cmd) => runtime(1)?.block_on(admin::run(&cli.config, cmd)),
        Command::Invite(args) => runtime(1)?.block_on(invite::run(&cli.config, args)),
        Command::Config(ConfigCommand::Check) => config_cmd::check(&cli.config),
        Command::Store(cmd) => runtime(1)?.block_on(store_cmd::run(&cli.config, cmd)),
        Command::Healthcheck(args) => runtime(1)?.block_on(healthcheck::run(&cli.config, args)),
        Command::Completions { shell } => docs::completions(shell),
        Command::Man => docs::man(),
        Command::Doctor(args) => runtime(1)?.block_on(doctor::run(&cli.config, args)),
    }
}

/// The runtime for `threads` workers: one runs everything on the calling
/// thread (tokio's current-thread scheduler: no second thread to wake, no
/// work-stealing queues; ~3% fewer instructions per proxied request than a
/// one-worker multi-thread runtime); more, or 0 (one per CPU), use the
/// multi-thread scheduler. Blocking work (argon2, SQLite) has its own pool
/// either way.
fn runtime(threads: usize) -> anyhow::Result<tokio::runtime::Runtime> {
    let mut builder = if threads == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    if threads > 1 {
        builder.worker_threads(threads);
    }
    anyhow::Context::context(builder.enable_all().build(), "cannot start the runtime")
}

fn load_config(path: &std::path::Path) -> anyhow::Result<crate::config::Config> {
    Ok(crate::config::Config::load(path)?)
}

/// Parses `--mode`.
fn parse_mode(s: &str) -> Result<Mode, String> {
    Mode::parse(s).ok_or_else(|| format!("`{s}` is not a mode: use `delegated` or `app`"))
}
