//! Running commands: collected (`stream: false`) or streamed as NDJSON events (`stream: true`).

use std::collections::BTreeMap;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine as _;
use kiln_core::agent::{append_capped, AgentError, ExecEvent, ExecHandle, COLLECT_LIMIT};
use kiln_core::ExecSpec;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::AppState;
use crate::error::{ApiError, ApiResult, ErrorBody};
use crate::extract::ApiJson;

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ExecBody {
    /// Program and arguments, run directly (no shell).
    pub argv: Option<Vec<String>>,
    /// A shell command line, run with `/bin/sh -c`.
    pub cmd: Option<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    pub cwd: Option<String>,
    pub timeout_ms: Option<u64>,
    /// Run as this guest user (name or numeric uid) instead of root.
    pub user: Option<String>,
    /// Text fed to the command's standard input.
    pub stdin: Option<String>,
    /// Bytes (base64) fed to standard input.
    pub stdin_b64: Option<String>,
    /// Stream NDJSON events as output arrives instead of one JSON result at the end.
    #[serde(default)]
    pub stream: bool,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ExecResult {
    /// Exit code, or null when the command was killed by a signal.
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub timed_out: bool,
    pub duration_ms: u64,
    /// Standard output as UTF-8 (invalid sequences replaced).
    pub stdout: String,
    pub stderr: String,
    /// Output beyond the collect cap (1 MiB each of stdout and stderr) was dropped; use
    /// `stream: true` to receive all of it.
    pub truncated: bool,
}

/// One line of a streamed exec: `{"type":"started","pid":..}`, `{"type":"stdout","data":".."}`
/// (or `data_b64` when the chunk is not UTF-8), `{"type":"stderr",..}`, `{"type":"exit",..}`, or
/// `{"type":"error","code":..,"message":..}`.
#[derive(Debug, Serialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ExecStreamEvent {
    Started {
        pid: u32,
    },
    Stdout {
        #[serde(skip_serializing_if = "Option::is_none")]
        data: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        data_b64: Option<String>,
    },
    Stderr {
        #[serde(skip_serializing_if = "Option::is_none")]
        data: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        data_b64: Option<String>,
    },
    Exit {
        exit_code: Option<i32>,
        signal: Option<i32>,
        timed_out: bool,
        duration_ms: u64,
    },
    Error {
        code: String,
        message: String,
    },
}

pub(crate) fn text_or_b64(bytes: &[u8]) -> (Option<String>, Option<String>) {
    match std::str::from_utf8(bytes) {
        Ok(s) => (Some(s.to_string()), None),
        Err(_) => (
            None,
            Some(base64::engine::general_purpose::STANDARD.encode(bytes)),
        ),
    }
}

