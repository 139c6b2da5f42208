-- The Microsoft account that linked an identity (from the ID token of a
-- browser sign-in): personal data, cleared by `forget`.
ALTER TABLE identities ADD COLUMN account_upn TEXT;
ALTER TABLE identities ADD COLUMN account_oid TEXT;
ALTER TABLE identities ADD COLUMN account_tid TEXT;
ALTER TABLE identities ADD COLUMN linked_at BIGINT;

-- Invitations: only hashes of the link token and of the short code are kept.
CREATE TABLE invitations (
    id           BIGSERIAL PRIMARY KEY,
    identity_id  BIGINT  NOT NULL REFERENCES identities(id) ON DELETE CASCADE,
    token_hash   BYTEA   NOT NULL UNIQUE,
    code_hash    BYTEA   NOT NULL UNIQUE,
    state        TEXT    NOT NULL DEFAULT 'pending'
                 CHECK (state IN ('pending', 'completed', 'revoked')),
    created_at   BIGINT  NOT NULL,
    expires_at   BIGINT  NOT NULL,
    finished_at  BIGINT,
    actor        TEXT    NOT NULL
);
CREATE INDEX invitations_identity ON invitations(identity_id, state);

-- Browser sign-ins in progress: the OAuth `state` (hashed), the PKCE
-- verifier and nonce, bound to one invitation; single use, short-lived.
CREATE TABLE signins (
    state_hash    BYTEA   PRIMARY KEY,
    invitation_id BIGINT  NOT NULL REFERENCES invitations(id) ON DELETE CASCADE,
    verifier      TEXT    NOT NULL,
    nonce         TEXT    NOT NULL,
    expires_at    BIGINT  NOT NULL
);

-- What an end-to-end validation found, per identity and protocol.
CREATE TABLE validations (
    identity_id BIGINT  NOT NULL REFERENCES identities(id) ON DELETE CASCADE,
    protocol    TEXT    NOT NULL,
    at          BIGINT  NOT NULL,
    ok          BOOLEAN NOT NULL,
    answer      TEXT    NOT NULL,
    meaning     TEXT    NOT NULL,
    PRIMARY KEY (identity_id, protocol)
);

-- Notification bookkeeping: at most one per identity per interval.
CREATE TABLE notifications (
    identity_id  BIGINT  NOT NULL REFERENCES identities(id) ON DELETE CASCADE,
    kind         TEXT    NOT NULL,
    last_sent_at BIGINT  NOT NULL,
    PRIMARY KEY (identity_id, kind)
);

-- Every admin action and status change; never a secret.
CREATE TABLE audit_log (
    id       BIGSERIAL PRIMARY KEY,
    at       BIGINT  NOT NULL,
    actor    TEXT    NOT NULL,
    action   TEXT    NOT NULL,
    identity TEXT,
    outcome  TEXT    NOT NULL,
    detail   TEXT
);
CREATE INDEX audit_log_identity ON audit_log(identity, id);
