//! Test harness: a real Switchboard on a port-0 listener with a temporary data directory, the
//! repo's test MCP server, and helpers to look at real processes.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use reqwest::StatusCode;
use serde_json::Value;
use switchboard::{
    config::{Config, EdgeLimits},
    mcp::jsonrpc::Message,
    ports::PortRange,
    proxy::ProxyConfig,
};
use tokio::{sync::oneshot, task::JoinHandle};

/// The `switchboard` binary: the launch shim for in-process servers, and the CLI under test.
pub fn switchboard_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_switchboard"))
}

/// The repo's test MCP server, built by `cargo build --workspace` (scripts/test does it).
pub fn test_server_bin() -> PathBuf {
    let exe = switchboard_bin();
    let path = exe.parent().unwrap().join("mcp-test-server");
    assert!(
        path.exists(),
        "{} is missing: build it with `cargo build --workspace` (scripts/test does this)",
        path.display()
    );
    path
}

/// A port range of `n` ports that no other test is likely to pick.
pub fn port_range(n: u16) -> PortRange {
    let r = u16::from_le_bytes(uuid::Uuid::new_v4().as_bytes()[..2].try_into().unwrap());
    let start = 20_000 + (r % 1000) * 10;
    PortRange::new(start, start + n - 1).unwrap()
}

pub struct TestApp {
    pub url: String,
    pub http: reqwest::Client,
    pub data_dir: tempfile::TempDir,
    shutdown: Option<oneshot::Sender<()>>,
    handle: Option<JoinHandle<anyhow::Result<()>>>,
    /// The server's own runtime: dropping it ends every task of that Switchboard (server,
    /// supervisors, exit watchers) at once, which is what `crash` needs to be a real crash.
    runtime: Option<tokio::runtime::Runtime>,
}

pub struct AppOptions {
    pub ports: PortRange,
    pub token: Option<String>,
    pub proxy: ProxyConfig,
    pub edge: EdgeLimits,
    /// `None`: SQLite in the data directory.
    pub database_url: Option<String>,
    pub exit_policy: switchboard::manager::ExitPolicy,
    pub registries: switchboard::packages::Registries,
    pub log_retention: switchboard::log_retention::LogRetention,
    /// Whether `/mcp` requires a client key (default off, as on a loopback listener).
    pub mcp_auth: switchboard::auth::McpAuth,
    /// Where the key for secrets at rest comes from (default: the data directory's file).
    pub secret_key: switchboard::secrets::KeySource,
    pub docker: switchboard::config::DockerConfig,
    /// `[auth.oauth]` (default none).
    pub oauth: Option<switchboard::auth::oauth::OAuthConfig>,
}

impl Default for AppOptions {
    fn default() -> Self {
        AppOptions {
            ports: port_range(10),
            token: None,
            proxy: ProxyConfig::default(),
            edge: EdgeLimits::default(),
            database_url: None,
            exit_policy: switchboard::manager::ExitPolicy::Stop,
            registries: Default::default(),
            log_retention: Default::default(),
            mcp_auth: switchboard::auth::McpAuth::Off,
            secret_key: Default::default(),
            docker: Default::default(),
            oauth: None,
        }
    }
}

impl TestApp {
    pub async fn start() -> TestApp {
        Self::with(AppOptions::default()).await
    }

    pub async fn with(opts: AppOptions) -> TestApp {
        let data_dir = tempfile::tempdir().unwrap();
        Self::start_in(data_dir, opts).await
    }

    /// Starts with `opts` and the repo's test server registered and deployed as each slug.
    pub async fn with_tools(opts: AppOptions, slugs: &[&str]) -> TestApp {
        let app = Self::with(opts).await;
        for slug in slugs {
            app.add_test_tool(slug, &[], serde_json::json!({})).await;
            app.deploy_wait(slug).await;
        }
        app
    }

