//! Confinement of VM processes (run as root, as kiln's daemon does): per-sandbox unprivileged uids,
//! seccomp, private files, cgroup limits, and a network that keeps guests off the host.

mod common;

use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{require_image, Daemon};
use serde_json::Value;

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// A field of /proc/PID/status (first value).
fn status_field(pid: u64, field: &str) -> String {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    s.lines()
        .find(|l| l.starts_with(&format!("{field}:")))
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap_or("")
        .to_string()
}

fn uid_of(sb: &Value) -> u32 {
    sb["qemu_uid"].as_u64().expect("qemu_uid") as u32
}

/// Whether `uid` (with its own gid and the kiln-qemu group, as a VM runs) can open `path` for reading.
fn can_read_as(uid: u32, groups: &[u32], path: &Path) -> bool {
    let groups = groups.to_vec();
    let mut cmd = Command::new("/bin/cat");
    cmd.arg(path)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    // SAFETY: only raw syscalls in the child.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setgroups(groups.len(), groups.as_ptr()) != 0
                || libc::setgid(uid) != 0
                || libc::setuid(uid) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.status().map(|s| s.success()).unwrap_or(false)
}

fn kiln_qemu_gid() -> u32 {
    let out = Command::new("getent")
        .args(["group", "kiln-qemu"])
        .output()
        .expect("getent");
    String::from_utf8_lossy(&out.stdout)
        .split(':')
        .nth(2)
        .and_then(|g| g.trim().parse().ok())
        .expect("kiln-qemu group (run scripts/install-deps.sh)")
}

fn confined(d: &Daemon) -> bool {
    let log = d.log();
    if !log.contains("per-sandbox unprivileged uids") {
        eprintln!("skipping: this daemon does not confine VMs:\n{log}");
        return false;
    }
    true
}

