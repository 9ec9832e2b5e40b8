-- History survives `tool rm` (issue 14): deleting a tool no longer deletes its deployments'
-- records; they stay, marked with when their tool was deleted. The store keeps a deployment
-- from being inserted for a tool that is gone (it locks the tool's row first; see
-- Store::insert_deployment), which the foreign key did before.
ALTER TABLE deployments DROP CONSTRAINT deployments_tool_id_fkey;
ALTER TABLE deployments ADD COLUMN tool_deleted_at TIMESTAMPTZ;
