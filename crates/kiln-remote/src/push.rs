//! Push: every data chunk of every file is hashed; chunks the remote already has (written recently) are
//! skipped, the rest compressed and uploaded, several at once; the manifest object is written last, so a
//! push cut short is invisible and the next one skips what got there.

use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use futures::{StreamExt, TryStreamExt};
use object_store::path::Path as ObjPath;
use object_store::{ObjectStore, PutPayload};
use serde::Serialize;
use tokio::sync::mpsc;

use crate::chunk::{
    chunk_key, manifest_key, sha256_hex, RemoteChunk, RemoteFile, RemoteManifest, CHUNK,
};
use crate::{Error, Progress, Remote, Result, PARALLEL};

/// A chunk found on the remote is uploaded again when it was written longer ago than this, so its age
/// keeps it from `gc` (which spares chunks younger than its grace period, 24 h by default) while this
/// push runs. See `gc`.
pub const REFRESH_AFTER: chrono::TimeDelta = chrono::TimeDelta::hours(12);
/// zstd level: fast (RAM and disk blocks; the CPU is shared with running guests).
const LEVEL: i32 = 1;

/// One file of the snapshot, opened by the caller (a deletion after that cannot pull data from under it).
pub struct PushFile {
    pub name: String,
    pub file: File,
    pub size: u64,
    pub checksum: String,
}

#[derive(Debug, Clone, Default, Serialize, utoipa::ToSchema)]
pub struct PushReport {
    pub remote: String,
    pub name: String,
    /// Data chunks the snapshot has (holes and all-zero chunks are not stored).
    pub chunks: u64,
    /// Of those, the ones uploaded now; the others were on the remote already.
    pub chunks_uploaded: u64,
    /// Data bytes of the snapshot (before compression, holes and zeros left out).
    pub data_bytes: u64,
    /// Data bytes of the chunks uploaded now, and what was sent for them (compressed).
    pub new_data_bytes: u64,
    pub bytes_uploaded: u64,
    pub seconds: f64,
}

/// A chunk of file `.0`, and (raw, compressed) bytes when this push uploaded it.
type Placed = (usize, RemoteChunk, Option<(u64, u64)>);

struct Piece {
    file: usize,
    offset: u64,
    data: Vec<u8>,
    sha: String,
}

impl Remote {
    /// Pushes a snapshot as `name`: `manifest` is its `manifest.json` text, `files` every file it names.
    pub async fn push(
        &self,
        name: &str,
        manifest: String,
        files: Vec<PushFile>,
        progress: Arc<Progress>,
    ) -> Result<PushReport> {
        let started = Instant::now();
        let total: u64 = files.iter().map(|f| allocated(&f.file, f.size)).sum();
        progress.total.store(total, Ordering::Relaxed);
        let meta: Vec<(String, u64, String)> = files
            .iter()
            .map(|f| (f.name.clone(), f.size, f.checksum.clone()))
            .collect();
        let (tx, mut rx) = mpsc::channel::<Result<Piece>>(PARALLEL * 2);
        let reader_progress = progress.clone();
        let reader = tokio::task::spawn_blocking(move || read_pieces(files, &tx, &reader_progress));
        let pieces = futures::stream::poll_fn(move |cx| rx.poll_recv(cx));
        let seen = Arc::new(Mutex::new(HashSet::new()));
        let cutoff = chrono::Utc::now() - REFRESH_AFTER;
        let results: Vec<Placed> = pieces
            .map(|piece| {
                let (store, remote, seen, progress) = (
                    self.store.clone(),
                    self.name.clone(),
                    seen.clone(),
                    progress.clone(),
                );
                async move {
                    let p = piece?;
                    let len = p.data.len() as u64;
                    let first = seen
                        .lock()
                        .map(|mut s| s.insert(p.sha.clone()))
                        .unwrap_or(true);
                    let sent = if first {
                        upload_if_missing(&*store, &remote, &p, cutoff, &progress).await?
                    } else {
                        None
                    };
                    progress.done.fetch_add(len, Ordering::Relaxed);
                    let chunk = RemoteChunk {
                        offset: p.offset,
                        len,
                        sha256: p.sha,
                    };
                    Ok((p.file, chunk, sent))
                }
            })
            .buffer_unordered(PARALLEL)
            .try_collect()
            .await?;
        reader
            .await
            .map_err(|e| Error::io("the chunk reader", std::io::Error::other(e.to_string())))?;
        let mut report = PushReport {
            remote: self.name.clone(),
            name: name.to_string(),
            ..Default::default()
        };
        let mut chunks: BTreeMap<usize, Vec<RemoteChunk>> = BTreeMap::new();
        for (file, chunk, sent) in results {
            report.chunks += 1;
            report.data_bytes += chunk.len;
            if let Some((raw, z)) = sent {
                report.chunks_uploaded += 1;
                report.new_data_bytes += raw;
                report.bytes_uploaded += z;
            }
            chunks.entry(file).or_default().push(chunk);
        }
        let files = meta
            .into_iter()
            .enumerate()
            .map(|(i, (name, size, checksum))| {
                let mut list = chunks.remove(&i).unwrap_or_default();
                list.sort_by_key(|c| c.offset);
                RemoteFile {
                    name,
                    size,
                    checksum,
                    chunks: list,
                }
            })
            .collect();
        let doc = RemoteManifest::new(name, manifest, files);
        let body = serde_json::to_vec(&doc)
            .map_err(|e| Error::io("encoding the manifest", std::io::Error::other(e)))?;
        let key = manifest_key(name);
        self.store
            .put(&ObjPath::from(key.as_str()), PutPayload::from(body))
            .await
            .map_err(|e| Error::store(&self.name, &format!("writing {key}"), e))?;
        report.seconds = started.elapsed().as_secs_f64();
        Ok(report)
    }
}

