//! Chunk keys and the manifest object a push writes last.

use serde::{Deserialize, Serialize};
use sha2::Digest;

use crate::{Error, ErrorKind, Result};

/// Chunk size: large enough that a few GiB are a few hundred objects, small enough that a small change
/// re-uploads little.
pub const CHUNK: u64 = 4 << 20;
/// `kind` of a snapshot manifest object.
pub const MANIFEST_KIND: &str = "kiln-remote-snapshot";
const MANIFEST_VERSION: u32 = 1;
/// A manifest object is a manifest and chunk lists: refuse absurd sizes (the remote is untrusted).
pub(crate) const MAX_MANIFEST_BYTES: u64 = 64 << 20;

/// The object key of the chunk whose raw bytes hash to `sha` (hex).
pub fn chunk_key(sha: &str) -> String {
    format!("chunks/{}/{sha}", &sha[..2])
}

pub(crate) fn sha256_hex(b: &[u8]) -> String {
    hex::encode(sha2::Sha256::digest(b))
}

pub(crate) fn manifest_key(name: &str) -> String {
    format!("snapshots/{name}.json")
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RemoteChunk {
    pub offset: u64,
    pub len: u64,
    pub sha256: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RemoteFile {
    /// Its name in the snapshot directory.
    pub name: String,
    pub size: u64,
    /// The snapshot manifest's checksum of the whole file.
    pub checksum: String,
    /// Its data chunks, ascending; what is not covered reads as zeros.
    pub chunks: Vec<RemoteChunk>,
}

/// `snapshots/<name>.json`: what a pull needs, written after every chunk it names.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RemoteManifest {
    pub kind: String,
    pub version: u32,
    pub name: String,
    pub pushed_at: String,
    pub chunk_size: u64,
    /// The snapshot's `manifest.json` text (self-contained: a diff travels with its base).
    pub manifest: String,
    pub files: Vec<RemoteFile>,
}

impl RemoteManifest {
    pub(crate) fn new(name: &str, manifest: String, files: Vec<RemoteFile>) -> RemoteManifest {
        RemoteManifest {
            kind: MANIFEST_KIND.into(),
            version: MANIFEST_VERSION,
            name: name.into(),
            pushed_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            chunk_size: CHUNK,
            manifest,
            files,
        }
    }

    /// Parses and checks an object read from a remote: every chunk inside its file, aligned, ascending,
    /// with a well-formed key.
    pub fn parse(bytes: &[u8], what: &str) -> Result<RemoteManifest> {
        let bad = |why: String| {
            Error::new(
                ErrorKind::Corrupt,
                format!("{what} is not a valid snapshot manifest object ({why}); push the snapshot again"),
            )
        };
        let m: RemoteManifest = serde_json::from_slice(bytes).map_err(|e| bad(e.to_string()))?;
        if m.kind != MANIFEST_KIND {
            return Err(bad(format!("kind {:?}", m.kind)));
        }
        if m.version != MANIFEST_VERSION {
            return Err(Error::new(
                ErrorKind::Invalid,
                format!("{what} has format version {}; this kiln reads version {MANIFEST_VERSION} (upgrade kiln)", m.version),
            ));
        }
        if m.chunk_size == 0 || m.chunk_size > CHUNK {
            return Err(bad(format!("chunk size {}", m.chunk_size)));
        }
        for f in &m.files {
            let mut next = 0u64;
            for c in &f.chunks {
                let well_formed = c.sha256.len() == 64
                    && c.sha256
                        .bytes()
                        .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase());
                if !well_formed
                    || c.len == 0
                    || c.len > m.chunk_size
                    || c.offset < next
                    || c.offset % m.chunk_size != 0
                    || c.offset.checked_add(c.len).is_none_or(|end| end > f.size)
                {
                    return Err(bad(format!(
                        "chunk {} of {} at offset {} ({} bytes) does not fit the file",
                        c.sha256.escape_debug(),
                        f.name.escape_debug(),
                        c.offset,
                        c.len
                    )));
                }
                next = c.offset + c.len;
            }
        }
        Ok(m)
    }

    /// Data bytes (before compression) of all its chunks.
    pub fn data_bytes(&self) -> u64 {
        self.files
            .iter()
            .flat_map(|f| f.chunks.iter())
            .map(|c| c.len)
            .sum()
    }
}
