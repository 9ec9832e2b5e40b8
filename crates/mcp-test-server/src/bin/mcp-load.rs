//! mcp-load: a load generator for MCP tool calls over Streamable HTTP.
//!
//! Opens `--sessions` sessions, each on its own HTTP/1.1 keep-alive connection, and has each
//! call one tool sequentially (closed loop), or at a fixed share of `--rate` (paced: latency is
//! then measured from each call's scheduled start, so a server that falls behind is charged
//! for the queue it causes). Replies may be JSON or SSE; for SSE the events are read until the
//! one whose JSON-RPC id matches. A result that does not contain the expected text is an error.
//!
//! Eras: `legacy` initializes a session (`Mcp-Session-Id`), sends `notifications/initialized`,
//! and DELETEs the session at the end; `modern` (2026-07-28) sends stateless requests that
//! carry the protocol version and client capabilities in `params._meta`, with the
//! `MCP-Protocol-Version`, `Mcp-Method` and `Mcp-Name` headers.
//!
//! Prints one JSON object, counting only calls started after the warmup and, in a closed loop,
//! finished within the measured window (paced: every call scheduled in it):
//! `{"requests","errors","duration_s","rps","p50_ms","p90_ms","p99_ms","max_ms","late"}`, where
//! `late` counts paced calls that could not even be sent before the window closed (the server
//! fell behind the rate). Error samples go to stderr. Exits 1 if a session cannot be set up.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow, bail};
use bytes::Bytes;
use clap::{Parser, ValueEnum};
use http_body_util::{BodyExt as _, Full};
use hyper::{
    Method, Request, Response, Uri,
    body::Incoming,
    client::conn::http1::{self, SendRequest},
    header::{ACCEPT, CONTENT_TYPE, HOST, HeaderName, HeaderValue},
};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::io::AsyncBufReadExt as _;

const MODERN_VERSION: &str = "2026-07-28";
const SESSION_ID: HeaderName = HeaderName::from_static("mcp-session-id");
const PROTOCOL_VERSION: HeaderName = HeaderName::from_static("mcp-protocol-version");
const MCP_METHOD: HeaderName = HeaderName::from_static("mcp-method");
const MCP_NAME: HeaderName = HeaderName::from_static("mcp-name");

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq)]
enum Era {
    Legacy,
    Modern,
}

#[derive(Parser, Debug)]
#[command(about = "Load generator for MCP tool calls over Streamable HTTP")]
struct Args {
    /// MCP endpoint, e.g. http://127.0.0.1:8000/mcp
    #[arg(long)]
    url: String,
    /// Concurrent sessions, one connection each.
    #[arg(long, default_value_t = 8)]
    sessions: usize,
    /// Measured seconds (after the warmup).
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Seconds of load before measuring.
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    #[arg(long, value_enum, default_value_t = Era::Legacy)]
    era: Era,
    /// Tool to call.
    #[arg(long, default_value = "echo")]
    tool: String,
    /// The tool's arguments (a JSON object).
    #[arg(long, default_value = r#"{"message":"hi"}"#)]
    args: String,
    /// Text every result must contain; by default the first string among the arguments.
    #[arg(long)]
    expect: Option<String>,
    /// Total calls per second, spread over the sessions; 0 means closed loop (saturation).
    #[arg(long, default_value_t = 0.0)]
    rate: f64,
    /// protocolVersion offered by a legacy initialize.
    #[arg(long, default_value = "2025-06-18")]
    protocol_version: String,
    /// Seconds one call may take before it counts as an error (its connection is then reopened).
    #[arg(long, default_value_t = 30.0)]
    timeout: f64,
    /// Print `mcp-load: measuring` and `mcp-load: measured` on stderr when the measured window
    /// opens and closes, and after the second wait for a line on stdin (30 s at most) before
    /// closing the sessions: a caller can then sample other processes' CPU over exactly that
    /// window while every session's server still runs.
    #[arg(long)]
    marks: bool,
    /// Runtime worker threads (1 keeps the generator off the cores the servers use).
    #[arg(long, default_value_t = 1)]
    threads: usize,
}

