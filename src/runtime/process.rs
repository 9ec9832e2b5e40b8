//! The process runtime: each deployment is a child process in its own process group and (where
//! the host allows) its own cgroup, with stdout and stderr appended to `logs/<id>.log`.
//!
//! Exits are noticed when they happen: a task per instance awaits tokio's `Child::wait` (driven
//! by SIGCHLD), publishes the exit on a watch channel, and kills whatever the main process left
//! behind in its tree, so a crashed server never leaves orphans.
//!
//! Tree tracking is a cgroup when one can be created (see [`super::cgroup`]), else the process
//! group alone; the second misses descendants that call `setsid()`, and Switchboard says so in
//! its log at start.
//!
//! A tool's limits put the deployment in limit groups too (see [`super::cgroup_limits`]),
//! written before the launch shim joins them and removed with the tree.

use std::{
    collections::{HashMap, HashSet},
    io::{Read as _, Seek as _, SeekFrom},
    path::{Path, PathBuf},
    process::Stdio,
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use futures_util::{FutureExt as _, StreamExt as _, future::BoxFuture};
use nix::{sys::signal::Signal, unistd::Pid};
use tokio::{process::Command, sync::watch};
use uuid::Uuid;

use crate::ports::PortAllocator;

use super::{
    Endpoint, ExitInfo, InstanceRef, LaunchSpec, Listen, LogStream, ProcessId, Runtime,
    RuntimeError, RuntimeKind, Started, StopMode, Usage,
    cgroup::{self, CgroupRoot},
    cgroup_limits::{Groups, LimitGroups},
    endpoints::Endpoints,
    launch::SHIM_ARG,
};

/// A deployment's log is rotated at this size (by the log writer the launch shim starts)...
pub const LOG_MAX_BYTES: u64 = 10 * 1024 * 1024;
/// ...keeping this many older files (`<id>.log.1` …).
pub const LOG_KEEP: u32 = 3;

/// How process trees are tracked.
#[derive(Debug, Clone)]
pub enum TreeTracking {
    /// One cgroup per deployment, joined through the launch shim.
    Cgroup(CgroupRoot),
    /// The process group only.
    ProcessGroup,
}

impl TreeTracking {
    /// Cgroups when possible.
    pub fn detect(node_id: &str) -> (TreeTracking, Option<String>) {
        match CgroupRoot::detect(node_id) {
            Ok(root) => (TreeTracking::Cgroup(root), None),
            Err(e) => (
                TreeTracking::ProcessGroup,
                Some(format!(
                    "cannot create cgroups ({e}); tracking process groups only, so a descendant \
                     that calls setsid() can outlive its deployment"
                )),
            ),
        }
    }

    pub fn describe(&self) -> String {
        match self {
            TreeTracking::Cgroup(root) => format!("cgroup v2 at {}", root.base().display()),
            TreeTracking::ProcessGroup => "process groups".to_owned(),
        }
    }

    /// The node's v2 directory, where deployments' tree-tracking cgroups are.
    pub fn cgroup_base(&self) -> Option<&Path> {
        match self {
            TreeTracking::Cgroup(root) => Some(root.base()),
            TreeTracking::ProcessGroup => None,
        }
    }
}

/// How a deployment's processes are put where they belong before the server runs.
#[derive(Debug, Clone)]
pub struct Placement {
    pub tracking: TreeTracking,
    /// Where tools' limits go (cgroup controllers, v2 or v1).
    pub limits: LimitGroups,
    /// The switchboard executable that implements `__launch` (the shim that joins cgroups).
    pub shim: PathBuf,
}

impl Placement {
    /// Tree tracking and limit controllers as this host offers them, and what the log should
    /// warn about.
    pub fn detect(node_id: &str, shim: PathBuf) -> (Placement, Option<String>) {
        let (tracking, warning) = TreeTracking::detect(node_id);
        let limits = LimitGroups::detect(node_id, tracking.cgroup_base());
        (
            Placement {
                tracking,
                limits,
                shim,
            },
            warning,
        )
    }
}

struct Instance {
    pid: u32,
    cgroup: Option<PathBuf>,
    /// Its limit groups (v1), removed with the tree.
    limits: Groups,
    stop: StopMode,
    exit: watch::Receiver<Option<ExitInfo>>,
}

impl Instance {
    fn tree(&self) -> Vec<u32> {
        match &self.cgroup {
            Some(dir) => cgroup::procs(dir).unwrap_or_default(),
            None => {
                if self.exit.borrow().is_none() {
                    vec![self.pid]
                } else {
                    Vec::new()
                }
            }
        }
    }

    fn signal_tree(&self, sig: Signal) -> std::io::Result<()> {
        if let Some(dir) = &self.cgroup {
            if sig == Signal::SIGKILL {
                cgroup::kill_all(dir)?;
            } else {
                cgroup::signal_all(dir, sig)?;
            }
        }
        // The process group too: it is the whole tree without cgroups, and costs nothing with.
        if let Ok(pgid) = i32::try_from(self.pid) {
            let _ = nix::sys::signal::killpg(Pid::from_raw(pgid), sig);
        }
        Ok(())
    }

    /// Whether the main process has exited and (with a cgroup) no descendant is left.
    fn is_gone(&self) -> bool {
        self.exit.borrow().is_some() && self.tree().is_empty()
    }
}

pub struct ProcessRuntime {
    tracking: TreeTracking,
    limit_groups: LimitGroups,
    shim: PathBuf,
    logs_dir: PathBuf,
    /// Host ports for instances that listen on one; the range is the config's `port_range`.
    /// Where each deployment listens, from its reservation to its release (across
    /// restarts); host ports from the allocator every runtime shares.
    endpoints: Endpoints,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Instances started or adopted, until stopped.
    instances: HashMap<Uuid, Arc<Instance>>,
}

/// Processes listen on the loopback interface; only the proxy and probes reach them.
const HOST: &str = "127.0.0.1";

impl ProcessRuntime {
    pub fn new(
        placement: Placement,
        logs_dir: PathBuf,
        ports: Arc<PortAllocator>,
    ) -> ProcessRuntime {
        ProcessRuntime {
            tracking: placement.tracking,
            limit_groups: placement.limits,
            shim: placement.shim,
            logs_dir,
            endpoints: Endpoints::new(ports),
            state: Mutex::new(State::default()),
        }
    }

    pub fn ports(&self) -> &PortAllocator {
        self.endpoints.ports()
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // Every update is a single insert or remove, so a poisoned lock is still consistent.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn tracking(&self) -> &TreeTracking {
        &self.tracking
    }

    pub fn log_path(&self, id: Uuid) -> PathBuf {
        self.logs_dir.join(format!("{id}.log"))
    }

    fn get(&self, id: Uuid) -> Option<Arc<Instance>> {
        self.state().instances.get(&id).cloned()
    }

    /// Called once when Switchboard exits, after its deployments were stopped or left running:
    /// removes the node's cgroup directory if nothing is left in it.
    pub fn close(&self) {
        if let TreeTracking::Cgroup(root) = &self.tracking {
            root.release();
        }
        self.limit_groups.release();
    }

    /// Kills every deployment tree under this node that this runtime does not hold: what an
    /// earlier Switchboard process left running when it died without stopping it.
    async fn sweep_orphans(&self) -> Vec<Uuid> {
        let mut swept = self.sweep_tree_orphans().await;
        for id in self.limit_groups.sweep(|id| self.get(id).is_some()).await {
            if !swept.contains(&id) {
                swept.push(id);
            }
        }
        swept
    }

    /// [`Self::sweep_orphans`] in the tree-tracking cgroups.
    async fn sweep_tree_orphans(&self) -> Vec<Uuid> {
        let TreeTracking::Cgroup(root) = &self.tracking else {
            return Vec::new();
        };
        let mut swept = Vec::new();
        for (id, dir) in root.children().unwrap_or_default() {
            if self.get(id).is_some() {
                continue;
            }
            let had_procs = !cgroup::procs(&dir).unwrap_or_default().is_empty();
            if let Err(e) = cgroup::kill_and_remove(&dir).await {
                tracing::warn!(deployment = %id, error = %e, "Could not remove orphaned tree");
            }
            if had_procs {
                swept.push(id);
            }
        }
        swept
    }

    fn spawn(&self, spec: &LaunchSpec) -> Result<Spawned, RuntimeError> {
        if let Some(dir) = &spec.working_dir
            && !dir.is_dir()
        {
            return Err(RuntimeError::WorkingDir(dir.clone()));
        }
        self.limit_groups.check(&spec.limits)?;
        let log_path = self.log_path(spec.deployment_id);
        let log_err = |error| RuntimeError::Log {
            path: log_path.clone(),
            error,
        };
        std::fs::create_dir_all(&self.logs_dir).map_err(log_err)?;
        let mut log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(log_err)?;
        {
            use std::io::Write as _;
            let _ = writeln!(
                log,
                "--- switchboard: starting deployment {} at {}: {} {}",
                spec.deployment_id,
                chrono::Utc::now().to_rfc3339(),
                spec.program,
                spec.args.join(" ")
            );
        }
        let stderr = log.try_clone().map_err(log_err)?;

        let cgroup_dir = match &self.tracking {
            TreeTracking::Cgroup(root) => Some(
                root.create(spec.deployment_id)
                    .map_err(RuntimeError::Tree)?,
            ),
            TreeTracking::ProcessGroup => None,
        };
        // Limits are written before anything joins the groups, so the server never runs
        // without them.
        let limits = if spec.limits.is_none() {
            Groups::default()
        } else {
            match self
                .limit_groups
                .create(spec.deployment_id, &spec.limits, cgroup_dir.as_deref())
            {
                Ok(g) => g,
                Err(e) => {
                    if let Some(dir) = &cgroup_dir {
                        let _ = cgroup::remove(dir);
                    }
                    return Err(e.into());
                }
            }
        };
        let joins: Vec<PathBuf> = cgroup_dir
            .iter()
            .map(|d| d.join("cgroup.procs"))
            .chain(limits.procs_files())
            .collect();
        let mut cmd = if joins.is_empty() {
            Command::new(&spec.program)
        } else {
            let mut cmd = Command::new(&self.shim);
            cmd.arg(SHIM_ARG);
            for procs in &joins {
                cmd.arg("--join").arg(procs);
            }
            // The stamping log writer ends when the tree is gone, which only a cgroup sees.
            if cgroup_dir.is_some() {
                cmd.arg("--log")
                    .arg(&log_path)
                    .arg(LOG_MAX_BYTES.to_string())
                    .arg(LOG_KEEP.to_string());
            }
            cmd.arg("--").arg(&spec.program);
            cmd
        };
        cmd.args(&spec.args)
            .envs(spec.env.iter().chain(&spec.secret_env).map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(stderr))
            // Own process group: a signal for Switchboard's group never reaches servers, and
            // killpg reaches the server's whole group. std keeps posix_spawn for this.
            .process_group(0)
            .kill_on_drop(false);
        // Unless the tool itself gives one of these names a value of its own.
        for k in crate::secrets::NEVER_INHERITED {
            if !spec
                .env
                .iter()
                .chain(&spec.secret_env)
                .any(|(name, _)| name == k)
            {
                cmd.env_remove(k);
            }
        }
        if let Some(dir) = &spec.working_dir {
            cmd.current_dir(dir);
        }
        let child = cmd.spawn().map_err(|error| {
            if let Some(dir) = &cgroup_dir {
                let _ = cgroup::remove(dir);
            }
            limits.remove();
            RuntimeError::Spawn {
                program: spec.program.clone(),
                error,
            }
        })?;
        let pid = child.id().ok_or_else(|| RuntimeError::Spawn {
            program: spec.program.clone(),
            error: std::io::Error::other("process exited before its pid was read"),
        })?;
        Ok(Spawned {
            pid,
            cgroup: cgroup_dir,
            limits,
            child,
        })
    }

    async fn stop_instance(inst: &Instance, grace: Duration) -> Result<ExitInfo, RuntimeError> {
        if !inst.is_gone() {
            match inst.stop {
                StopMode::Tree => inst
                    .signal_tree(Signal::SIGTERM)
                    .map_err(RuntimeError::Tree)?,
                StopMode::MainFirst => {
                    if let Ok(pid) = i32::try_from(inst.pid) {
                        let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGTERM);
                    }
                }
            }
            if tokio::time::timeout(grace, wait_gone(inst)).await.is_err() {
                inst.signal_tree(Signal::SIGKILL)
                    .map_err(RuntimeError::Tree)?;
                // SIGKILL cannot be ignored; this bound only guards against a kernel that never
                // reports the exit (a process stuck in uninterruptible sleep).
                if tokio::time::timeout(Duration::from_secs(30), wait_gone(inst))
                    .await
                    .is_err()
                {
                    return Err(RuntimeError::Tree(std::io::Error::other(
                        "processes survived SIGKILL for 30 s (uninterruptible sleep?)",
                    )));
                }
            }
        }
        if let Some(dir) = &inst.cgroup {
            let _ = cgroup::remove(dir);
        }
        inst.limits.remove();
        Ok(inst.exit.borrow().unwrap_or_default())
    }
}