    /// Starts on an existing data directory (to test what survives a restart).
    pub async fn start_in(data_dir: tempfile::TempDir, opts: AppOptions) -> TestApp {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let config = Config {
            listen: listener.local_addr().unwrap(),
            database_url: opts.database_url.clone().unwrap_or_else(|| {
                format!(
                    "sqlite://{}",
                    data_dir.path().join("switchboard.db").display()
                )
            }),
            data_dir: data_dir.path().to_path_buf(),
            port_range: opts.ports,
            api_token: opts.token.clone(),
            tools: Vec::new(),
            proxy: opts.proxy,
            edge: opts.edge,
            launcher: Some(switchboard_bin()),
            mcp_auth: opts.mcp_auth,
            oauth: opts.oauth.clone(),
            node_id: None,
            worker_threads: 1,
            exit_policy: opts.exit_policy,
            metrics: true,
            registries: opts.registries.clone(),
            log_retention: opts.log_retention,
            secret_key: opts.secret_key,
            docker: opts.docker.clone(),
        };
        let (tx, rx) = oneshot::channel::<()>();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let handle = runtime.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener)?;
            switchboard::server::run(listener, config, async move {
                let _ = rx.await;
            })
            .await
        });
        let mut http = reqwest::Client::builder().no_proxy();
        if let Some(t) = &opts.token {
            let mut h = reqwest::header::HeaderMap::new();
            h.insert(
                reqwest::header::AUTHORIZATION,
                format!("Bearer {t}").parse().unwrap(),
            );
            http = http.default_headers(h);
        }
        let app = TestApp {
            url,
            http: http.build().unwrap(),
            data_dir,
            shutdown: Some(tx),
            handle: Some(handle),
            runtime: Some(runtime),
        };
        app.wait_until_up().await;
        app
    }

    async fn wait_until_up(&self) {
        eventually(Duration::from_secs(20), || async {
            self.http
                .get(format!("{}/healthz", self.url))
                .send()
                .await
                .is_ok()
        })
        .await;
    }

    /// Graceful shutdown (what SIGTERM does), returning the data directory.
    pub async fn stop(mut self) -> tempfile::TempDir {
        self.shutdown_inner().await;
        let dir = tempfile::tempdir().unwrap();
        std::mem::replace(&mut self.data_dir, dir)
    }

    /// Ends the server abruptly, like SIGKILL: no graceful stop, deployments keep running
    /// (until a Switchboard on this data directory starts again). Returns the data directory.
    pub async fn crash(mut self) -> tempfile::TempDir {
        // Every task of that Switchboard goes, as with SIGKILL; its children keep running.
        // The shutdown sender is dropped only afterwards: dropping it first would start a
        // graceful shutdown, which stops the deployments.
        self.handle.take();
        self.end_runtime().await;
        self.shutdown.take();
        let dir = tempfile::tempdir().unwrap();
        std::mem::replace(&mut self.data_dir, dir)
    }

    async fn shutdown_inner(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(h) = self.handle.take() {
            h.await.unwrap().unwrap();
        }
        self.end_runtime().await;
    }

    /// Drops the server's runtime and waits until its tasks are gone (so the data directory's
    /// lock and the store's connections are released before anything starts on it again).
    async fn end_runtime(&mut self) {
        if let Some(rt) = self.runtime.take() {
            tokio::task::spawn_blocking(move || rt.shutdown_timeout(Duration::from_secs(30)))
                .await
                .unwrap();
        }
    }

    pub async fn call(&self, method: &str, path: &str, body: Option<Value>) -> (StatusCode, Value) {
        let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let mut req = self.http.request(m, format!("{}{path}", self.url));
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status();
        let text = resp.text().await.unwrap();
        let v = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("{method} {path}: non-JSON body ({e}): {text}"))
        };
        (status, v)
    }

    /// Sends raw bytes as the body, with an optional content type.
    pub async fn raw(
        &self,
        method: &str,
        path: &str,
        ctype: Option<&str>,
        body: &'static [u8],
    ) -> (StatusCode, Value) {
        let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let mut req = self
            .http
            .request(m, format!("{}{path}", self.url))
            .body(body);
        if let Some(c) = ctype {
            req = req.header("content-type", c);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status();
        let text = resp.text().await.unwrap();
        let v = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{method} {path}: non-JSON body ({e}): {text}"));
        (status, v)
    }

    /// Registers a tool from a whole definition; returns the stored tool.
    pub async fn add_tool(&self, spec: Value) -> Value {
        let (st, v) = self.call("POST", "/api/v1/tools", Some(spec)).await;
        assert_eq!(st, StatusCode::CREATED, "{v}");
        v
    }

    /// Registers a tool that runs the test server with extra arguments.
    pub async fn add_test_tool(&self, slug: &str, extra_args: &[&str], extra: Value) -> Value {
        let mut args = vec!["--port".to_owned(), "{port}".to_owned()];
        args.extend(extra_args.iter().map(|s| s.to_string()));
        let mut body = serde_json::json!({
            "slug": slug,
            "command": test_server_bin(),
            "args": args,
            "startup_timeout_ms": 15000,
            "stop_grace_period_ms": 2000,
        });
        if let (Value::Object(b), Value::Object(e)) = (&mut body, extra) {
            b.extend(e);
        }
        let (st, v) = self.call("POST", "/api/v1/tools", Some(body)).await;
        assert_eq!(st, StatusCode::CREATED, "{v}");
        v
    }

    pub async fn deploy_wait(&self, slug: &str) -> Value {
        let (st, d) = self
            .call(
                "POST",
                &format!("/api/v1/tools/{slug}/deployments?wait=true"),
                None,
            )
            .await;
        assert_eq!(st, StatusCode::CREATED, "{d}");
        d
    }

    pub async fn deployment(&self, id: &str) -> Value {
        let (st, d) = self
            .call("GET", &format!("/api/v1/deployments/{id}"), None)
            .await;
        assert_eq!(st, StatusCode::OK, "{d}");
        d
    }

    pub async fn stop_deployment(&self, id: &str) -> Value {
        let (st, d) = self
            .call("POST", &format!("/api/v1/deployments/{id}/stop"), None)
            .await;
        assert_eq!(st, StatusCode::OK, "{d}");
        d
    }

    /// Polls a deployment until its status is `want`.
    pub async fn wait_status(&self, id: &str, want: &str) -> Value {
        self.wait_record(id, want, |d| d["status"] == want).await
    }

    /// Polls a deployment's record until `pred` holds (`what` names the wait in the failure).
    pub async fn wait_record(&self, id: &str, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let d = self.deployment(id).await;
            if pred(&d) {
                return d;
            }
            assert!(
                Instant::now() < deadline,
                "deployment never became {what}: {d}"
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    pub fn db_path(&self) -> PathBuf {
        self.data_dir.path().join("switchboard.db")
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
        // A test that ends without `stop()` drops the server mid-flight, like a crash: its
        // deployments would outlive the test. Kill them the way the next start would.
        kill_node_trees(self.data_dir.path());
    }
}

/// Removes every container of a Switchboard node (a test that panicked leaves its node's
/// containers behind; scripts/with-docker would then fail the run naming them). Nothing to do
/// where no docker CLI or engine is.
fn remove_node_containers(node: &str) {
    let Ok(out) = std::process::Command::new("docker")
        .args([
            "ps",
            "-aq",
            "--filter",
            &format!("label=switchboard.node={node}"),
        ])
        .output()
    else {
        return;
    };
    let ids: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    if !ids.is_empty() {
        let _ = std::process::Command::new("docker")
            .args(["rm", "-f"])
            .args(&ids)
            .output();
    }
}

/// Kills every process tree and container of the Switchboard node that used `data_dir`, and
/// removes its cgroups (the v1 ones that held limits too).
pub fn kill_node_trees(data_dir: &std::path::Path) {
    use switchboard::runtime::cgroup::{self, CgroupRoot};
    let Ok(node) = std::fs::read_to_string(data_dir.join("node-id")) else {
        return;
    };
    remove_node_containers(node.trim());
    switchboard::runtime::cgroup_limits::LimitGroups::detect(node.trim(), None)
        .remove_all_blocking();
    let Ok(root) = CgroupRoot::detect(node.trim()) else {
        return;
    };
    for (_, dir) in root.children().unwrap_or_default() {
        let _ = cgroup::kill_and_remove_blocking(&dir);
    }
    let _ = std::fs::remove_dir(root.base());
}

/// SIGKILLs one process (a server the test wants to see crash).
pub fn sigkill(pid: i32) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
}

/// A loopback port nothing listens on (bound, noted, closed).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Waits until `cond` holds, failing the test after `timeout`.
pub async fn eventually<F, Fut>(timeout: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !cond().await {
        assert!(
            Instant::now() < deadline,
            "condition not met within {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Whether a process exists and is not a zombie (a zombie has exited; only its parent's
/// bookkeeping remains, and on hosts whose init does not reap, that can last).
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            let state = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next())
                .unwrap_or("?");
            state != "Z" && state != "X"
        }
        Err(_) => false,
    }
}

