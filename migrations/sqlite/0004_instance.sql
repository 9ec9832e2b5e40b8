-- Runtime boundary (issue 16): a deployment names its runtime and the instance that runtime
-- runs, as the runtime's own reference (JSON, opaque to everything else), instead of pid columns
-- that only a process runtime could fill. A live process recorded by an earlier release keeps
-- its pid and start time inside the reference, so it is still adopted after the upgrade.
ALTER TABLE deployments ADD COLUMN runtime TEXT NOT NULL DEFAULT 'process';
ALTER TABLE deployments ADD COLUMN instance TEXT;
UPDATE deployments
   SET instance = json_object('kind', 'process', 'pid', pid, 'start_time', pid_start_time)
 WHERE pid IS NOT NULL;
ALTER TABLE deployments DROP COLUMN pid;
ALTER TABLE deployments DROP COLUMN pid_start_time;
