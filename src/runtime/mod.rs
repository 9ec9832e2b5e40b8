//! Running deployments: the boundary between the manager and whatever executes a server.
//!
//! [`Runtime`] is deliberately small (start, wait, stop, inspect, and the log tail the manager
//! quotes when a start fails) because every runtime implements it: processes
//! ([`process::ProcessRuntime`]) and Docker containers ([`docker::DockerRuntime`]); a
//! Kubernetes runtime would too. [`Runtimes`] holds the runtimes of a node and says which one
//! runs each deployment.
//!
//! Boundary: a runtime knows nothing about the store or MCP. It runs what [`LaunchSpec`] says,
//! owns what its instances listen on (a process runtime allocates host ports from the
//! configured range; a socket is named by the launch), reports exits, and stops whole
//! instances. Its methods return boxed futures so the manager can hold an `Arc<dyn Runtime>`;
//! none of them is on a request's hot path.
//!
//! Invariants every runtime keeps (the manager relies on them):
//! - [`Runtime::reserve`] claims an instance's [`Endpoint`] before its record is written, so a
//!   deploy the runtime cannot host is refused leaving nothing behind; the endpoint stays the
//!   deployment's across its restarts (start and adopt return that same endpoint) until
//!   [`Runtime::release`].
//! - [`Runtime::adopt`] signals nothing and says "not mine" for another runtime's reference.
//! - [`Runtime::stop`] is idempotent and ends the whole instance (tree, container, pod).
//! - [`Runtime::sweep`] removes only this node's instances that it does not hold.

pub mod cgroup;
pub mod cgroup_limits;
pub mod container;
pub mod dispatch;
pub mod docker;
pub mod endpoints;
#[cfg(test)]
pub mod fake;
pub mod launch;
pub mod limits;
pub mod process;

pub use container::ContainerLaunch;
pub use dispatch::Runtimes;
pub use limits::Limits;

use std::{collections::HashSet, fmt, path::PathBuf, time::Duration};

use bytes::Bytes;
use futures_util::{future::BoxFuture, stream::BoxStream};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

/// Which runtime runs a deployment (stored with its record).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema, Default)]
#[serde(rename_all = "lowercase")]
pub enum RuntimeKind {
    /// A process tree on this host ([`process::ProcessRuntime`]).
    #[default]
    Process,
    /// A Docker container ([`docker::DockerRuntime`]).
    Docker,
}

impl RuntimeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RuntimeKind::Process => "process",
            RuntimeKind::Docker => "docker",
        }
    }
}

impl std::str::FromStr for RuntimeKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "process" => Ok(RuntimeKind::Process),
            "docker" => Ok(RuntimeKind::Docker),
            other => Err(format!("unknown runtime '{other}'")),
        }
    }
}

/// Where an instance listens: how the proxy and health probes reach it. The route table and
/// the proxy's connector take this type, never a string convention.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Endpoint {
    /// A TCP listener (127.0.0.1 and a port for a process; a published port for a container).
    Tcp { host: String, port: u16 },
    /// A Unix socket (a stdio deployment's bridge).
    Unix(PathBuf),
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Tcp { host, port } => write!(f, "{host}:{port}"),
            Endpoint::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

/// What a runtime needs to find one of its instances again after a Switchboard crash: stored
/// with the deployment record (as JSON) and handed back to [`Runtime::adopt`]. The manager and
/// the store never look inside; each runtime reads only its own variant and treats any other
/// as "not mine". A Kubernetes runtime would add `Pod { namespace, name, uid }`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum InstanceRef {
    /// The main process of a tree: its pid and start time (clock ticks after boot), which
    /// together name one process, so a reused pid is never taken for the deployment's; and
    /// where it listens (a port or a socket), so adoption gives the endpoint back. References
    /// written before endpoints were recorded have neither; the manager completes them from
    /// the record ([`InstanceRef::with_endpoint`]).
    Process {
        pid: u32,
        start_time: Option<u64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        port: Option<u16>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        #[schema(value_type = Option<String>)]
        socket: Option<PathBuf>,
    },
    /// A Docker container: its id (the engine's, which a re-created container never reuses)
    /// and the host port it publishes (on 127.0.0.1).
    Container { id: String, port: u16 },
}

