//! Guest RAM of booted sandboxes on a tmpfs (issue 13 item 5): the host does not write it back to disk
//! while the guest dirties memory, hibernation and snapshots still find it (also after a daemon restart),
//! and a RAM directory too small for a guest is refused with a clear error.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{require_image, Daemon};

/// The file QEMU maps as guest RAM (`mem-path=` of its command line).
fn mem_path(pid: u32) -> PathBuf {
    let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).expect("QEMU cmdline");
    let cmd = String::from_utf8_lossy(&cmd);
    let start = cmd.find("mem-path=").expect("mem-path") + "mem-path=".len();
    let rest = &cmd[start..];
    PathBuf::from(&rest[..rest.find(',').expect("option end")])
}

fn is_tmpfs(p: &Path) -> bool {
    let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: statfs into a zeroed struct.
    unsafe {
        let mut s: libc::statfs = std::mem::zeroed();
        libc::statfs(c.as_ptr(), &mut s) == 0 && s.f_type as i64 == 0x0102_1994
    }
}

/// Bytes the process caused to be written to storage (`write_bytes` of /proc/PID/io: counted when it
/// dirties a page of a file that is written back).
fn write_bytes(pid: u32) -> u64 {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).expect("/proc/PID/io");
    io.lines()
        .find_map(|l| l.strip_prefix("write_bytes: "))
        .and_then(|v| v.trim().parse().ok())
        .expect("write_bytes")
}

/// The guest writes `mib` MiB to its tmpfs (its RAM) `rounds` times.
fn dirty_guest_ram(d: &Daemon, sb: &str, mib: u32, rounds: u32) {
    let script = format!("i=0; while [ $i -lt {rounds} ]; do dd if=/dev/zero of=/tmp/fill bs=1M count={mib} 2>/dev/null; rm -f /tmp/fill; i=$((i+1)); done; echo done");
    assert_eq!(
        d.kiln_ok(&["exec", sb, "--", "sh", "-c", &script]).trim(),
        "done"
    );
}

/// Creates a sandbox under `d`, dirties 120 MiB of its RAM four times and returns (MiB QEMU wrote to
/// storage meanwhile, seconds a snapshot then took).
fn workload(d: &Daemon, placement: &str) -> (f64, f64) {
    // Booted (`--boot`): a copy of the template snapshot keeps its RAM in the snapshot's file plus private
    // pages, not on the tmpfs.
    d.create(&["--name", "w", "--memory", "256", "--boot"]);
    let pid = d.qemu_pids()[0];
    let ram = mem_path(pid);
    eprintln!("{placement}: guest RAM is {}", ram.display());
    let before = write_bytes(pid);
    dirty_guest_ram(d, "w", 120, 4);
    let written = (write_bytes(pid) - before) as f64 / (1 << 20) as f64;
    // Three snapshots in a row (single runs are noisy on a shared host): the fastest counts.
    let mut times = Vec::new();
    for i in 0..3 {
        let t = Instant::now();
        d.kiln_ok(&["snapshot", "create", "w", "--name", &format!("s{i}")]);
        times.push(t.elapsed().as_secs_f64());
    }
    let snap = times.iter().cloned().fold(f64::MAX, f64::min);
    eprintln!("{placement}: QEMU wrote {written:.1} MiB to storage while the guest dirtied 4 x 120 MiB; snapshot create took {times:.2?} s");
    (written, snap)
}

#[test]
fn booted_guest_ram_is_on_tmpfs_and_not_written_back_to_disk() {
    require_image("tiny");
    let d = Daemon::start();
    let (tmpfs_written, _) = workload(&d, "tmpfs");
    let pid = d.qemu_pids()[0];
    let ram = mem_path(pid);
    assert!(
        ram.starts_with(d.data_dir().join("ram")),
        "{}",
        ram.display()
    );
    assert!(is_tmpfs(&ram), "{} is not on a tmpfs", ram.display());
    drop(d);

    // The same on the data disk (`--ram-dir disk`, what kiln did before): for comparison.
    let d = Daemon::start_with(&["--ram-dir", "disk"]);
    let (disk_written, _) = workload(&d, "disk");
    assert!(
        disk_written > 32.0,
        "the comparison did not dirty disk-backed RAM ({disk_written:.1} MiB)"
    );
    assert!(
        tmpfs_written < 16.0,
        "QEMU wrote {tmpfs_written:.1} MiB to storage with RAM on tmpfs"
    );
}

