//! The `/mcp/{slug}` reverse proxy with real deployments behind it.
#![allow(clippy::unwrap_used)]

mod common;

use std::{collections::HashSet, time::Duration};

use common::{AppOptions, TestApp, legacy_session, port_range, whoami, whoami_in_session};
use futures_util::StreamExt as _;
use reqwest::StatusCode;
use serde_json::{Value, json};
use switchboard::{config::EdgeLimits, proxy::ProxyConfig};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

fn client() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().unwrap()
}

async fn error_code(resp: reqwest::Response) -> (StatusCode, String) {
    let st = resp.status();
    let v: Value = resp.json().await.unwrap();
    (
        st,
        v["error"]["code"].as_str().unwrap_or_default().to_owned(),
    )
}

#[tokio::test]
async fn requests_reach_the_named_tool_in_both_eras() {
    let app = TestApp::start().await;
    app.add_test_tool("alpha", &[], json!({})).await;
    app.add_test_tool("beta", &[], json!({})).await;
    let a = app.deploy_wait("alpha").await;
    let b = app.deploy_wait("beta").await;

    let who = whoami(&format!("{}/mcp/alpha", app.url)).await;
    assert_eq!(who["tool"], "alpha");
    assert_eq!(who["deployment"], a["id"]);
    let who = whoami(&format!("{}/mcp/beta", app.url)).await;
    assert_eq!(who["deployment"], b["id"]);

    let url = format!("{}/mcp/beta", app.url);
    let sid = legacy_session(&url).await;
    let who = whoami_in_session(&url, &sid).await.unwrap();
    assert_eq!(
        who["deployment"], b["id"],
        "legacy session reaches the same tool"
    );
}

#[tokio::test]
async fn headers_are_rewritten_for_the_upstream() {
    let app = TestApp::start().await;
    app.add_test_tool("h", &[], json!({})).await;
    let d = app.deploy_wait("h").await;
    let resp = client()
        .post(format!("{}/mcp/h/headers?x=1", app.url))
        .header("connection", "keep-alive, x-hop")
        .header("x-hop", "1")
        .header("keep-alive", "timeout=5")
        .header("te", "trailers")
        .header("mcp-method", "tools/call")
        .header("mcp-name", "whoami")
        .header("mcp-param-region", "eu")
        .header("mcp-protocol-version", "2026-07-28")
        .header("authorization", "Bearer for-the-upstream")
        .header("x-request-id", "req-42")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["x-request-id"], "req-42");
    let seen: Value = resp.json().await.unwrap();
    let h = &seen["headers"];
    assert_eq!(seen["uri"], "/headers?x=1");
    assert_eq!(
        h["host"],
        format!("127.0.0.1:{}", d["port"]),
        "Host is the upstream authority"
    );
    assert_eq!(h["x-forwarded-for"], "127.0.0.1");
    assert_eq!(h["x-forwarded-proto"], "http");
    assert_eq!(h["x-forwarded-host"], app.url.trim_start_matches("http://"));
    assert_eq!(h["x-request-id"], "req-42");
    for hop in ["x-hop", "keep-alive", "te", "connection"] {
        assert!(h.get(hop).is_none(), "{hop} was forwarded: {h}");
    }
    for (k, v) in [
        ("mcp-method", "tools/call"),
        ("mcp-name", "whoami"),
        ("mcp-param-region", "eu"),
        ("mcp-protocol-version", "2026-07-28"),
        ("authorization", "Bearer for-the-upstream"),
    ] {
        assert_eq!(h[k], v, "{k}");
    }

    // Without a request id, one is made up and sent both ways.
    let resp = client()
        .get(format!("{}/mcp/h/headers", app.url))
        .send()
        .await
        .unwrap();
    let rid = resp.headers()["x-request-id"].to_str().unwrap().to_owned();
    let seen: Value = resp.json().await.unwrap();
    assert_eq!(seen["headers"]["x-request-id"], rid.as_str());
}

