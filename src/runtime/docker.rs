//! The Docker runtime: each deployment is one container, run by the local Docker engine
//! through bollard (Engine API 1.41 features only: Debian's docker.io 20.10).
//!
//! Invariants:
//! - A container is this node's deployment's exactly when its labels say so
//!   ([`NODE_LABEL`], [`DEPLOYMENT_LABEL`]); adoption checks them, the sweep lists by the node
//!   label, and nothing else is ever stopped or removed. Labels, names and command lines
//!   never hold a secret: the tool's env and secret_env go to the container's environment.
//!   A stdio bridge's server containers ([`crate::stdio::container`]) carry the same labels
//!   plus [`ROLE_LABEL`]: the sweep keeps those of adopted deployments.
//! - One container per deployment at a time, named `switchboard-<deployment id>`: a restart
//!   removes the ended container before it creates the next, a release removes the last.
//! - Exits are seen on one `events` subscription filtered by the node label (resumed with
//!   `since` after a break, so none is missed), never by polling.
//! - Host ports come from the allocator the process runtime shares, published on 127.0.0.1
//!   only; the server listens on the same port number inside the container, so `{port}` and
//!   `port_env` mean the same inside and out.
//! - The engine is connected on first use: Switchboard starts without one, and a docker
//!   tool's deploy is then refused with [`RuntimeError::Unavailable`].

use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex, Weak},
    time::{Duration, SystemTime},
};

use bollard::{
    Docker,
    errors::Error as DockerError,
    models::{ContainerCreateBody, EventMessage, HostConfig, Mount, MountType, PortBinding},
    query_parameters::{
        CreateContainerOptionsBuilder, CreateImageOptionsBuilder, EventsOptionsBuilder,
        ListContainersOptionsBuilder, LogsOptionsBuilder, RemoveContainerOptionsBuilder,
        StatsOptionsBuilder, StopContainerOptionsBuilder, WaitContainerOptionsBuilder,
    },
};
use futures_util::{FutureExt as _, StreamExt as _, future::BoxFuture};
use tokio::sync::{mpsc, watch};
use uuid::Uuid;

use super::{
    ContainerLaunch, Endpoint, ExitInfo, InstanceRef, LaunchSpec, Listen, LogStream, PortUse,
    Runtime, RuntimeError, RuntimeKind, Started, StopMode, Usage,
    container::{DockerSecurity, Network, Pull},
    endpoints::Endpoints,
    limits::Bytes,
};
use crate::ports::PortAllocator;

/// The node that runs a container.
pub const NODE_LABEL: &str = "switchboard.node";
/// The deployment a container is.
pub const DEPLOYMENT_LABEL: &str = "switchboard.deployment";
/// The tool's slug (for people reading `docker ps`).
pub const TOOL_LABEL: &str = "switchboard.tool";
/// What a container is to its deployment when it is not the deployment's instance:
/// [`STDIO_ROLE`] for a stdio server process its bridge started (see [`crate::stdio`]).
pub const ROLE_LABEL: &str = "switchboard.role";
/// A stdio deployment's server process: the sweep keeps it while its deployment is
/// supervised (its bridge runs), and removes it otherwise.
pub const STDIO_ROLE: &str = "stdio";

/// Published ports are bound here only; the proxy and probes reach them on loopback.
const HOST: &str = "127.0.0.1";

/// How long a request to the engine may take, beyond a stop's grace period.
const ENGINE_TIMEOUT_SECS: u64 = 120;

/// A deployment's container name: one per deployment, so a leftover is found by name too.
pub fn container_name(id: Uuid) -> String {
    format!("switchboard-{id}")
}

struct Instance {
    container: String,
    exit: watch::Sender<Option<ExitInfo>>,
    started: SystemTime,
    /// Its address on the default bridge with the server's port, once started, when the
    /// engine is on this host: the proxy connects there directly rather than through the
    /// published port (dockerd's userland proxy is one more hop per request).
    dial: std::sync::OnceLock<SocketAddr>,
}

/// A container's address on Docker's default bridge network, with `port`.
fn bridge_address(
    info: &bollard::models::ContainerInspectResponse,
    port: u16,
) -> Option<SocketAddr> {
    let ip = info
        .network_settings
        .as_ref()?
        .networks
        .as_ref()?
        .get("bridge")?
        .ip_address
        .as_deref()?
        .parse::<std::net::IpAddr>()
        .ok()?;
    Some(SocketAddr::new(ip, port))
}

