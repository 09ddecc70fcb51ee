//! Choosing the accelerator: KVM where hardware virtualization really works, TCG otherwise.
//!
//! The mere presence of `/dev/kvm` proves little: some hosts expose a paravirtual KVM (`kvm_pvm`) that opens
//! and creates VMs but cannot run an ordinary Linux guest. So KVM is chosen only when a hardware KVM module
//! (`kvm_intel` or `kvm_amd`) is loaded, `/dev/kvm` opens read-write, and a tiny guest runs to completion
//! exactly as a VM will: as a VM uid, under seccomp, on `microvm`, with kiln's `-cpu`, given the daemon's
//! `/dev/kvm` descriptor. Where a hardware module is loaded (or `--accel kvm` asked for it) a failing probe
//! is a start-up error, never a silent fall back to TCG.

use std::fmt;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;
use std::str::FromStr;
use std::time::Duration;

use crate::launch::RunAs;

/// The descriptor number QEMU finds the daemon's `/dev/kvm` under, and the fd set it is added to
/// (`-add-fd fd=3,set=1` with `-accel kvm,device=/dev/fdset/1`).
pub const KVM_FD: i32 = 3;
pub const KVM_FDSET: u32 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

impl Accel {
    /// The accelerator's QEMU arguments. KVM's device is the descriptor `launch` passes as [`KVM_FD`].
    pub fn qemu_args(self) -> Vec<String> {
        match self {
            Accel::Kvm => vec![
                "-add-fd".into(),
                format!("fd={KVM_FD},set={KVM_FDSET},opaque=kiln-kvm"),
                "-accel".into(),
                format!("kvm,device=/dev/fdset/{KVM_FDSET}"),
            ],
            Accel::Tcg => vec!["-accel".into(), "tcg".into()],
        }
    }
}

/// Settings that differ by accelerator: what TCG needs to boot reliably, or to hide its slowness, is
/// noise or waste under KVM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tuning {
    /// `tsc=reliable no_timer_check tsc_early_khz=` on the kernel command line: TCG's emulated PIT makes
    /// the guest's TSC calibration fail on a busy host; under KVM the guest has kvm-clock.
    pub tsc_cmdline: bool,
    /// Warm spares kept by default: a TCG restore costs a new QEMU's cold translation cache, a KVM one
    /// tens of milliseconds, not worth a resident VM each.
    pub warm_spares: usize,
    /// How long a just-continued guest's agent may take to answer.
    pub agent_after_resume: Duration,
    /// How often an unanswered agent Hello is resent: a TCG guest's first answer after a restore takes
    /// tens of milliseconds (resending sooner only wakes it more), a KVM guest's well under one.
    pub hello_retry: Duration,
    /// How often connecting to a VM's agent socket is retried while QEMU has not created it yet.
    pub connect_retry: Duration,
}

impl Accel {
    pub fn tuning(self) -> Tuning {
        match self {
            Accel::Tcg => Tuning {
                tsc_cmdline: true,
                warm_spares: 2,
                agent_after_resume: Duration::from_secs(20),
                hello_retry: Duration::from_millis(200),
                connect_retry: Duration::from_millis(50),
            },
            Accel::Kvm => Tuning {
                tsc_cmdline: false,
                warm_spares: 0,
                agent_after_resume: Duration::from_secs(5),
                hello_retry: Duration::from_millis(20),
                connect_retry: Duration::from_millis(10),
            },
        }
    }
}

/// Opens `/dev/kvm` read-write, close-on-exec, at a descriptor number above stdio (which the child's
/// stdio set-up would overwrite).
pub fn open_kvm() -> std::io::Result<File> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")?;
    if f.as_raw_fd() > 2 {
        Ok(f)
    } else {
        // try_clone duplicates with F_DUPFD_CLOEXEC from 3 upwards.
        f.try_clone()
    }
}

