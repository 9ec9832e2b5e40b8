//! A small MCP server for Switchboard's tests and demo.
//!
//! It speaks Streamable HTTP (both protocol eras, through rmcp) or stdio, reports who it is
//! (the tool slug and deployment id Switchboard put in its environment), and has knobs that make
//! it misbehave the ways real servers do: exit early, start slowly, never answer, ignore SIGTERM,
//! leave grandchildren behind (some of which escape the process group with `setsid()`).

use std::{
    io::Write as _,
    net::SocketAddr,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::Context as _;
use clap::Parser;
use rmcp::{
    ServerHandler,
    handler::server::{router::tool::ToolRouter, wrapper::Parameters},
    model::{Implementation, ServerCapabilities, ServerConfig},
    schemars, tool, tool_handler, tool_router,
    transport::streamable_http_server::{
        StreamableHttpServerConfig, StreamableHttpService, session::local::LocalSessionManager,
    },
};
use tokio::signal::unix::{SignalKind, signal};

#[derive(Parser, Debug, Clone)]
#[command(version, about)]
struct Args {
    /// Port for Streamable HTTP (Switchboard sets PORT).
    #[arg(long, env = "PORT", default_value_t = 8000)]
    port: u16,
    /// Address to listen on (a container's server listens on 0.0.0.0 to be reached through
    /// its published port).
    #[arg(long, default_value = "127.0.0.1")]
    host: std::net::IpAddr,
    /// MCP endpoint path.
    #[arg(long, default_value = "/mcp")]
    path: String,
    /// Serve MCP over stdin/stdout instead of HTTP.
    #[arg(long)]
    stdio: bool,
    /// Exit with status 3 after this many milliseconds.
    #[arg(long)]
    exit_after_ms: Option<u64>,
    /// Wait this long before listening.
    #[arg(long, default_value_t = 0)]
    startup_delay_ms: u64,
    /// Accept connections but never answer a request.
    #[arg(long)]
    never_ready: bool,
    /// Keep running on SIGTERM (only SIGKILL ends it).
    #[arg(long)]
    ignore_sigterm: bool,
    /// Spawn a grandchild that ignores SIGTERM.
    #[arg(long)]
    grandchild: bool,
    /// Spawn a grandchild that ignores SIGTERM and leaves the process group with setsid().
    #[arg(long)]
    setsid_grandchild: bool,
    /// Append this process's pid and every grandchild's pid to this file, one per line.
    #[arg(long)]
    pid_file: Option<PathBuf>,
    /// Internal: run as a grandchild that sleeps until SIGKILL.
    #[arg(long, hide = true)]
    sleeper: bool,
    /// Internal: the sleeper calls setsid() first.
    #[arg(long, hide = true)]
    setsid: bool,
}

#[derive(Debug, serde::Deserialize, schemars::JsonSchema)]
struct EchoRequest {
    /// Text to send back.
    text: String,
}

#[derive(Debug, serde::Deserialize, schemars::JsonSchema)]
struct CountRequest {
    /// Progress notifications to send before answering.
    n: u32,
}

#[derive(Debug, serde::Deserialize, schemars::JsonSchema)]
struct SleepRequest {
    /// Milliseconds to wait before answering.
    ms: u64,
}

#[derive(Debug, serde::Deserialize, schemars::JsonSchema)]
struct ChatterRequest {
    /// Log notifications to send.
    n: u32,
    /// Bytes of data in each.
    bytes: usize,
}

#[derive(Debug, serde::Deserialize, schemars::JsonSchema)]
struct AllocateRequest {
    /// MiB of memory to allocate and touch (and keep) before answering.
    mib: usize,
}

#[derive(Debug, Clone)]
struct TestServer {
    port: Option<u16>,
    #[allow(dead_code, reason = "read by the code #[tool_handler] generates")]
    tool_router: ToolRouter<Self>,
}

#[tool_router]
impl TestServer {
    fn new(port: Option<u16>) -> Self {
        Self {
            port,
            tool_router: Self::tool_router(),
        }
    }

    /// The identity Switchboard gave this process, so tests can check where a request landed.
    #[tool(description = "Report the tool slug, deployment id, pid and port of this server")]
    fn whoami(&self) -> String {
        serde_json::json!({
            "tool": std::env::var("SWITCHBOARD_TOOL").ok(),
            "deployment": std::env::var("SWITCHBOARD_DEPLOYMENT_ID").ok(),
            "pid": std::process::id(),
            "port": self.port,
        })
        .to_string()
    }

    #[tool(description = "Send the text back")]
    fn echo(&self, Parameters(EchoRequest { text }): Parameters<EchoRequest>) -> String {
        text
    }

    /// Progress notifications for the caller's token, so tests can check they reach the
    /// request that asked for them (and only it).
    #[tool(description = "Send n progress notifications to the caller, then answer")]
    async fn count(
        &self,
        Parameters(CountRequest { n }): Parameters<CountRequest>,
        meta: rmcp::model::RequestMetaObject,
        peer: rmcp::Peer<rmcp::RoleServer>,
    ) -> String {
        if let Some(token) = meta.get_progress_token() {
            for i in 1..=n {
                let note = rmcp::model::ProgressNotificationParam::new(token.clone(), f64::from(i))
                    .with_total(f64::from(n));
                if peer.notify_progress(note).await.is_err() {
                    break;
                }
            }
        }
        format!("counted {n}")
    }

    /// Many server-initiated messages unrelated to the call (log notifications, which go to the
    /// session's standalone stream), for tests of a client that does not read them.
    #[tool(description = "Send n log notifications of `bytes` bytes each, then answer")]
    #[allow(
        deprecated,
        reason = "logging is deprecated in 2026-07-28, still used by legacy"
    )]
    async fn chatter(
        &self,
        Parameters(ChatterRequest { n, bytes }): Parameters<ChatterRequest>,
        peer: rmcp::Peer<rmcp::RoleServer>,
    ) -> String {
        let data = serde_json::Value::String("x".repeat(bytes));
        for _ in 0..n {
            let note = rmcp::model::LoggingMessageNotificationParam::new(
                rmcp::model::LoggingLevel::Info,
                data.clone(),
            );
            if peer.notify_logging_message(note).await.is_err() {
                break;
            }
        }
        format!("sent {n}")
    }

    /// Memory that stays resident (every page written), for tests of memory limits: past the
    /// limit, the kernel kills the server before it answers.
    #[tool(description = "Allocate and keep mib MiB of memory, then answer")]
    fn allocate(&self, Parameters(AllocateRequest { mib }): Parameters<AllocateRequest>) -> String {
        let mut kept = Vec::with_capacity(mib);
        for _ in 0..mib {
            kept.push(vec![1u8; 1 << 20]);
        }
        // Leaked on purpose: the memory stays the server's until it exits.
        std::mem::forget(kept);
        format!("allocated {mib} MiB")
    }

    /// A request that stays in flight as long as a test needs (to kill the server under it).
    #[tool(description = "Wait ms milliseconds, then answer")]
    async fn sleep(&self, Parameters(SleepRequest { ms }): Parameters<SleepRequest>) -> String {
        tokio::time::sleep(Duration::from_millis(ms)).await;
        format!("slept {ms} ms")
    }
}

