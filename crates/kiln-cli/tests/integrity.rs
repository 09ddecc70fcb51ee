//! Snapshot and lifecycle integrity under real faults (issue 10): a hibernated state is never loaded after
//! its vCPUs ran, a complete save is never thrown away, snapshot names are reserved under a lock, a diff
//! snapshot is pinned to its base by content, locks cover every check-then-act, unverifiable data is
//! quarantined, and commands never act on a VM a lifecycle operation is half-way through.
//!
//! Faults are real: the daemon or QEMU is SIGKILLed while an operation is held at a point
//! (`KILN_FAULTS=hold.POINT=MS`), requests race each other, files are damaged on disk. Each test prints a
//! `RELIABILITY` line for `scripts/reliability-report.sh`.

mod common;

use std::sync::{Arc, Barrier, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use common::world::{dir_names, sh, sh_ok, Tally};
use common::{http_unix, private_image, require_image, Daemon};
use serde_json::{json, Value};

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// Sends a request from another thread; (0, Null) if the daemon died under it.
fn spawn_api(
    d: &Daemon,
    method: &'static str,
    path: &str,
    body: Value,
) -> JoinHandle<(u16, Value)> {
    let (socket, path) = (d.socket.clone(), path.to_string());
    std::thread::spawn(move || {
        let bytes = (!body.is_null()).then(|| body.to_string().into_bytes());
        let sent = std::panic::catch_unwind(|| {
            http_unix(&socket, method, &path, bytes.as_deref(), "application/json")
        });
        match sent {
            Ok((status, resp)) => (status, serde_json::from_slice(&resp).unwrap_or(Value::Null)),
            Err(_) => (0, Value::Null),
        }
    })
}

/// Sends a request from another thread and waits until the daemon holds it at `point` (the daemon log
/// is kept across restarts, so the holds are counted from before the request).
fn spawn_held(
    d: &Daemon,
    point: &str,
    method: &'static str,
    path: &str,
    body: Value,
) -> JoinHandle<(u16, Value)> {
    let needle = format!("holding at {point}");
    let before = d.log().matches(&needle).count();
    let request = spawn_api(d, method, path, body);
    assert!(
        d.wait_log(&needle, before + 1, Duration::from_secs(90)),
        "never reached {point}:\n{}",
        common::tail(&d.log(), 30)
    );
    request
}

fn get(d: &Daemon, name: &str) -> Value {
    d.api("GET", &format!("/v1/sandboxes/{name}"), None).1
}

fn post(d: &Daemon, path: &str, body: Value) -> (u16, Value) {
    d.api("POST", path, Some(body))
}

fn snapshot(d: &Daemon, sb: &str, body: Value) -> (u16, Value) {
    post(d, &format!("/v1/sandboxes/{sb}/snapshots"), body)
}

fn kill_qemu_of(d: &Daemon, name: &str) {
    let pid = get(d, name)["pid"].as_i64().expect("recorded pid") as i32;
    // SAFETY: kill(2) of this test's own VM.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
    }
}

fn code(v: &Value) -> &str {
    v["error"]["code"].as_str().unwrap_or("")
}

/// A sandbox whose vCPUs ran after its hibernated state was loaded: failed, its state gone, start refused.
fn assert_stale_state_refused(d: &Daemon, name: &str, tally: &mut Tally) {
    tally.attempted += 1;
    let sb = get(d, name);
    assert_eq!(sb["state"], "failed", "{name}: {sb}");
    let dir = d
        .data_dir()
        .join("sandboxes")
        .join(sb["id"].as_str().unwrap_or("?"));
    assert!(
        !dir.join("state").exists(),
        "{name}: the stale state is still there"
    );
    let (status, v) = post(d, &format!("/v1/sandboxes/{name}/start"), Value::Null);
    assert_eq!((status, code(&v)), (409, "sandbox_not_running"), "{v}");
    tally.survived += 1; // refused rather than resumed onto a disk its guest had moved past
}

