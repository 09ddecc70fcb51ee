//! Files in the guest: raw bytes in and out (streamed), listing, stat, mkdir, remove.

use axum::body::Body;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::Response;
use axum::Extension;
use axum::Json;
use futures::TryStreamExt;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::AppState;
use crate::error::{ApiError, ApiResult, ErrorBody};
use crate::extract::{ApiJson, QueryPairs};
use crate::limits::{upload_too_large, Limits};

/// Metadata of a guest path.
#[derive(Serialize, ToSchema)]
pub struct FileStat {
    pub size: u64,
    /// Permission bits (`st_mode & 0o7777`).
    pub mode: u32,
    /// `file`, `dir`, `symlink` or `other`.
    pub kind: String,
    /// Modification time, seconds since the epoch.
    pub mtime_unix: i64,
}

#[derive(Serialize, ToSchema)]
pub struct DirEntry {
    pub name: String,
    pub kind: String,
    pub size: u64,
    pub mode: u32,
    pub mtime_unix: i64,
}

fn kind_name(k: kiln_core::agent::FileKind) -> String {
    serde_json::to_value(k)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_else(|| "other".into())
}

impl From<kiln_core::agent::FileStat> for FileStat {
    fn from(s: kiln_core::agent::FileStat) -> Self {
        FileStat {
            size: s.size,
            mode: s.mode,
            kind: kind_name(s.kind),
            mtime_unix: s.mtime_unix,
        }
    }
}

impl From<kiln_core::agent::DirEntry> for DirEntry {
    fn from(e: kiln_core::agent::DirEntry) -> Self {
        DirEntry {
            name: e.name,
            kind: kind_name(e.kind),
            size: e.size,
            mode: e.mode,
            mtime_unix: e.mtime_unix,
        }
    }
}

#[derive(Serialize, ToSchema)]
pub struct WriteResult {
    pub path: String,
    pub bytes: u64,
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MkdirBody {
    /// Directory to create, with missing parents.
    pub path: String,
}

pub(crate) fn parse_mode(s: &str) -> Result<u32, ApiError> {
    let digits = s.strip_prefix("0o").unwrap_or(s);
    u32::from_str_radix(digits, 8)
        .ok()
        .filter(|m| *m <= 0o7777)
        .ok_or_else(|| {
            ApiError::invalid(format!(
                "mode '{s}' is not an octal file mode such as 644 or 0755"
            ))
        })
}

/// Downloads a file from the guest (streamed).
#[utoipa::path(get, path = "/v1/sandboxes/{id}/files",
    params(("id" = String, Path, description = "id or name"), ("path" = String, Query, description = "absolute guest path")),
    responses((status = 200, description = "file content", content_type = "application/octet-stream"),
              (status = 404, body = ErrorBody)))]
pub async fn read(
    State(engine): State<AppState>,
    Path(id): Path<String>,
    q: QueryPairs,
) -> ApiResult<Response> {
    let path = q.require("path")?;
    let download = engine.read_file(&id, path).await?;
    let size = download.size;
    Response::builder()
        .header(header::CONTENT_TYPE, "application/octet-stream")
        // The size is a header of its own, not Content-Length: the file may change while it streams, and
        // a Content-Length the body does not match breaks the HTTP connection.
        .header("x-kiln-file-size", size)
        .body(download_body(download))
        .map_err(|e| kiln_core::Error::internal(e.to_string()).into())
}

/// Uploads a file into the guest (streamed, atomic replace; parents are created).
#[utoipa::path(put, path = "/v1/sandboxes/{id}/files",
    params(("id" = String, Path, description = "id or name"), ("path" = String, Query, description = "absolute guest path"),
           ("mode" = Option<String>, Query, description = "octal mode, e.g. 0644")),
    request_body(content = Vec<u8>, content_type = "application/octet-stream"),
    responses((status = 200, body = WriteResult), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
              (status = 413, body = ErrorBody)))]
pub async fn write(
    State(engine): State<AppState>,
    Extension(limits): Extension<Limits>,
    Path(id): Path<String>,
    q: QueryPairs,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Json<WriteResult>> {
    let path = q.require("path")?.to_string();
    let mode = q.get("mode").map(parse_mode).transpose()?;
    let max = limits.max_upload_bytes;
    let (mut reader, over) = capped_upload(&headers, body, max)?;
    match engine.write_file(&id, &path, mode, &mut reader).await {
        Ok(bytes) => Ok(Json(WriteResult { path, bytes })),
        Err(_) if over.load(Ordering::Relaxed) => Err(upload_too_large(max)),
        Err(e) => {
            drain_rest_of_upload(&mut reader).await;
            Err(e.into())
        }
    }
}

/// The request body as a reader cut off past `max` bytes (the flag says it was), refusing at once a
/// body whose declared length is over.
pub(crate) fn capped_upload(
    headers: &HeaderMap,
    body: Body,
    max: u64,
) -> Result<(impl tokio::io::AsyncRead + Unpin + Send, Arc<AtomicBool>), ApiError> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max) {
        return Err(upload_too_large(max));
    }
    // A chunked upload has no length up front: count as it streams and cut it off past the limit.
    let over = Arc::new(AtomicBool::new(false));
    let mut seen = 0u64;
    let flag = over.clone();
    let stream = body
        .into_data_stream()
        .map_err(std::io::Error::other)
        .and_then(move |chunk: bytes::Bytes| {
            seen = seen.saturating_add(chunk.len() as u64);
            let res = if seen > max {
                flag.store(true, Ordering::Relaxed);
                Err(std::io::Error::other("upload size limit exceeded"))
            } else {
                Ok(chunk)
            };
            futures::future::ready(res)
        });
    Ok((tokio_util::io::StreamReader::new(stream), over))
}

