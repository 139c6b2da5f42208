//! `authswap serve`: start the server, reload the configuration on SIGHUP
//! and stop gracefully on SIGTERM/SIGINT.

use crate::config::Config;
use crate::server::Server;
use std::path::PathBuf;
use std::time::Duration;

/// How long in-flight requests may take to finish after a stop signal.
const GRACE: Duration = Duration::from_secs(30);

pub(super) async fn run(config: Config, path: PathBuf) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    // Before anything is bound: a SIGHUP during start must not kill us.
    let mut hup = signal(SignalKind::hangup())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let server = Server::start(config).await?;
    server.reload_from(path).await;
    loop {
        tokio::select! {
            _ = hup.recv() => {
                tracing::info!("SIGHUP received; reloading the configuration");
                // Logged (and counted) inside; a refused reload keeps serving.
                let _ = server.reload().await;
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    tracing::info!("stop signal received; finishing in-flight requests");
    server.shutdown(GRACE).await;
    Ok(())
}
