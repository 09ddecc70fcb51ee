//! Snapshots through an object-storage remote: a real S3-compatible server (moto in server mode, from
//! target/moto-venv: scripts/install-deps.sh installs it) runs in a network namespace of its own; two
//! daemons ("hosts" A and B) run in theirs, each linked to it by a veth pair the test makes, so each
//! reaches S3 only over that link. A sandbox prepared on A (a file written, a counter running) is
//! pushed, pulled on B and resumed there: the file is there and the counter goes on. A push killed
//! half-way (SIGKILL of the daemon doing it) is invisible on the remote and the next push completes it,
//! uploading only what was missing. A second snapshot after a small change uploads far less. A chunk
//! damaged on the remote is refused on pull, naming it, and leaves nothing behind. gc deletes exactly the
//! chunks no manifest references (and none younger than the grace period).

mod common;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{require_image, Daemon};
use serde_json::{json, Value};

const COUNTER: &str = "i=0; while true; do i=$((i+1)); echo \"$i $(hostname)\"; sleep 0.2; done";
const PORT: u16 = 5077;
const BUCKET: &str = "kiln-test";

/// A network namespace made (and deleted) by the test.
struct Netns(String);

impl Netns {
    fn new(tag: &str) -> Netns {
        let name = format!("kr-{tag}-{}", std::process::id());
        assert!(run(&["ip", "netns", "add", &name]), "ip netns add {name}");
        Netns(name)
    }
    fn exec(&self, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.0]).args(args);
        c
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn run(args: &[&str]) -> bool {
    Command::new(args[0])
        .args(&args[1..])
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

fn moto_python() -> PathBuf {
    let p = std::env::var_os("KILN_TEST_MOTO_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/moto-venv"))
        .join("bin/python");
    assert!(
        p.exists(),
        "{} is missing: `bash scripts/install-deps.sh` installs moto (the S3 server these tests use)",
        p.display()
    );
    p
}

/// Talks to the bucket from inside the S3 namespace (boto3 comes with moto).
const S3TOOL: &str = r#"
import sys, json, boto3
s3 = boto3.client("s3", endpoint_url=sys.argv[1], aws_access_key_id="test",
                  aws_secret_access_key="test", region_name="us-east-1")
b, cmd, args = sys.argv[2], sys.argv[3], sys.argv[4:]
if cmd == "mb":
    s3.create_bucket(Bucket=b)
elif cmd == "ls":
    keys = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=b):
        keys += [o["Key"] for o in page.get("Contents", [])]
    print(json.dumps(keys))
elif cmd == "get":
    sys.stdout.write(s3.get_object(Bucket=b, Key=args[0])["Body"].read().decode())
elif cmd == "put":
    s3.put_object(Bucket=b, Key=args[0], Body=args[1].encode())
elif cmd == "rm":
    s3.delete_object(Bucket=b, Key=args[0])
