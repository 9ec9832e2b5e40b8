-- Client keys for /mcp (issue 15): who may call which tool. Only the SHA-256 digest of a key is
-- kept (hex); the key itself is shown once, when it is created. `grants` is a JSON array of
-- grant strings ("slug", "slug/tool", "*"), so new grant forms need no schema change. A
-- revoked key keeps its record (revoked_at), so what it did stays attributable.
CREATE TABLE client_keys (
    id                 TEXT PRIMARY KEY NOT NULL,
    name               TEXT NOT NULL,
    key_hash           TEXT NOT NULL UNIQUE,
    grants             TEXT NOT NULL,
    created_at         TEXT NOT NULL,
    expires_at         TEXT,
    revoked_at         TEXT,
    rate_limit_per_min INTEGER,
    max_concurrent     INTEGER
);
