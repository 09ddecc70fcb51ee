//! The compatibility contract on a real snapshot: its manifest records what the saved state depends on,
//! and a manifest edited to say another QEMU, CPU or machine (checksum line recomputed the way kiln
//! writes it) is refused before any QEMU starts, naming the field and both values. A newer format and a
//! damaged state file are told apart from an incompatibility.

mod common;

use common::{read_manifest, require_image, write_manifest, Daemon};
use serde_json::Value;

fn resume_err(d: &Daemon, name: &str) -> String {
    let out = d.kiln(&["snapshot", "resume", "base", "--name", name]);
    assert!(!out.status.success(), "resume {name} succeeded");
    assert!(d.qemu_pids().len() == 1, "a QEMU was started for {name}");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn edited_manifests_are_refused_naming_the_field() {
    require_image("tiny");
    let d = Daemon::start();
    d.create(&["--name", "src"]);
    d.kiln_ok(&["snapshot", "create", "src", "--name", "base"]);
    let dir = d.data_dir().join("snapshots/base");
    let path = dir.join("manifest.json");
    let (original, m) = read_manifest(&path);

    // What the state depends on is recorded.
    assert!(
        m["qemu_version"]
            .as_str()
            .unwrap()
            .contains("QEMU emulator version"),
        "{m}"
    );
    assert!(
        m["machine_options"]
            .as_str()
            .unwrap()
            .starts_with("microvm,"),
        "{m}"
    );
    assert_eq!(m["cpu_model"], "max");
    let features = m["cpu_features"].as_array().expect("cpu_features");
    assert!(features.iter().any(|f| f == "sse2"), "{features:?}");

    let host_qemu = m["qemu_version"].as_str().unwrap().to_string();
    let qemu_needles = ["qemu_version differs", "9.2.0", host_qemu.as_str()];
    let cases: Vec<(&str, Value, &[&str])> =
        vec![
        (
            "qemu_version",
            "QEMU emulator version 9.2.0 (Debian 1:9.2.0)".into(),
            &qemu_needles,
        ),
        ("cpu_model", "host".into(), &["cpu_model differs (snapshot: host; this host: max)"]),
        ("machine", "q35".into(), &["machine differs (snapshot: q35; this host: microvm)"]),
        (
            "machine_options",
            "microvm,acpi=off".into(),
            &["machine_options differs (snapshot: microvm,acpi=off; this host: microvm,acpi=on"],
        ),
        (
            "cpu_features",
            {
                let mut f = features.clone();
                f.push("made-up-flag".into());
                Value::Array(f)
            },
            &["cpu_features differs", "made-up-flag", "1 of them missing"],
        ),
    ];
    for (field, value, needles) in cases {
        let mut edited = m.clone();
        edited[field] = value;
        write_manifest(&path, &edited);
        let err = resume_err(&d, &format!("x-{}", field.replace('_', "-")));
        assert!(err.contains("[snapshot_incompatible]"), "{field}: {err}");
        for n in needles {
            assert!(err.contains(n), "{field}: '{n}' not in: {err}");
        }
    }

    // A newer format: recognised before the rest is read.
    let mut newer = m.clone();
    newer["format_version"] = 99.into();
    newer["files"] = "another shape".into();
    write_manifest(&path, &newer);
    let err = resume_err(&d, "x-newer");
    assert!(
        err.contains("[snapshot_incompatible]") && err.contains("upgrade kiln"),
        "{err}"
    );

    // A damaged device state (same size): corrupt, not incompatible, and no QEMU is asked.
    std::fs::write(&path, &original).unwrap();
    let state = dir.join("state");
    let good = std::fs::read(&state).expect("state");
    let mut bad = good.clone();
    let mid = bad.len() / 2;
    bad[mid] ^= 0xff;
    std::fs::write(&state, &bad).unwrap();
    let err = resume_err(&d, "x-torn");
    assert!(
        err.contains("[snapshot_corrupt]") && err.contains("device state"),
        "{err}"
    );

    // Put back, it resumes.
    std::fs::write(&state, &good).unwrap();
    d.kiln_ok(&["snapshot", "resume", "base", "--name", "ok"]);
    d.kiln_ok(&["exec", "ok", "--", "true"]);
}
