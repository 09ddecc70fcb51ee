//! Nothing waits forever: with a sandbox's QEMU stopped (SIGSTOP), snapshot, stop, pause, exec and fork
//! fail within seconds with `sandbox_unresponsive`, release the sandbox's lock and mark it failed; delete
//! and `kiln doctor --repair` then deal with it.

mod common;

use std::time::{Duration, Instant};

use common::{process_alive, require_image, Daemon};
use serde_json::Value;

/// SIGSTOPs a process for as long as it lives; SIGCONT on drop, so a failing test leaves nothing stopped.
struct Stopped(u32);

impl Stopped {
    fn new(pid: u32) -> Stopped {
        // SAFETY: kill(2) on a QEMU this test's daemon started.
        unsafe { libc::kill(pid as i32, libc::SIGSTOP) };
        // Wait until it is really stopped (state T).
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            if stat
                .rsplit_once(')')
                .is_some_and(|(_, r)| r.trim_start().starts_with('T'))
            {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Stopped(pid)
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        // SAFETY: as above.
        unsafe { libc::kill(self.0 as i32, libc::SIGCONT) };
    }
}

fn get(d: &Daemon, name: &str) -> Value {
    let (status, v) = d.api("GET", &format!("/v1/sandboxes/{name}"), None);
    assert_eq!(status, 200, "{v}");
    v
}

/// The bound the tests hold operations to: QMP's greeting (5 s) or command (10 s) deadline, or 3 s of a
/// stopped QEMU under an agent call, plus slack for a loaded machine.
const BOUND: Duration = Duration::from_secs(25);

#[test]
fn a_stopped_qemu_fails_each_operation_quickly_and_is_deleted_or_repaired() {
    require_image("tiny");
    let d = Daemon::start();
    d.create(&["--name", "src"]);
    d.kiln_ok(&["snapshot", "create", "src", "--name", "base"]);
    let ops: [(&str, &[&str]); 5] = [
        ("snapshot", &["snapshot", "create", "SB", "--name", "never"]),
        ("stop", &["stop", "SB"]),
        ("pause", &["pause", "SB"]),
        ("exec", &["exec", "SB", "--", "true"]),
        ("fork", &["fork", "SB", "--count", "1", "--name", "kid"]),
    ];
    for (i, (op, args)) in ops.iter().enumerate() {
        let name = format!("c-{op}");
        d.kiln_ok(&["snapshot", "resume", "base", "--name", &name]);
        let pid = get(&d, &name)["pid"].as_u64().expect("pid") as u32;
        let stopped = Stopped::new(pid);
        let args: Vec<&str> = args
            .iter()
            .map(|a| if *a == "SB" { name.as_str() } else { a })
            .collect();
        let t0 = Instant::now();
        let out = d.kiln(&args);
        let took = t0.elapsed();
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        eprintln!(
            "{op} on a stopped QEMU failed after {:.1} s: {}",
            took.as_secs_f64(),
            err.trim()
        );
        assert!(!out.status.success(), "{op} succeeded on a stopped QEMU");
        assert!(err.contains("[sandbox_unresponsive]"), "{op}: {err}");
        assert!(
            err.contains("kiln doctor --repair") && err.contains("delete"),
            "{op}: {err}"
        );
        assert!(took < BOUND, "{op} took {took:?}");

        // Marked, with the reason; the lock is free (get and delete/doctor go through).
        let sb = get(&d, &name);
        assert_eq!(sb["state"], "failed", "{op}: {sb}");
        assert!(
            sb["error"]
                .as_str()
                .unwrap_or("")
                .contains("not responding"),
            "{sb}"
        );
        if i == 0 {
            // doctor --repair ends the stopped QEMU; the sandbox stays (failed) until deleted.
            let report = d.kiln(&["doctor"]);
            let text = String::from_utf8_lossy(&report.stdout).into_owned();
            assert!(
                text.contains("failed_vm_running") || text.contains(&name),
                "{text}"
            );
            d.kiln(&["doctor", "--repair"]);
            assert!(!process_alive(pid), "doctor --repair left QEMU {pid}");
        }
        let t0 = Instant::now();
        d.kiln_ok(&["sandbox", "delete", "-y", &name]);
        let deleted = t0.elapsed();
        eprintln!("{op}: delete took {:.1} s", deleted.as_secs_f64());
        assert!(
            deleted < Duration::from_secs(15),
            "{op}: delete took {deleted:?}"
        );
        assert!(!process_alive(pid), "{op}: QEMU {pid} survived delete");
        drop(stopped);
    }
    // No fork child was left behind, and the source is untouched.
    assert_eq!(d.api("GET", "/v1/sandboxes/kid-1", None).0, 404);
    assert_eq!(get(&d, "src")["state"], "running");
    d.kiln_ok(&["exec", "src", "--", "true"]);
}
