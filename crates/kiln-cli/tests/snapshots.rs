//! Snapshots on real VMs: capture, resume, diverging copies, roll back, hibernate, disk snapshots, diff
//! bases, corruption, and crashes in the middle.

mod common;

use std::time::Duration;

use common::{require_image, Daemon};
use serde_json::{json, Value};

fn counter(d: &Daemon, sb: &str) -> u64 {
    d.kiln_ok(&["exec", sb, "--", "cat", "/tmp/n"])
        .trim()
        .parse()
        .expect("counter value")
}

/// A background counter (every 0.1 s) and a tmpfs marker in the guest.
fn start_counter(d: &Daemon, sb: &str) {
    d.kiln_ok(&["exec", sb, "--", "sh", "-c", "echo marker > /tmp/marker; (i=0; while true; do i=$((i+1)); echo $i > /tmp/n.new; mv /tmp/n.new /tmp/n; sleep 0.1; done) >/dev/null 2>&1 &"]);
    std::thread::sleep(Duration::from_millis(800));
}

fn json_of(d: &Daemon, args: &[&str]) -> Value {
    let mut a = vec!["--json"];
    a.extend_from_slice(args);
    serde_json::from_str(&d.kiln_ok(&a)).expect("JSON output")
}

#[test]
fn resumed_copies_continue_and_diverge() {
    require_image("tiny");
    let d = Daemon::start();
    d.create(&["--name", "src"]);
    start_counter(&d, "src");
    let before = counter(&d, "src");
    let snap = json_of(
        &d,
        &[
            "snapshot",
            "create",
            "src",
            "--name",
            "cp",
            "--label",
            "stage=ready",
        ],
    );
    assert_eq!(snap["type"], "full");
    assert_eq!(snap["sandbox_name"], "src");
    let at_snapshot = counter(&d, "src");

    // The source kept running.
    std::thread::sleep(Duration::from_millis(500));
    assert!(counter(&d, "src") > at_snapshot);

    // Two copies, resumed concurrently: no boot, the counter goes on from the snapshot point.
    let handles: Vec<_> = ["a", "b"]
        .iter()
        .map(|name| {
            let sock = d.socket.clone();
            let body = json!({"name": name}).to_string();
            std::thread::spawn(move || {
                common::http_unix(
                    &sock,
                    "POST",
                    "/v1/snapshots/cp/resume",
                    Some(body.as_bytes()),
                    "application/json",
                )
            })
        })
        .collect();
    for h in handles {
        let (status, body) = h.join().unwrap();
        assert_eq!(status, 201, "{}", String::from_utf8_lossy(&body));
    }
    for copy in ["a", "b"] {
        let c = counter(&d, copy);
        // It went on from the snapshot point: not from zero (a reboot). Each copy has counted for at most a
        // few seconds since it was resumed.
        assert!(
            c >= before && c <= at_snapshot + 60,
            "{copy}: counter {c}, source had {before} before and {at_snapshot} after"
        );
        assert_eq!(
            d.kiln_ok(&["exec", copy, "--", "cat", "/tmp/marker"]),
            "marker\n"
        );
        assert_eq!(
            d.kiln_ok(&["exec", copy, "--", "hostname"]),
            format!("{copy}\n")
        );
        let before = counter(&d, copy);
        std::thread::sleep(Duration::from_millis(600));
        assert!(counter(&d, copy) > before, "{copy}'s counter stopped");
    }
    // The guest clock was set from the host's on resume.
    let guest_time: i64 = d
        .kiln_ok(&["exec", "a", "--", "date", "+%s"])
        .trim()
        .parse()
        .unwrap();
    let host_time = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!(
        (guest_time - host_time).abs() <= 2,
        "guest clock {guest_time} vs host {host_time}"
    );

    // Writes stay private to each copy.
    d.kiln_ok(&[
        "exec",
        "a",
        "--",
        "sh",
        "-c",
        "echo from-a > /root/f; echo tmp-a > /tmp/marker",
    ]);
    d.kiln_ok(&["exec", "b", "--", "sh", "-c", "echo from-b > /root/f"]);
    assert_eq!(
        d.kiln_ok(&["exec", "a", "--", "cat", "/root/f"]),
        "from-a\n"
    );
    assert_eq!(
        d.kiln_ok(&["exec", "b", "--", "cat", "/root/f", "/tmp/marker"]),
        "from-b\nmarker\n"
    );
    assert!(
        !d.kiln(&["exec", "src", "--", "cat", "/root/f"])
            .status
            .success(),
        "a copy's write leaked into the source"
    );
    // A third copy sees the snapshot, not the copies' writes.
    d.kiln_ok(&["snapshot", "resume", "cp", "--name", "c"]);
    assert!(!d
        .kiln(&["exec", "c", "--", "cat", "/root/f"])
        .status
        .success());

    // Listing and filtering; the same via sandbox create --snapshot.
    let list = json_of(&d, &["snapshot", "list", "--sandbox", "src"]);
    assert_eq!(list.as_array().unwrap().len(), 1);
    assert_eq!(
        json_of(&d, &["snapshot", "list", "--label", "stage=none"])
            .as_array()
            .unwrap()
            .len(),
        0
    );
    let e = d.create(&["--snapshot", "cp", "--name", "e"]);
    assert_eq!(e["origin"], "snapshot:cp");

    // Memory snapshots refuse memory they cannot have instead of ignoring it (tests/resources.rs):
    // more than the default headroom (twice the source's 256 MiB).
    let (status, v) = d.api(
        "POST",
        "/v1/snapshots/cp/resume",
        Some(json!({"memory_mib": 1024})),
    );
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (409, Some("resource_override_refused")),
        "{v}"
    );
    assert!(v["error"]["message"].as_str().unwrap().contains("256 MiB"));

    // Deleting the snapshot keeps the files its copies run on, and says so.
    let deleted = json_of(&d, &["snapshot", "delete", "-y", "cp"]);
    let kept: Vec<&str> = deleted["files_kept_for"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(kept.contains(&"a") && kept.contains(&"b"), "{deleted}");
    assert!(counter(&d, "a") > 0);
    d.kiln_ok(&["stop", "a"]);
    d.kiln_ok(&["start", "a"]);
    assert_eq!(
        d.kiln_ok(&["exec", "a", "--", "cat", "/root/f"]),
        "from-a\n"
    );
    let (status, v) = d.api("GET", "/v1/snapshots/cp", None);
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (404, Some("snapshot_not_found"))
    );
}

