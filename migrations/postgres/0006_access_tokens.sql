-- Access tokens shared by the replicas (issue 14): the replica that
-- refreshed an identity, under its refresh lease, stores the new access
-- token (sealed like refresh tokens) so that the others use it instead of
-- refreshing again.
CREATE TABLE access_tokens (
    identity_id BIGINT  NOT NULL REFERENCES identities(id) ON DELETE CASCADE,
    scope_key   TEXT    NOT NULL,
    token       BYTEA   NOT NULL,
    key_id      TEXT    NOT NULL,
    expires_at  BIGINT  NOT NULL,
    PRIMARY KEY (identity_id, scope_key)
);
