-- The upstream's refusal of an identity for a reason no token cures (SMTP
-- AUTH or EWS switched off), or its repeated refusal of fresh tokens: shown
-- as status `upstream_refused` while the identity is otherwise linked, and
-- cleared by the next success upstream. Token refreshes leave it alone.
ALTER TABLE identities ADD COLUMN upstream_refusal TEXT;
ALTER TABLE identities ADD COLUMN upstream_refused_at BIGINT;
