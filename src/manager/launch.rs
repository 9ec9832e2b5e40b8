//! Starting a deployment's process: its command line and environment, and the record of
//! which instance runs it.

use uuid::Uuid;

use super::Manager;
use crate::{
    registry::ToolSpec,
    runtime::{LaunchSpec, RuntimeError, StopMode},
};

/// The process's command line and environment, with `{port}` substituted. Without a port (a
/// stdio server, which validation keeps from naming `{port}`) there is no port variable.
pub(super) fn launch_spec(id: Uuid, spec: &ToolSpec, port: Option<u16>) -> LaunchSpec {
    let port_s = port.map(|p| p.to_string());
    let subst = |s: &str| match &port_s {
        Some(p) => s.replace("{port}", p),
        None => s.to_owned(),
    };
    let mut env: Vec<(String, String)> =
        Vec::with_capacity(spec.env.len() + spec.secret_env.len() + 3);
    if let (Some(name), Some(port)) = (&spec.port_env, &port_s) {
        env.push((name.clone(), port.clone()));
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
            Some(port) => launch_spec(id, spec, Some(port)),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_deployment_with_a_port_gets_the_port_variable_and_the_tools_env_stays() {
        let spec: ToolSpec = serde_json::from_value(serde_json::json!({
            "slug": "demo", "command": "server", "args": ["--port={port}"],
            "env": {"PORT": "from-the-tool"},
        }))
        .expect("a tool");
        let id = Uuid::new_v4();
        let port_vars = |l: &LaunchSpec| {
            l.env
                .iter()
                .filter(|(k, _)| k == "PORT")
                .map(|(_, v)| v.clone())
                .collect::<Vec<_>>()
        };
        let http = launch_spec(id, &spec, Some(7301));
        assert_eq!(http.args, ["--port=7301"]);
        // Ours first, the tool's own after it (the later one wins in the environment).
        assert_eq!(port_vars(&http), ["7301", "from-the-tool"]);
        let stdio = launch_spec(id, &spec, None);
        assert_eq!(port_vars(&stdio), ["from-the-tool"]);
    }
}
