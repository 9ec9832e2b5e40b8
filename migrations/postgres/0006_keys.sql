-- PostgreSQL twin of migrations/sqlite/0006_keys.sql: client keys for /mcp (issue 15), only
-- their SHA-256 digest kept.
CREATE TABLE client_keys (
    id                 TEXT PRIMARY KEY NOT NULL,
    name               TEXT NOT NULL,
    key_hash           TEXT NOT NULL UNIQUE,
    grants             TEXT NOT NULL,
    created_at         TIMESTAMPTZ NOT NULL,
    expires_at         TIMESTAMPTZ,
    revoked_at         TIMESTAMPTZ,
    rate_limit_per_min BIGINT,
    max_concurrent     BIGINT
);
