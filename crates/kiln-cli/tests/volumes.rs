//! Volumes on real VMs: durable data across sandboxes, hibernation keeps them, snapshots and forks do not
//! carry them, read-only sharing, and the errors around them.

mod common;

use common::{require_image, Daemon};
use serde_json::{json, Value};

fn run(d: &Daemon, sb: &str, cmd: &str) -> String {
    d.kiln_ok(&["exec", sb, "--", "sh", "-c", cmd])
}

fn mounted(d: &Daemon, sb: &str, path: &str) -> bool {
    let mounts = run(d, sb, "cat /proc/mounts");
    mounts.lines().any(|l| l.split(' ').nth(1) == Some(path))
}

#[test]
fn volume_api_refuses_bad_input_with_stable_codes() {
    let d = Daemon::start();
    let (s, v) = d.api(
        "POST",
        "/v1/volumes",
        Some(json!({"name": "data", "size_mib": 64})),
    );
    assert_eq!(s, 201, "{v}");
    assert_eq!(v["size_bytes"], 64 << 20);
    let (s, v) = d.api(
        "POST",
        "/v1/volumes",
        Some(json!({"name": "data", "size_mib": 64})),
    );
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (409, Some("volume_already_exists"))
    );
    for bad in ["../x", "Data", "a/b", ""] {
        let (s, v) = d.api("POST", "/v1/volumes", Some(json!({"name": bad})));
        assert_eq!(
            (s, v["error"]["code"].as_str()),
            (400, Some("invalid_request")),
            "{bad}"
        );
    }
    let (s, v) = d.api(
        "POST",
        "/v1/volumes",
        Some(json!({"name": "tiny", "size_mib": 1})),
    );
    assert_eq!(s, 400, "{v}");
    let (s, v) = d.api("GET", "/v1/volumes/nope", None);
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (404, Some("volume_not_found"))
    );
    let (s, v) = d.api(
        "POST",
        "/v1/sandboxes",
        Some(json!({"volumes": [{"volume": "nope", "path": "/data"}]})),
    );
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (404, Some("volume_not_found"))
    );
    for path in ["data", "/", "/proc/x", "/a/../b"] {
        let (s, v) = d.api(
            "POST",
            "/v1/sandboxes",
            Some(json!({"volumes": [{"volume": "data", "path": path}]})),
        );
        assert_eq!(s, 400, "{path}: {v}");
    }
    // Nothing half-made: no sandbox rows, the volume is still free.
    let (_, list) = d.api("GET", "/v1/sandboxes", None);
    assert_eq!(list.as_array().unwrap().len(), 0);
    let out = d.kiln_ok(&["volume", "list"]);
    assert!(out.contains("data") && out.contains("64.0 MiB"), "{out}");
    d.kiln_ok(&["volume", "delete", "-y", "data"]);
    assert!(!d.dir.path().join("volumes/data").exists());
}

#[test]
fn volumes_keep_data_across_sandboxes_and_hibernation_but_not_in_snapshots() {
    require_image("tiny");
    let d = Daemon::start();
    d.kiln_ok(&["volume", "create", "data", "--size", "128M"]);
    d.kiln_ok(&["volume", "create", "other", "--size", "64M"]);
    let sb = d.create(&["--name", "one", "--volume", "data:/data"]);
    assert_eq!(sb["volumes"][0]["volume"], "data");
    assert!(mounted(&d, "one", "/data"));
    run(&d, "one", "echo kept > /data/f; sync");

    // Attached read-write: exclusive, and not deletable.
    let (s, v) = d.api(
        "POST",
        "/v1/sandboxes",
        Some(json!({"name": "two", "volumes": [{"volume": "data", "path": "/data", "read_only": true}]})),
    );
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (409, Some("volume_in_use")),
        "{v}"
    );
    assert!(v["error"]["message"].as_str().unwrap().contains("one"));
    let (s, v) = d.api("DELETE", "/v1/volumes/data", None);
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (409, Some("volume_in_use"))
    );

    // Hibernation keeps the volume attached and mounted.
    d.kiln_ok(&["stop", "one"]);
    d.kiln_ok(&["start", "one"]);
    assert_eq!(run(&d, "one", "cat /data/f"), "kept\n");
    run(&d, "one", "echo more >> /data/f");

    // A memory snapshot does not hold the volume: a resumed copy has no /data mount, and the stale
    // mount of its source is gone.
    d.kiln_ok(&["snapshot", "create", "one", "--name", "s1"]);
    d.kiln_ok(&["snapshot", "resume", "s1", "--name", "copy"]);
    assert!(
        !mounted(&d, "copy", "/data"),
        "copy still has the volume mounted"
    );
    assert!(!d
        .kiln(&["exec", "copy", "--", "cat", "/data/f"])
        .status
        .success());
    // ... unless it is given one again, here another volume in the same place.
    d.kiln_ok(&[
        "snapshot",
        "resume",
        "s1",
        "--name",
        "copy2",
        "--volume",
        "other:/data",
    ]);
    assert!(mounted(&d, "copy2", "/data"));
    run(&d, "copy2", "echo two > /data/g");
    assert!(!d
        .kiln(&["exec", "copy2", "--", "cat", "/data/f"])
        .status
        .success());
    // Forks do not carry volumes either.
    let forked: Value =
        serde_json::from_str(&d.kiln_ok(&["--json", "fork", "one", "--name", "kid"])).unwrap();
    assert_eq!(forked["sandboxes"][0]["volumes"], json!([]));
    assert!(!mounted(&d, "kid-1", "/data"));
    // The source never noticed.
    assert_eq!(run(&d, "one", "cat /data/f"), "kept\nmore\n");

    // The data outlives its sandbox: attach it to a new one, then to a copy restored from the snapshot.
    d.kiln_ok(&["sandbox", "delete", "-y", "one"]);
    d.create(&["--name", "three", "--volume", "data:/mnt/d:ro"]);
    assert_eq!(run(&d, "three", "cat /mnt/d/f"), "kept\nmore\n");
    assert!(!d
        .kiln(&["exec", "three", "--", "sh", "-c", "echo x > /mnt/d/x"])
        .status
        .success());
    // Read-only attachments can be shared.
    d.kiln_ok(&[
        "snapshot",
        "resume",
        "s1",
        "--name",
        "copy3",
        "--volume",
        "data:/data:ro",
    ]);
    assert_eq!(run(&d, "copy3", "cat /data/f"), "kept\nmore\n");
    let vol: Value = serde_json::from_str(&d.kiln_ok(&["--json", "volume", "list"])).unwrap();
    let data = vol
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "data")
        .unwrap();
    assert_eq!(data["attachments"].as_array().unwrap().len(), 2, "{data}");
    for sb in ["three", "copy3"] {
        d.kiln_ok(&["sandbox", "delete", "-y", sb]);
    }
    d.kiln_ok(&["volume", "delete", "-y", "data"]);
}

