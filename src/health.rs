//! MCP-level health probes.
//!
//! A TCP connect or a `GET /mcp` says nothing about an MCP server (healthy servers answer GET
//! with 400 or 405), so a probe is a real MCP exchange, following the spec's era rule:
//! first the modern (2026-07-28) `server/discover`; on anything that is not a valid discover
//! result, the legacy handshake (`initialize`, `notifications/initialized`, `ping`), after which
//! the probe DELETEs the session it created, because every `initialize` costs the server state.
//!
//! A server that fails both but opens a GET stream with an `endpoint` event speaks the
//! deprecated HTTP+SSE transport (2024-11-05) and is healthy too.
//!
//! The probe is hand-written over reqwest rather than done with rmcp's client because it must see
//! the raw HTTP status and body to apply the fallback rule (rmcp's Auto mode accepts a bogus `{}`
//! discover result from some legacy servers as modern) and must never call a tool.

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use futures_util::StreamExt as _;
use reqwest::{StatusCode, header::HeaderMap};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use utoipa::ToSchema;

pub use crate::mcp::Era;
use crate::{
    deployment::HealthStatus,
    mcp::{self, jsonrpc, jsonrpc::Message, sse},
};

/// A probe reply larger than this is not a health answer.
const MAX_REPLY_BYTES: usize = 1 << 20;

/// What a plain health endpoint may say about the server behind it (all optional).
#[derive(Debug, Default, Deserialize)]
struct PlainHealth {
    era: Option<Era>,
    protocol_version: Option<String>,
    server_name: Option<String>,
    server_version: Option<String>,
}

/// The outcome of one health check.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct HealthCheckResult {
    pub status: HealthStatus,
    pub era: Option<Era>,
    pub protocol_version: Option<String>,
    pub server_name: Option<String>,
    pub server_version: Option<String>,
    pub latency_ms: f64,
    pub error: Option<String>,
    pub checked_at: DateTime<Utc>,
}

#[derive(Debug, thiserror::Error)]
enum ProbeError {
    #[error("connection failed: {0}")]
    Connect(String),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("{0}")]
    Protocol(String),
}

impl ProbeError {
    fn from_reqwest(e: reqwest::Error, timeout: Duration) -> ProbeError {
        if e.is_timeout() {
            ProbeError::Timeout(timeout)
        } else if e.is_connect() {
            // The source chain says "Connection refused" and the like; the top level does not.
            let mut msg = e.to_string();
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                msg = s.to_string();
                src = s.source();
            }
            ProbeError::Connect(msg)
        } else {
            ProbeError::Protocol(e.to_string())
        }
    }
}

struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    /// The JSON-RPC response whose id matched ours, if one came.
    message: Option<Value>,
}

struct Success {
    era: Era,
    protocol_version: Option<String>,
    server_name: Option<String>,
    server_version: Option<String>,
}

/// Sends MCP health probes. Cheap to clone; share one per process.
#[derive(Clone, Debug)]
pub struct Prober {
    client: reqwest::Client,
    /// Unit tests' seam: scripted answers instead of HTTP, so the supervisor's tests need no
    /// server (real probes are tested against real servers in `tests/`).
    #[cfg(test)]
    script: Option<HealthScript>,
}

/// The answers a scripted [`Prober`] gives: healthy or not, as the test sets it, counting the
/// checks so a test can wait for the next one.
#[cfg(test)]
#[derive(Clone, Debug)]
pub struct HealthScript {
    healthy: std::sync::Arc<std::sync::atomic::AtomicBool>,
    checks: tokio::sync::watch::Sender<usize>,
}

#[cfg(test)]
impl HealthScript {
    pub fn new(healthy: bool) -> HealthScript {
        HealthScript {
            healthy: std::sync::Arc::new(healthy.into()),
            checks: tokio::sync::watch::Sender::new(0),
        }
    }

    pub fn set_healthy(&self, healthy: bool) {
        self.healthy
            .store(healthy, std::sync::atomic::Ordering::SeqCst);
    }

    /// How many checks have been answered.
    pub fn checks(&self) -> usize {
        *self.checks.borrow()
    }

