//! Sandbox lifetimes on real VMs: idle timeout hibernates, use wakes (once, for concurrent requests),
//! timeout with on_timeout=delete deletes, set-timeout extends, deadlines survive a daemon restart, and
//! snapshot ttl deletes only what nothing depends on.

mod common;

use std::time::{Duration, Instant};

use common::{require_image, tail, Daemon};
use serde_json::{json, Value};

fn get(d: &Daemon, sb: &str) -> (u16, Value) {
    d.api("GET", &format!("/v1/sandboxes/{sb}"), None)
}

fn sh(d: &Daemon, sb: &str, cmd: &str) -> String {
    let (status, v) = d.api(
        "POST",
        &format!("/v1/sandboxes/{sb}/exec"),
        Some(json!({ "cmd": cmd })),
    );
    assert_eq!(
        status,
        200,
        "exec `{cmd}` in {sb}: {v}\n{}",
        tail(&d.log(), 30)
    );
    assert_eq!(v["exit_code"], 0, "`{cmd}` in {sb}: {v}");
    v["stdout"].as_str().unwrap_or_default().to_string()
}

/// Polls until the sandbox's state is `want` (or it is gone, for "gone"); returns how long it took.
fn wait_state(d: &Daemon, sb: &str, want: &str, limit: Duration) -> Duration {
    let t0 = Instant::now();
    loop {
        let (status, v) = get(d, sb);
        let state = if status == 404 {
            "gone"
        } else {
            v["state"].as_str().unwrap_or("?")
        };
        if state == want {
            return t0.elapsed();
        }
        assert!(
            t0.elapsed() < limit,
            "{sb} is {state}, not {want}, after {limit:?}: {v}\n{}",
            tail(&d.log(), 30)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn ops_of_kind(d: &Daemon, sb_id: &str, kind: &str) -> Vec<Value> {
    let (status, v) = d.api("GET", &format!("/v1/operations?target={sb_id}"), None);
    assert_eq!(status, 200, "{v}");
    v.as_array()
        .unwrap()
        .iter()
        .filter(|o| o["kind"] == kind)
        .cloned()
        .collect()
}

#[test]
fn idle_timeout_hibernates_and_use_wakes_it_once() {
    require_image("tiny");
    let d = Daemon::start();
    let sb = d.create(&["--name", "idle", "--idle-timeout", "5"]);
    let id = sb["id"].as_str().unwrap().to_string();
    assert_eq!(sb["lifetime"]["idle_timeout"], 5, "{sb}");
    assert_eq!(sb["lifetime"]["on_timeout"], "hibernate");
    assert_eq!(sb["lifetime"]["auto_resume"], true);
    assert!(sb["lifetime"]["idle_expires_at"].is_string(), "{sb}");
    sh(&d, "idle", "echo kept-in-ram > /dev/shm/note");

    // A command that runs longer than the idle timeout is use while it runs: no hibernation under it.
    let t0 = Instant::now();
    assert_eq!(sh(&d, "idle", "sleep 7; echo done"), "done\n");
    assert!(t0.elapsed() >= Duration::from_secs(7));
    assert_eq!(get(&d, "idle").1["state"], "running");

    // Idle for 5 s: hibernated by itself (RAM to disk, no QEMU left).
    let took = wait_state(&d, "idle", "stopped", Duration::from_secs(30));
    eprintln!("hibernated {:?} after the last request", took);
    assert!(
        d.qemu_pids().is_empty(),
        "QEMU still runs after the idle hibernation"
    );
    let ops = ops_of_kind(&d, &id, "sandbox.timeout");
    assert_eq!(ops.len(), 1, "{ops:?}");
    assert_eq!(ops[0]["result"]["action"], "hibernate");
    assert_eq!(ops[0]["result"]["reason"], "idle_timeout");

    // Looking does not wake it.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(get(&d, "idle").1["state"], "stopped");

    // An exec wakes it, and the guest goes on where it was: its tmpfs (RAM) content is there.
    let t0 = Instant::now();
    assert_eq!(sh(&d, "idle", "cat /dev/shm/note"), "kept-in-ram\n");
    eprintln!("wake-on-exec: {:?} to the command's answer", t0.elapsed());
    assert_eq!(get(&d, "idle").1["state"], "running");
    assert_eq!(ops_of_kind(&d, &id, "sandbox.wake").len(), 1);

    // Hibernated again; then several clients at once (exec, file read, process list): one wake serves
    // them all.
    wait_state(&d, "idle", "stopped", Duration::from_secs(30));
    let sock = d.socket.clone();
    let reqs: Vec<(&str, String, Option<Value>)> = vec![
        (
            "POST",
            "/v1/sandboxes/idle/exec".into(),
            Some(json!({"cmd": "cat /dev/shm/note"})),
        ),
        (
            "POST",
            "/v1/sandboxes/idle/exec".into(),
            Some(json!({"cmd": "cat /dev/shm/note"})),
        ),
        (
            "GET",
            "/v1/sandboxes/idle/files?path=/dev/shm/note".into(),
            None,
        ),
        ("GET", "/v1/sandboxes/idle/processes".into(), None),
    ];
    let threads: Vec<_> = reqs
        .into_iter()
        .map(|(m, p, b)| {
            let sock = sock.clone();
            std::thread::spawn(move || {
                let body = b.map(|b| b.to_string().into_bytes());
                let (status, out) =
                    common::http_unix(&sock, m, &p, body.as_deref(), "application/json");
                (p, status, String::from_utf8_lossy(&out).into_owned())
            })
        })
        .collect();
    for t in threads {
        let (p, status, out) = t.join().unwrap();
        assert_eq!(status, 200, "{p}: {out}\n{}", tail(&d.log(), 30));
        if !p.ends_with("processes") {
            assert!(out.contains("kept-in-ram"), "{p}: {out}");
        }
    }
    assert_eq!(
        ops_of_kind(&d, &id, "sandbox.wake").len(),
        2,
        "one wake per hibernation"
    );
}

#[test]
fn timeout_deletes_and_set_timeout_extends() {
    require_image("tiny");
    let d = Daemon::start();
    let a = d.create(&[
        "--name",
        "short",
        "--timeout",
        "6",
        "--on-timeout",
        "delete",
    ]);
    assert_eq!(a["lifetime"]["timeout"], 6);
    assert_eq!(a["lifetime"]["on_timeout"], "delete");
    let b = d.create(&[
        "--name",
        "renewed",
        "--timeout",
        "6",
        "--on-timeout",
        "delete",
    ]);
    let b_expiry = b["lifetime"]["expires_at"].as_str().unwrap().to_string();
    // Renewed through the CLI before it runs out: 60 s from now.
    let out = d.kiln_ok(&["--json", "sandbox", "set-timeout", "renewed", "60"]);
    let renewed: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(renewed["lifetime"]["timeout"], 60);
    assert!(renewed["lifetime"]["expires_at"].as_str().unwrap() > b_expiry.as_str());

    let took = wait_state(&d, "short", "gone", Duration::from_secs(40));
    eprintln!("deleted {took:?} after the check started");
    // Past the renewed sandbox's first deadline: it lives on.
    let renewed_at = Instant::now();
    let created_timeout = Duration::from_secs(6);
    std::thread::sleep(created_timeout + Duration::from_secs(2));
    assert!(renewed_at.elapsed() > created_timeout);
    assert_eq!(get(&d, "renewed").1["state"], "running");
    // Its VM went with it: only the renewed sandbox's QEMU is left.
    assert_eq!(d.qemu_pids().len(), 1);
    let listing = d.kiln_ok(&["sandbox", "get", "renewed"]);
    assert!(listing.contains("timeout 60 s"), "{listing}");
    assert!(listing.contains("on timeout: delete"), "{listing}");

    // A fork child inherits no lifetime unless given one; given one, it applies to the child only.
    let (status, v) = d.api(
        "POST",
        "/v1/sandboxes/renewed/fork",
        Some(json!({"count": 1, "name": "kid", "timeout": 4, "on_timeout": "delete"})),
    );
    assert_eq!(status, 201, "{v}");
    assert_eq!(v["sandboxes"][0]["lifetime"]["timeout"], 4, "{v}");
    let out = d.kiln_ok(&["--json", "fork", "renewed", "--name", "plain"]);
    let plain: Value = serde_json::from_str(&out).unwrap();
    assert!(plain["sandboxes"][0]["lifetime"].is_null(), "{plain}");
    wait_state(&d, "kid-1", "gone", Duration::from_secs(30));
    assert_eq!(get(&d, "renewed").1["lifetime"]["timeout"], 60);
    assert_eq!(get(&d, "plain-1").1["state"], "running");

    // Bad input is refused with the stable code.
    let (status, v) = d.api(
        "POST",
        "/v1/sandboxes/renewed/timeout",
        Some(json!({"timeout": 999_999_999u64})),
    );
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (400, Some("invalid_request")),
        "{v}"
    );
    let (status, _) = d.api("POST", "/v1/sandboxes/renewed/timeout", Some(json!({})));
    assert_eq!(status, 400);

    // The API describes it.
    let (_, doc) = d.api("GET", "/v1/openapi.json", None);
    assert!(doc["paths"]["/v1/sandboxes/{id}/timeout"]["post"].is_object());
    for schema in ["SetTimeout", "Lifetime", "OnTimeout"] {
        assert!(
            doc["components"]["schemas"][schema].is_object(),
            "{schema} missing"
        );
    }
    let create = &doc["components"]["schemas"]["CreateSandbox"]["properties"];
    assert!(create["idle_timeout"].is_object(), "{create}");
    assert!(doc["components"]["schemas"]["CreateSnapshot"]["properties"]["ttl"].is_object());
}

#[test]
fn deadline_survives_a_daemon_restart() {
    require_image("tiny");
    let mut d = Daemon::start();
    let sb = d.create(&["--name", "lasting", "--timeout", "8"]);
    let expires = sb["lifetime"]["expires_at"].as_str().unwrap().to_string();
    // The daemon dies before the deadline and is down when it passes.
    d.kill_hard();
    std::thread::sleep(Duration::from_secs(10));
    d.restart_hard();
    let (_, v) = get(&d, "lasting");
    assert_eq!(v["lifetime"]["expires_at"].as_str(), Some(expires.as_str()));
    // Fired right after the start: hibernated.
    let took = wait_state(&d, "lasting", "stopped", Duration::from_secs(30));
    eprintln!("fired {took:?} after the restart");
    assert!(took < Duration::from_secs(20));
    assert!(d.qemu_pids().is_empty());
    // A manual start renews the timeout (8 s from now).
    let (status, v) = d.api("POST", "/v1/sandboxes/lasting/start", None);
    assert_eq!(status, 200, "{v}");
    assert!(v["lifetime"]["expires_at"].as_str().unwrap() > expires.as_str());
}

#[test]
fn snapshot_ttl_deletes_what_nothing_needs() {
    require_image("tiny");
    let d = Daemon::start();
    d.create(&["--name", "src"]);
    let snap = |args: &[&str]| -> Value {
        let mut a = vec!["--json", "snapshot", "create", "src"];
        a.extend_from_slice(args);
        serde_json::from_str(&d.kiln_ok(&a)).unwrap()
    };
    let lone = snap(&["--name", "lone", "--ttl", "3"]);
    assert!(lone["expires_at"].is_string(), "{lone}");
    snap(&["--name", "keep", "--ttl", "15"]);
    snap(&["--name", "forever"]);
    // A diff snapshot builds on `keep` (through a copy resumed from it).
    d.kiln_ok(&["snapshot", "resume", "keep", "--name", "copy"]);
    let diff = serde_json::from_str::<Value>(&d.kiln_ok(&[
        "--json", "snapshot", "create", "copy", "--name", "child", "--type", "diff",
    ]))
    .unwrap();
    assert_eq!(diff["parent"], "snapshot:keep");

    let gone = |name: &str| d.api("GET", &format!("/v1/snapshots/{name}"), None).0 == 404;
    let t0 = Instant::now();
    while !gone("lone") {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "lone outlived its ttl\n{}",
            tail(&d.log(), 30)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // Past keep's ttl: still there, the diff needs it; the snapshot without a ttl stays too.
    while t0.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(
        !gone("keep"),
        "an expired snapshot a diff builds on was deleted"
    );
    assert!(!gone("forever"));
    // Once the diff is gone, nothing needs it: deleted on a later try.
    d.kiln_ok(&["snapshot", "delete", "-y", "child"]);
    let t1 = Instant::now();
    while !gone("keep") {
        assert!(
            t1.elapsed() < Duration::from_secs(30),
            "keep outlived its dependants\n{}",
            tail(&d.log(), 30)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // The copy resumed from it runs on.
    assert_eq!(sh(&d, "copy", "echo ok"), "ok\n");
    assert!(!gone("forever"));
}