#[test]
fn rollback_keeps_the_sandboxs_volumes_mounted_with_their_current_data() {
    require_image("tiny");
    let d = Daemon::start();
    d.kiln_ok(&["volume", "create", "data", "--size", "64M"]);
    d.create(&["--name", "rb", "--volume", "data:/data"]);
    run(&d, "rb", "echo before > /root/state; echo v1 > /data/v");
    d.kiln_ok(&["snapshot", "create", "rb", "--name", "cp"]);
    run(&d, "rb", "echo after > /root/state; echo v2 > /data/v");
    d.kiln_ok(&["snapshot", "restore", "cp", "--resume"]);
    assert_eq!(run(&d, "rb", "cat /root/state"), "before\n");
    // The volume is not part of the snapshot: it is mounted again with what it holds now.
    assert!(mounted(&d, "rb", "/data"));
    assert_eq!(run(&d, "rb", "cat /data/v"), "v2\n");
    run(&d, "rb", "echo v3 > /data/v");
    // And it stays usable across a later hibernation.
    d.kiln_ok(&["stop", "rb"]);
    d.kiln_ok(&["start", "rb"]);
    assert_eq!(run(&d, "rb", "cat /data/v"), "v3\n");
}

/// A read-write volume belongs to its VM's uid while attached; once its sandbox is deleted it is root's
/// again (uids are recycled: the next VM given that number must not open it), and keeps its data.
#[test]
fn a_detached_read_write_volume_is_given_back_to_root() {
    use std::os::unix::fs::MetadataExt;
    require_image("tiny");
    let d = Daemon::start();
    if !d.log().contains("per-sandbox unprivileged uids") {
        eprintln!("skipping: this daemon does not run VMs as per-sandbox uids");
        return;
    }
    d.kiln_ok(&["volume", "create", "data", "--size", "64M"]);
    let sb = d.create(&["--name", "one", "--volume", "data:/data"]);
    let uid = sb["qemu_uid"].as_u64().expect("qemu_uid") as u32;
    run(&d, "one", "echo kept > /data/f; sync");
    let file = d.dir.path().join("volumes/data/volume.img");
    let owner = || {
        let m = std::fs::symlink_metadata(&file).unwrap();
        (m.uid(), m.gid(), m.mode() & 0o777)
    };
    assert_eq!(owner(), (uid, uid, 0o600), "attached: its VM's");
    d.kiln_ok(&["sandbox", "delete", "-y", "one"]);
    assert_eq!(owner(), (0, 0, 0o600), "detached: root's again");
    let two = d.create(&["--name", "two", "--volume", "data:/data"]);
    let uid2 = two["qemu_uid"].as_u64().expect("qemu_uid") as u32;
    assert_eq!(owner(), (uid2, uid2, 0o600));
    assert_eq!(run(&d, "two", "cat /data/f"), "kept\n");
    d.kiln_ok(&["sandbox", "delete", "-y", "two"]);
    assert_eq!(owner(), (0, 0, 0o600));
}

/// `kiln serve --max-storage`: once sandboxes, snapshots and volumes use the quota (allocated blocks),
/// new volumes and sandboxes are refused with 507 naming the numbers and the flag; nothing is made.
#[test]
fn the_storage_quota_refuses_new_volumes_and_sandboxes_with_507() {
    let d = Daemon::start_with(&["--max-storage", "4K"]);
    let (s, v) = d.api(
        "POST",
        "/v1/volumes",
        Some(json!({"name": "first", "size_mib": 64})),
    );
    assert_eq!(s, 201, "under the quota: {v}");
    assert!(v["allocated_bytes"].as_u64().unwrap() >= 4096, "{v}");
    let (s, v) = d.api(
        "POST",
        "/v1/volumes",
        Some(json!({"name": "second", "size_mib": 64})),
    );
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (507, Some("insufficient_storage")),
        "{v}"
    );
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("--max-storage") && msg.contains("4096 bytes"),
        "{msg}"
    );
    assert!(!d.dir.path().join("volumes/second").exists());
    let (s, v) = d.api("POST", "/v1/sandboxes", Some(json!({})));
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (507, Some("insufficient_storage")),
        "{v}"
    );
    let (_, list) = d.api("GET", "/v1/sandboxes", None);
    assert_eq!(list.as_array().unwrap().len(), 0);
    // Deleting frees the quota.
    d.kiln_ok(&["volume", "delete", "-y", "first"]);
    let (s, v) = d.api(
        "POST",
        "/v1/volumes",
        Some(json!({"name": "second", "size_mib": 64})),
    );
    assert_eq!(s, 201, "{v}");
}