#[test]
fn ram_on_tmpfs_survives_daemon_restart_stop_start_and_snapshots() {
    require_image("tiny");
    let mut d = Daemon::start();
    // Booted: only a booted machine's RAM is a file on the tmpfs (copies of snapshots, this one's too,
    // map the snapshot's RAM file privately).
    d.create(&["--name", "a", "--boot"]);
    let ram_dir = d.data_dir().join("ram");
    d.kiln_ok(&["exec", "a", "--", "sh", "-c", "echo in-ram > /tmp/marker"]);
    let read = |d: &Daemon, sb: &str| d.kiln_ok(&["exec", sb, "--", "cat", "/tmp/marker"]);

    // A new daemon finds the running VM's RAM (its tmpfs is reused, not mounted over).
    d.restart_hard();
    assert!(
        d.log().contains("mounted by an earlier daemon"),
        "{}",
        d.log()
    );
    d.kiln_ok(&["snapshot", "create", "a", "--name", "s1"]);
    let copy = d.create(&["--snapshot", "s1", "--name", "b"]);
    assert_eq!(copy["state"], "running");
    assert_eq!(read(&d, "b").trim(), "in-ram");

    // Hibernate: RAM goes to the data disk and leaves the tmpfs; start brings it back.
    let ram_files = || {
        std::fs::read_dir(&ram_dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect::<Vec<_>>()
    };
    assert_eq!(ram_files().len(), 1, "{:?}", ram_files());
    d.kiln_ok(&["stop", "a"]);
    assert!(ram_files().is_empty(), "{:?}", ram_files());
    d.restart_hard();
    d.kiln_ok(&["start", "a"]);
    assert_eq!(ram_files().len(), 1, "{:?}", ram_files());
    assert_eq!(read(&d, "a").trim(), "in-ram");
    d.kiln_ok(&[
        "exec",
        "a",
        "--",
        "sh",
        "-c",
        "echo after-start > /tmp/marker",
    ]);
    d.kiln_ok(&["snapshot", "create", "a", "--name", "s2"]);
    d.create(&["--snapshot", "s2", "--name", "c"]);
    assert_eq!(read(&d, "c").trim(), "after-start");

    // Deleting the sandbox frees its RAM file.
    d.kiln_ok(&["sandbox", "delete", "-y", "a"]);
    assert!(ram_files().is_empty(), "{:?}", ram_files());
}

#[test]
fn a_ram_dir_too_small_for_the_guest_is_refused_clearly() {
    require_image("tiny");
    let d = Daemon::start_with(&["--ram-size", "200M"]);
    let (status, body) = d.api(
        "POST",
        "/v1/sandboxes",
        // A boot needs its RAM file on the tmpfs (a copy of the template snapshot does not).
        Some(serde_json::json!({"name": "big", "memory_mib": 256, "boot": true})),
    );
    eprintln!("{status} {body}");
    assert_eq!(status, 507, "{body}");
    assert_eq!(body["error"]["code"], "insufficient_storage", "{body}");
    let msg = body["error"]["message"].as_str().unwrap_or_default();
    assert!(
        msg.contains("--ram-size") && msg.contains("256 MiB"),
        "{msg}"
    );
    let left: Vec<_> = std::fs::read_dir(d.data_dir().join("ram"))
        .unwrap()
        .flatten()
        .collect();
    assert!(left.is_empty(), "files left in the RAM directory: {left:?}");
    std::thread::sleep(Duration::from_millis(10));
}
