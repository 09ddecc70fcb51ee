//! Launching QEMU: detached into its own session, optionally as an unprivileged user and inside cgroups.
//!
//! QEMU is not started with `-daemonize`: under `-sandbox ...,spawn=deny,elevateprivileges=deny` its own
//! fork and setsid would be killed by seccomp. kiln does the detaching itself, between fork and exec: a new
//! session (Ctrl-C on the daemon does not reach the VM, and the VM outlives the daemon), the cgroups, then
//! the user switch, all before QEMU runs a single instruction, so every byte it allocates is accounted and
//! every file it opens is opened as the unprivileged user.

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::error::VmmError;
use crate::qemu::VmSpec;

/// The credentials a VM process runs with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunAs {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups (e.g. the group that may read shared immutable snapshot files).
    pub groups: Vec<u32>,
}

/// How a VM process is confined beyond seccomp (which is always on).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Confine {
    /// None: run as the daemon's own user.
    pub run_as: Option<RunAs>,
    /// `cgroup.procs` files the process joins before exec.
    pub cgroup_procs: Vec<PathBuf>,
}

/// How long QEMU may take to initialise (until its QMP monitor greets).
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// Starts QEMU and returns its pid once it has initialised (its QMP monitor answers). On failure the error
/// carries QEMU's own stderr.
pub fn launch(spec: &VmSpec) -> Result<u32, VmmError> {
    spec.check_paths()?;
    std::fs::create_dir_all(&spec.run_dir)
        .map_err(|e| VmmError::io(format!("creating {}", spec.run_dir.display()), e))?;
    // Whatever QEMU opens by path in run_dir (writable by the VM's uid) goes first: a FIFO planted as
    // the console socket would block QEMU's start. QEMU truncates its logs at every start anyway.
    for stale in [
        spec.qmp_socket(),
        spec.agent_socket(),
        spec.pid_file(),
        spec.console_socket(),
        spec.qemu_log(),
    ] {
        let _ = std::fs::remove_file(stale);
    }
    // run_dir is writable by the VM's uid: created afresh, never through a link it planted, and read
    // back through this descriptor only.
    let stderr_path = spec.run_dir.join("qemu.stderr");
    let mut stderr_file = crate::safefs::create_new(&stderr_path, 0o600)
        .map_err(|e| VmmError::io(format!("creating {}", stderr_path.display()), e))?;
    let stderr = stderr_file
        .try_clone()
        .map_err(|e| VmmError::io(format!("creating {}", stderr_path.display()), e))?;
    // Opened here (close-on-exec) so the child only has to write(2) to them: nothing between fork and exec
    // may allocate.
    let cgroup_files: Vec<File> = spec
        .confine
        .cgroup_procs
        .iter()
        .map(|p| {
            OpenOptions::new()
                .write(true)
                .open(p)
                .map_err(|e| VmmError::io(format!("opening {}", p.display()), e))
        })
        .collect::<Result<_, _>>()?;
    let cgroup_fds: Vec<i32> = cgroup_files.iter().map(|f| f.as_raw_fd()).collect();
    // The VM's uid needs no access to /dev/kvm: the daemon opens it and QEMU gets the descriptor.
    let kvm = match spec.accel {
        crate::Accel::Kvm => Some(crate::accel::open_kvm().map_err(|e| VmmError::LaunchFailed {
            detail: format!("cannot open /dev/kvm: {e}; check `kiln doctor` or start the daemon with --accel tcg"),
        })?),
        crate::Accel::Tcg => None,
    };
    let kvm_fd = kvm.as_ref().map(|f| f.as_raw_fd());
    let tap_fd = spec.tap_fd;
    let vhost_fd = spec.tap_fd.and(spec.vhost_fd);
    // The further queues' descriptors, in a fixed array: the child may not allocate after fork.
    let mut queues = [(-1, -1); crate::qemu::MAX_NET_QUEUES];
    if tap_fd.is_some() {
        for (slot, (t, v)) in queues[1..].iter_mut().zip(&spec.tap_queues) {
            *slot = (*t, v.unwrap_or(-1));
        }
    }
    let run_as = spec.confine.run_as.clone();
    let binary = crate::qemu_binary();
    let mut cmd = Command::new(&binary);
    // Nothing of the daemon's environment (tokens, credentials, KILN_* settings) reaches the VM process.
    cmd.args(spec.args())
        .env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr);
    // SAFETY: the closure only makes raw syscalls on data prepared before the fork and allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            detach_and_confine(
                &cgroup_fds,
                run_as.as_ref(),
                kvm_fd,
                tap_fd,
                vhost_fd,
                &mut queues,
            )
        });
    }
    let mut child = cmd.spawn().map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => VmmError::MissingTool {
            tool: binary.clone(),
            hint: "install QEMU: sudo apt-get install -t bookworm-backports qemu-system-x86 (or run scripts/install-deps.sh)".into(),
        },
        _ => VmmError::io(format!("starting {binary} (confinement: {:?})", spec.confine), e),
    })?;
    drop(cgroup_files);
    drop(kvm);
    let pid = child.id();
    let started = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(status)) => {
                let mut text = String::new();
                let _ = std::io::Seek::rewind(&mut stderr_file)
                    .and_then(|()| (&mut stderr_file).take(64 * 1024).read_to_string(&mut text));
                return Err(VmmError::LaunchFailed {
                    detail: format!("{status}: {}", text.trim()),
                });
            }
            Ok(None) => {}
            Err(e) => return Err(VmmError::io("waiting for QEMU", e)),
        }
        if qmp_greets(&spec.qmp_socket(), pid) {
            break;
        }
        if started.elapsed() > READY_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            return Err(VmmError::Timeout {
                what: "QEMU to initialise (QMP greeting)".into(),
                after_ms: READY_TIMEOUT.as_millis() as u64,
            });
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    // The VM is this daemon's child: reap it when it exits so no zombie lingers (after a daemon restart,
    // init does that for re-adopted VMs).
    let _ = std::thread::Builder::new()
        .name(format!("reap-{pid}"))
        .spawn(move || {
            let _ = child.wait();
        });
    Ok(pid)
}