#[tool_handler]
impl ServerHandler for TestServer {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(
            ServerCapabilities::builder()
                .enable_tools()
                .enable_tool_list_changed()
                .build(),
        )
        .with_server_info(Implementation::new(
            "switchboard-test-server",
            env!("CARGO_PKG_VERSION"),
        ))
    }

    /// 2026-07-28 subscriptions: whatever is asked (tools/list_changed is all there is).
    fn accepted_subscription_filter(
        &self,
        requested: &rmcp::model::SubscriptionFilter,
    ) -> Option<rmcp::model::SubscriptionFilter> {
        Some(requested.clone())
    }

    /// One `notifications/tools/list_changed` at once, so tests see a subscription's
    /// notification reach the stream of its `subscriptions/listen` request; then open until
    /// cancelled.
    async fn listen(
        &self,
        context: rmcp::service::SubscriptionContext,
    ) -> Result<(), rmcp::ErrorData> {
        let changed =
            rmcp::model::ServerNotification::ToolListChangedNotification(Default::default());
        let _ = context.sink().send(changed).await;
        context.cancelled().await;
        Ok(())
    }
}

/// Plain HTTP routes beside the MCP endpoint, for testing the proxy itself.
mod probes {
    use std::{
        collections::BTreeMap,
        sync::{
            Arc,
            atomic::{AtomicU64, Ordering},
        },
        time::Duration,
    };

