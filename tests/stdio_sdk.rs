//! Real stdio MCP servers hosted by Switchboard, driven by the official Python SDK client
//! (tests/python/mcp_client.py) through `/mcp/{slug}`: server-everything (npm, stdio mode),
//! server-filesystem (installed by Switchboard from `npx:`) and mcp-server-time (from `uvx:`).
#![allow(clippy::unwrap_used)]

mod common;

use std::{
    io::{BufRead as _, BufReader},
    process::{Command, Stdio},
    time::Duration,
};

use common::{TestApp, alive, server_everything, sigkill};
use reqwest::StatusCode;
use serde_json::{Value, json};

/// mcp_client.py on a legacy session at `url`.
async fn client(url: &str, args: &[&str]) -> Value {
    let mut all = vec!["--url", url, "--era", "legacy"];
    all.extend_from_slice(args);
    common::mcp_client(&all).await
}

async fn add_tool(app: &TestApp, body: Value) {
    let (st, v) = app.call("POST", "/api/v1/tools", Some(body)).await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
}

/// server-everything in stdio mode as a stdio tool, deployed and RUNNING.
async fn deploy_everything_stdio(app: &TestApp, slug: &str) -> Value {
    add_tool(
        app,
        json!({
            "slug": slug,
            "command": server_everything(),
            "args": ["stdio"],
            "transport": "stdio",
            "startup_timeout_ms": 60000,
            "stop_grace_period_ms": 5000,
        }),
    )
    .await;
    let d = app.deploy_wait(slug).await;
    assert_eq!(d["status"], "RUNNING", "{d}");
    d
}

fn text_of(result: &Value) -> String {
    result["content"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|c| c["text"].as_str())
        .collect::<Vec<_>>()
        .join("\n")
}

