//! The store's contract, written once and run against every backend: SQLite (a temporary
//! file), PostgreSQL and MariaDB (a fresh database each, on the servers in
//! SWITCHBOARD_TEST_POSTGRES_URL and SWITCHBOARD_TEST_MYSQL_URL, which scripts/test starts with
//! scripts/with-databases).
#![allow(clippy::unwrap_used)]

mod common;

use chrono::{DateTime, FixedOffset, Utc};
use common::{fresh_mysql_url, fresh_postgres_url};
use switchboard::{
    deployment::{Deployment, DeploymentStatus, ExitInfo, HealthStatus, InstanceRef, RuntimeKind},
    registry::ToolSpec,
    secrets::SecretKey,
    store::{DeleteTool, DeploymentFilter, KeyRecord, Store, StoreError, now},
};
use uuid::Uuid;

/// Keeps a backend's scratch database alive for one test.
enum Scratch {
    Sqlite(#[allow(dead_code)] tempfile::TempDir),
    Server,
}

/// A key of 32 bytes of `b`: tests that need two keys take two bytes.
fn key(b: u8) -> SecretKey {
    use base64::Engine as _;
    SecretKey::from_base64(
        &base64::engine::general_purpose::STANDARD.encode([b; 32]),
        "test",
    )
    .unwrap()
}

async fn sqlite() -> (Store, Scratch) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::connect(
        &format!("sqlite://{}", dir.path().join("t.db").display()),
        key(7),
    )
    .await
    .unwrap();
    (store, Scratch::Sqlite(dir))
}

async fn postgres() -> (Store, Scratch) {
    let store = Store::connect(&fresh_postgres_url().await, key(7))
        .await
        .unwrap();
    (store, Scratch::Server)
}

async fn mysql() -> (Store, Scratch) {
    let store = Store::connect(&fresh_mysql_url().await, key(7))
        .await
        .unwrap();
    (store, Scratch::Server)
}

