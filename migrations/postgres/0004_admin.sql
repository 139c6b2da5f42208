-- One-time sign-in links to the admin console (`authswap admin signin-link`):
-- only a SHA-256 of the link's nonce is kept; each works once, briefly.
CREATE TABLE admin_links (
    nonce_hash BYTEA   PRIMARY KEY,
    expires_at BIGINT  NOT NULL
);
