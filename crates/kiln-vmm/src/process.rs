//! Finding, checking and stopping QEMU processes by pid, safely against pid reuse.

use std::time::Duration;

/// True when `pid` is alive and its command line carries `name` (so a recycled pid is not mistaken for
/// our QEMU).
pub fn is_our_qemu(pid: u32, name: &str) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    if is_zombie(pid) {
        return false;
    }
    cmdline
        .split(|b| *b == 0)
        .any(|arg| arg.starts_with(format!("{name},").as_bytes()) || arg == name.as_bytes())
}

/// Live processes started with `-name NAME,...` where NAME begins with `prefix` and some argument mentions
/// `path` (so VMs of other kiln data directories on the same host are left alone): (pid, NAME).
pub fn find_named(prefix: &str, path: &str) -> Vec<(u32, String)> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmdline
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let name = args
            .windows(2)
            .find(|w| w[0] == "-name")
            .map(|w| w[1].split(',').next().unwrap_or("").to_string());
        if let Some(name) = name.filter(|n| n.starts_with(prefix)) {
            if args.iter().any(|a| a.contains(path)) && !is_zombie(pid) {
                found.push((pid, name));
            }
        }
    }
    found
}

fn is_zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(true)
}

/// Sends SIGTERM, waits up to `grace`, then SIGKILL; returns once the process has exited (gone or a
/// zombie), so its memory is released.
pub async fn terminate(pid: u32, name: &str, grace: Duration) {
    if !is_our_qemu(pid, name) {
        return;
    }
    signal(pid, libc::SIGTERM);
    // A stopped QEMU (SIGSTOP) would hold SIGTERM pending until the grace ran out.
    signal(pid, libc::SIGCONT);
    let deadline = tokio::time::Instant::now() + grace;
    let mut killed = false;
    // Identity was checked above; from here on only "has it exited" matters (a reused pid within this
    // short window is not a practical concern).
    while is_running(pid) {
        if !killed && tokio::time::Instant::now() >= deadline {
            signal(pid, libc::SIGKILL);
            killed = true;
        }
        if tokio::time::Instant::now() >= deadline + Duration::from_secs(10) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// True while `pid` exists and has not exited (zombies count as exited).
pub fn is_running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, rest)| !matches!(rest.trim_start().chars().next(), Some('Z' | 'X')))
        })
        .unwrap_or(false)
}

pub fn signal(pid: u32, sig: i32) {
    let Ok(pid) = i32::try_from(pid) else { return };
    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe {
        libc::kill(pid, sig);
    }
}

/// Resident and proportional set size of a process in bytes, from /proc/PID/smaps_rollup.
pub fn memory_usage(pid: u32) -> Option<(u64, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    let field = |name: &str| -> Option<u64> {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .map(|kib| kib * 1024)
    };
    Some((field("Rss:")?, field("Pss:")?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process_is_not_mistaken_for_a_vm() {
        assert!(!is_our_qemu(std::process::id(), "kiln-nonexistent"));
        assert!(!is_our_qemu(u32::MAX - 1, "kiln-x"));
    }

    #[test]
    fn reads_memory_of_self() {
        let (rss, pss) = memory_usage(std::process::id()).expect("smaps_rollup");
        assert!(rss > 0 && pss > 0);
    }
}
