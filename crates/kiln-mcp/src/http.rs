//! Streamable HTTP transport (`kiln mcp --http ADDR`): the MCP endpoint is `http://ADDR/mcp`. Anyone who
//! can reach it drives sandboxes with the daemon's rights, so every request must carry the bearer token
//! the server was started with.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use rmcp::transport::streamable_http_server::{
    session::local::LocalSessionManager, StreamableHttpServerConfig, StreamableHttpService,
};

use crate::{Daemon, Kiln};

/// Compares without stopping at the first difference, so timing does not reveal the token.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn require_token(State(token): State<Arc<String>>, req: Request, next: Next) -> Response {
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match presented {
        Some(t) if same(t.as_bytes(), token.as_bytes()) => next.run(req).await,
        _ => (
            StatusCode::UNAUTHORIZED,
            axum::Json(serde_json::json!({"error": {
                "code": "unauthorized",
                "message": "missing or invalid bearer token: send 'Authorization: Bearer <token>' with the token `kiln mcp --http` was started with (KILN_MCP_TOKEN)",
            }})),
        )
            .into_response(),
    }
}

/// Serves the tools on `listener` until the process ends; requests need `Authorization: Bearer token`.
pub async fn serve_http(
    daemon: Arc<dyn Daemon>,
    listener: tokio::net::TcpListener,
    token: String,
) -> anyhow::Result<()> {
    let addr: SocketAddr = listener.local_addr()?;
    // rmcp checks the Host header against this list (DNS rebinding); loopback names plus the bound address.
    let hosts = vec![
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "::1".to_string(),
        addr.ip().to_string(),
        addr.to_string(),
    ];
    let service: StreamableHttpService<Kiln, LocalSessionManager> = StreamableHttpService::new(
        move || Ok(Kiln::new(daemon.clone())),
        Default::default(),
        StreamableHttpServerConfig::default().with_allowed_hosts(hosts),
    );
    let app = axum::Router::new().nest_service("/mcp", service).layer(
        axum::middleware::from_fn_with_state(Arc::new(token), require_token),
    );
    axum::serve(listener, app).await?;
    Ok(())
}
