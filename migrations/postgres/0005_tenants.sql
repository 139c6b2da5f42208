-- Several tenants and app-only identities (issue 13). Every identity belongs
-- to one configured tenant (`default` is `[identity_provider]`) and is either
-- `delegated` (a person consents; a refresh token is stored) or `app` (the
-- tenant's app credential gets client-credentials tokens; nothing is stored).
ALTER TABLE identities ADD COLUMN tenant TEXT NOT NULL DEFAULT 'default';
ALTER TABLE identities ADD COLUMN mode TEXT NOT NULL DEFAULT 'delegated'
    CHECK (mode IN ('delegated', 'app'));
CREATE INDEX identities_tenant ON identities(tenant);

-- A tenant whose app credential the identity platform refuses (secret
-- expired or wrong, certificate not accepted): every identity of it is
-- shown as blocked by the app credential until a token grant works again.
CREATE TABLE tenant_blocks (
    tenant     TEXT    PRIMARY KEY,
    reason     TEXT    NOT NULL,
    since      BIGINT  NOT NULL
);
