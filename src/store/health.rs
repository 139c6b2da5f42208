//! Whether the store answers, as the running server last saw it: set by
//! the background reload (every `tokens.reload_interval`), by `/readyz` and
//! by store operations of token refreshes; shown as `authswap_store_up` and
//! counted in `authswap_store_errors_total{operation}`. Losing and getting
//! back the store are logged once each, not on every failure.
//!
//! While the store is down and a prober (the background reload) runs, token
//! refreshes fail at once with a temporary answer instead of each waiting
//! `store.connect_timeout` for a connection (and holding a refresh permit
//! meanwhile); access tokens in memory are served as usual.

use crate::metrics::{Metrics, StoreOperation};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// The store's reachability, shared by the application and the token engine.
#[derive(Debug)]
pub struct StoreHealth {
    up: AtomicBool,
    /// A background task probes the store, so a `down` state does not
    /// outlive the outage (it ends with the next successful probe).
    probed: AtomicBool,
    metrics: Arc<Metrics>,
}

impl StoreHealth {
    /// Starts as up (the store was just opened).
    pub fn new(metrics: Arc<Metrics>) -> StoreHealth {
        metrics.set_store_up(true);
        StoreHealth {
            up: AtomicBool::new(true),
            probed: AtomicBool::new(false),
            metrics,
        }
    }

    /// Whether the last store operation succeeded.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    /// Whether store operations may be skipped while the store is down: it
    /// is down and a background prober will notice when it is back.
    pub fn known_down(&self) -> bool {
        !self.is_up() && self.probed.load(Ordering::Acquire)
    }

    /// A background task now probes the store periodically.
    pub fn set_probed(&self) {
        self.probed.store(true, Ordering::Release);
    }

    /// A store operation succeeded; `true` when the store was down until now.
    pub fn succeeded(&self, operation: StoreOperation) -> bool {
        if self.up.swap(true, Ordering::AcqRel) {
            return false;
        }
        self.metrics.set_store_up(true);
        tracing::info!(?operation, "the store answers again: full service");
        true
    }

    /// A store operation failed with `error`; `true` when the store was up
    /// until now.
    pub fn failed(&self, operation: StoreOperation, error: &dyn std::fmt::Display) -> bool {
        self.metrics.store_error(operation);
        if !self.up.swap(false, Ordering::AcqRel) {
            tracing::debug!(?operation, %error, "the store is still unreachable");
            return false;
        }
        self.metrics.set_store_up(false);
        tracing::error!(
            ?operation,
            %error,
            "lost the store: serving access tokens held in memory, temporary answers for the rest, until it answers again"
        );
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transitions_are_reported_once_and_errors_counted() {
        let metrics = Arc::new(Metrics::new());
        let h = StoreHealth::new(metrics.clone());
        assert!(h.is_up());
        assert!(metrics.encode().contains("authswap_store_up 1\n"));
        assert!(!h.succeeded(StoreOperation::reload));
        assert!(h.failed(StoreOperation::refresh, &"refused"));
        assert!(!h.failed(StoreOperation::reload, &"refused"));
        assert!(!h.known_down(), "nobody probes yet");
        h.set_probed();
        assert!(h.known_down());
        let text = metrics.encode();
        assert!(text.contains("authswap_store_up 0\n"), "{text}");
        assert!(
            text.contains("authswap_store_errors_total{operation=\"refresh\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("authswap_store_errors_total{operation=\"readiness\"} 0\n"),
            "{text}"
        );
        assert!(h.succeeded(StoreOperation::readiness));
        assert!(!h.succeeded(StoreOperation::reload));
        assert!(!h.known_down());
        assert!(metrics.encode().contains("authswap_store_up 1\n"));
    }
}
