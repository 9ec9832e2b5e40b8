//! The supervisor against a fake runtime ([`FakeRuntime`]) and scripted health answers
//! ([`HealthScript`]) on tokio's paused clock: the backoff schedule, health thresholds, stops
//! during a restart wait, adoption and crash loops, without processes or waiting. The store is
//! real (SQLite in a temporary directory). Real processes and servers are tested in `tests/`.
//!
//! The clock moves only when a test calls `tokio::time::advance`: tokio would otherwise
//! auto-advance it whenever the runtime idles, which it does while SQLite works on its own
//! thread, and the jump would fire timers (sqlx's pool timeouts, the backoff sleep) early.

use std::{future::Future, sync::Arc, time::Duration};

use serde_json::json;
use tokio::{sync::broadcast, time::Instant};
use uuid::Uuid;

use super::{ExitPolicy, Hosting, Manager, Reconciled};
use crate::{
    deployment::{DeploymentStatus, ExitInfo},
    events::{Event, EventKind},
    health::{HealthScript, Prober},
    proxy::routes::RouteTable,
    runtime::{Runtime, fake::FakeRuntime},
    store::Store,
};

const CRASH: ExitInfo = ExitInfo {
    code: Some(1),
    signal: None,
    oom_limit: None,
};

/// Keeps tokio from auto-advancing the paused clock for as long as it lives: a blocking task
/// that runs inhibits auto-advance (tokio's test-util), and this one runs until the sender is
/// dropped.
fn hold_clock() -> std::sync::mpsc::Sender<()> {
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    tokio::task::spawn_blocking(move || {
        let _ = rx.recv();
    });
    tx
}

/// Awaits `f`, failing the test after 10 s of real time (a timeout on the held clock would
/// never fire).
async fn within<T>(what: &str, f: impl Future<Output = T>) -> T {
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(10));
        let _ = tx.send(());
    });
    tokio::select! {
        v = f => v,
        _ = rx => panic!("waited 10 s (real time) for {what}"),
    }
}

/// Lets every task that can run do so (nothing waits for I/O when this is used).
async fn settle() {
    for _ in 0..100 {
        tokio::task::yield_now().await;
    }
}

struct Harness {
    manager: Arc<Manager>,
    runtime: Arc<FakeRuntime>,
    health: HealthScript,
    events: broadcast::Receiver<Event>,
    store: Store,
    dir: tempfile::TempDir,
    _clock: std::sync::mpsc::Sender<()>,
}

impl Harness {
    /// A manager with one tool (`demo`, command `server`, plus `settings`).
    async fn new(settings: serde_json::Value, healthy: bool) -> Harness {
        let clock = hold_clock();
        let dir = tempfile::tempdir().expect("a temporary directory");
        let url = format!("sqlite://{}", dir.path().join("switchboard.db").display());
        let key = crate::secrets::SecretKey::from_base64(
            "BwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwc=",
            "test",
        )
        .expect("a key");
        let store = Store::connect(&url, key).await.expect("the store opens");
        let runtime = Arc::new(FakeRuntime::default());
        let health = HealthScript::new(healthy);
        let manager = manager_on(&store, &runtime, &health, dir.path());
        let h = Harness {
            events: manager.events().subscribe(),
            manager,
            runtime,
            health,
            store,
            dir,
            _clock: clock,
        };
        let mut spec = json!({"slug": "demo", "command": "server"});
        if let (Some(spec), Some(extra)) = (spec.as_object_mut(), settings.as_object()) {
            spec.extend(extra.clone());
        }
        h.manager
            .create_tool(serde_json::from_value(spec).expect("a tool spec"))
            .await
            .expect("the tool is created");
        h
    }

    /// A new manager on the same store, runtime and health answers: what a Switchboard
    /// restart sees.
    fn restart_manager(&mut self) {
        self.manager = manager_on(&self.store, &self.runtime, &self.health, self.dir.path());
        self.events = self.manager.events().subscribe();
    }

