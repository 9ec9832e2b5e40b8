//! Starting a deployment's process: its command line and environment, and the record of
//! which instance runs it.

use uuid::Uuid;

use super::Manager;
use crate::{
    registry::ToolSpec,
    runtime::{LaunchSpec, RuntimeError, StopMode},
};

/// The process's command line and environment, with `{port}` substituted.
pub(super) fn launch_spec(id: Uuid, spec: &ToolSpec, port: u16) -> LaunchSpec {
    let port_s = port.to_string();
    let subst = |s: &str| s.replace("{port}", &port_s);
    let mut env: Vec<(String, String)> =
        Vec::with_capacity(spec.env.len() + spec.secret_env.len() + 3);
    if let Some(name) = &spec.port_env {
        env.push((name.clone(), port_s.clone()));
    }
    env.push(("SWITCHBOARD_TOOL".into(), spec.slug.clone()));
    env.push(("SWITCHBOARD_DEPLOYMENT_ID".into(), id.to_string()));
    // The tool's own env last, so it can override the defaults above.
    env.extend(spec.env.iter().map(|(k, v)| (k.clone(), subst(v))));
    env.extend(spec.secret_env.iter().map(|(k, v)| (k.clone(), v.clone())));
    LaunchSpec {
        deployment_id: id,
        program: subst(&spec.command),
        args: spec.args.iter().map(|a| subst(a)).collect(),
        env,
        working_dir: spec.working_dir.clone(),
        stop: StopMode::Tree,
    }
}

impl Manager {
    /// Starts the deployment's process and records which process it is.
    pub(super) async fn spawn_process(
        &self,
        id: Uuid,
        spec: &ToolSpec,
        port: Option<u16>,
    ) -> Result<(), RuntimeError> {
        let launch = match port {
            Some(port) => launch_spec(id, spec, port),
            None => self.bridge_launch_spec(id, spec),
        };
        let instance = self.runtime.start(launch).await?;
        // The record exists and the instance runs: a failure to note it must not leave the
        // instance unsupervised (adoption after a crash then restarts it instead).
        if let Err(e) = self.store.set_instance(id, &instance).await {
            tracing::warn!(deployment = %id, error = %e, "Could not record the instance");
        }
        tracing::info!(deployment = %id, tool = %spec.slug, %instance, port, "Deployment started");
        Ok(())
    }
}
