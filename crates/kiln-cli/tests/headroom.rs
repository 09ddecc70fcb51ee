//! Growth headroom by default (issue 12): a sandbox created without `max_memory_mib` gets a machine of twice
//! its memory with a balloon holding the rest (`kiln serve --memory-headroom`), so copies resumed from its
//! memory snapshots, its fork children's and its rolled-back self's can be given more memory. What is
//! admitted and capped is its memory, not the headroom.
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

/// The counter started in the source (process `pid`) is alive in `sb` and still counts.
fn assert_counting(d: &Daemon, sb: &str, pid: &str) {
    let first = counter(d, sb);
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

fn qemu_cmdline(pid: u64) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
        .unwrap_or_default()
}

fn api_ok(d: &Daemon, method: &str, path: &str, body: Value) -> Value {
    let (status, v) = d.api(method, path, Some(body));
    assert!(
        (200..300).contains(&status),
        "{method} {path}: {status} {v}"
    );
    v
}

/// Snapshots `sb` as `snap` and resumes it as `copy` with 512 MiB: the copy's guest has grown past what
/// `sb` had and the counter goes on in it.
fn grows(d: &Daemon, sb: &str, snap: &str, copy: &str, had: u64, counter_pid: &str) {
    let s = api_ok(
        d,
        "POST",
        &format!("/v1/sandboxes/{sb}/snapshots"),
        json!({ "name": snap }),
    );
    assert_eq!(s["max_memory_mib"], 512, "{s}");
    assert_eq!(
        api_ok(d, "GET", &format!("/v1/snapshots/{snap}"), Value::Null)["max_memory_mib"],
        512
    );
    let c = api_ok(
        d,
        "POST",
        &format!("/v1/snapshots/{snap}/resume"),
        json!({ "name": copy, "memory_mib": 512 }),
    );
    assert_eq!(
        (c["memory_mib"].as_u64(), c["max_memory_mib"].as_u64()),
        (Some(512), Some(512))
    );
    let grown = mem_total_mib(d, copy);
    assert!(
        grown >= had + 240 && grown <= 512,
        "{copy} MemTotal {grown} MiB ({sb} had {had})"
    );
    assert_counting(d, copy, counter_pid);
}

#[test]
fn a_plain_create_has_headroom_and_its_fork_children_and_rollbacks_grow() {
    require_image("tiny");
    let d = Daemon::start_with(&["--warm-spares", "0", "--max-vcpus", "1"]);
    let src = d.create(&["--name", "src", "--memory", "256"]);
    // No max_memory_mib asked for: twice the memory, shown in the answer.
    assert_eq!(src["max_memory_mib"], 512, "{src}");
    let id = src["id"].as_str().expect("id").to_string();
    let cmd = qemu_cmdline(src["pid"].as_u64().expect("pid"));
    assert!(
        cmd.contains("virtio-balloon-device") && cmd.contains("-m 512M"),
        "{cmd}"
    );
    // By the time the create answers, the guest sees only its own memory (programs size themselves by
    // MemTotal), and its cgroup is sized from that memory, not from the machine's.
    let total = mem_total_mib(&d, "src");
    assert!((150..=256).contains(&total), "src MemTotal {total} MiB");
    if let Some(max) = memory_max(&id) {
        assert!(
            max < 512 << 20,
            "cgroup memory.max {max} is sized from the headroom"
        );
    }
    let shown = d.kiln_ok(&["sandbox", "get", "src"]);
    assert!(shown.contains("copies may grow to 512 MiB"), "{shown}");
    let listed = api_ok(&d, "GET", "/v1/sandboxes", Value::Null);
    assert!(
        listed.to_string().contains("\"max_memory_mib\":512"),
        "{listed}"
    );

    let counter_pid = d
        .kiln_ok(&[
            "process", "start", "src", "--", "sh", "-c",
            "i=0; while true; do i=$((i+1)); echo $i > /tmp/n.new; mv /tmp/n.new /tmp/n; sleep 0.1; done",
        ])
        .trim()
        .to_string();
    std::thread::sleep(Duration::from_millis(500));

    // A fork child has the machine with its balloon: its own snapshot resumes grown.
    let forked = api_ok(
        &d,
        "POST",
        "/v1/sandboxes/src/fork",
        json!({ "name": "kid" }),
    );
    let kid = &forked["sandboxes"][0];
    assert_eq!(kid["max_memory_mib"], 512, "{forked}");
    assert_eq!(mem_total_mib(&d, "kid-1"), total);
    grows(&d, "kid-1", "kid-snap", "kid-big", total, &counter_pid);
    d.kiln_ok(&["sandbox", "delete", "-y", "kid-big"]);
    d.kiln_ok(&["sandbox", "delete", "-y", "kid-1"]);

    // Rolled back into itself, the sandbox keeps its balloon: a snapshot taken afterwards grows.
    api_ok(
        &d,
        "POST",
        "/v1/sandboxes/src/snapshots",
        json!({ "name": "before" }),
    );
    let rolled = api_ok(
        &d,
        "POST",
        "/v1/snapshots/before/restore",
        json!({ "resume": true }),
    );
    assert_eq!(rolled["max_memory_mib"], 512, "{rolled}");
    assert_eq!(mem_total_mib(&d, "src"), total);
    assert_counting(&d, "src", &counter_pid);
    grows(&d, "src", "after-rollback", "src-big", total, &counter_pid);

    // Hibernating and waking keeps the memory (and the headroom).
    d.kiln_ok(&["stop", "src"]);
    let woke = api_ok(&d, "POST", "/v1/sandboxes/src/start", json!({}));
    assert_eq!(woke["max_memory_mib"], 512, "{woke}");
    assert_eq!(mem_total_mib(&d, "src"), total);
    assert_counting(&d, "src", &counter_pid);
}

