//! Continuous checkpoints and rewind (issue 16): a sandbox's policy, its checkpoints, and rolling it
//! back to one.

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::Json;
use kiln_core::operations::sandbox_resources;
use kiln_core::{Rewind, Sandbox, SetCheckpointPolicy, Snapshot};

use super::operations::run;
use super::AppState;
use crate::error::{ApiResult, ErrorBody};
use crate::extract::ApiJson;

/// Sets a sandbox's checkpoint policy: a checkpoint every `every` seconds, the newest `keep` kept
/// (`every` 0 removes the policy). Answers with the sandbox (`checkpoint_policy`).
#[utoipa::path(put, path = "/v1/sandboxes/{id}/checkpoint-policy", request_body = SetCheckpointPolicy,
    params(("id" = String, Path, description = "id or name")),
    responses((status = 200, body = Sandbox), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn set_policy(
    State(engine): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<SetCheckpointPolicy>,
) -> Response {
    let res = sandbox_resources(&engine, &id);
    run(
        &engine,
        &headers,
        "sandbox.set_checkpoint_policy",
        res,
        StatusCode::OK,
        move |e| async move { e.set_checkpoint_policy(&id, req).await },
    )
    .await
}

/// Removes a sandbox's checkpoint policy; its checkpoints stay.
#[utoipa::path(delete, path = "/v1/sandboxes/{id}/checkpoint-policy",
    params(("id" = String, Path, description = "id or name")),
    responses((status = 200, body = Sandbox), (status = 404, body = ErrorBody)))]
pub async fn clear_policy(
    State(engine): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let res = sandbox_resources(&engine, &id);
    run(
        &engine,
        &headers,
        "sandbox.set_checkpoint_policy",
        res,
        StatusCode::OK,
        move |e| async move {
            e.set_checkpoint_policy(&id, SetCheckpointPolicy::default())
                .await
        },
    )
    .await
}

/// A sandbox's checkpoints, oldest first (snapshots labelled `kiln.checkpoint`, each with `pause_ms`).
#[utoipa::path(get, path = "/v1/sandboxes/{id}/checkpoints",
    params(("id" = String, Path, description = "id or name")),
    responses((status = 200, body = [Snapshot]), (status = 404, body = ErrorBody)))]
pub async fn list(
    State(engine): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<Json<Vec<Snapshot>>> {
    Ok(Json(engine.checkpoints(&id)?))
}

/// Rolls a sandbox back to a checkpoint (`to`: a snapshot of it, or a time: RFC 3339 or `90s`/`5m`/`2h`
/// ago, meaning the newest checkpoint at or before it). Same id and name; running afterwards.
#[utoipa::path(post, path = "/v1/sandboxes/{id}/rewind", request_body = Rewind,
    params(("id" = String, Path, description = "id or name")),
    responses((status = 200, body = Sandbox), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
              (status = 409, body = ErrorBody)))]
pub async fn rewind(
    State(engine): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<Rewind>,
) -> Response {
    let res = sandbox_resources(&engine, &id);
    run(
        &engine,
        &headers,
        "sandbox.rewind",
        res,
        StatusCode::OK,
        move |e| async move { e.rewind(&id, req).await },
    )
    .await
}
