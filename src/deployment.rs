//! What a deployment record is: its states and the record itself.
//!
//! The record is the unit of truth shared by the store, the manager and the API. Status moves
//! STARTING → RUNNING → STOPPED/FAILED (or STARTING → FAILED/STOPPED); STOPPED and FAILED are
//! final, and every write the manager makes is conditioned on the current status so that a late
//! event (an exit noticed after a stop) can never move a record backwards.

use std::{fmt, str::FromStr};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

pub use crate::runtime::{ExitInfo, InstanceRef, RuntimeKind};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "UPPERCASE")]
pub enum DeploymentStatus {
    Starting,
    Running,
    Stopped,
    Failed,
}

impl DeploymentStatus {
    pub const ALL: [DeploymentStatus; 4] = [
        DeploymentStatus::Starting,
        DeploymentStatus::Running,
        DeploymentStatus::Stopped,
        DeploymentStatus::Failed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DeploymentStatus::Starting => "STARTING",
            DeploymentStatus::Running => "RUNNING",
            DeploymentStatus::Stopped => "STOPPED",
            DeploymentStatus::Failed => "FAILED",
        }
    }

    /// A live deployment owns a port and (normally) a process.
    pub fn is_live(self) -> bool {
        matches!(self, DeploymentStatus::Starting | DeploymentStatus::Running)
    }
}

impl fmt::Display for DeploymentStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, thiserror::Error)]
#[error("'{0}' is not a status: use one of STARTING, RUNNING, STOPPED, FAILED")]
pub struct ParseStatusError(String);

impl FromStr for DeploymentStatus {
    type Err = ParseStatusError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        DeploymentStatus::ALL
            .into_iter()
            .find(|st| st.as_str().eq_ignore_ascii_case(s.trim()))
            .ok_or_else(|| ParseStatusError(s.to_owned()))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "UPPERCASE")]
pub enum HealthStatus {
    Healthy,
    Unhealthy,
    Unknown,
}

impl HealthStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            HealthStatus::Healthy => "HEALTHY",
            HealthStatus::Unhealthy => "UNHEALTHY",
            HealthStatus::Unknown => "UNKNOWN",
        }
    }
}

impl FromStr for HealthStatus {
    type Err = ParseStatusError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [
            HealthStatus::Healthy,
            HealthStatus::Unhealthy,
            HealthStatus::Unknown,
        ]
        .into_iter()
        .find(|st| st.as_str().eq_ignore_ascii_case(s))
        .ok_or_else(|| ParseStatusError(s.to_owned()))
    }
}

impl fmt::Display for HealthStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What someone asked a deployment to be. It stays `RUNNING` from the deploy request until a
/// stop request, whatever happens to its processes; Switchboard works to make the actual status
/// match (restarts, adoption after its own restart).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema, Default)]
#[serde(rename_all = "UPPERCASE")]
pub enum Desired {
    #[default]
    Running,
    Stopped,
}

impl Desired {
    pub fn as_str(self) -> &'static str {
        match self {
            Desired::Running => "RUNNING",
            Desired::Stopped => "STOPPED",
        }
    }
}

impl FromStr for Desired {
    type Err = ParseStatusError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [Desired::Running, Desired::Stopped]
            .into_iter()
            .find(|st| st.as_str().eq_ignore_ascii_case(s))
            .ok_or_else(|| ParseStatusError(s.to_owned()))
    }
}

/// One deployment of a tool.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Deployment {
    pub id: Uuid,
    pub tool_id: Uuid,
    pub tool_slug: String,
    /// The Switchboard node that runs (and alone may stop) this deployment.
    pub node_id: String,
    /// Where the deployment's MCP endpoint answers.
    pub endpoint_url: String,
    pub port: Option<u16>,
    pub status: DeploymentStatus,
    pub health_status: HealthStatus,
    pub last_health_check: Option<DateTime<Utc>>,
    pub deployed_at: DateTime<Utc>,
    pub stopped_at: Option<DateTime<Utc>>,
    /// The runtime that runs the deployment.
    #[serde(default)]
    pub runtime: RuntimeKind,
    /// The instance that runs (or last ran) the deployment, as its runtime names it (for a
    /// process: its pid and start time); null before the first start and while a restart
    /// waits.
    #[serde(default)]
    pub instance: Option<InstanceRef>,
    /// Exit code of the server process, when it exited normally.
    pub exit_code: Option<i32>,
    /// Signal that ended the server process, when a signal did.
    pub exit_signal: Option<i32>,
    /// Why the deployment failed, with the last lines of its log.
    pub error: Option<String>,
    pub updated_at: DateTime<Utc>,
    #[serde(default)]
    pub desired: Desired,
    /// Times the deployment's process was started again after it ended.
    #[serde(default)]
    pub restart_count: u32,
    /// How the previous process ended, when the deployment was restarted.
    #[serde(default)]
    pub last_exit: Option<String>,
    /// Set while a restart waits out its backoff delay: a deployment that keeps crashing shows
    /// it here (with `restart_count` and `last_exit`).
    #[serde(default)]
    pub next_restart_at: Option<DateTime<Utc>>,
    /// When the deployment's tool was deleted; absent while the tool exists. The record stays
    /// (history outlives `tool rm`), and `ps` marks it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_deleted_at: Option<DateTime<Utc>>,
}

impl Deployment {
    /// A deployment's own address: `<base>/mcp/<slug>/@<id>`, through the proxy, unique to it
    /// whatever the transport (clients use the tool's `<base>/mcp/<slug>`).
    pub fn endpoint_url_for(public_url: &str, slug: &str, id: Uuid) -> String {
        format!("{public_url}/mcp/{slug}/@{id}")
    }

    /// The tool's URL, the one MCP clients should use (records written before deployments had
    /// addresses of their own show their old endpoint).
    pub fn tool_url(&self) -> &str {
        self.endpoint_url
            .strip_suffix(&format!("/@{}", self.id))
            .unwrap_or(&self.endpoint_url)
    }
}