#[test]
fn a_hibernated_state_is_retired_before_its_vcpus_run() {
    require_image("tiny");
    let _serial = serial();
    let mut d = Daemon::start();
    let mut tally = Tally::default();
    for n in ["h1", "h2", "h3"] {
        d.create(&["--name", n]);
        sh_ok(&d, n, &format!("echo {n}-data > /root/marker"));
        let (status, v) = post(&d, &format!("/v1/sandboxes/{n}/stop"), Value::Null);
        assert_eq!(status, 200, "{v}");
    }

    // QEMU dies after `cont`, before the agent answers; the daemon lives.
    d.restart_with_env(&[("KILN_FAULTS", "hold.start.continued=3000")]);
    let start = spawn_held(
        &d,
        "start.continued",
        "POST",
        "/v1/sandboxes/h1/start",
        Value::Null,
    );
    kill_qemu_of(&d, "h1");
    let (status, v) = start.join().expect("start thread");
    assert_ne!(status, 200, "{v}");
    assert_stale_state_refused(&d, "h1", &mut tally);

    // The daemon and QEMU both die after `cont`.
    d.restart_with_env(&[("KILN_FAULTS", "hold.start.continued=120000")]);
    let start = spawn_held(
        &d,
        "start.continued",
        "POST",
        "/v1/sandboxes/h2/start",
        Value::Null,
    );
    kill_qemu_of(&d, "h2");
    d.kill_hard();
    let _ = start.join();
    d.restart_with_env(&[]);
    assert_stale_state_refused(&d, "h2", &mut tally);

    // The daemon dies after the state was retired, before `cont`: QEMU holds the loaded state, so the
    // restarted daemon finishes the start.
    d.restart_with_env(&[("KILN_FAULTS", "hold.start.retired=120000")]);
    let start = spawn_held(
        &d,
        "start.retired",
        "POST",
        "/v1/sandboxes/h3/start",
        Value::Null,
    );
    d.kill_hard();
    let _ = start.join();
    d.restart_with_env(&[]);
    tally.attempted += 1;
    assert_eq!(get(&d, "h3")["state"], "running", "{}", get(&d, "h3"));
    assert_eq!(sh_ok(&d, "h3", "cat /root/marker"), "h3-data\n");
    tally.survived += 1;
    for n in ["h1", "h2"] {
        let (status, v) = d.api("DELETE", &format!("/v1/sandboxes/{n}"), None);
        assert!(status == 200 || status == 204, "{v}");
    }
    assert_eq!(d.qemu_pids().len(), 1, "only h3's QEMU is left");
    tally.report(
        "a_hibernated_state_is_retired_before_its_vcpus_run",
        "starts",
    );
}

