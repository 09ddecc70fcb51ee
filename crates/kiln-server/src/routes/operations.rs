//! Operations: every mutating request runs as an operation the daemon owns (see kiln-core operations.rs).
//! A handler starts one and waits for it; the answer is the same as it always was, plus a
//! `Kiln-Operation` header. `Prefer: respond-async` gets 202 with the operation instead.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use kiln_core::{Engine, Operation, Resources};

use super::AppState;
use crate::error::{ApiError, ApiResult, ErrorBody};
use crate::extract::QueryPairs;

pub const OPERATION_HEADER: &str = "kiln-operation";
/// The longest `GET /v1/operations/{id}/wait` waits.
const MAX_WAIT_SECS: u64 = 3600;
const DEFAULT_WAIT_SECS: u64 = 60;

fn wants_async(headers: &HeaderMap) -> bool {
    headers
        .get_all(axum::http::header::HeaderName::from_static("prefer"))
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|p| p.trim().eq_ignore_ascii_case("respond-async"))
}

fn with_header(mut resp: Response, id: &str) -> Response {
    if let Ok(v) = HeaderValue::from_str(id) {
        resp.headers_mut().insert(OPERATION_HEADER, v);
    }
    resp
}

/// Runs `work` as an operation. Waits for it and answers `ok_status` with its result (no body for 204)
/// or its error; with `Prefer: respond-async`, answers 202 with the operation at once. Either way the
/// operation runs to its end even if this handler is dropped with its connection.
pub async fn run<F, Fut, T>(
    engine: &Arc<Engine>,
    headers: &HeaderMap,
    kind: &str,
    (target, resources): (String, Resources),
    ok_status: StatusCode,
    work: F,
) -> Response
where
    F: FnOnce(Arc<Engine>) -> Fut + Send + 'static,
    Fut: Future<Output = kiln_core::Result<T>> + Send + 'static,
    T: serde::Serialize + Send + 'static,
{
    let started = match engine.start_operation(kind, &target, resources, move |e| async move {
        let v = work(e).await?;
        Ok(serde_json::to_value(v).unwrap_or(serde_json::Value::Null))
    }) {
        Ok(s) => s,
        Err(e) => return ApiError::from(e).into_response(),
    };
    let id = started.operation.id.clone();
    if wants_async(headers) {
        let mut resp = (StatusCode::ACCEPTED, Json(&started.operation)).into_response();
        if let Ok(v) = HeaderValue::from_str(&format!("/v1/operations/{id}")) {
            resp.headers_mut().insert(axum::http::header::LOCATION, v);
        }
        return with_header(resp, &id);
    }
    let resp = match started.outcome().await {
        Ok(_) if ok_status == StatusCode::NO_CONTENT => ok_status.into_response(),
        Ok(v) => (ok_status, Json(v)).into_response(),
        Err(e) => ApiError::from(e).into_response(),
    };
    with_header(resp, &id)
}

/// Recent operations, newest first (finished ones are kept for 24 hours, at most 1000).
#[utoipa::path(get, path = "/v1/operations",
    params(("target" = Option<String>, Query, description = "id (or sandbox name) the operation works on or created"),
           ("state" = Option<String>, Query, description = "running, succeeded or failed")),
    responses((status = 200, body = [Operation]), (status = 400, body = ErrorBody)))]
pub async fn list(
    State(engine): State<AppState>,
    q: QueryPairs,
) -> ApiResult<Json<Vec<Operation>>> {
    Ok(Json(
        engine.list_operations(q.get("target"), q.get("state"))?,
    ))
}

/// One operation: its state, stage, and result or error.
#[utoipa::path(get, path = "/v1/operations/{id}", params(("id" = String, Path)),
    responses((status = 200, body = Operation), (status = 404, body = ErrorBody)))]
pub async fn get(
    State(engine): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<Json<Operation>> {
    Ok(Json(engine.get_operation(&id)?))
}

/// Waits until the operation finished or `timeout` seconds passed (default 60, at most 3600), then
/// answers with the operation as it is.
#[utoipa::path(get, path = "/v1/operations/{id}/wait",
    params(("id" = String, Path), ("timeout" = Option<u64>, Query, description = "seconds (default 60, at most 3600)")),
    responses((status = 200, body = Operation), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn wait(
    State(engine): State<AppState>,
    Path(id): Path<String>,
    q: QueryPairs,
) -> ApiResult<Json<Operation>> {
    let secs = match q.get("timeout") {
        None => DEFAULT_WAIT_SECS,
        Some(t) => t.parse::<u64>().map_err(|_| {
            ApiError::invalid(format!(
                "timeout '{t}' is not a whole number of seconds (0 to {MAX_WAIT_SECS})"
            ))
        })?,
    };
    let timeout = Duration::from_secs(secs.min(MAX_WAIT_SECS));
    Ok(Json(engine.wait_operation(&id, timeout).await?))
}
