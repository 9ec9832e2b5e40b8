-- PostgreSQL twin of migrations/sqlite/0001_init.sql: same tables, columns and constraints,
-- with native types (TIMESTAMPTZ, BIGINT).
CREATE TABLE tools (
    id          TEXT PRIMARY KEY NOT NULL,
    slug        TEXT NOT NULL UNIQUE,
    spec        TEXT NOT NULL,
    created_at  TIMESTAMPTZ NOT NULL,
    updated_at  TIMESTAMPTZ NOT NULL
);

CREATE TABLE deployments (
    id                TEXT PRIMARY KEY NOT NULL,
    tool_id           TEXT NOT NULL REFERENCES tools(id) ON DELETE CASCADE,
    tool_slug         TEXT NOT NULL,
    endpoint_url      TEXT NOT NULL,
    port              BIGINT,
    status            TEXT NOT NULL CHECK (status IN ('STARTING', 'RUNNING', 'STOPPED', 'FAILED')),
    health_status     TEXT NOT NULL CHECK (health_status IN ('HEALTHY', 'UNHEALTHY', 'UNKNOWN')),
    last_health_check TIMESTAMPTZ,
    deployed_at       TIMESTAMPTZ NOT NULL,
    stopped_at        TIMESTAMPTZ,
    pid               BIGINT,
    exit_code         BIGINT,
    exit_signal       BIGINT,
    error             TEXT,
    updated_at        TIMESTAMPTZ NOT NULL
);

CREATE INDEX deployments_tool ON deployments(tool_id);
CREATE INDEX deployments_status ON deployments(status);
CREATE UNIQUE INDEX deployments_live_port ON deployments(port)
    WHERE status IN ('STARTING', 'RUNNING') AND port IS NOT NULL;
