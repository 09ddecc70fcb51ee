//! Exec: runs a process in its own process group and streams its output as it is produced.

use std::fs;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use kiln_proto::{ErrorCode, Event, ExecRequest, ExitStatus, FrameKind, Response, ACK_EVERY};

use crate::conn::{Inbound, Stream};
use crate::failure::{Failure, Result};
use crate::util::lock;

const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// Descendants left behind by an exited process may hold its pipes open: their output is still
/// forwarded while it keeps coming, but after this much silence Exit is sent.
const DRAIN_GRACE: Duration = Duration::from_millis(300);
const PIPE_CHUNK: usize = 64 * 1024;

pub fn run(
    stream: &Arc<Stream>,
    tx: Sender<Inbound>,
    rx: Receiver<Inbound>,
    req: ExecRequest,
) -> Result<Response> {
    let mut cmd = command(&req)?;
    let started = Instant::now();
    let mut child = cmd.spawn().map_err(|e| spawn_failure(&e, &req))?;
    let pid = child.id();
    // The child leads its own process group, so its pid is also the group id.
    let pgid = i32::try_from(pid).map_err(|_| Failure::new(ErrorCode::Io, "pid out of range"))?;
    stream.shared().add_group(pgid);
    stream.event(&Event::Started { pid });

    let activity = Arc::new(Activity::default());
    let helpers = start_helpers(stream, &mut child, pgid, &activity, tx);
    let (stdin, open_outputs) = match helpers {
        Ok(h) => h,
        Err(e) => {
            kill_group(pgid);
            stream.shared().remove_group(pgid);
            let _ = child.wait();
            return Err(Failure::new(
                ErrorCode::Busy,
                format!("cannot start exec threads: {e}"),
            ));
        }
    };
    // A deadline too far away to represent is no deadline.
    let deadline = req
        .timeout_ms
        .and_then(|ms| started.checked_add(Duration::from_millis(ms)));
    let ended = supervise(&rx, pgid, deadline, stdin, open_outputs, &activity);

    // The leader stays a zombie until here, so `pgid` could not be reused while we signalled it.
    stream.shared().remove_group(pgid);
    let status = child
        .wait()
        .map_err(|e| Failure::io(&e, "cannot collect the exit status"))?;
    let duration = ended.exited_at.unwrap_or_else(Instant::now) - started;
    Ok(Response::Exit(ExitStatus {
        code: status.code(),
        signal: status.signal(),
        timed_out: ended.timed_out,
        duration_ms: u64::try_from(duration.as_millis()).unwrap_or(u64::MAX),
    }))
}

struct Ended {
    exited_at: Option<Instant>,
    timed_out: bool,
}

/// Feeds stdin, applies Cancel and the timeout, and waits until the process has exited and its
/// output is drained.
fn supervise(
    rx: &Receiver<Inbound>,
    pgid: i32,
    deadline: Option<Instant>,
    mut stdin: Option<Sender<Vec<u8>>>,
    mut open_outputs: usize,
    activity: &Activity,
) -> Ended {
    let mut ended = Ended {
        exited_at: None,
        timed_out: false,
    };
    loop {
        let now = Instant::now();
        let wake = match ended.exited_at {
            Some(_) if open_outputs == 0 => break,
            Some(exited) => {
                if activity.busy() {
                    Some(now + DRAIN_GRACE)
                } else {
                    let quiet_since = activity.last().map_or(exited, |t| t.max(exited));
                    if now >= quiet_since + DRAIN_GRACE {
                        break;
                    }
                    Some(quiet_since + DRAIN_GRACE)
                }
            }
            None => match deadline {
                Some(d) if !ended.timed_out && now >= d => {
                    ended.timed_out = true;
                    kill_group(pgid);
                    continue;
                }
                Some(d) if !ended.timed_out => Some(d),
                _ => None,
            },
        };
        let msg = match wake {
            Some(at) => match rx.recv_timeout(at.saturating_duration_since(now)) {
                Ok(msg) => msg,
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => break,
            },
            None => match rx.recv() {
                Ok(msg) => msg,
                Err(_) => break,
            },
        };
        match msg {
            Inbound::Stdin(data) => {
                if let Some(w) = &stdin {
                    let _ = w.send(data);
                }
            }
            // Nobody can feed a detached exec any more, so it gets EOF.
            Inbound::StdinClose | Inbound::Detached => stdin = None,
            Inbound::Cancel => kill_group(pgid),
            Inbound::ChildExited => ended.exited_at = Some(Instant::now()),
            Inbound::OutputClosed => open_outputs = open_outputs.saturating_sub(1),
            Inbound::Data(_) | Inbound::DataEnd(_) => {}
        }
    }
    ended
}

