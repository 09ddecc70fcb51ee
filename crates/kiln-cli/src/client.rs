//! A minimal HTTP/1.1 client for the kiln API over its unix socket, or TCP with a bearer token.

use std::path::PathBuf;

use anyhow::{anyhow, Context};
use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Method, Request, Response};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;

pub type ReqBody = BoxBody<Bytes, std::io::Error>;

pub enum Target {
    Unix(PathBuf),
    Tcp { addr: String, token: String },
}

pub struct Client {
    target: Target,
}

/// An error reported by the API, shown to the user as `error: MESSAGE [code]`.
#[derive(Debug)]
pub struct ApiError {
    pub code: String,
    pub message: String,
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} [{}]", self.message, self.code)
    }
}
impl std::error::Error for ApiError {}

pub fn empty() -> ReqBody {
    Full::new(Bytes::new())
        .map_err(|never| match never {})
        .boxed()
}

pub fn json_body(v: &serde_json::Value) -> ReqBody {
    Full::new(Bytes::from(v.to_string()))
        .map_err(|never| match never {})
        .boxed()
}

pub fn encode(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

impl Client {
    pub fn new(target: Target) -> Client {
        Client { target }
    }

    pub async fn send(
        &self,
        method: Method,
        path: &str,
        content_type: Option<&str>,
        body: ReqBody,
    ) -> anyhow::Result<Response<Incoming>> {
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "kiln");
        if let Some(ct) = content_type {
            req = req.header("content-type", ct);
        }
        let resp = match &self.target {
            Target::Unix(sock) => {
                let stream = tokio::net::UnixStream::connect(sock).await.with_context(|| {
                    format!(
                        "cannot reach the kiln daemon at {} — is `kiln serve` running? (set --socket or KILN_SOCKET)",
                        sock.display()
                    )
                })?;
                let (mut sender, conn) =
                    hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
                tokio::spawn(conn);
                sender.send_request(req.body(body)?).await?
            }
            Target::Tcp { addr, token } => {
                let stream = tokio::net::TcpStream::connect(addr)
                    .await
                    .with_context(|| format!("cannot reach the kiln daemon at {addr}"))?;
                let (mut sender, conn) =
                    hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
                tokio::spawn(conn);
                let req = req
                    .header("authorization", format!("Bearer {token}"))
                    .body(body)?;
                sender.send_request(req).await?
            }
        };
        Ok(resp)
    }

    /// Sends a request and fails with the API's error when the status is not a success.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        content_type: Option<&str>,
        body: ReqBody,
    ) -> anyhow::Result<Response<Incoming>> {
        let resp = self.send(method, path, content_type, body).await?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status();
        let bytes = resp.into_body().collect().await?.to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
        Err(ApiError {
            code: v["error"]["code"]
                .as_str()
                .unwrap_or("http_error")
                .to_string(),
            message: v["error"]["message"]
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| format!("HTTP {status}: {}", String::from_utf8_lossy(&bytes))),
        }
        .into())
    }

    pub async fn json<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> anyhow::Result<T> {
        let (ct, body) = match &body {
            Some(v) => (Some("application/json"), json_body(v)),
            None => (None, empty()),
        };
        let resp = self.call(method, path, ct, body).await?;
        let bytes = resp.into_body().collect().await?.to_bytes();
        if bytes.is_empty() {
            return serde_json::from_str("null").map_err(|e| anyhow!("empty response: {e}"));
        }
        serde_json::from_slice(&bytes)
            .with_context(|| format!("unexpected response: {}", String::from_utf8_lossy(&bytes)))
    }
}

/// Reads an NDJSON response body event by event until `on_event` returns a value (`Some`) or the body ends
/// (`None`).
pub async fn read_ndjson<T>(
    mut body: Incoming,
    mut on_event: impl FnMut(serde_json::Value) -> anyhow::Result<Option<T>>,
) -> anyhow::Result<Option<T>> {
    let mut pending: Vec<u8> = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame?;
        let Some(data) = frame.data_ref() else {
            continue;
        };
        pending.extend_from_slice(data);
        while let Some(pos) = pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = pending.drain(..=pos).collect();
            if let Some(done) = on_event(serde_json::from_slice(&line)?)? {
                return Ok(Some(done));
            }
        }
    }
    Ok(None)
}