    /// Deploys the tool, ends the manager leaving it running (`on_exit = "keep"`), and starts
    /// a new manager that finds it adoptable or not.
    async fn restart_switchboard_over_a_deployment(
        &mut self,
        adoptable: bool,
    ) -> (Uuid, Reconciled) {
        let id = self.deploy_running().await;
        self.manager.set_exit_policy(ExitPolicy::Keep);
        self.manager.shutdown().await;
        self.runtime.set_adoptable(id, adoptable);
        self.restart_manager();
        let done = self.manager.reconcile().await.expect("reconcile");
        (id, done)
    }

    /// The next event that `pred` accepts.
    async fn event(&mut self, what: &str, pred: impl Fn(&Event) -> bool) -> Event {
        let events = &mut self.events;
        within(what, async move {
            loop {
                match events.recv().await {
                    Ok(e) if pred(&e) => return e,
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                    Err(broadcast::error::RecvError::Closed) => panic!("events closed"),
                }
            }
        })
        .await
    }

    async fn status(&mut self, to: &str) -> Event {
        self.event(to, |e| e.kind == EventKind::Status && e.to == to)
            .await
    }

    /// The next scheduled restart (the supervisor is then waiting out its delay).
    async fn restart_scheduled(&mut self) -> Event {
        self.event("a scheduled restart", |e| {
            e.kind == EventKind::Status
                && e.to == "STARTING"
                && e.reason
                    .as_deref()
                    .is_some_and(|r| r.starts_with("restarting in"))
        })
        .await
    }

    /// Deploys the tool and waits until it is RUNNING.
    async fn deploy_running(&mut self) -> Uuid {
        let d = self.manager.deploy("demo").await.expect("deploy");
        self.status("RUNNING").await;
        d.id
    }

    async fn record(&self, id: Uuid) -> crate::deployment::Deployment {
        self.manager.get_deployment(id).await.expect("the record")
    }

    fn routed(&self, id: Uuid) -> bool {
        self.manager
            .routes()
            .all_backends()
            .iter()
            .any(|(_, b)| b.deployment == id)
    }

    async fn wait_starts(&self, n: usize) {
        within(&format!("start number {n}"), self.runtime.wait_starts(n)).await;
    }
}

fn manager_on(
    store: &Store,
    runtime: &Arc<FakeRuntime>,
    health: &HealthScript,
    dir: &std::path::Path,
) -> Arc<Manager> {
    Manager::new(
        store.clone(),
        crate::runtime::Runtimes::new(Arc::clone(runtime) as Arc<dyn Runtime>),
        Prober::scripted(health.clone()),
        Arc::new(RouteTable::new()),
        "test-node".to_owned(),
        None,
        Hosting {
            packages_dir: dir.join("packages"),
            registries: Default::default(),
            images: Default::default(),
            bridge: "switchboard".into(),
            socket_dir: dir.join("run"),
            public_url: "http://127.0.0.1:7300".to_owned(),
            docker_host: None,
        },
    )
}

/// Limits the runtime cannot enforce here refuse the deploy (409 `limits_unenforceable`,
/// naming the controller) before anything is recorded or started: never silently unlimited.
#[tokio::test(start_paused = true)]
async fn limits_the_host_cannot_enforce_refuse_the_deploy_recording_nothing() {
    let h = Harness::new(json!({"limits": {"memory": "64MiB"}}), true).await;
    h.runtime.lack_controller("memory");
    let err = h.manager.deploy("demo").await.expect_err("refused");
    assert!(
        matches!(&err, super::ManagerError::LimitsUnenforceable(m) if m.contains("memory limit")),
        "{err}"
    );
    let recorded = h
        .store
        .list_deployments(&Default::default())
        .await
        .expect("the store answers");
    assert!(recorded.is_empty(), "{recorded:?}");
    assert_eq!(h.runtime.start_count(), 0);
}

