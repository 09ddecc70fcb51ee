//! Host-side client for the kiln guest agent.
//!
//! One [`AgentClient`] owns one connection to a VM's agent socket (the QEMU chardev). Any
//! number of requests may run at once on it; each gets its own stream id. When the socket
//! closes every pending request fails with [`AgentError::Disconnected`]; connect again to go on.
//! The wire protocol is described in kiln-proto's PROTOCOL.md.

mod conn;
mod dirs;
mod error;
mod exec;
mod files;
mod procs;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use kiln_proto::{Frame, FrameKind, Request, Response};
use tokio::net::UnixStream;
use tokio::sync::mpsc;

use crate::conn::{Conn, Queued, StreamRx};

pub use crate::dirs::FileWatch;
pub use crate::error::AgentError;
pub use crate::exec::{
    append_capped, ExecEvent, ExecHandle, ExecOutput, COLLECT_LIMIT, TIMEOUT_GRACE,
};
pub use crate::files::FileDownload;
pub use crate::procs::{ProcAttach, ProcEvent, MAX_WAIT};
pub use bytes::Bytes;
/// The wire protocol, for callers that need more than the re-exported types.
pub use kiln_proto as proto;
pub use kiln_proto::{
    ChangeEvent, ChangeKind, DirEntry, ErrorCode, ExecRequest, ExitStatus, FileKind, FileStat,
    HelloInfo, ProcInfo, ProcState, PROTOCOL_VERSION,
};

/// How long a metadata request (stat, mkdir, ...) may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// `sync` may have a lot of dirty data to write back.
const SYNC_TIMEOUT: Duration = Duration::from_secs(300);
/// How often a connect and an unanswered Hello are retried while the guest may not be listening yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retry {
    pub connect: Duration,
    pub hello: Duration,
}

impl Default for Retry {
    /// Suits a guest under TCG, where the agent's first answer after a restore takes tens of milliseconds.
    fn default() -> Retry {
        Retry {
            connect: Duration::from_millis(50),
            hello: Duration::from_millis(200),
        }
    }
}

/// A connection to one guest agent. Cheap to clone; all clones share the connection, which
/// closes when the last clone (and every handle made from it) is dropped.
#[derive(Clone)]
pub struct AgentClient {
    conn: Arc<Conn>,
    /// Optional features the agent announced in its Hello.
    features: Arc<[String]>,
}

impl AgentClient {
    /// Connects to the VM's agent socket (retrying the connect until `timeout`), then sends
    /// Hello until the agent answers, also within `timeout`.
    pub async fn connect(
        socket: &Path,
        timeout: Duration,
    ) -> Result<(AgentClient, HelloInfo), AgentError> {
        AgentClient::connect_inner(socket, None, timeout, Retry::default()).await
    }

    /// Like [`connect`](Self::connect), but only to a socket served by process `qemu_pid` (checked with
    /// SO_PEERCRED): the socket is found by name in a directory the VM's uid can write, so it may have been
    /// swapped for another VM's.
    pub async fn connect_to(
        socket: &Path,
        qemu_pid: u32,
        timeout: Duration,
        retry: Retry,
    ) -> Result<(AgentClient, HelloInfo), AgentError> {
        AgentClient::connect_inner(socket, Some(qemu_pid), timeout, retry).await
    }

    async fn connect_inner(
        socket: &Path,
        qemu_pid: Option<u32>,
        timeout: Duration,
        retry: Retry,
    ) -> Result<(AgentClient, HelloInfo), AgentError> {
        let started = Instant::now();
        let stream = loop {
            match UnixStream::connect(socket).await {
                Ok(stream) => break stream,
                Err(source) if started.elapsed() + retry.connect >= timeout => {
                    return Err(AgentError::Connect {
                        path: socket.to_path_buf(),
                        source,
                    })
                }
                Err(_) => tokio::time::sleep(retry.connect).await,
            }
        };
        if let Some(qemu_pid) = qemu_pid {
            let cred = stream.peer_cred()?;
            let peer_pid = cred.pid().map(i64::from).unwrap_or(-1);
            if peer_pid != i64::from(qemu_pid) {
                return Err(AgentError::ForeignSocket {
                    path: socket.to_path_buf(),
                    qemu_pid,
                    peer_pid,
                    peer_uid: cred.uid(),
                });
            }
        }
        let left = timeout.saturating_sub(started.elapsed());
        AgentClient::from_stream_with(stream, left, retry.hello).await
    }

    /// Like [`connect`](Self::connect), over an already-connected stream.
    pub async fn from_stream(
        stream: UnixStream,
        timeout: Duration,
    ) -> Result<(AgentClient, HelloInfo), AgentError> {
        AgentClient::from_stream_with(stream, timeout, Retry::default().hello).await
    }