#[derive(Default)]
struct State {
    /// Containers started or adopted, until stopped or released.
    instances: HashMap<Uuid, Arc<Instance>>,
}

struct Inner {
    node: String,
    state: Mutex<State>,
}

impl Inner {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // Every update is a single insert or remove, so a poisoned lock is still consistent.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn get(&self, id: Uuid) -> Option<Arc<Instance>> {
        self.state().instances.get(&id).cloned()
    }

    /// A `die` event: the instance whose container died, if a deployment runs it now, and
    /// the exit code the event gives.
    fn died(&self, event: &EventMessage) -> Option<(Arc<Instance>, Option<i64>)> {
        let actor = event.actor.as_ref()?;
        let attrs = actor.attributes.as_ref();
        let label = |k: &str| attrs.and_then(|a| a.get(k));
        let id = label(DEPLOYMENT_LABEL).and_then(|d| d.parse::<Uuid>().ok())?;
        let code = label("exitCode").and_then(|c| c.parse::<i64>().ok());
        let inst = self.get(id)?;
        (actor.id.as_deref() == Some(inst.container.as_str())).then_some((inst, code))
    }
}

/// Docker reports a container ended by a signal as 128 + the signal number (as shells do;
/// with `--init` the init process reports its child so).
pub fn exit_info(code: Option<i64>) -> ExitInfo {
    match code {
        Some(c @ 129..=192) => ExitInfo {
            code: None,
            signal: i32::try_from(c - 128).ok(),
            oom_limit: None,
        },
        Some(c) => ExitInfo {
            code: i32::try_from(c).ok(),
            signal: None,
            oom_limit: None,
        },
        None => ExitInfo::default(),
    }
}

/// How an ended container ended, as the engine inspects it (`code`: what is known without,
/// if the container is gone): killed by the kernel for exceeding its memory limit is
/// `State.OOMKilled` under `HostConfig.Memory`.
async fn ended(docker: &Docker, container: &str, code: Option<i64>) -> ExitInfo {
    let Ok(info) = docker.inspect_container(container, None).await else {
        return exit_info(code);
    };
    let state = info.state.unwrap_or_default();
    let mut exit = exit_info(state.exit_code.or(code));
    let limit = info
        .host_config
        .and_then(|h| h.memory)
        .and_then(|m| u64::try_from(m).ok())
        .filter(|m| *m > 0);
    if state.oom_killed == Some(true) {
        exit.oom_limit = limit.map(Bytes);
    }
    exit
}

/// The HostConfig of a tool's secure defaults: init, no capabilities, no-new-privileges, a
/// read-only root with a tmpfs at /tmp (each as the tool leaves it on). Every container this
/// node creates for a tool starts from it (package installers too).
pub fn secure_host_config(sec: &DockerSecurity) -> HostConfig {
    HostConfig {
        init: Some(sec.init),
        cap_drop: sec.drop_capabilities.then(|| vec!["ALL".to_owned()]),
        security_opt: sec
            .no_new_privileges
            .then(|| vec!["no-new-privileges".to_owned()]),
        readonly_rootfs: Some(sec.read_only_rootfs),
        tmpfs: sec
            .read_only_rootfs
            .then(|| HashMap::from([("/tmp".to_owned(), "rw,nosuid,nodev,mode=1777".to_owned())])),
        ..Default::default()
    }
}