    /// Resolves once `n` checks have been answered.
    pub async fn wait_checks(&self, n: usize) {
        let mut rx = self.checks.subscribe();
        let _ = rx.wait_for(|c| *c >= n).await;
    }

    fn answer(&self) -> HealthCheckResult {
        self.checks.send_modify(|c| *c += 1);
        let healthy = self.healthy.load(std::sync::atomic::Ordering::SeqCst);
        HealthCheckResult {
            status: if healthy {
                HealthStatus::Healthy
            } else {
                HealthStatus::Unhealthy
            },
            era: None,
            protocol_version: None,
            server_name: None,
            server_version: None,
            latency_ms: 0.0,
            error: (!healthy).then(|| "scripted failure".to_owned()),
            checked_at: Utc::now(),
        }
    }
}

impl Default for Prober {
    fn default() -> Self {
        Self::new()
    }
}

impl Prober {
    pub fn new() -> Prober {
        let client = reqwest::Client::builder()
            // Probes go to loopback servers we started; an HTTP_PROXY in the environment must
            // not capture them.
            .no_proxy()
            .connect_timeout(Duration::from_secs(2))
            .pool_idle_timeout(Duration::from_secs(30))
            .user_agent(concat!("switchboard/", env!("CARGO_PKG_VERSION")))
            .build()
            .unwrap_or_default();
        Prober {
            client,
            #[cfg(test)]
            script: None,
        }
    }

    /// A prober that answers as `script` says, without HTTP.
    #[cfg(test)]
    pub fn scripted(script: HealthScript) -> Prober {
        Prober {
            client: reqwest::Client::new(),
            script: Some(script),
        }
    }

    /// A prober whose every connection goes to the Unix socket at `path` (a stdio
    /// deployment's bridge); URLs then only name the path.
    pub fn unix(path: &std::path::Path) -> Prober {
        let client = crate::stdio::bridge_client(path).unwrap_or_default();
        Prober {
            client,
            #[cfg(test)]
            script: None,
        }
    }

    /// One full check of the MCP endpoint at `url`, bounded by `timeout` per request.
    pub async fn check(&self, url: &str, timeout: Duration) -> HealthCheckResult {
        let started = Instant::now();
        let outcome = self.probe(url, timeout).await;
        let latency_ms = started.elapsed().as_secs_f64() * 1000.0;
        let checked_at = Utc::now();
        match outcome {
            Ok(s) => HealthCheckResult {
                status: HealthStatus::Healthy,
                era: Some(s.era),
                protocol_version: s.protocol_version,
                server_name: s.server_name,
                server_version: s.server_version,
                latency_ms,
                error: None,
                checked_at,
            },
            Err(e) => HealthCheckResult {
                status: HealthStatus::Unhealthy,
                era: None,
                protocol_version: None,
                server_name: None,
                server_version: None,
                latency_ms,
                error: Some(e.to_string()),
                checked_at,
            },
        }
    }

    /// A check bounded as a whole by `timeout`: the MCP probe at `url`, or a plain GET of
    /// `plain_url` (2xx is healthy) when the tool names an HTTP health path.
    pub async fn check_within(
        &self,
        url: &str,
        plain_url: Option<&str>,
        timeout: Duration,
    ) -> HealthCheckResult {
        #[cfg(test)]
        if let Some(script) = &self.script {
            return script.answer();
        }
        let started = Instant::now();
        let run = async {
            match plain_url {
                None => self.check(url, timeout).await,
                Some(plain) => self.check_plain(plain, timeout).await,
            }
        };
        match tokio::time::timeout(timeout, run).await {
            Ok(r) => r,
            Err(_) => HealthCheckResult {
                status: HealthStatus::Unhealthy,
                era: None,
                protocol_version: None,
                server_name: None,
                server_version: None,
                latency_ms: started.elapsed().as_secs_f64() * 1000.0,
                error: Some(format!("no answer within {} ms", timeout.as_millis())),
                checked_at: Utc::now(),
            },
        }
    }