impl InstanceRef {
    /// The runtime this reference belongs to.
    pub fn runtime(&self) -> RuntimeKind {
        match self {
            InstanceRef::Process { .. } => RuntimeKind::Process,
            InstanceRef::Container { .. } => RuntimeKind::Docker,
        }
    }

    /// The main process's pid, for runtimes whose instances are host processes.
    pub fn pid(&self) -> Option<u32> {
        match self {
            InstanceRef::Process { pid, .. } => Some(*pid),
            InstanceRef::Container { .. } => None,
        }
    }

    /// Fills in where a process listens when the reference does not say (one written by a
    /// release that did not record it): from the record's port, else the bridge's socket.
    pub fn with_endpoint(mut self, record_port: Option<u16>, socket: PathBuf) -> InstanceRef {
        match &mut self {
            InstanceRef::Process {
                port: p @ None,
                socket: s @ None,
                ..
            } => match record_port {
                Some(port) => *p = Some(port),
                None => *s = Some(socket),
            },
            InstanceRef::Process { .. } | InstanceRef::Container { .. } => {}
        }
        self
    }
}

impl Endpoint {
    /// The TCP port, for an endpoint that has one (what the record's `port` shows).
    pub fn port(&self) -> Option<u16> {
        match self {
            Endpoint::Tcp { port, .. } => Some(*port),
            Endpoint::Unix(_) => None,
        }
    }
}

/// How an instance is to listen, as the launch asks for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    /// On a TCP port the runtime chooses where it needs host ports (from the configured range
    /// for processes). The runtime substitutes `{port}` in the command, its arguments and the
    /// environment, and sets `env` (when named) to the port.
    Port {
        env: Option<String>,
        /// The port to take again when it is free: the record's, after Switchboard restarted.
        prefer: Option<u16>,
    },
    /// On this Unix socket, which the launched command is told about (the stdio bridge).
    Socket(PathBuf),
}

/// A started instance: how to find it again and how to reach it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Started {
    pub instance: InstanceRef,
    pub endpoint: Endpoint,
}

/// What `ps` prints in its INSTANCE column.
impl fmt::Display for InstanceRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            InstanceRef::Process { pid, .. } => write!(f, "pid {pid}"),
            // Docker's short form of the id, as `docker ps` shows it.
            InstanceRef::Container { id, .. } => {
                write!(f, "container {}", id.get(..12).unwrap_or(id))
            }
        }
    }
}

/// The exit an instance's exit watch publishes, once it does (unknown if the watch is dropped
/// without one).
pub async fn exit_from(mut rx: tokio::sync::watch::Receiver<Option<ExitInfo>>) -> ExitInfo {
    rx.wait_for(|e| e.is_some())
        .await
        .map(|e| e.unwrap_or_default())
        .unwrap_or_default()
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ExitInfo {
    pub code: Option<i32>,
    pub signal: Option<i32>,
    /// Killed for exceeding its memory limit (this one), as its runtime saw.
    pub oom_limit: Option<limits::Bytes>,
}

impl From<std::process::ExitStatus> for ExitInfo {
    fn from(status: std::process::ExitStatus) -> Self {
        use std::os::unix::process::ExitStatusExt as _;
        ExitInfo {
            code: status.code(),
            signal: status.signal(),
            oom_limit: None,
        }
    }
}

impl fmt::Display for ExitInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(limit) = self.oom_limit {
            return write!(f, "out of memory: limit {limit}");
        }
        match (self.code, self.signal) {
            (Some(c), _) => write!(f, "exit status {c}"),
            (None, Some(s)) => match nix::sys::signal::Signal::try_from(s) {
                Ok(sig) => write!(f, "killed by {sig}"),
                Err(_) => write!(f, "killed by signal {s}"),
            },
            (None, None) => f.write_str("unknown exit status"),
        }
    }
}

/// Everything a runtime needs to start one deployment: what to run (a command, and for a
/// container its image and settings) and how it listens. `{port}` in `program`, `args` and
/// `env` values is the runtime's to substitute, since the runtime picks the port.
#[derive(Debug, Clone)]
pub struct LaunchSpec {
    pub deployment_id: Uuid,
    pub program: String,
    pub args: Vec<String>,
    /// Added to (and overriding) the environment Switchboard inherited, in order (a later
    /// entry wins).
    pub env: Vec<(String, String)>,
    /// Added after `env`, never substituted, never logged.
    pub secret_env: Vec<(String, String)>,
    pub working_dir: Option<PathBuf>,
    pub stop: StopMode,
    pub listen: Listen,
    /// The image and container settings, for the Docker runtime (which refuses a launch
    /// without them; the process runtime ignores them). There, an empty `program` keeps the
    /// image's entrypoint and empty `args` its command.
    pub container: Option<ContainerLaunch>,
    /// The tool's resource limits, which the runtime enforces or refuses to start without.
    pub limits: Limits,
}

