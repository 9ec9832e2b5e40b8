//! stdio MCP servers hosted by Switchboard (`transport = "stdio"`, the bridge in src/stdio):
//! the repo's rmcp test server run in stdio mode (both protocol eras), reached over HTTP through
//! Switchboard's proxy. Real processes throughout; the Python SDK and third-party servers are
//! in tests/stdio_sdk.rs.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{
    TestApp, alive, eventually, legacy_session, mcp_rpc, sigkill, sse_messages, test_server_bin,
    whoami, whoami_in_session,
};
use reqwest::StatusCode;
use serde_json::{Value, json};

/// Registers the test server as a stdio tool (extra fields merged into the definition).
/// Registers and deploys a stdio tool (see [`add_stdio_tool`]) and opens a legacy session on
/// it: the deployment's id, the tool's URL and the session id.
async fn stdio_session(
    app: &TestApp,
    slug: &str,
    extra_args: &[&str],
    extra: Value,
) -> (String, String, String) {
    add_stdio_tool(app, slug, extra_args, extra).await;
    let d = app.deploy_wait(slug).await;
    let id = d["id"].as_str().unwrap().to_owned();
    let url = format!("{}/mcp/{slug}", app.url);
    let sid = legacy_session(&url).await;
    (id, url, sid)
}

async fn add_stdio_tool(app: &TestApp, slug: &str, extra_args: &[&str], extra: Value) {
    let mut args = vec!["--stdio".to_owned()];
    args.extend(extra_args.iter().map(|a| a.to_string()));
    let mut body = json!({
        "slug": slug,
        "command": test_server_bin(),
        "args": args,
        "transport": "stdio",
        "startup_timeout_ms": 15000,
        "stop_grace_period_ms": 3000,
    });
    if let (Value::Object(b), Value::Object(e)) = (&mut body, extra) {
        b.extend(e);
    }
    let (st, v) = app.call("POST", "/api/v1/tools", Some(body)).await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
}

async fn sessions(app: &TestApp, id: &str) -> Value {
    let (st, v) = app
        .call("GET", &format!("/api/v1/deployments/{id}/sessions"), None)
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    v
}

fn ppid(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn pid_of(v: &Value) -> u32 {
    u32::try_from(v["pid"].as_u64().unwrap()).unwrap()
}

fn pids(v: &Value) -> Vec<u32> {
    v["processes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| u32::try_from(p.as_u64().unwrap()).unwrap())
        .collect()
}

fn initialize() -> Value {
    json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-11-25", "capabilities": {},
        "clientInfo": {"name": "switchboard-tests", "version": "0"}}})
}

