//! Whole directories on real VMs: a tree of 1,000 files with symlinks, empty directories, modes and
//! mtimes goes in as a tar and comes back out unchanged; tar entries cannot escape the target directory
//! (`..`, absolute names, a symlink planted in the guest); batch writes; a directory watch reports
//! changes in order and ends in the guest when the client disconnects.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant, UNIX_EPOCH};

use common::{require_image, sha256_hex, Daemon};
use serde_json::{json, Value};

fn sh(d: &Daemon, sb: &str, cmd: &str) -> String {
    d.kiln_ok(&["exec", sb, "--", "sh", "-c", cmd])
}

/// path → "kind mode size mtime sha-or-target" for every entry below `root` (not following symlinks).
fn manifest(root: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut todo = vec![root.to_path_buf()];
    while let Some(dir) = todo.pop() {
        for e in fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
            let m = fs::symlink_metadata(&p).unwrap();
            let desc = if m.file_type().is_symlink() {
                format!("symlink -> {}", fs::read_link(&p).unwrap().display())
            } else if m.is_dir() {
                todo.push(p.clone());
                format!("dir {:o} {}", m.mode() & 0o7777, m.mtime())
            } else {
                format!(
                    "file {:o} {} {} {}",
                    m.mode() & 0o7777,
                    m.len(),
                    m.mtime(),
                    sha256_hex(&fs::read(&p).unwrap())
                )
            };
            out.insert(rel, desc);
        }
    }
    out
}

/// 10 directories of 100 files (sizes 0..~8 KiB, a few modes, old mtimes), symlinks (relative, absolute,
/// dangling), empty directories (one of them 0700), a nested path.
fn build_tree(root: &Path) -> u64 {
    let mut bytes = 0u64;
    let old = UNIX_EPOCH + Duration::from_secs(1_600_000_000);
    for d in 0..10 {
        let dir = root.join(format!("d{d:02}"));
        fs::create_dir_all(&dir).unwrap();
        for f in 0..100 {
            let p = dir.join(format!("f{f:03}.txt"));
            let len = (d * 100 + f) * 83 % 8192;
            let data: Vec<u8> = (0..len).map(|i| ((i * 7 + f + d) % 251) as u8).collect();
            bytes += data.len() as u64;
            fs::write(&p, &data).unwrap();
            let mode = [0o644, 0o600, 0o755, 0o640][f % 4];
            fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
            let file = fs::File::options().write(true).open(&p).unwrap();
            file.set_modified(old + Duration::from_secs((d * 100 + f) as u64))
                .unwrap();
        }
    }
    symlink("d00/f000.txt", root.join("rel-link")).unwrap();
    symlink("/etc/hostname", root.join("abs-link")).unwrap();
    symlink("nowhere/at/all", root.join("dangling")).unwrap();
    fs::create_dir_all(root.join("empty")).unwrap();
    fs::create_dir_all(root.join("nested/deeper/empty2")).unwrap();
    fs::set_permissions(root.join("empty"), fs::Permissions::from_mode(0o700)).unwrap();
    // Directory mtimes last: creating entries changes them.
    for d in ["d00", "empty", "nested/deeper"] {
        let f = fs::File::open(root.join(d)).unwrap();
        f.set_modified(old).unwrap();
    }
    bytes
}

