//! stdio MCP servers served as Streamable HTTP: the bridge,
//! `switchboard __stdio --socket PATH [options] -- PROGRAM ARGS...`.
//!
//! A `transport = "stdio"` deployment's process is this bridge, started by the runtime like any
//! server (in the deployment's cgroup, output to its log), so supervision, health, restarts,
//! stop, logs, events, metrics and adoption after a Switchboard crash apply unchanged. The
//! bridge listens on a Unix socket in the data directory, not a TCP port: no port is taken from
//! the range, and nothing but Switchboard's proxy (behind its token and Origin checks) can reach
//! it; file permissions keep other local users out. It spawns the server's processes itself
//! (see [`host`] for which client gets which child, and [`child`] for the relay), and children
//! write their stderr through it, a line at a time, so their logs land in the deployment log,
//! stamped (and the bridge's errors about a child can quote its last lines). With `runtime =
//! "docker"` each of those processes is a container the bridge starts and attaches to
//! ([`container`]); the bridge itself stays a host process.
//!
//! HTTP surface on the socket:
//! - `POST /mcp`: one JSON-RPC message. `initialize` without a session opens a legacy session;
//!   a message with `Mcp-Session-Id` goes to that session's child (404 when unknown, as the
//!   spec wants: clients then initialize again); a modern request (2026-07-28 `_meta`) goes to
//!   the pool. Requests get an SSE stream (progress and server requests first, then the reply)
//!   when the client accepts one, else the JSON reply; notifications and responses get 202.
//! - `GET /mcp` with a session: its standalone stream (one at a time; 409 for a second).
//! - `DELETE /mcp` with a session: ends it and stops its child.
//! - `GET /health`: a probe on the health child's pipe (what the supervisor checks).
//! - `GET /sessions`: the open sessions and their processes (the API's sessions view).
//!
//! Stop: on SIGTERM the bridge stops accepting, closes every child's stdin, waits, sends
//! SIGTERM, waits, sends SIGKILL (MCP's stdio shutdown sequence), then exits. The runtime sends
//! SIGTERM to the bridge alone for such deployments and kills what is left of the cgroup after
//! the grace period.

pub mod child;
pub mod container;
pub mod host;

use std::{convert::Infallible, ffi::OsString, path::PathBuf, sync::Arc, time::Duration};

