//! The REST API, JSON under `/api/v1`.
//!
//! ```text
//! GET    /healthz                               liveness of Switchboard itself (no auth)
//! GET    /metrics                               Prometheus metrics (OpenMetrics text)
//! GET    /api/v1/openapi.json                   this API, generated from the handlers below
//! GET    /api/v1/tools                          list tools
//! POST   /api/v1/tools                          register a tool (201)
//! GET    /api/v1/tools/{slug}                   one tool
//! PUT    /api/v1/tools/{slug}                   replace a tool's definition
//! DELETE /api/v1/tools/{slug}                   delete (409 while it has live deployments)
//! POST   /api/v1/apply                          create or update many tools (the config file's form)
//! POST   /api/v1/tools/{slug}/deployments       one more deployment (201; ?wait=true answers once settled)
//! POST   /api/v1/tools/{slug}/scale             set the replica count and converge ({"replicas": N}; ?wait=true)
//! GET    /api/v1/deployments                    list (?tool=SLUG&status=RUNNING,STARTING&node=ID&limit=N&offset=M)
//! GET    /api/v1/deployments/{id}               one deployment
//! POST   /api/v1/deployments/{id}/stop          stop (idempotent)
//! POST   /api/v1/deployments/{id}/health        run a health check now
//! GET    /api/v1/deployments/{id}/stats         CPU, memory, fds, uptime, request counts
//! GET    /api/v1/deployments/{id}/sessions      a stdio deployment's MCP sessions and processes
//! GET    /api/v1/deployments/{id}/logs          output (?tail=N, ?follow=true streams new lines)
//! GET    /api/v1/events                         status and health transitions (SSE; ?tool=SLUG)
//! GET    /api/v1/keys                           list client keys for /mcp (never the keys)
//! POST   /api/v1/keys                           make a client key (201; the key is shown once)
//! GET    /api/v1/keys/{id}                      one client key
//! DELETE /api/v1/keys/{id}                      revoke (what the key has open ends at once)
//! GET    /api/v1/audit                          the /mcp audit trail (?principal=&tool=&since=&limit=)
//! GET    /.well-known/oauth-protected-resource/mcp/{slug}
//!                                               RFC 9728 metadata of a tool's MCP endpoint (no auth)
//! ```
//!
//! `/mcp/{slug}[/{rest}]` (MCP traffic, not behind the token) never reaches this router: the
//! server hands it to the proxy first.
//!
//! Handlers are thin: they parse, call the [`Manager`], and map its errors through
//! [`error::ApiError`]. Routes and the OpenAPI document come from the same `routes!` calls, so
//! the document cannot drift from the router.

pub mod error;

use std::sync::Arc;

use axum::{
    Json, Router,
    extract::{Path, State},
    http::{HeaderMap, StatusCode, header},
    middleware::{self, Next},
    response::{IntoResponse, Response},
};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq as _;
use utoipa::{IntoParams, OpenApi, ToSchema};
use utoipa_axum::{router::OpenApiRouter, routes};
use uuid::Uuid;

use self::error::{ApiError, Body, ErrorBody, ErrorDetail, Query};
use crate::{
    auth::{
        Keys,
        keys::{ClientKey, CreatedKey, NewKey},
        metadata,
    },
    deployment::{Deployment, DeploymentStatus},
    events::Event,
    health::HealthCheckResult,
    manager::Manager,
    registry::{ApplyOutcome, Tool, ToolSpec},
    store::DeploymentFilter,
};

/// The bearer token, kept only as a digest so comparison is constant-time whatever the length.
#[derive(Clone)]
pub struct ApiToken([u8; 32]);

impl ApiToken {
    pub fn new(token: &str) -> ApiToken {
        ApiToken(Sha256::digest(token.as_bytes()).into())
    }
    fn matches(&self, presented: &str) -> bool {
        let d: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        bool::from(self.0.ct_eq(&d))
    }
}

impl std::fmt::Debug for ApiToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiToken(<redacted>)")
    }
}