#[test]
fn directory_round_trip_keeps_modes_symlinks_empty_dirs_and_mtimes() {
    require_image("tiny");
    let d = Daemon::start();
    d.create(&["--name", "t"]);
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    let bytes = build_tree(&src);
    let want = manifest(&src);
    assert_eq!(want.len(), 1000 + 10 + 3 + 4, "{:?}", want.keys().take(5));

    let started = Instant::now();
    let out = d.kiln_ok(&["--json", "cp", "-r", src.to_str().unwrap(), "t:/root/tree"]);
    let took = started.elapsed();
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["entries"], want.len(), "{v}");
    eprintln!(
        "upload: {} entries, {bytes} bytes of content in {took:?} ({:.2} MiB/s of content)",
        want.len(),
        bytes as f64 / (1 << 20) as f64 / took.as_secs_f64()
    );

    // Inside the guest: counts, kinds, modes, links, content.
    let counts = sh(
        &d,
        "t",
        "cd /root/tree && echo $(find . -type f | wc -l) $(find . -type d | wc -l) $(find . -type l | wc -l)",
    );
    assert_eq!(counts.trim(), "1000 15 3", "files, dirs (with .), symlinks");
    let links = sh(&d, "t", "cd /root/tree && for l in rel-link abs-link dangling; do readlink $l; done && stat -c '%a %Y' empty d00/f001.txt d00/f002.txt");
    assert_eq!(
        links.trim(),
        "d00/f000.txt\n/etc/hostname\nnowhere/at/all\n700 1600000000\n600 1600000001\n755 1600000002"
    );
    let local_sum = {
        let mut all = Vec::new();
        for (rel, desc) in &want {
            if desc.starts_with("file") {
                all.extend(fs::read(src.join(rel)).unwrap());
            }
        }
        sha256_hex(&all)
    };
    let guest_sum = sh(
        &d,
        "t",
        "cd /root/tree && find . -type f | sort | xargs cat | sha256sum",
    );
    assert!(
        guest_sum.starts_with(&local_sum),
        "{guest_sum} vs {local_sum}"
    );

    // `list` reports name, kind, size, mode and mtime.
    let (status, list) = d.api("GET", "/v1/sandboxes/t/files/list?path=/root/tree", None);
    assert_eq!(status, 200, "{list}");
    let by_name: BTreeMap<String, Value> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["name"].as_str().unwrap().to_string(), e.clone()))
        .collect();
    assert_eq!(by_name["rel-link"]["kind"], "symlink");
    assert_eq!(by_name["empty"]["kind"], "dir");
    assert_eq!(by_name["empty"]["mode"], 0o700);
    assert_eq!(by_name["empty"]["mtime_unix"], 1_600_000_000);
    let (_, list) = d.api(
        "GET",
        "/v1/sandboxes/t/files/list?path=/root/tree/d03",
        None,
    );
    let f = &list.as_array().unwrap()[7];
    assert_eq!(
        (
            f["name"].as_str(),
            f["kind"].as_str(),
            f["size"].as_u64(),
            f["mode"].as_u64()
        ),
        (
            Some("f007.txt"),
            Some("file"),
            Some((307 * 83 % 8192) as u64),
            Some(0o640)
        ),
        "{f}"
    );

    // And back out: the same tree, entry for entry.
    let back = work.path().join("back");
    let started = Instant::now();
    d.kiln_ok(&["cp", "-r", "t:/root/tree", back.to_str().unwrap()]);
    eprintln!("download: {:?}", started.elapsed());
    let got = manifest(&back);
    let diff: Vec<_> = want
        .iter()
        .filter(|(k, v)| got.get(*k) != Some(v))
        .take(5)
        .map(|(k, v)| format!("{k}: want {v}, got {:?}", got.get(k)))
        .collect();
    assert!(
        diff.is_empty() && got.len() == want.len(),
        "{diff:?} ({} vs {})",
        got.len(),
        want.len()
    );

    // A missing directory is a 404 with its code, both ways.
    let (status, body) = d.http(
        "GET",
        "/v1/sandboxes/t/files/dir?path=/root/nope",
        None,
        "application/json",
    );
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (404, Some("guest_path_not_found")),
        "{v}"
    );
}

/// A tar with one entry whose name is written raw (the tar crate refuses to build `..` or absolute names).
fn raw_tar(entries: &[(&str, tar::EntryType, &[u8], Option<&str>)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, kind, data, link) in entries {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(*kind);
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_mtime(1_600_000_000);
        if let Some(link) = link {
            h.set_link_name(link).unwrap();
        }
        let gnu = h.as_gnu_mut().unwrap();
        gnu.name = [0; 100];
        gnu.name[..name.len()].copy_from_slice(name.as_bytes());
        h.set_cksum();
        out.extend_from_slice(h.as_bytes());
        out.extend_from_slice(data);
        out.resize(out.len().div_ceil(512) * 512, 0);
    }
    out.resize(out.len() + 1024, 0);
    out
}