    async fn check_plain(&self, url: &str, timeout: Duration) -> HealthCheckResult {
        let started = Instant::now();
        let outcome = self.client.get(url).timeout(timeout).send().await;
        let (error, about) = match outcome {
            // A JSON body may say what answered (the stdio bridge's does); any other body is
            // fine too.
            Ok(r) if r.status().is_success() => (None, r.json::<PlainHealth>().await.ok()),
            Ok(r) => (Some(format!("GET {url} answered {}", r.status())), None),
            Err(e) => (Some(format!("GET {url} failed: {e}")), None),
        };
        let about = about.unwrap_or_default();
        HealthCheckResult {
            status: if error.is_none() {
                HealthStatus::Healthy
            } else {
                HealthStatus::Unhealthy
            },
            era: about.era,
            protocol_version: about.protocol_version,
            server_name: about.server_name,
            server_version: about.server_version,
            latency_ms: started.elapsed().as_secs_f64() * 1000.0,
            error,
            checked_at: Utc::now(),
        }
    }

    async fn probe(&self, url: &str, timeout: Duration) -> Result<Success, ProbeError> {
        match self.modern(url, timeout).await {
            Ok(s) => return Ok(s),
            // Nothing listens: no point trying the other era.
            Err(e @ ProbeError::Connect(_)) => return Err(e),
            Err(e) => tracing::trace!(%url, error = %e, "Modern probe failed; trying legacy"),
        }
        match self.legacy(url, timeout).await {
            Ok(s) => Ok(s),
            Err(e @ ProbeError::Connect(_)) => Err(e),
            Err(e) => self.legacy_sse(url, timeout).await.map_err(|sse| {
                tracing::trace!(%url, error = %sse, "HTTP+SSE probe failed too");
                e
            }),
        }
    }

