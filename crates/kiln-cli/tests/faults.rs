//! Faults with nothing lost, on real VMs: a fork child's QEMU killed, a sandbox's QEMU killed, the guest
//! disk full during an upload, and the daemon SIGKILLed in the middle of every kind of operation. Each test
//! checks afterwards that every sandbox and snapshot is still there and usable, and that nothing leaked.
//!
//! Each test prints a `RELIABILITY` line (objects or operations attempted / survived / lost) that
//! `scripts/reliability-report.sh` collects into docs/reliability.md.

mod common;

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::world::{check_world, sh, sh_ok, Tally, World};
use common::{http_unix, require_image, Daemon};
use serde_json::{json, Value};

/// The tests boot several VMs each; run them one at a time on small hosts.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// Starts `req` against the daemon with operations held at `point`, SIGKILLs the daemon while the
/// request waits there, and starts the daemon again without faults.
fn kill_during(d: &mut Daemon, point: &str, method: &'static str, path: String, body: Value) {
    d.restart_with_env(&[("KILN_FAULTS", &format!("hold.{point}=120000"))]);
    let needle = format!("holding at {point}");
    let before = d.log().matches(&needle).count();
    let socket = d.socket.clone();
    let req = std::thread::spawn(move || {
        // The daemon dies mid-request: the connection breaks (a panic in this thread only).
        let bytes = (!body.is_null()).then(|| body.to_string().into_bytes());
        http_unix(&socket, method, &path, bytes.as_deref(), "application/json")
    });
    assert!(
        d.wait_log(&needle, before + 1, Duration::from_secs(90)),
        "the request never reached {point}:\n{}",
        common::tail(&d.log(), 30)
    );
    d.kill_hard();
    let _ = req.join();
    d.restart_with_env(&[]);
}

#[test]
fn fork_with_a_child_killed_after_launch_leaves_nothing_behind() {
    require_image("tiny");
    let _serial = serial();
    // Limits are checked before anything starts: a tiny memory limit refuses even one sandbox.
    let small = Daemon::start_with(&["--memory-overcommit", "0.00001"]);
    let (status, v) = small.api("POST", "/v1/sandboxes", Some(json!({"name": "big"})));
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (429, Some("capacity_exceeded")),
        "{v}"
    );
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("--memory-overcommit"),
        "{v}"
    );
    drop(small);
    let bad = std::process::Command::new(common::KILN)
        .args([
            "--data-dir",
            "/nonexistent/kiln-test",
            "serve",
            "--memory-overcommit",
            "0",
        ])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("overcommit"));

    let d = Daemon::start_env(
        &["--max-sandboxes", "5"],
        &[("KILN_FAULTS", "qemu.kill_after_launch=kid-3")],
    );
    d.create(&["--name", "src"]);
    sh_ok(&d, "src", "echo src-marker > /root/marker");
    let src_pid = d.qemu_pids();
    assert_eq!(src_pid.len(), 1);
    let world = World {
        running: [("src".to_string(), "src-marker".to_string())].into(),
        ..Default::default()
    };
    let mut tally = Tally::default();

    // A fork of 5 children does not fit beside the source (limit 5): refused as a whole, upfront.
    let (status, v) = d.api(
        "POST",
        "/v1/sandboxes/src/fork",
        Some(json!({"name": "kid", "count": 5})),
    );
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (429, Some("capacity_exceeded")),
        "{v}"
    );
    let msg = v["error"]["message"].as_str().unwrap_or("");
    assert!(
        msg.contains("5 more sandboxes") && msg.contains("limit is 5"),
        "{msg}"
    );
    check_world(&d, &world, &mut tally, "after the refused fork");

    // Child 3's QEMU is SIGKILLed right after launch: the fork fails as a whole and says why.
    let (status, v) = d.api(
        "POST",
        "/v1/sandboxes/src/fork",
        Some(json!({"name": "kid", "count": 4})),
    );
    assert_eq!(status, 500, "{v}");
    assert_eq!(v["error"]["code"], "vm_failed", "{v}");
    let msg = v["error"]["message"].as_str().unwrap_or("");
    assert!(msg.contains("kid-3") && msg.contains("exited"), "{msg}");
    assert!(msg.contains("1 of 4 children"), "{msg}");
    assert!(d
        .log()
        .contains("fault injection: killing QEMU after launch"));
    check_world(&d, &world, &mut tally, "after the failed fork");
    assert_eq!(d.qemu_pids(), src_pid, "the source's QEMU changed");

    // The source is unharmed and forks again (the fault fires once).
    let (status, v) = d.api(
        "POST",
        "/v1/sandboxes/src/fork",
        Some(json!({"name": "kid", "count": 4})),
    );
    assert_eq!(status, 201, "{v}");
    assert_eq!(v["sandboxes"].as_array().map(Vec::len), Some(4));
    let mut world = world;
    for i in 1..=4 {
        world
            .running
            .insert(format!("kid-{i}"), "src-marker".to_string());
    }
    check_world(&d, &world, &mut tally, "after the second fork");

    // At the limit, resuming a snapshot is refused too.
    let (status, v) = d.api(
        "POST",
        "/v1/sandboxes/src/snapshots",
        Some(json!({"name": "s1", "type": "disk"})),
    );
    assert_eq!(status, 201, "{v}");
    let (status, v) = d.api("POST", "/v1/snapshots/s1/resume", Some(json!({})));
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (429, Some("capacity_exceeded")),
        "{v}"
    );
    tally.report(
        "fork_with_a_child_killed_after_launch_leaves_nothing_behind",
        "objects",
    );
    assert_eq!(tally.lost, 0);
}