#[test]
fn snapshot_ids_are_validated() {
    require_image("tiny");
    let d = Daemon::start();
    d.create(&["--name", "v"]);
    let (status, v) = d.api(
        "POST",
        "/v1/sandboxes/v/snapshots",
        Some(json!({"name": "Bad/Name"})),
    );
    assert_eq!(status, 400, "{v}");
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("lowercase"));
    let (status, v) = d.api(
        "POST",
        "/v1/sandboxes/v/snapshots",
        Some(json!({"type": "weird"})),
    );
    assert_eq!(status, 400, "{v}");
    let (status, auto) = d.api("POST", "/v1/sandboxes/v/snapshots", None);
    assert_eq!(status, 201, "{auto}");
    assert!(
        auto["id"].as_str().unwrap().starts_with("snap-v-"),
        "{auto}"
    );
    let (status, v) = d.api(
        "POST",
        "/v1/sandboxes/v/snapshots",
        Some(json!({"name": auto["id"]})),
    );
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (409, Some("snapshot_already_exists"))
    );
    let (status, v) = d.api("POST", "/v1/snapshots/nope/resume", None);
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (404, Some("snapshot_not_found"))
    );
    let (status, _) = d.api("POST", "/v1/sandboxes/ghost/snapshots", None);
    assert_eq!(status, 404);
    // --leave-paused leaves the source paused until resumed.
    let snap = json_of(&d, &["snapshot", "create", "v", "--leave-paused"]);
    assert_eq!(
        json_of(&d, &["sandbox", "inspect", "v"])["state"],
        "paused",
        "{snap}"
    );
    assert!(!d.kiln(&["exec", "v", "--", "true"]).status.success());
    d.kiln_ok(&["resume", "v"]);
    d.kiln_ok(&["exec", "v", "--", "true"]);
}

