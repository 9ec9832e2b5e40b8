//! Why the proxy answered a request itself instead of with the upstream's response: one type
//! that says who failed, with the status, the code and the metric kind of each error in one
//! place, and [`ProxyError::into_response`], the one edge where it becomes an HTTP answer (in
//! the shared `{"error": {"code", "message"}}` shape).
//!
//! An upstream's own answers, 5xx included, are not errors here: they pass through unchanged
//! (the proxy only counts a 5xx, as [`UpstreamErrorKind::Status5xx`]).

use std::time::Duration;

use axum::{
    http::{HeaderValue, StatusCode, header},
    response::Response,
};

use super::sessions::MAX_SESSION_ID_LEN;
use crate::{
    auth::{AuthError, Refusal},
    http_error,
    metrics::UpstreamErrorKind,
};

/// Who failed (Pingora's `ErrorSource`): it decides how loudly we log and whether a backend
/// is blamed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The request cannot be served as sent (4xx).
    Client,
    /// The MCP server, or the lack of one that can answer (502/503/504).
    Upstream,
}

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The `/mcp` gate refused the request: no valid credential (401, with `challenge` as
    /// `WWW-Authenticate`), no grant (403) or over quota (429 + `Retry-After`).
    #[error("{error}")]
    Auth { error: AuthError, challenge: String },
    #[error("Origin {0:?} is not allowed to call MCP servers through this Switchboard")]
    OriginNotAllowed(HeaderValue),
    #[error("no tool with slug '{0}'")]
    ToolNotFound(String),
    #[error("Mcp-Session-Id must be 1-{MAX_SESSION_ID_LEN} visible ASCII characters")]
    InvalidSessionId,
    #[error("unknown or expired MCP session (or its deployment is gone): initialize a new session")]
    SessionNotFound,
    /// `/mcp/{slug}/@{id}` names a deployment that is not serving this tool here.
    #[error(
        "deployment '{id}' of tool '{slug}' is not serving here (it ended, is not RUNNING and \
         healthy, or runs on another node): use /mcp/{slug}"
    )]
    DeploymentNotServing { slug: String, id: String },
    /// A sub-path of a stdio tool: the bridge's other routes are Switchboard's own.
    #[error("tool '{0}' is a stdio server: its only endpoint is /mcp/{0}")]
    StdioSubPath(String),
    #[error("cannot forward this path: {0}")]
    InvalidPath(http::Error),
    #[error("request body is larger than the limit of {0} bytes")]
    BodyTooLarge(u64),
    /// The request body could not be read whole (the client went away or sent a broken body)
    /// where a tool filter needed to read it.
    #[error("could not read the request body: {0}")]
    RequestBodyFailed(String),
    /// A `tools/call` of a tool the caller may not call, on a transport whose answers come on
    /// another stream (2024-11-05 HTTP+SSE), so it cannot be a JSON-RPC error here.
    #[error("{0}")]
    ToolNotAllowed(String),
    /// No backend to send to: none running (`running == 0`), or all ejected by their breakers.
    #[error("{}", no_healthy_message(.slug, *.running))]
    NoHealthyDeployment { slug: String, running: usize },
    #[error("cannot connect to deployment {deployment} at {endpoint}")]
    UpstreamUnavailable {
        deployment: uuid::Uuid,
        endpoint: crate::runtime::Endpoint,
    },
    #[error("deployment {deployment} sent no response headers within {after:?} ({setting})")]
    UpstreamTimeout {
        deployment: uuid::Uuid,
        after: Duration,
        /// The setting that gave the limit.
        setting: &'static str,
    },
    #[error("deployment {deployment} failed the request: {source}")]
    UpstreamFailed {
        deployment: uuid::Uuid,
        source: hyper_util::client::legacy::Error,
    },
}

fn no_healthy_message(slug: &str, running: usize) -> String {
    match running {
        0 => format!("tool '{slug}' has no running deployment"),
        n => format!(
            "all {n} deployment(s) of tool '{slug}' are failing requests and are ejected for now"
        ),
    }
}