/// Requests in flight on one session, as the sessions view says.
async fn in_flight_of(app: &TestApp, id: &str, sid: &str) -> Option<u64> {
    sessions(app, id).await["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == sid)
        .and_then(|s| s["in_flight"].as_u64())
}

/// Starts the test server's `sleep` tool on a legacy session in the background and returns
/// once the bridge has it in flight; the task yields the call's outcome.
async fn slow_call(
    app: &TestApp,
    id: &str,
    url: &str,
    sid: &str,
    request_id: Value,
    ms: u64,
) -> tokio::task::JoinHandle<(StatusCode, reqwest::header::HeaderMap, Option<Value>)> {
    let call = json!({"jsonrpc": "2.0", "id": request_id, "method": "tools/call",
        "params": {"name": "sleep", "arguments": {"ms": ms}}});
    let (u, s) = (url.to_owned(), sid.to_owned());
    let task = tokio::spawn(async move {
        mcp_rpc(
            &u,
            &call,
            &[
                ("mcp-session-id", &s),
                ("mcp-protocol-version", "2025-11-25"),
            ],
        )
        .await
    });
    eventually(Duration::from_secs(10), || async {
        in_flight_of(app, id, sid).await == Some(1)
    })
    .await;
    task
}

/// Opens a legacy session's standalone (GET) stream; the response is the open stream.
async fn open_stream(app: &TestApp, url: &str, sid: &str) -> reqwest::Response {
    let resp = app
        .http
        .get(url)
        .header("accept", "text/event-stream")
        .header("mcp-session-id", sid)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    resp
}

#[tokio::test]
async fn a_stdio_server_is_served_in_both_eras_without_a_port() {
    let app = TestApp::start().await;
    add_stdio_tool(&app, "io", &[], json!({})).await;
    let d = app.deploy_wait("io").await;
    assert_eq!(d["status"], "RUNNING", "{d}");
    assert_eq!(
        d["port"],
        Value::Null,
        "a stdio deployment takes no port: {d}"
    );
    let url = format!("{}/mcp/io", app.url);
    let id = d["id"].as_str().unwrap();
    assert_eq!(d["endpoint_url"], format!("{url}/@{id}"), "{d}");
    let bridge = pid_of(&d["instance"]);

    // Modern (stateless) requests go to the pool; its processes are the bridge's children.
    let me = whoami(&url).await;
    assert_eq!(me["tool"], "io");
    assert_eq!(me["deployment"], id);
    let pooled = pid_of(&me);
    assert_ne!(pooled, bridge);
    assert_eq!(
        ppid(pooled),
        Some(bridge),
        "pool process not the bridge's child"
    );

    // Each legacy session has a process of its own.
    let s1 = legacy_session(&url).await;
    let s2 = legacy_session(&url).await;
    assert_ne!(s1, s2);
    let p1 = pid_of(&whoami_in_session(&url, &s1).await.unwrap());
    let p2 = pid_of(&whoami_in_session(&url, &s2).await.unwrap());
    assert_ne!(p1, p2, "two sessions share a process");
    assert!(
        p1 != pooled && p2 != pooled,
        "a session runs on the shared pool"
    );
    assert_eq!(
        pid_of(&whoami_in_session(&url, &s1).await.unwrap()),
        p1,
        "a session's requests all reach its own process"
    );

    let view = sessions(&app, id).await;
    assert_eq!(view["era"], "modern", "{view}");
    // A health check probes the server on its pipe and says who answered.
    let (st, h) = app
        .call("POST", &format!("/api/v1/deployments/{id}/health"), None)
        .await;
    assert_eq!(st, StatusCode::OK, "{h}");
    assert_eq!(h["status"], "HEALTHY", "{h}");
    assert_eq!(h["era"], "modern", "{h}");
    assert_eq!(h["server_name"], "switchboard-test-server", "{h}");
    let listed: Vec<(String, u32)> = view["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["id"].as_str().unwrap().to_owned(), pid_of(s)))
        .collect();
    assert_eq!(listed, vec![(s1.clone(), p1), (s2.clone(), p2)], "{view}");
    let all = pids(&view);
    assert!(all.contains(&pooled) && all.contains(&p1), "{view}");
    // The CLI's view of the same.
    let out = tokio::process::Command::new(common::switchboard_bin())
        .args(["--url", &app.url, "sessions", &id[..8]])
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains(&s1) && text.contains(&p2.to_string()),
        "{text}"
    );
    assert!(
        text.contains("2 of at most 100 sessions; era modern"),
        "{text}"
    );

    // DELETE ends the session and its process; the id is then unknown (404).
    let del = app
        .http
        .delete(&url)
        .header("mcp-session-id", &s1)
        .send()
        .await
        .unwrap();
    assert_eq!(del.status(), StatusCode::OK);
    assert_eq!(
        whoami_in_session(&url, &s1).await.unwrap_err(),
        StatusCode::NOT_FOUND
    );
    eventually(Duration::from_secs(10), || async { !alive(p1) }).await;
    assert!(whoami_in_session(&url, &s2).await.is_ok());

    // The bridge's own routes are not reachable through the MCP endpoint.
    for sub in ["sessions", "health"] {
        let r = app.http.get(format!("{url}/{sub}")).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::NOT_FOUND, "/mcp/io/{sub}");
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["error"]["code"], "not_found", "{body}");
    }

    // A request without a session that is neither initialize nor modern is refused.
    let call = json!({"jsonrpc": "2.0", "id": 3, "method": "tools/list"});
    let (st, _, _) = mcp_rpc(&url, &call, &[]).await;
    assert_eq!(st, StatusCode::BAD_REQUEST);

    // Stop takes every process of the deployment and the socket.
    let all = pids(&sessions(&app, id).await);
    app.stop_deployment(id).await;
    for p in all.iter().chain([&bridge]) {
        assert!(!alive(*p), "process {p} outlived the stop");
    }
    let socket = app
        .data_dir
        .path()
        .join("run")
        .join(format!("{}.sock", id.replace('-', "")));
    assert!(!socket.exists(), "{} left behind", socket.display());
}

#[tokio::test]
async fn a_body_that_is_no_json_rpc_message_is_refused_and_the_session_lives_on() {
    let app = TestApp::start().await;
    add_stdio_tool(&app, "strict", &[], json!({})).await;
    app.deploy_wait("strict").await;
    let url = format!("{}/mcp/strict", app.url);
    let sid = legacy_session(&url).await;
    let headers = [
        ("mcp-session-id", sid.as_str()),
        ("mcp-protocol-version", "2025-11-25"),
    ];
    // No string method, no result or error: neither a request, a notification nor a response.
    for bad in [
        json!({"jsonrpc": "2.0"}),
        json!({"jsonrpc": "2.0", "id": 3, "method": 7}),
    ] {
        let (st, _, msg) = mcp_rpc(&url, &bad, &headers).await;
        assert_eq!(st, StatusCode::BAD_REQUEST, "{bad}: {msg:?}");
        let msg = msg.unwrap_or_else(|| panic!("{bad}: no JSON-RPC error"));
        assert_eq!(msg["error"]["code"], -32600, "{bad}: {msg}");
    }
    assert!(whoami_in_session(&url, &sid).await.is_ok());
}