#[tokio::test]
async fn errors_are_precise() {
    let app = TestApp::with(AppOptions {
        proxy: ProxyConfig {
            max_body_bytes: 1024,
            header_timeout: Duration::from_millis(500),
            ..ProxyConfig::default()
        },
        ..Default::default()
    })
    .await;
    let c = client();
    let (st, code) = error_code(
        c.post(format!("{}/mcp/nope", app.url))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (st, code.as_str()),
        (StatusCode::NOT_FOUND, "tool_not_found")
    );

    app.add_test_tool("idle", &[], json!({})).await;
    let resp = c
        .post(format!("{}/mcp/idle", app.url))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["retry-after"], "1");
    let (st, code) = error_code(resp).await;
    assert_eq!(
        (st, code.as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, "no_healthy_deployment")
    );

    app.deploy_wait("idle").await;
    let url = format!("{}/mcp/idle", app.url);
    let (st, code) = error_code(
        c.post(&url)
            .header("origin", "http://evil.example")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (st, code.as_str()),
        (StatusCode::FORBIDDEN, "origin_not_allowed")
    );
    let ok = c
        .get(format!("{url}/headers"))
        .header("origin", "http://localhost:5173")
        .send()
        .await
        .unwrap();
    assert_eq!(
        ok.status(),
        StatusCode::OK,
        "a loopback origin is allowed by default"
    );

    let long = "s".repeat(257);
    let (st, code) = error_code(
        c.post(&url)
            .header("mcp-session-id", long)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (st, code.as_str()),
        (StatusCode::BAD_REQUEST, "invalid_session_id")
    );
    let (st, code) = error_code(
        c.post(&url)
            .header("mcp-session-id", "never-minted")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (st, code.as_str()),
        (StatusCode::NOT_FOUND, "session_not_found")
    );

    let (st, code) = error_code(c.post(&url).body(vec![b'x'; 4096]).send().await.unwrap()).await;
    assert_eq!(
        (st, code.as_str()),
        (StatusCode::PAYLOAD_TOO_LARGE, "body_too_large")
    );
    // A streamed body (no Content-Length) is counted as it flows.
    let chunks =
        futures_util::stream::iter((0..8).map(|_| Ok::<_, std::io::Error>(vec![b'y'; 512])));
    let resp = c
        .post(format!("{url}/headers"))
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .unwrap();
    // The unread rest of the body leaves the connection unusable: the client is told to drop
    // it, so the next request (below, on the same client) does not fail on it.
    assert_eq!(
        resp.headers().get("connection").map(|v| v.as_bytes()),
        Some(&b"close"[..]),
        "{:?}",
        resp.headers()
    );
    let (st, code) = error_code(resp).await;
    assert_eq!(
        (st, code.as_str()),
        (StatusCode::PAYLOAD_TOO_LARGE, "body_too_large")
    );

    let (st, code) = error_code(c.get(format!("{url}/slow?ms=10000")).send().await.unwrap()).await;
    assert_eq!(
        (st, code.as_str()),
        (StatusCode::GATEWAY_TIMEOUT, "upstream_timeout")
    );
}

#[tokio::test]
async fn sse_events_arrive_one_by_one() {
    let app = TestApp::start().await;
    app.add_test_tool("events", &[], json!({})).await;
    app.deploy_wait("events").await;
    let c = client();
    let resp = c
        .get(format!("{}/mcp/events/stream?n=4", app.url))
        .header("accept", "text/event-stream")
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
    let mut body = resp.bytes_stream();
    let mut seen = String::new();
    // The server sends event k+1 only after we ask for it, and we ask only after event k
    // arrived: a proxy that buffered would deadlock here and the timeout would say so.
    for k in 0..4 {
        let want = format!("data: event {k}\n");
        tokio::time::timeout(Duration::from_secs(20), async {
            while !seen.contains(&want) {
                let chunk = body.next().await.expect("stream ended early").unwrap();
                seen.push_str(std::str::from_utf8(&chunk).unwrap());
            }
        })
        .await
        .unwrap_or_else(|_| panic!("event {k} never arrived: the proxy buffered the stream"));
        if k < 3 {
            let r = c
                .post(format!("{}/mcp/events/stream/next", app.url))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), StatusCode::OK);
        }
    }
    assert!(seen.contains("id: 3"), "SSE framing kept: {seen}");
}

