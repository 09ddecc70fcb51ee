//! Background processes: started with a handle (pid), listed, their output replayed and followed
//! as NDJSON, fed on stdin, signalled and waited for. They live in the guest, so snapshot copies,
//! fork children and a stopped-then-started sandbox carry them.

use std::collections::BTreeMap;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine as _;
use kiln_core::agent::{ExitStatus, ProcAttach, ProcEvent, ProcInfo, ProcState};
use kiln_core::ExecSpec;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::exec::text_or_b64;
use super::AppState;
use crate::error::{ApiError, ApiResult, ErrorBody};
use crate::extract::{ApiJson, QueryPairs};

/// Longest `timeout_ms` one wait may ask for (wait again for longer).
const MAX_WAIT_MS: u64 = 3_600_000;

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StartProcess {
    /// Program and arguments, run directly (no shell).
    pub argv: Option<Vec<String>>,
    /// A shell command line, run with `/bin/sh -c`.
    pub cmd: Option<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    pub cwd: Option<String>,
    /// Run as this guest user (name or numeric uid) instead of root.
    pub user: Option<String>,
    /// Kill the process group after this many milliseconds.
    pub timeout_ms: Option<u64>,
    /// Keep a pipe to its standard input open for `POST .../stdin` (default: stdin is /dev/null).
    #[serde(default)]
    pub stdin: bool,
}

/// A background process.
#[derive(Debug, Serialize, ToSchema)]
pub struct ProcessInfo {
    /// The guest pid (also its process group id): the handle for the other calls.
    pub pid: u32,
    pub argv: Vec<String>,
    pub user: Option<String>,
    /// `running` or `exited`.
    pub state: String,
    /// Set once exited: exit code, or null when killed by a signal.
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub timed_out: bool,
    /// Output bytes produced so far (stdout and stderr together).
    pub output_bytes: u64,
    /// Bytes pushed out of the process's 1 MiB output ring, which late readers cannot see.
    pub dropped_bytes: u64,
    /// Guest uptime when it started, in milliseconds.
    pub started_uptime_ms: u64,
}

