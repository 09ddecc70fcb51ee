//! Published ports on real VMs: a server in the guest reached from host loopback, in the sandbox and in
//! each of its copies (resume, fork) on a host port of its own; publish/unpublish on a running sandbox;
//! ports kept across a daemon restart and a stop/start whose host port was taken meanwhile.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::{require_image, Daemon};
use serde_json::{json, Value};

/// `GET path` on 127.0.0.1:`port`, retrying for up to 15 s until the answer contains `want`.
fn fetch(port: u16, path: &str, want: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut body = String::new();
    while Instant::now() < deadline {
        body.clear();
        if let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) {
            let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
            let _ = s.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes());
            let _ = s.read_to_string(&mut body);
            if body.contains(want) {
                return body;
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    body
}

/// Whether something answers HTTP on 127.0.0.1:`port` (a closed forward refuses or resets).
fn answers(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(3)));
    let _ = s.write_all(b"GET /id HTTP/1.0\r\n\r\n");
    let mut b = String::new();
    let _ = s.read_to_string(&mut b);
    b.starts_with("HTTP/")
}

fn port_of(sb: &Value, guest: u16) -> u16 {
    let ports = sb["ports"].as_array().expect("ports");
    let p = ports
        .iter()
        .find(|p| p["guest"] == guest)
        .unwrap_or_else(|| panic!("guest port {guest} not published in {sb}"));
    p["host"].as_u64().expect("host port") as u16
}

fn sandbox(d: &Daemon, name: &str) -> Value {
    serde_json::from_str(&d.kiln_ok(&["--json", "sandbox", "inspect", name])).expect("inspect JSON")
}

/// Writes the sandbox's hostname where its httpd serves `/id`, and checks that `/id` through the host
/// port it has for guest 8080 answers with it: that port reaches this machine, not another copy.
fn check_identity(d: &Daemon, name: &str) -> u16 {
    let sb = sandbox(d, name);
    let port = port_of(&sb, 8080);
    let host = d
        .kiln_ok(&["exec", name, "--", "sh", "-c", "hostname | tee /www/id"])
        .trim()
        .to_string();
    let body = fetch(port, "/id", &host);
    assert!(body.contains(&host), "{name} on 127.0.0.1:{port}: {body}");
    port
}

#[test]
fn a_published_server_answers_in_every_copy_on_its_own_host_port() {
    require_image("tiny");
    let mut d = Daemon::start();
    let fixed = common::free_port();
    let (status, sb) = d.api(
        "POST",
        "/v1/sandboxes",
        Some(json!({"name": "web", "ports": [{"host": fixed, "guest": 8080}]})),
    );
    assert_eq!(status, 201, "{sb}");
    assert_eq!(port_of(&sb, 8080), fixed);
    d.kiln_ok(&[
        "exec",
        "web",
        "--",
        "sh",
        "-c",
        "mkdir -p /www && (httpd -p 8080 -h /www &)",
    ]);
    assert_eq!(check_identity(&d, "web"), fixed);

    // Two resumed copies and two fork children: the server keeps running in each, on its own host port.
    d.kiln_ok(&["snapshot", "create", "web", "--name", "s1"]);
    d.kiln_ok(&["snapshot", "resume", "s1", "--name", "r1"]);
    d.kiln_ok(&["snapshot", "resume", "s1", "--name", "r2"]);
    d.kiln_ok(&["fork", "web", "--count", "2", "--name", "kid"]);
    let mut seen = vec![fixed];
    for name in ["r1", "r2", "kid-1", "kid-2"] {
        let port = check_identity(&d, name);
        assert!(
            !seen.contains(&port),
            "{name} got host port {port} again: {seen:?}"
        );
        assert_eq!(sandbox(&d, name)["ports"][0]["auto"], true);
        seen.push(port);
    }
    // The source still answers as itself.
    assert_eq!(check_identity(&d, "web"), fixed);

    // Publish on a running sandbox, with a host port picked: the CLI prints where.
    let addr = d.kiln_ok(&["port", "publish", "web", "9090"]);
    let extra: u16 = addr
        .trim()
        .strip_prefix("127.0.0.1:")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("publish printed {addr:?}"));
    d.kiln_ok(&["exec", "web", "--", "sh", "-c", "(httpd -p 9090 -h /www &)"]);
    assert!(fetch(extra, "/id", "web").contains("web"));
    // Publishing it again returns the same mapping; a fixed host port in use (by this sandbox, by another
    // one, by another process) is a conflict with a stable code.
    assert_eq!(d.kiln_ok(&["port", "publish", "web", "9090"]), addr);
    let squatter = std::net::TcpListener::bind(("127.0.0.1", 0)).expect("bind");
    let taken = squatter.local_addr().expect("addr").port();
    for (sb, host) in [("web", fixed), ("r1", fixed), ("r1", taken)] {
        let clash = d.api(
            "POST",
            &format!("/v1/sandboxes/{sb}/ports"),
            Some(json!({"guest": 7000, "host": host})),
        );
        assert_eq!(
            (clash.0, clash.1["error"]["code"].as_str()),
            (409, Some("port_in_use")),
            "{sb} on {host}: {}",
            clash.1
        );
    }
    drop(squatter);
    let missing = d.api("DELETE", "/v1/sandboxes/web/ports/7001", None);
    assert_eq!(
        missing.1["error"]["code"], "port_not_found",
        "{}",
        missing.1
    );

    // Unpublish closes the host port.
    d.kiln_ok(&["port", "unpublish", "web", "9090"]);
    assert!(
        !answers(extra),
        "127.0.0.1:{extra} still answers after unpublish"
    );
    assert!(sandbox(&d, "web")["ports"].as_array().unwrap().len() == 1);

    // A daemon restart keeps every port (the VMs keep their forwards; the rows keep the ports).
    let r1 = port_of(&sandbox(&d, "r1"), 8080);
    d.restart_hard();
    assert_eq!(port_of(&sandbox(&d, "r1"), 8080), r1);
    assert!(fetch(r1, "/id", "r1").contains("r1"));

    // Stop/start: an auto port comes back on its host port while that is free ...
    d.kiln_ok(&["stop", "r1"]);
    d.kiln_ok(&["start", "r1"]);
    assert_eq!(check_identity(&d, "r1"), r1);
    // ... and on another one when something else took it meanwhile.
    d.kiln_ok(&["stop", "r1"]);
    let squatter = std::net::TcpListener::bind(("127.0.0.1", r1)).expect("take r1's port");
    d.kiln_ok(&["start", "r1"]);
    let moved = check_identity(&d, "r1");
    assert_ne!(moved, r1);
    drop(squatter);

    // A fixed host port taken while its sandbox was stopped: start says so with a stable code.
    d.kiln_ok(&["stop", "web"]);
    let squatter = std::net::TcpListener::bind(("127.0.0.1", fixed)).expect("take web's port");
    let out = d.kiln(&["start", "web"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("port_in_use"),
        "{err}"
    );
    drop(squatter);
    d.kiln_ok(&["start", "web"]);
    assert_eq!(check_identity(&d, "web"), fixed);
}
