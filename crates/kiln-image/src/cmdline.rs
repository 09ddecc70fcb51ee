//! The guest kernel command line.

use crate::manifest::Image;

/// The part of the kernel command line that is the same for every sandbox of an image; it is recorded in
/// the manifest so an image keeps booting with the flags it was tested with. Chosen for fast boots
/// under TCG (see each group):
///
/// * `console=ttyS0 quiet loglevel=3`: the host reads the serial console; printing every boot message
///   through the emulated UART costs time, so only errors are shown.
/// * `root=/dev/vda rw`: informational (the initramfs mounts the root itself) but useful to humans.
/// * `panic=-1 reboot=t`: on a kernel panic, reboot at once with a triple fault instead of hanging, so
///   the host notices (with `-no-reboot`, QEMU exits).
/// * `8250.nr_uarts=1`: only probe the one serial port microvm has instead of four.
/// * `tsc=reliable no_timer_check`: skip the clocksource watchdog and the timer IRQ check.
/// * `mitigations=off`: speculative-execution mitigations only slow down an emulated CPU that the
///   sandbox owns alone.
/// * `random.trust_cpu=on`: seed the RNG from RDRAND at once so early getrandom() never waits.
/// * `audit=0 nowatchdog`: no audit subsystem and no lockup detectors in a short-lived sandbox.
/// * `pci=off`: microvm has no PCI bus; skip probing for one.
/// * `i8042.noaux i8042.nokbd i8042.nopnp`: no PS/2 controller either.
pub const CMDLINE_BASE: &str = "console=ttyS0 root=/dev/vda rw quiet loglevel=3 panic=-1 reboot=t \
    8250.nr_uarts=1 tsc=reliable no_timer_check mitigations=off random.trust_cpu=on audit=0 nowatchdog \
    pci=off i8042.noaux i8042.nokbd i8042.nopnp";

/// Per-sandbox parameters appended to an image's base command line.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CmdlineParams {
    /// Guest hostname (`kiln.hostname=`). Characters a hostname cannot hold are dropped.
    pub hostname: Option<String>,
    /// Grow the root filesystem to the disk size at boot (`kiln.resize=1`); set it when the sandbox's
    /// overlay is larger than the template.
    pub resize: bool,
    /// Have /kiln/init print network, mount and timing details to the console (`kiln.debug=1`).
    pub debug: bool,
    /// Further parameters, appended verbatim, e.g. `kiln.ip=10.0.2.20/24`, `kiln.dns=1.1.1.1,8.8.8.8`.
    pub extra: Vec<String>,
}

/// The full kernel command line for booting a sandbox from `image`.
pub fn kernel_cmdline(image: &Image, params: &CmdlineParams) -> String {
    build_cmdline(&image.manifest.cmdline_base, params)
}

pub(crate) fn build_cmdline(base: &str, params: &CmdlineParams) -> String {
    let mut parts: Vec<String> = base.split_whitespace().map(str::to_string).collect();
    if let Some(hostname) = params.hostname.as_deref().and_then(sanitize_hostname) {
        parts.push(format!("kiln.hostname={hostname}"));
    }
    if params.resize {
        parts.push("kiln.resize=1".into());
    }
    if params.debug {
        parts.push("kiln.debug=1".into());
    }
    parts.extend(params.extra.iter().flat_map(|e| e.split_whitespace()).map(str::to_string));
    parts.join(" ")
}

/// Keeps what a hostname may contain (RFC 1123 letters, digits, `-`, `.`), at most 63 characters, and no
/// leading or trailing separators; `None` when nothing usable is left. A space would split the kernel
/// parameter, so filtering here also protects the command line.
fn sanitize_hostname(name: &str) -> Option<String> {
    let kept: String = name
        .chars()
        .map(|c| if c == '_' { '-' } else { c })
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '.')
        .take(63)
        .collect();
    let trimmed = kept.trim_matches(|c| c == '-' || c == '.');
    (!trimmed.is_empty()).then(|| trimmed.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::tests::sample;
    use std::path::PathBuf;

    fn image() -> Image {
        let mut manifest = sample();
        manifest.cmdline_base = "console=ttyS0  quiet".into();
        Image {
            name: "tiny".into(),
            dir: PathBuf::from("/i/tiny"),
            kernel: PathBuf::from("/i/tiny/vmlinuz"),
            initrd: PathBuf::from("/i/tiny/initrd.img"),
            rootfs: PathBuf::from("/i/tiny/rootfs.img"),
            manifest,
        }
    }

    #[test]
    fn builds_full_cmdline() {
        let params = CmdlineParams {
            hostname: Some("sbx-1".into()),
            resize: true,
            debug: true,
            extra: vec!["kiln.ip=10.0.2.20/24 kiln.gw=10.0.2.2".into()],
        };
        assert_eq!(
            kernel_cmdline(&image(), &params),
            "console=ttyS0 quiet kiln.hostname=sbx-1 kiln.resize=1 kiln.debug=1 kiln.ip=10.0.2.20/24 kiln.gw=10.0.2.2"
        );
        assert_eq!(kernel_cmdline(&image(), &CmdlineParams::default()), "console=ttyS0 quiet");
    }

    #[test]
    fn hostnames_cannot_break_the_cmdline() {
        assert_eq!(sanitize_hostname("my box; rm -rf /").as_deref(), Some("myboxrm-rf"));
        assert_eq!(sanitize_hostname("web_1.local").as_deref(), Some("web-1.local"));
        assert_eq!(sanitize_hostname("-.-"), None);
        assert_eq!(sanitize_hostname(&"a".repeat(100)).map(|h| h.len()), Some(63));
    }

    #[test]
    fn base_cmdline_has_console_and_no_double_spaces() {
        assert!(CMDLINE_BASE.starts_with("console=ttyS0 "));
        assert!(!CMDLINE_BASE.contains("  "));
    }
}
