//! Client keys and `/mcp` authentication with real parts: a real Switchboard, the repo's test
//! MCP server deployed behind it, the official Python SDK client, and the CLI binary.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{AppOptions, TestApp, eventually, mcp_client_as, mcp_client_output, ts_sdk_client};
use futures_util::StreamExt as _;
use reqwest::StatusCode;
use serde_json::{Value, json};
use switchboard::auth::McpAuth;

fn client() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().unwrap()
}

/// A Switchboard whose `/mcp` requires client keys, with the test server deployed as each slug.
async fn secured(slugs: &[&str]) -> TestApp {
    let opts = AppOptions {
        mcp_auth: McpAuth::Required,
        ..Default::default()
    };
    TestApp::with_tools(opts, slugs).await
}

/// Makes a key; returns (id, key).
async fn make_key(app: &TestApp, body: Value) -> (String, String) {
    let (st, v) = app.call("POST", "/api/v1/keys", Some(body)).await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    (
        v["id"].as_str().unwrap().to_owned(),
        v["key"].as_str().unwrap().to_owned(),
    )
}

/// Status, error code and headers of a request to `url` with an optional bearer credential.
async fn get(url: &str, bearer: Option<&str>) -> (StatusCode, String, reqwest::header::HeaderMap) {
    let mut req = client().get(url);
    if let Some(b) = bearer {
        req = req.bearer_auth(b);
    }
    let resp = req.send().await.unwrap();
    let st = resp.status();
    let h = resp.headers().clone();
    let v: Value = resp.json().await.unwrap_or(Value::Null);
    let code = v["error"]["code"].as_str().unwrap_or_default().to_owned();
    (st, code, h)
}

