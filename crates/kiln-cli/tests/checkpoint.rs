//! Continuous checkpoints and rewind (issue 16) on real VMs: a policy takes memory snapshots of a running
//! sandbox in the background (memory deltas for a resumed copy, each with the pause it cost), keeps the
//! newest N, survives a daemon restart, and `kiln sandbox rewind` rolls the sandbox back to one of them
//! (same id and name) with the memory (a counter, /dev/shm) and disk state of that moment.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::{require_image, Daemon};
use serde_json::Value;

fn guest(d: &Daemon, sb: &str, cmd: &str) -> String {
    d.kiln_ok(&["exec", sb, "--", "sh", "-c", cmd])
        .trim()
        .to_string()
}

fn counter(d: &Daemon, sb: &str) -> u64 {
    guest(d, sb, "cat /tmp/n").parse().expect("counter value")
}

fn checkpoints(d: &Daemon, sb: &str) -> Vec<Value> {
    let out = d.kiln_ok(&["--json", "sandbox", "checkpoints", sb]);
    serde_json::from_str::<Value>(&out)
        .unwrap()
        .as_array()
        .cloned()
        .unwrap()
}

/// Waits for `n` checkpoints not in `seen` (adding every id it sees); returns the newest.
fn wait_new(d: &Daemon, sb: &str, seen: &mut BTreeSet<String>, n: usize) -> Value {
    let deadline = Instant::now() + Duration::from_secs(240);
    let mut fresh = 0;
    loop {
        let list = checkpoints(d, sb);
        for c in &list {
            if seen.insert(c["id"].as_str().unwrap().to_string()) {
                fresh += 1;
            }
        }
        if fresh >= n {
            return list.last().cloned().unwrap();
        }
        assert!(
            Instant::now() < deadline,
            "{fresh} of {n} new checkpoints of {sb} in 240 s:\n{}",
            common::tail(&d.log(), 30)
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

fn marks(d: &Daemon, sb: &str) -> String {
    guest(d, sb, "cat /dev/shm/mark /root/mark | tr '\\n' ' '")
}

#[test]
fn checkpoints_are_taken_pruned_kept_over_a_restart_and_rewind_the_sandbox() {
    require_image("tiny");
    let mut d = Daemon::start_with(&["--warm-spares", "0"]);
    d.create(&["--name", "src", "--memory", "256"]);
    d.kiln_ok(&["snapshot", "create", "src", "--name", "base"]);
    // A copy resumed from a snapshot: its checkpoints are memory deltas.
    d.kiln_ok(&["snapshot", "resume", "base", "--name", "w"]);
    let id = d.kiln_ok(&["--json", "sandbox", "get", "w"]);
    let id = serde_json::from_str::<Value>(&id).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    d.kiln_ok(&[
        "process", "start", "w", "--", "sh", "-c",
        "i=0; while true; do i=$((i+1)); echo $i > /tmp/n.new; mv /tmp/n.new /tmp/n; sleep 0.1; done",
    ]);
    guest(&d, "w", "echo A > /dev/shm/mark; echo A > /root/mark; sync");
    let mut seen = BTreeSet::new();
    d.kiln_ok(&[
        "sandbox",
        "checkpoint-policy",
        "w",
        "--every",
        "3s",
        "--keep",
        "3",
    ]);
    // The second one after the marks were written holds them.
    let a = wait_new(&d, "w", &mut seen, 2);
    let a_id = a["id"].as_str().unwrap().to_string();
    let at_a = counter(&d, "w");
    assert_eq!(a["labels"]["kiln.checkpoint"], id.as_str());
    let pause = a["pause_ms"].as_u64().expect("pause_ms on a checkpoint");
    eprintln!(
        "checkpoint {a_id}: pause {pause} ms, {} bytes",
        a["size_bytes"]
    );
    let (_, m) = common::read_manifest(
        &d.data_dir()
            .join("snapshots")
            .join(&a_id)
            .join("manifest.json"),
    );
    assert!(
        m["files"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f["role"] == "memory_delta"),
        "checkpoint {a_id} of a resumed copy holds no memory delta"
    );
    assert!(d.log().contains("checkpoint taken"), "no log line");

    // The policy is in the database: a restarted daemon goes on taking checkpoints.
    d.restart_hard();
    let sb: Value = serde_json::from_str(&d.kiln_ok(&["--json", "sandbox", "get", "w"])).unwrap();
    assert_eq!(sb["checkpoint_policy"]["every"], 3, "{sb}");
    assert_eq!(sb["checkpoint_policy"]["keep"], 3, "{sb}");
    guest(&d, "w", "echo B > /dev/shm/mark; echo B > /root/mark; sync");
    let b = wait_new(&d, "w", &mut seen, 2);
    let b_at = b["created_at"].as_str().unwrap().to_string();
    d.kiln_ok(&["sandbox", "checkpoint-policy", "w", "--clear"]);
    let list = checkpoints(&d, "w");
    // Retention: more were taken than are kept.
    assert!(seen.len() > 3, "only {} checkpoints taken", seen.len());
    assert!(list.len() <= 3, "{} checkpoints kept of 3", list.len());
    assert!(
        list.iter().any(|c| c["id"] == a_id.as_str()),
        "{a_id} was pruned too early"
    );
    for c in &list {
        assert!(c["pause_ms"].as_u64().is_some(), "{c}");
    }

    // Rewind to A: same sandbox, the memory and disk of that moment, the counter went back.
    let before = counter(&d, "w");
    assert!(before > at_a);
    assert_eq!(marks(&d, "w"), "B B");
    let out = d.kiln_ok(&["--json", "sandbox", "rewind", "w", "--to", &a_id]);
    let rewound: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(rewound["id"], id.as_str());
    assert_eq!(rewound["state"], "running");
    assert_eq!(marks(&d, "w"), "A A");
    // The counter runs on from A's value while the exec that reads it starts, so only "went back".
    let after = counter(&d, "w");
    assert!(
        after < before,
        "counter {after} after the rewind (at A {at_a}, before the rewind {before})"
    );
    std::thread::sleep(Duration::from_millis(700));
    assert!(
        counter(&d, "w") > after,
        "the counter stopped after the rewind"
    );

    // Forward again by time: the newest checkpoint at or before B's.
    d.kiln_ok(&["sandbox", "rewind", "w", "--to", &b_at]);
    assert_eq!(marks(&d, "w"), "B B");
    // Someone else's snapshot is refused.
    let bad = d.kiln(&["sandbox", "rewind", "w", "--to", "base"]);
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("rewind goes back only"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
}
