//! Warm spares on real VMs: a resume that continues a copy prepared ahead of time must give the same
//! machine as a cold resume (state where the snapshot was, its own identity), stay hidden until then, and
//! never cost a client anything: spares go when their snapshot goes, when the daemon restarts, and when a
//! client's request needs their room.

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::{require_image, Daemon};
use serde_json::{json, Value};

fn run(d: &Daemon, sb: &str, cmd: &str) -> String {
    d.kiln_ok(&["exec", sb, "--", "sh", "-c", cmd])
}

fn spares_of(d: &Daemon, snapshot: &str) -> u64 {
    let (status, v) = d.api("GET", &format!("/v1/snapshots/{snapshot}"), None);
    assert_eq!(status, 200, "{v}");
    v["warm_spares"].as_u64().expect("warm_spares")
}

fn wait_spares(d: &Daemon, snapshot: &str, want: u64) {
    let deadline = Instant::now() + Duration::from_secs(90);
    while spares_of(d, snapshot) != want {
        assert!(
            Instant::now() < deadline,
            "snapshot {snapshot} never had {want} warm spare(s); daemon log:\n{}",
            common::tail(&d.log(), 30)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn names(d: &Daemon) -> Vec<String> {
    let (_, v) = d.api("GET", "/v1/sandboxes", None);
    let mut names: Vec<String> = v
        .as_array()
        .expect("list")
        .iter()
        .map(|s| s["name"].as_str().unwrap_or_default().to_string())
        .collect();
    names.sort();
    names
}

fn sandbox_dirs(d: &Daemon) -> usize {
    std::fs::read_dir(d.data_dir().join("sandboxes"))
        .map(|r| r.count())
        .unwrap_or(0)
}

fn counter(d: &Daemon, sb: &str) -> u64 {
    run(d, sb, "cat /tmp/n").trim().parse().expect("counter")
}

#[test]
fn a_warm_spare_resumes_as_its_own_machine_and_never_stands_in_the_way() {
    require_image("tiny");
    let warm = [("KILN_WARM_SPARES", "2")];
    let mut d = Daemon::start_env(&[], &warm);
    // Booted, so that no spare of the template's snapshot joins the count below (create_resume.rs).
    d.create(&["--name", "src", "--boot"]);
    run(&d, "src", "echo base > /root/shared; echo t > /tmp/mark; (i=0; while true; do i=$((i+1)); echo $i > /tmp/n.new; mv /tmp/n.new /tmp/n; sleep 0.1; done) >/dev/null 2>&1 &");
    std::thread::sleep(Duration::from_millis(500));
    // The counter read just before the snapshot is a lower bound of the one it holds.
    let at_snapshot = counter(&d, "src");
    d.kiln_ok(&["snapshot", "create", "src", "--name", "s1"]);

    // The first resume is cold and leaves a spare behind, which clients do not see.
    assert_eq!(spares_of(&d, "s1"), 0);
    d.kiln_ok(&["snapshot", "resume", "s1", "--name", "c1"]);
    wait_spares(&d, "s1", 1);
    assert_eq!(names(&d), ["c1", "src"]);
    assert_eq!(d.qemu_pids().len(), 3, "src, c1 and one spare");
    let cold = d.log().matches("sandbox resumed from snapshot").count();

    // The next resume takes the spare: the same state, a new machine.
    let (status, c2) = d.api(
        "POST",
        "/v1/snapshots/s1/resume",
        Some(json!({"name": "c2", "labels": {"team": "x"}})),
    );
    assert_eq!(status, 201, "{c2}");
    assert_eq!(
        d.log().matches("sandbox resumed from a warm spare").count(),
        1
    );
    assert_eq!(
        d.log().matches("sandbox resumed from snapshot").count(),
        cold
    );
    assert_eq!(
        (c2["name"].as_str(), c2["state"].as_str()),
        (Some("c2"), Some("running"))
    );
    assert_eq!(c2["labels"]["team"], "x");
    assert_eq!(names(&d), ["c1", "c2", "src"]);
    assert_eq!(run(&d, "c2", "cat /root/shared /tmp/mark"), "base\nt\n");
    assert_eq!(run(&d, "c2", "hostname").trim(), "c2");
    let n = counter(&d, "c2");
    assert!(
        n >= at_snapshot && n < at_snapshot + 100,
        "counter {n} (snapshot at {at_snapshot})"
    );
    std::thread::sleep(Duration::from_millis(500));
    assert!(counter(&d, "c2") > n, "the counter stopped in c2");
    let mut ids = HashSet::new();
    let mut randoms = HashSet::new();
    for sb in ["src", "c1", "c2"] {
        ids.insert(run(&d, sb, "cat /etc/machine-id"));
        randoms.insert(run(&d, sb, "head -c 16 /dev/urandom | od -An -tx1"));
    }
    assert_eq!((ids.len(), randoms.len()), (3, 3), "identity repeats");
    run(&d, "c2", "echo mine > /root/private");
    assert!(!d
        .kiln(&["exec", "c1", "--", "cat", "/root/private"])
        .status
        .success());

    // Taken from a spare, c2 is an ordinary sandbox: hibernate, snapshot and resume work.
    d.kiln_ok(&["stop", "c2"]);
    d.kiln_ok(&["start", "c2"]);
    assert_eq!(run(&d, "c2", "hostname; cat /root/private"), "c2\nmine\n");
    d.kiln_ok(&["snapshot", "create", "c2", "--name", "s2"]);
    d.kiln_ok(&["snapshot", "resume", "s2", "--name", "c3"]);
    assert_eq!(run(&d, "c3", "cat /root/private"), "mine\n");

    // A name clash is the client's error, and the spare stays for the next request.
    wait_spares(&d, "s1", 1);
    let (status, v) = d.api(
        "POST",
        "/v1/snapshots/s1/resume",
        Some(json!({"name": "c1"})),
    );
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (409, Some("sandbox_name_taken")),
        "{v}"
    );
    assert_eq!(spares_of(&d, "s1"), 1);

    // Deleting the snapshot ends its spare; only clients' sandboxes keep its files.
    let (status, v) = d.api("DELETE", "/v1/snapshots/s1", None);
    assert_eq!(status, 200, "{v}");
    let mut kept: Vec<&str> = v["files_kept_for"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    kept.sort();
    assert_eq!(kept, ["c1", "c2"]);
    wait_spares(&d, "s2", 1);
    assert_eq!(
        d.qemu_pids().len(),
        5,
        "src, c1, c2, c3 and the spare of s2"
    );

    // A daemon killed with a spare comes back without it.
    d.restart_with_env(&[("KILN_WARM_SPARES", "2"), ("KILN_MAX_SANDBOXES", "6")]);
    assert_eq!(names(&d), ["c1", "c2", "c3", "src"]);
    assert_eq!(d.qemu_pids().len(), 4);
    assert_eq!(sandbox_dirs(&d), 4);
    assert_eq!(spares_of(&d, "s2"), 0);

    // At the limit, a spare gives way to a client's sandbox.
    d.kiln_ok(&["snapshot", "resume", "s2", "--name", "c4"]);
    wait_spares(&d, "s2", 1);
    assert_eq!(d.qemu_pids().len(), 6);
    d.create(&["--name", "late"]);
    assert_eq!(spares_of(&d, "s2"), 0);
    assert_eq!(names(&d), ["c1", "c2", "c3", "c4", "late", "src"]);
    assert_eq!(d.qemu_pids().len(), 6);
    assert_eq!(run(&d, "late", "echo ok"), "ok\n");
}