#[derive(Clone)]
pub struct AppState {
    pub manager: Arc<Manager>,
    pub token: Option<ApiToken>,
    pub keys: Arc<Keys>,
    pub audit: Arc<crate::audit::Audit>,
    /// `[auth.oauth] issuer`, which the Protected Resource Metadata names.
    pub oauth_issuer: Option<String>,
}

#[derive(OpenApi)]
#[openapi(
    info(title = "Switchboard", description = "MCP server manager API"),
    components(schemas(ErrorBody))
)]
struct ApiDoc;

/// The whole HTTP surface of Switchboard's control plane.
pub fn router(state: AppState) -> Router {
    let (api, mut doc) = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(list_tools, create_tool))
        .routes(routes!(get_tool, update_tool, delete_tool))
        .routes(routes!(apply_tools))
        .routes(routes!(deploy))
        .routes(routes!(scale_tool))
        .routes(routes!(list_deployments))
        .routes(routes!(get_deployment))
        .routes(routes!(stop_deployment))
        .routes(routes!(check_health))
        .routes(routes!(deployment_stats))
        .routes(routes!(deployment_sessions))
        .routes(routes!(deployment_logs))
        .routes(routes!(events))
        .routes(routes!(list_keys, create_key))
        .routes(routes!(get_key, revoke_key))
        .routes(routes!(audit_trail))
        .split_for_parts();
    error::document_common_errors(&mut doc);
    let doc = Arc::new(doc);
    let api = api
        .route("/metrics", axum::routing::get(metrics))
        .route(
            "/api/v1/openapi.json",
            axum::routing::get(move || {
                let doc = Arc::clone(&doc);
                async move { Json(doc.as_ref().clone()) }
            }),
        )
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token));
    Router::new()
        .route("/healthz", axum::routing::get(healthz))
        .route(
            &format!("{}/mcp/{{slug}}", metadata::WELL_KNOWN),
            axum::routing::get(resource_metadata),
        )
        .merge(api)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(
            panic_response,
        ))
}

async fn require_token(
    State(state): State<AppState>,
    headers: HeaderMap,
    req: axum::extract::Request,
    next: Next,
) -> Response {
    let Some(token) = &state.token else {
        return next.run(req).await;
    };
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match presented {
        Some(p) if token.matches(p.trim()) => next.run(req).await,
        _ => {
            let mut resp = ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "missing or wrong API token: send 'Authorization: Bearer <token>' (the switchboard \
                 CLI sends --token or SWITCHBOARD_TOKEN; the server's token is SWITCHBOARD_TOKEN \
                 or api_token_file)",
            )
            .into_response();
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
            resp
        }
    }
}

fn panic_response(_: Box<dyn std::any::Any + Send + 'static>) -> Response {
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal",
        "internal error (this is a bug in Switchboard; its log has details)",
    )
    .into_response()
}

/// Prometheus metrics, behind the API token like the API: OpenMetrics text when the client
/// asks for it (Prometheus does), the classic text format otherwise.
async fn metrics(State(s): State<AppState>, headers: HeaderMap) -> Result<Response, ApiError> {
    let Some(m) = s.manager.metrics() else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "metrics_off",
            "metrics are turned off ([server] metrics = false)",
        ));
    };
    s.manager.refresh_metrics().await;
    let open_metrics = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("application/openmetrics-text"));
    Ok(if open_metrics {
        (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            m.encode(),
        )
            .into_response()
    } else {
        (
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            m.encode_prometheus(),
        )
            .into_response()
    })
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this route does not accept that method",
    )
}

#[derive(Serialize)]
struct Healthz {
    /// `ok`, or `degraded` when the store cannot be reached (deployments keep serving traffic;
    /// changes are refused until it is back).
    status: &'static str,
    /// `ok` or `unavailable`.
    store: &'static str,
    /// Which backend: sqlite, postgres or mysql.
    backend: &'static str,
    version: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    store_error: Option<String>,
}

/// Always 200 while the process serves: a database outage is reported, not turned into a
/// liveness failure that would get a healthy proxy restarted.
async fn healthz(State(s): State<AppState>) -> Json<Healthz> {
    let store = s.manager.store();
    let ping = store.ping().await;
    Json(Healthz {
        status: if ping.is_ok() { "ok" } else { "degraded" },
        store: if ping.is_ok() { "ok" } else { "unavailable" },
        backend: store.backend(),
        version: env!("CARGO_PKG_VERSION"),
        store_error: ping.err().map(|e| e.to_string()),
    })
}

