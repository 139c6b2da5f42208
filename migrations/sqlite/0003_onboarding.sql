-- The Microsoft account that linked an identity (from the ID token of a
-- browser sign-in): personal data, cleared by `forget`.
ALTER TABLE identities ADD COLUMN account_upn TEXT;
ALTER TABLE identities ADD COLUMN account_oid TEXT;
ALTER TABLE identities ADD COLUMN account_tid TEXT;
ALTER TABLE identities ADD COLUMN linked_at INTEGER;

-- Invitations: only hashes of the link token and of the short code are kept.
CREATE TABLE invitations (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    identity_id  INTEGER NOT NULL REFERENCES identities(id) ON DELETE CASCADE,
    token_hash   BLOB    NOT NULL UNIQUE,
    code_hash    BLOB    NOT NULL UNIQUE,
    state        TEXT    NOT NULL DEFAULT 'pending'
                 CHECK (state IN ('pending', 'completed', 'revoked')),
    created_at   INTEGER NOT NULL,
    expires_at   INTEGER NOT NULL,
    finished_at  INTEGER,
    actor        TEXT    NOT NULL
);
CREATE INDEX invitations_identity ON invitations(identity_id, state);

-- Browser sign-ins in progress: the OAuth `state` (hashed), the PKCE
-- verifier and nonce, bound to one invitation; single use, short-lived.
CREATE TABLE signins (
    state_hash    BLOB    PRIMARY KEY,
    invitation_id INTEGER NOT NULL REFERENCES invitations(id) ON DELETE CASCADE,
    verifier      TEXT    NOT NULL,
    nonce         TEXT    NOT NULL,
    expires_at    INTEGER NOT NULL
);

-- What an end-to-end validation found, per identity and protocol.
CREATE TABLE validations (
    identity_id INTEGER NOT NULL REFERENCES identities(id) ON DELETE CASCADE,
    protocol    TEXT    NOT NULL,
    at          INTEGER NOT NULL,
    ok          INTEGER NOT NULL,
    answer      TEXT    NOT NULL,
    meaning     TEXT    NOT NULL,
    PRIMARY KEY (identity_id, protocol)
);

-- Notification bookkeeping: at most one per identity per interval.
CREATE TABLE notifications (
    identity_id  INTEGER NOT NULL REFERENCES identities(id) ON DELETE CASCADE,
    kind         TEXT    NOT NULL,
    last_sent_at INTEGER NOT NULL,
    PRIMARY KEY (identity_id, kind)
);

-- Every admin action and status change; never a secret.
CREATE TABLE audit_log (
    id       INTEGER PRIMARY KEY AUTOINCREMENT,
    at       INTEGER NOT NULL,
    actor    TEXT    NOT NULL,
    action   TEXT    NOT NULL,
    identity TEXT,
    outcome  TEXT    NOT NULL,
    detail   TEXT
);
CREATE INDEX audit_log_identity ON audit_log(identity, id);