/// Uploads `p` unless the remote has it, written after `cutoff`. Returns (raw, compressed) bytes sent.
async fn upload_if_missing(
    store: &dyn ObjectStore,
    remote: &str,
    p: &Piece,
    cutoff: chrono::DateTime<chrono::Utc>,
    progress: &Progress,
) -> Result<Option<(u64, u64)>> {
    let key = chunk_key(&p.sha);
    let path = ObjPath::from(key.as_str());
    match store.head(&path).await {
        Ok(m) if m.last_modified > cutoff => return Ok(None),
        Ok(_) | Err(object_store::Error::NotFound { .. }) => {}
        Err(e) => return Err(Error::store(remote, &format!("checking {key}"), e)),
    }
    let data = p.data.clone();
    let z = tokio::task::spawn_blocking(move || zstd::bulk::compress(&data, LEVEL))
        .await
        .map_err(|e| Error::io("compressing", std::io::Error::other(e.to_string())))?
        .map_err(|e| Error::io("compressing", e))?;
    let zlen = z.len() as u64;
    store
        .put(&path, PutPayload::from(z))
        .await
        .map_err(|e| Error::store(remote, &format!("uploading {key}"), e))?;
    progress.transferred.fetch_add(zlen, Ordering::Relaxed);
    Ok(Some((p.data.len() as u64, zlen)))
}

/// Reads every file's data chunks in order (holes and all-zero chunks skipped) into `tx`.
fn read_pieces(files: Vec<PushFile>, tx: &mpsc::Sender<Result<Piece>>, progress: &Progress) {
    for (i, f) in files.iter().enumerate() {
        let mut offset = 0u64;
        while offset < f.size {
            let len = CHUNK.min(f.size - offset);
            let piece = match has_data(&f.file, offset, offset + len) {
                Ok(false) => None,
                Ok(true) => {
                    let mut data = vec![0u8; len as usize];
                    match f.file.read_exact_at(&mut data, offset) {
                        Ok(()) if data.iter().all(|b| *b == 0) => {
                            progress.done.fetch_add(len, Ordering::Relaxed);
                            None
                        }
                        Ok(()) => {
                            let sha = sha256_hex(&data);
                            Some(Ok(Piece {
                                file: i,
                                offset,
                                data,
                                sha,
                            }))
                        }
                        Err(e) => Some(Err(Error::io(
                            &format!("reading {} at {offset}", f.name),
                            e,
                        ))),
                    }
                }
                Err(e) => Some(Err(Error::io(&format!("reading {}", f.name), e))),
            };
            if let Some(p) = piece {
                let stop = p.is_err();
                if tx.blocking_send(p).is_err() || stop {
                    return;
                }
            }
            offset += len;
        }
    }
}

/// Whether `[start, end)` of `f` has any data extent (SEEK_DATA); a filesystem without it: yes.
pub(crate) fn has_data(f: &File, start: u64, end: u64) -> std::io::Result<bool> {
    // SAFETY: lseek on a valid fd.
    let r = unsafe { libc::lseek(f.as_raw_fd(), start as i64, libc::SEEK_DATA) };
    if r < 0 {
        let e = std::io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ENXIO) => Ok(false),
            Some(libc::EINVAL) => Ok(true),
            _ => Err(e),
        };
    }
    Ok((r as u64) < end)
}

/// Bytes `f` has allocated (its data, holes left out), for progress.
pub(crate) fn allocated(f: &File, size: u64) -> u64 {
    use std::os::unix::fs::MetadataExt;
    f.metadata()
        .map(|m| (m.blocks() * 512).min(size))
        .unwrap_or(size)
}
