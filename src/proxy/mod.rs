//! The MCP-aware reverse proxy: `/mcp/{slug}` → the tool's MCP endpoint on one of its live
//! deployments, `/mcp/{slug}/{rest}` → `/{rest}` on it.
//!
//! Bodies stream both ways (hyper bodies are passed through, never collected), so SSE events
//! reach the client as the server writes them and a client that disconnects drops the upstream
//! request, which is how the 2026-07-28 protocol cancels. Only the first event of a legacy
//! HTTP+SSE GET stream is touched ([`sse`]).
//!
//! Per request: one lock-free table lookup ([`routes`]), a session-map lookup only when the
//! request carries a session id ([`sessions`]), no body buffering. Errors are
//! [`error::ProxyError`]s, which say who failed and become a response in one place.

pub mod connect;
pub mod error;
pub mod filter;
pub mod routes;
pub mod sessions;
pub mod sse;

use std::{
    future::Future as _,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use axum::{
    body::Body,
    extract::{ConnectInfo, Request},
    http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri, header},
    response::Response,
};
use bytes::Bytes;
use http_body::Frame;
use http_body_util::{BodyExt as _, Limited};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use tokio_util::sync::WaitForCancellationFutureOwned;

use self::{
    error::{ProxyError, Source},
    filter::{Matcher, ToolFilter, ToolsListFilter, Verdict},
    routes::{Backend, InFlight, RouteTable},
    sessions::{Lookup, Sessions, valid_session_id},
};
use crate::{
    audit::{self, Audit},
    auth::{Admission, AuthError, Gate, principal::Access, quota::Slot},
    mcp,
    metrics::UpstreamErrorKind,
};

/// Proxy settings; see the `[proxy]` section of the config.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    pub connect_timeout: Duration,
    /// Longest wait for the upstream's response headers (streams then run without a limit).
    pub header_timeout: Duration,
    /// Largest request body, counted as it streams.
    pub max_body_bytes: u64,
    /// Browser origins allowed to call `/mcp` (a request without `Origin` is always allowed).
    /// Entries are `scheme://host[:port]`; `:*` matches any port.
    pub allowed_origins: Vec<String>,
    pub session_idle: Duration,
    pub max_sessions: u64,
    /// A response stream on which the upstream sends nothing this long is closed. `None`:
    /// never (servers that send keep-alives, as rmcp does every 15 s, stay open anyway).
    pub stream_idle_timeout: Option<Duration>,
    /// Idle upstream connections are kept this long for reuse.
    pub upstream_idle_timeout: Duration,
    /// Share of proxied requests logged (0 to 1; 1 logs each once).
    pub access_log_sample: f64,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            connect_timeout: Duration::from_secs(5),
            header_timeout: Duration::from_secs(30),
            max_body_bytes: 4 * 1024 * 1024,
            allowed_origins: vec![
                "http://localhost:*".into(),
                "http://127.0.0.1:*".into(),
                "http://[::1]:*".into(),
            ],
            session_idle: Duration::from_secs(3600),
            max_sessions: 100_000,
            stream_idle_timeout: None,
            upstream_idle_timeout: Duration::from_secs(90),
            access_log_sample: 1.0,
        }
    }
}

type UpstreamBody = Limited<Body>;

pub struct Proxy {
    routes: Arc<RouteTable>,
    sessions: Sessions,
    client: Client<connect::Connector, UpstreamBody>,
    config: ProxyConfig,
    /// Who may call which tool; `None` admits everyone (as `[auth] mcp = "off"` does).
    gate: Option<Arc<Gate>>,
    /// Where each request is recorded; `None`: nowhere.
    audit: Option<Arc<Audit>>,
}

const MCP_SESSION_ID: HeaderName = mcp::SESSION_ID;
const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");

/// Hop-by-hop headers (RFC 9110 §7.6.1) plus the proxy ones; never forwarded either way.
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

fn strip_hop_by_hop(h: &mut HeaderMap) {
    // Headers named in `Connection` are hop-by-hop too.
    let named: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in named.iter().chain(HOP_BY_HOP.iter()) {
        h.remove(n);
    }
    h.remove("proxy-connection");
}

