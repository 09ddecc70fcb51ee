//! A sandbox under a checkpoint policy keeps a bounded disk chain (issue 16 follow-up): every capture
//! freezes the top qcow2 layer and puts a new one over it, so without compaction the running chain grew
//! by one layer (and one open file in QEMU) per checkpoint, and layers of pruned checkpoints could never
//! be freed. The daemon streams the layers above the template rootfs into the active layer once the chain
//! is long; the guest's files stay intact, also across stop/start and a rewind.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{require_image, Daemon};
use serde_json::Value;

fn guest(d: &Daemon, sb: &str, cmd: &str) -> String {
    d.kiln_ok(&["exec", sb, "--", "sh", "-c", cmd])
        .trim()
        .to_string()
}

fn checkpoint_ids(d: &Daemon, sb: &str) -> Vec<String> {
    let out = d.kiln_ok(&["--json", "sandbox", "checkpoints", sb]);
    serde_json::from_str::<Value>(&out)
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_str().unwrap().to_string())
        .collect()
}

/// Disk images (qcow2 layers, the rootfs link) QEMU holds open in the sandbox's directory.
fn open_layers(dir: &Path) -> BTreeSet<PathBuf> {
    let pids = common::qemu_pids_under(dir);
    assert_eq!(
        pids.len(),
        1,
        "QEMU processes of {}: {pids:?}",
        dir.display()
    );
    let mut open = BTreeSet::new();
    for fd in std::fs::read_dir(format!("/proc/{}/fd", pids[0]))
        .unwrap()
        .flatten()
    {
        if let Ok(target) = std::fs::read_link(fd.path()) {
            // A file unlinked while open still holds its data: it counts.
            let name = target.to_string_lossy().to_string();
            let name = name.strip_suffix(" (deleted)").unwrap_or(&name).to_string();
            let target = PathBuf::from(&name);
            if target.starts_with(dir) && (name.ends_with(".qcow2") || name.ends_with(".img")) {
                open.insert(target);
            }
        }
    }
    open
}

/// qcow2 files in the sandbox's directory and its `layers/` (inherited layers).
fn qcow2_files(dir: &Path) -> BTreeSet<PathBuf> {
    [dir.to_path_buf(), dir.join("layers")]
        .iter()
        .flat_map(|d| std::fs::read_dir(d).into_iter().flatten().flatten())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "qcow2"))
        .collect()
}

fn sums(d: &Daemon, sb: &str, files: &[String]) -> String {
    guest(d, sb, &format!("cd /root && md5sum {}", files.join(" ")))
}