#[test]
fn headroom_is_not_admitted_only_the_memory_is() {
    require_image("tiny");
    // Room for about 400 MiB of guest memory: the capacity limit, and the RAM tmpfs sized from it.
    let host_mib = kiln_core::config::host_memory_mib();
    let ratio = format!("{:.9}", 400.0 / host_mib as f64);
    let d = Daemon::start_with(&["--warm-spares", "0", "--memory-overcommit", &ratio]);
    // 256 MiB fits; the 512 MiB machine around it would not, and must not have to.
    let (status, sb) = d.api(
        "POST",
        "/v1/sandboxes",
        Some(json!({"name": "a", "memory_mib": 256, "max_memory_mib": 512})),
    );
    assert_eq!(status, 201, "{sb}");
    let id = sb["id"].as_str().expect("id");
    let ram = d.data_dir().join("ram").join(format!("{id}.ram"));
    if let Ok(m) = std::fs::metadata(&ram) {
        assert_eq!(m.len(), 512 << 20);
        eprintln!("RAM file of a: {} MiB allocated", (m.blocks() * 512) >> 20);
    }
    let total = mem_total_mib(&d, "a");
    assert!(total <= 256, "a MemTotal {total} MiB");
    // A second 256 MiB guest does not fit beside the first's 256 MiB.
    let (status, err) = d.api(
        "POST",
        "/v1/sandboxes",
        Some(json!({"name": "b", "memory_mib": 256})),
    );
    assert!(status == 429 || status == 507, "{status} {err}");
}

#[test]
fn headroom_can_be_turned_off_per_daemon_and_per_sandbox() {
    require_image("tiny");
    let d = Daemon::start_with(&["--warm-spares", "0", "--memory-headroom", "1"]);
    let off = d.create(&["--name", "off", "--memory", "256"]);
    assert_eq!(off["max_memory_mib"], Value::Null, "{off}");
    let cmd = qemu_cmdline(off["pid"].as_u64().expect("pid"));
    assert!(!cmd.contains("balloon") && cmd.contains("-m 256M"), "{cmd}");
    // Asked for explicitly, it is there whatever the default.
    let on = d.create(&["--name", "on", "--memory", "128", "--max-memory", "192"]);
    assert_eq!(on["max_memory_mib"], 192, "{on}");
    drop(d);
    // max_memory_mib equal to memory_mib: none for that sandbox.
    let d = Daemon::start_with(&["--warm-spares", "0", "--memory-headroom", "1.5"]);
    let same = d.create(&["--name", "same", "--memory", "128", "--max-memory", "128"]);
    assert_eq!(same["max_memory_mib"], Value::Null, "{same}");
    let default = d.create(&["--name", "default", "--memory", "128"]);
    assert_eq!(default["max_memory_mib"], 192, "{default}");
    let bad = std::process::Command::new(common::KILN)
        .args([
            "--data-dir",
            "/nonexistent/kiln-test",
            "serve",
            "--memory-headroom",
            "0.5",
        ])
        .output()
        .expect("kiln");
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--memory-headroom"));
}
