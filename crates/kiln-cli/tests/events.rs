//! The event stream (`GET /v1/events`, `kiln events`) with real VMs: a create → snapshot → resume →
//! delete shows each committed change in order, numbered without gaps; kind and sandbox filters,
//! `Last-Event-ID` replay, refused filters and the heartbeat.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{require_image, Daemon};
use serde_json::Value;

const KILN: &str = env!("CARGO_BIN_EXE_kiln");

/// `kiln --json events ARGS` with its stdout lines on a channel.
fn kiln_events(d: &Daemon, args: &[&str]) -> (Child, mpsc::Receiver<Value>) {
    let mut child = Command::new(KILN)
        .arg("--socket")
        .arg(&d.socket)
        .args(["--json", "events"])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("run kiln events");
    let out = child.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            if let Ok(v) = serde_json::from_str::<Value>(&line) {
                if tx.send(v).is_err() {
                    break;
                }
            }
        }
    });
    (child, rx)
}

/// Collects events until `done` says so, or fails after `limit`.
fn collect_until(
    rx: &mpsc::Receiver<Value>,
    limit: Duration,
    mut done: impl FnMut(&Value) -> bool,
) -> Vec<Value> {
    let deadline = Instant::now() + limit;
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(v) => {
                let stop = done(&v);
                seen.push(v);
                if stop {
                    return seen;
                }
            }
            Err(_) => panic!("events stopped or timed out; got {seen:#?}"),
        }
    }
}

/// A raw SSE request over the unix socket: the response head and a reader of the decoded body.
struct Sse {
    stream: UnixStream,
    head: String,
    raw: Vec<u8>,
    body: Vec<u8>,
}

impl Sse {
    fn open(d: &Daemon, path: &str, extra_headers: &str) -> Sse {
        let mut stream = UnixStream::connect(&d.socket).expect("connect");
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: kiln\r\nAccept: text/event-stream\r\n{extra_headers}\r\n"
        )
        .expect("write");
        stream
            .set_read_timeout(Some(Duration::from_millis(200)))
            .expect("timeout");
        let mut s = Sse {
            stream,
            head: String::new(),
            raw: Vec::new(),
            body: Vec::new(),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !s.raw.windows(4).any(|w| w == b"\r\n\r\n") {
            assert!(Instant::now() < deadline, "no response head");
            s.fill();
        }
        let end = s.raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap_or(0);
        s.head = String::from_utf8_lossy(&s.raw[..end]).to_ascii_lowercase();
        s.raw.drain(..end + 4);
        s
    }

    fn fill(&mut self) {
        let mut buf = [0u8; 8192];
        match self.stream.read(&mut buf) {
            Ok(0) => {}
            Ok(n) => self.raw.extend_from_slice(&buf[..n]),
            Err(_) => {} // timeout: nothing yet
        }
    }

    /// Decodes complete chunks from `raw` into `body`.
    fn decode(&mut self) {
        loop {
            let Some(nl) = self.raw.windows(2).position(|w| w == b"\r\n") else {
                return;
            };
            let Ok(size) =
                usize::from_str_radix(String::from_utf8_lossy(&self.raw[..nl]).trim(), 16)
            else {
                return;
            };
            if self.raw.len() < nl + 2 + size + 2 {
                return;
            }
            self.body
                .extend_from_slice(&self.raw[nl + 2..nl + 2 + size]);
            self.raw.drain(..nl + 2 + size + 2);
        }
    }

    /// Reads for `limit`, or until `want` events arrived; returns the raw blocks seen.
    fn blocks(&mut self, want: usize, limit: Duration) -> Vec<String> {
        let deadline = Instant::now() + limit;
        loop {
            self.fill();
            self.decode();
            let text = String::from_utf8_lossy(&self.body).to_string();
            let blocks: Vec<String> = text
                .split("\n\n")
                .filter(|b| !b.is_empty())
                .map(str::to_string)
                .collect();
            let complete = if text.ends_with("\n\n") {
                blocks.len()
            } else {
                blocks.len().saturating_sub(1)
            };
            let events = blocks[..complete]
                .iter()
                .filter(|b| b.contains("data:"))
                .count();
            if events >= want || Instant::now() > deadline {
                return blocks[..complete].to_vec();
            }
        }
    }

