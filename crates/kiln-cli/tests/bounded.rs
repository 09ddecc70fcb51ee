//! A hostile guest and slow clients cannot make the daemon's memory or disk grow without bound, and a
//! guest that ignores its own timeout cannot hold a request forever. Real VMs, real floods; the daemon's
//! memory is read from /proc (VmHWM after resetting it through clear_refs).

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{require_image, Daemon};
use serde_json::{json, Value};

/// The most the daemon's peak RSS may grow during a flood.
const MAX_GROWTH_KB: u64 = 64 * 1024;

fn status_kb(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("daemon status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// Resets the daemon's peak RSS to its current RSS; returns that.
fn reset_peak(pid: u32) -> u64 {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").expect("reset VmHWM");
    status_kb(pid, "VmRSS:")
}

/// How far the daemon's peak RSS rose above `base` (kB).
fn peak_growth(pid: u32, base: u64) -> u64 {
    status_kb(pid, "VmHWM:").saturating_sub(base)
}

/// Sends a request and reads only the response head, leaving the body unread in the socket.
fn open_unread(d: &Daemon, method: &str, path: &str, body: &str) -> (UnixStream, String) {
    let mut s = UnixStream::connect(&d.socket).expect("connect");
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: kiln\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(s.read(&mut byte).expect("read head"), 1, "closed early");
        head.push(byte[0]);
    }
    (s, String::from_utf8_lossy(&head).into_owned())
}

fn sh(d: &Daemon, sb: &str, body: Value) -> (u16, Value) {
    d.api("POST", &format!("/v1/sandboxes/{sb}/exec"), Some(body))
}

#[test]
fn guest_floods_leave_daemon_memory_bounded() {
    require_image("tiny");
    let d = Daemon::start();
    d.create(&["--name", "flood"]);
    let pid = d.pid().expect("daemon pid");

    // 1. A streamed exec whose client reads nothing.
    let base = reset_peak(pid);
    let body = json!({"cmd": "cat /dev/zero", "stream": true, "timeout_ms": 20000}).to_string();
    let (conn, head) = open_unread(&d, "POST", "/v1/sandboxes/flood/exec", &body);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    std::thread::sleep(Duration::from_secs(15));
    let growth = peak_growth(pid, base);
    eprintln!(
        "streamed exec unread for 15 s: daemon peak RSS +{} MB",
        growth / 1024
    );
    assert!(growth < MAX_GROWTH_KB, "daemon grew by {growth} kB");
    drop(conn);

    // 2. A download (of an endless file) whose client reads nothing.
    let base = reset_peak(pid);
    let (conn, head) = open_unread(&d, "GET", "/v1/sandboxes/flood/files?path=/dev/zero", "");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    std::thread::sleep(Duration::from_secs(10));
    let growth = peak_growth(pid, base);
    eprintln!(
        "download unread for 10 s: daemon peak RSS +{} MB",
        growth / 1024
    );
    assert!(growth < MAX_GROWTH_KB, "daemon grew by {growth} kB");
    drop(conn);

    // 3. A collected (non-streamed) exec of 100 MB: the answer is capped and says so.
    let base = reset_peak(pid);
    let t = Instant::now();
    let (status, v) = sh(
        &d,
        "flood",
        json!({"cmd": "head -c 100000000 /dev/zero; echo done >&2", "timeout_ms": 240000}),
    );
    let growth = peak_growth(pid, base);
    eprintln!(
        "collected 100 MB exec: {:.1} s, daemon peak RSS +{} MB",
        t.elapsed().as_secs_f64(),
        growth / 1024
    );
    assert!(growth < MAX_GROWTH_KB, "daemon grew by {growth} kB");
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["exit_code"], 0, "the process ran to its end: {v}");
    assert_eq!(v["truncated"], true);
    assert_eq!(v["stdout"].as_str().unwrap().len(), 1 << 20);
    assert_eq!(v["stderr"], "done\n");

    // The sandbox still answers once the stalled streams are cut or done.
    let t = Instant::now();
    let (status, v) = sh(
        &d,
        "flood",
        json!({"cmd": "echo alive", "timeout_ms": 60000}),
    );
    assert_eq!(
        (status, v["stdout"].as_str()),
        (200, Some("alive\n")),
        "{v}"
    );
    eprintln!(
        "sandbox answered {:.1} s after the floods",
        t.elapsed().as_secs_f64()
    );
}

