//! A table of hostile names, ids and paths sent through the real API: each is refused with a 4xx and a
//! stable code, and nothing appears on the host outside the data directory.

mod common;

use std::collections::BTreeSet;
use std::path::Path;

use common::{require_image, Daemon};
use serde_json::{json, Value};

const HOSTILE: &[&str] = &[
    "../x",
    "..%2Fx",
    "..\\x",
    "/etc/passwd",
    "a\0b",
    ".",
    "..",
    "",
    " ",
    "a/b",
    "UPPER",
    "é",
    "snap\u{202e}gpj",
    "x;rm -rf /",
    "$(id)",
];

/// Every byte percent-encoded, so the id arrives in the path segment exactly as written.
fn enc(s: &str) -> String {
    s.bytes().map(|b| format!("%{b:02X}")).collect()
}

fn long() -> String {
    "x".repeat(300)
}

fn names() -> Vec<String> {
    let mut v: Vec<String> = HOSTILE.iter().map(|s| s.to_string()).collect();
    v.push(long());
    v
}

const CODES: &[&str] = &[
    "invalid_request",
    "sandbox_not_found",
    "snapshot_not_found",
    "image_not_found",
    "volume_not_found",
    "route_not_found",
];

fn refused(d: &Daemon, method: &str, path: &str, body: Option<Value>, want: &[&str]) {
    let (status, v) = d.api(method, path, body.clone());
    let code = v["error"]["code"].as_str().unwrap_or("");
    assert!(
        (400..500).contains(&status) && want.contains(&code),
        "{method} {path} {body:?}: expected 4xx with one of {want:?}, got {status} {v}"
    );
    assert!(CODES.contains(&code), "unexpected code {code}");
    assert!(
        !v["error"]["message"].as_str().unwrap_or("").is_empty(),
        "{method} {path}: empty message"
    );
}

