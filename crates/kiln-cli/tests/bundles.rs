//! Snapshot bundles between two hosts: two daemons, each in its own network namespace with its own data
//! directory. A sandbox prepared on A (a file written, a counter running) is exported, imported on B and
//! resumed there: the file is there and the counter goes on. Diff snapshots travel with their base or
//! without it (then B refuses until it has the base). Truncated, corrupted and incompatible bundles are
//! refused with the byte offset or the field, and leave nothing behind; so does an import whose client
//! goes away, or whose daemon is killed, half-way.

mod common;

use std::collections::BTreeSet;
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{require_image, Daemon};
use serde_json::{json, Value};

const COUNTER: &str = "i=0; while true; do i=$((i+1)); echo \"$i $(hostname)\"; sleep 0.2; done";

/// A network namespace made (and deleted) by the test: a "host" of its own.
struct Netns(String);

impl Netns {
    fn new(tag: &str) -> Netns {
        let name = format!("kb-{tag}-{}", std::process::id());
        let ok = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .expect("ip");
        assert!(ok.success(), "ip netns add {name}");
        Netns(name)
    }
    fn daemon(&self) -> Daemon {
        Daemon::start_prefixed(&["ip", "netns", "exec", &self.0], &[], &[])
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn sh(d: &Daemon, sb: &str, cmd: &str) -> String {
    d.kiln_ok(&["exec", sb, "--", "sh", "-c", cmd])
}

/// The counter's output lines as (n, hostname).
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

/// Posts a bundle's bytes to B's import route.
fn import_bytes(d: &Daemon, bytes: &[u8], name: Option<&str>) -> (u16, Value) {
    let path = match name {
        Some(n) => format!("/v1/snapshots/import?name={n}"),
        None => "/v1/snapshots/import".to_string(),
    };
    let (status, body) = d.http("POST", &path, Some(bytes), "application/octet-stream");
    let v = serde_json::from_slice(&body)
        .unwrap_or(Value::String(String::from_utf8_lossy(&body).into_owned()));
    (status, v)
}

/// What a refused import could have left: snapshot rows and entries of the snapshots directory.
fn traces(d: &Daemon) -> (Vec<String>, BTreeSet<String>) {
    let (status, list) = d.api("GET", "/v1/snapshots", None);
    assert_eq!(status, 200);
    let ids = list
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap().to_string())
        .collect();
    let dir: BTreeSet<String> = std::fs::read_dir(d.data_dir().join("snapshots"))
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    (ids, dir)
}

/// The byte offset an error message names ("... at byte N: ...").
fn offset_in(msg: &str) -> Option<u64> {
    let rest = msg.split("at byte ").nth(1)?;
    rest.split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

fn wait_for(mut ok: impl FnMut() -> bool, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn export(d: &Daemon, snap: &str, file: &Path, extra: &[&str]) -> Vec<u8> {
    let f = file.to_str().unwrap();
    let mut args = vec!["snapshot", "export", snap, "-o", f];
    args.extend_from_slice(extra);
    d.kiln_ok(&args);
    std::fs::read(file).unwrap()
}

#[test]
fn a_sandbox_moves_to_another_host_in_a_bundle() {
    require_image("tiny");
    let (na, nb) = (Netns::new("a"), Netns::new("b"));
    let a = na.daemon();
    let mut b = nb.daemon();
    let files = tempfile::tempdir().unwrap();

    // Host A: a file, a counting process, a full memory snapshot; then a copy with one more file and a
    // diff snapshot of it (its base: snapshot s1).
    a.create(&["--name", "src"]);
    sh(&a, "src", "echo moved-by-bundle > /root/hello");
    let (status, p) = a.api(
        "POST",
        "/v1/sandboxes/src/processes",
        Some(json!({"cmd": COUNTER})),
    );
    assert_eq!(status, 201, "{p}");
    let pid = p["pid"].as_u64().unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    // Counted before the snapshot: the copy on B must have counted past it.
    let before = counter_lines(&process_output(&a, "src", pid)).len() as u64;
    assert!(before >= 2, "the counter runs on A");
    a.kiln_ok(&["snapshot", "create", "src", "--name", "s1"]);
    a.kiln_ok(&["sandbox", "delete", "src", "-y"]);
    a.kiln_ok(&["snapshot", "resume", "s1", "--name", "x"]);
    sh(&a, "x", "echo second > /root/second && sync");
    a.kiln_ok(&["snapshot", "create", "x", "--name", "d1", "--type", "diff"]);
    a.kiln_ok(&["sandbox", "delete", "x", "-y"]);

    let s1 = export(&a, "s1", &files.path().join("s1.kiln"), &[]);
    let d1_full = export(&a, "d1", &files.path().join("d1-full.kiln"), &[]);
    let d1_thin = export(
        &a,
        "d1",
        &files.path().join("d1-thin.kiln"),
        &["--without-base"],
    );
    let on_disk = common::world::dir_names(a.data_dir().join("snapshots/s1"));
    eprintln!(
        "bundles: s1 {} B, d1 with base {} B, d1 without base {} B; s1 holds {on_disk:?}",
        s1.len(),
        d1_full.len(),
        d1_thin.len()
    );
    assert!(
        d1_thin.len() < d1_full.len(),
        "without its base a diff bundle is smaller"
    );

    // Host B, before anything: a diff without its base is refused, naming the base.
    let empty = traces(&b);
    let (status, v) = import_bytes(&b, &d1_thin, None);
    assert_eq!(status, 409, "{v}");
    assert_eq!(v["error"]["code"], "snapshot_base_missing", "{v}");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("snapshot:s1") && msg.contains("sha256:"),
        "{msg}"
    );
    assert_eq!(traces(&b), empty);

    // Truncated at several offsets: refused with the offset where the bundle ends, nothing left.
    let len = s1.len();
    for cut in [3, 20, 200, len / 3, len / 2, len - 40, len - 1] {
        let (status, v) = import_bytes(&b, &s1[..cut], None);
        assert_eq!(status, 422, "cut at {cut}: {v}");
        assert_eq!(v["error"]["code"], "snapshot_corrupt", "{v}");
        let msg = v["error"]["message"].as_str().unwrap();
        assert_eq!(offset_in(msg), Some(cut as u64), "cut at {cut}: {msg}");
        assert_eq!(traces(&b), empty, "cut at {cut} left something");
    }
    // A flipped byte in file data or in the trailer: refused naming a byte offset (the piece or file it
    // spoiled, or where the whole-bundle checksum is compared), nothing left.
    for at in [len / 3, len / 2 + 7, len - 20] {
        let mut bad = s1.clone();
        bad[at] ^= 0x40;
        let (status, v) = import_bytes(&b, &bad, None);
        assert_eq!(status, 422, "flip at {at}: {v}");
        assert_eq!(v["error"]["code"], "snapshot_corrupt", "{v}");
        let msg = v["error"]["message"].as_str().unwrap();
        let off = offset_in(msg).unwrap_or_else(|| panic!("no offset: {msg}"));
        assert!(off < len as u64, "flip at {at}: {msg}");
        eprintln!("flip at {at}: refused at byte {off}: {msg}");
        assert_eq!(traces(&b), empty, "flip at {at} left something");
    }
    // A manifest recording another QEMU series, re-packed with valid checksums: refused naming it.
    let (manifest_text, mut m) = {
        let header_len = u32::from_le_bytes(s1[12..16].try_into().unwrap()) as usize;
        let header: Value = serde_json::from_slice(&s1[16..16 + header_len]).unwrap();
        let text = header["manifest"].as_str().unwrap().to_string();
        let (json_part, _) = text.rsplit_once("\n# checksum ").unwrap();
        let m: Value = serde_json::from_str(json_part).unwrap();
        (text, m)
    };
    assert!(manifest_text.contains("\"qemu_version\""));
    m["qemu_version"] = json!("QEMU emulator version 9.2.0");
    let json_text = serde_json::to_string_pretty(&m).unwrap();
    let doc = format!(
        "{json_text}\n# checksum {}\n",
        kiln_core::fsutil::checksum_bytes(json_text.as_bytes())
    );
    let repacked = kiln_core::snapshot::bundle::repack_with_manifest(&s1, &doc).unwrap();
    let (status, v) = import_bytes(&b, &repacked, None);
    assert_eq!(status, 422, "{v}");
    assert_eq!(v["error"]["code"], "snapshot_incompatible", "{v}");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("qemu_version differs") && msg.contains("9.2.0"),
        "{msg}"
    );
    assert_eq!(traces(&b), empty);

    // A client that goes away half-way, and a daemon killed half-way (then started again): the
    // staging directory is gone either way, and no row appeared.
    for kill in [false, true] {
        let mut conn = UnixStream::connect(&b.socket).unwrap();
        write!(
            conn,
            "POST /v1/snapshots/import HTTP/1.1\r\nHost: kiln\r\nContent-Type: application/octet-stream\r\nContent-Length: {len}\r\n\r\n"
        )
        .unwrap();
        conn.write_all(&s1[..len / 2]).unwrap();
        let staging = || traces(&b).1.iter().any(|n| n.starts_with(".tmp-"));
        wait_for(staging, "the import to start staging");
        if kill {
            b.restart_hard();
        }
        drop(conn);
        wait_for(
            || traces(&b) == empty,
            "the interrupted import to leave nothing",
        );
    }

    // The real ones: s1, then d1 without its base (now present), then d1 with its base as `d1full`.
    b.kiln_ok(&[
        "snapshot",
        "import",
        files.path().join("s1.kiln").to_str().unwrap(),
    ]);
    let (status, v) = import_bytes(&b, &s1, None);
    assert_eq!(status, 409, "a second import of s1: {v}");
    assert_eq!(v["error"]["code"], "snapshot_already_exists");
    let thin: Value = serde_json::from_str(&b.kiln_ok(&[
        "--json",
        "snapshot",
        "import",
        files.path().join("d1-thin.kiln").to_str().unwrap(),
    ]))
    .unwrap();
    assert_eq!(thin["type"], "diff", "{thin}");
    assert_eq!(thin["parent"], "snapshot:s1", "{thin}");
    let full: Value = serde_json::from_str(&b.kiln_ok(&[
        "--json",
        "snapshot",
        "import",
        files.path().join("d1-full.kiln").to_str().unwrap(),
        "--name",
        "d1full",
    ]))
    .unwrap();
    assert_eq!(full["type"], "full", "{full}");
    assert!(full["parent"].is_null(), "{full}");
    // s1 now has a diff child on B: it cannot be deleted under it.
    let (status, _) = b.api("DELETE", "/v1/snapshots/s1", None);
    assert_eq!(status, 409);

    // Resumed on B: the file is there and the counter goes on from where it was on A.
    b.kiln_ok(&["snapshot", "resume", "s1", "--name", "moved"]);
    assert_eq!(sh(&b, "moved", "cat /root/hello").trim(), "moved-by-bundle");
    std::thread::sleep(Duration::from_millis(1500));
    let out = process_output(&b, "moved", pid);
    let lines = counter_lines(&out);
    assert_eq!(lines.first().map(|l| l.0), Some(1), "{out}");
    for w in lines.windows(2) {
        assert_eq!(w[1].0, w[0].0 + 1, "a gap or a restart: {out}");
    }
    let first_on_b = lines.iter().find(|(_, h)| h == "moved").map(|l| l.0);
    assert!(
        first_on_b.is_some_and(|n| n > before),
        "the counter on B goes on past where it was before the snapshot ({before}): {out}"
    );
    assert!(
        lines.iter().any(|(_, h)| h == "src") && lines.iter().any(|(_, h)| h == "moved"),
        "counted on A, then on B: {out}"
    );
    b.kiln_ok(&["sandbox", "delete", "moved", "-y"]);

    // Both forms of the diff resume with the copy's second file.
    for snap in ["d1", "d1full"] {
        b.kiln_ok(&["snapshot", "resume", snap, "--name", "c"]);
        assert_eq!(
            sh(&b, "c", "cat /root/hello /root/second").trim(),
            "moved-by-bundle\nsecond",
            "{snap}"
        );
        b.kiln_ok(&["sandbox", "delete", "c", "-y"]);
    }
}
