//! Onboarding: invitations (this module's [`invite`]), and the public
//! listener where an invited person signs in with Microsoft to link an
//! identity.

pub mod import;
pub mod invite;
pub mod pages;
pub mod server;

pub use invite::{hash_secret, issue, normalise_code, InviteError, IssuedInvitation};
pub use server::{Onboarding, OnboardingError, Peer};
