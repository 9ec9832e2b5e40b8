//! The official Python MCP SDK client (PyPI `mcp`, pinned in tests/python/requirements.txt)
//! through Switchboard's proxy, against the repo's test server and server-everything.
#![allow(clippy::unwrap_used)]

mod common;

use common::{TestApp, tool_names};
use serde_json::{Value, json};

/// Runs tests/python/mcp_client.py; its stdout is one JSON object.
async fn client(args: &[&str]) -> Value {
    common::mcp_client(args).await
}

#[tokio::test]
async fn python_client_lists_and_calls_tools_on_the_test_server_in_both_eras() {
    let app = TestApp::start().await;
    app.add_test_tool("ts", &[], json!({})).await;
    app.deploy_wait("ts").await;
    let url = format!("{}/mcp/ts", app.url);
    for (era, version) in [("legacy", "2025-11-25"), ("modern", "2026-07-28")] {
        let listed = client(&["--url", &url, "--era", era, "list-tools"]).await;
        assert_eq!(listed["protocol_version"], version, "{era}: {listed}");
        let names = tool_names(&listed);
        assert!(
            names.contains(&"whoami".into()) && names.contains(&"echo".into()),
            "{names:?}"
        );
        let called = client(&[
            "--url",
            &url,
            "--era",
            era,
            "call-tool",
            "echo",
            "--args",
            r#"{"text":"hello"}"#,
        ])
        .await;
        assert_eq!(
            called["result"]["content"][0]["text"], "hello",
            "{era}: {called}"
        );
    }
}

#[tokio::test]
async fn python_client_lists_and_calls_tools_on_server_everything() {
    let app = TestApp::start().await;
    app.deploy_everything("ev", "streamableHttp", "/mcp").await;
    let url = format!("{}/mcp/ev", app.url);
    // server-everything speaks only the 2025 era. A modern-era client starts with
    // `server/discover` and falls back to `initialize` (the SDK's auto mode): that fallback
    // must work through the proxy too.
    for era in ["legacy", "auto"] {
        let listed = client(&["--url", &url, "--era", era, "list-tools"]).await;
        assert_eq!(listed["era"], "legacy", "{era}: {listed}");
        assert!(
            tool_names(&listed).contains(&"echo".into()),
            "{era}: {listed}"
        );
        let called = client(&[
            "--url",
            &url,
            "--era",
            era,
            "call-tool",
            "echo",
            "--args",
            r#"{"message":"hi"}"#,
        ])
        .await;
        let text = called["result"]["content"][0]["text"]
            .as_str()
            .unwrap_or_default();
        assert!(text.contains("hi"), "{era}: {called}");
    }
    app.stop().await;
}

#[tokio::test]
async fn progress_notifications_stream_through_as_they_happen() {
    let app = TestApp::start().await;
    app.deploy_everything("ev", "streamableHttp", "/mcp").await;
    let url = format!("{}/mcp/ev", app.url);
    let r = client(&[
        "--url",
        &url,
        "--era",
        "legacy",
        "progress",
        "--tool",
        "trigger-long-running-operation",
        "--args",
        r#"{"duration":4,"steps":4}"#,
    ])
    .await;
    let progress = r["progress"].as_array().unwrap();
    assert_eq!(progress.len(), 4, "{r}");
    // The server emits one notification per second and the result after the last. Had the
    // proxy held the stream back, everything would arrive together with the result.
    let first = progress[0]["at"].as_f64().unwrap();
    let result_at = r["result_at"].as_f64().unwrap();
    assert!(
        result_at - first > 1.5,
        "the first progress notification arrived only {:.2} s before the result: {r}",
        result_at - first
    );
    app.stop().await;
}

#[tokio::test]
async fn python_sse_client_works_through_the_proxy() {
    let app = TestApp::start().await;
    app.deploy_everything("old", "sse", "/sse").await;
    let listed = client(&[
        "--url",
        &format!("{}/mcp/old", app.url),
        "--transport",
        "sse",
        "list-tools",
    ])
    .await;
    assert!(tool_names(&listed).contains(&"echo".into()), "{listed}");
    app.stop().await;
}