    fn events(&mut self, want: usize, limit: Duration) -> Vec<Value> {
        self.blocks(want, limit)
            .iter()
            .filter_map(|b| {
                b.lines()
                    .find_map(|l| l.strip_prefix("data: "))
                    .and_then(|d| serde_json::from_str(d).ok())
            })
            .collect()
    }
}

fn summary(events: &[Value]) -> Vec<(String, String, String)> {
    events
        .iter()
        .map(|e| {
            (
                e["kind"].as_str().unwrap_or("").to_string(),
                e["id"].as_str().unwrap_or("").to_string(),
                e["state"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

/// Whether `want` occurs in `have` in this order (other events may come between).
fn in_order(have: &[(String, String, String)], want: &[(&str, &str, &str)]) -> bool {
    let mut it = have.iter();
    want.iter().all(|(k, id, st)| {
        it.any(|(hk, hid, hst)| hk == k && hid == id && (st.is_empty() || hst == st))
    })
}

#[test]
fn lifecycle_events_in_order_with_filters_and_replay() {
    require_image("tiny");
    let d = Daemon::start();
    // From the first event on (since=0 replays the ring), so nothing is missed while the client connects.
    let (mut all, rx) = kiln_events(&d, &["--since", "0"]);

    let a = d.create(&["--name", "ev-a", "--memory", "256"]);
    let a_id = a["id"].as_str().expect("id").to_string();
    let snap: Value = serde_json::from_str(
        &d.kiln_ok(&["--json", "snapshot", "create", "ev-a", "--name", "ev-s1"]),
    )
    .expect("snapshot JSON");
    let snap_id = snap["id"].as_str().expect("snapshot id").to_string();
    let b: Value = serde_json::from_str(
        &d.kiln_ok(&["--json", "snapshot", "resume", &snap_id, "--name", "ev-b"]),
    )
    .expect("resume JSON");
    let b_id = b["id"].as_str().expect("id").to_string();
    d.kiln_ok(&["sandbox", "delete", "-y", "ev-b"]);
    d.kiln_ok(&["sandbox", "delete", "-y", "ev-a"]);

    let events = collect_until(&rx, Duration::from_secs(60), |e| {
        e["kind"] == "sandbox.deleted" && e["id"] == a_id.as_str()
    });
    let _ = all.kill();
    let _ = all.wait();
    let s = summary(&events);
    eprintln!("{} events:", s.len());
    for (e, (k, id, st)) in events.iter().zip(&s) {
        eprintln!("  {:>3} {k:<18} {id:<16} {st}", e["seq"]);
    }
    // Numbered from 1 without gaps, in the order published.
    for (i, e) in events.iter().enumerate() {
        assert_eq!(e["seq"].as_u64(), Some(i as u64 + 1), "seq of {e}");
        assert!(
            e["time"].as_str().is_some_and(|t| t.contains('T')),
            "time of {e}"
        );
    }
    let (a, b, sn) = (a_id.as_str(), b_id.as_str(), snap_id.as_str());
    assert!(
        in_order(
            &s,
            &[
                ("sandbox.created", a, "creating"),
                ("sandbox.state", a, "running"),
                ("snapshot.created", sn, ""),
                ("sandbox.created", b, ""),
                ("sandbox.state", b, "running"),
                ("sandbox.state", b, "deleting"),
                ("sandbox.deleted", b, ""),
                ("sandbox.state", a, "deleting"),
                ("sandbox.deleted", a, ""),
            ]
        ),
        "lifecycle events out of order: {s:#?}"
    );
    // A snapshot of a running sandbox pauses it only inside the capture (about a second): its recorded
    // state stays running, so no state event comes between its running and the snapshot.
    let running_at = s
        .iter()
        .rposition(|(k, id, st)| k == "sandbox.state" && id == a && st == "running")
        .expect("running");
    let snap_at = s
        .iter()
        .position(|(k, _, _)| k == "snapshot.created")
        .expect("snapshot");
    assert!(
        !s[running_at + 1..snap_at]
            .iter()
            .any(|(k, id, _)| k == "sandbox.state" && id == a),
        "{s:#?}"
    );
    // Operations: started before their changes, finished after, with their outcome.
    let op_of = |kind: &str| {
        events
            .iter()
            .find(|e| e["kind"] == "operation.finished" && e["object"]["kind"] == kind)
            .unwrap_or_else(|| panic!("no finished {kind} operation in {s:#?}"))
            .clone()
    };
    for kind in [
        "sandbox.create",
        "snapshot.create",
        "snapshot.resume",
        "sandbox.delete",
    ] {
        let fin = op_of(kind);
        assert_eq!(fin["state"], "succeeded", "{fin}");
        let id = fin["id"].as_str().expect("op id");
        let started = events
            .iter()
            .position(|e| e["kind"] == "operation.started" && e["id"] == id)
            .expect("started event");
        let finished = events.iter().position(|e| e == &fin).expect("finished");
        assert!(started < finished);
    }
    // The objects are the API's: a sandbox after the change, null once deleted.
    let running = events
        .iter()
        .find(|e| e["kind"] == "sandbox.state" && e["id"] == a && e["state"] == "running")
        .expect("running event");
    assert_eq!(running["sandbox"], a);
    assert_eq!(running["object"]["name"], "ev-a");
    assert_eq!(running["object"]["state"], "running");
    let created = events
        .iter()
        .find(|e| e["kind"] == "snapshot.created")
        .expect("snapshot event");
    assert_eq!(created["sandbox"], a, "a snapshot's sandbox is its source");
    assert_eq!(created["object"]["id"], sn);
    let deleted = events
        .iter()
        .find(|e| e["kind"] == "sandbox.deleted" && e["id"] == b)
        .expect("deleted event");
    assert!(deleted["object"].is_null() && deleted["state"].is_null());

    // Filters: snapshot kinds (a prefix) and sandbox deletions, about sandbox A only, replayed from 0.
    let mut f = Sse::open(
        &d,
        &format!("/v1/events?kind=snapshot.,sandbox.deleted&sandbox={a}&since=0"),
        "",
    );
    assert!(f.head.starts_with("http/1.1 200"), "{}", f.head);
    assert!(
        f.head.contains("content-type: text/event-stream"),
        "{}",
        f.head
    );
    let got = summary(&f.events(2, Duration::from_secs(10)));
    assert_eq!(
        got,
        vec![
            ("snapshot.created".into(), sn.to_string(), String::new()),
            ("sandbox.deleted".into(), a.to_string(), String::new()),
        ],
        "filtered stream"
    );
    // Last-Event-ID replays what came after that event, with the same ids on the wire.
    let after = events[events.len() - 3]["seq"].as_u64().expect("seq");
    let mut r = Sse::open(&d, "/v1/events", &format!("Last-Event-ID: {after}\r\n"));
    let blocks = r.blocks(2, Duration::from_secs(10));
    assert!(
        blocks[0].contains(&format!("id: {}\n", after + 1)),
        "{blocks:?}"
    );
    // (The delete's operation.finished may follow: the daemon went on publishing after the collection.)
    let replayed: Vec<u64> = r
        .events(2, Duration::from_secs(1))
        .iter()
        .map(|e| e["seq"].as_u64().unwrap_or(0))
        .collect();
    assert_eq!(replayed[..2], [after + 1, after + 2], "{replayed:?}");
    // A typo in a kind is refused with a stable code rather than matching nothing.
    let (status, err) = d.api("GET", "/v1/events?kind=sandbox.stat", None);
    assert_eq!(status, 400, "{err}");
    assert_eq!(err["error"]["code"], "invalid_request");
    let (status, err) = d.api("GET", "/v1/events?since=yesterday", None);
    assert_eq!(status, 400, "{err}");
    // The OpenAPI document describes both routes and the event.
    let (_, doc) = d.api("GET", "/v1/openapi.json", None);
    for path in ["/v1/events", "/metrics"] {
        assert!(
            doc["paths"][path]["get"].is_object(),
            "{path} not in OpenAPI"
        );
    }
    assert!(doc["components"]["schemas"]["Event"].is_object());
    // A quiet stream still carries a heartbeat comment every 15 s.
    let mut quiet = Sse::open(&d, "/v1/events?kind=volume.created", "");
    let blocks = quiet.blocks(1, Duration::from_secs(20));
    assert!(
        blocks
            .iter()
            .any(|b| b.starts_with(": heartbeat") || b.starts_with(":heartbeat")),
        "no heartbeat in 20 s: {blocks:?}"
    );
}
