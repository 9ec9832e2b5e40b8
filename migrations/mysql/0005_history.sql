-- History survives `tool rm` (issue 14): deleting a tool no longer deletes its deployments'
-- records; they stay, marked with when their tool was deleted. The store keeps a deployment
-- from being inserted for a tool that is gone (it locks the tool's row first; see
-- Store::insert_deployment), which the foreign key did before. The key's index stays, for
-- lookups by tool.
ALTER TABLE deployments DROP FOREIGN KEY deployments_tool_fk;
ALTER TABLE deployments ADD COLUMN tool_deleted_at DATETIME(6);
