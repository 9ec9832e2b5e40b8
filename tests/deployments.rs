//! Deployments of the real test server through the real API: records, lifecycle, failures,
//! ports and stop.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{AppOptions, TestApp, alive, port_range, read_pids, whoami};
use reqwest::StatusCode;
use serde_json::json;

#[tokio::test]
async fn deployment_record_lifecycle_and_identity() {
    let app = TestApp::start().await;
    app.add_test_tool("ident", &[], json!({})).await;

    let (st, d) = app
        .call("POST", "/api/v1/tools/ident/deployments", None)
        .await;
    assert_eq!(st, StatusCode::CREATED, "{d}");
    let id = d["id"].as_str().unwrap().to_owned();
    assert_eq!(
        d["status"], "STARTING",
        "a new deployment starts as STARTING: {d}"
    );
    assert_eq!(d["health_status"], "UNKNOWN");
    assert!(d["stopped_at"].is_null());
    assert!(d["deployed_at"].is_string());
    let port = d["port"].as_u64().unwrap() as u16;
    assert_eq!(
        d["endpoint_url"],
        format!("{}/mcp/ident/@{id}", app.url),
        "the deployment's own address goes through the proxy: {d}"
    );
    assert!(
        d["instance"]["pid"].as_u64().is_some(),
        "pid recorded at spawn: {d}"
    );

    // The record was committed before the API answered: it is in the file now.
    let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}", app.db_path().display()))
        .await
        .unwrap();
    let (status,): (String,) = sqlx::query_as("SELECT status FROM deployments WHERE id = ?")
        .bind(&id)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(status == "STARTING" || status == "RUNNING", "{status}");

    let d = app.wait_status(&id, "RUNNING").await;
    assert_eq!(d["health_status"], "HEALTHY");
    assert!(d["last_health_check"].is_string());

    let who = whoami(d["endpoint_url"].as_str().unwrap()).await;
    assert_eq!(who["tool"], "ident");
    assert_eq!(who["deployment"], id.as_str());
    assert_eq!(who["pid"], d["instance"]["pid"]);
    assert_eq!(who["port"], port);

    let pid = d["instance"]["pid"].as_u64().unwrap() as u32;
    let stopped = app.stop_deployment(&id).await;
    assert_eq!(stopped["status"], "STOPPED");
    assert!(stopped["stopped_at"].is_string());
    assert!(!alive(pid), "process {pid} survived stop");
    let again = app.stop_deployment(&id).await;
    assert_eq!(
        again, stopped,
        "stopping a stopped deployment returns the same record"
    );

    let (st, listed) = app
        .call("GET", "/api/v1/deployments?tool=ident&status=stopped", None)
        .await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(listed.as_array().unwrap().len(), 1);
    let (_, none) = app
        .call("GET", "/api/v1/deployments?status=RUNNING,STARTING", None)
        .await;
    assert_eq!(none, json!([]));
}

#[tokio::test]
async fn wait_answers_when_running() {
    let app = TestApp::start().await;
    app.add_test_tool("slow", &["--startup-delay-ms", "700"], json!({}))
        .await;
    let d = app.deploy_wait("slow").await;
    assert_eq!(d["status"], "RUNNING", "{d}");
    assert_eq!(d["health_status"], "HEALTHY");
}

#[tokio::test]
async fn exit_during_startup_fails_with_reason_and_log() {
    let app = TestApp::start().await;
    app.add_test_tool(
        "quitter",
        &["--startup-delay-ms", "60000", "--exit-after-ms", "200"],
        json!({"restart": {"policy": "never"}}),
    )
    .await;
    let d = app.deploy_wait("quitter").await;
    assert_eq!(d["status"], "FAILED", "{d}");
    assert_eq!(d["exit_code"], 3);
    let err = d["error"].as_str().unwrap();
    assert!(err.contains("exited (exit status 3)"), "{err}");
    assert!(
        err.contains("exiting after 200 ms as asked"),
        "log tail missing: {err}"
    );
    assert!(d["stopped_at"].is_string());
}