/// What every session shares.
struct Target {
    addr: String,
    host: HeaderValue,
    uri: Uri,
    era: Era,
    tool: String,
    tool_name: HeaderValue,
    arguments: Value,
    expect: String,
    protocol_version: String,
    timeout: Duration,
}

/// One HTTP/1.1 connection, reopened after an error.
struct Conn {
    sender: Option<SendRequest<Full<Bytes>>>,
}

impl Conn {
    async fn ready(&mut self, t: &Target) -> anyhow::Result<&mut SendRequest<Full<Bytes>>> {
        if self.sender.as_ref().is_some_and(|s| s.is_closed()) {
            self.sender = None;
        }
        if self.sender.is_none() {
            let tcp = tokio::net::TcpStream::connect(&t.addr)
                .await
                .with_context(|| format!("connecting to {}", t.addr))?;
            tcp.set_nodelay(true)?;
            let (sender, conn) = http1::handshake(TokioIo::new(tcp)).await?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            self.sender = Some(sender);
        }
        let s = self.sender.as_mut().context("no connection")?;
        s.ready().await?;
        Ok(s)
    }

    async fn send(
        &mut self,
        t: &Target,
        method: Method,
        body: Option<&Value>,
        headers: &[(HeaderName, HeaderValue)],
    ) -> anyhow::Result<Response<Incoming>> {
        let mut req = Request::builder()
            .method(method)
            .uri(t.uri.clone())
            .header(HOST, t.host.clone())
            .header(ACCEPT, "application/json, text/event-stream");
        if body.is_some() {
            req = req.header(CONTENT_TYPE, "application/json");
        }
        for (k, v) in headers {
            req = req.header(k, v);
        }
        let bytes = match body {
            Some(b) => Bytes::from(serde_json::to_vec(b)?),
            None => Bytes::new(),
        };
        let req = req.body(Full::new(bytes))?;
        let sender = self.ready(t).await?;
        Ok(sender.send_request(req).await?)
    }

    /// A JSON-RPC request; returns the response message and when it arrived (the rest of an SSE
    /// stream is read after that, so the connection can carry the next request).
    async fn rpc(
        &mut self,
        t: &Target,
        body: &Value,
        headers: &[(HeaderName, HeaderValue)],
    ) -> anyhow::Result<(Value, Instant, hyper::HeaderMap)> {
        let id = body.get("id").cloned().unwrap_or(Value::Null);
        let resp = self.send(t, Method::POST, Some(body), headers).await?;
        let status = resp.status();
        let resp_headers = resp.headers().clone();
        let sse = resp_headers
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("text/event-stream"));
        let mut body = resp.into_body();
        if !status.is_success() {
            let text = body
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            bail!(
                "HTTP {status}: {}",
                String::from_utf8_lossy(&text[..text.len().min(300)])
            );
        }
        if !sse {
            let bytes = body.collect().await?.to_bytes();
            let at = Instant::now();
            let msg: Value = serde_json::from_slice(&bytes).with_context(|| {
                format!(
                    "reply is not JSON: {}",
                    String::from_utf8_lossy(&bytes[..bytes.len().min(300)])
                )
            })?;
            let found = match msg {
                Value::Array(items) => items.into_iter().find(|m| m.get("id") == Some(&id)),
                m if m.get("id") == Some(&id) => Some(m),
                m => bail!("reply has another id: {m}"),
            };
            return Ok((found.context("no reply with our id")?, at, resp_headers));
        }
        let mut buf: Vec<u8> = Vec::new();
        let mut found = None;
        while let Some(frame) = body.frame().await {
            let Ok(data) = frame?.into_data() else {
                continue;
            };
            if found.is_some() {
                continue; // draining the rest of the stream
            }
            buf.extend(data.iter().filter(|&&b| b != b'\r'));
            while let Some(end) = buf.windows(2).position(|w| w == b"\n\n") {
                let event: Vec<u8> = buf.drain(..end + 2).collect();
                if let Some(msg) = sse_message(&event)?
                    && msg.get("id") == Some(&id)
                {
                    found = Some((msg, Instant::now()));
                    break;
                }
            }
        }
        let (msg, at) = found.context("SSE stream ended without our reply")?;
        Ok((msg, at, resp_headers))
    }
}

