//! Serial consoles, kept in a bounded ring on the host.
//!
//! QEMU serves each VM's serial port on a unix socket chardev (`console.sock` in the run directory). The
//! daemon reads that stream and appends it to a ring in a root-owned directory (`<data>/consoles`): the
//! current part grows to [`PART_BYTES`], then replaces the previous part, so a guest flooding its console
//! costs at most [`RING_BYTES`] of disk. While no daemon is connected QEMU drops console output instead of
//! blocking the guest; a restarted daemon reconnects when it re-adopts the VM.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::UnixStream;
use tokio::task::JoinHandle;

/// Disk one console may use: the current part plus the previous one.
pub const RING_BYTES: u64 = 1 << 20;
const PART_BYTES: u64 = RING_BYTES / 2;
const RECONNECT: Duration = Duration::from_millis(100);

static DIR: OnceLock<PathBuf> = OnceLock::new();

/// Where the rings live; set once when the engine opens its data directory.
pub(crate) fn set_dir(dir: PathBuf) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let mut b = std::fs::DirBuilder::new();
    b.recursive(true).mode(0o700);
    b.create(&dir)?;
    // Refuse a symlink or a directory someone else owns: root writes here.
    let meta = std::fs::symlink_metadata(&dir)?;
    if !meta.is_dir() {
        return Err(std::io::Error::other(format!(
            "{} is not a directory",
            dir.display()
        )));
    }
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
    let _ = DIR.set(dir);
    Ok(())
}

/// The ring of VM `name` (`kiln-<sandbox id>`); its previous part has `.1` appended.
pub fn ring_path(name: &str, run_dir: &Path) -> PathBuf {
    match DIR.get() {
        Some(dir) => dir.join(format!("{name}.log")),
        // Without an engine (unit tests): next to the VM.
        None => run_dir.join("console-ring.log"),
    }
}

fn previous(ring: &Path) -> PathBuf {
    let mut p = ring.as_os_str().to_owned();
    p.push(".1");
    PathBuf::from(p)
}

/// Removes a VM's ring (the sandbox is gone).
pub fn remove(ring: &Path) {
    // Durably, like every removal (tests/durability.rs checks the daemon's unlinks are followed by an
    // fsync of their directory).
    let _ = crate::fsutil::remove_file_durably(ring);
    let _ = crate::fsutil::remove_file_durably(&previous(ring));
}

fn open_part(ring: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(ring)
}

/// Appends to a ring, rotating when the current part is full.
struct RingWriter {
    ring: PathBuf,
    file: File,
    len: u64,
}

impl RingWriter {
    fn open(ring: PathBuf) -> std::io::Result<RingWriter> {
        let file = open_part(&ring)?;
        let len = file.metadata()?.len();
        Ok(RingWriter { ring, file, len })
    }

    fn append(&mut self, mut data: &[u8]) -> std::io::Result<()> {
        while !data.is_empty() {
            if self.len >= PART_BYTES {
                std::fs::rename(&self.ring, previous(&self.ring))?;
                self.file = open_part(&self.ring)?;
                self.len = 0;
            }
            let room = usize::try_from(PART_BYTES - self.len).unwrap_or(usize::MAX);
            let n = data.len().min(room);
            self.file.write_all(&data[..n])?;
            self.len += n as u64;
            data = &data[n..];
        }
        Ok(())
    }
}

/// Starts a VM's ring with `data` (what its machine printed before it was saved, for a copy resumed from
/// a snapshot), before the pump appends what the copy prints; bounded like any ring.
pub fn seed(ring: &Path, data: &[u8]) -> std::io::Result<()> {
    RingWriter::open(ring.to_path_buf())?.append(data)
}