fn put_tar(d: &Daemon, sb: &str, path: &str, tar: &[u8]) -> (u16, Value) {
    let (status, body) = d.http(
        "PUT",
        &format!("/v1/sandboxes/{sb}/files/dir?path={path}"),
        Some(tar),
        "application/x-tar",
    );
    (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

#[test]
fn tar_entries_cannot_escape_the_target_directory() {
    require_image("tiny");
    let d = Daemon::start();
    d.create(&["--name", "t"]);
    let file = tar::EntryType::Regular;
    let ok: &[u8] = b"fine\n";
    let bad: &[u8] = b"escaped\n";
    // A symlink planted in the guest, pointing out of the target.
    sh(
        &d,
        "t",
        "mkdir -p /root/target && ln -s /etc /root/target/evil",
    );
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "dot-dot",
            raw_tar(&[
                ("ok.txt", file, ok, None),
                ("../escaped-1", file, bad, None),
            ]),
        ),
        ("absolute", raw_tar(&[("/etc/escaped-2", file, bad, None)])),
        (
            "guest symlink",
            raw_tar(&[("evil/escaped-3", file, bad, None)]),
        ),
        (
            "symlink in the same tar",
            raw_tar(&[
                ("out", tar::EntryType::Symlink, b"", Some("/etc")),
                ("out/escaped-4", file, bad, None),
            ]),
        ),
        (
            "nested dot-dot",
            raw_tar(&[("a/../../escaped-5", file, bad, None)]),
        ),
    ];
    for (what, tar) in &cases {
        let (status, v) = put_tar(&d, "t", "/root/target", tar);
        assert_eq!(
            (status, v["error"]["code"].as_str()),
            (400, Some("path_escape")),
            "{what}: {v}"
        );
    }
    let leaked = sh(
        &d,
        "t",
        "ls /etc/escaped-* /root/escaped-* /escaped-* /root/target/escaped-* 2>/dev/null; echo end",
    );
    assert_eq!(
        leaked.trim(),
        "end",
        "something was written outside: {leaked}"
    );
    // The planted symlink is still a symlink to /etc (it was not replaced or written through).
    assert_eq!(sh(&d, "t", "readlink /root/target/evil").trim(), "/etc");

    // A new directory is built aside and renamed at the end: a refused tar leaves nothing behind.
    let (status, v) = put_tar(&d, "t", "/root/fresh", &cases[0].1);
    assert_eq!(status, 400, "{v}");
    let left = sh(
        &d,
        "t",
        "ls -a /root | grep -c -e fresh -e kiln-unpack; true",
    );
    assert_eq!(left.trim(), "0", "a refused upload left a directory behind");
    // The same tar without the bad entry lands.
    let (status, v) = put_tar(
        &d,
        "t",
        "/root/fresh",
        &raw_tar(&[("ok.txt", file, ok, None)]),
    );
    assert_eq!((status, v["entries"].as_u64()), (200, Some(1)), "{v}");
    assert_eq!(sh(&d, "t", "cat /root/fresh/ok.txt"), "fine\n");
    // A tar of `/` stays on the root filesystem: /proc (kcore claims 128 TiB) and /sys are empty mount points.
    let (status, body) = d.http(
        "GET",
        "/v1/sandboxes/t/files/dir?path=/",
        None,
        "application/json",
    );
    assert_eq!(status, 200);
    let names: Vec<String> = tar::Archive::new(body.as_slice())
        .entries()
        .unwrap()
        .map(|e| e.unwrap().path().unwrap().to_string_lossy().into_owned())
        .collect();
    assert!(
        names.iter().any(|n| n == "root/fresh/ok.txt"),
        "{} entries",
        names.len()
    );
    assert!(names.iter().any(|n| n.trim_end_matches('/') == "proc"));
    let below: Vec<_> = names
        .iter()
        .filter(|n| n.starts_with("proc/") || n.starts_with("sys/"))
        .take(3)
        .collect();
    assert!(
        below.is_empty(),
        "descended into other filesystems: {below:?}"
    );
    // Garbage is refused as a bad tar, not half-applied.
    let (status, v) = put_tar(&d, "t", "/root/fresh2", &[7u8; 2048]);
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (400, Some("invalid_request")),
        "{v}"
    );
}

