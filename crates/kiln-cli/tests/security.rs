//! API security: the TCP token (hashed at rest, rotatable), request size limits and per-client rate limits.
//! None of these tests boots a VM.

mod common;

use std::io::{Read, Write};
use std::process::Command;

use common::{Daemon, KILN};

fn free_port() -> String {
    format!("127.0.0.1:{}", common::free_port())
}

/// One HTTP/1.1 request over TCP: (status, lower-cased head, body).
fn tcp(
    addr: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &[u8],
) -> (u16, String, String) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{auth}\r\n",
        body.len()
    );
    exchange(&mut s, &head, body)
}

/// Sends `head` and `body`, reads until the server closes: (status, lower-cased head, body).
fn exchange<S: Read + Write>(s: &mut S, head: &str, body: &[u8]) -> (u16, String, String) {
    s.write_all(head.as_bytes()).unwrap();
    // The server may answer (413) before reading the whole body and close; that is fine.
    let _ = s.write_all(body);
    let mut r = Vec::new();
    let _ = s.read_to_end(&mut r);
    let r = String::from_utf8_lossy(&r).into_owned();
    let (head, body) = r.split_once("\r\n\r\n").unwrap_or((&r, ""));
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, head.to_ascii_lowercase(), body.to_string())
}

fn rotate(d: &Daemon) -> String {
    let out = d.kiln_ok(&["token", "rotate"]);
    let token = out.trim().to_string();
    assert_eq!(token.len(), 64, "{out}");
    token
}