#[tokio::test]
async fn a_server_that_never_answers_times_out() {
    let app = TestApp::start().await;
    app.add_test_tool(
        "mute",
        &["--never-ready", "--pid-file"],
        json!({"startup_timeout_ms": 1500, "restart": {"policy": "never"}}),
    )
    .await;
    // --pid-file needs a value; put it through PUT to keep add_test_tool simple.
    let pids = app.data_dir.path().join("mute.pids");
    let (st, _) = app
        .call(
            "PUT",
            "/api/v1/tools/mute",
            Some(json!({"command": common::test_server_bin(),
                        "args": ["--port", "{port}", "--never-ready", "--pid-file", pids],
                        "startup_timeout_ms": 1500, "restart": {"policy": "never"}})),
        )
        .await;
    assert_eq!(st, StatusCode::OK);
    let d = app.deploy_wait("mute").await;
    assert_eq!(d["status"], "FAILED", "{d}");
    let err = d["error"].as_str().unwrap();
    assert!(
        err.contains("no answer to an MCP request within 1.5 s"),
        "{err}"
    );
    let pid = read_pids(&pids)[0];
    common::eventually(Duration::from_secs(10), || async { !alive(pid) }).await;
}

#[tokio::test]
async fn a_missing_command_fails_clearly() {
    let app = TestApp::start().await;
    let (st, _) = app
        .call(
            "POST",
            "/api/v1/tools",
            Some(
                json!({"slug": "ghost", "command": "/nonexistent/mcp-server", "restart": {"policy": "never"}}),
            ),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED);
    let d = app.deploy_wait("ghost").await;
    assert_eq!(d["status"], "FAILED", "{d}");
    let err = d["error"].as_str().unwrap();
    assert!(err.contains("/nonexistent/mcp-server"), "{err}");
    assert!(err.contains("No such file"), "{err}");

    let (st, _) = app
        .call(
            "POST",
            "/api/v1/tools",
            Some(
                json!({"slug": "nowhere", "command": "true", "working_dir": "/nonexistent/dir", "restart": {"policy": "never"}}),
            ),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED);
    let d = app.deploy_wait("nowhere").await;
    assert_eq!(d["status"], "FAILED", "{d}");
    assert!(
        d["error"].as_str().unwrap().contains("/nonexistent/dir"),
        "{d}"
    );
}

#[tokio::test]
async fn a_crash_after_start_is_recorded_and_frees_the_port() {
    let app = TestApp::with(AppOptions {
        ports: port_range(1),
        ..Default::default()
    })
    .await;
    app.add_test_tool(
        "crashy",
        &["--exit-after-ms", "1500"],
        json!({"restart": {"policy": "never"}}),
    )
    .await;
    let d = app.deploy_wait("crashy").await;
    assert_eq!(d["status"], "RUNNING", "{d}");
    let id = d["id"].as_str().unwrap();
    let d = app.wait_status(id, "FAILED").await;
    assert_eq!(d["exit_code"], 3);
    assert!(
        d["error"]
            .as_str()
            .unwrap()
            .contains("exited (exit status 3)"),
        "{d}"
    );
    // The only port is free again.
    app.add_test_tool("next", &[], json!({})).await;
    let n = app.deploy_wait("next").await;
    assert_eq!(n["status"], "RUNNING", "{n}");
    assert_eq!(n["port"], d["port"]);
}