impl ProxyError {
    pub fn source(&self) -> Source {
        match self {
            ProxyError::Auth { .. }
            | ProxyError::OriginNotAllowed(_)
            | ProxyError::ToolNotFound(_)
            | ProxyError::InvalidSessionId
            | ProxyError::SessionNotFound
            | ProxyError::DeploymentNotServing { .. }
            | ProxyError::StdioSubPath(_)
            | ProxyError::InvalidPath(_)
            | ProxyError::BodyTooLarge(_)
            | ProxyError::RequestBodyFailed(_)
            | ProxyError::ToolNotAllowed(_) => Source::Client,
            ProxyError::NoHealthyDeployment { .. }
            | ProxyError::UpstreamUnavailable { .. }
            | ProxyError::UpstreamTimeout { .. }
            | ProxyError::UpstreamFailed { .. } => Source::Upstream,
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::Auth { error, .. } => match error.refusal() {
                Refusal::Unauthenticated => StatusCode::UNAUTHORIZED,
                Refusal::Forbidden => StatusCode::FORBIDDEN,
                Refusal::OverQuota => StatusCode::TOO_MANY_REQUESTS,
                Refusal::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            },
            ProxyError::OriginNotAllowed(_) | ProxyError::ToolNotAllowed(_) => {
                StatusCode::FORBIDDEN
            }
            ProxyError::ToolNotFound(_)
            | ProxyError::SessionNotFound
            | ProxyError::DeploymentNotServing { .. }
            | ProxyError::StdioSubPath(_) => StatusCode::NOT_FOUND,
            ProxyError::InvalidSessionId
            | ProxyError::InvalidPath(_)
            | ProxyError::RequestBodyFailed(_) => StatusCode::BAD_REQUEST,
            ProxyError::BodyTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ProxyError::NoHealthyDeployment { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::UpstreamUnavailable { .. } | ProxyError::UpstreamFailed { .. } => {
                StatusCode::BAD_GATEWAY
            }
            ProxyError::UpstreamTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// The stable, machine-readable code of the error body.
    pub fn code(&self) -> &'static str {
        match self {
            ProxyError::Auth { error, .. } => error.code(),
            ProxyError::OriginNotAllowed(_) => "origin_not_allowed",
            ProxyError::ToolNotFound(_) => "tool_not_found",
            ProxyError::InvalidSessionId => "invalid_session_id",
            ProxyError::SessionNotFound => "session_not_found",
            ProxyError::DeploymentNotServing { .. } => "deployment_not_serving",
            ProxyError::StdioSubPath(_) => "not_found",
            ProxyError::InvalidPath(_) => "invalid_path",
            ProxyError::BodyTooLarge(_) => "body_too_large",
            ProxyError::RequestBodyFailed(_) => "request_body_unreadable",
            ProxyError::ToolNotAllowed(_) => "tool_not_allowed",
            ProxyError::NoHealthyDeployment { .. } => "no_healthy_deployment",
            ProxyError::UpstreamUnavailable { .. } => "upstream_unavailable",
            ProxyError::UpstreamTimeout { .. } => "upstream_timeout",
            ProxyError::UpstreamFailed { .. } => "upstream_error",
        }
    }

    /// How `proxy_upstream_errors` counts it; `None` for errors that are no upstream's (and
    /// for a missing backend, which has no series to count on).
    pub fn metric_kind(&self) -> Option<UpstreamErrorKind> {
        match self {
            ProxyError::UpstreamUnavailable { .. } => Some(UpstreamErrorKind::Connect),
            ProxyError::UpstreamTimeout { .. } => Some(UpstreamErrorKind::Timeout),
            ProxyError::UpstreamFailed { .. } => Some(UpstreamErrorKind::Other),
            _ => None,
        }
    }

    /// The answer the client gets.
    pub fn into_response(self) -> Response {
        let (status, code, source) = (self.status(), self.code(), self.source());
        let message = self.to_string();
        if source == Source::Upstream {
            tracing::warn!(code, message = %message, "Request failed");
        } else {
            tracing::debug!(code, message = %message, "Request refused");
        }
        let mut resp = http_error::response(status, code, message);
        let h = resp.headers_mut();
        match self {
            ProxyError::NoHealthyDeployment { .. } => {
                // Ejections last a second at first: that is when trying again makes sense.
                h.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            ProxyError::Auth { error, challenge } => {
                if let Some(v) = error
                    .www_authenticate(&challenge)
                    .and_then(|c| HeaderValue::from_str(&c).ok())
                {
                    h.insert(header::WWW_AUTHENTICATE, v);
                }
                match &error {
                    AuthError::Quota(q) => {
                        h.insert(header::RETRY_AFTER, HeaderValue::from(q.retry_after_secs()));
                    }
                    _ if error.refusal() == Refusal::Unavailable => {
                        h.insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
                    }
                    _ => {}
                }
            }
            ProxyError::BodyTooLarge(_) | ProxyError::RequestBodyFailed(_) => {
                // The rest of the body was not read, so this connection cannot carry another
                // request: say so, or a client's pool reuses it and its next request fails
                // mid-flight (hyper's IncompleteMessage).
                h.insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            _ => {}
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_errors_are_4xx_and_upstream_errors_5xx() {
        let errors = [
            ProxyError::OriginNotAllowed(HeaderValue::from_static("http://evil")),
            ProxyError::ToolNotFound("t".into()),
            ProxyError::InvalidSessionId,
            ProxyError::SessionNotFound,
            ProxyError::DeploymentNotServing {
                slug: "t".into(),
                id: "d".into(),
            },
            ProxyError::StdioSubPath("t".into()),
            ProxyError::BodyTooLarge(1),
            ProxyError::NoHealthyDeployment {
                slug: "t".into(),
                running: 0,
            },
            ProxyError::UpstreamTimeout {
                deployment: uuid::Uuid::nil(),
                after: Duration::from_secs(1),
                setting: "proxy.header_timeout_ms",
            },
        ];
        for e in errors {
            let client = e.source() == Source::Client;
            assert_eq!(e.status().is_client_error(), client, "{e:?}");
            assert_eq!(e.status().is_server_error(), !client, "{e:?}");
            // Only upstream failures are counted against a backend.
            if client {
                assert_eq!(e.metric_kind(), None, "{e:?}");
            }
        }
    }

    #[test]
    fn no_healthy_deployment_says_when_to_retry() {
        let resp = ProxyError::NoHealthyDeployment {
            slug: "t".into(),
            running: 2,
        }
        .into_response();
        assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(resp.headers()[header::RETRY_AFTER], "1");
    }
}
