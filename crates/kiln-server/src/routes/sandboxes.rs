use std::collections::BTreeMap;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::Json;
use kiln_core::operations::sandbox_resources;
use kiln_core::{CreateSandbox, Resources, Sandbox};

use super::operations::run;
use super::AppState;
use crate::error::{ApiError, ApiResult, ErrorBody};
use crate::extract::{ApiJson, QueryPairs};

/// Creates a sandbox and boots it; answers once its guest agent is ready.
#[utoipa::path(post, path = "/v1/sandboxes", request_body = CreateSandbox,
    responses((status = 201, body = Sandbox), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
              (status = 409, body = ErrorBody), (status = 429, body = ErrorBody), (status = 500, body = ErrorBody)))]
pub async fn create(
    State(engine): State<AppState>,
    headers: HeaderMap,
    ApiJson(req): ApiJson<CreateSandbox>,
) -> Response {
    // The new sandbox's id is added to the operation when it exists; until then, what the request names.
    let mut res = Resources::default();
    res.snapshots.extend(req.snapshot.clone());
    let target = req
        .snapshot
        .clone()
        .or(req.name.clone())
        .unwrap_or_default();
    run(
        &engine,
        &headers,
        "sandbox.create",
        (target, res),
        StatusCode::CREATED,
        move |e| async move { e.create_with_lifetime(req).await },
    )
    .await
}

/// Lists sandboxes, optionally only those carrying every `label=KEY=VALUE` given.
#[utoipa::path(get, path = "/v1/sandboxes",
    params(("label" = Option<String>, Query, description = "KEY=VALUE; repeat to require several")),
    responses((status = 200, body = [Sandbox]), (status = 400, body = ErrorBody)))]
pub async fn list(State(engine): State<AppState>, q: QueryPairs) -> ApiResult<Json<Vec<Sandbox>>> {
    let mut filter = BTreeMap::new();
    for kv in q.all("label") {
        let (k, v) = kiln_core::validate::parse_key_value(kv)?;
        filter.insert(k, v);
    }
    Ok(Json(engine.list(&filter)?))
}

/// One sandbox, by id or name.
#[utoipa::path(get, path = "/v1/sandboxes/{id}", params(("id" = String, Path, description = "id or name")),
    responses((status = 200, body = Sandbox), (status = 404, body = ErrorBody)))]
pub async fn get(
    State(engine): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<Json<Sandbox>> {
    Ok(Json(engine.get(&id)?))
}

/// Deletes a sandbox: its VM, disk and memory are freed.
#[utoipa::path(delete, path = "/v1/sandboxes/{id}", params(("id" = String, Path, description = "id or name")),
    responses((status = 204), (status = 404, body = ErrorBody)))]
pub async fn delete(
    State(engine): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let res = sandbox_resources(&engine, &id);
    run(
        &engine,
        &headers,
        "sandbox.delete",
        res,
        StatusCode::NO_CONTENT,
        move |e| async move { e.delete(&id).await },
    )
    .await
}

/// The sandbox's serial console output (kernel and init messages) as the guest wrote it: the end of a
/// ring of at most 1 MiB.
#[utoipa::path(get, path = "/v1/sandboxes/{id}/logs", params(("id" = String, Path, description = "id or name"),
        ("tail" = Option<u64>, Query, description = "only the last BYTES (at most 1 MiB is kept)"),
        ("lines" = Option<usize>, Query, description = "only the last N non-empty lines")),
    responses((status = 200, body = String, content_type = "text/plain"), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn logs(
    State(engine): State<AppState>,
    Path(id): Path<String>,
    q: QueryPairs,
) -> ApiResult<([(axum::http::HeaderName, &'static str); 1], Vec<u8>)> {
    let number = |key: &str| -> Result<Option<u64>, ApiError> {
        q.get(key)
            .map(|v| {
                v.parse::<u64>().map_err(|_| {
                    ApiError::invalid(format!(
                        "query parameter '{key}' must be a whole number, not '{v}'"
                    ))
                })
            })
            .transpose()
    };
    let tail = number("tail")?.unwrap_or(kiln_core::console::RING_BYTES);
    let lines = number("lines")?;
    let bytes = engine.console_tail(&id, tail).await?;
    // Raw bytes: a guest may write anything to its console, and replacing invalid UTF-8 would triple it.
    let body = match lines {
        Some(n) => kiln_core::console::last_lines(&bytes, usize::try_from(n).unwrap_or(usize::MAX))
            .into_bytes(),
        None => bytes,
    };
    Ok((
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; charset=utf-8",
        )],
        body,
    ))
}

/// Sets or renews a sandbox's lifetime: `timeout` counts from now (0 removes it), `idle_timeout`,
/// `on_timeout` and `auto_resume` change when given. Answers with the sandbox and its new deadlines.
#[utoipa::path(post, path = "/v1/sandboxes/{id}/timeout", request_body = kiln_core::SetTimeout,
    params(("id" = String, Path, description = "id or name")),
    responses((status = 200, body = Sandbox), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn set_timeout(
    State(engine): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<kiln_core::SetTimeout>,
) -> Response {
    let res = sandbox_resources(&engine, &id);
    run(
        &engine,
        &headers,
        "sandbox.set_timeout",
        res,
        StatusCode::OK,
        move |e| async move { e.set_timeout(&id, req).await },
    )
    .await
}
