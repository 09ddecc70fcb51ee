//! Background processes on real VMs: a handle (pid), output replayed from the start and followed live,
//! stdin, signals, wait, a bounded output ring, and processes as part of the machine's state (snapshot
//! copies, fork children and stop/start each list them and go on independently). Also: a client that
//! disconnects from a foreground exec cancels it in the guest.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use common::{require_image, Daemon};
use serde_json::{json, Value};

fn start(d: &Daemon, sb: &str, body: Value) -> Value {
    let (status, v) = d.api("POST", &format!("/v1/sandboxes/{sb}/processes"), Some(body));
    assert_eq!(status, 201, "{v}");
    v
}

fn list(d: &Daemon, sb: &str) -> Vec<Value> {
    let (status, v) = d.api("GET", &format!("/v1/sandboxes/{sb}/processes"), None);
    assert_eq!(status, 200, "{v}");
    v["processes"].as_array().unwrap().clone()
}

/// The NDJSON events of `logs` (not following): the replay of what the ring holds.
fn logs(d: &Daemon, sb: &str, pid: u64) -> Vec<Value> {
    let (status, body) = d.http(
        "GET",
        &format!("/v1/sandboxes/{sb}/processes/{pid}/logs"),
        None,
        "application/json",
    );
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    body.split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_slice(l).unwrap())
        .collect()
}

fn stdout_of(events: &[Value]) -> String {
    events
        .iter()
        .filter(|e| e["type"] == "stdout")
        .map(|e| e["data"].as_str().unwrap_or(""))
        .collect()
}

fn wait(d: &Daemon, sb: &str, pid: u64, timeout_ms: u64) -> Value {
    let (status, v) = d.api(
        "POST",
        &format!("/v1/sandboxes/{sb}/processes/{pid}/wait?timeout_ms={timeout_ms}"),
        None,
    );
    assert_eq!(status, 200, "{v}");
    v
}

