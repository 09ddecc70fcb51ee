//! The model, the random actions and the invariant checks of tests/model.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::Rng;
use serde_json::{json, Value};

use crate::common::world::Tally;
use crate::common::{tail, Daemon};

/// At most this many VMs at once (2 cores, TCG).
const MAX_LIVE: usize = 4;
/// Snapshot names come from a small pool so that names are deleted and reused.
const SNAP_NAMES: [&str; 4] = ["p1", "p2", "p3", "p4"];
/// No single API call may take longer than this.
const CALL_DEADLINE: Duration = Duration::from_secs(120);

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum St {
    Running,
    Paused,
    Stopped,
}

impl St {
    fn as_str(self) -> &'static str {
        match self {
            St::Running => "running",
            St::Paused => "paused",
            St::Stopped => "stopped",
        }
    }
    fn live(self) -> bool {
        self != St::Stopped
    }
}

/// Where a sandbox's disk and memory came from, which decides what a diff snapshot of it builds on.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum Origin {
    Template,
    Snapshot(String),
    /// A fork child: its capture is deleted right after the fork.
    ForkCapture,
}

#[derive(Clone, Debug)]
pub struct MSb {
    pub state: St,
    pub marker: String,
    pub origin: Origin,
    pub restored_from: Option<String>,
    pub volume: bool,
}

#[derive(Clone, Debug)]
pub struct MSnap {
    pub kind: &'static str,
    pub source: String,
    pub marker: String,
    /// The snapshot a diff builds on (None: full, disk, or a diff on a template).
    pub base: Option<String>,
    pub restored: bool,
}

#[derive(Default)]
pub struct Model {
    pub sbs: BTreeMap<String, MSb>,
    pub snaps: BTreeMap<String, MSnap>,
    pub next: usize,
    pub volume_made: bool,
}

impl Model {
    fn live(&self) -> usize {
        self.sbs.values().filter(|s| s.state.live()).count()
    }
    fn fresh(&mut self, prefix: &str) -> String {
        self.next += 1;
        format!("{prefix}{}", self.next)
    }
    fn volume_free(&self) -> bool {
        !self.sbs.values().any(|s| s.volume)
    }
    fn pick(&self, rng: &mut StdRng, states: &[St]) -> Option<String> {
        let names: Vec<&String> = self
            .sbs
            .iter()
            .filter(|(_, s)| states.contains(&s.state))
            .map(|(n, _)| n)
            .collect();
        names.choose(rng).map(|s| s.to_string())
    }
}

pub struct Walker {
    pub d: Daemon,
    pub rng: StdRng,
    pub m: Model,
    pub seed: u64,
    pub history: Vec<String>,
    pub tally: Tally,
}

/// What the model says an action must answer.
enum Expect {
    Ok,
    Err(&'static [&'static str]),
}

impl Walker {
    fn fail(&self, what: String) -> ! {
        panic!(
            "model check failed (replay: KILN_MODEL_SEED={} KILN_MODEL_STEPS={}): {what}\nsteps:\n{}\ndaemon log:\n{}",
            self.seed,
            self.history.iter().filter(|h| h.starts_with("step ")).count(),
            self.history.join("\n"),
            tail(&self.d.log(), 40)
        )
    }

    /// One API call with a deadline: (status, JSON body).
    fn call(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        match request(&self.d, method, path, body.as_ref(), CALL_DEADLINE) {
            Ok(r) => r,
            Err(e) => self.fail(format!("{method} {path}: {e}")),
        }
    }

    fn expect(&mut self, what: &str, got: (u16, Value), want: Expect) -> Option<Value> {
        self.tally.attempted += 1;
        let (status, body) = got;
        let ok = (200..300).contains(&status);
        let code = body["error"]["code"].as_str().unwrap_or("").to_string();
        match want {
            Expect::Ok if ok => {
                self.tally.survived += 1;
                Some(body)
            }
            Expect::Err(codes) if !ok && codes.contains(&code.as_str()) => {
                self.tally.survived += 1;
                None
            }
            Expect::Ok => {
                self.tally.lost += 1;
                self.fail(format!("{what}: expected success, got {status} {body}"))
            }
            Expect::Err(codes) => {
                self.tally.lost += 1;
                self.fail(format!(
                    "{what}: expected one of {codes:?}, got {status} {body}"
                ))
            }
        }
    }