#[test]
fn a_stop_cut_short_after_its_save_keeps_the_save() {
    require_image("tiny");
    let _serial = serial();
    let mut d = Daemon::start();
    let mut tally = Tally::default();
    for n in ["s1", "s2"] {
        d.create(&["--name", n]);
        // Not synced: the marker lives in the guest's page cache, so only the saved RAM brings it back.
        sh_ok(&d, n, &format!("echo {n}-ram > /root/marker"));
    }

    // A long command does not hold off a snapshot (commands take the lifecycle lock only to find the VM).
    let long = spawn_api(
        &d,
        "POST",
        "/v1/sandboxes/s1/exec",
        json!({"cmd": "sleep 20; echo done"}),
    );
    std::thread::sleep(Duration::from_secs(1));
    let (status, v) = snapshot(&d, "s1", json!({"name": "during-exec"}));
    assert_eq!(status, 201, "{v}");
    assert!(!long.is_finished(), "the snapshot waited for the command");
    let (status, v) = long.join().expect("exec thread");
    assert_eq!((status, v["stdout"].as_str()), (200, Some("done\n")), "{v}");

    // A command arriving while a stop is half-way waits for it and is refused cleanly.
    d.restart_with_env(&[("KILN_FAULTS", "hold.stop.saved=3000")]);
    let stop = spawn_held(
        &d,
        "stop.saved",
        "POST",
        "/v1/sandboxes/s2/stop",
        Value::Null,
    );
    let (status, v) = sh(&d, "s2", "echo hi");
    assert_eq!((status, code(&v)), (409, "sandbox_not_running"), "{v}");
    assert_eq!(stop.join().expect("stop thread").0, 200);
    let (status, v) = post(&d, "/v1/sandboxes/s2/start", Value::Null);
    assert_eq!(status, 200, "{v}");

    // The daemon dies after QEMU quit, before the sandbox was recorded stopped.
    d.restart_with_env(&[("KILN_FAULTS", "hold.stop.quit=120000")]);
    let stop = spawn_held(
        &d,
        "stop.quit",
        "POST",
        "/v1/sandboxes/s1/stop",
        Value::Null,
    );
    d.kill_hard();
    let _ = stop.join();
    // The daemon dies after the save was published, QEMU still alive (and stopped).
    d.restart_with_env(&[("KILN_FAULTS", "hold.stop.published=120000")]);
    let stop = spawn_held(
        &d,
        "stop.published",
        "POST",
        "/v1/sandboxes/s2/stop",
        Value::Null,
    );
    d.kill_hard();
    let _ = stop.join();
    d.restart_with_env(&[]);
    assert!(
        d.qemu_pids().is_empty(),
        "a QEMU of a finished stop is left"
    );
    for n in ["s1", "s2"] {
        tally.attempted += 1;
        assert_eq!(get(&d, n)["state"], "stopped", "{}", get(&d, n));
        let (status, v) = post(&d, &format!("/v1/sandboxes/{n}/start"), Value::Null);
        assert_eq!(status, 200, "{v}");
        assert_eq!(sh_ok(&d, n, "cat /root/marker"), format!("{n}-ram\n"));
        tally.survived += 1;
    }
    tally.report("a_stop_cut_short_after_its_save_keeps_the_save", "stops");
}

#[test]
fn snapshot_names_are_reserved_and_temporary_paths_are_unique() {
    require_image("tiny");
    let _serial = serial();
    let d = Daemon::start();
    let mut tally = Tally::default();
    for n in ["a", "b"] {
        d.create(&["--name", n]);
    }
    let race = |bodies: Vec<(&'static str, Value)>| -> Vec<(&'static str, u16, Value)> {
        let gate = Arc::new(Barrier::new(bodies.len()));
        let threads: Vec<_> = bodies
            .into_iter()
            .map(|(sb, body)| {
                let (socket, gate) = (d.socket.clone(), gate.clone());
                std::thread::spawn(move || {
                    gate.wait();
                    let (status, resp) = http_unix(
                        &socket,
                        "POST",
                        &format!("/v1/sandboxes/{sb}/snapshots"),
                        Some(body.to_string().as_bytes()),
                        "application/json",
                    );
                    (
                        sb,
                        status,
                        serde_json::from_slice(&resp).unwrap_or(Value::Null),
                    )
                })
            })
            .collect();
        threads
            .into_iter()
            .map(|t| t.join().expect("snapshot thread"))
            .collect()
    };

    // Two sandboxes snapshotted under one name at once: one wins, the other is told the name is taken.
    let same = json!({"name": "same"});
    let results = race(vec![("a", same.clone()), ("b", same)]);
    tally.attempted += 2;
    let winners: Vec<_> = results.iter().filter(|r| r.1 == 201).collect();
    let losers: Vec<_> = results.iter().filter(|r| r.1 == 409).collect();
    assert_eq!((winners.len(), losers.len()), (1, 1), "{results:?}");
    assert_eq!(code(&losers[0].2), "snapshot_already_exists", "{results:?}");
    tally.survived += 2;
    let manifest = std::fs::read_to_string(d.data_dir().join("snapshots/same/manifest.json"))
        .expect("the winner's manifest");
    assert!(
        manifest.contains(&format!("\"sandbox_name\": \"{}\"", winners[0].0)),
        "the manifest is not the winner's"
    );

    // Many unnamed snapshots in the same second all succeed, under distinct names.
    let results = race(
        ["a", "b", "a", "b", "a", "b"]
            .map(|sb| (sb, json!({"type": "disk"})))
            .to_vec(),
    );
    let mut ids: Vec<String> = Vec::new();
    for (sb, status, v) in &results {
        tally.attempted += 1;
        assert_eq!(*status, 201, "{sb}: {v}");
        ids.push(v["id"].as_str().unwrap_or_default().to_string());
        tally.survived += 1;
    }
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 6, "{ids:?}");

    // Every snapshot verifies in full (checksums), and no temporary directory is left.
    let (status, v) = d.api("GET", "/v1/doctor?deep=true", None);
    assert_eq!((status, &v["ok"]), (200, &json!(true)), "{v}");
    // The daemon's template snapshots (`template-*`) are verified too.
    let templates = dir_names(d.data_dir().join("snapshots"))
        .into_iter()
        .filter(|n| n.starts_with("template-"))
        .count();
    assert_eq!(v["snapshots_checked"], 7 + templates, "{v}");
    let left: Vec<_> = dir_names(d.data_dir().join("snapshots"))
        .into_iter()
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(left.is_empty(), "{left:?}");
    tally.report(
        "snapshot_names_are_reserved_and_temporary_paths_are_unique",
        "snapshots",
    );
}

