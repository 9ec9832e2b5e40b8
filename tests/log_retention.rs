//! `[logs]` retention against a real Switchboard: ended deployments' logs go by age and by
//! total size, at start and on every later pass; a live deployment's log and every record stay.
#![allow(clippy::unwrap_used)]

mod common;

use std::{
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use common::{AppOptions, TestApp, eventually};
use switchboard::log_retention::LogRetention;
use uuid::Uuid;

const HOUR: Duration = Duration::from_secs(3600);

/// A log file of `bytes` bytes, last written `age` ago.
fn log_file(dir: &Path, name: &str, bytes: usize, age: Duration) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, vec![b'x'; bytes]).unwrap();
    age_file(&path, age);
    path
}

fn age_file(path: &Path, age: Duration) {
    let f = std::fs::File::options().write(true).open(path).unwrap();
    f.set_modified(SystemTime::now() - age).unwrap();
}

#[tokio::test]
async fn ended_deployments_logs_follow_the_retention_setting() {
    let data_dir = tempfile::tempdir().unwrap();
    let logs = data_dir.path().join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    // Left by an earlier run: one set past the age limit, three recent ones that together
    // exceed the size limit (the two oldest must go), and a file that is no log.
    let old = Uuid::new_v4();
    let old_files = [
        log_file(&logs, &format!("{old}.log"), 100, 72 * HOUR),
        log_file(&logs, &format!("{old}.log.1"), 100, 72 * HOUR),
    ];
    let kib600 = 600 * 1024;
    let recent: Vec<PathBuf> = [3u32, 2, 1]
        .into_iter()
        .map(|h| log_file(&logs, &format!("{}.log", Uuid::new_v4()), kib600, h * HOUR))
        .collect();
    let notes = log_file(&logs, "notes.txt", 10, 1000 * HOUR);

    let app = TestApp::start_in(
        data_dir,
        AppOptions {
            log_retention: LogRetention {
                max_age: 24 * HOUR,
                max_total_bytes: 1024 * 1024,
                interval: Duration::from_secs(1),
            },
            ..Default::default()
        },
    )
    .await;
    eventually(Duration::from_secs(30), || async {
        old_files.iter().chain(&recent[..2]).all(|f| !f.exists())
    })
    .await;
    assert!(recent[2].exists(), "the newest ended log fits the limit");
    assert!(notes.exists(), "a file that is no log was removed");

    // A live deployment's log stays however old it looks; a later pass removes a new old log.
    app.add_test_tool("kept", &[], serde_json::json!({})).await;
    let d = app.deploy_wait("kept").await;
    let id = d["id"].as_str().unwrap().to_owned();
    let live_log = logs.join(format!("{id}.log"));
    age_file(&live_log, 100 * HOUR);
    let late = log_file(&logs, &format!("{}.log", Uuid::new_v4()), 10, 48 * HOUR);
    eventually(Duration::from_secs(30), || async { !late.exists() }).await;
    assert!(live_log.exists(), "a live deployment's log was removed");
    assert!(app.logs(&id, 5).await.contains("listening"));

    // Once it ends, its log goes like the others; its record stays.
    app.stop_deployment(&id).await;
    age_file(&live_log, 100 * HOUR);
    eventually(Duration::from_secs(30), || async { !live_log.exists() }).await;
    let rec = app.deployment(&id).await;
    assert_eq!(rec["status"], "STOPPED", "{rec}");
    assert_eq!(app.logs(&id, 5).await, "");
    app.stop().await;
}