    fn exec(&self, sb: &str, cmd: &str) -> (u16, Value) {
        self.call(
            "POST",
            &format!("/v1/sandboxes/{sb}/exec"),
            Some(json!({ "cmd": cmd, "timeout_ms": 30000 })),
        )
    }

    fn set_marker(&mut self, sb: &str) {
        let marker = format!("m{}-{}", self.m.next, self.rng.gen::<u32>());
        self.m.next += 1;
        let (status, v) = self.exec(sb, &format!("echo {marker} > /root/marker"));
        if status != 200 || v["exit_code"] != 0 {
            self.fail(format!("writing the marker in {sb}: {status} {v}"));
        }
        if let Some(s) = self.m.sbs.get_mut(sb) {
            s.marker = marker;
        }
    }

    pub fn step(&mut self, step: usize) {
        let roll = self.rng.gen_range(0..100);
        let live = self.m.live();
        let any = !self.m.sbs.is_empty();
        let action = match roll {
            _ if !any => "create",
            0..=9 if live < MAX_LIVE => "create",
            0..=14 => "marker",
            15..=29 => "snapshot",
            30..=39 if live < MAX_LIVE => "resume_snapshot",
            40..=45 if live + 1 < MAX_LIVE => "fork",
            46..=51 => "pause_resume",
            52..=59 => "stop_start",
            60..=65 if live < MAX_LIVE => "restore",
            66..=71 => "delete_sandbox",
            72..=77 => "delete_snapshot",
            78..=91 => "disconnect",
            92..=95 => "restart",
            _ => "marker",
        };
        self.history.push(format!("step {step}: {action}"));
        match action {
            "create" => self.create(),
            "marker" => {
                if let Some(sb) = self.m.pick(&mut self.rng, &[St::Running]) {
                    self.history.push(format!("  marker in {sb}"));
                    self.set_marker(&sb);
                }
            }
            "snapshot" => self.snapshot(),
            "resume_snapshot" => self.resume_snapshot(),
            "fork" => self.fork(),
            "pause_resume" => self.pause_resume(),
            "stop_start" => self.stop_start(),
            "restore" => self.restore(),
            "delete_sandbox" => self.delete_sandbox(),
            "delete_snapshot" => self.delete_snapshot(),
            "disconnect" => self.disconnect(),
            _ => {
                self.history
                    .push("  daemon SIGKILLed and started again".into());
                self.d.restart_hard();
            }
        }
    }

    fn create(&mut self) {
        if self.m.live() >= MAX_LIVE {
            return;
        }
        let name = self.m.fresh("s");
        let volume = self.m.volume_free() && self.rng.gen_bool(0.25);
        if volume && !self.m.volume_made {
            let r = self.call(
                "POST",
                "/v1/volumes",
                Some(json!({"name": "vol", "size_mib": 64})),
            );
            self.expect("volume create", r, Expect::Ok);
            self.m.volume_made = true;
        }
        let mut body = json!({ "name": name, "template": "tiny", "memory_mib": 256 });
        if volume {
            body["volumes"] = json!([{ "volume": "vol", "path": "/data" }]);
        }
        self.history
            .push(format!("  create {name} volume={volume}"));
        let r = self.call("POST", "/v1/sandboxes", Some(body));
        self.expect("create", r, Expect::Ok);
        self.m.sbs.insert(
            name.clone(),
            MSb {
                state: St::Running,
                marker: String::new(),
                origin: Origin::Template,
                restored_from: None,
                volume,
            },
        );
        self.set_marker(&name);
        if volume {
            let (s, v) = self.exec(&name, &format!("echo {name} > /data/owner"));
            if s != 200 || v["exit_code"] != 0 {
                self.fail(format!("volume write in {name}: {s} {v}"));
            }
        }
    }

    /// The request and the model's expectation for a snapshot of a random sandbox.
    fn plan_snapshot(&mut self) -> Option<(String, String, &'static str, Value, Expect)> {
        let sb = self.m.pick(&mut self.rng, &[St::Running, St::Paused])?;
        let state = self.m.sbs[&sb].state;
        let kinds: &[&'static str] = if state == St::Running {
            &["full", "diff", "disk"]
        } else {
            &["full", "diff"]
        };
        let kind = *kinds.choose(&mut self.rng)?;
        let name = SNAP_NAMES.choose(&mut self.rng)?.to_string();
        let body = json!({ "name": name, "type": kind });
        let want = if self.m.snaps.contains_key(&name) {
            Expect::Err(&["snapshot_already_exists"])
        } else if kind == "diff" {
            match &self.m.sbs[&sb].origin {
                Origin::Template => Expect::Ok,
                Origin::Snapshot(s) if self.m.snaps.contains_key(s) => Expect::Ok,
                // The base is gone (or a new snapshot took its name): no diff can build on it.
                _ => Expect::Err(&["snapshot_base_missing", "snapshot_base_changed"]),
            }
        } else {
            Expect::Ok
        };
        Some((sb, name, kind, body, want))
    }

