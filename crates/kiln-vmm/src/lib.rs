//! kiln-vmm drives QEMU: it picks the accelerator, builds the command line for a sandbox VM, launches and
//! adopts QEMU processes, talks QMP and wraps `qemu-img`. It knows nothing about sandboxes or the database.

pub mod accel;
pub mod blockjob;
pub mod cpu;
pub mod delta;
pub mod devstate;
pub mod error;
pub mod hostfwd;
pub mod img;
pub mod launch;
pub mod memory;
pub mod migration;
pub mod pagemap;
pub mod process;
pub mod qemu;
pub mod qmp;
pub mod safefs;
pub mod stripram;

pub use accel::{Accel, AccelChoice};
pub use error::VmmError;
pub use launch::{Confine, RunAs};
pub use qemu::{volume_serial, DiskLayer, PortForward, VmSpec, VolumeBackend};
pub use qmp::Qmp;

/// The QEMU system emulator binary; `KILN_QEMU` overrides it (useful for testing another build).
pub fn qemu_binary() -> String {
    std::env::var("KILN_QEMU").unwrap_or_else(|_| "qemu-system-x86_64".to_string())
}

/// The `qemu-img` binary; `KILN_QEMU_IMG` overrides it.
pub fn qemu_img_binary() -> String {
    std::env::var("KILN_QEMU_IMG").unwrap_or_else(|_| "qemu-img".to_string())
}

/// `qemu-system-x86_64 --version`'s first line (cached), recorded in snapshot manifests.
pub fn qemu_version() -> String {
    static VERSION: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    VERSION
        .get_or_init(|| {
            std::process::Command::new(qemu_binary())
                .arg("--version")
                .output()
                .ok()
                .and_then(|o| String::from_utf8(o.stdout).ok())
                .and_then(|s| s.lines().next().map(str::to_string))
                .unwrap_or_else(|| "unknown".to_string())
        })
        .clone()
}