/// The JSON-RPC message in one SSE event, if it has data.
fn sse_message(event: &[u8]) -> anyhow::Result<Option<Value>> {
    let text = std::str::from_utf8(event)?;
    let data: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data:"))
        .map(|d| d.strip_prefix(' ').unwrap_or(d))
        .collect();
    let data = data.join("\n");
    if data.trim().is_empty() {
        return Ok(None); // a priming event (id and retry only)
    }
    Ok(Some(serde_json::from_str(&data).with_context(|| {
        format!("SSE data is not JSON: {data}")
    })?))
}

/// A session ready for tool calls.
struct Session {
    conn: Conn,
    headers: Vec<(HeaderName, HeaderValue)>,
    session_id: Option<HeaderValue>,
}

async fn open_session(t: &Target) -> anyhow::Result<Session> {
    let mut conn = Conn { sender: None };
    if t.era == Era::Modern {
        let headers = vec![
            (PROTOCOL_VERSION, HeaderValue::from_static(MODERN_VERSION)),
            (MCP_METHOD, HeaderValue::from_static("tools/call")),
            (MCP_NAME, t.tool_name.clone()),
        ];
        return Ok(Session {
            conn,
            headers,
            session_id: None,
        });
    }
    let init = json!({
        "jsonrpc": "2.0", "id": 0, "method": "initialize",
        "params": {
            "protocolVersion": t.protocol_version,
            "capabilities": {},
            "clientInfo": {"name": "mcp-load", "version": env!("CARGO_PKG_VERSION")},
        }
    });
    let (msg, _, headers) = conn.rpc(t, &init, &[]).await.context("initialize")?;
    if let Some(e) = msg.get("error") {
        bail!("initialize failed: {e}");
    }
    let version = msg["result"]["protocolVersion"]
        .as_str()
        .context("initialize result has no protocolVersion")?;
    let mut hs = vec![(PROTOCOL_VERSION, HeaderValue::from_str(version)?)];
    let session_id = headers.get(SESSION_ID).cloned();
    if let Some(id) = &session_id {
        hs.push((SESSION_ID, id.clone()));
    }
    let note = json!({"jsonrpc": "2.0", "method": "notifications/initialized"});
    let resp = conn.send(t, Method::POST, Some(&note), &hs).await?;
    let status = resp.status();
    resp.into_body().collect().await?;
    if !status.is_success() {
        bail!("notifications/initialized: HTTP {status}");
    }
    hs.push((MCP_METHOD, HeaderValue::from_static("tools/call")));
    hs.push((MCP_NAME, t.tool_name.clone()));
    Ok(Session {
        conn,
        headers: hs,
        session_id,
    })
}

impl Session {
    /// One tool call: the reply and when it arrived; an error here leaves the connection suspect.
    async fn call(&mut self, t: &Target, id: u64) -> anyhow::Result<(Value, Instant)> {
        let mut params = json!({"name": t.tool, "arguments": t.arguments});
        if t.era == Era::Modern {
            params["_meta"] = json!({
                "io.modelcontextprotocol/protocolVersion": MODERN_VERSION,
                "io.modelcontextprotocol/clientCapabilities": {},
            });
        }
        let body = json!({"jsonrpc": "2.0", "id": id, "method": "tools/call", "params": params});
        let (msg, at, _) = self.conn.rpc(t, &body, &self.headers).await?;
        Ok((msg, at))
    }

    async fn close(mut self, t: &Target) {
        let Some(id) = self.session_id.take() else {
            return;
        };
        let headers = [(SESSION_ID, id)];
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            if let Ok(r) = self.conn.send(t, Method::DELETE, None, &headers).await {
                let _ = r.into_body().collect().await;
            }
        })
        .await;
    }
}

