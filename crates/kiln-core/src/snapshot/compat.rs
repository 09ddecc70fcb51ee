//! The compatibility contract: what a memory snapshot's saved state depends on, checked against this host
//! before any QEMU starts. A refusal is `snapshot_incompatible` naming the field, the snapshot's value and
//! this host's. Which differences are safe is written in docs/snapshots.md.

use std::path::Path;

use super::manifest::{Depends, Manifest};
use crate::error::{Error, ErrorCode, Result};
use crate::fsutil;

/// What this host would run a restored machine with.
#[derive(Debug, Clone)]
pub struct Host {
    pub accel: String,
    pub qemu_version: String,
    pub machine_options: String,
    /// Older `-M` option strings this kiln still builds for machines that recorded them.
    pub older_machine_options: Vec<String>,
    pub cpu_model: String,
    /// None when QEMU could not list them (then they are not compared).
    pub cpu_features: Option<Vec<String>>,
    /// None when QEMU could not report it (then it is not compared).
    pub cpu_identity: Option<kiln_vmm::cpu::Identity>,
}

impl Host {
    pub fn this(accel: kiln_vmm::Accel) -> Host {
        Host {
            accel: accel.to_string(),
            qemu_version: kiln_vmm::qemu_version(),
            machine_options: kiln_vmm::qemu::machine(accel),
            older_machine_options: kiln_vmm::qemu::known_machines(accel)
                .into_iter()
                .filter(|m| *m != kiln_vmm::qemu::machine(accel))
                .collect(),
            cpu_model: kiln_vmm::cpu::model(accel),
            cpu_features: kiln_vmm::cpu::features(accel),
            cpu_identity: kiln_vmm::cpu::identity(accel),
        }
    }
}

/// The dependencies a new snapshot records (see [`Depends`]).
/// `cpu` is the machine's recorded CPU (this host's when the machine predates the record), `machine` its
/// `-M` options.
pub fn recorded(
    accel: kiln_vmm::Accel,
    firmware: Option<&Path>,
    cpu: Option<kiln_vmm::cpu::Identity>,
    machine: String,
) -> Depends {
    Depends {
        machine_options: Some(machine),
        cpu_features: kiln_vmm::cpu::features(accel),
        firmware_checksum: firmware.and_then(|f| fsutil::checksum(f).ok()),
        cpu_identity: cpu.or_else(|| kiln_vmm::cpu::identity(accel)),
        free_page_reporting: None,
        net_queues: None,
    }
}

/// `major.minor.patch` from `QEMU emulator version 10.0.2 (Debian ...)`.
pub fn parse_qemu_version(s: &str) -> Option<(u32, u32, u32)> {
    s.split_whitespace().find_map(|word| {
        let mut parts = word.split('.').map(|p| p.parse::<u32>().ok());
        match (parts.next()?, parts.next()?, parts.next().flatten()) {
            (Some(a), Some(b), c) => Some((a, b, c.unwrap_or(0))),
            _ => None,
        }
    })
}

fn refuse(m: &Manifest, field: &str, snap: &str, host: &str, advice: &str) -> Error {
    Error::new(
        ErrorCode::SnapshotIncompatible,
        format!(
            "snapshot {} cannot be resumed on this host: {field} differs (snapshot: {snap}; this host: {host}); {advice}",
            m.id
        ),
    )
}

const DISK_ADVICE: &str =
    "a `--type disk` snapshot (it boots cold, carrying no device state) moves across hosts";

