//! Memory headroom: a sandbox created with `--max-memory` has a balloon holding what its `--memory` leaves
//! out, and a copy resumed from its memory snapshot can be given more memory (and more or fewer vCPUs),
//! continuing the same running processes; shrinking, or growing past the headroom, is refused.
//!
//! Needs an image whose late modules include virtio_balloon (images built by this kiln).

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::time::Duration;

use common::{require_image, Daemon};
use serde_json::{json, Value};

fn guest(d: &Daemon, sb: &str, cmd: &str) -> String {
    d.kiln_ok(&["exec", sb, "--", "sh", "-c", cmd])
        .trim()
        .to_string()
}

/// MemTotal of the guest's /proc/meminfo, in MiB.
fn mem_total_mib(d: &Daemon, sb: &str) -> u64 {
    let kib: u64 = guest(d, sb, "awk '/^MemTotal:/ {print $2}' /proc/meminfo")
        .parse()
        .expect("MemTotal");
    kib / 1024
}

fn counter(d: &Daemon, sb: &str) -> u64 {
    guest(d, sb, "cat /tmp/n").parse().expect("counter value")
}

/// The counter started before the snapshot (process `pid`) is alive in `sb` and still counts.
fn assert_counting(d: &Daemon, sb: &str, pid: &str, at_least: u64) {
    let first = counter(d, sb);
    assert!(first >= at_least, "{sb}: counter {first} < {at_least}");
    std::thread::sleep(Duration::from_millis(700));
    let later = counter(d, sb);
    assert!(later > first, "{sb}: the counter stopped at {first}");
    assert_eq!(
        guest(d, sb, &format!("test -d /proc/{pid} && echo alive")),
        "alive",
        "{sb}: the counter process {pid} is gone"
    );
}

fn memory_max(id: &str) -> Option<u64> {
    std::fs::read_to_string(
        PathBuf::from("/sys/fs/cgroup/kiln")
            .join(id)
            .join("memory.max"),
    )
    .ok()
    .and_then(|s| s.trim().parse().ok())
}

fn resume(d: &Daemon, snap: &str, body: Value) -> (u16, Value) {
    d.api("POST", &format!("/v1/snapshots/{snap}/resume"), Some(body))
}

fn qemu_cmdline(pid: u32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
        .unwrap_or_default()
}

/// Host memory the sandbox's RAM file really holds (allocated blocks), in MiB.
fn ram_file_mib(d: &Daemon, id: &str) -> u64 {
    let live = d.data_dir().join("ram").join(format!("{id}.ram"));
    let file = if live.exists() {
        live
    } else {
        d.data_dir().join("sandboxes").join(id).join("memory")
    };
    let m = std::fs::metadata(&file).expect("RAM file");
    (m.blocks() * 512) >> 20
}