#[tokio::test]
async fn the_session_cap_answers_429() {
    let app = TestApp::start().await;
    add_stdio_tool(&app, "capped", &[], json!({"stdio": {"max_sessions": 2}})).await;
    app.deploy_wait("capped").await;
    let url = format!("{}/mcp/capped", app.url);
    let s1 = legacy_session(&url).await;
    let _s2 = legacy_session(&url).await;
    let (st, h, _) = mcp_rpc(&url, &initialize(), &[]).await;
    assert_eq!(st, StatusCode::TOO_MANY_REQUESTS);
    assert!(h.get("retry-after").is_some(), "{h:?}");
    let resp = app
        .http
        .post(&url)
        .header("accept", "application/json, text/event-stream")
        .json(&initialize())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "too_many_sessions", "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("max_sessions"),
        "{body}"
    );
    // Ending one makes room.
    app.http
        .delete(&url)
        .header("mcp-session-id", &s1)
        .send()
        .await
        .unwrap();
    let _s3 = legacy_session(&url).await;
}

#[tokio::test]
async fn idle_sessions_are_reaped() {
    let app = TestApp::start().await;
    let (id, url, sid) = stdio_session(
        &app,
        "idle",
        &[],
        json!({"stdio": {"session_idle_ms": 1000}}),
    )
    .await;
    let pid = pid_of(&whoami_in_session(&url, &sid).await.unwrap());
    eventually(Duration::from_secs(20), || async {
        sessions(&app, &id).await["sessions"]
            .as_array()
            .unwrap()
            .is_empty()
    })
    .await;
    assert_eq!(
        whoami_in_session(&url, &sid).await.unwrap_err(),
        StatusCode::NOT_FOUND
    );
    eventually(Duration::from_secs(10), || async { !alive(pid) }).await;
    // The log says why (the server's own last words: it saw its input close).
    let log = app.logs(&id, 100).await;
    assert!(log.contains("Closing an idle MCP session"), "{log}");
}

#[tokio::test]
async fn a_killed_child_fails_its_request_and_ends_only_its_session() {
    let app = TestApp::start().await;
    let (id, url, sid) = stdio_session(&app, "crashy", &[], json!({})).await;
    let other = legacy_session(&url).await;
    let victim = pid_of(&whoami_in_session(&url, &sid).await.unwrap());

    let in_flight = slow_call(&app, &id, &url, &sid, json!(41), 120_000).await;
    sigkill(i32::try_from(victim).unwrap());

    let (st, _, msg) = in_flight.await.unwrap();
    assert_eq!(st, StatusCode::OK);
    let msg = msg.expect("the in-flight request gets a JSON-RPC reply");
    assert_eq!(msg["id"], 41, "{msg}");
    assert_eq!(msg["error"]["code"], -32603, "{msg}");
    let text = msg["error"]["message"].as_str().unwrap();
    assert!(
        text.contains("ended before replying") && text.contains("SIGKILL"),
        "{msg}"
    );
    // The session ended with its process: 404 tells the client to initialize again.
    assert_eq!(
        whoami_in_session(&url, &sid).await.unwrap_err(),
        StatusCode::NOT_FOUND
    );
    // The other session and new sessions are untouched; the deployment did not restart.
    assert!(whoami_in_session(&url, &other).await.is_ok());
    let fresh = legacy_session(&url).await;
    let p = pid_of(&whoami_in_session(&url, &fresh).await.unwrap());
    assert_ne!(p, victim);
    let d = app.deployment(&id).await;
    assert_eq!(d["status"], "RUNNING");
    assert_eq!(d["restart_count"], 0, "{d}");
}

#[tokio::test]
async fn stop_closes_stdin_before_any_signal() {
    let app = TestApp::start().await;
    // Servers that ignore SIGTERM: only closing their input (or SIGKILL) ends them.
    let (id, url, sid) = stdio_session(
        &app,
        "polite",
        &["--ignore-sigterm"],
        json!({"stop_grace_period_ms": 30000}),
    )
    .await;
    whoami(&url).await;
    // A client holding its session's GET stream open must not hold up the stop.
    let stream = open_stream(&app, &url, &sid).await;
    let view = sessions(&app, &id).await;
    assert_eq!(view["sessions"][0]["stream_open"], true, "{view}");
    let procs = pids(&view);
    assert!(procs.len() >= 3, "pool, session and spare: {procs:?}");

    app.stop_deployment(&id).await;
    for p in &procs {
        assert!(!alive(*p), "process {p} outlived the stop");
    }
    // The stream ended with the session.
    assert!(stream.text().await.is_ok());
    let log = app.logs(&id, 1000).await;
    let polite = log.matches("stdin closed; exiting").count();
    assert!(
        polite >= procs.len(),
        "{} processes, {polite} ended at end of input:\n{log}",
        procs.len()
    );
}

#[tokio::test]
async fn a_crashed_bridge_is_restarted_and_serves_again() {
    let app = TestApp::start().await;
    add_stdio_tool(&app, "phoenix", &[], json!({})).await;
    let d = app.deploy_wait("phoenix").await;
    let id = d["id"].as_str().unwrap();
    let url = format!("{}/mcp/phoenix", app.url);
    let sid = legacy_session(&url).await;
    let child = pid_of(&whoami_in_session(&url, &sid).await.unwrap());
    sigkill(i32::try_from(pid_of(&d["instance"])).unwrap());
    let d = app
        .wait_record(id, "restarted and RUNNING", |d| {
            d["restart_count"] == 1 && d["status"] == "RUNNING"
        })
        .await;
    assert!(d["last_exit"].as_str().unwrap().contains("SIGKILL"), "{d}");
    // The old session's process saw its input close with the bridge and is gone.
    eventually(Duration::from_secs(10), || async { !alive(child) }).await;
    assert_eq!(
        whoami_in_session(&url, &sid).await.unwrap_err(),
        StatusCode::NOT_FOUND
    );
    assert_eq!(whoami(&url).await["deployment"], id);
    let again = legacy_session(&url).await;
    assert!(whoami_in_session(&url, &again).await.is_ok());
}