/// Reads `socket` into the ring until QEMU (`pid`, `name`) is gone, reconnecting after each break
/// (QEMU serves one client at a time, so a second reader waits its turn).
pub fn spawn_pump(
    socket: PathBuf,
    ring: PathBuf,
    pid: u32,
    name: String,
) -> Option<JoinHandle<()>> {
    let rt = tokio::runtime::Handle::try_current().ok()?;
    Some(rt.spawn(async move {
        let mut writer = match RingWriter::open(ring.clone()) {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!(vm = %name, ring = %ring.display(), error = %e, "cannot open the console ring; console output is not kept");
                return;
            }
        };
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            // The socket is found by name in `vm/`, which the VM's uid can write: read only from its QEMU.
            let connected = UnixStream::connect(&socket).await.ok().filter(|s| {
                kiln_vmm::qmp::check_peer(s, &socket, pid)
                    .inspect_err(|e| tracing::warn!(vm = %name, error = %e, "not reading the console"))
                    .is_ok()
            });
            if let Some(mut stream) = connected {
                while let Ok(n) = stream.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    if let Err(e) = writer.append(&buf[..n]) {
                        tracing::warn!(vm = %name, error = %e, "cannot write the console ring");
                    }
                }
            }
            if !kiln_vmm::process::is_our_qemu(pid, &name) {
                return;
            }
            tokio::time::sleep(RECONNECT).await;
        }
    }))
}

/// The last `max` bytes of a ring (both parts), whole lines where the cut falls mid-line.
pub fn tail_bytes(ring: &Path, max: u64) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    let cur_len = match std::fs::symlink_metadata(ring) {
        Ok(m) => m.len(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
        Err(e) => return Err(e),
    };
    if cur_len < max {
        read_tail(&previous(ring), max - cur_len, &mut out)?;
    }
    read_tail(ring, max, &mut out)?;
    Ok(out)
}

fn read_tail(path: &Path, max: u64, out: &mut Vec<u8>) -> std::io::Result<()> {
    let mut f = match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    let meta = f.metadata()?;
    if !meta.is_file() {
        return Err(std::io::Error::other(format!(
            "{} is not a regular file",
            path.display()
        )));
    }
    let len = meta.len();
    let start = len.saturating_sub(max);
    f.seek(SeekFrom::Start(start))?;
    f.take(len - start).read_to_end(out)?;
    Ok(())
}

/// The last `n` non-empty lines of a ring, for error messages.
pub fn tail_lines(ring: &Path, n: usize) -> String {
    let Ok(bytes) = tail_bytes(ring, 16 * 1024) else {
        return String::new();
    };
    last_lines(&bytes, n)
}

/// The last `n` non-empty lines of `bytes`.
pub fn last_lines(bytes: &[u8], n: usize) -> String {
    let text = String::from_utf8_lossy(bytes);
    let all: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    all[all.len().saturating_sub(n)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_stays_bounded_and_keeps_the_tail() {
        let dir = tempfile::tempdir().unwrap();
        let ring = dir.path().join("kiln-x.log");
        let mut w = RingWriter::open(ring.clone()).unwrap();
        for i in 0..100_000u32 {
            w.append(format!("line {i}\n").as_bytes()).unwrap();
        }
        let cur = std::fs::metadata(&ring).unwrap().len();
        let prev = std::fs::metadata(previous(&ring)).unwrap().len();
        assert!(cur + prev <= RING_BYTES, "{cur} + {prev}");
        assert_eq!(tail_lines(&ring, 2), "line 99998\nline 99999");
        let all = tail_bytes(&ring, RING_BYTES).unwrap();
        assert_eq!(all.len() as u64, cur + prev);
        assert!(all.ends_with(b"line 99999\n"));
        assert_eq!(tail_bytes(&ring, 11).unwrap(), b"line 99999\n");
        remove(&ring);
        assert!(tail_bytes(&ring, 10).unwrap().is_empty());
    }

    #[test]
    fn a_symlinked_ring_is_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("secret");
        std::fs::write(&secret, "root only").unwrap();
        let ring = dir.path().join("kiln-y.log");
        std::os::unix::fs::symlink(&secret, &ring).unwrap();
        assert!(tail_bytes(&ring, 100).is_err());
        assert!(RingWriter::open(ring).is_err());
        assert_eq!(std::fs::read_to_string(&secret).unwrap(), "root only");
    }
}
