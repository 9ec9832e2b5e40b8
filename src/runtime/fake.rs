//! A runtime without processes, for unit tests of the supervisor: an instance is an entry in a
//! map that "exits" when the test says so. Real processes are tested in `tests/`.

use std::{
    collections::{HashMap, HashSet},
    path::PathBuf,
    sync::Mutex,
    time::Duration,
};

use futures_util::future::BoxFuture;
use tokio::{sync::watch, time::Instant};
use uuid::Uuid;

use super::{
    Endpoint, ExitInfo, InstanceRef, LaunchSpec, Listen, LogStream, Runtime, RuntimeError,
    RuntimeKind, Started, StopMode, Usage,
};

/// What a stop reports for an instance that was still running.
pub const STOPPED: ExitInfo = ExitInfo {
    code: None,
    signal: Some(15),
    oom_limit: None,
};

#[derive(Default)]
pub struct FakeRuntime {
    state: Mutex<State>,
    /// Bumped on every start, so a test can wait for the next one.
    started: watch::Sender<usize>,
}

#[derive(Default)]
struct State {
    /// The current instance of each deployment: its exit, once it has one.
    instances: HashMap<Uuid, watch::Sender<Option<ExitInfo>>>,
    /// Every start, with the (paused) clock's time.
    starts: Vec<(Uuid, Instant)>,
    /// Deployments whose instance `adopt` recognises.
    adoptable: HashSet<Uuid>,
    /// Instances started from now on exit at once, like a server that cannot start.
    exit_on_start: Option<ExitInfo>,
    /// A controller this host lacks: limits are refused, as a host without it does.
    missing_controller: Option<&'static str>,
    next_pid: u32,
}

impl FakeRuntime {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// From now on, refuses any limits as a host without `controller` does.
    pub fn lack_controller(&self, controller: &'static str) {
        self.state().missing_controller = Some(controller);
    }

    /// Makes the deployment's current instance exit.
    pub fn exit(&self, id: Uuid, exit: ExitInfo) {
        if let Some(tx) = self.state().instances.get(&id) {
            tx.send_replace(Some(exit));
        }
    }

    /// `Some`: every instance started from now on exits at once with this; `None`: they run.
    pub fn exit_on_start(&self, exit: Option<ExitInfo>) {
        self.state().exit_on_start = exit;
    }

    /// Whether `adopt` takes the deployment's instance as still its own.
    pub fn set_adoptable(&self, id: Uuid, adoptable: bool) {
        let mut state = self.state();
        if adoptable {
            state.adoptable.insert(id);
        } else {
            state.adoptable.remove(&id);
        }
    }

    /// When each start of the deployment happened.
    pub fn starts(&self, id: Uuid) -> Vec<Instant> {
        self.state()
            .starts
            .iter()
            .filter(|(d, _)| *d == id)
            .map(|(_, at)| *at)
            .collect()
    }

    /// Starts of every deployment so far.
    pub fn start_count(&self) -> usize {
        *self.started.borrow()
    }

    /// Resolves once `n` starts (of any deployment) have happened.
    pub async fn wait_starts(&self, n: usize) {
        let mut rx = self.started.subscribe();
        let _ = rx.wait_for(|c| *c >= n).await;
    }
}

/// Nothing listens anywhere: the endpoint only has to be well-formed (probes are scripted).
fn endpoint(listen: &Listen) -> Endpoint {
    match listen {
        Listen::Port { prefer, .. } => Endpoint::Tcp {
            host: "127.0.0.1".to_owned(),
            port: prefer.unwrap_or(47_100),
        },
        Listen::Socket(path) => Endpoint::Unix(path.clone()),
    }
}

impl Runtime for FakeRuntime {
    fn kind(&self) -> RuntimeKind {
        RuntimeKind::Process
    }

    fn reserve(&self, _id: Uuid, listen: &Listen) -> Result<Endpoint, RuntimeError> {
        Ok(endpoint(listen))
    }

    fn can_enforce(&self, limits: &super::Limits) -> Result<(), RuntimeError> {
        match self.state().missing_controller {
            Some(controller) if !limits.is_none() => {
                Err(super::cgroup_limits::LimitError::Missing {
                    controller,
                    why: "the fake host has none".into(),
                }
                .into())
            }
            _ => Ok(()),
        }
    }

    fn release(&self, _id: Uuid) {}

    fn start(&self, spec: LaunchSpec) -> BoxFuture<'_, Result<Started, RuntimeError>> {
        let id = spec.deployment_id;
        let endpoint = endpoint(&spec.listen);
        let instance = {
            let mut state = self.state();
            state.next_pid += 1;
            let exit = state.exit_on_start;
            state.instances.insert(id, watch::Sender::new(exit));
            state.starts.push((id, Instant::now()));
            InstanceRef::Process {
                pid: state.next_pid,
                start_time: Some(1),
                port: endpoint.port(),
                socket: None,
            }
        };
        self.started.send_modify(|n| *n += 1);
        Box::pin(async move { Ok(Started { instance, endpoint }) })
    }

    fn adopt(
        &self,
        id: Uuid,
        instance: &InstanceRef,
        _stop: StopMode,
    ) -> BoxFuture<'_, Option<Endpoint>> {
        let adopted = (|| {
            let InstanceRef::Process { port, .. } = instance else {
                return None;
            };
            let mut state = self.state();
            if !state.adoptable.contains(&id) {
                return None;
            }
            state
                .instances
                .entry(id)
                .or_insert_with(|| watch::Sender::new(None));
            Some(endpoint(&Listen::Port {
                env: None,
                prefer: *port,
            }))
        })();
        Box::pin(std::future::ready(adopted))
    }

    fn wait(&self, id: Uuid) -> BoxFuture<'_, Result<ExitInfo, RuntimeError>> {
        let rx = self
            .state()
            .instances
            .get(&id)
            .map(watch::Sender::subscribe);
        Box::pin(async move {
            let mut rx = rx.ok_or(RuntimeError::UnknownInstance(id))?;
            // A replaced instance (a restart) counts as ended.
            let exit = rx
                .wait_for(Option::is_some)
                .await
                .map(|e| e.unwrap_or_default())
                .unwrap_or_default();
            Ok(exit)
        })
    }

    fn stop(
        &self,
        id: Uuid,
        _grace: Duration,
    ) -> BoxFuture<'_, Result<Option<ExitInfo>, RuntimeError>> {
        let exit = self.state().instances.get(&id).map(|tx| {
            tx.send_if_modified(|e| {
                let running = e.is_none();
                if running {
                    *e = Some(STOPPED);
                }
                running
            });
            tx.borrow().unwrap_or(STOPPED)
        });
        Box::pin(async move { Ok(exit) })
    }

    fn usage(&self, _id: Uuid) -> BoxFuture<'_, Option<Usage>> {
        Box::pin(async { None })
    }

    fn logs_tail(&self, _id: Uuid, _lines: usize) -> BoxFuture<'_, String> {
        Box::pin(async { String::new() })
    }

    fn logs(&self, _id: Uuid, _tail: usize, _until: Option<BoxFuture<'static, ()>>) -> LogStream {
        Box::pin(futures_util::stream::empty())
    }

    fn sweep<'a>(
        &'a self,
        _adopted: &'a std::collections::HashSet<Uuid>,
    ) -> BoxFuture<'a, Vec<Uuid>> {
        Box::pin(async { Vec::new() })
    }

    fn log_file(&self, _id: Uuid) -> Option<PathBuf> {
        None
    }
}