#[test]
fn host_ends_an_exec_whose_guest_ignores_its_timeout() {
    require_image("tiny");
    let d = Daemon::start();
    d.create(&["--name", "frozen"]);
    // The agent is the shell's parent: stopping it means nobody in the guest enforces timeout_ms.
    let socket = d.socket.clone();
    let (tx, rx) = std::sync::mpsc::channel();
    let started = Instant::now();
    std::thread::spawn(move || {
        let body = json!({"cmd": "kill -STOP $PPID; sleep 120", "timeout_ms": 3000}).to_string();
        let answer = common::http_unix(
            &socket,
            "POST",
            "/v1/sandboxes/frozen/exec",
            Some(body.as_bytes()),
            "application/json",
        );
        let _ = tx.send(answer);
    });
    let (status, body) = rx
        .recv_timeout(Duration::from_secs(40))
        .expect("the host never answered an exec whose guest agent stopped (waited 40 s)");
    let took = started.elapsed();
    let v: Value = serde_json::from_slice(&body).unwrap();
    eprintln!("answered {status} after {:.1} s: {v}", took.as_secs_f64());
    assert_eq!(status, 504, "{v}");
    assert_eq!(v["error"]["code"], "timeout", "{v}");
    // timeout_ms (3 s) + the host's grace (5 s) + slack for a loaded machine.
    assert!(took < Duration::from_secs(15), "took {took:?}");
}

fn console_files(dir: &Path) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let Ok(meta) = e.path().symlink_metadata() else {
                continue;
            };
            let name = e.file_name().to_string_lossy().into_owned();
            // A template snapshot's boot log belongs to the template (shared by every sandbox resumed
            // from it, removed with it), not to any sandbox.
            if meta.is_dir() && name != "images" && !name.starts_with("template-") {
                stack.push(e.path());
            } else if meta.is_file() && (name.contains("console") || d.ends_with("consoles")) {
                out.push((e.path().display().to_string(), meta.len()));
            }
        }
    }
    out
}

#[test]
fn console_flood_stays_in_a_bounded_ring_and_low_disk_refuses_new_work() {
    require_image("tiny");
    let mut d = Daemon::start();
    d.create(&["--name", "noisy"]);
    // ~20 s of random bytes on the serial console.
    let (status, v) = sh(
        &d,
        "noisy",
        json!({"cmd": "cat /dev/urandom > /dev/ttyS0 & p=$!; sleep 20; kill $p; sleep 1; (echo; echo MARK-BEFORE) > /dev/ttyS0",
               "timeout_ms": 60000}),
    );
    assert_eq!(status, 200, "{v}");
    std::thread::sleep(Duration::from_millis(500));
    let files = console_files(d.data_dir());
    let total: u64 = files.iter().map(|(_, len)| len).sum();
    eprintln!("console files after the flood: {files:?}");
    assert!(!files.is_empty(), "no console file kept at all");
    assert!(total <= 1 << 20, "console files hold {total} bytes");

    let t = Instant::now();
    let (status, all) = d.http("GET", "/v1/sandboxes/noisy/logs", None, "");
    assert_eq!(status, 200);
    assert!(all.len() <= 1 << 20, "{} bytes", all.len());
    let (status, tail) = d.http("GET", "/v1/sandboxes/noisy/logs?tail=4096", None, "");
    assert_eq!(status, 200);
    assert!(tail.len() <= 4096);
    assert!(
        String::from_utf8_lossy(&tail).contains("MARK-BEFORE"),
        "the tail ends with the last line written"
    );
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "logs took {:?}",
        t.elapsed()
    );
    let (status, lines) = d.http("GET", "/v1/sandboxes/noisy/logs?lines=1", None, "");
    assert_eq!(status, 200);
    assert_eq!(String::from_utf8_lossy(&lines).trim(), "MARK-BEFORE");

    // A restarted daemon (the VM keeps running) reads the console again; with a free-space floor above
    // what the disk has, it refuses new sandboxes and snapshots with the numbers.
    d.restart_with_env(&[("KILN_MIN_FREE_DISK", "100%")]);
    let (status, v) = sh(
        &d,
        "noisy",
        json!({"cmd": "sleep 1; echo MARK-AFTER-RESTART > /dev/ttyS0", "timeout_ms": 30000}),
    );
    assert_eq!(status, 200, "{v}");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, logs) = d.http("GET", "/v1/sandboxes/noisy/logs?lines=5", None, "");
        if String::from_utf8_lossy(&logs).contains("MARK-AFTER-RESTART") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "console written after a daemon restart never reached the log: {}",
            String::from_utf8_lossy(&logs)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let (status, v) = d.api("POST", "/v1/sandboxes", Some(json!({"name": "another"})));
    assert_eq!(status, 507, "{v}");
    assert_eq!(v["error"]["code"], "insufficient_storage");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(msg.contains("MiB free") && msg.contains("floor"), "{msg}");
    let (status, v) = d.api("POST", "/v1/sandboxes/noisy/snapshots", Some(json!({})));
    assert_eq!(status, 507, "{v}");
    assert_eq!(v["error"]["code"], "insufficient_storage");
    // Deleting is never refused, and takes the console ring with it.
    d.kiln_ok(&["sandbox", "delete", "-y", "noisy"]);
    assert_eq!(console_files(d.data_dir()), vec![]);
}
