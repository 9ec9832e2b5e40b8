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
    #[error("cannot start '{program}': {source}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("working directory {0} does not exist or is not a directory")]
    WorkingDir(PathBuf),
    #[error("cannot open the deployment log {path}: {source}")]
    Log {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("process tree control failed: {0}")]
    Tree(#[source] std::io::Error),
    #[error("no instance {0} in this runtime")]
    UnknownInstance(Uuid),
}

pub trait Runtime: Send + Sync + 'static {
    /// Starts the instance and returns its main pid once the process exists.
    fn start(&self, spec: LaunchSpec) -> BoxFuture<'_, Result<u32, RuntimeError>>;
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
}
