//! OAuth 2.1 access tokens on `/mcp` with real parts: a real authorization server
//! (oidc-provider, OpenID Certified, run by tests/npm/oauth_provider.mjs on 127.0.0.1) issuing
//! JWTs by client credentials with resource indicators, a real Switchboard configured with it
//! as `[auth.oauth] issuer`, the repo's test MCP server behind it, and the official Python and
//! TypeScript SDK clients.
//!
//! Tokens that should fail because of one claim (expired, not yet valid, wrong issuer) are
//! signed by the issuer's own current key through the provider script's `/_test/sign`, so the
//! signature is good and only that claim is wrong; a forged one is signed by a key the issuer
//! never published, under the issuer's kid. Wrong-audience tokens are real ones the issuer made
//! for another resource.
#![allow(clippy::unwrap_used)]

mod common;

use std::{
    io::{BufRead as _, BufReader},
    process::{Child, Command, Stdio},
    time::Instant,
};

use common::{AppOptions, TestApp, mcp_client_as, mcp_client_output, ts_sdk_client};
use reqwest::StatusCode;
use serde_json::{Value, json};
use switchboard::auth::{McpAuth, oauth::OAuthConfig};

fn client() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().unwrap()
}

/// The authorization server, stopped when dropped.
struct Issuer {
    child: Child,
    url: String,
}

impl Issuer {
    fn start() -> Issuer {
        let npm = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/npm");
        let node = npm.join("node_modules/.bin/node");
        assert!(
            node.exists() && npm.join("node_modules/oidc-provider").exists(),
            "Node and oidc-provider are missing: install them with `npm ci --prefix tests/npm` \
             (scripts/test does this)"
        );
        let mut child = Command::new(node)
            .arg(npm.join("oauth_provider.mjs"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let v: Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("oauth_provider.mjs did not start ({e}): {line:?}"));
        Issuer {
            child,
            url: v["issuer"].as_str().unwrap().to_owned(),
        }
    }

    fn config(&self) -> OAuthConfig {
        OAuthConfig {
            issuer: self.url.clone(),
            audience: None,
            rate_limit_per_min: None,
            max_concurrent: None,
        }
    }

    /// A token by the client-credentials grant for `resource` with `scope`.
    async fn token(&self, client_id: &str, resource: &str, scope: &str) -> String {
        let resp = client()
            .post(format!("{}/token", self.url))
            .basic_auth(client_id, Some(format!("{client_id}-secret")))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(format!(
                "grant_type=client_credentials&resource={}&scope={}",
                form_encode(resource),
                form_encode(scope)
            ))
            .send()
            .await
            .unwrap();
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["token_type"], "Bearer", "{v}");
        v["access_token"].as_str().unwrap().to_owned()
    }

