//! Tools run as Docker containers (`runtime = "docker"`), against a real dockerd and the repo's
//! test server built into an image `FROM scratch` (nothing is pulled). `scripts/with-docker`
//! starts dockerd when none answers and builds the image (SWITCHBOARD_TEST_IMAGE); scripts/test
//! runs the suite through it. Only this file and one test of tests/cli.rs (a real SIGKILL of the
//! binary with a container live) need dockerd.
#![allow(clippy::unwrap_used)]

mod common;

use std::process::Command;

use common::{AppOptions, TestApp, docker};
use reqwest::StatusCode;
use serde_json::{Value, json};

/// The test server's image, or a failure saying how to get one (no silent skip).
fn image() -> String {
    let tag = std::env::var("SWITCHBOARD_TEST_IMAGE").unwrap_or_default();
    assert!(
        !tag.is_empty(),
        "SWITCHBOARD_TEST_IMAGE is not set: run these tests through scripts/with-docker \
         (`scripts/with-docker cargo nextest run --test docker`), which starts dockerd \
         (installing docker.io if missing) and builds the test server's image"
    );
    tag
}

fn inspect(container: &str) -> Value {
    let v: Value = serde_json::from_str(&docker(&["inspect", container])).unwrap();
    v[0].clone()
}

/// Whether a container exists (in any state).
fn exists(container: &str) -> bool {
    Command::new("docker")
        .args(["inspect", container])
        .output()
        .unwrap()
        .status
        .success()
}

/// A container a test made itself, removed when the test ends however it ends.
struct Own(String);

impl Drop for Own {
    fn drop(&mut self) {
        let _ = Command::new("docker").args(["rm", "-f", &self.0]).output();
    }
}

/// A tool running the test server's image; it listens on 0.0.0.0 inside (PORT is set to the
/// published port).
async fn add_docker_tool(app: &TestApp, slug: &str, extra_args: &[&str], extra: Value) -> Value {
    let mut args = vec!["--host", "0.0.0.0"];
    args.extend_from_slice(extra_args);
    let mut body = json!({
        "slug": slug,
        "runtime": "docker",
        "image": image(),
        "args": args,
        "startup_timeout_ms": 20000,
        "stop_grace_period_ms": 2000,
    });
    if let (Value::Object(b), Value::Object(e)) = (&mut body, extra) {
        b.extend(e);
    }
    app.add_tool(body).await
}

/// Through `url`, the official Python SDK client (in `era`, or its default) lists the tools,
/// `echo` among them, and calls `echo` with `args`: the answer's text must contain `said`.
/// Returns the listing.
async fn lists_and_echoes(url: &str, era: Option<&str>, args: &str, said: &str) -> Value {
    let era_args: Vec<&str> = era.map(|e| vec!["--era", e]).unwrap_or_default();
    let mut list = vec!["--url", url];
    list.extend(&era_args);
    list.push("list-tools");
    let listed = common::mcp_client(&list).await;
    assert!(
        common::tool_names(&listed).contains(&"echo".into()),
        "{era:?}: {listed}"
    );
    let mut call = vec!["--url", url];
    call.extend(&era_args);
    call.extend(["call-tool", "echo", "--args", args]);
    let called = common::mcp_client(&call).await;
    let text = called["result"]["content"][0]["text"]
        .as_str()
        .unwrap_or_default();
    assert!(text.contains(said), "{era:?}: {called}");
    listed
}