    fn apply_snapshot(&mut self, sb: &str, name: &str, kind: &'static str) {
        let s = &self.m.sbs[sb];
        let base = match (&s.origin, kind) {
            (Origin::Snapshot(b), "diff") => Some(b.clone()),
            _ => None,
        };
        self.m.snaps.insert(
            name.to_string(),
            MSnap {
                kind,
                source: sb.to_string(),
                marker: s.marker.clone(),
                base,
                restored: false,
            },
        );
    }

    fn snapshot(&mut self) {
        let Some((sb, name, kind, body, want)) = self.plan_snapshot() else {
            return;
        };
        self.history
            .push(format!("  snapshot {sb} as {name} ({kind})"));
        let r = self.call("POST", &format!("/v1/sandboxes/{sb}/snapshots"), Some(body));
        if self.expect("snapshot", r, want).is_some() {
            self.apply_snapshot(&sb, &name, kind);
        }
    }

    fn plan_resume(&mut self) -> Option<(String, String)> {
        let ids: Vec<String> = self.m.snaps.keys().cloned().collect();
        let snap = ids.choose(&mut self.rng)?.clone();
        let name = self.m.fresh("r");
        Some((snap, name))
    }

    fn apply_resume(&mut self, snap: &str, name: &str) {
        let marker = self.m.snaps[snap].marker.clone();
        self.m.sbs.insert(
            name.to_string(),
            MSb {
                state: St::Running,
                marker,
                origin: Origin::Snapshot(snap.to_string()),
                restored_from: None,
                volume: false,
            },
        );
    }

    fn resume_snapshot(&mut self) {
        let Some((snap, name)) = self.plan_resume() else {
            return;
        };
        self.history.push(format!("  resume {snap} as {name}"));
        // `volumes: []`: the model does not track which volumes a snapshot's source had, so its copies
        // attach none rather than getting the source's back where free.
        let r = self.call(
            "POST",
            &format!("/v1/snapshots/{snap}/resume"),
            Some(json!({ "name": name, "volumes": [] })),
        );
        self.expect("resume", r, Expect::Ok);
        self.apply_resume(&snap, &name);
    }

    fn apply_fork(&mut self, src: &str, prefix: &str, count: usize) {
        let marker = self.m.sbs[src].marker.clone();
        for i in 1..=count {
            self.m.sbs.insert(
                format!("{prefix}-{i}"),
                MSb {
                    state: St::Running,
                    marker: marker.clone(),
                    origin: Origin::ForkCapture,
                    restored_from: None,
                    volume: false,
                },
            );
        }
    }

    fn fork(&mut self) {
        let Some(src) = self.m.pick(&mut self.rng, &[St::Running, St::Paused]) else {
            return;
        };
        let count = if self.m.live() + 2 <= MAX_LIVE { 2 } else { 1 };
        let prefix = self.m.fresh("f");
        self.history
            .push(format!("  fork {src} ×{count} as {prefix}"));
        let r = self.call(
            "POST",
            &format!("/v1/sandboxes/{src}/fork"),
            Some(json!({ "count": count, "name": prefix })),
        );
        self.expect("fork", r, Expect::Ok);
        self.apply_fork(&src, &prefix, count);
    }

    fn pause_resume(&mut self) {
        let Some(sb) = self.m.pick(&mut self.rng, &[St::Running, St::Paused]) else {
            return;
        };
        let (verb, to) = match self.m.sbs[&sb].state {
            St::Running => ("pause", St::Paused),
            _ => ("resume", St::Running),
        };
        self.history.push(format!("  {verb} {sb}"));
        let r = self.call("POST", &format!("/v1/sandboxes/{sb}/{verb}"), None);
        self.expect(verb, r, Expect::Ok);
        self.m.sbs.get_mut(&sb).expect("picked").state = to;
    }

