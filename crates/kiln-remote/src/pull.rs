//! Pull: the files of a pushed snapshot are rebuilt in a staging directory. A file this host already has
//! (same checksum: a template's rootfs, kernel, initrd) is copied locally; otherwise its chunks come from
//! the local chunk cache or the remote, several at once, each checked against its hash before it is
//! written. Holes stay holes. The caller verifies the whole files and publishes them.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use futures::{StreamExt, TryStreamExt};
use object_store::path::Path as ObjPath;
use serde::Serialize;

use crate::chunk::{chunk_key, sha256_hex, RemoteChunk, RemoteManifest};
use crate::{Error, ErrorKind, Progress, Remote, Result, PARALLEL};

/// Where a pull may find data without downloading it.
#[derive(Debug, Default, Clone)]
pub struct PullSource {
    /// Files of this host by the checksum a manifest records for them.
    pub local_files: HashMap<String, PathBuf>,
    /// The chunk cache directory (compressed chunks by key), if any.
    pub cache: Option<PathBuf>,
}

#[derive(Debug, Clone, Default, Serialize, utoipa::ToSchema)]
pub struct PullReport {
    pub chunks: u64,
    pub chunks_downloaded: u64,
    pub chunks_cached: u64,
    /// Files copied from this host's own copy (by checksum) instead of downloaded.
    pub files_local: u64,
    pub data_bytes: u64,
    /// What came over the network (compressed).
    pub bytes_downloaded: u64,
    pub seconds: f64,
}

enum Got {
    Cache,
    Remote(u64),
}

impl Remote {
    /// Writes every file of `m` into `dir` (which exists; names were checked by the caller).
    pub async fn pull_files(
        &self,
        m: &RemoteManifest,
        dir: &Path,
        src: &PullSource,
        progress: Arc<Progress>,
    ) -> Result<PullReport> {
        let started = Instant::now();
        let mut report = PullReport::default();
        progress.total.store(m.data_bytes(), Ordering::Relaxed);
        let mut jobs = Vec::new();
        for f in &m.files {
            let path = dir.join(&f.name);
            let out = File::create(&path)
                .map_err(|e| Error::io(&format!("creating {}", path.display()), e))?;
            out.set_len(f.size)
                .map_err(|e| Error::io(&format!("sizing {}", path.display()), e))?;
            if let Some(local) = src.local_files.get(&f.checksum) {
                let (local, path2) = (local.clone(), path.clone());
                let size = f.size;
                let ok = tokio::task::spawn_blocking(move || copy_sparse(&local, &out, size))
                    .await
                    .map_err(|e| Error::io("copying", std::io::Error::other(e.to_string())))?;
                match ok {
                    Ok(n) => {
                        report.files_local += 1;
                        progress.done.fetch_add(
                            f.chunks.iter().map(|c| c.len).sum::<u64>(),
                            Ordering::Relaxed,
                        );
                        tracing::debug!(file = %path2.display(), bytes = n, "copied from this host");
                        continue;
                    }
                    // The caller's verification would refuse it; fetch it instead.
                    Err(e) => tracing::warn!(error = %e, "local copy failed; downloading"),
                }
            }
            let out = Arc::new(
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .map_err(|e| Error::io(&format!("opening {}", path.display()), e))?,
            );
            for c in &f.chunks {
                jobs.push((f.name.clone(), out.clone(), c.clone()));
            }
        }
        let got: Vec<(u64, Got)> = futures::stream::iter(jobs)
            .map(|(file, out, c)| {
                let (remote, cache, progress) = (self.clone(), src.cache.clone(), progress.clone());
                async move {
                    let (data, how) = remote.fetch_chunk(&c, &file, cache.as_deref()).await?;
                    let len = c.len;
                    tokio::task::spawn_blocking(move || out.write_all_at(&data, c.offset))
                        .await
                        .map_err(|e| Error::io("writing", std::io::Error::other(e.to_string())))?
                        .map_err(|e| Error::io(&format!("writing {file}"), e))?;
                    progress.done.fetch_add(len, Ordering::Relaxed);
                    if let Got::Remote(z) = how {
                        progress.transferred.fetch_add(z, Ordering::Relaxed);
                    }
                    Ok::<_, Error>((len, how))
                }
            })
            .buffer_unordered(PARALLEL)
            .try_collect()
            .await?;
        for (len, how) in got {
            report.chunks += 1;
            report.data_bytes += len;
            match how {
                Got::Cache => report.chunks_cached += 1,
                Got::Remote(z) => {
                    report.chunks_downloaded += 1;
                    report.bytes_downloaded += z;
                }
            }
        }
        report.seconds = started.elapsed().as_secs_f64();
        Ok(report)
    }

