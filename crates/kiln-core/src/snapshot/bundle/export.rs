//! Writing a bundle: every file of the snapshot is opened before the answer starts (a deletion after
//! that cannot pull data from under the stream), then a blocking thread reads, checksums and compresses
//! the data extents into a bounded channel the HTTP body drains.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;

use bytes::Bytes;
use tokio::sync::mpsc;
use tracing::warn;

use super::wire::{next_extent, ContentHash, HashingWriter};
use super::{BundleHeader, EntryInfo, BUNDLE_VERSION, END_MAGIC, MAGIC, PIECE};
use crate::engine::Engine;
use crate::error::{Error, ErrorCode, Result};
use crate::fsutil;
use crate::snapshot::manifest::{Manifest, Role, MANIFEST};
use crate::snapshot::SnapshotType;

/// zstd level: fast (the data is mostly RAM and disk blocks; the CPU is shared with running guests).
const LEVEL: i32 = 1;

/// A bundle being written; read it with [`BundleExport::next_chunk`].
pub struct BundleExport {
    /// The snapshot's id.
    pub id: String,
    /// Bytes of file data it carries before compression (holes excluded), for progress.
    pub data_bytes: u64,
    rx: mpsc::Receiver<std::io::Result<Bytes>>,
}

impl BundleExport {
    /// The next piece of the bundle; an error means it was cut short (the client must not keep it).
    pub async fn next_chunk(&mut self) -> Option<std::io::Result<Bytes>> {
        self.rx.recv().await
    }
}

pub(crate) struct Source {
    pub name: String,
    pub file: File,
    pub size: u64,
    pub checksum: String,
}

impl Engine {
    /// Starts writing snapshot `id_or_name` as a bundle. A diff snapshot carries the base files it needs
    /// and becomes self-contained (`full`) unless `without_base`: then it names its base by content
    /// identity and the importing host must have that base.
    pub fn export_snapshot(&self, id_or_name: &str, without_base: bool) -> Result<BundleExport> {
        let (id, header, sources) = self.open_for_export(id_or_name, without_base)?;
        let data_bytes = sources
            .iter()
            .map(|s| {
                use std::os::unix::fs::MetadataExt;
                s.file
                    .metadata()
                    .map(|md| (md.blocks() * 512).min(md.len()))
                    .unwrap_or(s.size)
            })
            .sum();
        let (tx, rx) = mpsc::channel(8);
        let snap = id.clone();
        tokio::task::spawn_blocking(move || {
            let mut w = ChannelWriter {
                tx: tx.clone(),
                buf: Vec::with_capacity(CHANNEL_PIECE),
            };
            let res = write_bundle(&mut w, &header, sources).and_then(|()| w.flush());
            if let Err(e) = res {
                warn!(snapshot = %snap, error = %e, "snapshot export cut short");
                let _ = tx.blocking_send(Err(e));
            }
        });
        Ok(BundleExport { id, data_bytes, rx })
    }

    /// Opens every file a bundle (or a remote push) of `id_or_name` carries, and says what it holds:
    /// the snapshot's id, the header (its manifest as it travels) and the open files.
    pub(crate) fn open_for_export(
        &self,
        id_or_name: &str,
        without_base: bool,
    ) -> Result<(String, BundleHeader, Vec<Source>)> {
        let id = self.resolve_snapshot(id_or_name)?;
        self.db()
            .find_snapshot(&id)?
            .ok_or_else(|| Error::snapshot_not_found(id_or_name))?;
        // Kept from deletion until every file is open.
        let _in_use = self.claim_use(&id, ErrorCode::SnapshotNotFound)?;
        let dir = self.config().snapshot_dir(&id);
        let m = Manifest::read(&dir, &id)?;
        m.verify(&dir, false)?;
        if m.kind == SnapshotType::Diff {
            self.check_base_pin(&m)?;
        }
        let keep_base = without_base && m.kind == SnapshotType::Diff;
        let mut out = m.clone();
        let mut sources = Vec::new();
        let mut disk_index = 0usize;
        for (i, f) in m.files.iter().enumerate() {
            let index = disk_index;
            if f.role == Role::Disk {
                disk_index += 1;
            }
            if f.external && keep_base {
                continue;
            }
            let name = if f.external {
                // Carried along: it gets the name capture gives an own file in that place.
                let name = match f.role {
                    Role::Disk => format!("disk-{index}.{}", f.format.as_deref().unwrap_or("raw")),
                    Role::Memory => "memory".to_string(),
                    _ => {
                        return Err(Error::internal(
                            "an external file that is neither disk nor memory",
                        ))
                    }
                };
                out.files[i].path = name.clone();
                out.files[i].external = false;
                name
            } else {
                f.path.clone()
            };
            let path = m.resolve(&dir, f);
            let file = kiln_vmm::safefs::open_read(&path)
                .map_err(|e| fsutil::io_error(&format!("opening {}", path.display()), e))?;
            sources.push(Source {
                name,
                file,
                size: f.size,
                checksum: f.checksum.clone(),
            });
        }
        let text = if m.kind == SnapshotType::Diff && !keep_base {
            out.kind = SnapshotType::Full;
            out.parent = None;
            out.base_digest = None;
            out.to_doc()?
        } else {
            // Verbatim: its digest is what diffs built on it were pinned to.
            std::fs::read_to_string(dir.join(MANIFEST))
                .map_err(|e| fsutil::io_error("reading the manifest", e))?
        };
        let header = BundleHeader {
            kind: "snapshot".into(),
            manifest: text,
            entries: sources
                .iter()
                .map(|s| EntryInfo {
                    name: s.name.clone(),
                    size: s.size,
                })
                .collect(),
            without_base: keep_base,
        };
        Ok((id, header, sources))
    }
}

