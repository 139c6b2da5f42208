//! Access tokens: the engine that caches them per (identity, scopes) and
//! refreshes them one flight at a time, the identity-platform client, and the
//! classification of its errors.

pub mod assertion;
pub mod engine;
pub mod error;
pub mod id_token;
pub mod idp;
pub mod refusal;

pub use assertion::{AppCertificate, AssertionAlgorithm, CredentialError};
pub use engine::{AccessToken, ScopeSet, Scopes, TokenEngine, TokenError};
pub use error::IdpError;
pub use idp::{CodeError, DeviceLogin, IdpClient, PlatformDetails, TokenGrant};
pub use refusal::{Refusal, Verdict};