/// Starts the output pumps, the stdin writer and the exit watcher; returns the stdin feed and
/// the number of pumps.
fn start_helpers(
    stream: &Arc<Stream>,
    child: &mut Child,
    pgid: i32,
    activity: &Arc<Activity>,
    tx: Sender<Inbound>,
) -> io::Result<(Option<Sender<Vec<u8>>>, usize)> {
    let mut pumps = 0;
    // Duplicates of the pipes' read ends, so the supervisor can see output not yet read.
    let dups = [
        child
            .stdout
            .as_ref()
            .map(|p| p.as_fd().try_clone_to_owned()),
        child
            .stderr
            .as_ref()
            .map(|p| p.as_fd().try_clone_to_owned()),
    ];
    lock(&activity.pipes).extend(dups.into_iter().flatten().flatten());
    let outputs: [(Option<Box<dyn Read + Send>>, FrameKind); 2] = [
        (
            child.stdout.take().map(|p| Box::new(p) as _),
            FrameKind::Stdout,
        ),
        (
            child.stderr.take().map(|p| Box::new(p) as _),
            FrameKind::Stderr,
        ),
    ];
    for (pipe, kind) in outputs {
        let Some(pipe) = pipe else { continue };
        let (stream, activity, tx) = (Arc::clone(stream), Arc::clone(activity), tx.clone());
        thread::Builder::new()
            .name(format!("pump-{pgid}"))
            .spawn(move || pump(&stream, pipe, kind, &activity, &tx))?;
        pumps += 1;
    }
    let stdin = match child.stdin.take() {
        Some(pipe) => Some(stdin_writer(pipe, Arc::clone(stream), pgid)?),
        None => None,
    };
    let pid = child.id();
    thread::Builder::new()
        .name(format!("wait-{pgid}"))
        .spawn(move || {
            wait_exited(pid);
            let _ = tx.send(Inbound::ChildExited);
        })?;
    Ok((stdin, pumps))
}

/// What the output pumps are doing, for deciding when output is drained.
#[derive(Default)]
struct Activity {
    /// When a chunk was last forwarded.
    last: Mutex<Option<Instant>>,
    /// Chunks read but not yet forwarded.
    sending: AtomicUsize,
    /// The output pipes (duplicated read ends).
    pipes: Mutex<Vec<OwnedFd>>,
}

impl Activity {
    /// Output is on its way: a chunk is being forwarded, or a pipe holds bytes its pump has not read yet
    /// (on a loaded machine the pump may not run for a while after the process exits; without this check
    /// the drain grace could expire first and Exit would go out without the output).
    fn busy(&self) -> bool {
        self.sending.load(Ordering::SeqCst) > 0 || self.unread()
    }

    fn unread(&self) -> bool {
        lock(&self.pipes).iter().any(|fd| {
            let mut n: libc::c_int = 0;
            // SAFETY: FIONREAD stores one c_int into `n`; `fd` is an open descriptor owned here.
            let r = unsafe { libc::ioctl(fd.as_raw_fd(), libc::FIONREAD, &mut n) };
            r == 0 && n > 0
        })
    }

    fn last(&self) -> Option<Instant> {
        *lock(&self.last)
    }
}

fn pump(
    stream: &Stream,
    mut pipe: impl Read,
    kind: FrameKind,
    activity: &Activity,
    tx: &Sender<Inbound>,
) {
    let mut buf = vec![0u8; PIPE_CHUNK];
    loop {
        match pipe.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                activity.sending.fetch_add(1, Ordering::SeqCst);
                stream.send(kind, &buf[..n]);
                *lock(&activity.last) = Some(Instant::now());
                activity.sending.fetch_sub(1, Ordering::SeqCst);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    let _ = tx.send(Inbound::OutputClosed);
}

/// A thread that writes to the child's stdin, so a child that does not read cannot block the
/// supervisor; dropping the returned sender closes stdin. Acknowledging what the child took
/// keeps the host's window moving while bounding what is buffered here.
fn stdin_writer(
    mut pipe: ChildStdin,
    stream: Arc<Stream>,
    pgid: i32,
) -> io::Result<Sender<Vec<u8>>> {
    let (tx, rx) = mpsc::channel::<Vec<u8>>();
    thread::Builder::new()
        .name(format!("stdin-{pgid}"))
        .spawn(move || {
            let (mut total, mut acked) = (0u64, 0u64);
            for data in rx {
                if pipe.write_all(&data).is_err() {
                    break;
                }
                total += data.len() as u64;
                if total - acked >= ACK_EVERY {
                    stream.ack(total);
                    acked = total;
                }
            }
        })?;
    Ok(tx)
}

/// Blocks until `pid` has exited, without reaping it: the zombie keeps its pid and process
/// group id reserved until `Child::wait`, which makes signalling the group race-free.
pub(crate) fn wait_exited(pid: u32) {
    loop {
        // SAFETY: zeroed siginfo_t is a valid out-parameter for waitid.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: `info` outlives the call; only our own child `pid` is waited for.
        let rc =
            unsafe { libc::waitid(libc::P_PID, pid, &mut info, libc::WEXITED | libc::WNOWAIT) };
        if rc == 0 || io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            return;
        }
    }
}

