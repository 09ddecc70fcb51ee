//! Every API error is `{"error": {"code": "...", "message": "..."}}` with the code's HTTP status.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use kiln_core::{Error, ErrorCode};
use serde::Serialize;
use utoipa::ToSchema;

#[derive(Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Serialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable machine-readable code, e.g. `sandbox_not_found`.
    pub code: String,
    /// What went wrong and what to do about it.
    pub message: String,
}

pub struct ApiError {
    pub status: StatusCode,
    pub code: String,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code: code.to_string(),
            message: message.into(),
        }
    }
    pub fn invalid(message: impl Into<String>) -> Self {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            ErrorCode::InvalidRequest.as_str(),
            message,
        )
    }
}

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        ApiError {
            status: StatusCode::from_u16(e.code.http_status())
                .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            code: e.code.as_str().to_string(),
            message: e.message,
        }
    }
}

/// Seconds a `capacity_exceeded` answer asks clients to wait before trying again.
pub const CAPACITY_RETRY_AFTER_SECS: &str = "2";

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let capacity = self.code == ErrorCode::CapacityExceeded.as_str();
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code,
                message: self.message,
            },
        };
        let mut resp = (self.status, Json(body)).into_response();
        // Capacity frees up as sandboxes stop or go away; tell clients when to look again (the SDKs
        // retry a 429 after Retry-After), as the rate limiter does for `rate_limited`.
        if capacity {
            resp.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from_static(CAPACITY_RETRY_AFTER_SECS),
            );
        }
        resp
    }
}

pub type ApiResult<T> = Result<T, ApiError>;
