//! Advisory locks between kiln processes (the daemon and CLI commands) on files in the data directory,
//! with `flock(2)`: released when the holder drops it or dies, so a crash never leaves one behind.

use std::fs;
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// A held lock; dropping it releases it.
#[derive(Debug)]
pub struct FileLock {
    _file: fs::File,
    pub path: PathBuf,
}

impl FileLock {
    /// Takes the lock on `path` (created if missing) at once, or returns None while another holder
    /// stands in the way (any holder for `exclusive`, an exclusive one otherwise).
    pub fn try_acquire(path: &Path, exclusive: bool) -> io::Result<Option<FileLock>> {
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir)?;
        }
        let file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        let op = if exclusive {
            libc::LOCK_EX
        } else {
            libc::LOCK_SH
        };
        // SAFETY: flock on a descriptor this function owns.
        if unsafe { libc::flock(file.as_raw_fd(), op | libc::LOCK_NB) } != 0 {
            let err = io::Error::last_os_error();
            return match err.raw_os_error() {
                Some(libc::EWOULDBLOCK) => Ok(None),
                _ => Err(err),
            };
        }
        Ok(Some(FileLock {
            _file: file,
            path: path.to_path_buf(),
        }))
    }

    /// [`FileLock::try_acquire`], retried until `timeout` has passed (then None).
    pub fn acquire(
        path: &Path,
        exclusive: bool,
        timeout: Duration,
    ) -> io::Result<Option<FileLock>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(lock) = Self::try_acquire(path, exclusive)? {
                return Ok(Some(lock));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_holders_exclude_an_exclusive_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.lock");
        let a = FileLock::try_acquire(&path, false).unwrap().unwrap();
        let b = FileLock::try_acquire(&path, false).unwrap().unwrap();
        assert!(FileLock::try_acquire(&path, true).unwrap().is_none());
        drop((a, b));
        let x = FileLock::try_acquire(&path, true).unwrap().unwrap();
        assert!(FileLock::try_acquire(&path, false).unwrap().is_none());
        drop(x);
        assert!(FileLock::acquire(&path, false, Duration::from_millis(10))
            .unwrap()
            .is_some());
    }
}
