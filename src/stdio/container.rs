//! A stdio server process as a container (`runtime = "docker"`, `transport = "stdio"`): the
//! bridge creates one through the engine for each server process it would start, attaches to
//! its stdin, stdout and stderr, and hands those to the same relay a piped process has
//! ([`super::child`]).
//!
//! Invariants:
//! - Attached before it starts, so no early output is lost; `StdinOnce`: when the bridge's
//!   attach connection ends (the bridge stopped or was killed), the server's stdin closes, and
//!   a stdio server exits at the end of its input. `AutoRemove`: an ended container is gone.
//! - Labelled with the node, deployment and tool like a deployment's container, plus
//!   [`ROLE_LABEL`]` = `[`STDIO_ROLE`], so Switchboard's sweep keeps it while its deployment
//!   is supervised and removes it otherwise; a bridge that starts removes what an earlier
//!   bridge of its deployment left.
//! - The tool's secure defaults and limits apply to each container (the HostConfig the docker
//!   runtime builds for a deployment's container). Nothing is published: a stdio server
//!   listens nowhere. The network is the tool's (`bridge` by default: outbound only, which
//!   servers that fetch or call APIs need; `none` shuts it off).
//! - Environment values come from the bridge's own environment, by the names its
//!   `--container` option lists: secrets never reach a command line.

use std::{pin::Pin, sync::Arc, time::Duration};

use bollard::{
    Docker,
    errors::Error as DockerError,
    query_parameters::{
        AttachContainerOptionsBuilder, CreateContainerOptionsBuilder, EventsOptionsBuilder,
        KillContainerOptionsBuilder, WaitContainerOptionsBuilder,
    },
};
use futures_util::StreamExt as _;
use tokio::io::AsyncWriteExt as _;

use super::child::Io;
use crate::runtime::{
    ExitInfo, LaunchSpec, Listen, StopMode,
    container::StdioContainers,
    docker::{self, DEPLOYMENT_LABEL, DockerRuntime, NODE_LABEL, ROLE_LABEL, STDIO_ROLE},
};

/// How long an ended server's container may take to be removed (its exit code comes with the
/// removal) before the bridge removes it itself.
const REMOVAL_WAIT: Duration = Duration::from_secs(10);
/// How long after a killed server's removal its `oom` event may still be on its way.
const OOM_EVENT_WAIT: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    #[error("cannot reach the container engine: {0}")]
    Engine(#[source] DockerError),
    #[error("{0}")]
    Runtime(#[from] crate::runtime::RuntimeError),
    #[error("the container engine refused the server's container: {0}")]
    Refused(#[source] DockerError),
}

/// The engine and everything each server container of one deployment is made from.
pub struct Containers {
    docker: Docker,
    config: StdioContainers,
    /// The launch each container is made from (the tool's command, arguments and
    /// environment), as the docker runtime reads a deployment's.
    spec: LaunchSpec,
}

impl std::fmt::Debug for Containers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Containers")
            .field("image", &self.config.launch.image)
            .field("deployment", &self.config.deployment)
            .finish_non_exhaustive()
    }
}

/// A started server container (its streams are handed out beside it).
pub struct Running {
    pub id: String,
    /// The host pid of its main process (its init's, with `init`): what the bridge reports
    /// for it, as it reports a piped process's pid.
    pub pid: u32,
    /// Resolves with the exit code once the container is removed (`None`: unknown).
    removed: tokio::task::JoinHandle<Option<i64>>,
    /// Resolves true if the kernel killed the server for its memory limit: the engine's `oom`
    /// event, watched from before the start because `AutoRemove` leaves nothing to inspect.
    oom: Option<tokio::task::JoinHandle<bool>>,
    memory_limit: Option<u64>,
    docker: Docker,
}

