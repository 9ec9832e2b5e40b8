//! How the manager runs and reaches a stdio deployment's bridge (`switchboard __stdio`): its
//! socket path, its command line, and the bridge's `/sessions` answer.

use std::time::Duration;

use uuid::Uuid;

use super::{Manager, ManagerError, launch::launch_spec};
use crate::{
    registry::{ToolSpec, Transport},
    runtime::{LaunchSpec, Listen, StopMode, container::StdioContainers},
};

/// The longest Unix socket path Linux accepts (`sun_path` is 108 bytes with its NUL).
pub(super) const MAX_SOCKET_PATH: usize = 107;

impl Manager {
    /// The Unix socket a stdio deployment's bridge serves on.
    pub(super) fn socket_path(&self, id: Uuid) -> std::path::PathBuf {
        self.hosting
            .socket_dir
            .join(format!("{}.sock", id.simple()))
    }

    /// A stdio deployment runs the bridge, which runs the server: `switchboard __stdio
    /// --socket ... -- <command> <args>`. The tool's environment reaches the server through
    /// the bridge (never its command line, which any local user can read). With `runtime =
    /// "docker"` the bridge is still a host process, and each server process a container: the
    /// container settings and limits go to the bridge (`--container`), the environment by
    /// name.
    pub(super) fn bridge_launch_spec(&self, id: Uuid, spec: &ToolSpec) -> LaunchSpec {
        let mut launch = launch_spec(id, spec, Listen::Socket(self.socket_path(id)));
        let container = launch.container.take().map(|c| StdioContainers {
            engine: self.hosting.docker_host.clone(),
            node: self.node_id.clone(),
            deployment: id,
            launch: c,
            limits: std::mem::take(&mut launch.limits),
            working_dir: launch.working_dir.take(),
            env: launch
                .env
                .iter()
                .chain(&launch.secret_env)
                .map(|(k, _)| k.clone())
                .collect(),
        });
        let replicas = u64::from(spec.replicas.max(1));
        let sessions = u64::from(spec.stdio.max_sessions).div_ceil(replicas);
        let mut command = vec![std::mem::take(&mut launch.program)];
        command.append(&mut launch.args);
        let bridge = crate::stdio::BridgeArgs {
            socket: self.socket_path(id),
            max_sessions: usize::try_from(sessions).unwrap_or(usize::MAX),
            idle_ms: spec.stdio.session_idle_ms,
            pool: spec.stdio.pool_size as usize,
            spares: spec.stdio.spares as usize,
            // The bridge gives each server a third of the grace period after closing its
            // stdin and another third after SIGTERM; the runtime kills what is left at the end.
            grace_ms: spec.stop_grace_period_ms / 3,
            // The supervisor's check gives up after health.timeout_ms: the bridge answers
            // within it, so a probe queued behind a busy server's calls is not a failure.
            probe_ms: (spec.health.timeout_ms * 3 / 4).max(100),
            startup_ms: spec.startup_timeout_ms,
            container,
            command,
        };
        launch.args = bridge.to_args();
        launch.program = self.hosting.bridge.display().to_string();
        launch.stop = StopMode::MainFirst;
        launch
    }

    /// A live stdio deployment's open MCP sessions and server processes, from its bridge.
    pub async fn stdio_sessions(
        &self,
        id: Uuid,
    ) -> Result<crate::stdio::BridgeSessions, ManagerError> {
        let d = self.get_deployment(id).await?;
        let tool = self.get_tool(&d.tool_slug).await?;
        if tool.spec.transport != Transport::Stdio {
            return Err(ManagerError::NotStdio(id));
        }
        if !d.status.is_live() {
            return Err(ManagerError::NotLive {
                id,
                status: d.status,
            });
        }
        if d.node_id != self.node_id {
            return Err(ManagerError::NotOwner {
                id,
                node: d.node_id,
            });
        }
        let bridge_error = |e: reqwest::Error| ManagerError::Bridge {
            id,
            message: e.to_string(),
        };
        crate::stdio::bridge_client(&self.socket_path(id))
            .map_err(bridge_error)?
            .get("http://bridge/sessions")
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .and_then(reqwest::Response::error_for_status)
            .map_err(bridge_error)?
            .json()
            .await
            .map_err(bridge_error)
    }
}
