//! A hostile snapshot directory, played for real: a real snapshot of a `tiny` sandbox whose manifest is
//! edited (checksum line recomputed the way kiln writes it, as anyone with write access could) to name a
//! file outside the snapshot and to inject QEMU options through a disk's `format`. Resume is refused with
//! 422 `snapshot_corrupt` naming the field, no QEMU starts and nothing outside the snapshot is touched; the
//! same directory planted unrecorded in `snapshots/` is quarantined at start-up, not registered.

mod common;

use std::path::Path;

use common::{read_manifest, require_image, write_manifest, Daemon};
use serde_json::{json, Value};

/// Names, sizes and mtimes of everything under `dir` (not following symlinks).
fn tree(dir: &Path) -> Vec<(String, u64, std::time::SystemTime)> {
    let mut out = Vec::new();
    for e in walk(dir) {
        let m = std::fs::symlink_metadata(&e).expect("stat");
        out.push((
            e.display().to_string(),
            m.len(),
            m.modified().expect("mtime"),
        ));
    }
    out.sort();
    out
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            out.extend(walk(&p));
        }
        out.push(p);
    }
    out
}

fn file_index(m: &Value, role: &str) -> usize {
    m["files"]
        .as_array()
        .expect("files")
        .iter()
        .position(|f| f["role"] == role && f["external"] != true)
        .unwrap_or_else(|| panic!("no own {role} file in {m}"))
}

#[test]
fn hostile_manifests_are_refused_naming_the_field_and_touch_nothing() {
    require_image("tiny");
    let mut d = Daemon::start();
    d.create(&["--name", "src"]);
    d.kiln_ok(&["snapshot", "create", "src", "--name", "base"]);
    let dir = d.data_dir().join("snapshots/base");
    let path = dir.join("manifest.json");
    let (original, m) = read_manifest(&path);

    // A victim outside the snapshot: a copy of the device state, so on a kiln that follows the path
    // everything checks out and the attack would work.
    let victim_dir = tempfile::tempdir().expect("tempdir");
    let victim = victim_dir.path().join("state-copy");
    std::fs::copy(dir.join("state"), &victim).expect("copy state");
    let state = file_index(&m, "state");
    let disk = file_index(&m, "disk");

    let mut absolute = m.clone();
    absolute["files"][state]["path"] = victim.display().to_string().into();
    let mut injected = m.clone();
    let fmt = format!("qcow2,file.driver=file,file.filename={}", victim.display());
    injected["files"][disk]["format"] = fmt.into();
    let mut dotdot = m.clone();
    dotdot["files"][state]["path"] = "../base/state".into();

    let qemus = d.qemu_pids().len();
    let before_victim = tree(victim_dir.path());
    let before_sandboxes = tree(&d.data_dir().join("sandboxes"));
    for (field, edited) in [
        (format!("files[{state}].path"), &absolute),
        (format!("files[{disk}].format"), &injected),
        (format!("files[{state}].path"), &dotdot),
    ] {
        write_manifest(&path, edited);
        let (status, v) = d.api(
            "POST",
            "/v1/snapshots/base/resume",
            Some(json!({"name": "x"})),
        );
        assert_eq!(
            (status, v["error"]["code"].as_str()),
            (422, Some("snapshot_corrupt")),
            "{field}: {v}"
        );
        let msg = v["error"]["message"].as_str().unwrap_or_default();
        assert!(
            msg.contains(&format!("`{field}`")),
            "{field} not named: {msg}"
        );
        assert_eq!(d.qemu_pids().len(), qemus, "{field}: a QEMU was started");
        assert_eq!(
            tree(victim_dir.path()),
            before_victim,
            "{field}: victim touched"
        );
        assert_eq!(
            tree(&d.data_dir().join("sandboxes")),
            before_sandboxes,
            "{field}: a sandbox directory was made"
        );
    }

    // Planted unrecorded with a hostile manifest: quarantined at start-up, never registered.
    let planted = d.data_dir().join("snapshots/planted");
    std::fs::create_dir(&planted).expect("mkdir planted");
    for e in std::fs::read_dir(&dir)
        .expect("read snapshot dir")
        .flatten()
    {
        std::fs::copy(e.path(), planted.join(e.file_name())).expect("copy");
    }
    let mut hostile = absolute.clone();
    hostile["id"] = "planted".into();
    write_manifest(&planted.join("manifest.json"), &hostile);
    std::fs::write(&path, &original).expect("put back");
    d.restart_hard();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while planted.exists() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let (status, v) = d.api("GET", "/v1/snapshots/planted", None);
    assert_eq!(
        status, 404,
        "a hostile planted snapshot was registered: {v}"
    );
    assert!(!planted.exists(), "left in snapshots/");
    assert!(
        walk(&d.data_dir().join("lost+found"))
            .iter()
            .any(|p| p.file_name().is_some_and(|n| n == "manifest.json")),
        "not quarantined"
    );
    assert_eq!(tree(victim_dir.path()), before_victim, "victim touched");

    // The untouched snapshot still resumes.
    d.kiln_ok(&["snapshot", "resume", "base", "--name", "ok"]);
    d.kiln_ok(&["exec", "ok", "--", "true"]);
}
