//! Invariant checks for fault tests: exactly the expected sandboxes and snapshots exist and work, and
//! nothing leaked (QEMU processes, sandbox or snapshot directories).

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::Daemon;

pub fn sh(d: &Daemon, sb: &str, cmd: &str) -> (u16, Value) {
    d.api(
        "POST",
        &format!("/v1/sandboxes/{sb}/exec"),
        Some(json!({ "cmd": cmd })),
    )
}

pub fn sh_ok(d: &Daemon, sb: &str, cmd: &str) -> String {
    let (status, v) = sh(d, sb, cmd);
    assert_eq!(status, 200, "exec in {sb} failed: {v}");
    assert_eq!(v["exit_code"], 0, "`{cmd}` in {sb}: {v}");
    v["stdout"].as_str().unwrap_or_default().to_string()
}

pub fn list_names(d: &Daemon, path: &str, key: &str) -> BTreeMap<String, Value> {
    let (status, v) = d.api("GET", path, None);
    assert_eq!(status, 200, "{v}");
    v.as_array()
        .expect("list is an array")
        .iter()
        .map(|s| (s[key].as_str().unwrap_or_default().to_string(), s.clone()))
        .collect()
}

pub fn dir_names(dir: PathBuf) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}

/// The snapshot directories of `d`'s data directory, without the daemon's own template snapshots
/// (`template-*`), which it keeps on purpose and never lists.
pub fn snapshot_dirs(d: &Daemon) -> BTreeSet<String> {
    let mut names = dir_names(d.data_dir().join("snapshots"));
    names.retain(|n| !n.starts_with("template-"));
    names
}

/// What must exist: sandboxes by name with the marker in /root/marker, and snapshots by id.
#[derive(Default, Clone)]
pub struct World {
    pub running: BTreeMap<String, String>,
    pub stopped: BTreeMap<String, String>,
    pub snapshots: BTreeSet<String>,
}

#[derive(Default)]
pub struct Tally {
    pub attempted: usize,
    pub survived: usize,
    pub lost: usize,
}

impl Tally {
    pub fn report(&self, test: &str, what: &str) {
        println!(
            "RELIABILITY {test} {what} attempted={} survived={} lost={}",
            self.attempted, self.survived, self.lost
        );
    }
}

/// Checks that exactly the world's sandboxes and snapshots exist and work, and that no QEMU process,
/// sandbox directory or snapshot directory is left over. Counts every object checked in `tally`.
pub fn check_world(d: &Daemon, w: &World, tally: &mut Tally, ctx: &str) {
    let mut problems = Vec::new();
    let sandboxes = list_names(d, "/v1/sandboxes", "name");
    for (name, marker, want) in w
        .running
        .iter()
        .map(|(n, m)| (n, m, "running"))
        .chain(w.stopped.iter().map(|(n, m)| (n, m, "stopped")))
    {
        tally.attempted += 1;
        let state = sandboxes
            .get(name)
            .map(|s| s["state"].as_str().unwrap_or("?").to_string());
        let ok = match state.as_deref() {
            Some(s) if s == want && want == "running" => {
                let (status, v) = sh(d, name, "cat /root/marker");
                let good = status == 200 && v["stdout"].as_str() == Some(&format!("{marker}\n"));
                if !good {
                    problems.push(format!("{name}: marker unreadable: {status} {v}"));
                }
                good
            }
            Some(s) if s == want => true,
            other => {
                problems.push(format!("{name}: expected {want}, found {other:?}"));
                false
            }
        };
        if ok {
            tally.survived += 1;
        } else {
            tally.lost += 1;
        }
    }
    let expected: BTreeSet<&String> = w.running.keys().chain(w.stopped.keys()).collect();
    for name in sandboxes.keys() {
        if !expected.contains(name) {
            problems.push(format!("unexpected sandbox {name}: {}", sandboxes[name]));
        }
    }
    let snaps = list_names(d, "/v1/snapshots", "id");
    for s in &w.snapshots {
        tally.attempted += 1;
        if snaps.contains_key(s) {
            tally.survived += 1;
        } else {
            tally.lost += 1;
            problems.push(format!("snapshot {s} is gone"));
        }
    }
    let snap_ids: BTreeSet<String> = snaps.keys().cloned().collect();
    if snap_ids != w.snapshots {
        problems.push(format!(
            "snapshots {snap_ids:?}, expected {:?}",
            w.snapshots
        ));
    }
    // No debris: directories match the records exactly.
    let ids: BTreeSet<String> = sandboxes
        .values()
        .map(|s| s["id"].as_str().unwrap_or_default().to_string())
        .collect();
    let sb_dirs = dir_names(d.data_dir().join("sandboxes"));
    if sb_dirs != ids {
        problems.push(format!("sandbox dirs {sb_dirs:?} != sandbox ids {ids:?}"));
    }
    let snap_dirs = snapshot_dirs(d);
    if snap_dirs != w.snapshots {
        problems.push(format!("snapshot dirs {snap_dirs:?} != {:?}", w.snapshots));
    }
    // Every QEMU belongs to a running sandbox (the harness finds them by the data directory).
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut pids = d.qemu_pids();
    while pids.len() != w.running.len() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
        pids = d.qemu_pids();
    }
    if pids.len() != w.running.len() {
        problems.push(format!(
            "{} QEMU processes for {} running sandboxes",
            pids.len(),
            w.running.len()
        ));
    }
    assert!(
        problems.is_empty(),
        "{ctx}: {}\ndaemon log:\n{}",
        problems.join("\n"),
        super::tail(&d.log(), 40)
    );
}
