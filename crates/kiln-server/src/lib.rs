//! kiln-server: the REST API under `/v1`, its OpenAPI document, and the listeners (a 0600 unix socket by
//! default; TCP only with a bearer token).

mod activity;
pub mod auth;
mod drain;
pub mod error;
pub mod extract;
pub mod limits;
mod openapi;
pub mod routes;
pub mod tcp;
pub mod ui;

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
use crate::openapi::AuthAndCommonErrors;
use crate::routes::{
    bundles, checkpoints, dirs, doctor, events, exec, files, lifecycle, operations, ports,
    processes, remotes, sandboxes, snapshots, system, volumes,
};

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
        sandboxes::set_timeout,
        checkpoints::set_policy,
        checkpoints::clear_policy,
        checkpoints::list,
        checkpoints::rewind,
        exec::exec,
        lifecycle::pause,
        lifecycle::resume,
        lifecycle::stop,
        lifecycle::start,
        lifecycle::fork,
        ports::list,
        ports::publish,
        ports::unpublish,
        snapshots::create,
        snapshots::list,
        snapshots::get,
        snapshots::delete,
        snapshots::resume,
        snapshots::restore,
        snapshots::name,
        bundles::export,
        bundles::import,
        files::read,
        files::write,
        files::remove,
        files::list,
        files::stat,
        files::mkdir,
        dirs::upload,
        dirs::download,
        dirs::batch,
        dirs::watch,
        volumes::create,
        volumes::list,
        volumes::get,
        volumes::delete,
        doctor::check,
        doctor::repair,
        operations::list,
        operations::get,
        operations::wait,
        processes::start,
        processes::list,
        processes::get,
        processes::stdin,
        processes::signal,
        processes::wait,
        processes::logs,
        events::events,
        events::metrics,
        remotes::list,
        remotes::add,
        remotes::get,
        remotes::remove,
        remotes::snapshots,
        remotes::delete_snapshot,
        remotes::push,
        remotes::pull,
        remotes::gc,
    ),
    components(schemas(error::ErrorBody, kiln_core::events::Event, error::ErrorDetail, exec::ExecStreamEvent, processes::ProcessLogEvent, dirs::WatchEvent)),
    modifiers(&AuthAndCommonErrors)
)]
pub struct ApiDoc;

pub fn router(engine: Arc<Engine>, limits: limits::Limits) -> Router {
    Router::new()
        .route("/v1/health", get(system::health))
        .route("/v1/info", get(system::info))
        .route("/v1/events", get(events::events))
        .route("/metrics", get(events::metrics))
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
        .route("/v1/sandboxes/{id}/timeout", post(sandboxes::set_timeout))
        .route(
            "/v1/sandboxes/{id}/checkpoint-policy",
            axum::routing::put(checkpoints::set_policy).delete(checkpoints::clear_policy),
        )
        .route("/v1/sandboxes/{id}/checkpoints", get(checkpoints::list))
        .route("/v1/sandboxes/{id}/rewind", post(checkpoints::rewind))
        .route("/v1/sandboxes/{id}/exec", post(exec::exec))
        .route("/v1/sandboxes/{id}/pause", post(lifecycle::pause))
        .route("/v1/sandboxes/{id}/resume", post(lifecycle::resume))
        .route("/v1/sandboxes/{id}/stop", post(lifecycle::stop))
        .route("/v1/sandboxes/{id}/start", post(lifecycle::start))
        .route("/v1/sandboxes/{id}/fork", post(lifecycle::fork))
        .route(
            "/v1/sandboxes/{id}/ports",
            get(ports::list).post(ports::publish),
        )
        .route(
            "/v1/sandboxes/{id}/ports/{guest}",
            axum::routing::delete(ports::unpublish),
        )
        .route("/v1/sandboxes/{id}/snapshots", post(snapshots::create))
        .route("/v1/snapshots", get(snapshots::list))
        .route(
            "/v1/snapshots/{id}",
            get(snapshots::get).delete(snapshots::delete),
        )
        .route("/v1/snapshots/{id}/resume", post(snapshots::resume))
        .route("/v1/snapshots/{id}/restore", post(snapshots::restore))
        .route("/v1/snapshots/{id}/names", post(snapshots::name))
        .route("/v1/snapshots/{id}/export", get(bundles::export))
        // A snapshot may be named `import`: GET and DELETE of that path still find it.
        .route(
            "/v1/snapshots/import",
            post(bundles::import)
                .get(bundles::get_named_import)
                .delete(bundles::delete_named_import),
        )
        .route(
            "/v1/sandboxes/{id}/files",
            get(files::read).put(files::write).delete(files::remove),
        )
        .route("/v1/sandboxes/{id}/files/list", get(files::list))
        .route("/v1/sandboxes/{id}/files/stat", get(files::stat))
        .route("/v1/sandboxes/{id}/files/mkdir", post(files::mkdir))
        .route(
            "/v1/sandboxes/{id}/files/dir",
            get(dirs::download).put(dirs::upload),
        )
        .route("/v1/sandboxes/{id}/files/batch", post(dirs::batch))
        .route("/v1/sandboxes/{id}/files/watch", get(dirs::watch))
        .route("/v1/volumes", post(volumes::create).get(volumes::list))
        .route(
            "/v1/volumes/{name}",
            get(volumes::get).delete(volumes::delete),
        )
        .route("/v1/doctor", get(doctor::check))
        .route("/v1/doctor/repair", post(doctor::repair))
        .route("/v1/operations", get(operations::list))
        .route("/v1/operations/{id}", get(operations::get))
        .route("/v1/operations/{id}/wait", get(operations::wait))
        .route(
            "/v1/sandboxes/{id}/processes",
            post(processes::start).get(processes::list),
        )
        .route("/v1/sandboxes/{id}/processes/{pid}", get(processes::get))
        .route(
            "/v1/sandboxes/{id}/processes/{pid}/stdin",
            post(processes::stdin),
        )
        .route(
            "/v1/sandboxes/{id}/processes/{pid}/signal",
            post(processes::signal),
        )
        .route(
            "/v1/sandboxes/{id}/processes/{pid}/wait",
            post(processes::wait),
        )
        .route(
            "/v1/sandboxes/{id}/processes/{pid}/logs",
            get(processes::logs),
        )
        .route("/v1/remotes", get(remotes::list).post(remotes::add))
        .route(
            "/v1/remotes/{name}",
            get(remotes::get).delete(remotes::remove),
        )
        .route("/v1/remotes/{name}/snapshots", get(remotes::snapshots))
        .route(
            "/v1/remotes/{name}/snapshots/{snapshot}",
            axum::routing::delete(remotes::delete_snapshot),
        )
        .route("/v1/remotes/{name}/push", post(remotes::push))
        .route("/v1/remotes/{name}/pull", post(remotes::pull))
        .route("/v1/remotes/{name}/gc", post(remotes::gc))
        .merge(ui::router())
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
        .layer(axum::middleware::from_fn_with_state(
            engine.clone(),
            activity::track,
        ))
        .with_state(engine)
        // Extractors that buffer (JSON) stop at this; uploads stream and check `max_upload_bytes` themselves.
        .layer(axum::extract::DefaultBodyLimit::max(
            usize::try_from(limits.max_body_bytes).unwrap_or(usize::MAX),
        ))
        .layer(axum::Extension(limits))
}

