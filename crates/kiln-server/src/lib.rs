//! kiln-server: the REST API under `/v1`, its OpenAPI document, and the listeners (a 0600 unix socket by
//! default; TCP only with a bearer token).

pub mod auth;
mod drain;
pub mod error;
pub mod extract;
pub mod routes;

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::Arc;

use axum::routing::{get, post};
use axum::Router;
use kiln_core::Engine;
use tracing::info;
use utoipa::OpenApi;

use crate::error::ApiError;
use crate::routes::{exec, files, lifecycle, sandboxes, snapshots, system};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "kiln",
        description = "Self-hosted microVM sandboxes with snapshots, restore and fork."
    ),
    paths(
        system::health,
        system::info,
        system::images,
        sandboxes::create,
        sandboxes::list,
        sandboxes::get,
        sandboxes::delete,
        sandboxes::logs,
        exec::exec,
        lifecycle::pause,
        lifecycle::resume,
        lifecycle::stop,
        lifecycle::start,
        lifecycle::fork,
        snapshots::create,
        snapshots::list,
        snapshots::get,
        snapshots::delete,
        snapshots::resume,
        snapshots::restore,
        files::read,
        files::write,
        files::remove,
        files::list,
        files::stat,
        files::mkdir,
    ),
    components(schemas(error::ErrorBody, error::ErrorDetail, exec::ExecStreamEvent))
)]
pub struct ApiDoc;

pub fn router(engine: Arc<Engine>) -> Router {
    Router::new()
        .route("/v1/health", get(system::health))
        .route("/v1/info", get(system::info))
        .route("/v1/images", get(system::images))
        .route(
            "/v1/openapi.json",
            get(|| async { axum::Json(ApiDoc::openapi()) }),
        )
        .route(
            "/v1/sandboxes",
            post(sandboxes::create).get(sandboxes::list),
        )
        .route(
            "/v1/sandboxes/{id}",
            get(sandboxes::get).delete(sandboxes::delete),
        )
        .route("/v1/sandboxes/{id}/logs", get(sandboxes::logs))
        .route("/v1/sandboxes/{id}/exec", post(exec::exec))
        .route("/v1/sandboxes/{id}/pause", post(lifecycle::pause))
        .route("/v1/sandboxes/{id}/resume", post(lifecycle::resume))
        .route("/v1/sandboxes/{id}/stop", post(lifecycle::stop))
        .route("/v1/sandboxes/{id}/start", post(lifecycle::start))
        .route("/v1/sandboxes/{id}/fork", post(lifecycle::fork))
        .route("/v1/sandboxes/{id}/snapshots", post(snapshots::create))
        .route("/v1/snapshots", get(snapshots::list))
        .route(
            "/v1/snapshots/{id}",
            get(snapshots::get).delete(snapshots::delete),
        )
        .route("/v1/snapshots/{id}/resume", post(snapshots::resume))
        .route("/v1/snapshots/{id}/restore", post(snapshots::restore))
        .route(
            "/v1/sandboxes/{id}/files",
            get(files::read).put(files::write).delete(files::remove),
        )
        .route("/v1/sandboxes/{id}/files/list", get(files::list))
        .route("/v1/sandboxes/{id}/files/stat", get(files::stat))
        .route("/v1/sandboxes/{id}/files/mkdir", post(files::mkdir))
        .fallback(|| async {
            ApiError::new(
                axum::http::StatusCode::NOT_FOUND,
                "route_not_found",
                "no such API route; see /v1/openapi.json for the routes kiln serves",
            )
        })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                axum::http::StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "this route does not accept that HTTP method; see /v1/openapi.json",
            )
        })
        .layer(axum::middleware::from_fn(drain::read_small_bodies))
        .with_state(engine)
}

pub struct ServeOptions {
    pub socket: PathBuf,
    /// Also listen on TCP; requires `token`.
    pub listen: Option<SocketAddr>,
    pub token: Option<String>,
}

/// Serves the API until Ctrl-C / SIGTERM. VMs keep running after the daemon exits.
pub async fn serve(engine: Arc<Engine>, opts: ServeOptions) -> anyhow::Result<()> {
    let app = router(engine);
    if let Some(parent) = opts.socket.parent() {
        std::fs::create_dir_all(parent)?;
    }
    if opts.socket.exists() {
        // Refuse to steal the socket from a live daemon; remove a stale one.
        if std::os::unix::net::UnixStream::connect(&opts.socket).is_ok() {
            anyhow::bail!(
                "another kiln daemon is already listening on {}; stop it first or use --socket",
                opts.socket.display()
            );
        }
        std::fs::remove_file(&opts.socket)?;
    }
    let unix = tokio::net::UnixListener::bind(&opts.socket)?;
    std::fs::set_permissions(&opts.socket, std::fs::Permissions::from_mode(0o600))?;
    info!(socket = %opts.socket.display(), "API listening on unix socket (mode 0600)");
    let unix_app = app.clone();
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(async move { axum::serve(unix, unix_app).await });
    if let Some(addr) = opts.listen {
        let token = opts.token.ok_or_else(|| {
            anyhow::anyhow!("--listen needs --token-file: TCP access requires a bearer token")
        })?;
        let tcp = tokio::net::TcpListener::bind(addr).await?;
        info!(%addr, "API listening on TCP (bearer token required)");
        let tcp_app = app.layer(axum::middleware::from_fn_with_state(
            Arc::new(auth::TokenCheck::new(&token)),
            auth::require_token,
        ));
        tasks.spawn(async move { axum::serve(tcp, tcp_app).await });
    }
    tokio::select! {
        res = tasks.join_next() => {
            if let Some(Ok(Err(e))) = res { return Err(e.into()); }
        }
        _ = shutdown_signal() => info!("shutting down; VMs keep running and are re-adopted on next start"),
    }
    let _ = std::fs::remove_file(&opts.socket);
    Ok(())
}

async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