    use axum::{
        Json, Router,
        extract::{Query, Request},
        response::{
            IntoResponse,
            sse::{Event, Sse},
        },
        routing::{any, get, post},
    };
    use tokio::sync::Notify;

    /// Counts a stream as open until the client (or the proxy) drops it.
    struct Open(Arc<AtomicU64>);
    impl Drop for Open {
        fn drop(&mut self) {
            self.0.fetch_sub(1, Ordering::Relaxed);
        }
    }

    pub fn router(accepted: Arc<AtomicU64>) -> Router {
        let next = Arc::new(Notify::new());
        let n2 = Arc::clone(&next);
        let open = Arc::new(AtomicU64::new(0));
        let open2 = Arc::clone(&open);
        Router::new()
            .route("/headers", any(headers))
            .route("/bytes", get(bytes))
            .route(
                "/stats",
                get(move || async move {
                    Json(serde_json::json!({
                        "connections_accepted": accepted.load(Ordering::Relaxed),
                        "open_streams": open2.load(Ordering::Relaxed),
                    }))
                }),
            )
            .route("/slow", get(slow))
            .route(
                "/stream",
                get(move |q: Query<BTreeMap<String, u32>>| {
                    open.fetch_add(1, Ordering::Relaxed);
                    stream(q, Arc::clone(&next), Open(Arc::clone(&open)))
                }),
            )
            .route(
                "/stream/next",
                post(move || async move {
                    n2.notify_one();
                    "ok"
                }),
            )
    }

