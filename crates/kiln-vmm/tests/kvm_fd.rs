//! The /dev/kvm hand-off: a VM runs as an unprivileged uid that has no access to `/dev/kvm`, so the daemon
//! opens the device and QEMU receives the descriptor. On this kind of host `/dev/kvm` is a paravirtual KVM
//! that creates VMs but cannot run ordinary guests, so the assertion is on what the host can show: QEMU got
//! past KVM's initialisation (it runs with KVM enabled, or fails later with KVM's own error), never
//! "Permission denied" opening the device.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;

use kiln_vmm::{Accel, DiskLayer, RunAs, VmSpec};

/// A uid with no passwd entry and no access to a root-owned `0600` `/dev/kvm`.
const UID: u32 = 1_000_065_000;

fn tiny_image() -> Option<PathBuf> {
    Some(PathBuf::from(std::env::var_os("KILN_TEST_IMAGES")?).join("tiny"))
}

#[test]
fn qemu_as_unprivileged_uid_gets_kvm_from_the_daemon() {
    // SAFETY: getuid has no preconditions.
    if unsafe { libc::getuid() } != 0 || !std::path::Path::new("/dev/kvm").exists() {
        eprintln!("needs root and /dev/kvm; skipped");
        return;
    }
    let Some(images) = tiny_image() else {
        eprintln!("KILN_TEST_IMAGES not set; skipped");
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let run_dir = tmp.path().join("vm");
    std::fs::create_dir(&run_dir).unwrap();
    std::os::unix::fs::chown(&run_dir, Some(UID), Some(UID)).unwrap();
    let memory = run_dir.join("memory");
    std::fs::File::create(&memory).unwrap();
    std::os::unix::fs::chown(&memory, Some(UID), Some(UID)).unwrap();
    // Images are world-readable; an empty root disk is enough, the guest never runs.
    let disk = run_dir.join("disk.raw");
    std::fs::File::create(&disk).unwrap();
    std::os::unix::fs::chown(&disk, Some(UID), Some(UID)).unwrap();
    let spec = VmSpec {
        name: format!("kiln-kvmfd{}", std::process::id()),
        run_dir: run_dir.clone(),
        accel: Accel::Kvm,
        machine: None,
        tsc_khz: None,
        memory_mib: 64,
        balloon: false,
        balloon_reporting: false,
        vcpus: 1,
        max_vcpus: 1,
        memory_file: memory,
        memory_shared: true,
        firmware: None,
        kernel: images.join("vmlinuz"),
        initrd: images.join("initrd.img"),
        cmdline: "console=ttyS0".into(),
        disk_layers: vec![DiskLayer {
            path: disk,
            format: "raw".into(),
        }],
        mac: "52:54:00:12:34:56".into(),
        forwards: vec![],
        volumes: vec![],
        incoming: false,
        start_paused: true,
        egress: false,
        tap_fd: None,
        vhost_fd: None,
        tap_queues: Vec::new(),
        confine: kiln_vmm::Confine {
            run_as: Some(RunAs {
                uid: UID,
                gid: UID,
                groups: vec![],
            }),
            cgroup_procs: vec![],
        },
    };
    let result = kiln_vmm::launch::launch(&spec);
    match result {
        Ok(pid) => {
            // QEMU runs (vCPUs stopped): it initialised KVM as the unprivileged uid.
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
            let uid_line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
            kiln_vmm::process::signal(pid, libc::SIGKILL);
            assert!(uid_line.contains(&UID.to_string()), "{uid_line}");
            eprintln!("QEMU runs with KVM as uid {UID}");
        }
        Err(e) => {
            let text = e.to_string();
            eprintln!("QEMU said: {text}");
            assert!(
                !text.contains("Permission denied") && !text.contains("failed to initialize kvm"),
                "QEMU could not initialise KVM as uid {UID}: {text}"
            );
        }
    }
}
