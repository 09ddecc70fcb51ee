//! Test harness: a real `kiln serve` daemon in a temporary data directory, real QEMU VMs, and helpers to
//! drive it through the CLI and the raw HTTP API.
#![allow(dead_code)]

pub mod world;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub const KILN: &str = env!("CARGO_BIN_EXE_kiln");

/// Built images shared by all tests (`make image-tiny` puts them in .kiln-data/images).
pub fn images_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("KILN_TEST_IMAGES") {
        return PathBuf::from(dir);
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.kiln-data/images")
}

pub fn require_image(name: &str) {
    let manifest = images_dir().join(name).join("image.json");
    assert!(
        manifest.is_file(),
        "image '{name}' is not built ({} missing): run `make image-{name}` first",
        manifest.display()
    );
}

/// The template snapshot store the test daemons share: under this checkout's target directory (the same
/// filesystem as the daemons' data dirs in /tmp, so they hard-link it).
pub fn template_store() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("kiln-template-store")
}

/// In a daemon's `env` (not passed on as meaning anything to kiln): `spawn` returns once the daemon
/// listens, without waiting for its start-up template snapshot (tests of what happens meanwhile).
pub const NO_PREPARE_WAIT: &str = "KILN_TEST_NO_PREPARE_WAIT";

pub struct Daemon {
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    child: Option<Child>,
    extra_args: Vec<String>,
    /// Environment for the daemon (e.g. `KILN_FAULTS`); kept across restarts unless changed.
    env: Vec<(String, String)>,
    /// A command that runs `kiln serve` (e.g. in a network namespace): the daemon is `PREFIX... kiln ...`.
    /// It must exec kiln in place, so the child's pid is the daemon's.
    prefix: Vec<String>,
}

impl Daemon {
    pub fn start() -> Daemon {
        Daemon::start_with(&[])
    }

    pub fn start_with(extra_args: &[&str]) -> Daemon {
        Daemon::start_env(extra_args, &[])
    }

    pub fn start_env(extra_args: &[&str], env: &[(&str, &str)]) -> Daemon {
        Daemon::start_prefixed(&[], extra_args, env)
    }

