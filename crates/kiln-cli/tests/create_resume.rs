//! Create is a resume (issue 15), on real VMs: a template boots once per shape, and every create after that
//! resumes the snapshot of that boot as a machine of its own (hostname, machine id, RNG, MAC), with the
//! request's env, labels and ports; a rebuilt template is never resumed from its old snapshot; what a
//! snapshot cannot serve boots cold and says why.
//!
//! The harness shares template snapshots between its daemons through a store of its own
//! (`common::template_store()`, `KILN_TEMPLATE_STORE`), never beside the built images.

mod common;

use std::time::Duration;

use common::{require_image, Daemon};
use serde_json::{json, Value};

fn run(d: &Daemon, sb: &str, cmd: &str) -> String {
    d.kiln_ok(&["exec", sb, "--", "sh", "-c", cmd])
}

fn create(d: &Daemon, body: Value) -> Value {
    let (status, v) = d.api("POST", "/v1/sandboxes", Some(body));
    assert_eq!(status, 201, "{v}\n{}", common::tail(&d.log(), 30));
    v
}

fn boot_mode(v: &Value) -> &str {
    v["boot"]["mode"].as_str().unwrap_or("none")
}

#[test]
fn creates_resume_one_template_snapshot_as_separate_machines() {
    require_image("tiny");
    let d = Daemon::start_env(&[], &[("KILN_TEMPLATE_SNAPSHOTS", "on")]);
    // The daemon prepares the default template's snapshot at start (or imports the one another daemon
    // sharing these images made).
    assert!(
        d.wait_log("template snapshot ready", 1, Duration::from_secs(120)),
        "no template snapshot prepared:\n{}",
        common::tail(&d.log(), 30)
    );
    let a = create(
        &d,
        json!({"name": "a", "env": {"FOO": "from-request"}, "labels": {"team": "x"}, "ports": [{"guest": 8080}]}),
    );
    let b = create(&d, json!({"name": "b"}));
    for v in [&a, &b] {
        assert_eq!(boot_mode(v), "resume", "{v}");
        assert_eq!(v["origin"], "template:tiny", "{v}");
        assert_eq!(v["template"], "tiny");
    }
    assert_eq!(a["boot"]["snapshot"], b["boot"]["snapshot"]);
    assert_eq!(a["labels"]["team"], "x");

    // Each is its own machine.
    let probe = "hostname; cat /etc/machine-id; head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo; cat /sys/class/net/eth0/address";
    let (pa, pb) = (run(&d, "a", probe), run(&d, "b", probe));
    let (la, lb): (Vec<&str>, Vec<&str>) = (pa.lines().collect(), pb.lines().collect());
    assert_eq!(la.len(), 4, "{pa}");
    assert_eq!((la[0], lb[0]), ("a", "b"));
    for i in 1..4 {
        assert_ne!(la[i], lb[i], "line {i} is the same in both:\n{pa}\n{pb}");
    }
    assert_eq!(la[3], a["mac"].as_str().unwrap_or_default());
    assert_eq!(run(&d, "a", "echo $FOO").trim(), "from-request");
    assert_eq!(run(&d, "b", "echo ${FOO:-unset}").trim(), "unset");
    run(&d, "a", "echo mine > /root/only-a");
    assert_eq!(
        run(&d, "b", "cat /root/only-a 2>/dev/null || echo absent").trim(),
        "absent"
    );

    // Its console log starts with the template's boot, then says where it was resumed from.
    let console = d.kiln_ok(&["sandbox", "logs", "a"]);
    let snap = a["boot"]["snapshot"]
        .as_str()
        .expect("snapshot")
        .to_string();
    assert!(console.contains("kiln-agent"), "{console}");
    assert!(
        console.contains(&format!("resumed from template snapshot {snap} at ")),
        "{console}"
    );

    // A diff of it builds on the template snapshot, shown as its template; the template snapshot stays
    // while the diff needs it.
    let (status, diff) = d.api(
        "POST",
        "/v1/sandboxes/a/snapshots",
        Some(json!({"name": "a-diff", "type": "diff"})),
    );
    assert_eq!(status, 201, "{diff}");
    assert_eq!(diff["parent"], "template:tiny", "{diff}");
    assert_eq!(diff["template_snapshot"], snap.as_str(), "{diff}");
    let (_, listed) = d.api("GET", "/v1/snapshots/a-diff", None);
    assert_eq!(listed["parent"], "template:tiny", "{listed}");
    let (status, refused) = d.api("DELETE", &format!("/v1/snapshots/{snap}"), None);
    assert_eq!(status, 409, "{refused}");
    let (status, copy) = d.api(
        "POST",
        "/v1/snapshots/a-diff/resume",
        Some(json!({"name": "a-copy"})),
    );
    assert_eq!(status, 201, "{copy}");
    assert_eq!(run(&d, "a-copy", "cat /root/only-a").trim(), "mine");
    d.kiln_ok(&["sandbox", "delete", "-y", "a-copy"]);
    d.kiln_ok(&["snapshot", "delete", "-y", "a-diff"]);

    // The published port of a resumed sandbox answers.
    let (_, a_now) = d.api("GET", "/v1/sandboxes/a", None);
    let host = a_now["ports"][0]["host"].as_u64().expect("host port") as u16;
    assert!(common::serve_and_fetch(&d, "a", host).contains("served"));

    // The machine it was captured from and the snapshot are kiln's own: not listed.
    let (_, list) = d.api("GET", "/v1/sandboxes", None);
    assert_eq!(list.as_array().map(Vec::len), Some(2), "{list}");
    let (_, snaps) = d.api("GET", "/v1/snapshots", None);
    assert_eq!(snaps.as_array().map(Vec::len), Some(0), "{snaps}");

    // What the snapshot cannot serve boots cold and says why.
    let cold = create(&d, json!({"name": "c", "boot": true}));
    assert_eq!(boot_mode(&cold), "cold", "{cold}");
    assert!(cold["boot"]["reason"]
        .as_str()
        .unwrap_or_default()
        .contains("boot: true"));
    let out = d.kiln_ok(&[
        "sandbox",
        "create",
        "--name",
        "big",
        "--boot",
        "--disk-size",
        "3",
    ]);
    assert!(out.contains("cold: a cold boot was asked for"), "{out}");
    assert!(d.log().contains("cold boot"), "the log says why");
    assert_eq!(run(&d, "big", "hostname").trim(), "big");

    // A second daemon on the same images uses the published snapshot instead of booting again. Its
    // --boot-timeout bounds boots, not resumes (which have a deadline of their own).
    let d2 = Daemon::start_env(
        &["--boot-timeout", "1"],
        &[("KILN_TEMPLATE_SNAPSHOTS", "on")],
    );
    assert!(
        d2.wait_log("template snapshot ready", 1, Duration::from_secs(60)),
        "{}",
        common::tail(&d2.log(), 30)
    );
    assert!(!d2.log().contains("template snapshot made"), "{}", d2.log());
    let e = create(&d2, json!({"name": "e"}));
    assert_eq!(boot_mode(&e), "resume", "{e}");
    assert_eq!(e["boot"]["snapshot"], a["boot"]["snapshot"]);
    // Started again, it does not read the template snapshot's GiBs again: its files are the ones it
    // verified (inode, size, mtime); a changed one is read again.
    let mut d2 = d2;
    d2.restart_hard();
    let unchanged = "template snapshot files unchanged since verified";
    let e2 = create(&d2, json!({"name": "e2"}));
    assert_eq!(boot_mode(&e2), "resume", "{e2}");
    assert_eq!(
        d2.log().matches(unchanged).count(),
        1,
        "{}",
        common::tail(&d2.log(), 30)
    );
    let snap_dir = d2.data_dir().join("snapshots").join(&snap);
    let memory = snap_dir.join("memory");
    assert!(memory.is_file(), "{}", memory.display());
    let out = std::process::Command::new("touch")
        .arg("-m")
        .arg(&memory)
        .output()
        .expect("touch");
    assert!(out.status.success());
    d2.restart_hard();
    let reread = "reading every checksum of the snapshot";
    let before = d2.log().matches(reread).count();
    let e3 = create(&d2, json!({"name": "e3"}));
    assert_eq!(boot_mode(&e3), "resume", "{e3}");
    assert_eq!(d2.log().matches(unchanged).count(), 1);
    assert!(
        d2.log().matches(reread).count() > before,
        "{}",
        common::tail(&d2.log(), 30)
    );
    let (status, slow) = d2.api(
        "POST",
        "/v1/sandboxes",
        Some(json!({"name": "slow", "boot": true})),
    );
    assert_eq!(status, 504, "{slow}");
    assert_eq!(slow["error"]["code"], "timeout", "{slow}");
}

