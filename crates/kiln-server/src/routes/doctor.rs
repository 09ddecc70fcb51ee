//! Consistency check of the daemon's state (database, data directory, QEMU processes) and its repair.

use axum::extract::State;
use axum::Json;
use kiln_core::DoctorReport;

use super::AppState;
use crate::error::ApiResult;
use crate::extract::QueryPairs;

/// Reports inconsistencies between the state database, the data directory and the QEMU processes.
#[utoipa::path(get, path = "/v1/doctor",
    params(("deep" = Option<bool>, Query, description = "also verify every snapshot file's checksum (slow)")),
    responses((status = 200, body = DoctorReport), (status = 400, body = crate::error::ErrorBody)))]
pub async fn check(State(engine): State<AppState>, q: QueryPairs) -> ApiResult<Json<DoctorReport>> {
    Ok(Json(engine.doctor(false, q.flag("deep")?).await?))
}

/// Like `GET /v1/doctor`, and fixes what can be fixed safely (see docs/api.md).
#[utoipa::path(post, path = "/v1/doctor/repair",
    params(("deep" = Option<bool>, Query, description = "also verify every snapshot file's checksum (slow)")),
    responses((status = 200, body = DoctorReport), (status = 400, body = crate::error::ErrorBody)))]
pub async fn repair(
    State(engine): State<AppState>,
    headers: axum::http::HeaderMap,
    q: QueryPairs,
) -> axum::response::Response {
    let deep = match q.flag("deep") {
        Ok(d) => d,
        Err(e) => return axum::response::IntoResponse::into_response(e),
    };
    let res = (String::new(), kiln_core::Resources::default());
    super::operations::run(
        &engine,
        &headers,
        "doctor.repair",
        res,
        axum::http::StatusCode::OK,
        move |e| async move { e.doctor(true, deep).await },
    )
    .await
}
