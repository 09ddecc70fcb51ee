//! Background processes: a table that lives as long as the agent, not as long as a host
//! connection, so a snapshot (and every copy resumed from it) carries the processes, their
//! retained output and their stdin. Output goes into a bounded ring per process, never straight
//! to the host: a process never waits for a reader, and a reader that attaches later replays it.

use std::collections::{BTreeMap, VecDeque};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::process::ExitStatusExt;
use std::process::{Child, ChildStdin};
use std::sync::mpsc::{Receiver, TryRecvError};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use kiln_proto::{
    ErrorCode, Event, ExecRequest, ExitStatus, FrameKind, ProcInfo, ProcState, Response,
};

use crate::conn::{Inbound, Stream};
use crate::exec::{command, kill_group, wait_exited};
use crate::failure::{Failure, Result};
use crate::util::{decode_hex, lock};

/// Output kept per process (stdout and stderr together); older output is dropped and counted.
pub const RING_BYTES: usize = 1 << 20;
/// Running background processes at most.
const MAX_RUNNING: usize = 256;
/// Finished processes kept for `list`/`logs`/`wait`; the oldest go first.
const MAX_FINISHED: usize = 64;
/// As in exec: output of an exited process's leftover descendants is waited for this long.
const DRAIN_GRACE: Duration = Duration::from_millis(300);
/// How long a stdin write may wait for a process that does not read.
const STDIN_WAIT: Duration = Duration::from_secs(10);
/// How often a following reader checks for Cancel or a new host session.
const ATTACH_POLL: Duration = Duration::from_millis(200);
const PIPE_CHUNK: usize = 64 * 1024;

struct Chunk {
    /// Offset of its first byte in the process's output.
    at: u64,
    kind: FrameKind,
    data: Vec<u8>,
}

#[derive(Default)]
struct State {
    ring: VecDeque<Chunk>,
    ring_bytes: usize,
    total: u64,
    dropped: u64,
    open_outputs: usize,
    last_output: Option<Instant>,
    exit: Option<ExitStatus>,
    timed_out: bool,
    /// Order in which processes ended, for pruning.
    ended_seq: u64,
}

struct Proc {
    pid: u32,
    argv: Vec<String>,
    user: Option<String>,
    started_uptime_ms: u64,
    state: Mutex<State>,
    changed: Condvar,
    /// Separate from `state`: a write may wait for the process to read.
    stdin: Mutex<Option<ChildStdin>>,
}

static TABLE: Mutex<BTreeMap<u32, Arc<Proc>>> = Mutex::new(BTreeMap::new());
static ENDED: Mutex<u64> = Mutex::new(0);

impl Proc {
    fn info(&self, st: &State) -> ProcInfo {
        ProcInfo {
            pid: self.pid,
            argv: self.argv.clone(),
            user: self.user.clone(),
            state: if st.exit.is_some() {
                ProcState::Exited
            } else {
                ProcState::Running
            },
            exit: st.exit,
            output_bytes: st.total,
            dropped_bytes: st.dropped,
            started_uptime_ms: self.started_uptime_ms,
        }
    }

    fn push(&self, kind: FrameKind, data: &[u8]) {
        let mut st = lock(&self.state);
        let at = st.total;
        st.total += data.len() as u64;
        st.ring_bytes += data.len();
        st.ring.push_back(Chunk {
            at,
            kind,
            data: data.to_vec(),
        });
        while st.ring_bytes > RING_BYTES {
            let Some(old) = st.ring.pop_front() else {
                break;
            };
            st.ring_bytes -= old.data.len();
            st.dropped += old.data.len() as u64;
        }
        st.last_output = Some(Instant::now());
        self.changed.notify_all();
    }
}

fn find(pid: u32) -> Result<Arc<Proc>> {
    lock(&TABLE).get(&pid).cloned().ok_or_else(|| {
        Failure::new(
            ErrorCode::NotFound,
            format!("no background process {pid} (list the processes to see which exist)"),
        )
    })
}

