//! The manager: the one place that turns requests (register, deploy, stop) into coordinated
//! changes of the store and the runtime, and keeps deployments running.
//!
//! Invariants:
//! - A deployment record is committed (STARTING) before its process is spawned and before the
//!   caller hears of it; nothing runs that the store does not know about.
//! - Each live deployment has exactly one supervisor task, and only it starts processes for the
//!   deployment: it waits for readiness, watches health, and restarts per the tool's restart
//!   policy with backoff, keeping the record (and its port). A stop first records the intent
//!   (`desired = STOPPED`), then cancels the supervisor and waits for it to finish before it
//!   touches the process, so a stop and a restart can never interleave.
//! - Whoever wins the conditional STARTING/RUNNING → STOPPED/FAILED write releases the
//!   deployment's endpoint (its port) with the runtime; nobody else does. A stop and a crash
//!   racing each other therefore free the port once.
//! - At start ([`Manager::reconcile`]) the store is read and every decision made before
//!   anything is killed or started: desired-running deployments whose process is still theirs
//!   (pid and start time match, inside their cgroup) are adopted, the others restarted; what
//!   no record owns is killed.
//! - Every status and health transition is published on [`Events`].
//!
//! `Manager`'s methods live in one file per concept: here the type and its public operations;
//! `supervisor`, `reconcile`, `health_batch`, `launch`, `bridge`, `install` and `stats` the rest.

use futures_util::FutureExt as _;
use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use tokio::sync::watch;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use uuid::Uuid;

mod bridge;
mod health_batch;
mod install;
mod launch;
mod reconcile;
mod stats;
mod supervisor;
#[cfg(test)]
mod tests;

pub use reconcile::Reconciled;

use self::{bridge::MAX_SOCKET_PATH, health_batch::HealthLog, supervisor::Start};
use crate::{
    deployment::{Deployment, DeploymentStatus, Desired, ExitInfo, HealthStatus},
    events::{Event, EventKind, Events},
    health::{HealthCheckResult, Prober},
    metrics::Metrics,
    ports::PortsExhausted,
    proxy::routes::{Backend, RouteTable},
    registry::{ApplyOutcome, SpecError, Tool, ToolSpec, Transport, UnreadableSecrets},
    runtime::{Endpoint, InstanceRef, RuntimeError, RuntimeKind, Runtimes},
    store::{DeleteTool, DeploymentFilter, Store, StoreError},
};

/// What Switchboard does with its deployments when it exits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExitPolicy {
    /// Stop every deployment (SIGTERM, then SIGKILL after its grace period). The default: a
    /// manager that exits leaves nothing running that nobody supervises.
    #[default]
    Stop,
    /// Leave them running, to be adopted by the next start (upgrades without downtime).
    Keep,
}

#[derive(Debug, thiserror::Error)]
pub enum ManagerError {
    #[error("no tool with slug '{0}'")]
    ToolNotFound(String),
    #[error("a tool with slug '{0}' already exists")]
    ToolExists(String),
    #[error("tool '{slug}' has {live} live deployment(s); stop them before deleting it")]
    ToolInUse { slug: String, live: u64 },
    #[error("no deployment with id '{0}'")]
    DeploymentNotFound(String),
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error(transparent)]
    Secrets(#[from] UnreadableSecrets),
    #[error(transparent)]
    PortsExhausted(#[from] PortsExhausted),
    #[error("the store failed: {0}")]
    Store(#[from] StoreError),
    #[error("could not stop deployment {id}: {error}")]
    Stop { id: Uuid, error: RuntimeError },
    #[error("switchboard is shutting down")]
    ShuttingDown,
    /// The tool's runtime cannot be used now (disabled, or its engine does not answer).
    #[error("{0}")]
    RuntimeUnavailable(String),
    #[error("internal error: {0}")]
    Internal(String),
    /// The tool has limits this host cannot enforce (a cgroup controller is missing).
    #[error("{0}")]
    LimitsUnenforceable(String),
    #[error("deployment {id} runs on node '{node}'; stop it through that node's API")]
    NotOwner { id: Uuid, node: String },
    #[error("deployment {id} is {status}: only a live deployment can be checked")]
    NotLive { id: Uuid, status: DeploymentStatus },
    #[error("deployment {0} is not a stdio deployment: it has no sessions of its own")]
    NotStdio(Uuid),
    #[error("the stdio bridge of deployment {id} did not answer: {message}")]
    Bridge { id: Uuid, message: String },
    #[error(
        "tool '{slug}' has {live} live deployment(s) serving over {from}; stop them before \
         changing its transport to {to} (a running deployment cannot change how it is reached)"
    )]
    TransportChange {
        slug: String,
        from: &'static str,
        to: &'static str,
        live: usize,
    },
    #[error(
        "tool '{slug}' has {live} live deployment(s) running as {from}; stop them before \
         changing its runtime to {to}"
    )]
    RuntimeChange {
        slug: String,
        from: &'static str,
        to: &'static str,
        live: usize,
    },
}

