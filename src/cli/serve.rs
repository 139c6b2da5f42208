//! `authswap serve`: start the server and stop it gracefully on SIGTERM/SIGINT.

use crate::config::Config;
use crate::server::Server;
use std::time::Duration;

/// How long in-flight requests may take to finish after a stop signal.
const GRACE: Duration = Duration::from_secs(30);

pub(super) async fn run(config: Config) -> anyhow::Result<()> {
    let server = Server::start(config).await?;
    wait_for_signal().await?;
    tracing::info!("stop signal received; finishing in-flight requests");
    server.shutdown(GRACE).await;
    Ok(())
}

async fn wait_for_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}