fn container_of(d: &Value) -> String {
    assert_eq!(d["instance"]["kind"], "container", "{d}");
    d["instance"]["id"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn python_client_lists_and_calls_tools_in_a_container() {
    let app = TestApp::start().await;
    add_docker_tool(&app, "dock", &[], json!({})).await;
    let d = app.deploy_wait("dock").await;
    assert_eq!(d["status"], "RUNNING", "{d}");
    assert_eq!(d["runtime"], "docker", "{d}");
    let container = container_of(&d);
    let url = format!("{}/mcp/dock", app.url);
    lists_and_echoes(
        &url,
        None,
        r#"{"text":"from a container"}"#,
        "from a container",
    )
    .await;
    // Its resource use is the engine's stats: the server and the init process.
    let (st, stats) = app
        .call(
            "GET",
            &format!("/api/v1/deployments/{}/stats", d["id"].as_str().unwrap()),
            None,
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{stats}");
    assert!(
        stats["resident_memory_bytes"].as_u64().unwrap() > 0,
        "{stats}"
    );
    assert!(stats["processes"].as_u64().unwrap() >= 1, "{stats}");
    assert!(stats["requests_total"].as_u64().unwrap() >= 2, "{stats}");
    // Its output is the engine's log, served by the API like a process's.
    let logs = app.logs(d["id"].as_str().unwrap(), 50).await;
    assert!(logs.contains("mcp-test-server: listening"), "{logs}");
    // Followed, the engine's stream: the tail at once, and the end once the deployment ends.
    let mut follow = reqwest::Client::builder()
        .no_proxy()
        .build()
        .unwrap()
        .get(format!(
            "{}/api/v1/deployments/{}/logs?tail=5&follow=true",
            app.url,
            d["id"].as_str().unwrap()
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(follow.status(), StatusCode::OK);
    let first = follow.chunk().await.unwrap().unwrap_or_default();
    assert!(
        String::from_utf8_lossy(&first).contains("mcp-test-server"),
        "{first:?}"
    );
    let stopped = app.stop_deployment(d["id"].as_str().unwrap()).await;
    assert_eq!(stopped["status"], "STOPPED", "{stopped}");
    assert!(!exists(&container), "the stopped container was not removed");
    // A follow that never ends would hang here: bounded, so a hang fails instead.
    tokio::time::timeout(std::time::Duration::from_secs(60), async {
        while follow.chunk().await.unwrap().is_some() {}
    })
    .await
    .expect("the followed logs did not end with the deployment");
}

#[tokio::test]
async fn containers_run_with_the_secure_defaults_and_no_secret_outside_their_env() {
    let app = TestApp::start().await;
    add_docker_tool(
        &app,
        "locked",
        &[],
        json!({"secret_env": {"API_TOKEN": "s3cret-value"}}),
    )
    .await;
    let d = app.deploy_wait("locked").await;
    assert_eq!(d["status"], "RUNNING", "{d}");
    let container = container_of(&d);
    let c = inspect(&container);
    let host = &c["HostConfig"];
    assert_eq!(host["CapDrop"], json!(["ALL"]), "{host}");
    assert_eq!(host["ReadonlyRootfs"], true, "{host}");
    assert_eq!(host["Init"], true, "{host}");
    assert_eq!(host["SecurityOpt"], json!(["no-new-privileges"]), "{host}");
    assert!(host["Tmpfs"].get("/tmp").is_some(), "{host}");
    let port = d["port"].as_u64().unwrap();
    let bindings = &host["PortBindings"][format!("{port}/tcp")];
    assert_eq!(bindings[0]["HostIp"], "127.0.0.1", "{host}");
    assert_eq!(bindings[0]["HostPort"], port.to_string(), "{host}");
    let user = c["Config"]["User"].as_str().unwrap();
    assert!(
        !user.is_empty() && !user.starts_with("0") && !user.starts_with("root"),
        "runs as {user:?}"
    );
    // The secret is in the environment, and nowhere else the engine shows.
    let env = c["Config"]["Env"].to_string();
    assert!(env.contains("API_TOKEN=s3cret-value"), "{env}");
    let elsewhere = json!([
        c["Name"],
        c["Config"]["Labels"],
        c["Config"]["Cmd"],
        c["Config"]["Entrypoint"],
        c["Args"]
    ]);
    assert!(!elsewhere.to_string().contains("s3cret"), "{elsewhere}");
    assert_eq!(
        c["Config"]["Labels"]["switchboard.deployment"], d["id"],
        "{}",
        c["Config"]["Labels"]
    );
    app.stop_deployment(d["id"].as_str().unwrap()).await;
}

#[tokio::test]
async fn a_missing_image_fails_fast_naming_it_when_pulling_is_not_allowed() {
    let app = TestApp::start().await;
    let missing = "switchboard-test-absent:never-built";
    app.add_tool(json!({
        "slug": "absent", "runtime": "docker", "image": missing,
        "restart": {"max_start_failures": 1},
    }))
    .await;
    let (st, d) = app
        .call("POST", "/api/v1/tools/absent/deployments?wait=true", None)
        .await;
    assert_eq!(st, StatusCode::CREATED, "{d}");
    let d = app.wait_status(d["id"].as_str().unwrap(), "FAILED").await;
    let error = d["error"].as_str().unwrap_or_default();
    assert!(
        error.contains(missing) && error.contains("never"),
        "the error does not name the image and the pull policy: {d}"
    );
}

/// The proxy connects to a container at its bridge address, not through the published port:
/// with the engine's userland proxy for that port killed, /mcp still answers.
#[tokio::test]
async fn the_proxy_reaches_a_container_directly_not_through_the_engines_port_proxy() {
    let app = TestApp::start().await;
    add_docker_tool(&app, "direct", &[], json!({})).await;
    let d = app.deploy_wait("direct").await;
    let id = d["id"].as_str().unwrap().to_owned();
    let port = d["port"].as_u64().unwrap().to_string();
    let proxies: Vec<i32> = std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let args: Vec<&[u8]> = cmd.split(|b| *b == 0).collect();
            args.first().is_some_and(|a| a.ends_with(b"docker-proxy"))
                && args
                    .windows(2)
                    .any(|w| w[0] == b"-host-port" && w[1] == port.as_bytes())
        })
        .collect();
    // Engines started with --userland-proxy=false publish with NAT rules: nothing to kill, and
    // the request below must work all the same.
    for pid in &proxies {
        common::sigkill(*pid);
    }
    let url = format!("{}/mcp/direct", app.url);
    lists_and_echoes(&url, None, r#"{"text":"no port proxy"}"#, "no port proxy").await;
    let after = app.deployment(&id).await;
    assert_eq!(after["restart_count"], 0, "{after}");
    app.stop_deployment(&id).await;
}

/// A server that listens on the container's own loopback never answers through the published
/// port: the failure says so, and says what to do.
#[tokio::test]
async fn a_server_bound_to_the_containers_loopback_fails_saying_to_listen_on_all_addresses() {
    let app = TestApp::start().await;
    app.add_tool(json!({
        "slug": "inward", "runtime": "docker", "image": image(),
        "startup_timeout_ms": 3000,
        "restart": {"policy": "never"},
    }))
    .await;
    let (st, d) = app
        .call("POST", "/api/v1/tools/inward/deployments?wait=true", None)
        .await;
    assert_eq!(st, StatusCode::CREATED, "{d}");
    let id = d["id"].as_str().unwrap().to_owned();
    let d = app.wait_status(&id, "FAILED").await;
    let error = d["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("never became ready") && error.contains("listen on 0.0.0.0"),
        "the failure does not say where the server must listen: {d}"
    );
    // Removed once the failure is handled (the record may say FAILED a moment before).
    let container = d["instance"]["id"].as_str().unwrap_or_default().to_owned();
    let mut gone = false;
    for _ in 0..100 {
        gone = !exists(&container);
        if gone {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(gone, "the failed deployment's container was left: {d}");
}

/// Replicas of a container tool are containers of their own; a legacy session sticks to its
/// replica, and the tool's gauges count containers like processes.
#[tokio::test]
async fn container_replicas_keep_session_affinity_and_show_in_metrics() {
    let app = TestApp::with(AppOptions {
        ports: common::port_range(6),
        ..Default::default()
    })
    .await;
    add_docker_tool(&app, "reps", &[], json!({"replicas": 2})).await;
    let a = app.deploy_wait("reps").await;
    let b = app.deploy_wait("reps").await;
    assert_ne!(
        container_of(&a),
        container_of(&b),
        "two replicas, one container"
    );
    let url = format!("{}/mcp/reps", app.url);
    let mut used = std::collections::HashSet::new();
    for _ in 0..12 {
        let sid = common::legacy_session(&url).await;
        let mut seen = std::collections::HashSet::new();
        for _ in 0..3 {
            let who = common::whoami_in_session(&url, &sid).await.unwrap();
            seen.insert(who["deployment"].as_str().unwrap().to_owned());
        }
        assert_eq!(seen.len(), 1, "session {sid} was served by {seen:?}");
        used.extend(seen);
    }
    assert_eq!(
        used.len(),
        2,
        "12 sessions over 2 replicas all went to {used:?}"
    );
    let metrics = app.metrics_text().await;
    assert!(
        metrics.contains(r#"switchboard_deployments{tool="reps",status="RUNNING"} 2"#),
        "{metrics}"
    );
    for d in [&a, &b] {
        let id = d["id"].as_str().unwrap();
        app.stop_deployment(id).await;
        assert!(!exists(&container_of(d)));
    }
}

#[tokio::test]
async fn a_stop_kills_a_server_that_ignores_sigterm_after_the_grace_period() {
    let app = TestApp::start().await;
    add_docker_tool(
        &app,
        "stubborn",
        &["--ignore-sigterm"],
        json!({"stop_grace_period_ms": 1000}),
    )
    .await;
    let d = app.deploy_wait("stubborn").await;
    assert_eq!(d["status"], "RUNNING", "{d}");
    let container = container_of(&d);
    let stopped = app.stop_deployment(d["id"].as_str().unwrap()).await;
    assert_eq!(stopped["status"], "STOPPED", "{stopped}");
    // SIGTERM did nothing; SIGKILL ended it.
    assert_eq!(stopped["exit_signal"], 9, "{stopped}");
    assert!(!exists(&container), "the stopped container was not removed");
}

#[tokio::test]
async fn a_container_removed_behind_switchboards_back_is_restarted() {
    let app = TestApp::start().await;
    add_docker_tool(&app, "fragile", &[], json!({})).await;
    let d = app.deploy_wait("fragile").await;
    let id = d["id"].as_str().unwrap().to_owned();
    let first = container_of(&d);
    docker(&["rm", "-f", &first]);
    let again = app
        .wait_record(&id, "RUNNING in a new container", |r| {
            r["status"] == "RUNNING" && r["instance"]["id"].as_str().is_some_and(|c| c != first)
        })
        .await;
    assert_eq!(again["restart_count"], 1, "{again}");
    assert_eq!(
        again["port"], d["port"],
        "the restart changed the port: {again}"
    );
    let url = format!("{}/mcp/fragile", app.url);
    let listed = common::mcp_client(&["--url", &url, "list-tools"]).await;
    assert!(
        listed["tools"].as_array().is_some_and(|t| !t.is_empty()),
        "{listed}"
    );
    app.stop_deployment(&id).await;
}

#[tokio::test]
async fn after_a_crash_containers_are_adopted_and_orphans_of_this_node_swept_but_no_other() {
    let app = TestApp::with(AppOptions::default()).await;
    add_docker_tool(&app, "kept", &[], json!({})).await;
    let d = app.deploy_wait("kept").await;
    let id = d["id"].as_str().unwrap().to_owned();
    let container = container_of(&d);
    let node = d["node_id"].as_str().unwrap().to_owned();
    let dir = app.crash().await;

    // While it is down: an orphan of this node (a deployment no record knows) and a
    // container that is not Switchboard's at all.
    let orphan_id = uuid::Uuid::new_v4().to_string();
    let orphan = Own(docker(&[
        "run",
        "-d",
        "--network",
        "none",
        "--label",
        &format!("switchboard.node={node}"),
        "--label",
        &format!("switchboard.deployment={orphan_id}"),
        &image(),
    ]));
    let foreign = Own(docker(&["run", "-d", "--network", "none", &image()]));

    let app = TestApp::start_in(dir, AppOptions::default()).await;
    let adopted = app.wait_status(&id, "RUNNING").await;
    assert_eq!(container_of(&adopted), container, "not adopted: {adopted}");
    assert_eq!(
        adopted["restart_count"], 0,
        "restarted instead of adopted: {adopted}"
    );
    assert_eq!(
        inspect(&container)["State"]["Running"],
        true,
        "the adopted container is not running"
    );
    let url = format!("{}/mcp/kept", app.url);
    let listed = common::mcp_client(&["--url", &url, "list-tools"]).await;
    assert!(
        listed["tools"].as_array().is_some_and(|t| !t.is_empty()),
        "{listed}"
    );
    assert!(!exists(&orphan.0), "the orphan of this node was not swept");
    assert_eq!(
        inspect(&foreign.0)["State"]["Running"],
        true,
        "a container that is not Switchboard's was touched"
    );
    app.stop_deployment(&id).await;
    assert!(!exists(&container));
}

/// The value of `file` in the container's cgroup of `controller` (a cgroup v1 hierarchy, as
/// on these hosts), found through its main process's `/proc/PID/cgroup`.
fn cgroup_value(container: &str, controller: &str, file: &str) -> String {
    let pid = inspect(container)["State"]["Pid"].as_u64().unwrap();
    let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let path = cgroups
        .lines()
        .find_map(|l| {
            let mut parts = l.splitn(3, ':');
            let (_, names, path) = (parts.next()?, parts.next()?, parts.next()?);
            names.split(',').any(|n| n == controller).then_some(path)
        })
        .unwrap_or_else(|| panic!("no {controller} cgroup for pid {pid}:\n{cgroups}"));
    let at = format!("/sys/fs/cgroup/{controller}{path}/{file}");
    std::fs::read_to_string(&at)
        .unwrap_or_else(|e| panic!("{at}: {e}"))
        .trim()
        .to_owned()
}

#[tokio::test]
async fn a_tools_limits_are_the_containers_in_its_host_config_and_cgroup() {
    let app = TestApp::start().await;
    add_docker_tool(
        &app,
        "limited",
        &[],
        json!({"limits": {"memory": "64MiB", "cpus": 0.5, "pids": 32}}),
    )
    .await;
    let (st, tool) = app.call("GET", "/api/v1/tools/limited", None).await;
    assert_eq!(st, StatusCode::OK, "{tool}");
    assert_eq!(
        tool["limits"],
        json!({"memory": "64MiB", "cpus": 0.5, "pids": 32}),
        "{tool}"
    );
    let d = app.deploy_wait("limited").await;
    assert_eq!(d["status"], "RUNNING", "{d}");
    let container = container_of(&d);
    let host = &inspect(&container)["HostConfig"];
    let mib64 = 64 * 1024 * 1024;
    assert_eq!(host["Memory"], mib64, "{host}");
    assert_eq!(
        host["MemorySwap"], mib64,
        "swap must not add to the limit: {host}"
    );
    assert_eq!(host["NanoCpus"], 500_000_000, "{host}");
    assert_eq!(host["PidsLimit"], 32, "{host}");
    // What the kernel enforces.
    assert_eq!(
        cgroup_value(&container, "memory", "memory.limit_in_bytes"),
        mib64.to_string()
    );
    assert_eq!(cgroup_value(&container, "pids", "pids.max"), "32");
    let quota: u64 = cgroup_value(&container, "cpu", "cpu.cfs_quota_us")
        .parse()
        .unwrap();
    let period: u64 = cgroup_value(&container, "cpu", "cpu.cfs_period_us")
        .parse()
        .unwrap();
    assert_eq!(quota * 2, period, "not half a CPU: {quota}/{period}");
    app.stop_deployment(d["id"].as_str().unwrap()).await;
}

#[tokio::test]
async fn a_server_past_its_memory_limit_is_oom_killed_recorded_so_and_restarted() {
    let app = TestApp::start().await;
    add_docker_tool(
        &app,
        "hog",
        &[],
        json!({"limits": {"memory": "32MiB"}, "restart": {"initial_delay_ms": 100}}),
    )
    .await;
    let d = app.deploy_wait("hog").await;
    assert_eq!(d["status"], "RUNNING", "{d}");
    let id = d["id"].as_str().unwrap().to_owned();
    let first = container_of(&d);
    app.oom_kill_and_restart("hog", &id, "out of memory: limit 32 MiB", |r| {
        r["instance"]["id"].as_str().is_some_and(|c| c != first)
    })
    .await;
    app.stop_deployment(&id).await;
}

/// server-everything serving Streamable HTTP from the Node image (it listens on every address
/// of the container, on PORT): the Python SDK client lists and calls through /mcp/{slug}.
#[tokio::test]
async fn python_client_lists_and_calls_server_everything_over_http_in_the_node_image() {
    let app = TestApp::start().await;
    app.add_tool(json!({
        "slug": "everything-http",
        "runtime": "docker",
        "image": node_image(),
        "command": "mcp-server-everything",
        "args": ["streamableHttp"],
        "startup_timeout_ms": 30000,
        "stop_grace_period_ms": 3000,
    }))
    .await;
    let d = app.deploy_wait("everything-http").await;
    assert_eq!(d["status"], "RUNNING", "{d}");
    let container = container_of(&d);
    let url = format!("{}/mcp/everything-http", app.url);
    let args = r#"{"message":"over http from debian"}"#;
    lists_and_echoes(&url, None, args, "over http from debian").await;
    app.stop_deployment(d["id"].as_str().unwrap()).await;
    assert!(!exists(&container));
}

/// A stdio deployment's stats count its server containers beside its bridge (a host process
/// holding none of them).
#[tokio::test]
async fn a_stdio_deployments_stats_include_its_server_containers() {
    let app = TestApp::start().await;
    add_stdio_docker_tool(&app, "counted", json!({})).await;
    let d = app.deploy_wait("counted").await;
    let id = d["id"].as_str().unwrap().to_owned();
    let children = stdio_children(&id);
    assert!(!children.is_empty(), "no server container: {d}");
    let (st, stats) = app
        .call("GET", &format!("/api/v1/deployments/{id}/stats"), None)
        .await;
    assert_eq!(st, StatusCode::OK, "{stats}");
    // The bridge is one process; each container holds its init and its server.
    let processes = stats["processes"].as_u64().unwrap();
    assert!(
        processes > 1 + children.len() as u64,
        "{processes} processes for a bridge and {} containers: {stats}",
        children.len()
    );
    app.stop_deployment(&id).await;
}

/// A stdio server container past its memory limit: the kernel kills that server (the bridge
/// and the deployment live on), and the request it was serving is answered with why.
#[tokio::test]
async fn a_stdio_server_container_past_its_memory_limit_says_so_to_its_client() {
    let app = TestApp::start().await;
    add_stdio_docker_tool(&app, "hungry", json!({"limits": {"memory": "32MiB"}})).await;
    let d = app.deploy_wait("hungry").await;
    let id = d["id"].as_str().unwrap().to_owned();
    let url = format!("{}/mcp/hungry", app.url);
    let sid = common::legacy_session(&url).await;
    let call = json!({"jsonrpc": "2.0", "id": 7, "method": "tools/call",
        "params": {"name": "allocate", "arguments": {"mib": 256}}});
    let (st, _, msg) = common::mcp_rpc(
        &url,
        &call,
        &[
            ("mcp-session-id", &sid),
            ("mcp-protocol-version", "2025-11-25"),
        ],
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{msg:?}");
    let msg = msg.unwrap();
    let error = msg["error"]["message"].as_str().unwrap_or_default();
    assert!(
        error.contains("out of memory: limit 32 MiB"),
        "the answer does not say the server ran out of memory: {msg}"
    );
    let after = app.deployment(&id).await;
    assert_eq!(after["status"], "RUNNING", "{after}");
    assert_eq!(
        after["restart_count"], 0,
        "the bridge was restarted: {after}"
    );
    app.stop_deployment(&id).await;
}

/// The Node test image (Debian minbase, Node, server-everything), or a failure saying how to
/// get one.
fn node_image() -> String {
    let tag = std::env::var("SWITCHBOARD_TEST_NODE_IMAGE").unwrap_or_default();
    assert!(
        !tag.is_empty(),
        "SWITCHBOARD_TEST_NODE_IMAGE is not set: run these tests through scripts/with-docker, \
         which builds the image (scripts/docker-node-image: debootstrap, the host's node and \
         tests/npm's server-everything)"
    );
    tag
}

/// A stdio tool whose server processes are containers of the test server's image.
async fn add_stdio_docker_tool(app: &TestApp, slug: &str, extra: Value) -> Value {
    let mut body = json!({
        "slug": slug,
        "runtime": "docker",
        "transport": "stdio",
        "image": image(),
        "args": ["--stdio"],
        "startup_timeout_ms": 20000,
        "stop_grace_period_ms": 3000,
    });
    if let (Value::Object(b), Value::Object(e)) = (&mut body, extra) {
        b.extend(e);
    }
    app.add_tool(body).await
}

/// The inspection of each server container of a deployment that still exists when inspected
/// (a session's container goes when the session ends, which may be between the two); at least
/// one (the health child's lives as long as its bridge).
fn inspect_children(deployment: &str) -> Vec<Value> {
    let found: Vec<Value> = stdio_children(deployment)
        .iter()
        .filter_map(|c| {
            let out = Command::new("docker")
                .args(["inspect", c])
                .output()
                .unwrap();
            let v: Value = serde_json::from_slice(&out.stdout).ok()?;
            out.status.success().then(|| v[0].clone())
        })
        .collect();
    assert!(!found.is_empty(), "no server container of {deployment}");
    found
}

/// The server containers a stdio deployment's bridge runs (any state), by their labels.
fn stdio_children(deployment: &str) -> Vec<String> {
    docker(&[
        "ps",
        "-aq",
        "--no-trunc",
        "--filter",
        &format!("label=switchboard.deployment={deployment}"),
        "--filter",
        "label=switchboard.role=stdio",
    ])
    .lines()
    .map(str::to_owned)
    .collect()
}

async fn no_children_left(deployment: &str, why: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let left = stdio_children(deployment);
        if left.is_empty() {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{why}: server containers left: {left:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn python_client_lists_and_calls_a_stdio_server_whose_processes_are_containers() {
    let app = TestApp::start().await;
    add_stdio_docker_tool(
        &app,
        "boxed",
        json!({"secret_env": {"API_TOKEN": "s3cret-value"}, "env": {"MODE": "plain"}}),
    )
    .await;
    let d = app.deploy_wait("boxed").await;
    assert_eq!(d["status"], "RUNNING", "{d}");
    // The tool's runtime, as users read it; the instance is the bridge, a host process.
    assert_eq!(d["runtime"], "docker", "{d}");
    assert_eq!(d["instance"]["kind"], "process", "{d}");
    let id = d["id"].as_str().unwrap().to_owned();
    let url = format!("{}/mcp/boxed", app.url);
    for era in ["legacy", "modern"] {
        let args = r#"{"text":"from a stdio container"}"#;
        lists_and_echoes(&url, Some(era), args, "from a stdio container").await;
    }

    // Every server process is a container, labelled and locked down like a deployment's.
    let children = stdio_children(&id);
    let node = d["node_id"].as_str().unwrap();
    for c in inspect_children(&id) {
        let labels = &c["Config"]["Labels"];
        assert_eq!(labels["switchboard.node"], node, "{labels}");
        assert_eq!(labels["switchboard.deployment"], id.as_str(), "{labels}");
        assert_eq!(labels["switchboard.tool"], "boxed", "{labels}");
        assert_eq!(labels["switchboard.role"], "stdio", "{labels}");
        let config = &c["Config"];
        assert_eq!(config["OpenStdin"], true, "{config}");
        assert_eq!(config["StdinOnce"], true, "{config}");
        assert_eq!(config["Tty"], false, "{config}");
        assert_eq!(config["Image"], image(), "{config}");
        let host = &c["HostConfig"];
        assert_eq!(host["AutoRemove"], true, "{host}");
        assert_eq!(host["CapDrop"], json!(["ALL"]), "{host}");
        assert_eq!(host["ReadonlyRootfs"], true, "{host}");
        assert_eq!(host["Init"], true, "{host}");
        assert_eq!(host["SecurityOpt"], json!(["no-new-privileges"]), "{host}");
        assert!(host["Tmpfs"].get("/tmp").is_some(), "{host}");
        // A stdio server listens nowhere: nothing is published.
        assert!(
            host["PortBindings"]
                .as_object()
                .is_none_or(|p| p.is_empty()),
            "{host}"
        );
        assert_eq!(config["User"], "65534:65534", "{config}");
        // The environment reaches the server, and the secret nowhere else.
        let env = config["Env"].to_string();
        assert!(
            env.contains("API_TOKEN=s3cret-value") && env.contains("MODE=plain"),
            "{env}"
        );
        let elsewhere = json!([
            c["Name"],
            labels,
            config["Cmd"],
            config["Entrypoint"],
            c["Args"]
        ]);
        assert!(!elsewhere.to_string().contains("s3cret"), "{elsewhere}");
    }
    // Nor on the bridge's command line.
    let bridge = d["instance"]["pid"].as_u64().unwrap();
    let cmdline = std::fs::read(format!("/proc/{bridge}/cmdline")).unwrap();
    assert!(
        !String::from_utf8_lossy(&cmdline).contains("s3cret"),
        "the secret is on the bridge's command line"
    );
    // The servers' stderr is in the deployment's log.
    let logs = app.logs(&id, 200).await;
    assert!(logs.contains("mcp-test-server"), "{logs}");

    let stopped = app.stop_deployment(&id).await;
    assert_eq!(stopped["status"], "STOPPED", "{stopped}");
    for child in &children {
        assert!(
            !exists(child),
            "a stopped deployment's server container {child} is left"
        );
    }
    no_children_left(&id, "after the stop").await;
}

#[tokio::test]
async fn python_client_lists_and_calls_server_everything_over_stdio_in_the_node_image() {
    let app = TestApp::start().await;
    app.add_tool(json!({
        "slug": "everything-boxed",
        "runtime": "docker",
        "transport": "stdio",
        "image": node_image(),
        "command": "mcp-server-everything",
        "args": ["stdio"],
        "network": "none",
        "startup_timeout_ms": 30000,
        "stop_grace_period_ms": 3000,
    }))
    .await;
    let d = app.deploy_wait("everything-boxed").await;
    assert_eq!(d["status"], "RUNNING", "{d}");
    let id = d["id"].as_str().unwrap().to_owned();
    let url = format!("{}/mcp/everything-boxed", app.url);
    let args = r#"{"message":"hello from debian"}"#;
    let listed = lists_and_echoes(&url, None, args, "hello from debian").await;
    assert_eq!(listed["server_name"], "mcp-servers/everything", "{listed}");
    for c in inspect_children(&id) {
        let host = &c["HostConfig"];
        assert_eq!(host["NetworkMode"], "none", "{host}");
    }
    app.stop_deployment(&id).await;
    no_children_left(&id, "after the stop").await;
}

#[tokio::test]
async fn an_idle_sessions_server_container_is_reaped() {
    let app = TestApp::start().await;
    add_stdio_docker_tool(
        &app,
        "reaped",
        // One process besides the session's (the health child, also the pool).
        json!({"stdio": {"session_idle_ms": 1000, "spares": 0, "pool_size": 1}}),
    )
    .await;
    let d = app.deploy_wait("reaped").await;
    let id = d["id"].as_str().unwrap().to_owned();
    let url = format!("{}/mcp/reaped", app.url);
    let before = stdio_children(&id);
    let sid = common::legacy_session(&url).await;
    assert!(common::whoami_in_session(&url, &sid).await.is_ok());
    // The session's own container: the one that was not there before it.
    let (st, view) = app
        .call("GET", &format!("/api/v1/deployments/{id}/sessions"), None)
        .await;
    assert_eq!(st, StatusCode::OK, "{view}");
    assert_eq!(view["sessions"].as_array().unwrap().len(), 1, "{view}");
    let session_pid = view["sessions"][0]["pid"].as_u64().unwrap();
    let ours: Vec<String> = stdio_children(&id)
        .into_iter()
        .filter(|c| !before.contains(c))
        .collect();
    assert_eq!(ours.len(), 1, "not one container for the session: {ours:?}");
    let session_container = &ours[0];
    // The sessions view names the container's main process on this host.
    assert_eq!(
        inspect(session_container)["State"]["Pid"].as_u64(),
        Some(session_pid),
        "{view}"
    );
    common::eventually(std::time::Duration::from_secs(30), || async {
        !exists(session_container)
    })
    .await;
    assert_eq!(
        common::whoami_in_session(&url, &sid).await.unwrap_err(),
        StatusCode::NOT_FOUND
    );
    // The others (the health child) live on.
    for c in &before {
        assert!(exists(c), "a container of no idle session went too: {c}");
    }
    app.stop_deployment(&id).await;
    no_children_left(&id, "after the stop").await;
}

/// A server container of deployment `id` that its bridge did not start (as one a killed
/// bridge left, whose server did not exit at the end of its input): its stdin is held open by
/// the engine, so it runs until removed.
fn leftover_of(node: &str, id: &str) -> Own {
    Own(docker(&[
        "run",
        "-d",
        "-i",
        "--network",
        "none",
        "--label",
        &format!("switchboard.node={node}"),
        "--label",
        &format!("switchboard.deployment={id}"),
        "--label",
        "switchboard.role=stdio",
        &image(),
        "--stdio",
    ]))
}

#[tokio::test]
async fn a_killed_bridges_server_containers_end_with_their_input() {
    let app = TestApp::start().await;
    // Not restarted (a new bridge would remove them): what ends them is their closed stdin.
    add_stdio_docker_tool(&app, "orphaned", json!({"restart": {"policy": "never"}})).await;
    let d = app.deploy_wait("orphaned").await;
    let id = d["id"].as_str().unwrap().to_owned();
    let url = format!("{}/mcp/orphaned", app.url);
    let sid = common::legacy_session(&url).await;
    assert!(common::whoami_in_session(&url, &sid).await.is_ok());
    let children = stdio_children(&id);
    assert!(
        children.len() >= 2,
        "health and session containers: {children:?}"
    );
    // With the deployment's labels, but no attach connection of the bridge's.
    let held = leftover_of(d["node_id"].as_str().unwrap(), &id);
    let bridge = d["instance"]["pid"].as_u64().unwrap();
    common::sigkill(i32::try_from(bridge).unwrap());
    common::eventually(std::time::Duration::from_secs(60), || async {
        children.iter().all(|c| !exists(c))
    })
    .await;
    // Nothing removed containers by their labels: the bridge's ended by themselves.
    assert_eq!(inspect(&held.0)["State"]["Running"], true);
    let ended = app.wait_status(&id, "FAILED").await;
    assert_eq!(ended["restart_count"], 0, "{ended}");
}

#[tokio::test]
async fn a_restarted_bridge_removes_what_its_deployment_left_and_serves_again() {
    let app = TestApp::start().await;
    add_stdio_docker_tool(&app, "again", json!({"restart": {"initial_delay_ms": 100}})).await;
    let d = app.deploy_wait("again").await;
    let id = d["id"].as_str().unwrap().to_owned();
    let url = format!("{}/mcp/again", app.url);
    let first = stdio_children(&id);
    let left = leftover_of(d["node_id"].as_str().unwrap(), &id);
    let bridge = d["instance"]["pid"].as_u64().unwrap();
    common::sigkill(i32::try_from(bridge).unwrap());
    let again = app
        .wait_record(&id, "RUNNING with a new bridge", |r| {
            r["status"] == "RUNNING" && r["instance"]["pid"].as_u64().is_some_and(|p| p != bridge)
        })
        .await;
    assert_eq!(again["restart_count"], 1, "{again}");
    assert!(
        !exists(&left.0),
        "the new bridge left its deployment's leftover running"
    );
    let listed = common::mcp_client(&["--url", &url, "list-tools"]).await;
    assert!(
        common::tool_names(&listed).contains(&"echo".into()),
        "{listed}"
    );
    let now = stdio_children(&id);
    assert!(
        !now.is_empty() && now.iter().all(|c| !first.contains(c)),
        "{now:?}"
    );
    app.stop_deployment(&id).await;
    no_children_left(&id, "after the stop").await;
}

#[tokio::test]
async fn after_a_crash_a_live_bridges_containers_are_kept_and_a_gone_ones_swept() {
    let app = TestApp::with(AppOptions::default()).await;
    add_stdio_docker_tool(&app, "kept-stdio", json!({})).await;
    let d = app.deploy_wait("kept-stdio").await;
    let id = d["id"].as_str().unwrap().to_owned();
    let node = d["node_id"].as_str().unwrap().to_owned();
    let children = stdio_children(&id);
    assert!(!children.is_empty());
    let dir = app.crash().await;

    // While it is down: a server container of a deployment no bridge runs (its stdin held
    // open, so it does not end by itself).
    let leftover = leftover_of(&node, &uuid::Uuid::new_v4().to_string());

    let app = TestApp::start_in(dir, AppOptions::default()).await;
    let adopted = app.wait_status(&id, "RUNNING").await;
    assert_eq!(
        adopted["restart_count"], 0,
        "restarted, not adopted: {adopted}"
    );
    assert!(
        !exists(&leftover.0),
        "a gone bridge's server container was not swept"
    );
    for c in &children {
        assert!(
            exists(c),
            "the adopted bridge's server container {c} was swept"
        );
    }
    let url = format!("{}/mcp/kept-stdio", app.url);
    let listed = common::mcp_client(&["--url", &url, "list-tools"]).await;
    assert!(
        common::tool_names(&listed).contains(&"echo".into()),
        "{listed}"
    );
    app.stop_deployment(&id).await;
    no_children_left(&id, "after the stop").await;
}