/// Under KVM, opens `/dev/kvm` and has `cmd`'s child find it as [`KVM_FD`]; keep the returned file
/// until the child is spawned.
pub fn attach_kvm(cmd: &mut Command, accel: Accel) -> std::io::Result<Option<File>> {
    if accel != Accel::Kvm {
        return Ok(None);
    }
    let f = open_kvm()?;
    let fd = f.as_raw_fd();
    // SAFETY: the closure only makes raw syscalls (dup2/fcntl).
    unsafe {
        cmd.pre_exec(move || crate::launch::pass_kvm_fd(fd));
    }
    Ok(Some(f))
}

impl fmt::Display for Accel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Accel {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "kvm" => Ok(Accel::Kvm),
            "tcg" => Ok(Accel::Tcg),
            other => Err(format!(
                "unknown accelerator '{other}': use 'kvm' or 'tcg' (or 'auto')"
            )),
        }
    }
}

/// The decision and why it was made, for the daemon's log line and `/v1/info`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct AccelChoice {
    pub accel: Accel,
    pub reason: String,
}

/// Picks the accelerator. `requested` is the user's override (`--accel`, config or `KILN_ACCEL`);
/// `None` means probe. `run_as` is who VMs run as (the probe runs as they will). An error is a start-up
/// failure: KVM was asked for, or a hardware KVM module is loaded, and no VM could run under it.
/// `kernel`: a guest kernel for the KVM probe to boot (see [`run_probe_with`]); without one the probe runs
/// a firmware stub, which some hosts run under KVM although no Linux guest can.
pub fn choose(
    requested: Option<Accel>,
    run_as: Option<&RunAs>,
    kernel: Option<&Path>,
) -> Result<AccelChoice, String> {
    let what = if kernel.is_some() {
        "a probe VM booted the guest kernel under KVM"
    } else {
        "a probe VM ran under KVM (no guest kernel built yet: a firmware stub)"
    };
    match requested {
        Some(Accel::Tcg) => Ok(AccelChoice {
            accel: Accel::Tcg,
            reason: "requested explicitly".to_string(),
        }),
        // Asked for: whatever module provides /dev/kvm, a VM must run under it.
        Some(Accel::Kvm) => match run_probe_with(Accel::Kvm, run_as, kernel) {
            Ok(()) => Ok(AccelChoice {
                accel: Accel::Kvm,
                reason: format!("requested explicitly; {what}"),
            }),
            Err(why) => Err(format!(
                "--accel kvm was requested but KVM cannot run VMs here: {why}. Fix KVM (see docs/kvm.md) or start with --accel tcg"
            )),
        },
        None => match probe_kvm(run_as, kernel) {
            Ok(module) => Ok(AccelChoice {
                accel: Accel::Kvm,
                reason: format!("{module} loaded and {what}"),
            }),
            Err(Probe::NoModule(why)) => Ok(AccelChoice {
                accel: Accel::Tcg,
                reason: format!("KVM not usable ({why}); using TCG software emulation"),
            }),
            Err(Probe::Failed(why)) => Err(format!(
                "hardware KVM is loaded but a VM cannot run under it: {why}. Fix KVM (see docs/kvm.md), or accept software emulation with --accel tcg (10-50x slower)"
            )),
        },
    }
}

enum Probe {
    /// No hardware KVM on this host: TCG is the expected choice.
    NoModule(String),
    /// Hardware KVM is there but does not work for kiln's VMs.
    Failed(String),
}

fn probe_kvm(run_as: Option<&RunAs>, kernel: Option<&Path>) -> Result<&'static str, Probe> {
    let module = ["kvm_intel", "kvm_amd"]
        .into_iter()
        .find(|m| Path::new("/sys/module").join(m).exists());
    let Some(module) = module else {
        let present = if Path::new("/sys/module/kvm").exists() {
            "the kvm module is loaded but neither kvm_intel nor kvm_amd is"
        } else {
            "no kvm module is loaded"
        };
        return Err(Probe::NoModule(present.to_string()));
    };
    open_kvm().map_err(|e| {
        Probe::Failed(format!(
            "{module} is loaded but the daemon cannot open /dev/kvm read-write: {e}"
        ))
    })?;
    run_probe_with(Accel::Kvm, run_as, kernel)
        .map_err(|e| Probe::Failed(format!("{module} is loaded: {e}")))?;
    Ok(module)
}

