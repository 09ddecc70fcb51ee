//! Background processes kept in the guest agent's process table.

use std::time::Duration;

use bytes::Bytes;
use kiln_proto::{
    ErrorCode, Event, ExecRequest, ExitStatus, FrameKind, ProcInfo, Request, Response,
};

use crate::conn::StreamRx;
use crate::{parse_response, unexpected, AgentClient, AgentError, REQUEST_TIMEOUT};

/// Longest wait one `proc_wait` call may ask for.
pub const MAX_WAIT: Duration = Duration::from_secs(3600);

/// Output of a background process as an attached reader sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProcEvent {
    /// This many bytes were pushed out of the process's ring before the output that follows.
    Dropped(u64),
    Stdout(Bytes),
    Stderr(Bytes),
    /// The process ended; last event.
    Exit(ExitStatus),
    /// Not following, and the process still runs: the replay is complete; last event.
    Running(ProcInfo),
}

/// A reader attached to a background process. Dropping it detaches (the process runs on).
pub struct ProcAttach {
    client: AgentClient,
    stream: StreamRx,
    finished: bool,
    error: Option<AgentError>,
    pending_dropped: Option<u64>,
}

impl AgentClient {
    /// Whether the guest agent announced optional feature `name` in its Hello.
    pub fn has_feature(&self, name: &str) -> bool {
        self.features.iter().any(|f| f == name)
    }

    fn need_procs(&self) -> Result<(), AgentError> {
        if self.has_feature("procs") {
            return Ok(());
        }
        Err(AgentError::Guest {
            code: ErrorCode::Unsupported,
            message: "this sandbox's guest agent predates background processes; rebuild the image (kiln image build --force) and create the sandbox again".into(),
        })
    }

    /// Starts a background process; returns its table entry.
    pub async fn proc_start(&self, req: ExecRequest) -> Result<ProcInfo, AgentError> {
        self.need_procs()?;
        match self
            .call(Request::ProcStart(req), "proc_start", REQUEST_TIMEOUT)
            .await?
        {
            Response::Proc(info) => Ok(info),
            other => Err(unexpected("proc_start", &other)),
        }
    }

    pub async fn proc_list(&self) -> Result<Vec<ProcInfo>, AgentError> {
        self.need_procs()?;
        match self
            .call(Request::ProcList, "proc_list", REQUEST_TIMEOUT)
            .await?
        {
            Response::Procs { procs } => Ok(procs),
            other => Err(unexpected("proc_list", &other)),
        }
    }

    /// Sends `signal` to the process's whole group (no effect once it has exited).
    pub async fn proc_signal(&self, pid: u32, signal: i32) -> Result<(), AgentError> {
        self.need_procs()?;
        self.call_ok(
            Request::ProcSignal { pid, signal },
            "proc_signal",
            REQUEST_TIMEOUT,
        )
        .await
    }

    /// Writes `data` to the process's stdin (waiting at most 10 s for it to read), then closes
    /// stdin if `close`.
    pub async fn proc_stdin(&self, pid: u32, data: &[u8], close: bool) -> Result<(), AgentError> {
        self.need_procs()?;
        let data_hex = data.iter().map(|b| format!("{b:02x}")).collect();
        let req = Request::ProcStdin {
            pid,
            data_hex,
            close,
        };
        self.call_ok(req, "proc_stdin", REQUEST_TIMEOUT).await
    }

    /// Waits up to `timeout` (at most [`MAX_WAIT`]) for the process to end; returns its entry
    /// either way (`state` says which).
    pub async fn proc_wait(&self, pid: u32, timeout: Duration) -> Result<ProcInfo, AgentError> {
        self.need_procs()?;
        let timeout = timeout.min(MAX_WAIT);
        let timeout_ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
        match self
            .call(
                Request::ProcWait { pid, timeout_ms },
                "proc_wait",
                timeout + REQUEST_TIMEOUT,
            )
            .await?
        {
            Response::Proc(info) => Ok(info),
            other => Err(unexpected("proc_wait", &other)),
        }
    }

    /// Replays the process's retained output and, if `follow`, streams it live until it ends.
    pub async fn proc_attach(&self, pid: u32, follow: bool) -> Result<ProcAttach, AgentError> {
        self.need_procs()?;
        let mut stream = self
            .conn
            .request(&Request::ProcAttach { pid, follow })
            .await?;
        // The first frame is Attached, or an error (no such process).
        let first = tokio::time::timeout(REQUEST_TIMEOUT, stream.recv())
            .await
            .map_err(|_| AgentError::timeout("the guest agent to attach", REQUEST_TIMEOUT))?
            .ok_or(AgentError::Disconnected)?;
        let mut attach = ProcAttach {
            client: self.clone(),
            stream,
            finished: false,
            error: None,
            pending_dropped: None,
        };
        match first.kind {
            FrameKind::Event => {}
            FrameKind::Response => {
                attach.finished = true;
                let resp = parse_response(&first)?;
                return Err(unexpected("proc_attach", &resp));
            }
            kind => {
                return Err(AgentError::Protocol(format!(
                    "unexpected first attach frame: {kind:?}"
                )))
            }
        }
        if let Ok(Event::Attached { dropped, .. }) = first.json::<Event>() {
            attach.pending_dropped = (dropped > 0).then_some(dropped);
        }
        Ok(attach)
    }
}

impl ProcAttach {
    /// The next event; `None` after the last one, or if the stream ended early (see [`error`](Self::error)).
    pub async fn next_event(&mut self) -> Option<ProcEvent> {
        if let Some(dropped) = self.pending_dropped.take() {
            return Some(ProcEvent::Dropped(dropped));
        }
        while !self.finished {
            let Some(frame) = self.stream.recv().await else {
                self.finished = true;
                self.error = Some(AgentError::Disconnected);
                break;
            };
            match frame.kind {
                FrameKind::Stdout => return Some(ProcEvent::Stdout(Bytes::from(frame.payload))),
                FrameKind::Stderr => return Some(ProcEvent::Stderr(Bytes::from(frame.payload))),
                FrameKind::Event => {
                    if let Ok(Event::Attached { dropped, .. }) = frame.json::<Event>() {
                        if dropped > 0 {
                            return Some(ProcEvent::Dropped(dropped));
                        }
                    }
                }
                FrameKind::Response => {
                    self.finished = true;
                    match parse_response(&frame) {
                        Ok(Response::Exit(status)) => return Some(ProcEvent::Exit(status)),
                        Ok(Response::Proc(info)) => return Some(ProcEvent::Running(info)),
                        Ok(other) => self.error = Some(unexpected("proc_attach", &other)),
                        Err(e) => self.error = Some(e),
                    }
                }
                _ => {}
            }
        }
        None
    }

    /// Why the events ended without `Exit`/`Running`, if they did.
    pub fn error(&self) -> Option<&AgentError> {
        self.error.as_ref()
    }
}

impl Drop for ProcAttach {
    fn drop(&mut self) {
        if !self.finished {
            self.client
                .conn
                .try_send_frame(FrameKind::Cancel, self.stream.id, &[]);
        }
    }
}