#[tokio::test]
async fn a_stdio_deployment_is_adopted_after_switchboard_crashes() {
    let app = TestApp::start().await;
    add_stdio_tool(&app, "kept", &[], json!({})).await;
    let d = app.deploy_wait("kept").await;
    let id = d["id"].as_str().unwrap().to_owned();
    let bridge = pid_of(&d["instance"]);
    let pooled = pid_of(&whoami(&format!("{}/mcp/kept", app.url)).await);
    let before = legacy_session(&format!("{}/mcp/kept", app.url)).await;
    let session_pid = pid_of(
        &whoami_in_session(&format!("{}/mcp/kept", app.url), &before)
            .await
            .unwrap(),
    );

    let dir = app.crash().await;
    let app = TestApp::start_in(dir, common::AppOptions::default()).await;
    let d = app.wait_status(&id, "RUNNING").await;
    assert_eq!(
        pid_of(&d["instance"]),
        bridge,
        "the bridge was adopted, not restarted: {d}"
    );
    assert_eq!(d["restart_count"], 0, "{d}");
    // Same bridge, same pool: the server processes survived Switchboard's crash.
    assert_eq!(
        pid_of(&whoami(&format!("{}/mcp/kept", app.url)).await),
        pooled
    );
    // A session opened before the crash goes on, on the same process: the new proxy does not
    // know it, but the tool's only bridge does.
    assert_eq!(
        pid_of(
            &whoami_in_session(&format!("{}/mcp/kept", app.url), &before)
                .await
                .unwrap()
        ),
        session_pid
    );
    assert_eq!(
        whoami_in_session(&format!("{}/mcp/kept", app.url), "never-minted")
            .await
            .unwrap_err(),
        StatusCode::NOT_FOUND
    );
    let sid = legacy_session(&format!("{}/mcp/kept", app.url)).await;
    assert!(
        whoami_in_session(&format!("{}/mcp/kept", app.url), &sid)
            .await
            .is_ok()
    );
    app.stop_deployment(&id).await;
    assert!(!alive(bridge) && !alive(pooled));
}

