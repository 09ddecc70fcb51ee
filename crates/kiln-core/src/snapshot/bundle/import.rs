//! Reading a bundle into this host: the header is checked first (manifest, compatibility, name, base),
//! then every file is written into a staging directory inside the snapshots directory while its
//! checksum is recomputed, and [`Engine::import_staged`] publishes the whole (rename, then the row). Any
//! failure removes the staging directory; a daemon killed mid-import leaves a `.tmp-*` directory that the
//! next start removes.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::mpsc;
use tracing::info;

use super::wire::{damaged, ContentHash, CountingReader};
use super::{BundleHeader, BUNDLE_VERSION, END_MAGIC, MAGIC, MAX_HEADER, MAX_PIECE};
use crate::engine::Engine;
use crate::error::{Error, ErrorCode, Result};
use crate::fsutil;
use crate::snapshot::manifest::{FileEntry, Manifest, Role, MANIFEST};
use crate::snapshot::{validate, Snapshot};

/// A snapshot manifest checked for this host, ready to be written into a staging directory.
pub(crate) struct Prepared {
    pub manifest: Manifest,
    /// The text to write; the bundle's own when nothing changed (so its digest, which diffs built on it
    /// are pinned to, stays the same).
    pub doc: String,
}

impl Engine {
    /// Imports a bundle read from `body`, as `name` (default: the id it was exported under).
    pub async fn import_snapshot<R: AsyncRead + Unpin + Send>(
        &self,
        mut body: R,
        name: Option<String>,
    ) -> Result<Snapshot> {
        self.config().check_storage("import a snapshot")?;
        let engine = self
            .me()
            .ok_or_else(|| Error::internal("the engine is shutting down"))?;
        let (tx, rx) = mpsc::channel::<std::io::Result<Bytes>>(8);
        let work = tokio::task::spawn_blocking(move || {
            let mut reader = CountingReader::new(ChannelReader {
                rx,
                piece: Bytes::new(),
            });
            engine.import_from(&mut reader, name)
        });
        let pump = async move {
            let mut buf = vec![0u8; 256 << 10];
            loop {
                match body.read(&mut buf).await {
                    Ok(0) => break,
                    Ok(n) => {
                        if tx
                            .send(Ok(Bytes::copy_from_slice(&buf[..n])))
                            .await
                            .is_err()
                        {
                            break; // The import ended (refused); the caller drains the rest.
                        }
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e)).await;
                        break;
                    }
                }
            }
        };
        let ((), res) = tokio::join!(pump, work);
        res.map_err(|e| Error::internal(format!("the import task failed: {e}")))?
    }

    fn import_from<R: Read>(
        &self,
        r: &mut CountingReader<R>,
        name: Option<String>,
    ) -> Result<Snapshot> {
        let mut magic = [0u8; 8];
        r.exact(&mut magic)?;
        if &magic != MAGIC {
            return Err(damaged(
                0,
                "this is not a kiln bundle (no KILNBNDL magic)".into(),
            ));
        }
        let version = r.u32()?;
        if version != BUNDLE_VERSION {
            return Err(Error::new(
                ErrorCode::SnapshotIncompatible,
                format!("the bundle has format version {version}; this kiln reads version {BUNDLE_VERSION} (upgrade kiln, or export with a matching one)"),
            ));
        }
        let at = r.pos;
        let len = r.u32()?;
        if len > MAX_HEADER {
            return Err(damaged(
                at,
                format!("a header of {len} bytes is not plausible"),
            ));
        }
        let at = r.pos;
        let json = r.vec(len as usize)?;
        let header: BundleHeader = serde_json::from_slice(&json)
            .map_err(|e| damaged(at, format!("the header is not valid ({e})")))?;
        if header.kind != "snapshot" {
            return Err(Error::invalid(format!(
                "the bundle holds a {}, not a snapshot",
                header.kind.escape_debug()
            )));
        }
        let exported_as = header_id(&header.manifest)
            .ok_or_else(|| damaged(at, "the manifest in the header names no id".into()))?;
        let id = name.unwrap_or(exported_as);
        let claim = self.claim_import_name(&id)?;
        let tmp = self.config().snapshots_dir().join(format!(
            ".tmp-{id}-{:08x}-{}",
            rand::random::<u32>(),
            std::process::id()
        ));
        let prepared = self.prepare_import(&header.manifest, &id, &tmp)?;
        std::fs::create_dir(&tmp)
            .map_err(|e| fsutil::io_error(&format!("creating {}", tmp.display()), e))?;
        let staged = stage_files(r, &prepared.manifest, &tmp)
            .and_then(|()| self.import_staged(&tmp, &prepared, true));
        drop(claim);
        match staged {
            Ok(s) => {
                info!(snapshot = %s.id, bytes = r.pos, "snapshot imported");
                Ok(s)
            }
            Err(e) => {
                let _ = fsutil::remove_dir_durably(&tmp);
                Err(e)
            }
        }
    }

    /// Checks a manifest to be imported as `id` (its checksum line, this host's compatibility, a base it
    /// names) and maps an external base to this host's files. `staging` is where it will be written.
    pub(crate) fn prepare_import(&self, text: &str, id: &str, staging: &Path) -> Result<Prepared> {
        let exported_as = header_id(text).unwrap_or_default();
        let mut m = Manifest::parse_unchecked(text, &exported_as)?;
        let mut changed = false;
        if m.id != id {
            m.id = id.to_string();
            changed = true;
        }
        if m.files.iter().any(|f| f.external) {
            self.map_base(&mut m)?;
            changed = true;
        }
        validate::check(&m, staging, id)?;
        crate::snapshot::compat::check(
            &m,
            &crate::snapshot::compat::Host::this(self.accel().accel),
        )?;
        let doc = if changed {
            m.to_doc()?
        } else {
            text.to_string()
        };
        Ok(Prepared { manifest: m, doc })
    }

    /// Points a diff's external files at this host's copy of its base, found by content identity: the
    /// base must exist here with the digest the diff was pinned to, and hold files of the same checksums.
    fn map_base(&self, m: &mut Manifest) -> Result<()> {
        let parent = m
            .parent
            .clone()
            .ok_or_else(|| damaged(0, "the manifest names external files but no parent".into()))?;
        let pinned = m.base_digest.clone().unwrap_or_else(|| "(unpinned)".into());
        let missing = |why: String| {
            Error::new(
                ErrorCode::SnapshotBaseMissing,
                format!("snapshot {} was exported without its base {parent} (content digest {pinned}), and {why}; import that base first (its own bundle, under its own name), or export {} again without --without-base", m.id, m.id),
            )
        };
        let here = match self.base_digest(&parent) {
            Ok(d) => d,
            Err(e) => {
                return Err(missing(format!(
                    "this host does not have it ({})",
                    e.message
                )))
            }
        };
        if m.base_digest.as_ref().is_some_and(|p| *p != here) {
            return Err(Error::new(
                ErrorCode::SnapshotBaseChanged,
                format!("snapshot {} builds on {parent} with digest {pinned}, but this host's {parent} is {here} (another snapshot or template under that name); import the base it was taken on", m.id),
            ));
        }
        let candidates = self.base_files(&parent)?;
        for f in m.files.iter_mut().filter(|f| f.external) {
            let found = candidates
                .iter()
                .find(|c| c.role == f.role && c.size == f.size && c.checksum == f.checksum)
                .ok_or_else(|| {
                    missing(format!(
                        "this host's {parent} has no {:?} file with checksum {}",
                        f.role, f.checksum
                    ))
                })?;
            f.path = found.path.clone();
        }
        Ok(())
    }

    /// The disk and memory files of base `parent` on this host, as external entries (absolute paths).
    fn base_files(&self, parent: &str) -> Result<Vec<FileEntry>> {
        match parent.split_once(':') {
            Some(("template", name)) => {
                let image = self.images().get(name).map_err(|e| {
                    Error::new(
                        ErrorCode::SnapshotBaseMissing,
                        format!("template {name}: {e}"),
                    )
                })?;
                Ok(vec![FileEntry::template_rootfs(&image)])
            }
            Some(("snapshot", id)) => {
                let dir = self.config().snapshot_dir(id);
                let pm = Manifest::read(&dir, id)?;
                Ok(pm
                    .files
                    .iter()
                    .filter(|f| matches!(f.role, Role::Disk | Role::Memory))
                    .map(|f| pm.external(&dir, f))
                    .collect())
            }
            _ => Err(Error::internal(format!("unknown base '{parent}'"))),
        }
    }

    /// Publishes a staged snapshot: `staging` (inside the snapshots directory) holds every own file of
    /// `prepared.manifest`, written but maybe not yet durable. With `verified`, their checksums were
    /// checked as they arrived; otherwise they are checked now. Files are made durable, the manifest
    /// written, the directory renamed into place and fsynced, and the row inserted last. The caller
    /// holds the name claim and removes `staging` on failure. A later remote pull stages the same way.
    pub(crate) fn import_staged(
        &self,
        staging: &Path,
        prepared: &Prepared,
        verified: bool,
    ) -> Result<Snapshot> {
        let m = &prepared.manifest;
        // A base is kept from deletion until the row that depends on it exists.
        let _base = match m
            .parent
            .as_deref()
            .and_then(|p| p.strip_prefix("snapshot:"))
        {
            Some(p) if m.files.iter().any(|f| f.external) => {
                Some(self.claim_use(p, ErrorCode::SnapshotBaseMissing)?)
            }
            _ => None,
        };
        self.check_base_pin(m)?;
        m.verify(staging, !verified)?;
        for f in m.files.iter().filter(|f| !f.external) {
            self.confine().seal(&staging.join(&f.path))?;
        }
        fsutil::fsync_files_in(staging)?;
        fsutil::write_atomic(&staging.join(MANIFEST), prepared.doc.as_bytes())?;
        let dir = self.config().snapshot_dir(&m.id);
        fsutil::publish(staging, &dir)?;
        let snap = crate::recovery::snapshot_from_manifest(m, &dir);
        if let Err(e) = self.db().insert_snapshot(&snap, false) {
            let _ = fsutil::remove_dir_durably(&dir);
            return Err(e);
        }
        self.mark_verified(&m.id);
        Ok(snap)
    }
}

