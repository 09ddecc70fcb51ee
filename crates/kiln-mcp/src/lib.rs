//! kiln's Model Context Protocol server: tools an AI agent uses to make sandboxes, run commands and move
//! files in them, and checkpoint (snapshot) and roll back (restore) before and after risky steps. It talks
//! to the daemon through a [`Daemon`] (the CLI's API client), so it runs with the caller's access and
//! every error keeps kiln's stable code.

mod http;
mod tools;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

pub use http::serve_http;
pub use tools::Kiln;

/// A request body for the daemon.
pub enum Body {
    None,
    Json(serde_json::Value),
    Bytes(Vec<u8>),
}

/// An error as the API reports it: a stable code (docs/api.md) and a message saying what to do.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub code: String,
    pub message: String,
}

pub type Reply<'a> = Pin<Box<dyn Future<Output = Result<Vec<u8>, ApiError>> + Send + 'a>>;

/// How the MCP server reaches the daemon.
pub trait Daemon: Send + Sync + 'static {
    /// Sends `method path` with `body` and returns the response body of a success.
    fn request(&self, method: &'static str, path: String, body: Body) -> Reply<'_>;
}

/// Serves the tools over stdin/stdout until the client closes them.
pub async fn serve_stdio(daemon: Arc<dyn Daemon>) -> anyhow::Result<()> {
    use rmcp::ServiceExt;
    let service = Kiln::new(daemon)
        .serve(rmcp::transport::stdio())
        .await
        .map_err(|e| anyhow::anyhow!("MCP session did not start: {e}"))?;
    service.waiting().await?;
    Ok(())
}