impl LaunchSpec {
    /// The launch with `{port}` replaced in the command, its arguments and `env` values, and
    /// the port variable (if the listen names one) put first, so the tool's own env can still
    /// override it. For runtimes that choose the port.
    pub fn with_port(mut self, port: u16) -> LaunchSpec {
        let p = port.to_string();
        let subst = |s: &mut String| {
            if s.contains("{port}") {
                *s = s.replace("{port}", &p);
            }
        };
        subst(&mut self.program);
        self.args.iter_mut().for_each(subst);
        self.env.iter_mut().for_each(|(_, v)| subst(v));
        if let Listen::Port {
            env: Some(name), ..
        } = &self.listen
        {
            self.env.insert(0, (name.clone(), p.clone()));
        }
        self
    }
}

/// Who gets the SIGTERM that starts a stop.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum StopMode {
    /// Every process of the tree at once (an HTTP server and whatever it started).
    #[default]
    Tree,
    /// The main process alone, which stops its own children in its own order (the stdio
    /// bridge: stdin closed first, as MCP's stdio shutdown says). What is left after the grace
    /// period is killed as usual.
    MainFirst,
}

/// One process, named so that a reused pid is never mistaken for it: the pid and the time the
/// process started (clock ticks after boot, /proc/PID/stat field 22).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcessId {
    pub pid: u32,
    /// `None` where /proc could not be read (the process already gone).
    pub start_time: Option<u64>,
}

impl ProcessId {
    /// The live process `pid` is now, or `None` when there is none.
    pub fn of(pid: u32) -> Option<ProcessId> {
        process_start_time(pid).map(|t| ProcessId {
            pid,
            start_time: Some(t),
        })
    }

    /// Whether `pid` is still this very process (false when it is gone or the pid was reused).
    pub fn is_alive(&self) -> bool {
        self.start_time.is_some() && process_start_time(self.pid) == self.start_time
    }
}

/// Field 22 of /proc/PID/stat. The command name (field 2) may hold spaces and parentheses, so
/// fields are counted after its closing parenthesis.
pub fn process_start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let mut fields = stat[stat.rfind(')')? + 1..].split_whitespace();
    // A zombie has exited; it only waits to be reaped.
    if matches!(fields.next(), Some("Z" | "X" | "x")) {
        return None;
    }
    // After the name and the state (field 3), starttime (22) is the 19th.
    fields.nth(18)?.parse().ok()
}

/// What an instance uses now.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Usage {
    pub cpu_seconds: f64,
    pub memory_bytes: u64,
    /// Live processes of the instance (its whole tree for a process).
    pub processes: usize,
    /// Open file descriptors, where the runtime can count them.
    pub open_fds: Option<usize>,
    /// Seconds since the instance's main process started.
    pub uptime_seconds: Option<f64>,
}

impl Usage {
    /// Adds what `other` uses (helpers of the same deployment); the uptime stays this one's.
    pub fn add(&mut self, other: &Usage) {
        self.cpu_seconds += other.cpu_seconds;
        self.memory_bytes = self.memory_bytes.saturating_add(other.memory_bytes);
        self.processes = self.processes.saturating_add(other.processes);
        self.open_fds = match (self.open_fds, other.open_fds) {
            (Some(a), Some(b)) => Some(a.saturating_add(b)),
            (a, b) => a.or(b),
        };
    }
}

