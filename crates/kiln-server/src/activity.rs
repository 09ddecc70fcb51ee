//! Use of a sandbox, for its idle timeout: every request under `/v1/sandboxes/{id}/...` counts from its
//! start until its response body has been sent (a streaming exec or a followed log counts while it lasts).
//! `GET /v1/sandboxes/{id}` and listings do not count: looking at a sandbox is not using it.

use std::pin::Pin;
use std::task::{Context, Poll};

use axum::body::{Body, HttpBody};
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;
use bytes::Bytes;
use http_body::{Frame, SizeHint};

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
    let body = Body::new(Tracked {
        inner: body,
        _guard: guard,
    });
    Response::from_parts(parts, body)
}

/// A response body that holds a guard until it is dropped. It passes the inner body's size on, so an
/// answer of known length keeps its `Content-Length` instead of turning chunked.
struct Tracked<G> {
    inner: Body,
    _guard: G,
}

impl<G: Unpin> HttpBody for Tracked<G> {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
