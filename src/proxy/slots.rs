//! Connection slots of a listener (HTTP or mail): at most `max_connections`
//! at once, and at most `max_connections_per_source` from one non-loopback
//! address. A connection holds its slot until it ends; once it has proved
//! credentials (an HTTP request authenticated, a mail login) it is *proved*.
//! When the listener is full, or a source has its share, a new connection
//! takes the slot of the oldest connection that has not proved anything
//! yet, which is closed: whoever cannot log in cannot keep legitimate
//! clients out by holding idle connections. Only when every slot is held
//! by a proved connection does the listener stop accepting until one ends.

use crate::identity::source_address;
use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::Notify;

/// The slots of one listener.
pub struct Slots {
    max: usize,
    per_source: usize,
    inner: Mutex<Inner>,
    freed: Notify,
}

#[derive(Default)]
struct Inner {
    next: u64,
    /// By id, which is also by age.
    conns: BTreeMap<u64, Entry>,
    by_source: HashMap<IpAddr, usize>,
}

struct Entry {
    /// `None` for loopback: local clients all share it.
    source: Option<IpAddr>,
    proved: Arc<AtomicBool>,
    close: Arc<Notify>,
}

/// A connection's slot, given back when dropped.
pub struct Slot {
    slots: Arc<Slots>,
    id: u64,
    proved: Arc<AtomicBool>,
    close: Arc<Notify>,
}

impl Slot {
    /// The flag to raise once the connection has proved credentials.
    pub fn proved_flag(&self) -> Arc<AtomicBool> {
        self.proved.clone()
    }

    /// Whether the connection has proved credentials.
    pub fn proved(&self) -> bool {
        self.proved.load(Ordering::Acquire)
    }

    /// Completes when the connection must close to make room for another.
    pub async fn evicted(&self) {
        self.close.notified().await;
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut inner = self.slots.lock();
        if let Some(entry) = inner.conns.remove(&self.id) {
            inner.forget_source(entry.source);
        }
        drop(inner);
        self.slots.freed.notify_waiters();
    }
}

impl Inner {
    fn forget_source(&mut self, source: Option<IpAddr>) {
        if let Some(ip) = source {
            if let Some(n) = self.by_source.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    self.by_source.remove(&ip);
                }
            }
        }
    }

    /// Closes the oldest connection that proved nothing (from `source`
    /// only, when given); whether there was one.
    fn evict_oldest(&mut self, source: Option<IpAddr>) -> bool {
        let victim = self
            .conns
            .iter()
            .find(|(_, e)| {
                !e.proved.load(Ordering::Acquire) && (source.is_none() || e.source == source)
            })
            .map(|(id, _)| *id);
        let Some(id) = victim else {
            return false;
        };
        // It leaves the count now; its task closes it in a moment.
        if let Some(entry) = self.conns.remove(&id) {
            self.forget_source(entry.source);
            entry.close.notify_one();
        }
        true
    }
}

impl Slots {
    /// `max` slots, `per_source` of them at most for one non-loopback
    /// address.
    pub fn new(max: usize, per_source: usize) -> Arc<Slots> {
        Arc::new(Slots {
            max: max.max(1),
            per_source: per_source.max(1),
            inner: Mutex::new(Inner::default()),
            freed: Notify::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits until a new connection can be admitted: a slot is free, or
    /// one is held by a connection that proved nothing.
    pub async fn room(&self) {
        loop {
            let freed = self.freed.notified();
            {
                let inner = self.lock();
                if inner.conns.len() < self.max
                    || inner
                        .conns
                        .values()
                        .any(|e| !e.proved.load(Ordering::Acquire))
                {
                    return;
                }
            }
            freed.await;
        }
    }

    /// A slot for a new connection from `ip`, closing the oldest
    /// connection that proved nothing when the listener (or the source's
    /// share) is full. `None`: refused (the source's share is all proved,
    /// or the listener is full of proved connections).
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Option<Slot> {
        let source = source_address(ip);
        let mut inner = self.lock();
        if let Some(src) = source {
            if inner.by_source.get(&src).copied().unwrap_or(0) >= self.per_source
                && !inner.evict_oldest(Some(src))
            {
                tracing::warn!(source = %src, "connection refused: this address holds its share of connections");
                return None;
            }
        }
        if inner.conns.len() >= self.max && !inner.evict_oldest(None) {
            return None;
        }
        let id = inner.next;
        inner.next += 1;
        let proved = Arc::new(AtomicBool::new(false));
        let close = Arc::new(Notify::new());
        inner.conns.insert(
            id,
            Entry {
                source,
                proved: proved.clone(),
                close: close.clone(),
            },
        );
        if let Some(src) = source {
            *inner.by_source.entry(src).or_default() += 1;
        }
        Some(Slot {
            slots: self.clone(),
            id,
            proved,
            close,
        })
    }

    /// Connections holding a slot.
    pub fn len(&self) -> usize {
        self.lock().conns.len()
    }

    /// Whether no connection holds a slot.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[tokio::test]
    async fn a_full_listener_closes_the_oldest_unproved_connection() {
        let slots = Slots::new(3, 10);
        let a = slots.admit(ip("127.0.0.1")).unwrap();
        a.proved_flag().store(true, Ordering::Release);
        let b = slots.admit(ip("127.0.0.1")).unwrap();
        let c = slots.admit(ip("127.0.0.1")).unwrap();
        // Full: the oldest unproved (b, not a) makes room.
        let d = slots.admit(ip("127.0.0.1")).unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(1), b.evicted())
            .await
            .expect("b is told to close");
        assert_eq!(slots.len(), 3);
        drop(b);
        assert_eq!(slots.len(), 3, "b had left the count already");
        // All proved: refused, and `room` waits until one ends.
        for s in [&c, &d] {
            s.proved_flag().store(true, Ordering::Release);
        }
        assert!(slots.admit(ip("127.0.0.1")).is_none());
        let room = slots.room();
        tokio::pin!(room);
        assert!(futures_util::poll!(room.as_mut()).is_pending());
        drop(a);
        tokio::time::timeout(std::time::Duration::from_secs(1), room)
            .await
            .expect("room once a connection ends");
        assert!(slots.admit(ip("127.0.0.1")).is_some());
    }

    #[test]
    fn a_source_over_its_share_displaces_its_own_connections_only() {
        let slots = Slots::new(100, 2);
        let local = slots.admit(ip("127.0.0.5")).unwrap();
        let x1 = slots.admit(ip("192.0.2.7")).unwrap();
        let _x2 = slots.admit(ip("::ffff:192.0.2.7")).unwrap();
        // A third from the same address takes x1's place, not `local`'s.
        let _x3 = slots.admit(ip("192.0.2.7")).unwrap();
        assert_eq!(slots.len(), 3);
        drop(x1);
        assert!(!local.proved());
        // Proved ones are never displaced: the source is refused instead.
        let slots = Slots::new(100, 1);
        let y = slots.admit(ip("2001:db8::1")).unwrap();
        y.proved_flag().store(true, Ordering::Release);
        assert!(slots.admit(ip("2001:db8::2")).is_none(), "same /64");
        assert!(slots.admit(ip("2001:db8:0:1::2")).is_some(), "another /64");
        // Loopback has no share: every local client is 127.0.0.0/8.
        let slots = Slots::new(100, 1);
        let _l: Vec<_> = (0..10)
            .map(|_| slots.admit(ip("127.0.0.1")).unwrap())
            .collect();
    }
}