/// What `kiln image build --force` does to a template: new root filesystem bytes and a new image.json.
fn rebuild_template(dir: &std::path::Path) {
    let rootfs = dir.join("rootfs.img");
    let fresh = dir.join("rootfs.new");
    let ok = std::process::Command::new("cp")
        .arg("--sparse=always")
        .arg(&rootfs)
        .arg(&fresh)
        .status()
        .expect("cp");
    assert!(ok.success());
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&fresh)
            .expect("open");
        f.write_all_at(b"rebuilt", 900 << 20).expect("write");
    }
    std::fs::rename(&fresh, &rootfs).expect("rename");
    let out = std::process::Command::new("sha256sum")
        .arg(&rootfs)
        .output()
        .expect("sha256sum");
    let sum = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or("")
        .to_string();
    let path = dir.join("image.json");
    let mut m: Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("image.json")).expect("json");
    m["files"]["rootfs"]["sha256"] = json!(sum);
    std::fs::write(&path, m.to_string()).expect("write image.json");
}

#[test]
fn diff_snapshots_are_pinned_to_their_base_by_content() {
    require_image("tiny");
    let _serial = serial();
    let d = Daemon::start();
    let mut tally = Tally::default();
    let tpl = private_image(&d, "tpl");
    // Booted: its diffs build on the template's rootfs itself, pinned by content.
    d.create(&["--name", "t", "--template", "tpl", "--boot"]);
    // Resumed from the template's snapshot: its diffs build on that snapshot, which outlives a rebuild.
    d.create(&["--name", "u", "--template", "tpl"]);
    sh_ok(&d, "u", "echo u1 > /root/marker; sync");
    assert_eq!(
        snapshot(&d, "u", json!({"name": "du", "type": "diff"})).0,
        201
    );
    sh_ok(&d, "t", "echo t1 > /root/marker; sync");
    assert_eq!(snapshot(&d, "t", json!({"name": "p"})).0, 201);
    let (status, v) = post(&d, "/v1/snapshots/p/resume", json!({"name": "r"}));
    assert_eq!(status, 201, "{v}");
    let (status, v) = snapshot(&d, "t", json!({"name": "d1", "type": "diff"}));
    assert_eq!(status, 201, "{v}");

    // `p` deleted (r keeps its own links) and its name reused for another machine: a diff of r would
    // build on a base r never came from.
    let (status, v) = d.api("DELETE", "/v1/snapshots/p", None);
    assert!(status == 200 || status == 204, "{v}");
    sh_ok(&d, "t", "echo t2 > /root/marker; sync");
    assert_eq!(snapshot(&d, "t", json!({"name": "p"})).0, 201);
    tally.attempted += 1;
    let (status, v) = snapshot(&d, "r", json!({"name": "d2", "type": "diff"}));
    assert_eq!((status, code(&v)), (409, "snapshot_base_changed"), "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("snapshot:p"),
        "{v}"
    );
    tally.survived += 1;

    // The template rebuilt: the diff taken from it refuses to resume on the new one, and new diffs of
    // sandboxes made from the old one are refused.
    rebuild_template(&tpl);
    tally.attempted += 1;
    let (status, v) = post(&d, "/v1/snapshots/d1/resume", json!({"name": "x"}));
    assert_eq!((status, code(&v)), (409, "snapshot_base_changed"), "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("template:tpl"),
        "{v}"
    );
    tally.survived += 1;
    let (status, v) = snapshot(&d, "t", json!({"name": "d3", "type": "diff"}));
    assert_eq!((status, code(&v)), (409, "snapshot_base_changed"), "{v}");
    // A diff of a copy of the old template snapshot keeps working after the rebuild, with its own files.
    tally.attempted += 1;
    let (status, v) = post(&d, "/v1/snapshots/du/resume", json!({"name": "u2"}));
    assert_eq!(status, 201, "{v}");
    assert_eq!(sh_ok(&d, "u2", "cat /root/marker").trim(), "u1");
    tally.survived += 1;
    // Nothing half-made was left, and a full snapshot needs no base.
    assert_eq!(
        snapshot(&d, "t", json!({"name": "f", "type": "full"})).0,
        201
    );
    assert!(!d.data_dir().join("snapshots/d3").exists());
    tally.report(
        "diff_snapshots_are_pinned_to_their_base_by_content",
        "diffs",
    );
}