use axum::{
    Router,
    body::Body,
    extract::State,
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use bytes::{BufMut as _, Bytes, BytesMut};
use futures_util::StreamExt as _;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use self::{
    child::{SendError, encode},
    container::Containers,
    host::{Era, Host, HostConfig, HostError},
};
use crate::{
    mcp::{
        self,
        jsonrpc::{Message, code},
    },
    runtime::container::StdioContainers,
};

/// An HTTP client for a bridge's socket (its `/health` and `/sessions`): every connection goes
/// to `socket`, so URLs only name the path (`http://bridge/health`).
pub fn bridge_client(socket: &std::path::Path) -> reqwest::Result<reqwest::Client> {
    reqwest::Client::builder()
        .unix_socket(socket)
        .pool_idle_timeout(Duration::from_secs(30))
        .user_agent(concat!("switchboard/", env!("CARGO_PKG_VERSION")))
        .build()
}

/// The hidden first argument that selects the bridge.
pub const BRIDGE_ARG: &str = "__stdio";

/// Whether this process was started as the bridge.
pub fn is_bridge_invocation() -> bool {
    std::env::args_os().nth(1).is_some_and(|a| a == BRIDGE_ARG)
}

/// The bridge's command line: built by the manager ([`to_args`](Self::to_args)) and parsed by
/// the bridge ([`parse_command_line`](Self::parse_command_line)), never typed by people. One
/// type for both sides, so an option cannot be written under one name and read under another.
#[derive(Debug, Clone, PartialEq, clap::Parser)]
#[command(name = "switchboard __stdio")]
pub struct BridgeArgs {
    /// Unix socket to serve Streamable HTTP on.
    #[arg(long)]
    pub socket: PathBuf,
    /// Legacy sessions open at once (each has a process of its own); 429 beyond.
    #[arg(long, default_value_t = 100)]
    pub max_sessions: usize,
    /// A legacy session without requests or open streams for this long is closed.
    #[arg(long, default_value_t = 600_000)]
    pub idle_ms: u64,
    /// Processes shared by modern (stateless) requests.
    #[arg(long, default_value_t = 2)]
    pub pool: usize,
    /// Processes started ahead of the next legacy sessions.
    #[arg(long, default_value_t = 1)]
    pub spares: usize,
    /// A stopping process gets this long after its stdin closes, and again after SIGTERM.
    #[arg(long, default_value_t = 2_000)]
    pub grace_ms: u64,
    /// How long a health probe waits for the server: less than the supervisor's check
    /// timeout, so that a probe queued behind a busy server's calls is the bridge's to judge.
    #[arg(long, default_value_t = 10_000)]
    pub probe_ms: u64,
    /// How long the first process may take to answer its first request.
    #[arg(long, default_value_t = 30_000)]
    pub startup_ms: u64,
    /// Each server process is a container (`runtime = "docker"`): the engine, image and
    /// container settings, as JSON. Names its environment, never a value of it.
    #[arg(long, value_parser = parse_containers)]
    pub container: Option<StdioContainers>,
    /// The server's program and arguments (for a container, its entrypoint and command;
    /// an empty program keeps the image's).
    #[arg(last = true, required = true)]
    pub command: Vec<String>,
}

impl BridgeArgs {
    /// The arguments that start the bridge: `__stdio --socket ... -- <program> <args>`, what
    /// follows the switchboard executable on its command line. Holds no environment: the
    /// tool's env (secrets included) reaches the server through the bridge's environment.
    pub fn to_args(&self) -> Vec<String> {
        let mut args = vec![
            BRIDGE_ARG.to_owned(),
            "--socket".to_owned(),
            self.socket.display().to_string(),
            "--max-sessions".to_owned(),
            self.max_sessions.to_string(),
            "--idle-ms".to_owned(),
            self.idle_ms.to_string(),
            "--pool".to_owned(),
            self.pool.to_string(),
            "--spares".to_owned(),
            self.spares.to_string(),
            "--grace-ms".to_owned(),
            self.grace_ms.to_string(),
            "--probe-ms".to_owned(),
            self.probe_ms.to_string(),
            "--startup-ms".to_owned(),
            self.startup_ms.to_string(),
        ];
        if let Some(c) = &self.container {
            args.push("--container".to_owned());
            args.push(serde_json::to_string(c).unwrap_or_default());
        }
        args.push("--".to_owned());
        args.extend(self.command.iter().cloned());
        args
    }

    /// Reads a whole command line (`switchboard __stdio ...`, as [`to_args`](Self::to_args)
    /// wrote it after the executable).
    pub fn parse_command_line(
        argv: impl IntoIterator<Item = OsString>,
    ) -> Result<BridgeArgs, clap::Error> {
        let args = argv
            .into_iter()
            .enumerate()
            .filter_map(|(i, a)| (i != 1).then_some(a));
        <BridgeArgs as clap::Parser>::try_parse_from(args)
    }
}

fn parse_containers(json: &str) -> Result<StdioContainers, String> {
    serde_json::from_str(json).map_err(|e| format!("not the bridge's container settings: {e}"))
}

/// Entry point of `switchboard __stdio`. Never returns.
pub fn run_bridge() -> ! {
    let args = BridgeArgs::parse_command_line(std::env::args_os()).unwrap_or_else(|e| e.exit());
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SWITCHBOARD_BRIDGE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_ansi(false)
        .without_time() // the log writer stamps every line
        .with_writer(std::io::stderr)
        .init();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("switchboard stdio bridge: cannot start the async runtime: {e}");
            std::process::exit(1);
        }
    };
    let code = rt.block_on(async move {
        match serve(args, crate::signal::shutdown_signal()).await {
            Ok(()) => 0,
            Err(e) => {
                tracing::error!("{e:#}");
                1
            }
        }
    });
    std::process::exit(code)
}