fn entries(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .map(|r| {
            r.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn hostile_names_ids_and_paths_are_refused_and_touch_nothing_on_the_host() {
    require_image("tiny");
    let d = Daemon::start();
    let sb = d.create(&["--name", "h", "--memory", "128"]);
    d.kiln_ok(&["snapshot", "create", "h", "--name", "s", "--type", "disk"]);
    let parent = d.data_dir().parent().unwrap().to_path_buf();
    let before_parent = entries(&parent);
    let before_root = entries(Path::new("/"));
    let before_cwd = entries(&std::env::current_dir().unwrap());
    let invalid = &["invalid_request"][..];

    for n in names() {
        // Names that would become directories, files or VM names.
        refused(
            &d,
            "POST",
            "/v1/sandboxes",
            Some(json!({"name": n})),
            invalid,
        );
        refused(
            &d,
            "POST",
            "/v1/sandboxes",
            Some(json!({"template": n})),
            invalid,
        );
        refused(
            &d,
            "POST",
            "/v1/sandboxes/h/snapshots",
            Some(json!({"name": n, "type": "disk"})),
            invalid,
        );
        refused(
            &d,
            "POST",
            "/v1/snapshots/s/resume",
            Some(json!({"name": n})),
            invalid,
        );
        refused(
            &d,
            "POST",
            "/v1/sandboxes/h/fork",
            Some(json!({"name": n})),
            invalid,
        );
        refused(
            &d,
            "POST",
            "/v1/volumes",
            Some(json!({"name": n, "size_mib": 16})),
            invalid,
        );
        refused(
            &d,
            "POST",
            "/v1/sandboxes",
            Some(json!({"volumes": [{"volume": n, "path": "/data"}]})),
            invalid,
        );
        refused(
            &d,
            "POST",
            "/v1/sandboxes",
            Some(json!({"volumes": [{"volume": "v", "path": format!("/{n}/../../etc")}]})),
            &["invalid_request", "volume_not_found"],
        );
        // Ids in the path are looked up, never used as file names.
        let id = enc(&n);
        let vol_missing = &["volume_not_found", "route_not_found", "invalid_request"][..];
        refused(&d, "GET", &format!("/v1/volumes/{id}"), None, vol_missing);
        refused(
            &d,
            "DELETE",
            &format!("/v1/volumes/{id}"),
            None,
            vol_missing,
        );
        let sb_missing = &["sandbox_not_found", "route_not_found", "invalid_request"][..];
        let snap_missing = &["snapshot_not_found", "route_not_found", "invalid_request"][..];
        refused(&d, "GET", &format!("/v1/sandboxes/{id}"), None, sb_missing);
        refused(
            &d,
            "DELETE",
            &format!("/v1/sandboxes/{id}"),
            None,
            sb_missing,
        );
        refused(
            &d,
            "GET",
            &format!("/v1/sandboxes/{id}/logs"),
            None,
            sb_missing,
        );
        refused(
            &d,
            "POST",
            &format!("/v1/sandboxes/{id}/stop"),
            None,
            sb_missing,
        );
        refused(
            &d,
            "GET",
            &format!("/v1/snapshots/{id}"),
            None,
            snap_missing,
        );
        refused(
            &d,
            "DELETE",
            &format!("/v1/snapshots/{id}"),
            None,
            snap_missing,
        );
        refused(
            &d,
            "POST",
            &format!("/v1/snapshots/{id}/restore"),
            None,
            snap_missing,
        );
        refused(
            &d,
            "POST",
            &format!("/v1/sandboxes/{id}/files/mkdir"),
            Some(json!({"path": "/x"})),
            sb_missing,
        );
    }

    // Image names go through the local CLI (`kiln image`), which validates them before touching images/.
    let images_before = entries(&d.data_dir().join("images"));
    for n in names().iter().filter(|n| !n.contains('\0')) {
        let out = d.kiln(&["image", "rm", "-y", n]);
        assert!(!out.status.success(), "image rm {n:?} succeeded");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("invalid") || err.contains("name"),
            "image rm {n:?}: {err}"
        );
    }
    assert_eq!(entries(&d.data_dir().join("images")), images_before);

    // Guest paths: relative, empty, NUL, overlong. (Absolute paths, `..` included, are the guest's own
    // business: the agent resolves them inside the VM.)
    let too_long = format!("/{}", "a".repeat(5000));
    for p in [
        "../../etc/passwd",
        "etc/passwd",
        "",
        "/a\0b",
        ".",
        "..",
        too_long.as_str(),
    ] {
        let q = enc(p);
        refused(
            &d,
            "GET",
            &format!("/v1/sandboxes/h/files?path={q}"),
            None,
            invalid,
        );
        refused(
            &d,
            "PUT",
            &format!("/v1/sandboxes/h/files?path={q}"),
            None,
            invalid,
        );
        refused(
            &d,
            "DELETE",
            &format!("/v1/sandboxes/h/files?path={q}"),
            None,
            invalid,
        );
        refused(
            &d,
            "GET",
            &format!("/v1/sandboxes/h/files/stat?path={q}"),
            None,
            invalid,
        );
        refused(
            &d,
            "GET",
            &format!("/v1/sandboxes/h/files/list?path={q}"),
            None,
            invalid,
        );
        refused(
            &d,
            "POST",
            "/v1/sandboxes/h/files/mkdir",
            Some(json!({"path": p})),
            invalid,
        );
        refused(
            &d,
            "POST",
            "/v1/sandboxes/h/exec",
            Some(json!({"argv": ["true"], "cwd": p})),
            invalid,
        );
    }
    for body in [
        json!({"labels": {"a\0b": "v"}}),
        json!({"labels": {"k": "v\0"}}),
        json!({"labels": {long(): "v"}}),
        json!({"env": {"../x": "v"}}),
        json!({"env": {"A": "v\0"}}),
        json!({"name": "ok", "ports": [{"host": 0, "guest": 22}]}),
        json!({"memory_mib": u64::MAX}),
    ] {
        refused(&d, "POST", "/v1/sandboxes", Some(body), invalid);
    }
    for mode in ["999", "-1", "0o77777", "rwx", "%00"] {
        refused(
            &d,
            "PUT",
            &format!("/v1/sandboxes/h/files?path=/root/m&mode={mode}"),
            None,
            invalid,
        );
    }
    refused(&d, "GET", "/v1/sandboxes/h/files", None, invalid);

    // Writing through `..` lands in the guest, not on the host.
    let marker = format!("kiln-hostile-{}", std::process::id());
    for p in [
        format!("/tmp/{marker}"),
        format!("/../../../../tmp/{marker}-2"),
    ] {
        let (status, body) = d.http(
            "PUT",
            &format!("/v1/sandboxes/h/files?path={}", enc(&p)),
            Some(b"guest only"),
            "application/octet-stream",
        );
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    }
    assert!(!Path::new(&format!("/tmp/{marker}")).exists());
    assert!(!Path::new(&format!("/tmp/{marker}-2")).exists());

    // Nothing named after the hostile input appeared next to the data dir, at / or in the working directory
    // (other programs may create unrelated files there meanwhile); inside it, only what the sandbox and
    // snapshot made.
    let suspects: BTreeSet<String> = names()
        .iter()
        .flat_map(|n| [n.clone(), n.rsplit('/').next().unwrap_or("").to_string()])
        .chain(["x".to_string(), "passwd".to_string(), "m".to_string()])
        .filter(|n| !n.is_empty() && n != "." && n != "..")
        .collect();
    for (dir, before) in [
        (parent.clone(), &before_parent),
        (Path::new("/").to_path_buf(), &before_root),
        (std::env::current_dir().unwrap(), &before_cwd),
    ] {
        let new: Vec<String> = entries(&dir).difference(before).cloned().collect();
        assert!(
            new.iter().all(|e| !suspects.contains(e)),
            "hostile input created {new:?} in {}",
            dir.display()
        );
    }
    assert_eq!(
        entries(&d.data_dir().join("sandboxes")),
        BTreeSet::from([sb["id"].as_str().unwrap().to_string()])
    );
    assert_eq!(
        common::world::snapshot_dirs(&d),
        BTreeSet::from(["s".to_string()])
    );
    let list: Value = serde_json::from_str(&d.kiln_ok(&["--json", "sandbox", "list"])).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");
}

/// Found by `make fuzz`: a second save of a sandbox that a snapshot left paused made QEMU refuse the
/// migration, reported as 500 vm_failed. Now it is a 409 that says to resume first, and nothing breaks.
/// A booted sandbox (`--boot`) is saved through QEMU's migration stream, which leaves QEMU `postmigrate`.
#[test]
fn a_sandbox_left_paused_by_a_snapshot_refuses_another_save_with_409() {
    require_image("tiny");
    let d = Daemon::start();
    d.create(&["--name", "lp", "--memory", "128", "--boot"]);
    d.kiln_ok(&[
        "snapshot",
        "create",
        "lp",
        "--name",
        "first",
        "--leave-paused",
    ]);
    for (method, path, body) in [
        (
            "POST",
            "/v1/sandboxes/lp/snapshots",
            Some(json!({"name": "second"})),
        ),
        ("POST", "/v1/sandboxes/lp/stop", None),
        ("POST", "/v1/sandboxes/lp/fork", None),
    ] {
        let (status, v) = d.api(method, path, body);
        assert_eq!(status, 409, "{method} {path}: {v}");
        assert_eq!(v["error"]["code"], "sandbox_not_running", "{v}");
        assert!(
            v["error"]["message"]
                .as_str()
                .unwrap()
                .contains("kiln resume lp"),
            "{v}"
        );
    }
    d.kiln_ok(&["resume", "lp"]);
    d.kiln_ok(&["snapshot", "create", "lp", "--name", "second"]);
    let out = d.kiln_ok(&["exec", "lp", "--", "echo", "alive"]);
    assert_eq!(out.trim(), "alive");
    assert_eq!(
        common::world::snapshot_dirs(&d),
        BTreeSet::from(["first".to_string(), "second".to_string()])
    );
}

/// A resumed sandbox (here: from its template snapshot) is saved as device state beside a memory delta,
/// which leaves QEMU plainly paused with its disks in use: a second save of the same paused moment
/// succeeds, as do a stop and a start, and both snapshots come back with the guest's files.
#[test]
fn a_resumed_sandbox_left_paused_by_a_snapshot_can_be_saved_again() {
    require_image("tiny");
    let d = Daemon::start();
    let sb = d.create(&["--name", "lp", "--memory", "128"]);
    assert_eq!(sb["boot"]["mode"], "resume", "{sb}");
    d.kiln_ok(&[
        "exec",
        "lp",
        "--",
        "sh",
        "-c",
        "echo kept > /root/mark && sync",
    ]);
    d.kiln_ok(&[
        "snapshot",
        "create",
        "lp",
        "--name",
        "first",
        "--leave-paused",
    ]);
    let (status, v) = d.api(
        "POST",
        "/v1/sandboxes/lp/snapshots",
        Some(json!({"name": "second"})),
    );
    assert_eq!(status, 201, "{v}");
    d.kiln_ok(&["stop", "lp"]);
    d.kiln_ok(&["start", "lp"]);
    assert_eq!(
        d.kiln_ok(&["exec", "lp", "--", "cat", "/root/mark"]).trim(),
        "kept"
    );
    for snap in ["first", "second"] {
        let name = format!("from-{snap}");
        d.kiln_ok(&["snapshot", "resume", snap, "--name", &name]);
        let out = d.kiln_ok(&["exec", &name, "--", "cat", "/root/mark"]);
        assert_eq!(out.trim(), "kept", "{snap}");
    }
}
