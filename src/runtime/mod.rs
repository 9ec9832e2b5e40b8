//! Running deployments: the boundary between the manager and whatever executes a server.
//!
//! [`Runtime`] is deliberately small (start, wait, stop, inspect, and the log tail the manager
//! quotes when a start fails) because a Docker and a Kubernetes runtime will implement it too.
//! Only the process runtime exists today ([`process::ProcessRuntime`]).
//!
//! Boundary: a runtime knows nothing about the store, ports or MCP. It runs what [`LaunchSpec`]
//! says, reports exits, and stops whole process trees. Its methods return boxed futures so the
//! manager can hold an `Arc<dyn Runtime>`; none of them is on a request's hot path.

pub mod cgroup;
pub mod launch;
pub mod process;

use std::{path::PathBuf, time::Duration};

use futures_util::future::BoxFuture;
use uuid::Uuid;

use crate::deployment::ExitInfo;

/// Everything a runtime needs to start one deployment. Placeholders are already substituted.
#[derive(Debug, Clone)]
pub struct LaunchSpec {
    pub deployment_id: Uuid,
    pub program: String,
    pub args: Vec<String>,
    /// Added to (and overriding) the environment Switchboard inherited.
    pub env: Vec<(String, String)>,
    pub working_dir: Option<PathBuf>,
    pub stop: StopMode,
}

/// Who gets the SIGTERM that starts a stop.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum StopMode {
    /// Every process of the tree at once (an HTTP server and whatever it started).
    #[default]
    Tree,
    /// The main process alone, which stops its own children in its own order (the stdio
    /// bridge: stdin closed first, as MCP's stdio shutdown says). What is left after the grace
    /// period is killed as usual.
    MainFirst,
}

/// One process, named so that a reused pid is never mistaken for it: the pid and the time the
/// process started (clock ticks after boot, /proc/PID/stat field 22).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcessId {
    pub pid: u32,
    /// `None` where /proc could not be read (the process already gone).
    pub start_time: Option<u64>,
}

impl ProcessId {
    /// The live process `pid` is now, or `None` when there is none.
    pub fn of(pid: u32) -> Option<ProcessId> {
        process_start_time(pid).map(|t| ProcessId {
            pid,
            start_time: Some(t),
        })
    }

    /// Whether `pid` is still this very process (false when it is gone or the pid was reused).
    pub fn is_alive(&self) -> bool {
        self.start_time.is_some() && process_start_time(self.pid) == self.start_time
    }
}

/// Field 22 of /proc/PID/stat. The command name (field 2) may hold spaces and parentheses, so
/// fields are counted after its closing parenthesis.
pub fn process_start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let mut fields = stat[stat.rfind(')')? + 1..].split_whitespace();
    // A zombie has exited; it only waits to be reaped.
    if matches!(fields.next(), Some("Z" | "X" | "x")) {
        return None;
    }
    // After the name and the state (field 3), starttime (22) is the 19th.
    fields.nth(18)?.parse().ok()
}

/// What a runtime can say about a running or finished instance.
#[derive(Debug, Clone)]
pub struct InstanceInfo {
    pub pid: u32,
    /// `Some` once the main process has exited.
    pub exited: Option<ExitInfo>,
    /// Every live process of the instance's tree, the main one included.
    pub tree: Vec<u32>,
}

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("cannot start '{program}': {error}")]
    Spawn {
        program: String,
        error: std::io::Error,
    },
    #[error("working directory {0} does not exist or is not a directory")]
    WorkingDir(PathBuf),
    #[error("cannot open the deployment log {path}: {error}")]
    Log {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("process tree control failed: {0}")]
    Tree(#[source] std::io::Error),
    #[error("no instance {0} in this runtime")]
    UnknownInstance(Uuid),
}

pub trait Runtime: Send + Sync + 'static {
    /// Starts the instance and returns its main process once it exists. Starting an id again
    /// (a restart) replaces the ended instance.
    fn start(&self, spec: LaunchSpec) -> BoxFuture<'_, Result<ProcessId, RuntimeError>>;
    /// Takes charge of an instance an earlier Switchboard process started, if `process` is
    /// still that instance's (same pid and start time, and in its cgroup where there are
    /// cgroups). Returns false, having signalled nothing, when it is not.
    fn adopt(&self, id: Uuid, process: ProcessId, stop: StopMode) -> bool;
    /// Resolves when the instance's main process exits (at once if it already has).
    fn wait(&self, id: Uuid) -> BoxFuture<'_, Result<ExitInfo, RuntimeError>>;
    /// Stops the whole tree: SIGTERM to every process, SIGKILL to what is left after `grace`.
    /// Returns the main process's exit, or `None` for an instance this runtime does not know.
    /// Idempotent.
    fn stop(
        &self,
        id: Uuid,
        grace: Duration,
    ) -> BoxFuture<'_, Result<Option<ExitInfo>, RuntimeError>>;
    fn inspect(&self, id: Uuid) -> Option<InstanceInfo>;
    /// The last `lines` lines of the instance's output.
    fn logs_tail(&self, id: Uuid, lines: usize) -> BoxFuture<'_, String>;
    /// The file the instance's output goes to (kept after it ends), if it has one.
    fn log_file(&self, id: Uuid) -> Option<PathBuf>;
}