    /// The HTTP+SSE transport: healthy when a GET stream opens with an `endpoint` event.
    async fn legacy_sse(&self, url: &str, timeout: Duration) -> Result<Success, ProbeError> {
        let fut = async {
            let resp = self
                .client
                .get(url)
                .header("accept", "text/event-stream")
                .send()
                .await
                .map_err(|e| ProbeError::from_reqwest(e, timeout))?;
            if !resp.status().is_success() {
                return Err(ProbeError::Protocol(format!(
                    "GET answered HTTP {}",
                    resp.status()
                )));
            }
            let mut parser = sse::Parser::new();
            let mut stream = resp.bytes_stream();
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.map_err(|e| ProbeError::Protocol(e.to_string()))?;
                if let (_, Some(event)) = parser.next_event(&chunk) {
                    if event.event == "endpoint" {
                        return Ok(Success {
                            era: Era::LegacySse,
                            protocol_version: Some(mcp::HTTP_SSE_VERSION.to_owned()),
                            server_name: None,
                            server_version: None,
                        });
                    }
                    return Err(ProbeError::Protocol(
                        "the GET stream did not open with an endpoint event".into(),
                    ));
                }
                if parser.buffered() > MAX_REPLY_BYTES {
                    break;
                }
            }
            Err(ProbeError::Protocol(
                "the GET stream ended before an endpoint event".into(),
            ))
        };
        tokio::time::timeout(timeout, fut)
            .await
            .map_err(|_| ProbeError::Timeout(timeout))?
    }

    async fn modern(&self, url: &str, timeout: Duration) -> Result<Success, ProbeError> {
        let body = jsonrpc::request(
            1,
            "server/discover",
            json!({"_meta": mcp::modern_meta(CLIENT_NAME)}),
        );
        let reply = self
            .rpc(
                url,
                &body,
                &[
                    (mcp::PROTOCOL_VERSION, mcp::MODERN_VERSION),
                    (mcp::METHOD, "server/discover"),
                ],
                timeout,
            )
            .await?;
        let result = expect_result(&reply, "server/discover")?;
        let versions = result
            .get("supportedVersions")
            .and_then(Value::as_array)
            .ok_or_else(|| {
                ProbeError::Protocol("server/discover result has no supportedVersions".into())
            })?;
        let version = if versions.iter().any(|v| v == mcp::MODERN_VERSION) {
            Some(mcp::MODERN_VERSION.to_owned())
        } else {
            versions.first().and_then(Value::as_str).map(str::to_owned)
        };
        let (server_name, server_version) = mcp::server_info(result);
        Ok(Success {
            era: Era::Modern,
            protocol_version: version,
            server_name,
            server_version,
        })
    }

    async fn legacy(&self, url: &str, timeout: Duration) -> Result<Success, ProbeError> {
        let init = jsonrpc::request(
            1,
            "initialize",
            json!({
                "protocolVersion": mcp::LEGACY_VERSION,
                "capabilities": {},
                "clientInfo": {"name": CLIENT_NAME, "version": env!("CARGO_PKG_VERSION")},
            }),
        );
        let reply = self.rpc(url, &init, &[], timeout).await?;
        let result = expect_result(&reply, "initialize")?;
        let version = result
            .get("protocolVersion")
            .and_then(Value::as_str)
            .ok_or_else(|| ProbeError::Protocol("initialize result has no protocolVersion".into()))?
            .to_owned();
        let (server_name, server_version) = mcp::server_info(result);
        let success = Success {
            era: Era::Legacy,
            protocol_version: Some(version.clone()),
            server_name,
            server_version,
        };
        let session = reply
            .headers
            .get(mcp::SESSION_ID)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let mut headers = vec![(mcp::PROTOCOL_VERSION, version.as_str())];
        if let Some(s) = &session {
            headers.push((mcp::SESSION_ID, s));
        }
        let outcome = async {
            let initialized = jsonrpc::notification("notifications/initialized");
            let r = self.rpc(url, &initialized, &headers, timeout).await?;
            if !r.status.is_success() {
                return Err(ProbeError::Protocol(format!(
                    "notifications/initialized answered HTTP {}",
                    r.status
                )));
            }
            let ping = jsonrpc::request(2, "ping", json!({}));
            let r = self.rpc(url, &ping, &headers, timeout).await?;
            expect_result(&r, "ping")?;
            Ok(())
        }
        .await;
        if let Some(s) = &session {
            // Best effort: a server that keeps sessions forever should not pay for our probes.
            let _ = self
                .client
                .delete(url)
                .header(mcp::SESSION_ID, s)
                .header(mcp::PROTOCOL_VERSION, &version)
                .timeout(timeout)
                .send()
                .await;
        }
        outcome.map(|()| success)
    }

    /// POSTs one JSON-RPC message and reads the reply (JSON or SSE) until the response with the
    /// same id arrives; the rest of an SSE stream is not read.
    async fn rpc(
        &self,
        url: &str,
        body: &Value,
        headers: &[(reqwest::header::HeaderName, &str)],
        timeout: Duration,
    ) -> Result<Reply, ProbeError> {
        let fut = async {
            let mut req = self
                .client
                .post(url)
                .header("content-type", "application/json")
                .header("accept", "application/json, text/event-stream")
                .json(body);
            for (k, v) in headers {
                req = req.header(k, *v);
            }
            let resp = req
                .send()
                .await
                .map_err(|e| ProbeError::from_reqwest(e, timeout))?;
            let status = resp.status();
            let headers = resp.headers().clone();
            let is_sse = headers
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.starts_with("text/event-stream"));
            let id = body.get("id").cloned();
            let message = if is_sse {
                read_sse_response(resp, id.as_ref()).await?
            } else {
                let bytes = read_capped(resp).await?;
                if bytes.is_empty() {
                    None
                } else {
                    serde_json::from_slice::<Value>(&bytes).ok()
                }
            };
            Ok(Reply {
                status,
                headers,
                message,
            })
        };
        tokio::time::timeout(timeout, fut)
            .await
            .map_err(|_| ProbeError::Timeout(timeout))?
    }
}

/// How probes name their client in `initialize` and `_meta`.
const CLIENT_NAME: &str = "switchboard-health";