fn origin_allowed(allowed: &[String], origin: &str) -> bool {
    allowed.iter().any(|a| {
        if a == origin {
            return true;
        }
        match a.strip_suffix(":*") {
            Some(base) => origin.strip_prefix(base).is_some_and(|rest| {
                rest.is_empty()
                    || (rest.starts_with(':') && rest[1..].bytes().all(|b| b.is_ascii_digit()))
            }),
            None => false,
        }
    })
}

impl Proxy {
    pub fn new(routes: Arc<RouteTable>, config: ProxyConfig) -> Proxy {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(config.connect_timeout));
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(config.upstream_idle_timeout)
            .pool_max_idle_per_host(256)
            .build(connect::Connector::new(connector, Arc::clone(&routes)));
        Proxy {
            routes,
            sessions: Sessions::new(config.max_sessions, config.session_idle),
            client,
            config,
            gate: None,
            audit: None,
        }
    }

    /// Puts `/mcp` behind `gate`: every request is authenticated and admitted before routing.
    pub fn with_gate(mut self, gate: Arc<Gate>) -> Proxy {
        self.gate = Some(gate);
        self
    }

    /// Records every request in `audit`.
    pub fn with_audit(mut self, audit: Arc<Audit>) -> Proxy {
        self.audit = Some(audit);
        self
    }

    pub fn sessions(&self) -> &Sessions {
        &self.sessions
    }

    /// Handles a request whose path starts with `/mcp/`; `client` is the peer address, for
    /// `X-Forwarded-For`. A sampled share of requests (`access_log_sample`) is logged once,
    /// when the response headers are sent, at INFO under `switchboard::access`.
    pub async fn handle(&self, req: Request, client: Option<SocketAddr>) -> Response {
        let rate = self.config.access_log_sample;
        if rate <= 0.0
            || !tracing::enabled!(target: "switchboard::access", tracing::Level::INFO)
            || (rate < 1.0 && fastrand::f64() >= rate)
        {
            return self.route(req, client, &mut Seen::default()).await;
        }
        let started = std::time::Instant::now();
        let method = req.method().clone();
        let path = req.uri().path().to_owned();
        let mut seen = Seen::default();
        let resp = self.route(req, client, &mut seen).await;
        tracing::info!(
            target: "switchboard::access",
            request_id = resp
                .headers()
                .get(&X_REQUEST_ID)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("-"),
            %method,
            path,
            deployment = seen
                .deployment
                .map(|d| d.to_string())
                .unwrap_or_else(|| "-".into()),
            status = resp.status().as_u16(),
            duration_ms = started.elapsed().as_secs_f64() * 1000.0,
            "proxied"
        );
        resp
    }

    /// The one place a [`ProxyError`] becomes the client's answer.
    async fn route(&self, req: Request, client: Option<SocketAddr>, seen: &mut Seen) -> Response {
        let Some(audit) = &self.audit else {
            return self
                .try_route(req, client, seen)
                .await
                .unwrap_or_else(ProxyError::into_response);
        };
        let started = std::time::Instant::now();
        let time = chrono::Utc::now();
        let http_method = req.method().to_string();
        let tool = slug_of(req.uri().path()).to_owned();
        let mut upstream_failed = false;
        let resp = match self.try_route(req, client, seen).await {
            Ok(r) => r,
            Err(e) => {
                match &e {
                    ProxyError::Auth { error, .. } => {
                        seen.denied = true;
                        if seen.principal.is_none() {
                            seen.principal = refused_principal(error).map(str::to_owned);
                        }
                    }
                    ProxyError::ToolNotAllowed(_) => seen.denied = true,
                    e => upstream_failed = e.source() == Source::Upstream,
                }
                e.into_response()
            }
        };
        let outcome = if seen.denied {
            audit::Outcome::Denied
        } else if upstream_failed || resp.status().is_server_error() {
            audit::Outcome::UpstreamError
        } else {
            audit::Outcome::Allowed
        };
        audit.record(audit::Record {
            time,
            principal: seen.principal.take(),
            tool,
            http_method,
            method: seen.method.take(),
            mcp_tool: seen.mcp_tool.take(),
            outcome,
            status: resp.status().as_u16(),
            duration_ms: started.elapsed().as_secs_f64() * 1000.0,
            arguments: seen.arguments.take(),
        });
        resp
    }

    async fn try_route(
        &self,
        req: Request,
        client: Option<SocketAddr>,
        seen: &mut Seen,
    ) -> Result<Response, ProxyError> {
        let (parts, body) = req.into_parts();
        // A cheap (reference-counted) copy, so the slug and rest can borrow from it while
        // `parts` is rewritten for the upstream.
        let uri = parts.uri.clone();
        let path = uri.path();
        let slug = slug_of(path);
        let tail = &path[("/mcp/".len() + slug.len()).min(path.len())..];
        let mut rest = (!tail.is_empty()).then_some(tail);
        // `/mcp/{slug}/@{deployment}[/{rest}]`: one deployment's own address, through the
        // proxy (its record's `endpoint_url`).
        let mut pinned = None;
        if let Some(r) = rest.and_then(|r| r.strip_prefix("/@")) {
            let (id, tail) = match r.find('/') {
                Some(i) => (&r[..i], Some(&r[i..])),
                None => (r, None),
            };
            pinned = Some(id);
            rest = tail;
        }

        if let Some(origin) = parts.headers.get(header::ORIGIN) {
            let ok = origin
                .to_str()
                .is_ok_and(|o| origin_allowed(&self.config.allowed_origins, o));
            if !ok {
                return Err(ProxyError::OriginNotAllowed(origin.clone()));
            }
        }

        // Before the tool is looked up: without a credential, nothing about the tools shows.
        let admission = match &self.gate {
            None => None,
            Some(gate) => gate
                .admit(&parts.headers, &uri, slug)
                .await
                .map_err(|error| ProxyError::Auth {
                    challenge: gate.challenge(&parts.headers, &uri, slug),
                    error,
                })?,
        };

        let Some(tool) = self.routes.get(slug) else {
            return Err(ProxyError::ToolNotFound(slug.to_owned()));
        };

        // A session's requests go where the session was minted.
        let session = match parts.headers.get(MCP_SESSION_ID) {
            Some(v) if !valid_session_id(v.as_bytes()) => {
                return Err(ProxyError::InvalidSessionId);
            }
            Some(v) => v.to_str().ok().map(str::to_owned),
            None => legacy_session_param(&uri),
        };
        let principal = admission.as_ref().map(|a| a.principal.id.as_str());
        let backend = match (pinned, &session) {
            (Some(id), session) => {
                let not_serving = || ProxyError::DeploymentNotServing {
                    slug: slug.to_owned(),
                    id: id.to_owned(),
                };
                let id = uuid::Uuid::parse_str(id).map_err(|_| not_serving())?;
                let backend = tool.find(id).cloned().ok_or_else(not_serving)?;
                // A session lives on the deployment that minted it, pinned or not.
                if let Some(sid) = session {
                    match self.sessions.get(slug, sid, principal) {
                        Lookup::Found(d) if d != id => return Err(ProxyError::SessionNotFound),
                        Lookup::OtherPrincipal => return Err(ProxyError::SessionNotFound),
                        _ => {}
                    }
                }
                backend
            }
            (None, Some(id)) => match self.sessions.get(slug, id, principal) {
                Lookup::Found(d) => tool.find(d).cloned().ok_or(ProxyError::SessionNotFound)?,
                // A stdio bridge keeps its sessions when Switchboard restarts (it is adopted)
                // but this table does not: with one bridge, it is the only one that can own
                // the session, and it answers 404 itself when it does not. Not with client
                // keys: who opened the session is not known, so it cannot be checked.
                Lookup::Unknown
                    if admission.is_none()
                        && tool.backends.len() == 1
                        && tool.backends[0].is_stdio_bridge() =>
                {
                    Arc::clone(&tool.backends[0])
                }
                Lookup::Unknown | Lookup::OtherPrincipal => {
                    return Err(ProxyError::SessionNotFound);
                }
            },
            (None, None) => match tool.pick() {
                Some(b) => Arc::clone(b),
                None => {
                    return Err(ProxyError::NoHealthyDeployment {
                        slug: slug.to_owned(),
                        running: tool.backends.len(),
                    });
                }
            },
        };
        if rest.is_some() && backend.is_stdio_bridge() {
            // A stdio tool has one endpoint; the bridge's other routes (health, sessions) are
            // Switchboard's own and must not be reachable by MCP clients.
            return Err(ProxyError::StdioSubPath(slug.to_owned()));
        }
        seen.deployment = Some(backend.deployment);
        if self.audit.is_some() {
            seen.principal = admission.as_ref().map(|a| a.principal.id.clone());
        }
        self.forward(
            parts, body, slug, rest, session, backend, client, admission, seen,
        )
        .await
    }

    #[allow(clippy::too_many_arguments)]
    async fn forward(
        &self,
        mut parts: http::request::Parts,
        body: Body,
        slug: &str,
        rest: Option<&str>,
        session: Option<String>,
        backend: Arc<Backend>,
        client: Option<SocketAddr>,
        admission: Option<Admission>,
        seen: &mut Seen,
    ) -> Result<Response, ProxyError> {
        if let Some(len) = parts
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            && len > self.config.max_body_bytes
        {
            return Err(ProxyError::BodyTooLarge(self.config.max_body_bytes));
        }

        // Only a caller limited to some MCP tools, or a tool exposing only some, has its
        // bodies read; everyone else's stream through untouched.
        let filter = ToolFilter::new(
            admission
                .as_ref()
                .map_or(Access::Whole, |a| a.principal.grants.access(slug)),
            backend.expose_tools.as_ref(),
            admission.as_ref().map(|a| a.principal.id.as_str()),
        )
        .map(Arc::new);
        let mut body = body;
        let mut list_ids = Vec::new();
        let is_post = parts.method == Method::POST;
        let audit = self.audit.is_some();
        // The audit trail takes a modern request's method and tool from its routing headers
        // (which the server checks against the body) and reads the body only without them.
        let audit_body = audit
            && is_post
            && (backend.audit_arguments || !parts.headers.contains_key(mcp::METHOD));
        if audit && is_post && !audit_body {
            let header = |n: &HeaderName| {
                parts
                    .headers
                    .get(n)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned)
            };
            seen.method = header(&mcp::METHOD);
            if seen.method.as_deref() == Some("tools/call") {
                seen.mcp_tool = header(&mcp::NAME);
            }
        }
        if is_post && (filter.is_some() || audit_body) {
            let bytes = self.read_body(body).await?;
            let msg = serde_json::from_slice::<serde_json::Value>(&bytes).ok();
            if audit && let Some(m) = &msg {
                seen.note(m, backend.audit_arguments);
            }
            let verdict = match &filter {
                Some(f) => f.inspect(msg.as_ref()),
                None => Verdict::Forward { list_ids: vec![] },
            };
            match verdict {
                Verdict::Forward { list_ids: ids } => list_ids = ids,
                Verdict::Refuse { answer, .. } => {
                    seen.denied = true;
                    // The 2024-11-05 transport answers on its GET stream, not this POST.
                    if !parts.headers.contains_key(MCP_SESSION_ID)
                        && legacy_session_param(&parts.uri).is_some()
                    {
                        let message = answer
                            .pointer("/error/message")
                            .or_else(|| answer.pointer("/0/error/message"))
                            .and_then(serde_json::Value::as_str)
                            .unwrap_or("this MCP tool may not be called");
                        return Err(ProxyError::ToolNotAllowed(message.to_owned()));
                    }
                    return Ok(json_answer(&answer));
                }
            }
            body = Body::from(bytes);
        }

        let path = rest.unwrap_or(&backend.endpoint_path);
        let pq = match parts.uri.query() {
            Some(q) => format!("{path}?{q}"),
            None => path.to_owned(),
        };
        let uri = Uri::builder()
            .scheme("http")
            .authority(backend.authority.clone())
            .path_and_query(pq)
            .build()
            .map_err(ProxyError::InvalidPath)?;

        let client_ip = client
            .or_else(|| {
                parts
                    .extensions
                    .get::<ConnectInfo<SocketAddr>>()
                    .map(|c| c.0)
            })
            .map(|a| a.ip());
        let original_host = parts.headers.remove(header::HOST);
        // Kept (a reference count) for the 401 should the credential be revoked mid-request.
        let host_seen = original_host.clone();
        let h = &mut parts.headers;
        strip_hop_by_hop(h);
        // Only the proxy says who is calling a stdio bridge; a client cannot.
        h.remove(&crate::stdio::PRINCIPAL);
        if backend.is_stdio_bridge()
            && let Some(a) = &admission
            && let Ok(v) = HeaderValue::from_str(&a.principal.id)
        {
            h.insert(crate::stdio::PRINCIPAL, v);
        }
        if admission.is_some() && !backend.forward_credentials {
            // The credential is Switchboard's, not the server's: it leaves here only for a
            // tool that asked for it.
            h.remove(header::AUTHORIZATION);
        }
        if let Some(ip) = client_ip {
            let xff = match h.get(&X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
                Some(prev) => format!("{prev}, {ip}"),
                None => ip.to_string(),
            };
            if let Ok(v) = HeaderValue::from_str(&xff) {
                h.insert(X_FORWARDED_FOR, v);
            }
        }
        if let Some(host) = original_host.or_else(|| {
            parts
                .uri
                .authority()
                .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        }) {
            h.insert(X_FORWARDED_HOST, host);
        }
        h.insert(X_FORWARDED_PROTO, HeaderValue::from_static("http"));
        // A request id needs to be unique, not unguessable: fastrand (no syscall) rather than
        // a v4 UUID (one getrandom(2) per request).
        if h.get(&X_REQUEST_ID).is_none_or(|v| v.len() > 128)
            && let Ok(v) = HeaderValue::from_str(&format!("{:032x}", fastrand::u128(..)))
        {
            h.insert(X_REQUEST_ID, v);
        }
        let request_id = h.get(&X_REQUEST_ID).cloned();
        let method = parts.method.clone();
        parts.uri = uri;
        parts.version = http::Version::HTTP_11;
        let upstream_req = http::Request::from_parts(
            parts,
            Limited::new(body, self.config.max_body_bytes as usize),
        );

        let mut in_flight = backend.track();
        let started = backend.metrics.as_ref().map(|_| std::time::Instant::now());
        let method_ix = crate::metrics::method_index(&method);
        let observe = |status: StatusCode, error_kind: Option<UpstreamErrorKind>| {
            if let (Some(m), Some(t)) = (&backend.metrics, started) {
                m.observe(method_ix, status, t.elapsed().as_secs_f64());
                if let Some(k) = error_kind {
                    m.upstream_error(k);
                }
            }
        };
        let header_timeout = backend.call_timeout.unwrap_or(self.config.header_timeout);
        let request = tokio::time::timeout(header_timeout, self.client.request(upstream_req));
        // A revoked credential ends the request at once, even while the server works on it.
        let revoked = async {
            match &admission {
                Some(a) => a.revoked.cancelled().await,
                None => std::future::pending().await,
            }
        };
        let answered = tokio::select! {
            biased;
            () = revoked => {
                let id = admission.as_ref().map(|a| a.principal.id.clone()).unwrap_or_default();
                return Err(ProxyError::Auth {
                    challenge: match &self.gate {
                        Some(g) => {
                            let mut h = HeaderMap::new();
                            if let Some(host) = host_seen {
                                h.insert(header::HOST, host);
                            }
                            g.challenge(&h, &Uri::default(), slug)
                        }
                        None => String::new(),
                    },
                    error: AuthError::Revoked { id },
                });
            }
            r = request => r,
        };
        let outcome = match answered {
            Err(_) => Err(ProxyError::UpstreamTimeout {
                deployment: backend.deployment,
                after: header_timeout,
                setting: if backend.call_timeout.is_some() {
                    "the tool's call_timeout_ms"
                } else {
                    "proxy.header_timeout_ms"
                },
            }),
            Ok(Err(e)) => Err(self.request_failed(e, &backend)),
            Ok(Ok(r)) => Ok(r),
        };
        let resp = match outcome {
            Err(e) => {
                if e.source() == Source::Upstream {
                    self.record_failure(&backend);
                }
                observe(e.status(), e.metric_kind());
                return Err(e);
            }
            Ok(r) => {
                if r.status().is_server_error() {
                    self.record_failure(&backend);
                    observe(r.status(), Some(UpstreamErrorKind::Status5xx));
                } else {
                    backend.record(true);
                    observe(r.status(), None);
                }
                r
            }
        };

        let (mut rparts, rbody) = resp.into_parts();
        strip_hop_by_hop(&mut rparts.headers);
        if let Some(id) = request_id {
            rparts.headers.entry(X_REQUEST_ID).or_insert(id);
        }
        match &session {
            None => {
                if let Some(minted) = rparts
                    .headers
                    .get(MCP_SESSION_ID)
                    .and_then(|v| v.to_str().ok())
                    && valid_session_id(minted.as_bytes())
                {
                    self.sessions.insert(
                        slug,
                        minted,
                        backend.deployment,
                        admission.as_ref().map(|a| a.principal.id.as_str()),
                    );
                }
            }
            Some(id) => {
                let ended = (method == Method::DELETE && rparts.status.is_success())
                    || rparts.status == StatusCode::NOT_FOUND;
                if ended {
                    self.sessions.remove(slug, id);
                }
            }
        }

        let is_sse = rparts
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("text/event-stream"));
        if is_sse {
            in_flight.mark_stream();
        }
        let owner = admission.as_ref().map(|a| a.principal.id.clone());
        let body = Tracked {
            inner: rbody,
            _in_flight: in_flight,
            revoked: admission.map(|a| (a.slot, Box::pin(a.revoked.cancelled_owned()))),
            idle: self
                .config
                .stream_idle_timeout
                .map(|d| (d, Box::pin(tokio::time::sleep(d)))),
        };
        let body = if is_sse && method == Method::GET && session.is_none() {
            let prefix = format!("/mcp/{slug}");
            let (sessions, slug, dep) =
                (self.sessions.clone(), slug.to_owned(), backend.deployment);
            Body::new(sse::EndpointRewrite::new(
                body,
                prefix,
                Box::new(move |sid| sessions.insert(&slug, sid, dep, owner.as_deref())),
            ))
        } else {
            Body::new(body)
        };
        let is_json = rparts
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/json"));
        let matcher = match &filter {
            Some(_) if method == Method::GET && is_sse => Some(Matcher::AnyToolsList),
            Some(_) if !list_ids.is_empty() && (is_sse || is_json) => Some(Matcher::Ids(list_ids)),
            _ => None,
        };
        let body = match (filter, matcher) {
            (Some(f), Some(m)) => {
                rparts.headers.remove(header::CONTENT_LENGTH);
                Body::new(ToolsListFilter::new(body, f, m, is_sse))
            }
            _ => body,
        };
        Ok(Response::from_parts(rparts, body))
    }

    /// Reads a request body whole (a tool filter needs to see it), within `max_body_bytes`.
    async fn read_body(&self, body: Body) -> Result<Bytes, ProxyError> {
        match Limited::new(body, self.config.max_body_bytes as usize)
            .collect()
            .await
        {
            Ok(b) => Ok(b.to_bytes()),
            Err(e) if e.is::<http_body_util::LengthLimitError>() => {
                Err(ProxyError::BodyTooLarge(self.config.max_body_bytes))
            }
            Err(e) => Err(ProxyError::RequestBodyFailed(e.to_string())),
        }
    }

    fn record_failure(&self, backend: &Backend) {
        if backend.record(false) {
            tracing::warn!(
                deployment = %backend.deployment,
                failures = routes::EJECT_AFTER,
                "Deployment failing requests; ejected from balancing for now"
            );
        }
    }

    /// What a failed upstream request was: a request body that went over the limit while
    /// streaming is the client's fault, not the upstream's.
    fn request_failed(
        &self,
        e: hyper_util::client::legacy::Error,
        backend: &Backend,
    ) -> ProxyError {
        let mut src: Option<&(dyn std::error::Error + 'static)> = Some(&e);
        while let Some(s) = src {
            if s.is::<http_body_util::LengthLimitError>() {
                return ProxyError::BodyTooLarge(self.config.max_body_bytes);
            }
            src = s.source();
        }
        if e.is_connect() {
            ProxyError::UpstreamUnavailable {
                deployment: backend.deployment,
                endpoint: backend.endpoint.clone(),
            }
        } else {
            ProxyError::UpstreamFailed {
                deployment: backend.deployment,
                source: e,
            }
        }
    }
}