/// A process just spawned, and where it was placed.
struct Spawned {
    pid: u32,
    cgroup: Option<PathBuf>,
    limits: Groups,
    child: tokio::process::Child,
}

/// Kills what a main process that exited left behind in its tree.
fn reap_tree(cgroup_dir: Option<&Path>, pid: u32) {
    if let Some(dir) = cgroup_dir {
        let _ = cgroup::kill_all(dir);
    } else if let Ok(pgid) = i32::try_from(pid) {
        let _ = nix::sys::signal::killpg(Pid::from_raw(pgid), Signal::SIGKILL);
    }
}

/// A pidfd for `pid` (Linux 5.3+): it becomes readable when that process exits, which is how
/// the exit of a process that is not our child is noticed without polling.
fn pidfd_open(pid: u32) -> Option<std::os::fd::OwnedFd> {
    let pid = rustix::process::Pid::from_raw(i32::try_from(pid).ok()?)?;
    rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty()).ok()
}

/// Resolves when `process` exits: on its pidfd when there is one, else by polling /proc.
async fn wait_exit(process: ProcessId, pidfd: Option<std::os::fd::OwnedFd>) {
    // `AsyncFd::new` is deprecated because a caller could close the fd while it is registered;
    // here the AsyncFd owns the OwnedFd, so nothing else can (and its replacement is `unsafe`,
    // which this crate forbids).
    #[allow(deprecated)]
    if let Some(fd) = pidfd
        && let Ok(fd) = tokio::io::unix::AsyncFd::new(fd)
    {
        let _ = fd.readable().await;
        return;
    }
    while process.is_alive() {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until the main process has exited and the tree is empty.
async fn wait_gone(inst: &Instance) {
    let mut exit = inst.exit.clone();
    let _ = exit.wait_for(|e| e.is_some()).await;
    // The main exit is event-driven; what remains is descendants, which a stop has already
    // signalled. A cgroup offers no exit event we can await portably, so poll briefly.
    while !inst.tree().is_empty() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

impl ProcessRuntime {
    /// [`Runtime::adopt`], which reads only /proc and the cgroup, so nothing waits.
    fn adopt_now(&self, id: Uuid, instance: &InstanceRef, stop: StopMode) -> Option<Endpoint> {
        // Every other variant is another runtime's.
        let InstanceRef::Process {
            pid,
            start_time,
            port,
            socket,
        } = instance
        else {
            return None;
        };
        let endpoint = match (port, socket) {
            (Some(port), _) => Endpoint::Tcp {
                host: HOST.to_owned(),
                port: *port,
            },
            (None, Some(path)) => Endpoint::Unix(path.clone()),
            // Nothing says where it listens: it cannot be routed, so it is not adopted.
            (None, None) => return None,
        };
        let process = ProcessId {
            pid: *pid,
            start_time: *start_time,
        };
        // The pidfd first, then the identity check: if the check passes, the pidfd refers to
        // the process that has this start time, even if the pid is reused right after.
        let pidfd = pidfd_open(process.pid);
        if !process.is_alive() {
            return None;
        }
        let cgroup_dir = match &self.tracking {
            TreeTracking::Cgroup(root) => {
                let dir = root.path(id);
                if !cgroup::procs(&dir)
                    .unwrap_or_default()
                    .contains(&process.pid)
                {
                    return None;
                }
                Some(dir)
            }
            TreeTracking::ProcessGroup => None,
        };
        // Still in its limit groups, with their limits: only their counters are read anew.
        let limits = self.limit_groups.existing(id, cgroup_dir.as_deref());
        let (tx, rx) = watch::channel(None);
        self.state().instances.insert(
            id,
            Arc::new(Instance {
                pid: process.pid,
                cgroup: cgroup_dir.clone(),
                limits: limits.clone(),
                stop,
                exit: rx,
            }),
        );
        tokio::spawn(async move {
            wait_exit(process, pidfd).await;
            // Not our child: its exit status went to whoever reaped it.
            let mut exit = ExitInfo::default();
            exit.oom_limit = limits.oom_limit(&exit).await;
            reap_tree(cgroup_dir.as_deref(), process.pid);
            let _ = tx.send(Some(exit));
        });
        Some(self.endpoints.adopted(id, endpoint))
    }
}

impl Runtime for ProcessRuntime {
    fn kind(&self) -> RuntimeKind {
        RuntimeKind::Process
    }

    fn reserve(&self, id: Uuid, listen: &Listen) -> Result<Endpoint, RuntimeError> {
        self.endpoints.reserve(id, listen, HOST)
    }

    fn can_enforce(&self, limits: &super::Limits) -> Result<(), RuntimeError> {
        Ok(self.limit_groups.check(limits)?)
    }

    fn release(&self, id: Uuid) {
        self.endpoints.release(id);
    }

    fn start(&self, spec: LaunchSpec) -> BoxFuture<'_, Result<Started, RuntimeError>> {
        async move {
            let id = spec.deployment_id;
            let endpoint = self.reserve(id, &spec.listen)?;
            let spec = match &endpoint {
                Endpoint::Tcp { port, .. } => spec.with_port(*port),
                Endpoint::Unix(_) => spec,
            };
            let Spawned {
                pid,
                cgroup: cgroup_dir,
                limits,
                mut child,
            } = self.spawn(&spec)?;
            // Read before anything can reap the child, so it names this process.
            let process = ProcessId {
                pid,
                start_time: super::process_start_time(pid),
            };
            let (tx, rx) = watch::channel(None);
            self.state().instances.insert(
                id,
                Arc::new(Instance {
                    pid,
                    cgroup: cgroup_dir.clone(),
                    limits: limits.clone(),
                    stop: spec.stop,
                    exit: rx,
                }),
            );
            tokio::spawn(async move {
                let mut exit = match child.wait().await {
                    Ok(status) => ExitInfo::from(status),
                    Err(e) => {
                        tracing::error!(deployment = %id, error = %e, "Lost track of process");
                        ExitInfo::default()
                    }
                };
                // Before anything removes the memory group, whose counter says.
                exit.oom_limit = limits.oom_limit(&exit).await;
                reap_tree(cgroup_dir.as_deref(), pid);
                let _ = tx.send(Some(exit));
            });
            Ok(Started {
                instance: InstanceRef::Process {
                    pid: process.pid,
                    start_time: process.start_time,
                    port: endpoint.port(),
                    socket: match &endpoint {
                        Endpoint::Unix(path) => Some(path.clone()),
                        Endpoint::Tcp { .. } => None,
                    },
                },
                endpoint,
            })
        }
        .boxed()
    }

    fn adopt(
        &self,
        id: Uuid,
        instance: &InstanceRef,
        stop: StopMode,
    ) -> BoxFuture<'_, Option<Endpoint>> {
        // Nothing here waits: /proc and the cgroup are read at once.
        futures_util::future::ready(self.adopt_now(id, instance, stop)).boxed()
    }

    fn wait(&self, id: Uuid) -> BoxFuture<'_, Result<ExitInfo, RuntimeError>> {
        async move {
            let inst = self.get(id).ok_or(RuntimeError::UnknownInstance(id))?;
            Ok(super::exit_from(inst.exit.clone()).await)
        }
        .boxed()
    }

    fn stop(
        &self,
        id: Uuid,
        grace: Duration,
    ) -> BoxFuture<'_, Result<Option<ExitInfo>, RuntimeError>> {
        async move {
            let Some(inst) = self.get(id) else {
                return Ok(None);
            };
            let exit = Self::stop_instance(&inst, grace).await?;
            self.state().instances.remove(&id);
            Ok(Some(exit))
        }
        .boxed()
    }

    fn usage(&self, id: Uuid) -> BoxFuture<'_, Option<Usage>> {
        let inst = self.get(id);
        async move {
            let inst = inst?;
            let tree = inst.tree();
            let (cpu_seconds, memory_bytes) = usage_of(&tree);
            Some(Usage {
                cpu_seconds,
                memory_bytes,
                processes: tree.len(),
                open_fds: Some(open_fds(&tree)),
                uptime_seconds: uptime_seconds(inst.pid),
            })
        }
        .boxed()
    }

    fn logs(&self, id: Uuid, tail: usize, until: Option<BoxFuture<'static, ()>>) -> LogStream {
        follow_file(self.log_path(id), tail, until).boxed()
    }

    fn sweep<'a>(&'a self, _adopted: &'a HashSet<Uuid>) -> BoxFuture<'a, Vec<Uuid>> {
        self.sweep_orphans().boxed()
    }

    fn log_file(&self, id: Uuid) -> Option<PathBuf> {
        Some(self.log_path(id))
    }

    fn host_ports(&self) -> Option<super::PortUse> {
        Some(self.endpoints.port_use())
    }

    fn logs_tail(&self, id: Uuid, lines: usize) -> BoxFuture<'_, String> {
        let path = self.log_path(id);
        async move {
            // Called when a server has just ended: its log writer may still be writing its
            // last words.
            settled(&path).await;
            tokio::task::spawn_blocking(move || tail(&path, lines, 8192))
                .await
                .unwrap_or_default()
        }
        .boxed()
    }
}

