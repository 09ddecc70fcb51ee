//! Live fork on real VMs: independent children with their own identity.

mod common;

use std::time::Duration;

use common::{require_image, Daemon};
use serde_json::Value;

fn run(d: &Daemon, sb: &str, cmd: &str) -> String {
    d.kiln_ok(&["exec", sb, "--", "sh", "-c", cmd])
}

#[test]
fn forked_children_are_independent_machines() {
    require_image("tiny");
    let d = Daemon::start();
    d.create(&["--name", "src"]);
    run(&d, "src", "echo base > /root/shared; (i=0; while true; do i=$((i+1)); echo $i > /tmp/n.new; mv /tmp/n.new /tmp/n; sleep 0.1; done) >/dev/null 2>&1 &");
    std::thread::sleep(Duration::from_millis(700));
    let forked: Value = serde_json::from_str(
        &d.kiln_ok(&["--json", "fork", "src", "--count", "3", "--name", "kid"]),
    )
    .unwrap();
    let kids: Vec<String> = forked["sandboxes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(kids, ["kid-1", "kid-2", "kid-3"]);
    // No named snapshot is left behind.
    let snaps: Value = serde_json::from_str(&d.kiln_ok(&["--json", "snapshot", "list"])).unwrap();
    assert_eq!(snaps.as_array().unwrap().len(), 0);

    let mut ids = std::collections::HashSet::new();
    let mut randoms = std::collections::HashSet::new();
    for k in kids.iter().map(String::as_str).chain(["src"]) {
        assert_eq!(run(&d, k, "cat /root/shared"), "base\n");
        let hostname = run(&d, k, "hostname");
        assert_eq!(hostname.trim(), k);
        ids.insert(run(&d, k, "cat /etc/machine-id"));
        randoms.insert(run(&d, k, "head -c 16 /dev/urandom | od -An -tx1"));
    }
    assert_eq!(ids.len(), 4, "machine ids repeat across forks");
    assert_eq!(randoms.len(), 4, "random bytes repeat across forks");

    // Counters go on independently; writes stay private.
    run(&d, "kid-1", "echo mine > /root/private");
    for k in ["kid-2", "kid-3", "src"] {
        assert!(
            !d.kiln(&["exec", k, "--", "cat", "/root/private"])
                .status
                .success(),
            "{k} sees kid-1's file"
        );
    }
    let a: u64 = run(&d, "kid-2", "cat /tmp/n").trim().parse().unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let b: u64 = run(&d, "kid-2", "cat /tmp/n").trim().parse().unwrap();
    assert!(b > a);

    // A fork of a fork works; deleting the source breaks no child.
    let grand: Value =
        serde_json::from_str(&d.kiln_ok(&["--json", "fork", "kid-1", "--name", "grandkid"]))
            .unwrap();
    assert_eq!(grand["sandboxes"][0]["name"], "grandkid-1");
    assert_eq!(run(&d, "grandkid-1", "cat /root/private"), "mine\n");
    d.kiln_ok(&["sandbox", "delete", "-y", "src", "kid-1"]);
    assert_eq!(run(&d, "kid-3", "cat /root/shared"), "base\n");
    assert_eq!(run(&d, "grandkid-1", "cat /root/private"), "mine\n");
    d.kiln_ok(&["stop", "kid-3"]);
    d.kiln_ok(&["start", "kid-3"]);
    assert_eq!(run(&d, "kid-3", "hostname"), "kid-3\n");

    // Bad requests are refused before anything starts.
    let (status, v) = d.api(
        "POST",
        "/v1/sandboxes/kid-2/fork",
        Some(serde_json::json!({"count": 0})),
    );
    assert_eq!(status, 400, "{v}");
    let (status, v) = d.api(
        "POST",
        "/v1/sandboxes/kid-2/fork",
        Some(serde_json::json!({"name": "kid", "count": 2})),
    );
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (409, Some("sandbox_name_taken")),
        "{v}"
    );
}