/// The container the engine creates for a launch: its labels (never a secret), environment
/// (the tool's env and secret_env), command, user, and a HostConfig with the tool's secure
/// defaults and limits. `port`: where an HTTP server listens, published on 127.0.0.1 on the
/// default bridge; `None` for a stdio server, which listens nowhere.
pub fn create_body(
    node: &str,
    spec: &LaunchSpec,
    c: &ContainerLaunch,
    port: Option<u16>,
) -> ContainerCreateBody {
    let labels = HashMap::from([
        (NODE_LABEL.to_owned(), node.to_owned()),
        (DEPLOYMENT_LABEL.to_owned(), spec.deployment_id.to_string()),
        (TOOL_LABEL.to_owned(), c.tool.clone()),
    ]);
    let env = spec
        .env
        .iter()
        .chain(&spec.secret_env)
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    // Published on the default bridge only (the host's network needs no publishing).
    let published = port.filter(|_| c.network == Network::Bridge);
    let port_key = published.map(|p| format!("{p}/tcp"));
    let sec = &c.security;
    let memory = spec
        .limits
        .memory
        .map(|m| i64::try_from(m.0).unwrap_or(i64::MAX));
    let host_config = HostConfig {
        network_mode: Some(c.network.as_str().to_owned()),
        mounts: (!c.mounts.is_empty()).then(|| {
            c.mounts
                .iter()
                .map(|m| Mount {
                    target: Some(m.target.clone()),
                    source: Some(m.volume.clone()),
                    typ: Some(MountType::VOLUME),
                    read_only: Some(true),
                    ..Default::default()
                })
                .collect()
        }),
        port_bindings: published.zip(port_key.clone()).map(|(port, key)| {
            HashMap::from([(
                key,
                Some(vec![PortBinding {
                    host_ip: Some(HOST.to_owned()),
                    host_port: Some(port.to_string()),
                }]),
            )])
        }),
        // Memory and swap alike, so a server cannot escape its limit into swap.
        memory,
        memory_swap: memory,
        nano_cpus: spec.limits.nano_cpus(),
        pids_limit: spec.limits.pids.map(i64::from),
        ..secure_host_config(sec)
    };
    // An entrypoint given replaces the image's, and its command with it (as
    // `docker run --entrypoint` does); arguments alone replace only the command.
    let (entrypoint, cmd) = match (spec.program.is_empty(), spec.args.is_empty()) {
        (true, true) => (None, None),
        (true, false) => (None, Some(spec.args.clone())),
        (false, _) => (Some(vec![spec.program.clone()]), Some(spec.args.clone())),
    };
    ContainerCreateBody {
        image: Some(c.image.clone()),
        entrypoint,
        cmd,
        env: Some(env),
        user: Some(c.user.clone()),
        working_dir: spec
            .working_dir
            .as_ref()
            .map(|w| w.to_string_lossy().into_owned()),
        labels: Some(labels),
        exposed_ports: port_key.map(|k| vec![k]),
        host_config: Some(host_config),
        ..Default::default()
    }
}

pub struct DockerRuntime {
    inner: Arc<Inner>,
    /// The engine's socket; `None`: the local defaults.
    host: Option<String>,
    /// Where each deployment listens; host ports from the allocator every runtime shares.
    endpoints: Endpoints,
    /// The engine, once connected (on first use), then kept.
    engine: std::sync::OnceLock<Docker>,
    /// Held while connecting, so one attempt runs at a time.
    connecting: tokio::sync::Mutex<()>,
}

/// The engine at `host` (`None`: the local defaults), at the API version both speak.
pub async fn connect(host: Option<&str>) -> Result<Docker, DockerError> {
    let docker = match host {
        Some(h) => Docker::connect_with_unix(h, ENGINE_TIMEOUT_SECS, bollard::API_DEFAULT_VERSION),
        None => Docker::connect_with_local_defaults(),
    }?;
    docker.negotiate_version().await
}

/// The containers, in any state, that carry every one of `labels` (`key=value`).
pub async fn labelled(
    docker: &Docker,
    labels: Vec<String>,
) -> Result<Vec<bollard::models::ContainerSummary>, DockerError> {
    let filters = HashMap::from([("label", labels)]);
    docker
        .list_containers(Some(
            ListContainersOptionsBuilder::new()
                .all(true)
                .filters(&filters)
                .build(),
        ))
        .await
}

/// What one container uses now, as the engine's one-shot stats say (no uptime: the caller
/// knows when it started its own).
async fn container_usage(docker: &Docker, container: &str) -> Option<Usage> {
    let stats = docker
        .stats(
            container,
            Some(
                StatsOptionsBuilder::new()
                    .stream(false)
                    .one_shot(true)
                    .build(),
            ),
        )
        .next()
        .await?
        .ok()?;
    let cpu_ns = stats
        .cpu_stats
        .and_then(|c| c.cpu_usage)
        .and_then(|u| u.total_usage)
        .unwrap_or_default();
    Some(Usage {
        cpu_seconds: cpu_ns as f64 / 1e9,
        memory_bytes: stats.memory_stats.and_then(|m| m.usage).unwrap_or_default(),
        processes: stats
            .pids_stats
            .and_then(|p| p.current)
            .map_or(0, |n| usize::try_from(n).unwrap_or(usize::MAX)),
        open_fds: None,
        uptime_seconds: None,
    })
}

