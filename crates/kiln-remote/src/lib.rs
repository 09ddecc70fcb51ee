//! Object-storage remotes for snapshots: content-addressed chunks and manifests in S3-compatible storage
//! (or a local directory), pushed and pulled in parallel, resumable, verified on arrival, collected
//! explicitly.
//!
//! Layout of a remote (keys relative to the bucket, or to the directory of a `file://` remote):
//!
//! ```text
//! chunks/<first two hex digits>/<sha256 of the raw chunk>   zstd frame of a data chunk (at most CHUNK bytes)
//! snapshots/<name>.json                                      a pushed snapshot: its manifest, its files'
//!                                                            chunk lists; written last
//! ```
//!
//! A chunk is a fixed `CHUNK`-sized piece of one file at an aligned offset; holes and all-zero pieces are
//! not stored (they read back as holes). The key is the hash of the raw bytes, so the same bytes are stored
//! once whatever file or snapshot they belong to: a template's rootfs shared by many snapshots, or the
//! unchanged RAM and disk of the next snapshot of a lineage.

mod chunk;
mod gc;
mod pull;
mod push;
mod spec;
#[cfg(test)]
mod tests;

pub use chunk::{chunk_key, RemoteChunk, RemoteFile, RemoteManifest, CHUNK, MANIFEST_KIND};
pub use gc::GcReport;
pub use pull::{PullReport, PullSource};
pub use push::{PushFile, PushReport};
pub use spec::{Remote, RemoteSpec, SnapshotEntry};

use std::sync::atomic::{AtomicU64, Ordering};

/// What kind of failure, for the caller's error code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The request is not valid (a bad URL, name or option).
    Invalid,
    /// The remote has no such snapshot.
    NotFound,
    /// Data on the remote is damaged (a chunk whose bytes do not hash to its key, a bad manifest).
    Corrupt,
    /// The remote could not be reached or refused the request.
    Unreachable,
    /// A local file could not be read or written.
    Io,
}

#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct Error {
    pub kind: ErrorKind,
    pub message: String,
}

impl Error {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Error {
        Error {
            kind,
            message: message.into(),
        }
    }
    pub(crate) fn store(remote: &str, what: &str, e: object_store::Error) -> Error {
        // object_store's messages name the URL and the HTTP status, never the credentials.
        Error::new(
            ErrorKind::Unreachable,
            format!("remote {remote}: {what} failed ({e}); check the remote's URL, endpoint and credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY in the daemon's environment)"),
        )
    }
    pub(crate) fn io(what: &str, e: std::io::Error) -> Error {
        Error::new(ErrorKind::Io, format!("{what}: {e}"))
    }
}

pub type Result<T> = std::result::Result<T, Error>;

/// Bytes done out of bytes to do, shared with whoever reports progress.
#[derive(Debug, Default)]
pub struct Progress {
    pub total: AtomicU64,
    pub done: AtomicU64,
    /// Bytes actually sent or received (compressed).
    pub transferred: AtomicU64,
}

impl Progress {
    pub fn snapshot(&self) -> (u64, u64, u64) {
        (
            self.done.load(Ordering::Relaxed),
            self.total.load(Ordering::Relaxed),
            self.transferred.load(Ordering::Relaxed),
        )
    }
}

/// Transfers in flight at once (each holds one chunk in memory).
pub const PARALLEL: usize = 4;
