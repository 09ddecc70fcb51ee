//! The web dashboard under /ui, end to end: headless Chromium (Debian's `chromium`, driven by Playwright
//! from `tests/browser/dashboard.py`) signs in on the TCP listener and creates, snapshots and forks
//! sandboxes of a real daemon through the page; the lineage tree must show them. Writes docs/dashboard.png.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;

/// The static files answer without a token on TCP (they hold no secrets); the API still wants one.
#[test]
fn dashboard_files_are_public_and_the_api_is_not() {
    let (_d, _tok, addr) = daemon_with_tcp();
    let get = |path: &str| -> (u16, String) {
        let out = Command::new("curl")
            .args(["-s", "-o", "-", "-w", "\n%{http_code}"])
            .arg(format!("http://{addr}{path}"))
            .output()
            .expect("curl");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').expect("status line");
        (code.parse().expect("status"), body.to_string())
    };
    let (status, body) = get("/ui/");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("/ui/app.js"), "{body}");
    for f in ["app.js", "api.js", "tree.js", "style.css"] {
        assert_eq!(get(&format!("/ui/{f}")).0, 200, "{f}");
    }
    assert_eq!(get("/ui/nope.js").0, 404);
    assert_eq!(get("/v1/sandboxes").0, 401);
    // A path that only starts like the dashboard's is not let through.
    assert_eq!(get("/uix").0, 401);
}

#[test]
fn create_snapshot_and_fork_through_the_dashboard() {
    require_image("tiny");
    let (d, tok, addr) = daemon_with_tcp();
    let token = std::fs::read_to_string(tok.path().join("token")).expect("token");
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser/dashboard.py");
    let shot = root.join("docs/dashboard.png");
    let out = Command::new("python3")
        .arg(&script)
        .arg(format!("http://{addr}/ui/"))
        .arg(token.trim())
        .arg(&shot)
        .output()
        .expect("python3 (run `make deps` for chromium and playwright)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "browser flow failed ({}):\n{stdout}\n{stderr}\n--- daemon log ---\n{}",
        out.status,
        tail(&d.log(), 60)
    );
    // What the page showed is what the daemon holds: the fork knows its source.
    let (_, list) = d.api("GET", "/v1/sandboxes", None);
    let web = list
        .as_array()
        .expect("list")
        .iter()
        .find(|s| s["name"] == "web-1")
        .expect("web-1")
        .clone();
    let fork = list
        .as_array()
        .expect("list")
        .iter()
        .find(|s| s["name"].as_str().unwrap_or("").starts_with("web-1-fork-"))
        .expect("the fork")
        .clone();
    assert_eq!(fork["forked_from"], web["id"], "{fork}");
    assert!(web["forked_from"].is_null());
    let (_, snaps) = d.api("GET", "/v1/snapshots", None);
    let snaps = snaps.as_array().expect("snapshots").clone();
    assert_eq!(snaps.len(), 2, "one of web-1, one of its fork: {snaps:?}");
    let png = std::fs::read(&shot).expect("screenshot");
    assert!(png.starts_with(b"\x89PNG") && png.len() > 10_000);
}