// ----- tools -----

#[utoipa::path(get, path = "/api/v1/tools", tag = "tools",
    responses((status = 200, body = Vec<Tool>)))]
async fn list_tools(State(s): State<AppState>) -> Result<Json<Vec<Tool>>, ApiError> {
    Ok(Json(
        s.manager
            .list_tools()
            .await?
            .into_iter()
            .map(|t| t.redacted(s.manager.public_url()))
            .collect(),
    ))
}

#[utoipa::path(post, path = "/api/v1/tools", tag = "tools", request_body = ToolSpec,
    responses((status = 201, body = Tool), (status = 409, body = ErrorBody),
              (status = 422, body = ErrorBody)))]
async fn create_tool(
    State(s): State<AppState>,
    Body(spec): Body<ToolSpec>,
) -> Result<(StatusCode, Json<Tool>), ApiError> {
    Ok((
        StatusCode::CREATED,
        Json(
            s.manager
                .create_tool(spec)
                .await?
                .redacted(s.manager.public_url()),
        ),
    ))
}

#[utoipa::path(get, path = "/api/v1/tools/{slug}", tag = "tools",
    params(("slug" = String, Path)),
    responses((status = 200, body = Tool), (status = 404, body = ErrorBody)))]
async fn get_tool(
    State(s): State<AppState>,
    Path(slug): Path<String>,
) -> Result<Json<Tool>, ApiError> {
    Ok(Json(
        s.manager
            .get_tool(&slug)
            .await?
            .redacted(s.manager.public_url()),
    ))
}

/// The body may omit `slug`; when present it must equal the one in the path. A tool as GET
/// shows it may be sent back as it is: the fields the server sets (`id`, `created_at`,
/// `updated_at`, `url`) are ignored, and secrets shown as `********` keep their stored values.
/// A new `transport` or `runtime` is refused (409 `transport_change_with_live_deployments`,
/// `runtime_change_with_live_deployments`) while the tool has live deployments.
#[utoipa::path(put, path = "/api/v1/tools/{slug}", tag = "tools", request_body = ToolSpec,
    params(("slug" = String, Path)),
    responses((status = 200, body = Tool), (status = 404, body = ErrorBody),
              (status = 409, body = ErrorBody,
               description = "transport_change_with_live_deployments or runtime_change_with_live_deployments: stop the tool's live deployments first"),
              (status = 422, body = ErrorBody)))]
async fn update_tool(
    State(s): State<AppState>,
    Path(slug): Path<String>,
    Body(mut body): Body<serde_json::Value>,
) -> Result<Json<Tool>, ApiError> {
    // Read, edit, write back: what GET adds to a definition is not part of it.
    if let Some(fields) = body.as_object_mut() {
        for shown_only in ["id", "created_at", "updated_at", "url"] {
            fields.remove(shown_only);
        }
    }
    let mut spec: ToolSpec = serde_json::from_value(body).map_err(|e| {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_body",
            format!("Failed to deserialize the JSON body into the target type: {e}"),
        )
    })?;
    if spec.slug.is_empty() {
        spec.slug = slug.clone();
    } else if spec.slug != slug {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_tool",
            format!(
                "slug: the body says '{}' but the URL says '{slug}'; a slug cannot be renamed",
                spec.slug
            ),
        ));
    }
    Ok(Json(
        s.manager
            .update_tool(spec)
            .await?
            .redacted(s.manager.public_url()),
    ))
}

/// Tool definitions in the config file's `[[tools]]` form.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct ApplyRequest {
    tools: Vec<ToolSpec>,
}

#[derive(Serialize, Deserialize, ToSchema)]
pub struct ApplyResponse {
    /// One per tool of the request, in its order.
    pub results: Vec<ApplyResult>,
}

/// What happened to one tool: `outcome` when it was applied, `error` when it was not.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct ApplyResult {
    pub slug: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outcome: Option<ApplyOutcome>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorDetail>,
}

