//! `GET /metrics`: real traffic, checks and restarts show up, and the output passes
//! `promtool check metrics` (Debian package `prometheus`).
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{TestApp, whoami};
use reqwest::StatusCode;
use serde_json::json;

fn promtool() -> std::path::PathBuf {
    let p = std::path::PathBuf::from("/usr/bin/promtool");
    assert!(
        p.exists(),
        "promtool is missing: apt-get install --no-install-recommends prometheus (scripts/test does this)"
    );
    p
}

fn value(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no series {series} in:\n{text}"))
}

#[tokio::test]
async fn metrics_count_real_traffic_checks_and_restarts_and_pass_promtool() {
    let promtool = promtool();
    let app = TestApp::start().await;
    app.add_test_tool("echo", &[], json!({"health": {"interval_ms": 200}}))
        .await;
    let d = app.deploy_wait("echo").await;
    let id = d["id"].as_str().unwrap().to_owned();
    let url = format!("{}/mcp/echo", app.url);
    for _ in 0..3 {
        whoami(&url).await;
    }
    let get = |path: &str| app.http.get(format!("{}{path}", app.url)).send();
    for _ in 0..2 {
        assert_eq!(get("/mcp/echo/bytes?n=10").await.unwrap().status(), 200);
    }
    // Two health checks at least.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let pid = d["instance"]["pid"].as_u64().unwrap() as i32;
    common::sigkill(pid);
    app.wait_record(&id, "restarted", |r| {
        r["status"] == "RUNNING" && r["restart_count"] == 1
    })
    .await;

    // Prometheus asks for OpenMetrics and gets it.
    let resp = app
        .http
        .get(format!("{}/metrics", app.url))
        .header(
            "accept",
            "application/openmetrics-text;version=1.0.0,text/plain;q=0.5",
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/openmetrics-text")
    );
    assert!(resp.text().await.unwrap().ends_with("# EOF\n"));
    // Anything else gets the classic text format.
    let resp = get("/metrics").await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain; version=0.0.4")
    );
    let text = resp.text().await.unwrap();
    let lbl = format!(r#"tool="echo",deployment="{id}""#);
    assert_eq!(
        value(
            &text,
            &format!(r#"switchboard_proxy_requests_total{{{lbl},method="POST",class="2xx"}}"#)
        ),
        3.0
    );
    assert_eq!(
        value(
            &text,
            &format!(r#"switchboard_proxy_requests_total{{{lbl},method="GET",class="2xx"}}"#)
        ),
        2.0
    );
    assert_eq!(
        value(
            &text,
            &format!("switchboard_proxy_response_header_latency_seconds_count{{{lbl}}}")
        ),
        5.0
    );
    assert!(
        value(
            &text,
            &format!(r#"switchboard_health_checks_total{{{lbl},result="healthy"}}"#)
        ) >= 2.0
    );
    assert_eq!(
        value(
            &text,
            &format!("switchboard_deployment_restarts_total{{{lbl}}}")
        ),
        1.0
    );
    assert_eq!(
        value(
            &text,
            r#"switchboard_deployments{tool="echo",status="RUNNING"}"#
        ),
        1.0
    );
    assert!(
        value(
            &text,
            &format!("switchboard_deployment_resident_memory_bytes{{{lbl}}}")
        ) > 1e6
    );
    assert!(
        value(
            &text,
            &format!("switchboard_deployment_cpu_seconds{{{lbl}}}")
        ) >= 0.0
    );
    assert_eq!(
        value(
            &text,
            &format!("switchboard_proxy_in_flight_requests{{{lbl}}}")
        ),
        0.0
    );
    assert_eq!(value(&text, "switchboard_ports_in_use"), 1.0);
    assert_eq!(value(&text, "switchboard_ports_free"), 9.0);
    assert!(value(&text, "switchboard_process_resident_memory_bytes") > 1e6);

    // The same deployment's stats.
    let (st, stats) = app
        .call("GET", &format!("/api/v1/deployments/{id}/stats"), None)
        .await;
    assert_eq!(st, StatusCode::OK, "{stats}");
    assert_eq!(stats["requests_total"], 5, "{stats}");
    assert_eq!(stats["requests_by_class"]["2xx"], 5, "{stats}");
    assert_eq!(stats["processes"], 1, "{stats}");
    assert_eq!(stats["restart_count"], 1, "{stats}");
    assert!(
        stats["resident_memory_bytes"].as_u64().unwrap() > 1_000_000,
        "{stats}"
    );
    assert!(stats["open_fds"].as_u64().unwrap() >= 3, "{stats}");
    assert!(stats["uptime_seconds"].as_f64().unwrap() >= 0.0, "{stats}");
    assert_eq!(stats["in_flight"], 0, "{stats}");

    // promtool reads it as Prometheus would.
    let mut child = std::process::Command::new(&promtool)
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write as _;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}\n{}\n---\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    app.stop_deployment(&id).await;
    let (st, e) = app
        .call("GET", &format!("/api/v1/deployments/{id}/stats"), None)
        .await;
    assert_eq!(
        (st, e["error"]["code"].as_str()),
        (StatusCode::CONFLICT, Some("not_live"))
    );
    let (st, _) = app
        .call("GET", "/api/v1/deployments/nope/stats", None)
        .await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    app.stop().await;
}

/// Series keys of a scrape (name and labels, without the value), sorted.
fn series(text: &str) -> Vec<String> {
    let mut keys: Vec<String> = text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| l.rsplit_once(' ').map_or(l, |(k, _)| k).to_owned())
        .collect();
    keys.sort();
    keys
}

/// Deploy/stop cycles of one tool (SWITCHBOARD_METRICS_CYCLES; 200 by default, each a real
/// process started, probed, called and stopped).
fn cycles() -> usize {
    std::env::var("SWITCHBOARD_METRICS_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200)
}

#[tokio::test]
async fn ended_failed_and_deleted_deployments_leave_no_series() {
    let app = TestApp::start().await;
    let scrape = || app.metrics_text();
    // A deployment that stays live through the test (checked hourly: none during the test,
    // so its own series do not change).
    app.add_test_tool("anchor", &[], json!({"health": {"interval_ms": 3_600_000}}))
        .await;
    let anchor = app.deploy_wait("anchor").await;
    assert_eq!(anchor["status"], "RUNNING", "{anchor}");
    app.add_test_tool("cycle", &[], json!({"health": {"interval_ms": 100}}))
        .await;
    app.add_tool(
        json!({"slug": "ghost", "command": "/nonexistent/mcp-server",
                        "restart": {"policy": "never"}}),
    )
    .await;
    let before = scrape().await;
    let url = format!("{}/mcp/cycle", app.url);
    let mut ended = Vec::new();
    for i in 0..cycles() {
        let d = app.deploy_wait("cycle").await;
        assert_eq!(d["status"], "RUNNING", "{d}");
        let id = d["id"].as_str().unwrap().to_owned();
        whoami(&url).await;
        if i == 0 {
            // Every kind of per-deployment series once: checks, a restart.
            let check =
                format!(r#"switchboard_health_checks_total{{tool="cycle",deployment="{id}""#);
            common::eventually(Duration::from_secs(20), || async {
                scrape().await.contains(&check)
            })
            .await;
            common::sigkill(d["instance"]["pid"].as_u64().unwrap() as i32);
            app.wait_record(&id, "restarted", |r| {
                r["status"] == "RUNNING" && r["restart_count"] == 1
            })
            .await;
            let restarts = format!(
                r#"switchboard_deployment_restarts_total{{tool="cycle",deployment="{id}"}}"#
            );
            assert!(scrape().await.contains(&restarts));
        }
        app.stop_deployment(&id).await;
        ended.push(id);
    }
    let failed = app.deploy_wait("ghost").await;
    assert_eq!(failed["status"], "FAILED", "{failed}");
    ended.push(failed["id"].as_str().unwrap().to_owned());

    let after = scrape().await;
    for id in &ended {
        assert!(
            !after.contains(id.as_str()),
            "series of ended {id} remain:\n{after}"
        );
    }
    assert_eq!(
        series(&after),
        series(&before),
        "before:\n{before}\nafter:\n{after}"
    );
    assert_eq!(after.lines().count(), before.lines().count());

    // A deleted tool leaves nothing either.
    let (st, _) = app.call("DELETE", "/api/v1/tools/cycle", None).await;
    assert_eq!(st, StatusCode::NO_CONTENT);
    let text = scrape().await;
    assert!(!text.contains(r#"tool="cycle""#), "{text}");
    assert!(text.contains(r#"tool="anchor""#), "{text}");
    app.stop().await;
}