pub fn is_status(e: &DockerError, status: u16) -> bool {
    matches!(e, DockerError::DockerResponseServerError { status_code, .. } if *status_code == status)
}

fn engine_error(e: DockerError) -> RuntimeError {
    RuntimeError::Engine(e.to_string())
}

impl DockerRuntime {
    /// Whether the engine runs on this host (a Unix socket), so its bridge addresses are
    /// reachable from here.
    fn engine_is_local(&self) -> bool {
        match &self.host {
            Some(_) => true,
            None => std::env::var("DOCKER_HOST").map_or(true, |h| h.starts_with("unix://")),
        }
    }

    pub fn new(node: String, host: Option<String>, ports: Arc<PortAllocator>) -> DockerRuntime {
        DockerRuntime {
            inner: Arc::new(Inner {
                node,
                state: Mutex::default(),
            }),
            host,
            endpoints: Endpoints::new(ports),
            engine: std::sync::OnceLock::new(),
            connecting: tokio::sync::Mutex::new(()),
        }
    }

    fn unavailable(reason: impl std::fmt::Display) -> RuntimeError {
        RuntimeError::Unavailable {
            runtime: "docker",
            reason: format!(
                "{reason} (is dockerd running? see README, \"Running tools in containers\")"
            ),
        }
    }

    /// The engine, connected (and its exit watch started) on first use.
    async fn docker(&self) -> Result<Docker, RuntimeError> {
        if let Some(d) = self.engine.get() {
            return Ok(d.clone());
        }
        let _one = self.connecting.lock().await;
        if let Some(d) = self.engine.get() {
            return Ok(d.clone());
        }
        // Events from here on are replayed to the watch, whenever its subscription starts.
        let since = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        let docker = connect(self.host.as_deref())
            .await
            .map_err(Self::unavailable)?;
        tokio::spawn(watch_exits(
            docker.clone(),
            Arc::downgrade(&self.inner),
            since,
        ));
        Ok(self.engine.get_or_init(|| docker).clone())
    }

    /// Removes a container whatever its state, and returns once it is gone (its name free
    /// again); one already gone is fine.
    pub async fn remove(docker: &Docker, container: &str) -> Result<(), RuntimeError> {
        match docker
            .remove_container(
                container,
                Some(RemoveContainerOptionsBuilder::new().force(true).build()),
            )
            .await
        {
            Ok(()) => Ok(()),
            Err(e) if is_status(&e, 404) => Ok(()),
            // A removal already under way (`docker rm -f` by someone else, a racing sweep):
            // the engine says when it is done.
            Err(e) if is_status(&e, 409) => {
                let mut gone = docker.wait_container(
                    container,
                    Some(
                        WaitContainerOptionsBuilder::new()
                            .condition("removed")
                            .build(),
                    ),
                );
                while let Some(r) = gone.next().await {
                    match r {
                        Ok(_) => {}
                        Err(e) if is_status(&e, 404) => break,
                        // The wait reports the container's own exit code as an error.
                        Err(DockerError::DockerContainerWaitError { .. }) => {}
                        Err(e) => return Err(engine_error(e)),
                    }
                }
                Ok(())
            }
            Err(e) => Err(engine_error(e)),
        }
    }

    /// The engine, connected on first use (for work beside deployments: package installs).
    pub async fn engine(&self) -> Result<Docker, RuntimeError> {
        self.docker().await
    }

    /// This node's id, which labels what the runtime creates.
    pub fn node(&self) -> &str {
        &self.inner.node
    }

    /// The id of the launch's image, pulled first if it is not on the host and the launch
    /// allows it.
    pub async fn image_id(&self, c: &ContainerLaunch) -> Result<String, RuntimeError> {
        let docker = self.docker().await?;
        Self::ensure_image(&docker, c).await?;
        let image = docker.inspect_image(&c.image).await.map_err(engine_error)?;
        Ok(image.id.unwrap_or_default())
    }