impl ManagerError {
    /// A runtime's refusal to host a deployment: "no port left" is the client's to hear about
    /// (503 with a retry), anything else is ours.
    fn from_runtime(e: RuntimeError) -> ManagerError {
        match e {
            RuntimeError::PortsExhausted(e) => ManagerError::PortsExhausted(e),
            e @ RuntimeError::Unavailable { .. } => ManagerError::RuntimeUnavailable(e.to_string()),
            e @ RuntimeError::Limits(crate::runtime::cgroup_limits::LimitError::Missing {
                ..
            }) => ManagerError::LimitsUnenforceable(e.to_string()),
            e => ManagerError::Internal(e.to_string()),
        }
    }
}

struct Live {
    slug: String,
    /// The status, and how many restarts this run has seen (so a deploy request that waits
    /// can answer once the first attempt has failed, rather than wait out a crash loop).
    status: watch::Sender<(DeploymentStatus, u32)>,
    /// Where it listens (the runtime's reservation, the same across restarts).
    endpoint: Endpoint,
    grace: Duration,
    stopping: bool,
    /// Cancelled to make the supervisor return (a stop, or Switchboard exiting).
    cancel: CancellationToken,
    /// Closed (sender dropped) once the supervisor has returned.
    supervisor_done: watch::Receiver<()>,
    health: HealthStatus,
    /// The tool's runtime as the record says (a stdio bridge runs as a process whatever it
    /// says; its servers are then the named runtime's).
    runtime: RuntimeKind,
}

pub struct Manager {
    store: Store,
    /// Which runtime runs each deployment (processes, containers).
    runtimes: Runtimes,
    prober: Prober,
    routes: Arc<RouteTable>,
    live: Mutex<HashMap<Uuid, Live>>,
    tasks: TaskTracker,
    shutting_down: AtomicBool,
    /// This manager, for tasks a `&self` method must spawn.
    me: std::sync::Weak<Manager>,
    /// The node this manager is: it runs, adopts and stops only deployments that name it.
    node_id: String,
    events: Events,
    exit_policy: Mutex<ExitPolicy>,
    health_log: HealthLog,
    /// `None` when metrics are off.
    metrics: Option<Arc<Metrics>>,
    hosting: Hosting,
    /// Per tool, held while a scale or deploy changes how many deployments it has.
    scaling: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

/// Where servers come from and how stdio ones are reached: packages (`npx:`/`uvx:`) are
/// installed into `packages_dir`; `stdio` tools run through the bridge (`switchboard __stdio`,
/// see `stdio`), which listens on a Unix socket per deployment.
#[derive(Debug, Clone)]
pub struct Hosting {
    /// Where `npx:` / `uvx:` packages are installed (`<data dir>/packages`).
    pub packages_dir: std::path::PathBuf,
    pub registries: crate::packages::Registries,
    /// The base images of package tools with `runtime = "docker"`.
    pub images: crate::packages::BaseImages,
    /// The switchboard executable (the bridge is one of its modes).
    pub bridge: std::path::PathBuf,
    /// Where the bridges' sockets live (`<data dir>/run`).
    pub socket_dir: std::path::PathBuf,
    /// Switchboard's own URL (`http://127.0.0.1:7300`): a stdio deployment's endpoint is
    /// `<public_url>/mcp/<slug>`.
    pub public_url: String,
    /// The container engine's socket (`[docker] host`; `None`: the local defaults), which a
    /// stdio bridge running its servers as containers connects to.
    pub docker_host: Option<String>,
}

/// What [`Manager::scale`] did.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct Scaled {
    pub tool: String,
    /// The tool's replica count now.
    pub replicas: u32,
    /// Deployments this request started.
    pub started: Vec<Deployment>,
    /// Deployments this request stopped (gracefully).
    pub stopped: Vec<Deployment>,
    /// The tool's deployments on this node after the change, oldest first: the ones it had
    /// and kept, then the ones started (as they are once settled, when the request waited).
    pub deployments: Vec<Deployment>,
}

/// What applying the config file's tools did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Applied {
    pub created: usize,
    pub updated: usize,
    pub unchanged: usize,
    /// Changes refused (and logged) because live deployments could not follow them.
    pub refused: usize,
}