#[tokio::test]
async fn ports_exhaust_clearly_and_are_reused_after_stop() {
    let range = port_range(2);
    let app = TestApp::with(AppOptions {
        ports: range.clone(),
        ..Default::default()
    })
    .await;
    app.add_test_tool("p", &[], json!({})).await;
    let a = app.deploy_wait("p").await;
    let b = app.deploy_wait("p").await;
    assert_ne!(a["port"], b["port"]);
    let resp = app
        .http
        .post(format!("{}/api/v1/tools/p/deployments", app.url))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(resp.headers().contains_key("retry-after"));
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "ports_exhausted");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains(&range.to_string()),
        "{body}"
    );
    let (_, all) = app.call("GET", "/api/v1/deployments", None).await;
    assert_eq!(
        all.as_array().unwrap().len(),
        2,
        "a refused deploy leaves no record"
    );

    app.stop_deployment(a["id"].as_str().unwrap()).await;
    let c = app.deploy_wait("p").await;
    assert_eq!(c["status"], "RUNNING", "{c}");
    assert_eq!(c["port"], a["port"], "the released port is reused");
}

#[tokio::test]
async fn a_port_held_by_another_process_is_skipped() {
    let range = port_range(2);
    let _squatter = std::net::TcpListener::bind(("127.0.0.1", range.start)).unwrap();
    let app = TestApp::with(AppOptions {
        ports: range.clone(),
        ..Default::default()
    })
    .await;
    app.add_test_tool("s", &[], json!({})).await;
    let d = app.deploy_wait("s").await;
    assert_eq!(d["status"], "RUNNING", "{d}");
    assert_eq!(d["port"], range.end);
}

#[tokio::test]
async fn a_tool_with_live_deployments_cannot_be_deleted() {
    let app = TestApp::start().await;
    app.add_test_tool("busy", &[], json!({})).await;
    let d = app.deploy_wait("busy").await;
    let (st, b) = app.call("DELETE", "/api/v1/tools/busy", None).await;
    assert_eq!(st, StatusCode::CONFLICT, "{b}");
    assert_eq!(b["error"]["code"], "tool_in_use");
    app.stop_deployment(d["id"].as_str().unwrap()).await;
    let (st, _) = app.call("DELETE", "/api/v1/tools/busy", None).await;
    assert_eq!(st, StatusCode::NO_CONTENT);
}

#[tokio::test]
async fn graceful_shutdown_stops_every_deployment() {
    let app = TestApp::start().await;
    let pids = app.data_dir.path().join("tree.pids");
    app.add_test_tool(
        "tree",
        &[
            "--grandchild",
            "--setsid-grandchild",
            "--ignore-sigterm",
            "--pid-file",
            pids.to_str().unwrap(),
        ],
        json!({"stop_grace_period_ms": 300}),
    )
    .await;
    app.add_test_tool("plain", &[], json!({})).await;
    let t = app.deploy_wait("tree").await;
    let p = app.deploy_wait("plain").await;
    let plain_pid = p["instance"]["pid"].as_u64().unwrap() as u32;
    let tree_pids = read_pids(&pids);
    assert_eq!(
        tree_pids.len(),
        3,
        "server and two grandchildren: {tree_pids:?}"
    );
    let data_dir = app.stop().await;

    for pid in tree_pids.iter().chain([&plain_pid]) {
        assert!(
            !alive(*pid),
            "process {pid} outlived Switchboard's shutdown"
        );
    }
    let pool = sqlx::SqlitePool::connect(&format!(
        "sqlite://{}",
        data_dir.path().join("switchboard.db").display()
    ))
    .await
    .unwrap();
    let rows: Vec<(String, String, Option<String>)> =
        sqlx::query_as("SELECT id, status, stopped_at FROM deployments")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(rows.len(), 2);
    for (id, status, stopped_at) in rows {
        assert_eq!(status, "STOPPED", "{id}");
        assert!(stopped_at.is_some(), "{id}");
    }
    let _ = t;
}