/// Refuses a snapshot whose saved state this host cannot load. Disk snapshots boot cold and are checked
/// for the accelerator only.
pub fn check(m: &Manifest, host: &Host) -> Result<()> {
    if m.accel != host.accel {
        return Err(refuse(
            m,
            "accel",
            &m.accel,
            &host.accel,
            &format!(
                "restore it on a host with the same accelerator (or `kiln serve --accel {}`)",
                m.accel
            ),
        ));
    }
    if !m.kind.has_memory() {
        return Ok(());
    }
    if let (Some(s), Some(h)) = (
        parse_qemu_version(&m.qemu_version),
        parse_qemu_version(&host.qemu_version),
    ) {
        // Patch releases of one QEMU series keep the migration format of `microvm` (which has no
        // versioned machine types); anything else may not.
        if (s.0, s.1) != (h.0, h.1) {
            return Err(refuse(
                m,
                "qemu_version",
                &m.qemu_version,
                &host.qemu_version,
                &format!("resume it with QEMU {}.{}.x; {DISK_ADVICE}", s.0, s.1),
            ));
        }
    }
    let snap_machine = m.machine.split(',').next().unwrap_or("");
    let host_machine = host.machine_options.split(',').next().unwrap_or("");
    if snap_machine != host_machine {
        return Err(refuse(
            m,
            "machine",
            &m.machine,
            host_machine,
            &format!("this kiln builds other machines; {DISK_ADVICE}"),
        ));
    }
    if let Some(opts) = &m.depends.machine_options {
        // The recorded options go on the restored QEMU's command line: only strings this kiln builds.
        if *opts != host.machine_options && !host.older_machine_options.contains(opts) {
            return Err(refuse(
                m,
                "machine_options",
                opts,
                &host.machine_options,
                &format!("this kiln builds its machine differently; {DISK_ADVICE}"),
            ));
        }
    }
    if m.cpu_model != host.cpu_model {
        return Err(refuse(
            m,
            "cpu_model",
            &m.cpu_model,
            &host.cpu_model,
            &format!("the guest's CPU would change under it; {DISK_ADVICE}"),
        ));
    }
    if let (Some(snap), Some(here)) = (&m.depends.cpu_features, &host.cpu_features) {
        let missing: Vec<&str> = snap
            .iter()
            .filter(|f| here.binary_search(f).is_err())
            .map(String::as_str)
            .collect();
        if !missing.is_empty() {
            let shown = missing
                .iter()
                .take(8)
                .copied()
                .collect::<Vec<_>>()
                .join(", ");
            return Err(refuse(
                m,
                "cpu_features",
                &format!(
                    "guest saw {shown}{}",
                    if missing.len() > 8 { ", ..." } else { "" }
                ),
                &format!("{} of them missing", missing.len()),
                &format!("the guest may use CPU features this host lacks; {DISK_ADVICE}"),
            ));
        }
    }
    if let Some(snap) = &m.depends.cpu_identity {
        check_identity(m, snap, host.cpu_identity.as_ref())?;
    }
    if let Some(fw) = &m.firmware {
        let here = if fw.is_file() {
            m.depends
                .firmware_checksum
                .as_ref()
                .map(|_| fsutil::checksum(fw).unwrap_or_else(|_| "unreadable".into()))
        } else {
            Some("missing".into())
        };
        if let Some(here) = here {
            let snap = m.depends.firmware_checksum.as_deref().unwrap_or("present");
            if here != snap {
                return Err(refuse(
                    m,
                    "firmware",
                    &format!("{} {snap}", fw.display()),
                    &here,
                    &format!("install the same firmware; {DISK_ADVICE}"),
                ));
            }
        }
    }
    Ok(())
}

