//! Reads small request bodies in full before the handler runs.
//!
//! A handler that takes no body (stop, start, delete, ...) would otherwise answer without reading the
//! client's bytes: if they arrive after the answer, the client's write fails (broken pipe); if they sit
//! unread when the connection closes, the connection is reset and the client may lose the answer. Large
//! bodies (file uploads) stream to handlers that read them.

use axum::body::Body;
use axum::extract::Request;
use axum::http::header::CONTENT_LENGTH;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

/// Bodies up to this size are read before the handler runs.
const SMALL_BODY: usize = 64 * 1024;

pub async fn read_small_bodies(req: Request, next: Next) -> Response {
    let small = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok())
        .is_some_and(|n| n > 0 && n <= SMALL_BODY);
    if !small {
        return next.run(req).await;
    }
    let (parts, body) = req.into_parts();
    match axum::body::to_bytes(body, SMALL_BODY).await {
        Ok(bytes) => {
            next.run(Request::from_parts(parts, Body::from(bytes)))
                .await
        }
        Err(e) => crate::error::ApiError::invalid(format!(
            "could not read the request body ({e}); send the whole body announced by Content-Length"
        ))
        .into_response(),
    }
}