#[tokio::test]
async fn a_killed_server_is_restarted_on_its_port_and_the_record_says_so() {
    let app = TestApp::start().await;
    app.add_test_tool("phoenix", &[], json!({})).await;
    let d = app.deploy_wait("phoenix").await;
    let id = d["id"].as_str().unwrap();
    let pid = d["instance"]["pid"].as_u64().unwrap() as i32;
    common::sigkill(pid);
    // The first restart is immediate (no backoff before it).
    let r = app
        .wait_record(id, "RUNNING again", |r| {
            r["status"] == "RUNNING" && r["restart_count"] == 1
        })
        .await;
    assert_eq!(r["port"], d["port"], "a restart keeps the port");
    assert_ne!(r["instance"]["pid"], d["instance"]["pid"]);
    assert_eq!(r["desired"], "RUNNING");
    assert!(r["last_exit"].as_str().unwrap().contains("SIGKILL"), "{r}");
    assert!(!alive(pid as u32));
    // And it serves again through the proxy.
    let who = common::whoami(&format!("{}/mcp/phoenix", app.url)).await;
    assert_eq!(who["deployment"], id, "{who}");
    app.stop().await;
}

#[tokio::test]
async fn a_hung_server_turns_unhealthy_leaves_routing_and_is_restarted() {
    let app = TestApp::start().await;
    app.add_test_tool(
        "hang",
        &[],
        json!({"health": {"interval_ms": 200, "timeout_ms": 150, "failure_threshold": 3}}),
    )
    .await;
    let d = app.deploy_wait("hang").await;
    let id = d["id"].as_str().unwrap();
    let pid = d["instance"]["pid"].as_u64().unwrap() as i32;
    // Alive but not answering: stopped by SIGSTOP.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGSTOP,
    )
    .unwrap();
    let r = app
        .wait_record(id, "restarted after failing its checks", |r| {
            r["restart_count"] == 1
        })
        .await;
    assert!(
        r["last_exit"]
            .as_str()
            .unwrap()
            .contains("failed its health checks"),
        "{r}"
    );
    assert!(!alive(pid as u32), "the hung process was killed");
    let r = app.wait_status(id, "RUNNING").await;
    assert_eq!(r["health_status"], "HEALTHY", "{r}");
    app.stop().await;
}

/// Reads `transition` events from an open `GET /api/v1/events` until `until` holds for one.
async fn events_until(
    stream: &mut (impl futures_util::Stream<Item = reqwest::Result<bytes::Bytes>> + Unpin),
    seen: &mut Vec<serde_json::Value>,
    until: impl Fn(&serde_json::Value) -> bool,
) {
    use futures_util::StreamExt as _;
    let mut parser = switchboard::mcp::sse::Parser::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let chunk = tokio::time::timeout_at(deadline, stream.next())
            .await
            .expect("the awaited event never came")
            .unwrap()
            .unwrap();
        for event in parser.feed(&chunk) {
            let v: serde_json::Value = serde_json::from_str(&event.data).unwrap();
            let done = until(&v);
            seen.push(v);
            if done {
                return;
            }
        }
    }
}

