//! CLI entry point: parse arguments, set up logging, run one command, and
//! turn errors into a one-line reason and a non-zero exit code.

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = authswap::cli::Cli::parse();
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
