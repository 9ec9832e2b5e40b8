//! The official MCP conformance suite (`@modelcontextprotocol/conformance`, run with Node 22
//! from tests/npm) against server-everything directly and through Switchboard: every check
//! must give the same result both ways, except where the proxy itself implements a rule the
//! server breaks (listed below, with the reason).
#![allow(clippy::unwrap_used)]

mod common;

use std::{collections::BTreeMap, path::PathBuf, process::Command};

use common::TestApp;

/// Checks where Switchboard is expected to do better than the server behind it.
const PROXY_IMPROVES: &[(&str, &str)] = &[
    (
        "dns-rebinding-protection/localhost-host-rebinding-rejected",
        "the proxy enforces allowed_origins itself (403), as the spec requires of the endpoint",
    ),
    (
        "server-session-lifecycle/server-session-terminated-returns-404",
        "the proxy forgets a session on DELETE and answers its next request 404 (server-everything answers 400)",
    ),
];

fn run_suite(url: &str, out: &std::path::Path, requirements: &str) -> BTreeMap<String, String> {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/conformance/run.sh");
    let res = Command::new(&script)
        .arg(url)
        .arg(out)
        .args(["--requirements", requirements])
        .output()
        .unwrap();
    assert!(
        res.status.success(),
        "{} {url} failed (install the suite with `npm ci --prefix tests/npm`; scripts/test does):\n{}",
        script.display(),
        String::from_utf8_lossy(&res.stderr)
    );
    serde_json::from_slice(&std::fs::read(out).unwrap()).unwrap()
}

async fn compare(requirements: &str) {
    let app = TestApp::start().await;
    let d = app.deploy_everything("ev", "streamableHttp", "/mcp").await;
    let direct_url = d["endpoint_url"].as_str().unwrap().to_owned();
    let proxy_url = format!("{}/mcp/ev", app.url);
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (
        dir.path().join("direct.json"),
        dir.path().join("proxy.json"),
    );
    let req = requirements.to_owned();
    let (direct, proxied) = tokio::task::spawn_blocking(move || {
        (
            run_suite(&direct_url, &a, &req),
            run_suite(&proxy_url, &b, &req),
        )
    })
    .await
    .unwrap();

    assert!(
        direct.len() > 20,
        "the suite ran too few checks: {direct:?}"
    );
    let keys: std::collections::BTreeSet<&String> = direct.keys().chain(proxied.keys()).collect();
    let mut diffs = Vec::new();
    for k in keys {
        let (x, y) = (direct.get(k), proxied.get(k));
        if x == y {
            continue;
        }
        let allowed = PROXY_IMPROVES.iter().any(|(id, _)| id == k)
            && x.map(String::as_str) == Some("fail")
            && y.map(String::as_str) == Some("pass");
        if !allowed {
            diffs.push(format!("{k}: direct {x:?}, through Switchboard {y:?}"));
        }
    }
    assert!(
        diffs.is_empty(),
        "conformance differs through the proxy:\n{}",
        diffs.join("\n")
    );
    app.stop().await;
}

#[tokio::test]
async fn conformance_2025_11_25_is_the_same_through_switchboard() {
    compare("2025-11-25").await;
}

#[tokio::test]
async fn conformance_2026_07_28_is_the_same_through_switchboard() {
    compare("2026-07-28").await;
}
