//! The guest kernel command line.

use std::sync::OnceLock;

use crate::manifest::Image;

/// The part of the kernel command line that is the same for every sandbox of an image; it is recorded in
/// the manifest so an image keeps booting with the flags it was tested with. Chosen for fast, reliable
/// boots under TCG:
///
/// * `console=ttyS0 quiet loglevel=3`: the host reads the serial console; printing every boot message
///   through the emulated UART costs time, so only errors (and /kiln/init's lines) are shown.
/// * `root=/dev/vda rw`: informational (the initramfs mounts the root itself) but useful to humans.
/// * `panic=-1 reboot=t`: on a kernel panic, reboot at once with a triple fault instead of hanging, so
///   the host notices (with `-no-reboot`, QEMU exits).
/// * `cryptomgr.notests`: skips the crypto self-tests, the largest single saving (~0.8 s under TCG).
/// * `tsc=reliable no_timer_check`: trust the TSC (QEMU's TCG TSC follows the host's invariant TSC)
///   instead of running the clocksource watchdog, and skip the timer IRQ check.
/// * `8250.nr_uarts=1`: microvm has one serial port; do not register four.
/// * `mitigations=off`: speculative-execution mitigations only slow down an emulated CPU that the
///   sandbox owns alone; the VM boundary is the isolation that matters.
/// * `random.trust_cpu=on`: seed the RNG from RDRAND at once so early getrandom() never waits.
/// * `audit=0 nowatchdog`: no audit subsystem and no lockup detectors in a short-lived sandbox.
///
/// [`kernel_cmdline`] adds `tsc_early_khz=`, which is specific to the host (see [`CmdlineParams::tsc_khz`]).
pub const CMDLINE_BASE: &str = "console=ttyS0 root=/dev/vda rw quiet loglevel=3 panic=-1 reboot=t \
    cryptomgr.notests tsc=reliable no_timer_check 8250.nr_uarts=1 mitigations=off random.trust_cpu=on \
    audit=0 nowatchdog";

/// Sysctls for every boot that spare an idle guest (and so its host) periodic wakeups: no proactive
/// compaction (kcompactd woke twice a second) and per-CPU VM statistics folded every 10 s instead of
/// every second. Together they cut an idle TCG VM's QEMU wakeups by about a third.
pub const IDLE_SYSCTLS: [&str; 2] = [
    "sysctl.vm.compaction_proactiveness=0",
    "sysctl.vm.stat_interval=10",
];

/// Base flags that only TCG needs (see [`CMDLINE_BASE`]).
const TCG_ONLY: [&str; 2] = ["tsc=reliable", "no_timer_check"];

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
    /// TSC frequency to pass as `tsc_early_khz=`. `None` measures the host's (see [`host_tsc_khz`]);
    /// `Some(0)` leaves the parameter out.
    ///
    /// Under TCG the guest TSC ticks at the host's TSC rate, and the kernel's own calibration against
    /// the emulated PIT fails on a busy host (about one boot in six here), after which the guest hangs.
    /// Telling the kernel the frequency skips that calibration.
    pub tsc_khz: Option<u64>,
    /// Under KVM: leave out the TCG-only clock flags (`tsc=reliable no_timer_check`, `tsc_early_khz=`);
    /// the guest uses kvm-clock.
    pub kvm: bool,
    /// Further parameters, appended verbatim, e.g. `kiln.ip=10.0.2.20/24`, `kiln.dns=1.1.1.1,8.8.8.8`.
    pub extra: Vec<String>,
}

/// The full kernel command line for booting a sandbox from `image`.
pub fn kernel_cmdline(image: &Image, params: &CmdlineParams) -> String {
    if params.kvm {
        return build_cmdline(&image.manifest.cmdline_base, params, None);
    }
    let tsc_khz = params.tsc_khz.or_else(host_tsc_khz).filter(|&khz| khz > 0);
    build_cmdline(&image.manifest.cmdline_base, params, tsc_khz)
}

fn build_cmdline(base: &str, params: &CmdlineParams, tsc_khz: Option<u64>) -> String {
    let mut parts: Vec<String> = base
        .split_whitespace()
        .filter(|p| !(params.kvm && TCG_ONLY.contains(p)))
        .map(str::to_string)
        .collect();
    parts.extend(IDLE_SYSCTLS.iter().map(|s| s.to_string()));
    if let Some(khz) = tsc_khz {
        parts.push(format!("tsc_early_khz={khz}"));
    }
    if let Some(hostname) = params.hostname.as_deref().and_then(sanitize_hostname) {
        parts.push(format!("kiln.hostname={hostname}"));
    }
    if params.resize {
        parts.push("kiln.resize=1".into());
    }
    if params.debug {
        parts.push("kiln.debug=1".into());
    }
    parts.extend(
        params
            .extra
            .iter()
            .flat_map(|e| e.split_whitespace())
            .map(str::to_string),
    );
    parts.join(" ")
}