#[tokio::test]
async fn a_server_that_cannot_start_is_reported_with_its_own_words() {
    let app = TestApp::start().await;
    // Explains itself on stderr and exits before answering anything.
    let (st, v) = app
        .call(
            "POST",
            "/api/v1/tools",
            Some(json!({
                "slug": "broken",
                "command": "sh",
                "args": ["-c", "echo 'no API key configured' >&2; exit 2"],
                "transport": "stdio",
                "restart": {"policy": "never"},
            })),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    let d = app.deploy_wait("broken").await;
    assert_eq!(d["status"], "FAILED", "{d}");
    let err = d["error"].as_str().unwrap();
    assert!(err.contains("failed to start"), "{d}");
    assert!(
        err.contains("exited with status 2") && err.contains("no API key configured"),
        "the exit and the server's stderr are quoted: {d}"
    );
}

#[tokio::test]
async fn a_server_that_keeps_dying_makes_the_bridge_exit_and_restart() {
    let app = TestApp::start().await;
    // Every process answers for a second, then exits.
    add_stdio_tool(
        &app,
        "mayfly",
        &["--exit-after-ms", "1000"],
        json!({"health": {"interval_ms": 100, "failure_threshold": 50}}),
    )
    .await;
    let d = app.deploy_wait("mayfly").await;
    let id = d["id"].as_str().unwrap();
    // The bridge gives up after its health process died three times in a row (well before
    // the supervisor's 50 failed checks), exits saying so, and is restarted.
    let d = app
        .wait_record(id, "restarted after the server kept exiting", |d| {
            d["restart_count"].as_u64() >= Some(1)
        })
        .await;
    let why = d["last_exit"].as_str().unwrap();
    assert!(why.contains("keeps exiting"), "{d}");
    assert!(why.contains("exited with status 3"), "{d}");
}

/// Every JSON-RPC message of a modern (stateless) request's response stream.
async fn modern_messages(url: &str, body: &Value) -> Vec<Value> {
    let resp = reqwest::Client::builder()
        .no_proxy()
        .build()
        .unwrap()
        .post(url)
        .header("accept", "application/json, text/event-stream")
        .header("mcp-protocol-version", "2026-07-28")
        .header("mcp-method", "tools/call")
        .header("mcp-name", "count")
        .json(body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    sse_messages(&resp.text().await.unwrap())
}

#[tokio::test]
async fn shared_processes_keep_each_clients_ids_and_progress_apart() {
    let app = TestApp::start().await;
    // One process shared by every stateless request.
    add_stdio_tool(&app, "shared", &[], json!({"stdio": {"pool_size": 1}})).await;
    app.deploy_wait("shared").await;
    let url = format!("{}/mcp/shared", app.url);
    // Ten clients at once, all using request id 7 and progress token 1 (each is entitled to):
    // the bridge must give each its own replies and progress, with its own id and token.
    let calls = (1..=10u64).map(|n| {
        let url = url.clone();
        tokio::spawn(async move {
            let body = json!({"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": {
            "name": "count", "arguments": {"n": n},
            "_meta": {
                "progressToken": 1,
                "io.modelcontextprotocol/protocolVersion": "2026-07-28",
                "io.modelcontextprotocol/clientCapabilities": {}
            }}});
            (n, modern_messages(&url, &body).await)
        })
    });
    for call in calls {
        let (n, msgs) = call.await.unwrap();
        let (progress, rest): (Vec<&Value>, Vec<&Value>) = msgs
            .iter()
            .partition(|m| m["method"] == "notifications/progress");
        let seen: Vec<u64> = progress
            .iter()
            .map(|p| {
                assert_eq!(p["params"]["progressToken"], 1, "token mapped back: {p}");
                assert_eq!(p["params"]["total"].as_f64(), Some(n as f64), "{p}");
                p["params"]["progress"].as_f64().unwrap() as u64
            })
            .collect();
        assert_eq!(seen, (1..=n).collect::<Vec<_>>(), "request {n}: {msgs:?}");
        assert_eq!(rest.len(), 1, "{msgs:?}");
        assert_eq!(rest[0]["id"], 7, "id mapped back: {msgs:?}");
        assert_eq!(
            rest[0]["result"]["content"][0]["text"],
            format!("counted {n}"),
            "{msgs:?}"
        );
    }
}

/// The bridge's children that are MCP servers (its log writer is a child too).
fn server_children(bridge: u32) -> Vec<u32> {
    let mut out: Vec<u32> = std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|p| ppid(*p) == Some(bridge) && alive(*p))
        .filter(|p| {
            !std::fs::read(format!("/proc/{p}/cmdline"))
                .unwrap_or_default()
                .split(|b| *b == 0)
                .any(|a| a == b"__log")
        })
        .collect();
    out.sort_unstable();
    out
}

#[tokio::test]
async fn concurrent_session_opens_leave_no_untracked_process() {
    let app = TestApp::start().await;
    add_stdio_tool(&app, "burst", &[], json!({})).await;
    let d = app.deploy_wait("burst").await;
    let id = d["id"].as_str().unwrap();
    let bridge = pid_of(&d["instance"]);
    let url = format!("{}/mcp/burst", app.url);
    for _ in 0..3 {
        let opens: Vec<_> = (0..8)
            .map(|_| {
                let url = url.clone();
                tokio::spawn(async move { legacy_session(&url).await })
            })
            .collect();
        for o in opens {
            o.await.unwrap();
        }
    }
    let view = sessions(&app, id).await;
    assert_eq!(view["sessions"].as_array().unwrap().len(), 24, "{view}");
    let mut tracked = pids(&view);
    tracked.sort_unstable();
    // 24 sessions, the 2 pool processes (the first also answers health probes), 1 spare.
    assert_eq!(tracked.len(), 27, "{view}");
    assert_eq!(
        server_children(bridge),
        tracked,
        "every server process is accounted for"
    );
}

#[tokio::test]
async fn a_cancelled_request_ends_its_stream() {
    let app = TestApp::start().await;
    let (id, url, sid) = stdio_session(&app, "cancel", &[], json!({})).await;
    let in_flight = slow_call(&app, &id, &url, &sid, json!("slow-1"), 600_000).await;
    let cancel = json!({"jsonrpc": "2.0", "method": "notifications/cancelled",
        "params": {"requestId": "slow-1", "reason": "user gave up"}});
    let (st, _, _) = mcp_rpc(
        &url,
        &cancel,
        &[
            ("mcp-session-id", &sid),
            ("mcp-protocol-version", "2025-11-25"),
        ],
    )
    .await;
    assert_eq!(st, StatusCode::ACCEPTED);
    // The server sends nothing for a cancelled request; its stream still ends.
    let (st, _, msg) = tokio::time::timeout(Duration::from_secs(30), in_flight)
        .await
        .expect("the cancelled request's stream stayed open")
        .unwrap();
    assert_eq!(st, StatusCode::OK);
    assert!(msg.is_none(), "no reply for a cancelled request: {msg:?}");
    eventually(Duration::from_secs(10), || async {
        in_flight_of(&app, &id, &sid).await == Some(0)
    })
    .await;
    assert!(whoami_in_session(&url, &sid).await.is_ok());
}

#[tokio::test]
async fn replacing_dead_pool_processes_keeps_the_pool_its_size() {
    let app = TestApp::start().await;
    add_stdio_tool(&app, "pool", &[], json!({"stdio": {"pool_size": 2}})).await;
    let d = app.deploy_wait("pool").await;
    let id = d["id"].as_str().unwrap();
    let url = format!("{}/mcp/pool", app.url);
    whoami(&url).await;
    let first = pids(&sessions(&app, id).await);
    assert_eq!(first.len(), 2, "{first:?}");
    // Both pool processes die (the first also answers health probes); a request replaces
    // them, then a health check must find the replacement, not start a third.
    for p in &first {
        sigkill(i32::try_from(*p).unwrap());
    }
    // Dead, and seen to be by the bridge (it learns of an exit when the pipes close).
    eventually(Duration::from_secs(10), || async {
        let listed = pids(&sessions(&app, id).await);
        first.iter().all(|p| !alive(*p) && !listed.contains(p))
    })
    .await;
    assert_eq!(whoami(&url).await["tool"], "pool");
    let (st, h) = app
        .call("POST", &format!("/api/v1/deployments/{id}/health"), None)
        .await;
    assert_eq!(st, StatusCode::OK, "{h}");
    assert_eq!(h["status"], "HEALTHY", "{h}");
    let now = pids(&sessions(&app, id).await);
    assert_eq!(now.len(), 2, "the pool grew: {now:?}");
    assert!(now.iter().all(|p| !first.contains(p)), "{now:?}");
    assert_eq!(server_children(pid_of(&d["instance"])), {
        let mut n = now.clone();
        n.sort_unstable();
        n
    });
}

#[tokio::test]
async fn concurrent_opens_at_the_cap_admit_exactly_max_sessions() {
    let app = TestApp::start().await;
    add_stdio_tool(&app, "full", &[], json!({"stdio": {"max_sessions": 2}})).await;
    let d = app.deploy_wait("full").await;
    let id = d["id"].as_str().unwrap();
    let url = format!("{}/mcp/full", app.url);
    // Rounds of simultaneous opens from an empty bridge: each round, exactly the cap gets in
    // and everyone else gets 429 (never the cap plus one, whatever the interleaving).
    for round in 0..10 {
        let opens: Vec<_> = (0..12)
            .map(|_| {
                let url = url.clone();
                tokio::spawn(async move { mcp_rpc(&url, &initialize(), &[]).await })
            })
            .collect();
        let mut admitted = Vec::new();
        let mut refused = 0;
        for o in opens {
            let (st, h, msg) = o.await.unwrap();
            match st {
                StatusCode::OK => admitted.push(
                    h.get("mcp-session-id")
                        .unwrap_or_else(|| panic!("no session id: {msg:?}"))
                        .to_str()
                        .unwrap()
                        .to_owned(),
                ),
                StatusCode::TOO_MANY_REQUESTS => refused += 1,
                other => panic!("round {round}: unexpected {other}: {msg:?}"),
            }
        }
        let view = sessions(&app, id).await;
        assert_eq!(
            (admitted.len(), refused),
            (2, 10),
            "round {round}: admitted {admitted:?}; {view}"
        );
        assert_eq!(view["sessions"].as_array().unwrap().len(), 2, "{view}");
        for sid in &admitted {
            let resp = app
                .http
                .delete(&url)
                .header("mcp-session-id", sid)
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status(), StatusCode::OK);
        }
    }
}