#[test]
fn checkpoints_keep_the_disk_chain_bounded_and_the_data_intact() {
    require_image("tiny");
    let d = Daemon::start_with(&["--warm-spares", "0"]);
    d.create(&["--name", "src", "--memory", "256"]);
    d.kiln_ok(&["snapshot", "create", "src", "--name", "base"]);
    d.kiln_ok(&["snapshot", "resume", "base", "--name", "w"]);
    let sb: Value = serde_json::from_str(&d.kiln_ok(&["--json", "sandbox", "get", "w"])).unwrap();
    let id = sb["id"].as_str().unwrap().to_string();
    let dir = d.data_dir().join("sandboxes").join(&id);
    let mut files = vec!["f0".to_string()];
    guest(&d, "w", "head -c 300000 /dev/urandom > /root/f0; sync");
    d.kiln_ok(&[
        "sandbox",
        "checkpoint-policy",
        "w",
        "--every",
        "2s",
        "--keep",
        "2",
    ]);
    // Checkpoints while the guest writes (each layer holds some data, some of it overwritten later).
    let mut seen = BTreeSet::new();
    let mut most_open = 0;
    let deadline = Instant::now() + Duration::from_secs(300);
    let wanted = 10;
    while seen.len() < wanted {
        assert!(
            Instant::now() < deadline,
            "{} of {wanted} checkpoints in 300 s:\n{}",
            seen.len(),
            common::tail(&d.log(), 30)
        );
        let n = files.len();
        let f = format!("f{n}");
        guest(
            &d,
            "w",
            &format!("head -c 200000 /dev/urandom > /root/{f}; head -c 4096 /dev/urandom >> /root/f0; sync"),
        );
        files.push(f);
        for c in checkpoint_ids(&d, "w") {
            seen.insert(c);
        }
        most_open = most_open.max(open_layers(&dir).len());
        std::thread::sleep(Duration::from_millis(700));
    }
    let expected = sums(&d, "w", &files);
    // One more checkpoint that holds every file; then the policy ends.
    let before: BTreeSet<String> = checkpoint_ids(&d, "w").into_iter().collect();
    let last = loop {
        assert!(
            Instant::now() < deadline,
            "no checkpoint after the last write"
        );
        let now = checkpoint_ids(&d, "w");
        if let Some(c) = now
            .iter()
            .find(|c| !before.contains(c.as_str()) && !seen.contains(c.as_str()))
        {
            break c.clone();
        }
        std::thread::sleep(Duration::from_millis(300));
    };
    d.kiln_ok(&["sandbox", "checkpoint-policy", "w", "--clear"]);
    // A checkpoint may still be under way when the policy is cleared; let it and its compaction end.
    std::thread::sleep(Duration::from_secs(3));
    let open = open_layers(&dir);
    let on_disk = qcow2_files(&dir);
    eprintln!(
        "{} checkpoints: QEMU holds {} layers (most seen {most_open}), {} qcow2 files in the sandbox dir",
        seen.len(),
        open.len(),
        on_disk.len()
    );
    // Without compaction: the rootfs, the base's layer and one per checkpoint (13+).
    assert!(
        open.len() <= 2 + 6 && most_open <= 2 + 6,
        "the running chain grew to {} layers (most {most_open}): {open:?}",
        open.len()
    );
    // Layers that left the chain are unlinked from the sandbox, so pruned checkpoints free them.
    let open_qcow2: BTreeSet<_> = open
        .iter()
        .filter(|p| p.extension().is_some_and(|x| x == "qcow2"))
        .cloned()
        .collect();
    assert_eq!(on_disk, open_qcow2, "layer files not in QEMU's chain");
    let kept = checkpoint_ids(&d, "w");
    assert!(kept.len() <= 2, "{kept:?}");
    let snaps: Vec<_> = std::fs::read_dir(d.data_dir().join("snapshots"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with("ckpt-"))
        .collect();
    assert!(snaps.len() <= 2, "checkpoint directories left: {snaps:?}");
    assert!(
        d.log().contains("disk chain compacted"),
        "no compaction logged"
    );

    // The data is intact: now, after a stop/start, and after a rewind to a checkpoint.
    assert_eq!(sums(&d, "w", &files), expected);
    d.kiln_ok(&["stop", "w"]);
    d.kiln_ok(&["start", "w"]);
    assert_eq!(sums(&d, "w", &files), expected);
    guest(&d, "w", "echo late > /root/late; sync");
    d.kiln_ok(&["sandbox", "rewind", "w", "--to", &last]);
    assert_eq!(sums(&d, "w", &files), expected);
    assert_eq!(guest(&d, "w", "ls /root/late 2>/dev/null | wc -l"), "0");
    // And a snapshot of the compacted sandbox resumes with the same data.
    d.kiln_ok(&[
        "snapshot", "create", "w", "--name", "after", "--type", "diff",
    ]);
    d.kiln_ok(&["snapshot", "resume", "after", "--name", "w2"]);
    assert_eq!(sums(&d, "w2", &files), expected);
}

/// Snapshots taken by hand compact the chain too (before, only the checkpoint task did, so a sandbox
/// snapshotted by hand kept one more open layer per snapshot): after eight snapshots QEMU holds at most
/// the bound, the guest's files are intact, and an early snapshot still resumes with its own data.
#[test]
fn manual_snapshots_keep_the_disk_chain_bounded() {
    require_image("tiny");
    let d = Daemon::start_with(&["--warm-spares", "0"]);
    d.create(&["--name", "m", "--memory", "256"]);
    let sb: Value = serde_json::from_str(&d.kiln_ok(&["--json", "sandbox", "get", "m"])).unwrap();
    let dir = d
        .data_dir()
        .join("sandboxes")
        .join(sb["id"].as_str().unwrap());
    let mut files = Vec::new();
    let mut first = String::new();
    for i in 0..8 {
        let f = format!("f{i}");
        guest(
            &d,
            "m",
            &format!("head -c 200000 /dev/urandom > /root/{f}; sync"),
        );
        files.push(f);
        if i == 0 {
            first = sums(&d, "m", &files);
        }
        d.kiln_ok(&["snapshot", "create", "m", "--name", &format!("s{i}")]);
    }
    let want = sums(&d, "m", &files);
    // Compaction runs in the background after the snapshot that made the chain long.
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut open = open_layers(&dir);
    while open.len() > 2 + 6 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(500));
        open = open_layers(&dir);
    }
    eprintln!("after 8 snapshots QEMU holds {} layers", open.len());
    assert!(
        open.len() <= 2 + 6,
        "the chain grew to {} layers: {open:?}\n{}",
        open.len(),
        common::tail(&d.log(), 20)
    );
    assert_eq!(sums(&d, "m", &files), want);
    d.kiln_ok(&["snapshot", "resume", "s0", "--name", "early"]);
    assert_eq!(sums(&d, "early", &files[..1]), first);
    d.kiln_ok(&["stop", "m"]);
    d.kiln_ok(&["start", "m"]);
    assert_eq!(sums(&d, "m", &files), want);
}