/// The host's TSC frequency in kHz, measured once per process (about 60 ms, on first use), or `None`
/// when the host has no invariant TSC to measure.
pub fn host_tsc_khz() -> Option<u64> {
    static KHZ: OnceLock<Option<u64>> = OnceLock::new();
    *KHZ.get_or_init(measure_tsc_khz)
}

#[cfg(target_arch = "x86_64")]
fn measure_tsc_khz() -> Option<u64> {
    use std::arch::x86_64::{__cpuid, _rdtsc};
    use std::time::{Duration, Instant};

    // SAFETY: cpuid and rdtsc are available on every x86-64 CPU and have no side effects. (`__cpuid` is
    // a safe function since Rust 1.87, but not for the workspace's minimum Rust version.)
    #[allow(unused_unsafe)]
    let invariant = unsafe {
        __cpuid(0x8000_0000).eax >= 0x8000_0007 && __cpuid(0x8000_0007).edx & (1 << 8) != 0
    };
    if !invariant {
        return None;
    }
    // Pairs a clock reading with a TSC reading, retrying until nothing (an interrupt, a preemption)
    // came between the two TSC reads that bracket it, so both describe the same instant.
    let sample = || {
        for _ in 0..100 {
            // SAFETY: see above.
            let before = unsafe { _rdtsc() };
            let now = Instant::now();
            let after = unsafe { _rdtsc() };
            if after.wrapping_sub(before) < 20_000 {
                return Some((now, before / 2 + after / 2));
            }
        }
        None
    };
    let mut estimates = Vec::new();
    for _ in 0..3 {
        let (t0, c0) = sample()?;
        std::thread::sleep(Duration::from_millis(20));
        let (t1, c1) = sample()?;
        let nanos = t1.duration_since(t0).as_nanos();
        if nanos == 0 || c1 <= c0 {
            return None;
        }
        estimates.push(u128::from(c1 - c0) * 1_000_000 / nanos);
    }
    estimates.sort_unstable();
    u64::try_from(estimates[1]).ok()
}

#[cfg(not(target_arch = "x86_64"))]
fn measure_tsc_khz() -> Option<u64> {
    None
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
            vmlinux: Some(PathBuf::from("/i/tiny/vmlinux")),
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
            tsc_khz: Some(2_596_144),
            kvm: false,
            extra: vec!["kiln.ip=10.0.2.20/24 kiln.gw=10.0.2.2".into()],
        };
        assert_eq!(
            kernel_cmdline(&image(), &params),
            "console=ttyS0 quiet sysctl.vm.compaction_proactiveness=0 sysctl.vm.stat_interval=10 \
             tsc_early_khz=2596144 kiln.hostname=sbx-1 kiln.resize=1 kiln.debug=1 \
             kiln.ip=10.0.2.20/24 kiln.gw=10.0.2.2"
        );
        let no_tsc = CmdlineParams {
            tsc_khz: Some(0),
            ..Default::default()
        };
        assert_eq!(
            kernel_cmdline(&image(), &no_tsc),
            "console=ttyS0 quiet sysctl.vm.compaction_proactiveness=0 sysctl.vm.stat_interval=10"
        );
    }

    #[test]
    fn measures_a_plausible_tsc() {
        // Any x86-64 host this runs on has a TSC between 500 MHz and 10 GHz, if it is invariant at all.
        if let Some(khz) = host_tsc_khz() {
            assert!((500_000..10_000_000).contains(&khz), "{khz}");
            assert!(kernel_cmdline(&image(), &CmdlineParams::default())
                .contains(&format!("tsc_early_khz={khz}")));
        }
    }

    #[test]
    fn hostnames_cannot_break_the_cmdline() {
        assert_eq!(
            sanitize_hostname("my box; rm -rf /").as_deref(),
            Some("myboxrm-rf")
        );
        assert_eq!(
            sanitize_hostname("web_1.local").as_deref(),
            Some("web-1.local")
        );
        assert_eq!(sanitize_hostname("-.-"), None);
        assert_eq!(
            sanitize_hostname(&"a".repeat(100)).map(|h| h.len()),
            Some(63)
        );
    }

    #[test]
    fn base_cmdline_has_console_and_no_double_spaces() {
        assert!(CMDLINE_BASE.starts_with("console=ttyS0 "));
        assert!(!CMDLINE_BASE.contains("  "));
    }

    #[test]
    fn kvm_boots_without_the_tcg_clock_flags() {
        let kvm = CmdlineParams {
            kvm: true,
            tsc_khz: Some(2_000_000),
            ..Default::default()
        };
        let line = build_cmdline(CMDLINE_BASE, &kvm, None);
        assert!(
            !line.contains("tsc=reliable") && !line.contains("no_timer_check"),
            "{line}"
        );
        assert!(!line.contains("tsc_early_khz"), "{line}");
        let tcg = build_cmdline(CMDLINE_BASE, &CmdlineParams::default(), Some(2_000_000));
        assert!(
            tcg.contains("tsc=reliable no_timer_check") && tcg.contains("tsc_early_khz=2000000")
        );
    }
}