#[test]
fn rollback_hibernate_and_disk_snapshots() {
    require_image("tiny");
    let d = Daemon::start();
    let sb = d.create(&["--name", "dev"]);
    start_counter(&d, "dev");
    d.kiln_ok(&["exec", "dev", "--", "sh", "-c", "echo v1 > /root/state"]);
    let before = counter(&d, "dev");
    d.kiln_ok(&["snapshot", "create", "dev", "--name", "before"]);
    let at = counter(&d, "dev");
    d.kiln_ok(&[
        "exec",
        "dev",
        "--",
        "sh",
        "-c",
        "echo v2 > /root/state; rm /tmp/marker",
    ]);

    // Roll back: same id and name, paused until resumed, old files and processes back.
    let restored = json_of(&d, &["snapshot", "restore", "before"]);
    assert_eq!(restored["id"], sb["id"]);
    assert_eq!(restored["state"], "paused");
    d.kiln_ok(&["resume", "dev"]);
    assert_eq!(
        d.kiln_ok(&["exec", "dev", "--", "cat", "/root/state", "/tmp/marker"]),
        "v1\nmarker\n"
    );
    let c = counter(&d, "dev");
    assert!(
        c >= before && c <= at + 5,
        "counter {c}; {before} before the snapshot, {at} after"
    );
    assert_eq!(
        json_of(&d, &["snapshot", "get", "before"])["restored"],
        true
    );
    // Once only: again needs --force, and never while the restored sandbox runs.
    let out = d.kiln(&["snapshot", "restore", "before", "--force"]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("snapshot_in_use"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Hibernate: the VM process goes away and the same sandbox comes back where it was.
    let pid = json_of(&d, &["sandbox", "inspect", "dev"])["pid"]
        .as_u64()
        .unwrap();
    let stopped = json_of(&d, &["stop", "dev"]);
    assert_eq!(stopped["state"], "stopped");
    assert!(
        !common::process_alive(pid as u32),
        "QEMU still running after stop"
    );
    assert!(d.qemu_pids().is_empty());
    let out = d.kiln(&["snapshot", "restore", "before"]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("snapshot_already_restored"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let started = json_of(&d, &["start", "dev"]);
    assert_eq!(
        (started["id"].clone(), started["state"].clone()),
        (sb["id"].clone(), json!("running"))
    );
    assert_eq!(
        d.kiln_ok(&["exec", "dev", "--", "cat", "/root/state"]),
        "v1\n"
    );
    let c1 = counter(&d, "dev");
    std::thread::sleep(Duration::from_millis(500));
    assert!(counter(&d, "dev") > c1);
    d.kiln_ok(&["stop", "dev"]);
    let again = json_of(
        &d,
        &["snapshot", "restore", "before", "--force", "--resume"],
    );
    assert_eq!(again["state"], "running");

    // Disk snapshots: flushed through the agent, restored by a cold boot, resources may change.
    d.kiln_ok(&["exec", "dev", "--", "sh", "-c", "echo on-disk > /root/d"]);
    let disk = json_of(
        &d,
        &[
            "snapshot", "create", "dev", "--name", "dk", "--type", "disk",
        ],
    );
    assert_eq!(disk["type"], "disk");
    let cold = json_of(
        &d,
        &[
            "snapshot", "resume", "dk", "--name", "cold", "--memory", "384",
        ],
    );
    assert_eq!(cold["memory_mib"], 384);
    assert_eq!(
        d.kiln_ok(&["exec", "cold", "--", "cat", "/root/d"]),
        "on-disk\n"
    );
    assert!(
        !d.kiln(&["exec", "cold", "--", "cat", "/tmp/n"])
            .status
            .success(),
        "a disk snapshot must boot fresh"
    );
}

#[test]
fn diff_snapshots_need_their_base_and_full_ones_do_not() {
    require_image("tiny");
    let d = Daemon::start();
    // A private template this test may delete.
    common::private_image(&d, "mine");
    // Booted: its diff builds on the template's rootfs itself.
    d.create(&["--name", "base", "--template", "mine", "--boot"]);
    d.kiln_ok(&["exec", "base", "--", "sh", "-c", "echo layered > /root/x"]);
    // Resumed from the template's snapshot: its diff builds on that snapshot, kept while the diff needs it.
    d.create(&["--name", "warm", "--template", "mine"]);
    d.kiln_ok(&["exec", "warm", "--", "sh", "-c", "echo warm > /root/x"]);
    let dw = json_of(
        &d,
        &[
            "snapshot", "create", "warm", "--name", "dw", "--type", "diff",
        ],
    );
    assert_eq!(dw["parent"], "template:mine");
    d.kiln_ok(&["sandbox", "delete", "-y", "warm"]);
    let diff = json_of(
        &d,
        &[
            "snapshot", "create", "base", "--name", "d1", "--type", "diff",
        ],
    );
    assert_eq!(diff["parent"], "template:mine");
    d.kiln_ok(&[
        "snapshot", "create", "base", "--name", "f1", "--type", "full",
    ]);
    d.kiln_ok(&["sandbox", "delete", "-y", "base"]);
    d.kiln_ok(&["image", "rm", "-y", "mine"]);

    let (status, v) = d.api(
        "POST",
        "/v1/snapshots/d1/resume",
        Some(json!({"name": "x"})),
    );
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (409, Some("snapshot_base_missing")),
        "{v}"
    );
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("images/mine/rootfs.img") && msg.contains("full"),
        "{msg}"
    );
    assert!(
        d.qemu_pids().is_empty(),
        "a VM started for a snapshot that cannot be restored"
    );
    // The diff of the template snapshot's copy still resumes: that snapshot outlives the image.
    d.kiln_ok(&["snapshot", "resume", "dw", "--name", "warm2"]);
    assert_eq!(
        d.kiln_ok(&["exec", "warm2", "--", "cat", "/root/x"]),
        "warm
"
    );
    d.kiln_ok(&["sandbox", "delete", "-y", "warm2"]);

    // The full snapshot outlives its source and its template.
    d.kiln_ok(&["snapshot", "resume", "f1", "--name", "survivor"]);
    assert_eq!(
        d.kiln_ok(&["exec", "survivor", "--", "cat", "/root/x"]),
        "layered\n"
    );
    // A diff on top of the survivor builds on f1, which then cannot be deleted.
    let d2 = json_of(
        &d,
        &[
            "snapshot", "create", "survivor", "--name", "d2", "--type", "diff",
        ],
    );
    assert_eq!(d2["parent"], "snapshot:f1");
    let out = d.kiln(&["snapshot", "delete", "-y", "f1"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("snapshot_in_use"));
    d.kiln_ok(&["snapshot", "resume", "d2", "--name", "layer2"]);
    assert_eq!(
        d.kiln_ok(&["exec", "layer2", "--", "cat", "/root/x"]),
        "layered\n"
    );
}

#[test]
fn corruption_and_crashes_lose_nothing() {
    require_image("tiny");
    let mut d = Daemon::start();
    d.create(&["--name", "src"]);
    start_counter(&d, "src");
    d.kiln_ok(&["snapshot", "create", "src", "--name", "good"]);
    d.kiln_ok(&["snapshot", "create", "src", "--name", "bad"]);

    // Restart between snapshot and resume: snapshots and the running source are still there.
    d.restart_hard();
    d.kiln_ok(&["snapshot", "resume", "good", "--name", "after-restart"]);
    assert!(counter(&d, "after-restart") > 0);

    // A flipped byte in the state file is caught (by checksum, as this daemon has not verified it yet).
    let state = d.data_dir().join("snapshots/bad/state");
    let mut bytes = std::fs::read(&state).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&state, &bytes).unwrap();
    let (status, v) = d.api("POST", "/v1/snapshots/bad/resume", None);
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (422, Some("snapshot_corrupt")),
        "{v}"
    );
    // A truncated memory file too, always.
    let mem = d.data_dir().join("snapshots/good/memory");
    let len = std::fs::metadata(&mem).unwrap().len();
    // Truncating would also cut the running copy's base (a hard link): copy-and-replace instead.
    let copy = d.data_dir().join("memcopy");
    std::fs::copy(&mem, &copy).unwrap();
    std::fs::remove_file(&mem).unwrap();
    std::fs::rename(&copy, &mem).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&mem)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let (status, v) = d.api("POST", "/v1/snapshots/good/resume", None);
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (422, Some("snapshot_corrupt")),
        "{v}"
    );
    assert!(
        v["error"]["message"].as_str().unwrap().contains("expected"),
        "{v}"
    );
    assert_eq!(
        json_of(&d, &["sandbox", "list"]).as_array().unwrap().len(),
        2,
        "failed resumes must not leave sandboxes"
    );

    // Kill the daemon at several points during a snapshot: afterwards there is either no snapshot or a
    // whole one, no debris, and the source runs.
    for (i, delay_ms) in [5u64, 40, 120, 400].iter().enumerate() {
        let name = format!("crash{i}");
        let sock = d.socket.clone();
        let body = json!({"name": name}).to_string();
        let req = std::thread::spawn(move || {
            common::http_unix(
                &sock,
                "POST",
                "/v1/sandboxes/src/snapshots",
                Some(body.as_bytes()),
                "application/json",
            )
        });
        std::thread::sleep(Duration::from_millis(*delay_ms));
        d.restart_hard();
        // The request either got its answer before the kill or lost its connection (a panic there).
        match req.join() {
            Ok((status, body)) => eprintln!(
                "crash{i}: the snapshot request got {status} {}",
                String::from_utf8_lossy(&body)
            ),
            Err(_) => eprintln!("crash{i}: the snapshot request lost its connection"),
        }
        let debris: Vec<_> = std::fs::read_dir(d.data_dir().join("snapshots"))
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with('.'))
            .collect();
        assert!(debris.is_empty(), "debris after a crash: {debris:?}");
        let (status, snap) = d.api("GET", &format!("/v1/snapshots/{name}"), None);
        if status == 200 {
            let r = d.kiln(&["snapshot", "resume", &name, "--name", &format!("r{i}")]);
            assert!(
                r.status.success(),
                "snapshot {name} exists but does not restore: {snap} {}",
                String::from_utf8_lossy(&r.stderr)
            );
        } else {
            assert_eq!(status, 404);
            assert!(!d.data_dir().join("snapshots").join(&name).exists());
        }
        let src = json_of(&d, &["sandbox", "inspect", "src"]);
        assert_eq!(src["state"], "running", "{src}");
        let c = counter(&d, "src");
        std::thread::sleep(Duration::from_millis(400));
        assert!(
            counter(&d, "src") > c,
            "source stopped counting after a crash at {delay_ms} ms"
        );
    }
}

