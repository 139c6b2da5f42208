//! authswap: a sidecar that lets legacy clients keep sending Basic
//! credentials (HTTP `Authorization: Basic`, SMTP/IMAP/POP3 logins) while the
//! upstream service only accepts OAuth 2.0 access tokens.
//!
//! Every front end follows one path: credentials → [`identity`] → [`token`]
//! engine → upstream with a Bearer token, and reports to [`metrics`].

pub mod admin;
pub mod app;
pub mod cli;
pub mod config;
pub mod doctor;
pub mod error;
pub mod identity;
pub mod metrics;
pub mod names;
pub mod notify;
pub mod onboarding;
pub mod proxy;
pub mod reload;
pub mod secret;
pub mod server;
pub mod singleflight;
pub mod store;
pub mod tenant;
pub mod tls;
pub mod token;
pub mod validate;
