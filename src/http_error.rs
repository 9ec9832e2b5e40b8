//! The one JSON error shape of every answer Switchboard writes itself, the API's and the
//! proxy's: `{"error": {"code": "...", "message": "..."}}`. The API (`api::error::ApiError`)
//! and the proxy (`proxy::error::ProxyError`) each decide status and code for their own
//! errors; both write them through [`response`].

use axum::{
    Json,
    http::StatusCode,
    response::{IntoResponse, Response},
};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// The body of every error response.
#[derive(Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Serialize, Deserialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable, machine-readable: `tool_not_found`, `ports_exhausted`, ...
    pub code: String,
    /// For people.
    pub message: String,
}

/// An error response with the shared body.
pub fn response(status: StatusCode, code: &str, message: String) -> Response {
    let body = ErrorBody {
        error: ErrorDetail {
            code: code.to_owned(),
            message,
        },
    };
    (status, Json(body)).into_response()
}
