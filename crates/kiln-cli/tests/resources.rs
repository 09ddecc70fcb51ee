//! Resources on resume: a copy of a memory snapshot comes up with more or fewer vCPUs than its source,
//! continuing the same processes; memory it cannot change is refused with `resource_override_refused`.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::{require_image, Daemon};
use serde_json::{json, Value};

/// A background counter (every 0.1 s) whose pid is written to /tmp/counter.pid.
fn start_counter(d: &Daemon, sb: &str) -> String {
    d.kiln_ok(&["exec", sb, "--", "sh", "-c", "(i=0; while true; do i=$((i+1)); echo $i > /tmp/n.new; mv /tmp/n.new /tmp/n; sleep 0.1; done) >/dev/null 2>&1 & echo $! > /tmp/counter.pid"]);
    std::thread::sleep(Duration::from_millis(800));
    guest(d, sb, "cat /tmp/counter.pid")
}

fn guest(d: &Daemon, sb: &str, cmd: &str) -> String {
    d.kiln_ok(&["exec", sb, "--", "sh", "-c", cmd])
        .trim()
        .to_string()
}

fn counter(d: &Daemon, sb: &str) -> u64 {
    guest(d, sb, "cat /tmp/n").parse().expect("counter value")
}

/// The counter that ran before the snapshot is the same process and still counts.
fn assert_counting(d: &Daemon, sb: &str, pid: &str, at_least: u64) {
    let first = counter(d, sb);
    assert!(
        first >= at_least,
        "{sb}: counter {first} went back before {at_least}"
    );
    std::thread::sleep(Duration::from_millis(700));
    let later = counter(d, sb);
    assert!(later > first, "{sb}: the counter stopped at {first}");
    assert_eq!(guest(d, sb, "cat /tmp/counter.pid"), pid);
    assert_eq!(
        guest(d, sb, &format!("test -d /proc/{pid} && echo alive")),
        "alive",
        "{sb}: the counter process {pid} is gone"
    );
}

fn cpu_max(id: &str) -> Option<String> {
    [
        PathBuf::from("/sys/fs/cgroup/kiln")
            .join(id)
            .join("cpu.max"),
        PathBuf::from("/sys/fs/cgroup/cpu/kiln")
            .join(id)
            .join("cpu.cfs_quota_us"),
    ]
    .iter()
    .find_map(|p| std::fs::read_to_string(p).ok())
    .map(|s| s.trim().to_string())
}

fn resume(d: &Daemon, snap: &str, body: Value) -> (u16, Value) {
    d.api("POST", &format!("/v1/snapshots/{snap}/resume"), Some(body))
}

#[test]
fn resumed_copies_get_more_or_fewer_vcpus_and_keep_running() {
    require_image("tiny");
    // Two vCPUs per machine whatever the host has, so the test means the same everywhere.
    let d = Daemon::start_with(&["--max-vcpus", "2"]);
    d.create(&["--name", "src", "--memory", "256", "--cpus", "1"]);
    assert_eq!(guest(&d, "src", "nproc"), "1");
    // The second vCPU exists (present) but is offline.
    assert_eq!(
        guest(&d, "src", "cat /sys/devices/system/cpu/present"),
        "0-1"
    );
    assert_eq!(guest(&d, "src", "cat /sys/devices/system/cpu/online"), "0");
    let pid = start_counter(&d, "src");
    d.kiln_ok(&["snapshot", "create", "src", "--name", "one"]);
    let at_one = counter(&d, "src");

    // 1 vCPU -> 2: the same process goes on, the guest sees both vCPUs, the cgroup allows two.
    let (status, up) = resume(
        &d,
        "one",
        json!({"name": "up", "cpus": 2, "memory_mib": 256}),
    );
    assert_eq!(status, 201, "{up}");
    assert_eq!(up["cpus"], 2);
    assert_eq!(up["memory_mib"], 256);
    assert_eq!(guest(&d, "up", "nproc"), "2");
    assert_eq!(guest(&d, "up", "cat /sys/devices/system/cpu/online"), "0-1");
    assert_counting(&d, "up", &pid, at_one.saturating_sub(20));
    // Both vCPUs run guest code: a process pinned to cpu1 runs.
    assert_eq!(guest(&d, "up", "taskset -c 1 sh -c 'echo ran'"), "ran");
    let id = up["id"].as_str().expect("id");
    if let Some(quota) = cpu_max(id) {
        assert!(
            quota.starts_with(&quota_for(2)),
            "cgroup cpu quota of the 2-vCPU copy: {quota}"
        );
    }

    // A snapshot of the 2-vCPU copy, resumed with 1: cpu1 goes offline, the counter goes on.
    d.kiln_ok(&["snapshot", "create", "up", "--name", "two"]);
    let at_two = counter(&d, "up");
    let (status, down) = resume(&d, "two", json!({"name": "down", "cpus": 1}));
    assert_eq!(status, 201, "{down}");
    assert_eq!(down["cpus"], 1);
    assert_eq!(guest(&d, "down", "nproc"), "1");
    assert_eq!(guest(&d, "down", "cat /sys/devices/system/cpu/online"), "0");
    assert_counting(&d, "down", &pid, at_two.saturating_sub(20));
    if let Some(quota) = cpu_max(down["id"].as_str().expect("id")) {
        assert!(
            quota.starts_with(&quota_for(1)),
            "cgroup cpu quota of the 1-vCPU copy: {quota}"
        );
    }
    // Without an override a copy has its snapshot's vCPUs.
    let (status, same) = resume(&d, "two", json!({"name": "same"}));
    assert_eq!(status, 201, "{same}");
    assert_eq!(guest(&d, "same", "nproc"), "2");

    // Hibernating and waking the resized copy keeps its vCPUs (the machine still has two).
    d.kiln_ok(&["stop", "down"]);
    d.kiln_ok(&["start", "down"]);
    assert_eq!(guest(&d, "down", "nproc"), "1");
    assert_counting(&d, "down", &pid, 0);
}