impl Containers {
    /// Connects to the engine. `program` and `args` are the tool's command (empty: the
    /// image's entrypoint and command); the environment named by `config.env` is read from
    /// this process's.
    pub async fn connect(
        config: StdioContainers,
        program: &str,
        args: &[String],
    ) -> Result<Arc<Containers>, ContainerError> {
        let docker = docker::connect(config.engine.as_deref())
            .await
            .map_err(ContainerError::Engine)?;
        docker.ping().await.map_err(ContainerError::Engine)?;
        let env = config
            .env
            .iter()
            .filter_map(|k| std::env::var(k).ok().map(|v| (k.clone(), v)))
            .collect();
        let spec = LaunchSpec {
            deployment_id: config.deployment,
            program: program.to_owned(),
            args: args.to_vec(),
            // All in `secret_env`: the body puts both in the environment alike, and nothing
            // here is ever logged.
            env: Vec::new(),
            secret_env: env,
            working_dir: config.working_dir.clone(),
            stop: StopMode::MainFirst,
            listen: Listen::Socket(std::path::PathBuf::new()),
            container: Some(config.launch.clone()),
            limits: config.limits,
        };
        DockerRuntime::ensure_image(&docker, &config.launch).await?;
        Ok(Arc::new(Containers {
            docker,
            config,
            spec,
        }))
    }

    /// What the image is, for messages.
    pub fn image(&self) -> &str {
        &self.config.launch.image
    }

    /// Sends `signal` to a container's main process (its init, which passes it on), in the
    /// background: a container already gone is fine.
    pub fn signal(&self, id: &str, signal: nix::sys::signal::Signal) {
        let (docker, id) = (self.docker.clone(), id.to_owned());
        tokio::spawn(async move {
            let _ = docker
                .kill_container(
                    &id,
                    Some(
                        KillContainerOptionsBuilder::new()
                            .signal(signal.as_str())
                            .build(),
                    ),
                )
                .await;
        });
    }

    /// Removes the server containers of this deployment that an earlier bridge left (it was
    /// killed, and its servers did not exit at the end of their input). Only this node's
    /// containers with this deployment's label and the stdio role are listed.
    pub async fn remove_leftovers(&self) -> usize {
        let labels = vec![
            format!("{NODE_LABEL}={}", self.config.node),
            format!("{DEPLOYMENT_LABEL}={}", self.config.deployment),
            format!("{ROLE_LABEL}={STDIO_ROLE}"),
        ];
        let listed = match docker::labelled(&self.docker, labels).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "Cannot list the server containers an earlier bridge left");
                return 0;
            }
        };
        let mut removed = 0;
        for id in listed.into_iter().filter_map(|c| c.id) {
            tracing::warn!(container = %id, "Removing a server container an earlier bridge of this deployment left");
            match DockerRuntime::remove(&self.docker, &id).await {
                Ok(()) => removed += 1,
                Err(e) => tracing::warn!(container = %id, error = %e, "Cannot remove it"),
            }
        }
        removed
    }

    /// Creates a server container, attaches to it and starts it.
    pub(super) async fn start(&self) -> Result<(Running, Io), ContainerError> {
        let mut body =
            docker::create_body(&self.config.node, &self.spec, &self.config.launch, None);
        if let Some(labels) = body.labels.as_mut() {
            labels.insert(ROLE_LABEL.to_owned(), STDIO_ROLE.to_owned());
        }
        body.open_stdin = Some(true);
        body.stdin_once = Some(true);
        body.attach_stdin = Some(true);
        body.attach_stdout = Some(true);
        body.attach_stderr = Some(true);
        body.tty = Some(false);
        if let Some(host) = body.host_config.as_mut() {
            host.auto_remove = Some(true);
        }
        let created = self
            .docker
            .create_container(Some(CreateContainerOptionsBuilder::new().build()), body)
            .await
            .map_err(ContainerError::Refused)?;
        let id = created.id;
        match self.attach_and_start(&id).await {
            Ok(r) => Ok(r),
            Err(e) => {
                // Never started, so never auto-removed.
                let _ = DockerRuntime::remove(&self.docker, &id).await;
                Err(e)
            }
        }
    }

    async fn attach_and_start(&self, id: &str) -> Result<(Running, Io), ContainerError> {
        // The exit code is told by the wait, asked before the start so it cannot miss the
        // exit; "removed": once it answers, the container is gone too.
        let removed = {
            let mut wait = self.docker.wait_container(
                id,
                Some(
                    WaitContainerOptionsBuilder::new()
                        .condition("removed")
                        .build(),
                ),
            );
            tokio::spawn(async move {
                match wait.next().await {
                    Some(Ok(r)) => Some(r.status_code),
                    Some(Err(DockerError::DockerContainerWaitError { code, .. })) => Some(code),
                    _ => None,
                }
            })
        };
        // Only a limited container can be killed for its memory: no stream for the others.
        let memory_limit = self.spec.limits.memory.map(|m| m.0);
        let oom = memory_limit.map(|_| {
            let filters = std::collections::HashMap::from([
                ("type", vec!["container".to_owned()]),
                ("event", vec!["oom".to_owned()]),
                ("container", vec![id.to_owned()]),
            ]);
            let mut events = self
                .docker
                .events(Some(EventsOptionsBuilder::new().filters(&filters).build()));
            tokio::spawn(async move { matches!(events.next().await, Some(Ok(_))) })
        });
        // JSON-RPC lines never hold a raw control character (JSON escapes them), so the
        // engine's detach keys (Ctrl-P Ctrl-Q) cannot appear in what the bridge writes.
        let attached = self
            .docker
            .attach_container(
                id,
                Some(
                    AttachContainerOptionsBuilder::new()
                        .stdin(true)
                        .stdout(true)
                        .stderr(true)
                        .stream(true)
                        .build(),
                ),
            )
            .await
            .map_err(ContainerError::Refused)?;
        self.docker
            .start_container(id, None)
            .await
            .map_err(ContainerError::Refused)?;
        let pid = self
            .docker
            .inspect_container(id, None)
            .await
            .ok()
            .and_then(|i| i.state?.pid)
            .and_then(|p| u32::try_from(p).ok())
            .unwrap_or(0);
        let (stdout, stderr) = demux(attached.output);
        let running = Running {
            id: id.to_owned(),
            pid,
            removed,
            oom,
            memory_limit,
            docker: self.docker.clone(),
        };
        let io = Io {
            stdin: attached.input,
            stdout: Box::pin(stdout),
            stderr: Box::pin(stderr),
        };
        Ok((running, io))
    }
}

