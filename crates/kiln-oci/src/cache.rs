//! Layer blobs cached by digest (`<cache>/oci/blobs/sha256/<hex>`), so images sharing layers download
//! and store them once. A blob enters the cache only after its content hashed to its digest; it is
//! written to a temporary file, fsynced, renamed into place and the directory fsynced.

use std::fs;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

#[derive(Debug, Clone)]
pub struct BlobCache {
    dir: PathBuf,
}

/// The hex part of a `sha256:<64 hex>` digest; anything else is refused (it also names a file).
pub fn sha256_hex(digest: &str) -> Result<&str> {
    let Some(hex) = digest.strip_prefix("sha256:") else {
        bail!("unsupported digest {digest:?}: kiln verifies sha256 digests only");
    };
    if hex.len() != 64
        || !hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        bail!("malformed digest {digest:?}");
    }
    Ok(hex)
}

impl BlobCache {
    pub fn new(cache_root: &Path) -> Self {
        BlobCache {
            dir: cache_root.join("oci/blobs/sha256"),
        }
    }

    /// The cache's lock file (see the CLI: pulls hold it shared, a prune exclusively).
    pub fn lock_path(&self) -> PathBuf {
        self.dir.with_file_name("blobs.lock")
    }

    /// Removes every cached blob whose digest is not in `keep`, durably (unlinks, then one fsync of
    /// the directory). The caller holds the cache's lock exclusively, so no pull is writing or about
    /// to use one. Returns (blobs, bytes) removed.
    pub fn prune(&self, keep: &std::collections::HashSet<String>) -> Result<(usize, u64)> {
        let entries = match fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok((0, 0)),
            Err(e) => return Err(e).with_context(|| format!("read {}", self.dir.display())),
        };
        let (mut count, mut bytes) = (0, 0);
        for e in entries {
            let e = e.with_context(|| format!("read {}", self.dir.display()))?;
            let name = e.file_name().to_string_lossy().into_owned();
            let digest = format!("sha256:{name}");
            // Only blob files; temporary files are `clean_temps`'s.
            if sha256_hex(&digest).is_err() || keep.contains(&digest) {
                continue;
            }
            let size = e.metadata().map(|m| m.len()).unwrap_or(0);
            fs::remove_file(e.path()).with_context(|| format!("remove {}", e.path().display()))?;
            count += 1;
            bytes += size;
        }
        if count > 0 {
            fs::File::open(&self.dir)
                .and_then(|d| d.sync_all())
                .with_context(|| format!("sync {}", self.dir.display()))?;
        }
        Ok((count, bytes))
    }

    pub fn path(&self, digest: &str) -> Result<PathBuf> {
        Ok(self.dir.join(sha256_hex(digest)?))
    }

    pub fn contains(&self, digest: &str) -> bool {
        self.path(digest).is_ok_and(|p| p.is_file())
    }

    /// A new temporary file in the cache directory (same filesystem, so `commit` is a rename).
    pub fn temp(&self) -> Result<(PathBuf, fs::File)> {
        static N: AtomicU64 = AtomicU64::new(0);
        fs::create_dir_all(&self.dir).with_context(|| format!("create {}", self.dir.display()))?;
        let path = self.dir.join(format!(
            ".tmp-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let file = fs::File::create(&path).with_context(|| format!("create {}", path.display()))?;
        Ok((path, file))
    }

    /// Moves a downloaded file whose content hashed to `actual` into the cache as `digest`, or deletes
    /// it and fails when the two differ.
    pub fn commit(&self, temp: &Path, digest: &str, actual: &str) -> Result<PathBuf> {
        if actual != digest {
            let _ = fs::remove_file(temp);
            bail!(
                "blob {digest} failed verification: its content hashes to {actual}; the registry or \
                 archive is corrupt or was tampered with (nothing was kept)"
            );
        }
        let dest = self.path(digest)?;
        fs::File::open(temp)
            .and_then(|f| f.sync_all())
            .with_context(|| format!("sync {}", temp.display()))?;
        fs::rename(temp, &dest).with_context(|| format!("rename to {}", dest.display()))?;
        fs::File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .with_context(|| format!("sync {}", self.dir.display()))?;
        Ok(dest)
    }

    /// Copies `src` into the cache as `digest`, verifying it; returns the bytes copied (0 when cached).
    pub fn insert_from(&self, src: &Path, digest: &str, progress: &dyn Progress) -> Result<u64> {
        if self.contains(digest) {
            return Ok(0);
        }
        let (tmp, file) = self.temp()?;
        let mut input = fs::File::open(src).with_context(|| format!("open {}", src.display()))?;
        let mut out = HashingWriter::new(file, progress);
        io::copy(&mut input, &mut out).with_context(|| format!("copy {}", src.display()))?;
        let (bytes, actual) = out.finish();
        self.commit(&tmp, digest, &actual)?;
        Ok(bytes)
    }

    /// Removes temporary files left by processes that died mid-download.
    pub fn clean_temps(&self) {
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let pid = name
                .strip_prefix(".tmp-")
                .and_then(|r| r.split('-').next())
                .and_then(|p| p.parse::<u32>().ok());
            if pid.is_some_and(|p| !Path::new(&format!("/proc/{p}")).exists()) {
                let _ = fs::remove_file(e.path());
            }
        }
    }
}

/// Hex sha256 of a whole stream, as a `sha256:` digest.
pub fn digest_of(mut r: impl Read) -> Result<String> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(format!("sha256:{}", hex::encode(h.finalize())))
}

/// Byte-level progress of a transfer, shown by the CLI as a bar.
pub trait Progress: Send + Sync {
    /// A new phase, e.g. one layer; `total` in bytes when known.
    fn begin(&self, what: &str, total: Option<u64>);
    fn advance(&self, bytes: u64);
    /// A line of information printed above the bar.
    fn note(&self, msg: &str);
}

pub struct NoProgress;
impl Progress for NoProgress {
    fn begin(&self, _: &str, _: Option<u64>) {}
    fn advance(&self, _: u64) {}
    fn note(&self, _: &str) {}
}

/// Writes through to a file, hashing and counting what passes.
pub struct HashingWriter<'a> {
    file: fs::File,
    hasher: Sha256,
    bytes: u64,
    progress: &'a dyn Progress,
}

impl<'a> HashingWriter<'a> {
    pub fn new(file: fs::File, progress: &'a dyn Progress) -> Self {
        HashingWriter {
            file,
            hasher: Sha256::new(),
            bytes: 0,
            progress,
        }
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    pub fn finish(self) -> (u64, String) {
        (
            self.bytes,
            format!("sha256:{}", hex::encode(self.hasher.finalize())),
        )
    }
}

impl Write for HashingWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.file.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        self.progress.advance(n as u64);
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}
