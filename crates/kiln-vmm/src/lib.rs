//! kiln-vmm drives QEMU: it picks the accelerator, builds the command line for a sandbox VM, launches and
//! adopts QEMU processes, talks QMP and wraps `qemu-img`. It knows nothing about sandboxes or the database.

pub mod accel;
pub mod error;
pub mod img;
pub mod memory;
pub mod migration;
pub mod process;
pub mod qemu;
pub mod qmp;

pub use accel::{Accel, AccelChoice};
pub use error::VmmError;
pub use qemu::{PortForward, VmSpec};
pub use qmp::Qmp;

/// The QEMU system emulator binary; `KILN_QEMU` overrides it (useful for testing another build).
pub fn qemu_binary() -> String {
    std::env::var("KILN_QEMU").unwrap_or_else(|_| "qemu-system-x86_64".to_string())
}

/// The `qemu-img` binary; `KILN_QEMU_IMG` overrides it.
pub fn qemu_img_binary() -> String {
    std::env::var("KILN_QEMU_IMG").unwrap_or_else(|_| "qemu-img".to_string())
}