impl Manager {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        store: Store,
        runtimes: Runtimes,
        prober: Prober,
        routes: Arc<RouteTable>,
        node_id: String,
        metrics: Option<Arc<Metrics>>,
        hosting: Hosting,
    ) -> Arc<Manager> {
        Arc::new_cyclic(|me| Manager {
            me: me.clone(),
            node_id,
            store,
            runtimes,
            prober,
            routes,
            live: Mutex::new(HashMap::new()),
            tasks: TaskTracker::new(),
            shutting_down: AtomicBool::new(false),
            events: Events::default(),
            exit_policy: Mutex::new(ExitPolicy::default()),
            health_log: HealthLog::new(),
            metrics,
            hosting,
            scaling: Mutex::default(),
        })
    }

    /// Switchboard's base URL as clients reach it (`http://<listen address>`).
    pub fn public_url(&self) -> &str {
        &self.hosting.public_url
    }

    pub fn metrics(&self) -> Option<&Arc<Metrics>> {
        self.metrics.as_ref()
    }

    /// Starts the background writer of batched health results (needs a runtime, so it is
    /// not done in `new`).
    pub fn start_background(&self) {
        self.health_log
            .spawn_flusher(self.store.clone(), self.me.clone());
    }

    pub fn set_exit_policy(&self, policy: ExitPolicy) {
        *self.exit_policy.lock().unwrap_or_else(|p| p.into_inner()) = policy;
    }

    pub fn events(&self) -> &Events {
        &self.events
    }

    fn publish(
        &self,
        kind: EventKind,
        id: Uuid,
        tool: &str,
        from: Option<&str>,
        to: &str,
        reason: Option<String>,
    ) {
        if kind == EventKind::Health && from == Some(to) {
            return;
        }
        self.events.publish(Event {
            at: crate::store::now(),
            kind,
            deployment: id,
            tool: tool.to_owned(),
            from: from.map(str::to_owned),
            to: to.to_owned(),
            reason,
        });
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn prober(&self) -> &Prober {
        &self.prober
    }

    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    pub fn routes(&self) -> &Arc<RouteTable> {
        &self.routes
    }

    /// Puts every registered tool in the routing table (with no backends yet).
    pub async fn load_routes(&self) -> Result<(), ManagerError> {
        for t in self.store.list_tools().await? {
            self.routes.add_tool(&t.spec.slug);
        }
        Ok(())
    }

    fn live(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, Live>> {
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    // ----- tools -----

    /// Registers or updates the config file's tools; running it twice changes nothing. A
    /// transport change that live deployments cannot follow is logged and skipped: failing the
    /// start would leave no server through which to stop them.
    pub async fn apply_tools(&self, specs: Vec<ToolSpec>) -> Result<Applied, ManagerError> {
        let mut applied = Applied::default();
        for spec in specs {
            let slug = spec.slug.clone();
            match self.apply_tool(spec).await {
                Ok((ApplyOutcome::Created, _)) => applied.created += 1,
                Ok((ApplyOutcome::Updated, _)) => applied.updated += 1,
                Ok((ApplyOutcome::Unchanged, _)) => applied.unchanged += 1,
                Err(
                    e @ (ManagerError::TransportChange { .. } | ManagerError::RuntimeChange { .. }),
                ) => {
                    tracing::warn!(tool = %slug, "Config change refused, the stored definition stays: {e}");
                    applied.refused += 1;
                }
                Err(e) => return Err(e),
            }
        }
        Ok(applied)
    }

    /// Creates the tool, or updates it when its definition differs from the stored one: what
    /// the config file and `POST /api/v1/apply` do with each tool.
    pub async fn apply_tool(
        &self,
        mut spec: ToolSpec,
    ) -> Result<(ApplyOutcome, Tool), ManagerError> {
        let stored = self.store.get_tool(&spec.slug).await?;
        if let Some(t) = &stored {
            spec.keep_secrets_from(&t.spec);
        }
        let spec = spec.validate()?;
        match stored {
            None => Ok((ApplyOutcome::Created, self.create_tool(spec).await?)),
            Some(t) if t.spec == spec => Ok((ApplyOutcome::Unchanged, t)),
            Some(t) => {
                self.refuse_transport_change(&t.spec, &spec).await?;
                let tool = self
                    .store
                    .update_tool(&spec)
                    .await?
                    .ok_or(ManagerError::ToolNotFound(spec.slug))?;
                Ok((ApplyOutcome::Updated, tool))
            }
        }
    }

    pub async fn create_tool(&self, spec: ToolSpec) -> Result<Tool, ManagerError> {
        let spec = spec.validate()?;
        let tool = self.store.insert_tool(&spec).await.map_err(|e| match e {
            StoreError::Conflict(_) => ManagerError::ToolExists(spec.slug.clone()),
            e => e.into(),
        })?;
        self.routes.add_tool(&spec.slug);
        Ok(tool)
    }

    pub async fn update_tool(&self, mut spec: ToolSpec) -> Result<Tool, ManagerError> {
        let stored = self.get_tool(&spec.slug).await?;
        spec.keep_secrets_from(&stored.spec);
        let spec = spec.validate()?;
        self.refuse_transport_change(&stored.spec, &spec).await?;
        self.store
            .update_tool(&spec)
            .await?
            .ok_or(ManagerError::ToolNotFound(spec.slug))
    }

    /// A live deployment was started, routed and is restarted for the transport it began
    /// with (a port or a bridge's socket), by the runtime its record names: a new transport
    /// or runtime is refused while any is live.
    async fn refuse_transport_change(
        &self,
        stored: &ToolSpec,
        new: &ToolSpec,
    ) -> Result<(), ManagerError> {
        if stored.transport == new.transport && stored.runtime == new.runtime {
            return Ok(());
        }
        let live = self
            .store
            .list_deployments(&DeploymentFilter {
                tool_slug: Some(new.slug.clone()),
                statuses: vec![DeploymentStatus::Starting, DeploymentStatus::Running],
                ..Default::default()
            })
            .await?
            .len();
        if live > 0 && stored.runtime != new.runtime {
            return Err(ManagerError::RuntimeChange {
                slug: new.slug.clone(),
                from: stored.runtime.as_str(),
                to: new.runtime.as_str(),
                live,
            });
        }
        if live > 0 {
            return Err(ManagerError::TransportChange {
                slug: new.slug.clone(),
                from: stored.transport.as_str(),
                to: new.transport.as_str(),
                live,
            });
        }
        Ok(())
    }

    pub async fn get_tool(&self, slug: &str) -> Result<Tool, ManagerError> {
        self.store
            .get_tool(slug)
            .await?
            .ok_or_else(|| ManagerError::ToolNotFound(slug.to_owned()))
    }

    pub async fn list_tools(&self) -> Result<Vec<Tool>, ManagerError> {
        Ok(self.store.list_tools().await?)
    }

    pub async fn delete_tool(&self, slug: &str) -> Result<(), ManagerError> {
        match self.store.delete_tool(slug).await? {
            DeleteTool::Deleted => {
                self.routes.remove_tool(slug);
                self.scaling
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(slug);
                Ok(())
            }
            DeleteTool::NotFound => Err(ManagerError::ToolNotFound(slug.to_owned())),
            DeleteTool::InUse(live) => Err(ManagerError::ToolInUse {
                slug: slug.to_owned(),
                live,
            }),
        }
    }

    // ----- deployments -----

    /// Brings every `autostart` tool to its `replicas` live deployments.
    pub async fn autostart(self: &Arc<Self>) -> Result<Vec<Deployment>, ManagerError> {
        let mut out = Vec::new();
        for tool in self.store.list_tools().await? {
            if tool.spec.autostart {
                match self.scale(&tool.spec.slug, None, None).await {
                    Ok(s) => out.extend(s.started),
                    // One tool's lost key must not keep the others down (start-up named it).
                    Err(ManagerError::Secrets(e)) => tracing::error!("Not autostarted: {e}"),
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(out)
    }

    /// Starts one deployment of the tool, whatever its `replicas` says, and returns its
    /// committed record (STARTING, or FAILED when the process could not even be spawned).
    pub async fn deploy(self: &Arc<Self>, slug: &str) -> Result<Deployment, ManagerError> {
        let tool = self.get_tool(slug).await?;
        self.deploy_tool(&tool).await
    }

    /// Like [`deploy`](Self::deploy), answering once the deployment has settled (see
    /// [`settle`](Self::settle)) or `timeout` has passed.
    pub async fn deploy_and_wait(
        self: &Arc<Self>,
        slug: &str,
        timeout: Option<Duration>,
    ) -> Result<Deployment, ManagerError> {
        let tool = self.get_tool(slug).await?;
        let d = self.deploy_tool(&tool).await?;
        self.settle(&[d.id], timeout).await;
        self.get_deployment(d.id).await
    }

    /// Waits until each deployment has settled: RUNNING, ended, or its start failed (a restart
    /// is then scheduled, or under way), so a caller that waits hears of a crash loop at its
    /// first turn rather than waiting it out. Returns when `timeout` passes regardless.
    async fn settle(&self, ids: &[Uuid], timeout: Option<Duration>) {
        let watches: Vec<_> = {
            let live = self.live();
            ids.iter()
                .filter_map(|id| live.get(id).map(|l| l.status.subscribe()))
                .collect()
        };
        let all = futures_util::future::join_all(watches.into_iter().map(|mut rx| async move {
            // An error means the deployment left the live set: it has ended.
            let _ = rx
                .wait_for(|(s, restarts)| *s != DeploymentStatus::Starting || *restarts > 0)
                .await;
        }));
        match timeout {
            Some(t) => {
                let _ = tokio::time::timeout(t, all).await;
            }
            None => {
                all.await;
            }
        }
    }

    /// Brings the tool to a number of live deployments on this node. `Some(n)` makes `n` the
    /// tool's `replicas` and starts or stops deployments to match (the ones stopped are those
    /// not RUNNING first, then the newest, each gracefully); `None` keeps the count and only
    /// starts what is missing (a deploy, which never stops anything). With `wait`, answers
    /// once every deployment has settled or the wait's timeout has passed.
    pub async fn scale(
        self: &Arc<Self>,
        slug: &str,
        replicas: Option<u32>,
        wait: Option<Option<Duration>>,
    ) -> Result<Scaled, ManagerError> {
        // One change of a tool's count at a time: two concurrent requests must not both see
        // the same shortfall and start it twice.
        let lock = Arc::clone(
            self.scaling
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .entry(slug.to_owned())
                .or_default(),
        );
        let _serial = lock.lock().await;
        let mut tool = self.get_tool(slug).await?;
        if let Some(n) = replicas
            && n != tool.spec.replicas
        {
            let mut spec = tool.spec.clone();
            spec.replicas = n;
            tool = self.update_tool(spec).await?;
        }
        let target = tool.spec.replicas as usize;
        // What this node runs of the tool and is not already stopping, oldest first.
        let current: Vec<Deployment> = {
            let records = self
                .store
                .list_deployments(&DeploymentFilter {
                    tool_slug: Some(slug.to_owned()),
                    node_id: Some(self.node_id.clone()),
                    statuses: vec![DeploymentStatus::Starting, DeploymentStatus::Running],
                    ..Default::default()
                })
                .await?;
            let live = self.live();
            records
                .into_iter()
                .filter(|d| live.get(&d.id).is_some_and(|l| !l.stopping))
                .collect()
        };
        let mut kept: Vec<Uuid> = current.iter().map(|d| d.id).collect();
        let mut started = Vec::new();
        for _ in current.len()..target {
            let d = self.deploy_tool(&tool).await?;
            kept.push(d.id);
            started.push(d);
        }
        let mut stopped = Vec::new();
        if replicas.is_some() && current.len() > target {
            // Those not serving yet go first, then the newest.
            let mut victims = current;
            victims.reverse();
            victims.sort_by_key(|d| d.status == DeploymentStatus::Running);
            victims.truncate(victims.len() - target);
            kept.retain(|id| !victims.iter().any(|v| v.id == *id));
            let stops = victims.iter().map(|d| self.stop(d.id));
            for r in futures_util::future::join_all(stops).await {
                stopped.push(r?);
            }
        }
        drop(_serial);
        if let Some(timeout) = wait {
            self.settle(&kept, timeout).await;
        }
        let mut deployments = Vec::with_capacity(kept.len());
        for id in kept {
            deployments.push(self.get_deployment(id).await?);
        }
        Ok(Scaled {
            tool: slug.to_owned(),
            replicas: tool.spec.replicas,
            started,
            stopped,
            deployments,
        })
    }

    async fn deploy_tool(self: &Arc<Self>, tool: &Tool) -> Result<Deployment, ManagerError> {
        if self.shutting_down.load(Ordering::SeqCst) {
            return Err(ManagerError::ShuttingDown);
        }
        let spec = &tool.spec;
        spec.check_secrets()?;
        let id = Uuid::new_v4();
        if spec.transport == Transport::Stdio
            && self.socket_path(id).as_os_str().len() > MAX_SOCKET_PATH
        {
            return Err(ManagerError::Internal(format!(
                "the data directory's path is too long for a Unix socket ({} > {MAX_SOCKET_PATH} \
                 bytes): use a shorter data_dir to host stdio servers",
                self.socket_path(id).display()
            )));
        }
        // Claimed before the record is written, so a deploy the runtime cannot host (no port
        // left, no engine, limits it cannot enforce) is refused leaving nothing behind.
        let runtime = self
            .runtimes
            .get(spec.runtime)
            .map_err(ManagerError::from_runtime)?;
        runtime.ready().await.map_err(ManagerError::from_runtime)?;
        runtime
            .can_enforce(&spec.limits)
            .map_err(ManagerError::from_runtime)?;
        let endpoint = self
            .runtimes
            .assign(id, launch::instance_runtime(spec.runtime, spec.transport))
            .and_then(|r| r.reserve(id, &self.listen_for(id, spec, None)))
            .map_err(|e| {
                self.runtimes.release(id);
                ManagerError::from_runtime(e)
            })?;
        let port = endpoint.port();
        let now = crate::store::now();
        let d = Deployment {
            id,
            tool_id: tool.id,
            tool_slug: spec.slug.clone(),
            node_id: self.node_id.clone(),
            // This deployment's own address, through the proxy (its token, Origin and
            // metrics apply), whatever the transport; clients use the tool's `/mcp/{slug}`.
            endpoint_url: Deployment::endpoint_url_for(&self.hosting.public_url, &spec.slug, id),
            port,
            status: DeploymentStatus::Starting,
            health_status: HealthStatus::Unknown,
            last_health_check: None,
            deployed_at: now,
            stopped_at: None,
            runtime: spec.runtime,
            instance: None,
            exit_code: None,
            exit_signal: None,
            error: None,
            updated_at: now,
            desired: Desired::Running,
            restart_count: 0,
            last_exit: None,
            next_restart_at: None,
            tool_deleted_at: None,
        };
        let backend = match self.backend_for(d.id, &endpoint, spec) {
            Ok(b) => b,
            Err(e) => {
                self.runtimes.release(id);
                return Err(e);
            }
        };
        if let Err(e) = self.store.insert_deployment(&d).await {
            self.runtimes.release(id);
            return Err(match e {
                StoreError::ToolGone(slug) => ManagerError::ToolNotFound(slug),
                e => e.into(),
            });
        }
        self.publish(
            EventKind::Status,
            d.id,
            &spec.slug,
            None,
            DeploymentStatus::Starting.as_str(),
            None,
        );
        let (cancel, done_tx) = self.insert_live(&d, &endpoint, spec, DeploymentStatus::Starting);
        if crate::packages::Package::parse(&spec.command).is_some() {
            // Installing may take minutes: the supervisor does it, and the record is
            // STARTING meanwhile.
            let this = Arc::clone(self);
            let tool = tool.clone();
            self.tasks.spawn(async move {
                let _done = done_tx;
                this.supervise(d.id, tool, endpoint, backend, Start::Install, cancel)
                    .await
            });
            return self.get_deployment(d.id).await;
        }
        match self.spawn_process(d.id, spec).await {
            Ok(_) => {
                let this = Arc::clone(self);
                let tool = tool.clone();
                self.tasks.spawn(async move {
                    let _done = done_tx;
                    this.supervise(d.id, tool, endpoint, backend, Start::Spawned, cancel)
                        .await
                });
            }
            Err(e) => {
                tracing::warn!(deployment = %d.id, tool = %spec.slug, error = %e, "Deployment could not start");
                drop(done_tx);
                self.end(d.id, DeploymentStatus::Failed, None, Some(&e.to_string()))
                    .await?;
            }
        }
        self.get_deployment(d.id).await
    }

    fn backend_for(
        &self,
        id: Uuid,
        endpoint: &Endpoint,
        spec: &ToolSpec,
    ) -> Result<Arc<Backend>, ManagerError> {
        // The bridge serves MCP at `/mcp` whatever the server's own path would be.
        let path = match endpoint {
            Endpoint::Tcp { .. } => spec.endpoint_path.clone(),
            Endpoint::Unix(_) => "/mcp".to_owned(),
        };
        let backend = Backend::new(id, endpoint.clone(), path)
            .map_err(|e| ManagerError::Internal(format!("bad upstream address: {e}")))?
            .with_call_timeout(spec.call_timeout_ms.map(Duration::from_millis))
            .with_forward_credentials(spec.forward_credentials)
            .with_expose_tools(spec.expose_tools.as_deref())
            .with_audit_arguments(spec.audit_arguments);
        Ok(Arc::new(match &self.metrics {
            Some(m) => backend.with_metrics(m.backend(&spec.slug, &id.to_string())),
            None => backend,
        }))
    }

    /// Routes `backend`, deployment `id`'s, under `slug`, dialled where its runtime says
    /// (`Runtime::dial`).
    fn route(&self, slug: &str, backend: &Arc<Backend>, id: Uuid) {
        self.routes
            .add_backend(slug, Arc::clone(backend), self.runtimes.of(id).dial(id));
    }

    fn insert_live(
        &self,
        d: &Deployment,
        endpoint: &Endpoint,
        spec: &ToolSpec,
        status: DeploymentStatus,
    ) -> (CancellationToken, watch::Sender<()>) {
        let (status_tx, _) = watch::channel((status, 0));
        let (done_tx, done_rx) = watch::channel(());
        let cancel = CancellationToken::new();
        self.live().insert(
            d.id,
            Live {
                slug: spec.slug.clone(),
                status: status_tx,
                endpoint: endpoint.clone(),
                grace: Duration::from_millis(spec.stop_grace_period_ms),
                stopping: false,
                cancel: cancel.clone(),
                supervisor_done: done_rx,
                health: d.health_status,
                runtime: d.runtime,
            },
        );
        (cancel, done_tx)
    }

    /// A deployment's output, from its runtime: the last `tail` lines and, with `follow`,
    /// what it writes next until the deployment has ended (across its restarts) and its
    /// output is all sent.
    pub async fn logs(
        self: &Arc<Self>,
        id: Uuid,
        tail: usize,
        follow: bool,
    ) -> Result<crate::runtime::LogStream, ManagerError> {
        let d = self.get_deployment(id).await?;
        // The output is its instance's (a stdio bridge's log holds its servers' output too).
        let runtime = self
            .runtimes
            .get(d.instance.as_ref().map_or(d.runtime, InstanceRef::runtime))
            .map_err(ManagerError::from_runtime)?;
        let until = follow.then(|| {
            let this = Arc::clone(self);
            async move {
                // Live here means supervised by this node, until its final status is written.
                while this.live().contains_key(&id) {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
            .boxed()
        });
        Ok(runtime.logs(id, tail, until))
    }

    /// Runs a health check of a live deployment now (outside its schedule).
    pub async fn check_now(&self, id: Uuid) -> Result<HealthCheckResult, ManagerError> {
        let d = self.get_deployment(id).await?;
        if !d.status.is_live() {
            return Err(ManagerError::NotLive {
                id,
                status: d.status,
            });
        }
        let tool = self.get_tool(&d.tool_slug).await?;
        let endpoint =
            self.live()
                .get(&id)
                .map(|l| l.endpoint.clone())
                .ok_or(ManagerError::NotLive {
                    id,
                    status: d.status,
                })?;
        let target = self.probe_target(&endpoint, &tool.spec);
        Ok(self.check(&target, &tool.spec).await)
    }

    /// Moves a live record to a final status; the winner of that write frees the port.
    async fn end(
        &self,
        id: Uuid,
        status: DeploymentStatus,
        exit: Option<ExitInfo>,
        error: Option<&str>,
    ) -> Result<bool, ManagerError> {
        let won = self.store.mark_ended(id, status, exit, error).await?;
        if won {
            let live = self.live().remove(&id);
            if let Some(live) = live {
                self.routes.remove_backend(&live.slug, id);
                self.runtimes.release(id);
                if let Some(m) = &self.metrics {
                    m.forget_deployment(&live.slug, &id.to_string());
                }
                let from = live.status.borrow().0;
                live.status.send_modify(|s| s.0 = status);
                self.publish(
                    EventKind::Status,
                    id,
                    &live.slug,
                    Some(from.as_str()),
                    status.as_str(),
                    error.map(|e| e.lines().next().unwrap_or_default().to_owned()),
                );
            }
        }
        Ok(won)
    }

    pub async fn get_deployment(&self, id: Uuid) -> Result<Deployment, ManagerError> {
        self.store
            .get_deployment(id)
            .await?
            .ok_or_else(|| ManagerError::DeploymentNotFound(id.to_string()))
    }

    pub async fn list_deployments(
        &self,
        filter: &DeploymentFilter,
    ) -> Result<Vec<Deployment>, ManagerError> {
        Ok(self.store.list_deployments(filter).await?)
    }

    /// Cancels a deployment's supervisor and waits until it has returned; from then on the
    /// caller alone touches the deployment's processes. Returns the stop grace period, or
    /// `None` when this manager does not run the deployment.
    async fn take_over(&self, id: Uuid) -> Option<Duration> {
        let (grace, mut done) = {
            let mut live = self.live();
            let l = live.get_mut(&id)?;
            l.stopping = true;
            // New requests stop reaching it now, not after the grace period.
            self.routes.remove_backend(&l.slug, id);
            l.cancel.cancel();
            (l.grace, l.supervisor_done.clone())
        };
        // Err once the supervisor dropped its sender, i.e. returned.
        while done.changed().await.is_ok() {}
        Some(grace)
    }

    /// Stops a deployment: SIGTERM to its tree, SIGKILL after its grace period, then STOPPED.
    /// Stopping one that already ended returns its record unchanged.
    pub async fn stop(&self, id: Uuid) -> Result<Deployment, ManagerError> {
        let d = self.get_deployment(id).await?;
        if !d.status.is_live() {
            return Ok(d);
        }
        if d.node_id != self.node_id {
            return Err(ManagerError::NotOwner {
                id,
                node: d.node_id,
            });
        }
        // The intent first: if Switchboard dies during the stop, the next start finishes it
        // instead of restarting the deployment.
        self.store.set_desired(id, Desired::Stopped).await?;
        let exit = match self.take_over(id).await {
            Some(grace) => self
                .runtimes
                .of(id)
                .stop(id, grace)
                .await
                .map_err(|error| ManagerError::Stop { id, error })?,
            None => None,
        };
        match self.end(id, DeploymentStatus::Stopped, exit, None).await {
            Ok(true) => tracing::info!(deployment = %id, tool = %d.tool_slug, "Deployment stopped"),
            Ok(false) => {}
            Err(e) => {
                // The process is stopped but the record could not say so: keep trying in the
                // background, and tell the caller (who may retry; stop is idempotent).
                if let Some(this) = self.me.upgrade() {
                    self.tasks.spawn(async move {
                        this.until_stored(id, "STOPPED", || {
                            this.end(id, DeploymentStatus::Stopped, exit, None)
                        })
                        .await;
                    });
                }
                return Err(e);
            }
        }
        self.get_deployment(id).await
    }

    /// Retries a store write the supervisor must not lose (a status change for something that
    /// already happened) until it succeeds: through a database outage, the record catches up
    /// once the database is back. Gives up only when Switchboard is shutting down (the next
    /// start reconciles what is left) or the deployment is no longer this manager's.
    async fn until_stored<T, E, F, Fut>(&self, id: Uuid, what: &str, mut write: F) -> Option<T>
    where
        E: std::fmt::Display,
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, E>>,
    {
        let mut delay = Duration::from_millis(100);
        loop {
            match write().await {
                Ok(v) => return Some(v),
                Err(e) => {
                    let gone = !self.live().contains_key(&id);
                    if self.shutting_down.load(Ordering::SeqCst) || gone {
                        tracing::error!(deployment = %id, error = %e, "Could not record {what}; giving up");
                        return None;
                    }
                    tracing::warn!(deployment = %id, error = %e, retry_in = ?delay, "Could not record {what}; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    /// From now on, deploy requests fail with [`ManagerError::ShuttingDown`].
    pub fn refuse_deploys(&self) {
        self.shutting_down.store(true, Ordering::SeqCst);
    }

    /// Refuses new deployments, ends every supervisor, then stops every live deployment (each
    /// with its own grace period) or, under [`ExitPolicy::Keep`], leaves them running for the
    /// next start to adopt. Returns how many deployments were live.
    pub async fn shutdown(&self) -> usize {
        self.refuse_deploys();
        let policy = *self.exit_policy.lock().unwrap_or_else(|p| p.into_inner());
        let ids: Vec<Uuid> = self.live().keys().copied().collect();
        let count = ids.len();
        if !ids.is_empty() {
            match policy {
                ExitPolicy::Stop => {
                    tracing::info!(count = ids.len(), "Stopping deployments before exit")
                }
                ExitPolicy::Keep => {
                    tracing::info!(
                        count = ids.len(),
                        "Leaving deployments running for the next start (exit policy: keep)"
                    )
                }
            }
        }
        let stops = ids.into_iter().map(|id| async move {
            let Some(grace) = self.take_over(id).await else {
                return;
            };
            if policy == ExitPolicy::Keep {
                return;
            }
            let exit = match self.runtimes.of(id).stop(id, grace).await {
                Ok(exit) => exit,
                Err(e) => {
                    tracing::error!(deployment = %id, error = %e, "Could not stop deployment");
                    None
                }
            };
            // A record that cannot be closed now is finished by the next start.
            if let Err(e) = self.end(id, DeploymentStatus::Stopped, exit, None).await {
                tracing::error!(deployment = %id, error = %e, "Could not record the stop");
            }
        });
        futures_util::future::join_all(stops).await;
        self.tasks.close();
        self.tasks.wait().await;
        count
    }
}
