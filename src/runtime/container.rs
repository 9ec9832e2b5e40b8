//! What a container needs beyond a command: its image and the settings a tool gives its
//! containers. The registry's tool fields and the Docker runtime's launch share these types.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Whether the engine may pull a tool's image that is not on the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema, Default)]
#[serde(rename_all = "lowercase")]
pub enum Pull {
    /// Never: a missing image fails the start at once, naming the image.
    #[default]
    Never,
    /// When the image is not on the host.
    Missing,
}

impl Pull {
    pub fn as_str(self) -> &'static str {
        match self {
            Pull::Never => "never",
            Pull::Missing => "missing",
        }
    }
}

/// The network a tool's containers join.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema, Default)]
#[serde(rename_all = "lowercase")]
pub enum Network {
    /// Docker's default bridge; the server's port is published on 127.0.0.1 only.
    #[default]
    Bridge,
    /// No network at all (for stdio servers; an HTTP server could not be reached).
    None,
    /// The host's network: nothing is published, the server's own bind address decides who
    /// can reach it.
    Host,
}

impl Network {
    pub fn as_str(self) -> &'static str {
        match self {
            Network::Bridge => "bridge",
            Network::None => "none",
            Network::Host => "host",
        }
    }
}

/// The secure defaults of a tool's containers, each on unless the tool turns it off.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, default)]
pub struct DockerSecurity {
    /// An init process as PID 1 (`--init`): it forwards SIGTERM to the server and reaps
    /// zombies, so a stop does not wait out its grace period for a PID 1 without a handler.
    pub init: bool,
    /// Drop every Linux capability (`--cap-drop ALL`).
    pub drop_capabilities: bool,
    /// `--security-opt no-new-privileges`: setuid binaries gain nothing.
    pub no_new_privileges: bool,
    /// A read-only root filesystem, with a writable tmpfs at `/tmp`.
    pub read_only_rootfs: bool,
}

impl Default for DockerSecurity {
    fn default() -> Self {
        DockerSecurity {
            init: true,
            drop_capabilities: true,
            no_new_privileges: true,
            read_only_rootfs: true,
        }
    }
}

impl DockerSecurity {
    pub fn is_default(&self) -> bool {
        *self == DockerSecurity::default()
    }
}

/// The user a container runs as unless its tool names one: `nobody` (by number, so an image
/// without /etc/passwd, such as one `FROM scratch`, runs it too).
pub const DEFAULT_USER: &str = "65534:65534";

/// A container's part of a launch, from its tool.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerLaunch {
    pub image: String,
    pub pull: Pull,
    pub network: Network,
    /// `uid[:gid]` or a name the image knows.
    pub user: String,
    pub security: DockerSecurity,
    /// The tool's slug, for the container's labels.
    pub tool: String,
    /// Named volumes mounted read-only (a package tool's install).
    pub mounts: Vec<VolumeMount>,
}

/// A named volume a container mounts read-only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeMount {
    pub volume: String,
    /// The path inside the container.
    pub target: String,
}

/// How a stdio deployment's bridge runs each server process as a container (`runtime =
/// "docker"` with `transport = "stdio"`): what the bridge's `--container` option carries, as
/// JSON. Settings only: the environment travels by name, its values (secrets among them)
/// reach the bridge through its own environment, never a command line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StdioContainers {
    /// The engine's socket (`None`: the local defaults, `DOCKER_HOST` then
    /// `/var/run/docker.sock`).
    pub engine: Option<String>,
    /// The node whose label the containers carry (so its sweep knows them).
    pub node: String,
    pub deployment: uuid::Uuid,
    pub launch: ContainerLaunch,
    pub limits: super::Limits,
    pub working_dir: Option<std::path::PathBuf>,
    /// The variables, in order, that the bridge passes from its environment to each
    /// container's.
    pub env: Vec<String>,
}