/// Creates the tools that do not exist and updates those whose definition differs, each on
/// its own (secrets sent back as `********` keep their values). The answer is 200 with each
/// tool's outcome; a tool that could not be applied (`invalid_tool`,
/// `transport_change_with_live_deployments`, ...) carries the error, and the others are
/// applied all the same.
#[utoipa::path(post, path = "/api/v1/apply", tag = "tools", request_body = ApplyRequest,
    responses((status = 200, body = ApplyResponse), (status = 422, body = ErrorBody)))]
async fn apply_tools(
    State(s): State<AppState>,
    Body(req): Body<ApplyRequest>,
) -> Json<ApplyResponse> {
    let mut results = Vec::with_capacity(req.tools.len());
    for spec in req.tools {
        let slug = spec.slug.clone();
        let (outcome, error) = match s.manager.apply_tool(spec).await {
            Ok((outcome, _)) => (Some(outcome), None),
            Err(e) => {
                let e = ApiError::from(e);
                let detail = ErrorDetail {
                    code: e.code.to_owned(),
                    message: e.message,
                };
                (None, Some(detail))
            }
        };
        results.push(ApplyResult {
            slug,
            outcome,
            error,
        });
    }
    Json(ApplyResponse { results })
}

#[utoipa::path(delete, path = "/api/v1/tools/{slug}", tag = "tools",
    params(("slug" = String, Path)),
    responses((status = 204), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn delete_tool(
    State(s): State<AppState>,
    Path(slug): Path<String>,
) -> Result<StatusCode, ApiError> {
    s.manager.delete_tool(&slug).await?;
    Ok(StatusCode::NO_CONTENT)
}

// ----- deployments -----

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
struct WaitParams {
    /// Answer only once every deployment concerned has settled: RUNNING, ended (FAILED), or
    /// its start failed and a restart is scheduled (`restart_count` > 0, the reason in
    /// `last_exit`).
    #[serde(default)]
    wait: bool,
    /// With `wait`: answer after this long (at most 3600000) even if a deployment is still
    /// STARTING for the first time (`restart_count` 0).
    timeout_ms: Option<u64>,
}

impl WaitParams {
    /// `None`: do not wait; `Some(None)`: wait with no time limit.
    fn wait(&self) -> Result<Option<Option<std::time::Duration>>, ApiError> {
        if let Some(ms) = self.timeout_ms {
            if !self.wait {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_query",
                    "timeout_ms needs wait=true",
                ));
            }
            if ms > 3_600_000 {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_query",
                    "timeout_ms must be at most 3600000",
                ));
            }
        }
        Ok(self
            .wait
            .then(|| self.timeout_ms.map(std::time::Duration::from_millis)))
    }
}

/// Starts one more deployment of the tool, whatever its `replicas` says (`scale` brings a
/// tool to its count).
#[utoipa::path(post, path = "/api/v1/tools/{slug}/deployments", tag = "deployments",
    params(("slug" = String, Path), WaitParams),
    responses((status = 201, body = Deployment), (status = 400, body = ErrorBody),
              (status = 404, body = ErrorBody),
              (status = 409, body = ErrorBody, description = "`secrets_unreadable`: the \
               tool's secret_env values do not decrypt with this Switchboard's secret key \
               (the message names them); restore the key or set new values. \
               `limits_unenforceable`: the tool has limits this host cannot enforce (the \
               message names the missing cgroup controller); limits are never ignored"),
              (status = 422, body = ErrorBody), (status = 503, description = "`ports_exhausted` (no free port in the range), `runtime_unavailable` (the tool's runtime is disabled or its engine, such as dockerd, does not answer), `store_unavailable` or `shutting_down`", body = ErrorBody)))]