/// The principal a refusal names, when the credential was valid enough to name one.
fn refused_principal(e: &AuthError) -> Option<&str> {
    match e {
        AuthError::Forbidden { principal, .. } => Some(principal),
        AuthError::Expired { id } | AuthError::Revoked { id } => Some(id),
        _ => None,
    }
}

/// The slug of a `/mcp/{slug}[/...]` path.
fn slug_of(path: &str) -> &str {
    let after = &path["/mcp/".len().min(path.len())..];
    after.split('/').next().unwrap_or(after)
}

/// What the proxy learnt about a request on its way, for the access log and the audit trail.
#[derive(Debug, Default)]
pub struct Seen {
    deployment: Option<uuid::Uuid>,
    principal: Option<String>,
    method: Option<String>,
    mcp_tool: Option<String>,
    arguments: Option<serde_json::Value>,
    /// Refused by Switchboard (the gate or the tool filter).
    denied: bool,
}

impl Seen {
    /// Notes the JSON-RPC method (and the MCP tool of a `tools/call`, with its arguments when
    /// the tool opts in) of a POST body.
    fn note(&mut self, msg: &serde_json::Value, arguments: bool) {
        if msg.is_array() {
            self.method = Some("batch".to_owned());
            return;
        }
        let Some(m) = mcp::jsonrpc::Message::parse(msg) else {
            return;
        };
        self.method = m.method().map(str::to_owned);
        if let mcp::jsonrpc::Message::Request {
            method: "tools/call",
            params: Some(p),
            ..
        } = m
        {
            self.mcp_tool = p.get("name").and_then(|n| n.as_str()).map(str::to_owned);
            if arguments {
                self.arguments = p.get("arguments").cloned();
            }
        }
    }
}