/// Opens a raw HTTP request and returns the reader positioned at the (chunked) body.
fn open_stream(d: &Daemon, method: &str, path: &str, body: &str) -> BufReader<UnixStream> {
    let mut s = UnixStream::connect(&d.socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: kiln\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    assert!(line.contains(" 200 "), "{line}");
    loop {
        line.clear();
        r.read_line(&mut line).unwrap();
        if line == "\r\n" {
            return r;
        }
    }
}

/// Numbers printed by the counter (`N HOST` lines) in `out`, with their host names.
fn counter_lines(out: &str) -> Vec<(u64, String)> {
    out.lines()
        .filter_map(|l| {
            let (n, host) = l.split_once(' ')?;
            Some((n.parse().ok()?, host.to_string()))
        })
        .collect()
}

fn assert_contiguous(lines: &[(u64, String)], what: &str) {
    for w in lines.windows(2) {
        assert_eq!(
            w[1].0,
            w[0].0 + 1,
            "{what}: output has a gap or repeat: {lines:?}"
        );
    }
}

fn sh(d: &Daemon, sb: &str, cmd: &str) -> String {
    d.kiln_ok(&["exec", sb, "--", "sh", "-c", cmd])
}

const COUNTER: &str = "i=0; while true; do i=$((i+1)); echo \"$i $(hostname)\"; sleep 0.2; done";

#[test]
fn background_processes_are_part_of_the_machine_state() {
    require_image("tiny");
    let d = Daemon::start();
    d.create(&["--name", "src"]);
    let p = start(&d, "src", json!({"cmd": COUNTER}));
    let pid = p["pid"].as_u64().unwrap();
    assert_eq!(p["state"], "running");

    // A client that attaches later gets the output from the start, then live output.
    std::thread::sleep(Duration::from_millis(1500));
    let mut r = open_stream(
        &d,
        "GET",
        &format!("/v1/sandboxes/src/processes/{pid}/logs?follow=true"),
        "",
    );
    let started = Instant::now();
    let mut seen = String::new();
    let mut line = String::new();
    while counter_lines(&seen).len() < 12 {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "no live output: {seen}"
        );
        line.clear();
        r.read_line(&mut line).unwrap();
        if let Ok(v) = serde_json::from_str::<Value>(line.trim()) {
            if v["type"] == "stdout" {
                seen.push_str(v["data"].as_str().unwrap());
            }
        }
    }
    drop(r);
    let attached = counter_lines(&seen);
    assert_eq!(
        attached[0],
        (1, "src".to_string()),
        "replay starts at the start: {seen}"
    );
    assert_contiguous(&attached, "attached mid-stream");

    // Snapshot, then two resumed copies and a fork child: each lists the process, running.
    d.kiln_ok(&["snapshot", "create", "src", "--name", "s1"]);
    d.kiln_ok(&["snapshot", "resume", "s1", "--name", "c1"]);
    d.kiln_ok(&["snapshot", "resume", "s1", "--name", "c2"]);
    d.kiln_ok(&["fork", "src", "--name", "kid"]);
    for sb in ["src", "c1", "c2", "kid-1"] {
        let procs = list(&d, sb);
        let me = procs.iter().find(|p| p["pid"] == pid);
        assert!(
            me.is_some_and(|p| p["state"] == "running"),
            "{sb}: {procs:?}"
        );
    }
    std::thread::sleep(Duration::from_millis(1500));
    // Each copy's output goes on from the same past and diverges after: the counter prints the copy's
    // own hostname from the resume on.
    let mut tails = Vec::new();
    for sb in ["c1", "c2", "kid-1"] {
        let out = stdout_of(&logs(&d, sb, pid));
        let lines = counter_lines(&out);
        assert_eq!(lines[0], (1, "src".to_string()), "{sb}: {out}");
        assert_contiguous(&lines, sb);
        assert!(
            lines.iter().any(|(_, h)| h == sb),
            "{sb} never printed its own name: {out}"
        );
        tails.push(lines.last().unwrap().clone());
    }
    assert!(
        tails[0].1 != tails[1].1 && tails[1].1 != tails[2].1,
        "{tails:?}"
    );

    // Stdin of a process started in the snapshot's source goes to each copy independently.
    let cat = start(&d, "c1", json!({"argv": ["cat"], "stdin": true}));
    let cat_pid = cat["pid"].as_u64().unwrap();
    d.kiln_ok(&["snapshot", "create", "c1", "--name", "s2"]);
    d.kiln_ok(&["snapshot", "resume", "s2", "--name", "c3"]);
    for (sb, word) in [("c1", "one"), ("c3", "three")] {
        let (status, v) = d.api(
            "POST",
            &format!("/v1/sandboxes/{sb}/processes/{cat_pid}/stdin"),
            Some(json!({"data": format!("{word}\n"), "close": true})),
        );
        assert_eq!(status, 204, "{v}");
        let done = wait(&d, sb, cat_pid, 20_000);
        assert_eq!(
            (done["state"].as_str(), done["exit_code"].as_i64()),
            (Some("exited"), Some(0)),
            "{done}"
        );
        assert_eq!(
            stdout_of(&logs(&d, sb, cat_pid)),
            format!("{word}\n"),
            "{sb}"
        );
    }

    // Stop (RAM to disk) and start: the process is still there and still counting.
    let before = list(&d, "c2")
        .into_iter()
        .find(|p| p["pid"] == pid)
        .unwrap();
    d.kiln_ok(&["stop", "c2"]);
    d.kiln_ok(&["start", "c2"]);
    std::thread::sleep(Duration::from_millis(1000));
    let after = list(&d, "c2")
        .into_iter()
        .find(|p| p["pid"] == pid)
        .unwrap();
    assert_eq!(after["state"], "running");
    assert!(
        after["output_bytes"].as_u64() > before["output_bytes"].as_u64(),
        "{before} {after}"
    );

    // A signal ends it in one copy only.
    let (status, v) = d.api(
        "POST",
        &format!("/v1/sandboxes/c1/processes/{pid}/signal"),
        Some(json!({"signal": "TERM"})),
    );
    assert_eq!(status, 204, "{v}");
    let done = wait(&d, "c1", pid, 20_000);
    assert_eq!(
        (done["state"].as_str(), done["signal"].as_i64()),
        (Some("exited"), Some(15)),
        "{done}"
    );
    let other = list(&d, "c2")
        .into_iter()
        .find(|p| p["pid"] == pid)
        .unwrap();
    assert_eq!(other["state"], "running");
    d.kiln_ok(&["sandbox", "delete", "-y", "src", "c1", "c2", "c3", "kid-1"]);
}

