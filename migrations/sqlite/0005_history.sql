-- History survives `tool rm` (issue 14): deleting a tool no longer deletes its deployments'
-- records; they stay, marked with when their tool was deleted. SQLite cannot drop a foreign
-- key, so the table is rebuilt without it (nothing references deployments, so dropping the old
-- table cascades nowhere), every row and index kept. The store keeps a deployment from being
-- inserted for a tool that is gone (it locks the tool's row first; see Store::insert_deployment).
CREATE TABLE deployments_new (
    id                TEXT PRIMARY KEY NOT NULL,
    tool_id           TEXT NOT NULL,
    tool_slug         TEXT NOT NULL,
    endpoint_url      TEXT NOT NULL,
    port              INTEGER,
    status            TEXT NOT NULL CHECK (status IN ('STARTING', 'RUNNING', 'STOPPED', 'FAILED')),
    health_status     TEXT NOT NULL CHECK (health_status IN ('HEALTHY', 'UNHEALTHY', 'UNKNOWN')),
    last_health_check TEXT,
    deployed_at       TEXT NOT NULL,
    stopped_at        TEXT,
    exit_code         INTEGER,
    exit_signal       INTEGER,
    error             TEXT,
    updated_at        TEXT NOT NULL,
    node_id           TEXT NOT NULL DEFAULT '',
    desired           TEXT NOT NULL DEFAULT 'RUNNING' CHECK (desired IN ('RUNNING', 'STOPPED')),
    restart_count     INTEGER NOT NULL DEFAULT 0,
    last_exit         TEXT,
    next_restart_at   TEXT,
    runtime           TEXT NOT NULL DEFAULT 'process',
    instance          TEXT,
    tool_deleted_at   TEXT
);

INSERT INTO deployments_new (id, tool_id, tool_slug, endpoint_url, port, status, health_status,
    last_health_check, deployed_at, stopped_at, exit_code, exit_signal, error, updated_at,
    node_id, desired, restart_count, last_exit, next_restart_at, runtime, instance)
SELECT id, tool_id, tool_slug, endpoint_url, port, status, health_status,
    last_health_check, deployed_at, stopped_at, exit_code, exit_signal, error, updated_at,
    node_id, desired, restart_count, last_exit, next_restart_at, runtime, instance
FROM deployments;

DROP TABLE deployments;
ALTER TABLE deployments_new RENAME TO deployments;

CREATE INDEX deployments_tool ON deployments(tool_id);
CREATE INDEX deployments_status ON deployments(status);
CREATE UNIQUE INDEX deployments_live_port ON deployments(node_id, port)
    WHERE status IN ('STARTING', 'RUNNING') AND port IS NOT NULL;
CREATE INDEX deployments_node ON deployments(node_id);