/// Pids written by the test server's `--pid-file` (its own, then its grandchildren's).
pub fn read_pids(path: &std::path::Path) -> Vec<u32> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// The environment of a live process, from /proc: `NAME=value` strings.
pub fn process_environ(pid: u64) -> Vec<String> {
    let raw = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    raw.split(|b| *b == 0)
        .filter(|v| !v.is_empty())
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .collect()
}

/// Whether the data directory's SQLite database or its WAL holds these bytes anywhere (free
/// space included).
pub fn database_holds(data_dir: &std::path::Path, needle: &str) -> bool {
    ["switchboard.db", "switchboard.db-wal"].iter().any(|f| {
        std::fs::read(data_dir.join(f))
            .unwrap_or_default()
            .windows(needle.len())
            .any(|w| w == needle.as_bytes())
    })
}

/// A real MCP tool call (modern era, plain JSON-RPC over HTTP) to the test server's `whoami`.
pub async fn whoami(endpoint: &str) -> Value {
    let body = serde_json::json!({
        "jsonrpc": "2.0", "id": 7, "method": "tools/call",
        "params": {"name": "whoami", "arguments": {}, "_meta": {
            "io.modelcontextprotocol/protocolVersion": "2026-07-28",
            "io.modelcontextprotocol/clientCapabilities": {}
        }}
    });
    let resp = reqwest::Client::builder()
        .no_proxy()
        .build()
        .unwrap()
        .post(endpoint)
        .header("accept", "application/json, text/event-stream")
        .header("mcp-protocol-version", "2026-07-28")
        .header("mcp-method", "tools/call")
        .header("mcp-name", "whoami")
        .json(&body)
        .send()
        .await
        .unwrap();
    let text = resp.text().await.unwrap();
    let msg = sse_messages(&text)
        .into_iter()
        .find(|m| m.get("result").is_some())
        .unwrap_or_else(|| panic!("no result in {text}"));
    let inner = msg["result"]["content"][0]["text"].as_str().unwrap();
    serde_json::from_str(inner).unwrap()
}