    /// Starts the daemon as `PREFIX... kiln ...` (see `prefix`).
    pub fn start_prefixed(prefix: &[&str], extra_args: &[&str], env: &[(&str, &str)]) -> Daemon {
        // Short paths: unix socket paths are limited to 107 bytes.
        let dir = tempfile::Builder::new()
            .prefix("kt")
            .tempdir_in("/tmp")
            .expect("tempdir");
        std::os::unix::fs::symlink(
            images_dir().canonicalize().expect("images dir"),
            dir.path().join("images"),
        )
        .expect("link images");
        let socket = dir.path().join("kiln.sock");
        let mut d = Daemon {
            dir,
            socket,
            child: None,
            extra_args: extra_args.iter().map(|s| s.to_string()).collect(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            prefix: prefix.iter().map(|s| s.to_string()).collect(),
        };
        d.spawn();
        d
    }

    pub fn data_dir(&self) -> &Path {
        self.dir.path()
    }

    /// The daemon's process id (to trace or signal it).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    fn spawn(&mut self) {
        // Ready means this daemon logged that it listens. A bare connect was once seen to succeed before
        // that, right after a kill_hard, and the test then checked a half-started daemon's data dir.
        let listening = "API listening on unix socket";
        let before = self.log().matches(listening).count();
        let prepared = "template snapshot preparation finished";
        let prepared_before = self.log().matches(prepared).count();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("daemon.log"))
            .expect("daemon log");
        let mut cmd = match self.prefix.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(KILN);
                c
            }
            None => Command::new(KILN),
        };
        cmd.arg("--data-dir")
            .arg(self.dir.path())
            .arg("--socket")
            .arg(&self.socket)
            .arg("serve")
            .args(&self.extra_args)
            .env("KILN_LOG", "info,kiln=debug")
            // Warm spares are VMs of their own; tests that want them ask (tests/warm_spares.rs).
            .env("KILN_WARM_SPARES", "0")
            // Template snapshots are on, as users get them (create resumes the template's boot snapshot);
            // they are shared through a store of this checkout's own, never written beside the built
            // images (`images_dir()` may be another checkout's), so only the first daemon boots a template.
            .env("KILN_TEMPLATE_STORE", template_store())
            // User networking unless a test asks for another mode: a root daemon's default (bridged,
            // docs/networking.md) would build a bridge and NAT in the host's namespace. An empty value
            // leaves the variable unset (the daemon's own default).
            .env("KILN_NETWORK", "user")
            .envs(
                self.env
                    .iter()
                    .filter(|(_, v)| !v.is_empty())
                    .map(|(k, v)| (k, v)),
            );
        for (k, _) in self.env.iter().filter(|(_, v)| v.is_empty()) {
            cmd.env_remove(k);
        }
        let child = cmd
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn kiln serve");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if self.log().matches(listening).count() > before
                && UnixStream::connect(&self.socket).is_ok()
            {
                break;
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!("kiln serve exited with {status}:\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "daemon did not listen within 30 s:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        // With template snapshots on, the daemon prepares the default template's in the background (a
        // builder VM when the store has none yet): wait for it, so tests count only their own VMs and files.
        if self.template_snapshots_on() && !self.env.iter().any(|(k, _)| k == NO_PREPARE_WAIT) {
            let deadline = Instant::now() + Duration::from_secs(300);
            while self.log().matches(prepared).count() <= prepared_before {
                assert!(
                    Instant::now() < deadline,
                    "the daemon did not finish preparing its template snapshot within 300 s:\n{}",
                    self.log()
                );
                if let Some(Ok(Some(_))) = self.child.as_mut().map(|c| c.try_wait()) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    /// Whether this daemon runs with template snapshots prepared at start (the default, `on`).
    fn template_snapshots_on(&self) -> bool {
        !self.env.iter().any(|(k, v)| {
            k == "KILN_TEMPLATE_SNAPSHOTS" && matches!(v.as_str(), "off" | "lazy" | "0" | "false")
        })
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("daemon.log")).unwrap_or_default()
    }

    /// Stops the daemon with SIGKILL (VMs survive) and starts it again.
    pub fn restart_hard(&mut self) {
        self.kill_hard();
        self.spawn();
    }

    /// SIGKILLs the daemon (its VMs survive); `restart_with_env` brings it back.
    pub fn kill_hard(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Asks the daemon to exit (SIGTERM) and waits up to `limit` for it; returns whether it exited.
    pub fn terminate(&mut self, limit: Duration) -> bool {
        let Some(mut c) = self.child.take() else {
            return true;
        };
        // SAFETY: plain kill(2) on our child.
        unsafe {
            libc::kill(c.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = c.try_wait() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = c.kill();
        let _ = c.wait();
        false
    }

    /// Starts the daemon again (after `kill_hard`, or replacing a running one) with another environment.
    pub fn restart_with_env(&mut self, env: &[(&str, &str)]) {
        self.kill_hard();
        self.env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self.spawn();
    }

    /// Waits until the daemon log holds `needle` at least `count` times.
    pub fn wait_log(&self, needle: &str, count: usize, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.log().matches(needle).count() >= count {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    /// Runs the CLI against this daemon.
    pub fn kiln(&self, args: &[&str]) -> Output {
        self.kiln_stdin(args, None)
    }

    pub fn kiln_stdin(&self, args: &[&str], stdin: Option<&[u8]>) -> Output {
        let mut child = Command::new(KILN)
            .arg("--socket")
            .arg(&self.socket)
            .arg("--data-dir")
            .arg(self.dir.path())
            .args(args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run kiln");
        if let Some(data) = stdin {
            let mut pipe = child.stdin.take().expect("stdin");
            let data = data.to_vec();
            std::thread::spawn(move || {
                let _ = pipe.write_all(&data);
            });
        }
        child.wait_with_output().expect("kiln output")
    }

    /// Runs the CLI and asserts success; returns stdout.
    pub fn kiln_ok(&self, args: &[&str]) -> String {
        let out = self.kiln(args);
        assert!(
            out.status.success(),
            "kiln {args:?} failed ({}):\nstdout: {}\nstderr: {}\ndaemon log:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            tail(&self.log(), 30)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Creates a sandbox through the CLI and returns its JSON.
    pub fn create(&self, extra: &[&str]) -> Value {
        let mut args = vec!["--json", "sandbox", "create"];
        args.extend_from_slice(extra);
        serde_json::from_str(&self.kiln_ok(&args)).expect("create JSON")
    }

    /// A raw HTTP request over the unix socket: (status, body bytes).
    pub fn http(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
        content_type: &str,
    ) -> (u16, Vec<u8>) {
        http_unix(&self.socket, method, path, body, content_type)
    }

    pub fn api(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let bytes = body.map(|b| b.to_string().into_bytes());
        let (status, resp) = self.http(method, path, bytes.as_deref(), "application/json");
        let v = if resp.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&resp)
                .unwrap_or(Value::String(String::from_utf8_lossy(&resp).into_owned()))
        };
        (status, v)
    }

    /// Pids of QEMU processes whose command line mentions this daemon's data directory.
    pub fn qemu_pids(&self) -> Vec<u32> {
        qemu_pids_under(self.dir.path())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // Keep the daemon's log of a failed test; the data directory itself goes.
            let keep = std::env::temp_dir().join("kiln-test-logs");
            let _ = std::fs::create_dir_all(&keep);
            let name = self
                .dir
                .path()
                .file_name()
                .map(|n| n.to_os_string())
                .unwrap_or_default();
            let to = keep.join(name).with_extension("log");
            if std::fs::copy(self.dir.path().join("daemon.log"), &to).is_ok() {
                eprintln!("daemon log kept in {}", to.display());
            }
        }
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        for pid in self.qemu_pids() {
            // SAFETY: plain kill(2).
            unsafe {
                libc::kill(pid as i32, libc::SIGKILL);
            }
        }
        // The tmpfs the daemon mounted for guest RAM (it outlives a killed daemon, as in production).
        let ram = self.dir.path().join("ram");
        if let Ok(c) = std::ffi::CString::new(ram.as_os_str().as_encoded_bytes()) {
            // SAFETY: umount2 with a valid C string; a lazy unmount of a mount this test's daemon made.
            unsafe {
                libc::umount2(c.as_ptr(), libc::MNT_DETACH);
            }
        }
    }
}

pub fn qemu_pids_under(dir: &Path) -> Vec<u32> {
    let needle = dir.to_string_lossy().into_owned();
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmd) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&cmd);
        if cmd.starts_with("qemu-system") && cmd.contains(&needle) {
            pids.push(pid);
        }
    }
    pids
}

pub fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Everything the server sent before it closed. A reset after the answer (the server closed with part
/// of our body unread) ends the answer like a close does; data that arrived before it is kept.
fn read_until_closed(s: &mut UnixStream) -> Vec<u8> {
    let mut raw = Vec::new();
    let mut buf = [0u8; 64 * 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return raw,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset && !raw.is_empty() => {
                return raw
            }
            Err(e) => panic!("read: {e}"),
        }
    }
}

/// Minimal HTTP/1.1 over a unix socket (Connection: close), decoding chunked responses.
pub fn http_unix(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
    content_type: &str,
) -> (u16, Vec<u8>) {
    let mut s = UnixStream::connect(socket).expect("connect daemon");
    let body = body.unwrap_or(b"");
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: kiln\r\nConnection: close\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).expect("write");
    // The server may answer before reading the whole body (e.g. 507 when the guest disk fills up) and
    // close the connection; the answer is still there to read.
    if let Err(e) = s.write_all(body) {
        assert!(
            matches!(
                e.kind(),
                std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
            ),
            "write body: {e}"
        );
    }
    let raw = read_until_closed(&mut s);
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("header end");
    let headers = String::from_utf8_lossy(&raw[..split]).to_ascii_lowercase();
    let status: u16 = headers
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status");
    let mut rest = raw[split + 4..].to_vec();
    if headers.contains("transfer-encoding: chunked") {
        let mut out = Vec::new();
        loop {
            let nl = rest
                .windows(2)
                .position(|w| w == b"\r\n")
                .expect("chunk size");
            let size = usize::from_str_radix(String::from_utf8_lossy(&rest[..nl]).trim(), 16)
                .expect("hex");
            if size == 0 {
                break;
            }
            out.extend_from_slice(&rest[nl + 2..nl + 2 + size]);
            rest = rest[nl + 2 + size + 2..].to_vec();
        }
        rest = out;
    }
    (status, rest)
}

pub fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(data))
}

/// Whether a process exists and is not a zombie (daemonized QEMUs are reaped by init, maybe late).
pub fn process_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, rest)| !rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
}

