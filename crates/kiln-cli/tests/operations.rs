//! Operations run to completion whatever the client does: a table of long operations, each cut by a
//! client that closes its connection at several points, then checked (outcome recorded as an operation,
//! sandbox answering or in the state the outcome says, no temporary directories, operation repeatable);
//! and a daemon SIGKILLed while an operation runs reports that operation as interrupted after restart.
//! Real VMs (`tiny`), one daemon, few VMs: the whole file stays within a few minutes under TCG.

mod common;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::world::Tally;
use common::{require_image, Daemon};
use serde_json::{json, Value};

/// The tests here each run VMs: one at a time on a 2-core machine.
static SERIAL: Mutex<()> = Mutex::new(());

/// An answer: status, lower-cased header block, body.
struct Answer {
    status: u16,
    headers: String,
    body: Value,
}

impl Answer {
    fn header(&self, name: &str) -> Option<String> {
        let want = format!("{}:", name.to_ascii_lowercase());
        self.headers
            .lines()
            .find_map(|l| l.strip_prefix(&want).map(|v| v.trim().to_string()))
    }
}

fn request_bytes(
    method: &str,
    path: &str,
    body: Option<&Value>,
    extra: &[(&str, &str)],
) -> Vec<u8> {
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: kiln\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in extra {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    head.push_str(&body);
    head.into_bytes()
}

/// A request with a deadline for the whole answer (a wedged sandbox must fail the test, not hang it).
fn call(
    d: &Daemon,
    method: &str,
    path: &str,
    body: Option<Value>,
    extra: &[(&str, &str)],
    timeout: Duration,
) -> Answer {
    let mut s = UnixStream::connect(&d.socket).expect("connect daemon");
    s.set_read_timeout(Some(timeout)).expect("timeout");
    s.write_all(&request_bytes(method, path, body.as_ref(), extra))
        .expect("write request");
    let mut raw = Vec::new();
    if let Err(e) = s.read_to_end(&mut raw) {
        panic!(
            "{method} {path}: no complete answer within {timeout:?} ({e}); got {:?}\ndaemon log:\n{}",
            String::from_utf8_lossy(&raw),
            common::tail(&d.log(), 30)
        );
    }
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("{method} {path}: no header end in {raw:?}"));
    let headers = String::from_utf8_lossy(&raw[..split]).to_ascii_lowercase();
    let status = headers
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status");
    assert!(
        !headers.contains("transfer-encoding: chunked"),
        "{method} {path}: unexpected chunked answer"
    );
    let rest = &raw[split + 4..];
    let body = if rest.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(rest)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(rest).into_owned()))
    };
    Answer {
        status,
        headers,
        body,
    }
}

fn api(d: &Daemon, method: &str, path: &str, body: Option<Value>) -> Answer {
    call(d, method, path, body, &[], Duration::from_secs(120))
}