elif cmd == "flip":
    data = bytearray(s3.get_object(Bucket=b, Key=args[0])["Body"].read())
    data[len(data) // 2] ^= 0x40
    s3.put_object(Bucket=b, Key=args[0], Body=bytes(data))
"#;

/// moto serving S3 in its own namespace, linked to each host namespace by a veth pair.
struct S3 {
    ns: Netns,
    server: Child,
    tool: tempfile::NamedTempFile,
}

impl S3 {
    fn start() -> S3 {
        let python = moto_python();
        let ns = Netns::new("s3");
        assert!(run(&["ip", "-n", &ns.0, "link", "set", "lo", "up"]));
        let server = ns
            .exec(&[
                python.to_str().unwrap(),
                "-m",
                "moto.server",
                "-H",
                "0.0.0.0",
                "-p",
                &PORT.to_string(),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("moto server");
        let tool = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(tool.path(), S3TOOL).unwrap();
        let s3 = S3 { ns, server, tool };
        let deadline = Instant::now() + Duration::from_secs(60);
        while !s3.try_tool(&["mb"]).0 {
            assert!(Instant::now() < deadline, "moto did not start within 60 s");
            std::thread::sleep(Duration::from_millis(300));
        }
        s3
    }

    /// Links host namespace `host` to this one as subnet 10.231.N.0/30; returns the S3 endpoint
    /// as seen from the host.
    fn link(&self, host: &Netns, n: u8) -> String {
        let (h, s) = (format!("10.231.{n}.2/30"), format!("10.231.{n}.1/30"));
        let ok = run(&[
            "ip",
            "-n",
            &host.0,
            "link",
            "add",
            "kr-h",
            "type",
            "veth",
            "peer",
            "name",
            &format!("kr-s{n}"),
            "netns",
            &self.ns.0,
        ]) && run(&["ip", "-n", &host.0, "addr", "add", &h, "dev", "kr-h"])
            && run(&["ip", "-n", &host.0, "link", "set", "kr-h", "up"])
            && run(&["ip", "-n", &host.0, "link", "set", "lo", "up"])
            && run(&[
                "ip",
                "-n",
                &self.ns.0,
                "addr",
                "add",
                &s,
                "dev",
                &format!("kr-s{n}"),
            ])
            && run(&[
                "ip",
                "-n",
                &self.ns.0,
                "link",
                "set",
                &format!("kr-s{n}"),
                "up",
            ]);
        assert!(ok, "linking {} to the S3 namespace", host.0);
        format!("http://10.231.{n}.1:{PORT}")
    }

    fn try_tool(&self, args: &[&str]) -> (bool, String) {
        let endpoint = format!("http://127.0.0.1:{PORT}");
        let out = self
            .ns
            .exec(&[
                moto_python().to_str().unwrap(),
                self.tool.path().to_str().unwrap(),
                &endpoint,
                BUCKET,
            ])
            .args(args)
            .output()
            .expect("s3 tool");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    }

    fn tool(&self, args: &[&str]) -> String {
        let (ok, out) = self.try_tool(args);
        assert!(ok, "s3 tool {args:?} failed");
        out
    }

    /// Keys under the remote's prefix (`fleet/`), without it.
    fn keys(&self) -> BTreeSet<String> {
        serde_json::from_str::<Vec<String>>(&self.tool(&["ls"]))
            .unwrap()
            .into_iter()
            .filter_map(|k| k.strip_prefix("fleet/").map(str::to_string))
            .collect()
    }

    fn chunks(&self) -> BTreeSet<String> {
        self.keys()
            .into_iter()
            .filter(|k| k.starts_with("chunks/"))
            .collect()
    }

    /// The chunk keys snapshot `name`'s manifest references.
    fn referenced(&self, name: &str) -> BTreeSet<String> {
        let m: Value =
            serde_json::from_str(&self.tool(&["get", &format!("fleet/snapshots/{name}.json")]))
                .unwrap();
        m["files"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|f| f["chunks"].as_array().unwrap().iter())
            .map(|c| {
                let sha = c["sha256"].as_str().unwrap();
                format!("chunks/{}/{sha}", &sha[..2])
            })
            .collect()
    }
}

impl Drop for S3 {
    fn drop(&mut self) {
        let _ = self.server.kill();
        let _ = self.server.wait();
    }
}

fn host(ns: &Netns) -> Daemon {
    Daemon::start_prefixed(
        &["ip", "netns", "exec", &ns.0],
        &[],
        &[
            ("AWS_ACCESS_KEY_ID", "test"),
            ("AWS_SECRET_ACCESS_KEY", "test"),
            ("AWS_REGION", "us-east-1"),
        ],
    )
}

fn sh(d: &Daemon, sb: &str, cmd: &str) -> String {
    d.kiln_ok(&["exec", sb, "--", "sh", "-c", cmd])
}

fn counter_lines(out: &str) -> Vec<(u64, String)> {
    out.lines()
        .filter_map(|l| {
            let (n, h) = l.split_once(' ')?;
            Some((n.parse().ok()?, h.to_string()))
        })
        .collect()
}

fn process_output(d: &Daemon, sb: &str, pid: u64) -> String {
    let (status, body) = d.http(
        "GET",
        &format!("/v1/sandboxes/{sb}/processes/{pid}/logs"),
        None,
        "application/json",
    );
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    body.split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .filter_map(|l| serde_json::from_slice::<Value>(l).ok())
        .filter(|e| e["type"] == "stdout")
        .map(|e| e["data"].as_str().unwrap_or("").to_string())
        .collect()
}

/// Snapshot rows and entries of the snapshots directory: what a refused pull could leave.
fn traces(d: &Daemon) -> (Vec<String>, BTreeSet<String>) {
    let (status, list) = d.api("GET", "/v1/snapshots", None);
    assert_eq!(status, 200);
    let ids = list
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap().to_string())
        .collect();
    let dir = std::fs::read_dir(d.data_dir().join("snapshots"))
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    (ids, dir)
}

fn push(d: &Daemon, snap: &str) -> Value {
    let (status, v) = d.api(
        "POST",
        "/v1/remotes/r/push",
        Some(json!({ "snapshot": snap })),
    );
    assert_eq!(status, 200, "push {snap}: {v}");
    v
}

#[test]
fn snapshots_travel_through_an_s3_remote() {
    require_image("tiny");
    let s3 = S3::start();
    let (na, nb) = (Netns::new("a"), Netns::new("b"));
    let (ea, eb) = (s3.link(&na, 1), s3.link(&nb, 2));
    let mut a = host(&na);
    let b = host(&nb);
    let url = format!("s3://{BUCKET}/fleet");
    a.kiln_ok(&["remote", "add", "r", &url, "--endpoint", &ea]);
    b.kiln_ok(&["remote", "add", "r", &url, "--endpoint", &eb]);
    // The settings: mode 0600, no credentials in them or in the API's answer.
    let cfg = a.data_dir().join("remotes.json");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&cfg).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let (_, listed) = a.api("GET", "/v1/remotes", None);
    assert_eq!(listed[0]["url"], url.as_str(), "{listed}");
    assert!(!std::fs::read_to_string(&cfg).unwrap().contains("test\""));
    assert!(!listed.to_string().contains("secret"), "{listed}");
    let (status, v) = a.api(
        "POST",
        "/v1/remotes",
        Some(json!({"name": "x", "url": "s3://b-1", "secret_access_key": "k"})),
    );
    assert_eq!(status, 400, "credentials are not settings: {v}");

    // Host A: a file, 24 MiB of random data (so a push takes long enough to be killed half-way), a
    // counting process, a full memory snapshot.
    a.create(&["--name", "src"]);
    sh(
        &a,
        "src",
        "echo moved-by-remote > /root/hello && head -c 25165824 /dev/urandom > /root/blob && sync",
    );
    let (status, p) = a.api(
        "POST",
        "/v1/sandboxes/src/processes",
        Some(json!({"cmd": COUNTER})),
    );
    assert_eq!(status, 201, "{p}");
    let pid = p["pid"].as_u64().unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let before = counter_lines(&process_output(&a, "src", pid)).len() as u64;
    assert!(before >= 2, "the counter runs on A");
    a.kiln_ok(&["snapshot", "create", "src", "--name", "s1"]);
    a.kiln_ok(&["sandbox", "delete", "src", "-y"]);

    // A push killed half-way: the daemon doing it is SIGKILLed once some chunks are up. No manifest
    // is visible; the next push uploads only what is missing and completes.
    let socket = a.socket.clone();
    let pushing = std::thread::spawn(move || {
        common::http_unix(
            &socket,
            "POST",
            "/v1/remotes/r/push",
            Some(br#"{"snapshot":"s1"}"#),
            "application/json",
        )
    });
    let deadline = Instant::now() + Duration::from_secs(120);
    let stage = loop {
        let (_, ops) = a.api("GET", "/v1/operations?state=running", None);
        if let Some(s) = ops.as_array().and_then(|o| {
            o.iter()
                .find(|o| o["kind"] == "remote.push")
                .and_then(|o| o["stage"].as_str().map(str::to_string))
        }) {
            let done: u64 = s
                .split_whitespace()
                .nth(1)
                .and_then(|n| n.split('/').next())
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
            if done > 8 << 20 {
                break s;
            }
        }
        assert!(
            !pushing.is_finished(),
            "the push finished before it could be interrupted"
        );
        assert!(Instant::now() < deadline, "the push never got going");
        std::thread::sleep(Duration::from_millis(100));
    };
    a.kill_hard();
    let _ = pushing.join();
    let partial = s3.chunks();
    eprintln!(
        "killed at '{stage}': {} chunks on the remote",
        partial.len()
    );
    assert!(!partial.is_empty(), "some chunks were uploaded");
    assert!(
        !s3.keys().iter().any(|k| k.starts_with("snapshots/")),
        "a push cut short leaves no manifest"
    );
    a.restart_hard();
    let (_, listed) = a.api("GET", "/v1/remotes/r/snapshots", None);
    assert_eq!(listed, json!([]), "a push cut short is not listed");
    let p1 = push(&a, "s1");
    eprintln!("resumed push of s1: {p1}");
    let (chunks, uploaded) = (
        p1["chunks"].as_u64().unwrap(),
        p1["chunks_uploaded"].as_u64().unwrap(),
    );
    assert!(
        uploaded < chunks && uploaded + partial.len() as u64 >= chunks,
        "the second push skipped the {} chunks already there: {p1}",
        partial.len()
    );
    assert_eq!(s3.chunks(), s3.referenced("s1"));

    // Host B: resume r/s1 (pulled first). The file is there and the counter goes on.
    let empty = traces(&b);
    b.kiln_ok(&["snapshot", "resume", "r/s1", "--name", "moved"]);
    assert_eq!(sh(&b, "moved", "cat /root/hello").trim(), "moved-by-remote");
    std::thread::sleep(Duration::from_millis(1500));
    let out = process_output(&b, "moved", pid);
    let lines = counter_lines(&out);
    for w in lines.windows(2) {
        assert_eq!(w[1].0, w[0].0 + 1, "a gap or a restart: {out}");
    }
    assert!(
        lines
            .iter()
            .find(|(_, h)| h == "moved")
            .is_some_and(|l| l.0 > before),
        "the counter on B goes on past {before}: {out}"
    );
    b.kiln_ok(&["sandbox", "delete", "moved", "-y"]);

    // A second snapshot of the lineage after a small change uploads far less.
    a.kiln_ok(&["snapshot", "resume", "s1", "--name", "x"]);
    sh(&a, "x", "echo second > /root/second && sync");
    a.kiln_ok(&["snapshot", "create", "x", "--name", "s2"]);
    a.kiln_ok(&["sandbox", "delete", "x", "-y"]);
    // Through the CLI this time.
    let p2: Value =
        serde_json::from_str(&a.kiln_ok(&["--json", "snapshot", "push", "s2", "r"])).unwrap();
    let (first, second) = (
        p1["data_bytes"].as_u64().unwrap(),
        p2["new_data_bytes"].as_u64().unwrap(),
    );
    eprintln!(
        "second push: {p2}\nRATIO data uploaded for s2 / data of s1: {second} / {first} = {:.3}",
        second as f64 / first as f64
    );
    assert!(second * 4 < first, "s2 uploaded {second} of s1's {first}");

    // A chunk damaged on the remote (one s2 has and s1 has not, so not in B's cache) is refused on
    // pull, naming it; nothing is left on B.
    let only_s2: Vec<String> = s3
        .referenced("s2")
        .difference(&s3.referenced("s1"))
        .cloned()
        .collect();
    let victim = only_s2.first().expect("s2 has chunks of its own").clone();
    s3.tool(&["flip", &format!("fleet/{victim}")]);
    let before_pull = traces(&b);
    let (status, v) = b.api(
        "POST",
        "/v1/remotes/r/pull",
        Some(json!({"snapshot": "s2"})),
    );
    assert_eq!(status, 422, "{v}");
    assert_eq!(v["error"]["code"], "snapshot_corrupt", "{v}");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(msg.contains(&victim), "names the chunk: {msg}");
    assert_eq!(traces(&b), before_pull, "a refused pull leaves nothing");
    // Repaired by pushing again once the bad copy is gone; B then pulls only what it lacks.
    s3.tool(&["rm", &format!("fleet/{victim}")]);
    let again = push(&a, "s2");
    assert_eq!(again["chunks_uploaded"], 1, "{again}");
    let (status, v) = b.api(
        "POST",
        "/v1/remotes/r/pull",
        Some(json!({"snapshot": "s2"})),
    );
    assert_eq!(status, 201, "{v}");
    eprintln!("pull of s2 on B: {}", v["pull"]);
    assert!(
        v["pull"]["chunks_cached"].as_u64().unwrap() > 0
            && v["pull"]["chunks_downloaded"].as_u64().unwrap() <= only_s2.len() as u64,
        "B downloaded only what it lacked: {v}"
    );
    b.kiln_ok(&["snapshot", "resume", "s2", "--name", "c"]);
    assert_eq!(
        sh(&b, "c", "cat /root/hello /root/second").trim(),
        "moved-by-remote\nsecond"
    );
    b.kiln_ok(&["sandbox", "delete", "c", "-y"]);
    assert_ne!(traces(&b), empty);

    // gc: an orphan chunk and the chunks only s1 used (once s1 is deleted from the remote) go; with
    // the default grace period nothing does (they are new); s2's chunks stay and still pull.
    let orphan = format!("chunks/ab/{}", "ab".repeat(32));
    s3.tool(&["put", &format!("fleet/{orphan}"), "junk"]);
    a.kiln_ok(&["remote", "delete-snapshot", "r", "s1"]);
    let (status, g) = a.api("POST", "/v1/remotes/r/gc", Some(json!({})));
    assert_eq!(status, 200, "{g}");
    assert_eq!(g["deleted"], 0, "nothing younger than a day goes: {g}");
    let keep = s3.referenced("s2");
    let doomed: BTreeSet<String> = s3.chunks().difference(&keep).cloned().collect();
    assert!(doomed.contains(&orphan) && doomed.len() > 1, "{doomed:?}");
    let (_, dry) = a.api(
        "POST",
        "/v1/remotes/r/gc",
        Some(json!({"grace_seconds": 0, "dry_run": true})),
    );
    assert_eq!(dry["deleted"], doomed.len(), "{dry}");
    assert_eq!(s3.chunks().len(), keep.len() + doomed.len());
    let (status, g) = a.api(
        "POST",
        "/v1/remotes/r/gc",
        Some(json!({"grace_seconds": 0})),
    );
    assert_eq!(status, 200, "{g}");
    eprintln!("gc: {g}");
    assert_eq!(
        s3.chunks(),
        keep,
        "gc deleted exactly the unreferenced chunks"
    );
    // A pulls s2 under another id with an empty cache: every chunk comes from the remote.
    let (status, v) = a.api(
        "POST",
        "/v1/remotes/r/pull",
        Some(json!({"snapshot": "s2", "name": "s2-again"})),
    );
    assert_eq!(status, 201, "{v}");
    assert_eq!(v["pull"]["chunks_cached"], 0, "{v}");
}