/// A JSON-RPC message the proxy answers itself, as a server answers a POST with JSON.
fn json_answer(msg: &serde_json::Value) -> Response {
    let mut resp = Response::new(Body::from(msg.to_string()));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

/// The legacy HTTP+SSE transport carries its session in the POST URL's `sessionId` parameter.
fn legacy_session_param(uri: &Uri) -> Option<String> {
    uri.query()?
        .split('&')
        .find_map(|kv| kv.strip_prefix("sessionId="))
        .filter(|s| valid_session_id(s.as_bytes()))
        .map(str::to_owned)
}

/// The upstream response body, holding the backend's in-flight count until it ends or the
/// client goes away (dropping it closes the upstream request), and ending it when the
/// upstream sends nothing for the idle limit.
struct Tracked {
    inner: hyper::body::Incoming,
    _in_flight: InFlight,
    /// The principal's in-flight slot, held as long as the body, and its revocation: a
    /// revoked credential ends the stream (cleanly, so an SSE client reconnects and meets a
    /// 401).
    revoked: Option<(Slot, Pin<Box<WaitForCancellationFutureOwned>>)>,
    idle: Option<(Duration, Pin<Box<tokio::time::Sleep>>)>,
}

#[derive(Debug, thiserror::Error)]
enum StreamError {
    #[error(transparent)]
    Upstream(#[from] hyper::Error),
    #[error("the upstream sent nothing for {0:?}; stream closed")]
    Idle(Duration),
}

impl http_body::Body for Tracked {
    type Data = Bytes;
    type Error = StreamError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, StreamError>>> {
        let this = &mut *self;
        if let Some((_, revoked)) = &mut this.revoked
            && revoked.as_mut().poll(cx).is_ready()
        {
            return Poll::Ready(None);
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                if let Some((limit, sleep)) = &mut this.idle {
                    sleep.as_mut().reset(tokio::time::Instant::now() + *limit);
                }
                Poll::Ready(frame.map(|f| f.map_err(StreamError::from)))
            }
            Poll::Pending => {
                if let Some((limit, sleep)) = &mut this.idle
                    && sleep.as_mut().poll(cx).is_ready()
                {
                    return Poll::Ready(Some(Err(StreamError::Idle(*limit))));
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_match_with_port_wildcards() {
        let allowed = ProxyConfig::default().allowed_origins;
        assert!(origin_allowed(&allowed, "http://localhost:3000"));
        assert!(origin_allowed(&allowed, "http://localhost"));
        assert!(origin_allowed(&allowed, "http://127.0.0.1:8080"));
        assert!(!origin_allowed(&allowed, "http://localhost.evil.com"));
        assert!(!origin_allowed(&allowed, "http://localhost:80.evil.com"));
        assert!(!origin_allowed(&allowed, "https://evil.com"));
        assert!(!origin_allowed(&allowed, "null"));
        assert!(origin_allowed(
            &["https://app.example.com".into()],
            "https://app.example.com"
        ));
    }

    #[test]
    fn hop_by_hop_headers_go() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("close, x-secret-hop"),
        );
        h.insert("x-secret-hop", HeaderValue::from_static("1"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert("mcp-session-id", HeaderValue::from_static("s"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("mcp-session-id"));
    }
}