/// Starts `req` in the background and returns its entry.
pub fn start(req: &ExecRequest) -> Result<Response> {
    let mut cmd = command(req)?;
    {
        let table = lock(&TABLE);
        let running = table
            .values()
            .filter(|p| lock(&p.state).exit.is_none())
            .count();
        if running >= MAX_RUNNING {
            return Err(Failure::new(
                ErrorCode::Busy,
                format!("{MAX_RUNNING} background processes are already running; stop some first"),
            ));
        }
    }
    let mut child = cmd.spawn().map_err(|e| {
        Failure::new(
            ErrorCode::ExecFailed,
            format!("cannot start the process: {e}"),
        )
    })?;
    let pid = child.id();
    let argv = match (&req.argv, &req.shell) {
        (Some(argv), _) => argv.clone(),
        (None, Some(line)) => vec!["/bin/sh".into(), "-c".into(), line.clone()],
        _ => Vec::new(),
    };
    let stdin = child.stdin.take();
    if let Some(pipe) = &stdin {
        // Writes wait with a deadline instead of blocking on a process that does not read.
        // SAFETY: fcntl on a pipe we own.
        unsafe {
            let fd = pipe.as_raw_fd();
            let flags = libc::fcntl(fd, libc::F_GETFL);
            libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK);
        }
    }
    let proc = Arc::new(Proc {
        pid,
        argv,
        user: req.user.clone(),
        started_uptime_ms: crate::system::uptime_ms(),
        state: Mutex::new(State::default()),
        changed: Condvar::new(),
        stdin: Mutex::new(stdin),
    });
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
    let started = Instant::now();
    for (pipe, kind) in outputs {
        let Some(pipe) = pipe else { continue };
        lock(&proc.state).open_outputs += 1;
        let p = Arc::clone(&proc);
        let spawned = thread::Builder::new()
            .name(format!("bg-out-{pid}"))
            .spawn(move || pump(&p, pipe, kind));
        if spawned.is_err() {
            lock(&proc.state).open_outputs -= 1;
        }
    }
    let p = Arc::clone(&proc);
    let timeout = req.timeout_ms.map(Duration::from_millis);
    let supervised = thread::Builder::new()
        .name(format!("bg-wait-{pid}"))
        .spawn(move || supervise(&p, child, started, timeout));
    if let Err(e) = supervised {
        kill_group(pid as i32);
        return Err(Failure::new(
            ErrorCode::Busy,
            format!("cannot start a thread: {e}"),
        ));
    }
    let info = proc.info(&lock(&proc.state));
    let mut table = lock(&TABLE);
    prune(&mut table);
    // A finished entry whose pid the kernel handed out again is replaced.
    table.insert(pid, proc);
    Ok(Response::Proc(info))
}

fn prune(table: &mut BTreeMap<u32, Arc<Proc>>) {
    let mut finished: Vec<(u64, u32)> = table
        .values()
        .filter_map(|p| {
            let st = lock(&p.state);
            st.exit.map(|_| (st.ended_seq, p.pid))
        })
        .collect();
    if finished.len() >= MAX_FINISHED {
        finished.sort_unstable();
        for (_, pid) in &finished[..=finished.len() - MAX_FINISHED] {
            table.remove(pid);
        }
    }
}

