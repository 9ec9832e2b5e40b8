//! The database goes away under a running Switchboard (a PostgreSQL or MariaDB server of the
//! test's own, stopped and started again): traffic keeps flowing, writes get 503 `store_unavailable`,
//! `/healthz` says so, what happens meanwhile is recorded once the database is back, and no
//! restart is needed.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{AppOptions, MariaServer, PgServer, TestApp, eventually, whoami};
use reqwest::StatusCode;
use serde_json::json;

#[tokio::test]
async fn postgres_going_away_and_coming_back() {
    let pg = PgServer::start();
    outage(pg.url(), || pg.halt(), || pg.resume()).await;
}

#[tokio::test]
async fn mariadb_going_away_and_coming_back() {
    let my = MariaServer::start();
    outage(my.url(), || my.halt(), || my.resume()).await;
}

async fn outage(url: String, halt: impl Fn(), resume: impl Fn()) {
    let app = TestApp::with(AppOptions {
        database_url: Some(url),
        ..Default::default()
    })
    .await;
    app.add_test_tool("steady", &[], json!({})).await;
    app.add_test_tool("victim", &[], json!({})).await;
    let steady = app.deploy_wait("steady").await;
    let victim = app.deploy_wait("victim").await;
    let (_, h) = app.call("GET", "/healthz", None).await;
    assert_eq!(h["store"], "ok", "{h}");

    halt();

    // Traffic to running deployments does not need the database.
    let who = whoami(&format!("{}/mcp/steady", app.url)).await;
    assert_eq!(who["deployment"], steady["id"]);
    // Writes are refused clearly, and nothing is half-done.
    let (st, b) = app
        .call(
            "POST",
            "/api/v1/tools",
            Some(json!({"slug": "late", "command": "x"})),
        )
        .await;
    assert_eq!(st, StatusCode::SERVICE_UNAVAILABLE, "{b}");
    assert_eq!(b["error"]["code"], "store_unavailable");
    let (_, h) = app.call("GET", "/healthz", None).await;
    assert_eq!(
        (h["status"].as_str(), h["store"].as_str()),
        (Some("degraded"), Some("unavailable")),
        "{h}"
    );
    assert!(
        !h.to_string().contains("sb@"),
        "no credentials in healthz: {h}"
    );

    // Something happens while the database is away: a deployment dies.
    let pid = victim["instance"]["pid"].as_u64().unwrap() as i32;
    common::sigkill(pid);
    eventually(Duration::from_secs(10), || async {
        let (st, b) = app.call("POST", "/mcp/victim", Some(json!({}))).await;
        st == StatusCode::SERVICE_UNAVAILABLE && b["error"]["code"] == "no_healthy_deployment"
    })
    .await;

    resume();

    // Back without a restart: healthz recovers, the death is on record, writes work.
    eventually(Duration::from_secs(30), || async {
        app.call("GET", "/healthz", None).await.1["store"] == "ok"
    })
    .await;
    // The restart waited for the store (a process the store cannot name must not run), and
    // the record tells what happened.
    let d = app
        .wait_record(victim["id"].as_str().unwrap(), "restarted", |d| {
            d["status"] == "RUNNING" && d["restart_count"] == 1
        })
        .await;
    assert!(d["last_exit"].as_str().unwrap().contains("SIGKILL"), "{d}");
    assert_ne!(d["instance"]["pid"].as_u64(), Some(pid as u64), "{d}");
    let (st, _) = app
        .call(
            "POST",
            "/api/v1/tools",
            Some(json!({"slug": "late", "command": "x"})),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED);
    let again = app.deploy_wait("victim").await;
    assert_eq!(again["status"], "RUNNING", "{again}");
    app.stop().await;
}