#[test]
fn vms_run_unprivileged_under_seccomp_with_private_files() {
    require_image("tiny");
    if !is_root() {
        eprintln!("skipping: confinement needs the daemon to run as root");
        return;
    }
    let d = Daemon::start();
    if !confined(&d) {
        return;
    }
    let group = kiln_qemu_gid();
    // `a` boots cold: what is checked below is a booted machine's own RAM file on kiln's tmpfs (a copy
    // resumed from the template's snapshot, like `b`, maps the snapshot's sealed RAM instead, as `c` does).
    let a = d.create(&["--name", "a", "--boot"]);
    let b = d.create(&["--name", "b"]);
    assert_eq!(b["boot"]["mode"], "resume", "{b}");
    let (ua, ub) = (uid_of(&a), uid_of(&b));
    assert_ne!(ua, ub, "each sandbox has a uid of its own");
    for sb in [&a, &b] {
        let pid = sb["pid"].as_u64().unwrap();
        let uid = uid_of(sb).to_string();
        assert_eq!(status_field(pid, "Uid"), uid);
        assert_eq!(status_field(pid, "Gid"), uid);
        let groups = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let groups = groups.lines().find(|l| l.starts_with("Groups:")).unwrap();
        assert!(
            groups.split_whitespace().any(|g| g == group.to_string()),
            "{groups}"
        );
        assert_eq!(status_field(pid, "Seccomp"), "2", "seccomp filter mode");
        assert_eq!(status_field(pid, "NoNewPrivs"), "1");
    }
    let dir_a = d
        .data_dir()
        .join("sandboxes")
        .join(a["id"].as_str().unwrap());
    // Root's, passable by a's VM only (its own gid); QEMU creates files only in vm/.
    let meta = std::fs::metadata(&dir_a).unwrap();
    assert_eq!(
        (meta.uid(), meta.gid(), meta.mode() & 0o777),
        (0, ua, 0o710)
    );
    let meta = std::fs::metadata(dir_a.join("vm")).unwrap();
    assert_eq!((meta.uid(), meta.mode() & 0o777), (ua, 0o700));
    // Running guests' RAM is on kiln's tmpfs (ramdir.rs), in a root-owned 0711 directory.
    let ram_dir = d.data_dir().join("ram");
    let meta = std::fs::metadata(&ram_dir).unwrap();
    assert_eq!((meta.uid(), meta.mode() & 0o777), (0, 0o711));
    let memory_a = ram_dir.join(format!("{}.ram", a["id"].as_str().unwrap()));
    let meta = std::fs::metadata(&memory_a).unwrap();
    assert_eq!((meta.uid(), meta.mode() & 0o777), (ua, 0o600));
    assert!(can_read_as(ua, &[group], &memory_a), "a reads its own RAM");
    assert!(
        !can_read_as(ub, &[group], &memory_a),
        "b cannot read a's RAM file"
    );
    assert!(!can_read_as(ub, &[group], &dir_a.join("disk-1.qcow2")));

    // A snapshot's files are sealed root:kiln-qemu 0640; a sandbox resumed from it reads them through its
    // own directory, while another sandbox's VM user cannot reach them at all.
    d.kiln_ok(&["snapshot", "create", "a", "--name", "snap"]);
    let snap = d.data_dir().join("snapshots/snap");
    for f in ["memory", "state", "disk-1.qcow2"] {
        let m = std::fs::metadata(snap.join(f)).unwrap();
        assert_eq!(
            (m.uid(), m.gid(), m.mode() & 0o777),
            (0, group, 0o640),
            "{f}"
        );
    }
    assert!(!can_read_as(ub, &[group], &snap.join("memory")));
    let c = d.create(&["--snapshot", "snap", "--name", "c"]);
    let dir_c = d
        .data_dir()
        .join("sandboxes")
        .join(c["id"].as_str().unwrap());
    assert!(can_read_as(
        uid_of(&c),
        &[group],
        &dir_c.join("memory.base")
    ));
    assert!(!can_read_as(ub, &[group], &dir_c.join("memory.base")));
    assert_eq!(d.kiln_ok(&["exec", "c", "--", "echo", "ok"]), "ok\n");
    // The snapshot source keeps writing to its own new top layer.
    let top = std::fs::read_dir(&dir_a)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "qcow2"))
        .max()
        .unwrap();
    assert_eq!(std::fs::metadata(&top).unwrap().uid(), ua);
    d.kiln_ok(&["exec", "a", "--", "sh", "-c", "echo more > /root/x && sync"]);

    // A VM's user cannot use the daemon's unix socket.
    let sock = d.socket.clone();
    let ok = Command::new("python3")
        .args([
            "-c",
            "import socket,sys; socket.socket(socket.AF_UNIX).connect(sys.argv[1])",
        ])
        .arg(&sock)
        .uid(ub)
        .gid(ub)
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap()
        .success();
    assert!(!ok, "a VM uid connected to the daemon's unix socket");
}

fn cgroup_dirs(id: &str) -> Vec<PathBuf> {
    let v2 = PathBuf::from("/sys/fs/cgroup/kiln").join(id);
    if v2.join("memory.max").exists() {
        return vec![v2];
    }
    ["memory", "cpu", "pids"]
        .iter()
        .map(|c| {
            PathBuf::from("/sys/fs/cgroup")
                .join(c)
                .join("kiln")
                .join(id)
        })
        .collect()
}

fn read_u64(p: &Path) -> u64 {
    std::fs::read_to_string(p)
        .unwrap_or_default()
        .split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("reading {}", p.display()))
}

