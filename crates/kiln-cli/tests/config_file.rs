//! `kiln serve --config FILE`: a daemon started from a config file alone takes its data directory, socket,
//! TCP listener and limits from it; a flag given on the command line wins; an unknown key stops it with a
//! message naming the key. No VMs are needed.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

struct Serve {
    child: Child,
    log: std::path::PathBuf,
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve(dir: &std::path::Path, args: &[&str]) -> Serve {
    let log = dir.join("daemon.log");
    let out = std::fs::File::create(&log).expect("log");
    let child = Command::new(KILN)
        .arg("serve")
        .args(args)
        .env_remove("KILN_DATA_DIR")
        .env_remove("KILN_SOCKET")
        .env("KILN_WARM_SPARES", "0")
        .env("KILN_TEMPLATE_SNAPSHOTS", "off")
        .env("KILN_NETWORK", "user")
        .stdin(Stdio::null())
        .stdout(out.try_clone().expect("log"))
        .stderr(out)
        .spawn()
        .expect("spawn kiln serve");
    Serve { child, log }
}

fn wait_for(s: &mut Serve, needle: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let log = strip_ansi(&std::fs::read_to_string(&s.log).unwrap_or_default());
        if log.contains(needle) {
            return log;
        }
        if let Ok(Some(status)) = s.child.try_wait() {
            panic!("kiln serve exited with {status} before logging {needle:?}:\n{log}");
        }
        assert!(
            Instant::now() < deadline,
            "no {needle:?} within 30 s:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The daemon colours its log; the fields are matched without the colour codes.
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[test]
fn a_daemon_runs_from_its_config_file_and_flags_override_it() {
    let dir = tempfile::Builder::new()
        .prefix("kc")
        .tempdir_in("/tmp")
        .expect("tempdir");
    let data = dir.path().join("data");
    let socket = dir.path().join("run/kiln.sock");
    std::fs::create_dir_all(&data).expect("data dir");
    std::os::unix::fs::symlink(
        images_dir().canonicalize().expect("images"),
        data.join("images"),
    )
    .expect("link images");
    let token = dir.path().join("token");
    std::fs::write(&token, "0123456789abcdef0123456789abcdef\n").expect("token");
    let addr = format!("127.0.0.1:{}", free_port());
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = {:?}\nsocket = {:?}\nlisten = {addr:?}\ntoken_file = {:?}\nmax_sandboxes = 5\nmemory_overcommit = 1.25\n",
            data.display().to_string(),
            socket.display().to_string(),
            token.display().to_string()
        ),
    )
    .expect("config");
    let cfg = config.to_str().expect("utf-8");

    let mut s = serve(dir.path(), &["--config", cfg]);
    let log = wait_for(&mut s, "API listening on TCP");
    assert!(log.contains("max_sandboxes=5"), "{log}");
    assert!(socket.exists(), "the socket from the file: {log}");
    let (status, body) = http_unix(&socket, "GET", "/v1/info", None, "application/json");
    assert_eq!(status, 200);
    let body: serde_json::Value = serde_json::from_slice(&body).expect("info JSON");
    assert_eq!(
        body["data_dir"].as_str(),
        Some(data.to_str().expect("utf-8")),
        "{body}"
    );
    let tcp = Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}"])
        .arg(format!("http://{addr}/v1/health"))
        .output()
        .expect("curl");
    assert_eq!(
        String::from_utf8_lossy(&tcp.stdout),
        "401",
        "the listener from the file wants the token"
    );
    drop(s);

    // A flag on the command line wins over the file.
    let mut s = serve(dir.path(), &["--config", cfg, "--max-sandboxes", "2"]);
    let log = wait_for(&mut s, "API listening on TCP");
    assert!(log.contains("max_sandboxes=2"), "{log}");
    drop(s);

    // A typo is an error that names the key; the daemon does not start.
    std::fs::write(&config, "max_sandboxez = 3\n").expect("config");
    let out = Command::new(KILN)
        .args(["serve", "--config", cfg])
        .env_remove("KILN_DATA_DIR")
        .output()
        .expect("kiln serve");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("unknown key `max_sandboxez`") && err.contains(cfg),
        "{err}"
    );
    // So is a value the flag refuses.
    std::fs::write(&config, "max_vcpus = 0\n").expect("config");
    let out = Command::new(KILN)
        .args(["serve", "--config", cfg])
        .env_remove("KILN_DATA_DIR")
        .output()
        .expect("kiln serve");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("--max-vcpus") && err.contains(cfg), "{err}");
}
