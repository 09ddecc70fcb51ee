//! The smolvm snapshot CLI page (seed 003) run literally: examples/seeds/smolvm.sh, with `kiln` on PATH
//! and a real daemon, and the lines that show each command did what the page says.

mod common;

use std::path::Path;
use std::process::Command;

use common::{require_image, tail, Daemon, KILN};

#[test]
fn smolvm_cli_page_runs_as_written() {
    require_image("tiny");
    let d = Daemon::start();
    let bin = tempfile::tempdir().expect("bin dir");
    std::os::unix::fs::symlink(KILN, bin.path().join("kiln")).expect("kiln on PATH");
    let path = format!(
        "{}:{}",
        bin.path().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/seeds/smolvm.sh");
    let out = Command::new("sh")
        .arg(&script)
        .env("PATH", path)
        .env("KILN_SOCKET", &d.socket)
        .env("KILN_DATA_DIR", d.dir.path())
        .env_remove("KILN_URL")
        .output()
        .expect("run smolvm.sh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "smolvm.sh failed ({}):\nstdout:\n{stdout}\nstderr:\n{stderr}\ndaemon log:\n{}",
        out.status,
        tail(&d.log(), 30)
    );
    for line in [
        "created full snapshot before-deploy of my-sandbox",
        "after --resume-source my-sandbox is running",
        "created disk snapshot snap-my-sandbox-",
        "without --resume-source my-sandbox is paused",
        "restored my-sandbox to snapshot before-deploy; it is running",
        "after restore my-sandbox is running; deploy.txt: absent",
        "restoring before-deploy again without --force: refused",
        "snapshots of my-sandbox: 2",
        "deleting before-deploy while the sandbox restored from it runs: refused",
        "deleted snapshot before-deploy",
        "done",
    ] {
        assert!(stdout.contains(line), "{line:?} not in:\n{stdout}");
    }
    // Nothing is left: no sandbox, no snapshot.
    let (_, sandboxes) = d.api("GET", "/v1/sandboxes", None);
    let (_, snapshots) = d.api("GET", "/v1/snapshots", None);
    assert_eq!(sandboxes.as_array().map(Vec::len), Some(0), "{sandboxes}");
    assert_eq!(snapshots.as_array().map(Vec::len), Some(0), "{snapshots}");
}
