-- Desired state, restarts and process identity (issue 5): a deployment stays desired-RUNNING
-- until someone stops it; restarts keep the record (and its port); pid + start time identify a
-- process across Switchboard restarts, so a reused pid is never signalled.
ALTER TABLE deployments ADD COLUMN desired TEXT NOT NULL DEFAULT 'RUNNING'
    CHECK (desired IN ('RUNNING', 'STOPPED'));
ALTER TABLE deployments ADD COLUMN restart_count INTEGER NOT NULL DEFAULT 0;
ALTER TABLE deployments ADD COLUMN last_exit TEXT;
ALTER TABLE deployments ADD COLUMN next_restart_at TEXT;
ALTER TABLE deployments ADD COLUMN pid_start_time INTEGER;
