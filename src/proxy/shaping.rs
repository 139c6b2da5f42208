//! Per-identity shaping of mail sessions to the upstream's limits (defaults:
//! Exchange Online's 3 concurrent SMTP sessions and 30 messages a minute per
//! mailbox). A login takes one of its identity's session permits, waiting
//! up to `session_wait` for one; the SMTP client-to-upstream stream is
//! scanned for `MAIL` commands at line starts, and one that would exceed
//! `messages_per_minute` (a sliding one-minute window) is held until the
//! window has room. Holding never changes a byte or the order of replies.

use crate::metrics::{Metrics, Protocol, SessionWait};
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant as TokioInstant;

/// The window `messages_per_minute` counts over.
const WINDOW: Duration = Duration::from_secs(60);

/// One front end's shaping state.
pub struct Shaper {
    protocol: Protocol,
    max_sessions: usize,
    per_minute: u32,
    wait: Duration,
    identities: Mutex<HashMap<String, Arc<PerIdentity>>>,
}

struct PerIdentity {
    sessions: Option<Arc<Semaphore>>,
    /// When each of the last `per_minute` messages was let through.
    sent: Mutex<VecDeque<TokioInstant>>,
}

/// Why a login gets no session.
#[derive(Debug)]
pub struct Busy;

/// A logged-in session's share of its identity's limits, held for the
/// session's life.
pub struct SessionPermit {
    _permit: Option<OwnedSemaphorePermit>,
    _active: crate::metrics::ConnectionGuard,
    pacer: Option<Pacer>,
}

impl SessionPermit {
    /// The pacer of the session's messages (SMTP with a message limit).
    pub fn take_pacer(&mut self) -> Option<Pacer> {
        self.pacer.take()
    }
}

/// Holds `MAIL` commands of one identity to its per-minute limit.
pub struct Pacer {
    identity: String,
    protocol: Protocol,
    per_minute: usize,
    state: Arc<PerIdentity>,
    metrics: Arc<Metrics>,
}

impl Pacer {
    /// Waits until one more message fits in the window, then counts it.
    pub async fn message(&self) {
        let mut delayed = false;
        loop {
            let wait = {
                let mut sent = self.state.sent.lock().unwrap_or_else(|e| e.into_inner());
                let now = TokioInstant::now();
                while sent
                    .front()
                    .is_some_and(|t| now.duration_since(*t) >= WINDOW)
                {
                    sent.pop_front();
                }
                if sent.len() < self.per_minute {
                    sent.push_back(now);
                    return;
                }
                // Full: the oldest leaves the window first.
                WINDOW.saturating_sub(now.duration_since(sent[0]))
            };
            if !delayed {
                delayed = true;
                self.metrics.message_delayed(&self.identity, self.protocol);
                tracing::info!(identity = %self.identity, protocol = ?self.protocol, per_minute = self.per_minute, "message held: the identity reached messages_per_minute");
            }
            tokio::time::sleep(wait.max(Duration::from_millis(10))).await;
        }
    }
}

impl Shaper {
    /// Shaping for one front end from its `[smtp]`/`[imap]`/`[pop3]` keys.
    pub fn new(protocol: Protocol, cfg: &crate::config::MailConfig) -> Shaper {
        Shaper {
            protocol,
            max_sessions: cfg.max_sessions_per_identity,
            // Messages are only seen (and paced) on SMTP.
            per_minute: if protocol == Protocol::smtp {
                cfg.messages_per_minute
            } else {
                0
            },
            wait: cfg.session_wait,
            identities: Mutex::new(HashMap::new()),
        }
    }

    fn state(&self, identity: &str) -> Arc<PerIdentity> {
        let mut map = self.identities.lock().unwrap_or_else(|e| e.into_inner());
        map.entry(identity.to_owned())
            .or_insert_with(|| {
                Arc::new(PerIdentity {
                    sessions: (self.max_sessions > 0)
                        .then(|| Arc::new(Semaphore::new(self.max_sessions))),
                    sent: Mutex::new(VecDeque::new()),
                })
            })
            .clone()
    }

    /// Takes a session permit for `identity`, waiting up to `session_wait`
    /// for one of its sessions to end.
    pub async fn session(
        &self,
        identity: &str,
        metrics: &Arc<Metrics>,
    ) -> Result<SessionPermit, Busy> {
        let state = self.state(identity);
        let permit = match &state.sessions {
            None => None,
            Some(sem) => match sem.clone().try_acquire_owned() {
                Ok(p) => Some(p),
                Err(_) => {
                    let started = Instant::now();
                    tracing::info!(identity, protocol = ?self.protocol, max = self.max_sessions, "login waits: the identity has max_sessions_per_identity sessions open");
                    let got = tokio::time::timeout(self.wait, sem.clone().acquire_owned()).await;
                    let waited = started.elapsed().as_secs_f64();
                    match got {
                        Ok(Ok(p)) => {
                            metrics.session_waited(
                                identity,
                                self.protocol,
                                SessionWait::admitted,
                                waited,
                            );
                            Some(p)
                        }
                        _ => {
                            metrics.session_waited(
                                identity,
                                self.protocol,
                                SessionWait::refused,
                                waited,
                            );
                            tracing::warn!(identity, protocol = ?self.protocol, max = self.max_sessions, wait = ?self.wait, "login refused for now: no session of the identity ended within session_wait");
                            return Err(Busy);
                        }
                    }
                }
            },
        };
        let pacer = (self.per_minute > 0).then(|| Pacer {
            identity: identity.to_owned(),
            protocol: self.protocol,
            per_minute: self.per_minute as usize,
            state: state.clone(),
            metrics: metrics.clone(),
        });
        Ok(SessionPermit {
            _permit: permit,
            _active: metrics.mail_session(identity, self.protocol),
            pacer,
        })
    }
}

