use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error("{tool} is not installed: {hint}")]
    MissingTool { tool: String, hint: String },
    #[error("QEMU failed to start: {detail}")]
    LaunchFailed { detail: String },
    #[error("QMP socket {path}: {source}")]
    QmpConnect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("QMP command '{command}' failed: {class}: {desc}")]
    QmpCommand {
        command: String,
        class: String,
        desc: String,
    },
    #[error("QMP connection lost (QEMU exited?)")]
    QmpClosed,
    #[error("QMP protocol error: {0}")]
    QmpProtocol(String),
    #[error("timed out after {after_ms} ms waiting for {what}")]
    Timeout { what: String, after_ms: u64 },
    /// QEMU itself did not answer its monitor in time (stopped, hung, or starved of CPU).
    #[error("QEMU did not answer {what} within {after_ms} ms")]
    Unresponsive { what: String, after_ms: u64 },
    #[error("qemu-img {args}: {detail}")]
    QemuImg { args: String, detail: String },
    /// The socket found by name in the VM's directory is served by another process (a swapped socket).
    #[error("{} is served by pid {peer_pid} (uid {peer_uid}), not by this sandbox's QEMU (pid {qemu_pid}); refusing to use it. Something replaced the socket: delete the sandbox", path.display())]
    ForeignSocket {
        path: PathBuf,
        qemu_pid: u32,
        peer_pid: i64,
        peer_uid: u32,
    },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

impl VmmError {
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        VmmError::Io {
            context: context.into(),
            source,
        }
    }
}
