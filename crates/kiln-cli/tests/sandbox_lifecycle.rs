//! Real VMs (tiny image) driven through the daemon, the CLI and the raw API.

mod common;

use std::time::Instant;

use common::{require_image, sha256_hex, Daemon};
use serde_json::json;

#[test]
fn create_exec_files_delete() {
    require_image("tiny");
    let d = Daemon::start();
    let sb = d.create(&[
        "--name",
        "work",
        "--env",
        "GREETING=hello",
        "--label",
        "team=a",
        "--memory",
        "256",
    ]);
    assert_eq!(sb["state"], "running");
    assert_eq!(sb["name"], "work");
    let id = sb["id"].as_str().unwrap().to_string();
    let pid = sb["pid"].as_u64().unwrap() as u32;

    // Exit codes, stdout and stderr are kept apart; the CLI exits with the command's code.
    let out = d.kiln(&[
        "exec",
        "work",
        "--",
        "sh",
        "-c",
        "echo out; echo err >&2; exit 3",
    ]);
    assert_eq!(out.status.code(), Some(3));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "out\n");
    assert_eq!(String::from_utf8_lossy(&out.stderr), "err\n");

    // Sandbox env, per-exec env and cwd.
    let out = d.kiln_ok(&[
        "exec",
        "work",
        "-e",
        "EXTRA=1",
        "-w",
        "/tmp",
        "--",
        "sh",
        "-c",
        "echo $GREETING $EXTRA $(pwd)",
    ]);
    assert_eq!(out, "hello 1 /tmp\n");

    // Guest hostname is the sandbox name.
    assert_eq!(d.kiln_ok(&["exec", "work", "--", "hostname"]), "work\n");

    // stdin is passed with -i.
    let out = d.kiln_stdin(
        &["exec", "-i", "work", "--", "sh", "-c", "tr a-z A-Z"],
        Some(b"piped input"),
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "PIPED INPUT");

    // Timeouts kill the command and exit 124; signals map to 128+N.
    let started = Instant::now();
    let out = d.kiln(&["exec", "--timeout", "1", "work", "--", "sleep", "30"]);
    assert_eq!(out.status.code(), Some(124));
    assert!(started.elapsed().as_secs() < 15);
    let out = d.kiln(&["exec", "work", "--", "sh", "-c", "kill -9 $$"]);
    assert_eq!(out.status.code(), Some(137));

    // A missing program is an error, not a hang.
    let (status, v) = d.api(
        "POST",
        "/v1/sandboxes/work/exec",
        Some(json!({"argv": ["/no/such/program"]})),
    );
    assert!(
        status == 200 && v["exit_code"] != 0 || status >= 400,
        "{status} {v}"
    );

    // 10 concurrent execs each get their own output.
    let started = Instant::now();
    let handles: Vec<_> = (0..10)
        .map(|i| {
            let sock = d.socket.clone();
            std::thread::spawn(move || {
                let body = json!({"cmd": format!("sleep 1; echo job-{i}")}).to_string();
                let (status, resp) = common::http_unix(
                    &sock,
                    "POST",
                    "/v1/sandboxes/work/exec",
                    Some(body.as_bytes()),
                    "application/json",
                );
                assert_eq!(status, 200);
                let v: serde_json::Value = serde_json::from_slice(&resp).unwrap();
                assert_eq!(v["stdout"], format!("job-{i}\n"));
                assert_eq!(v["exit_code"], 0);
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    assert!(
        started.elapsed().as_secs_f64() < 8.0,
        "concurrent execs ran serially: {:?}",
        started.elapsed()
    );

    // Streamed exec through the API delivers NDJSON events ending with exit.
    let (status, body) = d.http(
        "POST",
        "/v1/sandboxes/work/exec",
        Some(
            json!({"cmd": "echo a; echo b >&2", "stream": true})
                .to_string()
                .as_bytes(),
        ),
        "application/json",
    );
    assert_eq!(status, 200);
    let events: Vec<serde_json::Value> = String::from_utf8_lossy(&body)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(events.last().unwrap()["type"], "exit");
    assert!(events
        .iter()
        .any(|e| e["type"] == "stdout" && e["data"] == "a\n"));
    assert!(events
        .iter()
        .any(|e| e["type"] == "stderr" && e["data"] == "b\n"));

    // Files: a 20 MiB binary round trip through the CLI, byte for byte.
    let tmp = tempfile::tempdir().unwrap();
    let mut data = vec![0u8; 20 << 20];
    rand::Rng::fill(&mut rand::thread_rng(), &mut data[..]);
    data[..4].copy_from_slice(&[0, 0xff, 0, 0x80]);
    let src = tmp.path().join("blob");
    std::fs::write(&src, &data).unwrap();
    d.kiln_ok(&[
        "files",
        "write",
        "work",
        "/data/deep/blob.bin",
        src.to_str().unwrap(),
    ]);
    let guest_sum = d.kiln_ok(&["exec", "work", "--", "sha256sum", "/data/deep/blob.bin"]);
    assert!(guest_sum.starts_with(&sha256_hex(&data)), "{guest_sum}");
    let back = tmp.path().join("back");
    d.kiln_ok(&["cp", "work:/data/deep/blob.bin", back.to_str().unwrap()]);
    assert_eq!(
        sha256_hex(&std::fs::read(&back).unwrap()),
        sha256_hex(&data)
    );

    // stdin upload, mode, read to stdout.
    let out = d.kiln_stdin(
        &[
            "files",
            "write",
            "--mode",
            "0755",
            "work",
            "/usr/local/bin/hi",
        ],
        Some(b"#!/bin/sh\necho hi there\n"),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(d.kiln_ok(&["exec", "work", "--", "hi"]), "hi there\n");
    assert_eq!(
        d.kiln_ok(&["files", "read", "work", "/usr/local/bin/hi"]),
        "#!/bin/sh\necho hi there\n"
    );

    // ls / stat / mkdir / rm.
    d.kiln_ok(&["files", "mkdir", "work", "/data/a/b/c"]);
    let ls: serde_json::Value =
        serde_json::from_str(&d.kiln_ok(&["--json", "files", "ls", "work", "/data"])).unwrap();
    let names: Vec<&str> = ls
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    assert!(names.contains(&"a") && names.contains(&"deep"), "{names:?}");
    let (status, st) = d.api(
        "GET",
        "/v1/sandboxes/work/files/stat?path=/data/deep/blob.bin",
        None,
    );
    assert_eq!(status, 200);
    assert_eq!(st["size"], 20 << 20);
    d.kiln_ok(&["files", "rm", "-r", "work", "/data/a"]);
    let (status, err) = d.api("GET", "/v1/sandboxes/work/files/stat?path=/data/a", None);
    assert_eq!(status, 404, "{err}");
    assert_eq!(err["error"]["code"], "guest_path_not_found");
    let (status, err) = d.api("DELETE", "/v1/sandboxes/work/files?path=/data", None);
    assert_eq!(
        (status, err["error"]["code"].as_str()),
        (409, Some("guest_path_conflict")),
        "{err}"
    );
    let (status, err) = d.api("GET", "/v1/sandboxes/work/files?path=/no/such/file", None);
    assert_eq!(
        (status, err["error"]["code"].as_str()),
        (404, Some("guest_path_not_found"))
    );

    // Listing filters by label.
    let list: serde_json::Value =
        serde_json::from_str(&d.kiln_ok(&["--json", "sandbox", "list", "--label", "team=a"]))
            .unwrap();
    assert_eq!(list.as_array().unwrap().len(), 1);
    let list: serde_json::Value =
        serde_json::from_str(&d.kiln_ok(&["--json", "sandbox", "list", "--label", "team=b"]))
            .unwrap();
    assert_eq!(list.as_array().unwrap().len(), 0);

    // Delete frees the VM process and every file.
    let sb_dir = d.data_dir().join("sandboxes").join(&id);
    assert!(sb_dir.exists());
    d.kiln_ok(&["sandbox", "delete", "-y", "work"]);
    assert!(!sb_dir.exists(), "sandbox directory left behind");
    assert!(!common::process_alive(pid), "QEMU still running");
    assert!(d.qemu_pids().is_empty());
    let (status, err) = d.api("GET", &format!("/v1/sandboxes/{id}"), None);
    assert_eq!(
        (status, err["error"]["code"].as_str()),
        (404, Some("sandbox_not_found"))
    );
}

#[test]
fn daemon_restart_readopts_running_sandboxes() {
    require_image("tiny");
    let mut d = Daemon::start();
    let keep = d.create(&["--name", "keep"]);
    let lost = d.create(&["--name", "lost"]);
    // Leave a process running in the guest; it must still be there after the daemon comes back.
    d.kiln_ok(&[
        "exec",
        "keep",
        "--",
        "sh",
        "-c",
        "echo before > /tmp/marker",
    ]);
    let keep_pid = keep["pid"].as_u64().unwrap() as i32;
    let lost_pid = lost["pid"].as_u64().unwrap() as i32;

    // SIGKILL the daemon; kill one VM while it is down.
    d.restart_hard();
    // SAFETY: plain kill(2) on a QEMU this test started.
    unsafe { libc::kill(lost_pid, libc::SIGKILL) };
    d.restart_hard();

    let again: serde_json::Value =
        serde_json::from_str(&d.kiln_ok(&["--json", "sandbox", "inspect", "keep"])).unwrap();
    assert_eq!(again["state"], "running");
    assert_eq!(again["pid"].as_i64(), Some(keep_pid as i64));
    assert_eq!(
        d.kiln_ok(&["exec", "keep", "--", "cat", "/tmp/marker"]),
        "before\n"
    );

    let gone: serde_json::Value =
        serde_json::from_str(&d.kiln_ok(&["--json", "sandbox", "inspect", "lost"])).unwrap();
    assert_eq!(gone["state"], "failed");
    assert!(
        gone["error"].as_str().unwrap().contains("QEMU exited"),
        "{gone}"
    );
    let out = d.kiln(&["exec", "lost", "--", "true"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("sandbox_not_running"));
    d.kiln_ok(&["sandbox", "delete", "-y", "lost", "keep"]);
    assert!(d.qemu_pids().is_empty());
}

#[test]
fn base_image_runs_python() {
    require_image("base");
    let d = Daemon::start();
    d.create(&["--name", "py", "--template", "base", "--memory", "512"]);
    let out = d.kiln_ok(&[
        "exec",
        "py",
        "--",
        "python3",
        "-c",
        "import sys, json; print(json.dumps({'v': sys.version_info[0], 'sum': sum(range(10))}))",
    ]);
    assert_eq!(out.trim(), r#"{"v": 3, "sum": 45}"#);
    assert!(d
        .kiln_ok(&["exec", "py", "--", "bash", "-c", "echo $BASH_VERSION"])
        .starts_with('5'));
    // Services on the host's loopback are reachable through the user-mode network's gateway (10.0.2.2)
    // only when kiln cannot confine VMs; otherwise its firewall rules refuse the connection (see
    // tests/confinement.rs).
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let script = format!("import urllib.request; print(urllib.request.urlopen('http://10.0.2.2:{port}/x', timeout=20).read().decode())");
    if d.log().contains("kept off the host's own addresses") {
        let out = d.kiln(&["exec", "py", "--", "python3", "-c", &script]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "the guest reached the host's loopback"
        );
        assert!(err.contains("refused") || err.contains("reset"), "{err}");
        return;
    }
    let server = std::thread::spawn(move || {
        use std::io::{Read, Write};
        let (mut s, _) = listener.accept().unwrap();
        let mut buf = [0u8; 1024];
        let n = s.read(&mut buf).unwrap();
        s.write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 5\r\n\r\nhello")
            .unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    });
    assert_eq!(
        d.kiln_ok(&["exec", "py", "--", "python3", "-c", &script]),
        "hello\n"
    );
    assert!(server.join().unwrap().starts_with("GET /x"));
}

#[test]
fn ports_forward_from_host_loopback_to_the_guest() {
    require_image("tiny");
    let d = Daemon::start();
    let port = common::free_port();
    let mapping = format!("{port}:8080");
    d.create(&["--name", "web", "--port", &mapping]);
    let body = common::serve_and_fetch(&d, "web", port);
    assert!(body.contains("served"), "{body}");
}