/// Finds where `MAIL` commands start in a client stream read in chunks:
/// remembers whether the next byte starts a line and the start of a
/// command split across reads. A `MAIL` line inside message content is
/// found too (it only costs a message of the budget, never a byte).
#[derive(Debug)]
pub struct MailScanner {
    at_line_start: bool,
    /// Bytes of a line start seen so far that still match `MAIL `.
    partial: usize,
}

impl Default for MailScanner {
    fn default() -> Self {
        MailScanner {
            at_line_start: true,
            partial: 0,
        }
    }
}

const MAIL: &[u8] = b"MAIL ";

impl MailScanner {
    /// The offsets in `chunk` at which a `MAIL ` command starts (`0` when
    /// its first bytes were in an earlier chunk), given to `found` in
    /// order, once its verb is complete.
    pub fn scan(&mut self, chunk: &[u8], mut found: impl FnMut(usize)) {
        let mut i = 0;
        while i < chunk.len() {
            if self.partial > 0 || self.at_line_start {
                self.at_line_start = false;
                let start = i;
                // Match the verb, possibly over several chunks.
                let mut k = self.partial;
                while k < MAIL.len() && i < chunk.len() {
                    if chunk[i].to_ascii_uppercase() != MAIL[k] {
                        break;
                    }
                    k += 1;
                    i += 1;
                }
                if k == MAIL.len() {
                    self.partial = 0;
                    found(start);
                } else if i == chunk.len() {
                    self.partial = k;
                    return;
                } else {
                    self.partial = 0;
                }
            }
            match chunk[i..].iter().position(|&b| b == b'\n') {
                Some(n) => {
                    i += n + 1;
                    self.at_line_start = true;
                }
                None => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{MailScanner, Shaper};
    use crate::metrics::{Metrics, Protocol};
    use std::sync::Arc;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn sessions_wait_for_a_permit_and_messages_for_the_window() {
        let mut cfg = crate::config::MailConfig::smtp();
        cfg.max_sessions_per_identity = 2;
        cfg.messages_per_minute = 3;
        cfg.session_wait = Duration::from_secs(5);
        let shaper = Shaper::new(Protocol::smtp, &cfg);
        let m = Arc::new(Metrics::new());
        let mut a = shaper.session("alice", &m).await.ok().unwrap();
        let _b = shaper.session("alice", &m).await.ok().unwrap();
        // Another identity has its own permits.
        assert!(shaper.session("bob", &m).await.is_ok());
        // A third waits, and is refused after session_wait.
        let started = tokio::time::Instant::now();
        assert!(shaper.session("alice", &m).await.is_err());
        assert_eq!(started.elapsed(), Duration::from_secs(5));
        // One ends while another waits: admitted.
        let waiting = shaper.session("alice", &m);
        let release = async {
            tokio::time::sleep(Duration::from_secs(1)).await;
            drop(a.take_pacer());
            drop(std::mem::replace(&mut a, _b));
        };
        let (got, ()) = tokio::join!(waiting, release);
        assert!(got.is_ok());
        let text = m.encode();
        assert!(text.contains("authswap_mail_session_waits_total{identity=\"alice\",protocol=\"smtp\",result=\"refused\"} 1"), "{text}");
        assert!(text.contains("authswap_mail_session_waits_total{identity=\"alice\",protocol=\"smtp\",result=\"admitted\"} 1"), "{text}");

        // Three messages pass at once; the fourth waits for the first to
        // leave the one-minute window.
        let pacer = got.ok().unwrap().take_pacer().unwrap();
        let started = tokio::time::Instant::now();
        for _ in 0..3 {
            pacer.message().await;
        }
        assert_eq!(started.elapsed(), Duration::ZERO);
        tokio::time::sleep(Duration::from_secs(10)).await;
        pacer.message().await;
        assert_eq!(started.elapsed(), Duration::from_secs(60));
        assert!(m.encode().contains(
            "authswap_mail_message_delays_total{identity=\"alice\",protocol=\"smtp\"} 1"
        ));
    }

    fn scan(chunks: &[&[u8]]) -> Vec<(usize, usize)> {
        let mut s = MailScanner::default();
        let mut out = Vec::new();
        for (n, c) in chunks.iter().enumerate() {
            s.scan(c, |at| out.push((n, at)));
        }
        out
    }

    #[test]
    fn mail_commands_are_found_at_line_starts_across_chunks() {
        assert_eq!(scan(&[b"MAIL FROM:<a@b>\r\n"]), vec![(0, 0)]);
        assert_eq!(
            scan(&[b"RCPT TO:<x>\r\nmail from:<a>\r\nXMAIL FROM\r\n"]),
            vec![(0, 13)]
        );
        assert_eq!(scan(&[b"MA", b"IL FROM:<a>\r\n"]), vec![(1, 0)]);
        assert_eq!(scan(&[b"RSET\r\n", b"MAIL ", b"FROM"]), vec![(1, 0)]);
        assert_eq!(scan(&[b"MAIX FROM\r\nMAIL"]), Vec::<(usize, usize)>::new());
        assert_eq!(
            scan(&[b"MAIL FROM:<a>\r\nMAIL FROM:<b>\r\n"]),
            vec![(0, 0), (0, 15)]
        );
    }
}