#[test]
fn a_rebuilt_template_is_not_resumed_from_its_old_snapshot() {
    require_image("tiny");
    let d = Daemon::start_env(&[], &[("KILN_TEMPLATE_SNAPSHOTS", "lazy")]);
    let image = common::private_image(&d, "tpl");
    // The first create of a template pays for its snapshot and resumes it.
    let old = create(&d, json!({"name": "old", "template": "tpl"}));
    assert_eq!(boot_mode(&old), "resume", "{old}");
    let old_snap = old["boot"]["snapshot"]
        .as_str()
        .expect("snapshot")
        .to_string();
    assert!(common::template_store()
        .join("tpl")
        .join(&old_snap)
        .join("manifest.json")
        .is_file());
    run(&d, "old", "echo still > /root/here");

    // `image build --force` writes a new image.json (new files, new build time): a new identity.
    let path = image.join("image.json");
    let mut manifest: Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("image.json")).expect("json");
    manifest["created_at"] = json!("2031-01-01T00:00:00Z");
    std::fs::write(&path, manifest.to_string()).expect("rewrite image.json");
    let new = create(&d, json!({"name": "new", "template": "tpl"}));
    assert_eq!(boot_mode(&new), "resume", "{new}");
    let new_snap = new["boot"]["snapshot"].as_str().expect("snapshot");
    assert_ne!(
        new_snap, old_snap,
        "the rebuilt template resumed its old snapshot"
    );
    // The sandbox resumed from the old snapshot goes on, and keeps that snapshot.
    assert_eq!(run(&d, "old", "cat /root/here").trim(), "still");
    assert_eq!(run(&d, "new", "hostname").trim(), "new");
    let own = d.data_dir().join("snapshots").join(&old_snap);
    let shared = common::template_store().join("tpl").join(&old_snap);
    assert!(own.is_dir() && shared.is_dir());

    // Once its last user is gone, the stale one goes, here and in the shared store; the current one stays.
    d.kiln_ok(&["sandbox", "delete", "-y", "old"]);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while own.exists() || shared.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "the stale template snapshot is still there:\n{}",
            common::tail(&d.log(), 20)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let (status, _) = d.api("GET", &format!("/v1/snapshots/{old_snap}"), None);
    assert_eq!(status, 404);
    let (status, _) = d.api("GET", &format!("/v1/snapshots/{new_snap}"), None);
    assert_eq!(status, 200);
    assert!(common::template_store().join("tpl").join(new_snap).is_dir());
}
