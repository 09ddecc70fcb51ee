use axum::extract::State;
use axum::Json;
use serde::Serialize;
use utoipa::ToSchema;

use super::AppState;
use crate::error::ApiResult;

#[derive(Serialize, ToSchema)]
pub struct Info {
    pub version: String,
    /// `kvm` or `tcg`.
    pub accel: String,
    pub accel_reason: String,
    pub data_dir: String,
    /// What the daemon enforces on VMs; `confined: false` only under `kiln serve --unconfined`.
    pub confinement: kiln_core::confine::Summary,
    /// How guests are networked: `user` or `bridged` (docs/networking.md).
    pub network: String,
    /// Why: the flag that chose it, or what the default found on this host.
    pub network_reason: String,
}

#[derive(Serialize, ToSchema)]
pub struct Health {
    pub status: String,
}

#[derive(Serialize, ToSchema)]
pub struct ImageSummary {
    pub name: String,
    pub kernel_version: String,
    pub rootfs_size_bytes: u64,
    pub created_at: String,
}

/// Liveness check.
#[utoipa::path(get, path = "/v1/health", responses((status = 200, body = Health)))]
pub async fn health() -> Json<Health> {
    Json(Health {
        status: "ok".into(),
    })
}

/// Daemon version and the accelerator in use.
#[utoipa::path(get, path = "/v1/info", responses((status = 200, body = Info)))]
pub async fn info(State(engine): State<AppState>) -> Json<Info> {
    Json(Info {
        version: env!("CARGO_PKG_VERSION").into(),
        accel: engine.accel().accel.to_string(),
        accel_reason: engine.accel().reason.clone(),
        data_dir: engine.data_dir().display().to_string(),
        confinement: engine.confinement(),
        network: engine.config().network.name().into(),
        network_reason: engine.config().network_reason.clone(),
    })
}

/// Guest images (templates) available to `POST /v1/sandboxes`.
#[utoipa::path(get, path = "/v1/images", responses((status = 200, body = [ImageSummary])))]
pub async fn images(State(engine): State<AppState>) -> ApiResult<Json<Vec<ImageSummary>>> {
    let list = engine
        .images()
        .list()
        .map_err(|e| kiln_core::Error::internal(e.to_string()))?;
    Ok(Json(
        list.into_iter()
            .map(|i| ImageSummary {
                name: i.name,
                kernel_version: i.manifest.kernel_version,
                rootfs_size_bytes: i.manifest.rootfs_size_bytes,
                created_at: i.manifest.created_at.to_rfc3339(),
            })
            .collect(),
    ))
}
