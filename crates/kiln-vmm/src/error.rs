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
