use std::collections::BTreeMap;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use kiln_core::operations::{sandbox_resources, snapshot_resources};
use kiln_core::{CreateSnapshot, ResumeSnapshot, Sandbox, Snapshot, SnapshotDeleted};
use serde::Deserialize;
use utoipa::ToSchema;

use super::operations::run;
use super::AppState;
use crate::error::{ApiResult, ErrorBody};
use crate::extract::{ApiJson, OptionalJson, QueryPairs};

#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RestoreBody {
    /// Continue the restored sandbox at once (default: it stays paused).
    #[serde(default)]
    pub resume: bool,
    /// Restore even though the snapshot was restored before.
    #[serde(default)]
    pub force: bool,
}

/// Takes a snapshot of a running or paused sandbox (memory, vCPUs, devices and disk at one instant).
#[utoipa::path(post, path = "/v1/sandboxes/{id}/snapshots", request_body = CreateSnapshot,
    params(("id" = String, Path, description = "sandbox id or name")),
    responses((status = 201, body = Snapshot), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
              (status = 409, body = ErrorBody), (status = 507, body = ErrorBody)))]
pub async fn create(
    State(engine): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    OptionalJson(req): OptionalJson<CreateSnapshot>,
) -> Response {
    let res = sandbox_resources(&engine, &id);
    run(
        &engine,
        &headers,
        "snapshot.create",
        res,
        StatusCode::CREATED,
        move |e| async move { e.create_snapshot(&id, req).await },
    )
    .await
}

/// Lists named snapshots, optionally of one source sandbox and/or with labels.
#[utoipa::path(get, path = "/v1/snapshots",
    params(("sandbox" = Option<String>, Query, description = "source sandbox id or name"),
           ("label" = Option<String>, Query, description = "KEY=VALUE; repeatable")),
    responses((status = 200, body = [Snapshot])))]
pub async fn list(State(engine): State<AppState>, q: QueryPairs) -> ApiResult<Json<Vec<Snapshot>>> {
    let mut labels = BTreeMap::new();
    for kv in q.all("label") {
        let (k, v) = kiln_core::validate::parse_key_value(kv)?;
        labels.insert(k, v);
    }
    Ok(Json(engine.list_snapshots(q.get("sandbox"), &labels)?))
}

#[utoipa::path(get, path = "/v1/snapshots/{id}", params(("id" = String, Path)),
    responses((status = 200, body = Snapshot), (status = 404, body = ErrorBody)))]
pub async fn get(
    State(engine): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<Json<Snapshot>> {
    Ok(Json(engine.get_snapshot(&id)?))
}

/// Deletes a snapshot. Refused while diff snapshots build on it; sandboxes running from it keep their files.
#[utoipa::path(delete, path = "/v1/snapshots/{id}", params(("id" = String, Path),
    ("unless_restored" = Option<bool>, Query, description = "refuse (409 snapshot_in_use) while a sandbox rolled back to it is running or paused")),
    responses((status = 200, body = SnapshotDeleted), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn delete(
    State(engine): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    q: QueryPairs,
) -> Response {
    let unless_restored = match q.flag("unless_restored") {
        Ok(b) => b,
        Err(e) => return e.into_response(),
    };
    let res = snapshot_resources(&engine, &id, false);
    run(
        &engine,
        &headers,
        "snapshot.delete",
        res,
        StatusCode::OK,
        move |e| async move { e.delete_snapshot_with(&id, unless_restored).await },
    )
    .await
}

/// A new sandbox that goes on exactly where the snapshot was (no boot). Repeatable, concurrently.
#[utoipa::path(post, path = "/v1/snapshots/{id}/resume", request_body = ResumeSnapshot, params(("id" = String, Path)),
    responses((status = 201, body = Sandbox), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
              (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub async fn resume(
    State(engine): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    OptionalJson(req): OptionalJson<ResumeSnapshot>,
) -> Response {
    let res = snapshot_resources(&engine, &id, false);
    run(
        &engine,
        &headers,
        "snapshot.resume",
        res,
        StatusCode::CREATED,
        move |e| async move { e.resume_with_lifetime(&id, req).await },
    )
    .await
}

/// Rolls the snapshot's source sandbox back to it (same id and name); paused unless `resume`.
#[utoipa::path(post, path = "/v1/snapshots/{id}/restore", request_body = RestoreBody, params(("id" = String, Path)),
    responses((status = 200, body = Sandbox), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody),
              (status = 422, body = ErrorBody)))]
pub async fn restore(
    State(engine): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    OptionalJson(b): OptionalJson<RestoreBody>,
) -> Response {
    let res = snapshot_resources(&engine, &id, true);
    run(
        &engine,
        &headers,
        "snapshot.restore",
        res,
        StatusCode::OK,
        move |e| async move { e.restore_snapshot(&id, b.resume, b.force).await },
    )
    .await
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NameBody {
    /// A further name for the snapshot; ids and names share one namespace (same rule as ids).
    pub name: String,
}

/// Gives a snapshot a further name, under which every snapshot route finds it (until the snapshot is
/// deleted). Repeating a name it already has changes nothing; a name another snapshot has as its id or
/// name is refused with 409 `snapshot_already_exists`.
#[utoipa::path(post, path = "/v1/snapshots/{id}/names", request_body = NameBody,
    params(("id" = String, Path, description = "snapshot id or name")),
    responses((status = 200, body = Snapshot), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
              (status = 409, body = ErrorBody)))]
pub async fn name(
    State(engine): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    ApiJson(b): ApiJson<NameBody>,
) -> Response {
    let res = snapshot_resources(&engine, &id, false);
    run(
        &engine,
        &headers,
        "snapshot.name",
        res,
        StatusCode::OK,
        move |e| async move { e.name_snapshot(&id, &b.name).await },
    )
    .await
}
