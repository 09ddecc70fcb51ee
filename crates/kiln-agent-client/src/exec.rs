//! Running processes in the guest.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use kiln_proto::{Event, ExecRequest, ExitStatus, FrameKind, Request, Response, DATA_CHUNK};

use crate::conn::{StreamRx, STALL_LIMIT};
use crate::{parse_response, unexpected, AgentClient, AgentError, REQUEST_TIMEOUT};

/// Something that happened to a running process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecEvent {
    /// The process was spawned; it leads its own process group.
    Started {
        pid: u32,
    },
    Stdout(Bytes),
    Stderr(Bytes),
    /// The process ended and its output is complete; always the last event.
    Exit(ExitStatus),
}

/// How long after its `timeout_ms` the host stops waiting for a process, whatever the guest
/// does (the guest agent enforces `timeout_ms` itself, but a hostile guest may not).
pub const TIMEOUT_GRACE: Duration = Duration::from_secs(5);

/// At most this much of each of stdout and stderr is kept by [`ExecHandle::collect`]; the rest
/// is read and dropped. Stream the events to get everything.
pub const COLLECT_LIMIT: usize = 1 << 20;

/// Everything a finished process printed (up to [`COLLECT_LIMIT`] each), and how it ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecOutput {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub status: ExitStatus,
    /// Output beyond [`COLLECT_LIMIT`] was dropped.
    pub truncated: bool,
}

impl ExecOutput {
    pub fn stdout_lossy(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    pub fn stderr_lossy(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }
}

/// A running foreground process. Dropping the handle before `Exit` kills it (its whole process
/// group): nobody is left to read its output. Use background processes to outlive a client.
pub struct ExecHandle {
    client: AgentClient,
    stream: StreamRx,
    pid: u32,
    started_pending: bool,
    finished: bool,
    error: Option<AgentError>,
    stdin_sent: AtomicU64,
    /// When the host gives up waiting: `timeout_ms` plus [`TIMEOUT_GRACE`].
    deadline: Option<(Instant, Duration)>,
}

impl AgentClient {
    /// Starts a process; returns once the guest has spawned it (spawn failures are `Err`).
    pub async fn exec(&self, req: ExecRequest) -> Result<ExecHandle, AgentError> {
        let deadline = req.timeout_ms.map(|ms| {
            let limit = Duration::from_millis(ms).saturating_add(TIMEOUT_GRACE);
            (Instant::now() + limit, limit)
        });
        let mut stream = self.conn.request(&Request::Exec(req)).await?;
        // The command's deadline covers its start too: a guest that stalls (or stops its agent) before
        // saying the process started must not hold the caller longer than timeout_ms + grace.
        let first_wait = deadline.map_or(REQUEST_TIMEOUT, |(_, limit)| limit.min(REQUEST_TIMEOUT));
        let first = tokio::time::timeout(first_wait, stream.recv())
            .await
            .map_err(|_| AgentError::timeout("the guest agent to start the process", first_wait))?
            .ok_or(AgentError::Disconnected)?;
        let pid = match first.kind {
            FrameKind::Event => match first.json::<Event>() {
                Ok(Event::Started { pid }) => pid,
                other => {
                    return Err(AgentError::Protocol(format!(
                        "unexpected first exec event: {other:?}"
                    )))
                }
            },
            FrameKind::Response => {
                let resp = parse_response(&first)?;
                return Err(unexpected("exec", &resp));
            }
            kind => {
                return Err(AgentError::Protocol(format!(
                    "unexpected first exec frame: {kind:?}"
                )))
            }
        };
        Ok(ExecHandle {
            client: self.clone(),
            stream,
            pid,
            started_pending: true,
            finished: false,
            error: None,
            stdin_sent: AtomicU64::new(0),
            deadline,
        })
    }