async fn deploy(
    State(s): State<AppState>,
    Path(slug): Path<String>,
    Query(p): Query<WaitParams>,
) -> Result<(StatusCode, Json<Deployment>), ApiError> {
    let d = match p.wait()? {
        Some(timeout) => s.manager.deploy_and_wait(&slug, timeout).await?,
        None => s.manager.deploy(&slug).await?,
    };
    Ok((StatusCode::CREATED, Json(d)))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct ScaleRequest {
    /// The tool's new replica count (0-64), stored in its definition; deployments are
    /// started or stopped (gracefully: those not RUNNING first, then the newest) to match.
    /// Absent: keep the count and only start what is missing (what `switchboard deploy`
    /// does; it never stops anything).
    replicas: Option<u32>,
}

/// Brings the tool to `replicas` live deployments on this node.
#[utoipa::path(post, path = "/api/v1/tools/{slug}/scale", tag = "tools",
    request_body = ScaleRequest, params(("slug" = String, Path), WaitParams),
    responses((status = 200, body = crate::manager::Scaled), (status = 400, body = ErrorBody),
              (status = 404, body = ErrorBody),
              (status = 409, body = ErrorBody, description = "`secrets_unreadable`: \
               deployments are to be started and the tool's secret_env values do not \
               decrypt with this Switchboard's secret key. `limits_unenforceable`: the \
               tool has limits this host cannot enforce (the message names the missing \
               cgroup controller)"),
              (status = 415, body = ErrorBody), (status = 422, body = ErrorBody),
              (status = 503, description = "`ports_exhausted` (no free port in the range), `runtime_unavailable` (the tool's runtime is disabled or its engine, such as dockerd, does not answer), `store_unavailable` or `shutting_down`", body = ErrorBody)))]
async fn scale_tool(
    State(s): State<AppState>,
    Path(slug): Path<String>,
    Query(p): Query<WaitParams>,
    Body(req): Body<ScaleRequest>,
) -> Result<Json<crate::manager::Scaled>, ApiError> {
    Ok(Json(s.manager.scale(&slug, req.replicas, p.wait()?).await?))
}

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
struct ListParams {
    /// Only deployments of this tool.
    tool: Option<String>,
    /// Comma-separated statuses, e.g. `STARTING,RUNNING`.
    status: Option<String>,
    /// Only deployments run by this node.
    node: Option<String>,
    /// At most this many (1-10000), oldest first.
    limit: Option<u32>,
    /// Skip this many first.
    offset: Option<u32>,
}

#[utoipa::path(get, path = "/api/v1/deployments", tag = "deployments", params(ListParams),
    responses((status = 200, body = Vec<Deployment>), (status = 400, body = ErrorBody)))]
async fn list_deployments(
    State(s): State<AppState>,
    Query(p): Query<ListParams>,
) -> Result<Json<Vec<Deployment>>, ApiError> {
    let statuses = match p.status.as_deref() {
        None | Some("") => Vec::new(),
        Some(list) => list
            .split(',')
            .map(|s| s.parse::<DeploymentStatus>())
            .collect::<Result<_, _>>()
            .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_query", e.to_string()))?,
    };
    if p.limit.is_some_and(|l| !(1..=10_000).contains(&l)) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_query",
            "limit must be between 1 and 10000",
        ));
    }
    let filter = DeploymentFilter {
        tool_slug: p.tool,
        node_id: p.node,
        limit: p.limit,
        offset: p.offset,
        statuses,
    };
    Ok(Json(s.manager.list_deployments(&filter).await?))
}

fn parse_id(id: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(id).map_err(|_| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "deployment_not_found",
            format!("no deployment with id '{id}' (ids are UUIDs)"),
        )
    })
}

#[utoipa::path(get, path = "/api/v1/deployments/{id}", tag = "deployments",
    params(("id" = String, Path)),
    responses((status = 200, body = Deployment), (status = 404, body = ErrorBody)))]
async fn get_deployment(
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Deployment>, ApiError> {
    Ok(Json(s.manager.get_deployment(parse_id(&id)?).await?))
}

#[utoipa::path(post, path = "/api/v1/deployments/{id}/stop", tag = "deployments",
    params(("id" = String, Path)),
    responses((status = 200, body = Deployment), (status = 404, body = ErrorBody)))]
