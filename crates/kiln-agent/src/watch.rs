//! Directory watches with inotify, streamed to the host as `Change` events until it cancels.

use std::collections::HashMap;
use std::ffi::{CString, OsStr};
use std::fs;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, TryRecvError};

use kiln_proto::{ChangeEvent, ChangeKind, ErrorCode, Event, Response};

use crate::conn::{Inbound, Stream};
use crate::failure::{Failure, Result};

/// How often a quiet watch looks for the host's `Cancel`.
const POLL_MS: i32 = 200;
/// At most this many directories are watched by one recursive watch (each costs kernel memory).
const MAX_DIRS: usize = 8192;

const MASK: u32 = libc::IN_CREATE
    | libc::IN_MODIFY
    | libc::IN_DELETE
    | libc::IN_MOVED_FROM
    | libc::IN_MOVED_TO
    | libc::IN_DELETE_SELF
    | libc::IN_ONLYDIR
    | libc::IN_DONT_FOLLOW;

struct Watcher<'a> {
    fd: OwnedFd,
    /// Watch descriptor → the directory's absolute path.
    dirs: HashMap<i32, PathBuf>,
    recursive: bool,
    root_wd: i32,
    stream: &'a Stream,
}

pub fn watch(
    stream: &Stream,
    rx: &Receiver<Inbound>,
    path: &str,
    recursive: bool,
) -> Result<Response> {
    let root = crate::files::guest_path(path)?;
    let meta = fs::metadata(root).map_err(|e| Failure::io(&e, format!("cannot watch {path}")))?;
    if !meta.is_dir() {
        return Err(Failure::new(
            ErrorCode::NotADirectory,
            format!("{path} is not a directory"),
        ));
    }
    // SAFETY: plain syscall; the fd is owned below.
    let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
    if fd < 0 {
        let e = io::Error::last_os_error();
        return Err(Failure::io(&e, "cannot start an inotify watch"));
    }
    let mut w = Watcher {
        // SAFETY: fresh descriptor.
        fd: unsafe { OwnedFd::from_raw_fd(fd) },
        dirs: HashMap::new(),
        recursive,
        root_wd: -1,
        stream,
    };
    w.root_wd = w
        .add(root)
        .map_err(|e| Failure::io(&e, format!("cannot watch {path}")))?;
    if recursive {
        w.add_tree(root, false);
    }
    stream.event(&Event::Watching);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match rx.try_recv() {
            Ok(Inbound::Cancel | Inbound::Detached) | Err(TryRecvError::Disconnected) => {
                return Ok(Response::Ok)
            }
            Ok(_) | Err(TryRecvError::Empty) => {}
        }
        let mut pfd = libc::pollfd {
            fd: w.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let rc = unsafe { libc::poll(&mut pfd, 1, POLL_MS) };
        if rc <= 0 {
            continue;
        }
        // SAFETY: valid fd and buffer.
        let n = unsafe { libc::read(w.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n <= 0 {
            continue;
        }
        let n = usize::try_from(n).unwrap_or(0);
        if !w.handle(&buf[..n]) {
            // The watched directory itself is gone.
            return Ok(Response::Ok);
        }
    }
}

impl Watcher<'_> {
    fn add(&mut self, dir: &Path) -> io::Result<i32> {
        let c = CString::new(dir.as_os_str().as_bytes()).map_err(io::Error::other)?;
        // SAFETY: valid fd and NUL-terminated path.
        let wd = unsafe { libc::inotify_add_watch(self.fd.as_raw_fd(), c.as_ptr(), MASK) };
        if wd < 0 {
            return Err(io::Error::last_os_error());
        }
        self.dirs.insert(wd, dir.to_path_buf());
        Ok(wd)
    }

    /// Watches every directory below `dir`. `announce`: report what is already there as created
    /// (a directory that just appeared may have been filled before its watch was in place).
    fn add_tree(&mut self, dir: &Path, announce: bool) {
        let mut todo = vec![dir.to_path_buf()];
        while let Some(d) = todo.pop() {
            let Ok(rd) = fs::read_dir(&d) else { continue };
            for entry in rd.flatten() {
                let p = entry.path();
                let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
                if announce {
                    self.emit(ChangeKind::Create, &p, is_dir, None);
                }
                if is_dir && self.dirs.len() < MAX_DIRS && self.add(&p).is_ok() {
                    todo.push(p);
                }
            }
        }
    }

    fn emit(&self, change: ChangeKind, path: &Path, dir: bool, cookie: Option<u32>) {
        self.stream.event(&Event::Change(ChangeEvent {
            change,
            path: path.to_string_lossy().into_owned(),
            dir,
            cookie,
        }));
    }

    /// Reports one read's worth of inotify events; `false` once the root is gone.
    fn handle(&mut self, mut buf: &[u8]) -> bool {
        let head = std::mem::size_of::<libc::inotify_event>();
        // Repeated writes to one file arrive as runs of IN_MODIFY; one event per run is enough.
        let mut last_modify: Option<(i32, Vec<u8>)> = None;
        while buf.len() >= head {
            // SAFETY: at least `head` bytes remain; read_unaligned copes with any alignment.
            let ev: libc::inotify_event = unsafe { std::ptr::read_unaligned(buf.as_ptr().cast()) };
            let len = ev.len as usize;
            let Some(name_bytes) = buf.get(head..head + len) else {
                break;
            };
            let name_end = name_bytes.iter().position(|b| *b == 0).unwrap_or(len);
            let name = &name_bytes[..name_end];
            buf = &buf[head + len..];
            if ev.mask & libc::IN_Q_OVERFLOW != 0 {
                if let Some(root) = self.dirs.get(&self.root_wd).cloned() {
                    self.emit(ChangeKind::Overflow, &root, true, None);
                }
                continue;
            }
            if ev.mask & libc::IN_IGNORED != 0 {
                self.dirs.remove(&ev.wd);
                if ev.wd == self.root_wd {
                    return false;
                }
                continue;
            }
            if ev.mask & libc::IN_DELETE_SELF != 0 {
                continue;
            }
            let Some(dir) = self.dirs.get(&ev.wd) else {
                continue;
            };
            let path = dir.join(OsStr::from_bytes(name));
            let is_dir = ev.mask & libc::IN_ISDIR != 0;
            let cookie = (ev.cookie != 0).then_some(ev.cookie);
            let change = if ev.mask & libc::IN_CREATE != 0 {
                ChangeKind::Create
            } else if ev.mask & libc::IN_MODIFY != 0 {
                let key = (ev.wd, name.to_vec());
                if last_modify.as_ref() == Some(&key) {
                    continue;
                }
                last_modify = Some(key);
                ChangeKind::Modify
            } else if ev.mask & libc::IN_DELETE != 0 {
                ChangeKind::Delete
            } else if ev.mask & libc::IN_MOVED_FROM != 0 {
                ChangeKind::MovedFrom
            } else if ev.mask & libc::IN_MOVED_TO != 0 {
                ChangeKind::MovedTo
            } else {
                continue;
            };
            if change != ChangeKind::Modify {
                last_modify = None;
            }
            self.emit(change, &path, is_dir, cookie);
            let arrived = matches!(change, ChangeKind::Create | ChangeKind::MovedTo);
            if self.recursive
                && is_dir
                && arrived
                && self.dirs.len() < MAX_DIRS
                && self.add(&path).is_ok()
            {
                self.add_tree(&path, true);
            }
        }
        true
    }
}
