//! What every failure says about itself, whatever its type: where it comes
//! from ([`Origin`]) and whether trying again later can help
//! ([`Failure::retryable`]). Policies, answers and logs read these, never
//! the text of a message.

/// Where a failure comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// The legacy client: malformed, oversized, wrong credentials.
    Client,
    /// The upstream service (EWS, the mail server).
    Upstream,
    /// The Microsoft identity platform.
    IdentityPlatform,
    /// The store (database, key file).
    Store,
    /// authswap itself.
    Internal,
}

/// A classified failure.
pub trait Failure: std::error::Error {
    /// Where it comes from.
    fn origin(&self) -> Origin;
    /// Whether the same request may succeed later without anyone changing
    /// anything (a temporary answer), as opposed to one that needs the
    /// client, a person or an administrator to act (a permanent answer).
    fn retryable(&self) -> bool;
}