#[tokio::test]
async fn sessions_stick_to_their_replica_and_die_with_it() {
    let app = TestApp::with(AppOptions {
        ports: port_range(6),
        ..Default::default()
    })
    .await;
    app.add_test_tool("rep", &[], json!({"replicas": 3})).await;
    let mut deployments = Vec::new();
    for _ in 0..3 {
        deployments.push(
            app.deploy_wait("rep").await["id"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    let url = format!("{}/mcp/rep", app.url);
    let sessions = futures_util::future::join_all((0..30).map(|_| {
        let url = url.clone();
        async move {
            let sid = legacy_session(&url).await;
            let mut seen = HashSet::new();
            for _ in 0..5 {
                let who = whoami_in_session(&url, &sid).await.unwrap();
                seen.insert(who["deployment"].as_str().unwrap().to_owned());
            }
            assert_eq!(seen.len(), 1, "session {sid} was served by {seen:?}");
            (sid, seen.into_iter().next().unwrap())
        }
    }))
    .await;
    let used: HashSet<&String> = sessions.iter().map(|(_, d)| d).collect();
    assert_eq!(
        used.len(),
        3,
        "30 sessions over 3 replicas all went to {used:?}"
    );

    // Stop one replica: its sessions get 404 (the client must re-initialize), the others live.
    let gone = &deployments[0];
    app.stop_deployment(gone).await;
    for (sid, dep) in &sessions {
        let r = whoami_in_session(&url, sid).await;
        if dep == gone {
            assert_eq!(
                r.unwrap_err(),
                StatusCode::NOT_FOUND,
                "session {sid} on a stopped replica"
            );
        } else {
            assert_eq!(
                r.unwrap()["deployment"],
                dep.as_str(),
                "session {sid} moved"
            );
        }
    }
    // A new session lands on a live replica.
    let sid = legacy_session(&url).await;
    let who = whoami_in_session(&url, &sid).await.unwrap();
    assert_ne!(who["deployment"], gone.as_str());
}

#[tokio::test]
async fn a_killed_replica_drops_its_sessions() {
    let app = TestApp::start().await;
    app.add_test_tool("k", &[], json!({})).await;
    let d = app.deploy_wait("k").await;
    let url = format!("{}/mcp/k", app.url);
    let sid = legacy_session(&url).await;
    whoami_in_session(&url, &sid).await.unwrap();
    let pid = d["instance"]["pid"].as_u64().unwrap() as i32;
    common::sigkill(pid);
    // Restarted (same deployment, same port, a fresh process): the session is gone with the
    // old process, and the client hears 404, never another session's answers.
    app.wait_record(d["id"].as_str().unwrap(), "restarted", |r| {
        r["status"] == "RUNNING" && r["restart_count"] == 1
    })
    .await;
    assert_eq!(
        whoami_in_session(&url, &sid).await.unwrap_err(),
        StatusCode::NOT_FOUND
    );
    // A new session works on the restarted process.
    let sid2 = legacy_session(&url).await;
    whoami_in_session(&url, &sid2).await.unwrap();
}

#[tokio::test]
async fn slowloris_and_oversized_headers_are_cut_off() {
    let app = TestApp::with(AppOptions {
        edge: EdgeLimits {
            header_read_timeout: Duration::from_millis(500),
            ..EdgeLimits::default()
        },
        ..Default::default()
    })
    .await;
    let addr = app.url.trim_start_matches("http://").to_owned();

    // Half a request head, then silence: the connection is closed by the server.
    let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: 1")
        .await
        .unwrap();
    let mut buf = vec![0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return 0,
                Ok(n) if String::from_utf8_lossy(&buf[..n]).contains("408") => return n,
                Ok(_) => {}
            }
        }
    })
    .await
    .expect("a slow client kept its connection");
    let _ = n;

    let c = client();
    let mut req = c.get(format!("{}/healthz", app.url));
    for i in 0..150 {
        req = req.header(format!("x-h{i}"), "v");
    }
    assert_eq!(
        req.send().await.unwrap().status(),
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
    );
    let r = c
        .get(format!("{}/healthz", app.url))
        .header("x-big", "b".repeat(100 * 1024))
        .send()
        .await;
    match r {
        Ok(r) => assert_eq!(r.status(), StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE),
        Err(e) => assert!(
            e.is_request() || e.is_connect() || e.to_string().contains("closed"),
            "{e}"
        ),
    }

    // Garbage never crashes the server.
    for junk in [
        &b"\x00\x01\x02\r\n\r\n"[..],
        b"GET / HTTP/9.9\r\n\r\n",
        b"POST /mcp/x HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
    ] {
        let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
        s.write_all(junk).await.unwrap();
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await;
    }
    assert_eq!(
        c.get(format!("{}/healthz", app.url))
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::OK
    );
}

