//! The API's one error shape, `{"error": {"code": "...", "message": "..."}}`, and the extractors
//! that turn every client mistake into it (axum's own rejections are plain text).

use axum::{
    Json,
    extract::{FromRequest, FromRequestParts, Request, rejection::JsonRejection},
    http::{StatusCode, header, request::Parts},
    response::{IntoResponse, Response},
};
use serde::{Serialize, de::DeserializeOwned};
use utoipa::ToSchema;

use crate::{manager::ManagerError, registry::SpecError, store::StoreError};

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

/// The body of every error response.
#[derive(Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Serialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable, machine-readable: `tool_not_found`, `ports_exhausted`, ...
    pub code: String,
    /// For people.
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
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code.to_owned(),
                message: self.message,
            },
        };
        let mut resp = (self.status, Json(body)).into_response();
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
            M::Store(_) => (StatusCode::SERVICE_UNAVAILABLE, "store_unavailable"),
            M::Stop { .. } => (StatusCode::INTERNAL_SERVER_ERROR, "stop_failed"),
            M::ShuttingDown => (StatusCode::SERVICE_UNAVAILABLE, "shutting_down"),
            M::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
            M::NotOwner { .. } => (StatusCode::CONFLICT, "not_owner"),
            M::NotLive { .. } => (StatusCode::CONFLICT, "not_live"),
            M::NotStdio(_) => (StatusCode::CONFLICT, "not_stdio"),
            M::Bridge { .. } => (StatusCode::BAD_GATEWAY, "bridge_unavailable"),
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