/// The `id` field of a manifest's text, read before anything else is trusted.
fn header_id(text: &str) -> Option<String> {
    let json = text.rsplit_once("\n# checksum ").map_or(text, |(j, _)| j);
    #[derive(serde::Deserialize)]
    struct IdOnly {
        id: String,
    }
    serde_json::from_str::<IdOnly>(json).ok().map(|v| v.id)
}

/// Reads the files and the trailer of a bundle into `tmp`, checking each file against `m` (every own
/// file exactly once, with its size and checksum) and the whole against the trailer.
pub(super) fn stage_files<R: Read>(
    r: &mut CountingReader<R>,
    m: &Manifest,
    tmp: &Path,
) -> Result<()> {
    let mut wanted: BTreeMap<&str, &FileEntry> = m
        .files
        .iter()
        .filter(|f| !f.external)
        .map(|f| (f.path.as_str(), f))
        .collect();
    loop {
        let at = r.pos;
        match r.u8()? {
            b'F' => {
                let len = r.u16()? as usize;
                let name = String::from_utf8(r.vec(len)?)
                    .map_err(|_| damaged(at, "a file name is not UTF-8".into()))?;
                let entry = wanted.remove(name.as_str()).ok_or_else(|| {
                    damaged(
                        at,
                        format!(
                            "file '{}' is not in the manifest (or comes twice)",
                            name.escape_debug()
                        ),
                    )
                })?;
                stage_file(r, entry, &tmp.join(&entry.path), at)?;
            }
            b'T' => {
                let total = r.u64()?;
                if total != at + 1 {
                    return Err(damaged(
                        at,
                        format!(
                            "the trailer counts {total} bytes, the bundle has {}",
                            at + 1
                        ),
                    ));
                }
                let digest = r.hash.digest128();
                let mut b = [0u8; 16];
                let digest_at = r.pos;
                r.exact(&mut b)?;
                if u128::from_le_bytes(b) != digest {
                    return Err(damaged(digest_at, "the bundle's checksum does not match (a byte was changed somewhere before this)".into()));
                }
                let mut end = [0u8; 8];
                let end_at = r.pos;
                r.exact(&mut end)?;
                if &end != END_MAGIC {
                    return Err(damaged(end_at, "the end marker is wrong".into()));
                }
                if let Some(name) = wanted.keys().next() {
                    return Err(damaged(
                        at,
                        format!("file '{name}' of the manifest is missing"),
                    ));
                }
                if !r.at_end() {
                    return Err(damaged(r.pos, "bytes follow the end of the bundle".into()));
                }
                return Ok(());
            }
            other => return Err(damaged(at, format!("unexpected record type {other:#04x}"))),
        }
    }
}

