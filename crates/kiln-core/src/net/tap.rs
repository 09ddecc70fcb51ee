//! A VM's TAP device, opened by the daemon (root) and handed to its unprivileged QEMU as a descriptor.
//!
//! The device is not persistent: it exists while a descriptor is open, so it (and the host route and
//! settings that belong to it) goes away by itself when its QEMU exits, also after a daemon crash.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_MULTI_QUEUE: libc::c_short = 0x0100;

/// Host-side names of kiln's TAP devices: `kt0`, `kt1`, ... (the kernel picks the number).
pub const PREFIX: &str = "kt";

#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

pub struct Tap {
    /// One descriptor per queue (a multiqueue TAP has several, all of the same device).
    files: Vec<File>,
    pub name: String,
}

impl Tap {
    /// Creates a new TAP device `kt<N>`. Without virtio-net headers: with them QEMU offers the guest
    /// offloads user networking has not, and a machine saved under one mode would not load under the
    /// other (its NIC's features are part of the saved state).
    ///
    /// `queues` above 1 makes a multiqueue device: the first descriptor creates it, the others attach
    /// to it by name.
    pub fn open(queues: usize) -> std::io::Result<Tap> {
        let multi = if queues > 1 { IFF_MULTI_QUEUE } else { 0 };
        let (file, name) = attach(&format!("{PREFIX}%d"), multi)?;
        let mut files = vec![file];
        for _ in 1..queues {
            files.push(attach(&name, multi)?.0);
        }
        Ok(Tap { files, name })
    }

    /// The first queue's descriptor.
    pub fn fd(&self) -> i32 {
        self.files[0].as_raw_fd()
    }

    /// The further queues' descriptors.
    pub fn queue_fds(&self) -> Vec<i32> {
        self.files[1..].iter().map(|f| f.as_raw_fd()).collect()
    }
}

/// Opens /dev/net/tun as TAP `name` (a `%d` pattern makes a new device), returning the device's name.
fn attach(name: &str, extra: libc::c_short) -> std::io::Result<(File, String)> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open("/dev/net/tun")?;
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags: IFF_TAP | IFF_NO_PI | extra,
        _pad: [0; 22],
    };
    let n = name.len().min(libc::IFNAMSIZ - 1);
    req.name[..n].copy_from_slice(&name.as_bytes()[..n]);
    // SAFETY: TUNSETIFF reads and writes an ifreq, which `req` is laid out as (name, flags, padding).
    let r = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF as _, &mut req) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let len = req
        .name
        .iter()
        .position(|b| *b == 0)
        .unwrap_or(req.name.len());
    Ok((file, String::from_utf8_lossy(&req.name[..len]).into_owned()))
}