    /// Runs a process to completion and collects its output. If `req.stdin` is set, stdin is
    /// closed right away.
    pub async fn exec_collect(&self, req: ExecRequest) -> Result<ExecOutput, AgentError> {
        let stdin = req.stdin;
        let handle = self.exec(req).await?;
        if stdin {
            handle.close_stdin().await?;
        }
        handle.collect().await
    }
}

impl ExecHandle {
    /// The process id (also its process group id) in the guest.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The next event; `None` after `Exit`, or if the stream ended early (see [`error`](Self::error)).
    pub async fn next_event(&mut self) -> Option<ExecEvent> {
        if std::mem::take(&mut self.started_pending) {
            return Some(ExecEvent::Started { pid: self.pid });
        }
        while !self.finished {
            let next = match self.deadline {
                Some((at, limit)) => {
                    match tokio::time::timeout_at(at.into(), self.stream.recv()).await {
                        Ok(next) => next,
                        Err(_) => {
                            // The guest ignored its own timeout: stop waiting and try to kill it.
                            self.client
                                .conn
                                .try_send_frame(FrameKind::Cancel, self.stream.id, &[]);
                            let what = "the process to end (its timeout_ms plus a grace period)";
                            self.fail(AgentError::timeout(what, limit));
                            break;
                        }
                    }
                }
                None => self.stream.recv().await,
            };
            let Some(frame) = next else {
                let err = if self.stream.window.overrun() {
                    AgentError::Overrun { after: STALL_LIMIT }
                } else {
                    AgentError::Disconnected
                };
                self.fail(err);
                break;
            };
            match frame.kind {
                FrameKind::Stdout => return Some(ExecEvent::Stdout(Bytes::from(frame.payload))),
                FrameKind::Stderr => return Some(ExecEvent::Stderr(Bytes::from(frame.payload))),
                FrameKind::Response => {
                    self.finished = true;
                    match parse_response(&frame) {
                        Ok(Response::Exit(status)) => return Some(ExecEvent::Exit(status)),
                        Ok(other) => self.error = Some(unexpected("exec", &other)),
                        Err(e) => self.error = Some(e),
                    }
                }
                _ => {}
            }
        }
        None
    }

    /// Lets go of the process without killing it (dropping the handle kills it); its output is discarded.
    pub fn detach(mut self) {
        self.finished = true;
    }

    /// Why the event stream ended without `Exit`, if it did.
    pub fn error(&self) -> Option<&AgentError> {
        self.error.as_ref()
    }

    /// Sends bytes to the process's stdin (the request must have had `stdin: true`). Waits
    /// while the guest holds too much unconsumed input; bytes for a process that has already
    /// exited are discarded.
    pub async fn write_stdin(&self, data: Bytes) -> Result<(), AgentError> {
        for chunk in data.chunks(DATA_CHUNK) {
            let len = chunk.len() as u64;
            let sent = self.stdin_sent.fetch_add(len, Ordering::SeqCst);
            if !self.stream.window.reserve(sent, len).await {
                return if self.client.is_connected() {
                    Ok(())
                } else {
                    Err(AgentError::Disconnected)
                };
            }
            self.send(FrameKind::Stdin, chunk).await?;
        }
        Ok(())
    }

    /// Closes the process's stdin, so it reads EOF.
    pub async fn close_stdin(&self) -> Result<(), AgentError> {
        self.send(FrameKind::StdinClose, &[]).await
    }

    /// Kills the process's whole process group (SIGKILL); `Exit` still follows.
    pub async fn cancel(&self) -> Result<(), AgentError> {
        self.send(FrameKind::Cancel, &[]).await
    }

    /// Waits for the process to end, collecting up to [`COLLECT_LIMIT`] of each output.
    pub async fn collect(mut self) -> Result<ExecOutput, AgentError> {
        let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
        let mut truncated = false;
        while let Some(event) = self.next_event().await {
            match event {
                ExecEvent::Started { .. } => {}
                ExecEvent::Stdout(b) => truncated |= append_capped(&mut stdout, &b, COLLECT_LIMIT),
                ExecEvent::Stderr(b) => truncated |= append_capped(&mut stderr, &b, COLLECT_LIMIT),
                ExecEvent::Exit(status) => {
                    return Ok(ExecOutput {
                        stdout,
                        stderr,
                        status,
                        truncated,
                    })
                }
            }
        }
        Err(self.error.take().unwrap_or(AgentError::Disconnected))
    }

    async fn send(&self, kind: FrameKind, payload: &[u8]) -> Result<(), AgentError> {
        if self.finished {
            return Ok(());
        }
        self.client
            .conn
            .send_frame(kind, self.stream.id, payload)
            .await
    }

    fn fail(&mut self, err: AgentError) {
        self.finished = true;
        self.error.get_or_insert(err);
    }
}

impl Drop for ExecHandle {
    fn drop(&mut self) {
        if !self.finished {
            self.client
                .conn
                .try_send_frame(FrameKind::Cancel, self.stream.id, &[]);
        }
    }
}

/// Appends as much of `data` as fits under `limit`; `true` if some was dropped.
pub fn append_capped(buf: &mut Vec<u8>, data: &[u8], limit: usize) -> bool {
    let room = limit.saturating_sub(buf.len());
    buf.extend_from_slice(&data[..data.len().min(room)]);
    data.len() > room
}
