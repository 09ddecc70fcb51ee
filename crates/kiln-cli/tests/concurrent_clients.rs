//! Many API clients at once over the unix socket, on real VMs: commands, files, lists, snapshots, and
//! creates and forks under a low capacity limit. No deadlock, and no error but documented capacity
//! refusals (429). Prints a `RELIABILITY` line with the operation counts.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{http_unix, require_image, Daemon};
use serde_json::{json, Value};

const CLIENTS: usize = 50;

#[derive(Default)]
struct Counts {
    attempted: AtomicUsize,
    succeeded: AtomicUsize,
    refused: AtomicUsize,
    failures: Mutex<Vec<String>>,
}

/// One API call, counted: success, a capacity refusal (429 capacity_exceeded), or a failure.
fn call(
    counts: &Counts,
    socket: &std::path::Path,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> Option<Value> {
    counts.attempted.fetch_add(1, Ordering::Relaxed);
    let bytes = body.map(|b| b.to_string().into_bytes());
    let (status, resp) = http_unix(socket, method, path, bytes.as_deref(), "application/json");
    let v: Value = serde_json::from_slice(&resp).unwrap_or(Value::Null);
    if (200..300).contains(&status) {
        counts.succeeded.fetch_add(1, Ordering::Relaxed);
        return Some(v);
    }
    if status == 429 && v["error"]["code"] == "capacity_exceeded" {
        counts.refused.fetch_add(1, Ordering::Relaxed);
    } else {
        counts
            .failures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(format!("{method} {path}: {status} {v}"));
    }
    None
}

fn check(counts: &Counts, ok: bool, what: String) {
    if !ok {
        counts
            .failures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(what);
    }
}

fn client(n: usize, socket: &std::path::Path, counts: &Counts, until: Instant) {
    let mut rng: u64 = 0x9E37_79B9_7F4A_7C15 ^ (n as u64 + 1);
    let mut i = 0;
    while Instant::now() < until {
        i += 1;
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let sb = if rng & 1 == 0 { "w1" } else { "w2" };
        let tag = format!("c{n}-{i}");
        match (rng >> 8) % 100 {
            0..=34 => {
                let out = call(
                    counts,
                    socket,
                    "POST",
                    &format!("/v1/sandboxes/{sb}/exec"),
                    Some(json!({"cmd": format!("echo {tag}; cat /root/marker")})),
                );
                if let Some(v) = out {
                    check(
                        counts,
                        v["stdout"] == format!("{tag}\n{sb}\n"),
                        format!("exec {tag} in {sb}: {v}"),
                    );
                }
            }
            35..=54 => {
                let path = format!("/v1/sandboxes/{sb}/files?path=/tmp/{tag}");
                counts.attempted.fetch_add(1, Ordering::Relaxed);
                let (status, _) = http_unix(
                    socket,
                    "PUT",
                    &path,
                    Some(tag.as_bytes()),
                    "application/octet-stream",
                );
                if (200..300).contains(&status) {
                    counts.succeeded.fetch_add(1, Ordering::Relaxed);
                    counts.attempted.fetch_add(1, Ordering::Relaxed);
                    let (status, back) = http_unix(socket, "GET", &path, None, "");
                    let good = status == 200 && back == tag.as_bytes();
                    if good {
                        counts.succeeded.fetch_add(1, Ordering::Relaxed);
                    }
                    check(counts, good, format!("reading back {path}: {status}"));
                    call(counts, socket, "DELETE", &path, None);
                } else {
                    check(counts, false, format!("PUT {path}: {status}"));
                }
            }
            55..=69 => {
                call(counts, socket, "GET", "/v1/sandboxes", None);
                call(counts, socket, "GET", "/v1/snapshots", None);
            }
            70..=84 => {
                let made = call(
                    counts,
                    socket,
                    "POST",
                    &format!("/v1/sandboxes/{sb}/snapshots"),
                    Some(json!({"name": tag, "type": if rng & 2 == 0 { "full" } else { "disk" }})),
                );
                if made.is_some() {
                    call(counts, socket, "GET", &format!("/v1/snapshots/{tag}"), None);
                    call(
                        counts,
                        socket,
                        "DELETE",
                        &format!("/v1/snapshots/{tag}"),
                        None,
                    );
                }
            }
            85..=92 => {
                if let Some(v) = call(
                    counts,
                    socket,
                    "POST",
                    "/v1/sandboxes",
                    Some(json!({"name": tag})),
                ) {
                    let _ = v;
                    call(
                        counts,
                        socket,
                        "POST",
                        &format!("/v1/sandboxes/{tag}/exec"),
                        Some(json!({"cmd": "true"})),
                    );
                    call(
                        counts,
                        socket,
                        "DELETE",
                        &format!("/v1/sandboxes/{tag}"),
                        None,
                    );
                }
            }
            _ => {
                let count = 1 + (rng >> 20) % 2;
                if let Some(v) = call(
                    counts,
                    socket,
                    "POST",
                    &format!("/v1/sandboxes/{sb}/fork"),
                    Some(json!({"name": tag, "count": count})),
                ) {
                    for kid in v["sandboxes"].as_array().into_iter().flatten() {
                        let name = kid["name"].as_str().unwrap_or_default();
                        call(
                            counts,
                            socket,
                            "DELETE",
                            &format!("/v1/sandboxes/{name}"),
                            None,
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn fifty_clients_mixed_operations_no_deadlock_no_unexpected_errors() {
    run_load(
        "fifty_clients_mixed_operations_no_deadlock_no_unexpected_errors",
        45,
    );
}

/// The same for 10 minutes (`make soak`; `KILN_LOAD_SECS` sets the time).
#[test]
#[ignore]
fn soak_fifty_clients_for_ten_minutes() {
    run_load("soak_fifty_clients_for_ten_minutes", 600);
}

fn run_load(test: &str, default_secs: u64) {
    require_image("tiny");
    let secs: u64 = std::env::var("KILN_LOAD_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default_secs);
    // Room for the two workers plus one more VM: most creates and forks meet the limit.
    let d = Daemon::start_with(&["--max-sandboxes", "3"]);
    for w in ["w1", "w2"] {
        d.create(&["--name", w]);
        d.kiln_ok(&[
            "exec",
            w,
            "--",
            "sh",
            "-c",
            &format!("echo {w} > /root/marker"),
        ]);
    }
    let counts = Arc::new(Counts::default());
    let until = Instant::now() + Duration::from_secs(secs);
    let started = Instant::now();
    let threads: Vec<_> = (0..CLIENTS)
        .map(|n| {
            let counts = counts.clone();
            let socket = d.socket.clone();
            std::thread::spawn(move || client(n, &socket, &counts, until))
        })
        .collect();
    // No deadlock: every client finishes its last operation within a bound after the deadline.
    let limit = until + Duration::from_secs(180);
    for t in threads {
        while !t.is_finished() {
            assert!(
                Instant::now() < limit,
                "a client is stuck (deadlock?):\n{}",
                common::tail(&d.log(), 40)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        t.join().expect("client thread panicked");
    }
    let failures = counts
        .failures
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let (attempted, succeeded, refused) = (
        counts.attempted.load(Ordering::Relaxed),
        counts.succeeded.load(Ordering::Relaxed),
        counts.refused.load(Ordering::Relaxed),
    );
    println!(
        "RELIABILITY {test} operations attempted={attempted} survived={} lost={} succeeded={succeeded} refused_429={refused} seconds={}",
        succeeded + refused,
        failures.len(),
        started.elapsed().as_secs()
    );
    assert!(
        failures.is_empty(),
        "{} unexpected errors:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert!(refused > 0, "no create or fork met the capacity limit");
    assert!(succeeded > 0);
    // Afterwards: only the workers, running, with their data; no snapshot, QEMU or directory left over.
    let (_, list) = d.api("GET", "/v1/sandboxes", None);
    let names: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(names.len(), 2, "{list}");
    for w in ["w1", "w2"] {
        assert_eq!(
            d.kiln_ok(&["exec", w, "--", "cat", "/root/marker"]),
            format!("{w}\n")
        );
    }
    let (_, snaps) = d.api("GET", "/v1/snapshots", None);
    assert_eq!(snaps.as_array().map(Vec::len), Some(0), "{snaps}");
    assert_eq!(d.qemu_pids().len(), 2);
    // kiln's own template snapshot (what creates resume) is all the snapshot store holds.
    let left: Vec<String> = std::fs::read_dir(d.data_dir().join("snapshots"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with("template-"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
    assert_eq!(
        std::fs::read_dir(d.data_dir().join("sandboxes"))
            .unwrap()
            .count(),
        2
    );
}