#[test]
fn batch_writes_and_a_watch_that_reports_changes_in_order() {
    require_image("tiny");
    let d = Daemon::start();
    d.create(&["--name", "w"]);

    // Batch write: text, base64 and a mode, in a directory that does not exist yet.
    let (status, v) = d.api(
        "POST",
        "/v1/sandboxes/w/files/batch",
        Some(json!({"files": [
            {"path": "/root/b/one.txt", "content": "one\n"},
            {"path": "/root/b/two.bin", "content": "AAEC/w==", "encoding": "base64"},
            {"path": "/root/b/run.sh", "content": "#!/bin/sh\necho ran\n", "mode": "0750"},
        ]})),
    );
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["files"][1]["bytes"], 4, "{v}");
    let out = sh(&d, "w", "cat /root/b/one.txt; od -An -tx1 /root/b/two.bin; stat -c %a /root/b/run.sh; /root/b/run.sh");
    assert_eq!(
        out.split_whitespace().collect::<Vec<_>>(),
        ["one", "00", "01", "02", "ff", "750", "ran"]
    );
    // A bad path in a batch is refused before anything is written.
    let (status, v) = d.api(
        "POST",
        "/v1/sandboxes/w/files/batch",
        Some(json!({"files": [{"path": "/root/b/three.txt", "content": "x"}, {"path": "rel", "content": "x"}]})),
    );
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (400, Some("invalid_request")),
        "{v}"
    );
    assert_eq!(
        sh(&d, "w", "ls /root/b/three.txt 2>/dev/null; echo end").trim(),
        "end"
    );

    // Watch: the answer's headers arrive once the watch is in place.
    sh(&d, "w", "mkdir -p /root/w");
    let mut s = UnixStream::connect(&d.socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    write!(
        s,
        "GET /v1/sandboxes/w/files/watch?path=/root/w&recursive=true HTTP/1.1\r\nHost: kiln\r\n\r\n"
    )
    .unwrap();
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    assert!(line.contains(" 200 "), "{line}");
    while line != "\r\n" {
        line.clear();
        r.read_line(&mut line).unwrap();
    }
    let inotify_fds =
        "for p in /proc/[0-9]*; do ls -l $p/fd 2>/dev/null; done | grep -c inotify; true";
    assert_eq!(
        sh(&d, "w", inotify_fds).trim(),
        "1",
        "the watch is not in place"
    );
    sh(
        &d,
        "w",
        "cd /root/w && echo a > f && echo b >> f && mkdir sub && echo c > sub/g && mv f h && rm h",
    );
    let want = [
        ("create", "/root/w/f"),
        ("modify", "/root/w/f"),
        ("create", "/root/w/sub"),
        ("create", "/root/w/sub/g"),
        ("moved_from", "/root/w/f"),
        ("moved_to", "/root/w/h"),
        ("delete", "/root/w/h"),
    ];
    let mut seen: Vec<(String, String)> = Vec::new();
    let mut next = 0;
    let started = Instant::now();
    while next < want.len() {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "missing {:?}; saw {seen:?}",
            want[next]
        );
        line.clear();
        r.read_line(&mut line).unwrap();
        // Chunk-size lines of the chunked body (hex digits) are not events.
        let Ok(ev @ Value::Object(_)) = serde_json::from_str::<Value>(line.trim()) else {
            continue;
        };
        let e = (
            ev["event"].as_str().unwrap().to_string(),
            ev["path"].as_str().unwrap().to_string(),
        );
        if e.0 == want[next].0 && e.1 == want[next].1 {
            next += 1;
        }
        if e.1 == "/root/w/sub" {
            assert_eq!(ev["dir"], true, "{ev}");
        }
        seen.push(e);
    }
    // The client goes away: the agent ends the watch (its inotify fd is closed).
    drop(r);
    let started = Instant::now();
    loop {
        if sh(&d, "w", inotify_fds).trim() == "0" {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the watch outlived its client"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    // A watch on a file or a missing path is refused up front.
    let (status, body) = d.http(
        "GET",
        "/v1/sandboxes/w/files/watch?path=/root/nope",
        None,
        "application/json",
    );
    assert_eq!(status, 404, "{}", String::from_utf8_lossy(&body));
}
