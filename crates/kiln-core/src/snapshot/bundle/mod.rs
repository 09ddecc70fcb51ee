//! Snapshot bundles: one self-describing file that carries a snapshot to another host
//! (`kiln snapshot export` / `import`, `GET /v1/snapshots/{id}/export`, `POST /v1/snapshots/import`).
//!
//! Layout (integers little-endian):
//!
//! ```text
//! "KILNBNDL" u32 version u32 len  header JSON (kind, the snapshot's manifest.json text, the entries)
//! per file:  'F' u16 len name  u64 size
//!            'D' u64 offset u32 raw_len u32 zlen  zstd frame     (data extents, ascending; holes and
//!            ...                                                  all-zero pieces are not sent)
//!            'E' u8 len checksum                                  (the manifest's checksum of the file)
//! trailer:   'T' u64 bytes  u128 xxh3 of every byte from the magic through 'T'  "KILNEND!"
//! ```
//!
//! Every file's checksum is recomputed while it streams (holes count as the zeros they read as), so an
//! import that completes has verified every byte; the trailer catches damage anywhere else.

mod export;
mod import;
mod wire;

pub use export::BundleExport;
pub use import::repack_with_manifest;

use serde::{Deserialize, Serialize};

pub const MAGIC: &[u8; 8] = b"KILNBNDL";
pub const END_MAGIC: &[u8; 8] = b"KILNEND!";
pub const BUNDLE_VERSION: u32 = 1;
/// Data is sent in pieces of at most this many bytes, each its own zstd frame.
pub(crate) const PIECE: usize = 1 << 20;
/// An importer refuses larger pieces (a bundle is untrusted input).
pub(crate) const MAX_PIECE: u32 = 4 << 20;
/// The header JSON is small (a manifest and a list of files).
pub(crate) const MAX_HEADER: u32 = 4 << 20;

/// The bundle's header: what it holds, readable before any data.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BundleHeader {
    /// `snapshot`.
    pub kind: String,
    /// The snapshot's `manifest.json` as written (JSON and checksum line). A diff exported with its base
    /// has been made self-contained (`full`); one exported `--without-base` still names its base, which
    /// the importing host must have (same content identity, `base_digest`).
    pub manifest: String,
    /// The files that follow, in order.
    pub entries: Vec<EntryInfo>,
    /// Whether the diff's base was left out.
    #[serde(default)]
    pub without_base: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EntryInfo {
    pub name: String,
    pub size: u64,
}