    /// What the proxy sent: method, path and query, headers, and the body's size (read whole
    /// before answering, so a proxy's body limit is hit before this answers).
    async fn headers(req: Request) -> impl IntoResponse {
        let headers: BTreeMap<String, String> = req
            .headers()
            .iter()
            .map(|(k, v)| {
                (
                    k.to_string(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect();
        let method = req.method().as_str().to_owned();
        let uri = req.uri().to_string();
        let body = axum::body::to_bytes(req.into_body(), usize::MAX)
            .await
            .map(|b| b.len());
        Json(serde_json::json!({
            "method": method,
            "uri": uri,
            "headers": headers,
            "body_bytes": body.ok(),
        }))
    }

    /// `n` bytes (default 1 KiB) of payload, for throughput benchmarks.
    async fn bytes(Query(q): Query<BTreeMap<String, usize>>) -> Vec<u8> {
        vec![b'x'; q.get("n").copied().unwrap_or(1024).min(16 << 20)]
    }

    async fn slow(Query(q): Query<BTreeMap<String, u64>>) -> &'static str {
        tokio::time::sleep(Duration::from_millis(q.get("ms").copied().unwrap_or(1000))).await;
        "ok"
    }

    /// `n` events; the first at once, each next one only after a POST to /stream/next. A client
    /// that sees event k before asking for k+1 proves nothing between it and us buffered.
    async fn stream(
        Query(q): Query<BTreeMap<String, u32>>,
        next: Arc<Notify>,
        open: Open,
    ) -> impl IntoResponse {
        let n = q.get("n").copied().unwrap_or(3);
        let s = futures::stream::unfold((0u32, open), move |(i, open)| {
            let next = Arc::clone(&next);
            async move {
                if i >= n {
                    return None;
                }
                if i > 0 {
                    next.notified().await;
                }
                Some((
                    Ok::<_, std::convert::Infallible>(
                        Event::default()
                            .id(i.to_string())
                            .data(format!("event {i}")),
                    ),
                    (i + 1, open),
                ))
            }
        });
        Sse::new(s)
    }
}

fn record_pid(file: &Option<PathBuf>, pid: u32) -> anyhow::Result<()> {
    if let Some(path) = file {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("opening pid file {}", path.display()))?;
        writeln!(f, "{pid}")?;
    }
    Ok(())
}

/// Holding a SIGTERM listener replaces the default action (terminate), so the process lives on.
fn ignore_sigterm() -> anyhow::Result<tokio::signal::unix::Signal> {
    signal(SignalKind::terminate()).context("installing SIGTERM handler")
}

async fn run_sleeper(args: &Args) -> anyhow::Result<()> {
    if args.setsid {
        nix::unistd::setsid().context("setsid")?;
    }
    let _term = ignore_sigterm()?;
    loop {
        tokio::time::sleep(Duration::from_secs(3600)).await;
    }
}

fn spawn_grandchild(args: &Args, setsid: bool) -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("locating own executable")?;
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("--sleeper");
    if setsid {
        cmd.arg("--setsid");
    }
    cmd.stdin(std::process::Stdio::null());
    let child = cmd.spawn().context("spawning grandchild")?;
    record_pid(&args.pid_file, child.id())?;
    // Deliberately never waited for: the point is a descendant the supervisor must find.
    std::mem::forget(child);
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.sleeper {
        return run_sleeper(&args).await;
    }
    record_pid(&args.pid_file, std::process::id())?;
    let _term = if args.ignore_sigterm {
        Some(ignore_sigterm()?)
    } else {
        None
    };
    if args.grandchild {
        spawn_grandchild(&args, false)?;
    }
    if args.setsid_grandchild {
        spawn_grandchild(&args, true)?;
    }
    if let Some(ms) = args.exit_after_ms {
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            eprintln!("mcp-test-server: exiting after {ms} ms as asked");
            std::process::exit(3);
        });
    }
    if args.startup_delay_ms > 0 {
        tokio::time::sleep(Duration::from_millis(args.startup_delay_ms)).await;
    }

    if args.stdio {
        use rmcp::ServiceExt as _;
        let served = async {
            let service = TestServer::new(None)
                .serve(rmcp::transport::stdio())
                .await
                .context("starting stdio server")?;
            service.waiting().await.context("stdio server")?;
            anyhow::Ok(())
        }
        .await;
        // Tests read this line to tell an exit at end of input from one by a signal.
        eprintln!("mcp-test-server: stdin closed; exiting");
        return served;
    }

    let addr = SocketAddr::from((args.host, args.port));
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr}"))?;
    eprintln!("mcp-test-server: listening on http://{addr}{}", args.path);

    if args.never_ready {
        // Accept and hold every connection without reading it: alive, listening, useless.
        let mut held = Vec::new();
        loop {
            let (sock, _) = listener.accept().await.context("accept")?;
            held.push(sock);
        }
    }

    let port = args.port;
    let service: StreamableHttpService<TestServer, LocalSessionManager> =
        StreamableHttpService::new(
            move || Ok(TestServer::new(Some(port))),
            Default::default(),
            StreamableHttpServerConfig::default(),
        );
    let accepted = Arc::new(AtomicU64::new(0));
    let router = axum::Router::new()
        .nest_service(&args.path, service)
        .merge(probes::router(Arc::clone(&accepted)));
    let listener = axum::serve::ListenerExt::tap_io(listener, move |tcp| {
        accepted.fetch_add(1, Ordering::Relaxed);
        // An SSE reply is several small writes; without this, Nagle holds the later ones for
        // the client's delayed ACK (~40 ms a call).
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, router).await.context("serving")?;
    Ok(())
}