async fn stop_deployment(
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Deployment>, ApiError> {
    Ok(Json(s.manager.stop(parse_id(&id)?).await?))
}

/// The check runs outside the deployment's schedule and does not count toward its thresholds.
#[utoipa::path(post, path = "/api/v1/deployments/{id}/health", tag = "deployments",
    params(("id" = String, Path)),
    responses((status = 200, body = HealthCheckResult), (status = 404, body = ErrorBody),
              (status = 409, body = ErrorBody)))]
async fn check_health(
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<HealthCheckResult>, ApiError> {
    Ok(Json(s.manager.check_now(parse_id(&id)?).await?))
}

#[utoipa::path(get, path = "/api/v1/deployments/{id}/stats", tag = "deployments",
    params(("id" = String, Path)),
    responses((status = 200, body = crate::metrics::DeploymentStats),
              (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn deployment_stats(
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<crate::metrics::DeploymentStats>, ApiError> {
    Ok(Json(s.manager.stats(parse_id(&id)?).await?))
}

/// A stdio deployment's open legacy sessions (each with its own server process) and every
/// server process its bridge runs.
#[utoipa::path(get, path = "/api/v1/deployments/{id}/sessions", tag = "deployments",
    params(("id" = String, Path)),
    responses((status = 200, body = crate::stdio::BridgeSessions),
              (status = 404, body = ErrorBody), (status = 409, body = ErrorBody),
              (status = 502, body = ErrorBody)))]
async fn deployment_sessions(
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<crate::stdio::BridgeSessions>, ApiError> {
    Ok(Json(s.manager.stdio_sessions(parse_id(&id)?).await?))
}

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
struct LogParams {
    /// Lines from the end to start with (default 100, at most 100000).
    tail: Option<usize>,
    /// Keep the response open and send new output as it is written, until the deployment
    /// has ended and its output is all sent.
    #[serde(default)]
    follow: bool,
}

/// The deployment's stdout and stderr as plain text.
#[utoipa::path(get, path = "/api/v1/deployments/{id}/logs", tag = "deployments",
    params(("id" = String, Path), LogParams),
    responses((status = 200, content_type = "text/plain", body = String),
              (status = 404, body = ErrorBody)))]
async fn deployment_logs(
    State(s): State<AppState>,
    Path(id): Path<String>,
    Query(p): Query<LogParams>,
) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    let lines = p.tail.unwrap_or(100).min(100_000);
    let output = s.manager.logs(id, lines, p.follow).await?;
    let headers = [
        (header::CONTENT_TYPE, "text/plain; charset=utf-8"),
        (header::CACHE_CONTROL, "no-cache"),
    ];
    Ok((headers, axum::body::Body::from_stream(output)).into_response())
}

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
struct EventParams {
    /// Only this tool's events.
    tool: Option<String>,
}

/// A server-sent event stream: one `transition` event (JSON [`Event`]) per status or health
/// change, as it happens; a `lagged` event (data: how many were missed) if this client reads
/// too slowly; a comment every 15 s so idle proxies keep the stream open.
#[utoipa::path(get, path = "/api/v1/events", tag = "events", params(EventParams),
    responses((status = 200, content_type = "text/event-stream", body = Event)))]
async fn events(
    State(s): State<AppState>,
    Query(p): Query<EventParams>,
) -> axum::response::sse::Sse<
    impl futures_util::Stream<Item = Result<axum::response::sse::Event, std::convert::Infallible>>,
> {
    use axum::response::sse::{Event as Sse, KeepAlive};
    use tokio::sync::broadcast::error::RecvError;
    let rx = s.manager.events().subscribe();
    let stream = futures_util::stream::unfold((rx, p.tool), |(mut rx, tool)| async move {
        loop {
            let item = match rx.recv().await {
                Ok(ev) if tool.as_ref().is_some_and(|t| *t != ev.tool) => continue,
                Ok(ev) => Sse::default()
                    .event("transition")
                    .json_data(&ev)
                    .unwrap_or_else(|_| Sse::default().comment("unencodable event")),
                Err(RecvError::Lagged(n)) => Sse::default().event("lagged").data(n.to_string()),
                Err(RecvError::Closed) => return None,
            };
            return Some((Ok(item), (rx, tool)));
        }
    });
    axum::response::sse::Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(std::time::Duration::from_secs(15)))
}

