//! A process tool's `limits`, enforced by cgroup controllers (v1 on these hosts, whose v2 tree
//! has none): the values in the deployment's groups, an OOM kill recorded and restarted, the
//! pids limit biting, and no group left behind.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};

use common::TestApp;
use reqwest::StatusCode;
use serde_json::{Value, json};

/// The directory of `pid`'s cgroup in the v1 hierarchy of `controller`, from /proc/PID/cgroup.
fn v1_group(pid: u64, controller: &str) -> PathBuf {
    let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let path = cgroups
        .lines()
        .find_map(|l| {
            let mut parts = l.splitn(3, ':');
            let (_, names, path) = (parts.next()?, parts.next()?, parts.next()?);
            names.split(',').any(|n| n == controller).then_some(path)
        })
        .unwrap_or_else(|| {
            panic!(
                "no cgroup v1 {controller} hierarchy on this host (mount it: \
                 mount -t cgroup -o {controller} cgroup /sys/fs/cgroup/{controller}):\n{cgroups}"
            )
        });
    PathBuf::from(format!(
        "/sys/fs/cgroup/{controller}{}",
        path.trim_end_matches('/')
    ))
}

fn read(dir: &Path, file: &str) -> String {
    let at = dir.join(file);
    std::fs::read_to_string(&at)
        .unwrap_or_else(|e| panic!("{}: {e}", at.display()))
        .trim()
        .to_owned()
}

fn node_id(app: &TestApp) -> String {
    std::fs::read_to_string(app.data_dir.path().join("node-id"))
        .unwrap()
        .trim()
        .to_owned()
}

/// Stops the deployment; none of its `groups` may outlive it.
async fn stop_leaving_no_group(app: &TestApp, id: &str, groups: &[&Path]) {
    app.stop_deployment(id).await;
    for dir in groups {
        assert!(!dir.exists(), "{} outlived the deployment", dir.display());
    }
}

fn pid_of(d: &Value) -> u64 {
    d["instance"]["pid"]
        .as_u64()
        .unwrap_or_else(|| panic!("no pid: {d}"))
}

#[tokio::test]
async fn a_process_deployments_limits_are_in_its_cgroups_and_leave_with_it() {
    let app = TestApp::start().await;
    app.add_test_tool(
        "limited",
        &[],
        json!({"limits": {"memory": "64MiB", "cpus": 0.5, "pids": 64}}),
    )
    .await;
    let (st, tool) = app.call("GET", "/api/v1/tools/limited", None).await;
    assert_eq!(st, StatusCode::OK, "{tool}");
    assert_eq!(
        tool["limits"],
        json!({"memory": "64MiB", "cpus": 0.5, "pids": 64})
    );
    let d = app.deploy_wait("limited").await;
    assert_eq!(d["status"], "RUNNING", "{d}");
    let id = d["id"].as_str().unwrap().to_owned();
    let pid = pid_of(&d);
    let node = node_id(&app);
    let groups: Vec<(&str, PathBuf)> = ["memory", "pids", "cpu"]
        .into_iter()
        .map(|c| (c, v1_group(pid, c)))
        .collect();
    for (controller, dir) in &groups {
        assert!(
            dir.ends_with(format!("switchboard/{node}/{id}")),
            "the server's {controller} cgroup is not its deployment's: {}",
            dir.display()
        );
        let members: Vec<u64> = read(dir, "cgroup.procs")
            .lines()
            .map(|l| l.parse().unwrap())
            .collect();
        assert!(
            members.contains(&pid),
            "{pid} not in {}: {members:?}",
            dir.display()
        );
    }
    let (memory, pids, cpu) = (&groups[0].1, &groups[1].1, &groups[2].1);
    let mib64 = (64u64 << 20).to_string();
    assert_eq!(read(memory, "memory.limit_in_bytes"), mib64);
    if memory.join("memory.memsw.limit_in_bytes").exists() {
        assert_eq!(
            read(memory, "memory.memsw.limit_in_bytes"),
            mib64,
            "swap must not add to the limit"
        );
    }
    assert_eq!(read(pids, "pids.max"), "64");
    let quota: u64 = read(cpu, "cpu.cfs_quota_us").parse().unwrap();
    let period: u64 = read(cpu, "cpu.cfs_period_us").parse().unwrap();
    assert_eq!(quota * 2, period, "not half a CPU: {quota}/{period}");

    let dirs: Vec<&Path> = groups.iter().map(|(_, d)| d.as_path()).collect();
    stop_leaving_no_group(&app, &id, &dirs).await;
    app.stop().await;
    for (controller, dir) in &groups {
        let node_dir = dir.parent().unwrap();
        assert!(
            !node_dir.exists(),
            "the node's {controller} cgroup outlived Switchboard's graceful exit: {}",
            node_dir.display()
        );
    }
}

#[tokio::test]
async fn a_process_past_its_memory_limit_is_oom_killed_recorded_so_and_restarted() {
    let app = TestApp::start().await;
    app.add_test_tool(
        "hog",
        &[],
        json!({"limits": {"memory": "32MiB"}, "restart": {"initial_delay_ms": 100}}),
    )
    .await;
    let d = app.deploy_wait("hog").await;
    assert_eq!(d["status"], "RUNNING", "{d}");
    let id = d["id"].as_str().unwrap().to_owned();
    let first = pid_of(&d);
    let again = app
        .oom_kill_and_restart("hog", &id, "out of memory: limit 32 MiB", |r| {
            r["instance"]["pid"].as_u64().is_some_and(|p| p != first)
        })
        .await;
    // The restarted server is limited as the first was.
    let memory = v1_group(pid_of(&again), "memory");
    assert_eq!(
        read(&memory, "memory.limit_in_bytes"),
        (32u64 << 20).to_string()
    );
    stop_leaving_no_group(&app, &id, &[&memory]).await;
    app.stop().await;
}

