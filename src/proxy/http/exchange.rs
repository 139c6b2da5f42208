//! The exchange policy of the HTTP front end, written once for both wire
//! halves (the native HTTP/1.1 relay in `h1.rs` and the hyper half in
//! `serve.rs`), the way pingora drives its `ProxyHttp` hooks: one request
//! goes through named phases, and a [`Half`] supplies only the wire work.
//!
//! 1. **identify**: the Basic credentials prove an identity
//!    ([`HttpProxy::identify`]);
//! 2. **token**: an access token for it ([`HttpProxy::token`]);
//! 3. **body**: the half reads what it must of the request body (a client
//!    waiting for `100 Continue` gets it only now); for an identity with an
//!    app-only token on EWS, all of it, to act as the identity's mailbox
//!    ([`Half::act_as`]);
//! 4. **send**: the half sends the request and reads the answer's head,
//!    timed here;
//! 5. **refusal**: a refused token goes through the refusal policy
//!    ([`crate::token::refusal`]): retry once with a new token, a
//!    temporary local answer, or the upstream's answer passed through;
//! 6. **respond**: the caller relays the answer the policy let through
//!    (counted here as `forwarded`).
//!
//! Nothing is sent upstream, and no upstream connection is opened, before
//! phase 2 has succeeded.

use super::{HttpProxy, Rejection};
use crate::identity::ConnectionMemo;
use crate::metrics::{Outcome, Protocol};
use crate::store::Mode;
use crate::token::{AccessToken, Refusal, Verdict};
use std::net::SocketAddr;
use std::time::Instant;

/// What a wire half does for one request.
pub(super) trait Half {
    /// The upstream's answer, its head read and its body not yet relayed.
    type Answer;
    /// Why the exchange stops short of an answer: at least a local answer
    /// ([`Rejection`]); a half may add its own ways out.
    type Stop: From<Rejection>;

    /// Phase 3: reads the request body as far as the half needs it.
    async fn body(&mut self) -> Result<(), Self::Stop>;

    /// Phase 3 for an identity with an app-only token on EWS: reads the
    /// whole body (a body too large to hold is refused with `413`) and
    /// makes the request act as `mailbox` ([`super::soap::app_request`]):
    /// `X-AnchorMailbox`, and the `ExchangeImpersonation` header inserted
    /// when the envelope has none (`Content-Length` follows); an envelope
    /// impersonating another mailbox gets `403`.
    async fn act_as(&mut self, mailbox: &str) -> Result<(), Self::Stop>;

    /// Whether the request can be sent a second time (its body is held).
    fn replayable(&self) -> bool;

    /// After phase 3: the SOAP operation of an EWS request (`None` for
    /// other requests; `other` for a body that was not held).
    fn ews_operation(&self) -> Option<super::ews_ops::Operation>;

    /// Phase 4: sends the request with `token` and reads the answer's head.
    async fn send(&mut self, token: &AccessToken) -> Result<Self::Answer, Self::Stop>;

    /// The refusal `answer` carries, if it is one
    /// ([`crate::token::refusal::http`]).
    fn refusal(&self, answer: &Self::Answer) -> Option<Refusal>;

    /// Drops a refused answer, keeping the upstream connection when that
    /// is cheap.
    async fn discard(&mut self, answer: Self::Answer);

    /// The status of an answer (access log).
    fn status(answer: &Self::Answer) -> u16;

    /// The local answer a stop ends the request with; `None` when the
    /// request goes on elsewhere (handed to the hyper half).
    fn rejection(stop: &Self::Stop) -> Option<&Rejection>;
}

/// Whether a request that a reused upstream connection lost after it was
/// written is sent once more: only an idempotent one (RFC 9110 §9.2.2),
/// only when the connection had served others (the keep-alive race), and
/// only once. Both halves follow it.
pub(super) fn may_resend(idempotent: bool, reused: bool, resent: bool) -> bool {
    idempotent && reused && !resent
}

impl HttpProxy {
    /// Runs phases 1 to 5 for one request on `half`; the caller relays the
    /// answer (phase 6) or serialises the local answer it gets instead.
    /// With `runtime.access_log`, writes the request's access-log line.
    pub(super) async fn exchange<H: Half>(
        &self,
        half: &mut H,
        authorization: Option<&[u8]>,
        peer: SocketAddr,
        memo: &ConnectionMemo,
    ) -> Result<H::Answer, H::Stop> {
        if !self.access_log {
            return self
                .phases(half, authorization, peer, memo, &mut None)
                .await;
        }
        let started = Instant::now();
        let mut who = None;
        let result = self.phases(half, authorization, peer, memo, &mut who).await;
        let (outcome, status) = match &result {
            Ok(answer) => (Outcome::forwarded, Some(H::status(answer))),
            Err(stop) => match H::rejection(stop) {
                Some(r) => {
                    if let Rejection::Auth(crate::identity::AuthError::BadPassword(name)) = r {
                        who = Some(name.clone());
                    }
                    (r.outcome(), None)
                }
                None => return result,
            },
        };
        crate::proxy::access_line(
            Protocol::http,
            who.as_deref(),
            &format!("{outcome:?}"),
            status,
            started.elapsed(),
        );
        result
    }

    async fn phases<H: Half>(
        &self,
        half: &mut H,
        authorization: Option<&[u8]>,
        peer: SocketAddr,
        memo: &ConnectionMemo,
        who: &mut Option<String>,
    ) -> Result<H::Answer, H::Stop> {
        let identity = self.identify(authorization, peer, memo).await?;
        if self.access_log {
            *who = Some(identity.name.clone());
        }
        let mut token = self.token(&identity).await?;
        match identity.mode {
            Mode::App if self.ews_impersonation => half.act_as(&identity.mailbox).await?,
            _ => half.body().await?,
        }
        // Counted once the upstream answered (a request the native half
        // hands to the hyper half runs this again and counts there).
        let mut ews = half.ews_operation();
        let tokens = &self.app.tokens;
        let metrics = &self.app.metrics;
        let mut retried = false;
        loop {
            let started = Instant::now();
            let sent = half.send(&token).await;
            metrics.upstream_duration(Protocol::http, started.elapsed().as_secs_f64());
            let answer = sent?;
            if let Some(operation) = ews.take() {
                metrics.ews_operation(&identity.name, operation);
            }
            let verdict = match half.refusal(&answer) {
                None => {
                    tokens.accepted(&identity, self.scopes.of(&identity), &token);
                    Verdict::PassThrough
                }
                Some(refusal) => tokens.refused(
                    &identity,
                    self.scopes.of(&identity),
                    &token,
                    Protocol::http,
                    &refusal,
                ),
            };
            if verdict == Verdict::PassThrough {
                metrics.request(Protocol::http, Outcome::forwarded);
                return Ok(answer);
            }
            // The refused answer is dropped whatever comes next.
            half.discard(answer).await;
            let rejection = match verdict {
                Verdict::Retry if !half.replayable() => Rejection::Resend,
                Verdict::Retry if !retried => {
                    retried = true;
                    token = self.token(&identity).await?;
                    continue;
                }
                Verdict::Backoff { retry_after } => {
                    self.refused_fresh(&identity, Some(retry_after))
                }
                // Refused again after this request's one refresh.
                Verdict::Retry | Verdict::PassThrough => self.refused_fresh(&identity, None),
            };
            return Err(rejection.into());
        }
    }
}