#[tokio::test]
async fn keys_are_shown_once_stored_as_digests_listed_and_revoked() {
    let app = TestApp::start().await;
    let (st, v) = app
        .call(
            "POST",
            "/api/v1/keys",
            Some(
                json!({"name": "ci", "tools": ["demo", "other/echo"], "expires_in_s": 3600,
                        "rate_limit_per_min": 60, "max_concurrent": 4}),
            ),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    let key = v["key"].as_str().unwrap().to_owned();
    let id = v["id"].as_str().unwrap().to_owned();
    assert!(key.starts_with("sbk_") && key.len() > 40, "{key}");
    assert_eq!(v["tools"], json!(["demo", "other/echo"]));
    assert_eq!(v["rate_limit_per_min"], 60);
    assert!(v["expires_at"].is_string(), "{v}");

    let (st, one) = app.call("GET", &format!("/api/v1/keys/{id}"), None).await;
    assert_eq!(st, StatusCode::OK);
    let (_, all) = app.call("GET", "/api/v1/keys", None).await;
    for shown in [&one, &all] {
        let text = shown.to_string();
        assert!(!text.contains(&key), "the key is shown only once: {text}");
        assert!(!text.contains("hash"), "{text}");
    }
    assert_eq!(all.as_array().unwrap().len(), 1);
    assert_eq!(one["name"], "ci");

    // Not in the database either: only its digest.
    let db = std::fs::read(app.db_path()).unwrap();
    let wal = std::fs::read(app.data_dir.path().join("switchboard.db-wal")).unwrap_or_default();
    for bytes in [&db, &wal] {
        assert!(
            !bytes.windows(key.len()).any(|w| w == key.as_bytes()),
            "the key itself is in the database file"
        );
    }

    let (st, _) = app
        .call("DELETE", &format!("/api/v1/keys/{id}"), None)
        .await;
    assert_eq!(st, StatusCode::NO_CONTENT);
    let (st, _) = app
        .call("DELETE", &format!("/api/v1/keys/{id}"), None)
        .await;
    assert_eq!(st, StatusCode::NO_CONTENT, "revoking again changes nothing");
    let (_, one) = app.call("GET", &format!("/api/v1/keys/{id}"), None).await;
    assert!(one["revoked_at"].is_string(), "{one}");
    for path in [
        "/api/v1/keys/nope",
        "/api/v1/keys/6f1c1f43-2a39-4f52-9a4c-9d0a4e0b2b71",
    ] {
        let (st, v) = app.call("GET", path, None).await;
        assert_eq!(
            (st, v["error"]["code"].as_str()),
            (StatusCode::NOT_FOUND, Some("key_not_found"))
        );
        let (st, _) = app.call("DELETE", path, None).await;
        assert_eq!(st, StatusCode::NOT_FOUND);
    }
}

#[tokio::test]
async fn bad_key_requests_are_422_naming_the_field() {
    let app = TestApp::start().await;
    for (body, field) in [
        (json!({"name": "x", "tools": []}), "tools"),
        (json!({"name": "x", "tools": ["Not A Slug"]}), "tools"),
        (json!({"name": "x", "tools": ["a/"]}), "tools"),
        (json!({"name": " ", "tools": ["*"]}), "name"),
        (
            json!({"name": "x", "tools": ["*"], "expires_in_s": 0}),
            "expires_in_s",
        ),
        (
            json!({"name": "x", "tools": ["*"], "expires_in_s": u64::MAX}),
            "expires_in_s",
        ),
        (
            json!({"name": "x", "tools": ["*"], "rate_limit_per_min": 0}),
            "rate_limit_per_min",
        ),
        (
            json!({"name": "x", "tools": ["*"], "max_concurrent": 0}),
            "max_concurrent",
        ),
    ] {
        let (st, v) = app.call("POST", "/api/v1/keys", Some(body.clone())).await;
        assert_eq!(st, StatusCode::UNPROCESSABLE_ENTITY, "{body}: {v}");
        assert_eq!(v["error"]["code"], "invalid_key_request", "{v}");
        assert!(
            v["error"]["message"].as_str().unwrap().starts_with(field),
            "{v}"
        );
    }
    let (st, v) = app
        .call(
            "POST",
            "/api/v1/keys",
            Some(json!({"name": "x", "tools": ["*"], "extra": 1})),
        )
        .await;
    assert_eq!(st, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    let (_, all) = app.call("GET", "/api/v1/keys", None).await;
    assert_eq!(all, json!([]), "nothing was made");
}

#[tokio::test]
async fn without_a_valid_key_mcp_is_401_pointing_at_metadata_that_answers() {
    let app = TestApp::with(AppOptions {
        mcp_auth: McpAuth::Required,
        token: Some("api-token".into()),
        ..Default::default()
    })
    .await;
    app.add_test_tool("t", &[], json!({})).await;
    app.deploy_wait("t").await;
    let url = format!("{}/mcp/t", app.url);

    let (st, code, h) = get(&url, None).await;
    assert_eq!(
        (st, code.as_str()),
        (StatusCode::UNAUTHORIZED, "unauthorized")
    );
    let challenge = h["www-authenticate"].to_str().unwrap();
    let prm = format!("{}/.well-known/oauth-protected-resource/mcp/t", app.url);
    assert_eq!(challenge, format!("Bearer resource_metadata=\"{prm}\""));

    // The metadata answers, without any credential, naming the tool's URL as reached.
    let resp = client().get(&prm).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let doc: Value = resp.json().await.unwrap();
    assert_eq!(doc["resource"], url);
    assert_eq!(doc["bearer_methods_supported"], json!(["header"]));
    assert!(doc.get("authorization_servers").is_none(), "{doc}");
    let other: Value = client()
        .get(&prm)
        .header("host", "mcp.example.com:9")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(other["resource"], "http://mcp.example.com:9/mcp/t");

    // Unknown keys, other schemes, and the management API's token: 401 with the same pointer.
    for auth in [
        "Bearer sbk_not-a-key",
        "Basic dXNlcjpwdw==",
        "Bearer api-token",
        "Bearer",
    ] {
        let resp = client()
            .get(&url)
            .header("authorization", auth)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED, "{auth}");
        assert!(
            resp.headers()["www-authenticate"]
                .to_str()
                .unwrap()
                .contains(&prm)
        );
        let v: Value = resp.json().await.unwrap();
        assert!(v["error"]["message"].is_string(), "{v}");
    }
    // Before anything about the tools shows: an unknown slug is 401 too.
    let (st, _, _) = get(&format!("{}/mcp/nope", app.url), None).await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn an_expired_key_is_401() {
    let app = secured(&["t"]).await;
    let (_, key) = make_key(
        &app,
        json!({"name": "short", "tools": ["t"], "expires_in_s": 1}),
    )
    .await;
    let url = format!("{}/mcp/t/headers", app.url);
    eventually(Duration::from_secs(30), || async {
        let (st, code, h) = get(&url, Some(&key)).await;
        st == StatusCode::UNAUTHORIZED
            && code == "key_expired"
            && h.contains_key("www-authenticate")
    })
    .await;
}

#[tokio::test]
async fn a_key_granted_one_tool_gets_403_on_another() {
    let app = secured(&["a", "b"]).await;
    let (_, key) = make_key(&app, json!({"name": "only-a", "tools": ["a"]})).await;
    let (st, _, _) = get(&format!("{}/mcp/a/headers", app.url), Some(&key)).await;
    assert_eq!(st, StatusCode::OK);
    let (st, code, h) = get(&format!("{}/mcp/b/headers", app.url), Some(&key)).await;
    assert_eq!((st, code.as_str()), (StatusCode::FORBIDDEN, "forbidden"));
    // RFC 6750's answer for a good credential without the grant.
    let challenge = h["www-authenticate"].to_str().unwrap();
    assert!(
        challenge.contains("error=\"insufficient_scope\", scope=\"mcp:b\""),
        "{challenge}"
    );

    // `*` reaches both; a single-MCP-tool grant admits its slug only.
    let (_, all) = make_key(&app, json!({"name": "all", "tools": ["*"]})).await;
    for slug in ["a", "b"] {
        let (st, _, _) = get(&format!("{}/mcp/{slug}/headers", app.url), Some(&all)).await;
        assert_eq!(st, StatusCode::OK, "{slug}");
    }
    let (_, one) = make_key(&app, json!({"name": "echo-only", "tools": ["a/echo"]})).await;
    let (st, _, _) = get(&format!("{}/mcp/a/headers", app.url), Some(&one)).await;
    assert_eq!(st, StatusCode::OK);
    let (st, code, _) = get(&format!("{}/mcp/b/headers", app.url), Some(&one)).await;
    assert_eq!((st, code.as_str()), (StatusCode::FORBIDDEN, "forbidden"));
}

/// POSTs the proxy sent to tool `slug`'s deployments so far (the SDK's GET stream opens in
/// the background, so GETs are not counted).
async fn proxied(app: &TestApp, slug: &str) -> u64 {
    let prefix = format!("switchboard_proxy_requests_total{{tool=\"{slug}\"");
    app.metrics_text()
        .await
        .lines()
        .filter(|l| l.starts_with(&prefix) && l.contains("method=\"POST\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// The official Python SDK calls `echo` with `text` (with `bearer` when given); asserts the
/// reply carries the text and returns the client's output.
async fn sdk_echo(bearer: Option<&str>, url: &str, era: &str, text: &str) -> Value {
    let args = json!({ "text": text }).to_string();
    let called = mcp_client_as(
        bearer,
        &[
            "--url",
            url,
            "--era",
            era,
            "call-tool",
            "echo",
            "--args",
            &args,
        ],
    )
    .await;
    assert!(called["result"].to_string().contains(text), "{called}");
    called
}

/// The official Python SDK's `call-tool`, expected to fail; returns its stderr.
async fn refused_call(bearer: Option<&str>, url: &str, era: &str, tool: &str) -> String {
    let out = mcp_client_output(
        bearer,
        &[
            "--url",
            url,
            "--era",
            era,
            "call-tool",
            tool,
            "--args",
            r#"{"ms":1}"#,
        ],
    )
    .await;
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "{tool} was called: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    stderr
}

#[tokio::test]
async fn a_key_granted_one_mcp_tool_lists_and_calls_only_it_in_both_eras() {
    let app = secured(&["t"]).await;
    let (_, key) = make_key(&app, json!({"name": "echo-only", "tools": ["t/echo"]})).await;
    let (_, whole) = make_key(&app, json!({"name": "whole", "tools": ["t"]})).await;
    let url = format!("{}/mcp/t", app.url);
    for era in ["legacy", "modern"] {
        let listed = mcp_client_as(Some(&key), &["--url", &url, "--era", era, "list-tools"]).await;
        assert_eq!(listed["tools"], json!(["echo"]), "{era}: {listed}");
        // The whole-slug key sees them all (the server has more than echo).
        let all = mcp_client_as(Some(&whole), &["--url", &url, "--era", era, "list-tools"]).await;
        let all = all["tools"].as_array().unwrap();
        assert!(
            all.len() > 1 && all.contains(&json!("sleep")),
            "{era}: {all:?}"
        );

        sdk_echo(Some(&key), &url, era, "hi").await;
        let stderr = refused_call(Some(&key), &url, era, "sleep").await;
        assert!(stderr.contains("lacks access"), "{era}: {stderr}");
    }
    app.stop().await;
}

/// The raw exchange: an SSE tools/list (with the server's priming event before the response)
/// is rewritten, and a tools/call of another tool is a JSON-RPC error with the request's id.
#[tokio::test]
async fn a_filtered_tools_list_over_sse_and_a_refused_call_are_json_rpc() {
    let app = secured(&["t"]).await;
    let (_, key) = make_key(
        &app,
        json!({"name": "echo-only", "tools": ["t/echo", "x/sleep"]}),
    )
    .await;
    let url = format!("{}/mcp/t", app.url);
    let auth = format!("Bearer {key}");
    let sid = keyed_session(&url, &key).await;
    let session = [
        ("authorization", auth.as_str()),
        ("mcp-session-id", sid.as_str()),
        ("mcp-protocol-version", "2025-11-25"),
    ];

    let list = json!({"jsonrpc": "2.0", "id": "L", "method": "tools/list"});
    let mut req = client()
        .post(&url)
        .json(&list)
        .header("accept", "application/json, text/event-stream");
    for (k, v) in session {
        req = req.header(k, v);
    }
    let resp = req.send().await.unwrap();
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream"),
        "{:?}",
        resp.headers()
    );
    let text = resp.text().await.unwrap();
    let events = switchboard::mcp::sse::Parser::new().feed(text.as_bytes());
    assert!(
        events.len() >= 2,
        "the server's priming event and the response: {text}"
    );
    let msgs = common::sse_messages(&text);
    let listed = msgs.iter().find(|m| m["id"] == "L").unwrap();
    let names: Vec<&Value> = listed["result"]["tools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| &t["name"])
        .collect();
    assert_eq!(names, [&json!("echo")], "{text}");

    let call = json!({"jsonrpc": "2.0", "id": 9, "method": "tools/call",
        "params": {"name": "whoami", "arguments": {}}});
    let before = proxied(&app, "t").await;
    let (st, _, msg) = common::mcp_rpc(&url, &call, &session).await;
    let msg = msg.unwrap();
    assert_eq!(st, StatusCode::OK);
    // Answered by Switchboard: the server never saw it.
    assert_eq!(proxied(&app, "t").await, before);
    assert_eq!(msg["id"], 9);
    assert_eq!(msg["error"]["code"], -32602, "{msg}");
    assert!(
        msg["error"]["message"]
            .as_str()
            .unwrap()
            .contains("lacks access"),
        "{msg}"
    );
    app.stop().await;
}

/// `expose_tools` applies to everyone, with auth off too; bad values are 422 naming the field.
#[tokio::test]
async fn expose_tools_hides_the_other_tools_from_everyone() {
    let app = TestApp::start().await;
    for bad in [json!([]), json!(["ok", "no spaces"])] {
        let (st, v) = app
            .call(
                "POST",
                "/api/v1/tools",
                Some(json!({"slug": "bad", "command": "x", "expose_tools": bad})),
            )
            .await;
        assert_eq!(st, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
        assert!(
            v["error"]["message"]
                .as_str()
                .unwrap()
                .contains("expose_tools"),
            "{v}"
        );
    }
    let tool = app
        .add_test_tool("x", &[], json!({"expose_tools": ["echo", "whoami"]}))
        .await;
    assert_eq!(tool["expose_tools"], json!(["echo", "whoami"]), "{tool}");
    app.deploy_wait("x").await;
    let url = format!("{}/mcp/x", app.url);
    for era in ["legacy", "modern"] {
        let listed = mcp_client_as(None, &["--url", &url, "--era", era, "list-tools"]).await;
        let mut names: Vec<String> = serde_json::from_value(listed["tools"].clone()).unwrap();
        names.sort();
        assert_eq!(names, ["echo", "whoami"], "{era}");
        let stderr = refused_call(None, &url, era, "sleep").await;
        assert!(stderr.contains("not available"), "{era}: {stderr}");
    }
    app.stop().await;
}

#[tokio::test]
async fn the_python_sdk_lists_and_calls_tools_with_a_key_and_fails_without() {
    let app = secured(&["t"]).await;
    let (_, key) = make_key(&app, json!({"name": "sdk", "tools": ["t"]})).await;
    let url = format!("{}/mcp/t", app.url);
    for era in ["legacy", "modern"] {
        let listed = mcp_client_as(Some(&key), &["--url", &url, "--era", era, "list-tools"]).await;
        assert!(
            listed["tools"]
                .as_array()
                .unwrap()
                .iter()
                .any(|t| t == "echo"),
            "{listed}"
        );
        sdk_echo(Some(&key), &url, era, "hi").await;
    }
    // Without the key the SDK fails (it reports only "an error response"): the gate counted
    // its request as one without a credential.
    assert_eq!(auth_decisions(&app, "missing").await, 0);
    let out = mcp_client_output(None, &["--url", &url, "list-tools"]).await;
    assert!(!out.status.success());
    assert!(auth_decisions(&app, "missing").await >= 1);
}

/// The legacy HTTP+SSE transport: the GET stream and the POSTs to the `endpoint` URL it names
/// (rewritten under /mcp/<slug>/) each pass the gate with the key.
#[tokio::test]
async fn the_legacy_sse_transport_works_with_a_key() {
    let app = TestApp::with(AppOptions {
        mcp_auth: McpAuth::Required,
        ..Default::default()
    })
    .await;
    app.deploy_everything("old", "sse", "/sse").await;
    let (_, key) = make_key(&app, json!({"name": "sse", "tools": ["old"]})).await;
    let url = format!("{}/mcp/old", app.url);
    let args = [
        "--url",
        &url,
        "--transport",
        "sse",
        "call-tool",
        "echo",
        "--args",
        r#"{"message":"over sse"}"#,
    ];
    let called = mcp_client_as(Some(&key), &args).await;
    assert!(
        called["result"].to_string().contains("over sse"),
        "{called}"
    );
    let denied = auth_decisions(&app, "missing").await;
    let out = mcp_client_output(None, &args).await;
    assert!(!out.status.success());
    assert!(auth_decisions(&app, "missing").await > denied);
    app.stop().await;
}

#[tokio::test]
async fn the_typescript_sdk_lists_and_calls_tools_with_a_key_and_gets_401_without() {
    let app = secured(&["t"]).await;
    let (_, key) = make_key(&app, json!({"name": "ts", "tools": ["t"]})).await;
    let url = format!("{}/mcp/t", app.url);
    let (ok, v) = ts_sdk_client(Some(&key), &url, "echo", r#"{"text":"from ts"}"#).await;
    assert!(ok, "{v}");
    assert!(
        v["tools"].as_array().unwrap().iter().any(|t| t == "echo"),
        "{v}"
    );
    assert!(v["result"].to_string().contains("from ts"), "{v}");
    let (ok, v) = ts_sdk_client(None, &url, "echo", r#"{"text":"x"}"#).await;
    assert!(!ok);
    assert!(v.to_string().contains("401"), "{v}");
}

/// `switchboard_mcp_auth_decisions_total{outcome=...}` now.
async fn auth_decisions(app: &TestApp, outcome: &str) -> u64 {
    let metrics = app.metrics_text().await;
    let prefix = format!("switchboard_mcp_auth_decisions_total{{outcome=\"{outcome}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("no {prefix}in {metrics}"))
        .parse()
        .unwrap()
}

#[tokio::test]
async fn the_key_reaches_the_server_only_for_a_tool_that_asks_for_it() {
    let app = secured(&["h"]).await;
    app.add_test_tool("fwd", &[], json!({"forward_credentials": true}))
        .await;
    app.deploy_wait("fwd").await;
    let (_, key) = make_key(&app, json!({"name": "h", "tools": ["h", "fwd"]})).await;
    let seen_by = |slug: &'static str| {
        let (url, key) = (format!("{}/mcp/{slug}/headers", app.url), key.clone());
        async move {
            let v: Value = client()
                .get(url)
                .bearer_auth(key)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            v
        }
    };
    let seen = seen_by("h").await;
    let headers = seen["headers"].as_object().unwrap();
    assert!(headers.contains_key("x-request-id"), "{seen}");
    assert!(!headers.contains_key("authorization"), "{seen}");
    assert!(!seen.to_string().contains(&key), "{seen}");

    let seen = seen_by("fwd").await;
    assert_eq!(
        seen["headers"]["authorization"],
        format!("Bearer {key}"),
        "{seen}"
    );
    let (_, tool) = app.call("GET", "/api/v1/tools/fwd", None).await;
    assert_eq!(tool["forward_credentials"], true, "{tool}");
    let (_, tool) = app.call("GET", "/api/v1/tools/h", None).await;
    assert!(
        tool.get("forward_credentials").is_none(),
        "off is the default: {tool}"
    );
}

/// Opens the test server's SSE stream (`/stream`, one event now, the next on request) and
/// waits for its first event.
async fn open_stream(
    url: &str,
    key: &str,
) -> impl futures_util::Stream<Item = reqwest::Result<bytes::Bytes>> + use<> {
    let resp = client().get(url).bearer_auth(key).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    common::first_event(resp).await
}

#[tokio::test]
async fn revoking_a_key_ends_its_open_stream_and_refuses_the_next_request() {
    let app = secured(&["t"]).await;
    let (id, key) = make_key(&app, json!({"name": "rev", "tools": ["t"]})).await;
    let (_, other) = make_key(&app, json!({"name": "stays", "tools": ["t"]})).await;
    let stream_url = format!("{}/mcp/t/stream?n=5", app.url);
    let mut revoked_stream = open_stream(&stream_url, &key).await;
    let mut kept_stream = open_stream(&stream_url, &other).await;

    let (st, _) = app
        .call("DELETE", &format!("/api/v1/keys/{id}"), None)
        .await;
    assert_eq!(st, StatusCode::NO_CONTENT);
    // The stream ends (the server would have sent nothing more until asked).
    let end = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(chunk) = revoked_stream.next().await {
            if chunk.is_err() {
                break;
            }
        }
    })
    .await;
    assert!(end.is_ok(), "the revoked key's stream is still open");
    let (st, code, _) = get(&format!("{}/mcp/t/headers", app.url), Some(&key)).await;
    assert_eq!(
        (st, code.as_str()),
        (StatusCode::UNAUTHORIZED, "invalid_key")
    );

    // Another key's stream is untouched: it still gets the next event when asked.
    let next = client()
        .post(format!("{}/mcp/t/stream/next", app.url))
        .bearer_auth(&other)
        .send()
        .await
        .unwrap();
    assert_eq!(next.status(), StatusCode::OK);
    let more = tokio::time::timeout(Duration::from_secs(20), kept_stream.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(
        std::str::from_utf8(&more).unwrap().contains("event 1"),
        "{more:?}"
    );
}

#[tokio::test]
async fn revoking_a_key_ends_a_request_still_waiting_for_its_answer() {
    let app = secured(&["t"]).await;
    let (id, key) = make_key(&app, json!({"name": "slow", "tools": ["t"]})).await;
    let allowed_before = auth_decisions(&app, "allowed").await;
    // The test server answers /slow after a minute; the test ends long before.
    let (url, k) = (format!("{}/mcp/t/slow?ms=60000", app.url), key.clone());
    let slow = tokio::spawn(async move { get(&url, Some(&k)).await });
    // Admitted (counted) before it is revoked, so the revocation meets it in flight.
    eventually(Duration::from_secs(20), || async {
        auth_decisions(&app, "allowed").await > allowed_before
    })
    .await;
    let (st, _) = app
        .call("DELETE", &format!("/api/v1/keys/{id}"), None)
        .await;
    assert_eq!(st, StatusCode::NO_CONTENT);
    let (st, code, h) = tokio::time::timeout(Duration::from_secs(20), slow)
        .await
        .expect("the request outlived its key's revocation")
        .unwrap();
    assert_eq!(
        (st, code.as_str()),
        (StatusCode::UNAUTHORIZED, "key_revoked")
    );
    assert!(h.contains_key("www-authenticate"));
}

#[tokio::test]
async fn a_burst_beyond_the_rate_limit_is_429_with_retry_after() {
    let app = secured(&["t"]).await;
    // Two a minute: a third request within 30 s of the first two is over the limit.
    let (_, key) = make_key(
        &app,
        json!({"name": "slow", "tools": ["t"], "rate_limit_per_min": 2}),
    )
    .await;
    let url = format!("{}/mcp/t/headers", app.url);
    let mut statuses = Vec::new();
    let mut retry_after = None;
    for _ in 0..3 {
        let (st, code, h) = get(&url, Some(&key)).await;
        statuses.push(st);
        if st == StatusCode::TOO_MANY_REQUESTS {
            assert_eq!(code, "rate_limited");
            retry_after = Some(h["retry-after"].to_str().unwrap().parse::<u64>().unwrap());
        }
    }
    assert_eq!(
        statuses,
        [
            StatusCode::OK,
            StatusCode::OK,
            StatusCode::TOO_MANY_REQUESTS
        ]
    );
    assert!((1..=30).contains(&retry_after.unwrap()), "{retry_after:?}");
    // Another key has a budget of its own.
    let (_, fresh) = make_key(
        &app,
        json!({"name": "other", "tools": ["t"], "rate_limit_per_min": 2}),
    )
    .await;
    assert_eq!(get(&url, Some(&fresh)).await.0, StatusCode::OK);

    assert_eq!(auth_decisions(&app, "rate_limited").await, 1);
    assert_eq!(auth_decisions(&app, "allowed").await, 3);
    let metrics = app.metrics_text().await;
    assert!(
        !metrics.contains(&key) && !metrics.contains("principal"),
        "no per-key labels"
    );
}

#[tokio::test]
async fn max_concurrent_counts_held_open_requests() {
    let app = secured(&["t"]).await;
    let (_, key) = make_key(
        &app,
        json!({"name": "two", "tools": ["t"], "max_concurrent": 2}),
    )
    .await;
    let stream_url = format!("{}/mcp/t/stream?n=5", app.url);
    let first = open_stream(&stream_url, &key).await;
    let _second = open_stream(&stream_url, &key).await;
    let url = format!("{}/mcp/t/headers", app.url);
    let (st, code, h) = get(&url, Some(&key)).await;
    assert_eq!(
        (st, code.as_str()),
        (StatusCode::TOO_MANY_REQUESTS, "too_many_requests_in_flight")
    );
    assert_eq!(h["retry-after"], "1");
    // A slot frees when a stream ends.
    drop(first);
    eventually(Duration::from_secs(20), || async {
        get(&url, Some(&key)).await.0 == StatusCode::OK
    })
    .await;
}

#[test]
fn a_public_listener_with_mcp_auth_off_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("sb.toml");
    std::fs::write(&config, "[auth]\nmcp = \"off\"\n").unwrap();
    let out = std::process::Command::new(common::switchboard_bin())
        .args(["serve", "--listen", "0.0.0.0:0", "--config"])
        .arg(&config)
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .env("SWITCHBOARD_TOKEN", "api-token")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("allow_unauthenticated_mcp"), "{err}");
    assert!(
        !dir.path().join("data").exists(),
        "it stopped before touching anything"
    );
}

#[tokio::test]
async fn the_cli_creates_lists_and_revokes_keys() {
    let app = TestApp::start().await;
    let cli = |args: &[&str]| {
        std::process::Command::new(common::switchboard_bin())
            .args(args)
            .env("SWITCHBOARD_URL", &app.url)
            .output()
            .unwrap()
    };
    let out = cli(&[
        "key",
        "create",
        "laptop",
        "--tool",
        "demo",
        "--rate-limit-per-min",
        "5",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let key = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    assert!(
        key.starts_with("sbk_") && !key.contains(' '),
        "the key alone on stdout: {key}"
    );
    let (_, keys) = app.call("GET", "/api/v1/keys", None).await;
    let id = keys[0]["id"].as_str().unwrap().to_owned();

    let out = cli(&["key", "list"]);
    let listed = String::from_utf8(out.stdout).unwrap();
    assert!(
        listed.contains("laptop") && listed.contains("5/min") && listed.contains("active"),
        "{listed}"
    );
    assert!(!listed.contains(&key));

    let out = cli(&["key", "revoke", &id[..8]]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (_, one) = app.call("GET", &format!("/api/v1/keys/{id}"), None).await;
    assert!(one["revoked_at"].is_string());

    let out = cli(&["key", "revoke", "ffffffff"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no key"));
    let out = cli(&["key", "create", "bad", "--tool", "Not A Slug"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid_key_request"));
    let out = cli(&["key", "create", "no-tools"]);
    assert_eq!(out.status.code(), Some(2), "usage error");
}

/// The audit trail, read back through `GET /api/v1/audit` until `pred` holds.
async fn audit_until(app: &TestApp, query: &str, pred: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (st, v) = app
            .call("GET", &format!("/api/v1/audit{query}"), None)
            .await;
        assert_eq!(st, StatusCode::OK, "{v}");
        let records = v.as_array().unwrap().clone();
        if pred(&records) {
            return records;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the audit trail never showed what was expected: {records:#?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn audit_records_match_the_calls_made_without_argument_values() {
    let app = secured(&["t"]).await;
    let (id, key) = make_key(&app, json!({"name": "echo-only", "tools": ["t/echo"]})).await;
    let url = format!("{}/mcp/t", app.url);
    let secret = "argument-value-4711";
    for era in ["legacy", "modern"] {
        sdk_echo(Some(&key), &url, era, secret).await;
        refused_call(Some(&key), &url, era, "sleep").await;
    }
    // Without a key: denied, and nobody to name.
    let (st, _, _) = get(&format!("{url}/headers"), None).await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);

    let calls = |rs: &[Value]| -> Vec<(String, String)> {
        rs.iter()
            .filter(|r| r["method"] == "tools/call")
            .map(|r| {
                (
                    r["mcp_tool"].as_str().unwrap_or("-").to_owned(),
                    r["outcome"].as_str().unwrap().to_owned(),
                )
            })
            .collect()
    };
    let mine = audit_until(&app, &format!("?principal={id}&tool=t"), |rs| {
        calls(rs).len() >= 4
    })
    .await;
    let mut seen = calls(&mine);
    seen.sort();
    let want = [
        ("echo", "allowed"),
        ("echo", "allowed"),
        ("sleep", "denied"),
        ("sleep", "denied"),
    ];
    assert_eq!(
        seen,
        want.map(|(a, b)| (a.to_owned(), b.to_owned())),
        "{mine:#?}"
    );
    for r in &mine {
        assert_eq!(r["principal"], id.as_str());
        assert_eq!(r["tool"], "t");
        assert!(r["duration_ms"].as_f64().unwrap() >= 0.0);
        assert!(r.get("arguments").is_none(), "{r}");
    }
    // The legacy client's handshake is there too, under its methods.
    assert!(
        mine.iter().any(|r| r["method"] == "initialize"),
        "{mine:#?}"
    );
    let anonymous = audit_until(&app, "?tool=t", |rs| rs.iter().any(|r| r["status"] == 401)).await;
    let refused = anonymous.iter().find(|r| r["status"] == 401).unwrap();
    assert_eq!(refused["outcome"], "denied");
    assert!(refused.get("principal").is_none(), "{refused}");

    // Argument values are in neither the API's answer nor the file.
    let (_, all) = app.call("GET", "/api/v1/audit?limit=10000", None).await;
    assert!(!all.to_string().contains(secret));
    let dir = app.db_path().parent().unwrap().join("audit");
    let file = std::fs::read_to_string(dir.join("audit.jsonl")).unwrap();
    assert!(file.lines().count() >= mine.len(), "{file}");
    assert!(!file.contains(secret), "{file}");

    // since and limit.
    let later = (chrono::Utc::now() + chrono::Duration::hours(1))
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let (st, v) = app
        .call("GET", &format!("/api/v1/audit?since={later}"), None)
        .await;
    assert_eq!((st, v), (StatusCode::OK, json!([])));
    let (st, v) = app.call("GET", "/api/v1/audit?limit=1", None).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(v.as_array().unwrap().len(), 1);
    for bad in ["?limit=0", "?since=yesterday", "?nope=1"] {
        let (st, v) = app.call("GET", &format!("/api/v1/audit{bad}"), None).await;
        assert_eq!(st, StatusCode::BAD_REQUEST, "{bad}: {v}");
        assert!(v["error"]["code"].is_string(), "{bad}: {v}");
    }
    app.stop().await;
}

#[tokio::test]
async fn a_tool_with_audit_arguments_has_its_call_arguments_recorded() {
    let app = TestApp::start().await;
    app.add_test_tool("a", &[], json!({"audit_arguments": true}))
        .await;
    app.deploy_wait("a").await;
    let url = format!("{}/mcp/a", app.url);
    for era in ["legacy", "modern"] {
        sdk_echo(None, &url, era, "kept").await;
    }
    let records = audit_until(&app, "?tool=a", |rs| {
        rs.iter().filter(|r| r["method"] == "tools/call").count() >= 2
    })
    .await;
    for r in records.iter().filter(|r| r["method"] == "tools/call") {
        assert_eq!(r["arguments"], json!({"text": "kept"}), "{r}");
        assert_eq!(r["outcome"], "allowed");
        assert!(r.get("principal").is_none(), "auth is off: {r}");
    }
    app.stop().await;
}

/// Registers the test server as stdio tool `slug` (with `extra` settings) and deploys it.
async fn deploy_stdio_test_server(app: &TestApp, slug: &str, extra: Value) {
    let mut spec = json!({"slug": slug, "command": common::test_server_bin(), "args": ["--stdio"],
        "transport": "stdio", "startup_timeout_ms": 15000, "stop_grace_period_ms": 3000});
    if let (Value::Object(s), Value::Object(e)) = (&mut spec, extra) {
        s.extend(e);
    }
    app.add_tool(spec).await;
    app.deploy_wait(slug).await;
}

/// Opens a legacy session at `url` with `key`; returns its id.
async fn keyed_session(url: &str, key: &str) -> String {
    let auth = format!("Bearer {key}");
    let init = json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-11-25", "capabilities": {},
        "clientInfo": {"name": "t", "version": "0"}}});
    let (st, h, msg) = common::mcp_rpc(url, &init, &[("authorization", &auth)]).await;
    assert_eq!(st, StatusCode::OK, "{msg:?}");
    let sid = h["mcp-session-id"].to_str().unwrap().to_owned();
    let note = json!({"jsonrpc": "2.0", "method": "notifications/initialized"});
    let (st, _, _) = common::mcp_rpc(
        url,
        &note,
        &[
            ("authorization", &auth),
            ("mcp-session-id", &sid),
            ("mcp-protocol-version", "2025-11-25"),
        ],
    )
    .await;
    assert!(st.is_success(), "{st}");
    sid
}

/// `echo` in a session with a key: the status and the error code (if any).
async fn echo_in(url: &str, key: &str, sid: &str) -> (StatusCode, Option<Value>) {
    let call = json!({"jsonrpc": "2.0", "id": 2, "method": "tools/call",
        "params": {"name": "echo", "arguments": {"text": "mine"}}});
    let auth = format!("Bearer {key}");
    let (st, _, msg) = common::mcp_rpc(
        url,
        &call,
        &[
            ("authorization", &auth),
            ("mcp-session-id", sid),
            ("mcp-protocol-version", "2025-11-25"),
        ],
    )
    .await;
    (st, msg)
}

#[tokio::test]
async fn a_session_id_from_one_key_is_404_for_another() {
    let app = secured(&["t"]).await;
    // And a stdio tool, whose bridge mints the ids.
    deploy_stdio_test_server(&app, "s", json!({})).await;
    let (_, a) = make_key(&app, json!({"name": "a", "tools": ["t", "s"]})).await;
    let (_, b) = make_key(&app, json!({"name": "b", "tools": ["t", "s"]})).await;
    for slug in ["t", "s"] {
        let url = format!("{}/mcp/{slug}", app.url);
        let sid = keyed_session(&url, &a).await;
        let (st, msg) = echo_in(&url, &b, &sid).await;
        assert_eq!(st, StatusCode::NOT_FOUND, "{slug}: {msg:?}");
        let st = client()
            .get(&url)
            .bearer_auth(&b)
            .header("accept", "text/event-stream")
            .header("mcp-session-id", &sid)
            .send()
            .await
            .unwrap()
            .status();
        assert_eq!(st, StatusCode::NOT_FOUND, "{slug}: B's GET stream");
        // A's session is untouched by B's attempts.
        let (st, msg) = echo_in(&url, &a, &sid).await;
        assert_eq!(st, StatusCode::OK, "{slug}: {msg:?}");
        assert!(msg.unwrap().to_string().contains("mine"));
    }
    app.stop().await;
}

/// The pid of the stdio server process that answered a modern `whoami` with `key`, with extra
/// headers.
async fn whoami_pid(url: &str, key: &str, extra: &[(&str, &str)]) -> u64 {
    let call = json!({"jsonrpc": "2.0", "id": 7, "method": "tools/call",
        "params": {"name": "whoami", "arguments": {}, "_meta": {
            "io.modelcontextprotocol/protocolVersion": "2026-07-28",
            "io.modelcontextprotocol/clientCapabilities": {}}}});
    let auth = format!("Bearer {key}");
    let mut headers = vec![
        ("authorization", auth.as_str()),
        ("mcp-protocol-version", "2026-07-28"),
        ("mcp-method", "tools/call"),
        ("mcp-name", "whoami"),
    ];
    headers.extend_from_slice(extra);
    let (st, _, msg) = common::mcp_rpc(url, &call, &headers).await;
    assert_eq!(st, StatusCode::OK, "{msg:?}");
    let msg = msg.unwrap();
    let text = msg["result"]["content"][0]["text"].as_str().unwrap();
    let who: Value = serde_json::from_str(text).unwrap();
    who["pid"].as_u64().unwrap()
}

#[tokio::test]
async fn each_key_gets_stdio_processes_of_its_own_and_cannot_claim_another() {
    let app = secured(&[]).await;
    deploy_stdio_test_server(&app, "s", json!({})).await;
    let (a_id, a) = make_key(&app, json!({"name": "a", "tools": ["s"]})).await;
    let (_, b) = make_key(&app, json!({"name": "b", "tools": ["s"]})).await;
    let url = format!("{}/mcp/s", app.url);
    let a_pid = whoami_pid(&url, &a, &[]).await;
    let b_pid = whoami_pid(&url, &b, &[]).await;
    assert_ne!(a_pid, b_pid, "two keys shared a stdio process");
    // A's next request stays on its own process (it is idle), and B cannot name itself A.
    assert_eq!(whoami_pid(&url, &a, &[]).await, a_pid);
    let forged = whoami_pid(&url, &b, &[("x-switchboard-principal", &a_id)]).await;
    assert_ne!(forged, a_pid, "a client chose whose process it runs on");

    // A principal's processes go once idle for the tool's stdio.session_idle_ms.
    deploy_stdio_test_server(&app, "r", json!({"stdio": {"session_idle_ms": 1000}})).await;
    let (_, c) = make_key(&app, json!({"name": "c", "tools": ["r"]})).await;
    let r_url = format!("{}/mcp/r", app.url);
    let pid = whoami_pid(&r_url, &c, &[]).await;
    eventually(Duration::from_secs(20), || async {
        !common::alive(pid as u32)
    })
    .await;
    assert_ne!(whoami_pid(&r_url, &c, &[]).await, pid);
    app.stop().await;
}