/// Forks children that sleep until one fork fails, says how many it got, then sleeps.
const FORKER: &str = r#"
import os, time
n = 0
for _ in range(20):
    try:
        pid = os.fork()
    except OSError as e:
        print(f"fork failed: {e}", flush=True)
        break
    if pid == 0:
        time.sleep(600)
        os._exit(0)
    n += 1
print(f"started {n} children", flush=True)
time.sleep(600)
"#;

#[tokio::test]
async fn a_process_cannot_fork_past_its_pids_limit() {
    let app = TestApp::start().await;
    app.add_tool(json!({
        "slug": "forky",
        "command": common::python(),
        "args": ["-c", FORKER],
        "startup_timeout_ms": 60000,
        "limits": {"pids": 8},
    }))
    .await;
    let (st, d) = app
        .call("POST", "/api/v1/tools/forky/deployments", None)
        .await;
    assert_eq!(st, StatusCode::CREATED, "{d}");
    let id = d["id"].as_str().unwrap().to_owned();
    // What the forker printed (each line after the log writer's timestamp), not the
    // command line Switchboard logs first, which holds the same words.
    let said = |log: &str, prefix: &str| {
        log.lines()
            .filter_map(|l| l.split_once(' ').map(|(_, rest)| rest))
            .find(|rest| rest.starts_with(prefix))
            .map(str::to_owned)
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let (log, started) = loop {
        let log = app.logs(&id, 200).await;
        if let Some(started) = said(&log, "started ") {
            break (log, started);
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the forker never said how many it started:\n{log}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    let failed = said(&log, "fork failed: ").unwrap_or_else(|| panic!("no fork failed:\n{log}"));
    assert!(
        failed.contains("Resource temporarily unavailable"),
        "{failed}"
    );
    // Eight processes in all: the forker and seven children.
    assert_eq!(started, "started 7 children", "{log}");
    app.stop_deployment(&id).await;
    app.stop().await;
}

#[tokio::test]
async fn a_stdio_tools_limits_hold_its_bridge_and_the_servers_it_starts() {
    let app = TestApp::start().await;
    app.add_tool(json!({
        "slug": "piped",
        "command": common::test_server_bin(),
        "args": ["--stdio"],
        "transport": "stdio",
        "startup_timeout_ms": 15000,
        "limits": {"memory": "64MiB", "pids": 64},
    }))
    .await;
    let d = app.deploy_wait("piped").await;
    assert_eq!(d["status"], "RUNNING", "{d}");
    let id = d["id"].as_str().unwrap().to_owned();
    let bridge = pid_of(&d);
    let memory = v1_group(bridge, "memory");
    assert!(memory.ends_with(&id), "{}", memory.display());
    assert_eq!(
        read(&memory, "memory.limit_in_bytes"),
        (64u64 << 20).to_string()
    );
    // A server the bridge started (RUNNING means one answered its probe) is in the group.
    let members: Vec<u64> = read(&memory, "cgroup.procs")
        .lines()
        .map(|l| l.parse().unwrap())
        .collect();
    let servers: Vec<&u64> = members
        .iter()
        .filter(|p| {
            std::fs::read(format!("/proc/{p}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains("--stdio"))
                && **p != bridge
        })
        .collect();
    assert!(
        members.contains(&bridge) && !servers.is_empty(),
        "bridge {bridge} and its servers not all in {}: {members:?}",
        memory.display()
    );
    for server in servers {
        assert_eq!(v1_group(*server, "pids"), v1_group(bridge, "pids"));
    }
    stop_leaving_no_group(&app, &id, &[&memory]).await;
    app.stop().await;
}

#[tokio::test]
async fn after_a_crash_an_adopted_process_keeps_its_groups_and_strays_are_swept() {
    let app = TestApp::start().await;
    app.add_test_tool(
        "kept",
        &[],
        json!({"limits": {"memory": "32MiB", "pids": 64}, "restart": {"initial_delay_ms": 100}}),
    )
    .await;
    let d = app.deploy_wait("kept").await;
    let id = d["id"].as_str().unwrap().to_owned();
    let pid = pid_of(&d);
    let memory = v1_group(pid, "memory");
    let pids = v1_group(pid, "pids");

    let dir = app.crash().await;
    // Groups of a deployment no record names, as a Switchboard that died mid-start leaves.
    let strays: Vec<PathBuf> = [&memory, &pids]
        .iter()
        .map(|g| g.parent().unwrap().join(uuid::Uuid::new_v4().to_string()))
        .collect();
    for s in &strays {
        std::fs::create_dir(s).unwrap();
    }
    let app = TestApp::start_in(dir, common::AppOptions::default()).await;
    let d = app.wait_status(&id, "RUNNING").await;
    assert_eq!(pid_of(&d), pid, "adopted, not restarted: {d}");
    assert_eq!(v1_group(pid, "memory"), memory);
    assert_eq!(
        read(&memory, "memory.limit_in_bytes"),
        (32u64 << 20).to_string()
    );
    assert_eq!(read(&pids, "pids.max"), "64");
    for s in &strays {
        assert!(!s.exists(), "{} survived the startup sweep", s.display());
    }

    // Killed for its memory while adopted: the exit status went elsewhere, the counter says.
    app.oom_kill_and_restart("kept", &id, "out of memory: limit 32 MiB", |r| {
        r["instance"]["pid"].as_u64().is_some_and(|p| p != pid)
    })
    .await;
    stop_leaving_no_group(&app, &id, &[&memory, &pids]).await;
    app.stop().await;
}
