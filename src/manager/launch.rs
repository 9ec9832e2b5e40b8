//! Starting a deployment's process: its command line and environment, and the record of
//! which instance runs it.

use uuid::Uuid;

use super::{Manager, supervisor::Failure};
use crate::{
    registry::{ToolSpec, Transport},
    runtime::{
        ContainerLaunch, Endpoint, LaunchSpec, Listen, RuntimeKind, StopMode,
        container::{DEFAULT_USER, VolumeMount},
    },
};

/// The process's command line and environment as the tool says, `{port}` left for the runtime
/// (which picks the port) to substitute.
pub(super) fn launch_spec(id: Uuid, spec: &ToolSpec, listen: Listen) -> LaunchSpec {
    let mut env: Vec<(String, String)> = Vec::with_capacity(spec.env.len() + 2);
    env.push(("SWITCHBOARD_TOOL".into(), spec.slug.clone()));
    env.push(("SWITCHBOARD_DEPLOYMENT_ID".into(), id.to_string()));
    // The tool's own env last, so it can override the defaults above.
    env.extend(spec.env.iter().map(|(k, v)| (k.clone(), v.clone())));
    LaunchSpec {
        deployment_id: id,
        program: spec.command.clone(),
        args: spec.args.clone(),
        env,
        secret_env: spec
            .secret_env
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        working_dir: spec.working_dir.clone(),
        stop: StopMode::Tree,
        listen,
        container: (spec.runtime == RuntimeKind::Docker).then(|| container_launch(spec)),
        limits: spec.limits,
    }
}

/// The runtime that runs a deployment's instance (what dispatch assigns it to): a stdio
/// tool's instance is its bridge, a host process on the process runtime whatever runs the
/// server processes behind it (with `runtime = "docker"` the bridge starts them as
/// containers); any other tool's instance runs on the tool's runtime. The record's `runtime`
/// stays the tool's: it is what people read in `switchboard ps` and the API.
pub(super) fn instance_runtime(runtime: RuntimeKind, transport: Transport) -> RuntimeKind {
    match transport {
        Transport::Stdio => RuntimeKind::Process,
        Transport::StreamableHttp => runtime,
    }
}

/// A docker tool's container settings.
pub(super) fn container_launch(spec: &ToolSpec) -> ContainerLaunch {
    ContainerLaunch {
        image: spec.image.clone().unwrap_or_default(),
        pull: spec.pull,
        network: spec.network,
        user: spec.user.clone().unwrap_or_else(|| DEFAULT_USER.to_owned()),
        security: spec.docker.clone(),
        tool: spec.slug.clone(),
        mounts: spec
            .package_volume
            .iter()
            .map(|v| VolumeMount {
                volume: v.clone(),
                target: crate::packages::MOUNT.to_owned(),
            })
            .collect(),
    }
}

impl Manager {
    /// How a deployment of `spec` listens: a stdio server through its bridge's socket (no
    /// port from the range), any other on a port the runtime picks (`prefer`: the one it had).
    pub(super) fn listen_for(&self, id: Uuid, spec: &ToolSpec, prefer: Option<u16>) -> Listen {
        match spec.transport {
            Transport::Stdio => Listen::Socket(self.socket_path(id)),
            Transport::StreamableHttp => Listen::Port {
                env: spec.port_env.clone(),
                prefer,
            },
        }
    }

    /// Starts the deployment's instance and records which instance it is and where it listens.
    /// Never without all of its secrets.
    pub(super) async fn spawn_process(
        &self,
        id: Uuid,
        spec: &ToolSpec,
    ) -> Result<Endpoint, Failure> {
        spec.check_secrets()?;
        let launch = match spec.transport {
            Transport::Stdio => self.bridge_launch_spec(id, spec),
            Transport::StreamableHttp => launch_spec(id, spec, self.listen_for(id, spec, None)),
        };
        let started = self.runtimes.of(id).start(launch).await?;
        // The record exists and the instance runs: a failure to note it must not leave the
        // instance unsupervised (adoption after a crash then restarts it instead).
        if let Err(e) = self
            .store
            .set_instance(id, &started.instance, started.endpoint.port())
            .await
        {
            tracing::warn!(deployment = %id, error = %e, "Could not record the instance");
        }
        tracing::info!(deployment = %id, tool = %spec.slug, instance = %started.instance, endpoint = %started.endpoint, "Deployment started");
        Ok(started.endpoint)
    }
}
