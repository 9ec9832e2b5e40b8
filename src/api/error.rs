//! The API's errors in the one error shape ([`crate::http_error`]), and the extractors that
//! turn every client mistake into it (axum's own rejections are plain text).

use axum::{
    Json,
    extract::{FromRequest, FromRequestParts, Request, rejection::JsonRejection},
    http::{StatusCode, header, request::Parts},
    response::{IntoResponse, Response},
};
use serde::de::DeserializeOwned;

pub use crate::http_error::{ErrorBody, ErrorDetail};
use crate::{
    auth::keys::KeyError, http_error, manager::ManagerError, registry::SpecError, store::StoreError,
};

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::warn!(code = self.code, message = %self.message, "Request failed");
        }
        let mut resp = http_error::response(self.status, self.code, self.message);
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from_static("5"));
        }
        resp
    }
}

impl From<ManagerError> for ApiError {
    fn from(e: ManagerError) -> ApiError {
        use ManagerError as M;
        let msg = e.to_string();
        let (status, code) = match &e {
            M::ToolNotFound(_) => (StatusCode::NOT_FOUND, "tool_not_found"),
            M::DeploymentNotFound(_) => (StatusCode::NOT_FOUND, "deployment_not_found"),
            M::ToolExists(_) => (StatusCode::CONFLICT, "tool_exists"),
            M::ToolInUse { .. } => (StatusCode::CONFLICT, "tool_in_use"),
            M::Spec(SpecError::Invalid { .. }) => {
                (StatusCode::UNPROCESSABLE_ENTITY, "invalid_tool")
            }
            M::PortsExhausted(_) => (StatusCode::SERVICE_UNAVAILABLE, "ports_exhausted"),
            M::Store(StoreError::Conflict(_)) => (StatusCode::CONFLICT, "conflict"),
            M::Store(StoreError::Corrupt(_)) => {
                (StatusCode::INTERNAL_SERVER_ERROR, "store_corrupt")
            }
            M::Store(StoreError::Seal(_)) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
            M::Secrets(_) => (StatusCode::CONFLICT, "secrets_unreadable"),
            M::Store(_) => (StatusCode::SERVICE_UNAVAILABLE, "store_unavailable"),
            M::Stop { .. } => (StatusCode::INTERNAL_SERVER_ERROR, "stop_failed"),
            M::ShuttingDown => (StatusCode::SERVICE_UNAVAILABLE, "shutting_down"),
            M::RuntimeUnavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "runtime_unavailable"),
            M::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
            M::LimitsUnenforceable(_) => (StatusCode::CONFLICT, "limits_unenforceable"),
            M::NotOwner { .. } => (StatusCode::CONFLICT, "not_owner"),
            M::NotLive { .. } => (StatusCode::CONFLICT, "not_live"),
            M::NotStdio(_) => (StatusCode::CONFLICT, "not_stdio"),
            M::Bridge { .. } => (StatusCode::BAD_GATEWAY, "bridge_unavailable"),
            M::TransportChange { .. } => (
                StatusCode::CONFLICT,
                "transport_change_with_live_deployments",
            ),
            M::RuntimeChange { .. } => {
                (StatusCode::CONFLICT, "runtime_change_with_live_deployments")
            }
        };
        ApiError::new(status, code, msg)
    }
}

impl From<KeyError> for ApiError {
    fn from(e: KeyError) -> ApiError {
        let msg = e.to_string();
        let (status, code) = match &e {
            KeyError::NotFound(_) => (StatusCode::NOT_FOUND, "key_not_found"),
            KeyError::Invalid { .. } => (StatusCode::UNPROCESSABLE_ENTITY, "invalid_key_request"),
            KeyError::Store(StoreError::Corrupt(_)) => {
                (StatusCode::INTERNAL_SERVER_ERROR, "store_corrupt")
            }
            KeyError::Store(_) => (StatusCode::SERVICE_UNAVAILABLE, "store_unavailable"),
        };
        ApiError::new(status, code, msg)
    }
}