/// Fork captures compact the chain too (before, only snapshots and checkpoints asked for it, so each
/// fork of a sandbox left one more layer open in its QEMU, without bound): after eight forks the source
/// holds at most the bound, and its files and the last child's are intact.
#[test]
fn forks_keep_the_source_disk_chain_bounded() {
    require_image("tiny");
    let d = Daemon::start_with(&["--warm-spares", "0"]);
    d.create(&["--name", "src", "--memory", "256"]);
    let sb: Value = serde_json::from_str(&d.kiln_ok(&["--json", "sandbox", "get", "src"])).unwrap();
    let dir = d
        .data_dir()
        .join("sandboxes")
        .join(sb["id"].as_str().unwrap());
    let mut files = Vec::new();
    for i in 0..8 {
        let f = format!("f{i}");
        guest(
            &d,
            "src",
            &format!("head -c 200000 /dev/urandom > /root/{f}; sync"),
        );
        files.push(f);
        d.kiln_ok(&["fork", "src", "--name", &format!("k{i}")]);
        if i < 7 {
            d.kiln_ok(&["sandbox", "delete", "-y", &format!("k{i}-1")]);
        }
    }
    let want = sums(&d, "src", &files);
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut open = open_layers(&dir);
    while open.len() > 2 + 6 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(500));
        open = open_layers(&dir);
    }
    eprintln!(
        "after 8 forks the source's QEMU holds {} layers",
        open.len()
    );
    assert!(
        open.len() <= 2 + 6,
        "the chain grew to {} layers: {open:?}\n{}",
        open.len(),
        common::tail(&d.log(), 20)
    );
    assert!(
        d.log().contains("disk chain compacted"),
        "no compaction logged"
    );
    assert_eq!(sums(&d, "src", &files), want);
    assert_eq!(sums(&d, "k7-1", &files), want);
}