#[test]
fn resources_a_memory_snapshot_cannot_take_are_refused_and_leave_nothing() {
    require_image("tiny");
    let d = Daemon::start_with(&["--max-vcpus", "2"]);
    // No headroom (`--max-memory` = `--memory`), so more memory is refused too.
    d.create(&[
        "--name",
        "src",
        "--memory",
        "256",
        "--max-memory",
        "256",
        "--cpus",
        "1",
    ]);
    d.kiln_ok(&["snapshot", "create", "src", "--name", "one"]);
    let qemus = d.qemu_pids().len();
    for (body, says) in [
        (
            json!({"name": "less", "memory_mib": 128}),
            "cannot have less",
        ),
        (
            json!({"name": "more", "memory_mib": 512}),
            "no room to grow",
        ),
        (json!({"name": "many", "cpus": 3}), "has 2 vCPUs"),
    ] {
        let (status, err) = resume(&d, "one", body.clone());
        assert_eq!(status, 409, "{body}: {err}");
        assert_eq!(err["error"]["code"], "resource_override_refused", "{err}");
        let msg = err["error"]["message"].as_str().unwrap_or_default();
        assert!(msg.contains(says), "{body}: {msg}");
        assert!(
            msg.contains("--type disk"),
            "{body}: says what to do: {msg}"
        );
    }
    // The CLI reports the same refusal.
    let out = d.kiln(&[
        "snapshot", "resume", "one", "--name", "cli", "--memory", "128",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("resource_override_refused"));
    assert_eq!(d.qemu_pids().len(), qemus, "a refused resume started a VM");
    let list = d.kiln_ok(&["--json", "sandbox", "list"]);
    let list: Value = serde_json::from_str(&list).expect("list JSON");
    assert_eq!(list.as_array().map(Vec::len), Some(1), "{list}");

    // A snapshot from before spare vCPUs (no `max_cpus` in its manifest) cannot gain any.
    let dir = d.data_dir().join("snapshots/one");
    let (_, mut manifest) = common::read_manifest(&dir.join("manifest.json"));
    manifest
        .as_object_mut()
        .expect("manifest object")
        .remove("max_cpus");
    common::write_manifest(&dir.join("manifest.json"), &manifest);
    let (status, err) = resume(&d, "one", json!({"name": "old", "cpus": 2}));
    assert_eq!(status, 409, "{err}");
    assert!(
        err["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("exactly 1 vCPUs"),
        "{err}"
    );
}

/// The CPU quota (µs per 100 ms period) kiln gives a machine with `cpus` vCPUs: one CPU each plus room for
/// QEMU's main loop and I/O threads (a quarter CPU per vCPU, at least one; confine/cgroup.rs).
fn quota_for(cpus: u64) -> String {
    ((cpus + cpus.div_ceil(4)) * 100_000).to_string()
}