/// Runs the bridge until `shutdown` resolves, then stops every child.
pub async fn serve(
    args: BridgeArgs,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let Some((program, rest)) = args.command.split_first() else {
        anyhow::bail!("no server command given");
    };
    let containers = match &args.container {
        Some(settings) => {
            let containers = Containers::connect(settings.clone(), program, rest)
                .await
                .with_context(|| {
                    format!(
                        "cannot run the MCP server's containers (image '{}')",
                        settings.launch.image
                    )
                })?;
            containers.remove_leftovers().await;
            Some(containers)
        }
        None => None,
    };
    // What the messages call the server.
    let server = match &containers {
        Some(c) => format!("image {}", c.image()),
        None => program.clone(),
    };
    let host = Host::new(HostConfig {
        program: program.clone(),
        args: rest.to_vec(),
        max_sessions: args.max_sessions.max(1),
        idle: Duration::from_millis(args.idle_ms.max(1)),
        pool_size: args.pool.max(1),
        spares: args.spares,
        probe: Duration::from_millis(args.probe_ms.max(1)),
        grace: Duration::from_millis(args.grace_ms),
        containers,
    });
    // A socket left by a process that is gone (the bridge is the only one to bind it).
    let _ = std::fs::remove_file(&args.socket);
    let listener = tokio::net::UnixListener::bind(&args.socket)
        .with_context(|| format!("cannot listen on {}", args.socket.display()))?;
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&args.socket, std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("cannot restrict {}", args.socket.display()))?;
    }
    tracing::info!(server = %server, socket = %args.socket.display(), "stdio bridge listening");

    // The first process: its era decides how requests are served. A server that cannot even
    // answer its first request fails the deployment's start (the supervisor restarts it).
    let started = host
        .start(Duration::from_millis(args.startup_ms))
        .await
        .map_err(|e| anyhow::anyhow!("{e}"));
    let era = match started {
        Ok(era) => era,
        Err(e) => {
            host.stop_all().await;
            let _ = std::fs::remove_file(&args.socket);
            return Err(e.context(format!("MCP server '{server}' failed to start")));
        }
    };
    tracing::info!(era = ?era, "MCP server answered; serving");

    let reaper = {
        let host = Arc::clone(&host);
        let every =
            (host.config.idle / 4).clamp(Duration::from_millis(100), Duration::from_secs(30));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                host.reap_idle();
            }
        })
    };

    let app = Router::new()
        .route("/mcp", get(get_stream).post(post).delete(delete))
        .route("/health", get(health))
        .route("/sessions", get(sessions))
        .layer(axum::extract::DefaultBodyLimit::max(16 * 1024 * 1024))
        .with_state(Arc::clone(&host));
    let stop_serving = tokio_util::sync::CancellationToken::new();
    let serving = axum::serve(listener, app)
        .with_graceful_shutdown(stop_serving.clone().cancelled_owned())
        .into_future();
    tokio::pin!(serving);
    let fatal = host.fatal.clone();
    let served = tokio::select! {
        r = &mut serving => r,
        () = fatal.cancelled() => {
            host.stop_all().await;
            let _ = std::fs::remove_file(&args.socket);
            let why = host.fatal_reason().unwrap_or_default();
            anyhow::bail!("{why}");
        }
        () = shutdown => {
            // The servers first, as the spec orders (stdin closed, then signals): that also
            // ends their requests and streams, which a graceful HTTP shutdown would otherwise
            // wait for (a client's GET stream stays open indefinitely).
            tracing::info!("stopping MCP server processes");
            host.stop_all().await;
            stop_serving.cancel();
            tokio::time::timeout(Duration::from_secs(2), &mut serving)
                .await
                .unwrap_or(Ok(()))
        }
    };
    reaper.abort();
    host.stop_all().await;
    let _ = std::fs::remove_file(&args.socket);
    served.context("serving HTTP")
}

/// How long a standalone stream may be silent before a comment line is sent on it.
const KEEPALIVE: Duration = Duration::from_secs(15);