#[test]
fn cgroups_cap_a_guest_that_eats_all_its_ram_and_cpu() {
    require_image("tiny");
    let d = Daemon::start();
    if d.log().contains("without cgroup limits") {
        eprintln!("skipping: no usable cgroups on this host:\n{}", d.log());
        return;
    }
    let hog = d.create(&["--name", "hog", "--memory", "192", "--cpus", "1"]);
    d.create(&["--name", "calm"]);
    let id = hog["id"].as_str().unwrap().to_string();
    let pid = hog["pid"].as_u64().unwrap();
    let dirs = cgroup_dirs(&id);
    // Guest RAM + 128 MiB + 1/16 of guest RAM + 16 MiB per vCPU (confine/cgroup.rs).
    let limit = (192 + 128 + 12 + 16) << 20;
    let v2 = dirs.len() == 1;
    let (mem_max, mem_cur, mem_peak) = if v2 {
        (
            dirs[0].join("memory.max"),
            dirs[0].join("memory.current"),
            dirs[0].join("memory.peak"),
        )
    } else {
        (
            dirs[0].join("memory.limit_in_bytes"),
            dirs[0].join("memory.usage_in_bytes"),
            dirs[0].join("memory.max_usage_in_bytes"),
        )
    };
    assert_eq!(read_u64(&mem_max), limit);
    let procs = std::fs::read_to_string(dirs[0].join("cgroup.procs")).unwrap();
    assert!(procs.lines().any(|l| l == pid.to_string()), "{procs}");
    let pids_max = dirs.last().unwrap().join("pids.max");
    assert_eq!(read_u64(&pids_max), 256);
    if v2 {
        let cpu = std::fs::read_to_string(dirs[0].join("cpu.max")).unwrap();
        assert_eq!(cpu.trim(), "200000 100000");
    } else {
        // One vCPU plus one CPU for QEMU's main loop and I/O threads.
        assert_eq!(read_u64(&dirs[1].join("cpu.cfs_quota_us")), 200_000);
    }

    // Spin the vCPU and fill guest RAM (tmpfs plus an anonymous buffer), in the background.
    d.kiln_ok(&[
        "exec",
        "hog",
        "--",
        "sh",
        "-c",
        "(while :; do :; done) >/dev/null 2>&1 & \
         (mkdir -p /mnt/h && mount -t tmpfs -o size=100% tmpfs /mnt/h && \
          dd if=/dev/zero of=/mnt/h/fill bs=1M count=180; \
          head -c 150M /dev/zero | tail >/dev/null) >/dev/null 2>&1 & echo started",
    ]);
    let t0 = Instant::now();
    let mut peak = 0;
    let mut slowest = Duration::ZERO;
    while t0.elapsed() < Duration::from_secs(25) {
        let cur = read_u64(&mem_cur);
        peak = peak.max(cur);
        assert!(cur <= limit, "usage {cur} over the limit {limit}");
        let t = Instant::now();
        assert_eq!(d.kiln_ok(&["exec", "calm", "--", "echo", "ok"]), "ok\n");
        slowest = slowest.max(t.elapsed());
        std::thread::sleep(Duration::from_millis(500));
    }
    let recorded_peak = read_u64(&mem_peak);
    eprintln!(
        "hog: limit {} MiB, peak {} MiB (sampled {} MiB); slowest exec in the other sandbox: {} ms",
        limit >> 20,
        recorded_peak >> 20,
        peak >> 20,
        slowest.as_millis()
    );
    assert!(recorded_peak <= limit);
    assert!(slowest < Duration::from_secs(5), "{slowest:?}");
    // The other sandbox was never starved, and the hog's limits hold; deleting it removes its cgroup.
    d.kiln_ok(&["sandbox", "delete", "-y", "hog"]);
    for dir in &dirs {
        assert!(!dir.exists(), "{} left behind", dir.display());
    }
}