/// The engine's multiplexed output as two byte streams: stdout and stderr, each ending when
/// the attach stream does.
fn demux(
    mut output: Pin<
        Box<
            dyn futures_util::Stream<Item = Result<bollard::container::LogOutput, DockerError>>
                + Send,
        >,
    >,
) -> (tokio::io::DuplexStream, tokio::io::DuplexStream) {
    use bollard::container::LogOutput;
    let (mut out_w, out_r) = tokio::io::duplex(64 * 1024);
    let (mut err_w, err_r) = tokio::io::duplex(64 * 1024);
    tokio::spawn(async move {
        // A reader that went away stops only its own stream: the server's stderr must keep
        // flowing while its stdout is read, and the other way round.
        let (mut out_ok, mut err_ok) = (true, true);
        while let Some(frame) = output.next().await {
            match frame {
                Ok(LogOutput::StdOut { message } | LogOutput::Console { message }) => {
                    out_ok = out_ok && out_w.write_all(&message).await.is_ok();
                }
                Ok(LogOutput::StdErr { message }) => {
                    err_ok = err_ok && err_w.write_all(&message).await.is_ok();
                }
                Ok(LogOutput::StdIn { .. }) => {}
                Err(e) => {
                    tracing::debug!(error = %e, "A server container's output stream broke");
                    break;
                }
            }
        }
    });
    (out_r, err_r)
}

impl Running {
    /// How the server ended, once its output has closed: its exit code when the engine
    /// removes the container; one still there after [`REMOVAL_WAIT`] is removed here (killed).
    pub async fn ended(self) -> ExitInfo {
        let Running {
            id,
            mut removed,
            oom,
            memory_limit,
            docker,
            ..
        } = self;
        let code = match tokio::time::timeout(REMOVAL_WAIT, &mut removed).await {
            Ok(code) => code.ok().flatten(),
            Err(_) => {
                removed.abort();
                if let Err(e) = DockerRuntime::remove(&docker, &id).await {
                    tracing::warn!(container = %id, error = %e, "Cannot remove an ended server container");
                }
                None
            }
        };
        let mut exit = docker::exit_info(code);
        if let Some(mut oom) = oom {
            // The engine sends `oom` before the kill's `die`, so by the removal it was sent;
            // a moment for the stream to deliver it, only when a kill could be one.
            let killed = exit.signal == Some(9)
                && matches!(
                    tokio::time::timeout(OOM_EVENT_WAIT, &mut oom).await,
                    Ok(Ok(true))
                );
            oom.abort();
            if killed {
                exit.oom_limit = memory_limit.map(crate::runtime::limits::Bytes);
            }
        }
        exit
    }
}
