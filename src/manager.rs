//! The manager: the one place that turns requests (register, deploy, stop) into coordinated
//! changes of the store, the port allocator and the runtime.
//!
//! Invariants:
//! - A deployment record is committed (STARTING) before its process is spawned and before the
//!   caller hears of it; nothing runs that the store does not know about.
//! - Each live deployment has one supervisor task. It moves the record to RUNNING when the
//!   server answers an MCP probe, or to FAILED on timeout or early exit, and records a later
//!   crash when the runtime reports the exit (event-driven, not polled).
//! - Whoever wins the conditional STARTING/RUNNING → STOPPED/FAILED write releases the port;
//!   nobody else does. A stop and a crash racing each other therefore free the port once.
//! - At start, before anything is deployed, records left live by a Switchboard that died are
//!   closed and every process tree they left is killed (adoption across restarts is a later
//!   step: see ARCHITECTURE.md).

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use tokio::{sync::watch, time::Instant};
use tokio_util::task::TaskTracker;
use uuid::Uuid;

use crate::{
    deployment::{Deployment, DeploymentStatus, ExitInfo, HealthStatus},
    health::Prober,
    ports::{PortAllocator, PortsExhausted},
    proxy::routes::{Backend, RouteTable},
    registry::{SpecError, Tool, ToolSpec},
    runtime::{LaunchSpec, Runtime, RuntimeError},
    store::{DeleteTool, DeploymentFilter, Store, StoreError},
};

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
    PortsExhausted(#[from] PortsExhausted),
    #[error("the store failed: {0}")]
    Store(#[from] StoreError),
    #[error("could not stop deployment {id}: {source}")]
    Stop {
        id: Uuid,
        #[source]
        source: RuntimeError,
    },
    #[error("switchboard is shutting down")]
    ShuttingDown,
    #[error("internal error: {0}")]
    Internal(String),
    #[error("deployment {id} runs on node '{node}'; stop it through that node's API")]
    NotOwner { id: Uuid, node: String },
}

/// Lines of a failed server's log quoted in its record's `error`.
const LOG_LINES_IN_ERROR: usize = 20;
/// Longest single wait for a readiness probe answer.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

struct Live {
    slug: String,
    status: watch::Sender<DeploymentStatus>,
    port: Option<u16>,
    grace: Duration,
    stopping: bool,
}

pub struct Manager {
    store: Store,
    ports: PortAllocator,
    runtime: Arc<dyn Runtime>,
    prober: Prober,
    routes: Arc<RouteTable>,
    advertise_host: String,
    live: Mutex<HashMap<Uuid, Live>>,
    tasks: TaskTracker,
    shutting_down: AtomicBool,
    /// This manager, for tasks a `&self` method must spawn.
    me: std::sync::Weak<Manager>,
    /// The node this manager is: it runs, adopts and stops only deployments that name it.
    node_id: String,
}

/// What applying the config file's tools did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Applied {
    pub created: usize,
    pub updated: usize,
    pub unchanged: usize,
}