/// Machine code placed at the x86 reset vector: `mov al,0x2a; out 0xf4,al; hlt; jmp $-3`.
/// With an `isa-debug-exit` device at port 0xf4 QEMU exits with status (0x2a << 1) | 1 = 85.
const PROBE_CODE: [u8; 7] = [0xB0, 0x2A, 0xE6, 0xF4, 0xF4, 0xEB, 0xFD];
const PROBE_EXIT_STATUS: i32 = 85;

/// A 64 KiB firmware image whose reset vector runs [`PROBE_CODE`].
pub fn probe_firmware() -> Vec<u8> {
    let mut image = vec![0xF4u8; 64 * 1024];
    let reset_vector = 0xFFF0;
    image[reset_vector..reset_vector + PROBE_CODE.len()].copy_from_slice(&PROBE_CODE);
    image
}

/// Runs a probe VM under `accel` as a VM runs (`run_as`, seccomp, `microvm`, kiln's `-cpu`, the daemon's
/// `/dev/kvm` descriptor). With `kernel`, it boots that guest kernel with no disk: the kernel finds no
/// root, panics and reboots, which `-no-reboot` makes QEMU's clean exit. That is the test that counts: a
/// paravirtual KVM (kvm_pvm) runs the firmware stub's few real-mode instructions, then fails every Linux
/// guest ("KVM internal error", QEMU stops and waits). Without a kernel, the firmware stub must reach the
/// exit port. QEMU's own words on failure.
pub fn run_probe_with(
    accel: Accel,
    run_as: Option<&RunAs>,
    kernel: Option<&Path>,
) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let dir = std::env::temp_dir().join(format!("kiln-accel-probe-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    // The VM's uid must read what it boots (nothing secret in it): the firmware stub, or a copy of the
    // kernel wherever the image lives. QEMU writes nothing here.
    let _ = std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755));
    let guest = dir.join(if kernel.is_some() {
        "kernel"
    } else {
        "probe.bin"
    });
    let placed = match kernel {
        Some(k) => std::fs::copy(k, &guest)
            .map(|_| ())
            .map_err(|e| format!("cannot copy {}: {e}", k.display())),
        None => std::fs::write(&guest, probe_firmware())
            .map_err(|e| format!("cannot write {}: {e}", guest.display())),
    };
    let result = placed.and_then(|()| {
        let _ = std::fs::set_permissions(&guest, std::fs::Permissions::from_mode(0o644));
        probe_once(accel, run_as, &guest, kernel.is_some())
    });
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// `guest`: a kernel to boot when `is_kernel`, else the firmware stub.
fn probe_once(
    accel: Accel,
    run_as: Option<&RunAs>,
    guest: &Path,
    is_kernel: bool,
) -> Result<(), String> {
    let run_as = run_as.cloned();
    let mut cmd = Command::new(crate::qemu_binary());
    cmd.args(accel.qemu_args())
        .args([
            "-M",
            &crate::qemu::machine(accel),
            "-cpu",
            &crate::cpu::model(accel),
        ])
        .args(["-nodefaults", "-no-user-config", "-display", "none"])
        .args(["-sandbox", crate::qemu::SECCOMP]);
    if is_kernel {
        cmd.args(["-m", "128"])
            .args(["-object", "memory-backend-ram,id=mem,size=128M"])
            .arg("-kernel")
            .arg(guest)
            .args(["-append", "panic=-1 reboot=t quiet", "-no-reboot"]);
    } else {
        cmd.args(["-m", "16"])
            .args(["-object", "memory-backend-ram,id=mem,size=16M"])
            .arg("-bios")
            .arg(guest)
            .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"]);
    }
    let expected = if is_kernel { 0 } else { PROBE_EXIT_STATUS };
    cmd.env_clear()
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    // SAFETY: only raw syscalls on data prepared before the fork; nothing allocates.
    unsafe {
        cmd.pre_exec(move || {
            if let Some(r) = &run_as {
                for rc in [
                    libc::setgroups(r.groups.len(), r.groups.as_ptr()),
                    libc::setresgid(r.gid, r.gid, r.gid),
                    libc::setresuid(r.uid, r.uid, r.uid),
                ] {
                    if rc < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
            }
            Ok(())
        });
    }
    let kvm = attach_kvm(&mut cmd, accel).map_err(|e| format!("cannot open /dev/kvm: {e}"))?;
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", crate::qemu_binary()))?;
    drop(kvm);
    let stderr = child.stderr.take();
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        if let Some(mut s) = stderr {
            use std::io::Read;
            let _ = (&mut s).take(16 * 1024).read_to_string(&mut text);
        }
        text
    });
    // A kernel booting to its panic takes well under a second under KVM; the stub, milliseconds.
    let limit = Duration::from_secs(if is_kernel { 20 } else { 10 });
    let deadline = std::time::Instant::now() + limit;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Ok(status),
            Ok(None) if std::time::Instant::now() > deadline => {
                let _ = child.kill();
                let _ = child.wait();
                break Err(format!(
                    "the probe VM did not finish within {} s",
                    limit.as_secs()
                ));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => break Err(format!("waiting for the probe VM: {e}")),
        }
    };
    let said = reader.join().unwrap_or_default();
    let said = said.trim();
    match status? {
        s if s.code() == Some(expected) => Ok(()),
        s => Err(format!(
            "the probe VM failed ({s}){}",
            if said.is_empty() {
                String::new()
            } else {
                format!(": QEMU said: {said}")
            }
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_accelerator_names() {
        assert_eq!("KVM".parse::<Accel>(), Ok(Accel::Kvm));
        assert_eq!(" tcg ".parse::<Accel>(), Ok(Accel::Tcg));
        assert!("hvf"
            .parse::<Accel>()
            .unwrap_err()
            .contains("'kvm' or 'tcg'"));
    }

    #[test]
    fn firmware_has_code_at_reset_vector() {
        let fw = probe_firmware();
        assert_eq!(fw.len(), 65536);
        assert_eq!(&fw[0xFFF0..0xFFF7], &PROBE_CODE);
    }

    #[test]
    fn tuning_per_accelerator() {
        let (t, k) = (Accel::Tcg.tuning(), Accel::Kvm.tuning());
        assert!(t.tsc_cmdline && !k.tsc_cmdline);
        assert_eq!((t.warm_spares, k.warm_spares), (2, 0));
        assert!(k.agent_after_resume < t.agent_after_resume);
        // Short retries under KVM, where the agent answers in well under a millisecond; as before under TCG.
        assert_eq!(t.hello_retry, Duration::from_millis(200));
        assert_eq!(t.connect_retry, Duration::from_millis(50));
        assert_eq!(k.hello_retry, Duration::from_millis(20));
        assert_eq!(k.connect_retry, Duration::from_millis(10));
        assert_eq!(Accel::Tcg.qemu_args(), ["-accel", "tcg"]);
        assert_eq!(
            Accel::Kvm.qemu_args(),
            [
                "-add-fd",
                "fd=3,set=1,opaque=kiln-kvm",
                "-accel",
                "kvm,device=/dev/fdset/1"
            ]
        );
    }

    #[test]
    fn explicit_choice_is_respected() {
        assert_eq!(
            choose(Some(Accel::Tcg), None, None).unwrap().accel,
            Accel::Tcg
        );
    }

    #[test]
    fn probe_firmware_runs_under_tcg() {
        // Exercises the real probe path with the emulator every host has.
        run_probe_with(Accel::Tcg, None, None)
            .expect("probe firmware should exit through isa-debug-exit");
    }
}