#[tokio::test]
async fn bursty_tools_get_the_spares_they_ask_for() {
    let app = TestApp::start().await;
    add_stdio_tool(
        &app,
        "bursty",
        &[],
        json!({"stdio": {"spares": 3, "pool_size": 1}}),
    )
    .await;
    let d = app.deploy_wait("bursty").await;
    let id = d["id"].as_str().unwrap();
    let bridge = pid_of(&d["instance"]);
    let url = format!("{}/mcp/bursty", app.url);
    let first = legacy_session(&url).await;
    let view = sessions(&app, id).await;
    let mut tracked = pids(&view);
    tracked.sort_unstable();
    // The pool's process (it also answers health probes), the session's, and 3 spares.
    assert_eq!(tracked.len(), 5, "{view}");
    assert_eq!(server_children(bridge), tracked, "{view}");
    let in_use: Vec<u32> = view["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .map(pid_of)
        .chain(std::iter::once(pid_of(&whoami(&url).await)))
        .collect();
    let spares: Vec<u32> = tracked
        .iter()
        .copied()
        .filter(|p| !in_use.contains(p))
        .collect();
    assert_eq!(spares.len(), 3, "{view}");
    // A burst of three sessions is served by the processes already started.
    let burst: Vec<_> = (0..3)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move { legacy_session(&url).await })
        })
        .collect();
    for b in burst {
        let sid = b.await.unwrap();
        assert_ne!(sid, first);
        let p = pid_of(&whoami_in_session(&url, &sid).await.unwrap());
        assert!(
            spares.contains(&p),
            "session {sid} on {p}, not a spare {spares:?}"
        );
    }
    // And the spares are made up again.
    let view = sessions(&app, id).await;
    assert_eq!(pids(&view).len(), 8, "{view}");
    // Out of range is refused with the setting's name.
    let (st, v) = app
        .call(
            "POST",
            "/api/v1/tools",
            Some(
                json!({"slug": "greedy", "command": "x", "transport": "stdio",
                "stdio": {"spares": 65}}),
            ),
        )
        .await;
    assert_eq!(st, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("stdio.spares"),
        "{v}"
    );
}