pub struct ServeOptions {
    pub socket: PathBuf,
    /// Also listen on TCP; clients must present the token whose digest is in the data directory.
    pub listen: Option<SocketAddr>,
    pub data_dir: PathBuf,
    pub limits: limits::Limits,
    pub rate: limits::RateConfig,
}

/// Serves the API until Ctrl-C / SIGTERM. VMs keep running after the daemon exits.
pub async fn serve(engine: Arc<Engine>, opts: ServeOptions) -> anyhow::Result<()> {
    let limiter = Arc::new(limits::RateLimiter::new(opts.rate));
    let app = router(engine.clone(), opts.limits);
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
    // The socket is born private: with umask 077 bind creates it 0600-or-stricter, so there is no window
    // between bind and chmod in which another user could connect. (`kiln serve` sets umask 077 for the
    // whole daemon at start; set again here for embedders.)
    // SAFETY: umask has no preconditions.
    unsafe { libc::umask(0o077) };
    let unix = tokio::net::UnixListener::bind(&opts.socket)?;
    std::fs::set_permissions(&opts.socket, std::fs::Permissions::from_mode(0o600))?;
    info!(socket = %opts.socket.display(), "API listening on unix socket (mode 0600)");
    // Rate limiting is outermost, so it also meters requests that fail authentication.
    let unix_app = app.clone().layer(axum::middleware::from_fn_with_state(
        limiter.clone(),
        limits::rate_limit,
    ));
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(async move {
        axum::serve(
            unix,
            unix_app.into_make_service_with_connect_info::<limits::Peer>(),
        )
        .await
    });
    if let Some(addr) = opts.listen {
        if !auth::has_token(&opts.data_dir) {
            anyhow::bail!(
                "--listen needs an API token: run `kiln token rotate` (or pass --token-file) first"
            );
        }
        let tcp = tokio::net::TcpListener::bind(addr).await?;
        info!(%addr, "API listening on TCP (bearer token required)");
        let tcp_app = app
            .layer(axum::middleware::from_fn_with_state(
                Arc::new(auth::TokenCheck::new(&opts.data_dir)),
                auth::require_token,
            ))
            .layer(axum::middleware::from_fn_with_state(
                limiter,
                limits::rate_limit,
            ));
        info!(
            max_connections = tcp::MAX_CONNECTIONS,
            header_timeout_s = tcp::HEADER_TIMEOUT.as_secs(),
            "TCP connections are limited; put a TLS-terminating reverse proxy in front for non-loopback clients"
        );
        tasks.spawn(tcp::serve(tcp, tcp_app));
    }
    tokio::select! {
        res = tasks.join_next() => {
            if let Some(Ok(Err(e))) = res { return Err(e.into()); }
        }
        _ = shutdown_signal() => info!("shutting down; VMs keep running and are re-adopted on next start"),
    }
    // Take no more requests, then let running operations finish (bounded), so an orderly exit does not
    // leave half-done work for start-up recovery.
    tasks.abort_all();
    let _ = std::fs::remove_file(&opts.socket);
    let left = engine.drain_operations(DRAIN_LIMIT).await;
    if left > 0 {
        tracing::warn!(
            count = left,
            "exiting with operations still running; the next start recovers them"
        );
    }
    Ok(())
}

/// How long an orderly exit waits for running operations.
const DRAIN_LIMIT: std::time::Duration = std::time::Duration::from_secs(60);

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