    fn stop_start(&mut self) {
        let Some(sb) = self
            .m
            .pick(&mut self.rng, &[St::Running, St::Paused, St::Stopped])
        else {
            return;
        };
        let (verb, to) = match self.m.sbs[&sb].state {
            St::Stopped if self.m.live() < MAX_LIVE => ("start", St::Running),
            St::Stopped => return,
            _ => ("stop", St::Stopped),
        };
        self.history.push(format!("  {verb} {sb}"));
        let r = self.call("POST", &format!("/v1/sandboxes/{sb}/{verb}"), None);
        self.expect(verb, r, Expect::Ok);
        self.m.sbs.get_mut(&sb).expect("picked").state = to;
    }

    fn restore(&mut self) {
        let ids: Vec<String> = self.m.snaps.keys().cloned().collect();
        let Some(snap) = ids.choose(&mut self.rng).cloned() else {
            return;
        };
        let s = self.m.snaps[&snap].clone();
        let current = self.m.sbs.get(&s.source).cloned();
        if current.is_none() && self.m.live() >= MAX_LIVE {
            return;
        }
        let want = match &current {
            Some(sb)
                if s.restored
                    && sb.restored_from.as_deref() == Some(snap.as_str())
                    && sb.state.live() =>
            {
                Expect::Err(&["snapshot_in_use"])
            }
            Some(sb) if sb.volume => Expect::Err(&["volume_in_use"]),
            _ => Expect::Ok,
        };
        self.history
            .push(format!("  restore {snap} into {}", s.source));
        let r = self.call(
            "POST",
            &format!("/v1/snapshots/{snap}/restore"),
            Some(json!({ "resume": true, "force": true })),
        );
        // A sandbox with a volume may or may not fit the snapshot's free volume slots.
        let want = match (want, &current) {
            (Expect::Err(_), Some(sb)) if sb.volume && (200..300).contains(&r.0) => Expect::Ok,
            (w, _) => w,
        };
        if self.expect("restore", r, want).is_none() {
            return;
        }
        let volume = current.as_ref().map(|c| c.volume).unwrap_or(false);
        self.m.sbs.insert(
            s.source.clone(),
            MSb {
                state: St::Running,
                marker: s.marker.clone(),
                origin: Origin::Snapshot(snap.clone()),
                restored_from: Some(snap.clone()),
                volume,
            },
        );
        self.m.snaps.get_mut(&snap).expect("picked").restored = true;
    }

    fn delete_sandbox(&mut self) {
        let Some(sb) = self
            .m
            .pick(&mut self.rng, &[St::Running, St::Paused, St::Stopped])
        else {
            return;
        };
        self.history.push(format!("  delete sandbox {sb}"));
        let r = self.call("DELETE", &format!("/v1/sandboxes/{sb}"), None);
        self.expect("delete sandbox", r, Expect::Ok);
        self.m.sbs.remove(&sb);
    }

    fn delete_snapshot(&mut self) {
        let ids: Vec<String> = self.m.snaps.keys().cloned().collect();
        let Some(snap) = ids.choose(&mut self.rng).cloned() else {
            return;
        };
        let has_children = self
            .m
            .snaps
            .values()
            .any(|s| s.base.as_deref() == Some(snap.as_str()));
        let want = if has_children {
            Expect::Err(&["snapshot_in_use"])
        } else {
            Expect::Ok
        };
        self.history.push(format!("  delete snapshot {snap}"));
        let r = self.call("DELETE", &format!("/v1/snapshots/{snap}"), None);
        if self.expect("delete snapshot", r, want).is_some() {
            self.m.snaps.remove(&snap);
        }
    }

