//! Durability you can check: the daemon's file-system calls during snapshot create, fork, stop, start,
//! snapshot delete and sandbox delete are recorded with strace, and their order is checked mechanically:
//! every rename's source was fsynced before it and its target directory after it; every unlink/rmdir of
//! data is followed by an fsync of its directory (or its directory is itself removed, and so on up).
//! Files of QEMU and other programs kiln runs are left out (kiln fsyncs what they wrote before it
//! publishes it, which the rename rule checks).

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{require_image, Daemon};

#[derive(Debug, Clone)]
enum Call {
    Rename { from: PathBuf, to: PathBuf },
    Remove(PathBuf),
    Fsync(PathBuf),
}

/// One recorded call: (pid, line number, call).
type Event = (u32, usize, Call);

/// Splits strace's argument list at top-level commas (paths here hold none).
fn args(inner: &str) -> Vec<String> {
    inner.split(", ").map(str::to_string).collect()
}

/// `"name"` -> name; `5</dir>` -> /dir; `AT_FDCWD</cwd>` -> /cwd.
fn unquote(a: &str) -> Option<String> {
    let a = a.trim();
    if let Some(q) = a.strip_prefix('"') {
        return q.strip_suffix('"').map(str::to_string);
    }
    let (_, rest) = a.split_once('<')?;
    rest.strip_suffix('>').map(str::to_string)
}

fn at(dir: &str, name: &str) -> PathBuf {
    if name.starts_with('/') {
        PathBuf::from(name)
    } else {
        Path::new(dir).join(name)
    }
}

/// Parses an strace -f -y log (with `<unfinished ...>`/`resumed` pairs joined) into successful calls,
/// dropping calls by processes after they exec'd another program.
fn parse(log: &str) -> Vec<Event> {
    let mut pending: HashMap<u32, String> = HashMap::new();
    let mut foreign: std::collections::HashSet<u32> = Default::default();
    let mut out = Vec::new();
    for (n, raw) in log.lines().enumerate() {
        let Some((pid, rest)) = raw.trim_start().split_once(' ') else {
            continue;
        };
        let Ok(pid) = pid.parse::<u32>() else {
            continue;
        };
        let rest = rest.trim_start();
        let line = if let Some(head) = rest.strip_suffix(" <unfinished ...>") {
            pending.insert(pid, head.to_string());
            continue;
        } else if let Some(tail) = rest.strip_prefix("<... ") {
            let Some(head) = pending.remove(&pid) else {
                continue;
            };
            let tail = tail.split_once("resumed>").map_or("", |(_, t)| t);
            format!("{head}{tail}")
        } else {
            rest.to_string()
        };
        let Some((call, after)) = line.split_once('(') else {
            continue;
        };
        // strace pads a short call with spaces to column 40 before " = ".
        let Some((inner, ret)) = after.rsplit_once(" = ") else {
            continue;
        };
        let Some(inner) = inner.trim_end().strip_suffix(')') else {
            continue;
        };
        if !ret.trim_start().starts_with('0') {
            continue; // failed (e.g. ENOENT of a removal of nothing)
        }
        if foreign.contains(&pid) {
            continue;
        }
        let a = args(inner);
        let arg = |i: usize| a.get(i).and_then(|s| unquote(s));
        let c = match call {
            "execve" => {
                foreign.insert(pid);
                continue;
            }
            "rename" => Call::Rename {
                from: PathBuf::from(arg(0).unwrap_or_default()),
                to: PathBuf::from(arg(1).unwrap_or_default()),
            },
            "renameat" | "renameat2" => Call::Rename {
                from: at(&arg(0).unwrap_or_default(), &arg(1).unwrap_or_default()),
                to: at(&arg(2).unwrap_or_default(), &arg(3).unwrap_or_default()),
            },
            "unlink" | "rmdir" => Call::Remove(PathBuf::from(arg(0).unwrap_or_default())),
            "unlinkat" => {
                Call::Remove(at(&arg(0).unwrap_or_default(), &arg(1).unwrap_or_default()))
            }
            "fsync" | "fdatasync" => Call::Fsync(PathBuf::from(arg(0).unwrap_or_default())),
            _ => continue,
        };
        out.push((pid, n, c));
    }
    out
}

/// Paths whose removal or rename publishes or retires nothing: sockets, pid files, the SQLite database's
/// own files (SQLite syncs those itself).
fn exempt(p: &Path) -> bool {
    let name = p
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    name.ends_with(".sock") || name.ends_with(".pid") || name.contains(".db")
}