const SESSION: http::HeaderName = mcp::SESSION_ID;
/// The principal a request comes from, set by Switchboard's proxy on requests to a bridge
/// (and removed from every request a client sends), so the bridge keeps principals' modern
/// requests on separate processes.
pub const PRINCIPAL: http::HeaderName = http::HeaderName::from_static("x-switchboard-principal");

fn jsonrpc_error(status: StatusCode, code: i64, message: impl Into<String>) -> Response {
    let body =
        json!({"jsonrpc": "2.0", "id": null, "error": {"code": code, "message": message.into()}});
    (status, axum::Json(body)).into_response()
}

fn api_error(status: StatusCode, code: &str, message: impl Into<String>) -> Response {
    crate::http_error::response(status, code, message.into())
}

fn session_header(headers: &HeaderMap) -> Option<&str> {
    headers.get(SESSION).and_then(|v| v.to_str().ok())
}

fn wants_sse(headers: &HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("text/event-stream"))
}

fn is_modern(msg: &Value) -> bool {
    mcp::meta_protocol_version(msg).is_some()
        || Message::parse(msg).and_then(|m| m.method()) == Some("server/discover")
}

fn session_not_found() -> Response {
    jsonrpc_error(
        StatusCode::NOT_FOUND,
        code::SESSION_NOT_FOUND,
        "Session not found: it ended (its server process exited, it was idle, or it was deleted); initialize a new session",
    )
}

fn sse_frame(msg: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(msg.len() + 24);
    b.put_slice(b"event: message\ndata: ");
    b.put_slice(msg);
    b.put_slice(b"\n\n");
    b.freeze()
}

/// Streams a request's messages as SSE (or, when the client only takes JSON, answers with the
/// reply alone). The registration lives as long as the response body, so a client that goes
/// away unregisters its request (and cancels it on a shared child).
async fn respond(
    registration: child::Registration,
    mut rx: mpsc::Receiver<Bytes>,
    sse: bool,
    session: Option<&str>,
) -> Response {
    let mut builder = Response::builder().status(StatusCode::OK);
    if let Some(id) = session.and_then(|s| HeaderValue::from_str(s).ok()) {
        builder = builder.header(SESSION, id);
    }
    if !sse {
        // JSON: the reply is the last message before the stream ends; notifications sent
        // before it have no place in a JSON answer and are dropped.
        let mut last = None;
        while let Some(m) = rx.recv().await {
            last = Some(m);
        }
        drop(registration);
        let body = last.unwrap_or_else(|| {
            encode(&mcp::jsonrpc::error_response(
                Value::Null,
                code::INTERNAL_ERROR,
                "no reply",
                None,
            ))
        });
        return builder
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(body))
            .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response());
    }
    let stream =
        futures_util::stream::unfold((rx, Some(registration)), |(mut rx, reg)| async move {
            rx.recv()
                .await
                .map(|m| (Ok::<_, Infallible>(sse_frame(&m)), (rx, reg)))
        });
    builder
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .header("x-accel-buffering", "no")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

fn send_failed(e: SendError, legacy: bool) -> Response {
    match e {
        SendError::Ended(_) if legacy => session_not_found(),
        SendError::Ended(why) => jsonrpc_error(
            StatusCode::SERVICE_UNAVAILABLE,
            code::INTERNAL_ERROR,
            format!("the MCP server process has ended ({why}); retry"),
        ),
        SendError::DuplicateId(id) => jsonrpc_error(
            StatusCode::BAD_REQUEST,
            code::INVALID_REQUEST,
            format!("a request with id {id} is already in flight on this session"),
        ),
        e @ SendError::Busy(_) => {
            let mut r = jsonrpc_error(
                StatusCode::SERVICE_UNAVAILABLE,
                code::INTERNAL_ERROR,
                format!("{e}; retry later"),
            );
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            r
        }
    }
}

