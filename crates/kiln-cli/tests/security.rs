//! API security: the TCP token (hashed at rest, rotatable), request size limits and per-client rate limits.
//! None of these tests boots a VM.

mod common;

use std::io::{Read, Write};
use std::process::Command;

use common::{Daemon, KILN};

fn free_port() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    format!("127.0.0.1:{}", l.local_addr().unwrap().port())
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
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{auth}\r\n",
        body.len()
    )
    .unwrap();
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
