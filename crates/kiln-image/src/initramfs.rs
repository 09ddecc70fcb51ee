//! The initramfs: static busybox, the kernel modules needed to reach the root disk and devices, and an
//! `/init` that mounts /dev/vda and switches to `/kiln/init` on it.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use crate::cpio::CpioWriter;
use crate::error::{ImageError, IoContext, Result};
use crate::modules::{read_module, strip_signature, ModuleFile};

/// The initramfs `/init` script (images/initramfs-init.sh).
pub(crate) const INITRAMFS_INIT: &str = include_str!("../../../images/initramfs-init.sh");

/// The busybox applets images/initramfs-init.sh runs (besides shell builtins).
const INITRAMFS_APPLETS: &[&str] = &["sh", "mount", "umount", "insmod", "sleep", "switch_root", "poweroff", "sync"];

/// How the cpio archive is stored. Uncompressed is the default: the kernel copies it at memory speed,
/// while inflating a gzip archive of the same content costs more emulated CPU time under TCG than the
/// few extra megabytes cost QEMU to load (measured: see the crate README).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Compression {
    None,
    Gzip,
}

pub(crate) const COMPRESSION: Compression = Compression::None;

/// Writes the initramfs to `out`. `modules` must already be in load order.
pub(crate) fn write_initramfs(out: &Path, busybox: &[u8], modules: &[ModuleFile], compression: Compression) -> Result<()> {
    let file = File::create(out).at("create", out)?;
    let writer = BufWriter::new(file);
    match compression {
        Compression::None => {
            write_archive(writer, busybox, modules, out)?;
        }
        Compression::Gzip => {
            let encoder = flate2::write::GzEncoder::new(writer, flate2::Compression::best());
            let encoder = write_archive(encoder, busybox, modules, out)?;
            encoder.finish().at("compress", out)?;
        }
    }
    Ok(())
}

fn write_archive<W: Write>(writer: W, busybox: &[u8], modules: &[ModuleFile], out: &Path) -> Result<W> {
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
        let mut data = read_module(&module.path)?;
        strip_signature(&mut data)
            .map_err(|e| ImageError::Build(format!("{} has a malformed signature: {e}", module.path.display())))?;
        // The numeric prefix makes the shell glob in /init list the modules in load order.
        add(cpio.file(&format!("lib/modules/{:02}-{}.ko", index + 1, module.name), 0o644, &data))?;
    }
    add(cpio.file("init", 0o755, INITRAMFS_INIT.as_bytes()))?;
    cpio.finish().at("write", out)
}
