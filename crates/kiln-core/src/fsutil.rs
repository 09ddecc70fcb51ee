//! File helpers for immutable layers: hard links (falling back to sparse copies across filesystems),
//! checksums, and durable writes.

use std::fs::File;
use std::io::{Read, Write};
use std::path::Path;

use crate::error::{Error, Result};

/// Makes `dst` refer to the same immutable content as `src`: a hard link when both are on one filesystem
/// (O(1), and the data lives as long as any link does), else a hole-preserving copy.
pub fn link_or_copy(src: &Path, dst: &Path) -> Result<()> {
    match std::fs::hard_link(src, dst) {
        Ok(()) => Ok(()),
        Err(e)
            if e.raw_os_error() == Some(libc::EXDEV)
                || e.kind() == std::io::ErrorKind::PermissionDenied =>
        {
            off_runtime(|| kiln_vmm::memory::sparse_copy(src, dst))
                .and_then(|_| {
                    std::fs::File::open(dst)
                        .and_then(|f| f.sync_all())
                        .map_err(|e| kiln_vmm::VmmError::io("syncing the copy", e))
                })
                .map_err(|e| {
                    let context = format!("copying {} to {}", src.display(), dst.display());
                    match e {
                        // A full disk is the client's to fix (507), not an internal error.
                        kiln_vmm::VmmError::Io {
                            context: what,
                            source,
                        } => io_error(&format!("{context}: {what}"), source),
                        e => Error::internal(format!("{context}: {e}")),
                    }
                })
        }
        Err(e) => Err(io_error(
            &format!("linking {} to {}", src.display(), dst.display()),
            e,
        )),
    }
}

/// Renames `src` to `dst`, copying when they are on different filesystems (the snapshot store may be a
/// mount of its own). Durable like [`publish`]: the data is fsynced first, both directories after.
pub fn move_file(src: &Path, dst: &Path) -> Result<()> {
    fsync_path(src)?;
    match std::fs::rename(src, dst) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {
            off_runtime(|| std::fs::copy(src, dst))
                .map(|_| ())
                .and_then(|()| File::open(dst)?.sync_all())
                .and_then(|()| std::fs::remove_file(src))
                .map_err(|e| {
                    io_error(
                        &format!("copying {} to {}", src.display(), dst.display()),
                        e,
                    )
                })?;
        }
        Err(e) => {
            return Err(io_error(
                &format!("moving {} to {}", src.display(), dst.display()),
                e,
            ))
        }
    }
    fsync_parent(dst)?;
    fsync_parent_if_other(src, dst)
}

/// Publishes a complete file or directory `src` under the name `dst`: fsync of `src` (a directory's
/// entries; its files are the caller's to sync), rename, fsync of the directories that changed. After a
/// crash `dst` is either absent or whole.
pub fn publish(src: &Path, dst: &Path) -> Result<()> {
    fsync_path(src)?;
    rename_durably(src, dst)
}

/// Renames and then fsyncs the directories involved, so the new name survives a power cut. For a retire
/// (moving data out of the way before removing it) the source need not be synced first; to make data
/// appear, use [`publish`].
pub fn rename_durably(src: &Path, dst: &Path) -> Result<()> {
    std::fs::rename(src, dst).map_err(|e| {
        io_error(
            &format!("renaming {} to {}", src.display(), dst.display()),
            e,
        )
    })?;
    fsync_parent(dst)?;
    fsync_parent_if_other(src, dst)
}

/// Removes a file and fsyncs its directory, so the removal survives a power cut. A missing file is not an
/// error (there is nothing left to retire).
pub fn remove_file_durably(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => fsync_parent(path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_error(&format!("removing {}", path.display()), e)),
    }
}

/// Removes a directory tree and fsyncs its parent (the tree's own entries need no sync: they are gone
/// with it). A missing directory is not an error.
pub fn remove_dir_durably(path: &Path) -> Result<()> {
    match std::fs::remove_dir_all(path) {
        Ok(()) => fsync_parent(path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_error(&format!("removing {}", path.display()), e)),
    }
}

/// fsyncs every regular file directly in `dir` and `dir` itself.
pub fn fsync_files_in(dir: &Path) -> Result<()> {
    let entries =
        std::fs::read_dir(dir).map_err(|e| io_error(&format!("reading {}", dir.display()), e))?;
    for entry in entries.flatten() {
        if entry.file_type().is_ok_and(|t| t.is_file()) {
            fsync_path(&entry.path())?;
        }
    }
    fsync_path(dir)
}

