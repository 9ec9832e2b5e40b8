//! The manager: the one place that turns requests (register, deploy, stop) into coordinated
//! changes of the store, the port allocator and the runtime, and keeps deployments running.
//!
//! Invariants:
//! - A deployment record is committed (STARTING) before its process is spawned and before the
//!   caller hears of it; nothing runs that the store does not know about.
//! - Each live deployment has exactly one supervisor task, and only it starts processes for the
//!   deployment: it waits for readiness, watches health, and restarts per the tool's restart
//!   policy with backoff, keeping the record (and its port). A stop first records the intent
//!   (`desired = STOPPED`), then cancels the supervisor and waits for it to finish before it
//!   touches the process, so a stop and a restart can never interleave.
//! - Whoever wins the conditional STARTING/RUNNING → STOPPED/FAILED write releases the port;
//!   nobody else does. A stop and a crash racing each other therefore free the port once.
//! - At start ([`Manager::reconcile`]) the store is read and every decision made before
//!   anything is killed or started: desired-running deployments whose process is still theirs
//!   (pid and start time match, inside their cgroup) are adopted, the others restarted; what
//!   no record owns is killed.
//! - Every status and health transition is published on [`Events`].

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use tokio::{sync::watch, time::Instant};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use uuid::Uuid;

use crate::{
    deployment::{Deployment, DeploymentStatus, Desired, ExitInfo, HealthStatus},
    events::{Event, EventKind, Events},
    health::{HealthCheckResult, Prober},
    metrics::Metrics,
    ports::{PortAllocator, PortsExhausted},
    proxy::routes::{Backend, RouteTable},
    registry::{ApplyOutcome, SpecError, Tool, ToolSpec, Transport},
    restart::{Backoff, Ending},
    runtime::{InstanceRef, LaunchSpec, Runtime, RuntimeError, StopMode},
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
    PortsExhausted(#[from] PortsExhausted),
    #[error("the store failed: {0}")]
    Store(#[from] StoreError),
    #[error("could not stop deployment {id}: {error}")]
    Stop { id: Uuid, error: RuntimeError },
    #[error("switchboard is shutting down")]
    ShuttingDown,
    #[error("internal error: {0}")]
    Internal(String),
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
}

/// Lines of a failed server's log quoted in its record's `error`.
const LOG_LINES_IN_ERROR: usize = 20;
/// Longest single wait for a readiness probe answer.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

struct Live {
    slug: String,
    /// The status, and how many restarts this run has seen (so a deploy request that waits
    /// can answer once the first attempt has failed, rather than wait out a crash loop).
    status: watch::Sender<(DeploymentStatus, u32)>,
    port: Option<u16>,
    grace: Duration,
    stopping: bool,
    /// Cancelled to make the supervisor return (a stop, or Switchboard exiting).
    cancel: CancellationToken,
    /// Closed (sender dropped) once the supervisor has returned.
    supervisor_done: watch::Receiver<()>,
    health: HealthStatus,
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
    /// The switchboard executable (the bridge is one of its modes).
    pub bridge: std::path::PathBuf,
    /// Where the bridges' sockets live (`<data dir>/run`).
    pub socket_dir: std::path::PathBuf,
    /// Switchboard's own URL (`http://127.0.0.1:7300`): a stdio deployment's endpoint is
    /// `<public_url>/mcp/<slug>`.
    pub public_url: String,
}

/// Where and how a deployment's health is probed.
struct ProbeTarget {
    prober: Prober,
    url: String,
    /// A plain HTTP health URL, probed instead of the MCP endpoint when present.
    plain: Option<String>,
}

/// The longest Unix socket path Linux accepts (`sun_path` is 108 bytes with its NUL).
const MAX_SOCKET_PATH: usize = 107;

/// Unchanged health-check results, written to the store in batches: with 1,000 deployments
/// checked every 10 s, one commit per second instead of a hundred (each commit is an fsync on
/// SQLite). Only the newest result per deployment is kept; a failed flush is dropped, since the
/// next round of checks writes the same fields again.
struct HealthLog {
    pending: Arc<Mutex<PendingChecks>>,
}

/// Deployment → its newest unwritten check result.
type PendingChecks = HashMap<Uuid, (HealthStatus, chrono::DateTime<chrono::Utc>)>;

/// How often batched health results are written.
const HEALTH_FLUSH: Duration = Duration::from_secs(1);

impl HealthLog {
    fn new() -> HealthLog {
        HealthLog {
            pending: Arc::default(),
        }
    }

    fn record(&self, id: Uuid, health: HealthStatus, at: chrono::DateTime<chrono::Utc>) {
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, (health, at));
    }

    /// Writes batches until the manager is gone.
    fn spawn_flusher(&self, store: Store, manager: std::sync::Weak<Manager>) {
        let pending = Arc::clone(&self.pending);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(HEALTH_FLUSH);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                if manager.strong_count() == 0 {
                    return;
                }
                let batch: Vec<_> =
                    std::mem::take(&mut *pending.lock().unwrap_or_else(|p| p.into_inner()))
                        .into_iter()
                        .map(|(id, (h, at))| (id, h, at))
                        .collect();
                if let Err(e) = store.set_health_many(&batch).await {
                    tracing::warn!(error = %e, checks = batch.len(), "Could not record health checks");
                }
            }
        });
    }
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