/// Replaces the daemon's shared images link with a private images directory that still links `tiny`, and
/// copies `tiny` there as `name`, so a test may break or delete that image. Returns the copy's directory.
pub fn private_image(d: &Daemon, name: &str) -> PathBuf {
    let images = d.data_dir().join("images");
    if let Ok(shared) = std::fs::read_link(&images) {
        std::fs::remove_file(&images).unwrap();
        std::fs::create_dir(&images).unwrap();
        std::os::unix::fs::symlink(shared.join("tiny"), images.join("tiny")).unwrap();
    }
    let tiny = std::fs::canonicalize(images.join("tiny")).unwrap();
    let copy = images.join(name);
    std::fs::create_dir(&copy).unwrap();
    for f in std::fs::read_dir(&tiny).unwrap().flatten() {
        // The image's files; not the template snapshots kept beside them (`snapshots/`).
        if f.path().is_dir() {
            continue;
        }
        std::fs::copy(f.path(), copy.join(f.file_name())).unwrap();
    }
    let path = copy.join("image.json");
    let mut manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    manifest["name"] = serde_json::json!(name);
    std::fs::write(&path, manifest.to_string()).unwrap();
    copy
}

/// A free loopback TCP port (bound once, then released for the daemon or a forward to take).
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    l.local_addr().expect("local addr").port()
}

