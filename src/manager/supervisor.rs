//! The supervisor: the one task per live deployment that runs its processes, from the first
//! spawn (or adoption) to a final status: readiness probes, health checks with thresholds,
//! restarts with backoff under the tool's restart policy, and the FAILED record when it gives up.

use std::{sync::Arc, time::Duration};

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::{Manager, install::InstallError};
use crate::{
    deployment::{DeploymentStatus, ExitInfo, HealthStatus},
    events::EventKind,
    health::{HealthCheckResult, Prober},
    proxy::routes::Backend,
    registry::{Tool, ToolSpec, UnreadableSecrets},
    restart::{Backoff, Ending},
    runtime::{Endpoint, RuntimeError, RuntimeKind, container::Network},
};

/// Lines of a failed server's log quoted in its record's `error`.
const LOG_LINES_IN_ERROR: usize = 20;
/// Longest single wait for a readiness probe answer.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// Where and how a deployment's health is probed.
pub(super) struct ProbeTarget {
    prober: Prober,
    url: String,
    /// A plain HTTP health URL, probed instead of the MCP endpoint when present.
    plain: Option<String>,
}

/// Where a supervisor picks up.
pub(super) enum Start {
    /// The tool's package must be installed (if it is not yet), then the process spawned.
    Install,
    /// The process was just spawned.
    Spawned,
    /// An earlier Switchboard's process, adopted; the record's status.
    Adopted(DeploymentStatus),
    /// The process is gone; start it again, for this reason. `ran`: the record was RUNNING.
    Restart { why: RestartCause, ran: bool },
}

/// Why a supervisor restarts its deployment: the record's `last_exit` and the event's reason.
#[derive(Debug, Clone)]
pub(super) enum RestartCause {
    /// Its process ended, with the server's last log line (which usually says why: a missing
    /// file, a bad flag).
    Ended {
        ending: Ending,
        last_line: Option<String>,
    },
    /// Switchboard found the process gone at start, in the record's words.
    FoundGone(String),
}

impl std::fmt::Display for RestartCause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RestartCause::Ended {
                ending,
                last_line: None,
            } => write!(f, "{ending}"),
            RestartCause::Ended {
                ending,
                last_line: Some(line),
            } => write!(f, "{ending}; last log line: {line}"),
            RestartCause::FoundGone(why) => f.write_str(why),
        }
    }
}

/// Why a supervisor gave its deployment up: the FAILED record's `error` (before the log lines
/// quoted with it).
#[derive(Debug, thiserror::Error)]
pub(super) enum Failure {
    /// The runtime could not start the process.
    #[error(transparent)]
    Spawn(#[from] RuntimeError),
    /// The tool's package could not be installed.
    #[error(transparent)]
    Install(#[from] InstallError),
    /// Its secrets do not decrypt with this Switchboard's key: no restart can help.
    #[error(transparent)]
    Secrets(#[from] UnreadableSecrets),
    /// It ended, and its restart policy does not restart it.
    #[error("{0}")]
    Ended(Ending),
    /// It never became RUNNING in `failed_starts` starts in a row.
    #[error(
        "{ending}; gave up after {failed_starts} failed start(s) without ever becoming RUNNING \
         (restart.max_start_failures = {limit})"
    )]
    GaveUp {
        ending: Ending,
        failed_starts: u32,
        limit: u32,
    },
}

impl Manager {
    /// How a deployment is probed: its MCP endpoint (or plain health path) over TCP, or, for a
    /// stdio deployment, the bridge's `/health` on its socket (a probe on the server's pipe).
    pub(super) fn probe_target(&self, endpoint: &Endpoint, spec: &ToolSpec) -> ProbeTarget {
        let base = match endpoint {
            Endpoint::Unix(socket) => {
                return ProbeTarget {
                    prober: Prober::unix(socket),
                    url: "http://bridge/mcp".to_owned(),
                    plain: Some("http://bridge/health".to_owned()),
                };
            }
            // The server itself, not the record's endpoint_url (which goes through the proxy).
            Endpoint::Tcp { host, port } => format!("http://{host}:{port}"),
        };
        ProbeTarget {
            prober: self.prober.clone(),
            url: format!("{base}{}", spec.endpoint_path),
            plain: spec.health.http_path.as_ref().map(|p| format!("{base}{p}")),
        }
    }

