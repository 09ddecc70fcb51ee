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

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{FileExt, MetadataExt};

    use super::export::{write_bundle, Source};
    use super::import::stage_files;
    use super::wire::CountingReader;
    use crate::fsutil;
    use crate::snapshot::manifest::tests::sample;
    use crate::snapshot::manifest::{FileEntry, Role};

    /// A 64 MiB sparse RAM file with two small data regions (one all zeros) travels as a few KiB and
    /// arrives with the same content, still sparse; any flipped byte is refused with an offset.
    #[test]
    fn sparse_files_travel_without_their_holes() {
        let src = tempfile::tempdir().unwrap();
        let mut m = sample(src.path());
        let ram = src.path().join("memory");
        let f = std::fs::File::create(&ram).unwrap();
        f.set_len(64 << 20).unwrap();
        f.write_all_at(&[7u8; 8192], 5 << 20).unwrap();
        f.write_all_at(&[0u8; 1 << 20], 40 << 20).unwrap();
        drop(f);
        m.files.push(FileEntry {
            role: Role::Memory,
            path: "memory".into(),
            size: 64 << 20,
            checksum: fsutil::checksum(&ram).unwrap(),
            format: None,
            external: false,
        });
        let sources = m
            .files
            .iter()
            .map(|e| Source {
                name: e.path.clone(),
                file: std::fs::File::open(src.path().join(&e.path)).unwrap(),
                size: e.size,
                checksum: e.checksum.clone(),
            })
            .collect();
        let header = super::BundleHeader {
            kind: "snapshot".into(),
            manifest: m.to_doc().unwrap(),
            entries: vec![],
            without_base: false,
        };
        let mut bundle = Vec::new();
        write_bundle(&mut bundle, &header, sources).unwrap();
        assert!(
            bundle.len() < 16 << 10,
            "holes and zeros were sent: {}",
            bundle.len()
        );

        let stage = |bytes: &[u8]| {
            let dst = tempfile::tempdir().unwrap();
            let mut r = CountingReader::new(bytes);
            // What precedes the files: magic, version, header.
            let mut head = vec![0u8; 16];
            r.exact(&mut head).unwrap();
            let len = u32::from_le_bytes(head[12..16].try_into().unwrap()) as usize;
            r.vec(len).unwrap();
            stage_files(&mut r, &m, dst.path()).map(|()| dst)
        };
        let dst = stage(&bundle).unwrap();
        let got = dst.path().join("memory");
        assert_eq!(fsutil::checksum(&got).unwrap(), m.files[1].checksum);
        assert!(
            std::fs::metadata(&got).unwrap().blocks() * 512 < 1 << 20,
            "arrived sparse"
        );
        for at in [bundle.len() / 2, bundle.len() - 20] {
            let mut bad = bundle.clone();
            bad[at] ^= 1;
            let e = stage(&bad).unwrap_err();
            assert!(e.message.contains("at byte"), "{}", e.message);
        }
    }
}
