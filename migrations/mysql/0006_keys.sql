-- MySQL/MariaDB twin of migrations/sqlite/0006_keys.sql: client keys for /mcp (issue 15), only
-- their SHA-256 digest kept (64 hex characters, so a VARCHAR that can be a unique key).
CREATE TABLE client_keys (
    id                 VARCHAR(36) PRIMARY KEY NOT NULL,
    name               TEXT NOT NULL,
    key_hash           VARCHAR(64) NOT NULL UNIQUE,
    grants             TEXT NOT NULL,
    created_at         DATETIME(6) NOT NULL,
    expires_at         DATETIME(6),
    revoked_at         DATETIME(6),
    rate_limit_per_min BIGINT,
    max_concurrent     BIGINT
) ENGINE = InnoDB;
