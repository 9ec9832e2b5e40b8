-- MySQL 8 / MariaDB 10.11+ twin of migrations/sqlite/0001_init.sql. Differences: indexed text
-- columns are VARCHAR (TEXT cannot be a key without a prefix length), timestamps are DATETIME(6)
-- holding UTC, and, since MySQL has no partial indexes, "one live deployment per port" is a
-- unique index on a generated column that is NULL for deployments that are not live.
CREATE TABLE tools (
    id          VARCHAR(36) PRIMARY KEY NOT NULL,
    slug        VARCHAR(63) NOT NULL UNIQUE,
    spec        TEXT NOT NULL,
    created_at  DATETIME(6) NOT NULL,
    updated_at  DATETIME(6) NOT NULL
) ENGINE = InnoDB;

CREATE TABLE deployments (
    id                VARCHAR(36) PRIMARY KEY NOT NULL,
    tool_id           VARCHAR(36) NOT NULL,
    tool_slug         VARCHAR(63) NOT NULL,
    endpoint_url      TEXT NOT NULL,
    port              BIGINT,
    status            VARCHAR(16) NOT NULL CHECK (status IN ('STARTING', 'RUNNING', 'STOPPED', 'FAILED')),
    health_status     VARCHAR(16) NOT NULL CHECK (health_status IN ('HEALTHY', 'UNHEALTHY', 'UNKNOWN')),
    last_health_check DATETIME(6),
    deployed_at       DATETIME(6) NOT NULL,
    stopped_at        DATETIME(6),
    pid               BIGINT,
    exit_code         BIGINT,
    exit_signal       BIGINT,
    error             TEXT,
    updated_at        DATETIME(6) NOT NULL,
    live_port         BIGINT AS (CASE WHEN status IN ('STARTING', 'RUNNING') THEN port END) STORED,
    CONSTRAINT deployments_tool_fk FOREIGN KEY (tool_id) REFERENCES tools(id) ON DELETE CASCADE
) ENGINE = InnoDB;

CREATE INDEX deployments_status ON deployments(status);
CREATE UNIQUE INDEX deployments_live_port ON deployments(live_port);
