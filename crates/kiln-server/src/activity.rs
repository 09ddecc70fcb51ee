//! Use of a sandbox, for its idle timeout: every request under `/v1/sandboxes/{id}/...` counts from its
//! start until its response body has been sent (a streaming exec or a followed log counts while it lasts).
//! `GET /v1/sandboxes/{id}` and listings do not count: looking at a sandbox is not using it.

use axum::body::{Body, HttpBody};
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;
use futures::StreamExt;

use crate::routes::AppState;

pub(crate) async fn track(State(engine): State<AppState>, req: Request, next: Next) -> Response {
    let id = req
        .uri()
        .path()
        .strip_prefix("/v1/sandboxes/")
        .and_then(|rest| rest.split_once('/'))
        .map(|(id, _)| id.to_string());
    let guard = id.and_then(|id| engine.activity_guard(&id));
    let resp = next.run(req).await;
    let Some(guard) = guard else {
        return resp;
    };
    let (parts, body) = resp.into_parts();
    if body.is_end_stream() {
        return Response::from_parts(parts, body);
    }
    // The guard goes with the body: dropped when the last byte is sent or the client goes away.
    let body = Body::from_stream(body.into_data_stream().map(move |chunk| {
        let _ = &guard;
        chunk
    }));
    Response::from_parts(parts, body)
}