/// Checks the orderings; returns the violations and counts of what was checked.
fn check(events: &[Event], data: &Path) -> (Vec<String>, usize, usize) {
    let mut bad = Vec::new();
    let (mut renames, mut removals) = (0, 0);
    let synced_between = |path: &Path, from: usize, to: usize| {
        events[from..to]
            .iter()
            .any(|(_, _, c)| matches!(c, Call::Fsync(p) if p == path))
    };
    for (i, (pid, line, call)) in events.iter().enumerate() {
        match call {
            Call::Rename { from, to } if to.starts_with(data) && !exempt(to) => {
                renames += 1;
                let retire = to
                    .file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with(".trash-"));
                if !retire && !synced_between(from, 0, i) {
                    bad.push(format!(
                        "line {line} (pid {pid}): rename {} -> {} without an fsync of the source before it",
                        from.display(),
                        to.display()
                    ));
                }
                let dir = to.parent().unwrap_or(Path::new("/"));
                if !synced_between(dir, i + 1, events.len()) {
                    bad.push(format!(
                        "line {line} (pid {pid}): rename {} -> {} without an fsync of {} after it",
                        from.display(),
                        to.display(),
                        dir.display()
                    ));
                }
            }
            Call::Remove(p) if p.starts_with(data) && !exempt(p) => {
                removals += 1;
                // Durable once the parent is synced, or the parent itself goes (checked in turn).
                let dir = p.parent().unwrap_or(Path::new("/"));
                let parent_removed = events[i + 1..]
                    .iter()
                    .any(|(_, _, c)| matches!(c, Call::Remove(q) if q == dir));
                if !parent_removed && !synced_between(dir, i + 1, events.len()) {
                    bad.push(format!(
                        "line {line} (pid {pid}): removal of {} without an fsync of {} after it",
                        p.display(),
                        dir.display()
                    ));
                }
            }
            _ => {}
        }
    }
    (bad, renames, removals)
}

struct Strace {
    child: std::process::Child,
    log: PathBuf,
}

impl Strace {
    fn attach(pid: u32, log: &Path) -> Strace {
        let child = Command::new("strace")
            .args(["-f", "-qq", "-y", "-o"])
            .arg(log)
            .args([
                "-e",
                "trace=execve,rename,renameat,renameat2,unlink,unlinkat,rmdir,fsync,fdatasync",
                "-p",
                &pid.to_string(),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("strace (scripts/install-deps.sh installs it)");
        // strace is attached once it has written the log file; give it a moment for every thread.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !log.exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(500));
        Strace {
            child,
            log: log.to_path_buf(),
        }
    }

    /// Detaches (SIGINT) and returns the log.
    fn finish(mut self) -> String {
        // SAFETY: kill(2) on the strace this test started.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let _ = self.child.wait();
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Strace {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn renames_and_removals_are_fsynced_in_order() {
    require_image("tiny");
    let d = Daemon::start();
    d.create(&["--name", "src"]);
    let data = d.data_dir().canonicalize().expect("data dir");
    let log = data.join("strace.log");
    let started = Instant::now();
    let trace = Strace::attach(d.pid().expect("daemon pid"), &log);

    d.kiln_ok(&["snapshot", "create", "src", "--name", "s1"]);
    d.kiln_ok(&["fork", "src", "--count", "1", "--name", "kid"]);
    d.kiln_ok(&["stop", "src"]);
    d.kiln_ok(&["start", "src"]);
    d.kiln_ok(&["snapshot", "delete", "-y", "s1"]);
    d.kiln_ok(&["sandbox", "delete", "-y", "kid-1"]);
    d.kiln_ok(&["sandbox", "delete", "-y", "src"]);

    let text = trace.finish();
    let events = parse(&text);
    let (bad, renames, removals) = check(&events, &data);
    let fsyncs = events
        .iter()
        .filter(|(_, _, c)| matches!(c, Call::Fsync(_)))
        .count();
    eprintln!(
        "recorded {} calls in {:.1} s: {renames} renames and {removals} removals checked, {fsyncs} fsyncs",
        events.len(),
        started.elapsed().as_secs_f64()
    );
    assert!(
        renames >= 3 && removals >= 3,
        "too little was recorded (is strace attached?):\n{}",
        common::tail(&text, 40)
    );
    assert!(
        bad.is_empty(),
        "{} ordering violations:\n{}",
        bad.len(),
        bad.join("\n")
    );
}

#[test]
fn the_checker_flags_a_rename_without_fsyncs() {
    let log = "\
10 fsync(3</d/a.tmp>) = 0
10 rename(\"/d/a.tmp\", \"/d/a\") = 0
10 fsync(4</d>) = 0
10 rename(\"/d/b.tmp\", \"/d/b\") = 0
10 unlinkat(5</d/x>, \"f\", 0) = 0
10 unlinkat(AT_FDCWD</>, \"/d/x\", AT_REMOVEDIR) = 0
10 unlink(\"/d/gone\" <unfinished ...>
11 execve(\"/usr/bin/qemu-img\", [\"qemu-img\"], 0x0 /* 1 var */) = 0
11 unlink(\"/d/qemu-own\") = 0
10 <... unlink resumed>) = 0
10 unlink(\"/d/missing\") = -1 ENOENT (No such file or directory)
";
    let (bad, renames, removals) = check(&parse(log), Path::new("/d"));
    assert_eq!((renames, removals), (2, 3), "{bad:?}");
    // b: no source fsync and no directory fsync after; /d/x and /d/gone: no fsync of /d after.
    assert_eq!(bad.len(), 4, "{bad:#?}");
    assert!(bad
        .iter()
        .any(|b| b.contains("/d/b.tmp") && b.contains("source")));
    assert!(bad.iter().any(|b| b.contains("removal of /d/x ")));
    assert!(bad.iter().any(|b| b.contains("removal of /d/gone")));
    assert!(!bad.iter().any(|b| b.contains("/d/x/f")));
}

#[test]
fn the_checker_reads_the_short_lines_strace_pads() {
    // A short data directory (/var/lib/kiln/ram) makes strace pad the fsync line to column 40.
    let log = "10 unlink(\"/d/r/a.ram\") = 0\n10 fsync(3</d/r>)                       = 0\n";
    let (bad, _, removals) = check(&parse(log), Path::new("/d"));
    assert_eq!(removals, 1);
    assert!(bad.is_empty(), "{bad:?}");
}