/// fsyncs the directory holding `path`, making a create, rename or unlink in it durable.
pub fn fsync_parent(path: &Path) -> Result<()> {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => fsync_path(dir),
        _ => fsync_path(Path::new(".")),
    }
}

fn fsync_parent_if_other(src: &Path, dst: &Path) -> Result<()> {
    if src.parent() != dst.parent() {
        fsync_parent(src)?;
    }
    Ok(())
}

pub fn io_error(context: &str, e: std::io::Error) -> Error {
    if e.raw_os_error() == Some(libc::ENOSPC) || e.raw_os_error() == Some(libc::EDQUOT) {
        return Error::new(
            crate::ErrorCode::InsufficientStorage,
            format!("{context}: the disk holding kiln's data directory is full; free space and try again"),
        );
    }
    Error::internal(format!("{context}: {e}"))
}

/// Runs long blocking file work (checksums, copies) so it does not hold an async worker thread: the
/// runtime hands that worker's other tasks to another thread meanwhile. Plain call off the runtime.
pub fn off_runtime<R>(f: impl FnOnce() -> R) -> R {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}

fn read_chunks(path: &Path, f: impl FnMut(&[u8])) -> Result<()> {
    off_runtime(|| read_chunks_blocking(path, f))
}

fn read_chunks_blocking(path: &Path, mut f: impl FnMut(&[u8])) -> Result<()> {
    let mut file =
        File::open(path).map_err(|e| io_error(&format!("opening {}", path.display()), e))?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file
            .read(&mut buf)
            .map_err(|e| io_error(&format!("reading {}", path.display()), e))?;
        if n == 0 {
            return Ok(());
        }
        f(&buf[..n]);
    }
}

/// `xxh3:` and 16 hex digits of xxh3-64 over a whole file: fast enough (GB/s) to run on every snapshot.
pub fn checksum(path: &Path) -> Result<String> {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    read_chunks(path, |b| h.update(b))?;
    Ok(format!("xxh3:{:016x}", h.digest()))
}

/// Copies `src` to `dst` hole-preserving (see `kiln_vmm::memory::sparse_copy_inspect`) and returns the
/// [`checksum`] of the file, computed in the same pass (holes hash as the zeros they read as), so a RAM
/// file is read once, not copied and then read again. Does not fsync; writeback has started.
pub fn copy_with_checksum(
    src: &Path,
    dst: &Path,
) -> std::result::Result<String, kiln_vmm::VmmError> {
    static ZEROS: [u8; 1 << 16] = [0; 1 << 16];
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    let mut pos = 0u64;
    let zeros = |h: &mut xxhash_rust::xxh3::Xxh3, mut n: u64| {
        while n > 0 {
            let k = n.min(ZEROS.len() as u64) as usize;
            h.update(&ZEROS[..k]);
            n -= k as u64;
        }
    };
    kiln_vmm::memory::sparse_copy_inspect(src, dst, |off, data| {
        zeros(&mut h, off.saturating_sub(pos));
        h.update(data);
        pos = off + data.len() as u64;
    })?;
    let len = std::fs::metadata(dst)
        .map_err(|e| kiln_vmm::VmmError::io(format!("stat {}", dst.display()), e))?
        .len();
    zeros(&mut h, len.saturating_sub(pos));
    Ok(format!("xxh3:{:016x}", h.digest()))
}

/// [`checksum`] of a file kiln never changes once written (a kernel, an initrd, a sealed layer),
/// remembered by device, inode, size and modification time: every snapshot links the same kernel and
/// initrd, and hashing tens of MiB again each time is measurable.
pub fn checksum_immutable(path: &Path) -> Result<String> {
    use std::collections::HashMap;
    use std::os::unix::fs::MetadataExt;
    use std::sync::{Mutex, OnceLock};
    type Key = (u64, u64, u64, i64, i64);
    static SEEN: OnceLock<Mutex<HashMap<Key, String>>> = OnceLock::new();
    let m =
        std::fs::metadata(path).map_err(|e| io_error(&format!("stat {}", path.display()), e))?;
    let key = (m.dev(), m.ino(), m.len(), m.mtime(), m.mtime_nsec());
    let seen = SEEN.get_or_init(Default::default);
    if let Some(sum) = seen.lock().unwrap_or_else(|p| p.into_inner()).get(&key) {
        return Ok(sum.clone());
    }
    let sum = checksum(path)?;
    seen.lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(key, sum.clone());
    Ok(sum)
}