#[tokio::test]
async fn events_stream_every_transition_and_health_checks_run_on_demand() {
    let app = TestApp::start().await;
    app.add_test_tool("ev", &[], json!({})).await;
    app.add_test_tool("other", &[], json!({})).await;
    let resp = reqwest::Client::new()
        .get(format!("{}/api/v1/events?tool=ev", app.url))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let mut stream = Box::pin(resp.bytes_stream());
    app.deploy_wait("other").await;
    let d = app.deploy_wait("ev").await;
    let id = d["id"].as_str().unwrap().to_owned();

    // On demand: the real MCP probe's findings.
    let (st, h) = app
        .call("POST", &format!("/api/v1/deployments/{id}/health"), None)
        .await;
    assert_eq!(st, StatusCode::OK, "{h}");
    assert_eq!(h["status"], "HEALTHY", "{h}");
    assert!(h["era"].is_string(), "{h}");
    assert!(h["protocol_version"].is_string(), "{h}");
    assert!(h["server_name"].is_string(), "{h}");
    assert!(h["latency_ms"].as_f64().unwrap() > 0.0, "{h}");

    let pid = d["instance"]["pid"].as_u64().unwrap() as i32;
    common::sigkill(pid);
    let mut seen = Vec::new();
    // Two RUNNINGs: the deploy's, then the restart's.
    let runnings = std::cell::Cell::new(0);
    events_until(&mut stream, &mut seen, |e| {
        if e["to"] == "RUNNING" {
            runnings.set(runnings.get() + 1);
        }
        runnings.get() == 2
    })
    .await;
    app.stop_deployment(&id).await;
    events_until(&mut stream, &mut seen, |e| e["to"] == "STOPPED").await;
    let path: Vec<String> = seen
        .iter()
        .filter(|e| e["kind"] == "status")
        .map(|e| {
            format!(
                "{}>{}",
                e["from"].as_str().unwrap_or("-"),
                e["to"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(
        path,
        [
            "->STARTING",
            "STARTING>RUNNING",
            "RUNNING>STARTING",
            "STARTING>RUNNING",
            "RUNNING>STOPPED"
        ],
        "{seen:?}"
    );
    assert!(
        seen.iter()
            .all(|e| e["tool"] == "ev" && e["deployment"] == id.as_str()),
        "{seen:?}"
    );
    let restart = &seen[2];
    assert!(
        restart["reason"].as_str().unwrap().contains("SIGKILL"),
        "{restart}"
    );

    // A stopped deployment cannot be checked; an unknown one does not exist.
    let (st, e) = app
        .call("POST", &format!("/api/v1/deployments/{id}/health"), None)
        .await;
    assert_eq!(
        (st, e["error"]["code"].as_str()),
        (StatusCode::CONFLICT, Some("not_live"))
    );
    let (st, e) = app
        .call("POST", "/api/v1/deployments/nope/health", None)
        .await;
    assert_eq!(st, StatusCode::NOT_FOUND, "{e}");
    app.stop().await;
}

#[tokio::test]
async fn a_plain_http_health_path_replaces_the_mcp_probe() {
    let app = TestApp::start().await;
    // The test server's /stats answers a plain GET.
    app.add_test_tool(
        "plain",
        &[],
        json!({"health": {"http_path": "/stats", "interval_ms": 200, "timeout_ms": 150}}),
    )
    .await;
    let d = app.deploy_wait("plain").await;
    assert_eq!(d["status"], "RUNNING", "{d}");
    let id = d["id"].as_str().unwrap();
    let (st, h) = app
        .call("POST", &format!("/api/v1/deployments/{id}/health"), None)
        .await;
    assert_eq!(st, StatusCode::OK, "{h}");
    assert_eq!(h["status"], "HEALTHY", "{h}");
    assert!(h["era"].is_null(), "a plain check speaks no MCP: {h}");

    // A path the server does not have: never ready, and the reason says what was asked.
    app.add_test_tool(
        "wrongpath",
        &[],
        json!({"health": {"http_path": "/nope"}, "startup_timeout_ms": 1000,
               "restart": {"policy": "never"}}),
    )
    .await;
    let d = app.deploy_wait("wrongpath").await;
    assert_eq!(d["status"], "FAILED", "{d}");
    assert!(
        d["error"]
            .as_str()
            .unwrap()
            .contains("GET http://127.0.0.1:"),
        "{d}"
    );
    assert!(
        d["error"].as_str().unwrap().contains("/nope answered 404"),
        "{d}"
    );
    app.stop().await;
}

#[tokio::test]
async fn a_crash_loop_shows_in_the_record_with_the_servers_last_words() {
    let app = TestApp::start().await;
    app.add_test_tool(
        "loop",
        &["--exit-after-ms", "100"],
        // On a loaded machine a start may end before its readiness probe answers; such
        // never-RUNNING starts must not end the loop as FAILED (max_start_failures): this
        // test is about a crash loop's record, not about the start limit.
        json!({"restart": {"initial_delay_ms": 100, "max_delay_ms": 100, "max_start_failures": 100}}),
    )
    .await;
    let d = app.deploy_wait("loop").await;
    let id = d["id"].as_str().unwrap();
    let r = app
        .wait_record(id, "in a crash loop", |r| {
            r["restart_count"].as_u64().unwrap_or(0) >= 2
        })
        .await;
    assert_eq!(r["desired"], "RUNNING", "{r}");
    let last = r["last_exit"].as_str().unwrap();
    assert!(last.contains("exit status 3"), "{r}");
    assert!(last.contains("exiting after 100 ms as asked"), "{r}");
    app.stop().await;
}

#[tokio::test]
async fn a_graceful_exit_removes_the_nodes_empty_cgroup_directory() {
    let app = TestApp::start().await;
    let node = std::fs::read_to_string(app.data_dir.path().join("node-id")).unwrap();
    let dir = switchboard::runtime::cgroup::CgroupRoot::locate(node.trim()).unwrap();
    assert!(
        dir.is_dir(),
        "this machine has cgroup v2 and Switchboard made {}",
        dir.display()
    );
    app.add_test_tool("short", &[], json!({})).await;
    app.deploy_wait("short").await;
    app.stop().await;
    assert!(
        !dir.exists(),
        "{} outlived Switchboard's graceful exit",
        dir.display()
    );
}

/// Deploys without waiting and returns the record's id.
async fn deploy_id(app: &TestApp, slug: &str) -> String {
    let (st, d) = app
        .call("POST", &format!("/api/v1/tools/{slug}/deployments"), None)
        .await;
    assert_eq!(st, StatusCode::CREATED, "{d}");
    d["id"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn a_server_that_never_becomes_ready_is_failed_after_max_start_failures() {
    let app = TestApp::start().await;
    // The default restart policy (on-failure) and the default limit of 3 failed starts.
    app.add_test_tool(
        "mute",
        &["--never-ready"],
        json!({"startup_timeout_ms": 300,
               "restart": {"initial_delay_ms": 100, "max_delay_ms": 100}}),
    )
    .await;
    let resp = reqwest::Client::new()
        .get(format!("{}/api/v1/events?tool=mute", app.url))
        .send()
        .await
        .unwrap();
    let mut stream = Box::pin(resp.bytes_stream());
    let id = deploy_id(&app, "mute").await;
    let d = app.wait_status(&id, "FAILED").await;
    assert_eq!(
        d["restart_count"], 2,
        "three starts, two of them restarts: {d}"
    );
    let err = d["error"].as_str().unwrap();
    assert!(
        err.contains("no answer to an MCP request within 0.3 s"),
        "{err}"
    );
    assert!(
        err.contains("gave up after 3 failed start(s) without ever becoming RUNNING"),
        "{err}"
    );
    assert!(err.contains("restart.max_start_failures = 3"), "{err}");
    assert!(
        d["last_exit"].as_str().unwrap().contains("no answer"),
        "{d}"
    );
    // The event says why too.
    let mut seen = Vec::new();
    events_until(&mut stream, &mut seen, |e| e["to"] == "FAILED").await;
    let failed = seen.last().unwrap();
    assert!(
        failed["reason"]
            .as_str()
            .unwrap()
            .contains("gave up after 3"),
        "{failed}"
    );
    // Its port is free and nothing of it runs.
    let (_, live) = app
        .call("GET", "/api/v1/deployments?status=STARTING,RUNNING", None)
        .await;
    assert_eq!(live.as_array().unwrap().len(), 0, "{live}");
    app.stop().await;
}

#[tokio::test]
async fn a_missing_command_under_the_default_policy_ends_failed() {
    let app = TestApp::start().await;
    app.add_tool(
        json!({"slug": "ghost", "command": "/nonexistent/mcp-server",
                        "restart": {"initial_delay_ms": 100, "max_delay_ms": 100}}),
    )
    .await;
    let id = deploy_id(&app, "ghost").await;
    let d = app.wait_status(&id, "FAILED").await;
    assert_eq!(d["restart_count"], 2, "{d}");
    let err = d["error"].as_str().unwrap();
    assert!(err.contains("/nonexistent/mcp-server"), "{err}");
    assert!(err.contains("gave up after 3 failed start(s)"), "{err}");
    app.stop().await;
}

#[tokio::test]
async fn a_server_that_has_run_keeps_restarting_past_max_start_failures() {
    let app = TestApp::start().await;
    app.add_test_tool(
        "phoenix",
        &[],
        json!({"restart": {"initial_delay_ms": 100, "max_delay_ms": 100,
                           "max_start_failures": 1}}),
    )
    .await;
    let d = app.deploy_wait("phoenix").await;
    let id = d["id"].as_str().unwrap();
    let mut pid = d["instance"]["pid"].as_u64().unwrap();
    for n in 1..=3 {
        common::sigkill(pid as i32);
        let r = app
            .wait_record(id, "RUNNING again", |r| {
                r["status"] == "RUNNING" && r["restart_count"] == n
            })
            .await;
        pid = r["instance"]["pid"].as_u64().unwrap();
    }
    app.stop().await;
}

#[tokio::test]
async fn max_start_failures_is_validated_and_shown() {
    let app = TestApp::start().await;
    let (st, e) = app
        .call(
            "POST",
            "/api/v1/tools",
            Some(json!({"slug": "x", "command": "x",
                        "restart": {"max_start_failures": 0}})),
        )
        .await;
    assert_eq!(st, StatusCode::UNPROCESSABLE_ENTITY, "{e}");
    assert_eq!(e["error"]["code"], "invalid_tool");
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("restart.max_start_failures"),
        "{e}"
    );
    let (_, doc) = app.call("GET", "/api/v1/openapi.json", None).await;
    let field = &doc["components"]["schemas"]["RestartSpec"]["properties"]["max_start_failures"];
    assert!(
        field["description"]
            .as_str()
            .is_some_and(|d| d.contains("never been RUNNING")),
        "{field}"
    );
    app.stop().await;
}

/// One URL for clients, one address per deployment: each replica's `endpoint_url` is its own
/// (through the proxy, never the backend's port) and reaches exactly that replica; the tool's
/// API object names the URL clients should use.
#[tokio::test]
async fn every_deployment_has_an_address_of_its_own_and_the_tool_one_url() {
    let app = TestApp::start().await;
    app.add_test_tool("twins", &[], json!({})).await;
    let a = app.deploy_wait("twins").await;
    let b = app.deploy_wait("twins").await;
    let (ua, ub) = (
        a["endpoint_url"].as_str().unwrap(),
        b["endpoint_url"].as_str().unwrap(),
    );
    assert_ne!(ua, ub);
    for (d, url) in [(&a, ua), (&b, ub)] {
        assert!(
            url.starts_with(&format!("{}/mcp/twins/@", app.url)),
            "{url}"
        );
        for _ in 0..4 {
            let who = whoami(url).await;
            assert_eq!(who["deployment"], d["id"], "{url} reached another replica");
        }
    }
    let (st, tool) = app.call("GET", "/api/v1/tools/twins", None).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(tool["url"], format!("{}/mcp/twins", app.url), "{tool}");
    // An address that names no serving deployment is a clear 404, not another replica.
    let stopped = app.stop_deployment(a["id"].as_str().unwrap()).await;
    let resp = reqwest::Client::new()
        .post(stopped["endpoint_url"].as_str().unwrap())
        .header("content-type", "application/json")
        .body(r#"{"jsonrpc":"2.0","id":1,"method":"ping"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "deployment_not_serving", "{body}");
}