    /// The image is on the host, pulled first where the tool allows it.
    pub async fn ensure_image(docker: &Docker, c: &ContainerLaunch) -> Result<(), RuntimeError> {
        match docker.inspect_image(&c.image).await {
            Ok(_) => return Ok(()),
            Err(e) if is_status(&e, 404) => {}
            Err(e) => return Err(engine_error(e)),
        }
        if c.pull == Pull::Never {
            return Err(RuntimeError::ImageMissing(c.image.clone()));
        }
        let mut pull = docker.create_image(
            Some(
                CreateImageOptionsBuilder::new()
                    .from_image(&c.image)
                    .build(),
            ),
            None,
            None,
        );
        while let Some(step) = pull.next().await {
            step.map_err(|e| RuntimeError::Engine(format!("pulling '{}': {e}", c.image)))?;
        }
        Ok(())
    }

    async fn start_container(&self, spec: LaunchSpec) -> Result<Started, RuntimeError> {
        let id = spec.deployment_id;
        let c = spec.container.clone().ok_or_else(|| {
            RuntimeError::Unsupported("the docker runtime runs only tools with an image".into())
        })?;
        let endpoint = self.reserve(id, &spec.listen)?;
        let docker = self.docker().await?;
        let Some(port) = endpoint.port() else {
            return Err(RuntimeError::Unsupported(
                "a container listens on a TCP port".into(),
            ));
        };
        let spec = spec.with_port(port);
        // The ended container of this deployment (a restart), or one an earlier Switchboard
        // left: its name is taken again.
        self.inner.state().instances.remove(&id);
        Self::remove(&docker, &container_name(id)).await?;
        Self::ensure_image(&docker, &c).await?;
        let created = docker
            .create_container(
                Some(
                    CreateContainerOptionsBuilder::new()
                        .name(&container_name(id))
                        .build(),
                ),
                create_body(&self.inner.node, &spec, &c, Some(port)),
            )
            .await
            .map_err(|e| RuntimeError::Engine(format!("creating the container: {e}")))?;
        // Watched before it starts, so its exit cannot come first.
        let (tx, _) = watch::channel(None);
        self.inner.state().instances.insert(
            id,
            Arc::new(Instance {
                container: created.id.clone(),
                exit: tx,
                started: SystemTime::now(),
                dial: std::sync::OnceLock::new(),
            }),
        );
        if let Err(e) = docker.start_container(&created.id, None).await {
            self.inner.state().instances.remove(&id);
            let _ = Self::remove(&docker, &created.id).await;
            return Err(RuntimeError::Engine(format!(
                "starting the container of image '{}': {e}",
                c.image
            )));
        }
        if c.network == Network::Bridge
            && self.engine_is_local()
            && let Ok(info) = docker.inspect_container(&created.id, None).await
            && let Some(addr) = bridge_address(&info, port)
            && let Some(inst) = self.inner.get(id)
        {
            let _ = inst.dial.set(addr);
        }
        Ok(Started {
            instance: InstanceRef::Container {
                id: created.id,
                port,
            },
            endpoint,
        })
    }

    async fn adopt_container(&self, id: Uuid, container: &str, port: u16) -> Option<Endpoint> {
        let docker = self.docker().await.ok()?;
        let info = docker.inspect_container(container, None).await.ok()?;
        let labels = info.config.as_ref()?.labels.as_ref()?;
        let ours = labels.get(NODE_LABEL) == Some(&self.inner.node)
            && labels.get(DEPLOYMENT_LABEL) == Some(&id.to_string());
        let state = info.state.as_ref()?;
        if !ours || state.running != Some(true) {
            return None;
        }
        let started = state
            .started_at
            .as_deref()
            .and_then(|s| chrono::DateTime::parse_from_rfc3339(s).ok())
            .map_or_else(SystemTime::now, SystemTime::from);
        let (tx, _) = watch::channel(None);
        let dial = std::sync::OnceLock::new();
        if self.engine_is_local()
            && info
                .host_config
                .as_ref()
                .and_then(|h| h.network_mode.as_deref())
                != Some("host")
            && let Some(addr) = bridge_address(&info, port)
        {
            let _ = dial.set(addr);
        }
        let inst = Arc::new(Instance {
            container: container.to_owned(),
            exit: tx,
            started,
            dial,
        });
        self.inner.state().instances.insert(id, Arc::clone(&inst));
        // It may have died between the inspection and the watch: look once more.
        if let Ok(again) = docker.inspect_container(container, None).await
            && again.state.as_ref().and_then(|s| s.running) != Some(true)
        {
            let exit = ended(&docker, container, None).await;
            inst.exit.send_if_modified(|e| e.replace(exit).is_none());
        }
        Some(self.endpoints.adopted(
            id,
            Endpoint::Tcp {
                host: HOST.to_owned(),
                port,
            },
        ))
    }