/// Runs each contract test against each backend.
macro_rules! contract {
    ($($name:ident),* $(,)?) => {
        mod on_sqlite {
            $(#[tokio::test] async fn $name() { let (s, _g) = super::sqlite().await; super::$name(s).await; })*
        }
        mod on_postgres {
            $(#[tokio::test] async fn $name() { let (s, _g) = super::postgres().await; super::$name(s).await; })*
        }
        mod on_mysql {
            $(#[tokio::test] async fn $name() { let (s, _g) = super::mysql().await; super::$name(s).await; })*
        }
    };
}

contract!(
    tools_round_trip,
    deployments_round_trip_and_filter,
    status_transitions_are_conditional,
    a_live_port_belongs_to_one_deployment,
    racing_writers_for_one_port_get_one_winner,
    a_tool_in_use_is_not_deleted,
    timestamps_keep_their_instant,
    stop_leaves_stopped_with_stopped_at,
    nodes_own_their_deployments_and_ports,
    listings_page_in_deployment_order,
    restarts_keep_the_record_until_a_stop_is_desired,
    a_round_of_health_checks_is_written_at_once,
    a_deploy_racing_a_tool_delete_never_leaves_a_live_orphan,
    client_keys_round_trip_and_revoke_once,
);

fn spec(slug: &str) -> ToolSpec {
    serde_json::from_value::<ToolSpec>(serde_json::json!({"slug": slug, "command": "server"}))
        .unwrap()
        .validate()
        .unwrap()
}

fn deployment(
    tool: &switchboard::registry::Tool,
    port: u16,
    status: DeploymentStatus,
) -> Deployment {
    let t = now();
    Deployment {
        id: Uuid::new_v4(),
        tool_id: tool.id,
        tool_slug: tool.spec.slug.clone(),
        node_id: "n1".into(),
        endpoint_url: format!("http://127.0.0.1:{port}/mcp"),
        port: Some(port),
        status,
        health_status: HealthStatus::Unknown,
        last_health_check: None,
        deployed_at: t,
        stopped_at: None,
        runtime: RuntimeKind::Process,
        instance: Some(InstanceRef::Process {
            pid: 4242,
            start_time: Some(987_654_321),
            port: Some(port),
            socket: None,
        }),
        exit_code: None,
        exit_signal: None,
        error: None,
        updated_at: t,
        desired: switchboard::deployment::Desired::Running,
        restart_count: 0,
        last_exit: None,
        next_restart_at: None,
        tool_deleted_at: None,
    }
}

async fn tools_round_trip(s: Store) {
    let t = s.insert_tool(&spec("alpha")).await.unwrap();
    let got = s.get_tool("alpha").await.unwrap().unwrap();
    assert_eq!(got.id, t.id);
    assert_eq!(got.spec, t.spec);
    assert_eq!(got.created_at, t.created_at);
    assert!(matches!(
        s.insert_tool(&spec("alpha")).await,
        Err(StoreError::Conflict(_))
    ));
    s.insert_tool(&spec("beta")).await.unwrap();
    let slugs: Vec<String> = s
        .list_tools()
        .await
        .unwrap()
        .into_iter()
        .map(|t| t.spec.slug)
        .collect();
    assert_eq!(slugs, ["alpha", "beta"]);
    let mut changed = spec("alpha");
    changed.args = vec!["--fast".into()];
    let u = s.update_tool(&changed).await.unwrap().unwrap();
    assert_eq!(u.id, t.id);
    assert_eq!(
        s.get_tool("alpha").await.unwrap().unwrap().spec.args,
        ["--fast"]
    );
    assert!(s.update_tool(&spec("nope")).await.unwrap().is_none());
    assert_eq!(s.delete_tool("beta").await.unwrap(), DeleteTool::Deleted);
    assert_eq!(s.delete_tool("beta").await.unwrap(), DeleteTool::NotFound);
    assert!(s.get_tool("beta").await.unwrap().is_none());
}

async fn deployments_round_trip_and_filter(s: Store) {
    let a = s.insert_tool(&spec("a")).await.unwrap();
    let b = s.insert_tool(&spec("b")).await.unwrap();
    let d1 = deployment(&a, 9001, DeploymentStatus::Starting);
    let d2 = deployment(&a, 9002, DeploymentStatus::Starting);
    let d3 = deployment(&b, 9003, DeploymentStatus::Starting);
    for d in [&d1, &d2, &d3] {
        s.insert_deployment(d).await.unwrap();
    }
    assert_eq!(
        s.get_deployment(d1.id).await.unwrap().unwrap(),
        d1,
        "a record reads back as written"
    );
    assert!(s.get_deployment(Uuid::new_v4()).await.unwrap().is_none());
    s.mark_running(d2.id).await.unwrap();
    let of_a = s
        .list_deployments(&DeploymentFilter {
            tool_slug: Some("a".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(
        of_a.iter().map(|d| d.id).collect::<Vec<_>>(),
        [d1.id, d2.id]
    );
    let running = s
        .list_deployments(&DeploymentFilter {
            statuses: vec![DeploymentStatus::Running],
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(running.len(), 1);
    assert_eq!(running[0].id, d2.id);
    assert_eq!(running[0].health_status, HealthStatus::Healthy);
    assert_eq!(s.live_deployments("n1").await.unwrap().len(), 3);
    assert!(s.live_deployments("n2").await.unwrap().is_empty());
}

async fn status_transitions_are_conditional(s: Store) {
    let t = s.insert_tool(&spec("t")).await.unwrap();
    let d = deployment(&t, 9100, DeploymentStatus::Starting);
    s.insert_deployment(&d).await.unwrap();
    assert!(s.mark_running(d.id).await.unwrap());
    assert!(
        !s.mark_running(d.id).await.unwrap(),
        "RUNNING cannot become RUNNING again"
    );
    let exit = ExitInfo {
        code: Some(3),
        signal: None,
        oom_limit: None,
    };
    assert!(
        s.mark_ended(d.id, DeploymentStatus::Failed, Some(exit), Some("boom"))
            .await
            .unwrap()
    );
    assert!(
        !s.mark_ended(d.id, DeploymentStatus::Stopped, None, None)
            .await
            .unwrap(),
        "an ended deployment stays ended"
    );
    assert!(!s.mark_running(d.id).await.unwrap());
    let got = s.get_deployment(d.id).await.unwrap().unwrap();
    assert_eq!(got.status, DeploymentStatus::Failed);
    assert_eq!(got.exit_code, Some(3));
    assert_eq!(got.error.as_deref(), Some("boom"));
}

async fn a_live_port_belongs_to_one_deployment(s: Store) {
    let t = s.insert_tool(&spec("t")).await.unwrap();
    let d1 = deployment(&t, 9200, DeploymentStatus::Starting);
    s.insert_deployment(&d1).await.unwrap();
    let d2 = deployment(&t, 9200, DeploymentStatus::Starting);
    assert!(matches!(
        s.insert_deployment(&d2).await,
        Err(StoreError::Conflict(_))
    ));
    s.mark_ended(d1.id, DeploymentStatus::Stopped, None, None)
        .await
        .unwrap();
    s.insert_deployment(&d2).await.unwrap();
}

async fn racing_writers_for_one_port_get_one_winner(s: Store) {
    let t = s.insert_tool(&spec("t")).await.unwrap();
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let s = s.clone();
            let d = deployment(&t, 9300, DeploymentStatus::Starting);
            tokio::spawn(async move { s.insert_deployment(&d).await })
        })
        .collect();
    let mut won = 0;
    for task in tasks {
        match task.await.unwrap() {
            Ok(()) => won += 1,
            Err(StoreError::Conflict(_)) => {}
            Err(e) => panic!("unexpected error: {e}"),
        }
    }
    assert_eq!(won, 1, "exactly one writer gets the port");
}

async fn a_tool_in_use_is_not_deleted(s: Store) {
    let t = s.insert_tool(&spec("busy")).await.unwrap();
    let d = deployment(&t, 9400, DeploymentStatus::Running);
    s.insert_deployment(&d).await.unwrap();
    assert_eq!(s.delete_tool("busy").await.unwrap(), DeleteTool::InUse(1));
    s.mark_ended(d.id, DeploymentStatus::Stopped, None, None)
        .await
        .unwrap();
    assert!(
        s.get_tool("busy").await.unwrap().is_some(),
        "a refused delete changes nothing"
    );
    assert!(
        s.get_deployment(d.id)
            .await
            .unwrap()
            .unwrap()
            .tool_deleted_at
            .is_none()
    );
    s.mark_ended(d.id, DeploymentStatus::Stopped, None, None)
        .await
        .unwrap();
    assert_eq!(s.delete_tool("busy").await.unwrap(), DeleteTool::Deleted);
    assert_eq!(s.delete_tool("busy").await.unwrap(), DeleteTool::NotFound);
    let kept = s
        .get_deployment(d.id)
        .await
        .unwrap()
        .expect("history outlives the tool");
    assert_eq!(kept.status, DeploymentStatus::Stopped);
    assert_eq!(kept.tool_slug, "busy");
    assert!(kept.tool_deleted_at.is_some(), "{kept:?}");

    // The slug can be registered again: the old record keeps its mark, the new tool's do not,
    // and the old tool's id can get no new deployment.
    let again = s.insert_tool(&spec("busy")).await.unwrap();
    let fresh = deployment(&again, 9401, DeploymentStatus::Running);
    s.insert_deployment(&fresh).await.unwrap();
    let listed = s
        .list_deployments(&DeploymentFilter {
            tool_slug: Some("busy".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    let marks: Vec<(Uuid, bool)> = listed
        .iter()
        .map(|d| (d.id, d.tool_deleted_at.is_some()))
        .collect();
    assert_eq!(marks, [(d.id, true), (fresh.id, false)]);
    let orphan = deployment(&t, 9402, DeploymentStatus::Starting);
    let err = s.insert_deployment(&orphan).await.unwrap_err();
    assert!(
        matches!(err, StoreError::ToolGone(ref slug) if slug == "busy"),
        "{err}"
    );
    assert!(s.get_deployment(orphan.id).await.unwrap().is_none());
}

async fn timestamps_keep_their_instant(s: Store) {
    let t = s.insert_tool(&spec("t")).await.unwrap();
    let mut d = deployment(&t, 9500, DeploymentStatus::Starting);
    // Written from a +05:30 clock: the same instant must come back, in UTC.
    let local: DateTime<FixedOffset> =
        DateTime::parse_from_rfc3339("2026-03-29T01:30:00.123456+05:30").unwrap();
    d.deployed_at = local.with_timezone(&Utc);
    s.insert_deployment(&d).await.unwrap();
    let got = s.get_deployment(d.id).await.unwrap().unwrap();
    assert_eq!(got.deployed_at, local);
    assert_eq!(
        got.deployed_at.to_rfc3339(),
        "2026-03-28T20:00:00.123456+00:00"
    );
}

async fn stop_leaves_stopped_with_stopped_at(s: Store) {
    let t = s.insert_tool(&spec("t")).await.unwrap();
    let d = deployment(&t, 9600, DeploymentStatus::Running);
    s.insert_deployment(&d).await.unwrap();
    let before = now();
    assert!(
        s.mark_ended(
            d.id,
            DeploymentStatus::Stopped,
            Some(ExitInfo {
                code: None,
                signal: Some(15),
                oom_limit: None,
            }),
            None
        )
        .await
        .unwrap()
    );
    let got = s.get_deployment(d.id).await.unwrap().unwrap();
    assert_eq!(got.status, DeploymentStatus::Stopped);
    assert!(got.stopped_at.unwrap() >= before);
    assert_eq!(got.exit_signal, Some(15));
}

/// The deploy → route → stop flow through the API, with records in a server database.
async fn whole_flow(url: String) {
    let app = common::TestApp::with(common::AppOptions {
        database_url: Some(url.clone()),
        ..Default::default()
    })
    .await;
    app.add_test_tool("db", &[], serde_json::json!({})).await;
    let d = app.deploy_wait("db").await;
    let id = d["id"].as_str().unwrap().to_owned();
    assert_eq!(d["status"], "RUNNING", "{d}");
    let who = common::whoami(&format!("{}/mcp/db", app.url)).await;
    assert_eq!(who["deployment"], d["id"]);
    let stopped = app.stop_deployment(d["id"].as_str().unwrap()).await;
    assert_eq!(stopped["status"], "STOPPED");
    assert!(stopped["stopped_at"].is_string());
    assert!(!app.db_path().exists(), "nothing went to a SQLite file");
    let (status, stopped_at_set) = common::record_in_db(Some(&url), &app.db_path(), &id).await;
    assert_eq!((status.as_str(), stopped_at_set), ("STOPPED", true));
    app.stop().await;
}

#[tokio::test]
async fn the_whole_flow_runs_on_postgres() {
    whole_flow(fresh_postgres_url().await).await;
}

#[tokio::test]
async fn the_whole_flow_runs_on_mysql() {
    whole_flow(fresh_mysql_url().await).await;
}

async fn nodes_own_their_deployments_and_ports(s: Store) {
    let t = s.insert_tool(&spec("t")).await.unwrap();
    let a = deployment(&t, 9700, DeploymentStatus::Running);
    let mut b = deployment(&t, 9700, DeploymentStatus::Running);
    b.node_id = "n2".into();
    s.insert_deployment(&a).await.unwrap();
    s.insert_deployment(&b).await.unwrap();
    let again = deployment(&t, 9700, DeploymentStatus::Starting);
    assert!(
        matches!(
            s.insert_deployment(&again).await,
            Err(StoreError::Conflict(_))
        ),
        "one node never holds a port twice"
    );
    let mine: Vec<Uuid> = s
        .live_deployments("n2")
        .await
        .unwrap()
        .iter()
        .map(|d| d.id)
        .collect();
    assert_eq!(mine, [b.id]);
    let all = s
        .list_deployments(&DeploymentFilter::default())
        .await
        .unwrap();
    assert_eq!(all.len(), 2);
    let got = s.get_deployment(b.id).await.unwrap().unwrap();
    assert_eq!(got.node_id, "n2");
}

#[tokio::test]
async fn two_nodes_share_one_database_and_keep_to_their_own() {
    let url = fresh_postgres_url().await;
    let opts = || common::AppOptions {
        database_url: Some(url.clone()),
        ports: common::port_range(4),
        ..Default::default()
    };
    let a = common::TestApp::with(opts()).await;
    a.add_test_tool("shared", &[], serde_json::json!({})).await;
    let b = common::TestApp::with(opts()).await;
    let da = a.deploy_wait("shared").await;
    let db = b.deploy_wait("shared").await;
    assert_eq!(da["status"], "RUNNING", "{da}");
    assert_eq!(db["status"], "RUNNING", "{db}");
    assert_ne!(da["node_id"], db["node_id"]);

    // Either node lists everything; each routes to its own.
    let (_, all) = b.call("GET", "/api/v1/deployments", None).await;
    assert_eq!(all.as_array().unwrap().len(), 2, "{all}");
    let (_, mine) = b
        .call(
            "GET",
            &format!(
                "/api/v1/deployments?node={}",
                db["node_id"].as_str().unwrap()
            ),
            None,
        )
        .await;
    assert_eq!(mine.as_array().unwrap().len(), 1);
    let who = common::whoami(&format!("{}/mcp/shared", b.url)).await;
    assert_eq!(who["deployment"], db["id"]);

    // A node does not stop what another runs.
    let (st, e) = a
        .call(
            "POST",
            &format!("/api/v1/deployments/{}/stop", db["id"].as_str().unwrap()),
            None,
        )
        .await;
    assert_eq!(st.as_u16(), 409, "{e}");
    assert_eq!(e["error"]["code"], "not_owner");

    // Node A dies and comes back: it closes its own records and kills its own orphans only.
    let a_pid = da["instance"]["pid"].as_u64().unwrap() as u32;
    let b_pid = db["instance"]["pid"].as_u64().unwrap() as u32;
    let dir = a.crash().await;
    assert!(
        common::alive(a_pid),
        "a crash of Switchboard leaves its deployment running"
    );
    let a = common::TestApp::start_in(dir, opts()).await;
    assert!(
        common::alive(a_pid),
        "node A adopts its own still-running deployment at its restart"
    );
    assert!(common::alive(b_pid), "node B's deployment is untouched");
    let rec_a = a.deployment(da["id"].as_str().unwrap()).await;
    assert_eq!(rec_a["status"], "RUNNING", "{rec_a}");
    assert_eq!(
        rec_a["instance"]["pid"].as_u64(),
        Some(u64::from(a_pid)),
        "{rec_a}"
    );
    let rec_b = a.deployment(db["id"].as_str().unwrap()).await;
    assert_eq!(rec_b["status"], "RUNNING", "{rec_b}");
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn a_database_newer_than_the_binary_is_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("t.db").display());
    drop(Store::connect(&url, key(7)).await.unwrap());
    let pool = sqlx::SqlitePool::connect(&url).await.unwrap();
    sqlx::query(
        "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) \
         VALUES (9999, 'from the future', 1, x'00', 0)",
    )
    .execute(&pool)
    .await
    .unwrap();
    pool.close().await;
    let err = Store::connect(&url, key(7)).await.unwrap_err();
    assert!(matches!(err, StoreError::NewerThanBinary(9999)), "{err}");
    assert!(err.to_string().contains("newer Switchboard"), "{err}");
}

#[tokio::test]
async fn an_unknown_database_scheme_is_refused_without_leaking_the_password() {
    let err = Store::connect("oracle://admin:hunter2@db/x", key(7))
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("not a supported database URL"), "{msg}");
    assert!(!msg.contains("hunter2"), "{msg}");
}

/// Two API requests race for the last free port: exactly one deploys, the other is told why.
async fn race_for_the_last_port(backend: common::Backend) {
    let app = common::TestApp::with(common::AppOptions {
        ports: common::port_range(1),
        database_url: backend.fresh_url().await,
        ..Default::default()
    })
    .await;
    app.add_test_tool("last", &[], serde_json::json!({})).await;
    let deploy = || app.call("POST", "/api/v1/tools/last/deployments", None);
    let (a, b) = tokio::join!(deploy(), deploy());
    let mut codes = [a.0.as_u16(), b.0.as_u16()];
    codes.sort_unstable();
    assert_eq!(codes, [201, 503], "{a:?} {b:?}");
    let loser = if a.0.as_u16() == 503 { &a.1 } else { &b.1 };
    assert_eq!(loser["error"]["code"], "ports_exhausted");
    let (_, all) = app.call("GET", "/api/v1/deployments", None).await;
    assert_eq!(all.as_array().unwrap().len(), 1, "the loser left no record");
    app.stop().await;
}

#[tokio::test]
async fn racing_deploys_for_the_last_port_on_sqlite() {
    race_for_the_last_port(common::Backend::Sqlite).await;
}

#[tokio::test]
async fn racing_deploys_for_the_last_port_on_postgres() {
    race_for_the_last_port(common::Backend::Postgres).await;
}

#[tokio::test]
async fn racing_deploys_for_the_last_port_on_mysql() {
    race_for_the_last_port(common::Backend::MySql).await;
}

async fn listings_page_in_deployment_order(s: Store) {
    let t = s.insert_tool(&spec("t")).await.unwrap();
    let mut ids = Vec::new();
    for i in 0..5u16 {
        let mut d = deployment(&t, 9800 + i, DeploymentStatus::Stopped);
        d.deployed_at = DateTime::parse_from_rfc3339(&format!("2026-01-01T00:00:0{i}Z"))
            .unwrap()
            .with_timezone(&Utc);
        s.insert_deployment(&d).await.unwrap();
        ids.push(d.id);
    }
    let page = |limit, offset| {
        let s = s.clone();
        async move {
            s.list_deployments(&DeploymentFilter {
                limit,
                offset,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_iter()
            .map(|d| d.id)
            .collect::<Vec<_>>()
        }
    };
    assert_eq!(page(Some(2), None).await, ids[..2]);
    assert_eq!(page(Some(2), Some(2)).await, ids[2..4]);
    assert_eq!(page(None, Some(3)).await, ids[3..]);
    assert_eq!(page(Some(10), Some(5)).await, Vec::<Uuid>::new());
}

async fn restarts_keep_the_record_until_a_stop_is_desired(s: Store) {
    use switchboard::deployment::Desired;
    let t = s.insert_tool(&spec("t")).await.unwrap();
    let d = deployment(&t, 9100, DeploymentStatus::Starting);
    s.insert_deployment(&d).await.unwrap();
    let process = InstanceRef::Process {
        pid: 777,
        start_time: Some(123),
        port: Some(9100),
        socket: None,
    };
    s.set_instance(d.id, &process, Some(9100)).await.unwrap();
    let stored = s.get_deployment(d.id).await.unwrap().unwrap();
    assert_eq!(stored.instance, Some(process));
    assert_eq!(stored.port, Some(9100), "the port it listens on");
    assert!(s.mark_running(d.id).await.unwrap());
    assert!(
        s.set_health(d.id, HealthStatus::Unhealthy, now())
            .await
            .unwrap()
    );
    let at = now() + chrono::Duration::seconds(4);
    assert!(
        s.mark_restarting(d.id, "exited (exit status 1)", at)
            .await
            .unwrap()
    );
    let got = s.get_deployment(d.id).await.unwrap().unwrap();
    assert_eq!(got.status, DeploymentStatus::Starting);
    assert_eq!(got.restart_count, 1);
    assert_eq!(got.last_exit.as_deref(), Some("exited (exit status 1)"));
    assert_eq!(got.next_restart_at, Some(at));
    assert_eq!(
        got.instance, None,
        "the old process is no longer the deployment's"
    );
    assert_eq!(got.port, Some(9100), "a restart keeps the port");
    assert!(s.mark_running(d.id).await.unwrap());
    let got = s.get_deployment(d.id).await.unwrap().unwrap();
    assert_eq!(got.next_restart_at, None);
    assert_eq!(got.health_status, HealthStatus::Healthy);

    // Once a stop is desired, no restart is recorded any more.
    assert!(s.set_desired(d.id, Desired::Stopped).await.unwrap());
    assert!(!s.mark_restarting(d.id, "late crash", at).await.unwrap());
    let got = s.get_deployment(d.id).await.unwrap().unwrap();
    assert_eq!(got.desired, Desired::Stopped);
    assert_eq!(got.restart_count, 1);
    assert!(
        s.mark_ended(d.id, DeploymentStatus::Stopped, None, None)
            .await
            .unwrap()
    );
    assert!(
        !s.set_desired(d.id, Desired::Running).await.unwrap(),
        "an ended record stays ended"
    );
    assert!(
        !s.set_health(d.id, HealthStatus::Healthy, now())
            .await
            .unwrap()
    );
}

async fn a_round_of_health_checks_is_written_at_once(s: Store) {
    let t = s.insert_tool(&spec("t")).await.unwrap();
    let a = deployment(&t, 9101, DeploymentStatus::Starting);
    let b = deployment(&t, 9102, DeploymentStatus::Starting);
    let c = deployment(&t, 9103, DeploymentStatus::Starting);
    for d in [&a, &b, &c] {
        s.insert_deployment(d).await.unwrap();
    }
    s.mark_running(a.id).await.unwrap();
    s.mark_running(b.id).await.unwrap();
    // c stays STARTING: a check result for it is not written.
    let t1 = now() + chrono::Duration::seconds(1);
    let t2 = now() + chrono::Duration::seconds(2);
    s.set_health_many(&[
        (a.id, HealthStatus::Healthy, t1),
        (b.id, HealthStatus::Unhealthy, t2),
        (c.id, HealthStatus::Healthy, t2),
    ])
    .await
    .unwrap();
    let got = |id| {
        let s = s.clone();
        async move { s.get_deployment(id).await.unwrap().unwrap() }
    };
    let (ga, gb, gc) = (got(a.id).await, got(b.id).await, got(c.id).await);
    assert_eq!(ga.health_status, HealthStatus::Healthy);
    assert_eq!(gb.health_status, HealthStatus::Unhealthy);
    assert_eq!(
        ga.last_health_check,
        Some(t2),
        "stamped with the round's newest check"
    );
    assert_eq!(gb.last_health_check, Some(t2));
    assert_eq!(gc.health_status, HealthStatus::Unknown);
    assert_eq!(gc.last_health_check, None);
    s.set_health_many(&[]).await.unwrap();
}

/// scripts/with-databases (README's test command runs the suite inside it) must stop both
/// servers it starts: a MariaDB run under `runuser` once outlived every run.
#[test]
fn with_databases_leaves_no_database_server_running() {
    let out = std::process::Command::new("scripts/with-databases")
        .args(["sh", "-c", "echo \"$SWITCHBOARD_TEST_DATABASES_DIR\""])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "scripts/with-databases failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    let dir = stdout.lines().last().unwrap().trim().to_owned();
    assert!(dir.starts_with('/'), "no run directory printed: {stdout}");
    let mut left = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains(&format!("{dir}/")) {
            left.push(format!(
                "{}: {cmdline}",
                entry.file_name().to_string_lossy()
            ));
        }
    }
    assert!(
        left.is_empty(),
        "database servers outlived the run: {left:?}"
    );
}

/// A database migrated by the release before the runtime boundary (pid columns) and holding a
/// live deployment: after the upgrade, the record names its process as an instance reference,
/// which is what adoption reads. Run on every backend, since each has its own migration SQL.
async fn pid_columns_become_an_instance_reference(backend: common::Backend) {
    let dir = tempfile::tempdir().unwrap();
    let url = match backend.fresh_url().await {
        Some(url) => url,
        None => {
            let file = dir.path().join("t.db");
            std::fs::File::create(&file).unwrap();
            format!("sqlite://{}", file.display())
        }
    };
    let tool_id = Uuid::new_v4();
    let dep_id = Uuid::new_v4();
    let t = "2026-01-02 03:04:05";
    let tool = format!(
        "INSERT INTO tools (id, slug, spec, created_at, updated_at) \
         VALUES ('{tool_id}', 'old', '{{\"slug\":\"old\",\"command\":\"x\"}}', '{t}', '{t}')"
    );
    let live = format!(
        "INSERT INTO deployments (id, tool_id, tool_slug, node_id, endpoint_url, port, status, \
         health_status, deployed_at, updated_at, pid, pid_start_time) VALUES ('{dep_id}', \
         '{tool_id}', 'old', 'n1', 'http://127.0.0.1:9300/mcp', 9300, 'RUNNING', 'HEALTHY', \
         '{t}', '{t}', 4242, 987654321)"
    );
    // The schema as the previous release left it (migrations 1 to 3), and a row it wrote.
    macro_rules! previous_release {
        ($pool:ty, $dir:literal) => {{
            let pool = <$pool>::connect(&url).await.unwrap();
            sqlx::migrate!($dir).run_to(3, &pool).await.unwrap();
            sqlx::query(sqlx::AssertSqlSafe(tool.clone()))
                .execute(&pool)
                .await
                .unwrap();
            sqlx::query(sqlx::AssertSqlSafe(live.clone()))
                .execute(&pool)
                .await
                .unwrap();
            pool.close().await;
        }};
    }
    match backend {
        common::Backend::Sqlite => previous_release!(sqlx::SqlitePool, "migrations/sqlite"),
        common::Backend::Postgres => previous_release!(sqlx::PgPool, "migrations/postgres"),
        common::Backend::MySql => previous_release!(sqlx::MySqlPool, "migrations/mysql"),
    }
    let store = Store::connect(&url, key(7)).await.unwrap();
    let d = store.get_deployment(dep_id).await.unwrap().unwrap();
    assert_eq!(d.runtime, RuntimeKind::Process);
    assert_eq!(
        d.instance,
        Some(InstanceRef::Process {
            pid: 4242,
            start_time: Some(987_654_321),
            // The previous release did not record where it listens: adoption completes it
            // from `port`.
            port: None,
            socket: None,
        })
    );
    assert_eq!(d.status, DeploymentStatus::Running);

    // Later migrations keep the row too (0005 rebuilds SQLite's table), and from then on its
    // record outlives its tool.
    assert_eq!(d.tool_slug, "old");
    assert_eq!(d.port, Some(9300));
    assert!(d.tool_deleted_at.is_none());
    assert_eq!(
        store.delete_tool("old").await.unwrap(),
        DeleteTool::InUse(1)
    );
    store
        .mark_ended(dep_id, DeploymentStatus::Stopped, None, None)
        .await
        .unwrap();
    assert_eq!(store.delete_tool("old").await.unwrap(), DeleteTool::Deleted);
    let kept = store.get_deployment(dep_id).await.unwrap().unwrap();
    assert!(kept.tool_deleted_at.is_some(), "{kept:?}");
    // The rebuilt table still allows one live deployment per port and node.
    let t = store.insert_tool(&spec("new")).await.unwrap();
    store
        .insert_deployment(&deployment(&t, 9301, DeploymentStatus::Running))
        .await
        .unwrap();
    let clash = store
        .insert_deployment(&deployment(&t, 9301, DeploymentStatus::Starting))
        .await
        .unwrap_err();
    assert!(matches!(clash, StoreError::Conflict(_)), "{clash}");
}

#[tokio::test]
async fn pid_columns_become_an_instance_reference_on_sqlite() {
    pid_columns_become_an_instance_reference(common::Backend::Sqlite).await;
}

#[tokio::test]
async fn pid_columns_become_an_instance_reference_on_postgres() {
    pid_columns_become_an_instance_reference(common::Backend::Postgres).await;
}

#[tokio::test]
async fn pid_columns_become_an_instance_reference_on_mysql() {
    pid_columns_become_an_instance_reference(common::Backend::MySql).await;
}

/// A deploy and a `tool rm` of the same tool at once: either the deploy wins (and the delete
/// is refused as in use) or the delete wins (and the deploy finds no tool), never both.
async fn a_deploy_racing_a_tool_delete_never_leaves_a_live_orphan(s: Store) {
    for round in 0..20u16 {
        let slug = format!("race-{round}");
        let t = s.insert_tool(&spec(&slug)).await.unwrap();
        let d = deployment(&t, 9600 + round, DeploymentStatus::Starting);
        let (inserted, deleted) = tokio::join!(s.insert_deployment(&d), s.delete_tool(&slug));
        match (inserted, deleted.unwrap()) {
            (Ok(()), DeleteTool::InUse(1)) => {
                assert!(s.get_tool(&slug).await.unwrap().is_some());
            }
            (Err(StoreError::ToolGone(_)), DeleteTool::Deleted) => {
                assert!(s.get_deployment(d.id).await.unwrap().is_none());
            }
            (ins, del) => panic!("round {round}: insert {ins:?}, delete {del:?}"),
        }
    }
}

async fn client_keys_round_trip_and_revoke_once(s: Store) {
    let a = KeyRecord {
        id: Uuid::new_v4(),
        name: "ci runner ü".into(),
        key_hash: [7; 32],
        grants: vec!["*".into(), "demo/echo".into()],
        created_at: now(),
        expires_at: Some(now() + chrono::Duration::days(400)),
        revoked_at: None,
        rate_limit_per_min: Some(u32::MAX),
        max_concurrent: Some(3),
    };
    let mut b = a.clone();
    b.id = Uuid::new_v4();
    b.key_hash = [0xfe; 32];
    b.expires_at = None;
    b.rate_limit_per_min = None;
    b.max_concurrent = None;
    b.created_at = a.created_at + chrono::Duration::seconds(1);
    s.insert_key(&a).await.unwrap();
    s.insert_key(&b).await.unwrap();
    assert_eq!(s.get_key(a.id).await.unwrap(), Some(a.clone()));
    assert_eq!(s.list_keys().await.unwrap(), vec![a.clone(), b.clone()]);
    assert_eq!(s.get_key(Uuid::new_v4()).await.unwrap(), None);
    // One digest, one key.
    let mut dup = b.clone();
    dup.id = Uuid::new_v4();
    assert!(s.insert_key(&dup).await.is_err());

    let first = now();
    let revoked = s.revoke_key(a.id, first).await.unwrap().unwrap();
    assert_eq!(revoked.revoked_at, Some(first));
    // Again: the first time stays.
    let again = s
        .revoke_key(a.id, first + chrono::Duration::seconds(5))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(again.revoked_at, Some(first));
    assert_eq!(s.revoke_key(Uuid::new_v4(), first).await.unwrap(), None);
    assert_eq!(s.get_key(b.id).await.unwrap().unwrap().revoked_at, None);
}
// ----- secrets at rest -----

/// A database for a secrets test: its URL (a file in `dir` for SQLite).
async fn scratch_url(backend: common::Backend, dir: &std::path::Path) -> String {
    match backend.fresh_url().await {
        Some(url) => url,
        None => format!("sqlite://{}", dir.join("t.db").display()),
    }
}

/// Runs one SQL statement on the database itself, beside the store (test-made text only).
async fn raw_execute(url: &str, sql: String) {
    use sqlx::Connection as _;
    let sql = sqlx::AssertSqlSafe(sql);
    if url.starts_with("sqlite") {
        let mut c = sqlx::SqliteConnection::connect(url).await.unwrap();
        sqlx::query(sql).execute(&mut c).await.unwrap();
    } else if url.starts_with("postgres") {
        let mut c = sqlx::PgConnection::connect(url).await.unwrap();
        sqlx::query(sql).execute(&mut c).await.unwrap();
    } else {
        let mut c = sqlx::MySqlConnection::connect(url).await.unwrap();
        sqlx::query(sql).execute(&mut c).await.unwrap();
    }
}

/// The tool's `spec` column as stored.
async fn raw_spec(url: &str, slug: &str) -> serde_json::Value {
    use sqlx::Connection as _;
    let sql = sqlx::AssertSqlSafe(format!("SELECT spec FROM tools WHERE slug = '{slug}'"));
    let text: String = if url.starts_with("sqlite") {
        let mut c = sqlx::SqliteConnection::connect(url).await.unwrap();
        sqlx::query_scalar(sql).fetch_one(&mut c).await.unwrap()
    } else if url.starts_with("postgres") {
        let mut c = sqlx::PgConnection::connect(url).await.unwrap();
        sqlx::query_scalar(sql).fetch_one(&mut c).await.unwrap()
    } else {
        let mut c = sqlx::MySqlConnection::connect(url).await.unwrap();
        sqlx::query_scalar(sql).fetch_one(&mut c).await.unwrap()
    };
    serde_json::from_str(&text).unwrap()
}

fn secret_spec(slug: &str, secrets: serde_json::Value) -> ToolSpec {
    serde_json::from_value::<ToolSpec>(serde_json::json!(
        {"slug": slug, "command": "server", "env": {"PLAIN": "visible"}, "secret_env": secrets}))
    .unwrap()
    .validate()
    .unwrap()
}

/// Values are stored encrypted (never in plain text), read back decrypted, bound to their
/// tool and variable (a ciphertext moved elsewhere does not decrypt), and a store opened with
/// another key hands up no value, only the names it cannot read, and keeps them as they are
/// through an update that sends the redacted marker back.
async fn secrets_are_stored_encrypted_and_bound_to_their_tool(backend: common::Backend) {
    let dir = tempfile::tempdir().unwrap();
    let url = scratch_url(backend, dir.path()).await;
    let s = Store::connect(&url, key(7)).await.unwrap();
    let vault = s
        .insert_tool(&secret_spec(
            "vault",
            serde_json::json!({"API_KEY": "sk-live-4242"}),
        ))
        .await
        .unwrap();
    assert_eq!(vault.spec.secret_env["API_KEY"], "sk-live-4242");
    let raw = raw_spec(&url, "vault").await;
    let sealed = raw["secret_env"]["API_KEY"].as_str().unwrap().to_owned();
    assert!(sealed.starts_with("enc:v1:"), "{raw}");
    assert!(!raw.to_string().contains("sk-live-4242"), "{raw}");
    assert_eq!(raw["env"]["PLAIN"], "visible", "only secrets are encrypted");
    let got = s.get_tool("vault").await.unwrap().unwrap();
    assert_eq!(got.spec, vault.spec);
    assert!(got.spec.check_secrets().is_ok());

    let mut changed = got.spec.clone();
    changed
        .secret_env
        .insert("API_KEY".into(), "sk-live-4343".into());
    let updated = s.update_tool(&changed).await.unwrap().unwrap();
    assert_eq!(updated.spec.secret_env["API_KEY"], "sk-live-4343");
    let raw = raw_spec(&url, "vault").await;
    assert!(!raw.to_string().contains("sk-live-4343"), "{raw}");
    let sealed = raw["secret_env"]["API_KEY"].as_str().unwrap().to_owned();

    // The same ciphertext under another tool, or another variable of its own tool, is refused.
    s.insert_tool(&secret_spec("other", serde_json::json!({"TOKEN": "t"})))
        .await
        .unwrap();
    let mut other = raw_spec(&url, "other").await;
    other["secret_env"]["TOKEN"] = sealed.clone().into();
    raw_execute(
        &url,
        format!("UPDATE tools SET spec = '{other}' WHERE slug = 'other'"),
    )
    .await;
    let moved = s.get_tool("other").await.unwrap().unwrap();
    assert!(moved.spec.secret_env.is_empty(), "{:?}", moved.spec);
    assert_eq!(moved.spec.unreadable_secret_env["TOKEN"], sealed);
    let e = moved.spec.check_secrets().unwrap_err().to_string();
    assert!(e.contains("'other'") && e.contains("TOKEN"), "{e}");
    let mut renamed = raw_spec(&url, "vault").await;
    renamed["secret_env"] = serde_json::json!({"API_KEY_2": sealed});
    raw_execute(
        &url,
        format!("UPDATE tools SET spec = '{renamed}' WHERE slug = 'vault'"),
    )
    .await;
    let got = s.get_tool("vault").await.unwrap().unwrap();
    assert!(got.spec.unreadable_secret_env.contains_key("API_KEY_2"));
    renamed["secret_env"] = serde_json::json!({"API_KEY": sealed});
    raw_execute(
        &url,
        format!("UPDATE tools SET spec = '{renamed}' WHERE slug = 'vault'"),
    )
    .await;

    // Another key: nothing decrypts, every such value is named, and an update that sends
    // the redacted marker back keeps the stored value, so the right key still opens it.
    let wrong = Store::connect(&url, key(8)).await.unwrap();
    let seen = wrong.get_tool("vault").await.unwrap().unwrap();
    assert!(seen.spec.secret_env.is_empty(), "{:?}", seen.spec);
    let err = seen.spec.check_secrets().unwrap_err();
    assert_eq!(
        (err.slug.as_str(), err.names.clone()),
        ("vault", vec!["API_KEY".to_owned()])
    );
    let found = wrong.seal_plain_secrets().await.unwrap();
    assert_eq!(found.sealed, 0);
    let names: Vec<(&str, Vec<&str>)> = found
        .unreadable
        .iter()
        .map(|(t, vars)| (t.as_str(), vars.iter().map(|v| v.0.as_str()).collect()))
        .collect();
    assert_eq!(
        names,
        [("other", vec!["TOKEN"]), ("vault", vec!["API_KEY"])]
    );
    let shown = seen.spec.clone().redacted();
    assert_eq!(shown.secret_env["API_KEY"], switchboard::registry::REDACTED);
    let mut update = shown;
    update.description = "changed under the wrong key".into();
    update.keep_secrets_from(&seen.spec);
    wrong.update_tool(&update).await.unwrap().unwrap();
    assert_eq!(
        raw_spec(&url, "vault").await["secret_env"]["API_KEY"],
        sealed.as_str()
    );
    let back = s.get_tool("vault").await.unwrap().unwrap();
    assert_eq!(back.spec.secret_env["API_KEY"], "sk-live-4343");
    assert_eq!(back.spec.description, "changed under the wrong key");
}

/// A database the release before encryption wrote holds `secret_env` in plain text (the
/// rows are written here in that release's shape, straight through sqlx, so the test runs on
/// every backend without the old binary; tests/cli.rs does the same upgrade with the old
/// binary on SQLite): the pass at start encrypts them once, and the tools read the same.
async fn plain_secrets_of_an_earlier_release_are_encrypted_once(backend: common::Backend) {
    let dir = tempfile::tempdir().unwrap();
    let url = scratch_url(backend, dir.path()).await;
    let s = Store::connect(&url, key(7)).await.unwrap();
    let t = "2026-01-02 03:04:05";
    for (slug, secrets) in [
        (
            "legacy",
            r#"{"API_KEY":"old-plain-0001","TOKEN":"old-plain-0002"}"#,
        ),
        ("nosecrets", "{}"),
    ] {
        raw_execute(
            &url,
            format!(
                "INSERT INTO tools (id, slug, spec, created_at, updated_at) VALUES ('{}', \
                 '{slug}', '{{\"slug\":\"{slug}\",\"command\":\"x\",\"secret_env\":{secrets}}}', \
                 '{t}', '{t}')",
                Uuid::new_v4()
            ),
        )
        .await;
    }
    let before = s.get_tool("legacy").await.unwrap().unwrap();
    assert_eq!(
        before.spec.secret_env["API_KEY"], "old-plain-0001",
        "read as it is"
    );
    let found = s.seal_plain_secrets().await.unwrap();
    assert_eq!(found.sealed, 2);
    assert!(found.unreadable.is_empty(), "{found:?}");
    let raw = raw_spec(&url, "legacy").await;
    assert!(!raw.to_string().contains("old-plain-"), "{raw}");
    assert!(
        raw["secret_env"]["TOKEN"]
            .as_str()
            .unwrap()
            .starts_with("enc:v1:")
    );
    let after = s.get_tool("legacy").await.unwrap().unwrap();
    assert_eq!(after.spec, before.spec);
    assert_eq!(
        after.updated_at, before.updated_at,
        "not a change of the tool"
    );
    let again = s.seal_plain_secrets().await.unwrap();
    assert_eq!(again.sealed, 0, "idempotent");
    assert_eq!(raw_spec(&url, "legacy").await, raw);
    if let Some(path) = url.strip_prefix("sqlite://") {
        // No copy of the plain text is left in the file or its WAL (freed space included).
        drop(s);
        for file in [path.to_owned(), format!("{path}-wal")] {
            let bytes = std::fs::read(&file).unwrap_or_default();
            assert!(
                !bytes.windows(10).any(|w| w == b"old-plain-"),
                "{file} still holds a plain-text secret"
            );
        }
    }
}

macro_rules! on_every_backend {
    ($($name:ident),* $(,)?) => {
        mod each_backend {
            $(mod $name {
                #[tokio::test] async fn sqlite() { super::super::$name(crate::common::Backend::Sqlite).await; }
                #[tokio::test] async fn postgres() { super::super::$name(crate::common::Backend::Postgres).await; }
                #[tokio::test] async fn mysql() { super::super::$name(crate::common::Backend::MySql).await; }
            })*
        }
    };
}

on_every_backend!(
    secrets_are_stored_encrypted_and_bound_to_their_tool,
    plain_secrets_of_an_earlier_release_are_encrypted_once,
);