#[test]
fn stdin_signals_wait_user_and_a_bounded_ring() {
    require_image("tiny");
    let d = Daemon::start();
    d.create(&["--name", "p"]);

    // Stdin round trip with a reader that answers each line.
    let rd = start(
        &d,
        "p",
        json!({"cmd": "while read l; do echo \"got $l\"; done; echo bye", "stdin": true}),
    );
    let rd_pid = rd["pid"].as_u64().unwrap();
    for word in ["a", "b"] {
        let (status, v) = d.api(
            "POST",
            &format!("/v1/sandboxes/p/processes/{rd_pid}/stdin"),
            Some(json!({"data": format!("{word}\n")})),
        );
        assert_eq!(status, 204, "{v}");
    }
    let (status, _) = d.api(
        "POST",
        &format!("/v1/sandboxes/p/processes/{rd_pid}/stdin"),
        Some(json!({"close": true})),
    );
    assert_eq!(status, 204);
    let done = wait(&d, "p", rd_pid, 20_000);
    assert_eq!(done["exit_code"], 0, "{done}");
    assert_eq!(stdout_of(&logs(&d, "p", rd_pid)), "got a\ngot b\nbye\n");

    // Wait with a deadline answers `running`; a signal by number kills the whole group.
    let sl = start(&d, "p", json!({"cmd": "sleep 1000 & sleep 1000"}));
    let sl_pid = sl["pid"].as_u64().unwrap();
    let t = Instant::now();
    assert_eq!(wait(&d, "p", sl_pid, 300)["state"], "running");
    assert!(t.elapsed() < Duration::from_secs(20));
    let (status, v) = d.api(
        "POST",
        &format!("/v1/sandboxes/p/processes/{sl_pid}/signal"),
        Some(json!({"signal": 9})),
    );
    assert_eq!(status, 204, "{v}");
    assert_eq!(wait(&d, "p", sl_pid, 20_000)["signal"], 9);
    assert_eq!(sh(&d, "p", "pgrep -f 'sleep 1000' | wc -l").trim(), "0");

    // Errors: unknown pid, bad signal.
    let (status, v) = d.api("GET", "/v1/sandboxes/p/processes/999999", None);
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (404, Some("process_not_found")),
        "{v}"
    );
    let (status, v) = d.api(
        "POST",
        &format!("/v1/sandboxes/p/processes/{sl_pid}/signal"),
        Some(json!({"signal": "NOPE"})),
    );
    assert_eq!(status, 400, "{v}");

    // As another user, with env and cwd (background and foreground).
    let u = start(
        &d,
        "p",
        json!({"cmd": "echo $(id -u) $FOO $(pwd)", "user": "1234", "env": {"FOO": "bar"}, "cwd": "/tmp"}),
    );
    let u_pid = u["pid"].as_u64().unwrap();
    wait(&d, "p", u_pid, 20_000);
    assert_eq!(stdout_of(&logs(&d, "p", u_pid)), "1234 bar /tmp\n");
    let (status, v) = d.api(
        "POST",
        "/v1/sandboxes/p/exec",
        Some(json!({"cmd": "id -u; touch /root/x", "user": "1234"})),
    );
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["stdout"], "1234\n", "{v}");
    assert_ne!(
        v["exit_code"], 0,
        "an unprivileged user wrote to /root: {v}"
    );

    // A sandbox resumed from a snapshot takes `env` (merged over the snapshot's) for its commands.
    d.kiln_ok(&["snapshot", "create", "p", "--name", "ps"]);
    let (status, v) = d.api(
        "POST",
        "/v1/sandboxes",
        Some(json!({"snapshot": "ps", "name": "pe", "env": {"FOO": "resumed"}})),
    );
    assert_eq!(status, 201, "{v}");
    assert_eq!(sh(&d, "pe", "echo $FOO"), "resumed\n");
    d.kiln_ok(&["sandbox", "delete", "-y", "pe"]);

    // The ring keeps the last 1 MiB; the rest is counted as dropped, and the replay says so.
    let total: u64 = 3_000_000;
    let big = start(
        &d,
        "p",
        json!({"cmd": format!("yes 0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ | head -c {total}")}),
    );
    let big_pid = big["pid"].as_u64().unwrap();
    let done = wait(&d, "p", big_pid, 120_000);
    assert_eq!(done["exit_code"], 0, "{done}");
    assert_eq!(done["output_bytes"].as_u64(), Some(total), "{done}");
    let dropped = done["dropped_bytes"].as_u64().unwrap();
    assert!(dropped >= total - (1 << 20), "{done}");
    let events = logs(&d, "p", big_pid);
    assert_eq!(events[0], json!({"type": "dropped", "bytes": dropped}));
    let kept = stdout_of(&events).len() as u64;
    assert_eq!(kept + dropped, total);
    assert!(kept <= 1 << 20);
}

#[test]
fn disconnecting_a_foreground_exec_kills_it_in_the_guest() {
    require_image("tiny");
    let d = Daemon::start();
    d.create(&["--name", "fg"]);
    for (i, stream) in [(1, true), (2, false)] {
        let body = json!({
            "cmd": format!("echo $$ > /tmp/fg{i}.pid; echo started; exec sleep 1000"),
            "stream": stream,
        })
        .to_string();
        let mut s = UnixStream::connect(&d.socket).unwrap();
        write!(
            s,
            "POST /v1/sandboxes/fg/exec HTTP/1.1\r\nHost: kiln\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        // The command has started once its pid file is there; then the client goes away.
        let t = Instant::now();
        while !d
            .kiln(&["exec", "fg", "--", "test", "-s", &format!("/tmp/fg{i}.pid")])
            .status
            .success()
        {
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "exec {i} never started"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        drop(s);
        let t = Instant::now();
        loop {
            let alive = sh(
                &d,
                "fg",
                &format!("kill -0 $(cat /tmp/fg{i}.pid) 2>/dev/null && echo alive || echo gone"),
            );
            if alive.trim() == "gone" {
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "exec {i} (stream: {stream}) still runs in the guest after its client disconnected"
            );
            std::thread::sleep(Duration::from_millis(300));
        }
    }
}