async fn post(State(host): State<Arc<Host>>, headers: HeaderMap, body: Bytes) -> Response {
    let msg: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => {
            return jsonrpc_error(
                StatusCode::BAD_REQUEST,
                code::PARSE_ERROR,
                format!("Parse error: {e}"),
            );
        }
    };
    if !msg.is_object() {
        return jsonrpc_error(
            StatusCode::BAD_REQUEST,
            code::INVALID_REQUEST,
            "Invalid Request: one JSON-RPC message per POST (batches are not supported)",
        );
    }
    let Some(parsed) = Message::parse(&msg) else {
        return jsonrpc_error(
            StatusCode::BAD_REQUEST,
            code::INVALID_REQUEST,
            "Invalid Request: not a JSON-RPC request, notification or response (a string \
             `method`, or a `result` or `error`)",
        );
    };
    let is_request = matches!(parsed, Message::Request { .. });
    let is_initialize = is_request && parsed.method() == Some("initialize");
    // A cancelled request gets no reply from the server: its stream is ended here.
    let cancelled = match parsed {
        Message::Notification {
            method: "notifications/cancelled",
            params,
        } => Some(params.and_then(|p| p.get("requestId")).cloned()),
        _ => None,
    };
    let is_modern = is_modern(&msg);
    let sse = wants_sse(&headers);

    if let Some(sid) = session_header(&headers) {
        let Some(session) = host.session(sid) else {
            return session_not_found();
        };
        session.child.touch();
        if !is_request {
            let sent = session.child.notify(&msg);
            if let Some(Some(id)) = &cancelled {
                session.child.forget(id);
            }
            return match sent {
                Ok(()) => StatusCode::ACCEPTED.into_response(),
                Err(e) => send_failed(e, true),
            };
        }
        let (tx, rx) = child::stream();
        return match session.child.request(msg, tx, sse) {
            Ok(reg) => respond(reg, rx, sse, None).await,
            Err(e) => send_failed(e, true),
        };
    }

    if is_initialize {
        return initialize(&host, msg, sse).await;
    }
    if is_modern || (!is_request && host.era() == Some(Era::Modern)) {
        if host.era() != Some(Era::Modern) {
            // The spec's UnsupportedProtocolVersionError, so a client falls back to
            // `initialize` (the server behind this bridge speaks only the legacy era).
            let requested = mcp::meta_protocol_version(&msg)
                .cloned()
                .unwrap_or(Value::Null);
            let body = mcp::jsonrpc::error_response(
                msg.get("id").cloned().unwrap_or(Value::Null),
                code::UNSUPPORTED_PROTOCOL_VERSION,
                "this server does not support protocol version 2026-07-28: use a legacy session (initialize)",
                Some(json!({"supported": mcp::LEGACY_VERSIONS, "requested": requested})),
            );
            return (StatusCode::BAD_REQUEST, axum::Json(body)).into_response();
        }
        // The proxy names the principal (and removes the header from what clients send):
        // each gets processes of its own.
        let principal = headers.get(PRINCIPAL).and_then(|v| v.to_str().ok());
        let child = match principal.map_or_else(|| host.pool_child(), |p| host.principal_child(p)) {
            Ok(c) => c,
            Err(e) => {
                return jsonrpc_error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    code::INTERNAL_ERROR,
                    e.to_string(),
                );
            }
        };
        if !is_request {
            // A stateless notification has no session to belong to; a cancellation names an
            // id only its own (closed) stream knew, and closing that stream already cancelled.
            if cancelled.is_none() {
                let _ = child.notify(&msg);
            }
            return StatusCode::ACCEPTED.into_response();
        }
        let (tx, rx) = child::stream();
        return match child.request(msg, tx, sse) {
            Ok(reg) => respond(reg, rx, sse, None).await,
            Err(e) => send_failed(e, false),
        };
    }
    jsonrpc_error(
        StatusCode::BAD_REQUEST,
        code::SERVER_ERROR,
        "Bad Request: Mcp-Session-Id header is required (send initialize first, or a 2026-07-28 request with _meta)",
    )
}

