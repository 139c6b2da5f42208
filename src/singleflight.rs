//! Single-flight execution: concurrent callers asking for the same key share
//! one run of the work. The work runs in its own task, so it completes (and,
//! for token refreshes, persists a rotated refresh token) even when every
//! caller has gone away.
//!
//! The flight leaves the table as soon as the work ends, before its callers
//! wake: whatever should spare later callers a new flight (a cached token,
//! a cached proof) must be published by the work itself, not by the callers.

use futures_util::future::{BoxFuture, FutureExt, Shared};
use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::{Arc, Mutex};

type Flights<K, V> = Arc<Mutex<HashMap<K, Shared<BoxFuture<'static, V>>>>>;

/// At most one in-flight run per key.
pub struct SingleFlight<K, V> {
    flights: Flights<K, V>,
}

impl<K, V> Default for SingleFlight<K, V> {
    fn default() -> Self {
        SingleFlight {
            flights: Arc::new(Mutex::new(HashMap::new())),
        }
    }
}

impl<K, V> std::fmt::Debug for SingleFlight<K, V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SingleFlight")
    }
}

/// Removes the finished (or panicked) flight from the map.
struct Landing<K: Hash + Eq, V> {
    flights: Flights<K, V>,
    key: Option<K>,
}

impl<K: Hash + Eq, V> Drop for Landing<K, V> {
    fn drop(&mut self) {
        if let Some(key) = self.key.take() {
            if let Ok(mut map) = self.flights.lock() {
                map.remove(&key);
            }
        }
    }
}

impl<K, V> SingleFlight<K, V>
where
    K: Hash + Eq + Clone + Send + 'static,
    V: Clone + Send + Sync + 'static,
{
    /// Joins the flight for `key`, or starts one running `work()`.
    ///
    /// # Panics
    /// Propagates a panic of `work` to every waiter.
    pub async fn run<F, Fut>(&self, key: K, work: F) -> V
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = V> + Send + 'static,
    {
        let flight = {
            let mut map = self.flights.lock().expect("single-flight map poisoned");
            if let Some(existing) = map.get(&key) {
                existing.clone()
            } else {
                let landing = Landing {
                    flights: self.flights.clone(),
                    key: Some(key.clone()),
                };
                let fut = work();
                let handle = tokio::spawn(async move {
                    let value = fut.await;
                    drop(landing);
                    value
                });
                let shared = async move {
                    match handle.await {
                        Ok(v) => v,
                        Err(e) => std::panic::resume_unwind(e.into_panic()),
                    }
                }
                .boxed()
                .shared();
                map.insert(key, shared.clone());
                shared
            }
        };
        flight.await
    }

    /// Whether a flight for `key` is in progress.
    pub fn is_flying(&self, key: &K) -> bool {
        self.flights
            .lock()
            .map(|m| m.contains_key(key))
            .unwrap_or(false)
    }

    /// Number of flights in progress.
    pub fn in_flight(&self) -> usize {
        self.flights.lock().map(|m| m.len()).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    #[tokio::test]
    async fn concurrent_callers_share_one_run() {
        let sf = Arc::new(SingleFlight::<u32, u32>::default());
        let runs = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..50 {
            let sf = sf.clone();
            let runs = runs.clone();
            tasks.push(tokio::spawn(async move {
                sf.run(1, || async move {
                    runs.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    7
                })
                .await
            }));
        }
        for t in tasks {
            assert_eq!(t.await.unwrap(), 7);
        }
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        assert_eq!(sf.in_flight(), 0);
        // A later call starts a new flight.
        assert_eq!(sf.run(1, || async { 8 }).await, 8);
    }

    #[tokio::test]
    async fn work_finishes_when_the_caller_goes_away() {
        let sf = Arc::new(SingleFlight::<u32, u32>::default());
        let done = Arc::new(AtomicUsize::new(0));
        let d = done.clone();
        let caller = {
            let sf = sf.clone();
            tokio::spawn(async move {
                sf.run(1, || async move {
                    tokio::time::sleep(Duration::from_millis(30)).await;
                    d.fetch_add(1, Ordering::SeqCst);
                    1
                })
                .await
            })
        };
        tokio::time::sleep(Duration::from_millis(5)).await;
        caller.abort();
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert_eq!(done.load(Ordering::SeqCst), 1);
        assert_eq!(sf.in_flight(), 0);
    }
}