/// Reads and discards what is left of a refused upload (bounded in time) before answering.
///
/// A client that sends its whole body before reading (most do) would otherwise see the connection
/// reset under its feet and never read the error, e.g. `guest_disk_full` halfway through a big file.
pub(crate) async fn drain_rest_of_upload<R: tokio::io::AsyncRead + Unpin>(reader: &mut R) {
    const LINGER: std::time::Duration = std::time::Duration::from_secs(30);
    let mut sink = tokio::io::sink();
    let drain = tokio::io::copy(reader, &mut sink);
    let _ = tokio::time::timeout(LINGER, drain).await;
}

/// Removes a file, or a directory (with `recursive=true` when not empty).
#[utoipa::path(delete, path = "/v1/sandboxes/{id}/files",
    params(("id" = String, Path, description = "id or name"), ("path" = String, Query, description = "absolute guest path"),
           ("recursive" = Option<bool>, Query, description = "remove directories with their contents")),
    responses((status = 204), (status = 404, body = ErrorBody)))]
pub async fn remove(
    State(engine): State<AppState>,
    Path(id): Path<String>,
    q: QueryPairs,
) -> ApiResult<StatusCode> {
    let path = q.require("path")?;
    engine.remove(&id, path, q.flag("recursive")?).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Lists a guest directory.
#[utoipa::path(get, path = "/v1/sandboxes/{id}/files/list",
    params(("id" = String, Path, description = "id or name"), ("path" = String, Query, description = "absolute guest directory")),
    responses((status = 200, body = [DirEntry]), (status = 404, body = ErrorBody)))]
pub async fn list(
    State(engine): State<AppState>,
    Path(id): Path<String>,
    q: QueryPairs,
) -> ApiResult<Json<Vec<DirEntry>>> {
    let path = q.require("path")?;
    Ok(Json(
        engine
            .list_dir(&id, path)
            .await?
            .into_iter()
            .map(DirEntry::from)
            .collect(),
    ))
}

/// Size, mode, kind and modification time of a guest path.
#[utoipa::path(get, path = "/v1/sandboxes/{id}/files/stat",
    params(("id" = String, Path, description = "id or name"), ("path" = String, Query, description = "absolute guest path")),
    responses((status = 200, body = FileStat), (status = 404, body = ErrorBody)))]
pub async fn stat(
    State(engine): State<AppState>,
    Path(id): Path<String>,
    q: QueryPairs,
) -> ApiResult<Json<FileStat>> {
    let path = q.require("path")?;
    Ok(Json(engine.stat(&id, path).await?.into()))
}

/// Creates a directory and its missing parents.
#[utoipa::path(post, path = "/v1/sandboxes/{id}/files/mkdir", request_body = MkdirBody,
    params(("id" = String, Path, description = "id or name")),
    responses((status = 204), (status = 400, body = ErrorBody)))]
pub async fn mkdir(
    State(engine): State<AppState>,
    Path(id): Path<String>,
    ApiJson(b): ApiJson<MkdirBody>,
) -> ApiResult<StatusCode> {
    engine.mkdir(&id, &b.path).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// A response body streaming what the guest sends; a guest error mid-stream ends the body with an error,
/// which cuts the HTTP response short (the client sees it incomplete, not a clean end).
pub(super) fn download_body(download: kiln_core::FileDownload) -> Body {
    Body::from_stream(futures::stream::unfold(
        Some(download),
        |state| async move {
            let mut d = state?;
            match d.next_chunk().await {
                Some(Ok(chunk)) => Some((Ok::<_, std::io::Error>(chunk), Some(d))),
                Some(Err(e)) => Some((Err(std::io::Error::other(e.to_string())), None)),
                None => None,
            }
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::parse_mode;

    #[test]
    fn modes_are_octal() {
        assert_eq!(parse_mode("644").ok(), Some(0o644));
        assert_eq!(parse_mode("0o755").ok(), Some(0o755));
        assert!(parse_mode("999").is_err());
        assert!(parse_mode("17777").is_err());
    }
}