impl Manager {
    pub fn new(
        store: Store,
        ports: PortAllocator,
        runtime: Arc<dyn Runtime>,
        prober: Prober,
        routes: Arc<RouteTable>,
        node_id: String,
    ) -> Arc<Manager> {
        Arc::new_cyclic(|me| Manager {
            me: me.clone(),
            node_id,
            store,
            ports,
            runtime,
            prober,
            routes,
            advertise_host: "127.0.0.1".to_owned(),
            live: Mutex::new(HashMap::new()),
            tasks: TaskTracker::new(),
            shutting_down: AtomicBool::new(false),
        })
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn ports(&self) -> &PortAllocator {
        &self.ports
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

    /// Closes records a previous Switchboard process left live and kills what they ran.
    /// Returns how many records were closed. Must run before the first deploy.
    pub async fn recover(&self, sweep: impl FnOnce() -> Vec<Uuid>) -> Result<usize, ManagerError> {
        let stale = self.store.live_deployments(&self.node_id).await?;
        // Ports are rebuilt from the store first, so nothing can be handed out twice while the
        // stale records are being closed.
        for d in &stale {
            if let Some(p) = d.port {
                self.ports.reserve(p);
            }
        }
        let killed = sweep();
        for d in &stale {
            let msg = if killed.contains(&d.id) {
                "switchboard exited without stopping this deployment; its processes were killed at the next start"
            } else {
                "switchboard exited without stopping this deployment; no process of it was left at the next start"
            };
            if self
                .store
                .mark_ended(d.id, DeploymentStatus::Failed, None, Some(msg))
                .await?
                && let Some(p) = d.port
            {
                self.ports.release(p);
            }
            tracing::warn!(deployment = %d.id, tool = %d.tool_slug, "Closed a deployment left live by an earlier run");
        }
        Ok(stale.len())
    }

    // ----- tools -----

    /// Registers or updates the config file's tools; running it twice changes nothing.
    pub async fn apply_tools(&self, specs: Vec<ToolSpec>) -> Result<Applied, ManagerError> {
        let mut applied = Applied::default();
        for spec in specs {
            let spec = spec.validate()?;
            match self.store.get_tool(&spec.slug).await? {
                None => {
                    self.store.insert_tool(&spec).await?;
                    self.routes.add_tool(&spec.slug);
                    applied.created += 1;
                }
                Some(t) if t.spec != spec => {
                    self.store.update_tool(&spec).await?;
                    applied.updated += 1;
                }
                Some(_) => applied.unchanged += 1,
            }
        }
        Ok(applied)
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

    pub async fn update_tool(&self, spec: ToolSpec) -> Result<Tool, ManagerError> {
        let spec = spec.validate()?;
        self.store
            .update_tool(&spec)
            .await?
            .ok_or(ManagerError::ToolNotFound(spec.slug))
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

    /// Deploys `replicas` copies of every `autostart` tool, minus those already live.
    pub async fn autostart(self: &Arc<Self>) -> Result<Vec<Deployment>, ManagerError> {
        let mut out = Vec::new();
        for tool in self.store.list_tools().await? {
            if !tool.spec.autostart {
                continue;
            }
            let live = self
                .store
                .list_deployments(&DeploymentFilter {
                    tool_slug: Some(tool.spec.slug.clone()),
                    node_id: Some(self.node_id.clone()),
                    statuses: vec![DeploymentStatus::Starting, DeploymentStatus::Running],
                    ..Default::default()
                })
                .await?
                .len();
            for _ in live..tool.spec.replicas as usize {
                out.push(self.deploy_tool(&tool).await?);
            }
        }
        Ok(out)
    }

    /// Starts one deployment of the tool and returns its committed record (STARTING, or FAILED
    /// when the process could not even be spawned).
    pub async fn deploy(self: &Arc<Self>, slug: &str) -> Result<Deployment, ManagerError> {
        let tool = self.get_tool(slug).await?;
        self.deploy_tool(&tool).await
    }

    /// Like [`deploy`](Self::deploy), answering once the deployment is RUNNING or has ended.
    pub async fn deploy_and_wait(self: &Arc<Self>, slug: &str) -> Result<Deployment, ManagerError> {
        let tool = self.get_tool(slug).await?;
        let d = self.deploy_tool(&tool).await?;
        let rx = self.live().get(&d.id).map(|l| l.status.subscribe());
        if let Some(mut rx) = rx {
            let _ = rx.wait_for(|s| *s != DeploymentStatus::Starting).await;
        }
        self.get_deployment(d.id).await
    }

    async fn deploy_tool(self: &Arc<Self>, tool: &Tool) -> Result<Deployment, ManagerError> {
        if self.shutting_down.load(Ordering::SeqCst) {
            return Err(ManagerError::ShuttingDown);
        }
        let spec = &tool.spec;
        spec.check_deployable()?;
        let port = self.ports.allocate()?;
        let now = crate::store::now();
        let d = Deployment {
            id: Uuid::new_v4(),
            tool_id: tool.id,
            tool_slug: spec.slug.clone(),
            node_id: self.node_id.clone(),
            endpoint_url: format!(
                "http://{}:{port}{}",
                self.advertise_host, spec.endpoint_path
            ),
            port: Some(port),
            status: DeploymentStatus::Starting,
            health_status: HealthStatus::Unknown,
            last_health_check: None,
            deployed_at: now,
            stopped_at: None,
            pid: None,
            exit_code: None,
            exit_signal: None,
            error: None,
            updated_at: now,
        };
        let authority =
            match http::uri::Authority::try_from(format!("{}:{port}", self.advertise_host)) {
                Ok(a) => a,
                Err(e) => {
                    self.ports.release(port);
                    return Err(ManagerError::Internal(format!(
                        "bad upstream authority: {e}"
                    )));
                }
            };
        let backend = Backend::new(d.id, authority, spec.endpoint_path.clone());
        if let Err(e) = self.store.insert_deployment(&d).await {
            self.ports.release(port);
            return Err(e.into());
        }
        let (status_tx, _) = watch::channel(DeploymentStatus::Starting);
        self.live().insert(
            d.id,
            Live {
                slug: spec.slug.clone(),
                status: status_tx,
                port: Some(port),
                grace: Duration::from_millis(spec.stop_grace_period_ms),
                stopping: false,
            },
        );

        let launch = launch_spec(&d, spec, port);
        match self.runtime.start(launch).await {
            Ok(pid) => {
                // The record exists and the process runs: a failure to note the pid must not
                // leave the process unsupervised.
                if let Err(e) = self.store.set_pid(d.id, pid).await {
                    tracing::warn!(deployment = %d.id, error = %e, "Could not record the pid");
                }
                tracing::info!(deployment = %d.id, tool = %spec.slug, pid, port, "Deployment starting");
                let this = Arc::clone(self);
                let startup = Duration::from_millis(spec.startup_timeout_ms);
                self.tasks.spawn(async move {
                    this.supervise(d.id, d.endpoint_url, startup, backend).await
                });
            }
            Err(e) => {
                tracing::warn!(deployment = %d.id, tool = %spec.slug, error = %e, "Deployment could not start");
                self.end(d.id, DeploymentStatus::Failed, None, Some(&e.to_string()))
                    .await?;
            }
        }
        self.get_deployment(d.id).await
    }

    /// Watches one deployment from spawn to exit.
    async fn supervise(
        self: Arc<Self>,
        id: Uuid,
        url: String,
        startup: Duration,
        backend: Backend,
    ) {
        let exit = self.runtime.wait(id);
        tokio::pin!(exit);
        let deadline = Instant::now() + startup;
        let ready = tokio::select! {
            e = &mut exit => Err(Ended::Exited(e.unwrap_or_default())),
            r = self.wait_ready(&url, deadline) => r.map_err(Ended::NotReady),
        };
        match ready {
            Ok(()) => {
                let recorded = self
                    .until_stored(id, "RUNNING", || self.store.mark_running(id))
                    .await;
                if recorded == Some(true) {
                    {
                        // Under the live lock, so a stop that starts now either sees the route
                        // (and removes it) or has already marked `stopping` (and none is added).
                        let live = self.live();
                        if let Some(l) = live.get(&id).filter(|l| !l.stopping) {
                            l.status.send_replace(DeploymentStatus::Running);
                            self.routes.add_backend(&l.slug, backend);
                        }
                    }
                    tracing::info!(deployment = %id, "Deployment running");
                }
            }
            Err(Ended::NotReady(last)) => {
                let msg = format!(
                    "did not answer an MCP request within {:.1} s (last probe: {last})",
                    startup.as_secs_f64()
                );
                self.fail(id, None, msg).await;
                return;
            }
            Err(Ended::Exited(e)) => {
                self.fail(id, Some(e), format!("exited during startup ({e})"))
                    .await;
                return;
            }
        }
        let e = exit.await.unwrap_or_default();
        self.fail(id, Some(e), format!("exited unexpectedly ({e})"))
            .await;
    }

    /// Probes until the server answers or the deadline passes; the error is the last failure.
    async fn wait_ready(&self, url: &str, deadline: Instant) -> Result<(), String> {
        let mut delay = Duration::from_millis(5);
        let mut last = String::from("no probe completed");
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(last);
            }
            let r = self.prober.check(url, remaining.min(PROBE_TIMEOUT)).await;
            if r.status == HealthStatus::Healthy {
                return Ok(());
            }
            last = r.error.unwrap_or_default();
            let remaining = deadline.saturating_duration_since(Instant::now());
            tokio::time::sleep(delay.min(remaining)).await;
            delay = (delay * 3 / 2).min(Duration::from_millis(250));
        }
    }

    /// Records a failure the supervisor saw, unless a stop is under way (the stop records it).
    async fn fail(&self, id: Uuid, exit: Option<ExitInfo>, reason: String) {
        {
            let live = self.live();
            match live.get(&id) {
                None => return,
                Some(l) if l.stopping => return,
                // Out of routing now, whether or not the store can take the news yet.
                Some(l) => self.routes.remove_backend(&l.slug, id),
            }
        }
        let tail = self.runtime.logs_tail(id, LOG_LINES_IN_ERROR).await;
        let msg = if tail.trim().is_empty() {
            reason.clone()
        } else {
            format!("{reason}; last log lines:\n{tail}")
        };
        tracing::warn!(deployment = %id, %reason, "Deployment failed");
        self.until_stored(id, "FAILED", || {
            self.end(id, DeploymentStatus::Failed, exit, Some(&msg))
        })
        .await;
        // Whatever is left of the tree goes now; the record already says FAILED.
        if let Err(e) = self.runtime.stop(id, Duration::ZERO).await {
            tracing::error!(deployment = %id, error = %e, "Could not clean up failed deployment");
        }
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
                if let Some(p) = live.port {
                    self.ports.release(p);
                }
                live.status.send_replace(status);
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
        let grace = {
            let mut live = self.live();
            match live.get_mut(&id) {
                Some(l) => {
                    l.stopping = true;
                    // New requests stop reaching it now, not after the grace period.
                    self.routes.remove_backend(&l.slug, id);
                    Some(l.grace)
                }
                None => None,
            }
        };
        let exit = match grace {
            Some(grace) => self
                .runtime
                .stop(id, grace)
                .await
                .map_err(|source| ManagerError::Stop { id, source })?,
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
    /// start closes what is left) or the deployment is no longer this manager's.
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

    /// Refuses new deployments and stops every live one (each with its own grace period).
    pub async fn shutdown(&self) {
        self.refuse_deploys();
        let ids: Vec<Uuid> = self.live().keys().copied().collect();
        if !ids.is_empty() {
            tracing::info!(count = ids.len(), "Stopping deployments before exit");
        }
        let stops = ids.into_iter().map(|id| async move {
            if let Err(e) = self.stop(id).await {
                tracing::error!(deployment = %id, error = %e, "Could not stop deployment cleanly");
                // Processes go whatever the store says; a record left live is closed at the
                // next start.
                let grace = self.live().get(&id).map(|l| l.grace).unwrap_or_default();
                if let Err(e) = self.runtime.stop(id, grace).await {
                    tracing::error!(deployment = %id, error = %e, "Could not stop deployment");
                }
            }
        });
        futures_util::future::join_all(stops).await;
        self.tasks.close();
        self.tasks.wait().await;
    }
}

enum Ended {
    Exited(ExitInfo),
    NotReady(String),
}

/// The process's command line and environment, with `{port}` substituted.
fn launch_spec(d: &Deployment, spec: &ToolSpec, port: u16) -> LaunchSpec {
    let port_s = port.to_string();
    let subst = |s: &str| s.replace("{port}", &port_s);
    let mut env: Vec<(String, String)> = Vec::with_capacity(spec.env.len() + 3);
    if let Some(name) = &spec.port_env {
        env.push((name.clone(), port_s.clone()));
    }
    env.push(("SWITCHBOARD_TOOL".into(), spec.slug.clone()));
    env.push(("SWITCHBOARD_DEPLOYMENT_ID".into(), d.id.to_string()));
    // The tool's own env last, so it can override the defaults above.
    env.extend(spec.env.iter().map(|(k, v)| (k.clone(), subst(v))));
    LaunchSpec {
        deployment_id: d.id,
        program: subst(&spec.command),
        args: spec.args.iter().map(|a| subst(a)).collect(),
        env,
        working_dir: spec.working_dir.clone(),
    }
}