impl From<ProcInfo> for ProcessInfo {
    fn from(p: ProcInfo) -> Self {
        let exit = p.exit.unwrap_or(ExitStatus {
            code: None,
            signal: None,
            timed_out: false,
            duration_ms: 0,
        });
        ProcessInfo {
            pid: p.pid,
            argv: p.argv,
            user: p.user,
            state: match p.state {
                ProcState::Running => "running",
                ProcState::Exited => "exited",
            }
            .into(),
            exit_code: exit.code,
            signal: exit.signal,
            timed_out: exit.timed_out,
            output_bytes: p.output_bytes,
            dropped_bytes: p.dropped_bytes,
            started_uptime_ms: p.started_uptime_ms,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ProcessList {
    pub processes: Vec<ProcessInfo>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StdinBody {
    /// Text to write.
    pub data: Option<String>,
    /// Bytes (base64) to write.
    pub data_b64: Option<String>,
    /// Close stdin afterwards, so the process reads EOF.
    #[serde(default)]
    pub close: bool,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SignalBody {
    /// A name (`TERM`, `SIGKILL`, `INT`, ...) or a number 1-64.
    pub signal: serde_json::Value,
}

/// One line of `GET .../logs`: `{"type":"dropped","bytes":N}` (output lost from the ring before
/// what follows), `{"type":"stdout","data":".."}` (or `data_b64`), `stderr`, then `exit` when it
/// ended, `running` when not following and it still runs, or `error`.
#[derive(Debug, Serialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ProcessLogEvent {
    Dropped {
        bytes: u64,
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
    },
    Running {
        pid: u32,
    },
    Error {
        code: String,
        message: String,
    },
}

/// Starts a command in the background.
#[utoipa::path(post, path = "/v1/sandboxes/{id}/processes", request_body = StartProcess,
    params(("id" = String, Path, description = "id or name")),
    responses((status = 201, body = ProcessInfo), (status = 400, body = ErrorBody),
              (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn start(
    State(engine): State<AppState>,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<StartProcess>,
) -> ApiResult<Response> {
    let spec = ExecSpec {
        argv: body.argv,
        cmd: body.cmd,
        env: body.env,
        cwd: body.cwd,
        timeout_ms: body.timeout_ms,
        user: body.user,
    };
    let info = engine.process_start(&id, spec, body.stdin).await?;
    Ok((StatusCode::CREATED, Json(ProcessInfo::from(info))).into_response())
}

/// Lists the sandbox's background processes: running ones and recently finished ones.
#[utoipa::path(get, path = "/v1/sandboxes/{id}/processes",
    params(("id" = String, Path, description = "id or name")),
    responses((status = 200, body = ProcessList), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn list(
    State(engine): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<Json<ProcessList>> {
    let procs = engine.process_list(&id).await?;
    Ok(Json(ProcessList {
        processes: procs.into_iter().map(ProcessInfo::from).collect(),
    }))
}

/// One background process.
#[utoipa::path(get, path = "/v1/sandboxes/{id}/processes/{pid}",
    params(("id" = String, Path, description = "id or name"), ("pid" = u32, Path, description = "guest pid")),
    responses((status = 200, body = ProcessInfo), (status = 404, body = ErrorBody)))]
pub async fn get(
    State(engine): State<AppState>,
    Path((id, pid)): Path<(String, u32)>,
) -> ApiResult<Json<ProcessInfo>> {
    Ok(Json(engine.process_get(&id, pid).await?.into()))
}

/// Writes to a background process's standard input (started with `stdin: true`).
#[utoipa::path(post, path = "/v1/sandboxes/{id}/processes/{pid}/stdin", request_body = StdinBody,
    params(("id" = String, Path, description = "id or name"), ("pid" = u32, Path, description = "guest pid")),
    responses((status = 204, description = "written"), (status = 400, body = ErrorBody),
              (status = 404, body = ErrorBody), (status = 504, body = ErrorBody)))]
pub async fn stdin(
    State(engine): State<AppState>,
    Path((id, pid)): Path<(String, u32)>,
    ApiJson(body): ApiJson<StdinBody>,
) -> ApiResult<StatusCode> {
    let data = match (body.data, body.data_b64) {
        (Some(_), Some(_)) => return Err(ApiError::invalid("give 'data' or 'data_b64', not both")),
        (Some(s), None) => s.into_bytes(),
        (None, Some(b)) => base64::engine::general_purpose::STANDARD
            .decode(b)
            .map_err(|e| ApiError::invalid(format!("data_b64 is not valid base64: {e}")))?,
        (None, None) => Vec::new(),
    };
    engine.process_stdin(&id, pid, &data, body.close).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Sends a signal to a background process's whole process group.
#[utoipa::path(post, path = "/v1/sandboxes/{id}/processes/{pid}/signal", request_body = SignalBody,
    params(("id" = String, Path, description = "id or name"), ("pid" = u32, Path, description = "guest pid")),
    responses((status = 204, description = "sent (no effect once the process has exited)"),
              (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn signal(
    State(engine): State<AppState>,
    Path((id, pid)): Path<(String, u32)>,
    ApiJson(body): ApiJson<SignalBody>,
) -> ApiResult<StatusCode> {
    let signal = parse_signal(&body.signal)?;
    engine.process_signal(&id, pid, signal).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Waits for a background process to end, at most `timeout_ms` (default 30000, at most 3600000);
/// the answer's `state` says whether it did.
#[utoipa::path(post, path = "/v1/sandboxes/{id}/processes/{pid}/wait",
    params(("id" = String, Path, description = "id or name"), ("pid" = u32, Path, description = "guest pid"),
           ("timeout_ms" = Option<u64>, Query, description = "how long to wait")),
    responses((status = 200, body = ProcessInfo), (status = 404, body = ErrorBody)))]
pub async fn wait(
    State(engine): State<AppState>,
    Path((id, pid)): Path<(String, u32)>,
    q: QueryPairs,
) -> ApiResult<Json<ProcessInfo>> {
    let timeout_ms = match q.get("timeout_ms") {
        None => 30_000,
        Some(v) => v
            .parse::<u64>()
            .ok()
            .filter(|ms| *ms <= MAX_WAIT_MS)
            .ok_or_else(|| {
                ApiError::invalid(format!(
                    "timeout_ms must be 0-{MAX_WAIT_MS}; wait again for longer"
                ))
            })?,
    };
    let info = engine
        .process_wait(&id, pid, Duration::from_millis(timeout_ms))
        .await?;
    Ok(Json(info.into()))
}

/// Output of a background process as NDJSON `ProcessLogEvent` lines: what its 1 MiB ring still
/// holds from the start, then (with `follow=true`) live output until it exits. Disconnecting
/// detaches; the process runs on.
#[utoipa::path(get, path = "/v1/sandboxes/{id}/processes/{pid}/logs",
    params(("id" = String, Path, description = "id or name"), ("pid" = u32, Path, description = "guest pid"),
           ("follow" = Option<bool>, Query, description = "stream live output until the process exits")),
    responses((status = 200, description = "NDJSON `ProcessLogEvent` lines", content_type = "application/x-ndjson"),
              (status = 404, body = ErrorBody)))]
pub async fn logs(
    State(engine): State<AppState>,
    Path((id, pid)): Path<(String, u32)>,
    q: QueryPairs,
) -> ApiResult<Response> {
    let follow = q.flag("follow")?;
    let attach = engine.process_attach(&id, pid, follow).await?;
    Ok(log_response(attach))
}

fn log_response(attach: ProcAttach) -> Response {
    let events = futures::stream::unfold(Some(attach), |state| async move {
        let mut attach = state?;
        let (event, done) = match attach.next_event().await {
            Some(ProcEvent::Dropped(bytes)) => (ProcessLogEvent::Dropped { bytes }, false),
            Some(ProcEvent::Stdout(b)) => {
                let (data, data_b64) = text_or_b64(&b);
                (ProcessLogEvent::Stdout { data, data_b64 }, false)
            }
            Some(ProcEvent::Stderr(b)) => {
                let (data, data_b64) = text_or_b64(&b);
                (ProcessLogEvent::Stderr { data, data_b64 }, false)
            }
            Some(ProcEvent::Exit(st)) => (
                ProcessLogEvent::Exit {
                    exit_code: st.code,
                    signal: st.signal,
                    timed_out: st.timed_out,
                },
                true,
            ),
            Some(ProcEvent::Running(info)) => (ProcessLogEvent::Running { pid: info.pid }, true),
            None => (
                ProcessLogEvent::Error {
                    code: "agent_unavailable".into(),
                    message: format!(
                        "the output stream ended early: {}",
                        attach
                            .error()
                            .map_or("the agent connection was lost".into(), |e| e.to_string())
                    ),
                },
                true,
            ),
        };
        let mut line = serde_json::to_vec(&event).unwrap_or_default();
        line.push(b'\n');
        Some((
            Ok::<_, std::convert::Infallible>(bytes::Bytes::from(line)),
            (!done).then_some(attach),
        ))
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "application/x-ndjson")
        .body(Body::from_stream(events))
        .unwrap_or_else(|_| Response::new(Body::empty()))
}

fn parse_signal(v: &serde_json::Value) -> ApiResult<i32> {
    let bad = || {
        ApiError::invalid(format!(
            "unknown signal {v}: give a number 1-64 or one of TERM, KILL, INT, HUP, QUIT, USR1, USR2, STOP, CONT"
        ))
    };
    if let Some(n) = v.as_i64() {
        return i32::try_from(n)
            .ok()
            .filter(|n| (1..=64).contains(n))
            .ok_or_else(bad);
    }
    let name = v.as_str().ok_or_else(bad)?.to_ascii_uppercase();
    let name = name.strip_prefix("SIG").unwrap_or(&name);
    Ok(match name {
        "HUP" => libc::SIGHUP,
        "INT" => libc::SIGINT,
        "QUIT" => libc::SIGQUIT,
        "KILL" => libc::SIGKILL,
        "USR1" => libc::SIGUSR1,
        "USR2" => libc::SIGUSR2,
        "TERM" => libc::SIGTERM,
        "STOP" => libc::SIGSTOP,
        "CONT" => libc::SIGCONT,
        _ => return Err(bad()),
    })
}