#[tokio::test(start_paused = true)]
async fn restarts_wait_out_the_backoff_schedule_on_the_clock() {
    let mut h = Harness::new(
        json!({"restart": {"policy": "always", "initial_delay_ms": 1000}}),
        true,
    )
    .await;
    let id = h.deploy_running().await;
    // restart::Backoff: the first restart at once, then 1 s doubling; then, after a run of
    // reset_after (10 min by default), at once again.
    let schedule = [(0, 0), (0, 1_000), (0, 2_000), (0, 4_000), (600, 0)];
    for (ran_secs, delay_ms) in schedule {
        tokio::time::advance(Duration::from_secs(ran_secs)).await;
        let delay = Duration::from_millis(delay_ms);
        let before = h.runtime.starts(id).len();
        let crashed_at = Instant::now();
        h.runtime.exit(id, CRASH);
        h.restart_scheduled().await;
        if !delay.is_zero() {
            tokio::time::advance(delay - Duration::from_millis(1)).await;
            settle().await;
            assert_eq!(
                h.runtime.starts(id).len(),
                before,
                "restarted before its {delay:?} delay was over"
            );
            tokio::time::advance(Duration::from_millis(1)).await;
        }
        h.wait_starts(before + 1).await;
        let started = h.runtime.starts(id)[before];
        assert_eq!(started - crashed_at, delay, "restart number {before}");
        h.status("RUNNING").await;
    }
    assert_eq!(h.record(id).await.restart_count, 5);
}

#[tokio::test(start_paused = true)]
async fn failure_threshold_failed_checks_make_it_unhealthy_and_restart_it() {
    let mut h = Harness::new(
        json!({"health": {"interval_ms": 1000, "timeout_ms": 500, "failure_threshold": 3}}),
        true,
    )
    .await;
    let id = h.deploy_running().await;
    assert!(h.routed(id));
    h.health.set_healthy(false);
    let base = h.health.checks();
    for n in 1..=3 {
        tokio::time::advance(Duration::from_secs(1)).await;
        within("a health check", h.health.wait_checks(base + n)).await;
        settle().await;
        // Routing changes with the health transition, in the same turn as the check.
        assert_eq!(h.routed(id), n < 3, "routed after {n} failed check(s)");
    }
    let unhealthy = h.event("UNHEALTHY", |e| e.kind == EventKind::Health).await;
    assert_eq!(
        (unhealthy.from.as_deref(), unhealthy.to.as_str()),
        (Some("HEALTHY"), "UNHEALTHY")
    );
    let restart = h.restart_scheduled().await;
    assert!(
        restart
            .reason
            .as_deref()
            .is_some_and(|r| r.contains("3 failed checks in a row")),
        "{restart:?}"
    );
    h.wait_starts(2).await;
}

