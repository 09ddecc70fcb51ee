//! Request failures and their mapping to protocol error codes.

use std::io;

use kiln_proto::{ErrorCode, Response};

/// A failed request, sent to the host as [`Response::Error`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub code: ErrorCode,
    pub message: String,
}

pub type Result<T> = std::result::Result<T, Failure>;

impl Failure {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Failure {
        Failure {
            code,
            message: message.into(),
        }
    }

    pub fn invalid(message: impl Into<String>) -> Failure {
        Failure::new(ErrorCode::InvalidArgument, message)
    }

    /// An I/O error while doing `what` (e.g. "cannot open /etc/x").
    pub fn io(err: &io::Error, what: impl std::fmt::Display) -> Failure {
        Failure::new(code_of(err), format!("{what}: {}", describe(err)))
    }
}

impl From<Failure> for Response {
    fn from(f: Failure) -> Response {
        Response::Error {
            code: f.code,
            message: f.message,
        }
    }
}

/// Maps an OS error to the closest protocol error code.
pub fn code_of(err: &io::Error) -> ErrorCode {
    match err.raw_os_error() {
        Some(libc::ENOENT) => ErrorCode::NotFound,
        Some(libc::EACCES | libc::EPERM | libc::EROFS) => ErrorCode::PermissionDenied,
        Some(libc::EEXIST) => ErrorCode::AlreadyExists,
        Some(libc::ENOTDIR) => ErrorCode::NotADirectory,
        Some(libc::EISDIR) => ErrorCode::IsADirectory,
        Some(libc::ENOTEMPTY) => ErrorCode::DirectoryNotEmpty,
        Some(libc::ENOSPC | libc::EDQUOT) => ErrorCode::NoSpace,
        Some(libc::EINVAL | libc::ENAMETOOLONG | libc::ELOOP | libc::EXDEV) => {
            ErrorCode::InvalidArgument
        }
        Some(libc::EBUSY | libc::ETXTBSY) => ErrorCode::Busy,
        _ => match err.kind() {
            io::ErrorKind::InvalidInput | io::ErrorKind::InvalidData => ErrorCode::InvalidArgument,
            io::ErrorKind::TimedOut => ErrorCode::Timeout,
            _ => ErrorCode::Io,
        },
    }
}

/// The OS error text without Rust's " (os error N)" suffix.
fn describe(err: &io::Error) -> String {
    let text = err.to_string();
    match text.rfind(" (os error ") {
        Some(at) if text.ends_with(')') => text[..at].to_string(),
        _ => text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_os_errors() {
        let e = io::Error::from_raw_os_error(libc::ENOENT);
        let f = Failure::io(&e, "cannot open /nope");
        assert_eq!(f.code, ErrorCode::NotFound);
        assert_eq!(f.message, "cannot open /nope: No such file or directory");
        assert_eq!(
            code_of(&io::Error::from_raw_os_error(libc::ENOTEMPTY)),
            ErrorCode::DirectoryNotEmpty
        );
        assert_eq!(
            code_of(&io::Error::from_raw_os_error(libc::EIO)),
            ErrorCode::Io
        );
        assert_eq!(
            code_of(&io::Error::new(io::ErrorKind::InvalidInput, "nul")),
            ErrorCode::InvalidArgument
        );
    }
}
