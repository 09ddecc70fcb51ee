//! The bhatti "Snapshots" seed page (issue 12): examples/seeds/bhatti.sh runs its commands literally
//! (`kiln` for `bhatti`, kiln on PATH) against a real daemon, and this test checks what the page says:
//! the original keeps running; each resume makes a new sandbox with a new name and its own network
//! identity that picks up where the original was (no boot); one snapshot is used many times; volumes are
//! not captured; deleting the snapshot leaves its copies running; stop/start wakes the same sandbox.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{require_image, tail, Daemon, KILN};
use serde_json::Value;

fn sh(d: &Daemon, sb: &str, cmd: &str) -> String {
    d.kiln_ok(&["exec", sb, "--", "sh", "-c", cmd])
        .trim()
        .to_string()
}

fn counter(d: &Daemon, sb: &str) -> u64 {
    sh(d, sb, "cat /tmp/n").parse().expect("counter value")
}

fn record(d: &Daemon, sb: &str) -> Value {
    serde_json::from_str(&d.kiln_ok(&["--json", "sandbox", "inspect", sb])).expect("sandbox JSON")
}

/// What the guest itself sees as its identity: hostname, the NIC's MAC and its kernel boot id.
fn identity(d: &Daemon, sb: &str) -> (String, String, String) {
    let out = sh(
        d,
        sb,
        "hostname; for i in /sys/class/net/*; do [ \"${i##*/}\" = lo ] || cat $i/address; done; cat /proc/sys/kernel/random/boot_id",
    );
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "identity of {sb}: {out}");
    (lines[0].into(), lines[1].into(), lines[2].into())
}

#[test]
fn bhatti_snapshot_page_runs_literally() {
    require_image("tiny");
    let d = Daemon::start();
    d.kiln_ok(&["volume", "create", "cache", "--size", "64M"]);
    d.create(&["--name", "dev", "--volume", "cache:/cache"]);
    sh(&d, "dev", "echo kept > /cache/v; echo before > /root/state; (i=0; while true; do i=$((i+1)); echo $i > /tmp/n.new; mv /tmp/n.new /tmp/n; sleep 0.1; done) >/dev/null 2>&1 &");
    std::thread::sleep(Duration::from_millis(800));
    let dev_id = identity(&d, "dev");
    let dev_record = record(&d, "dev");

    // kiln on PATH, the daemon through KILN_SOCKET: the page's commands as a user types them.
    let bin = tempfile::tempdir().expect("tempdir");
    std::os::unix::fs::symlink(KILN, bin.path().join("kiln")).expect("link kiln");
    let path = format!(
        "{}:{}",
        bin.path().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/seeds/bhatti.sh");
    let out = Command::new("sh")
        .arg(&script)
        .env("PATH", path)
        .env("KILN_SOCKET", &d.socket)
        .env("KILN_DATA_DIR", d.data_dir())
        .output()
        .expect("run bhatti.sh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "bhatti.sh failed ({}):\nstdout: {stdout}\nstderr: {}\ndaemon log:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        tail(&d.log(), 30)
    );
    assert!(stdout.contains("dev-pre-experiment"), "{stdout}");

    // The original keeps running (and after stop/start it is the same sandbox, awake, still counting).
    let dev_after = record(&d, "dev");
    assert_eq!(
        (dev_after["id"].clone(), dev_after["state"].as_str()),
        (dev_record["id"].clone(), Some("running"))
    );
    assert_eq!(
        identity(&d, "dev"),
        dev_id,
        "stop/start wakes the same machine"
    );
    let n = counter(&d, "dev");
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        counter(&d, "dev") > n,
        "dev's counter goes on after stop/start"
    );
    assert_eq!(sh(&d, "dev", "cat /cache/v"), "kept");

    // Two copies from one snapshot: new names, own network identity, the same running machine (no boot).
    let mut seen = vec![dev_id.clone()];
    for copy in ["copy-1", "copy-2"] {
        let r = record(&d, copy);
        assert_eq!(r["state"], "running", "{copy}: {r}");
        assert_ne!(r["id"], dev_record["id"]);
        assert_ne!(r["mac"], dev_record["mac"]);
        let id = identity(&d, copy);
        assert_eq!(
            id.0,
            r["hostname"].as_str().unwrap(),
            "{copy}: the guest has its new hostname"
        );
        assert_eq!(
            id.1,
            r["mac"].as_str().unwrap(),
            "{copy}: the guest NIC has its new MAC"
        );
        assert_eq!(
            id.2, dev_id.2,
            "{copy} continues dev's kernel (same boot id): no boot"
        );
        assert!(
            seen.iter().all(|s| s.0 != id.0 && s.1 != id.1),
            "{copy} has its own identity: {id:?} vs {seen:?}"
        );
        seen.push(id);
        assert_eq!(sh(&d, copy, "cat /root/state"), "before");
        // The counting process from the snapshot runs on in the copy.
        let n = counter(&d, copy);
        std::thread::sleep(Duration::from_millis(500));
        assert!(counter(&d, copy) > n, "{copy}'s counter goes on");
        // Volumes are not in a snapshot: the copy has no /cache.
        assert_eq!(
            sh(&d, copy, "grep -c ' /cache ' /proc/mounts || true"),
            "0",
            "{copy}"
        );
        assert!(
            r["volumes"].as_array().is_none_or(|v| v.is_empty()),
            "{copy}: {r}"
        );
    }

    // The snapshot is gone; the copies keep running on their own.
    let list: Value =
        serde_json::from_str(&d.kiln_ok(&["--json", "snapshot", "list"])).expect("list");
    assert_eq!(list, serde_json::json!([]));
    assert_eq!(sh(&d, "copy-2", "echo alive"), "alive");
    d.kiln_ok(&["sandbox", "delete", "-y", "copy-1", "copy-2", "dev"]);
}
