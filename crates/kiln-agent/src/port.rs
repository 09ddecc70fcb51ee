//! The byte pipe to the host: the virtio-serial port inside a VM, or a unix socket in tests.
//!
//! Both are used through one non-blocking fd: reads wait in `poll`, writes wait for `POLLOUT`,
//! and a hang-up means "no host right now" on the virtio port.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use crate::util::log;

const VIRTIO_PORTS: &str = "/sys/class/virtio-ports";

/// What a read from the port produced.
pub enum ReadOutcome {
    Data(usize),
    /// No host is connected (virtio) or the peer closed (unix socket).
    Closed,
}

pub struct PortReader {
    file: File,
}

pub struct PortWriter {
    file: File,
}

/// Opens the virtio port, waiting (forever) until it exists and can be opened.
pub fn open_virtio(port_name: &str, device: Option<&Path>) -> io::Result<(PortReader, PortWriter)> {
    let started = Instant::now();
    let mut next_log = Duration::ZERO;
    loop {
        let path = match device {
            Some(d) => Some(d.to_path_buf()),
            None => find_port(port_name),
        };
        let result = match &path {
            Some(p) => OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(p),
            None => Err(io::Error::from_raw_os_error(libc::ENOENT)),
        };
        match result {
            Ok(file) => return split(file),
            // The node shows up before the port can be opened (ENXIO), and another process may
            // briefly hold it (EBUSY): keep retrying.
            Err(e) => {
                if started.elapsed() >= next_log {
                    let what = path.map_or_else(
                        || format!("virtio port named {port_name}"),
                        |p| p.display().to_string(),
                    );
                    log!("waiting for {what}: {e}");
                    next_log = started.elapsed() + Duration::from_secs(10);
                }
                thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

/// Connects to a unix socket (test mode).
pub fn connect_unix(path: &Path) -> io::Result<(PortReader, PortWriter)> {
    let stream = UnixStream::connect(path)?;
    stream.set_nonblocking(true)?;
    split(File::from(OwnedFd::from(stream)))
}

fn split(file: File) -> io::Result<(PortReader, PortWriter)> {
    let writer = file.try_clone()?;
    Ok((PortReader { file }, PortWriter { file: writer }))
}

/// Finds `/dev/<port>` for the virtio port whose name is `port_name`.
fn find_port(port_name: &str) -> Option<PathBuf> {
    fs::read_dir(VIRTIO_PORTS)
        .ok()?
        .flatten()
        .find_map(|entry| {
            let name = fs::read_to_string(entry.path().join("name")).ok()?;
            (name.trim() == port_name).then(|| Path::new("/dev").join(entry.file_name()))
        })
}

/// Waits until `fd` reports one of `events` (or an error/hang-up); returns the reported events.
fn poll(fd: &File, events: libc::c_short, timeout_ms: libc::c_int) -> io::Result<libc::c_short> {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events,
        revents: 0,
    };
    loop {
        // SAFETY: `pfd` is a valid pollfd for the duration of the call and nfds is 1.
        let n = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
        if n >= 0 {
            return Ok(pfd.revents);
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

impl PortReader {
    /// Blocks until bytes arrive or the host side is gone.
    pub fn read(&mut self, buf: &mut [u8]) -> io::Result<ReadOutcome> {
        loop {
            let revents = poll(&self.file, libc::POLLIN, -1)?;
            if revents & libc::POLLIN == 0 && revents & (libc::POLLHUP | libc::POLLERR) != 0 {
                return Ok(ReadOutcome::Closed);
            }
            match self.file.read(buf) {
                Ok(0) => return Ok(ReadOutcome::Closed),
                Ok(n) => return Ok(ReadOutcome::Data(n)),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                    ) => {}
                Err(e) => return Err(e),
            }
        }
    }
}

impl PortWriter {
    /// Writes a whole frame, waiting while the host is slow. Fails once the host is gone, in
    /// which case the rest of the frame is dropped (the host's decoder resynchronises).
    pub fn write_all(&mut self, mut bytes: &[u8]) -> io::Result<()> {
        while !bytes.is_empty() {
            match self.file.write(bytes) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => bytes = &bytes[n..],
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    let revents = poll(&self.file, libc::POLLOUT, 1000)?;
                    if revents & libc::POLLOUT == 0
                        && revents & (libc::POLLHUP | libc::POLLERR) != 0
                    {
                        return Err(io::ErrorKind::NotConnected.into());
                    }
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}