#[tokio::test]
async fn a_session_whose_stream_broke_in_a_restart_gets_its_idle_time_to_reconnect() {
    let app = TestApp::start().await;
    let (id, url, sid) = stdio_session(
        &app,
        "patient",
        &[],
        json!({"stdio": {"session_idle_ms": 5000}}),
    )
    .await;
    let stream = open_stream(&app, &url, &sid).await;
    // Longer than the idle time: an open stream keeps the session.
    tokio::time::sleep(Duration::from_millis(6000)).await;
    assert_eq!(
        sessions(&app, &id).await["sessions"][0]["stream_open"],
        true
    );

    // Switchboard restarts; the stream breaks with it and the client reconnects a little later.
    let dir = app.crash().await;
    drop(stream);
    let app = TestApp::start_in(dir, common::AppOptions::default()).await;
    app.wait_status(&id, "RUNNING").await;
    eventually(Duration::from_secs(30), || async {
        sessions(&app, &id).await["sessions"][0]["stream_open"] == false
    })
    .await;
    // Two of the reaper's rounds (every idle/4), well inside the idle time since the break.
    tokio::time::sleep(Duration::from_millis(2600)).await;
    let url = format!("{}/mcp/patient", app.url);
    let again = app
        .http
        .get(&url)
        .header("accept", "text/event-stream")
        .header("mcp-session-id", &sid)
        .send()
        .await
        .unwrap();
    assert_eq!(
        again.status(),
        StatusCode::OK,
        "the session was reaped while its client reconnected"
    );
    drop(again);
    app.stop_deployment(&id).await;
}

