//! One template snapshot serves other sizes (issue 15): a create asking for a larger disk, more memory
//! (within the snapshot's headroom) or another vCPU count resumes the default shape's template snapshot and
//! resizes the copy before answering, instead of booting cold or making a template snapshot of its own. A
//! disk that cannot be grown online (QEMU killed while it grows) boots cold, said in the answer and the log.

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::{require_image, Daemon};
use serde_json::{json, Value};

fn run(d: &Daemon, sb: &str, cmd: &str) -> String {
    d.kiln_ok(&["exec", sb, "--", "sh", "-c", cmd])
        .trim()
        .to_string()
}

fn create(d: &Daemon, body: Value) -> Value {
    let (status, v) = d.api("POST", "/v1/sandboxes", Some(body));
    assert_eq!(status, 201, "{v}\n{}", common::tail(&d.log(), 30));
    v
}

/// The template snapshot directories in this daemon's own store.
fn template_snapshot_dirs(d: &Daemon) -> Vec<String> {
    std::fs::read_dir(d.data_dir().join("snapshots"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("template-"))
        .collect()
}

/// Size of the guest's root filesystem in MiB (`df`), and of its disk (sysfs) in MiB.
fn guest_sizes_mib(d: &Daemon, sb: &str) -> (u64, u64) {
    let out = run(
        d,
        sb,
        "df -k / | awk 'NR==2 {print $2}'; echo $(( $(cat /sys/block/vda/size) / 2048 ))",
    );
    let mut it = out
        .lines()
        .map(|l| l.trim().parse::<u64>().expect("number"));
    let fs_kib = it.next().expect("df");
    let disk_mib = it.next().expect("disk size");
    (fs_kib / 1024, disk_mib)
}

fn mem_total_mib(d: &Daemon, sb: &str) -> u64 {
    run(d, sb, "awk '/^MemTotal:/ {print $2}' /proc/meminfo")
        .parse::<u64>()
        .expect("MemTotal")
        / 1024
}

#[test]
fn a_larger_disk_resumes_the_template_snapshot_and_grows_online() {
    require_image("tiny");
    let d = Daemon::start_env(
        &[],
        &[
            ("KILN_TEMPLATE_SNAPSHOTS", "on"),
            // Long enough to kill the second copy's QEMU between its disk and filesystem growth.
            ("KILN_FAULTS", "hold.create.disk_resized=4000"),
        ],
    );
    assert!(
        d.log().contains("template snapshot ready"),
        "{}",
        common::tail(&d.log(), 30)
    );
    let small = create(&d, json!({"name": "small"}));
    assert_eq!(small["boot"]["mode"], "resume", "{small}");
    let (_, small_disk) = guest_sizes_mib(&d, "small");

    let big = create(&d, json!({"name": "big", "disk_size_gib": 3}));
    assert_eq!(big["boot"]["mode"], "resume", "{big}");
    assert_eq!(big["boot"]["snapshot"], small["boot"]["snapshot"], "{big}");
    let reason = big["boot"]["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("grown online to 3 GiB"), "{big}");
    assert_eq!(big["disk_size_bytes"], 3u64 << 30, "{big}");
    let (fs, disk) = guest_sizes_mib(&d, "big");
    eprintln!("small disk {small_disk} MiB; big: disk {disk} MiB, filesystem {fs} MiB");
    assert_eq!(disk, 3 << 10, "the guest's disk");
    assert!(fs > 2900 && fs <= 3 << 10, "df shows {fs} MiB");
    assert!(small_disk < 2 << 10);
    // The space is there to use, past the template's size.
    run(
        &d,
        "big",
        "dd if=/dev/zero of=/root/fill bs=1M count=1200 2>/dev/null; sync",
    );
    assert_eq!(
        run(&d, "big", "wc -c < /root/fill"),
        (1200u64 << 20).to_string()
    );
    let (_, got) = d.api("GET", "/v1/sandboxes/big", None);
    assert_eq!(got["disk_size_bytes"], 3u64 << 30, "{got}");
    // Hibernated and started again, it keeps its disk and filesystem.
    d.kiln_ok(&["stop", "big"]);
    d.kiln_ok(&["start", "big"]);
    assert_eq!(guest_sizes_mib(&d, "big"), (fs, disk));
    assert!(d.log().contains("disk and filesystem grown online"));

    // QEMU killed while the disk grows: the copy is removed and the create boots cold, saying why.
    let before: HashSet<u32> = d.qemu_pids().into_iter().collect();
    let killer = {
        let dir = d.data_dir().to_path_buf();
        let log = d.data_dir().join("daemon.log");
        std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(120);
            let needle = "holding at create.disk_resized";
            while Instant::now() < deadline {
                let held = std::fs::read_to_string(&log)
                    .unwrap_or_default()
                    .matches(needle)
                    .count();
                if held >= 2 {
                    for pid in common::qemu_pids_under(&dir) {
                        if !before.contains(&pid) {
                            // SAFETY: kill(2) of the copy's QEMU this test's daemon started.
                            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                            return true;
                        }
                    }
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            false
        })
    };
    let cold = create(&d, json!({"name": "cold", "disk_size_gib": 2}));
    assert!(killer.join().expect("killer"), "no copy's QEMU was killed");
    assert_eq!(cold["boot"]["mode"], "cold", "{cold}");
    let reason = cold["boot"]["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("growing the disk"), "{cold}");
    assert!(
        d.log()
            .contains("growing the disk of the resumed copy failed"),
        "{}",
        common::tail(&d.log(), 30)
    );
    // The cold boot grew its filesystem at boot; one sandbox of that name, one template snapshot.
    let (fs, disk) = guest_sizes_mib(&d, "cold");
    assert_eq!(disk, 2 << 10);
    assert!(fs > 1900, "df shows {fs} MiB");
    let (_, list) = d.api("GET", "/v1/sandboxes", None);
    assert_eq!(list.as_array().map(Vec::len), Some(3), "{list}");
    assert_eq!(template_snapshot_dirs(&d).len(), 1);
}

#[test]
fn other_memory_sizes_and_vcpus_resume_one_template_snapshot() {
    require_image("tiny");
    // Default shape: 256 MiB with room to 512 (headroom 2), 1 vCPU of 2.
    let d = Daemon::start_env(&["--max-vcpus", "2"], &[("KILN_TEMPLATE_SNAPSHOTS", "on")]);
    assert!(d.log().contains("template snapshot ready"));
    let dirs = template_snapshot_dirs(&d);
    assert_eq!(dirs.len(), 1, "{dirs:?}");
    let base = create(&d, json!({"name": "base"}));
    let m320 = create(&d, json!({"name": "m320", "memory_mib": 320}));
    let m448 = create(&d, json!({"name": "m448", "memory_mib": 448, "cpus": 2}));
    for v in [&base, &m320, &m448] {
        assert_eq!(v["boot"]["mode"], "resume", "{v}");
        assert_eq!(v["boot"]["snapshot"], dirs[0].as_str(), "{v}");
    }
    assert!(
        m448["boot"]["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("resized to 448 MiB and 2 vCPU(s)"),
        "{m448}"
    );
    assert_eq!(m320["memory_mib"], 320);
    assert_eq!(
        (m448["memory_mib"].clone(), m448["cpus"].clone()),
        (json!(448), json!(2))
    );
    let (t256, t320, t448) = (
        mem_total_mib(&d, "base"),
        mem_total_mib(&d, "m320"),
        mem_total_mib(&d, "m448"),
    );
    eprintln!("MemTotal: {t256} / {t320} / {t448} MiB");
    // Each guest sees what it asked for (less what its kernel keeps, the same in all three).
    assert!(t256 <= 256 && t256 > 150, "{t256}");
    assert!(t320.abs_diff(t256 + 64) <= 8, "{t320} vs {t256}");
    assert!(t448.abs_diff(t256 + 192) <= 8, "{t448} vs {t256}");
    assert_eq!(run(&d, "m448", "nproc"), "2");
    assert_eq!(run(&d, "m320", "nproc"), "1");
    // Outside what the snapshot can serve (less memory than it holds): a template snapshot of its own.
    let m192 = create(&d, json!({"name": "m192", "memory_mib": 192}));
    assert_eq!(m192["boot"]["mode"], "resume", "{m192}");
    assert_ne!(m192["boot"]["snapshot"], dirs[0].as_str(), "{m192}");
    assert_eq!(template_snapshot_dirs(&d).len(), 2);
}
