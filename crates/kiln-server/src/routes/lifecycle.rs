use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use kiln_core::operations::sandbox_resources;
use kiln_core::Sandbox;

use super::operations::run;
use super::AppState;
use crate::error::ErrorBody;

/// Freezes the sandbox's vCPUs (memory stays; no disk write).
#[utoipa::path(post, path = "/v1/sandboxes/{id}/pause", params(("id" = String, Path)),
    responses((status = 200, body = Sandbox), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn pause(
    State(engine): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let res = sandbox_resources(&engine, &id);
    run(
        &engine,
        &headers,
        "sandbox.pause",
        res,
        StatusCode::OK,
        move |e| async move { e.pause(&id).await },
    )
    .await
}

/// Continues a paused sandbox.
#[utoipa::path(post, path = "/v1/sandboxes/{id}/resume", params(("id" = String, Path)),
    responses((status = 200, body = Sandbox), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn resume(
    State(engine): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let res = sandbox_resources(&engine, &id);
    run(
        &engine,
        &headers,
        "sandbox.resume",
        res,
        StatusCode::OK,
        move |e| async move { e.resume(&id).await },
    )
    .await
}

/// Hibernates: saves the whole machine to disk and frees its RAM (the VM process exits).
#[utoipa::path(post, path = "/v1/sandboxes/{id}/stop", params(("id" = String, Path)),
    responses((status = 200, body = Sandbox), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn stop(
    State(engine): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let res = sandbox_resources(&engine, &id);
    run(
        &engine,
        &headers,
        "sandbox.stop",
        res,
        StatusCode::OK,
        move |e| async move { e.stop(&id).await },
    )
    .await
}

/// Brings a hibernated sandbox back where it was (same id, name and disk).
#[utoipa::path(post, path = "/v1/sandboxes/{id}/start", params(("id" = String, Path)),
    responses((status = 200, body = Sandbox), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn start(
    State(engine): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let res = sandbox_resources(&engine, &id);
    run(
        &engine,
        &headers,
        "sandbox.start",
        res,
        StatusCode::OK,
        move |e| async move { e.start(&id).await },
    )
    .await
}

/// Forks a running sandbox into `count` new running sandboxes that continue from its current state.
/// All or nothing: when a child cannot start, the others are removed and the error says which and why.
#[utoipa::path(post, path = "/v1/sandboxes/{id}/fork", request_body = kiln_core::ForkRequest, params(("id" = String, Path)),
    responses((status = 201, body = kiln_core::ForkResult), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
              (status = 409, body = ErrorBody), (status = 429, body = ErrorBody)))]
pub async fn fork(
    State(engine): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    crate::extract::OptionalJson(req): crate::extract::OptionalJson<kiln_core::ForkRequest>,
) -> Response {
    let res = sandbox_resources(&engine, &id);
    run(
        &engine,
        &headers,
        "sandbox.fork",
        res,
        StatusCode::CREATED,
        move |e| async move { e.fork_with_lifetime(&id, req).await },
    )
    .await
}