#[test]
fn restores_and_parent_deletes_take_their_locks() {
    require_image("tiny");
    let _serial = serial();
    let d = Daemon::start_env(&[], &[("KILN_FAULTS", "hold.snapshot.diff_based=4000")]);
    let mut tally = Tally::default();
    d.create(&["--name", "e"]);
    sh_ok(&d, "e", "echo e1 > /root/marker; sync");
    assert_eq!(snapshot(&d, "e", json!({"name": "ep"})).0, 201);
    let (status, v) = post(&d, "/v1/snapshots/ep/resume", json!({"name": "er"}));
    assert_eq!(status, 201, "{v}");

    // Two restores of one snapshot at once: one wins, the other is told it was restored already.
    let gate = Arc::new(Barrier::new(2));
    let threads: Vec<_> = (0..2)
        .map(|_| {
            let (socket, gate) = (d.socket.clone(), gate.clone());
            std::thread::spawn(move || {
                gate.wait();
                let body = json!({"resume": true}).to_string();
                let (status, resp) = http_unix(
                    &socket,
                    "POST",
                    "/v1/snapshots/ep/restore",
                    Some(body.as_bytes()),
                    "application/json",
                );
                (
                    status,
                    serde_json::from_slice::<Value>(&resp).unwrap_or(Value::Null),
                )
            })
        })
        .collect();
    let mut results: Vec<_> = threads
        .into_iter()
        .map(|t| t.join().expect("restore"))
        .collect();
    results.sort_by_key(|r| r.0);
    tally.attempted += 2;
    assert_eq!(results[0].0, 200, "{results:?}");
    assert_eq!(
        (results[1].0, code(&results[1].1)),
        (409, "snapshot_already_restored"),
        "{results:?}"
    );
    assert_eq!(sh_ok(&d, "e", "cat /root/marker"), "e1\n");
    tally.survived += 2;

    // The parent of a diff being taken is deleted: refused while the diff is made; the diff works.
    let diff = spawn_held(
        &d,
        "snapshot.diff_based",
        "POST",
        "/v1/sandboxes/er/snapshots",
        json!({"name": "ed", "type": "diff"}),
    );
    tally.attempted += 1;
    let (status, v) = d.api("DELETE", "/v1/snapshots/ep", None);
    assert_eq!((status, code(&v)), (409, "snapshot_in_use"), "{v}");
    let (status, v) = diff.join().expect("diff thread");
    assert_eq!(status, 201, "{v}");
    let (status, v) = post(&d, "/v1/snapshots/ed/resume", json!({"name": "edr"}));
    assert_eq!(status, 201, "{v}");
    assert_eq!(sh_ok(&d, "edr", "cat /root/marker"), "e1\n");
    tally.survived += 1;
    tally.report("restores_and_parent_deletes_take_their_locks", "operations");
}

