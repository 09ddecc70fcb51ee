//! Whole guest directories as tar streams, batch writes, and directory watches (NDJSON).

use std::sync::atomic::Ordering;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap};
use axum::response::Response;
use axum::{Extension, Json};
use base64::Engine as _;
use kiln_core::dirs::BatchFile;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::files::{capped_upload, download_body, drain_rest_of_upload, WriteResult};
use super::AppState;
use crate::error::{ApiError, ApiResult, ErrorBody};
use crate::extract::{ApiJson, QueryPairs};
use crate::limits::{upload_too_large, Limits};

#[derive(Serialize, ToSchema)]
pub struct UnpackResult {
    pub path: String,
    /// Tar entries unpacked (files, directories, links).
    pub entries: u64,
    /// Bytes of tar received.
    pub bytes: u64,
}

/// One file of a batch write.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BatchFileBody {
    /// Absolute guest path; missing parents are created.
    pub path: String,
    /// The content, as text (`encoding` `utf8`, the default) or base64 (`encoding` `base64`).
    pub content: String,
    #[serde(default)]
    pub encoding: Option<String>,
    /// Octal mode such as `"0755"`; default: the replaced file's, else 0644.
    #[serde(default)]
    pub mode: Option<String>,
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BatchWriteBody {
    /// Written in order, each atomically; at most 1000.
    pub files: Vec<BatchFileBody>,
}

#[derive(Serialize, ToSchema)]
pub struct BatchWriteResult {
    pub files: Vec<WriteResult>,
}

/// One NDJSON line of a directory watch.
#[derive(Serialize, ToSchema)]
pub struct WatchEvent {
    /// `create`, `modify`, `delete`, `moved_from`, `moved_to`, or `overflow` (events were lost: list again).
    pub event: String,
    /// Absolute guest path.
    pub path: String,
    /// Whether the path is a directory.
    pub dir: bool,
    /// Pairs a `moved_from` with its `moved_to`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cookie: Option<u32>,
}

/// Uploads a tar stream and unpacks it under a guest directory (created if missing).
#[utoipa::path(put, path = "/v1/sandboxes/{id}/files/dir",
    params(("id" = String, Path, description = "id or name"), ("path" = String, Query, description = "absolute guest directory")),
    request_body(content = Vec<u8>, content_type = "application/x-tar"),
    responses((status = 200, body = UnpackResult),
              (status = 400, description = "`path_escape`: an entry is absolute, has `..` or goes through a symlink", body = ErrorBody),
              (status = 404, body = ErrorBody), (status = 413, body = ErrorBody)))]
pub async fn upload(
    State(engine): State<AppState>,
    Extension(limits): Extension<Limits>,
    Path(id): Path<String>,
    q: QueryPairs,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Json<UnpackResult>> {
    let path = q.require("path")?.to_string();
    let max = limits.max_upload_bytes;
    let (mut reader, over) = capped_upload(&headers, body, max)?;
    match engine.upload_dir(&id, &path, &mut reader).await {
        Ok((entries, bytes)) => Ok(Json(UnpackResult {
            path,
            entries,
            bytes,
        })),
        Err(_) if over.load(Ordering::Relaxed) => Err(upload_too_large(max)),
        Err(e) => {
            drain_rest_of_upload(&mut reader).await;
            Err(e.into())
        }
    }
}

/// Downloads a guest directory as a tar stream (symlinks stored as symlinks, not followed).
#[utoipa::path(get, path = "/v1/sandboxes/{id}/files/dir",
    params(("id" = String, Path, description = "id or name"), ("path" = String, Query, description = "absolute guest directory")),
    responses((status = 200, description = "tar stream", content_type = "application/x-tar"),
              (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn download(
    State(engine): State<AppState>,
    Path(id): Path<String>,
    q: QueryPairs,
) -> ApiResult<Response> {
    let path = q.require("path")?;
    let download = engine.download_dir(&id, path).await?;
    Response::builder()
        .header(header::CONTENT_TYPE, "application/x-tar")
        .body(download_body(download))
        .map_err(|e| kiln_core::Error::internal(e.to_string()).into())
}

/// Writes several files in one request, in order, each atomically (parents created).
#[utoipa::path(post, path = "/v1/sandboxes/{id}/files/batch", request_body = BatchWriteBody,
    params(("id" = String, Path, description = "id or name")),
    responses((status = 200, body = BatchWriteResult), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
              (status = 413, body = ErrorBody)))]
pub async fn batch(
    State(engine): State<AppState>,
    Path(id): Path<String>,
    ApiJson(b): ApiJson<BatchWriteBody>,
) -> ApiResult<Json<BatchWriteResult>> {
    let mut files = Vec::with_capacity(b.files.len());
    for f in b.files {
        let content = match f.encoding.as_deref() {
            None | Some("utf8") => f.content.into_bytes(),
            Some("base64") => base64::engine::general_purpose::STANDARD
                .decode(f.content.as_bytes())
                .map_err(|e| {
                    ApiError::invalid(format!("content of {} is not base64: {e}", f.path))
                })?,
            Some(other) => {
                return Err(ApiError::invalid(format!(
                    "encoding '{other}' of {} is neither 'utf8' nor 'base64'",
                    f.path
                )))
            }
        };
        let mode = f
            .mode
            .as_deref()
            .map(super::files::parse_mode)
            .transpose()?;
        files.push(BatchFile {
            path: f.path,
            mode,
            content,
        });
    }
    let written = engine.write_files(&id, &files).await?;
    Ok(Json(BatchWriteResult {
        files: files
            .into_iter()
            .zip(written)
            .map(|(f, bytes)| WriteResult {
                path: f.path,
                bytes,
            })
            .collect(),
    }))
}

/// Streams changes under a guest directory as NDJSON `WatchEvent` lines until the client disconnects
/// (which ends the watch in the guest).
#[utoipa::path(get, path = "/v1/sandboxes/{id}/files/watch",
    params(("id" = String, Path, description = "id or name"), ("path" = String, Query, description = "absolute guest directory"),
           ("recursive" = Option<bool>, Query, description = "watch subdirectories too (default false)")),
    responses((status = 200, description = "NDJSON `WatchEvent` lines; the stream ends if the directory is removed", content_type = "application/x-ndjson"),
              (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn watch(
    State(engine): State<AppState>,
    Path(id): Path<String>,
    q: QueryPairs,
) -> ApiResult<Response> {
    let path = q.require("path")?;
    let recursive = q.flag("recursive")?;
    let watch = engine.watch_dir(&id, path, recursive).await?;
    let lines = futures::stream::unfold(Some(watch), |state| async move {
        let mut w = state?;
        match w.next().await {
            Some(Ok(c)) => {
                let ev = WatchEvent {
                    event: serde_json::to_value(c.change)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_string))
                        .unwrap_or_default(),
                    path: c.path,
                    dir: c.dir,
                    cookie: c.cookie,
                };
                let mut line = serde_json::to_vec(&ev).unwrap_or_default();
                line.push(b'\n');
                Some((Ok::<_, std::io::Error>(bytes::Bytes::from(line)), Some(w)))
            }
            Some(Err(e)) => Some((Err(std::io::Error::other(e.to_string())), None)),
            None => None,
        }
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "application/x-ndjson")
        .body(Body::from_stream(lines))
        .map_err(|e| kiln_core::Error::internal(e.to_string()).into())
}