/// Runs a command in the sandbox.
#[utoipa::path(post, path = "/v1/sandboxes/{id}/exec", request_body = ExecBody,
    params(("id" = String, Path, description = "id or name")),
    responses((status = 200, body = ExecResult, description = "JSON result, or NDJSON `ExecStreamEvent` lines when `stream` is true"),
              (status = 400, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn exec(
    State(engine): State<AppState>,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<ExecBody>,
) -> ApiResult<Response> {
    let stdin = match (&body.stdin, &body.stdin_b64) {
        (Some(_), Some(_)) => {
            return Err(ApiError::invalid("give 'stdin' or 'stdin_b64', not both"))
        }
        (Some(s), None) => Some(s.clone().into_bytes()),
        (None, Some(b)) => Some(
            base64::engine::general_purpose::STANDARD
                .decode(b)
                .map_err(|e| ApiError::invalid(format!("stdin_b64 is not valid base64: {e}")))?,
        ),
        (None, None) => None,
    };
    let spec = ExecSpec {
        argv: body.argv,
        cmd: body.cmd,
        env: body.env,
        cwd: body.cwd,
        timeout_ms: body.timeout_ms,
        user: body.user,
    };
    let mut handle = engine.exec(&id, spec, stdin.is_some()).await?;
    if let Some(data) = stdin {
        feed_stdin(&handle, data).await?;
    }
    if body.stream {
        return Ok(stream_response(handle, id));
    }
    // Collected output is capped so a flooding guest cannot grow the daemon; the rest is read
    // (so the process is not blocked) and dropped.
    let mut stdout = Vec::new();
    let mut stderr = Vec::new();
    let mut truncated = false;
    while let Some(ev) = handle.next_event().await {
        match ev {
            ExecEvent::Started { .. } => {}
            ExecEvent::Stdout(b) => truncated |= append_capped(&mut stdout, &b, COLLECT_LIMIT),
            ExecEvent::Stderr(b) => truncated |= append_capped(&mut stderr, &b, COLLECT_LIMIT),
            ExecEvent::Exit(st) => {
                return Ok(Json(ExecResult {
                    exit_code: st.code,
                    signal: st.signal,
                    timed_out: st.timed_out,
                    duration_ms: st.duration_ms,
                    stdout: String::from_utf8_lossy(&stdout).into_owned(),
                    stderr: String::from_utf8_lossy(&stderr).into_owned(),
                    truncated,
                })
                .into_response())
            }
        }
    }
    Err(ended_early(&handle, &id).into())
}

/// Why a command's events ended without an exit: the host's own deadline, or a lost agent.
fn ended_early(handle: &ExecHandle, id: &str) -> kiln_core::Error {
    match handle.error() {
        Some(e @ AgentError::Timeout { .. }) => kiln_core::Error::new(
            kiln_core::ErrorCode::Timeout,
            format!("the command in sandbox {id} did not end: {e}; the host stopped waiting and cancelled it"),
        ),
        Some(e @ AgentError::Overrun { .. }) => {
            kiln_core::Error::new(kiln_core::ErrorCode::Timeout, e.to_string())
        }
        _ => kiln_core::Error::new(
            kiln_core::ErrorCode::AgentUnavailable,
            format!("the connection to sandbox {id}'s agent was lost before the command finished"),
        ),
    }
}

async fn feed_stdin(handle: &ExecHandle, data: Vec<u8>) -> ApiResult<()> {
    for chunk in data.chunks(256 * 1024) {
        handle
            .write_stdin(bytes::Bytes::copy_from_slice(chunk))
            .await
            .map_err(|e| {
                kiln_core::Error::new(kiln_core::ErrorCode::AgentUnavailable, e.to_string())
            })?;
    }
    handle.close_stdin().await.map_err(|e| {
        kiln_core::Error::new(kiln_core::ErrorCode::AgentUnavailable, e.to_string())
    })?;
    Ok(())
}

fn stream_response(handle: ExecHandle, id: String) -> Response {
    let events = futures::stream::unfold(Some(handle), move |state| {
        let id = id.clone();
        async move {
            let mut handle = state?;
            let (event, done) = match handle.next_event().await {
                Some(ExecEvent::Started { pid }) => (ExecStreamEvent::Started { pid }, false),
                Some(ExecEvent::Stdout(b)) => {
                    let (data, data_b64) = text_or_b64(&b);
                    (ExecStreamEvent::Stdout { data, data_b64 }, false)
                }
                Some(ExecEvent::Stderr(b)) => {
                    let (data, data_b64) = text_or_b64(&b);
                    (ExecStreamEvent::Stderr { data, data_b64 }, false)
                }
                Some(ExecEvent::Exit(st)) => (
                    ExecStreamEvent::Exit {
                        exit_code: st.code,
                        signal: st.signal,
                        timed_out: st.timed_out,
                        duration_ms: st.duration_ms,
                    },
                    true,
                ),
                None => {
                    let err = ended_early(&handle, &id);
                    (
                        ExecStreamEvent::Error {
                            code: err.code.as_str().into(),
                            message: err.message.clone(),
                        },
                        true,
                    )
                }
            };
            let mut line = serde_json::to_vec(&event).unwrap_or_default();
            line.push(b'\n');
            let next = if done { None } else { Some(handle) };
            Some((
                Ok::<_, std::convert::Infallible>(bytes::Bytes::from(line)),
                next,
            ))
        }
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "application/x-ndjson")
        .body(Body::from_stream(events))
        .unwrap_or_else(|_| Response::new(Body::empty()))
}
