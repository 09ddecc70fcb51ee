use std::io;
use std::path::PathBuf;
use std::time::Duration;

use kiln_proto::ErrorCode;

/// Why an agent operation failed.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("cannot connect to the agent socket {}: {source}", path.display())]
    Connect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The socket found by name in the VM's directory is served by another process (a swapped socket).
    #[error("{} is served by pid {peer_pid} (uid {peer_uid}), not by this sandbox's QEMU (pid {qemu_pid}); refusing to use it. Something replaced the socket: delete the sandbox", path.display())]
    ForeignSocket {
        path: PathBuf,
        qemu_pid: u32,
        peer_pid: i64,
        peer_uid: u32,
    },
    #[error("timed out after {:.1} s waiting for {what}", after.as_secs_f64())]
    Timeout { what: String, after: Duration },
    #[error("the connection to the guest agent was lost")]
    Disconnected,
    /// The host cut a stream whose output nobody took for `after` (memory stays bounded).
    #[error("the output was not read for {} s, so the host cancelled the stream; read output as it arrives", after.as_secs())]
    Overrun { after: Duration },
    /// The guest reported an error; `message` is meant for humans and names the path involved.
    #[error("{message}")]
    Guest { code: ErrorCode, message: String },
    #[error("guest agent protocol error: {0}")]
    Protocol(String),
    #[error(transparent)]
    Io(#[from] io::Error),
}

impl AgentError {
    pub(crate) fn timeout(what: impl Into<String>, after: Duration) -> AgentError {
        AgentError::Timeout {
            what: what.into(),
            after,
        }
    }

    /// The guest's error code, if the guest reported the error.
    pub fn guest_code(&self) -> Option<ErrorCode> {
        match self {
            AgentError::Guest { code, .. } => Some(*code),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_human() {
        let e = AgentError::timeout("the agent's hello", Duration::from_millis(1500));
        assert_eq!(
            e.to_string(),
            "timed out after 1.5 s waiting for the agent's hello"
        );
        let e = AgentError::Connect {
            path: "/run/x.sock".into(),
            source: io::Error::from_raw_os_error(2),
        };
        assert!(e
            .to_string()
            .starts_with("cannot connect to the agent socket /run/x.sock: "));
        let e = AgentError::Guest {
            code: ErrorCode::NotFound,
            message: "cannot open /x: No such file or directory".into(),
        };
        assert_eq!(e.guest_code(), Some(ErrorCode::NotFound));
        assert_eq!(e.to_string(), "cannot open /x: No such file or directory");
    }
}
