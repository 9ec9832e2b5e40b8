//! Crash safety: a seeded loop of deploy and stop requests against the real `switchboard`
//! binary, SIGKILLed at a random point of each round. After every restart the store and the
//! processes must agree: every acknowledged deployment is on record, desired equals actual
//! within 5 s, no process runs that no live record owns, at most one process per deployment,
//! and SQLite's `PRAGMA integrity_check` says ok.
//!
//! 50 rounds by default; `SWITCHBOARD_CRASH_ROUNDS=1000` for a longer run, and
//! `SWITCHBOARD_CRASH_SEED=N` to replay one (the seed is printed).
#![allow(clippy::unwrap_used)]

mod common;

use std::{collections::HashMap, path::Path, process::Stdio, time::Duration};

use common::{port_range, switchboard_bin, test_server_bin};
use serde_json::{Value, json};
use tokio::{
    io::{AsyncBufReadExt as _, BufReader},
    process::{Child, Command},
    time::Instant,
};

struct Node {
    child: Child,
    url: String,
}

async fn start(data_dir: &Path, range: &str) -> Node {
    let mut child = Command::new(switchboard_bin())
        .args(["serve", "--listen", "127.0.0.1:0", "--port-range", range])
        .arg("--data-dir")
        .arg(data_dir)
        .env("RUST_LOG", "warn,switchboard::server=info")
        .env_remove("SWITCHBOARD_API_TOKEN")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let url = loop {
        let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
            .await
            .expect("switchboard did not start within 30 s")
            .unwrap()
            .expect("switchboard exited before listening");
        if let Some((_, rest)) = line.split_once("listening on ") {
            break rest.split_whitespace().next().unwrap().to_owned();
        }
    };
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Node { child, url }
}

/// What the test knows was acknowledged: deployment id → whether a stop was acknowledged.
type Acked = HashMap<String, bool>;

async fn api(http: &reqwest::Client, method: reqwest::Method, url: String) -> Option<Value> {
    let r = http.request(method, url).send().await.ok()?;
    if !r.status().is_success() {
        return None;
    }
    r.json().await.ok()
}

/// Processes of this test's deployments, by the deployment id in their environment.
fn processes(marker: &str) -> Vec<(u32, String)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(env) = std::fs::read(format!("/proc/{pid}/environ")) else {
            continue;
        };
        let vars: Vec<&[u8]> = env.split(|b| *b == 0).collect();
        if !vars.contains(&marker.as_bytes()) {
            continue;
        }
        if !common::alive(pid) {
            continue;
        }
        if let Some(id) = vars
            .iter()
            .find_map(|v| v.strip_prefix(b"SWITCHBOARD_DEPLOYMENT_ID="))
        {
            out.push((pid, String::from_utf8_lossy(id).into_owned()));
        }
    }
    out
}

async fn integrity(db: &Path) -> String {
    use sqlx::Connection as _;
    let mut c = sqlx::SqliteConnection::connect(&format!("sqlite://{}?mode=ro", db.display()))
        .await
        .unwrap();
    let (r,): (String,) = sqlx::query_as("PRAGMA integrity_check")
        .fetch_one(&mut c)
        .await
        .unwrap();
    r
}