    async fn from_stream_with(
        stream: UnixStream,
        timeout: Duration,
        hello_retry: Duration,
    ) -> Result<(AgentClient, HelloInfo), AgentError> {
        let mut client = AgentClient {
            conn: Arc::new(Conn::start(stream)),
            features: Arc::from(Vec::new()),
        };
        let hello = tokio::time::timeout(timeout, client.hello(hello_retry))
            .await
            .map_err(|_| AgentError::timeout("the guest agent's hello", timeout))??;
        if hello.protocol_version != PROTOCOL_VERSION {
            return Err(AgentError::Protocol(format!(
                "the guest agent speaks protocol version {} but this host speaks {PROTOCOL_VERSION}",
                hello.protocol_version
            )));
        }
        client.features = Arc::from(hello.features.clone());
        Ok((client, hello))
    }

    /// Sends Hello every `retry` on a fresh stream until one is answered. Every Hello
    /// starts a new agent session, which is harmless here: nothing else is running yet.
    async fn hello(&self, retry: Duration) -> Result<HelloInfo, AgentError> {
        let (tx, mut rx) = mpsc::channel::<Queued>(16);
        let mut ids = Vec::new();
        let result = loop {
            let id = self.conn.register(tx.clone(), Arc::default())?;
            ids.push(id);
            self.conn.send_request(id, &Request::Hello).await?;
            match tokio::time::timeout(retry, rx.recv()).await {
                Err(_) => continue,
                Ok(None) => break Err(AgentError::Disconnected),
                Ok(Some((frame, _))) if frame.kind == FrameKind::Response => {
                    break match parse_response(&frame)? {
                        Response::Hello(info) => Ok(info),
                        other => Err(unexpected("hello", &other)),
                    }
                }
                Ok(Some(_)) => continue,
            }
        };
        for id in ids {
            self.conn.unregister(id);
        }
        result
    }

    /// Whether the connection is still up (it never comes back: connect again).
    pub fn is_connected(&self) -> bool {
        self.conn.is_connected()
    }

    /// Round-trip time of one Ping.
    pub async fn ping(&self) -> Result<Duration, AgentError> {
        let started = Instant::now();
        match self.call(Request::Ping, "ping", REQUEST_TIMEOUT).await? {
            Response::Pong => Ok(started.elapsed()),
            other => Err(unexpected("ping", &other)),
        }
    }

    pub async fn list_dir(&self, path: &str) -> Result<Vec<DirEntry>, AgentError> {
        let req = Request::ListDir { path: path.into() };
        match self.call(req, "list_dir", REQUEST_TIMEOUT).await? {
            Response::Entries { entries } => Ok(entries),
            other => Err(unexpected("list_dir", &other)),
        }
    }

    /// Follows symlinks, except that a dangling symlink is described itself.
    pub async fn stat(&self, path: &str) -> Result<FileStat, AgentError> {
        match self
            .call(Request::Stat { path: path.into() }, "stat", REQUEST_TIMEOUT)
            .await?
        {
            Response::Stat(stat) => Ok(stat),
            other => Err(unexpected("stat", &other)),
        }
    }

    /// `mkdir [-p] [-m mode]`.
    pub async fn mkdir(
        &self,
        path: &str,
        parents: bool,
        mode: Option<u32>,
    ) -> Result<(), AgentError> {
        let req = Request::Mkdir {
            path: path.into(),
            parents,
            mode,
        };
        self.call_ok(req, "mkdir", REQUEST_TIMEOUT).await
    }

    /// Removes a file, symlink or directory (non-empty only if `recursive`).
    pub async fn remove(&self, path: &str, recursive: bool) -> Result<(), AgentError> {
        let req = Request::Remove {
            path: path.into(),
            recursive,
        };
        self.call_ok(req, "remove", REQUEST_TIMEOUT).await
    }

    /// Flushes all guest filesystems.
    pub async fn sync(&self) -> Result<(), AgentError> {
        self.call_ok(Request::Sync, "sync", SYNC_TIMEOUT).await
    }

    /// Sets the guest's wall clock.
    pub async fn set_clock(&self, time: SystemTime) -> Result<(), AgentError> {
        let (secs, nanos) = unix_time(time);
        self.call_ok(
            Request::SetClock { secs, nanos },
            "set_clock",
            REQUEST_TIMEOUT,
        )
        .await
    }

    pub async fn set_hostname(&self, hostname: &str) -> Result<(), AgentError> {
        let req = Request::SetHostname {
            hostname: hostname.into(),
        };
        self.call_ok(req, "set_hostname", REQUEST_TIMEOUT).await
    }

    /// Feeds `entropy` (at most 4096 bytes) to the guest kernel RNG, credits it and reseeds;
    /// use after restoring a snapshot so clones diverge.
    pub async fn reseed(&self, entropy: &[u8]) -> Result<(), AgentError> {
        let entropy_hex = entropy.iter().map(|b| format!("{b:02x}")).collect();
        self.call_ok(Request::Reseed { entropy_hex }, "reseed", REQUEST_TIMEOUT)
            .await
    }