async fn open_streams(port: u64) -> u64 {
    let v: Value = client()
        .get(format!("http://127.0.0.1:{port}/stats"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    v["open_streams"].as_u64().unwrap()
}

#[tokio::test]
async fn a_client_that_goes_away_closes_the_upstream_stream() {
    let app = TestApp::start().await;
    app.add_test_tool("cancel", &[], json!({})).await;
    let d = app.deploy_wait("cancel").await;
    let port = d["port"].as_u64().unwrap();
    let resp = client()
        .get(format!("{}/mcp/cancel/stream?n=10", app.url))
        .send()
        .await
        .unwrap();
    let body = common::first_event(resp).await;
    assert_eq!(open_streams(port).await, 1);
    drop(body);
    common::eventually(Duration::from_secs(10), || async {
        open_streams(port).await == 0
    })
    .await;
}

#[tokio::test]
async fn a_silent_stream_is_closed_after_the_idle_limit() {
    let app = TestApp::with(AppOptions {
        proxy: ProxyConfig {
            stream_idle_timeout: Some(Duration::from_millis(300)),
            ..ProxyConfig::default()
        },
        ..Default::default()
    })
    .await;
    app.add_test_tool("quiet", &[], json!({})).await;
    let d = app.deploy_wait("quiet").await;
    let resp = client()
        .get(format!("{}/mcp/quiet/stream?n=10", app.url))
        .send()
        .await
        .unwrap();
    let mut body = common::first_event(resp).await;
    let ended = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match body.next().await {
                None | Some(Err(_)) => return,
                Some(Ok(_)) => {}
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "an idle stream stayed open");
    let port = d["port"].as_u64().unwrap();
    common::eventually(Duration::from_secs(10), || async {
        open_streams(port).await == 0
    })
    .await;
}

#[tokio::test]
async fn an_upstream_that_refuses_connections_is_a_502() {
    use std::sync::Arc;
    use switchboard::proxy::{Proxy, routes::RouteTable};
    // A port nothing listens on: bind, note it, close.
    let port = common::free_port();
    let routes = Arc::new(RouteTable::new());
    routes.add_tool("gone");
    routes.add_backend("gone", local_backend(port), None);
    let proxy = Proxy::new(routes, ProxyConfig::default());
    let req = axum::http::Request::post("/mcp/gone")
        .body(axum::body::Body::empty())
        .unwrap();
    let resp = proxy.handle(req, None).await;
    assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
    let body = axum::body::to_bytes(resp.into_body(), 1 << 20)
        .await
        .unwrap();
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["error"]["code"], "upstream_unavailable", "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains(&port.to_string()),
        "{v}"
    );
}

#[tokio::test]
async fn a_failing_replica_is_ejected_from_balancing() {
    use std::sync::Arc;
    use switchboard::proxy::{
        Proxy,
        routes::{EJECT_AFTER, RouteTable},
    };
    // A real server on one port; nothing on the other.
    let live = common::free_port();
    let dead = common::free_port();
    let mut server = std::process::Command::new(common::test_server_bin())
        .args(["--port", &live.to_string()])
        .spawn()
        .unwrap();
    common::eventually(Duration::from_secs(20), || async move {
        client()
            .get(format!("http://127.0.0.1:{live}/stats"))
            .send()
            .await
            .is_ok()
    })
    .await;
    let routes = Arc::new(RouteTable::new());
    routes.add_tool("t");
    for port in [live, dead] {
        routes.add_backend("t", local_backend(port), None);
    }
    let proxy = Proxy::new(routes, ProxyConfig::default());
    let mut failures = 0;
    for _ in 0..200 {
        let req = axum::http::Request::get("/mcp/t/stats")
            .body(axum::body::Body::empty())
            .unwrap();
        let resp = proxy.handle(req, None).await;
        match resp.status() {
            StatusCode::OK => {}
            StatusCode::BAD_GATEWAY => failures += 1,
            other => panic!("unexpected {other}"),
        }
    }
    let _ = server.kill();
    let _ = server.wait();
    // Without the breaker about half of 200 requests would fail; with it, the failures that
    // trip it and at most a half-open trial now and then.
    assert!(failures >= EJECT_AFTER, "{failures}");
    assert!(
        failures <= 25,
        "{failures} requests still went to the dead replica"
    );
}

/// A backend for a server on 127.0.0.1:`port`, as the manager would add one.
fn local_backend(port: u16) -> std::sync::Arc<switchboard::proxy::routes::Backend> {
    let endpoint = switchboard::runtime::Endpoint::Tcp {
        host: "127.0.0.1".into(),
        port,
    };
    std::sync::Arc::new(
        switchboard::proxy::routes::Backend::new(uuid::Uuid::new_v4(), endpoint, "/mcp".into())
            .unwrap(),
    )
}
