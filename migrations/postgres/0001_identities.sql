-- Identities: one row per legacy user name, with its sealed refresh token.
-- (PostgreSQL dialect of migrations/sqlite/0001_identities.sql.)
CREATE TABLE identities (
    id               BIGSERIAL PRIMARY KEY,
    name             TEXT    NOT NULL,
    name_key         TEXT    NOT NULL UNIQUE,
    mailbox          TEXT    NOT NULL,
    password_hash    TEXT    NOT NULL,
    refresh_token    BYTEA,
    key_id           TEXT,
    token_generation BIGINT  NOT NULL DEFAULT 0,
    status           TEXT    NOT NULL DEFAULT 'pending'
                     CHECK (status IN ('pending', 'linked', 'needs_reauth')),
    last_error       TEXT,
    last_success_at  BIGINT,
    last_failure_at  BIGINT,
    created_at       BIGINT  NOT NULL,
    updated_at       BIGINT  NOT NULL
);

-- Bumped by every change that a running server must pick up (identity added,
-- removed, re-passworded, linked, status changed).
CREATE TABLE meta (
    k TEXT PRIMARY KEY,
    v BIGINT NOT NULL
);
INSERT INTO meta (k, v) VALUES ('revision', 0);
