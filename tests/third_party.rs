//! Real third-party MCP servers deployed by Switchboard, and the health probe against both
//! protocol eras.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{TestApp, alive};
use serde_json::json;
use switchboard::{
    deployment::HealthStatus,
    health::{Era, Prober},
};

#[tokio::test]
async fn server_everything_reaches_running_and_stops_cleanly() {
    let app = TestApp::start().await;
    let d = app
        .deploy_everything("everything", "streamableHttp", "/mcp")
        .await;
    assert_eq!(d["health_status"], "HEALTHY");

    let check = Prober::new()
        .check(d["endpoint_url"].as_str().unwrap(), Duration::from_secs(10))
        .await;
    assert_eq!(check.status, HealthStatus::Healthy, "{check:?}");
    assert_eq!(
        check.era,
        Some(Era::Legacy),
        "server-everything speaks the 2025 era: {check:?}"
    );
    assert!(
        check
            .server_name
            .as_deref()
            .unwrap_or_default()
            .contains("everything"),
        "{check:?}"
    );

    let pid = d["instance"]["pid"].as_u64().unwrap() as u32;
    let s = app.stop_deployment(d["id"].as_str().unwrap()).await;
    assert_eq!(s["status"], "STOPPED");
    assert!(s["stopped_at"].is_string());
    assert!(!alive(pid), "server-everything survived stop");
    app.stop().await;
}

#[tokio::test]
async fn the_probe_speaks_the_modern_era_to_a_dual_era_server() {
    let app = TestApp::start().await;
    app.add_test_tool("dual", &[], json!({})).await;
    let d = app.deploy_wait("dual").await;
    let check = Prober::new()
        .check(d["endpoint_url"].as_str().unwrap(), Duration::from_secs(5))
        .await;
    assert_eq!(check.status, HealthStatus::Healthy, "{check:?}");
    assert_eq!(check.era, Some(Era::Modern), "{check:?}");
    assert_eq!(check.protocol_version.as_deref(), Some("2026-07-28"));
    assert_eq!(
        check.server_name.as_deref(),
        Some("switchboard-test-server")
    );
}

#[tokio::test]
async fn the_probe_reports_a_dead_endpoint() {
    let port = common::free_port();
    let check = Prober::new()
        .check(
            &format!("http://127.0.0.1:{port}/mcp"),
            Duration::from_secs(2),
        )
        .await;
    assert_eq!(check.status, HealthStatus::Unhealthy);
    assert!(
        check.error.unwrap().contains("connection"),
        "connect errors are named"
    );
}

#[tokio::test]
async fn server_everything_works_through_the_proxy() {
    let app = TestApp::start().await;
    app.deploy_everything("everything", "streamableHttp", "/mcp")
        .await;
    let url = format!("{}/mcp/everything", app.url);
    let sid = common::legacy_session(&url).await;
    let list = json!({"jsonrpc": "2.0", "id": 3, "method": "tools/list"});
    let (st, _, msg) = common::mcp_rpc(
        &url,
        &list,
        &[
            ("mcp-session-id", &sid),
            ("mcp-protocol-version", "2025-11-25"),
        ],
    )
    .await;
    assert_eq!(st.as_u16(), 200);
    let tools: Vec<String> = msg.unwrap()["result"]["tools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap().to_owned())
        .collect();
    assert!(tools.iter().any(|t| t == "echo"), "{tools:?}");
    app.stop().await;
}

#[tokio::test]
async fn legacy_http_sse_servers_work_through_the_proxy() {
    use futures_util::StreamExt as _;
    let app = TestApp::start().await;
    let d = app.deploy_everything("old", "sse", "/sse").await;
    let check = Prober::new()
        .check(d["endpoint_url"].as_str().unwrap(), Duration::from_secs(10))
        .await;
    assert_eq!(check.era, Some(Era::LegacySse), "{check:?}");

    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let resp = http
        .get(format!("{}/mcp/old", app.url))
        .header("accept", "text/event-stream")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let mut stream = resp.bytes_stream();
    let mut buf = String::new();
    let endpoint = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            buf.push_str(std::str::from_utf8(&stream.next().await.unwrap().unwrap()).unwrap());
            if let Some(line) = buf.lines().find(|l| l.starts_with("data:")) {
                return line.trim_start_matches("data:").trim().to_owned();
            }
        }
    })
    .await
    .unwrap();
    assert!(
        endpoint.starts_with("/mcp/old/message?sessionId="),
        "endpoint not rewritten: {endpoint}"
    );

    let init = json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2024-11-05", "capabilities": {},
        "clientInfo": {"name": "switchboard-tests", "version": "0"}}});
    let r = http
        .post(format!("{}{endpoint}", app.url))
        .json(&init)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 202, "{}", r.text().await.unwrap());
    // The answer comes back on the GET stream, through the proxy.
    tokio::time::timeout(Duration::from_secs(20), async {
        while !buf.contains("\"protocolVersion\"") {
            buf.push_str(std::str::from_utf8(&stream.next().await.unwrap().unwrap()).unwrap());
        }
    })
    .await
    .unwrap();
    assert!(buf.contains("event: message"), "{buf}");
    drop(stream);
    app.stop().await;
}