#[test]
fn token_is_stored_hashed_and_rotation_invalidates_the_old_one() {
    let addr = free_port();
    // Without a token, TCP is refused at start-up with advice.
    let dir = tempfile::Builder::new()
        .prefix("kt")
        .tempdir_in("/tmp")
        .unwrap();
    let out = Command::new(KILN)
        .arg("--data-dir")
        .arg(dir.path())
        .args(["serve", "--listen", &addr])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("kiln token rotate"), "{err}");

    // Offline on the data directory: prints the token once, stores only its digest, mode 0600.
    let out = Command::new(KILN)
        .arg("--data-dir")
        .arg(dir.path())
        .args(["token", "rotate"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let offline = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let hash_file = dir.path().join("api-token.sha256");
    let stored = std::fs::read_to_string(&hash_file).unwrap();
    assert!(
        !stored.contains(&offline),
        "the token itself must not be stored"
    );
    assert_eq!(stored.trim(), common::sha256_hex(offline.as_bytes()));
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&hash_file).unwrap().permissions().mode() & 0o777,
        0o600
    );

    // A token file given at start-up is installed (digest only) and works.
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "0123456789abcdef0123456789abcdef\n").unwrap();
    let d = Daemon::start_with(&[
        "--listen",
        &addr,
        "--token-file",
        token_file.to_str().unwrap(),
    ]);
    let from_file = "0123456789abcdef0123456789abcdef";
    assert_eq!(
        tcp(&addr, "GET", "/v1/sandboxes", Some(from_file), b"").0,
        200
    );
    let first = rotate(&d);
    assert_eq!(
        tcp(&addr, "GET", "/v1/sandboxes", Some(from_file), b"").0,
        401
    );
    assert_eq!(tcp(&addr, "GET", "/v1/sandboxes", Some(&first), b"").0, 200);
    let (s_missing, _, b_missing) = tcp(&addr, "GET", "/v1/sandboxes", None, b"");
    let (s_wrong, _, b_wrong) = tcp(&addr, "GET", "/v1/sandboxes", Some("wrong"), b"");
    assert_eq!((s_missing, s_wrong), (401, 401));
    assert!(b_missing.contains("\"unauthorized\""), "{b_missing}");
    // No hint about which part was wrong.
    assert_eq!(b_missing, b_wrong);

    // Rotation while the daemon runs: the old token stops working at once, the new one works.
    let second = rotate(&d);
    assert_ne!(first, second);
    assert_eq!(tcp(&addr, "GET", "/v1/sandboxes", Some(&first), b"").0, 401);
    assert_eq!(
        tcp(&addr, "GET", "/v1/sandboxes", Some(&second), b"").0,
        200
    );
    // The CLI reaches the daemon with the new token.
    let out = d.kiln(&[
        "--url", &addr, "--token", &second, "--json", "sandbox", "list",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// One request over the daemon's unix socket: (status, lower-cased head, body).
fn unix(
    d: &Daemon,
    method: &str,
    path: &str,
    extra_headers: &str,
    body: &[u8],
) -> (u16, String, String) {
    let mut s = std::os::unix::net::UnixStream::connect(&d.socket).unwrap();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: kiln\r\nConnection: close\r\nContent-Type: application/json\r\n{extra_headers}\r\n"
    );
    exchange(&mut s, &head, body)
}

fn error_of(body: &str) -> (String, String) {
    let v: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
    (
        v["error"]["code"].as_str().unwrap_or("").to_string(),
        v["error"]["message"].as_str().unwrap_or("").to_string(),
    )
}

#[test]
fn bodies_over_the_limits_get_413_naming_the_limit_and_flag() {
    let d = Daemon::start_with(&["--max-body-bytes", "1024", "--max-upload-bytes", "4096"]);
    let big = serde_json::json!({"name": "x", "labels": {"k": "v".repeat(2000)}}).to_string();
    let cl = format!("Content-Length: {}\r\n", big.len());
    for path in [
        "/v1/sandboxes",
        "/v1/sandboxes/nope/snapshots",
        "/v1/sandboxes/nope/files/mkdir",
    ] {
        let (status, _, body) = unix(&d, "POST", path, &cl, big.as_bytes());
        assert_eq!(status, 413, "{path}: {body}");
        let (code, msg) = error_of(&body);
        assert_eq!(code, "payload_too_large", "{path}: {body}");
        assert!(
            msg.contains("1024") && msg.contains("--max-body-bytes"),
            "{msg}"
        );
    }
    // Small bodies still go through to validation.
    let small = br#"{"name": "Bad Name"}"#;
    let (status, _, body) = unix(
        &d,
        "POST",
        "/v1/sandboxes",
        &format!("Content-Length: {}\r\n", small.len()),
        small,
    );
    assert_eq!(
        (status, error_of(&body).0.as_str()),
        (400, "invalid_request"),
        "{body}"
    );
    // An upload that declares a length over the limit is refused before anything is read.
    let (status, _, body) = unix(
        &d,
        "PUT",
        "/v1/sandboxes/nope/files?path=/root/x",
        "Content-Length: 5000\r\n",
        &[0u8; 5000],
    );
    assert_eq!(status, 413, "{body}");
    let (code, msg) = error_of(&body);
    assert_eq!(code, "payload_too_large");
    assert!(
        msg.contains("4096") && msg.contains("--max-upload-bytes"),
        "{msg}"
    );
}

#[test]
fn each_client_is_rate_limited_with_retry_after() {
    let addr = free_port();
    let dir = tempfile::Builder::new()
        .prefix("kt")
        .tempdir_in("/tmp")
        .unwrap();
    let token_file = dir.path().join("token");
    let token = "fedcba9876543210fedcba9876543210";
    std::fs::write(&token_file, token).unwrap();
    let d = Daemon::start_with(&[
        "--rate-limit",
        "0.25",
        "--rate-burst",
        "3",
        "--listen",
        &addr,
        "--token-file",
        token_file.to_str().unwrap(),
    ]);
    let statuses: Vec<u16> = (0..3)
        .map(|_| unix(&d, "GET", "/v1/health", "", b"").0)
        .collect();
    assert_eq!(statuses, [200, 200, 200]);
    let (status, head, body) = unix(&d, "GET", "/v1/health", "", b"");
    assert_eq!(status, 429, "{body}");
    assert_eq!(error_of(&body).0, "rate_limited");
    let retry: u64 = head
        .lines()
        .find_map(|l| l.strip_prefix("retry-after:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("Retry-After header");
    assert!((1..=4).contains(&retry), "{head}");
    // A TCP client (another peer) has its own bucket; unauthenticated requests count too.
    assert_eq!(tcp(&addr, "GET", "/v1/health", Some(token), b"").0, 200);
    assert_eq!(tcp(&addr, "GET", "/v1/health", None, b"").0, 401);
    assert_eq!(tcp(&addr, "GET", "/v1/health", Some(token), b"").0, 200);
    assert_eq!(tcp(&addr, "GET", "/v1/health", Some(token), b"").0, 429);
}

#[test]
fn a_streamed_upload_over_the_limit_is_cut_off() {
    common::require_image("tiny");
    let d = Daemon::start_with(&["--max-upload-bytes", "100000"]);
    let sb = d.create(&["--name", "up", "--memory", "128"]);
    assert_eq!(sb["state"], "running");
    // Chunked: no Content-Length, so the daemon counts as it streams.
    let chunk = vec![b'a'; 60000];
    let mut body = Vec::new();
    for _ in 0..3 {
        body.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        body.extend_from_slice(&chunk);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(b"0\r\n\r\n");
    let (status, _, resp) = unix(
        &d,
        "PUT",
        "/v1/sandboxes/up/files?path=/root/big",
        "Transfer-Encoding: chunked\r\n",
        &body,
    );
    assert_eq!(status, 413, "{resp}");
    assert_eq!(error_of(&resp).0, "payload_too_large");
    // Nothing was left in place, and an upload under the limit works.
    let (status, _, _) = unix(
        &d,
        "GET",
        "/v1/sandboxes/up/files/stat?path=/root/big",
        "",
        b"",
    );
    assert_eq!(status, 404);
    let small = vec![b'b'; 50000];
    let (status, _, resp) = unix(
        &d,
        "PUT",
        "/v1/sandboxes/up/files?path=/root/small",
        &format!("Content-Length: {}\r\n", small.len()),
        &small,
    );
    assert_eq!(status, 200, "{resp}");
}