/// Runs in the forked child before exec: new session, join cgroups, hand over /dev/kvm, drop to the VM's
/// user, private umask.
fn detach_and_confine(
    cgroup_fds: &[i32],
    run_as: Option<&RunAs>,
    kvm_fd: Option<i32>,
    tap_fd: Option<i32>,
    vhost_fd: Option<i32>,
    queues: &mut [(i32, i32)],
) -> std::io::Result<()> {
    let check = |r: libc::c_int| {
        if r < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(())
        }
    };
    // SAFETY: plain syscalls on valid pointers; async-signal-safe.
    unsafe {
        check(libc::setsid())?;
        for fd in cgroup_fds {
            // "0" moves the writing process; children and threads it creates later follow.
            if libc::write(*fd, b"0".as_ptr().cast(), 1) < 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        // The TAP first moves out of the way (it may sit on KVM_FD's number), close-on-exec.
        let away = |fd: Option<i32>| -> std::io::Result<Option<i32>> {
            match fd {
                Some(fd) => {
                    let moved = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 16);
                    check(moved)?;
                    Ok(Some(moved))
                }
                None => Ok(None),
            }
        };
        let tap = away(tap_fd)?;
        let vhost = away(vhost_fd)?;
        for (t, v) in queues.iter_mut() {
            *t = away(Some(*t).filter(|fd| *fd >= 0))?.unwrap_or(-1);
            *v = away(Some(*v).filter(|fd| *fd >= 0))?.unwrap_or(-1);
        }
        // After the cgroup writes: the dup2 may replace one of their descriptors.
        if let Some(fd) = kvm_fd {
            pass_kvm_fd(fd)?;
        }
        if let Some(fd) = tap {
            // dup2 onto another number clears close-on-exec: QEMU gets it as `-netdev tap,fd=TAP_FD`.
            check(libc::dup2(fd, crate::qemu::TAP_FD))?;
        }
        if let Some(fd) = vhost {
            check(libc::dup2(fd, crate::qemu::VHOST_FD))?;
        }
        for (i, (t, v)) in queues.iter().enumerate() {
            let (tap_no, vhost_no) = crate::qemu::queue_fds(i);
            if *t >= 0 {
                check(libc::dup2(*t, tap_no))?;
            }
            if *v >= 0 {
                check(libc::dup2(*v, vhost_no))?;
            }
        }
        if let Some(r) = run_as {
            check(libc::setgroups(r.groups.len(), r.groups.as_ptr()))?;
            check(libc::setresgid(r.gid, r.gid, r.gid))?;
            check(libc::setresuid(r.uid, r.uid, r.uid))?;
        }
        // Sockets, the RAM file, saved state and logs that QEMU creates are private to its user.
        libc::umask(0o077);
    }
    Ok(())
}

/// Makes `fd` (close-on-exec, as the daemon opened it) QEMU's `crate::accel::KVM_FD`, kept across exec.
/// Async-signal-safe: only dup2/fcntl.
pub(crate) fn pass_kvm_fd(fd: i32) -> std::io::Result<()> {
    let target = crate::accel::KVM_FD;
    // SAFETY: plain syscalls on descriptors; dup2 onto another number clears close-on-exec.
    let r = unsafe {
        if fd == target {
            libc::fcntl(fd, libc::F_SETFD, 0)
        } else {
            libc::dup2(fd, target)
        }
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// True once QEMU (process `pid`, the one listening on `sock`) sends QMP's greeting (its main loop runs).
fn qmp_greets(sock: &Path, pid: u32) -> bool {
    let Ok(mut s) = UnixStream::connect(sock) else {
        return false;
    };
    if peer_pid(&s) != Some(pid) {
        return false;
    }
    if s.set_read_timeout(Some(Duration::from_millis(250)))
        .is_err()
    {
        return false;
    }
    let mut buf = [0u8; 256];
    let mut got = Vec::new();
    while let Ok(n) = s.read(&mut buf) {
        if n == 0 {
            return false;
        }
        got.extend_from_slice(&buf[..n]);
        if got.windows(3).any(|w| w == b"QMP") {
            return true;
        }
    }
    false
}

/// The pid of the process listening at the other end of `s` (SO_PEERCRED).
fn peer_pid(s: &UnixStream) -> Option<u32> {
    use std::os::fd::AsRawFd;
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` and `len` are valid for writes of the sizes given; the fd is open for the call.
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    (rc == 0).then_some(cred.pid as u32)
}