pub fn checksum_bytes(data: &[u8]) -> String {
    format!("xxh3:{:016x}", xxhash_rust::xxh3::xxh3_64(data))
}

/// Checks a file against a checksum written by [`checksum`] (`xxh3:`) or by the image builder (`sha256:`).
pub fn matches_checksum(path: &Path, expected: &str) -> Result<bool> {
    match expected.split_once(':') {
        Some(("xxh3", _)) => Ok(checksum(path)? == expected),
        Some(("sha256", hex_digest)) => {
            use sha2::Digest;
            let mut h = sha2::Sha256::new();
            read_chunks(path, |b| h.update(b))?;
            Ok(hex::encode(h.finalize()) == hex_digest)
        }
        _ => Err(Error::internal(format!(
            "unknown checksum format '{expected}'"
        ))),
    }
}

/// Writes `data` to `path` via a temporary file, fsync, rename and fsync of the directory, so readers see
/// all or nothing and the new contents survive a power cut.
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    let ctx = |what: &str| format!("{what} {}", tmp.display());
    let mut f = File::create(&tmp).map_err(|e| io_error(&ctx("creating"), e))?;
    f.write_all(data)
        .map_err(|e| io_error(&ctx("writing"), e))?;
    f.sync_all().map_err(|e| io_error(&ctx("syncing"), e))?;
    std::fs::rename(&tmp, path).map_err(|e| io_error(&ctx("renaming"), e))?;
    fsync_parent(path)
}

pub fn fsync_path(path: &Path) -> Result<()> {
    File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| io_error(&format!("syncing {}", path.display()), e))
}

/// The error of a helper program (qemu-img, mkfs) that failed doing `what`: a full disk is reported as
/// such, anything else with the program's own words.
pub fn tool_error(what: &str, stderr: &[u8]) -> Error {
    let err = String::from_utf8_lossy(stderr);
    let code = if err.contains("No space left") {
        crate::ErrorCode::InsufficientStorage
    } else {
        crate::ErrorCode::Internal
    };
    Error::new(code, format!("{what}: {}", err.trim()))
}

/// Space a file really occupies (sparse files count only their data).
pub fn allocated_bytes(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path)
        .map(|m| m.blocks() * 512)
        .unwrap_or(0)
}

pub fn dir_allocated_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| {
            let p = e.path();
            if p.is_dir() {
                dir_allocated_bytes(&p)
            } else {
                allocated_bytes(&p)
            }
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_checksums_and_atomic_writes() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        write_atomic(&a, b"hello").unwrap();
        let b = dir.path().join("b");
        link_or_copy(&a, &b).unwrap();
        assert_eq!(std::fs::read(&b).unwrap(), b"hello");
        assert_eq!(checksum(&a).unwrap(), checksum_bytes(b"hello"));
        assert!(matches_checksum(&a, &checksum_bytes(b"hello")).unwrap());
        let sha = "sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824";
        assert!(matches_checksum(&a, sha).unwrap());
        assert!(!matches_checksum(&a, &checksum_bytes(b"other")).unwrap());
        assert_ne!(checksum_bytes(b"hello"), checksum_bytes(b"hellp"));
        assert!(checksum(&dir.path().join("missing")).is_err());
    }

    #[test]
    fn copying_with_a_checksum_hashes_holes_as_zeros() {
        use std::os::unix::fs::FileExt;
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("ram");
        let f = File::create(&src).unwrap();
        f.set_len(20 << 20).unwrap();
        f.write_all_at(b"guest page", 4 << 20).unwrap();
        f.write_all_at(&[9u8; 70_000], 11 << 20).unwrap();
        drop(f);
        let dst = dir.path().join("copy");
        let sum = copy_with_checksum(&src, &dst).unwrap();
        assert_eq!(sum, checksum(&src).unwrap());
        assert_eq!(sum, checksum(&dst).unwrap());
        assert_eq!(checksum_immutable(&dst).unwrap(), sum);
    }
}