#[test]
fn an_unverifiable_snapshot_found_at_start_up_is_quarantined() {
    let _serial = serial();
    let mut d = Daemon::start();
    let planted = d.data_dir().join("snapshots/broken");
    std::fs::create_dir_all(&planted).expect("mkdir");
    std::fs::write(planted.join("manifest.json"), b"{\"torn\": ").expect("write");
    std::fs::write(planted.join("memory"), b"the only copy of these bytes").expect("write");
    d.restart_hard();
    assert!(!planted.exists(), "the damaged snapshot was left in place");
    let moved: Vec<_> = dir_names(d.data_dir().join("lost+found/snapshots"))
        .into_iter()
        .filter(|n| n.starts_with("broken-"))
        .collect();
    assert_eq!(moved.len(), 1, "{moved:?}");
    let kept = d
        .data_dir()
        .join("lost+found/snapshots")
        .join(&moved[0])
        .join("memory");
    assert_eq!(
        std::fs::read(kept).expect("quarantined bytes"),
        b"the only copy of these bytes"
    );
    let tally = Tally {
        attempted: 1,
        survived: 1,
        lost: 0,
    };
    tally.report(
        "an_unverifiable_snapshot_found_at_start_up_is_quarantined",
        "snapshots",
    );
}

#[test]
fn a_snapshot_cut_between_opening_and_switching_its_layer_leaves_no_layer_open() {
    require_image("tiny");
    let _serial = serial();
    let mut d = Daemon::start_env(
        &[],
        &[("KILN_FAULTS", "hold.snapshot.overlay_added=120000")],
    );
    let mut tally = Tally::default();
    d.create(&["--name", "src"]);
    sh_ok(&d, "src", "echo one > /root/a; sync");
    // The daemon dies after QEMU opened the new top layer, before it became the active one: QEMU holds
    // that file open for writing although nothing writes to it.
    let held = spawn_held(
        &d,
        "snapshot.overlay_added",
        "POST",
        "/v1/sandboxes/src/snapshots",
        json!({"name": "cut"}),
    );
    d.kill_hard();
    let _ = held.join();
    d.restart_with_env(&[]);
    tally.attempted += 1;
    assert_eq!(get(&d, "src")["state"], "running", "{}", get(&d, "src"));
    sh_ok(&d, "src", "echo two > /root/b; sync");

    // The next snapshots hold only layers no QEMU writes to, so their copies start and see the data.
    for (snap, copy) in [("after", "copy1"), ("again", "copy2")] {
        let (status, v) = snapshot(&d, "src", json!({"name": snap}));
        assert_eq!(status, 201, "{v}");
        let (status, v) = post(
            &d,
            &format!("/v1/snapshots/{snap}/resume"),
            json!({"name": copy}),
        );
        assert_eq!(status, 201, "resuming {snap} after a cut snapshot: {v}");
        assert_eq!(sh_ok(&d, copy, "cat /root/a /root/b"), "one\ntwo\n");
    }
    // The source goes on writing its own layer, which the copies never see.
    sh_ok(&d, "src", "echo three > /root/c; sync");
    assert_eq!(
        sh_ok(&d, "copy2", "ls /root/c 2>/dev/null || echo absent"),
        "absent\n"
    );
    tally.survived += 1;
    tally.report(
        "a_snapshot_cut_between_opening_and_switching_its_layer_leaves_no_layer_open",
        "snapshots",
    );
}