#[test]
fn qemu_killed_under_a_running_sandbox_marks_it_failed_and_keeps_its_snapshots() {
    require_image("tiny");
    let _serial = serial();
    let d = Daemon::start();
    d.create(&["--name", "victim"]);
    sh_ok(&d, "victim", "echo before-the-kill > /root/marker");
    let (status, v) = d.api(
        "POST",
        "/v1/sandboxes/victim/snapshots",
        Some(json!({"name": "v-snap"})),
    );
    assert_eq!(status, 201, "{v}");
    let pid = d.api("GET", "/v1/sandboxes/victim", None).1["pid"]
        .as_u64()
        .expect("pid") as i32;
    // SAFETY: plain kill(2) of the test's own VM.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
    }
    // The daemon notices without being asked to do anything with the sandbox.
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut sb = Value::Null;
    while Instant::now() < deadline {
        sb = d.api("GET", "/v1/sandboxes/victim", None).1;
        if sb["state"] == "failed" {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(sb["state"], "failed", "{sb}");
    let reason = sb["error"].as_str().unwrap_or("");
    assert!(
        reason.contains("QEMU exited") && reason.contains("snapshots"),
        "{reason}"
    );
    let (status, v) = sh(&d, "victim", "true");
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (409, Some("sandbox_not_running")),
        "{v}"
    );

    // Its snapshot is intact and resumable, with the data from before the kill.
    let (status, v) = d.api(
        "POST",
        "/v1/snapshots/v-snap/resume",
        Some(json!({"name": "revived"})),
    );
    assert_eq!(status, 201, "{v}");
    let mut tally = Tally::default();
    let world = World {
        running: [("revived".to_string(), "before-the-kill".to_string())].into(),
        stopped: BTreeMap::new(),
        snapshots: ["v-snap".to_string()].into(),
    };
    // The failed sandbox is still listed (for its error); check the rest, then delete it.
    let (status, v) = d.api("DELETE", "/v1/sandboxes/victim", None);
    assert!(status == 200 || status == 204, "{v}");
    check_world(&d, &world, &mut tally, "after the QEMU kill");
    tally.report(
        "qemu_killed_under_a_running_sandbox_marks_it_failed_and_keeps_its_snapshots",
        "objects",
    );
}

