//! Remotes: object storage that snapshots are pushed to and pulled from (kiln_core::remote). Push, pull,
//! gc and deleting a pushed snapshot run as operations; their stage shows the bytes done.

use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::Json;
use kiln_core::operations::snapshot_resources;
use kiln_core::remote::{Pulled, RemoteGc, RemotePush, RemoteSnapshot, RemoteSpec};
use kiln_core::Resources;
use serde::Deserialize;
use utoipa::ToSchema;

use super::operations::run;
use super::AppState;
use crate::error::{ApiResult, ErrorBody};
use crate::extract::{ApiJson, OptionalJson};

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PushBody {
    /// Local snapshot id or name.
    pub snapshot: String,
    /// Name on the remote (default: the snapshot's id).
    #[serde(default)]
    pub name: Option<String>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PullBody {
    /// Snapshot name on the remote.
    pub snapshot: String,
    /// Local id to import it as (default: the id it was pushed with).
    #[serde(default)]
    pub name: Option<String>,
}

#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GcBody {
    /// Unreferenced chunks younger than this are kept (default 86400; below 43200 is safe only while no
    /// push runs).
    #[serde(default)]
    pub grace_seconds: Option<u64>,
    /// Count what would be deleted, delete nothing.
    #[serde(default)]
    pub dry_run: bool,
}

fn remote_resources(name: &str) -> (String, Resources) {
    (format!("remote:{name}"), Resources::default())
}

/// The configured remotes (no credentials: those come from the daemon's environment).
#[utoipa::path(get, path = "/v1/remotes", responses((status = 200, body = [RemoteSpec])))]
pub async fn list(State(engine): State<AppState>) -> ApiResult<Json<Vec<RemoteSpec>>> {
    Ok(Json(engine.list_remotes()?))
}

/// Adds a remote: `s3://BUCKET[/PREFIX]` (with `endpoint` for MinIO, Ceph RGW, R2...) or
/// `file:///DIR`. Nothing is contacted until it is used.
#[utoipa::path(post, path = "/v1/remotes", request_body = RemoteSpec,
    responses((status = 201, body = RemoteSpec), (status = 400, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn add(
    State(engine): State<AppState>,
    ApiJson(spec): ApiJson<RemoteSpec>,
) -> ApiResult<(StatusCode, Json<RemoteSpec>)> {
    Ok((StatusCode::CREATED, Json(engine.add_remote(spec)?)))
}

#[utoipa::path(get, path = "/v1/remotes/{name}", params(("name" = String, Path)),
    responses((status = 200, body = RemoteSpec), (status = 404, body = ErrorBody)))]
pub async fn get(
    State(engine): State<AppState>,
    Path(name): Path<String>,
) -> ApiResult<Json<RemoteSpec>> {
    Ok(Json(engine.get_remote(&name)?))
}

/// Forgets a remote (its objects stay in the storage).
#[utoipa::path(delete, path = "/v1/remotes/{name}", params(("name" = String, Path)),
    responses((status = 204), (status = 404, body = ErrorBody)))]
pub async fn remove(
    State(engine): State<AppState>,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    engine.remove_remote(&name)?;
    Ok(StatusCode::NO_CONTENT)
}

/// Snapshots on the remote (completed pushes).
#[utoipa::path(get, path = "/v1/remotes/{name}/snapshots", params(("name" = String, Path)),
    responses((status = 200, body = [RemoteSnapshot]), (status = 404, body = ErrorBody), (status = 502, body = ErrorBody)))]
pub async fn snapshots(
    State(engine): State<AppState>,
    Path(name): Path<String>,
) -> ApiResult<Json<Vec<RemoteSnapshot>>> {
    Ok(Json(engine.remote_snapshots(&name).await?))
}

/// Deletes a pushed snapshot's manifest; `gc` then removes the chunks nothing else uses.
#[utoipa::path(delete, path = "/v1/remotes/{name}/snapshots/{snapshot}",
    params(("name" = String, Path), ("snapshot" = String, Path)),
    responses((status = 204), (status = 404, body = ErrorBody), (status = 502, body = ErrorBody)))]
pub async fn delete_snapshot(
    State(engine): State<AppState>,
    headers: HeaderMap,
    Path((name, snap)): Path<(String, String)>,
) -> Response {
    let res = remote_resources(&name);
    run(
        &engine,
        &headers,
        "remote.delete_snapshot",
        res,
        StatusCode::NO_CONTENT,
        move |e| async move { e.delete_remote_snapshot(&name, &snap).await },
    )
    .await
}

/// Pushes a snapshot: only chunks the remote lacks are uploaded, in parallel; the manifest is written
/// last, so an interrupted push is invisible and the next one resumes where it stopped.
#[utoipa::path(post, path = "/v1/remotes/{name}/push", params(("name" = String, Path)), request_body = PushBody,
    responses((status = 200, body = RemotePush), (status = 404, body = ErrorBody), (status = 502, body = ErrorBody)))]
pub async fn push(
    State(engine): State<AppState>,
    headers: HeaderMap,
    Path(name): Path<String>,
    ApiJson(body): ApiJson<PushBody>,
) -> Response {
    let res = snapshot_resources(&engine, &body.snapshot, false);
    run(
        &engine,
        &headers,
        "remote.push",
        res,
        StatusCode::OK,
        move |e| async move { e.push_snapshot(&body.snapshot, &name, body.name).await },
    )
    .await
}

/// Pulls a snapshot: chunks this host lacks are downloaded and checked against their hashes, the
/// snapshot is checked for this host (as a bundle import) and appears whole or not at all.
#[utoipa::path(post, path = "/v1/remotes/{name}/pull", params(("name" = String, Path)), request_body = PullBody,
    responses((status = 201, body = Pulled), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody),
              (status = 422, body = ErrorBody), (status = 502, body = ErrorBody), (status = 507, body = ErrorBody)))]
pub async fn pull(
    State(engine): State<AppState>,
    headers: HeaderMap,
    Path(name): Path<String>,
    ApiJson(body): ApiJson<PullBody>,
) -> Response {
    let res = remote_resources(&name);
    run(
        &engine,
        &headers,
        "remote.pull",
        res,
        StatusCode::CREATED,
        move |e| async move { e.pull_snapshot(&name, &body.snapshot, body.name).await },
    )
    .await
}

/// Deletes chunks no pushed snapshot references and older than the grace period.
#[utoipa::path(post, path = "/v1/remotes/{name}/gc", params(("name" = String, Path)), request_body = GcBody,
    responses((status = 200, body = RemoteGc), (status = 404, body = ErrorBody), (status = 502, body = ErrorBody)))]
pub async fn gc(
    State(engine): State<AppState>,
    headers: HeaderMap,
    Path(name): Path<String>,
    OptionalJson(body): OptionalJson<GcBody>,
) -> Response {
    let res = remote_resources(&name);
    let grace = Duration::from_secs(body.grace_seconds.unwrap_or(86_400));
    run(
        &engine,
        &headers,
        "remote.gc",
        res,
        StatusCode::OK,
        move |e| async move { e.gc_remote(&name, grace, body.dry_run).await },
    )
    .await
}