fn stage_file<R: Read>(
    r: &mut CountingReader<R>,
    entry: &FileEntry,
    path: &PathBuf,
    at: u64,
) -> Result<()> {
    let size = r.u64()?;
    if size != entry.size {
        return Err(damaged(
            at,
            format!(
                "file {} has {size} bytes, its manifest says {}",
                entry.path, entry.size
            ),
        ));
    }
    let out = File::create(path)
        .map_err(|e| fsutil::io_error(&format!("creating {}", path.display()), e))?;
    out.set_len(size).map_err(|e| write_error(path, e))?;
    let mut hash = ContentHash::like(&entry.checksum)
        .ok_or_else(|| damaged(at, format!("unknown checksum '{}'", entry.checksum)))?;
    let mut next = 0u64;
    loop {
        let rec = r.pos;
        match r.u8()? {
            b'D' => {
                let off = r.u64()?;
                let raw = r.u32()?;
                let zlen = r.u32()?;
                if raw == 0
                    || raw > MAX_PIECE
                    || zlen > MAX_PIECE + 4096
                    || off < next
                    || off.saturating_add(u64::from(raw)) > size
                {
                    return Err(damaged(
                        rec,
                        format!(
                            "a piece of {} (offset {off}, {raw} bytes) does not fit the file",
                            entry.path
                        ),
                    ));
                }
                let zat = r.pos;
                let z = r.vec(zlen as usize)?;
                let data = zstd::bulk::decompress(&z, raw as usize).map_err(|e| {
                    damaged(
                        zat,
                        format!(
                            "compressed data of {} does not decompress ({e})",
                            entry.path
                        ),
                    )
                })?;
                if data.len() != raw as usize {
                    return Err(damaged(
                        zat,
                        format!(
                            "a piece of {} decompresses to {} bytes, not {raw}",
                            entry.path,
                            data.len()
                        ),
                    ));
                }
                hash.zeros(off - next);
                hash.update(&data);
                out.write_all_at(&data, off)
                    .map_err(|e| write_error(path, e))?;
                next = off + u64::from(raw);
            }
            b'E' => {
                let len = r.u8()? as usize;
                let recorded = String::from_utf8_lossy(&r.vec(len)?).into_owned();
                hash.zeros(size - next);
                let sum = hash.finish();
                if sum != entry.checksum || recorded != entry.checksum {
                    return Err(damaged(at, format!("file {} does not match its checksum (bundle says {recorded}, manifest {}, data {sum})", entry.path, entry.checksum)));
                }
                return Ok(());
            }
            other => {
                return Err(damaged(
                    rec,
                    format!("unexpected record type {other:#04x} in file {}", entry.path),
                ))
            }
        }
    }
}