pub(crate) fn kill_group(pgid: i32) {
    // SAFETY: plain syscall; `pgid` is the group of a child that has not been reaped yet.
    unsafe { libc::kill(-pgid, libc::SIGKILL) };
}

pub(crate) fn command(req: &ExecRequest) -> Result<Command> {
    let mut cmd = match (&req.argv, &req.shell) {
        (Some(argv), None) => {
            let (prog, args) = argv
                .split_first()
                .filter(|(prog, _)| !prog.is_empty())
                .ok_or_else(|| Failure::invalid("argv must start with a program name"))?;
            let mut cmd = Command::new(prog);
            cmd.args(args);
            cmd
        }
        (None, Some(line)) => {
            let mut cmd = Command::new("/bin/sh");
            cmd.arg("-c").arg(line);
            cmd
        }
        _ => return Err(Failure::invalid("give exactly one of argv or shell")),
    };
    cmd.env_clear()
        .env("PATH", DEFAULT_PATH)
        .env("HOME", "/root");
    if let Some(user) = &req.user {
        let account = lookup_user(user)?;
        cmd.uid(account.uid)
            .gid(account.gid)
            .env("HOME", &account.home)
            .env("USER", &account.name)
            .env("LOGNAME", &account.name);
    }
    for (key, value) in &req.env {
        if key.is_empty() || key.contains(['=', '\0']) || value.contains('\0') {
            return Err(Failure::invalid(format!(
                "invalid environment variable {key:?}"
            )));
        }
        cmd.env(key, value);
    }
    let cwd = req.cwd.as_deref().unwrap_or("/");
    match fs::metadata(cwd) {
        Ok(meta) if meta.is_dir() => {}
        Ok(_) => {
            return Err(Failure::new(
                ErrorCode::NotADirectory,
                format!("working directory {cwd} is not a directory"),
            ))
        }
        Err(e) => return Err(Failure::io(&e, format!("working directory {cwd}"))),
    }
    cmd.current_dir(cwd)
        .stdin(if req.stdin {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    Ok(cmd)
}

struct Account {
    name: String,
    uid: u32,
    gid: u32,
    home: String,
}

/// Finds `user` in /etc/passwd: a name or a numeric uid, optionally `:group` (a name from /etc/group
/// or a numeric gid), as an OCI image's `User` is written. Without a group the user's own from
/// /etc/passwd applies; a numeric uid with no entry runs with gid = uid and `/` as home, as `su`-less
/// images need. A name that is not listed is an error, never a silent root.
fn lookup_user(user: &str) -> Result<Account> {
    let (user, group) = match user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (user, None),
    };
    let mut account = lookup_passwd(user)?;
    if let Some(group) = group {
        account.gid = lookup_group(group)?;
    }
    Ok(account)
}

fn lookup_passwd(user: &str) -> Result<Account> {
    let passwd = fs::read_to_string("/etc/passwd").unwrap_or_default();
    let numeric = user.parse::<u32>().ok();
    for line in passwd.lines() {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() < 7 {
            continue;
        }
        let (Ok(uid), Ok(gid)) = (f[2].parse::<u32>(), f[3].parse::<u32>()) else {
            continue;
        };
        if f[0] == user || numeric == Some(uid) {
            return Ok(Account {
                name: f[0].to_string(),
                uid,
                gid,
                home: if f[5].is_empty() { "/" } else { f[5] }.to_string(),
            });
        }
    }
    match numeric {
        Some(uid) => Ok(Account {
            name: user.to_string(),
            uid,
            gid: uid,
            home: "/".into(),
        }),
        None => Err(Failure::new(
            ErrorCode::InvalidArgument,
            format!("no user {user:?} in the guest's /etc/passwd (give a name it lists, or a numeric uid)"),
        )),
    }
}

/// A group name from /etc/group, or a numeric gid (listed or not).
fn lookup_group(group: &str) -> Result<u32> {
    if let Ok(gid) = group.parse::<u32>() {
        return Ok(gid);
    }
    let groups = fs::read_to_string("/etc/group").unwrap_or_default();
    for line in groups.lines() {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() >= 3 && f[0] == group {
            if let Ok(gid) = f[2].parse::<u32>() {
                return Ok(gid);
            }
        }
    }
    Err(Failure::new(
        ErrorCode::InvalidArgument,
        format!(
            "no group {group:?} in the guest's /etc/group (give a name it lists, or a numeric gid)"
        ),
    ))
}

fn spawn_failure(err: &io::Error, req: &ExecRequest) -> Failure {
    let prog = match (&req.argv, &req.shell) {
        (Some(argv), _) => argv.first().map_or("", String::as_str),
        _ => "/bin/sh",
    };
    let mut f = Failure::io(err, format!("cannot execute {prog}"));
    // Bad input (a NUL in an argument) stays invalid_argument; anything else is exec_failed.
    if f.code != ErrorCode::InvalidArgument {
        f.code = ErrorCode::ExecFailed;
    }
    f
}
