//! Replicas through the real API: `POST /api/v1/tools/{slug}/scale` starts and stops real
//! deployments of the test server to match a tool's count, and refuses bad input in JSON.
#![allow(clippy::unwrap_used)]

mod common;

use common::{AppOptions, TestApp, alive, port_range};
use reqwest::StatusCode;
use serde_json::{Value, json};

async fn scale(app: &TestApp, slug: &str, body: Value, query: &str) -> (StatusCode, Value) {
    app.call(
        "POST",
        &format!("/api/v1/tools/{slug}/scale{query}"),
        Some(body),
    )
    .await
}

async fn live(app: &TestApp, slug: &str) -> Vec<Value> {
    let (st, v) = app
        .call(
            "GET",
            &format!("/api/v1/deployments?tool={slug}&status=STARTING,RUNNING"),
            None,
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    v.as_array().unwrap().clone()
}

#[tokio::test]
async fn scale_converges_up_and_down_and_deploy_fills_up_to_the_count() {
    let app = TestApp::with(AppOptions {
        ports: port_range(8),
        ..Default::default()
    })
    .await;
    app.add_test_tool("rep", &[], json!({"replicas": 2})).await;

    // No count: start what is missing, up to the tool's own count.
    let (st, s) = scale(&app, "rep", json!({}), "?wait=true").await;
    assert_eq!(st, StatusCode::OK, "{s}");
    assert_eq!(s["replicas"], 2, "{s}");
    assert_eq!(s["started"].as_array().unwrap().len(), 2, "{s}");
    assert!(
        s["deployments"]
            .as_array()
            .unwrap()
            .iter()
            .all(|d| d["status"] == "RUNNING"),
        "{s}"
    );
    // Again: nothing to do.
    let (_, s) = scale(&app, "rep", json!({}), "").await;
    assert_eq!(s["started"].as_array().unwrap().len(), 0, "{s}");
    assert_eq!(live(&app, "rep").await.len(), 2);

    // Up to 4, with two requests racing: exactly 4, not 6.
    let (a, b) = tokio::join!(
        scale(&app, "rep", json!({"replicas": 4}), "?wait=true"),
        scale(&app, "rep", json!({"replicas": 4}), "?wait=true"),
    );
    assert_eq!((a.0, b.0), (StatusCode::OK, StatusCode::OK), "{a:?} {b:?}");
    assert_eq!(live(&app, "rep").await.len(), 4);
    let (_, t) = app.call("GET", "/api/v1/tools/rep", None).await;
    assert_eq!(t["replicas"], 4, "the count is stored in the tool: {t}");

    // Down to 1: the newest three stop, gracefully, and their processes are gone.
    let before = live(&app, "rep").await;
    let (st, s) = scale(&app, "rep", json!({"replicas": 1}), "").await;
    assert_eq!(st, StatusCode::OK, "{s}");
    let stopped = s["stopped"].as_array().unwrap();
    assert_eq!(stopped.len(), 3, "{s}");
    for d in stopped {
        assert_eq!(d["status"], "STOPPED", "{d}");
        assert!(!alive(d["instance"]["pid"].as_u64().unwrap() as u32), "{d}");
    }
    let left = live(&app, "rep").await;
    assert_eq!(left.len(), 1);
    assert_eq!(left[0]["id"], before[0]["id"], "the oldest stays");

    // A plain deploy request still starts one more, and scale takes it back to the count.
    app.deploy_wait("rep").await;
    assert_eq!(live(&app, "rep").await.len(), 2);
    let (_, s) = scale(&app, "rep", json!({}), "").await;
    assert_eq!(
        s["stopped"].as_array().unwrap().len(),
        0,
        "deploy never stops: {s}"
    );
    let (_, s) = scale(&app, "rep", json!({"replicas": 1}), "").await;
    assert_eq!(s["stopped"].as_array().unwrap().len(), 1, "{s}");

    // Zero stops everything and keeps the tool.
    let (st, s) = scale(&app, "rep", json!({"replicas": 0}), "").await;
    assert_eq!(st, StatusCode::OK, "{s}");
    assert_eq!(live(&app, "rep").await.len(), 0);
    assert_eq!(s["deployments"], json!([]), "{s}");
    app.stop().await;
}

#[tokio::test]
async fn bad_scale_requests_get_json_errors_and_change_nothing() {
    let app = TestApp::start().await;
    app.add_test_tool("rep", &[], json!({})).await;
    let cases = [
        (
            json!({"replicas": 65}),
            "",
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_tool",
        ),
        (
            json!({"replicas": -1}),
            "",
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_body",
        ),
        (
            json!({"replicas": "two"}),
            "",
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_body",
        ),
        (
            json!({"replica": 2}),
            "",
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_body",
        ),
        (
            json!({"replicas": 2}),
            "?timeout_ms=100",
            StatusCode::BAD_REQUEST,
            "invalid_query",
        ),
        (
            json!({"replicas": 2}),
            "?wait=true&timeout_ms=99999999",
            StatusCode::BAD_REQUEST,
            "invalid_query",
        ),
    ];
    for (body, query, status, code) in cases {
        let (st, e) = scale(&app, "rep", body.clone(), query).await;
        assert_eq!(
            (st, e["error"]["code"].as_str()),
            (status, Some(code)),
            "{body} {query}: {e}"
        );
        assert!(
            e["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{e}"
        );
    }
    let (st, e) = scale(&app, "nope", json!({"replicas": 1}), "").await;
    assert_eq!(
        (st, e["error"]["code"].as_str()),
        (StatusCode::NOT_FOUND, Some("tool_not_found"))
    );
    let (st, e) = app
        .raw(
            "POST",
            "/api/v1/tools/rep/scale",
            None,
            b"{\"replicas\": 1}",
        )
        .await;
    assert_eq!(st, StatusCode::UNSUPPORTED_MEDIA_TYPE, "{e}");
    // Nothing changed.
    let (_, t) = app.call("GET", "/api/v1/tools/rep", None).await;
    assert_eq!(t["replicas"], 1, "{t}");
    assert_eq!(live(&app, "rep").await.len(), 0);
    // Documented.
    let (_, doc) = app.call("GET", "/api/v1/openapi.json", None).await;
    let op = &doc["paths"]["/api/v1/tools/{slug}/scale"]["post"];
    for status in ["200", "404", "422"] {
        assert!(op["responses"][status].is_object(), "{status}: {op}");
    }
    assert!(
        doc["components"]["schemas"]["ScaleRequest"]["properties"]["replicas"].is_object(),
        "{doc}"
    );
    app.stop().await;
}