/// Reads the pieces the async side sends; an error there (the client went away) is a read error.
struct ChannelReader {
    rx: mpsc::Receiver<std::io::Result<Bytes>>,
    piece: Bytes,
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.piece.is_empty() {
            match self.rx.blocking_recv() {
                Some(Ok(p)) => self.piece = p,
                Some(Err(e)) => return Err(e),
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.piece.len());
        buf[..n].copy_from_slice(&self.piece.split_to(n));
        Ok(n)
    }
}

/// `bundle` with its header's manifest replaced by `manifest` (a whole `manifest.json` text) and its
/// trailer recomputed: for tools and tests that re-pack a bundle (checksums detect damage, they are not
/// signatures).
pub fn repack_with_manifest(bundle: &[u8], manifest: &str) -> Result<Vec<u8>> {
    let bad = |why: &str| Error::invalid(format!("not a bundle: {why}"));
    if bundle.len() < 16 + 33 || &bundle[..8] != MAGIC {
        return Err(bad("no magic"));
    }
    let len = u32::from_le_bytes(bundle[12..16].try_into().map_err(|_| bad("short"))?) as usize;
    let rest_at = 16 + len;
    let mut header: BundleHeader =
        serde_json::from_slice(bundle.get(16..rest_at).ok_or_else(|| bad("short"))?)
            .map_err(|e| Error::invalid(e.to_string()))?;
    header.manifest = manifest.to_string();
    let json = serde_json::to_vec(&header).map_err(|e| Error::internal(e.to_string()))?;
    // The files, up to and including the trailer's 'T'.
    let body = bundle
        .get(rest_at..bundle.len() - 32)
        .ok_or_else(|| bad("short"))?;
    let mut out = Vec::with_capacity(bundle.len() + json.len());
    out.extend_from_slice(&bundle[..12]);
    out.extend_from_slice(&(json.len() as u32).to_le_bytes());
    out.extend_from_slice(&json);
    out.extend_from_slice(body);
    let total = out.len() as u64;
    out.extend_from_slice(&total.to_le_bytes());
    let digest = xxhash_rust::xxh3::xxh3_128(&out);
    out.extend_from_slice(&digest.to_le_bytes());
    out.extend_from_slice(END_MAGIC);
    Ok(out)
}

/// A failed write: `insufficient_storage` when the data disk is full.
fn write_error(path: &Path, e: std::io::Error) -> Error {
    if e.raw_os_error() == Some(libc::ENOSPC) {
        Error::new(
            ErrorCode::InsufficientStorage,
            format!("the disk holding kiln's data directory is full (writing {}); free space and import again", path.display()),
        )
    } else {
        fsutil::io_error(&format!("writing {}", path.display()), e)
    }
}