impl From<JsonRejection> for ApiError {
    fn from(rej: JsonRejection) -> ApiError {
        let (status, code) = match &rej {
            JsonRejection::JsonDataError(_) => (StatusCode::UNPROCESSABLE_ENTITY, "invalid_body"),
            JsonRejection::JsonSyntaxError(_) => (StatusCode::BAD_REQUEST, "invalid_json"),
            JsonRejection::MissingJsonContentType(_) => {
                (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type")
            }
            JsonRejection::BytesRejection(_) if rej.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                (StatusCode::PAYLOAD_TOO_LARGE, "body_too_large")
            }
            _ => (StatusCode::BAD_REQUEST, "invalid_body"),
        };
        ApiError::new(status, code, rej.body_text())
    }
}

/// `Json<T>` with rejections in the API's error shape.
pub struct Body<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for Body<T> {
    type Rejection = ApiError;
    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        Json::<T>::from_request(req, state)
            .await
            .map(|Json(v)| Body(v))
            .map_err(ApiError::from)
    }
}

/// `Query<T>` with rejections in the API's error shape.
pub struct Query<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for Query<T> {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Query(v)| Query(v))
            .map_err(|rej| ApiError::new(StatusCode::BAD_REQUEST, "invalid_query", rej.body_text()))
    }
}

/// Adds to every operation of `doc` the error responses the extractors and middleware give,
/// so that no operation answers a status its document does not name (schemathesis checks this
/// in tests/openapi.rs) and a new operation cannot forget them: 401 (the API token), 500 and
/// 503 (`store_unavailable`, `shutting_down`) everywhere; 400 `invalid_json`, 413, 415 and 422
/// `invalid_body` where there is a request body; 400 `invalid_query` where there is a query.
/// An operation's own description of a status is kept.
pub fn document_common_errors(doc: &mut utoipa::openapi::OpenApi) {
    use utoipa::openapi::{
        ContentBuilder, Ref, RefOr, ResponseBuilder,
        path::{Operation, ParameterIn},
    };
    let error = |description: &str| -> RefOr<utoipa::openapi::Response> {
        ResponseBuilder::new()
            .description(description)
            .content(
                "application/json",
                ContentBuilder::new()
                    .schema(Some(Ref::from_schema_name("ErrorBody")))
                    .build(),
            )
            .build()
            .into()
    };
    let add = |op: &mut Operation, status: &str, description: &str| {
        op.responses
            .responses
            .entry(status.to_owned())
            .or_insert_with(|| error(description));
    };
    for item in doc.paths.paths.values_mut() {
        let ops = [
            &mut item.get,
            &mut item.put,
            &mut item.post,
            &mut item.delete,
            &mut item.patch,
        ];
        for op in ops.into_iter().flatten() {
            add(op, "401", "`unauthorized`: no or a wrong API token");
            add(
                op,
                "500",
                "`internal`: a bug in Switchboard (its log has details)",
            );
            add(
                op,
                "503",
                "`store_unavailable` (the database cannot be reached) or `shutting_down`",
            );
            if op.request_body.is_some() {
                add(op, "400", "`invalid_json`: the body is not JSON");
                add(op, "413", "`body_too_large`");
                add(
                    op,
                    "415",
                    "`unsupported_media_type`: the body is not application/json",
                );
                add(op, "422", "`invalid_body`: JSON of the wrong shape");
            }
            let has_query = op
                .parameters
                .iter()
                .flatten()
                .any(|p| matches!(p, RefOr::T(p) if p.parameter_in == ParameterIn::Query));
            if has_query {
                add(
                    op,
                    "400",
                    "`invalid_query`: a query parameter is unknown or malformed",
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A host that cannot enforce a tool's limits is a conflict with the host, not a bad
    /// request or our failure (the manager's test shows nothing is recorded or started).
    #[test]
    fn unenforceable_limits_are_a_409_naming_it() {
        let api = ApiError::from(crate::manager::ManagerError::LimitsUnenforceable(
            "memory limit: no memory controller".into(),
        ));
        assert_eq!(api.status, StatusCode::CONFLICT);
        assert_eq!(api.code, "limits_unenforceable");
    }
}
