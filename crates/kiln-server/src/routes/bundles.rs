//! Snapshot bundles: a snapshot streamed out as one file, and such a file streamed in
//! (kiln_core::snapshot::bundle has the format).

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::Response;
use axum::Json;
use futures::TryStreamExt;
use kiln_core::Snapshot;

use super::files::drain_rest_of_upload;
use super::AppState;
use crate::error::{ApiResult, ErrorBody};
use crate::extract::QueryPairs;

/// Streams a snapshot as one bundle file (header and manifest, each file zstd-compressed without its
/// holes, checksums, a trailer). A diff snapshot carries its base and becomes self-contained, unless
/// `without_base=true`: then the importing host must have the base (same content digest).
#[utoipa::path(get, path = "/v1/snapshots/{id}/export",
    params(("id" = String, Path, description = "snapshot id or name"),
           ("without_base" = Option<bool>, Query, description = "a diff snapshot leaves its base out")),
    responses((status = 200, description = "the bundle (a body cut short means the export failed)", content_type = "application/octet-stream"),
              (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub async fn export(
    State(engine): State<AppState>,
    Path(id): Path<String>,
    q: QueryPairs,
) -> ApiResult<Response> {
    let without_base = q.flag("without_base")?;
    let export = engine.export_snapshot(&id, without_base)?;
    let data_bytes = export.data_bytes;
    let disposition = format!("attachment; filename=\"{}.kiln\"", export.id);
    let body = Body::from_stream(futures::stream::unfold(export, |mut e| async move {
        e.next_chunk().await.map(|chunk| (chunk, e))
    }));
    Response::builder()
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header(header::CONTENT_DISPOSITION, disposition)
        // Uncompressed data it carries (no holes): for a progress display; the bundle is smaller.
        .header("x-kiln-bundle-data-bytes", data_bytes)
        .body(body)
        .map_err(|e| kiln_core::Error::internal(e.to_string()).into())
}

/// Imports a bundle (streamed request body): everything is verified as it arrives, the snapshot must
/// suit this host (`snapshot_incompatible` names the field), and it appears whole or not at all. A
/// damaged or truncated bundle is refused (`snapshot_corrupt`) naming the byte offset.
#[utoipa::path(post, path = "/v1/snapshots/import",
    params(("name" = Option<String>, Query, description = "import under this id (default: the id it was exported under)")),
    request_body(content = Vec<u8>, content_type = "application/octet-stream"),
    responses((status = 201, body = Snapshot), (status = 400, body = ErrorBody), (status = 409, body = ErrorBody),
              (status = 422, body = ErrorBody), (status = 507, body = ErrorBody)))]
pub async fn import(
    State(engine): State<AppState>,
    q: QueryPairs,
    body: Body,
) -> ApiResult<(StatusCode, Json<Snapshot>)> {
    let name = q.get("name").map(str::to_string);
    let stream = body.into_data_stream().map_err(std::io::Error::other);
    let mut reader = tokio_util::io::StreamReader::new(stream);
    match engine.import_snapshot(&mut reader, name).await {
        Ok(s) => Ok((StatusCode::CREATED, Json(s))),
        Err(e) => {
            drain_rest_of_upload(&mut reader).await;
            Err(e.into())
        }
    }
}

/// `GET /v1/snapshots/import`: the snapshot named `import` (the import route shares its path).
pub async fn get_named_import(state: State<AppState>) -> ApiResult<Json<Snapshot>> {
    super::snapshots::get(state, Path("import".to_string())).await
}

/// `DELETE /v1/snapshots/import`: deletes the snapshot named `import`.
pub async fn delete_named_import(
    state: State<AppState>,
    headers: axum::http::HeaderMap,
    q: QueryPairs,
) -> Response {
    super::snapshots::delete(state, headers, Path("import".to_string()), q).await
}