#[test]
fn a_copy_gets_more_memory_and_vcpus_and_keeps_running() {
    require_image("tiny");
    let d = Daemon::start_with(&["--max-vcpus", "2", "--warm-spares", "0"]);
    let src = d.create(&[
        "--name",
        "src",
        "--memory",
        "256",
        "--max-memory",
        "512",
        "--cpus",
        "1",
        // Booted, not resumed from the template snapshot: the RAM-file check below is about a boot.
        "--boot",
    ]);
    let src_id = src["id"].as_str().expect("id").to_string();
    // The guest has about 256 MiB (the kernel keeps some of it, as in any 256 MiB guest).
    let total = mem_total_mib(&d, "src");
    assert!((150..=256).contains(&total), "src MemTotal {total} MiB");
    let pid = src["pid"].as_u64().expect("pid") as u32;
    let cmd = qemu_cmdline(pid);
    assert!(cmd.contains("virtio-balloon-device"), "{cmd}");
    assert!(cmd.contains("-m 512M"), "{cmd}");
    // The ballooned half costs the host nothing: the RAM file holds less than the guest was given
    // (the guest zeroes each page it hands to the balloon; QEMU punches it out of the file).
    let held = ram_file_mib(&d, &src_id);
    assert!(held < 256, "the RAM file of src holds {held} MiB");
    eprintln!("src: MemTotal {total} MiB, RAM file holds {held} MiB");

    let counter_pid = d
        .kiln_ok(&[
            "process", "start", "src", "--", "sh", "-c",
            "i=0; while true; do i=$((i+1)); echo $i > /tmp/n.new; mv /tmp/n.new /tmp/n; sleep 0.1; done",
        ])
        .trim()
        .to_string();
    std::thread::sleep(Duration::from_millis(800));
    d.kiln_ok(&["snapshot", "create", "src", "--name", "one"]);
    let at_one = counter(&d, "src");

    // 256 MiB / 1 vCPU -> 512 MiB / 2 vCPUs: the same process goes on, the guest sees both.
    let (status, big) = resume(
        &d,
        "one",
        json!({"name": "big", "memory_mib": 512, "cpus": 2}),
    );
    assert_eq!(status, 201, "{big}");
    assert_eq!(big["memory_mib"], 512);
    assert_eq!(big["cpus"], 2);
    let grown = mem_total_mib(&d, "big");
    assert!(
        grown >= total + 240 && grown <= 512,
        "big MemTotal {grown} MiB (src had {total})"
    );
    assert_eq!(guest(&d, "big", "nproc"), "2");
    assert_counting(&d, "big", &counter_pid, at_one.saturating_sub(20));
    let big_id = big["id"].as_str().expect("id");
    if let (Some(small), Some(large)) = (memory_max(&src_id), memory_max(big_id)) {
        assert!(
            large >= small + (256 << 20),
            "cgroup memory.max: src {small}, big {large}"
        );
    }
    // The memory is usable: more than the source ever had is free.
    let avail: u64 = guest(&d, "big", "awk '/^MemAvailable:/ {print $2}' /proc/meminfo")
        .parse()
        .expect("MemAvailable");
    assert!(avail / 1024 > 300, "big MemAvailable {} MiB", avail / 1024);

    // A snapshot of the grown copy keeps the headroom and its size; resumed with 1 vCPU of 2.
    d.kiln_ok(&["snapshot", "create", "big", "--name", "two"]);
    let (_, manifest) = common::read_manifest(&d.data_dir().join("snapshots/two/manifest.json"));
    assert_eq!(manifest["max_memory_mib"], 512, "{manifest}");
    assert_eq!(manifest["memory_mib"], 512, "{manifest}");
    let at_two = counter(&d, "big");
    let (status, down) = resume(&d, "two", json!({"name": "down", "cpus": 1}));
    assert_eq!(status, 201, "{down}");
    assert_eq!(guest(&d, "down", "nproc"), "1");
    assert_eq!(mem_total_mib(&d, "down"), grown);
    assert_counting(&d, "down", &counter_pid, at_two.saturating_sub(20));
    // Hibernating and waking a grown copy keeps its memory (the balloon is part of its machine).
    d.kiln_ok(&["stop", "down"]);
    d.kiln_ok(&["start", "down"]);
    assert_eq!(mem_total_mib(&d, "down"), grown);
    assert_counting(&d, "down", &counter_pid, 0);

    // Refusals start nothing: less than the snapshot holds, more than the headroom.
    let qemus = d.qemu_pids().len();
    let (status, err) = resume(&d, "two", json!({"name": "less", "memory_mib": 256}));
    assert_eq!(status, 409, "{err}");
    assert_eq!(err["error"]["code"], "resource_override_refused");
    assert!(
        err["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("cannot have less"),
        "{err}"
    );
    let (status, err) = resume(&d, "one", json!({"name": "huge", "memory_mib": 1024}));
    assert_eq!(status, 409, "{err}");
    assert_eq!(err["error"]["code"], "resource_override_refused");
    let msg = err["error"]["message"].as_str().unwrap_or_default();
    assert!(
        msg.contains("at most 512 MiB") && msg.contains("--max-memory"),
        "{msg}"
    );
    assert_eq!(d.qemu_pids().len(), qemus, "a refused resume started a VM");
}

#[test]
fn without_headroom_there_is_no_balloon_and_growth_is_refused() {
    require_image("tiny");
    // No default headroom (tests/headroom.rs covers the default).
    let d = Daemon::start_with(&["--warm-spares", "0", "--memory-headroom", "1"]);
    let plain = d.create(&["--name", "plain", "--memory", "256"]);
    let cmd = qemu_cmdline(plain["pid"].as_u64().expect("pid") as u32);
    assert!(!cmd.contains("balloon"), "{cmd}");
    assert!(cmd.contains("-m 256M"), "{cmd}");
    d.kiln_ok(&["snapshot", "create", "plain", "--name", "p"]);
    let (_, manifest) = common::read_manifest(&d.data_dir().join("snapshots/p/manifest.json"));
    assert!(manifest.get("max_memory_mib").is_none(), "{manifest}");
    let (status, err) = resume(&d, "p", json!({"name": "more", "memory_mib": 512}));
    assert_eq!(status, 409, "{err}");
    let msg = err["error"]["message"].as_str().unwrap_or_default();
    assert!(msg.contains("--max-memory 512"), "{msg}");
    // A headroom below the memory is a bad request.
    let out = d.kiln(&[
        "sandbox",
        "create",
        "--name",
        "bad",
        "--memory",
        "256",
        "--max-memory",
        "128",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("max_memory"));
}