/// The JSON messages in an SSE body (events whose data is not JSON, like a priming event's
/// empty data, are skipped), read with Switchboard's own parser.
pub fn sse_messages(text: &str) -> Vec<Value> {
    switchboard::mcp::sse::Parser::new()
        .feed(text.as_bytes())
        .into_iter()
        .filter_map(|e| serde_json::from_str(&e.data).ok())
        .collect()
}

/// One MCP message over HTTP: the status, headers, and the JSON-RPC response (JSON or SSE).
pub async fn mcp_rpc(
    url: &str,
    body: &Value,
    headers: &[(&str, &str)],
) -> (StatusCode, reqwest::header::HeaderMap, Option<Value>) {
    let mut req = reqwest::Client::builder()
        .no_proxy()
        .build()
        .unwrap()
        .post(url)
        .header("accept", "application/json, text/event-stream")
        .json(body);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status();
    let h = resp.headers().clone();
    let sse = h
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));
    let text = resp.text().await.unwrap();
    let msg = if sse {
        sse_messages(&text).into_iter().find(|m| {
            matches!(
                Message::parse(m),
                Some(Message::Response { id, .. }) if !id.is_null()
            )
        })
    } else {
        serde_json::from_str(&text).ok()
    };
    (status, h, msg)
}

/// Opens a legacy (2025-11-25) session at `url`; returns its `Mcp-Session-Id`.
pub async fn legacy_session(url: &str) -> String {
    let init = serde_json::json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-11-25", "capabilities": {},
        "clientInfo": {"name": "switchboard-tests", "version": "0"}}});
    let (st, h, msg) = mcp_rpc(url, &init, &[]).await;
    assert_eq!(st, StatusCode::OK, "initialize: {msg:?}");
    let sid = h
        .get("mcp-session-id")
        .unwrap_or_else(|| panic!("no session id minted: {h:?}"))
        .to_str()
        .unwrap()
        .to_owned();
    let note = serde_json::json!({"jsonrpc": "2.0", "method": "notifications/initialized"});
    let (st, _, _) = mcp_rpc(
        url,
        &note,
        &[
            ("mcp-session-id", &sid),
            ("mcp-protocol-version", "2025-11-25"),
        ],
    )
    .await;
    assert!(st.is_success(), "initialized: {st}");
    sid
}