/// An instance's output as it is read: chunks of text.
pub type LogStream = BoxStream<'static, std::io::Result<Bytes>>;

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("cannot start '{program}': {error}")]
    Spawn {
        program: String,
        error: std::io::Error,
    },
    #[error("working directory {0} does not exist or is not a directory")]
    WorkingDir(PathBuf),
    #[error("cannot open the deployment log {path}: {error}")]
    Log {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("process tree control failed: {0}")]
    Tree(#[source] std::io::Error),
    #[error("no instance {0} in this runtime")]
    UnknownInstance(Uuid),
    #[error(transparent)]
    PortsExhausted(#[from] crate::ports::PortsExhausted),
    /// The runtime cannot be used now (disabled, or its engine does not answer).
    #[error("the {runtime} runtime is unavailable: {reason}")]
    Unavailable {
        runtime: &'static str,
        reason: String,
    },
    /// The image is not on this host and the tool does not allow pulling it.
    #[error(
        "image '{0}' is not present on this host and the tool's pull policy is \"never\": \
         build or load it (docker build / docker load), or set pull = \"missing\""
    )]
    ImageMissing(String),
    /// The container engine refused or failed a request.
    #[error("docker: {0}")]
    Engine(String),
    /// What the launch asks for is something this runtime does not do.
    #[error("{0}")]
    Unsupported(String),
    /// The tool's limits cannot be set up (a controller missing, a cgroup not writable).
    #[error(transparent)]
    Limits(#[from] cgroup_limits::LimitError),
}

pub trait Runtime: Send + Sync + 'static {
    fn kind(&self) -> RuntimeKind;
    /// Whether the runtime can start instances now (an engine answers); a deploy asks first,
    /// so one it cannot host is refused before anything is recorded.
    fn ready(&self) -> BoxFuture<'_, Result<(), RuntimeError>> {
        futures_util::FutureExt::boxed(async { Ok(()) })
    }
    /// Whether this runtime can enforce `limits` here; a deploy asks first, so a tool whose
    /// limits would be ignored is refused before anything is recorded.
    fn can_enforce(&self, limits: &Limits) -> Result<(), RuntimeError> {
        let _ = limits;
        Ok(())
    }
    /// Claims where deployment `id` will listen, before anything runs or is recorded (a host
    /// port from the range, or the named socket). Returns the same endpoint while the claim
    /// holds; [`Runtime::release`] ends it.
    fn reserve(&self, id: Uuid, listen: &Listen) -> Result<Endpoint, RuntimeError>;
    /// Gives up what `reserve` (or `adopt`) claimed for `id`, once the deployment has ended
    /// for good. Idempotent.
    fn release(&self, id: Uuid);
    /// Starts the instance (reserving its endpoint first if that was not done) and returns
    /// the reference that finds it again and the endpoint it serves on, once it exists.
    /// Starting an id again (a restart) replaces the ended instance on the same endpoint.
    fn start(&self, spec: LaunchSpec) -> BoxFuture<'_, Result<Started, RuntimeError>>;
    /// Takes charge of an instance an earlier Switchboard process started, if `instance` still
    /// names that deployment's (for a process: same pid and start time, and in its cgroup
    /// where there are cgroups), and claims its endpoint, which it returns. Returns `None`,
    /// having signalled nothing, when it does not, or when the reference is another runtime's.
    fn adopt(
        &self,
        id: Uuid,
        instance: &InstanceRef,
        stop: StopMode,
    ) -> BoxFuture<'_, Option<Endpoint>>;
    /// Resolves when the instance's main process exits (at once if it already has).
    fn wait(&self, id: Uuid) -> BoxFuture<'_, Result<ExitInfo, RuntimeError>>;
    /// Stops the whole tree: SIGTERM to every process, SIGKILL to what is left after `grace`.
    /// Returns the main process's exit, or `None` for an instance this runtime does not know.
    /// Idempotent.
    fn stop(
        &self,
        id: Uuid,
        grace: Duration,
    ) -> BoxFuture<'_, Result<Option<ExitInfo>, RuntimeError>>;
    /// Where to connect to the deployment's current instance when that is not its endpoint
    /// (a container on a bridge network is reached at its own address, sparing the engine's
    /// port proxy); the endpoint stays what requests are addressed to.
    fn dial(&self, id: Uuid) -> Option<std::net::SocketAddr> {
        let _ = id;
        None
    }
    /// What a running instance uses; `None` for one this runtime does not run.
    fn usage(&self, id: Uuid) -> BoxFuture<'_, Option<Usage>>;
    /// What this runtime runs for deployment `id` without it being the deployment's instance
    /// (a stdio bridge's server containers), summed; `None` when it runs nothing of the kind.
    fn servers_usage(&self, id: Uuid) -> BoxFuture<'_, Option<Usage>> {
        let _ = id;
        futures_util::FutureExt::boxed(async { None })
    }
    /// The last `lines` lines of the instance's output.
    fn logs_tail(&self, id: Uuid, lines: usize) -> BoxFuture<'_, String>;
    /// The deployment's output (which spans its restarts): its last `tail` lines, then, with
    /// `until`, what it writes next, until `until` resolves and the output is drained. The
    /// API streams this; nothing above the runtime opens log files.
    fn logs(&self, id: Uuid, tail: usize, until: Option<BoxFuture<'static, ()>>) -> LogStream;
    /// Removes every instance of this node that this runtime does not hold (started or
    /// adopted): what an earlier Switchboard left running when it died. Called once at start,
    /// after adoption, with the deployments adopted (by any runtime): what serves one of them
    /// without being its instance (a stdio bridge's server containers) is kept. Returns the
    /// ids of those that were still running.
    fn sweep<'a>(&'a self, adopted: &'a HashSet<Uuid>) -> BoxFuture<'a, Vec<Uuid>>;
    /// Where the deployment's output goes, for lines Switchboard adds (package installs).
    fn log_file(&self, id: Uuid) -> Option<PathBuf>;
    /// Host ports held and the size of the range, for a runtime that allocates them.
    fn host_ports(&self) -> Option<PortUse> {
        None
    }
}

