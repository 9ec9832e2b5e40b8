//! Start-up reconciliation: this node's records and processes brought into agreement before
//! anything is deployed.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
};

use uuid::Uuid;

use super::{
    Manager, ManagerError,
    launch::instance_runtime,
    supervisor::{RestartCause, Start},
};
use crate::{
    deployment::{Deployment, DeploymentStatus, Desired, HealthStatus},
    events::EventKind,
    registry::{Tool, Transport},
    runtime::{Endpoint, StopMode},
};

/// What [`Manager::reconcile`] did at start.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Reconciled {
    pub adopted: usize,
    pub restarted: usize,
    pub closed: usize,
}

impl Manager {
    /// Brings this node's records and processes into agreement after a start: adopts the
    /// processes of desired-running deployments that are still theirs, restarts the others,
    /// finishes stops that were under way, and (through `sweep`, which kills every tree the
    /// runtime was not given) kills what no record owns. Must run before the first deploy.
    pub async fn reconcile(self: &Arc<Self>) -> Result<Reconciled, ManagerError> {
        // 1. Read: nothing is signalled or started until every decision is made.
        let records = self.store.live_deployments(&self.node_id).await?;
        let tools: HashMap<Uuid, Tool> = self
            .store
            .list_tools()
            .await?
            .into_iter()
            .map(|t| (t.id, t))
            .collect();
        enum Plan {
            Adopt(Tool, Endpoint),
            Restart(Tool),
            Close(&'static str),
        }
        let mut plans = Vec::with_capacity(records.len());
        for d in records {
            let plan = match tools.get(&d.tool_id) {
                _ if d.desired == Desired::Stopped => Plan::Close("stopped"),
                None => Plan::Close("tool gone"),
                Some(tool) => {
                    // Adoption only registers the instance with the runtime its record names
                    // (and claims its endpoint); it signals nothing. A runtime that is
                    // unavailable adopts nothing: the restart then says why.
                    let runtime = instance_runtime(d.runtime, tool.spec.transport);
                    let ours = match (&d.instance, self.runtimes.assign(d.id, runtime)) {
                        (Some(instance), Ok(runtime)) => {
                            runtime
                                .adopt(
                                    d.id,
                                    &instance
                                        .clone()
                                        .with_endpoint(d.port, self.socket_path(d.id)),
                                    if tool.spec.transport == Transport::Stdio {
                                        StopMode::MainFirst
                                    } else {
                                        StopMode::Tree
                                    },
                                )
                                .await
                        }
                        _ => None,
                    };
                    if let Some(endpoint) = ours {
                        Plan::Adopt(tool.clone(), endpoint)
                    } else {
                        Plan::Restart(tool.clone())
                    }
                }
            };
            plans.push((d, plan));
        }
        // 2. Act.
        let mut killed = Vec::new();
        let adopted: HashSet<Uuid> = plans
            .iter()
            .filter(|(_, p)| matches!(p, Plan::Adopt(..)))
            .map(|(d, _)| d.id)
            .collect();
        for runtime in self.runtimes.all() {
            killed.extend(runtime.sweep(&adopted).await);
        }
        let mut done = Reconciled::default();
        for (d, plan) in plans {
            match plan {
                Plan::Close(why) => {
                    let (status, msg) = if why == "stopped" {
                        (DeploymentStatus::Stopped, None)
                    } else {
                        (
                            DeploymentStatus::Failed,
                            Some("its tool was deleted while Switchboard was down"),
                        )
                    };
                    if self.store.mark_ended(d.id, status, None, msg).await? {
                        self.runtimes.release(d.id);
                    }
                    self.publish(
                        EventKind::Status,
                        d.id,
                        &d.tool_slug,
                        Some(d.status.as_str()),
                        status.as_str(),
                        Some("finished at start".into()),
                    );
                    done.closed += 1;
                }
                Plan::Adopt(tool, endpoint) => {
                    tracing::info!(deployment = %d.id, tool = %d.tool_slug, instance = ?d.instance, "Adopted a running deployment");
                    let id = d.id;
                    if let Err(e) = self.supervise_existing(d, tool, Some(endpoint)) {
                        self.unsupervisable(id, &e).await?;
                    }
                    done.adopted += 1;
                }
                Plan::Restart(tool) => {
                    let what = if killed.contains(&d.id) {
                        "switchboard restarted and found the process gone (its leftovers were killed)"
                    } else {
                        "switchboard restarted and found the process gone"
                    };
                    tracing::warn!(deployment = %d.id, tool = %d.tool_slug, "Restarting a deployment whose process is gone");
                    let mut d = d;
                    d.last_exit = Some(what.to_owned());
                    let id = d.id;
                    if let Err(e) = self.supervise_existing(d, tool, None) {
                        self.unsupervisable(id, &e).await?;
                    }
                    done.restarted += 1;
                }
            }
        }
        Ok(done)
    }

    /// Ends a record found at start that cannot be supervised again (its restart found no
    /// free port), rather than leave it live with nobody watching it.
    async fn unsupervisable(&self, id: Uuid, e: &ManagerError) -> Result<(), ManagerError> {
        tracing::error!(deployment = %id, error = %e, "Cannot supervise a deployment found at start");
        self.runtimes.release(id);
        self.store
            .mark_ended(id, DeploymentStatus::Failed, None, Some(&e.to_string()))
            .await?;
        Ok(())
    }

    /// Puts a deployment found in the store under supervision: adopted (its instance runs and
    /// listens on `adopted`) or to be started again at once (on the port it had, if free).
    pub(super) fn supervise_existing(
        self: &Arc<Self>,
        d: Deployment,
        tool: Tool,
        adopted: Option<Endpoint>,
    ) -> Result<(), ManagerError> {
        let endpoint = match &adopted {
            Some(e) => e.clone(),
            None => self
                .runtimes
                .assign(d.id, instance_runtime(d.runtime, tool.spec.transport))
                .and_then(|r| r.reserve(d.id, &self.listen_for(d.id, &tool.spec, d.port)))
                .map_err(ManagerError::from_runtime)?,
        };
        let backend = self.backend_for(d.id, &endpoint, &tool.spec)?;
        let (cancel, done_tx) = self.insert_live(&d, &endpoint, &tool.spec, d.status);
        // An adopted deployment that was serving is routed before Switchboard listens: its
        // record says RUNNING, so a request must not find no backend while its supervisor task
        // gets going.
        if adopted.is_some()
            && d.status == DeploymentStatus::Running
            && d.health_status != HealthStatus::Unhealthy
        {
            self.route(&tool.spec.slug, &backend, d.id);
        }
        let this = Arc::clone(self);
        let start = if adopted.is_some() {
            Start::Adopted(d.status)
        } else {
            Start::Restart {
                why: RestartCause::FoundGone(d.last_exit.clone().unwrap_or_default()),
                ran: d.status == DeploymentStatus::Running,
            }
        };
        self.tasks.spawn(async move {
            let _done = done_tx;
            this.supervise(d.id, tool, endpoint, backend, start, cancel)
                .await
        });
        Ok(())
    }
}