// ----- client keys -----

#[utoipa::path(get, path = "/api/v1/keys", tag = "keys",
    responses((status = 200, body = Vec<ClientKey>)))]
async fn list_keys(State(s): State<AppState>) -> Result<Json<Vec<ClientKey>>, ApiError> {
    Ok(Json(s.keys.list().await?))
}

/// The answer carries the key itself, this once; Switchboard keeps only its SHA-256 digest.
#[utoipa::path(post, path = "/api/v1/keys", tag = "keys", request_body = NewKey,
    responses((status = 201, body = CreatedKey),
              (status = 422, body = ErrorBody,
               description = "`invalid_key_request`: a field is out of range or a grant is malformed")))]
async fn create_key(
    State(s): State<AppState>,
    Body(req): Body<NewKey>,
) -> Result<(StatusCode, Json<CreatedKey>), ApiError> {
    Ok((StatusCode::CREATED, Json(s.keys.create(req).await?)))
}

#[utoipa::path(get, path = "/api/v1/keys/{id}", tag = "keys",
    params(("id" = String, Path)),
    responses((status = 200, body = ClientKey), (status = 404, body = ErrorBody)))]
async fn get_key(
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<ClientKey>, ApiError> {
    Ok(Json(s.keys.get(&id).await?))
}

/// Revokes the key (idempotent): the next request with it is refused, and requests and
/// streams it has open end now. The record stays, with `revoked_at`.
#[utoipa::path(delete, path = "/api/v1/keys/{id}", tag = "keys",
    params(("id" = String, Path)),
    responses((status = 204), (status = 404, body = ErrorBody)))]
async fn revoke_key(
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    s.keys.revoke(&id).await?;
    Ok(StatusCode::NO_CONTENT)
}

// ----- audit trail -----

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
struct AuditParams {
    /// Only requests of this principal (a key id).
    principal: Option<String>,
    /// Only requests to this tool (slug).
    tool: Option<String>,
    /// Only requests at or after this time (RFC 3339, e.g. `2026-12-04T13:00:00Z`).
    #[param(value_type = Option<String>, format = DateTime)]
    since: Option<chrono::DateTime<chrono::Utc>>,
    /// At most this many, the newest (1-10000, default 100); returned oldest first.
    limit: Option<u32>,
}

/// The `/mcp` audit trail: one record per MCP request, newest `limit` that match, oldest
/// first. Records are written off the request path, so the last moment's may not show yet.
#[utoipa::path(get, path = "/api/v1/audit", tag = "audit", params(AuditParams),
    responses((status = 200, body = Vec<crate::audit::Record>), (status = 400, body = ErrorBody)))]
async fn audit_trail(
    State(s): State<AppState>,
    Query(p): Query<AuditParams>,
) -> Result<Json<Vec<crate::audit::Record>>, ApiError> {
    let limit = p.limit.unwrap_or(100);
    if !(1..=10_000).contains(&limit) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_query",
            "limit must be between 1 and 10000",
        ));
    }
    let filter = crate::audit::Filter {
        principal: p.principal,
        tool: p.tool,
        since: p.since,
        limit: limit as usize,
    };
    s.audit.query(filter).await.map(Json).map_err(|e| {
        tracing::error!(error = %e, "Reading the audit trail failed");
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "audit_unreadable",
            e.to_string(),
        )
    })
}

/// RFC 9728 Protected Resource Metadata of a tool's MCP endpoint, which a 401 on `/mcp/{slug}`
/// names in `WWW-Authenticate`. Public, like the 401 that points at it.
async fn resource_metadata(
    State(s): State<AppState>,
    Path(slug): Path<String>,
    headers: HeaderMap,
    uri: axum::http::Uri,
) -> Result<Json<metadata::ResourceMetadata>, ApiError> {
    if !crate::registry::is_valid_slug(&slug) {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("'{slug}' is not a tool slug"),
        ));
    }
    let base = metadata::base_url(&headers, &uri, s.manager.public_url());
    Ok(Json(metadata::document(
        &base,
        &slug,
        s.oauth_issuer.as_deref(),
    )))
}