    /// One chunk's bytes, checked against its hash: from the cache when it has a good copy, else from
    /// the remote (then kept in the cache).
    async fn fetch_chunk(
        &self,
        c: &RemoteChunk,
        file: &str,
        cache: Option<&Path>,
    ) -> Result<(Vec<u8>, Got)> {
        let key = chunk_key(&c.sha256);
        let cached = cache.map(|d| d.join(&key));
        if let Some(p) = &cached {
            if let Ok(z) = std::fs::read(p) {
                if let Ok(data) = unpack(&z, c) {
                    return Ok((data, Got::Cache));
                }
                let _ = std::fs::remove_file(p); // Damaged in the cache: fetch it again.
            }
        }
        let path = ObjPath::from(key.as_str());
        let missing = || {
            Error::new(
                ErrorKind::Corrupt,
                format!("remote {}: chunk {key} ({file} at offset {}) is missing; push the snapshot again from a host that has it", self.name, c.offset),
            )
        };
        let got = match self.store.get(&path).await {
            Ok(g) => g,
            Err(object_store::Error::NotFound { .. }) => return Err(missing()),
            Err(e) => return Err(Error::store(&self.name, &format!("downloading {key}"), e)),
        };
        // zstd never grows data by more than a little; anything larger is not this chunk.
        if got.meta.size > c.len + c.len / 64 + 4096 {
            return Err(corrupt(
                &self.name,
                &key,
                file,
                c,
                "it is larger than its data can compress to",
            ));
        }
        let z = got
            .bytes()
            .await
            .map_err(|e| Error::store(&self.name, &format!("downloading {key}"), e))?;
        let zlen = z.len() as u64;
        let c2 = c.clone();
        let z2 = z.clone();
        let data = tokio::task::spawn_blocking(move || unpack(&z2, &c2))
            .await
            .map_err(|e| Error::io("checking a chunk", std::io::Error::other(e.to_string())))?
            .map_err(|why| corrupt(&self.name, &key, file, c, &why))?;
        if let Some(p) = cached {
            keep(&p, &z);
        }
        Ok((data, Got::Remote(zlen)))
    }
}

/// Decompresses a chunk and checks its length and hash.
fn unpack(z: &[u8], c: &RemoteChunk) -> std::result::Result<Vec<u8>, String> {
    let data = zstd::bulk::decompress(z, c.len as usize)
        .map_err(|e| format!("it does not decompress ({e})"))?;
    if data.len() as u64 != c.len {
        return Err(format!("it holds {} bytes, not {}", data.len(), c.len));
    }
    let sha = sha256_hex(&data);
    if sha != c.sha256 {
        return Err(format!("its data hashes to {sha}"));
    }
    Ok(data)
}

fn corrupt(remote: &str, key: &str, file: &str, c: &RemoteChunk, why: &str) -> Error {
    Error::new(
        ErrorKind::Corrupt,
        format!("remote {remote}: chunk {key} ({file} at offset {}) is damaged: {why}; nothing was pulled (push the snapshot again from a host that has it)", c.offset),
    )
}

/// Puts a verified chunk in the cache (temp file, rename); a failure only costs a later download.
fn keep(path: &Path, z: &[u8]) {
    let Some(dir) = path.parent() else { return };
    let _ = std::fs::create_dir_all(dir);
    let tmp = dir.join(format!(".tmp-{}-{:x}", std::process::id(), rand_u64()));
    if std::fs::write(&tmp, z).is_ok() && std::fs::rename(&tmp, path).is_ok() {
        return;
    }
    let _ = std::fs::remove_file(&tmp);
}

fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.finish()
}

/// Copies `from`'s data extents into `out` (holes stay holes). Returns the bytes copied.
fn copy_sparse(from: &Path, out: &File, size: u64) -> std::io::Result<u64> {
    let src = File::open(from)?;
    if src.metadata()?.len() != size {
        return Err(std::io::Error::other("the local file has another size"));
    }
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0u64;
    let mut copied = 0u64;
    while off < size {
        let want = (size - off).min(buf.len() as u64) as usize;
        // Holes are neither read nor written (a template's rootfs is mostly holes).
        if !crate::push::has_data(&src, off, off + want as u64)? {
            off += want as u64;
            continue;
        }
        let n = src.read_at(&mut buf[..want], off)?;
        if n == 0 {
            return Err(std::io::Error::other(
                "the local file is shorter than it says",
            ));
        }
        if buf[..n].iter().any(|b| *b != 0) {
            out.write_all_at(&buf[..n], off)?;
            copied += n as u64;
        }
        off += n as u64;
    }
    Ok(copied)
}