    /// A client sends a mutating request and hangs up after a random delay. Whatever it missed, the
    /// operation must finish or roll back on its own: the test waits until the daemon is idle, then reads
    /// what happened and checks it is one of the two outcomes the model allows.
    fn disconnect(&mut self) {
        let delay = *[0u64, 5, 30, 120, 400]
            .choose(&mut self.rng)
            .expect("non-empty");
        let which = self.rng.gen_range(0..5);
        match which {
            0 => {
                let Some((sb, name, kind, body, want)) = self.plan_snapshot() else {
                    return;
                };
                self.history.push(format!(
                    "  hang up after {delay} ms: snapshot {sb} as {name} ({kind})"
                ));
                let existed = self.m.snaps.contains_key(&name);
                hang_up(
                    &self.d,
                    "POST",
                    &format!("/v1/sandboxes/{sb}/snapshots"),
                    &body,
                    delay,
                );
                self.settle();
                let now = self.snapshot_exists(&name);
                match want {
                    _ if existed => {}
                    Expect::Err(_) if now => self.fail(format!(
                        "snapshot {name} exists though it had to be refused"
                    )),
                    _ if now => self.apply_snapshot(&sb, &name, kind),
                    _ => {}
                }
            }
            1 => {
                let Some((snap, name)) = self.plan_resume() else {
                    return;
                };
                if self.m.live() >= MAX_LIVE {
                    return;
                }
                self.history.push(format!(
                    "  hang up after {delay} ms: resume {snap} as {name}"
                ));
                hang_up(
                    &self.d,
                    "POST",
                    &format!("/v1/snapshots/{snap}/resume"),
                    &json!({ "name": name, "volumes": [] }),
                    delay,
                );
                self.settle();
                if self.sandbox_state(&name).is_some() {
                    self.apply_resume(&snap, &name);
                }
            }
            2 => {
                let Some(src) = self.m.pick(&mut self.rng, &[St::Running, St::Paused]) else {
                    return;
                };
                if self.m.live() + 2 > MAX_LIVE {
                    return;
                }
                let prefix = self.m.fresh("f");
                self.history.push(format!(
                    "  hang up after {delay} ms: fork {src} ×2 as {prefix}"
                ));
                hang_up(
                    &self.d,
                    "POST",
                    &format!("/v1/sandboxes/{src}/fork"),
                    &json!({ "count": 2, "name": prefix }),
                    delay,
                );
                self.settle();
                let kids = [1, 2].map(|i| self.sandbox_state(&format!("{prefix}-{i}")).is_some());
                match kids {
                    [true, true] => self.apply_fork(&src, &prefix, 2),
                    [false, false] => {}
                    _ => self.fail(format!(
                        "fork {prefix} left a partial set of children: {kids:?}"
                    )),
                }
            }
            3 => {
                let Some(sb) = self
                    .m
                    .pick(&mut self.rng, &[St::Running, St::Paused, St::Stopped])
                else {
                    return;
                };
                let from = self.m.sbs[&sb].state;
                let (verb, to) = match from {
                    St::Stopped if self.m.live() < MAX_LIVE => ("start", St::Running),
                    St::Stopped => return,
                    _ => ("stop", St::Stopped),
                };
                self.history
                    .push(format!("  hang up after {delay} ms: {verb} {sb}"));
                hang_up(
                    &self.d,
                    "POST",
                    &format!("/v1/sandboxes/{sb}/{verb}"),
                    &json!({}),
                    delay,
                );
                self.settle();
                let now = self.sandbox_state(&sb);
                match now.as_deref() {
                    Some(s) if s == to.as_str() => {
                        self.m.sbs.get_mut(&sb).expect("picked").state = to
                    }
                    Some(s) if s == from.as_str() => {}
                    other => self.fail(format!(
                        "{verb} {sb} cut short left it {other:?}, neither {} nor {}",
                        from.as_str(),
                        to.as_str()
                    )),
                }
            }
            _ => {
                let Some(sb) = self
                    .m
                    .pick(&mut self.rng, &[St::Running, St::Paused, St::Stopped])
                else {
                    return;
                };
                self.history
                    .push(format!("  hang up after {delay} ms: delete {sb}"));
                hang_up(
                    &self.d,
                    "DELETE",
                    &format!("/v1/sandboxes/{sb}"),
                    &json!({}),
                    delay,
                );
                self.settle();
                if self.sandbox_state(&sb).is_none() {
                    self.m.sbs.remove(&sb);
                }
            }
        }
    }

    fn snapshot_exists(&self, id: &str) -> bool {
        let (status, _) = self.call("GET", &format!("/v1/snapshots/{id}"), None);
        status == 200
    }

    fn sandbox_state(&self, name: &str) -> Option<String> {
        let (status, v) = self.call("GET", &format!("/v1/sandboxes/{name}"), None);
        (status == 200).then(|| v["state"].as_str().unwrap_or("?").to_string())
    }

