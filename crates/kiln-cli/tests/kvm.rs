//! Correct on KVM hosts, tested as far as this (TCG-only) host allows: `--accel kvm` probes and refuses
//! to start where no VM runs under KVM; a machine keeps its own accelerator (a hibernated machine is never
//! loaded under another, a snapshot records the machine's); a memory snapshot records the guest CPU's
//! identity and TSC frequency, and a host that cannot give the guest the same is refused naming the
//! field. The rest is checked on a real KVM host by scripts/kvm-check.sh.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{read_manifest, require_image, write_manifest, Daemon, KILN};
use serde_json::Value;

#[test]
fn accel_kvm_probes_and_is_a_start_up_error_where_vms_cannot_run() {
    if !std::path::Path::new("/dev/kvm").exists() {
        eprintln!("no /dev/kvm; skipped");
        return;
    }
    require_image("tiny");
    let dir = tempfile::Builder::new()
        .prefix("kt")
        .tempdir_in("/tmp")
        .unwrap();
    // The built images, so the probe boots the guest kernel: this host's KVM (kvm_pvm) runs a firmware
    // stub but fails every Linux guest, and a stub-only probe let the daemon start (then every VM failed).
    std::os::unix::fs::symlink(
        common::images_dir().canonicalize().unwrap(),
        dir.path().join("images"),
    )
    .unwrap();
    let mut child = Command::new(KILN)
        .arg("--data-dir")
        .arg(dir.path())
        .arg("--socket")
        .arg(dir.path().join("kiln.sock"))
        .args(["serve", "--accel", "kvm", "--network", "user"])
        .env("KILN_WARM_SPARES", "0")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("kiln serve --accel kvm kept running on a host where no VM runs under KVM");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert!(!status.success(), "{err}");
    assert!(
        err.contains("--accel kvm was requested but KVM cannot run VMs here"),
        "{err}"
    );
    // The probe VM reached KVM (it failed there, or stopped with KVM's internal error and never
    // finished): it was not kept out of /dev/kvm.
    assert!(
        err.contains("the probe VM failed") || err.contains("the probe VM did not finish"),
        "{err}"
    );
    assert!(!err.contains("Permission denied"), "{err}");
    assert!(err.contains("--accel tcg"), "{err}");
}

#[test]
fn a_machine_keeps_its_own_accelerator() {
    require_image("tiny");
    let mut d = Daemon::start();
    d.create(&["--name", "hib"]);
    d.create(&["--name", "live"]);
    d.kiln_ok(&["stop", "hib"]);
    // Both machines' records say they run under KVM (as after a daemon that had KVM): the daemon is
    // stopped for the edit, its VMs keep running.
    d.kill_hard();
    let db = d.data_dir().join("kiln.db");
    let out = Command::new("sqlite3")
        .arg(&db)
        .arg("UPDATE sandboxes SET accel='kvm' WHERE name IN ('hib','live');")
        .output()
        .expect("sqlite3");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    d.restart_with_env(&[]);

    // A hibernated KVM machine is never loaded into this TCG daemon's QEMU.
    let out = d.kiln(&["start", "hib"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "start succeeded");
    assert!(err.contains("[snapshot_incompatible]"), "{err}");
    assert!(
        err.contains("accel differs (machine: kvm; this daemon: tcg)"),
        "{err}"
    );
    let (_, v) = d.api("GET", "/v1/sandboxes/hib", None);
    assert_eq!(v["state"], "stopped", "{v}");

    // A snapshot records the machine's accelerator, not the daemon's.
    d.kiln_ok(&["snapshot", "create", "live", "--name", "s"]);
    let (_, m) = read_manifest(&d.data_dir().join("snapshots/s/manifest.json"));
    assert_eq!(m["accel"], "kvm", "{m}");
    let out = d.kiln(&["snapshot", "resume", "s", "--name", "copy"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("accel differs (snapshot: kvm; this host: tcg)"),
        "{err}"
    );
}

#[test]
fn cpu_identity_is_recorded_and_a_host_that_differs_is_refused() {
    require_image("tiny");
    let d = Daemon::start();
    d.create(&["--name", "src"]);
    d.kiln_ok(&["snapshot", "create", "src", "--name", "base"]);
    let path = d.data_dir().join("snapshots/base/manifest.json");
    let (original, m) = read_manifest(&path);
    let id = m["cpu_identity"].clone();
    assert!(id["vendor"].as_str().is_some_and(|v| !v.is_empty()), "{m}");
    assert!(id["phys_bits"].as_u64().is_some_and(|b| b > 0), "{m}");
    // TCG fixes no TSC frequency.
    assert!(id.get("tsc_khz").is_none(), "{id}");

    let other_vendor = if id["vendor"] == "GenuineIntel" {
        "AuthenticAMD"
    } else {
        "GenuineIntel"
    };
    let family = id["family"].as_u64().unwrap() + 1;
    let bits = id["phys_bits"].as_u64().unwrap() + 4;
    let cases: Vec<(&str, Value, String)> = vec![
        (
            "vendor",
            other_vendor.into(),
            format!("cpu_vendor differs (snapshot: {other_vendor}; this host: {})", id["vendor"].as_str().unwrap()),
        ),
        ("family", family.into(), format!("cpu_family differs (snapshot: {family};")),
        ("phys_bits", bits.into(), format!("cpu_phys_bits differs (snapshot: {bits};")),
        (
            "tsc_khz",
            2_100_000.into(),
            "tsc_frequency differs (snapshot: 2100000 kHz; this host: no fixed TSC frequency, no TSC scaling)"
                .to_string(),
        ),
    ];
    for (field, value, needle) in cases {
        let mut edited = m.clone();
        edited["cpu_identity"][field] = value;
        write_manifest(&path, &edited);
        let out = d.kiln(&[
            "snapshot",
            "resume",
            "base",
            "--name",
            &format!("x-{}", field.replace('_', "-")),
        ]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{field}: resumed");
        assert!(err.contains("[snapshot_incompatible]"), "{field}: {err}");
        assert!(err.contains(&needle), "{field}: '{needle}' not in: {err}");
        assert_eq!(d.qemu_pids().len(), 1, "{field}: a QEMU was started");
    }

    // A manifest from before the record (no cpu_identity) still resumes.
    let mut old = m.clone();
    old.as_object_mut().unwrap().remove("cpu_identity");
    write_manifest(&path, &old);
    d.kiln_ok(&["snapshot", "resume", "base", "--name", "old"]);
    d.kiln_ok(&["exec", "old", "--", "true"]);
    std::fs::write(&path, original).unwrap();
}
