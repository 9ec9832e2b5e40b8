-- Several Switchboard nodes may share one database: each deployment names the node that runs
-- it, and a port is unique among one node's live deployments (nodes are different hosts).
ALTER TABLE deployments ADD COLUMN node_id TEXT NOT NULL DEFAULT '';
DROP INDEX deployments_live_port;
CREATE UNIQUE INDEX deployments_live_port ON deployments(node_id, port)
    WHERE status IN ('STARTING', 'RUNNING') AND port IS NOT NULL;
CREATE INDEX deployments_node ON deployments(node_id);
