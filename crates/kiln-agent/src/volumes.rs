//! Volumes: ext4 filesystems on extra virtio disks, found by their serial (`kiln-vol<N>`).
//!
//! The host decides which disk slot holds which volume; the guest only mounts and lets go. A restored
//! machine may still have a volume of its source mounted (volumes are not part of snapshots): the host
//! replaced that disk with an empty one, and `release` detaches the stale mount so nothing reaches it.

use std::ffi::CString;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kiln_proto::{ErrorCode, Response};

use crate::failure::{Failure, Result};

const VIRTIO_BLK_DRIVER: &str = "/sys/bus/virtio/drivers/virtio_blk";

/// The block device (`vdb`, …) whose virtio serial is `serial`.
fn disk_by_serial(serial: &str) -> Option<String> {
    let entries = fs::read_dir("/sys/block").ok()?;
    entries.flatten().find_map(|e| {
        let name = e.file_name().to_string_lossy().into_owned();
        let found = fs::read_to_string(e.path().join("serial")).ok()?;
        (found.trim() == serial).then_some(name)
    })
}

/// Re-binds the virtio device under `disk` so the driver reads its (new) capacity, and returns the name
/// of the disk it comes back as.
fn rebind(disk: &str, serial: &str) -> Result<String> {
    let dev = fs::read_link(format!("/sys/block/{disk}/device"))
        .map_err(|e| Failure::io(&e, format!("cannot find the virtio device of {disk}")))?;
    let dev = dev
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| Failure::invalid(format!("odd device link for {disk}")))?;
    for op in ["unbind", "bind"] {
        fs::write(format!("{VIRTIO_BLK_DRIVER}/{op}"), &dev)
            .map_err(|e| Failure::io(&e, format!("cannot {op} {dev}")))?;
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(disk) = disk_by_serial(serial) {
            return Ok(disk);
        }
        if Instant::now() > deadline {
            return Err(Failure::new(
                ErrorCode::Timeout,
                format!("disk {serial} did not come back after re-binding {dev}"),
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// `/dev/<disk>`, created from sysfs's major:minor if devtmpfs has not made it (yet).
fn device_node(disk: &str) -> Result<PathBuf> {
    let node = PathBuf::from(format!("/dev/{disk}"));
    if node.exists() {
        return Ok(node);
    }
    let devno = fs::read_to_string(format!("/sys/block/{disk}/dev"))
        .map_err(|e| Failure::io(&e, format!("cannot read the device number of {disk}")))?;
    let (major, minor) = devno
        .trim()
        .split_once(':')
        .and_then(|(a, b)| Some((a.parse::<u32>().ok()?, b.parse::<u32>().ok()?)))
        .ok_or_else(|| Failure::invalid(format!("odd device number {devno:?} for {disk}")))?;
    let path = cstring(&node)?;
    // SAFETY: `path` is a valid NUL-terminated string.
    let rc = unsafe {
        libc::mknod(
            path.as_ptr(),
            libc::S_IFBLK | 0o600,
            libc::makedev(major, minor),
        )
    };
    if rc != 0 {
        let err = io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EEXIST) {
            return Err(Failure::io(
                &err,
                format!("cannot create {}", node.display()),
            ));
        }
    }
    Ok(node)
}

fn cstring(p: &Path) -> Result<CString> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| Failure::invalid(format!("path {} contains a NUL byte", p.display())))
}

pub fn mount(serial: &str, path: &str, read_only: bool, rescan: bool) -> Result<Response> {
    if !path.starts_with('/') {
        return Err(Failure::invalid(format!(
            "mount path {path} is not absolute"
        )));
    }
    let disk = disk_by_serial(serial).ok_or_else(|| {
        Failure::new(
            ErrorCode::NotFound,
            format!("no disk with serial {serial} in the guest"),
        )
    })?;
    let disk = if rescan { rebind(&disk, serial)? } else { disk };
    let node = device_node(&disk)?;
    fs::create_dir_all(path).map_err(|e| Failure::io(&e, format!("cannot create {path}")))?;
    let (src, dst) = (cstring(&node)?, cstring(Path::new(path))?);
    let flags = if read_only { libc::MS_RDONLY } else { 0 } | libc::MS_NOATIME;
    // SAFETY: all pointers are valid NUL-terminated strings; `data` may be null.
    let rc = unsafe {
        libc::mount(
            src.as_ptr(),
            dst.as_ptr(),
            c"ext4".as_ptr(),
            flags,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        let err = io::Error::last_os_error();
        return Err(Failure::io(
            &err,
            format!("cannot mount volume disk {} on {path}", node.display()),
        ));
    }
    Ok(Response::Ok)
}

pub fn release(paths: &[String], serials: &[String]) -> Result<Response> {
    for path in paths {
        let p = cstring(Path::new(path))?;
        // SAFETY: `p` is a valid NUL-terminated string.
        if unsafe { libc::umount2(p.as_ptr(), libc::MNT_DETACH) } != 0 {
            let err = io::Error::last_os_error();
            // Not mounted (any more) or gone: nothing to let go of.
            if !matches!(err.raw_os_error(), Some(libc::EINVAL | libc::ENOENT)) {
                return Err(Failure::io(&err, format!("cannot unmount {path}")));
            }
        }
    }
    let free = serials
        .iter()
        .filter(|serial| {
            let Some(disk) = disk_by_serial(serial) else {
                return false;
            };
            let Ok(node) = device_node(&disk) else {
                return false;
            };
            // A mounted filesystem holds its disk exclusively, so an exclusive open succeeds only when no
            // (lazily detached) mount still uses it.
            fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_EXCL)
                .open(node)
                .is_ok()
        })
        .cloned()
        .collect();
    Ok(Response::Volumes { free })
}