/// A VM the kernel ends at its cgroup's memory cap is reported as such: the sandbox's error says the OOM
/// killer ended it, beside the console's last lines (it used to say only "QEMU exited").
#[test]
fn a_vm_killed_at_its_memory_cap_says_so() {
    require_image("tiny");
    let d = Daemon::start();
    if d.log().contains("without cgroup limits") {
        eprintln!("skipping: no usable cgroups on this host:\n{}", d.log());
        return;
    }
    // With host swap, guest RAM pages out instead of reaching the cap.
    let swaps = std::fs::read_to_string("/proc/swaps").unwrap_or_default();
    if swaps.lines().count() > 1 {
        eprintln!("skipping: host swap is on:\n{swaps}");
        return;
    }
    let sb = d.create(&["--name", "big", "--memory", "256"]);
    let id = sb["id"].as_str().unwrap().to_string();
    let dirs = cgroup_dirs(&id);
    // The cap made tight (as an operator's outer limit could): what QEMU uses now and 32 MiB more.
    let (max, cur) = if dirs.len() == 1 {
        (dirs[0].join("memory.max"), dirs[0].join("memory.current"))
    } else {
        (
            dirs[0].join("memory.limit_in_bytes"),
            dirs[0].join("memory.usage_in_bytes"),
        )
    };
    let tight = read_u64(&cur) + (32 << 20);
    std::fs::write(&max, tight.to_string()).unwrap();
    // Guest RAM is shared memory: with no swap it cannot be reclaimed, so filling it ends QEMU.
    let _ = d.kiln(&[
        "exec",
        "big",
        "--",
        "sh",
        "-c",
        "mkdir -p /mnt/h && mount -t tmpfs -o size=100% tmpfs /mnt/h && dd if=/dev/zero of=/mnt/h/fill bs=1M count=200",
    ]);
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut v = serde_json::Value::Null;
    while Instant::now() < deadline {
        v = serde_json::from_str(&d.kiln_ok(&["--json", "sandbox", "get", "big"])).unwrap();
        if v["state"] == "failed" {
            break;
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    assert_eq!(v["state"], "failed", "{v}");
    let error = v["error"].as_str().unwrap_or_default();
    assert!(error.contains("OOM killer"), "{error}");
    assert!(error.contains("Last console lines"), "{error}");
}

/// From inside the guest: try a TCP connection; returns nc's combined output and whether it connected.
fn guest_connect(d: &Daemon, sandbox: &str, host: &str, port: u16) -> (bool, String) {
    let script = format!("printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 3 {host} {port}; echo rc=$?");
    let out = d.kiln(&["exec", sandbox, "--", "sh", "-c", &script]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (
        text.contains("rc=0") && !text.contains("can't connect"),
        text,
    )
}

/// The host's first global IPv4 address (not loopback).
fn host_address() -> Option<String> {
    let out = Command::new("ip")
        .args(["-o", "-4", "addr", "show", "scope", "global"])
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .skip_while(|w| *w != "inet")
        .nth(1)
        .and_then(|a| a.split('/').next().map(str::to_string))
}

#[test]
fn guests_cannot_reach_the_host_the_api_or_other_sandboxes() {
    require_image("tiny");
    if !is_root() {
        eprintln!("skipping: network confinement needs root");
        return;
    }
    let (d, _token_dir, addr) = common::daemon_with_tcp();
    let api_port: u16 = addr
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap();
    if !confined(&d) {
        return;
    }
    assert!(
        d.log().contains("kept off the host's own addresses"),
        "firewall rules not installed:\n{}",
        d.log()
    );
    // A service on all of the host's addresses, which must never see a guest connection.
    let host_service = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    host_service.set_nonblocking(true).unwrap();
    let service_port = host_service.local_addr().unwrap().port();
    let fwd_port = common::free_port();
    let open = d.create(&["--name", "open"]);
    assert_eq!(open["egress"], true);
    let mapping = format!("{fwd_port}:8080");
    let closed = d.create(&["--name", "closed", "--no-egress", "--port", &mapping]);
    assert_eq!(closed["egress"], false);

    // The API on the host's loopback is unreachable from both guests (10.0.2.2 is the host's loopback).
    for sb in ["open", "closed"] {
        let (ok, text) = guest_connect(&d, sb, "10.0.2.2", api_port);
        assert!(!ok, "{sb} reached the API: {text}");
        let (ok, text) = guest_connect(&d, sb, "10.0.2.2", service_port);
        assert!(!ok, "{sb} reached a host service via 10.0.2.2: {text}");
        if let Some(ip) = host_address() {
            let (ok, text) = guest_connect(&d, sb, &ip, service_port);
            assert!(!ok, "{sb} reached a host service at {ip}: {text}");
        }
    }
    assert!(
        host_service.accept().is_err(),
        "a guest connection reached the host service"
    );

    // Forwarded ports still work with egress off, from the host; another guest cannot use them.
    let body = common::serve_and_fetch(&d, "closed", fwd_port);
    assert!(
        body.contains("served"),
        "port forward with egress off: {body}"
    );
    let (ok, text) = guest_connect(&d, "open", "10.0.2.2", fwd_port);
    assert!(
        !ok,
        "a guest reached another sandbox's forwarded port: {text}"
    );

    // Egress off holds across stop/start (the setting is stored with the sandbox).
    d.kiln_ok(&["stop", "closed"]);
    d.kiln_ok(&["start", "closed"]);
    let (_, info) = d.api("GET", "/v1/sandboxes/closed", None);
    assert_eq!(info["egress"], false);
    let pid = info["pid"].as_u64().unwrap();
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    assert!(String::from_utf8_lossy(&cmdline).contains("restrict=on"));
}
