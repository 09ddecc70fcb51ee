//! Capacity counts each sandbox once while a fork or a rollback starts it (issue 15 follow-up). A fork
//! reserved for all its children and held the whole reservation until every child was recorded, and a
//! rollback that recreates (or restarts) its source inserted (or marked) the row before releasing its
//! reservation, so for the whole start a child counted as its row and as pending: under
//! `--max-sandboxes 3` a create beside a one-child fork of one sandbox was refused "3 sandboxes are
//! running or starting" with two there. Each share now leaves the reservation as its row appears; the
//! capacity gauge (`GET /metrics`, the same count `try_reserve` makes) is checked while the start is held
//! by a fault point, and after success and after a failed child (nothing leaks).

mod common;

use std::time::Duration;

use common::{require_image, Daemon};
use serde_json::{json, Value};

/// (sandboxes, MiB) the capacity check counts now, as `GET /metrics` reports them.
fn used(d: &Daemon) -> (u64, u64) {
    let (status, body) = d.http("GET", "/metrics", None, "text/plain");
    assert_eq!(status, 200);
    let text = String::from_utf8_lossy(&body).into_owned();
    let value = |name: &str| {
        let key = format!("{name}{{kind=\"used\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&key))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or_else(|| panic!("{key} not in /metrics:\n{text}")) as u64
    };
    (
        value("kiln_capacity_sandboxes"),
        value("kiln_capacity_memory_mib"),
    )
}

fn holds(d: &Daemon, point: &str) -> usize {
    d.log().matches(&format!("holding at {point}")).count()
}

fn wait_hold(d: &Daemon, point: &str, count: usize) {
    assert!(
        d.wait_log(
            &format!("holding at {point}"),
            count,
            Duration::from_secs(180)
        ),
        "never held at {point} ({count}):\n{}",
        common::tail(&d.log(), 30)
    );
}

fn create_x(d: &Daemon, name: &str) -> (u16, Value) {
    d.api(
        "POST",
        "/v1/sandboxes",
        Some(json!({"name": name, "memory_mib": 128})),
    )
}

#[test]
fn fork_children_count_once_and_release_everything() {
    require_image("tiny");
    let d = Daemon::start_env(
        &["--max-sandboxes", "3", "--warm-spares", "0"],
        &[(
            "KILN_FAULTS",
            "hold.resume.launched=5000,qemu.kill_after_launch=b-2",
        )],
    );
    d.create(&["--name", "src", "--memory", "128"]);
    assert_eq!(used(&d), (1, 128));
    let before = holds(&d, "resume.launched");
    std::thread::scope(|s| {
        let fork = s.spawn(|| {
            d.api(
                "POST",
                "/v1/sandboxes/src/fork",
                Some(json!({"count": 1, "name": "a"})),
            )
        });
        // The child is recorded (creating) and its QEMU runs, held: src and a-1 count, once each.
        wait_hold(&d, "resume.launched", before + 1);
        assert_eq!(used(&d), (2, 256), "{}", common::tail(&d.log(), 20));
        // So one more fits under --max-sandboxes 3.
        let (status, v) = create_x(&d, "x");
        assert_eq!(status, 201, "{v}\n{}", common::tail(&d.log(), 20));
        let (status, v) = fork.join().unwrap();
        assert_eq!(status, 201, "{v}");
    });
    assert_eq!(used(&d), (3, 384));
    d.kiln_ok(&["sandbox", "delete", "-y", "x"]);
    d.kiln_ok(&["sandbox", "delete", "-y", "a-1"]);
    assert_eq!(used(&d), (1, 128));
    // Two children, the second's QEMU killed at launch: the fork fails and leaves nothing counted.
    let before = holds(&d, "resume.launched");
    std::thread::scope(|s| {
        let fork = s.spawn(|| {
            d.api(
                "POST",
                "/v1/sandboxes/src/fork",
                Some(json!({"count": 2, "name": "b"})),
            )
        });
        wait_hold(&d, "resume.launched", before + 1);
        let during = used(&d);
        assert!(
            during.0 <= 3 && during.1 <= 384,
            "{during:?} counted for src and two children"
        );
        let (status, v) = fork.join().unwrap();
        assert!(status >= 400, "{status} {v}");
    });
    assert_eq!(used(&d), (1, 128), "{}", common::tail(&d.log(), 20));
    assert_eq!(d.qemu_pids().len(), 1);
}

#[test]
fn rollback_counts_its_sandbox_once() {
    require_image("tiny");
    let d = Daemon::start_env(
        &["--max-sandboxes", "3", "--warm-spares", "0"],
        &[("KILN_FAULTS", "hold.restore.recorded=5000")],
    );
    d.create(&["--name", "r", "--memory", "128"]);
    d.kiln_ok(&["snapshot", "create", "r", "--name", "s1"]);
    d.kiln_ok(&["sandbox", "delete", "-y", "r"]);
    d.create(&["--name", "y", "--memory", "128"]);
    assert_eq!(used(&d), (1, 128));
    // Rolling back to s1 recreates r: its row counts, its reservation no longer.
    std::thread::scope(|s| {
        let restore = s.spawn(|| {
            d.api(
                "POST",
                "/v1/snapshots/s1/restore",
                Some(json!({"resume": true})),
            )
        });
        wait_hold(&d, "restore.recorded", 1);
        assert_eq!(used(&d), (2, 256), "{}", common::tail(&d.log(), 20));
        let (status, v) = create_x(&d, "z");
        assert_eq!(status, 201, "{v}\n{}", common::tail(&d.log(), 20));
        let (status, v) = restore.join().unwrap();
        assert_eq!(status, 200, "{v}");
    });
    assert_eq!(used(&d), (3, 384));
    // A stopped sandbox does not count; rolled back, it counts once while it starts.
    d.kiln_ok(&["snapshot", "create", "y", "--name", "s2"]);
    d.kiln_ok(&["stop", "y"]);
    assert_eq!(used(&d), (2, 256));
    std::thread::scope(|s| {
        let restore = s.spawn(|| {
            d.api(
                "POST",
                "/v1/snapshots/s2/restore",
                Some(json!({"resume": true})),
            )
        });
        wait_hold(&d, "restore.recorded", 2);
        assert_eq!(used(&d), (3, 384), "{}", common::tail(&d.log(), 20));
        let (status, v) = restore.join().unwrap();
        assert_eq!(status, 200, "{v}");
    });
    assert_eq!(used(&d), (3, 384));
    assert_eq!(d.kiln_ok(&["exec", "r", "--", "hostname"]).trim(), "r");
}