#[test]
fn upload_larger_than_the_free_guest_disk_is_refused_and_leaves_no_partial_file() {
    require_image("tiny");
    let _serial = serial();
    let d = Daemon::start();
    d.create(&["--name", "full"]);
    // Fill the guest disk up to 4 MiB (fallocate writes no data, so this is quick), then upload 16 MB.
    sh_ok(
        &d,
        "full",
        "echo m > /root/marker; avail=$(df -k / | awk 'NR==2{print $4}'); fallocate -l $(( (avail-4096)*1024 )) /root/fill",
    );
    let data: Vec<u8> = (0..16_000_000u32).map(|i| (i % 251) as u8).collect();
    let (status, body) = d.http(
        "PUT",
        "/v1/sandboxes/full/files?path=/root/big",
        Some(&data),
        "application/octet-stream",
    );
    let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (507, Some("guest_disk_full")),
        "{v}"
    );
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("Free space"),
        "{v}"
    );
    // Still running; neither the file nor a temporary part of it is left.
    let left = sh_ok(&d, "full", "ls -a /root");
    assert_eq!(
        left.split_whitespace().collect::<Vec<_>>(),
        [".", "..", "fill", "marker"]
    );
    sh_ok(&d, "full", "rm /root/fill");
    let (status, _) = d.http(
        "PUT",
        "/v1/sandboxes/full/files?path=/root/big",
        Some(&data),
        "application/octet-stream",
    );
    assert!(status == 200 || status == 201 || status == 204, "{status}");
    let (status, back) = d.http("GET", "/v1/sandboxes/full/files?path=/root/big", None, "");
    assert_eq!(status, 200);
    assert!(back == data, "the file read back differs");
    let mut tally = Tally::default();
    let world = World {
        running: [("full".to_string(), "m".to_string())].into(),
        ..Default::default()
    };
    check_world(&d, &world, &mut tally, "after the full disk");
    tally.report(
        "upload_larger_than_the_free_guest_disk_is_refused_and_leaves_no_partial_file",
        "objects",
    );
}