fn pump(proc: &Proc, mut pipe: impl Read, kind: FrameKind) {
    let mut buf = vec![0u8; PIPE_CHUNK];
    loop {
        match pipe.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => proc.push(kind, &buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    let mut st = lock(&proc.state);
    st.open_outputs = st.open_outputs.saturating_sub(1);
    proc.changed.notify_all();
}

/// Waits for the process to exit (applying its timeout), lets its output drain, then reaps it
/// under the state lock: until then the zombie keeps the process group id, so signals sent
/// while the entry says `running` cannot reach a reused group.
fn supervise(proc: &Proc, mut child: Child, started: Instant, timeout: Option<Duration>) {
    let pgid = proc.pid as i32;
    if let Some(limit) = timeout {
        let pid = proc.pid;
        let _ = thread::Builder::new()
            .name(format!("bg-timeout-{pid}"))
            .spawn(move || {
                thread::sleep(limit);
                if let Ok(p) = find(pid) {
                    let mut st = lock(&p.state);
                    if st.exit.is_none() && st.ended_seq == 0 {
                        st.timed_out = true;
                        kill_group(pgid);
                    }
                }
            });
    }
    wait_exited(proc.pid);
    let exited_at = Instant::now();
    let mut st = lock(&proc.state);
    while st.open_outputs > 0 {
        let quiet_since = st.last_output.map_or(exited_at, |t| t.max(exited_at));
        let Some(left) = (quiet_since + DRAIN_GRACE).checked_duration_since(Instant::now()) else {
            break;
        };
        st = proc
            .changed
            .wait_timeout(st, left)
            .map(|(g, _)| g)
            .unwrap_or_else(|e| e.into_inner().0);
    }
    let status = child.wait();
    let (code, signal) = match status {
        Ok(s) => (s.code(), s.signal()),
        Err(_) => (None, None),
    };
    st.exit = Some(ExitStatus {
        code,
        signal,
        timed_out: st.timed_out,
        duration_ms: u64::try_from((exited_at - started).as_millis()).unwrap_or(u64::MAX),
    });
    st.ended_seq = {
        let mut n = lock(&ENDED);
        *n += 1;
        *n
    };
    proc.changed.notify_all();
    drop(st);
    *lock(&proc.stdin) = None;
}

pub fn list() -> Response {
    let procs = lock(&TABLE)
        .values()
        .map(|p| p.info(&lock(&p.state)))
        .collect();
    Response::Procs { procs }
}

pub fn signal(pid: u32, signal: i32) -> Result<Response> {
    if !(1..=64).contains(&signal) {
        return Err(Failure::invalid(format!("signal {signal} is not 1-64")));
    }
    let proc = find(pid)?;
    let st = lock(&proc.state);
    // Once exited (and reaped) the group id may belong to someone else: nothing to signal.
    if st.exit.is_none() {
        // SAFETY: plain syscall; the leader is not reaped while we hold the state lock.
        unsafe { libc::kill(-(pid as i32), signal) };
    }
    Ok(Response::Ok)
}

pub fn wait(pid: u32, timeout_ms: u64) -> Result<Response> {
    let proc = find(pid)?;
    let deadline = Instant::now().checked_add(Duration::from_millis(timeout_ms));
    let mut st = lock(&proc.state);
    while st.exit.is_none() {
        let left = match deadline {
            Some(d) => match d.checked_duration_since(Instant::now()) {
                Some(left) if !left.is_zero() => left,
                _ => break,
            },
            None => Duration::from_secs(3600),
        };
        st = wait_on(&proc, st, left);
    }
    Ok(Response::Proc(proc.info(&st)))
}

fn wait_on<'a>(proc: &'a Proc, st: MutexGuard<'a, State>, d: Duration) -> MutexGuard<'a, State> {
    proc.changed
        .wait_timeout(st, d)
        .map(|(g, _)| g)
        .unwrap_or_else(|e| e.into_inner().0)
}

pub fn write_stdin(pid: u32, data_hex: &str, close: bool) -> Result<Response> {
    let data = decode_hex(data_hex).ok_or_else(|| Failure::invalid("data_hex is not hex"))?;
    let proc = find(pid)?;
    let mut stdin = lock(&proc.stdin);
    let Some(pipe) = stdin.as_mut() else {
        return Err(Failure::new(
            ErrorCode::InvalidArgument,
            format!("process {pid} has no open stdin (start it with stdin enabled; it may have exited or had stdin closed)"),
        ));
    };
    let deadline = Instant::now() + STDIN_WAIT;
    let mut rest = &data[..];
    while !rest.is_empty() {
        match pipe.write(rest) {
            Ok(n) => rest = &rest[n..],
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(Failure::new(
                        ErrorCode::Timeout,
                        format!("process {pid} did not read its stdin for {} s; {} bytes were not written", STDIN_WAIT.as_secs(), rest.len()),
                    ));
                }
                let mut pfd = libc::pollfd {
                    fd: pipe.as_raw_fd(),
                    events: libc::POLLOUT,
                    revents: 0,
                };
                let ms = libc::c_int::try_from(left.as_millis()).unwrap_or(libc::c_int::MAX);
                // SAFETY: one valid pollfd.
                unsafe { libc::poll(&mut pfd, 1, ms) };
            }
            Err(e) => {
                return Err(Failure::io(
                    &e,
                    format!("cannot write to the stdin of process {pid}"),
                ))
            }
        }
    }
    if close {
        *stdin = None;
    }
    Ok(Response::Ok)
}

/// Replays the ring, then follows live output until the process ends, the host cancels, or the
/// host session that asked is over.
pub fn attach(stream: &Stream, rx: &Receiver<Inbound>, pid: u32, follow: bool) -> Result<Response> {
    let proc = find(pid)?;
    let mut pos = 0u64;
    let mut first = true;
    loop {
        let (chunks, gap, exit, info) = {
            let mut st = lock(&proc.state);
            while !first && follow && st.total <= pos && st.exit.is_none() {
                match rx.try_recv() {
                    Ok(Inbound::Cancel | Inbound::Detached) | Err(TryRecvError::Disconnected) => {
                        return Err(Failure::new(ErrorCode::Cancelled, "detached"))
                    }
                    _ => {}
                }
                st = wait_on(&proc, st, ATTACH_POLL);
            }
            let oldest = st.ring.front().map_or(st.total, |c| c.at);
            let gap = oldest.saturating_sub(pos);
            pos = pos.max(oldest);
            let chunks: Vec<(FrameKind, Vec<u8>)> = st
                .ring
                .iter()
                .filter(|c| c.at + c.data.len() as u64 > pos)
                .map(|c| {
                    (
                        c.kind,
                        c.data[usize::try_from(pos.saturating_sub(c.at)).unwrap_or(0)..].to_vec(),
                    )
                })
                .collect();
            pos = st.total;
            (chunks, gap, st.exit, proc.info(&st))
        };
        if first || gap > 0 {
            stream.event(&Event::Attached { pid, dropped: gap });
            first = false;
        }
        for (kind, data) in chunks {
            if !stream.send(kind, &data) {
                return Err(Failure::new(ErrorCode::Cancelled, "the host went away"));
            }
        }
        if let Some(status) = exit {
            return Ok(Response::Exit(status));
        }
        if !follow {
            return Ok(Response::Proc(info));
        }
    }
}

/// Test mode only: the agent is exiting, take the background processes with it.
pub fn kill_all() {
    for p in lock(&TABLE).values() {
        if lock(&p.state).exit.is_none() {
            kill_group(p.pid as i32);
        }
    }
}