/// Whether a tool call's reply is a result that echoes the expected text.
fn verify(t: &Target, msg: &Value) -> anyhow::Result<()> {
    if let Some(e) = msg.get("error") {
        bail!("JSON-RPC error: {e}");
    }
    let result = &msg["result"];
    if result["isError"] == Value::Bool(true) {
        bail!("tool error: {result}");
    }
    let echoed = result["content"].as_array().is_some_and(|items| {
        items.iter().any(|c| {
            c["text"]
                .as_str()
                .is_some_and(|text| text.contains(&t.expect))
        })
    });
    if !echoed {
        bail!("result does not contain {:?}: {result}", t.expect);
    }
    Ok(())
}

#[derive(Default)]
struct Tally {
    latencies_us: Vec<u64>,
    errors: u64,
    late: u64,
    samples: Vec<String>,
}

struct Window {
    start: Instant,
    measure_from: Instant,
    end: Instant,
    /// Time between one session's calls in paced mode.
    interval: Option<Duration>,
    sessions: usize,
}

async fn run_session(
    t: Arc<Target>,
    mut s: Session,
    w: Arc<Window>,
    index: usize,
) -> (Tally, Session) {
    let mut tally = Tally::default();
    // Paced sessions start staggered over one interval.
    let mut next = w.start
        + w.interval
            .map(|i| i.mul_f64(index as f64 / w.sessions as f64))
            .unwrap_or_default();
    let mut id = 1u64;
    loop {
        let now = Instant::now();
        let t0 = match w.interval {
            Some(interval) => {
                if next >= w.end {
                    break;
                }
                if now >= w.end {
                    // Out of time while behind schedule: the calls never sent are counted.
                    let behind = w.end.duration_since(next.max(w.measure_from));
                    tally.late +=
                        behind.as_secs_f64().div_euclid(interval.as_secs_f64()) as u64 + 1;
                    break;
                }
                if next > now {
                    tokio::time::sleep_until(next.into()).await;
                }
                let t0 = next;
                next += interval;
                t0
            }
            None => {
                if now >= w.end {
                    break;
                }
                now
            }
        };
        id += 1;
        let r = tokio::time::timeout(t.timeout, s.call(&t, id)).await;
        let r = r.unwrap_or_else(|_| Err(anyhow!("no reply within {:?}", t.timeout)));
        if r.is_err() {
            s.conn.sender = None; // the connection may hold half a reply
        }
        let r = r.and_then(|(msg, at)| verify(&t, &msg).map(|()| at));
        if t0 < w.measure_from {
            continue;
        }
        match r {
            // Closed loop: calls that end in the window. Paced: every call scheduled in it.
            Ok(at) if at <= w.end || w.interval.is_some() => tally
                .latencies_us
                .push(at.duration_since(t0).as_micros() as u64),
            Ok(_) => {} // finished after the window
            Err(e) => {
                tally.errors += 1;
                if tally.samples.len() < 3 {
                    tally.samples.push(format!("{e:#}"));
                }
            }
        }
    }
    (tally, s)
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1] as f64 / 1000.0
}

fn target(a: &Args) -> anyhow::Result<Target> {
    let uri: Uri = a.url.parse().context("--url")?;
    if uri.scheme_str() != Some("http") {
        bail!("--url must be http://");
    }
    let authority = uri.authority().context("--url has no host")?.clone();
    let addr = format!(
        "{}:{}",
        authority.host(),
        authority.port_u16().unwrap_or(80)
    );
    let arguments: Value = serde_json::from_str(&a.args).context("--args is not JSON")?;
    if !arguments.is_object() {
        bail!("--args must be a JSON object");
    }
    let expect = match &a.expect {
        Some(e) => e.clone(),
        None => arguments
            .as_object()
            .and_then(|o| o.values().find_map(|v| v.as_str()))
            .unwrap_or_default()
            .to_owned(),
    };
    Ok(Target {
        addr,
        host: HeaderValue::from_str(authority.as_str())?,
        uri: uri
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/")
            .parse()?,
        era: a.era,
        tool_name: HeaderValue::from_str(&a.tool)?,
        tool: a.tool.clone(),
        arguments,
        expect,
        protocol_version: a.protocol_version.clone(),
        timeout: Duration::from_secs_f64(a.timeout),
    })
}