#[tokio::test]
async fn server_everything_over_stdio_lists_calls_and_reports_progress() {
    let app = TestApp::start().await;
    let d = deploy_everything_stdio(&app, "everything").await;
    let url = format!("{}/mcp/everything", app.url);

    let tools = client(&url, &["list-tools"]).await;
    assert_eq!(tools["server_name"], "mcp-servers/everything", "{tools}");
    let names: Vec<&str> = tools["tools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    assert!(
        names.contains(&"echo") && names.contains(&"get-sum"),
        "{names:?}"
    );

    // Health: a ping on the server's pipe; the name comes from the first session's handshake.
    let (st, h) = app
        .call(
            "POST",
            &format!("/api/v1/deployments/{}/health", d["id"].as_str().unwrap()),
            None,
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{h}");
    assert_eq!(
        (
            h["status"].as_str(),
            h["era"].as_str(),
            h["server_name"].as_str()
        ),
        (
            Some("HEALTHY"),
            Some("legacy"),
            Some("mcp-servers/everything")
        ),
        "{h}"
    );

    let sum = client(
        &url,
        &["call-tool", "get-sum", "--args", r#"{"a":2,"b":40}"#],
    )
    .await;
    assert!(text_of(&sum["result"]).contains("42"), "{sum}");

    let p = client(
        &url,
        &[
            "progress",
            "--tool",
            "trigger-long-running-operation",
            "--args",
            r#"{"duration":2,"steps":4}"#,
        ],
    )
    .await;
    let progress: Vec<f64> = p["progress"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["progress"].as_f64().unwrap())
        .collect();
    assert_eq!(progress, vec![1.0, 2.0, 3.0, 4.0], "{p}");
    assert!(
        text_of(&p["result"]).contains("Long running operation completed"),
        "{p}"
    );
}

#[tokio::test]
async fn server_to_client_requests_reach_their_session_and_answers_go_back() {
    let app = TestApp::start().await;
    deploy_everything_stdio(&app, "everything").await;
    let url = format!("{}/mcp/everything", app.url);

    // Sampling: the server asks the client (on the tool call's stream); the client's answer
    // goes back to that server process and ends up in the tool's result.
    let s = client(&url, &["sampling", "--marker", "MK-sampling-7"]).await;
    assert_eq!(s["callback_invoked"], true, "{s}");
    assert_eq!(s["marker_in_result"], true, "{s}");
    let e = client(&url, &["elicitation", "--marker", "MK-elicit-7"]).await;
    assert_eq!(e["callback_invoked"], true, "{e}");
    assert_eq!(e["marker_in_result"], true, "{e}");
    // roots/list is not tied to a request: it travels on the session's GET stream.
    let r = client(&url, &["roots", "--marker", "MK-roots-7"]).await;
    assert_eq!(r["ok"], true, "{r}");
}

#[tokio::test]
async fn twenty_concurrent_sessions_get_their_own_replies() {
    let app = TestApp::start().await;
    let d = deploy_everything_stdio(&app, "everything").await;
    let url = format!("{}/mcp/everything", app.url);
    let out = client(
        &url,
        &[
            "--timeout",
            "120",
            "concurrent",
            "--sessions",
            "20",
            "--calls",
            "5",
            "--parallel",
        ],
    )
    .await;
    assert_eq!(out["ok"], true, "{out}");
    assert_eq!(out["crossed"], 0, "{out}");
    assert_eq!(out["ok_calls"], 100, "{out}");
    assert_eq!(out["distinct_session_ids"], 20, "{out}");
    // The client DELETEd its sessions at the end: each one's process is gone with it.
    let path = format!("/api/v1/deployments/{}/sessions", d["id"].as_str().unwrap());
    common::eventually(Duration::from_secs(20), || async {
        let (_, v) = app.call("GET", &path, None).await;
        v["sessions"].as_array().is_some_and(Vec::is_empty)
    })
    .await;
}

#[tokio::test]
async fn a_child_killed_mid_request_gives_a_clean_error_and_the_next_session_works() {
    let app = TestApp::start().await;
    let d = deploy_everything_stdio(&app, "everything").await;
    let id = d["id"].as_str().unwrap().to_owned();
    let url = format!("{}/mcp/everything", app.url);

    let mut child = Command::new(common::python())
        .arg(common::mcp_client_script())
        .args([
            "--url",
            &url,
            "--era",
            "legacy",
            "hold-call",
            "--call-timeout",
            "60",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Value>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Ok(v) = serde_json::from_str::<Value>(&line) {
                let _ = tx.send(v);
            }
        }
    });
    let next = async |rx: &mut tokio::sync::mpsc::UnboundedReceiver<Value>| {
        tokio::time::timeout(Duration::from_secs(90), rx.recv())
            .await
            .expect("mcp_client.py hold-call went silent")
            .expect("mcp_client.py hold-call ended early")
    };
    let session = next(&mut rx).await;
    assert_eq!(session["event"], "session", "{session}");
    let sid = session["session_id"].as_str().unwrap().to_owned();
    loop {
        let e = next(&mut rx).await;
        if e["event"] == "progress" {
            break;
        }
        assert!(
            ["calling", "call_accepted"].contains(&e["event"].as_str().unwrap()),
            "{e}"
        );
    }
    // The call is in flight and reporting progress: kill the process serving this session.
    let (_, v) = app
        .call("GET", &format!("/api/v1/deployments/{id}/sessions"), None)
        .await;
    let victim = v["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == sid.as_str())
        .unwrap_or_else(|| panic!("session {sid} not listed: {v}"))["pid"]
        .as_u64()
        .unwrap();
    let victim = u32::try_from(victim).unwrap();
    sigkill(i32::try_from(victim).unwrap());

    let failed = next(&mut rx).await;
    assert_eq!(failed["event"], "call_failed", "{failed}");
    assert_eq!(failed["clean"], true, "{failed}");
    assert_eq!(
        failed["code"], -32603,
        "Switchboard's JSON-RPC error: {failed}"
    );
    assert!(
        failed["message"]
            .as_str()
            .unwrap()
            .contains("ended before replying"),
        "{failed}"
    );
    let same = next(&mut rx).await;
    assert_eq!(same["event"], "same_session", "{same}");
    assert_eq!(
        same["ok"], false,
        "the dead session must not answer: {same}"
    );
    let fresh = next(&mut rx).await;
    assert_eq!(fresh["event"], "new_session", "{fresh}");
    assert_eq!(fresh["ok"], true, "{fresh}");
    let done = next(&mut rx).await;
    assert_eq!(done["ok"], true, "{done}");
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success());
    assert!(!alive(victim));
    // One session died, not the deployment.
    let d = app.deployment(&id).await;
    assert_eq!(
        (d["status"].as_str(), d["restart_count"].as_u64()),
        (Some("RUNNING"), Some(0))
    );
}

#[tokio::test]
async fn server_filesystem_from_npx_serves_a_temporary_directory() {
    let app = TestApp::start().await;
    let root = tempfile::tempdir().unwrap();
    std::fs::write(root.path().join("hello.txt"), "hello from disk\n").unwrap();
    let root_s = root.path().to_str().unwrap();
    add_tool(
        &app,
        json!({
            "slug": "fs",
            "command": "npx:@modelcontextprotocol/server-filesystem@2026.8.31",
            "args": [root_s],
            "transport": "stdio",
            "startup_timeout_ms": 60000,
        }),
    )
    .await;
    let d = app.deploy_wait("fs").await;
    assert_eq!(d["status"], "RUNNING", "{d}");
    let id = d["id"].as_str().unwrap().to_owned();
    let log = app.logs(&id, 2000).await;
    assert!(
        log.contains("installed npx:@modelcontextprotocol/server-filesystem@2026.8.31"),
        "install progress in the deployment log:\n{log}"
    );
    let installed = app
        .data_dir
        .path()
        .join("packages/npm/@modelcontextprotocol+server-filesystem@2026.8.31");
    assert!(installed.is_dir(), "{} missing", installed.display());

    let url = format!("{}/mcp/fs", app.url);
    let tools = client(&url, &["list-tools"]).await;
    assert_eq!(tools["server_name"], "secure-filesystem-server", "{tools}");
    let path = root.path().join("hello.txt");
    let read = client(
        &url,
        &[
            "call-tool",
            "read_text_file",
            "--args",
            &json!({"path": path}).to_string(),
        ],
    )
    .await;
    assert_eq!(text_of(&read["result"]), "hello from disk\n", "{read}");
    let written = root.path().join("new.txt");
    let w = client(
        &url,
        &[
            "call-tool",
            "write_file",
            "--args",
            &json!({"path": written, "content": "written through switchboard"}).to_string(),
        ],
    )
    .await;
    assert_ne!(w["result"]["isError"], true, "{w}");
    assert_eq!(
        std::fs::read_to_string(&written).unwrap(),
        "written through switchboard"
    );
    // Outside the allowed directory: the server refuses (a tool error, not a transport one).
    let outside = client(
        &url,
        &[
            "call-tool",
            "read_text_file",
            "--args",
            r#"{"path":"/etc/hostname"}"#,
        ],
    )
    .await;
    assert_eq!(outside["result"]["isError"], true, "{outside}");

    // A second deployment uses the install: no installer runs.
    app.stop_deployment(&id).await;
    let d2 = app.deploy_wait("fs").await;
    assert_eq!(d2["status"], "RUNNING", "{d2}");
    let log2 = app.logs(d2["id"].as_str().unwrap(), 2000).await;
    assert!(!log2.contains("installing npm package"), "{log2}");
}

#[tokio::test]
async fn mcp_server_time_from_uvx_answers_in_both_eras() {
    let app = TestApp::start().await;
    add_tool(
        &app,
        json!({
            "slug": "time",
            "command": "uvx:mcp-server-time==2026.10.19",
            "transport": "stdio",
            "startup_timeout_ms": 60000,
        }),
    )
    .await;
    let d = app.deploy_wait("time").await;
    assert_eq!(d["status"], "RUNNING", "{d}");
    let url = format!("{}/mcp/time", app.url);
    for era in ["legacy", "2026-07-28"] {
        let mut cmd = Command::new(common::python());
        let mode = if era == "legacy" { "legacy" } else { "modern" };
        cmd.arg(common::mcp_client_script()).args([
            "--url",
            &url,
            "--era",
            mode,
            "call-tool",
            "get_current_time",
            "--args",
            r#"{"timezone":"UTC"}"#,
        ]);
        let out = tokio::task::spawn_blocking(move || cmd.output())
            .await
            .unwrap()
            .unwrap();
        assert!(
            out.status.success(),
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["server_name"], "mcp-time", "{v}");
        assert_eq!(
            v["protocol_version"],
            if era == "legacy" {
                "2025-11-25"
            } else {
                "2026-07-28"
            },
            "{v}"
        );
        let text = text_of(&v["result"]);
        let now: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(now["timezone"], "UTC", "{v}");
    }
    let (_, s) = app
        .call(
            "GET",
            &format!("/api/v1/deployments/{}/sessions", d["id"].as_str().unwrap()),
            None,
        )
        .await;
    assert_eq!(s["era"], "modern", "a dual-era server: {s}");
}

#[tokio::test]
async fn package_installs_fail_clearly() {
    // An unreachable registry.
    let app = TestApp::with(common::AppOptions {
        registries: switchboard::packages::Registries {
            npm: Some("http://127.0.0.1:1/".into()),
            pypi_index: Some("http://127.0.0.1:1/simple".into()),
        },
        ..Default::default()
    })
    .await;
    for (slug, command) in [
        (
            "npm-down",
            "npx:@modelcontextprotocol/server-everything@2026.8.31",
        ),
        ("pypi-down", "uvx:mcp-server-time==2026.10.19"),
    ] {
        add_tool(
            &app,
            json!({"slug": slug, "command": command, "args": ["stdio"], "transport": "stdio"}),
        )
        .await;
        let d = app.deploy_wait(slug).await;
        assert_eq!(d["status"], "FAILED", "{d}");
        let err = d["error"].as_str().unwrap();
        assert!(
            err.contains("cannot reach the package registry") && err.contains("127.0.0.1:1"),
            "{d}"
        );
    }
    // A package that does not exist (the real registry).
    let app = TestApp::start().await;
    add_tool(
        &app,
        json!({"slug": "ghost", "command": "npx:@modelcontextprotocol/switchboard-no-such-server@1.0.0",
               "transport": "stdio"}),
    )
    .await;
    let d = app.deploy_wait("ghost").await;
    assert_eq!(d["status"], "FAILED", "{d}");
    let err = d["error"].as_str().unwrap();
    assert!(
        err.contains("does not exist") && err.contains("switchboard-no-such-server"),
        "{d}"
    );
    // A malformed package name is refused when the tool is registered.
    let (st, v) = app
        .call(
            "POST",
            "/api/v1/tools",
            Some(json!({"slug": "bad", "command": "npx:--registry=evil", "transport": "stdio"})),
        )
        .await;
    assert_eq!(st, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    assert_eq!(v["error"]["code"], "invalid_tool", "{v}");
}