    /// The one task that runs a deployment's processes, from the first spawn (or adoption) to
    /// a final status: readiness, health, restarts. Returns at once when `cancel` fires; the
    /// canceller then owns the process.
    pub(super) async fn supervise(
        self: Arc<Self>,
        id: Uuid,
        tool: Tool,
        endpoint: Endpoint,
        backend: Arc<Backend>,
        start: Start,
        cancel: CancellationToken,
    ) {
        let tool = tokio::select! {
            _ = cancel.cancelled() => return,
            t = self.install_package(id, tool) => t,
        };
        let (tool, start) = match (tool, start) {
            (Ok(tool), Start::Install) => {
                if let Err(e) = self.spawn_process(id, &tool.spec).await {
                    tracing::warn!(deployment = %id, error = %e, "Deployment could not start");
                    self.fail(id, None, e).await;
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
                self.fail(id, None, e.into()).await;
                return;
            }
        };
        let spec = &tool.spec;
        let target = self.probe_target(&endpoint, spec);
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
                self.fail(id, ending.exit(), Failure::Ended(ending)).await;
                return;
            }
            let limit = spec.restart.max_start_failures;
            if !has_run && failed_starts >= limit {
                let exit = ending.exit();
                let why = Failure::GaveUp {
                    ending,
                    failed_starts,
                    limit,
                };
                self.fail(id, exit, why).await;
                return;
            }
            tracing::warn!(deployment = %id, tool = %spec.slug, reason = %ending, "Deployment ended; restarting per its policy");
            // The server's last words usually say why (a missing file, a bad flag).
            let last_line = self.runtimes.of(id).logs_tail(id, 1).await;
            let last_line = Some(last_line.trim().to_owned()).filter(|l| !l.is_empty());
            pending_restart = Some(RestartCause::Ended { ending, last_line });
        }
    }