fn expect_result<'a>(reply: &'a Reply, method: &str) -> Result<&'a Value, ProbeError> {
    let outcome = match reply.message.as_ref().and_then(Message::parse) {
        Some(Message::Response { outcome, .. }) => outcome,
        _ => {
            return Err(ProbeError::Protocol(format!(
                "{method} answered HTTP {} with no JSON-RPC response",
                reply.status
            )));
        }
    };
    if let Err(err) = outcome {
        return Err(ProbeError::Protocol(format!(
            "{method} answered HTTP {} with JSON-RPC error {}",
            reply.status, err
        )));
    }
    if !reply.status.is_success() {
        return Err(ProbeError::Protocol(format!(
            "{method} answered HTTP {}",
            reply.status
        )));
    }
    outcome
        .ok()
        .filter(|r| r.is_object())
        .ok_or_else(|| ProbeError::Protocol(format!("{method} response has no result object")))
}

async fn read_capped(resp: reqwest::Response) -> Result<Vec<u8>, ProbeError> {
    let mut out = Vec::new();
    let mut stream = resp.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| ProbeError::Protocol(e.to_string()))?;
        if out.len() + chunk.len() > MAX_REPLY_BYTES {
            return Err(ProbeError::Protocol("reply larger than 1 MiB".into()));
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

/// Reads SSE events until one carries the JSON-RPC response with `id` (any response when
/// `id` is `None`).
async fn read_sse_response(
    resp: reqwest::Response,
    id: Option<&Value>,
) -> Result<Option<Value>, ProbeError> {
    let mut parser = sse::Parser::new();
    let mut stream = resp.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| ProbeError::Protocol(e.to_string()))?;
        for event in parser.feed(&chunk) {
            if let Some(msg) = response_in(&event, id) {
                // A stateless server ends the stream right after the response: read to the
                // end (briefly) so the connection goes back to the pool instead of being
                // dropped and reconnected for every probe.
                let _ = tokio::time::timeout(Duration::from_millis(20), async {
                    while let Some(Ok(_)) = stream.next().await {}
                })
                .await;
                return Ok(Some(msg));
            }
        }
        if parser.buffered() > MAX_REPLY_BYTES {
            return Err(ProbeError::Protocol("reply larger than 1 MiB".into()));
        }
    }
    Ok(None)
}

/// The JSON-RPC response to `id` an SSE event carries, if it carries one.
fn response_in(event: &sse::Event, id: Option<&Value>) -> Option<Value> {
    let msg: Value = serde_json::from_str(&event.data).ok()?;
    let matches = match (Message::parse(&msg)?, id) {
        (m @ Message::Response { .. }, Some(id)) => m.response_to(id).is_some(),
        (Message::Response { .. }, None) => true,
        _ => false,
    };
    matches.then_some(msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn events(raw: &[u8]) -> Vec<sse::Event> {
        sse::Parser::new().feed(raw)
    }

    #[test]
    fn the_response_is_found_after_a_priming_event() {
        let raw =
            b"data: \nid: 0\nretry: 3000\n\ndata: {\"jsonrpc\":\"2.0\",\"id\":1,\"result\":{}}\n\n";
        let ev = events(raw);
        assert_eq!(ev.len(), 2);
        assert!(
            response_in(&ev[0], Some(&json!(1))).is_none(),
            "priming event has no message"
        );
        assert_eq!(response_in(&ev[1], Some(&json!(1))).unwrap()["id"], 1);
        assert!(
            response_in(&ev[1], Some(&json!(2))).is_none(),
            "another request's response"
        );
    }

    #[test]
    fn crlf_and_multi_line_data_parse() {
        let raw = b"event: message\r\ndata: {\"id\":2,\r\ndata: \"result\":{}}\r\n\r\n";
        let ev = events(raw);
        assert_eq!(response_in(&ev[0], Some(&json!(2))).unwrap()["id"], 2);
    }

    #[test]
    fn notifications_and_requests_are_not_the_response() {
        let raw = b"data: {\"jsonrpc\":\"2.0\",\"method\":\"notifications/message\"}\n\ndata: {\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"roots/list\"}\n\n";
        for ev in events(raw) {
            assert!(response_in(&ev, Some(&json!(1))).is_none(), "{ev:?}");
        }
    }
}