/// Where the client gives up.
#[derive(Clone, Copy, Debug)]
enum Cut {
    /// Closes right after sending the request.
    Immediately,
    /// Closes ~30 ms in (`curl --max-time 0.03`).
    Early,
    /// Closes while the daemon holds at this fault point, late in the operation (the daemon runs with
    /// `KILN_FAULTS=hold.POINT=MS` in this phase).
    Late(&'static str),
}

/// Sends a request and closes the connection at `cut` without reading any answer.
fn send_and_cut(d: &Daemon, method: &str, path: &str, body: Option<Value>, cut: Cut) {
    let holds_before = match cut {
        Cut::Late(point) => d.log().matches(&holding(point)).count(),
        _ => 0,
    };
    let mut s = UnixStream::connect(&d.socket).expect("connect daemon");
    s.write_all(&request_bytes(method, path, body.as_ref(), &[]))
        .expect("write request");
    match cut {
        Cut::Immediately => {}
        Cut::Early => std::thread::sleep(Duration::from_millis(30)),
        Cut::Late(point) => assert!(
            d.wait_log(&holding(point), holds_before + 1, Duration::from_secs(60)),
            "{method} {path} never reached {point}:\n{}",
            common::tail(&d.log(), 30)
        ),
    }
    let _ = s.shutdown(std::net::Shutdown::Both);
}

fn holding(point: &str) -> String {
    format!("fault injection: holding at {point}")
}

/// Operations recorded for `target`, newest first; `None` when the daemon has no operations API.
fn operations(d: &Daemon, target: &str) -> Option<Vec<Value>> {
    let a = api(d, "GET", &format!("/v1/operations?target={target}"), None);
    if a.status == 404 {
        return None;
    }
    assert_eq!(a.status, 200, "list operations: {}", a.body);
    Some(a.body.as_array().expect("operations array").clone())
}

/// Waits until no operation on `target` is running (the daemon works on after the client left).
fn settle(d: &Daemon, target: &str) {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        match operations(d, target) {
            None => {
                // No operations API (the old code): give the dropped work the same time to have finished.
                std::thread::sleep(Duration::from_secs(3));
                return;
            }
            Some(ops) if ops.iter().all(|o| o["state"] != "running") => return,
            Some(_) => {}
        }
        assert!(
            Instant::now() < deadline,
            "operations on {target} still running after 90 s"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until the daemon recorded a new operation of `kind` on `target` (the request may still be on its
/// way through the server when the client is gone); without an operations API, returns at once. False if
/// none appeared within `within`.
fn appears(
    d: &Daemon,
    target: &str,
    kind: &str,
    seen: &BTreeSet<String>,
    within: Duration,
) -> bool {
    let deadline = Instant::now() + within;
    loop {
        let Some(ops) = operations(d, target) else {
            return true;
        };
        if ops
            .iter()
            .any(|o| o["kind"] == kind && !seen.contains(o["id"].as_str().unwrap_or_default()))
        {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The newest operation of `kind` on `target` recorded after `seen` ids; must exist and have succeeded.
fn outcome(d: &Daemon, target: &str, kind: &str, seen: &BTreeSet<String>, ctx: &str) -> Value {
    let ops = operations(d, target).unwrap_or_else(|| {
        panic!(
            "{ctx}: the daemon has no GET /v1/operations: the cut operation's outcome is nowhere"
        )
    });
    let op = ops
        .iter()
        .find(|o| o["kind"] == kind && !seen.contains(o["id"].as_str().unwrap_or_default()))
        .unwrap_or_else(|| panic!("{ctx}: no new {kind} operation on {target}: {ops:?}"))
        .clone();
    assert_eq!(op["state"], "succeeded", "{ctx}: {op}");
    let id = op["id"].as_str().expect("operation id");
    let again = api(d, "GET", &format!("/v1/operations/{id}"), None);
    assert_eq!(again.status, 200, "{ctx}: {}", again.body);
    assert_eq!(again.body["id"], op["id"]);
    op
}

fn seen_ids(d: &Daemon, target: &str) -> BTreeSet<String> {
    operations(d, target)
        .unwrap_or_default()
        .iter()
        .filter_map(|o| o["id"].as_str().map(str::to_string))
        .collect()
}

/// A command in the sandbox answers within 30 s (a sandbox left paused never does).
fn answers_exec(d: &Daemon, sb: &str, ctx: &str) {
    let a = call(
        d,
        "POST",
        &format!("/v1/sandboxes/{sb}/exec"),
        Some(json!({"cmd": "echo alive"})),
        &[],
        Duration::from_secs(30),
    );
    assert_eq!(a.status, 200, "{ctx}: exec in {sb}: {}", a.body);
    assert_eq!(
        a.body["stdout"], "alive\n",
        "{ctx}: exec in {sb}: {}",
        a.body
    );
}

fn state_of(d: &Daemon, sb: &str) -> String {
    let a = api(d, "GET", &format!("/v1/sandboxes/{sb}"), None);
    assert_eq!(a.status, 200, "{}", a.body);
    a.body["state"].as_str().unwrap_or_default().to_string()
}

/// The snapshots directory holds exactly the listed snapshots: no `.tmp-*`, `.trash-*` or fork capture.
fn no_debris(d: &Daemon, ctx: &str) {
    let listed: BTreeSet<String> = api(d, "GET", "/v1/snapshots", None)
        .body
        .as_array()
        .expect("snapshots")
        .iter()
        .filter_map(|s| s["id"].as_str().map(str::to_string))
        .collect();
    let on_disk = common::world::snapshot_dirs(d);
    assert_eq!(
        on_disk, listed,
        "{ctx}: snapshots/ holds more than the snapshots"
    );
    let sandboxes: BTreeSet<String> = api(d, "GET", "/v1/sandboxes", None)
        .body
        .as_array()
        .expect("sandboxes")
        .iter()
        .filter_map(|s| s["id"].as_str().map(str::to_string))
        .collect();
    let dirs = common::world::dir_names(d.data_dir().join("sandboxes"));
    assert_eq!(
        dirs, sandboxes,
        "{ctx}: sandboxes/ holds more than the sandboxes"
    );
}

/// A synchronous call that must succeed, answering with a `Kiln-Operation` header.
fn sync_ok(d: &Daemon, method: &str, path: &str, body: Option<Value>, ctx: &str) -> Value {
    let a = api(d, method, path, body);
    assert!(
        (200..300).contains(&a.status),
        "{ctx}: {method} {path}: {} {}",
        a.status,
        a.body
    );
    let op = a.header("kiln-operation").unwrap_or_default();
    assert!(
        op.starts_with("op-"),
        "{ctx}: {method} {path}: no Kiln-Operation header in {}",
        a.headers
    );
    a.body
}

fn delete_sandbox(d: &Daemon, sb: &str, ctx: &str) {
    sync_ok(d, "DELETE", &format!("/v1/sandboxes/{sb}"), None, ctx);
}

struct Table<'a> {
    d: &'a Daemon,
    /// The long-lived sandbox most operations work on, and its snapshot `base` (resume, restore).
    main: String,
    base: String,
    tally: Tally,
    /// Cuts after which the server never ran the handler (nothing happened).
    not_started: usize,
}

impl Table<'_> {
    /// One cut operation and its checks; `target` is what the operation is listed under.
    fn cut(
        &mut self,
        what: &str,
        cut: Cut,
        target: &str,
        kind: &str,
        req: (&str, String, Option<Value>),
    ) -> Value {
        let ctx = format!("{what} cut {cut:?}");
        let seen = seen_ids(self.d, target);
        let t0 = Instant::now();
        self.tally.attempted += 1;
        send_and_cut(self.d, req.0, &req.1, req.2.clone(), cut);
        if !appears(self.d, target, kind, &seen, Duration::from_secs(10)) {
            // A request whose connection closed right after it was sent may be dropped by the server before
            // its handler runs: then nothing at all happened. Proved by doing it now: the same request (same
            // names) would be refused had any of it been done.
            assert!(
                matches!(cut, Cut::Immediately),
                "{ctx}: no {kind} operation on {target} recorded within 10 s"
            );
            no_debris(self.d, &ctx);
            let result = sync_ok(self.d, req.0, &req.1, req.2, &format!("{ctx}, not started"));
            println!("{ctx}: dropped before its handler ran; done again at once");
            self.tally.survived += 1;
            self.not_started += 1;
            return json!({ "result": result });
        }
        settle(self.d, target);
        // The source sandbox must not be left paused or half-way (the reported defect).
        if matches!(state_of(self.d, &self.main).as_str(), "running") {
            answers_exec(self.d, &self.main, &ctx);
        }
        no_debris(self.d, &ctx);
        let op = outcome(self.d, target, kind, &seen, &ctx);
        println!("{ctx}: {} in {} ms", op["id"], t0.elapsed().as_millis());
        self.tally.survived += 1;
        op
    }

    fn snapshot(&mut self, kind: &str, cut: Cut, n: usize) {
        let (d, main) = (self.d, self.main.clone());
        let name = format!("{kind}-{n}");
        let op = self.cut(
            &format!("snapshot {kind}"),
            cut,
            &main,
            "snapshot.create",
            (
                "POST",
                format!("/v1/sandboxes/{main}/snapshots"),
                Some(json!({"name": name, "type": kind})),
            ),
        );
        assert_eq!(op["result"]["id"], name.as_str(), "{op}");
        assert_eq!(
            api(d, "GET", &format!("/v1/snapshots/{name}"), None).status,
            200
        );
        answers_exec(d, &main, "after snapshot");
        // Repeat it, then drop both (disk space).
        let again = format!("{name}-again");
        sync_ok(
            d,
            "POST",
            &format!("/v1/sandboxes/{main}/snapshots"),
            Some(json!({"name": again, "type": kind})),
            "repeat snapshot",
        );
        for s in [name, again] {
            sync_ok(
                d,
                "DELETE",
                &format!("/v1/snapshots/{s}"),
                None,
                "drop snapshot",
            );
        }
        no_debris(d, "after dropping snapshots");
    }

    fn resume(&mut self, cut: Cut, n: usize) {
        let (d, base) = (self.d, self.base.clone());
        let name = format!("res-{n}");
        let op = self.cut(
            "resume",
            cut,
            &base,
            "snapshot.resume",
            (
                "POST",
                format!("/v1/snapshots/{base}/resume"),
                Some(json!({"name": name})),
            ),
        );
        assert_eq!(op["result"]["name"], name.as_str(), "{op}");
        answers_exec(d, &name, "resumed sandbox");
        let again = format!("{name}-again");
        sync_ok(
            d,
            "POST",
            &format!("/v1/snapshots/{base}/resume"),
            Some(json!({"name": again})),
            "repeat resume",
        );
        answers_exec(d, &again, "resumed again");
        delete_sandbox(d, &name, "drop resumed");
        delete_sandbox(d, &again, "drop resumed");
    }

    fn fork(&mut self, cut: Cut, n: usize) {
        let (d, main) = (self.d, self.main.clone());
        let prefix = format!("fk{n}");
        let op = self.cut(
            "fork x3",
            cut,
            &main,
            "sandbox.fork",
            (
                "POST",
                format!("/v1/sandboxes/{main}/fork"),
                Some(json!({"count": 3, "name": prefix})),
            ),
        );
        let kids = op["result"]["sandboxes"]
            .as_array()
            .expect("fork result")
            .clone();
        assert_eq!(kids.len(), 3, "{op}");
        for k in &kids {
            let id = k["id"].as_str().expect("child id");
            answers_exec(d, id, "fork child");
            delete_sandbox(d, id, "drop child");
        }
        let again = sync_ok(
            d,
            "POST",
            &format!("/v1/sandboxes/{main}/fork"),
            Some(json!({"count": 3, "name": format!("{prefix}a")})),
            "repeat fork",
        );
        for k in again["sandboxes"].as_array().expect("fork result") {
            let id = k["id"].as_str().expect("child id");
            answers_exec(d, id, "fork child (repeat)");
            delete_sandbox(d, id, "drop child");
        }
        no_debris(d, "after fork");
    }

    /// Stop cut, then start cut; then both repeated.
    fn stop_start(&mut self, stop_cut: Cut, start_cut: Cut) {
        let (d, main) = (self.d, self.main.clone());
        let op = self.cut(
            "stop",
            stop_cut,
            &main,
            "sandbox.stop",
            ("POST", format!("/v1/sandboxes/{main}/stop"), None),
        );
        assert_eq!(op["result"]["state"], "stopped", "{op}");
        assert_eq!(state_of(d, &main), "stopped");
        let op = self.cut(
            "start",
            start_cut,
            &main,
            "sandbox.start",
            ("POST", format!("/v1/sandboxes/{main}/start"), None),
        );
        assert_eq!(op["result"]["state"], "running", "{op}");
        answers_exec(d, &main, "after start");
        sync_ok(
            d,
            "POST",
            &format!("/v1/sandboxes/{main}/stop"),
            None,
            "repeat stop",
        );
        sync_ok(
            d,
            "POST",
            &format!("/v1/sandboxes/{main}/start"),
            None,
            "repeat start",
        );
        answers_exec(d, &main, "after repeated start");
    }

    fn restore(&mut self, cut: Cut) {
        let (d, main, base) = (self.d, self.main.clone(), self.base.clone());
        let body = json!({"resume": true, "force": true});
        // A sandbox running from the snapshot it is restored to is refused (`snapshot_in_use`): stopped first.
        sync_ok(
            d,
            "POST",
            &format!("/v1/sandboxes/{main}/stop"),
            None,
            "stop before restore",
        );
        let op = self.cut(
            "restore",
            cut,
            &base,
            "snapshot.restore",
            (
                "POST",
                format!("/v1/snapshots/{base}/restore"),
                Some(body.clone()),
            ),
        );
        assert_eq!(op["result"]["state"], "running", "{op}");
        answers_exec(d, &main, "after restore");
        sync_ok(
            d,
            "POST",
            &format!("/v1/sandboxes/{main}/stop"),
            None,
            "stop before restore",
        );
        sync_ok(
            d,
            "POST",
            &format!("/v1/snapshots/{base}/restore"),
            Some(body),
            "repeat restore",
        );
        answers_exec(d, &main, "after repeated restore");
    }

    fn delete(&mut self, cut: Cut, n: usize) {
        let (d, base) = (self.d, self.base.clone());
        let name = format!("del-{n}");
        let sb = sync_ok(
            d,
            "POST",
            &format!("/v1/snapshots/{base}/resume"),
            Some(json!({"name": name})),
            "sandbox to delete",
        );
        let id = sb["id"].as_str().expect("id").to_string();
        self.cut(
            "delete",
            cut,
            &id,
            "sandbox.delete",
            ("DELETE", format!("/v1/sandboxes/{id}"), None),
        );
        assert_eq!(
            api(d, "GET", &format!("/v1/sandboxes/{id}"), None).status,
            404
        );
        assert!(!d.data_dir().join("sandboxes").join(&id).exists());
        // Repeat: another one, deleted while the client waits.
        let sb = sync_ok(
            d,
            "POST",
            &format!("/v1/snapshots/{base}/resume"),
            Some(json!({"name": format!("{name}-again")})),
            "sandbox to delete",
        );
        delete_sandbox(d, sb["id"].as_str().expect("id"), "repeat delete");
        no_debris(d, "after delete");
    }
}

#[test]
fn client_disconnects_never_cut_an_operation_short() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    require_image("tiny");
    let t0 = Instant::now();
    let mut d = Daemon::start();
    let main = d.create(&["--name", "main"])["id"]
        .as_str()
        .expect("id")
        .to_string();
    let base = api(
        &d,
        "POST",
        &format!("/v1/sandboxes/{main}/snapshots"),
        Some(json!({"name": "base"})),
    );
    assert_eq!(base.status, 201, "base snapshot: {}", base.body);
    let base = base.body["id"].as_str().expect("snapshot id").to_string();
    let mut t = Table {
        d: &d,
        main,
        base,
        tally: Tally::default(),
        not_started: 0,
    };

    // The reported defect first: a snapshot cut ~30 ms in.
    for (n, cut) in [Cut::Early, Cut::Immediately].into_iter().enumerate() {
        t.snapshot("full", cut, n);
        t.snapshot("diff", cut, n);
        t.resume(cut, n);
        t.fork(cut, n);
        t.stop_start(cut, cut);
        t.restore(cut);
        t.delete(cut, n);
    }
    println!(
        "early and immediate cuts done after {} s",
        t0.elapsed().as_secs()
    );

    // Late cuts: the daemon holds each operation near its end while the client goes away.
    let tally = std::mem::take(&mut t.tally);
    let (main, base, not_started) = (t.main.clone(), t.base.clone(), t.not_started);
    drop(t);
    let hold = "hold.snapshot.written=800,hold.resume.launched=800,hold.fork.captured=800,hold.stop.saved=800,hold.start.launched=800,hold.delete.marked=800";
    d.restart_with_env(&[("KILN_FAULTS", hold)]);
    let mut t = Table {
        d: &d,
        main,
        base,
        tally,
        not_started,
    };
    t.snapshot("full", Cut::Late("snapshot.written"), 2);
    t.snapshot("diff", Cut::Late("snapshot.written"), 2);
    t.resume(Cut::Late("resume.launched"), 2);
    t.fork(Cut::Late("fork.captured"), 2);
    t.stop_start(Cut::Late("stop.saved"), Cut::Late("start.launched"));
    t.restore(Cut::Late("start.launched"));
    t.delete(Cut::Late("delete.marked"), 2);
    // Tally's format, plus the cuts the server dropped before any work began.
    println!(
        "RELIABILITY client_disconnects_never_cut_an_operation_short operations attempted={} survived={} lost={} not_started={}",
        t.tally.attempted, t.tally.survived, t.tally.lost, t.not_started
    );
    println!("disconnect table done in {} s", t0.elapsed().as_secs());
}

#[test]
fn daemon_killed_during_an_operation_reports_it_interrupted() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    require_image("tiny");
    let mut d = Daemon::start_env(&[], &[("KILN_FAULTS", "hold.snapshot.written=5000")]);
    let main = d.create(&["--name", "main"])["id"]
        .as_str()
        .expect("id")
        .to_string();
    // Asked not to wait: 202 with the operation and where to find it.
    let a = call(
        &d,
        "POST",
        &format!("/v1/sandboxes/{main}/snapshots"),
        Some(json!({"name": "cut"})),
        &[("Prefer", "respond-async")],
        Duration::from_secs(30),
    );
    assert_eq!(a.status, 202, "{}", a.body);
    let id = a.body["id"].as_str().expect("operation id").to_string();
    assert_eq!(a.body["state"], "running", "{}", a.body);
    assert_eq!(
        a.header("location").as_deref(),
        Some(format!("/v1/operations/{id}").as_str())
    );
    assert!(d.wait_log(&holding("snapshot.written"), 1, Duration::from_secs(60)));
    // The CLI sees it running, at its stage; a wait that times out says so (exit 2).
    let out = d.kiln(&["--json", "operation", "wait", &id, "--timeout", "1"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let v: Value = serde_json::from_slice(&out.stdout).expect("wait JSON");
    assert_eq!(v["state"], "running", "{v}");
    assert_eq!(v["stage"], "publishing the snapshot's files", "{v}");
    let list = d.kiln_ok(&[
        "--json",
        "operation",
        "list",
        "--target",
        "main",
        "--state",
        "running",
    ]);
    assert!(list.contains(&id), "{list}");
    d.kill_hard();
    d.restart_with_env(&[]);
    let shown = d.kiln_ok(&["operation", "get", &id]);
    assert!(shown.contains("operation_interrupted"), "{shown}");
    let a = api(&d, "GET", &format!("/v1/operations/{id}"), None);
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(a.body["state"], "failed", "{}", a.body);
    assert_eq!(
        a.body["error"]["code"], "operation_interrupted",
        "{}",
        a.body
    );
    let msg = a.body["error"]["message"].as_str().unwrap_or_default();
    assert!(msg.contains("restarted"), "{msg}");
    // Start-up recovery rolled the snapshot back; the sandbox runs and the same snapshot can be taken.
    answers_exec(&d, &main, "after restart");
    no_debris(&d, "after restart");
    sync_ok(
        &d,
        "POST",
        &format!("/v1/sandboxes/{main}/snapshots"),
        Some(json!({"name": "cut"})),
        "snapshot again",
    );
    // Waiting on a finished operation answers at once; an unknown one is operation_not_found.
    let t0 = Instant::now();
    let w = api(
        &d,
        "GET",
        &format!("/v1/operations/{id}/wait?timeout=30"),
        None,
    );
    assert_eq!(w.status, 200, "{}", w.body);
    assert!(t0.elapsed() < Duration::from_secs(5));
    // The API describes it.
    let doc = api(&d, "GET", "/v1/openapi.json", None).body;
    for path in [
        "/v1/operations",
        "/v1/operations/{id}",
        "/v1/operations/{id}/wait",
    ] {
        assert!(
            doc["paths"][path]["get"].is_object(),
            "{path} not in the OpenAPI document"
        );
    }
    assert!(doc["components"]["schemas"]["Operation"].is_object());
    assert!(doc["paths"]["/v1/sandboxes/{id}/snapshots"]["post"]["responses"]["202"].is_object());
    let missing = api(
        &d,
        "GET",
        "/v1/operations/op-nosuchthing/wait?timeout=1",
        None,
    );
    assert_eq!(missing.status, 404);
    assert_eq!(missing.body["error"]["code"], "operation_not_found");
    // An orderly exit (SIGTERM) waits for the running operation: after the restart it has succeeded.
    d.restart_with_env(&[("KILN_FAULTS", "hold.snapshot.written=3000")]);
    let a = call(
        &d,
        "POST",
        &format!("/v1/sandboxes/{main}/snapshots"),
        Some(json!({"name": "drained"})),
        &[("Prefer", "respond-async")],
        Duration::from_secs(30),
    );
    assert_eq!(a.status, 202, "{}", a.body);
    let id = a.body["id"].as_str().expect("operation id").to_string();
    assert!(d.wait_log(&holding("snapshot.written"), 2, Duration::from_secs(60)));
    let t0 = Instant::now();
    assert!(
        d.terminate(Duration::from_secs(90)),
        "the daemon did not exit"
    );
    println!("SIGTERM to exit: {} ms", t0.elapsed().as_millis());
    d.restart_with_env(&[]);
    let a = api(&d, "GET", &format!("/v1/operations/{id}"), None);
    assert_eq!(a.body["state"], "succeeded", "{}", a.body);
    assert_eq!(api(&d, "GET", "/v1/snapshots/drained", None).status, 200);
    answers_exec(&d, &main, "after an orderly restart");
    no_debris(&d, "after an orderly restart");
    // Both operations cut by the daemon's exit have their outcome recorded and their sandbox working.
    let tally = Tally {
        attempted: 2,
        survived: 2,
        lost: 0,
    };
    tally.report(
        "daemon_killed_during_an_operation_reports_it_interrupted",
        "operations",
    );
}

#[test]
fn volume_operations_survive_disconnects() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let d = Daemon::start();
    for (n, cut) in [Cut::Early, Cut::Immediately].into_iter().enumerate() {
        let name = format!("vol-{n}");
        let seen = seen_ids(&d, &name);
        let body = json!({"name": name, "size_mib": 64});
        send_and_cut(&d, "POST", "/v1/volumes", Some(body.clone()), cut);
        if !appears(&d, &name, "volume.create", &seen, Duration::from_secs(10)) {
            // Dropped before the handler ran: nothing was made, so the same request succeeds now.
            sync_ok(
                &d,
                "POST",
                "/v1/volumes",
                Some(body),
                "volume create, not started",
            );
        }
        settle(&d, &name);
        let op = outcome(
            &d,
            &name,
            "volume.create",
            &seen,
            &format!("volume create cut {cut:?}"),
        );
        assert_eq!(op["result"]["name"], name.as_str(), "{op}");
        assert_eq!(
            api(&d, "GET", &format!("/v1/volumes/{name}"), None).status,
            200
        );
        let seen = seen_ids(&d, &name);
        send_and_cut(&d, "DELETE", &format!("/v1/volumes/{name}"), None, cut);
        if appears(&d, &name, "volume.delete", &seen, Duration::from_secs(10)) {
            settle(&d, &name);
            outcome(
                &d,
                &name,
                "volume.delete",
                &seen,
                &format!("volume delete cut {cut:?}"),
            );
        } else {
            sync_ok(
                &d,
                "DELETE",
                &format!("/v1/volumes/{name}"),
                None,
                "volume delete, not started",
            );
        }
        assert_eq!(
            api(&d, "GET", &format!("/v1/volumes/{name}"), None).status,
            404
        );
        // And it can be made again under the same name.
        sync_ok(
            &d,
            "POST",
            "/v1/volumes",
            Some(json!({"name": name, "size_mib": 64})),
            "volume again",
        );
    }
}