const CHANNEL_PIECE: usize = 256 << 10;

/// Hands what is written to the HTTP body in pieces; fails once the receiver is gone (client left).
struct ChannelWriter {
    tx: mpsc::Sender<std::io::Result<Bytes>>,
    buf: Vec<u8>,
}

impl Write for ChannelWriter {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(b);
        if self.buf.len() >= CHANNEL_PIECE {
            self.flush()?;
        }
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let piece = Bytes::from(std::mem::replace(
            &mut self.buf,
            Vec::with_capacity(CHANNEL_PIECE),
        ));
        self.tx
            .blocking_send(Ok(piece))
            .map_err(|_| std::io::Error::other("the client stopped reading the bundle"))
    }
}

pub(super) fn write_bundle(
    out: &mut impl Write,
    header: &BundleHeader,
    sources: Vec<Source>,
) -> std::io::Result<()> {
    let mut w = HashingWriter::new(out);
    let json = serde_json::to_vec(header).map_err(std::io::Error::other)?;
    w.put(MAGIC)?;
    w.put(&BUNDLE_VERSION.to_le_bytes())?;
    w.put(&(json.len() as u32).to_le_bytes())?;
    w.put(&json)?;
    let mut buf = vec![0u8; PIECE];
    for s in sources {
        w.put(b"F")?;
        w.put(&(s.name.len() as u16).to_le_bytes())?;
        w.put(s.name.as_bytes())?;
        w.put(&s.size.to_le_bytes())?;
        let mut hash = ContentHash::like(&s.checksum)
            .ok_or_else(|| std::io::Error::other(format!("unknown checksum '{}'", s.checksum)))?;
        let mut hashed = 0u64;
        let mut pos = 0u64;
        while let Some((start, end)) = next_extent(&s.file, pos, s.size)? {
            let mut off = start;
            while off < end {
                let want = ((end - off) as usize).min(buf.len());
                let n = s.file.read_at(&mut buf[..want], off)?;
                if n == 0 {
                    return Err(std::io::Error::other(format!(
                        "{} is shorter than its manifest says",
                        s.name
                    )));
                }
                let data = &buf[..n];
                hash.zeros(off - hashed);
                hash.update(data);
                hashed = off + n as u64;
                // All-zero pieces read back as holes: not sent.
                if data.iter().any(|b| *b != 0) {
                    let z = zstd::bulk::compress(data, LEVEL)?;
                    w.put(b"D")?;
                    w.put(&off.to_le_bytes())?;
                    w.put(&(n as u32).to_le_bytes())?;
                    w.put(&(z.len() as u32).to_le_bytes())?;
                    w.put(&z)?;
                }
                off += n as u64;
            }
            pos = end;
        }
        hash.zeros(s.size - hashed.min(s.size));
        let sum = hash.finish();
        if sum != s.checksum {
            return Err(std::io::Error::other(format!(
                "{} does not match its manifest's checksum (the snapshot is damaged on disk; `kiln doctor` checks it)",
                s.name
            )));
        }
        w.put(b"E")?;
        w.put(&[sum.len() as u8])?;
        w.put(sum.as_bytes())?;
    }
    w.put(b"T")?;
    let total = w.pos;
    w.put(&total.to_le_bytes())?;
    let digest = w.hash.digest128();
    w.inner.write_all(&digest.to_le_bytes())?;
    w.inner.write_all(END_MAGIC)?;
    Ok(())
}
