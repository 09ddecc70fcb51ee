//! What an idle sandbox costs the host (issue 15 item 5). Under TCG the firmware leaves the PIT
//! toggling; a guest told its TSC frequency never uses it, yet each toggle woke QEMU's main loop (~36
//! times a second, most of an idle VM's host wakeups). New machines have no PIT, and everything made
//! from them (snapshots, resumed copies, hibernation) keeps the machine it was booted with. The guest
//! boots with proactive compaction off and VM statistics folded every 10 s (kernel sysctls).

mod common;

use std::time::{Duration, Instant};

use common::{read_manifest, require_image, write_manifest, Daemon};

/// The `-M` options of a running QEMU.
fn machine_of(pid: u32) -> String {
    let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).expect("QEMU cmdline");
    let args: Vec<String> = cmd
        .split(|b| *b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    let i = args
        .iter()
        .position(|a| a == "-M")
        .expect("-M on the command line");
    args[i + 1].clone()
}

/// Times QEMU's main thread (the one running its timers and event loop) went to sleep and was woken.
fn main_thread_switches(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/status"))
        .expect("main thread status");
    status
        .lines()
        .filter(|l| l.contains("ctxt_switches:"))
        .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .sum()
}

fn pid_of(d: &Daemon, name: &str) -> u32 {
    let (status, sb) = d.api("GET", &format!("/v1/sandboxes/{name}"), None);
    assert_eq!(status, 200, "{sb}");
    sb["pid"].as_u64().expect("a running sandbox has a pid") as u32
}

#[test]
fn idle_machine_has_no_pit_wakes_its_main_loop_rarely_and_keeps_its_machine() {
    require_image("tiny");
    // No warm spares: a resume below must start from the (edited) manifest, not a spare made before.
    let d = Daemon::start_with(&["--warm-spares", "0"]);
    d.create(&["--name", "idle", "--memory", "256"]);
    d.kiln_ok(&["exec", "idle", "--", "true"]);
    let pid = pid_of(&d, "idle");
    let machine = machine_of(pid);
    assert!(machine.contains("pit=off"), "{machine}");
    // The guest's own periodic work is turned down too (kcompactd, VM statistics).
    let vm = d.kiln_ok(&[
        "exec",
        "idle",
        "--",
        "cat",
        "/proc/sys/vm/compaction_proactiveness",
        "/proc/sys/vm/stat_interval",
    ]);
    assert_eq!(
        vm.split_whitespace().collect::<Vec<_>>(),
        ["0", "10"],
        "{vm}"
    );

    // Idle: let the boot's late work (module loading, first writeback) pass, then count.
    std::thread::sleep(Duration::from_secs(5));
    let (before, t0) = (main_thread_switches(pid), Instant::now());
    std::thread::sleep(Duration::from_secs(20));
    let per_s = (main_thread_switches(pid) - before) as f64 / t0.elapsed().as_secs_f64();
    eprintln!("idle QEMU main thread: {per_s:.1} wakeups/s ({machine})");
    // With the PIT: 54-70 per second here; without: ~25, ~20 with the sysctls (what is left are the
    // guest's own timer ticks, each a timer update from the vCPU and an expiry in the main loop).
    assert!(per_s < 40.0, "{per_s:.1} wakeups/s");

    // Everything made from the machine runs the same machine, and answers.
    d.kiln_ok(&["snapshot", "create", "idle", "--name", "s"]);
    d.kiln_ok(&["snapshot", "resume", "s", "--name", "copy"]);
    d.kiln_ok(&["exec", "copy", "--", "true"]);
    assert_eq!(machine_of(pid_of(&d, "copy")), machine);
    d.kiln_ok(&["stop", "idle"]);
    d.kiln_ok(&["start", "idle"]);
    d.kiln_ok(&["exec", "idle", "--", "true"]);
    assert_eq!(machine_of(pid_of(&d, "idle")), machine);

    // A snapshot records its machine; one recording the machine older kilns built (with the PIT, as
    // snapshots of them do) restores into that machine, not into today's.
    let path = d.data_dir().join("snapshots/s/manifest.json");
    let (_, mut m) = read_manifest(&path);
    assert_eq!(m["machine_options"], machine.as_str());
    let old = machine.replace("pit=off", "pit=on");
    m["machine_options"] = old.clone().into();
    write_manifest(&path, &m);
    d.kiln_ok(&["snapshot", "resume", "s", "--name", "old"]);
    d.kiln_ok(&["exec", "old", "--", "true"]);
    assert_eq!(machine_of(pid_of(&d, "old")), old);
}
