//! vhost-net for bridged guests' NICs where the host has it: the kernel moves the packets between the
//! TAP and the guest's queues instead of a QEMU thread. `/dev/vhost-net` is root's, so the daemon opens
//! it per VM and hands the descriptor to QEMU with the TAP's. Decided once at daemon start; a host
//! without the device (no `vhost_net` module) or one the daemon cannot open falls back to QEMU's own
//! packet path with one log line.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;

pub const VHOST_NET: &str = "/dev/vhost-net";

/// What the host offers guests' NICs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Vhost {
    On,
    /// Why not.
    Off(String),
}

/// The decision from what the host has: the device node, and whether it opens.
pub(crate) fn decide(exists: bool, open: impl FnOnce() -> io::Result<File>) -> Vhost {
    if !exists {
        return Vhost::Off(format!(
            "{VHOST_NET} is absent (load the vhost_net module to use it)"
        ));
    }
    match open() {
        Ok(_) => Vhost::On,
        Err(e) => Vhost::Off(format!("{VHOST_NET} cannot be opened: {e}")),
    }
}

/// The host's answer, logged once.
pub(crate) fn probe() -> Vhost {
    let v = decide(std::path::Path::new(VHOST_NET).exists(), open);
    match &v {
        Vhost::On => tracing::info!("guests' NICs use vhost-net"),
        Vhost::Off(why) => {
            tracing::info!(reason = %why, "no vhost-net: QEMU moves guests' packets")
        }
    }
    v
}

/// A descriptor for one VM.
pub(crate) fn open() -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(VHOST_NET)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vhost_is_used_only_where_the_device_exists_and_opens() {
        let absent = decide(false, || panic!("not opened when absent"));
        assert!(
            matches!(&absent, Vhost::Off(w) if w.contains("absent")),
            "{absent:?}"
        );
        let denied = decide(true, || Err(io::Error::from_raw_os_error(libc::EACCES)));
        assert!(
            matches!(&denied, Vhost::Off(w) if w.contains("cannot be opened")),
            "{denied:?}"
        );
        let file = tempfile::tempfile().unwrap();
        assert_eq!(decide(true, || Ok(file)), Vhost::On);
    }
}
