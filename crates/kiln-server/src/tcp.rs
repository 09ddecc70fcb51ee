//! The TCP listener, hardened against clients that connect and then send nothing or drip bytes
//! (slowloris): at most [`MAX_CONNECTIONS`] connections are served at once — further ones wait in the
//! kernel's accept backlog and hold none of the daemon's descriptors — and a client must send its
//! request's headers within [`HEADER_TIMEOUT`] or its connection is closed. Both apply before the
//! bearer token is checked, which needs the headers. Each connection carries one request (no
//! keep-alive), so no connection idles between requests without a deadline.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tower::ServiceExt;
use tracing::warn;

use crate::limits::Peer;

/// Connections served at once on TCP.
pub const MAX_CONNECTIONS: usize = 512;
/// Time a client has to send a request's headers (from the first byte it is waited for).
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves `app` on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, app: Router) -> std::io::Result<()> {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        // Take a slot before accepting: while all are busy, new connections stay in the backlog.
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return Ok(());
        };
        let (stream, addr): (_, SocketAddr) = match listener.accept().await {
            Ok(conn) => conn,
            Err(e) => {
                // EMFILE and the like: back off rather than spin.
                warn!(error = %e, "accepting a TCP connection failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let svc = app
            .clone()
            .layer(axum::Extension(ConnectInfo(Peer::Ip(addr.ip()))))
            .map_request(|req: axum::http::Request<hyper::body::Incoming>| req.map(Body::new));
        tokio::spawn(async move {
            let _permit = permit;
            // hyper's header timeout starts with the first byte: a client that sends nothing is
            // timed out here.
            if !matches!(
                tokio::time::timeout(HEADER_TIMEOUT, stream.readable()).await,
                Ok(Ok(()))
            ) {
                return;
            }
            let mut builder = Builder::new(TokioExecutor::new());
            // No keep-alive: an idle connection between requests would hold a slot with no deadline.
            builder
                .http1()
                .keep_alive(false)
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT);
            let _ = builder
                .serve_connection_with_upgrades(TokioIo::new(stream), TowerToHyperService::new(svc))
                .await;
        });
    }
}