/// What [`Manager::reconcile`] did at start.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Reconciled {
    pub adopted: usize,
    pub restarted: usize,
    pub closed: usize,
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
        ports: PortAllocator,
        runtime: Arc<dyn Runtime>,
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
            ports,
            runtime,
            prober,
            routes,
            advertise_host: "127.0.0.1".to_owned(),
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

    /// The Unix socket a stdio deployment's bridge serves on.
    fn socket_path(&self, id: Uuid) -> std::path::PathBuf {
        self.hosting
            .socket_dir
            .join(format!("{}.sock", id.simple()))
    }

    /// How a deployment is probed: its MCP endpoint (or plain health path) over TCP, or, for a
    /// stdio deployment, the bridge's `/health` on its socket (a probe on the server's pipe).
    fn probe_target(&self, id: Uuid, port: Option<u16>, spec: &ToolSpec) -> ProbeTarget {
        if spec.transport == Transport::Stdio {
            return ProbeTarget {
                prober: Prober::unix(&self.socket_path(id)),
                url: "http://bridge/mcp".to_owned(),
                plain: Some("http://bridge/health".to_owned()),
            };
        }
        // The server itself, not the record's endpoint_url (which goes through the proxy).
        let base = format!(
            "http://{}:{}",
            self.advertise_host,
            port.unwrap_or_default()
        );
        ProbeTarget {
            prober: self.prober.clone(),
            url: format!("{base}{}", spec.endpoint_path),
            plain: spec.health.http_path.as_ref().map(|p| format!("{base}{p}")),
        }
    }

    /// Switchboard's base URL as clients reach it (`http://<listen address>`).
    pub fn public_url(&self) -> &str {
        &self.hosting.public_url
    }

    pub fn metrics(&self) -> Option<&Arc<Metrics>> {
        self.metrics.as_ref()
    }

    /// Refreshes the scrape-time gauges: statuses, in-flight requests and streams, the
    /// processes' CPU and memory, ports, and Switchboard's own process.
    pub fn refresh_metrics(&self) {
        let Some(m) = &self.metrics else { return };
        m.clear_snapshot();
        let live: Vec<(Uuid, String, DeploymentStatus)> = self
            .live()
            .iter()
            .map(|(id, l)| (*id, l.slug.clone(), l.status.borrow().0))
            .collect();
        for (id, slug, status) in &live {
            m.deployments
                .get_or_create(&crate::metrics::StatusLabels {
                    tool: slug.clone(),
                    status: status.as_str(),
                })
                .inc();
            if let Some(info) = self.runtime.inspect(*id) {
                let (cpu, rss) = crate::metrics::process_usage(&info.tree);
                let labels = crate::metrics::DeploymentLabels {
                    tool: slug.clone(),
                    deployment: id.to_string(),
                };
                m.process_cpu.get_or_create(&labels).set(cpu);
                m.process_memory
                    .get_or_create(&labels)
                    .set(i64::try_from(rss).unwrap_or(i64::MAX));
            }
        }
        for (slug, b) in self.routes.all_backends() {
            let labels = crate::metrics::DeploymentLabels {
                tool: slug,
                deployment: b.deployment.to_string(),
            };
            m.in_flight
                .get_or_create(&labels)
                .set(i64::from(b.outstanding()));
            m.open_streams
                .get_or_create(&labels)
                .set(i64::from(b.open_streams()));
        }
        let used = self.ports.in_use().len();
        let total = self.ports.range().len();
        m.ports_in_use.set(i64::try_from(used).unwrap_or(0));
        m.ports_free
            .set(i64::try_from(total.saturating_sub(used)).unwrap_or(0));
        let (cpu, rss) = crate::metrics::process_usage(&[std::process::id()]);
        m.own_cpu.set(cpu);
        m.own_memory.set(i64::try_from(rss).unwrap_or(i64::MAX));
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

    /// Brings this node's records and processes into agreement after a start: adopts the
    /// processes of desired-running deployments that are still theirs, restarts the others,
    /// finishes stops that were under way, and (through `sweep`, which kills every tree the
    /// runtime was not given) kills what no record owns. Must run before the first deploy.
    pub async fn reconcile(
        self: &Arc<Self>,
        sweep: impl FnOnce() -> Vec<Uuid>,
    ) -> Result<Reconciled, ManagerError> {
        // 1. Read: nothing is signalled or started until every decision is made.
        let records = self.store.live_deployments(&self.node_id).await?;
        let tools: HashMap<Uuid, Tool> = self
            .store
            .list_tools()
            .await?
            .into_iter()
            .map(|t| (t.id, t))
            .collect();
        // Ports are rebuilt from the store first, so nothing can be handed out twice.
        for d in &records {
            if let Some(p) = d.port {
                self.ports.reserve(p);
            }
        }
        enum Plan {
            Adopt(Tool),
            Restart(Tool),
            Close(&'static str),
        }
        let mut plans = Vec::with_capacity(records.len());
        for d in records {
            let plan = match tools.get(&d.tool_id) {
                _ if d.desired == Desired::Stopped => Plan::Close("stopped"),
                None => Plan::Close("tool gone"),
                Some(tool) => {
                    let ours = match &d.instance {
                        // Adoption only registers the instance with the runtime; it signals
                        // nothing.
                        Some(instance) => self.runtime.adopt(
                            d.id,
                            instance,
                            if tool.spec.transport == Transport::Stdio {
                                StopMode::MainFirst
                            } else {
                                StopMode::Tree
                            },
                        ),
                        None => false,
                    };
                    if ours {
                        Plan::Adopt(tool.clone())
                    } else {
                        Plan::Restart(tool.clone())
                    }
                }
            };
            plans.push((d, plan));
        }
        // 2. Act.
        let killed = sweep();
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
                    if self.store.mark_ended(d.id, status, None, msg).await?
                        && let Some(p) = d.port
                    {
                        self.ports.release(p);
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
                Plan::Adopt(tool) => {
                    tracing::info!(deployment = %d.id, tool = %d.tool_slug, instance = ?d.instance, "Adopted a running deployment");
                    self.supervise_existing(d, tool, true);
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
                    self.supervise_existing(d, tool, false);
                    done.restarted += 1;
                }
            }
        }
        Ok(done)
    }

    /// Puts a deployment found in the store under supervision: adopted (its process runs) or
    /// to be started again at once.
    fn supervise_existing(self: &Arc<Self>, d: Deployment, tool: Tool, adopted: bool) {
        if d.port.is_none() && tool.spec.transport != Transport::Stdio {
            return;
        }
        let Ok(backend) = self.backend_for(&d, &tool.spec) else {
            return;
        };
        let (cancel, done_tx) = self.insert_live(&d, &tool.spec, d.status);
        let this = Arc::clone(self);
        let start = if adopted {
            Start::Adopted(d.status)
        } else {
            Start::Restart {
                why: d.last_exit.clone().unwrap_or_default(),
                ran: d.status == DeploymentStatus::Running,
            }
        };
        self.tasks.spawn(async move {
            let _done = done_tx;
            this.supervise(d.id, tool, d.port, backend, start, cancel)
                .await
        });
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
                Err(e @ ManagerError::TransportChange { .. }) => {
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
    /// with (a port or a bridge's socket): a new transport is refused while any is live.
    async fn refuse_transport_change(
        &self,
        stored: &ToolSpec,
        new: &ToolSpec,
    ) -> Result<(), ManagerError> {
        if stored.transport == new.transport {
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
                out.extend(self.scale(&tool.spec.slug, None, None).await?.started);
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
        let stdio = spec.transport == Transport::Stdio;
        // A stdio server is reached through its bridge's socket: no port from the range.
        let port = if stdio {
            None
        } else {
            Some(self.ports.allocate()?)
        };
        let release = |port: Option<u16>| {
            if let Some(p) = port {
                self.ports.release(p);
            }
        };
        let id = Uuid::new_v4();
        if stdio && self.socket_path(id).as_os_str().len() > MAX_SOCKET_PATH {
            return Err(ManagerError::Internal(format!(
                "the data directory's path is too long for a Unix socket ({} > {MAX_SOCKET_PATH} \
                 bytes): use a shorter data_dir to host stdio servers",
                self.socket_path(id).display()
            )));
        }
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
            runtime: self.runtime.kind(),
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
        let backend = match self.backend_for(&d, spec) {
            Ok(b) => b,
            Err(e) => {
                release(port);
                return Err(e);
            }
        };
        if let Err(e) = self.store.insert_deployment(&d).await {
            release(port);
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
        let (cancel, done_tx) = self.insert_live(&d, spec, DeploymentStatus::Starting);
        if crate::packages::Package::parse(&spec.command).is_some() {
            // Installing may take minutes: the supervisor does it, and the record is
            // STARTING meanwhile.
            let this = Arc::clone(self);
            let tool = tool.clone();
            self.tasks.spawn(async move {
                let _done = done_tx;
                this.supervise(d.id, tool, d.port, backend, Start::Install, cancel)
                    .await
            });
            return self.get_deployment(d.id).await;
        }
        match self.spawn_process(d.id, spec, port).await {
            Ok(()) => {
                let this = Arc::clone(self);
                let tool = tool.clone();
                self.tasks.spawn(async move {
                    let _done = done_tx;
                    this.supervise(d.id, tool, d.port, backend, Start::Spawned, cancel)
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

    fn backend_for(&self, d: &Deployment, spec: &ToolSpec) -> Result<Backend, ManagerError> {
        // A stdio deployment's authority names its bridge's socket (the proxy's connector
        // resolves `<id>.sock` in the socket directory).
        let (authority, path) = match d.port {
            Some(port) => (
                format!("{}:{port}", self.advertise_host),
                spec.endpoint_path.clone(),
            ),
            None => (format!("{}.sock", d.id.simple()), "/mcp".to_owned()),
        };
        let authority = http::uri::Authority::try_from(authority)
            .map_err(|e| ManagerError::Internal(format!("bad upstream authority: {e}")))?;
        let backend = Backend::new(d.id, authority, path)
            .with_call_timeout(spec.call_timeout_ms.map(Duration::from_millis));
        Ok(match &self.metrics {
            Some(m) => backend.with_metrics(m.backend(&spec.slug, &d.id.to_string())),
            None => backend,
        })
    }

    fn insert_live(
        &self,
        d: &Deployment,
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
                port: d.port,
                grace: Duration::from_millis(spec.stop_grace_period_ms),
                stopping: false,
                cancel: cancel.clone(),
                supervisor_done: done_rx,
                health: d.health_status,
            },
        );
        (cancel, done_tx)
    }

    /// Starts the deployment's process and records which process it is.
    async fn spawn_process(
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

    /// A stdio deployment runs the bridge, which runs the server: `switchboard __stdio
    /// --socket ... -- <command> <args>`. The tool's environment reaches the server through
    /// the bridge (never its command line, which any local user can read).
    fn bridge_launch_spec(&self, id: Uuid, spec: &ToolSpec) -> LaunchSpec {
        let mut launch = launch_spec(id, spec, 0);
        // No port: drop the port variable (launch_spec puts it first; the tool's own env,
        // which may set the same name, comes later and stays).
        if spec.port_env.is_some() && !launch.env.is_empty() {
            launch.env.remove(0);
        }
        let replicas = u64::from(spec.replicas.max(1));
        let sessions = u64::from(spec.stdio.max_sessions).div_ceil(replicas);
        // The bridge gives each server a third of the grace period after closing its stdin
        // and another third after SIGTERM; the runtime kills what is left at the end.
        let child_grace = spec.stop_grace_period_ms / 3;
        let mut args = vec![
            crate::stdio::BRIDGE_ARG.to_owned(),
            "--socket".to_owned(),
            self.socket_path(id).display().to_string(),
            "--max-sessions".to_owned(),
            sessions.to_string(),
            "--idle-ms".to_owned(),
            spec.stdio.session_idle_ms.to_string(),
            "--pool".to_owned(),
            spec.stdio.pool_size.to_string(),
            "--spares".to_owned(),
            spec.stdio.spares.to_string(),
            "--grace-ms".to_owned(),
            child_grace.to_string(),
            // The supervisor's check gives up after health.timeout_ms: the bridge answers
            // within it, so a probe queued behind a busy server's calls is not a failure.
            "--probe-ms".to_owned(),
            (spec.health.timeout_ms * 3 / 4).max(100).to_string(),
            "--startup-ms".to_owned(),
            spec.startup_timeout_ms.to_string(),
            "--".to_owned(),
            launch.program,
        ];
        args.append(&mut launch.args);
        launch.program = self.hosting.bridge.display().to_string();
        launch.args = args;
        launch.stop = StopMode::MainFirst;
        launch
    }

    /// For a tool named by package (`npx:` / `uvx:`), installs it (once; later deployments
    /// use the install) and returns the tool with the installed program as its command.
    /// Progress goes to the deployment's log and to events (`install`), so `switchboard
    /// deploy --wait`, `logs -f` and `events` show it.
    async fn install_package(&self, id: Uuid, mut tool: Tool) -> Result<Tool, (Tool, String)> {
        let pkg = match crate::packages::Package::parse(&tool.spec.command) {
            None => return Ok(tool),
            Some(Ok(p)) => p,
            Some(Err(e)) => {
                let msg = e.to_string();
                return Err((tool, msg));
            }
        };
        let log = self.runtime.log_file(id);
        if let Some(dir) = log.as_ref().and_then(|l| l.parent()) {
            let _ = std::fs::create_dir_all(dir);
        }
        let slug = tool.spec.slug.clone();
        let progress = |line: &str| {
            if line.trim().is_empty() {
                return;
            }
            if let Some(path) = &log {
                let stamped = format!(
                    "{} {line}\n",
                    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
                );
                let _ = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .and_then(|mut f| std::io::Write::write_all(&mut f, stamped.as_bytes()));
            }
            self.publish(
                EventKind::Install,
                id,
                &slug,
                None,
                "INSTALLING",
                Some(line.to_owned()),
            );
        };
        let installed = crate::packages::ensure_installed(
            &pkg,
            &self.hosting.packages_dir,
            &self.hosting.registries,
            &progress,
        )
        .await;
        match installed {
            Ok(i) => {
                self.publish(EventKind::Install, id, &slug, None, "INSTALLED", None);
                let mut args: Vec<String> = i.args;
                args.append(&mut tool.spec.args);
                tool.spec.command = i.program.display().to_string();
                tool.spec.args = args;
                Ok(tool)
            }
            Err(e) => {
                let msg = format!("cannot install {pkg}: {e}");
                tracing::warn!(deployment = %id, tool = %slug, error = %msg, "Package install failed");
                self.publish(
                    EventKind::Install,
                    id,
                    &slug,
                    None,
                    "INSTALL_FAILED",
                    Some(msg.clone()),
                );
                Err((tool, msg))
            }
        }
    }

    /// The one task that runs a deployment's processes, from the first spawn (or adoption) to
    /// a final status: readiness, health, restarts. Returns at once when `cancel` fires; the
    /// canceller then owns the process.
    async fn supervise(
        self: Arc<Self>,
        id: Uuid,
        tool: Tool,
        port: Option<u16>,
        backend: Backend,
        start: Start,
        cancel: CancellationToken,
    ) {
        let tool = tokio::select! {
            _ = cancel.cancelled() => return,
            t = self.install_package(id, tool) => t,
        };
        let (tool, start) = match (tool, start) {
            (Ok(tool), Start::Install) => {
                let port = self.live().get(&id).and_then(|l| l.port);
                if let Err(e) = self.spawn_process(id, &tool.spec, port).await {
                    tracing::warn!(deployment = %id, error = %e, "Deployment could not start");
                    self.fail(id, None, e.to_string()).await;
                    return;
                }
                (tool, Start::Spawned)
            }
            (Ok(tool), start) => (tool, start),
            (Err((tool, e)), Start::Adopted(status)) => {
                // The adopted process runs: keep it; only a restart would need the package.
                tracing::warn!(deployment = %id, error = %e, "The tool's package is not installed; a restart will try again");
                (tool, Start::Adopted(status))
            }
            (Err((_, e)), _) => {
                self.fail(id, None, e).await;
                return;
            }
        };
        let spec = &tool.spec;
        let target = self.probe_target(id, port, spec);
        let backend = Arc::new(backend);
        let mut backoff = Backoff::new(&spec.restart);
        // A deployment that has never been RUNNING gets `max_start_failures` tries; one that
        // has run keeps its restart policy (a dependency may come back).
        let (mut running, mut pending_restart, mut has_run) = match start {
            Start::Spawned | Start::Install => (false, None, false),
            Start::Adopted(status) => {
                let running = status == DeploymentStatus::Running;
                (running, None, running)
            }
            Start::Restart { why, ran } => (false, Some(why), ran),
        };
        let mut failed_starts = 0u32;
        let mut started_at = Instant::now();
        loop {
            if let Some(why) = pending_restart.take() {
                let delay = backoff.next_delay(started_at.elapsed());
                if !self.restart(id, spec, &why, delay, &cancel).await {
                    return;
                }
                started_at = Instant::now();
                running = false;
            }
            let (ending, ran) = tokio::select! {
                _ = cancel.cancelled() => return,
                e = self.run_once(id, spec, &target, &backend, running) => e,
            };
            running = false;
            if cancel.is_cancelled() {
                return;
            }
            has_run |= ran;
            failed_starts = if ran { 0 } else { failed_starts + 1 };
            if !ending.restarts_under(spec.restart.policy) {
                self.fail(id, ending.exit(), ending.to_string()).await;
                return;
            }
            let limit = spec.restart.max_start_failures;
            if !has_run && failed_starts >= limit {
                let why = format!(
                    "{ending}; gave up after {failed_starts} failed start(s) without ever \
                     becoming RUNNING (restart.max_start_failures = {limit})"
                );
                self.fail(id, ending.exit(), why).await;
                return;
            }
            tracing::warn!(deployment = %id, tool = %spec.slug, reason = %ending, "Deployment ended; restarting per its policy");
            // The server's last words usually say why (a missing file, a bad flag).
            let last_line = self.runtime.logs_tail(id, 1).await;
            pending_restart = Some(match last_line.trim() {
                "" => ending.to_string(),
                line => format!("{ending}; last log line: {line}"),
            });
        }
    }

    /// One process's life: readiness (unless it already runs), then health checks until it
    /// exits or fails them. Says how it ended and whether it was RUNNING (a failed start is
    /// not).
    async fn run_once(
        &self,
        id: Uuid,
        spec: &ToolSpec,
        target: &ProbeTarget,
        backend: &Arc<Backend>,
        already_running: bool,
    ) -> (Ending, bool) {
        let exit = self.runtime.wait(id);
        tokio::pin!(exit);
        if !already_running {
            let startup = Duration::from_millis(spec.startup_timeout_ms);
            let deadline = Instant::now() + startup;
            let ready = tokio::select! {
                e = &mut exit => return (Ending::Exited(e.unwrap_or_default()), false),
                r = self.wait_ready(target, deadline) => r,
            };
            if let Err(last) = ready {
                let why = format!(
                    "no answer to an MCP request within {:.1} s; last probe: {last}",
                    startup.as_secs_f64()
                );
                return (Ending::NotReady(why), false);
            }
            let recorded = self
                .until_stored(id, "RUNNING", || self.store.mark_running(id))
                .await;
            if recorded != Some(true) {
                // Stopped meanwhile: the stop owns the rest.
                let _ = exit.await;
                return (Ending::Exited(ExitInfo::default()), false);
            }
            {
                // Under the live lock, so a stop that starts now either sees the route (and
                // removes it) or has already marked `stopping` (and none is added).
                let mut live = self.live();
                if let Some(l) = live.get_mut(&id).filter(|l| !l.stopping) {
                    l.status.send_modify(|s| s.0 = DeploymentStatus::Running);
                    l.health = HealthStatus::Healthy;
                    // A fresh process: what the breaker learned about the last one is moot.
                    backend.reset_breaker();
                    self.routes.add_backend(&l.slug, Arc::clone(backend));
                }
            }
            self.publish(
                EventKind::Status,
                id,
                &spec.slug,
                Some("STARTING"),
                "RUNNING",
                None,
            );
            tracing::info!(deployment = %id, "Deployment running");
        } else {
            let mut live = self.live();
            if let Some(l) = live.get_mut(&id).filter(|l| !l.stopping) {
                l.status.send_modify(|s| s.0 = DeploymentStatus::Running);
                if l.health != HealthStatus::Unhealthy {
                    self.routes.add_backend(&l.slug, Arc::clone(backend));
                }
            }
        }
        let ending = tokio::select! {
            e = &mut exit => Ending::Exited(e.unwrap_or_default()),
            why = self.watch_health(id, spec, target, backend) => Ending::Unhealthy(why),
        };
        (ending, true)
    }

    /// Checks health every interval; returns (with the last error) when the failure threshold
    /// is reached and the restart policy would restart. Under the `never` policy an unhealthy
    /// deployment stays, out of routing, and may recover.
    async fn watch_health(
        &self,
        id: Uuid,
        spec: &ToolSpec,
        target: &ProbeTarget,
        backend: &Arc<Backend>,
    ) -> String {
        let h = &spec.health;
        let interval = Duration::from_millis(h.interval_ms);
        let grace_until = Instant::now() + Duration::from_millis(h.start_period_ms);
        let mut ticks = tokio::time::interval_at(Instant::now() + interval, interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let (mut fails, mut oks) = (0u32, 0u32);
        loop {
            ticks.tick().await;
            let r = self.check(target, spec).await;
            let healthy = r.status == HealthStatus::Healthy;
            if let Some(m) = &self.metrics {
                m.health_check(&spec.slug, &id.to_string(), healthy, r.latency_ms / 1000.0);
            }
            if healthy {
                fails = 0;
                oks = oks.saturating_add(1);
            } else if Instant::now() >= grace_until {
                oks = 0;
                fails = fails.saturating_add(1);
            }
            let current = self
                .live()
                .get(&id)
                .map_or(HealthStatus::Unknown, |l| l.health);
            let next = if healthy && current != HealthStatus::Healthy && oks >= h.success_threshold
            {
                HealthStatus::Healthy
            } else if !healthy && fails >= h.failure_threshold {
                HealthStatus::Unhealthy
            } else {
                current
            };
            if next != current {
                {
                    let mut live = self.live();
                    if let Some(l) = live.get_mut(&id).filter(|l| !l.stopping) {
                        l.health = next;
                        if next == HealthStatus::Healthy {
                            self.routes.add_backend(&l.slug, Arc::clone(backend));
                        } else {
                            self.routes.remove_backend(&l.slug, id);
                        }
                    }
                }
                let reason = r.error.clone();
                tracing::warn!(deployment = %id, tool = %spec.slug, from = %current, to = %next, error = reason.as_deref().unwrap_or(""), "Health changed");
                self.publish(
                    EventKind::Health,
                    id,
                    &spec.slug,
                    Some(current.as_str()),
                    next.as_str(),
                    reason,
                );
            }
            if next != current {
                // A transition is written at once, so the record tells it without delay.
                if let Err(e) = self.store.set_health(id, next, r.checked_at).await {
                    tracing::warn!(deployment = %id, error = %e, "Could not record a health change");
                }
            } else {
                self.health_log.record(id, next, r.checked_at);
            }
            if next == HealthStatus::Unhealthy
                && fails >= h.failure_threshold
                && spec.restart.policy != crate::registry::RestartPolicy::Never
            {
                return format!(
                    "{fails} failed checks in a row; last: {}",
                    r.error.unwrap_or_default()
                );
            }
        }
    }

    /// One health check of a deployment's server, as its tool's settings say.
    async fn check(&self, target: &ProbeTarget, spec: &ToolSpec) -> HealthCheckResult {
        target
            .prober
            .check_within(
                &target.url,
                target.plain.as_deref(),
                Duration::from_millis(spec.health.timeout_ms),
            )
            .await
    }

    /// The file a deployment's output goes to, for reading its logs; `None` when it has
    /// none (yet) on this node.
    pub async fn log_file(
        &self,
        id: Uuid,
    ) -> Result<(Deployment, Option<std::path::PathBuf>), ManagerError> {
        let d = self.get_deployment(id).await?;
        let path = self.runtime.log_file(id).filter(|p| p.exists());
        Ok((d, path))
    }

    /// A live deployment's resource use and traffic.
    pub async fn stats(&self, id: Uuid) -> Result<crate::metrics::DeploymentStats, ManagerError> {
        let d = self.get_deployment(id).await?;
        if !d.status.is_live() {
            return Err(ManagerError::NotLive {
                id,
                status: d.status,
            });
        }
        let tree = self.runtime.inspect(id).map(|i| i.tree).unwrap_or_default();
        let (cpu, rss) = crate::metrics::process_usage(&tree);
        let backend = self
            .routes
            .all_backends()
            .into_iter()
            .find(|(_, b)| b.deployment == id)
            .map(|(_, b)| b);
        let by_class = backend
            .as_ref()
            .and_then(|b| b.metrics.as_ref())
            .map(|m| m.by_class())
            .unwrap_or_default();
        Ok(crate::metrics::DeploymentStats {
            deployment: id,
            tool: d.tool_slug,
            status: d.status,
            pid: d.instance.as_ref().and_then(InstanceRef::pid),
            processes: tree.len(),
            cpu_seconds: cpu,
            resident_memory_bytes: rss,
            open_fds: crate::metrics::open_fds(&tree),
            uptime_seconds: d
                .instance
                .as_ref()
                .and_then(InstanceRef::pid)
                .and_then(crate::metrics::uptime_seconds),
            restart_count: d.restart_count,
            requests_total: by_class.iter().sum(),
            requests_by_class: crate::metrics::CLASSES
                .iter()
                .zip(by_class)
                .map(|(c, n)| ((*c).to_owned(), n))
                .collect(),
            in_flight: backend.as_ref().map_or(0, |b| b.outstanding()),
            open_streams: backend.as_ref().map_or(0, |b| b.open_streams()),
        })
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
        let target = self.probe_target(id, d.port, &tool.spec);
        Ok(self.check(&target, &tool.spec).await)
    }

    /// Tears down what is left of an ended process, records the restart, waits out the
    /// backoff and spawns again. False when the supervisor must return (cancelled, or the
    /// record is no longer desired running).
    async fn restart(
        &self,
        id: Uuid,
        spec: &ToolSpec,
        why: &str,
        delay: Duration,
        cancel: &CancellationToken,
    ) -> bool {
        let port = {
            let mut live = self.live();
            let Some(l) = live.get_mut(&id) else {
                return false;
            };
            self.routes.remove_backend(&l.slug, id);
            l.health = HealthStatus::Unknown;
            l.port
        };
        if let Err(e) = self.runtime.stop(id, Duration::ZERO).await {
            tracing::error!(deployment = %id, error = %e, "Could not clean up before a restart");
        }
        let restart_at = crate::store::now()
            + chrono::Duration::from_std(delay).unwrap_or(chrono::Duration::zero());
        match self
            .until_stored(id, "a restart", || {
                self.store.mark_restarting(id, why, restart_at)
            })
            .await
        {
            Some(true) => {}
            _ => return false,
        }
        if let Some(m) = &self.metrics {
            m.restart(&spec.slug, &id.to_string());
        }
        let from = self.live().get(&id).map(|l| {
            let from = l.status.borrow().0;
            l.status
                .send_modify(|s| *s = (DeploymentStatus::Starting, s.1 + 1));
            from
        });
        self.publish(
            EventKind::Status,
            id,
            &spec.slug,
            from.map(DeploymentStatus::as_str),
            DeploymentStatus::Starting.as_str(),
            Some(format!("restarting in {} ms: {why}", delay.as_millis())),
        );
        tokio::select! {
            _ = cancel.cancelled() => return false,
            _ = tokio::time::sleep(delay) => {}
        }
        if let Err(e) = self.spawn_process(id, spec, port).await {
            // Counted as an ending like any other: the loop backs off and tries again.
            tracing::warn!(deployment = %id, error = %e, "Restart could not spawn");
        }
        true
    }

    /// Probes (as the tool's health settings say: MCP, or its plain HTTP path) until the
    /// server answers or the deadline passes; the error is the last failure.
    async fn wait_ready(&self, target: &ProbeTarget, deadline: Instant) -> Result<(), String> {
        let mut delay = Duration::from_millis(5);
        let mut last = String::from("no probe completed");
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(last);
            }
            let r = target
                .prober
                .check_within(
                    &target.url,
                    target.plain.as_deref(),
                    remaining.min(PROBE_TIMEOUT),
                )
                .await;
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
                .runtime
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
            let exit = match self.runtime.stop(id, grace).await {
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

/// Where a supervisor picks up.
enum Start {
    /// The tool's package must be installed (if it is not yet), then the process spawned.
    Install,
    /// The process was just spawned.
    Spawned,
    /// An earlier Switchboard's process, adopted; the record's status.
    Adopted(DeploymentStatus),
    /// The process is gone; start it again, for this reason. `ran`: the record was RUNNING.
    Restart { why: String, ran: bool },
}

/// The process's command line and environment, with `{port}` substituted.
fn launch_spec(id: Uuid, spec: &ToolSpec, port: u16) -> LaunchSpec {
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
