//! Secrets at rest through a real Switchboard (SQLite in its data directory, the repo's test
//! MCP server as the deployed process): `secret_env` values reach the server's environment
//! but never the database file, the key file is created 0600, and a Switchboard with another
//! key names the tools it cannot start, refuses to start them without their secrets, and
//! loses nothing. The store's side on every backend is in tests/store.rs, the upgrade from
//! the previous release in tests/cli.rs.
#![allow(clippy::unwrap_used)]

mod common;

use std::os::unix::fs::PermissionsExt as _;

use common::{AppOptions, TestApp, database_holds, process_environ as environ, whoami};
use reqwest::StatusCode;
use serde_json::{Value, json};
use switchboard::secrets::{KeySource, SecretKey};

const SECRET: &str = "sk-test-5f1e2d3c4b5a69788796";

/// A key given as `SWITCHBOARD_SECRET_KEY` would give it.
fn env_key(byte: u8) -> KeySource {
    use base64::Engine as _;
    let text = base64::engine::general_purpose::STANDARD.encode([byte; 32]);
    KeySource::Env(SecretKey::from_base64(&text, "SWITCHBOARD_SECRET_KEY").unwrap())
}

/// Switchboard on this data directory, its key from the environment and not the one in the
/// directory's key file.
async fn start_with_another_key(dir: tempfile::TempDir) -> TestApp {
    TestApp::start_in(
        dir,
        AppOptions {
            secret_key: env_key(8),
            ..Default::default()
        },
    )
    .await
}

async fn add_vault(app: &TestApp) -> Value {
    app.add_test_tool("vault", &[], json!({"secret_env": {"API_KEY": SECRET}}))
        .await
}

/// The pid of the server behind a deployment record.
async fn server_pid(d: &Value) -> u64 {
    whoami(d["endpoint_url"].as_str().unwrap()).await["pid"]
        .as_u64()
        .unwrap()
}

async fn deploy_status(app: &TestApp, slug: &str) -> (StatusCode, Value) {
    app.call(
        "POST",
        &format!("/api/v1/tools/{slug}/deployments?wait=true"),
        None,
    )
    .await
}

#[tokio::test]
async fn a_secret_reaches_its_server_and_never_the_database_file() {
    let app = TestApp::start().await;
    let key_file = app.data_dir.path().join("secret.key");
    let mode = std::fs::metadata(&key_file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the key file is the owner's alone");
    let text = std::fs::read_to_string(&key_file).unwrap();
    SecretKey::from_base64(&text, "the key file").expect("32 bytes in base64");

    let tool = add_vault(&app).await;
    assert_eq!(tool["secret_env"]["API_KEY"], "********");
    let d = app.deploy_wait("vault").await;
    assert_eq!(d["status"], "RUNNING", "{d}");
    let env = environ(server_pid(&d).await);
    assert!(env.contains(&format!("API_KEY={SECRET}")), "{env:?}");
    assert!(
        !database_holds(app.data_dir.path(), SECRET),
        "the plain value is in the database file"
    );
    assert!(
        !database_holds(app.data_dir.path(), &text[..20]),
        "nor the key"
    );

    // An update that sends the tool back as the API shows it keeps the stored value.
    app.stop_deployment(d["id"].as_str().unwrap()).await;
    let (_, mut shown) = app.call("GET", "/api/v1/tools/vault", None).await;
    shown["description"] = "updated".into();
    let (st, v) = app.call("PUT", "/api/v1/tools/vault", Some(shown)).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let d = app.deploy_wait("vault").await;
    let env = environ(server_pid(&d).await);
    assert!(env.contains(&format!("API_KEY={SECRET}")), "{env:?}");
    assert!(!database_holds(app.data_dir.path(), SECRET));
    app.stop().await;
}

#[tokio::test]
async fn with_another_key_a_tool_is_refused_by_name_and_nothing_is_lost() {
    let app = TestApp::start().await;
    app.add_test_tool(
        "vault",
        &[],
        json!({"secret_env": {"API_KEY": SECRET}, "autostart": true}),
    )
    .await;
    // Autostart goes in slug order: this one comes after the tool that cannot start.
    app.add_test_tool("z-plain", &[], json!({"autostart": true}))
        .await;
    let dir = app.stop().await;

    let app = start_with_another_key(dir).await;
    let (st, e) = deploy_status(&app, "vault").await;
    assert_eq!(st, StatusCode::CONFLICT, "{e}");
    assert_eq!(e["error"]["code"], "secrets_unreadable", "{e}");
    let msg = e["error"]["message"].as_str().unwrap();
    assert!(msg.contains("'vault'") && msg.contains("API_KEY"), "{msg}");
    assert!(!msg.contains(SECRET) && !msg.contains("enc:"), "{msg}");
    common::eventually(std::time::Duration::from_secs(30), || async {
        let (_, ds) = app
            .call(
                "GET",
                "/api/v1/deployments?tool=z-plain&status=RUNNING",
                None,
            )
            .await;
        ds.as_array().is_some_and(|a| a.len() == 1)
    })
    .await;
    // The unreadable value is shown as present and kept through an update.
    let (_, mut shown) = app.call("GET", "/api/v1/tools/vault", None).await;
    assert_eq!(shown["secret_env"]["API_KEY"], "********", "{shown}");
    shown["description"] = "edited while the key was wrong".into();
    let (st, v) = app.call("PUT", "/api/v1/tools/vault", Some(shown)).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let (st, _) = deploy_status(&app, "vault").await;
    assert_eq!(st, StatusCode::CONFLICT);
    let dir = app.stop().await;

    // The right key (the data directory's file, which the env key never replaced) again.
    let app = TestApp::start_in(dir, AppOptions::default()).await;
    let d = app.deploy_wait("vault").await;
    assert_eq!(d["status"], "RUNNING", "{d}");
    let env = environ(server_pid(&d).await);
    assert!(env.contains(&format!("API_KEY={SECRET}")), "{env:?}");
    let (_, tool) = app.call("GET", "/api/v1/tools/vault", None).await;
    assert_eq!(tool["description"], "edited while the key was wrong");
    app.stop().await;
}

/// A deployment adopted by a Switchboard that cannot decrypt its tool's secrets keeps running
/// (it has its environment); when it ends, it is FAILED with the reason, never restarted
/// without its secrets.
#[tokio::test]
async fn an_adopted_deployment_is_not_restarted_without_its_secrets() {
    let app = TestApp::start().await;
    add_vault(&app).await;
    let d = app.deploy_wait("vault").await;
    let id = d["id"].as_str().unwrap().to_owned();
    let pid = server_pid(&d).await;
    let dir = app.crash().await;

    let app = start_with_another_key(dir).await;
    let rec = app.deployment(&id).await;
    assert_eq!(rec["status"], "RUNNING", "adopted: {rec}");
    assert_eq!(rec["instance"]["pid"].as_u64(), Some(pid), "{rec}");
    common::sigkill(i32::try_from(pid).unwrap());
    let rec = app.wait_status(&id, "FAILED").await;
    let error = rec["error"].as_str().unwrap();
    assert!(
        error.contains("'vault'") && error.contains("API_KEY") && error.contains("decrypted"),
        "{rec}"
    );
    app.stop().await;
}
