//! Volumes: durable disks attached to sandboxes at creation (`volumes` in the create/resume body).

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::Json;
use kiln_core::operations::volume_resources;
use kiln_core::{CreateVolume, Volume};

use super::operations::run;
use super::AppState;
use crate::error::{ApiResult, ErrorBody};
use crate::extract::ApiJson;

/// Creates a volume: an empty ext4 filesystem of the given size (sparse on the host).
#[utoipa::path(post, path = "/v1/volumes", request_body = CreateVolume,
    responses((status = 201, body = Volume), (status = 400, body = ErrorBody), (status = 409, body = ErrorBody),
              (status = 507, body = ErrorBody)))]
pub async fn create(
    State(engine): State<AppState>,
    headers: HeaderMap,
    ApiJson(req): ApiJson<CreateVolume>,
) -> Response {
    let res = volume_resources(&req.name);
    run(
        &engine,
        &headers,
        "volume.create",
        res,
        StatusCode::CREATED,
        move |e| async move { e.create_volume(req).await },
    )
    .await
}

#[utoipa::path(get, path = "/v1/volumes", responses((status = 200, body = [Volume])))]
pub async fn list(State(engine): State<AppState>) -> ApiResult<Json<Vec<Volume>>> {
    Ok(Json(engine.list_volumes()?))
}

#[utoipa::path(get, path = "/v1/volumes/{name}", params(("name" = String, Path)),
    responses((status = 200, body = Volume), (status = 404, body = ErrorBody)))]
pub async fn get(
    State(engine): State<AppState>,
    Path(name): Path<String>,
) -> ApiResult<Json<Volume>> {
    Ok(Json(engine.get_volume(&name)?))
}

/// Deletes a volume and its data; refused while a sandbox has it attached.
#[utoipa::path(delete, path = "/v1/volumes/{name}", params(("name" = String, Path)),
    responses((status = 204), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn delete(
    State(engine): State<AppState>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Response {
    let res = volume_resources(&name);
    run(
        &engine,
        &headers,
        "volume.delete",
        res,
        StatusCode::NO_CONTENT,
        move |e| async move { e.delete_volume(&name).await },
    )
    .await
}