/// Waits until a log file stops growing (two equal sizes 5 ms apart, 200 ms at most): a log
/// writer reads a server's last words off its pipe within microseconds of its exit, and they
/// belong in what is quoted or sent.
async fn settled(path: &Path) {
    let mut last = None;
    for _ in 0..40 {
        let len = std::fs::metadata(path).map(|m| m.len()).ok();
        if len.is_some() && len == last {
            return;
        }
        last = len;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Longest stretch of a log read in one go (the tail, or a chunk of followed output).
const LOG_CHUNK: u64 = 4 * 1024 * 1024;

/// A log file's last `lines` lines, then, with `until`, what is appended to it (polled every
/// 200 ms; rotation is followed since a shrunk file is read from its start), until `until`
/// resolves and the file has stopped growing and been read to its end.
fn follow_file(
    path: PathBuf,
    lines: usize,
    until: Option<BoxFuture<'static, ()>>,
) -> impl futures_util::Stream<Item = std::io::Result<Bytes>> + Send + 'static {
    struct Follow {
        path: PathBuf,
        at: u64,
        tail: Option<usize>,
        until: Option<BoxFuture<'static, ()>>,
        ended: bool,
    }
    let state = Follow {
        path,
        at: 0,
        tail: Some(lines),
        until,
        ended: false,
    };
    futures_util::stream::unfold(Some(state), |st| async move {
        let mut st = st?;
        if let Some(lines) = st.tail.take() {
            let p = st.path.clone();
            let (mut text, end) =
                tokio::task::spawn_blocking(move || tail_with_end(&p, lines, LOG_CHUNK))
                    .await
                    .unwrap_or_default();
            if !text.is_empty() {
                text.push('\n');
            }
            st.at = end;
            let next = st.until.is_some().then_some(st);
            return Some((Ok(Bytes::from(text)), next));
        }
        loop {
            let (p, at) = (st.path.clone(), st.at);
            let (chunk, next) = tokio::task::spawn_blocking(move || read_from(&p, at, LOG_CHUNK))
                .await
                .unwrap_or((Vec::new(), at));
            if !chunk.is_empty() {
                st.at = next;
                return Some((Ok(Bytes::from(chunk)), Some(st)));
            }
            if st.ended {
                return None;
            }
            let until = st.until.as_mut()?;
            tokio::select! {
                () = until => {
                    st.ended = true;
                    settled(&st.path).await;
                }
                () = tokio::time::sleep(Duration::from_millis(200)) => {}
            }
        }
    })
}

/// CPU seconds and resident bytes of a set of processes, from /proc (gone ones count zero).
pub fn usage_of(pids: &[u32]) -> (f64, u64) {
    let ticks = rustix::param::clock_ticks_per_second().max(1);
    let page = u64::try_from(rustix::param::page_size()).unwrap_or(4096);
    let (mut cpu_ticks, mut rss_pages) = (0u64, 0u64);
    for pid in pids {
        if let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            && let Some(i) = stat.rfind(')')
        {
            let f: Vec<&str> = stat[i + 1..].split_whitespace().collect();
            // Counted from the state (field 3): utime 14, stime 15, rss 24.
            let num = |k: usize| f.get(k).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
            cpu_ticks += num(11) + num(12);
            rss_pages += num(21);
        }
    }
    (cpu_ticks as f64 / ticks as f64, rss_pages * page)
}

/// Open file descriptors of a set of processes.
fn open_fds(pids: &[u32]) -> usize {
    pids.iter()
        .filter_map(|p| std::fs::read_dir(format!("/proc/{p}/fd")).ok())
        .map(|d| d.count())
        .sum()
}

/// Seconds since process `pid` started, from its start time and the system's uptime.
fn uptime_seconds(pid: u32) -> Option<f64> {
    let start_ticks = super::process_start_time(pid)?;
    let ticks = rustix::param::clock_ticks_per_second().max(1);
    let up: f64 = std::fs::read_to_string("/proc/uptime")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some((up - start_ticks as f64 / ticks as f64).max(0.0))
}

/// The last `lines` lines of a file, reading at most `max_bytes` from its end.
pub fn tail(path: &Path, lines: usize, max_bytes: u64) -> String {
    tail_with_end(path, lines, max_bytes).0
}

/// [`tail`], and the file offset it read up to (where following the file goes on from).
pub fn tail_with_end(path: &Path, lines: usize, max_bytes: u64) -> (String, u64) {
    let Ok(mut f) = std::fs::File::open(path) else {
        return (String::new(), 0);
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    (tail_of(&mut f, len, lines, max_bytes), len)
}

/// Bytes `from..` of a file as they are now, at most `max` of them, and the offset reached.
pub fn read_from(path: &Path, from: u64, max: u64) -> (Vec<u8>, u64) {
    let Ok(mut f) = std::fs::File::open(path) else {
        return (Vec::new(), from);
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    // A file that shrank (rotated or truncated) is read again from its start.
    let from = if len < from { 0 } else { from };
    if f.seek(SeekFrom::Start(from)).is_err() {
        return (Vec::new(), from);
    }
    let mut buf = Vec::new();
    let n = (&mut f).take(max).read_to_end(&mut buf).unwrap_or(0);
    (buf, from + n as u64)
}

fn tail_of(f: &mut std::fs::File, len: u64, lines: usize, max_bytes: u64) -> String {
    let start = len.saturating_sub(max_bytes);
    if f.seek(SeekFrom::Start(start)).is_err() {
        return String::new();
    }
    let mut buf = Vec::new();
    if f.take(len - start).read_to_end(&mut buf).is_err() {
        return String::new();
    }
    let text = String::from_utf8_lossy(&buf);
    let all: Vec<&str> = text.lines().collect();
    // Drop a first line cut in the middle by the byte window.
    let skip = usize::from(start > 0 && all.len() > 1);
    let from = all.len().saturating_sub(lines).max(skip);
    all[from..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A host with no controller for a limit: the deploy's check and the start itself both
    /// refuse, naming it, and nothing runs (never silently unlimited).
    #[tokio::test]
    async fn a_limit_no_controller_can_enforce_is_refused_and_nothing_starts() {
        let logs = tempfile::tempdir().unwrap();
        let range = crate::ports::PortRange::new(47100, 47109).unwrap();
        let runtime = ProcessRuntime::new(
            Placement {
                tracking: TreeTracking::ProcessGroup,
                limits: LimitGroups::unavailable("no cgroup controllers on this test host"),
                shim: PathBuf::from("/bin/false"),
            },
            logs.path().to_owned(),
            Arc::new(PortAllocator::new(range)),
        );
        let limits = super::super::Limits {
            memory: Some(super::super::limits::Bytes(64 << 20)),
            ..Default::default()
        };
        let refusal = runtime.can_enforce(&limits).unwrap_err().to_string();
        assert!(
            refusal.contains("memory limit cannot be enforced")
                && refusal.contains("no cgroup controllers"),
            "{refusal}"
        );
        let id = Uuid::new_v4();
        let spec = LaunchSpec {
            deployment_id: id,
            program: "/bin/sleep".into(),
            args: vec!["600".into()],
            env: Vec::new(),
            secret_env: Vec::new(),
            working_dir: None,
            stop: StopMode::Tree,
            listen: Listen::Port {
                env: None,
                prefer: None,
            },
            container: None,
            limits,
        };
        let err = runtime.start(spec).await.unwrap_err();
        assert!(matches!(err, RuntimeError::Limits(_)), "{err}");
        assert!(runtime.get(id).is_none(), "an instance was recorded");
        assert!(runtime.can_enforce(&Default::default()).is_ok());
    }

    #[test]
    fn own_process_usage_is_read() {
        let (cpu, rss) = super::usage_of(&[std::process::id()]);
        assert!(cpu >= 0.0);
        assert!(rss > 1024 * 1024, "{rss}");
    }
}