    /// A JWT with `claims`, signed by the issuer's current RSA key or by a `"stranger"` key
    /// under the issuer's kid.
    async fn sign(&self, claims: Value, header: Value, key: &str) -> String {
        let v: Value = client()
            .post(format!("{}/_test/sign", self.url))
            .json(&json!({"claims": claims, "header": header, "key": key}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        v["token"].as_str().unwrap().to_owned()
    }

    async fn rotate(&self) {
        let st = client()
            .post(format!("{}/_test/rotate", self.url))
            .send()
            .await
            .unwrap()
            .status();
        assert_eq!(st, StatusCode::OK);
    }

    async fn jwks_fetches(&self) -> u64 {
        let v: Value = client()
            .get(format!("{}/_test/stats", self.url))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        v["jwks_fetches"].as_u64().unwrap()
    }
}

impl Drop for Issuer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A running issuer and a Switchboard taking its tokens (`tweak` adjusts `[auth.oauth]`), with
/// the test server deployed as each slug.
async fn secured(slugs: &[&str], tweak: impl FnOnce(&mut OAuthConfig)) -> (Issuer, TestApp) {
    let issuer = Issuer::start();
    let mut oauth = issuer.config();
    tweak(&mut oauth);
    let opts = AppOptions {
        mcp_auth: McpAuth::Required,
        oauth: Some(oauth),
        ..Default::default()
    };
    let app = TestApp::with_tools(opts, slugs).await;
    (issuer, app)
}

/// Status, JSON body and `WWW-Authenticate` of an `initialize` with `bearer` on `url`.
async fn list(url: &str, bearer: &str) -> (StatusCode, Value, String) {
    let resp = client()
        .post(url)
        .bearer_auth(bearer)
        .header("accept", "application/json, text/event-stream")
        .json(&json!({"jsonrpc": "2.0", "id": 1, "method": "initialize",
                      "params": {"protocolVersion": "2025-11-25", "capabilities": {},
                                 "clientInfo": {"name": "t", "version": "0"}}}))
        .send()
        .await
        .unwrap();
    let st = resp.status();
    let challenge = resp
        .headers()
        .get("www-authenticate")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    let text = resp.text().await.unwrap();
    assert!(
        !text.contains(bearer),
        "the answer echoes the token: {text}"
    );
    let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (st, body, challenge)
}

/// `application/x-www-form-urlencoded` for one value.
fn form_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[tokio::test]
async fn tokens_from_the_issuer_list_and_call_tools_with_the_python_and_typescript_sdks() {
    let (issuer, app) = secured(&["t"], |_| {}).await;
    let url = format!("{}/mcp/t", app.url);
    // RS256 (rs-client) and ES256 (es-client) tokens, both with aud = the tool's URL.
    for client_id in ["rs-client", "es-client"] {
        let token = issuer.token(client_id, &url, "mcp:t").await;
        for era in ["legacy", "modern"] {
            let called = mcp_client_as(
                Some(&token),
                &[
                    "--url",
                    &url,
                    "--era",
                    era,
                    "call-tool",
                    "echo",
                    "--args",
                    r#"{"text":"via oauth"}"#,
                ],
            )
            .await;
            assert!(
                called["result"].to_string().contains("via oauth"),
                "{client_id} {era}: {called}"
            );
        }
    }
    let token = issuer.token("rs-client", &url, "mcp:t").await;
    let (ok, v) = ts_sdk_client(Some(&token), &url, "echo", r#"{"text":"from ts"}"#).await;
    assert!(ok, "{v}");
    assert!(
        v["tools"].as_array().unwrap().iter().any(|t| t == "echo"),
        "{v}"
    );
    assert!(v["result"].to_string().contains("from ts"), "{v}");
    app.stop().await;
}

#[tokio::test]
async fn without_a_token_the_401_points_at_metadata_naming_the_issuer() {
    let (issuer, app) = secured(&["t"], |_| {}).await;
    let url = format!("{}/mcp/t", app.url);
    // The SDK clients fail without a credential.
    let out = mcp_client_output(None, &["--url", &url, "list-tools"]).await;
    assert!(!out.status.success());
    let (ok, v) = ts_sdk_client(None, &url, "echo", r#"{"text":"x"}"#).await;
    assert!(!ok, "{v}");
    // What they were told: the 401's metadata URL, whose document names the issuer.
    let resp = client()
        .post(&url)
        .header("accept", "application/json, text/event-stream")
        .json(&json!({"jsonrpc": "2.0", "id": 1, "method": "tools/list"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    let challenge = resp.headers()["www-authenticate"].to_str().unwrap();
    assert!(!challenge.contains("error="), "{challenge}");
    let metadata_url = challenge
        .split("resource_metadata=\"")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .unwrap();
    let prm: Value = client()
        .get(metadata_url)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(prm["resource"], url, "{prm}");
    assert_eq!(prm["authorization_servers"], json!([issuer.url]), "{prm}");
    assert_eq!(prm["scopes_supported"], json!(["mcp:t"]), "{prm}");
    app.stop().await;
}

#[tokio::test]
async fn bad_tokens_are_401_saying_what_failed() {
    let (issuer, app) = secured(&["t"], |_| {}).await;
    let url = format!("{}/mcp/t", app.url);
    let t = now();
    let claims = |over: Value| {
        let mut c = json!({"iss": issuer.url, "aud": url, "sub": "alice", "scope": "mcp:t",
                           "iat": t, "exp": t + 300});
        for (k, v) in over.as_object().unwrap() {
            c[k] = v.clone();
        }
        c
    };
    // The crafted tokens' only fault is the claim changed: the same recipe unchanged passes.
    let good = issuer.sign(claims(json!({})), json!({}), "issuer").await;
    let (st, v, _) = list(&url, &good).await;
    assert_eq!(st, StatusCode::OK, "{v}");

    let cases = [
        (
            "expired",
            issuer
                .sign(
                    claims(json!({"iat": t - 600, "exp": t - 120})),
                    json!({}),
                    "issuer",
                )
                .await,
            "token_expired",
        ),
        (
            "not yet valid",
            issuer
                .sign(claims(json!({"nbf": t + 300})), json!({}), "issuer")
                .await,
            "token_not_yet_valid",
        ),
        (
            "wrong issuer",
            issuer
                .sign(
                    claims(json!({"iss": "http://127.0.0.1:1"})),
                    json!({}),
                    "issuer",
                )
                .await,
            "token_wrong_issuer",
        ),
        (
            "forged",
            issuer.sign(claims(json!({})), json!({}), "stranger").await,
            "token_bad_signature",
        ),
        (
            // A real token the issuer made for another tool.
            "wrong audience",
            issuer
                .token("rs-client", &format!("{}/mcp/other", app.url), "mcp:t")
                .await,
            "token_wrong_audience",
        ),
        (
            "unknown key",
            issuer
                .sign(claims(json!({})), json!({"kid": "nobody"}), "stranger")
                .await,
            "token_unknown_key",
        ),
        ("not a JWT", "garbage".to_owned(), "token_malformed"),
    ];
    for (what, token, code) in cases {
        let (st, v, challenge) = list(&url, &token).await;
        assert_eq!(st, StatusCode::UNAUTHORIZED, "{what}: {v}");
        assert_eq!(v["error"]["code"], code, "{what}: {v}");
        assert!(
            challenge.contains("error=\"invalid_token\"")
                && challenge.contains("resource_metadata=\""),
            "{what}: {challenge}"
        );
    }
    app.stop().await;
}

#[tokio::test]
async fn a_key_rotation_at_the_issuer_is_picked_up_by_refetching_its_keys() {
    let (issuer, app) = secured(&["t"], |_| {}).await;
    let url = format!("{}/mcp/t", app.url);
    let old = issuer.token("rs-client", &url, "mcp:t").await;
    assert_eq!(list(&url, &old).await.0, StatusCode::OK);
    let before = issuer.jwks_fetches().await;
    issuer.rotate().await;
    let new = issuer.token("rs-client", &url, "mcp:t").await;
    let (st, v, _) = list(&url, &new).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert!(issuer.jwks_fetches().await > before);
    // The old key is gone from the issuer's set, so its tokens are no longer accepted.
    let (st, v, _) = list(&url, &old).await;
    assert_eq!(st, StatusCode::UNAUTHORIZED, "{v}");
    assert_eq!(v["error"]["code"], "token_unknown_key", "{v}");
    app.stop().await;
}

#[tokio::test]
async fn a_flood_of_unknown_kids_refetches_the_keys_a_bounded_number_of_times() {
    let (issuer, app) = secured(&["t"], |_| {}).await;
    let url = format!("{}/mcp/t", app.url);
    let good = issuer.token("rs-client", &url, "mcp:t").await;
    assert_eq!(list(&url, &good).await.0, StatusCode::OK);
    let before = issuer.jwks_fetches().await;
    let started = Instant::now();
    let t = now();
    for i in 0..30 {
        let bogus = issuer
            .sign(
                json!({"iss": issuer.url, "aud": url, "sub": "x", "exp": t + 300}),
                json!({"kid": format!("bogus-{i}")}),
                "stranger",
            )
            .await;
        let (st, v, _) = list(&url, &bogus).await;
        assert_eq!(st, StatusCode::UNAUTHORIZED, "{v}");
        assert_eq!(v["error"]["code"], "token_unknown_key", "{v}");
    }
    // A burst of REFETCHES_PER_MIN, then one per 60/REFETCHES_PER_MIN seconds of the time
    // the flood took (not a timing assertion: the allowance grows with the time taken).
    let per_min = u64::from(switchboard::auth::oauth::REFETCHES_PER_MIN);
    let allowed = per_min + started.elapsed().as_secs() / (60 / per_min) + 1;
    let fetched = issuer.jwks_fetches().await - before;
    assert!(fetched <= allowed, "{fetched} fetches for 30 unknown kids");
    // Known keys still work.
    assert_eq!(list(&url, &good).await.0, StatusCode::OK);
    app.stop().await;
}

#[tokio::test]
async fn scopes_grant_tools_like_keys_and_quotas_are_per_subject() {
    let (issuer, app) = secured(&["t", "u"], |c| c.rate_limit_per_min = Some(3)).await;
    let t_url = format!("{}/mcp/t", app.url);
    let u_url = format!("{}/mcp/u", app.url);
    // A token for t's URL with only u's scope: 403 naming the scope that would do.
    let wrong_scope = issuer.token("rs-client", &t_url, "mcp:u").await;
    let (st, v, challenge) = list(&t_url, &wrong_scope).await;
    assert_eq!(st, StatusCode::FORBIDDEN, "{v}");
    assert_eq!(v["error"]["code"], "forbidden", "{v}");
    assert!(
        challenge.contains("error=\"insufficient_scope\"") && challenge.contains("scope=\"mcp:t\""),
        "{challenge}"
    );
    let everything = issuer.token("rs-client", &u_url, "mcp:*").await;
    assert_eq!(list(&u_url, &everything).await.0, StatusCode::OK);
    // rs-client has spent 1 request of its 3 (a refused one spends nothing): two more pass,
    // with another token of the same subject, and the next is refused.
    let t_token = issuer.token("rs-client", &t_url, "mcp:t").await;
    for _ in 0..2 {
        assert_eq!(list(&t_url, &t_token).await.0, StatusCode::OK);
    }
    let (st, v, _) = list(&t_url, &t_token).await;
    assert_eq!(st, StatusCode::TOO_MANY_REQUESTS, "{v}");
    // Another subject has a bucket of its own.
    let other = issuer.token("es-client", &t_url, "mcp:t").await;
    assert_eq!(list(&t_url, &other).await.0, StatusCode::OK);
    app.stop().await;
}

#[tokio::test]
async fn a_configured_audience_replaces_the_resource_url() {
    let (issuer, app) = secured(&["t"], |c| {
        c.audience = Some("https://switchboard.example/mcp".into())
    })
    .await;
    let url = format!("{}/mcp/t", app.url);
    let for_url = issuer.token("rs-client", &url, "mcp:t").await;
    let (st, v, _) = list(&url, &for_url).await;
    assert_eq!(st, StatusCode::UNAUTHORIZED, "{v}");
    assert_eq!(v["error"]["code"], "token_wrong_audience", "{v}");
    let for_audience = issuer
        .token("rs-client", "https://switchboard.example/mcp", "mcp:t")
        .await;
    let (st, v, _) = list(&url, &for_audience).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    app.stop().await;
}