#[test]
fn daemon_killed_in_the_middle_of_each_operation_loses_nothing() {
    require_image("tiny");
    let _serial = serial();
    let mut d = Daemon::start();
    let mut tally = Tally::default();
    d.create(&["--name", "keep"]);
    sh_ok(&d, "keep", "echo k1 > /root/marker; sync");
    let (status, v) = d.api(
        "POST",
        "/v1/sandboxes/keep/snapshots",
        Some(json!({"name": "base"})),
    );
    assert_eq!(status, 201, "{v}");
    let mut w = World {
        running: [("keep".to_string(), "k1".to_string())].into(),
        snapshots: ["base".to_string()].into(),
        ..Default::default()
    };
    let mut faults = 0;
    let mut step =
        |d: &mut Daemon, point: &str, method: &'static str, path: &str, body: Value, w: &World| {
            kill_during(d, point, method, path.to_string(), body);
            faults += 1;
            check_world(d, w, &mut tally, &format!("after a crash at {point}"));
        };

    // Creating, resuming and forking are rolled back: the new sandboxes never existed. A create is
    // either a cold boot (`boot: true`) or a resume of the template snapshot; both are cut.
    step(
        &mut d,
        "create.launched",
        "POST",
        "/v1/sandboxes",
        json!({"name": "new1", "boot": true}),
        &w,
    );
    step(
        &mut d,
        "resume.launched",
        "POST",
        "/v1/sandboxes",
        json!({"name": "new2"}),
        &w,
    );
    step(
        &mut d,
        "resume.launched",
        "POST",
        "/v1/snapshots/base/resume",
        json!({"name": "res1"}),
        &w,
    );
    step(
        &mut d,
        "fork.captured",
        "POST",
        "/v1/sandboxes/keep/fork",
        json!({"name": "fk", "count": 2}),
        &w,
    );
    // A snapshot cut short leaves no half-written files, and its source runs on (unpaused).
    step(
        &mut d,
        "snapshot.paused",
        "POST",
        "/v1/sandboxes/keep/snapshots",
        json!({"name": "sp"}),
        &w,
    );
    step(
        &mut d,
        "snapshot.written",
        "POST",
        "/v1/sandboxes/keep/snapshots",
        json!({"name": "sw"}),
        &w,
    );
    // A stop cut short after saving: the VM runs on.
    step(
        &mut d,
        "stop.saved",
        "POST",
        "/v1/sandboxes/keep/stop",
        Value::Null,
        &w,
    );

    // Deletions are finished.
    let (status, v) = d.api(
        "POST",
        "/v1/sandboxes/keep/snapshots",
        Some(json!({"name": "doomed", "type": "disk"})),
    );
    assert_eq!(status, 201, "{v}");
    step(
        &mut d,
        "snapshot.deleting",
        "DELETE",
        "/v1/snapshots/doomed",
        Value::Null,
        &w,
    );
    let (status, v) = d.api(
        "POST",
        "/v1/snapshots/base/resume",
        Some(json!({"name": "victim"})),
    );
    assert_eq!(status, 201, "{v}");
    step(
        &mut d,
        "delete.marked",
        "DELETE",
        "/v1/sandboxes/victim",
        Value::Null,
        &w,
    );

    // A start cut short before the VM ran: still stopped, and starts later with its data.
    let (status, v) = d.api("POST", "/v1/sandboxes/keep/stop", None);
    assert_eq!(status, 200, "{v}");
    let marker = w.running.remove("keep").unwrap_or_default();
    w.stopped.insert("keep".to_string(), marker.clone());
    step(
        &mut d,
        "start.launched",
        "POST",
        "/v1/sandboxes/keep/start",
        Value::Null,
        &w,
    );
    let (status, v) = d.api("POST", "/v1/sandboxes/keep/start", None);
    assert_eq!(status, 200, "{v}");
    w.stopped.clear();
    w.running.insert("keep".to_string(), marker);

    // A long command in flight: the daemon dies, the sandbox does not.
    sh_ok(&d, "keep", "rm -f /tmp/started");
    let socket = d.socket.clone();
    let long = std::thread::spawn(move || {
        let body = json!({"cmd": "touch /tmp/started; sleep 30"}).to_string();
        http_unix(
            &socket,
            "POST",
            "/v1/sandboxes/keep/exec",
            Some(body.as_bytes()),
            "application/json",
        )
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    while sh(&d, "keep", "test -e /tmp/started").1["exit_code"] != 0 {
        assert!(Instant::now() < deadline, "the long command never started");
        std::thread::sleep(Duration::from_millis(100));
    }
    d.kill_hard();
    let _ = long.join();
    d.restart_with_env(&[]);
    faults += 1;
    check_world(&d, &w, &mut tally, "after a crash during exec");

    // Everything still works: a new snapshot, and the old one resumes with its data.
    let (status, v) = d.api(
        "POST",
        "/v1/sandboxes/keep/snapshots",
        Some(json!({"name": "after"})),
    );
    assert_eq!(status, 201, "{v}");
    w.snapshots.insert("after".to_string());
    for snap in ["base", "after"] {
        let name = format!("from-{snap}");
        let (status, v) = d.api(
            "POST",
            &format!("/v1/snapshots/{snap}/resume"),
            Some(json!({"name": name})),
        );
        assert_eq!(status, 201, "{v}");
        w.running.insert(name, "k1".to_string());
    }
    check_world(&d, &w, &mut tally, "at the end");
    tally.report(
        "daemon_killed_in_the_middle_of_each_operation_loses_nothing",
        &format!("objects-over-{faults}-crashes"),
    );
    assert_eq!(tally.lost, 0);
}
