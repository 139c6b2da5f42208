//! CLI entry point: parse arguments, set up logging, run one command, and
//! turn errors into a one-line reason and a non-zero exit code.

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = match authswap::cli::Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage_error(e),
    };
    authswap::cli::init_logging(&cli);
    match authswap::cli::execute(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // One line: the error and its causes.
            let mut line = e.to_string();
            for cause in e.chain().skip(1) {
                let c = cause.to_string();
                if !line.contains(&c) {
                    line.push_str(": ");
                    line.push_str(&c);
                }
            }
            // Any URL the error quotes (from the configuration) loses its
            // user name and password.
            let line = line.replace('\n', " ");
            eprintln!(
                "authswap: error: {}",
                authswap::config::redact_userinfo(&line)
            );
            std::process::ExitCode::FAILURE
        }
    }
}

/// A usage error in one line and a hint (exit 2, as clap does); `--help`,
/// `--version` and a bare `authswap` print what clap prints.
fn usage_error(e: clap::Error) -> std::process::ExitCode {
    use clap::error::ErrorKind;
    if matches!(
        e.kind(),
        ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    ) {
        e.exit();
    }
    let rendered = e.render().to_string();
    let first = rendered
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("invalid arguments");
    let mut reason = first.strip_prefix("error: ").unwrap_or(first).to_owned();
    if let Some(values) = rendered
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with("[possible values:"))
    {
        reason.push(' ');
        reason.push_str(values);
    }
    // The subcommand path clap names in its usage line, for the hint.
    let usage = rendered
        .lines()
        .find_map(|l| l.trim().strip_prefix("Usage: "))
        .map(|u| {
            u.split_whitespace()
                .take_while(|w| !w.starts_with(['[', '<', '-']))
                .collect::<Vec<_>>()
                .join(" ")
        })
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| "authswap".to_owned());
    eprintln!("authswap: error: {reason} (try '{usage} --help')");
    std::process::ExitCode::from(2)
}
