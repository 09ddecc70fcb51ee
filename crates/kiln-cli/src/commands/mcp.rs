//! `kiln mcp`: kiln's tools for AI agents over the Model Context Protocol (crates/kiln-mcp), talking to
//! the daemon through this CLI's client and so with the same --socket / --url / --token.

use std::process::ExitCode;
use std::sync::Arc;

use clap::Args;
use http_body_util::{BodyExt, Full};
use hyper::Method;
use kiln_mcp::{ApiError, Body, Daemon, Reply};

use crate::client::{empty, json_body, ApiError as ClientError, Client};
use crate::Cli;

#[derive(Args)]
pub struct McpArgs {
    /// Serve streamable HTTP on this address (e.g. 127.0.0.1:8765, endpoint /mcp) instead of stdio.
    /// Requests need `Authorization: Bearer $KILN_MCP_TOKEN`; without that variable a token is made
    /// and printed on stderr.
    #[arg(long, value_name = "ADDR")]
    http: Option<std::net::SocketAddr>,
}

struct CliDaemon(Client);

fn api_error(e: anyhow::Error) -> ApiError {
    match e.downcast_ref::<ClientError>() {
        Some(c) => ApiError {
            code: c.code.clone(),
            message: c.message.clone(),
        },
        None => ApiError {
            code: "daemon_unreachable".into(),
            message: format!("{e:#}"),
        },
    }
}

impl Daemon for CliDaemon {
    fn request(&self, method: &'static str, path: String, body: Body) -> Reply<'_> {
        Box::pin(async move {
            let method = Method::from_bytes(method.as_bytes()).map_err(|e| api_error(e.into()))?;
            let (ct, body) = match body {
                Body::None => (None, empty()),
                Body::Json(v) => (Some("application/json"), json_body(&v)),
                Body::Bytes(b) => (
                    Some("application/octet-stream"),
                    Full::new(bytes::Bytes::from(b))
                        .map_err(|never| match never {})
                        .boxed(),
                ),
            };
            let resp = self
                .0
                .call(method, &path, ct, body)
                .await
                .map_err(api_error)?;
            let bytes = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| api_error(e.into()))?
                .to_bytes();
            Ok(bytes.to_vec())
        })
    }
}

pub async fn run(cli: &Cli, args: &McpArgs) -> anyhow::Result<ExitCode> {
    let daemon: Arc<dyn Daemon> = Arc::new(CliDaemon(cli.client()?));
    match args.http {
        None => kiln_mcp::serve_stdio(daemon).await?,
        Some(addr) => {
            let token = match std::env::var("KILN_MCP_TOKEN") {
                Ok(t) if !t.trim().is_empty() => t.trim().to_string(),
                _ => {
                    let mut bytes = [0u8; 32];
                    std::io::Read::read_exact(
                        &mut std::fs::File::open("/dev/urandom")?,
                        &mut bytes,
                    )?;
                    let t: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
                    eprintln!("MCP token (send as 'Authorization: Bearer <token>'): {t}");
                    t
                }
            };
            let listener = tokio::net::TcpListener::bind(addr).await?;
            eprintln!("kiln MCP server on http://{}/mcp", listener.local_addr()?);
            kiln_mcp::serve_http(daemon, listener, token).await?;
        }
    }
    Ok(ExitCode::SUCCESS)
}