    /// Waits until no operation is in progress: every sandbox out of `creating`/`deleting` and, where the
    /// daemon lists operations, none of them running.
    fn settle(&self) {
        let deadline = Instant::now() + CALL_DEADLINE;
        loop {
            std::thread::sleep(Duration::from_millis(300));
            let (s, list) = self.call("GET", "/v1/sandboxes", None);
            let busy =
                s != 200
                    || list.as_array().into_iter().flatten().any(|sb| {
                        matches!(sb["state"].as_str(), Some("creating") | Some("deleting"))
                    });
            let (s, ops) = self.call("GET", "/v1/operations?state=running", None);
            let ops_busy = s == 200 && ops.as_array().map(|a| !a.is_empty()).unwrap_or(false);
            if !busy && !ops_busy {
                return;
            }
            if Instant::now() > deadline {
                self.fail(format!(
                    "the daemon did not settle: sandboxes {list}, operations {ops}"
                ));
            }
        }
    }

    /// The invariants, after every step.
    pub fn check(&mut self, step: usize) {
        let ctx = format!("after step {step}");
        let (_, list) = self.call("GET", "/v1/sandboxes", None);
        let mut seen: BTreeMap<String, (String, String)> = BTreeMap::new();
        for s in list.as_array().into_iter().flatten() {
            seen.insert(
                s["name"].as_str().unwrap_or("").to_string(),
                (
                    s["state"].as_str().unwrap_or("").to_string(),
                    s["id"].as_str().unwrap_or("").to_string(),
                ),
            );
        }
        let want: BTreeMap<String, String> = self
            .m
            .sbs
            .iter()
            .map(|(n, s)| (n.clone(), s.state.as_str().to_string()))
            .collect();
        let got: BTreeMap<String, String> = seen
            .iter()
            .map(|(n, (s, _))| (n.clone(), s.clone()))
            .collect();
        if want != got {
            self.fail(format!("{ctx}: sandboxes {got:?}, model {want:?}"));
        }
        let running: Vec<(String, MSb)> = self
            .m
            .sbs
            .iter()
            .filter(|(_, s)| s.state == St::Running)
            .map(|(n, s)| (n.clone(), s.clone()))
            .collect();
        for (name, sb) in running {
            self.tally.attempted += 1;
            let (status, v) = self.exec(&name, "cat /root/marker");
            if status != 200 || v["stdout"].as_str() != Some(&format!("{}\n", sb.marker)) {
                self.tally.lost += 1;
                self.fail(format!(
                    "{ctx}: {name} should hold marker {}: {status} {v}",
                    sb.marker
                ));
            }
            if sb.volume {
                let (status, v) = self.exec(&name, "cat /data/owner");
                if status != 200 || v["exit_code"] != 0 {
                    self.fail(format!(
                        "{ctx}: {name}'s volume is unreadable: {status} {v}"
                    ));
                }
            }
            self.tally.survived += 1;
        }
        let (_, snaps) = self.call("GET", "/v1/snapshots", None);
        let mut got: Vec<String> = snaps
            .as_array()
            .into_iter()
            .flatten()
            .map(|s| s["id"].as_str().unwrap_or("").to_string())
            .collect();
        got.sort();
        let want: Vec<String> = self.m.snaps.keys().cloned().collect();
        if got != want {
            self.fail(format!("{ctx}: snapshots {got:?}, model {want:?}"));
        }
        let dirs = crate::common::world::snapshot_dirs(&self.d);
        let want_dirs: std::collections::BTreeSet<String> = want.into_iter().collect();
        if dirs != want_dirs {
            self.fail(format!(
                "{ctx}: snapshot directories {dirs:?}, model {want_dirs:?}"
            ));
        }
        let ids: std::collections::BTreeSet<String> =
            seen.values().map(|(_, id)| id.clone()).collect();
        let dirs = crate::common::world::dir_names(self.d.data_dir().join("sandboxes"));
        if dirs != ids {
            self.fail(format!(
                "{ctx}: sandbox directories {dirs:?}, sandbox ids {ids:?}"
            ));
        }
        let live = self.m.live();
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut pids = self.d.qemu_pids();
        while pids.len() != live && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(200));
            pids = self.d.qemu_pids();
        }
        if pids.len() != live {
            self.fail(format!(
                "{ctx}: {} QEMU processes, {live} live sandboxes",
                pids.len()
            ));
        }
        let (status, doctor) = self.call("GET", "/v1/doctor", None);
        if status != 200 || doctor["ok"] != true {
            self.fail(format!("{ctx}: kiln doctor found problems: {doctor}"));
        }
    }

    /// Every snapshot still resumes (memory kinds continue the marker, disk kinds boot with it); then
    /// everything is deleted and nothing is left.
    pub fn finish(&mut self) {
        let names: Vec<String> = self.m.sbs.keys().cloned().collect();
        for sb in names {
            let r = self.call("DELETE", &format!("/v1/sandboxes/{sb}"), None);
            self.expect("final delete", r, Expect::Ok);
            self.m.sbs.remove(&sb);
        }
        let snaps: Vec<(String, MSnap)> = self
            .m
            .snaps
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for (id, snap) in &snaps {
            let name = self.m.fresh("final");
            self.history
                .push(format!("finish: resume {id} ({}) as {name}", snap.kind));
            let r = self.call(
                "POST",
                &format!("/v1/snapshots/{id}/resume"),
                Some(json!({ "name": name, "volumes": [] })),
            );
            self.expect("final resume", r, Expect::Ok);
            let (status, v) = self.exec(&name, "cat /root/marker");
            if status != 200 || v["stdout"].as_str() != Some(&format!("{}\n", snap.marker)) {
                self.fail(format!(
                    "snapshot {id} resumed without its marker {}: {status} {v}",
                    snap.marker
                ));
            }
            let r = self.call("DELETE", &format!("/v1/sandboxes/{name}"), None);
            self.expect("final delete", r, Expect::Ok);
        }
        // Diff children first: delete in reverse order of dependence.
        let mut left: Vec<String> = self.m.snaps.keys().cloned().collect();
        while !left.is_empty() {
            let deletable: Vec<String> = left
                .iter()
                .filter(|id| {
                    !self
                        .m
                        .snaps
                        .values()
                        .any(|s| s.base.as_deref() == Some(id.as_str()))
                })
                .cloned()
                .collect();
            assert!(!deletable.is_empty(), "snapshot dependency cycle: {left:?}");
            for id in deletable {
                let r = self.call("DELETE", &format!("/v1/snapshots/{id}"), None);
                self.expect("final snapshot delete", r, Expect::Ok);
                self.m.snaps.remove(&id);
                left.retain(|x| x != &id);
            }
        }
        self.check(usize::MAX);
    }
}