    /// A restored machine's new identity in one request (agents with feature `identity`): clock,
    /// machine id, hostname, RNG entropy, then `eth0`'s MAC if given. Ok(Some(why)) when all but the MAC
    /// was set.
    pub async fn set_identity(&self, id: &Identity<'_>) -> Result<Option<String>, AgentError> {
        let (secs, nanos) = unix_time(id.time);
        let req = Request::SetIdentity {
            secs,
            nanos,
            machine_id: id.machine_id.into(),
            hostname: id.hostname.into(),
            entropy_hex: id.entropy.iter().map(|b| format!("{b:02x}")).collect(),
            mac: id.mac.map(str::to_string),
        };
        match self.call(req, "set_identity", REQUEST_TIMEOUT).await? {
            Response::Identity { mac_error } => Ok(mac_error),
            other => Err(unexpected("set_identity", &other)),
        }
    }

    /// Writes /etc/machine-id (32 hex digits).
    pub async fn set_machine_id(&self, machine_id: &str) -> Result<(), AgentError> {
        let req = Request::SetMachineId {
            machine_id: machine_id.into(),
        };
        self.call_ok(req, "set_machine_id", REQUEST_TIMEOUT).await
    }

    /// Mounts the volume on the disk with `serial` at `path`; `rescan` when the disk's backend changed
    /// since the guest probed it (a restored machine).
    pub async fn mount_volume(
        &self,
        serial: &str,
        path: &str,
        read_only: bool,
        rescan: bool,
    ) -> Result<(), AgentError> {
        let req = Request::MountVolume {
            serial: serial.into(),
            path: path.into(),
            read_only,
            rescan,
        };
        self.call_ok(req, "mount_volume", REQUEST_TIMEOUT).await
    }

    /// Detaches stale volume mounts at `paths`; returns which of `serials` are no longer held.
    pub async fn release_volumes(
        &self,
        paths: &[String],
        serials: &[String],
    ) -> Result<Vec<String>, AgentError> {
        let req = Request::ReleaseVolumes {
            paths: paths.to_vec(),
            serials: serials.to_vec(),
        };
        match self.call(req, "release_volumes", REQUEST_TIMEOUT).await? {
            Response::Volumes { free } => Ok(free),
            other => Err(unexpected("release_volumes", &other)),
        }
    }

    /// Aborts the guest's TCP connections whose local address is one of `addresses` (feature
    /// `net_reset`); returns how many.
    pub async fn reset_connections(&self, addresses: &[String]) -> Result<u32, AgentError> {
        let req = Request::ResetConnections {
            addresses: addresses.to_vec(),
        };
        match self.call(req, "reset_connections", REQUEST_TIMEOUT).await? {
            Response::Reset { connections } => Ok(connections),
            other => Err(unexpected("reset_connections", &other)),
        }
    }

    /// Sends a request and waits for its final response, turning guest errors into `Err`.
    async fn call(
        &self,
        req: Request,
        what: &str,
        timeout: Duration,
    ) -> Result<Response, AgentError> {
        let mut stream = self.conn.request(&req).await?;
        tokio::time::timeout(timeout, final_response(&mut stream))
            .await
            .map_err(|_| {
                AgentError::timeout(format!("the guest agent to answer {what}"), timeout)
            })?
    }

    async fn call_ok(&self, req: Request, what: &str, timeout: Duration) -> Result<(), AgentError> {
        match self.call(req, what, timeout).await? {
            Response::Ok => Ok(()),
            other => Err(unexpected(what, &other)),
        }
    }
}

/// What [`AgentClient::set_identity`] gives a restored machine.
pub struct Identity<'a> {
    pub time: SystemTime,
    pub machine_id: &'a str,
    pub hostname: &'a str,
    /// At most 4096 bytes.
    pub entropy: &'a [u8],
    pub mac: Option<&'a str>,
}

/// Seconds and nanoseconds since the epoch; before it, whole seconds down and positive nanoseconds up.
fn unix_time(time: SystemTime) -> (i64, u32) {
    match time.duration_since(UNIX_EPOCH) {
        Ok(d) => (
            i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
            d.subsec_nanos(),
        ),
        Err(e) => {
            let d = e.duration();
            let secs = -i64::try_from(d.as_secs()).unwrap_or(i64::MAX);
            match d.subsec_nanos() {
                0 => (secs, 0),
                n => (secs - 1, 1_000_000_000 - n),
            }
        }
    }
}

/// Skips to the stream's final frame and parses it.
async fn final_response(stream: &mut StreamRx) -> Result<Response, AgentError> {
    loop {
        match stream.recv().await {
            None => return Err(AgentError::Disconnected),
            Some(frame) if frame.kind == FrameKind::Response => return parse_response(&frame),
            Some(_) => {}
        }
    }
}

/// Parses a Response frame; a guest error becomes `Err`.
fn parse_response(frame: &Frame) -> Result<Response, AgentError> {
    match frame.json::<Response>() {
        Ok(Response::Error { code, message }) => Err(AgentError::Guest { code, message }),
        Ok(resp) => Ok(resp),
        Err(e) => Err(AgentError::Protocol(e.to_string())),
    }
}

fn unexpected(what: &str, resp: &Response) -> AgentError {
    AgentError::Protocol(format!("unexpected answer to {what}: {resp:?}"))
}