async fn initialize(host: &Arc<Host>, msg: Value, sse: bool) -> Response {
    let (session, slot) = match host.open_session() {
        Ok(s) => s,
        Err(e @ HostError::TooManySessions(_)) => {
            let mut r = api_error(
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_sessions",
                e.to_string(),
            );
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
            return r;
        }
        Err(e) => {
            return jsonrpc_error(
                StatusCode::SERVICE_UNAVAILABLE,
                code::INTERNAL_ERROR,
                e.to_string(),
            );
        }
    };
    if let Err(e) = host.register(&session, slot) {
        return jsonrpc_error(StatusCode::SERVICE_UNAVAILABLE, -32603, e.to_string());
    }
    // Closes the session unless the handshake completes: a client that goes away during a
    // slow start must not leave a session (and a process) under an id nobody knows.
    let mut pending_session = ClosesSession {
        host: Some(Arc::clone(host)),
        id: session.id.clone(),
    };
    let (tx, mut rx) = child::stream();
    // `true`: what the server writes before its reply is collected here (see below).
    let reg = match session.child.request(msg, tx, true) {
        Ok(r) => r,
        Err(e) => return send_failed(e, false),
    };
    // The initialize reply decides whether the session exists, so it is awaited here; what the
    // server sends before it (e.g. list_changed notifications) is relayed after it.
    let mut early = Vec::new();
    let reply = loop {
        match rx.recv().await {
            Some(m) => {
                let v: Value = serde_json::from_slice(&m).unwrap_or(Value::Null);
                if Message::parse(&v).and_then(|p| p.method()).is_none() {
                    break Some((m, v));
                }
                early.push(m);
            }
            None => break None,
        }
    };
    drop(reg);
    let Some((reply, v)) = reply else {
        return jsonrpc_error(
            StatusCode::BAD_GATEWAY,
            code::INTERNAL_ERROR,
            "the MCP server sent no reply to initialize",
        );
    };
    let mut builder = Response::builder().status(StatusCode::OK);
    if !matches!(
        Message::parse(&v),
        Some(Message::Response {
            outcome: Err(_),
            ..
        })
    ) {
        // The session exists: keep it, and name it to the client (an error reply names none,
        // so no one pins a session that is gone).
        pending_session.host = None;
        if let (Some(info), Some(version)) = (
            v.pointer("/result/serverInfo"),
            v.pointer("/result/protocolVersion").and_then(Value::as_str),
        ) {
            host.note_server(info, version);
        }
        // Server messages written before the reply wait for the session's first stream.
        session.child.hold(early);
        builder = builder.header(
            SESSION,
            HeaderValue::from_str(&session.id).unwrap_or(HeaderValue::from_static("invalid")),
        );
    }
    if sse {
        let mut body = BytesMut::new();
        body.put_slice(&sse_frame(&reply));
        builder = builder
            .header(header::CONTENT_TYPE, "text/event-stream")
            .header(header::CACHE_CONTROL, "no-cache");
        return builder
            .body(Body::from(body.freeze()))
            .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response());
    }
    builder
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(reply))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

/// Closes a session when dropped, unless disarmed (`host` taken).
struct ClosesSession {
    host: Option<Arc<Host>>,
    id: String,
}

impl Drop for ClosesSession {
    fn drop(&mut self) {
        if let Some(host) = self.host.take() {
            host.close_session(&self.id);
        }
    }
}

