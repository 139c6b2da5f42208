//! Protocol front ends. Each one turns a legacy login into an identity,
//! obtains an access token from the engine and talks to the upstream with it.

pub mod http;
pub mod imap;
pub mod line;
pub mod mail;
pub mod pop3;
pub mod sasl;
pub mod session;
pub mod shaping;
pub mod slots;
pub mod smtp;
pub mod upstream;

/// Writes one access-log line (target `authswap::access`, level `info`):
/// identity (`-` when none was proved), protocol, outcome, the upstream's
/// status (HTTP answers relayed; absent otherwise) and the duration (HTTP:
/// until the answer's head; mail: the whole session).
pub fn access_line(
    protocol: crate::metrics::Protocol,
    identity: Option<&str>,
    outcome: &str,
    status: Option<u16>,
    duration: std::time::Duration,
) {
    let identity = identity.unwrap_or("-");
    let duration_ms = duration.as_secs_f64() * 1000.0;
    match status {
        Some(status) => {
            tracing::info!(target: "authswap::access", identity, protocol = ?protocol, outcome, upstream_status = status, duration_ms, "access")
        }
        None => {
            tracing::info!(target: "authswap::access", identity, protocol = ?protocol, outcome, duration_ms, "access")
        }
    }
}