/// QEMU's `query-jobs` over its QMP socket (only while no daemon talks to it).
fn qmp_jobs(sock: &Path) -> Vec<Value> {
    use std::io::{BufRead, BufReader, Write};
    let stream = std::os::unix::net::UnixStream::connect(sock).expect("connect QMP");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut w = stream.try_clone().unwrap();
    let mut r = BufReader::new(stream);
    let mut answer = |cmd: &str| -> Value {
        writeln!(w, "{{\"execute\":\"{cmd}\"}}").unwrap();
        loop {
            let mut line = String::new();
            assert!(r.read_line(&mut line).unwrap() > 0, "QMP closed");
            let v: Value = serde_json::from_str(&line).unwrap();
            if v.get("return").is_some() || v.get("error").is_some() {
                return v;
            }
        }
    };
    answer("qmp_capabilities");
    answer("query-jobs")["return"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// Snapshots `sb` with a new file each time until the daemon logs that it streams the chain; returns the
/// files' checksums from before that snapshot (a stream holds the sandbox's lifecycle lock, which a
/// command waits for).
fn snapshot_until_streaming(d: &Daemon, sb: &str, tag: &str, files: &mut Vec<String>) -> String {
    const STREAMING: &str = "streaming the disk chain into its active layer";
    let seen = d.log().matches(STREAMING).count();
    for i in 0..10 {
        let f = format!("{tag}{i}");
        guest(
            d,
            sb,
            &format!("head -c 1000000 /dev/urandom > /root/{f}; sync"),
        );
        files.push(f);
        let want = sums(d, sb, files);
        d.kiln_ok(&["snapshot", "create", sb, "--name", &format!("{tag}-s{i}")]);
        if d.wait_log(STREAMING, seen + 1, Duration::from_secs(3)) {
            return want;
        }
    }
    panic!(
        "no compaction started after 10 snapshots\n{}",
        common::tail(&d.log(), 20)
    );
}

/// A daemon that dies while it compacts a chain leaves QEMU's stream running, writing the active layer.
/// The next daemon must end it before a capture freezes that layer (the snapshot failed, "Node is busy:
/// in use by block job"; CI's source QEMU exited in that window), and must record a stream that completed while no daemon watched;
/// the guest's files stay intact in the source, its snapshots and across stop/start.
#[test]
fn streams_left_by_a_dead_daemon_are_settled_before_the_next_capture() {
    require_image("tiny");
    // 64 KiB/s: the stream outlives the daemon by minutes.
    let mut d = Daemon::start_env(
        &["--warm-spares", "0"],
        &[("KILN_FAULTS", "compact.stream_speed=65536")],
    );
    d.create(&["--name", "m", "--memory", "256"]);
    let mut files = Vec::new();
    let want = snapshot_until_streaming(&d, "m", "a", &mut files);
    d.kill_hard();
    d.restart_with_env(&[]);
    d.kiln_ok(&["snapshot", "create", "m", "--name", "after-crash"]);
    assert!(
        d.log()
            .contains("ended disk streams a daemon that died left running"),
        "{}",
        common::tail(&d.log(), 30)
    );
    assert_eq!(sums(&d, "m", &files), want);
    d.kiln_ok(&["snapshot", "resume", "after-crash", "--name", "copy"]);
    assert_eq!(sums(&d, "copy", &files), want);

    // Fast enough to complete while no daemon runs: the next one finds QEMU's chain short.
    d.restart_with_env(&[("KILN_FAULTS", "compact.stream_speed=8388608")]);
    let sb: Value = serde_json::from_str(&d.kiln_ok(&["--json", "sandbox", "get", "m"])).unwrap();
    let dir = d
        .data_dir()
        .join("sandboxes")
        .join(sb["id"].as_str().unwrap());
    const RECORDED: &str =
        "recorded a disk chain compaction that completed while no daemon watched it";
    let recorded = d.log().matches(RECORDED).count();
    let want = snapshot_until_streaming(&d, "m", "b", &mut files);
    d.kill_hard();
    // With no daemon, QEMU's own job list says when the stream is done.
    let qmp = dir.join("vm/qmp.sock");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let jobs = qmp_jobs(&qmp);
        if jobs.iter().any(|j| j["status"] == "concluded") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the stream did not conclude: {jobs:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    d.restart_with_env(&[]);
    d.kiln_ok(&["snapshot", "create", "m", "--name", "after-complete"]);
    assert_eq!(
        d.log().matches(RECORDED).count(),
        recorded + 1,
        "{}",
        common::tail(&d.log(), 30)
    );
    assert!(
        !d.log().contains("could not close a merged disk layer"),
        "{}",
        common::tail(&d.log(), 30)
    );
    let open = open_layers(&dir);
    assert!(
        open.len() <= 3,
        "QEMU still holds the merged layers: {open:?}"
    );
    assert_eq!(sums(&d, "m", &files), want);
    d.kiln_ok(&["snapshot", "resume", "after-complete", "--name", "copy2"]);
    assert_eq!(sums(&d, "copy2", &files), want);
    d.kiln_ok(&["stop", "m"]);
    d.kiln_ok(&["start", "m"]);
    assert_eq!(sums(&d, "m", &files), want);
}