/// The invariants, checked after a restart. Desired must equal actual within 5 s.
async fn check(http: &reqwest::Client, node: &Node, acked: &Acked, marker: &str, db: &Path) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let all: Vec<Value> = api(
            http,
            reqwest::Method::GET,
            format!("{}/api/v1/deployments", node.url),
        )
        .await
        .unwrap()
        .as_array()
        .unwrap()
        .clone();
        let by_id: HashMap<&str, &Value> =
            all.iter().map(|d| (d["id"].as_str().unwrap(), d)).collect();
        let mut problems = Vec::new();
        for (id, stop_acked) in acked {
            match by_id.get(id.as_str()) {
                None => problems.push(format!("acknowledged deployment {id} is not on record")),
                Some(d) => {
                    let want = match (stop_acked, d["desired"].as_str()) {
                        (true, _) | (false, Some("STOPPED")) => "STOPPED",
                        _ => "RUNNING",
                    };
                    if *stop_acked && d["desired"] != "STOPPED" && d["status"] != "STOPPED" {
                        problems.push(format!("stopped {id} is desired {}", d["desired"]));
                    }
                    if d["status"] != want {
                        problems.push(format!("{id} is {} but desired {want}", d["status"]));
                    }
                }
            }
        }
        let procs = processes(marker);
        let mut per_deployment: HashMap<&str, Vec<u32>> = HashMap::new();
        for (pid, id) in &procs {
            per_deployment.entry(id.as_str()).or_default().push(*pid);
        }
        for (id, pids) in &per_deployment {
            match by_id.get(id) {
                None => problems.push(format!("orphan {pids:?} of unknown deployment {id}")),
                Some(d) if d["status"] != "RUNNING" && d["status"] != "STARTING" => problems.push(
                    format!("orphan {pids:?} of {} deployment {id}", d["status"]),
                ),
                Some(d) => {
                    if pids.len() > 1 {
                        problems.push(format!("{} processes for deployment {id}", pids.len()));
                    }
                    if d["status"] == "RUNNING"
                        && d["instance"]["pid"].as_u64() != Some(u64::from(pids[0]))
                    {
                        problems.push(format!(
                            "{id} records pid {} but runs {pids:?}",
                            d["instance"]["pid"]
                        ));
                    }
                }
            }
        }
        for d in &all {
            let id = d["id"].as_str().unwrap();
            if d["status"] == "RUNNING" && !per_deployment.contains_key(id) {
                problems.push(format!("RUNNING deployment {id} has no process"));
            }
        }
        if problems.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "after 5 s desired still differs from actual:\n{}",
            problems.join("\n")
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(integrity(db).await, "ok");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploys_and_stops_survive_sigkill_at_random_points() {
    let rounds: usize = std::env::var("SWITCHBOARD_CRASH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50);
    let seed: u64 = std::env::var("SWITCHBOARD_CRASH_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| fastrand::u64(..));
    eprintln!("crash-safety: {rounds} rounds, SWITCHBOARD_CRASH_SEED={seed}");
    let mut rng = fastrand::Rng::with_seed(seed);
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("switchboard.db");
    let range = port_range(10).to_string();
    let marker = format!("CRASH_TEST_MARKER={}", uuid::Uuid::new_v4());
    let http = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();

    let node = start(dir.path(), &range).await;
    let (_, env_value) = marker.split_once('=').unwrap();
    let r = http
        .post(format!("{}/api/v1/tools", node.url))
        .json(&json!({
            "slug": "t",
            "command": test_server_bin(),
            "args": ["--port", "{port}"],
            "env": {"CRASH_TEST_MARKER": env_value},
            "stop_grace_period_ms": 2000,
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let mut node = node;
    let mut acked = Acked::new();
    for round in 0..rounds {
        // A burst of requests, and a SIGKILL somewhere in it.
        let live: Vec<String> = acked
            .iter()
            .filter(|(_, stopped)| !**stopped)
            .map(|(id, _)| id.clone())
            .collect();
        let mut ops = Vec::new();
        for _ in 0..rng.usize(1..=4) {
            if live.len() < 5 && (live.is_empty() || rng.bool()) {
                ops.push((
                    reqwest::Method::POST,
                    format!("{}/api/v1/tools/t/deployments", node.url),
                    None,
                ));
            } else {
                let id = &live[rng.usize(..live.len())];
                ops.push((
                    reqwest::Method::POST,
                    format!("{}/api/v1/deployments/{id}/stop", node.url),
                    Some(id.clone()),
                ));
            }
        }
        let kill_after = Duration::from_millis(rng.u64(0..400));
        let requests = futures_util::future::join_all(ops.into_iter().map(|(m, url, stop)| {
            let http = http.clone();
            async move { (api(&http, m, url).await, stop) }
        }));
        let pid = nix::unistd::Pid::from_raw(node.child.id().unwrap() as i32);
        let (results, _) = tokio::join!(requests, async {
            tokio::time::sleep(kill_after).await;
            nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).unwrap();
        });
        for (resp, stop) in results {
            match (resp, stop) {
                (Some(d), None) => {
                    acked.insert(d["id"].as_str().unwrap().to_owned(), false);
                }
                (Some(_), Some(id)) => {
                    acked.insert(id, true);
                }
                (None, _) => {}
            }
        }
        let _ = node.child.wait().await;
        node = start(dir.path(), &range).await;
        check(&http, &node, &acked, &marker, &db).await;
        // Deploys that ran but whose answer the kill cut off are live too: adopt them into
        // the bookkeeping so later rounds stop them (and ports do not run out).
        let all = api(
            &http,
            reqwest::Method::GET,
            format!("{}/api/v1/deployments?status=STARTING,RUNNING", node.url),
        )
        .await
        .unwrap();
        for d in all.as_array().unwrap() {
            acked
                .entry(d["id"].as_str().unwrap().to_owned())
                .or_insert(false);
        }
        if round % 10 == 9 {
            eprintln!(
                "crash-safety: {} rounds ok, {} deployments acknowledged, {} processes running",
                round + 1,
                acked.len(),
                processes(&marker).len()
            );
        }
    }
    // Clean up: stop what runs, then let the node go.
    for (id, stopped) in &acked {
        if !stopped {
            api(
                &http,
                reqwest::Method::POST,
                format!("{}/api/v1/deployments/{id}/stop", node.url),
            )
            .await;
        }
    }
    let _ = node.child.kill().await;
    common::kill_node_trees(dir.path());
}