/// One HTTP/1.1 request over the daemon's unix socket with a read deadline.
fn request(
    d: &Daemon,
    method: &str,
    path: &str,
    body: Option<&Value>,
    deadline: Duration,
) -> Result<(u16, Value), String> {
    let mut s = UnixStream::connect(&d.socket).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(deadline))
        .map_err(|e| format!("timeout: {e}"))?;
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: kiln\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(head.as_bytes())
        .map_err(|e| format!("write: {e}"))?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)
        .map_err(|e| format!("no answer within {deadline:?} ({e})"))?;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or("no header end")?;
    let headers = String::from_utf8_lossy(&raw[..split]).to_ascii_lowercase();
    let status: u16 = headers
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or("no status")?;
    let mut rest = raw[split + 4..].to_vec();
    if headers.contains("transfer-encoding: chunked") {
        let mut out = Vec::new();
        loop {
            let nl = rest
                .windows(2)
                .position(|w| w == b"\r\n")
                .ok_or("chunk size")?;
            let size = usize::from_str_radix(String::from_utf8_lossy(&rest[..nl]).trim(), 16)
                .map_err(|e| format!("chunk size: {e}"))?;
            if size == 0 {
                break;
            }
            out.extend_from_slice(&rest[nl + 2..nl + 2 + size]);
            rest = rest[nl + 2 + size + 2..].to_vec();
        }
        rest = out;
    }
    let v = if rest.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&rest)
            .unwrap_or(Value::String(String::from_utf8_lossy(&rest).into()))
    };
    Ok((status, v))
}

/// Sends a request and closes the connection `delay_ms` later without reading the answer.
fn hang_up(d: &Daemon, method: &str, path: &str, body: &Value, delay_ms: u64) {
    let Ok(mut s) = UnixStream::connect(&d.socket) else {
        return;
    };
    let body = body.to_string();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: kiln\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let _ = s.write_all(head.as_bytes());
    std::thread::sleep(Duration::from_millis(delay_ms));
    let _ = s.shutdown(std::net::Shutdown::Both);
}
