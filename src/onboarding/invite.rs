//! Invitations: an unguessable link token and a short human code per
//! invitation, of which only SHA-256 hashes are stored; issuing one revokes
//! the identity's older pending invitations.

use crate::config::Config;
use crate::secret::Secret;
use crate::store::{
    now_unix, IdentityRecord, InvitationRecord, NewAudit, NewInvitation, Store, StoreError,
};
use base64::Engine;
use rand::Rng;
use sha2::{Digest, Sha256};
use std::fmt;

/// Letters and digits of the short code: no `0 O 1 I L U` (ambiguous when
/// read aloud or handwritten).
pub const CODE_ALPHABET: &[u8] = b"ABCDEFGHJKMNPQRSTVWXYZ23456789";
/// Characters in a short code (about 49 bits).
pub const CODE_LEN: usize = 10;

/// A freshly issued invitation: the only time the link and code exist in
/// clear.
#[derive(Clone)]
pub struct IssuedInvitation {
    /// The stored record.
    pub record: InvitationRecord,
    /// The link the invited person opens.
    pub url: Secret,
    /// The short code, shown grouped (`ABCDE-FGHJK`).
    pub code: Secret,
}

impl fmt::Debug for IssuedInvitation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IssuedInvitation")
            .field("record", &self.record)
            .finish_non_exhaustive()
    }
}

/// Why an invitation could not be issued.
#[derive(Debug, thiserror::Error)]
pub enum InviteError {
    /// The identity has no mailbox (it was forgotten): set one first.
    #[error("identity `{0}` has no mailbox; set one before inviting")]
    NoMailbox(String),
    /// The store failed.
    #[error("{0}")]
    Store(#[from] StoreError),
}

impl crate::error::Failure for InviteError {
    fn origin(&self) -> crate::error::Origin {
        match self {
            InviteError::NoMailbox(_) => crate::error::Origin::Client,
            InviteError::Store(_) => crate::error::Origin::Store,
        }
    }

    fn retryable(&self) -> bool {
        matches!(self, InviteError::Store(e) if e.retryable())
    }
}

/// SHA-256 of a link token, a normalised code or an OAuth `state`.
pub fn hash_secret(secret: &str) -> Vec<u8> {
    Sha256::digest(secret.as_bytes()).to_vec()
}

/// A typed-in code as stored: upper case, without spaces or dashes.
pub fn normalise_code(input: &str) -> String {
    input
        .chars()
        .filter(|c| !c.is_whitespace() && *c != '-')
        .flat_map(char::to_uppercase)
        .collect()
}

fn new_link_token() -> String {
    let bytes: [u8; 32] = rand::rng().random();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn new_code() -> String {
    let mut rng = rand::rng();
    (0..CODE_LEN)
        .map(|_| CODE_ALPHABET[rng.random_range(0..CODE_ALPHABET.len())] as char)
        .collect()
}

/// The code as shown to people: two groups of five.
pub fn display_code(code: &str) -> String {
    let (a, b) = code.split_at(code.len() / 2);
    format!("{a}-{b}")
}

/// The link of an invitation token under `config.onboarding`'s public URL.
pub fn invitation_url(config: &Config, link_token: &str) -> String {
    format!("{}/i/{link_token}", config.onboarding.base_url())
}

/// Issues an invitation for `identity` (revoking its older pending ones)
/// and audits it as done by `actor`.
pub async fn issue(
    store: &dyn Store,
    config: &Config,
    identity: &IdentityRecord,
    actor: &str,
) -> Result<IssuedInvitation, InviteError> {
    if identity.mailbox.trim().is_empty() {
        return Err(InviteError::NoMailbox(identity.name.clone()));
    }
    let token = new_link_token();
    let code = new_code();
    let now = now_unix();
    let ttl = i64::try_from(config.onboarding.invitation_ttl.as_secs()).unwrap_or(i64::MAX / 2);
    let record = store
        .create_invitation(&NewInvitation {
            identity_id: identity.id,
            token_hash: hash_secret(&token),
            code_hash: hash_secret(&code),
            created_at: now,
            expires_at: now.saturating_add(ttl),
            actor: actor.to_owned(),
        })
        .await?;
    store
        .audit(&NewAudit {
            actor,
            action: "invitation.create",
            identity: Some(&identity.name),
            outcome: "ok",
            detail: None,
        })
        .await?;
    Ok(IssuedInvitation {
        record,
        url: Secret::new(invitation_url(config, &token)),
        code: Secret::new(display_code(&code)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{InvitationState, SqliteStore};

    #[test]
    fn codes_use_the_unambiguous_alphabet() {
        for _ in 0..200 {
            let c = new_code();
            assert_eq!(c.len(), CODE_LEN);
            assert!(c.bytes().all(|b| CODE_ALPHABET.contains(&b)), "{c}");
            assert!(!c.contains(['0', 'O', '1', 'I', 'L', 'U']));
        }
        assert_eq!(normalise_code(" abcde-fghjk "), "ABCDEFGHJK");
        assert_eq!(display_code("ABCDEFGHJK"), "ABCDE-FGHJK");
    }

    #[tokio::test]
    async fn reinviting_revokes_the_older_pending_invitation() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("a.db")).await.unwrap();
        let config = Config::default();
        let alice = store
            .create(&crate::store::NewIdentity::delegated(
                "alice",
                "alice@contoso.com",
                "$h",
            ))
            .await
            .unwrap();
        let first = issue(&store, &config, &alice, "cli").await.unwrap();
        let second = issue(&store, &config, &alice, "cli").await.unwrap();
        assert_ne!(first.url.expose(), second.url.expose());
        let token = first.url.expose().rsplit('/').next().unwrap();
        let old = store
            .invitation_by_token(&hash_secret(token))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(old.state, InvitationState::Revoked);
        let code = normalise_code(second.code.expose());
        let new = store
            .invitation_by_code(&hash_secret(&code))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(new.state, InvitationState::Pending);
        assert!(new.expires_at - new.created_at == 7 * 24 * 3600);
        // Neither the link token nor the code is stored in clear.
        drop(store);
        let bytes = std::fs::read(dir.path().join("a.db")).unwrap();
        let wal = std::fs::read(dir.path().join("a.db-wal")).unwrap_or_default();
        for needle in [token, code.as_str()] {
            for hay in [&bytes, &wal] {
                assert!(!hay.windows(needle.len()).any(|w| w == needle.as_bytes()));
            }
        }
        assert!(format!("{second:?}").contains("IssuedInvitation"));
        assert!(!format!("{second:?}").contains(&code));
    }
}