    async fn stop_container(
        &self,
        id: Uuid,
        grace: Duration,
    ) -> Result<Option<ExitInfo>, RuntimeError> {
        let Some(inst) = self.inner.get(id) else {
            // A start cancelled (a stop during it) between creating its container and noting
            // it leaves a created container, known only by its name.
            if let Ok(docker) = self.docker().await
                && let Err(e) = Self::remove(&docker, &container_name(id)).await
            {
                tracing::warn!(deployment = %id, error = %e, "Cannot remove a container whose start was cut off");
            }
            return Ok(None);
        };
        let docker = self
            .docker()
            .await?
            .with_timeout(grace + Duration::from_secs(ENGINE_TIMEOUT_SECS));
        // SIGTERM (to the init process, which forwards it), SIGKILL after `t` seconds.
        let t = i32::try_from(grace.as_millis().div_ceil(1000)).unwrap_or(i32::MAX);
        match docker
            .stop_container(
                &inst.container,
                Some(StopContainerOptionsBuilder::new().t(t).build()),
            )
            .await
        {
            // 304: it had already stopped; 404: removed behind our back.
            Err(e) if !is_status(&e, 304) && !is_status(&e, 404) => return Err(engine_error(e)),
            _ => {}
        }
        let seen = *inst.exit.borrow();
        let exit = match seen {
            Some(e) => e,
            None => ended(&docker, &inst.container, None).await,
        };
        inst.exit.send_if_modified(|e| e.replace(exit).is_none());
        Self::remove(&docker, &inst.container).await?;
        self.inner.state().instances.remove(&id);
        Ok(Some(exit))
    }

    async fn usage_of(&self, id: Uuid) -> Option<Usage> {
        let inst = self.inner.get(id)?;
        let docker = self.docker().await.ok()?;
        Some(Usage {
            uptime_seconds: inst.started.elapsed().ok().map(|d| d.as_secs_f64()),
            ..container_usage(&docker, &inst.container).await?
        })
    }

    /// The summed use of deployment `id`'s stdio server containers (its bridge's children).
    async fn servers_usage_of(&self, id: Uuid) -> Option<Usage> {
        let docker = self.docker().await.ok()?;
        let listed = labelled(
            &docker,
            vec![
                format!("{NODE_LABEL}={}", self.inner.node),
                format!("{DEPLOYMENT_LABEL}={id}"),
                format!("{ROLE_LABEL}={STDIO_ROLE}"),
            ],
        )
        .await
        .ok()?;
        let ids: Vec<String> = listed.into_iter().filter_map(|c| c.id).collect();
        if ids.is_empty() {
            return None;
        }
        let each =
            futures_util::future::join_all(ids.iter().map(|c| container_usage(&docker, c))).await;
        let mut total = Usage::default();
        for u in each.iter().flatten() {
            total.add(u);
        }
        Some(total)
    }

    /// Removes this node's containers that no held instance is: what an earlier Switchboard
    /// left, and the stdio server containers of deployments not adopted (their bridge is
    /// gone). Containers without this node's label are never listed, so never touched.
    async fn sweep_orphans(&self, adopted: &HashSet<Uuid>) -> Vec<Uuid> {
        let docker = match self.docker().await {
            Ok(d) => d,
            Err(e) => {
                tracing::debug!(error = %e, "No container engine: no containers swept");
                return Vec::new();
            }
        };
        let listed = match labelled(&docker, vec![format!("{NODE_LABEL}={}", self.inner.node)])
            .await
        {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "Could not list this node's containers to sweep them");
                return Vec::new();
            }
        };
        let mut swept = Vec::new();
        for c in listed {
            let Some(cid) = c.id else { continue };
            let held = self
                .inner
                .state()
                .instances
                .values()
                .any(|i| i.container == cid);
            if held {
                continue;
            }
            let label = |k: &str| c.labels.as_ref().and_then(|l| l.get(k));
            let deployment = label(DEPLOYMENT_LABEL).and_then(|d| d.parse::<Uuid>().ok());
            // A live bridge's server: its bridge stops it.
            if label(ROLE_LABEL).is_some_and(|r| r == STDIO_ROLE)
                && deployment.is_some_and(|d| adopted.contains(&d))
            {
                continue;
            }
            let running = c.state.as_ref().is_some_and(|s| s.to_string() == "running");
            tracing::warn!(container = %cid, deployment = ?deployment, "Removing a container this node left behind");
            if let Err(e) = Self::remove(&docker, &cid).await {
                tracing::warn!(container = %cid, error = %e, "Could not remove a leftover container");
                continue;
            }
            if running && let Some(d) = deployment {
                swept.push(d);
            }
        }
        swept
    }
}

