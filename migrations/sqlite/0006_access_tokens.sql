-- Access tokens shared by the replicas of one PostgreSQL store (issue 14):
-- the one that refreshed an identity stores the new access token, sealed
-- like refresh tokens, so that the others use it instead of refreshing
-- again. Kept in SQLite too, so that both schemas stay the same (one
-- process serves a SQLite store and keeps its tokens in memory).
CREATE TABLE access_tokens (
    identity_id INTEGER NOT NULL REFERENCES identities(id) ON DELETE CASCADE,
    scope_key   TEXT    NOT NULL,
    token       BLOB    NOT NULL,
    key_id      TEXT    NOT NULL,
    expires_at  INTEGER NOT NULL,
    PRIMARY KEY (identity_id, scope_key)
);
