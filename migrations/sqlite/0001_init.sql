-- Tools: the registry. `spec` is the validated ToolSpec as JSON, so adding a field to a tool
-- needs no schema change; columns exist only for what is looked up or constrained.
CREATE TABLE tools (
    id          TEXT PRIMARY KEY NOT NULL,
    slug        TEXT NOT NULL UNIQUE,
    spec        TEXT NOT NULL,
    created_at  TEXT NOT NULL,
    updated_at  TEXT NOT NULL
);

CREATE TABLE deployments (
    id                TEXT PRIMARY KEY NOT NULL,
    tool_id           TEXT NOT NULL REFERENCES tools(id) ON DELETE CASCADE,
    tool_slug         TEXT NOT NULL,
    endpoint_url      TEXT NOT NULL,
    port              INTEGER,
    status            TEXT NOT NULL CHECK (status IN ('STARTING', 'RUNNING', 'STOPPED', 'FAILED')),
    health_status     TEXT NOT NULL CHECK (health_status IN ('HEALTHY', 'UNHEALTHY', 'UNKNOWN')),
    last_health_check TEXT,
    deployed_at       TEXT NOT NULL,
    stopped_at        TEXT,
    pid               INTEGER,
    exit_code         INTEGER,
    exit_signal       INTEGER,
    error             TEXT,
    updated_at        TEXT NOT NULL
);

CREATE INDEX deployments_tool ON deployments(tool_id);
CREATE INDEX deployments_status ON deployments(status);
-- The backstop for port uniqueness: two live deployments can never share a port, whatever the
-- in-memory allocator believes.
CREATE UNIQUE INDEX deployments_live_port ON deployments(port)
    WHERE status IN ('STARTING', 'RUNNING') AND port IS NOT NULL;
