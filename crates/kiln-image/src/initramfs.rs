//! The initramfs: static busybox, the kernel modules needed to reach the root disk and devices, and an
//! `/init` that mounts /dev/vda and switches to `/kiln/init` on it.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use crate::cpio::CpioWriter;
use crate::error::{IoContext, Result};
use crate::modules::{load_module_unsigned, ModuleFile};

/// The initramfs `/init` script (images/initramfs-init.sh).
pub(crate) const INITRAMFS_INIT: &str = include_str!("../../../images/initramfs-init.sh");

/// The busybox applets images/initramfs-init.sh runs (besides shell builtins).
const INITRAMFS_APPLETS: &[&str] = &[
    "sh",
    "mount",
    "umount",
    "insmod",
    "sleep",
    "switch_root",
    "poweroff",
    "sync",
];

/// Writes the initramfs to `out`; `modules` must already be in load order.
///
/// The archive is stored uncompressed: measured under TCG, a gzip or zstd archive of the same content
/// (3.1 MiB -> 1.1-1.3 MiB) boots 0.1-0.4 s slower, since decompressing in the emulated guest costs more
/// than QEMU copying a few more megabytes into guest memory.
pub(crate) fn write_initramfs(out: &Path, busybox: &[u8], modules: &[ModuleFile]) -> Result<()> {
    let file = File::create(out).at("create", out)?;
    // finish() flushes the buffer, so dropping the writer afterwards cannot lose data.
    write_archive(BufWriter::new(file), busybox, modules, out)?;
    Ok(())
}

fn write_archive<W: Write>(
    writer: W,
    busybox: &[u8],
    modules: &[ModuleFile],
    out: &Path,
) -> Result<W> {
    let mut cpio = CpioWriter::new(writer, 0);
    let add = |result: std::io::Result<()>| result.at("write", out);
    for dir in ["bin", "dev", "proc", "sys", "newroot", "lib", "lib/modules"] {
        add(cpio.dir(dir, 0o755))?;
    }
    // The kernel opens /dev/console for init's stdin/stdout before anything mounts devtmpfs; without this
    // node, /init would run with no output and its error messages would be lost.
    add(cpio.char_device("dev/console", 0o600, 5, 1))?;
    add(cpio.file("bin/busybox", 0o755, busybox))?;
    // Debian's static busybox finds its own applets through /proc/self/exe, which does not exist before
    // /init mounts /proc: every applet the script runs needs a real link.
    for applet in INITRAMFS_APPLETS {
        add(cpio.symlink(&format!("bin/{applet}"), "busybox"))?;
    }
    for (index, module) in modules.iter().enumerate() {
        let data = load_module_unsigned(module)?;
        // The numeric prefix makes the shell glob in /init list the modules in load order.
        add(cpio.file(
            &format!("lib/modules/{:02}-{}.ko", index + 1, module.name),
            0o644,
            &data,
        ))?;
    }
    add(cpio.file("init", 0o755, INITRAMFS_INIT.as_bytes()))?;
    cpio.finish().at("write", out)
}
