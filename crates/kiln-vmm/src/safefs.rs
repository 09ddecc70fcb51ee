//! File operations for a root daemon next to directories that a VM's uid can write.
//!
//! A hostile QEMU (a guest that escaped into it) runs as its sandbox's uid and may plant symlinks, FIFOs or
//! hard links where the daemon expects its own files. Everything here refuses to follow a symlink in the
//! last path component (`O_NOFOLLOW`), never blocks on a FIFO or device (`O_NONBLOCK`, then `fstat`:
//! regular files only), and works on the opened descriptor afterwards (`fchown`, `fchmod`, `fsync`), so
//! what was checked is what is acted on. Parent directories must not be writable by another uid; kiln keeps
//! what it acts on in root-owned directories and only reads QEMU's own output through these calls.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

fn not_regular(path: &Path) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::InvalidInput,
        format!("{} is not a regular file", path.display()),
    )
}

fn checked(path: &Path, file: File) -> std::io::Result<File> {
    if !file.metadata()?.file_type().is_file() {
        return Err(not_regular(path));
    }
    Ok(file)
}

/// Opens an existing regular file for reading without following a symlink or blocking on a FIFO.
pub fn open_read(path: &Path) -> std::io::Result<File> {
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)?;
    checked(path, f)
}

/// Like [`open_read`], for reading and writing.
pub fn open_rw(path: &Path) -> std::io::Result<File> {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)?;
    checked(path, f)
}

/// Creates `path` afresh (whatever entry had the name is unlinked first; unlink never follows a link) with
/// `O_EXCL | O_NOFOLLOW`, so a link planted in between makes this fail rather than write elsewhere.
pub fn create_new(path: &Path, mode: u32) -> std::io::Result<File> {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        // A directory of that name: leave it, the exclusive create reports the conflict.
        Err(_) => {}
    }
    OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(mode)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
}

/// Reads at most the last `max` bytes of a regular file (a log), never following a link or blocking.
/// A missing file reads as empty.
pub fn read_tail(path: &Path, max: u64) -> std::io::Result<Vec<u8>> {
    let mut f = match open_read(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let len = f.metadata()?.len();
    f.seek(SeekFrom::Start(len.saturating_sub(max)))?;
    let mut buf = Vec::new();
    f.take(max).read_to_end(&mut buf)?;
    Ok(buf)
}

/// Gives an opened file to `uid:gid` with `mode`.
pub fn fchown_mode(f: &File, uid: u32, gid: u32, mode: u32) -> std::io::Result<()> {
    std::os::unix::fs::fchown(f, Some(uid), Some(gid))?;
    f.set_permissions(std::fs::Permissions::from_mode(mode))
}

/// Takes a file QEMU wrote in its own (VM-writable) directory into a root-owned one: `src` is opened
/// without following links, checked (a regular file, one link, owned by `owner` when given) and synced;
/// then renamed to `dst`, and `dst` must still be that same inode (the VM's uid could have swapped the
/// entry in between). Across filesystems the opened file is copied instead. Returns `dst`, opened.
pub fn take_file(src: &Path, dst: &Path, owner: Option<u32>) -> std::io::Result<File> {
    let f = open_read(src)?;
    let meta = f.metadata()?;
    if meta.nlink() != 1 || owner.is_some_and(|uid| meta.uid() != uid) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!(
                "{} is not a file its VM wrote (owner {}, {} links)",
                src.display(),
                meta.uid(),
                meta.nlink()
            ),
        ));
    }
    f.sync_all()?;
    match std::fs::rename(src, dst) {
        Ok(()) => {
            let taken = open_read(dst).and_then(|d| {
                let m = d.metadata()?;
                if (m.dev(), m.ino()) == (meta.dev(), meta.ino()) {
                    Ok(d)
                } else {
                    Err(std::io::Error::new(
                        std::io::ErrorKind::PermissionDenied,
                        format!("{} was replaced while it was moved", src.display()),
                    ))
                }
            });
            if taken.is_err() {
                let _ = std::fs::remove_file(dst);
            }
            taken
        }
        Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {
            let mut out = create_new(dst, 0o600)?;
            let mut input = f;
            input.seek(SeekFrom::Start(0))?;
            std::io::copy(&mut input, &mut out)?;
            out.sync_all()?;
            let _ = std::fs::remove_file(src);
            Ok(out)
        }
        Err(e) => Err(e),
    }
}

/// `fsync` of a directory, opened without following a link.
pub fn fsync_dir(path: &Path) -> std::io::Result<()> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_DIRECTORY)
        .open(path)?
        .sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_and_fifos_are_refused_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("secret");
        std::fs::write(&secret, b"secret").unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&secret, &link).unwrap();
        assert!(open_read(&link).is_err());
        assert!(read_tail(&link, 100).is_err());
        let fifo = dir.path().join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo on a valid C string.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        assert!(open_read(&fifo).is_err());
        assert!(read_tail(&dir.path().join("missing"), 10)
            .unwrap()
            .is_empty());
        assert_eq!(read_tail(&secret, 3).unwrap(), b"ret");
        // create_new replaces the link itself, not its target.
        let f = create_new(&link, 0o600).unwrap();
        drop(f);
        assert_eq!(std::fs::read(&secret).unwrap(), b"secret");
        assert!(std::fs::symlink_metadata(&link).unwrap().is_file());
        // take_file refuses a link and a hard-linked file.
        let dst = dir.path().join("dst");
        std::os::unix::fs::symlink(&secret, dir.path().join("l2")).unwrap();
        assert!(take_file(&dir.path().join("l2"), &dst, None).is_err());
        std::fs::hard_link(&secret, dir.path().join("h")).unwrap();
        assert!(take_file(&dir.path().join("h"), &dst, None).is_err());
        std::fs::write(dir.path().join("ok"), b"state").unwrap();
        take_file(&dir.path().join("ok"), &dst, None).unwrap();
        assert_eq!(std::fs::read(&dst).unwrap(), b"state");
    }
}
