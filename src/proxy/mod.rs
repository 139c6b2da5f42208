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
