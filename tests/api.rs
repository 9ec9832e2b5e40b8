//! The REST API against a real server: tool CRUD, bad input, auth, OpenAPI.
#![allow(clippy::unwrap_used)]

mod common;

use common::{AppOptions, TestApp};
use reqwest::StatusCode;
use serde_json::{Value, json};

/// A tool as the API shows it, sent back as a PUT body (the fields the server sets included:
/// PUT ignores them).
fn put_body(tool: &Value) -> Value {
    tool.clone()
}

/// A tool as the API shows it, made a definition (what `[[tools]]` and `/apply` take): without
/// the fields the server sets.
fn definition(tool: &Value) -> Value {
    let mut body = tool.clone();
    for k in ["id", "created_at", "updated_at", "url"] {
        body.as_object_mut().unwrap().remove(k);
    }
    body
}

fn assert_error(status: StatusCode, body: &Value, want_status: StatusCode, want_code: &str) {
    assert_eq!(status, want_status, "{body}");
    assert_eq!(body["error"]["code"], want_code, "{body}");
    let msg = body["error"]["message"].as_str().unwrap_or_default();
    assert!(!msg.is_empty(), "error without message: {body}");
}

#[tokio::test]
async fn tool_crud_round_trip() {
    let app = TestApp::start().await;
    let (st, t) = app
        .call(
            "POST",
            "/api/v1/tools",
            Some(
                json!({"slug": "calc", "command": "/bin/calc", "args": ["--port", "{port}"],
                        "env": {"MODE": "fast"}}),
            ),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED, "{t}");
    assert_eq!(t["slug"], "calc");
    assert_eq!(t["name"], "calc", "name defaults to the slug");
    assert_eq!(t["transport"], "streamable-http");
    assert_eq!(t["endpoint_path"], "/mcp");
    assert_eq!(t["port_env"], "PORT");
    assert_eq!(t["stop_grace_period_ms"], 10000);
    assert_eq!(t["replicas"], 1);

    let (st, list) = app.call("GET", "/api/v1/tools", None).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(list.as_array().unwrap().len(), 1);

    let (st, t2) = app
        .call(
            "PUT",
            "/api/v1/tools/calc",
            Some(json!({"command": "/bin/calc2", "replicas": 3})),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{t2}");
    assert_eq!(t2["command"], "/bin/calc2");
    assert_eq!(t2["replicas"], 3);
    assert_eq!(t2["id"], t["id"], "PUT keeps the tool's identity");

    let (st, got) = app.call("GET", "/api/v1/tools/calc", None).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(got["command"], "/bin/calc2");

    let (st, _) = app.call("DELETE", "/api/v1/tools/calc", None).await;
    assert_eq!(st, StatusCode::NO_CONTENT);
    let (st, body) = app.call("GET", "/api/v1/tools/calc", None).await;
    assert_error(st, &body, StatusCode::NOT_FOUND, "tool_not_found");
}

#[tokio::test]
async fn bad_input_gets_clear_4xx_json_errors() {
    let app = TestApp::start().await;

    let (st, b) = app
        .raw(
            "POST",
            "/api/v1/tools",
            Some("application/json"),
            b"{\"slug\": ",
        )
        .await;
    assert_error(st, &b, StatusCode::BAD_REQUEST, "invalid_json");

    let (st, b) = app
        .raw(
            "POST",
            "/api/v1/tools",
            Some("application/json"),
            b"\xff\xfe",
        )
        .await;
    assert!(st.is_client_error(), "{st} {b}");

    let (st, b) = app.raw("POST", "/api/v1/tools", None, b"{}").await;
    assert_error(
        st,
        &b,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
    );

    let (st, b) = app
        .call(
            "POST",
            "/api/v1/tools",
            Some(json!({"slug": "a", "command": 5})),
        )
        .await;
    assert_error(st, &b, StatusCode::UNPROCESSABLE_ENTITY, "invalid_body");

    let (st, b) = app
        .call(
            "POST",
            "/api/v1/tools",
            Some(json!({"slug": "a", "command": "x", "replicas": -1})),
        )
        .await;
    assert_error(st, &b, StatusCode::UNPROCESSABLE_ENTITY, "invalid_body");

    let (st, b) = app
        .call(
            "POST",
            "/api/v1/tools",
            Some(json!({"slug": "a", "command": "x", "colour": "red"})),
        )
        .await;
    assert_error(st, &b, StatusCode::UNPROCESSABLE_ENTITY, "invalid_body");
    assert!(
        b["error"]["message"].as_str().unwrap().contains("colour"),
        "{b}"
    );

    for bad in ["Bad_Slug", "-lead", "", "a/b", &"x".repeat(64)] {
        let (st, b) = app
            .call(
                "POST",
                "/api/v1/tools",
                Some(json!({"slug": bad, "command": "x"})),
            )
            .await;
        assert_error(st, &b, StatusCode::UNPROCESSABLE_ENTITY, "invalid_tool");
        assert!(
            b["error"]["message"].as_str().unwrap().contains("slug"),
            "{b}"
        );
    }

    let (st, b) = app
        .call(
            "POST",
            "/api/v1/tools",
            Some(json!({"slug": "a", "command": "x", "replicas": 65})),
        )
        .await;
    assert_error(st, &b, StatusCode::UNPROCESSABLE_ENTITY, "invalid_tool");

    let (st, b) = app
        .call(
            "POST",
            "/api/v1/tools",
            Some(json!({"slug": "a", "command": "x", "transport": "smoke-signals"})),
        )
        .await;
    assert_error(st, &b, StatusCode::UNPROCESSABLE_ENTITY, "invalid_body");

    let (st, _) = app
        .call(
            "POST",
            "/api/v1/tools",
            Some(json!({"slug": "dup", "command": "x"})),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED);
    let (st, b) = app
        .call(
            "POST",
            "/api/v1/tools",
            Some(json!({"slug": "dup", "command": "y"})),
        )
        .await;
    assert_error(st, &b, StatusCode::CONFLICT, "tool_exists");
    let (_, still) = app.call("GET", "/api/v1/tools/dup", None).await;
    assert_eq!(still["command"], "x", "a refused duplicate changes nothing");

    let (st, b) = app
        .call(
            "PUT",
            "/api/v1/tools/dup",
            Some(json!({"slug": "other", "command": "y"})),
        )
        .await;
    assert_error(st, &b, StatusCode::UNPROCESSABLE_ENTITY, "invalid_tool");
    let (st, b) = app
        .call("PUT", "/api/v1/tools/nope", Some(json!({"command": "y"})))
        .await;
    assert_error(st, &b, StatusCode::NOT_FOUND, "tool_not_found");

    let (st, b) = app
        .call("GET", "/api/v1/deployments/not-a-uuid", None)
        .await;
    assert_error(st, &b, StatusCode::NOT_FOUND, "deployment_not_found");
    let (st, b) = app
        .call(
            "POST",
            "/api/v1/deployments/00000000-0000-4000-8000-000000000000/stop",
            None,
        )
        .await;
    assert_error(st, &b, StatusCode::NOT_FOUND, "deployment_not_found");
    let (st, b) = app
        .call("POST", "/api/v1/tools/ghost/deployments", None)
        .await;
    assert_error(st, &b, StatusCode::NOT_FOUND, "tool_not_found");
    let (st, b) = app.call("DELETE", "/api/v1/tools/ghost", None).await;
    assert_error(st, &b, StatusCode::NOT_FOUND, "tool_not_found");

    let (st, b) = app
        .call("GET", "/api/v1/deployments?status=SLEEPING", None)
        .await;
    assert_error(st, &b, StatusCode::BAD_REQUEST, "invalid_query");
    for bad in ["limit=0", "limit=-3", "limit=10001", "offset=x"] {
        let (st, b) = app
            .call("GET", &format!("/api/v1/deployments?{bad}"), None)
            .await;
        assert_error(st, &b, StatusCode::BAD_REQUEST, "invalid_query");
    }
    let (st, b) = app
        .call("GET", "/api/v1/deployments?colour=red", None)
        .await;
    assert_error(st, &b, StatusCode::BAD_REQUEST, "invalid_query");
    let (st, b) = app
        .call("POST", "/api/v1/tools/dup/deployments?wait=maybe", None)
        .await;
    assert_error(st, &b, StatusCode::BAD_REQUEST, "invalid_query");

    let (st, b) = app.call("GET", "/api/v1/nothing-here", None).await;
    assert_error(st, &b, StatusCode::NOT_FOUND, "not_found");
    let (st, b) = app.call("PATCH", "/api/v1/tools", None).await;
    assert_error(st, &b, StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed");

    // The server is still fine after all of that.
    let (st, _) = app.call("GET", "/healthz", None).await;
    assert_eq!(st, StatusCode::OK);
}

#[tokio::test]
async fn token_guards_the_api_but_not_healthz() {
    let app = TestApp::with(AppOptions {
        token: Some("let-me-in".into()),
        ..Default::default()
    })
    .await;
    let anon = reqwest::Client::builder().no_proxy().build().unwrap();
    let r = anon
        .get(format!("{}/api/v1/tools", app.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(r.headers()["www-authenticate"], "Bearer");
    let b: Value = r.json().await.unwrap();
    assert_eq!(b["error"]["code"], "unauthorized");
    assert!(!b.to_string().contains("let-me-in"));

    let r = anon
        .get(format!("{}/api/v1/tools", app.url))
        .bearer_auth("let-me-out")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);

    let r = anon
        .get(format!("{}/healthz", app.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);

    // The harness client sends the right token.
    let (st, _) = app.call("GET", "/api/v1/tools", None).await;
    assert_eq!(st, StatusCode::OK);
}

#[tokio::test]
async fn openapi_describes_every_route() {
    let app = TestApp::start().await;
    let (st, doc) = app.call("GET", "/api/v1/openapi.json", None).await;
    assert_eq!(st, StatusCode::OK);
    assert!(
        doc["openapi"].as_str().unwrap().starts_with("3."),
        "{}",
        doc["openapi"]
    );
    let paths = doc["paths"].as_object().unwrap();
    let want = [
        ("/api/v1/tools", "get"),
        ("/api/v1/tools", "post"),
        ("/api/v1/tools/{slug}", "get"),
        ("/api/v1/tools/{slug}", "put"),
        ("/api/v1/tools/{slug}", "delete"),
        ("/api/v1/tools/{slug}/deployments", "post"),
        ("/api/v1/deployments", "get"),
        ("/api/v1/deployments/{id}", "get"),
        ("/api/v1/deployments/{id}/stop", "post"),
    ];
    for (path, method) in want {
        assert!(
            paths.get(path).and_then(|p| p.get(method)).is_some(),
            "{method} {path} missing"
        );
    }
    let schemas = doc["components"]["schemas"].as_object().unwrap();
    for s in ["Tool", "ToolSpec", "Deployment", "ErrorBody"] {
        assert!(schemas.contains_key(s), "schema {s} missing");
    }
}

#[tokio::test]
async fn a_tool_read_back_and_put_keeps_its_secrets() {
    let app = common::TestApp::start().await;
    app.add_test_tool(
        "vault",
        &[],
        serde_json::json!({"secret_env": {"VAULT_KEY": "s3cr3t-55"}}),
    )
    .await;
    let (st, shown) = app.call("GET", "/api/v1/tools/vault", None).await;
    assert_eq!(st, reqwest::StatusCode::OK);
    assert_eq!(shown["secret_env"]["VAULT_KEY"], "********", "{shown}");
    // Read, edit, write back: the redaction marker keeps the stored value.
    let mut body = put_body(&shown);
    body["description"] = "edited".into();
    let (st, updated) = app.call("PUT", "/api/v1/tools/vault", Some(body)).await;
    assert_eq!(st, reqwest::StatusCode::OK, "{updated}");
    assert!(!updated.to_string().contains("s3cr3t"), "{updated}");
    let d = app.deploy_wait("vault").await;
    let environ = std::fs::read(format!("/proc/{}/environ", d["instance"]["pid"])).unwrap();
    assert!(String::from_utf8_lossy(&environ).contains("VAULT_KEY=s3cr3t-55"));
    app.stop().await;
}

/// The API does not guess what a relative path is relative to: it refuses it, saying what to
/// send instead (the CLI and config files resolve paths before they reach it).
#[tokio::test]
async fn relative_command_paths_are_refused_with_advice() {
    let app = TestApp::start().await;
    for body in [
        json!({"slug": "rel", "command": "./bin/server"}),
        json!({"slug": "rel", "command": "bin/server"}),
        json!({"slug": "rel", "command": "/bin/server", "working_dir": "srv"}),
    ] {
        let (status, b) = app.call("POST", "/api/v1/tools", Some(body.clone())).await;
        assert_error(status, &b, StatusCode::UNPROCESSABLE_ENTITY, "invalid_tool");
        let msg = b["error"]["message"].as_str().unwrap();
        assert!(
            msg.contains("relative path") && msg.contains("absolute path"),
            "{msg}"
        );
    }
    // A bare name is looked up in PATH, and a package is not a path.
    for command in ["mcp-server", "npx:@scope/server"] {
        let (status, b) = app
            .call(
                "POST",
                "/api/v1/tools",
                Some(json!({"slug": "ok", "command": command})),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{b}");
        app.call("DELETE", "/api/v1/tools/ok", None).await;
    }
    app.stop().await;
}

/// PUT and apply refuse a new transport while the tool has a live deployment: 409 with a
/// stable code and the reason, documented in the OpenAPI document.
#[tokio::test]
async fn a_transport_change_under_live_deployments_is_a_documented_409() {
    let app = TestApp::start().await;
    let tool = app.add_test_tool("live", &[], json!({})).await;
    let d = app.deploy_wait("live").await;
    let mut body = put_body(&tool);
    body["transport"] = "stdio".into();
    body["args"] = json!(["--stdio"]);
    let (st, b) = app
        .call("PUT", "/api/v1/tools/live", Some(body.clone()))
        .await;
    assert_error(
        st,
        &b,
        StatusCode::CONFLICT,
        "transport_change_with_live_deployments",
    );
    let msg = b["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("1 live deployment") && msg.contains("stdio"),
        "{msg}"
    );
    let (st, b) = app
        .call(
            "POST",
            "/api/v1/apply",
            Some(json!({"tools": [definition(&body)]})),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{b}");
    assert_eq!(
        b["results"][0]["error"]["code"], "transport_change_with_live_deployments",
        "{b}"
    );
    let (_, still) = app.call("GET", "/api/v1/tools/live", None).await;
    assert_eq!(still["transport"], "streamable-http");
    // Other changes are fine while it runs.
    let mut other = body.clone();
    other["transport"] = "streamable-http".into();
    other["args"] = tool["args"].clone();
    other["description"] = "edited".into();
    let (st, b) = app.call("PUT", "/api/v1/tools/live", Some(other)).await;
    assert_eq!(st, StatusCode::OK, "{b}");
    app.stop_deployment(d["id"].as_str().unwrap()).await;
    let (st, b) = app.call("PUT", "/api/v1/tools/live", Some(body)).await;
    assert_eq!(st, StatusCode::OK, "{b}");
    assert_eq!(b["transport"], "stdio");

    let (_, doc) = app.call("GET", "/api/v1/openapi.json", None).await;
    let put = &doc["paths"]["/api/v1/tools/{slug}"]["put"]["responses"]["409"];
    assert!(
        put["description"]
            .as_str()
            .is_some_and(|d| d.contains("transport_change_with_live_deployments")),
        "{put}"
    );
    assert!(doc["paths"]["/api/v1/apply"]["post"].is_object());
    app.stop().await;
}

/// Deleting a tool keeps its deployments' records, readable by id and in listings, marked
/// with when their tool was deleted.
#[tokio::test]
async fn a_deleted_tools_deployments_stay_readable() {
    let app = TestApp::start().await;
    app.add_test_tool("gone", &[], json!({})).await;
    let d = app.deploy_wait("gone").await;
    let id = d["id"].as_str().unwrap();
    let (st, b) = app.call("DELETE", "/api/v1/tools/gone", None).await;
    assert_error(st, &b, StatusCode::CONFLICT, "tool_in_use");
    assert!(app.deployment(id).await.get("tool_deleted_at").is_none());
    app.stop_deployment(id).await;
    let (st, _) = app.call("DELETE", "/api/v1/tools/gone", None).await;
    assert_eq!(st, StatusCode::NO_CONTENT);

    let kept = app.deployment(id).await;
    assert_eq!(kept["status"], "STOPPED", "{kept}");
    assert_eq!(kept["tool_slug"], "gone", "{kept}");
    assert!(kept["tool_deleted_at"].is_string(), "{kept}");
    let (st, listed) = app.call("GET", "/api/v1/deployments?tool=gone", None).await;
    assert_eq!(st, StatusCode::OK);
    let ids: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [id]);
    // Its log is still there too (until the retention setting removes it).
    assert!(app.logs(id, 10).await.contains("listening"), "no log");
    let (st, b) = app
        .call("POST", "/api/v1/tools/gone/deployments", None)
        .await;
    assert_error(st, &b, StatusCode::NOT_FOUND, "tool_not_found");
    app.stop().await;
}

/// A docker tool's deploy, with the engine unreachable or the runtime disabled, is refused
/// with a documented 503 that says why, leaving no record; process tools deploy as ever.
#[tokio::test]
async fn a_docker_deploy_without_an_engine_is_a_documented_503() {
    for (docker, why) in [
        (
            switchboard::config::DockerConfig {
                enabled: true,
                host: Some("unix:///nonexistent/docker.sock".into()),
                ..Default::default()
            },
            "dockerd",
        ),
        (
            switchboard::config::DockerConfig {
                enabled: false,
                host: None,
                ..Default::default()
            },
            "disabled",
        ),
    ] {
        let app = TestApp::with(AppOptions {
            docker,
            ..Default::default()
        })
        .await;
        app.add_tool(json!({"slug": "boxed", "runtime": "docker", "image": "srv:1"}))
            .await;
        let (st, b) = app
            .call("POST", "/api/v1/tools/boxed/deployments?wait=true", None)
            .await;
        assert_error(
            st,
            &b,
            StatusCode::SERVICE_UNAVAILABLE,
            "runtime_unavailable",
        );
        let msg = b["error"]["message"].as_str().unwrap();
        assert!(msg.contains("docker") && msg.contains(why), "{msg}");
        let (_, list) = app.call("GET", "/api/v1/deployments", None).await;
        assert_eq!(list.as_array().map(Vec::len), Some(0), "{list}");
        app.add_test_tool("plain", &[], json!({})).await;
        let d = app.deploy_wait("plain").await;
        assert_eq!(d["status"], "RUNNING", "{d}");
        app.stop_deployment(d["id"].as_str().unwrap()).await;
        let (_, doc) = app.call("GET", "/api/v1/openapi.json", None).await;
        let deploy = &doc["paths"]["/api/v1/tools/{slug}/deployments"]["post"]["responses"]["503"];
        assert!(
            deploy["description"]
                .as_str()
                .is_some_and(|d| d.contains("runtime_unavailable")),
            "{deploy}"
        );
        app.stop().await;
    }
}

/// A tool's runtime cannot change under live deployments (they were started, and are
/// restarted and adopted, by the runtime their records name).
#[tokio::test]
async fn a_runtime_change_under_live_deployments_is_a_409() {
    let app = TestApp::start().await;
    let tool = app.add_test_tool("moving", &[], json!({})).await;
    let d = app.deploy_wait("moving").await;
    let mut body = put_body(&tool);
    body["runtime"] = "docker".into();
    body["image"] = "srv:1".into();
    let (st, b) = app.call("PUT", "/api/v1/tools/moving", Some(body)).await;
    assert_error(
        st,
        &b,
        StatusCode::CONFLICT,
        "runtime_change_with_live_deployments",
    );
    app.stop_deployment(d["id"].as_str().unwrap()).await;
    app.stop().await;
}