    /// One process's life: readiness (unless it already runs), then health checks until it
    /// exits or fails them. Says how it ended and whether it was RUNNING (a failed start is
    /// not).
    pub(super) async fn run_once(
        &self,
        id: Uuid,
        spec: &ToolSpec,
        target: &ProbeTarget,
        backend: &Arc<Backend>,
        already_running: bool,
    ) -> (Ending, bool) {
        let runtime = self.runtimes.of(id);
        let exit = runtime.wait(id);
        tokio::pin!(exit);
        if !already_running {
            let startup = Duration::from_millis(spec.startup_timeout_ms);
            let ready = tokio::select! {
                e = &mut exit => return (Ending::Exited(e.unwrap_or_default()), false),
                r = self.wait_ready(target, startup) => r,
            };
            if let Err(mut not_ready) = ready {
                // The mistake every first container makes: a server bound to the container's
                // own loopback cannot be reached through the published port.
                if let Ending::NotReady { last_probe, .. } = &mut not_ready
                    && spec.runtime == RuntimeKind::Docker
                    && spec.network == Network::Bridge
                {
                    last_probe.push_str(
                        " (a server in a container is reached through its published port: \
                         if it listens on 127.0.0.1 inside the container, make it listen on \
                         0.0.0.0)",
                    );
                }
                return (not_ready, false);
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
                    self.route(&l.slug, backend, id);
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
                    self.route(&l.slug, backend, id);
                }
            }
        }
        let ending = tokio::select! {
            e = &mut exit => Ending::Exited(e.unwrap_or_default()),
            unhealthy = self.watch_health(id, spec, target, backend) => unhealthy,
        };
        (ending, true)
    }

    /// Checks health every interval; returns (with the last error) when the failure threshold
    /// is reached and the restart policy would restart. Under the `never` policy an unhealthy
    /// deployment stays, out of routing, and may recover.
    pub(super) async fn watch_health(
        &self,
        id: Uuid,
        spec: &ToolSpec,
        target: &ProbeTarget,
        backend: &Arc<Backend>,
    ) -> Ending {
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
                            self.route(&l.slug, backend, id);
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
                return Ending::Unhealthy {
                    failed_checks: fails,
                    last_error: r.error.unwrap_or_default(),
                };
            }
        }
    }

    /// One health check of a deployment's server, as its tool's settings say.
    pub(super) async fn check(&self, target: &ProbeTarget, spec: &ToolSpec) -> HealthCheckResult {
        target
            .prober
            .check_within(
                &target.url,
                target.plain.as_deref(),
                Duration::from_millis(spec.health.timeout_ms),
            )
            .await
    }

    /// Tears down what is left of an ended process, records the restart, waits out the
    /// backoff and spawns again. False when the supervisor must return (cancelled, or the
    /// record is no longer desired running).
    pub(super) async fn restart(
        &self,
        id: Uuid,
        spec: &ToolSpec,
        why: &RestartCause,
        delay: Duration,
        cancel: &CancellationToken,
    ) -> bool {
        {
            let mut live = self.live();
            let Some(l) = live.get_mut(&id) else {
                return false;
            };
            self.routes.remove_backend(&l.slug, id);
            l.health = HealthStatus::Unknown;
        }
        if let Err(e) = self.runtimes.of(id).stop(id, Duration::ZERO).await {
            tracing::error!(deployment = %id, error = %e, "Could not clean up before a restart");
        }
        let why = why.to_string();
        let restart_at = crate::store::now()
            + chrono::Duration::from_std(delay).unwrap_or(chrono::Duration::zero());
        match self
            .until_stored(id, "a restart", || {
                self.store.mark_restarting(id, &why, restart_at)
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
        match self.spawn_process(id, spec).await {
            Ok(_) => {}
            Err(e @ Failure::Secrets(_)) => {
                self.fail(id, None, e).await;
                return false;
            }
            // Counted as an ending like any other: the loop backs off and tries again.
            Err(e) => tracing::warn!(deployment = %id, error = %e, "Restart could not spawn"),
        }
        true
    }

    /// Probes (as the tool's health settings say: MCP, or its plain HTTP path) until the
    /// server answers or the deadline passes; the error is the last failure.
    pub(super) async fn wait_ready(
        &self,
        target: &ProbeTarget,
        startup: Duration,
    ) -> Result<(), Ending> {
        let deadline = Instant::now() + startup;
        let mut delay = Duration::from_millis(5);
        let mut last = String::from("no probe completed");
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(Ending::NotReady {
                    within: startup,
                    last_probe: last,
                });
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
    pub(super) async fn fail(&self, id: Uuid, exit: Option<ExitInfo>, reason: Failure) {
        {
            let live = self.live();
            match live.get(&id) {
                None => return,
                Some(l) if l.stopping => return,
                // Out of routing now, whether or not the store can take the news yet.
                Some(l) => self.routes.remove_backend(&l.slug, id),
            }
        }
        let tail = self.runtimes.of(id).logs_tail(id, LOG_LINES_IN_ERROR).await;
        let msg = if tail.trim().is_empty() {
            reason.to_string()
        } else {
            format!("{reason}; last log lines:\n{tail}")
        };
        tracing::warn!(deployment = %id, %reason, "Deployment failed");
        self.until_stored(id, "FAILED", || {
            self.end(id, DeploymentStatus::Failed, exit, Some(&msg))
        })
        .await;
        // Whatever is left of the tree goes now; the record already says FAILED.
        if let Err(e) = self.runtimes.of(id).stop(id, Duration::ZERO).await {
            tracing::error!(deployment = %id, error = %e, "Could not clean up failed deployment");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::deployment::ExitInfo;

    /// The typed reasons render to the texts records, events and `ps` have always shown.
    #[test]
    fn reasons_render_to_the_record_texts() {
        let not_ready = Ending::NotReady {
            within: Duration::from_millis(2_500),
            last_probe: "connection refused".into(),
        };
        let gave_up = Failure::GaveUp {
            ending: not_ready.clone(),
            failed_starts: 3,
            limit: 3,
        };
        assert_eq!(
            gave_up.to_string(),
            "never became ready (no answer to an MCP request within 2.5 s; last probe: \
             connection refused); gave up after 3 failed start(s) without ever becoming \
             RUNNING (restart.max_start_failures = 3)"
        );
        let unhealthy = Ending::Unhealthy {
            failed_checks: 3,
            last_error: "no answer within 500 ms".into(),
        };
        assert_eq!(
            Failure::Ended(unhealthy.clone()).to_string(),
            "failed its health checks (3 failed checks in a row; last: no answer within 500 ms)"
        );
        let exited = Ending::Exited(ExitInfo {
            code: Some(2),
            signal: None,
            oom_limit: None,
        });
        assert_eq!(
            RestartCause::Ended {
                ending: exited.clone(),
                last_line: Some("Error: no such file".into()),
            }
            .to_string(),
            "exited (exit status 2); last log line: Error: no such file"
        );
        assert_eq!(
            RestartCause::Ended {
                ending: exited,
                last_line: None
            }
            .to_string(),
            "exited (exit status 2)"
        );
    }
}
