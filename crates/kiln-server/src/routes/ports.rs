//! Published ports: guest TCP ports forwarded from 127.0.0.1 on the host.

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::Json;
use kiln_core::operations::sandbox_resources;
use kiln_core::{PortMapping, PortRequest, Sandbox};

use super::operations::run;
use super::AppState;
use crate::error::{ApiResult, ErrorBody};
use crate::extract::ApiJson;

/// The sandbox's published ports.
#[utoipa::path(get, path = "/v1/sandboxes/{id}/ports", params(("id" = String, Path, description = "id or name")),
    responses((status = 200, body = [PortMapping]), (status = 404, body = ErrorBody)))]
pub async fn list(
    State(engine): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<Json<Vec<PortMapping>>> {
    Ok(Json(engine.get(&id)?.ports))
}

/// Publishes a guest port of a running (or paused) sandbox on 127.0.0.1: on `host`, or on a free host
/// port kiln picks when `host` is left out. Publishing a guest port again returns its mapping.
#[utoipa::path(post, path = "/v1/sandboxes/{id}/ports", request_body = PortRequest, params(("id" = String, Path)),
    responses((status = 200, body = PortMapping), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
              (status = 409, body = ErrorBody)))]
pub async fn publish(
    State(engine): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<PortRequest>,
) -> Response {
    let res = sandbox_resources(&engine, &id);
    run(
        &engine,
        &headers,
        "sandbox.publish_port",
        res,
        StatusCode::OK,
        move |e| async move { e.publish_port(&id, req).await },
    )
    .await
}

/// Stops forwarding a guest port (`port_not_found` if it is not published).
#[utoipa::path(delete, path = "/v1/sandboxes/{id}/ports/{guest}",
    params(("id" = String, Path), ("guest" = u16, Path, description = "guest port")),
    responses((status = 200, body = Sandbox), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn unpublish(
    State(engine): State<AppState>,
    headers: HeaderMap,
    Path((id, guest)): Path<(String, String)>,
) -> Response {
    let res = sandbox_resources(&engine, &id);
    run(
        &engine,
        &headers,
        "sandbox.unpublish_port",
        res,
        StatusCode::OK,
        move |e| async move {
            let guest: u16 = guest.parse().ok().filter(|g| *g != 0).ok_or_else(|| {
                kiln_core::Error::invalid(format!("invalid guest port '{guest}': use 1-65535"))
            })?;
            e.unpublish_port(&id, guest).await
        },
    )
    .await
}
