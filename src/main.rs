//! CLI entry point: parse arguments, set up logging, run one command, and
//! turn errors into a one-line reason and a non-zero exit code.

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = authswap::cli::Cli::parse();
    authswap::cli::init_logging(&cli);
    // `[runtime] worker_threads`; a configuration that does not load gets
    // the default here and its error from the command itself.
    let threads = authswap::config::Config::load(&cli.config)
        .map(|c| c.runtime.worker_threads)
        .unwrap_or(1);
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if threads > 0 {
        builder.worker_threads(threads);
    }
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("authswap: error: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(authswap::cli::run(cli)) {
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
            eprintln!("authswap: error: {}", line.replace('\n', " "));
            std::process::ExitCode::FAILURE
        }
    }
}
