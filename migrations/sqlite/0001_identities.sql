-- Identities: one row per legacy user name, with its sealed refresh token.
CREATE TABLE identities (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    name             TEXT    NOT NULL,
    name_key         TEXT    NOT NULL UNIQUE,
    mailbox          TEXT    NOT NULL,
    password_hash    TEXT    NOT NULL,
    refresh_token    BLOB,
    key_id           TEXT,
    token_generation INTEGER NOT NULL DEFAULT 0,
    status           TEXT    NOT NULL DEFAULT 'pending'
                     CHECK (status IN ('pending', 'linked', 'needs_reauth')),
    last_error       TEXT,
    last_success_at  INTEGER,
    last_failure_at  INTEGER,
    created_at       INTEGER NOT NULL,
    updated_at       INTEGER NOT NULL
);

-- Bumped by every change that a running server must pick up (identity added,
-- removed, re-passworded, linked, status changed).
CREATE TABLE meta (
    k TEXT PRIMARY KEY,
    v INTEGER NOT NULL
);
INSERT INTO meta (k, v) VALUES ('revision', 0);
