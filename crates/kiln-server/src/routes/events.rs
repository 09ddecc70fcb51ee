//! `GET /v1/events`: the event stream as server-sent events, and `GET /metrics`.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, HeaderMap};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::Stream;
use kiln_core::events::{Event, Filter, GapReason};
use tokio::sync::broadcast::error::RecvError;

use super::AppState;
use crate::error::{ApiError, ApiResult};
use crate::extract::QueryPairs;

/// A comment line this often keeps proxies and idle-connection timers from closing a quiet stream.
const HEARTBEAT: Duration = Duration::from_secs(15);

fn to_sse(e: &Event) -> SseEvent {
    SseEvent::default()
        .id(e.seq.to_string())
        .event(e.kind.clone())
        .data(serde_json::to_string(e).unwrap_or_default())
}

/// Server-sent events, one per change of a sandbox, snapshot, volume or operation: `id: SEQ`,
/// `event: KIND`, `data: EVENT` (JSON). `kind` filters by kinds (comma-separated; a prefix such as
/// `sandbox.` matches all of its kinds), `sandbox` by sandbox id or name. `Last-Event-ID` (or `since`)
/// replays what came after that event from the newest 4096; older ones are announced by an `events.gap`
/// event. A `: heartbeat` comment is sent every 15 s.
#[utoipa::path(get, path = "/v1/events",
    params(("kind" = Option<String>, Query, description = "comma-separated kinds or prefixes, e.g. sandbox.state,snapshot."),
           ("sandbox" = Option<String>, Query, description = "only events about this sandbox (id or name)"),
           ("since" = Option<u64>, Query, description = "replay events after this sequence number (as Last-Event-ID)")),
    responses((status = 200, content_type = "text/event-stream", body = kiln_core::events::Event,
               description = "a stream of events"),
              (status = 400, body = crate::error::ErrorBody)))]
pub async fn events(
    State(engine): State<AppState>,
    headers: HeaderMap,
    q: QueryPairs,
) -> ApiResult<Response> {
    // A name is taken for its sandbox's id; anything else (e.g. a deleted sandbox's id) is kept as it is.
    let sandbox = q.get("sandbox").map(|s| {
        engine
            .get(s)
            .map(|sb| sb.id)
            .unwrap_or_else(|_| s.to_string())
    });
    let filter = Filter::new(q.get("kind"), sandbox)?;
    let since = match q
        .get("since")
        .or_else(|| headers.get("last-event-id").and_then(|v| v.to_str().ok()))
    {
        None => None,
        Some(s) => Some(s.trim().parse::<u64>().map_err(|_| {
            ApiError::invalid(format!(
                "'since' / Last-Event-ID must be an event's sequence number (an integer), not '{s}'"
            ))
        })?),
    };
    let sub = engine.events().subscribe(since);
    let mut resp = Sse::new(stream(sub, filter))
        .keep_alive(KeepAlive::new().interval(HEARTBEAT).text("heartbeat"))
        .into_response();
    // Tell buffering proxies (nginx) to pass events on as they come.
    resp.headers_mut()
        .insert("x-accel-buffering", header::HeaderValue::from_static("no"));
    Ok(resp)
}

fn stream(
    sub: kiln_core::events::Subscription,
    filter: Filter,
) -> impl Stream<Item = Result<SseEvent, Infallible>> {
    let replay: std::collections::VecDeque<Arc<Event>> = sub.replay.into();
    // (events still to replay, live feed, filter, last seq sent, events dropped before the next one)
    futures::stream::unfold(
        (replay, sub.live, filter, 0u64, 0u64),
        |(mut replay, mut live, filter, mut last, mut dropped)| async move {
            loop {
                let next = match replay.pop_front() {
                    Some(e) => e,
                    None => match live.recv().await {
                        Ok(e) => e,
                        Err(RecvError::Lagged(n)) => {
                            dropped += n;
                            continue;
                        }
                        Err(RecvError::Closed) => return None,
                    },
                };
                if dropped > 0 {
                    let from = next.seq.saturating_sub(dropped);
                    let gap = kiln_core::events::gap(from, next.seq - 1, GapReason::Slow);
                    dropped = 0;
                    replay.push_front(next);
                    return Some((Ok(to_sse(&gap)), (replay, live, filter, last, dropped)));
                }
                // The live feed can repeat nothing the replay sent, but keep the promise cheaply.
                if next.kind != kiln_core::events::GAP && next.seq <= last {
                    continue;
                }
                if next.kind != kiln_core::events::GAP {
                    last = next.seq;
                }
                if filter.matches(&next) {
                    return Some((Ok(to_sse(&next)), (replay, live, filter, last, dropped)));
                }
            }
        },
    )
}

/// Prometheus metrics (text format 0.0.4); see docs/observability.md.
#[utoipa::path(get, path = "/metrics",
    responses((status = 200, content_type = "text/plain", body = String, description = "Prometheus text format")))]
pub async fn metrics(State(engine): State<AppState>) -> ApiResult<Response> {
    let text = tokio::task::spawn_blocking(move || engine.render_metrics())
        .await
        .map_err(|e| {
            ApiError::from(kiln_core::Error::internal(format!(
                "metrics task failed: {e}"
            )))
        })??;
    Ok((
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response())
}