#[tokio::test(start_paused = true)]
async fn success_threshold_passed_checks_bring_it_back() {
    let mut h = Harness::new(
        json!({
            "restart": {"policy": "never"},
            "health": {"interval_ms": 1000, "timeout_ms": 500, "failure_threshold": 2,
                       "success_threshold": 2},
        }),
        true,
    )
    .await;
    let id = h.deploy_running().await;
    h.health.set_healthy(false);
    let mut checks = h.health.checks();
    for _ in 0..2 {
        tokio::time::advance(Duration::from_secs(1)).await;
        checks += 1;
        within("a health check", h.health.wait_checks(checks)).await;
    }
    h.event("UNHEALTHY", |e| {
        e.kind == EventKind::Health && e.to == "UNHEALTHY"
    })
    .await;
    assert!(!h.routed(id));
    h.health.set_healthy(true);
    tokio::time::advance(Duration::from_secs(1)).await;
    checks += 1;
    within("a health check", h.health.wait_checks(checks)).await;
    settle().await;
    assert!(!h.routed(id), "back in routing after one passed check");
    tokio::time::advance(Duration::from_secs(1)).await;
    let healthy = h
        .event("HEALTHY", |e| {
            e.kind == EventKind::Health && e.to == "HEALTHY"
        })
        .await;
    assert_eq!(healthy.from.as_deref(), Some("UNHEALTHY"));
    assert!(h.routed(id));
    // Under `never` nothing was restarted.
    assert_eq!(h.runtime.starts(id).len(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_stop_during_a_restart_wait_starts_nothing() {
    let mut h = Harness::new(
        json!({"restart": {"policy": "always", "initial_delay_ms": 60_000}}),
        true,
    )
    .await;
    let id = h.deploy_running().await;
    h.runtime.exit(id, CRASH);
    h.wait_starts(2).await; // the first restart is at once
    h.status("RUNNING").await;
    h.runtime.exit(id, CRASH);
    h.restart_scheduled().await; // now 60 s
    // The stop ends the wait: it must not wait out the 60 s (which never pass here).
    let stopped = within("the stop", h.manager.stop(id)).await.expect("stop");
    assert_eq!(stopped.status, DeploymentStatus::Stopped);
    tokio::time::advance(Duration::from_secs(120)).await;
    settle().await;
    assert_eq!(h.runtime.starts(id).len(), 2, "started after the stop");
    assert_eq!(h.record(id).await.status, DeploymentStatus::Stopped);
}

#[tokio::test(start_paused = true)]
async fn a_restarted_switchboard_adopts_an_instance_that_is_still_its_own() {
    let mut h = Harness::new(json!({}), true).await;
    let (id, done) = h.restart_switchboard_over_a_deployment(true).await;
    assert_eq!(
        done,
        Reconciled {
            adopted: 1,
            ..Default::default()
        }
    );
    // Routed once reconciling returns (Switchboard listens then), not when its supervisor
    // task first runs: the record says RUNNING, so a request must find it.
    assert!(
        h.routed(id),
        "adopted but not routed when Switchboard listens"
    );
    settle().await;
    assert_eq!(
        h.runtime.starts(id).len(),
        1,
        "an adopted instance was started again"
    );
    assert!(h.routed(id));
    // And the new manager supervises it: its exit is restarted.
    h.runtime.exit(id, CRASH);
    h.wait_starts(2).await;
}

#[tokio::test(start_paused = true)]
async fn a_restarted_switchboard_restarts_an_instance_it_cannot_adopt() {
    let mut h = Harness::new(json!({}), true).await;
    let (id, done) = h.restart_switchboard_over_a_deployment(false).await;
    assert_eq!(
        done,
        Reconciled {
            restarted: 1,
            ..Default::default()
        }
    );
    h.wait_starts(2).await;
    assert_eq!(h.runtime.starts(id).len(), 2);
    h.status("RUNNING").await;
}

#[tokio::test(start_paused = true)]
async fn a_deployment_that_never_ran_fails_after_max_start_failures() {
    let mut h = Harness::new(
        json!({"restart": {"initial_delay_ms": 1000, "max_start_failures": 3}}),
        false,
    )
    .await;
    h.runtime.exit_on_start(Some(CRASH));
    let id = h.manager.deploy("demo").await.expect("deploy").id;
    h.restart_scheduled().await; // at once
    h.restart_scheduled().await; // after 1 s
    tokio::time::advance(Duration::from_secs(1)).await;
    let failed = h.status("FAILED").await;
    assert_eq!(h.runtime.starts(id).len(), 3);
    let record = h.record(id).await;
    assert_eq!(record.status, DeploymentStatus::Failed);
    assert!(
        record
            .error
            .as_deref()
            .is_some_and(|e| e.contains("gave up after 3 failed start(s)")),
        "{record:?} {failed:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_deployment_that_ran_keeps_restarting_past_max_start_failures() {
    let mut h = Harness::new(
        json!({"restart": {"initial_delay_ms": 1000, "max_start_failures": 3}}),
        true,
    )
    .await;
    let id = h.deploy_running().await;
    h.health.set_healthy(false);
    h.runtime.exit_on_start(Some(CRASH));
    h.runtime.exit(id, CRASH);
    for (n, delay_ms) in [0, 1_000, 2_000, 4_000, 8_000].into_iter().enumerate() {
        let restart = h.restart_scheduled().await;
        let expected = format!("restarting in {delay_ms} ms");
        assert!(
            restart
                .reason
                .as_deref()
                .is_some_and(|r| r.starts_with(&expected)),
            "{restart:?}"
        );
        tokio::time::advance(Duration::from_millis(delay_ms)).await;
        h.wait_starts(n + 2).await;
    }
    let record = h.record(id).await;
    assert_eq!(record.status, DeploymentStatus::Starting);
    assert_eq!(h.runtime.starts(id).len(), 6);
}