/// A daemon that also listens on TCP with a token; returns it, its token directory and `127.0.0.1:PORT`.
pub fn daemon_with_tcp() -> (Daemon, tempfile::TempDir, String) {
    let dir = tempfile::Builder::new()
        .prefix("kt")
        .tempdir_in("/tmp")
        .expect("tempdir");
    let token = dir.path().join("token");
    std::fs::write(&token, "0123456789abcdef0123456789abcdef\n").expect("token file");
    let addr = format!("127.0.0.1:{}", free_port());
    let d = Daemon::start_with(&[
        "--listen",
        &addr,
        "--token-file",
        token.to_str().expect("utf-8 path"),
    ]);
    (d, dir, addr)
}

/// Starts busybox httpd on guest port 8080 serving "served", then fetches it through host loopback
/// port `host_port` (retrying while httpd starts); returns what came back.
pub fn serve_and_fetch(d: &Daemon, sandbox: &str, host_port: u16) -> String {
    d.kiln_ok(&[
        "exec",
        sandbox,
        "--",
        "sh",
        "-c",
        "mkdir -p /www && echo served > /www/index.html && (httpd -p 8080 -h /www &)",
    ]);
    let mut body = String::new();
    for _ in 0..50 {
        if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", host_port)) {
            let _ = s.write_all(b"GET /index.html HTTP/1.0\r\n\r\n");
            let _ = s.read_to_string(&mut body);
            if body.contains("served") {
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    body
}

/// A snapshot's manifest as text and as JSON (without its checksum line), for tests that edit it.
pub fn read_manifest(path: &Path) -> (String, serde_json::Value) {
    let original = std::fs::read_to_string(path).expect("manifest");
    let (json, _) = original
        .rsplit_once("\n# checksum ")
        .expect("checksum line");
    let m = serde_json::from_str(json).expect("manifest JSON");
    (original, m)
}

/// Writes a manifest with its checksum line recomputed the way kiln writes it (as anyone able to write
/// the snapshot directory could).
pub fn write_manifest(path: &Path, v: &serde_json::Value) {
    let json = serde_json::to_string_pretty(v).expect("json");
    let doc = format!(
        "{json}\n# checksum {}\n",
        kiln_core::fsutil::checksum_bytes(json.as_bytes())
    );
    std::fs::write(path, doc).expect("write manifest");
}