#[test]
fn a_full_disk_fails_the_snapshot_and_keeps_the_source_running() {
    require_image("tiny");
    let d = Daemon::start();
    d.create(&["--name", "src"]);
    start_counter(&d, "src");
    // Put the snapshot store on a 32 MiB filesystem: the RAM copy cannot fit.
    let store = d.data_dir().join("snapshots");
    let status = std::process::Command::new("mount")
        .args([
            "-t",
            "tmpfs",
            "-o",
            "size=32m",
            "kiln-test-full",
            store.to_str().unwrap(),
        ])
        .status()
        .expect("mount");
    assert!(status.success(), "mounting a small tmpfs needs root");
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.0)
                .status();
        }
    }
    let _unmount = Unmount(store.clone());

    let (status, v) = d.api(
        "POST",
        "/v1/sandboxes/src/snapshots",
        Some(json!({"name": "big"})),
    );
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (507, Some("insufficient_storage")),
        "{v}"
    );
    assert!(
        v["error"]["message"].as_str().unwrap().contains("full"),
        "{v}"
    );
    assert_eq!(
        std::fs::read_dir(&store).unwrap().count(),
        0,
        "a failed snapshot left files behind"
    );
    let (status, _) = d.api("GET", "/v1/snapshots/big", None);
    assert_eq!(status, 404);
    // The source runs on, and snapshots work again once there is room.
    assert_eq!(
        json_of(&d, &["sandbox", "inspect", "src"])["state"],
        "running"
    );
    let c = counter(&d, "src");
    std::thread::sleep(Duration::from_millis(400));
    assert!(counter(&d, "src") > c);
    drop(_unmount);
    d.kiln_ok(&["snapshot", "create", "src", "--name", "fits"]);
    d.kiln_ok(&["snapshot", "resume", "fits", "--name", "copy"]);
    assert!(counter(&d, "copy") > 0);
}