/// A `sleep` call on a legacy session from a client that takes only JSON (the reply, and so
/// the response headers, come when the call is done).
async fn json_only_sleep(app: &TestApp, url: &str, sid: &str, ms: u64) -> (StatusCode, Value) {
    let resp = app
        .http
        .post(url)
        .header("accept", "application/json")
        .header("mcp-session-id", sid)
        .header("mcp-protocol-version", "2025-11-25")
        .json(&json!({"jsonrpc": "2.0", "id": 5, "method": "tools/call",
            "params": {"name": "sleep", "arguments": {"ms": ms}}}))
        .send()
        .await
        .unwrap();
    let st = resp.status();
    (st, resp.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn a_json_only_clients_long_call_waits_for_the_tools_call_timeout() {
    let mut opts = common::AppOptions::default();
    opts.proxy.header_timeout = Duration::from_millis(500);
    let app = TestApp::with(opts).await;
    add_stdio_tool(&app, "slow", &[], json!({"call_timeout_ms": 60000})).await;
    add_stdio_tool(&app, "hasty", &[], json!({"call_timeout_ms": 500})).await;
    for slug in ["slow", "hasty"] {
        app.deploy_wait(slug).await;
    }
    // Longer than the proxy's header timeout: the tool's own call timeout applies.
    let url = format!("{}/mcp/slow", app.url);
    let sid = legacy_session(&url).await;
    let (st, v) = json_only_sleep(&app, &url, &sid, 3000).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["result"]["content"][0]["text"], "slept 3000 ms", "{v}");
    // And it is a limit: a call longer than it is cut, saying which setting cut it.
    let url = format!("{}/mcp/hasty", app.url);
    let sid = legacy_session(&url).await;
    let (st, v) = json_only_sleep(&app, &url, &sid, 30_000).await;
    assert_eq!(st, StatusCode::GATEWAY_TIMEOUT, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("call_timeout_ms"),
        "{v}"
    );
}

#[tokio::test]
async fn a_server_that_dies_at_start_is_restarted_with_its_own_words_in_last_exit() {
    let app = TestApp::start().await;
    let (st, v) = app
        .call(
            "POST",
            "/api/v1/tools",
            Some(json!({
                "slug": "nodir",
                "command": "sh",
                "args": ["-c", "echo starting up >&2; echo Cannot access directory /srv/shared >&2; exit 1"],
                "transport": "stdio",
                "restart": {"initial_delay_ms": 100, "max_delay_ms": 100},
            })),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    let (st, d) = app
        .call("POST", "/api/v1/tools/nodir/deployments", None)
        .await;
    assert_eq!(st, StatusCode::CREATED, "{d}");
    let id = d["id"].as_str().unwrap().to_owned();
    // What the supervisor records of each failed start is one log line: the bridge's, which
    // must carry the server's own words, not only its exit status.
    let d = app
        .wait_record(&id, "a failed start recorded", |d| {
            d["last_exit"].is_string() || d["status"] == "FAILED"
        })
        .await;
    let said = d["last_exit"]
        .as_str()
        .or(d["error"].as_str())
        .unwrap_or_default();
    assert!(
        said.contains("exited with status 1")
            && said.contains("Cannot access directory /srv/shared"),
        "{d}"
    );
}

#[tokio::test]
async fn a_subscriptions_notifications_reach_its_stream_through_the_pool() {
    use futures_util::StreamExt as _;
    let app = TestApp::start().await;
    add_stdio_tool(&app, "subs", &[], json!({"stdio": {"pool_size": 1}})).await;
    app.deploy_wait("subs").await;
    let url = format!("{}/mcp/subs", app.url);
    // Two listeners on the one shared process, with the same id (each client's own): each
    // gets its subscription's notifications, under its own id.
    let listen = json!({"jsonrpc": "2.0", "id": "listen-1", "method": "subscriptions/listen",
        "params": {"notifications": {"toolsListChanged": true}, "_meta": {
            "io.modelcontextprotocol/protocolVersion": "2026-07-28",
            "io.modelcontextprotocol/clientCapabilities": {}}}});
    let mut open = Vec::new();
    for _ in 0..2 {
        let resp = app
            .http
            .post(&url)
            .header("accept", "application/json, text/event-stream")
            .header("mcp-protocol-version", "2026-07-28")
            .header("mcp-method", "subscriptions/listen")
            .json(&listen)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        open.push(resp);
    }
    for resp in open {
        let mut body = resp.bytes_stream();
        let mut seen = String::new();
        let changed = tokio::time::timeout(Duration::from_secs(20), async {
            while let Some(chunk) = body.next().await {
                seen.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
                let found = seen
                    .lines()
                    .filter_map(|l| l.strip_prefix("data:"))
                    .filter_map(|d| serde_json::from_str::<Value>(d.trim()).ok())
                    .find(|m| m["method"] == "notifications/tools/list_changed");
                if found.is_some() {
                    return found;
                }
            }
            None
        })
        .await;
        let changed = changed
            .unwrap_or_else(|_| panic!("no list_changed on the listen stream: {seen}"))
            .unwrap_or_else(|| panic!("the listen stream ended: {seen}"));
        assert_eq!(
            changed["params"]["_meta"]["io.modelcontextprotocol/subscriptionId"], "listen-1",
            "{changed}"
        );
        // Closing the stream cancels the subscription (2026-07-28).
        drop(body);
    }
}

#[tokio::test]
async fn a_health_probe_queued_behind_a_busy_servers_call_is_not_a_failure() {
    let app = TestApp::start().await;
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/serial_mcp_server.py");
    let (st, v) = app
        .call(
            "POST",
            "/api/v1/tools",
            Some(json!({
                "slug": "serial",
                "command": common::python(),
                "args": [script],
                "transport": "stdio",
                "stdio": {"pool_size": 1},
                // Checks only when asked, each allowed 1 s.
                "health": {"interval_ms": 3_600_000, "timeout_ms": 1000},
            })),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    let d = app.deploy_wait("serial").await;
    assert_eq!(d["status"], "RUNNING", "{d}");
    let id = d["id"].as_str().unwrap().to_owned();
    let url = format!("{}/mcp/serial", app.url);
    // A call much longer than a health check may take, on the one process.
    let call = json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {
        "name": "sleep", "arguments": {"ms": 6000},
        "_meta": {"io.modelcontextprotocol/protocolVersion": "2026-07-28",
                  "io.modelcontextprotocol/clientCapabilities": {}}}});
    let in_flight = tokio::spawn({
        let url = url.clone();
        async move {
            mcp_rpc(
                &url,
                &call,
                &[
                    ("mcp-protocol-version", "2026-07-28"),
                    ("mcp-method", "tools/call"),
                ],
            )
            .await
        }
    });
    eventually(Duration::from_secs(20), || async {
        app.logs(&id, 100)
            .await
            .contains("serial: sleeping 6000 ms")
    })
    .await;
    let (st, h) = app
        .call("POST", &format!("/api/v1/deployments/{id}/health"), None)
        .await;
    assert_eq!(st, StatusCode::OK, "{h}");
    assert_eq!(h["status"], "HEALTHY", "a busy server is not down: {h}");
    assert!(!in_flight.is_finished(), "the check ran after the call");
    let (st, _, msg) = in_flight.await.unwrap();
    assert_eq!(st, StatusCode::OK);
    assert_eq!(
        msg.unwrap()["result"]["content"][0]["text"],
        "slept 6000 ms"
    );
}

#[tokio::test]
async fn a_stalled_standalone_stream_is_closed_not_buffered() {
    let app = TestApp::start().await;
    let (id, url, sid) = stdio_session(&app, "chatty", &[], json!({})).await;
    // A client that opens its session's stream and never reads it.
    let stalled = open_stream(&app, &url, &sid).await;
    // ~100 MB of server messages for that stream: far more than the sockets on the way hold.
    let call = json!({"jsonrpc": "2.0", "id": 3, "method": "tools/call",
        "params": {"name": "chatter", "arguments": {"n": 3000, "bytes": 32768}}});
    let (st, _, msg) = mcp_rpc(
        &url,
        &call,
        &[
            ("mcp-session-id", &sid),
            ("mcp-protocol-version", "2025-11-25"),
        ],
    )
    .await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(msg.unwrap()["result"]["content"][0]["text"], "sent 3000");
    // The bridge closed the stream rather than holding the rest for a client that does not
    // read; the session goes on, and a new stream can be opened.
    eventually(Duration::from_secs(30), || async {
        sessions(&app, &id).await["sessions"][0]["stream_open"] == false
    })
    .await;
    let log = app.logs(&id, 200).await;
    assert!(
        log.contains("stopped reading its session's stream"),
        "{log}"
    );
    drop(stalled);
    assert!(whoami_in_session(&url, &sid).await.is_ok());
    open_stream(&app, &url, &sid).await;
}