async fn get_stream(State(host): State<Arc<Host>>, headers: HeaderMap) -> Response {
    let Some(sid) = session_header(&headers) else {
        return jsonrpc_error(
            StatusCode::METHOD_NOT_ALLOWED,
            code::SERVER_ERROR,
            "GET needs an Mcp-Session-Id (a legacy session's stream); 2026-07-28 has no GET stream",
        );
    };
    let Some(session) = host.session(sid) else {
        return session_not_found();
    };
    session.child.touch();
    let (tx, rx) = child::stream();
    if !session.child.listen(tx) {
        return jsonrpc_error(
            StatusCode::CONFLICT,
            code::SERVER_ERROR,
            "Conflict: only one standalone SSE stream is allowed per session",
        );
    }
    // The session's idle time starts again when the stream ends, not when it opened: a client
    // whose stream broke (a Switchboard restart cuts it) gets the whole idle time to reconnect.
    let ended = TouchOnDrop(Arc::clone(&session.child));
    // Ends when the child lets go of the sink: the process ended, or the client stopped
    // reading (see `STREAM_BOUND`). A comment line after each quiet spell keeps idle
    // intermediaries from closing the stream.
    let merged = futures_util::stream::unfold((rx, ended), |(mut rx, ended)| async move {
        match tokio::time::timeout(KEEPALIVE, rx.recv()).await {
            Ok(Some(m)) => Some((sse_frame(&m), (rx, ended))),
            Ok(None) => None,
            Err(_) => Some((Bytes::from_static(b": keep-alive\n\n"), (rx, ended))),
        }
    })
    .map(Ok::<_, Infallible>);
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .header("x-accel-buffering", "no")
        .body(Body::from_stream(merged))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

/// Notes activity on a child when dropped (see `Child::idle_for`).
struct TouchOnDrop(Arc<child::Child>);

impl Drop for TouchOnDrop {
    fn drop(&mut self) {
        self.0.touch();
    }
}

async fn delete(State(host): State<Arc<Host>>, headers: HeaderMap) -> Response {
    let Some(sid) = session_header(&headers) else {
        return jsonrpc_error(
            StatusCode::BAD_REQUEST,
            code::SERVER_ERROR,
            "Bad Request: Mcp-Session-Id header is required",
        );
    };
    if host.close_session(sid) {
        StatusCode::OK.into_response()
    } else {
        session_not_found()
    }
}

async fn health(State(host): State<Arc<Host>>) -> Response {
    match host.check(host.config.probe).await {
        Ok(v) => (StatusCode::OK, axum::Json(v)).into_response(),
        Err(e) => api_error(StatusCode::SERVICE_UNAVAILABLE, "unhealthy", e),
    }
}

/// One open legacy session, as `GET /sessions` lists it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct SessionInfo {
    pub id: String,
    /// The session's server process on this host (a container's main process, for a tool
    /// with `runtime = "docker"`; 0 while its container is being started).
    pub pid: u32,
    pub created_at: chrono::DateTime<chrono::Utc>,
    pub in_flight: u32,
    pub stream_open: bool,
}

/// What `GET /sessions` answers.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct BridgeSessions {
    /// `legacy` or `modern`, once known.
    pub era: Option<String>,
    pub max_sessions: usize,
    pub sessions: Vec<SessionInfo>,
    /// Every server process the bridge runs (sessions, pool, health, spare).
    pub processes: Vec<u32>,
}

async fn sessions(State(host): State<Arc<Host>>) -> Response {
    let mut list: Vec<SessionInfo> = host
        .sessions()
        .into_iter()
        .map(|s| SessionInfo {
            id: s.id.clone(),
            pid: s.child.pid(),
            created_at: s.created,
            in_flight: s.child.in_flight(),
            stream_open: s.child.has_listener(),
        })
        .collect();
    list.sort_by_key(|s| s.created_at);
    let body = BridgeSessions {
        era: host.era().map(|e| e.as_str().to_owned()),
        max_sessions: host.config.max_sessions,
        sessions: list,
        processes: host
            .children()
            .iter()
            .filter(|c| c.alive())
            .map(|c| c.pid())
            .collect(),
    };
    (StatusCode::OK, axum::Json(body)).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bridge_parses_back_the_command_line_the_manager_builds() {
        let built = BridgeArgs {
            socket: PathBuf::from("/data/run/0f.sock"),
            max_sessions: 7,
            idle_ms: 1_234,
            pool: 3,
            spares: 0,
            grace_ms: 567,
            probe_ms: 890,
            startup_ms: 4_321,
            container: None,
            // A server argument that looks like a bridge option stays the server's.
            command: vec![
                "node".into(),
                "server.js".into(),
                "--pool".into(),
                "9".into(),
            ],
        };
        let argv = std::iter::once("switchboard".to_owned())
            .chain(built.to_args())
            .map(OsString::from);
        let parsed = BridgeArgs::parse_command_line(argv).expect("the bridge reads its arguments");
        assert_eq!(parsed, built);
    }
}
