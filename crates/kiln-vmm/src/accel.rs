//! Choosing the accelerator: KVM where hardware virtualization really works, TCG otherwise.
//!
//! The mere presence of `/dev/kvm` proves little: some hosts expose a paravirtual KVM (`kvm_pvm`) that opens
//! and creates VMs but cannot run an ordinary Linux guest. So KVM is chosen only when a hardware KVM module
//! (`kvm_intel` or `kvm_amd`) is loaded, `/dev/kvm` opens read-write, and a tiny guest runs to completion.

use std::fmt;
use std::path::Path;
use std::process::Command;
use std::str::FromStr;
use std::time::Duration;

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
/// `None` means probe.
pub fn choose(requested: Option<Accel>) -> AccelChoice {
    match requested {
        Some(accel) => AccelChoice {
            accel,
            reason: "requested explicitly".to_string(),
        },
        None => match probe_kvm() {
            Ok(()) => AccelChoice {
                accel: Accel::Kvm,
                reason: "hardware KVM module loaded and a probe guest ran under KVM".to_string(),
            },
            Err(why) => AccelChoice {
                accel: Accel::Tcg,
                reason: format!("KVM not usable ({why}); using TCG software emulation"),
            },
        },
    }
}

fn probe_kvm() -> Result<(), String> {
    let module = ["kvm_intel", "kvm_amd"]
        .into_iter()
        .find(|m| Path::new("/sys/module").join(m).exists());
    let Some(module) = module else {
        let present = if Path::new("/sys/module/kvm").exists() {
            "the kvm module is loaded but neither kvm_intel nor kvm_amd is"
        } else {
            "no kvm module is loaded"
        };
        return Err(present.to_string());
    };
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map_err(|e| format!("{module} is loaded but /dev/kvm cannot be opened: {e}"))?;
    run_probe_guest()
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

/// Runs the probe firmware under `accel` and checks that it reached the exit port.
pub fn run_probe_with(accel: Accel) -> Result<(), String> {
    let dir = std::env::temp_dir().join(format!("kiln-accel-probe-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let firmware = dir.join("probe.bin");
    let result = std::fs::write(&firmware, probe_firmware())
        .map_err(|e| format!("cannot write {}: {e}", firmware.display()))
        .and_then(|()| {
            let mut child = Command::new(crate::qemu_binary())
                .args(["-accel", accel.as_str(), "-M", "pc", "-m", "16"])
                .args(["-nodefaults", "-no-user-config", "-display", "none"])
                .arg("-bios")
                .arg(&firmware)
                .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .map_err(|e| format!("cannot run {}: {e}", crate::qemu_binary()))?;
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            loop {
                match child.try_wait() {
                    Ok(Some(status)) if status.code() == Some(PROBE_EXIT_STATUS) => return Ok(()),
                    Ok(Some(status)) => return Err(format!("probe guest failed ({status})")),
                    Ok(None) if std::time::Instant::now() > deadline => {
                        let _ = child.kill();
                        let _ = child.wait();
                        return Err("probe guest did not finish within 10 s".to_string());
                    }
                    Ok(None) => std::thread::sleep(Duration::from_millis(10)),
                    Err(e) => return Err(format!("waiting for the probe guest: {e}")),
                }
            }
        });
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn run_probe_guest() -> Result<(), String> {
    run_probe_with(Accel::Kvm)
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
    fn explicit_choice_is_respected() {
        assert_eq!(choose(Some(Accel::Tcg)).accel, Accel::Tcg);
    }

    #[test]
    fn probe_firmware_runs_under_tcg() {
        // Exercises the real probe path with the emulator every host has.
        run_probe_with(Accel::Tcg).expect("probe firmware should exit through isa-debug-exit");
    }
}