/// Feeds each instance's exit watch from the engine's `die` events for this node's
/// containers, resuming after a break from the last event seen (`since`), until the runtime
/// is gone.
async fn watch_exits(docker: Docker, inner: Weak<Inner>, mut since: i64) {
    let node = match inner.upgrade() {
        Some(i) => i.node.clone(),
        None => return,
    };
    let filters = HashMap::from([
        ("type", vec!["container".to_owned()]),
        ("event", vec!["die".to_owned()]),
        ("label", vec![format!("{NODE_LABEL}={node}")]),
    ]);
    loop {
        let mut events = docker.events(Some(
            EventsOptionsBuilder::new()
                .since(&since.to_string())
                .filters(&filters)
                .build(),
        ));
        while let Some(event) = events.next().await {
            let Some(inner) = inner.upgrade() else { return };
            match event {
                Ok(event) => {
                    since = event.time.unwrap_or(since).max(since);
                    if let Some((inst, code)) = inner.died(&event) {
                        drop(inner);
                        let exit = ended(&docker, &inst.container, code).await;
                        inst.exit
                            .send_if_modified(|e| e.is_none() && e.replace(exit).is_none());
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "The container engine's event stream broke; resuming");
                    break;
                }
            }
        }
        if inner.strong_count() == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// A container's output as text chunks, with the engine's timestamps (as the process
/// runtime's log lines have theirs).
fn container_logs(
    docker: &Docker,
    container: &str,
    tail: &str,
    follow: bool,
) -> impl futures_util::Stream<Item = std::io::Result<bytes::Bytes>> + use<> {
    docker
        .logs(
            container,
            Some(
                LogsOptionsBuilder::new()
                    .stdout(true)
                    .stderr(true)
                    .timestamps(true)
                    .follow(follow)
                    .tail(tail)
                    .build(),
            ),
        )
        .map(|chunk| chunk.map(|c| c.into_bytes()).map_err(std::io::Error::other))
}

impl Runtime for DockerRuntime {
    fn kind(&self) -> RuntimeKind {
        RuntimeKind::Docker
    }

    fn ready(&self) -> BoxFuture<'_, Result<(), RuntimeError>> {
        async move {
            let docker = self.docker().await?;
            docker.ping().await.map(drop).map_err(Self::unavailable)
        }
        .boxed()
    }

    fn reserve(&self, id: Uuid, listen: &Listen) -> Result<Endpoint, RuntimeError> {
        if let Listen::Socket(_) = listen {
            return Err(RuntimeError::Unsupported(
                "a stdio deployment's instance is its bridge, a host process (its server \
                 containers are the bridge's): the process runtime runs it"
                    .into(),
            ));
        }
        self.endpoints.reserve(id, listen, HOST)
    }

    fn release(&self, id: Uuid) {
        self.endpoints.release(id);
        let inst = self.inner.state().instances.remove(&id);
        // The deployment has ended for good: its last container goes too.
        if let Some(inst) = inst
            && let Some(docker) = self.engine.get().cloned()
        {
            tokio::spawn(async move {
                if let Err(e) = Self::remove(&docker, &inst.container).await {
                    tracing::warn!(container = %inst.container, error = %e, "Could not remove an ended container");
                }
            });
        }
    }

    fn start(&self, spec: LaunchSpec) -> BoxFuture<'_, Result<Started, RuntimeError>> {
        self.start_container(spec).boxed()
    }

    fn adopt(
        &self,
        id: Uuid,
        instance: &InstanceRef,
        _stop: StopMode,
    ) -> BoxFuture<'_, Option<Endpoint>> {
        // Every other variant is another runtime's.
        let InstanceRef::Container {
            id: container,
            port,
        } = instance
        else {
            return std::future::ready(None).boxed();
        };
        let (container, port) = (container.clone(), *port);
        async move { self.adopt_container(id, &container, port).await }.boxed()
    }

    fn wait(&self, id: Uuid) -> BoxFuture<'_, Result<ExitInfo, RuntimeError>> {
        async move {
            let inst = self
                .inner
                .get(id)
                .ok_or(RuntimeError::UnknownInstance(id))?;
            Ok(super::exit_from(inst.exit.subscribe()).await)
        }
        .boxed()
    }

    fn stop(
        &self,
        id: Uuid,
        grace: Duration,
    ) -> BoxFuture<'_, Result<Option<ExitInfo>, RuntimeError>> {
        self.stop_container(id, grace).boxed()
    }

    fn dial(&self, id: Uuid) -> Option<SocketAddr> {
        self.inner.get(id)?.dial.get().copied()
    }

    fn usage(&self, id: Uuid) -> BoxFuture<'_, Option<Usage>> {
        self.usage_of(id).boxed()
    }

    fn servers_usage(&self, id: Uuid) -> BoxFuture<'_, Option<Usage>> {
        self.servers_usage_of(id).boxed()
    }

    fn logs_tail(&self, id: Uuid, lines: usize) -> BoxFuture<'_, String> {
        async move {
            let (Some(inst), Ok(docker)) = (self.inner.get(id), self.docker().await) else {
                return String::new();
            };
            let chunks: Vec<_> =
                container_logs(&docker, &inst.container, &lines.to_string(), false)
                    .collect()
                    .await;
            let bytes: Vec<u8> = chunks
                .into_iter()
                .filter_map(Result::ok)
                .flat_map(|b| b.to_vec())
                .collect();
            String::from_utf8_lossy(&bytes).into_owned()
        }
        .boxed()
    }

    fn logs(&self, id: Uuid, tail: usize, until: Option<BoxFuture<'static, ()>>) -> LogStream {
        let (tx, rx) = mpsc::channel::<std::io::Result<bytes::Bytes>>(16);
        let inner = Arc::clone(&self.inner);
        // A deployment with a container has a connected engine; one without has no output.
        let Some(docker) = self.engine.get().cloned() else {
            return futures_util::stream::empty().boxed();
        };
        let task = async move {
            let follow = until.is_some();
            let mut until = until.unwrap_or_else(|| std::future::pending().boxed());
            let mut tail = tail.to_string();
            let mut shown: Option<String> = None;
            loop {
                let current = inner.get(id).map(|i| i.container.clone());
                match current {
                    // A container not shown yet (the first, or the next after a restart).
                    Some(c) if shown.as_ref() != Some(&c) => {
                        let mut out = container_logs(&docker, &c, &tail, follow).boxed();
                        loop {
                            tokio::select! {
                                chunk = out.next() => match chunk {
                                    Some(chunk) => if tx.send(chunk).await.is_err() { return },
                                    None => break,
                                },
                                () = &mut until => return,
                            }
                        }
                        shown = Some(c);
                        tail = "all".to_owned();
                    }
                    _ => {}
                }
                if !follow {
                    return;
                }
                // Between containers (a restart under way): look again shortly.
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_millis(200)) => {}
                    () = &mut until => return,
                }
            }
        };
        tokio::spawn(task);
        futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|c| (c, rx)) })
            .boxed()
    }

    fn sweep<'a>(&'a self, adopted: &'a HashSet<Uuid>) -> BoxFuture<'a, Vec<Uuid>> {
        self.sweep_orphans(adopted).boxed()
    }

    /// A container's output is the engine's; Switchboard adds no lines to it.
    fn log_file(&self, _id: Uuid) -> Option<PathBuf> {
        None
    }

    fn host_ports(&self) -> Option<PortUse> {
        Some(self.endpoints.port_use())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signal_exit_is_read_from_128_plus_its_number() {
        assert_eq!(exit_info(Some(137)).signal, Some(9));
        assert_eq!(exit_info(Some(143)).signal, Some(15));
        assert_eq!(exit_info(Some(3)).code, Some(3));
        assert_eq!(exit_info(Some(0)).code, Some(0));
        assert_eq!(exit_info(None), ExitInfo::default());
    }
}