/// `whoami` on a legacy session; `Err(status)` when the call is refused.
pub async fn whoami_in_session(url: &str, sid: &str) -> Result<Value, StatusCode> {
    let call = serde_json::json!({"jsonrpc": "2.0", "id": 2, "method": "tools/call",
        "params": {"name": "whoami", "arguments": {}}});
    let (st, _, msg) = mcp_rpc(
        url,
        &call,
        &[
            ("mcp-session-id", sid),
            ("mcp-protocol-version", "2025-11-25"),
        ],
    )
    .await;
    if st != StatusCode::OK {
        return Err(st);
    }
    let msg = msg.unwrap();
    let text = msg["result"]["content"][0]["text"].as_str().unwrap();
    Ok(serde_json::from_str(text).unwrap())
}

/// A PostgreSQL server of a test's own, to stop and start under a running Switchboard.
pub struct PgServer {
    dir: tempfile::TempDir,
    bin: PathBuf,
    pub port: u16,
}

impl PgServer {
    fn pg(&self, args: &[&str]) -> std::process::Output {
        std::process::Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(self.dir.path().join("pg"))
            .args(args)
            .output()
            .unwrap()
    }

    pub fn start() -> PgServer {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .ok()
            .and_then(|d| d.filter_map(Result::ok).map(|e| e.path().join("bin")).max())
            .filter(|b| b.join("initdb").exists())
            .expect("PostgreSQL server binaries are missing: apt-get install postgresql");
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let pgdir = dir.path().join("pg");
        std::fs::create_dir(&pgdir).unwrap();
        let chown = |p: &std::path::Path, mode: &str| {
            let ok = std::process::Command::new("chmod")
                .arg(mode)
                .arg(p)
                .status()
                .unwrap()
                .success()
                && std::process::Command::new("chown")
                    .arg("postgres")
                    .arg(p)
                    .status()
                    .unwrap()
                    .success();
            assert!(
                ok,
                "cannot hand {} to the postgres user (tests run as root)",
                p.display()
            );
        };
        chown(dir.path(), "1777");
        chown(&pgdir, "700");
        let out = std::process::Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(bin.join("initdb"))
            .args(["-A", "trust", "-U", "sb", "-D"])
            .arg(&pgdir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let s = PgServer { dir, bin, port };
        s.resume();
        s
    }

    pub fn url(&self) -> String {
        format!("postgres://sb@127.0.0.1:{}/postgres", self.port)
    }

    /// Stops the server at once (no checkpoint), like a crash or a network cut.
    pub fn halt(&self) {
        let out = self.pg(&["-m", "immediate", "-w", "stop"]);
        assert!(
            out.status.success(),
            "pg_ctl stop: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    pub fn resume(&self) {
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
            self.port,
            self.dir.path().display()
        );
        let log = self.dir.path().join("pg.log");
        let out = self.pg(&["-w", "-l", log.to_str().unwrap(), "-o", &opts, "start"]);
        assert!(
            out.status.success(),
            "pg_ctl start: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        let _ = self.pg(&["-m", "immediate", "stop"]);
    }
}

/// A MariaDB server of a test's own, to stop and start under a running Switchboard.
pub struct MariaServer {
    dir: tempfile::TempDir,
    pub port: u16,
    child: std::sync::Mutex<Option<std::process::Child>>,
}

impl MariaServer {
    pub fn start() -> MariaServer {
        assert!(
            std::process::Command::new("mariadbd")
                .arg("--version")
                .output()
                .is_ok(),
            "mariadbd is missing: apt-get install mariadb-server (scripts/test installs it)"
        );
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let my = dir.path().join("my");
        std::fs::create_dir(&my).unwrap();
        for (p, mode, owner) in [(dir.path(), "1777", "root"), (my.as_path(), "700", "mysql")] {
            assert!(
                std::process::Command::new("chmod")
                    .arg(mode)
                    .arg(p)
                    .status()
                    .unwrap()
                    .success()
            );
            assert!(
                std::process::Command::new("chown")
                    .arg(owner)
                    .arg(p)
                    .status()
                    .unwrap()
                    .success()
            );
        }
        let out = std::process::Command::new("mariadb-install-db")
            .args(["--user=mysql", "--auth-root-authentication-method=normal"])
            .arg(format!("--datadir={}", my.display()))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "mariadb-install-db: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let s = MariaServer {
            dir,
            port,
            child: std::sync::Mutex::new(None),
        };
        s.resume();
        let sock = s.dir.path().join("my.sock");
        let out = std::process::Command::new("mariadb")
            .arg("-S")
            .arg(&sock)
            .args(["-uroot", "-e", "CREATE USER IF NOT EXISTS 'root'@'127.0.0.1'; GRANT ALL ON *.* TO 'root'@'127.0.0.1'; CREATE DATABASE sb;"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        s
    }

    pub fn url(&self) -> String {
        format!("mysql://root@127.0.0.1:{}/sb", self.port)
    }

    pub fn resume(&self) {
        // mariadbd drops to the mysql user itself, so the child is the server process.
        let child = std::process::Command::new("mariadbd")
            .args(["--no-defaults", "--user=mysql"])
            .arg(format!(
                "--datadir={}",
                self.dir.path().join("my").display()
            ))
            .arg(format!("--port={}", self.port))
            .arg("--bind-address=127.0.0.1")
            .arg(format!(
                "--socket={}",
                self.dir.path().join("my.sock").display()
            ))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        *self.child.lock().unwrap() = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "mariadbd did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Kills the server (SIGKILL), like a crash or a network cut.
    pub fn halt(&self) {
        if let Some(mut c) = self.child.lock().unwrap().take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
            assert!(Instant::now() < deadline, "mariadbd did not stop");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for MariaServer {
    fn drop(&mut self) {
        self.halt();
    }
}

/// A fresh, empty database on the test server whose admin URL is in `env` (scripts/test
/// starts the servers with scripts/with-databases).
async fn fresh_database_url<C>(env: &str, server: &str, package: &str) -> String
where
    C: sqlx::Connection,
    for<'c> &'c mut C: sqlx::Executor<'c>,
{
    let admin = std::env::var(env).unwrap_or_else(|_| {
        panic!(
            "{env} is not set: run the tests through scripts/test, or start the servers with \
             `scripts/with-databases cargo nextest run` ({server} from Debian: apt-get install \
             {package})"
        )
    });
    let name = format!("sb_{}", uuid::Uuid::new_v4().simple());
    let mut conn = C::connect(&admin)
        .await
        .unwrap_or_else(|e| panic!("cannot reach {server} at {admin}: {e}"));
    sqlx::Executor::execute(
        &mut conn,
        sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")),
    )
    .await
    .unwrap();
    let (base, _) = admin.rsplit_once('/').unwrap();
    format!("{base}/{name}")
}

pub async fn fresh_postgres_url() -> String {
    fresh_database_url::<sqlx::PgConnection>(
        "SWITCHBOARD_TEST_POSTGRES_URL",
        "PostgreSQL",
        "postgresql",
    )
    .await
}

pub async fn fresh_mysql_url() -> String {
    fresh_database_url::<sqlx::MySqlConnection>(
        "SWITCHBOARD_TEST_MYSQL_URL",
        "MariaDB/MySQL",
        "mariadb-server",
    )
    .await
}

/// A store for a test to run on: `None` is the default SQLite file in the data directory.
#[derive(Debug, Clone, Copy)]
pub enum Backend {
    Sqlite,
    Postgres,
    MySql,
}

impl Backend {
    pub const ALL: [Backend; 3] = [Backend::Sqlite, Backend::Postgres, Backend::MySql];

    /// A fresh database URL on this backend (`None` for SQLite: the harness default).
    pub async fn fresh_url(self) -> Option<String> {
        match self {
            Backend::Sqlite => None,
            Backend::Postgres => Some(fresh_postgres_url().await),
            Backend::MySql => Some(fresh_mysql_url().await),
        }
    }
}

/// A deployment's status, and whether `stopped_at` is set, read from the database itself
/// (`url`: the server database, or `None` for the SQLite file at `db_path`).
pub async fn record_in_db(
    url: Option<&str>,
    db_path: &std::path::Path,
    id: &str,
) -> (String, bool) {
    use sqlx::Connection as _;
    match url {
        None => {
            let mut c = sqlx::SqliteConnection::connect(&format!("sqlite://{}", db_path.display()))
                .await
                .unwrap();
            sqlx::query_as("SELECT status, stopped_at IS NOT NULL FROM deployments WHERE id = ?")
                .bind(id)
                .fetch_one(&mut c)
                .await
                .unwrap()
        }
        Some(u) if u.starts_with("postgres") => {
            let mut c = sqlx::PgConnection::connect(u).await.unwrap();
            sqlx::query_as("SELECT status, stopped_at IS NOT NULL FROM deployments WHERE id = $1")
                .bind(id)
                .fetch_one(&mut c)
                .await
                .unwrap()
        }
        Some(u) => {
            let mut c = sqlx::MySqlConnection::connect(u).await.unwrap();
            let (status, set): (String, i64) = sqlx::query_as(
                "SELECT status, stopped_at IS NOT NULL FROM deployments WHERE id = ?",
            )
            .bind(id)
            .fetch_one(&mut c)
            .await
            .unwrap();
            (status, set != 0)
        }
    }
}

/// `@modelcontextprotocol/server-everything`, installed by scripts/test from tests/npm.
pub fn server_everything() -> PathBuf {
    let bin = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/npm/node_modules/.bin/mcp-server-everything");
    assert!(
        bin.exists(),
        "{} is missing: install the test servers with `npm ci --prefix tests/npm` \
         (scripts/test does this; it needs Node.js and npm: `apt-get install nodejs npm`)",
        bin.display()
    );
    bin
}

impl TestApp {
    /// Registers server-everything in `mode` (streamableHttp, sse) and deploys it (RUNNING).
    pub async fn deploy_everything(&self, slug: &str, mode: &str, endpoint_path: &str) -> Value {
        let (st, t) = self
            .call(
                "POST",
                "/api/v1/tools",
                Some(serde_json::json!({
                    "slug": slug,
                    "command": server_everything(),
                    "args": [mode],
                    "endpoint_path": endpoint_path,
                    "startup_timeout_ms": 60000,
                    "stop_grace_period_ms": 5000,
                })),
            )
            .await;
        assert_eq!(st, StatusCode::CREATED, "{t}");
        let d = self.deploy_wait(slug).await;
        assert_eq!(d["status"], "RUNNING", "{d}");
        d
    }
}

/// The Python venv with the official MCP SDK (tests/python/requirements.txt).
pub fn python() -> PathBuf {
    let py = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/python/.venv/bin/python");
    assert!(
        py.exists(),
        "{} is missing: create it with `python3 -m venv tests/python/.venv && \
         tests/python/.venv/bin/pip install -r tests/python/requirements.txt` (scripts/test does this)",
        py.display()
    );
    py
}

/// tests/python/mcp_client.py, the official Python SDK client's driver.
pub fn mcp_client_script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/python/mcp_client.py")
}

/// The tool names in mcp_client.py's `list-tools` output.
pub fn tool_names(listed: &Value) -> Vec<String> {
    listed["tools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap().to_owned())
        .collect()
}

/// Runs mcp_client.py to completion; its stdout is one JSON object.
pub async fn mcp_client(args: &[&str]) -> Value {
    mcp_client_as(None, args).await
}

/// Runs mcp_client.py to completion, whatever its exit status; with `bearer`, its requests
/// carry `Authorization: Bearer <bearer>` (given in the environment, not on its command line).
pub async fn mcp_client_output(bearer: Option<&str>, args: &[&str]) -> std::process::Output {
    let mut cmd = std::process::Command::new(python());
    cmd.arg(mcp_client_script()).args(args);
    if let Some(b) = bearer {
        cmd.env("MCP_CLIENT_BEARER", b);
    }
    tokio::task::spawn_blocking(move || cmd.output())
        .await
        .unwrap()
        .unwrap()
}

/// tests/npm/sdk_client.mjs (the TypeScript SDK client) on Node from tests/npm: its JSON
/// output and whether it succeeded.
pub async fn ts_sdk_client(
    bearer: Option<&str>,
    url: &str,
    tool: &str,
    args: &str,
) -> (bool, Value) {
    let npm = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/npm");
    let node = npm.join("node_modules/.bin/node");
    assert!(
        node.exists() && npm.join("node_modules/@modelcontextprotocol/sdk").exists(),
        "Node and the TypeScript SDK are missing: install them with `npm ci --prefix tests/npm` \
         (scripts/test does this)"
    );
    let mut cmd = std::process::Command::new(node);
    cmd.arg(npm.join("sdk_client.mjs")).args([url, tool, args]);
    if let Some(b) = bearer {
        cmd.env("MCP_CLIENT_BEARER", b);
    }
    let out = tokio::task::spawn_blocking(move || cmd.output())
        .await
        .unwrap()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let v = serde_json::from_str(&stdout).unwrap_or_else(|e| {
        panic!(
            "sdk_client.mjs printed no JSON ({e}): {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.success(), v)
}

/// [`mcp_client`] with a bearer credential.
pub async fn mcp_client_as(bearer: Option<&str>, args: &[&str]) -> Value {
    let out = mcp_client_output(bearer, args).await;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "mcp_client.py {args:?} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("mcp_client.py printed no JSON ({e}): {stdout}"))
}

impl TestApp {
    /// The deployment's output, as `GET .../logs?tail=N` serves it.
    pub async fn logs(&self, id: &str, tail: usize) -> String {
        let resp = self
            .http
            .get(format!(
                "{}/api/v1/deployments/{id}/logs?tail={tail}",
                self.url
            ))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        resp.text().await.unwrap()
    }
}

/// The rest of a response from the test server's `/stream` (one event at once, each next one
/// on request), once its first event has arrived.
pub async fn first_event(
    resp: reqwest::Response,
) -> impl futures_util::Stream<Item = reqwest::Result<bytes::Bytes>> {
    use futures_util::StreamExt as _;
    let mut body = resp.bytes_stream();
    let mut seen = String::new();
    tokio::time::timeout(Duration::from_secs(20), async {
        while !seen.contains("event 0") {
            seen.push_str(std::str::from_utf8(&body.next().await.unwrap().unwrap()).unwrap());
        }
    })
    .await
    .unwrap();
    body
}

impl TestApp {
    /// `GET /metrics` as text.
    pub async fn metrics_text(&self) -> String {
        self.http
            .get(format!("{}/metrics", self.url))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }
}

impl TestApp {
    /// The live event stream of one tool (`GET /api/v1/events?tool=`), from now on.
    pub async fn tool_events(&self, slug: &str) -> reqwest::Response {
        let events = self
            .http
            .get(format!("{}/api/v1/events?tool={slug}", self.url))
            .send()
            .await
            .unwrap();
        assert_eq!(events.status(), StatusCode::OK);
        events
    }

    /// Has deployment `id` of tool `slug` (the repo's test server) allocate past its memory
    /// limit and waits until it runs again (`next`: the record names the next instance). The
    /// record's `last_exit` and the event that ended the killed instance must both say
    /// `why` ("out of memory: limit 32 MiB"). Returns the record.
    pub async fn oom_kill_and_restart(
        &self,
        slug: &str,
        id: &str,
        why: &str,
        next: impl Fn(&Value) -> bool,
    ) -> Value {
        let mut events = self.tool_events(slug).await;
        self.allocate_past_limit(slug, 256).await;
        let again = self
            .wait_record(id, "RUNNING again after the OOM kill", |r| {
                r["status"] == "RUNNING" && next(r)
            })
            .await;
        let last_exit = again["last_exit"].as_str().unwrap_or_default();
        assert!(
            last_exit.contains(why),
            "last_exit does not say why: {again}"
        );
        wait_event_text(&mut events, why).await;
        again
    }

    /// Has the tool's server (the repo's test server) allocate `mib` MiB through
    /// `/mcp/{slug}`, past its memory limit: the call is never answered, since the kernel
    /// kills the server first.
    pub async fn allocate_past_limit(&self, slug: &str, mib: u32) {
        let url = format!("{}/mcp/{slug}", self.url);
        let out = mcp_client_output(
            None,
            &[
                "--url",
                &url,
                "call-tool",
                "allocate",
                "--args",
                &format!(r#"{{"mib":{mib}}}"#),
            ],
        )
        .await;
        assert!(
            !String::from_utf8_lossy(&out.stdout).contains("allocated"),
            "the server allocated past its limit: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
}

/// Reads an event stream until `text` is in it (60 s at most: a missing event fails the test
/// instead of hanging it).
pub async fn wait_event_text(events: &mut reqwest::Response, text: &str) {
    let mut seen = String::new();
    tokio::time::timeout(Duration::from_secs(60), async {
        while !seen.contains(text) {
            let chunk = events
                .chunk()
                .await
                .unwrap()
                .expect("the event stream ended");
            seen.push_str(&String::from_utf8_lossy(&chunk));
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no event says \"{text}\": {seen}"));
}

/// `docker ARGS...`, which must succeed; its stdout.
pub fn docker(args: &[&str]) -> String {
    let out = std::process::Command::new("docker")
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run docker ({e}): install docker.io and run through scripts/with-docker")
        });
    assert!(
        out.status.success(),
        "docker {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}