async fn run(a: Args) -> anyhow::Result<Value> {
    let t = Arc::new(target(&a)?);
    if a.sessions == 0 {
        bail!("--sessions must be at least 1");
    }
    let opened = futures::future::join_all((0..a.sessions).map(|_| {
        let t = Arc::clone(&t);
        async move { tokio::time::timeout(t.timeout, open_session(&t)).await }
    }))
    .await;
    let mut sessions = Vec::new();
    let mut failure = None;
    for s in opened {
        match s {
            Ok(Ok(s)) => sessions.push(s),
            Ok(Err(e)) => failure = Some(e),
            Err(_) => failure = Some(anyhow!("opening a session timed out")),
        }
    }
    if let Some(e) = failure {
        for s in sessions {
            s.close(&t).await;
        }
        return Err(e.context("opening sessions"));
    }
    let start = Instant::now();
    let measure_from = start + Duration::from_secs_f64(a.warmup);
    let w = Arc::new(Window {
        start,
        measure_from,
        end: measure_from + Duration::from_secs_f64(a.duration),
        interval: (a.rate > 0.0).then(|| Duration::from_secs_f64(a.sessions as f64 / a.rate)),
        sessions: a.sessions,
    });
    let marks = a.marks.then(|| {
        let w = Arc::clone(&w);
        tokio::spawn(async move {
            tokio::time::sleep_until(w.measure_from.into()).await;
            eprintln!("mcp-load: measuring");
            tokio::time::sleep_until(w.end.into()).await;
            eprintln!("mcp-load: measured");
            let mut line = String::new();
            let stdin = &mut tokio::io::BufReader::new(tokio::io::stdin());
            let _ = tokio::time::timeout(Duration::from_secs(30), stdin.read_line(&mut line)).await;
        })
    });
    let tasks: Vec<_> = sessions
        .into_iter()
        .enumerate()
        .map(|(i, s)| tokio::spawn(run_session(Arc::clone(&t), s, Arc::clone(&w), i)))
        .collect();
    let mut all = Tally::default();
    let mut open = Vec::new();
    for task in tasks {
        let (tally, s) = task.await?;
        open.push(s);
        all.latencies_us.extend(tally.latencies_us);
        all.errors += tally.errors;
        all.late += tally.late;
        all.samples.extend(tally.samples);
    }
    if let Some(marks) = marks {
        marks.await?; // paced sessions may stop just before the window closes
    }
    futures::future::join_all(open.into_iter().map(|s| {
        let t = Arc::clone(&t);
        async move { s.close(&t).await }
    }))
    .await;
    for s in all.samples.iter().take(5) {
        eprintln!("mcp-load: error: {s}");
    }
    all.latencies_us.sort_unstable();
    let l = &all.latencies_us;
    Ok(json!({
        "requests": l.len(),
        "errors": all.errors,
        "duration_s": a.duration,
        "rps": l.len() as f64 / a.duration,
        "p50_ms": percentile(l, 0.50),
        "p90_ms": percentile(l, 0.90),
        "p99_ms": percentile(l, 0.99),
        "max_ms": l.last().map(|&v| v as f64 / 1000.0).unwrap_or(0.0),
        "late": all.late,
    }))
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(a.threads.max(1))
        .enable_all()
        .build()?;
    match rt.block_on(run(a)) {
        Ok(out) => {
            println!("{out}");
            Ok(())
        }
        Err(e) => {
            eprintln!("mcp-load: {e:#}");
            std::process::exit(1);
        }
    }
}