/// How much of the port range is taken (the `ports_in_use` / `ports_free` metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortUse {
    pub in_use: usize,
    pub total: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_exit_for_memory_says_so_with_the_limit() {
        let oom = ExitInfo {
            code: None,
            signal: Some(9),
            oom_limit: Some(limits::Bytes(256 << 20)),
        };
        assert_eq!(oom.to_string(), "out of memory: limit 256 MiB");
    }

    fn launch(listen: Listen) -> LaunchSpec {
        LaunchSpec {
            deployment_id: Uuid::new_v4(),
            program: "server-{port}".into(),
            args: vec!["--port={port}".into()],
            env: vec![("PORT".into(), "from-the-tool".into())],
            secret_env: vec![("TOKEN".into(), "a{port}b".into())],
            working_dir: None,
            stop: StopMode::Tree,
            listen,
            container: None,
            limits: Limits::default(),
        }
    }

    #[test]
    fn the_port_is_substituted_and_its_variable_comes_before_the_tools_env() {
        let l = launch(Listen::Port {
            env: Some("PORT".into()),
            prefer: None,
        })
        .with_port(7301);
        assert_eq!(l.program, "server-7301");
        assert_eq!(l.args, ["--port=7301"]);
        // Ours first, the tool's own after it (the later one wins in the environment).
        assert_eq!(
            l.env,
            [
                ("PORT".to_owned(), "7301".to_owned()),
                ("PORT".to_owned(), "from-the-tool".to_owned())
            ]
        );
        // Secrets are passed as given.
        assert_eq!(l.secret_env[0].1, "a{port}b");
        let unnamed = launch(Listen::Port {
            env: None,
            prefer: None,
        })
        .with_port(7301);
        assert_eq!(unnamed.env.len(), 1);
    }

    #[test]
    fn a_reference_without_an_endpoint_is_completed_from_the_record() {
        let old: InstanceRef =
            serde_json::from_str(r#"{"kind":"process","pid":7,"start_time":9}"#).expect("parses");
        let sock = PathBuf::from("/data/run/x.sock");
        let with_port = old.clone().with_endpoint(Some(8101), sock.clone());
        assert!(matches!(
            with_port,
            InstanceRef::Process {
                port: Some(8101),
                socket: None,
                ..
            }
        ));
        let stdio = old.with_endpoint(None, sock.clone());
        assert!(
            matches!(stdio, InstanceRef::Process { port: None, socket: Some(ref s), .. } if *s == sock)
        );
        // One that says where it listens keeps it.
        let new = with_port.with_endpoint(Some(1), sock);
        assert!(matches!(
            new,
            InstanceRef::Process {
                port: Some(8101),
                ..
            }
        ));
        assert_eq!(
            serde_json::to_string(&new).expect("serializes"),
            r#"{"kind":"process","pid":7,"start_time":9,"port":8101}"#
        );
    }
}
