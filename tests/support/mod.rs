//! In-process test doubles shared by the integration tests: a test PKI
//! (`certs`), a fake Microsoft identity platform (`idp`) and a fake Exchange
//! Web Services upstream (`ews`), plus the TLS server plumbing they share
//! (`server`). None of this depends on the `authswap` library.
//!
//! Use from a test binary with `mod support;`.
#![allow(dead_code)]
#![allow(unused_imports)]

pub mod certs;
pub mod ews;
pub mod h1;
pub mod idp;
pub mod server;

pub use certs::{pki, TestPki};
pub use ews::{
    big_response_byte, expected_big_response, server_busy_body, server_busy_response,
    CannedResponse, EwsOptions, FakeEws, RecordedRequest,
};
pub use idp::{
    ms_error_body, ClientAuth, FakeIdp, IdpOptions, IdpRequestRecord, SignedInAccount,
    TokenValidator,
};
pub mod fleet;
pub mod harness;
pub mod mail;
pub mod mailrig;
pub mod openmetrics;
pub mod pg;
pub mod raw;