/// The guest's CPU must look the same after the resume: same vendor, family, model and stepping (the
/// guest picked code paths and errata workarounds by them), same physical address width, and a TSC at
/// the recorded frequency (the guest calibrated its clocks against it), which a host at another frequency
/// can give only with TSC scaling. `here` unknown: the identity cannot be checked, so a snapshot
/// recording a TSC frequency is refused and the rest is left to QEMU's own checks.
fn check_identity(
    m: &Manifest,
    snap: &kiln_vmm::cpu::Identity,
    here: Option<&kiln_vmm::cpu::Identity>,
) -> Result<()> {
    let advice = format!("the guest's CPU would change under it; {DISK_ADVICE}");
    if let Some(h) = here {
        let fields: [(&str, String, String); 5] = [
            ("cpu_vendor", snap.vendor.clone(), h.vendor.clone()),
            ("cpu_family", snap.family.to_string(), h.family.to_string()),
            (
                "cpu_model_number",
                snap.model.to_string(),
                h.model.to_string(),
            ),
            (
                "cpu_stepping",
                snap.stepping.to_string(),
                h.stepping.to_string(),
            ),
            (
                "cpu_phys_bits",
                snap.phys_bits.to_string(),
                h.phys_bits.to_string(),
            ),
        ];
        for (field, s, h) in fields {
            if s != h {
                return Err(refuse(m, field, &s, &h, &advice));
            }
        }
    }
    if let Some(khz) = snap.tsc_khz {
        let here_khz = here.and_then(|h| h.tsc_khz);
        let scaling = here.and_then(|h| h.tsc_scaling) == Some(true);
        if here_khz != Some(khz) && !scaling {
            return Err(refuse(
                m,
                "tsc_frequency",
                &format!("{khz} kHz"),
                &match here_khz {
                    Some(h) => format!("{h} kHz, no TSC scaling"),
                    None => "no fixed TSC frequency, no TSC scaling".to_string(),
                },
                &format!("resume it on a KVM host with the same TSC frequency or with TSC scaling; {DISK_ADVICE}"),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::manifest::{Source, FORMAT_VERSION};
    use crate::snapshot::SnapshotType;

    fn host() -> Host {
        Host {
            accel: "tcg".into(),
            qemu_version: "QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2)".into(),
            machine_options: "microvm,acpi=on".into(),
            older_machine_options: vec!["microvm,acpi=on,pit=on".into()],
            cpu_model: "max".into(),
            cpu_features: Some(vec!["aes".into(), "sse2".into(), "sse4.1".into()]),
            cpu_identity: None,
        }
    }

    fn manifest() -> Manifest {
        Manifest {
            format_version: FORMAT_VERSION,
            id: "snap1".into(),
            kind: SnapshotType::Full,
            created_at: "now".into(),
            kiln_version: "0".into(),
            qemu_version: "QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2)".into(),
            machine: "microvm".into(),
            cpu_model: "max".into(),
            accel: "tcg".into(),
            kernel_version: "6.12".into(),
            firmware: None,
            depends: Depends {
                machine_options: Some("microvm,acpi=on".into()),
                cpu_features: Some(vec!["aes".into(), "sse2".into()]),
                firmware_checksum: None,
                cpu_identity: None,
                free_page_reporting: None,
                net_queues: None,
            },
            cmdline: String::new(),
            memory_mib: 256,
            cpus: 1,
            max_cpus: None,
            max_memory_mib: None,
            disk_size_bytes: 1,
            source: Source {
                sandbox_id: "sb".into(),
                sandbox_name: "n".into(),
                hostname: "n".into(),
                template: "tiny".into(),
                env: Default::default(),
                mac: "m".into(),
                egress: true,
                address: None,
                ports: vec![],
                image_digest: None,
            },
            parent: None,
            base_digest: None,
            labels: Default::default(),
            files: vec![],
            state_format: None,
            volume_slots: vec![],
        }
    }

    fn refused_field(m: &Manifest, h: &Host) -> String {
        let e = check(m, h).unwrap_err();
        assert_eq!(e.code, ErrorCode::SnapshotIncompatible);
        e.message
    }

    #[test]
    fn versions_parse() {
        assert_eq!(
            parse_qemu_version("QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds)"),
            Some((10, 0, 2))
        );
        assert_eq!(
            parse_qemu_version("QEMU emulator version 9.2"),
            Some((9, 2, 0))
        );
        assert_eq!(parse_qemu_version("unknown"), None);
    }

    #[test]
    fn same_host_and_safe_differences_pass() {
        check(&manifest(), &host()).unwrap();
        // A newer (or older) patch release of the same series, another distro build.
        let mut h = host();
        h.qemu_version = "QEMU emulator version 10.0.5".into();
        check(&manifest(), &h).unwrap();
        // The host offers more CPU features than the guest saw.
        h.cpu_features = Some(vec![
            "aes".into(),
            "avx".into(),
            "sse2".into(),
            "sse4.1".into(),
        ]);
        check(&manifest(), &h).unwrap();
        // Unknown on either side: not compared.
        h.cpu_features = None;
        check(&manifest(), &h).unwrap();
        let mut old = manifest();
        old.depends = Depends::default();
        old.qemu_version = "unknown".into();
        check(&old, &host()).unwrap();
    }

    #[test]
    fn each_difference_that_matters_is_refused_by_name() {
        let mut h = host();
        h.qemu_version = "QEMU emulator version 10.1.0".into();
        let msg = refused_field(&manifest(), &h);
        assert!(
            msg.contains("qemu_version") && msg.contains("10.0.2") && msg.contains("10.1.0"),
            "{msg}"
        );

        let mut h = host();
        h.accel = "kvm".into();
        assert!(refused_field(&manifest(), &h)
            .contains("accel differs (snapshot: tcg; this host: kvm)"));

        let mut m = manifest();
        m.machine = "q35".into();
        assert!(refused_field(&m, &host())
            .contains("machine differs (snapshot: q35; this host: microvm)"));

        let mut h = host();
        h.machine_options = "microvm,acpi=off".into();
        assert!(refused_field(&manifest(), &h).contains("machine_options differs"));
        // Options this kiln still builds for older machines restore; anything else is refused.
        let mut m = manifest();
        m.depends.machine_options = Some("microvm,acpi=on,pit=on".into());
        check(&m, &host()).unwrap();
        m.depends.machine_options = Some("microvm,acpi=on,pit=on,x-evil=1".into());
        assert!(refused_field(&m, &host()).contains("machine_options differs"));

        let mut h = host();
        h.cpu_model = "host".into();
        assert!(refused_field(&manifest(), &h)
            .contains("cpu_model differs (snapshot: max; this host: host)"));

        let mut h = host();
        h.cpu_features = Some(vec!["sse2".into()]);
        let msg = refused_field(&manifest(), &h);
        assert!(msg.contains("cpu_features") && msg.contains("aes"), "{msg}");

        let mut m = manifest();
        m.firmware = Some("/nonexistent/qboot.rom".into());
        let msg = refused_field(&m, &host());
        assert!(msg.contains("firmware") && msg.contains("missing"), "{msg}");
    }

    #[test]
    fn changed_firmware_is_refused_and_disk_snapshots_only_need_the_accelerator() {
        let dir = tempfile::tempdir().unwrap();
        let fw = dir.path().join("bios.bin");
        std::fs::write(&fw, b"old").unwrap();
        let mut m = manifest();
        m.firmware = Some(fw.clone());
        m.depends.firmware_checksum = Some(fsutil::checksum(&fw).unwrap());
        check(&m, &host()).unwrap();
        std::fs::write(&fw, b"new").unwrap();
        assert!(refused_field(&m, &host()).contains("firmware differs"));

        m.kind = SnapshotType::Disk;
        m.machine = "q35".into();
        let mut h = host();
        h.qemu_version = "QEMU emulator version 11.0.0".into();
        check(&m, &h).unwrap();
        h.accel = "kvm".into();
        refused_field(&m, &h);
    }

    #[test]
    fn manifests_without_the_new_fields_still_load() {
        let mut m = manifest();
        m.depends.firmware_checksum = Some("xxh3:0".into());
        let json = serde_json::to_value(m).unwrap();
        let mut obj = json.as_object().unwrap().clone();
        for k in ["machine_options", "cpu_features", "firmware_checksum"] {
            assert!(obj.remove(k).is_some(), "{k} is a top-level field");
        }
        let back: Manifest = serde_json::from_value(serde_json::Value::Object(obj)).unwrap();
        assert_eq!(back.depends, Depends::default());
    }

    fn cpu(tsc_khz: Option<u64>, tsc_scaling: Option<bool>) -> kiln_vmm::cpu::Identity {
        kiln_vmm::cpu::Identity {
            vendor: "AuthenticAMD".into(),
            family: 25,
            model: 1,
            stepping: 1,
            phys_bits: 48,
            tsc_khz,
            tsc_scaling,
        }
    }

    #[test]
    fn cpu_identity_and_tsc_are_checked_with_scaling_allowing_another_frequency() {
        let mut m = manifest();
        let mut h = host();
        m.depends.cpu_identity = Some(cpu(Some(2_000_000), Some(false)));
        h.cpu_identity = Some(cpu(Some(2_000_000), Some(false)));
        check(&m, &h).unwrap();
        h.cpu_identity = Some(cpu(Some(2_500_000), Some(false)));
        let e = check(&m, &h).unwrap_err();
        assert!(e.message.contains(
            "tsc_frequency differs (snapshot: 2000000 kHz; this host: 2500000 kHz, no TSC scaling)"
        ));
        h.cpu_identity = Some(cpu(Some(2_500_000), Some(true)));
        check(&m, &h).unwrap();
        let mut other = cpu(Some(2_000_000), None);
        other.stepping = 2;
        h.cpu_identity = Some(other);
        assert!(check(&m, &h)
            .unwrap_err()
            .message
            .contains("cpu_stepping differs (snapshot: 1; this host: 2)"));
        // Unknown here: a snapshot that fixed its TSC frequency is refused, the rest is not compared.
        h.cpu_identity = None;
        assert!(check(&m, &h).unwrap_err().message.contains("tsc_frequency"));
        m.depends.cpu_identity = Some(cpu(None, None));
        check(&m, &h).unwrap();
    }
}
