//! Directory transfer as tar: unpack a stream from the host under a directory (every entry confined to
//! it), and pack a directory into a stream for the host. Both stream: at most one frame is buffered.
//!
//! Confinement does not trust a path check followed by a path-based write (a process in the guest may
//! swap a directory for a symlink in between): every entry is created relative to an open directory fd
//! reached one component at a time with `O_NOFOLLOW`, so no symlink is ever followed on the way.

mod pack;

pub use pack::pack;

use std::ffi::{CString, OsStr};
use std::fs::{self, File};
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::Duration;

use kiln_proto::{ErrorCode, Response, ACK_EVERY};

use crate::conn::Inbound;
use crate::failure::{Failure, Result};

/// A tar upload whose host went quiet this long is abandoned.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// `Data` frames as a `Read`, acknowledging progress so the host keeps sending.
struct Inflow<'a> {
    rx: &'a Receiver<Inbound>,
    ack: &'a dyn Fn(u64),
    chunk: Vec<u8>,
    pos: usize,
    total: u64,
    acked: u64,
    ended: bool,
    /// Why the stream stopped early (the `io::Error` handed to tar only says that it did).
    failure: Option<Failure>,
}

impl Inflow<'_> {
    fn fail(&mut self, f: Failure) -> io::Error {
        let e = io::Error::other(f.message.clone());
        self.failure = Some(f);
        e
    }
}

impl Read for Inflow<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.chunk.len() {
            if self.ended {
                return Ok(0);
            }
            match self.rx.recv_timeout(IDLE_TIMEOUT) {
                Ok(Inbound::Data(bytes)) => {
                    self.total += bytes.len() as u64;
                    if self.total - self.acked >= ACK_EVERY {
                        (self.ack)(self.total);
                        self.acked = self.total;
                    }
                    self.chunk = bytes;
                    self.pos = 0;
                }
                Ok(Inbound::DataEnd(Some(sent))) if sent != self.total => {
                    let msg = format!("received {} tar bytes but the host sent {sent}", self.total);
                    return Err(self.fail(Failure::new(ErrorCode::Protocol, msg)));
                }
                Ok(Inbound::DataEnd(_)) => self.ended = true,
                Ok(Inbound::Cancel) => {
                    return Err(self.fail(Failure::new(ErrorCode::Cancelled, "upload cancelled")))
                }
                Ok(Inbound::Detached) | Err(RecvTimeoutError::Disconnected) => {
                    let f = Failure::new(ErrorCode::Cancelled, "host session ended");
                    return Err(self.fail(f));
                }
                Ok(_) => {}
                Err(RecvTimeoutError::Timeout) => {
                    let msg = format!("no tar data for {} s", IDLE_TIMEOUT.as_secs());
                    return Err(self.fail(Failure::new(ErrorCode::Timeout, msg)));
                }
            }
        }
        let n = buf.len().min(self.chunk.len() - self.pos);
        buf[..n].copy_from_slice(&self.chunk[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// Unpacks the tar the host sends under `path`. A directory that did not exist is built under a
/// temporary name next to it and renamed into place at the end, so a failed upload leaves nothing.
pub fn unpack(rx: &Receiver<Inbound>, ack: &dyn Fn(u64), path: &str) -> Result<Response> {
    let target = crate::files::guest_path(path)?;
    let mut inflow = Inflow {
        rx,
        ack,
        chunk: Vec::new(),
        pos: 0,
        total: 0,
        acked: 0,
        ended: false,
        failure: None,
    };
    let staging = match fs::symlink_metadata(target) {
        Ok(_) => None,
        Err(e) if e.kind() == io::ErrorKind::NotFound => Some(Staging::create(target)?),
        Err(e) => return Err(Failure::io(&e, format!("cannot stat {path}"))),
    };
    let root_path = staging.as_ref().map_or(target, |s| s.path.as_path());
    let root = open_dir(root_path).map_err(|e| Failure::io(&e, format!("cannot open {path}")))?;
    let entries =
        unpack_into(&root, &mut inflow).map_err(|f| inflow.failure.take().unwrap_or(f))?;
    // Tar ends with zero blocks; whatever follows them is read and discarded up to `DataEnd`.
    io::copy(&mut inflow, &mut io::sink()).map_err(|e| {
        inflow
            .failure
            .take()
            .unwrap_or_else(|| Failure::io(&e, "cannot read the tar stream"))
    })?;
    if let Some(staging) = staging {
        staging.persist(target)?;
    }
    Ok(Response::Unpacked {
        entries,
        bytes: inflow.total,
    })
}

fn unpack_into(root: &OwnedFd, inflow: &mut Inflow<'_>) -> Result<u64> {
    let mut archive = tar::Archive::new(inflow);
    let bad =
        |e: io::Error| Failure::new(ErrorCode::InvalidArgument, format!("bad tar stream: {e}"));
    // Directory modes and times are set last: a read-only directory must still take its entries, and
    // creating entries changes a directory's mtime.
    let mut dirs: Vec<(Vec<Vec<u8>>, u32, i64)> = Vec::new();
    let mut count = 0u64;
    for entry in archive.entries().map_err(bad)? {
        let mut entry = entry.map_err(bad)?;
        let header = entry.header();
        let kind = header.entry_type();
        let mode = header.mode().map_err(bad)? & 0o7777;
        let mtime = header
            .mtime()
            .map_or(0, |t| i64::try_from(t).unwrap_or(i64::MAX));
        if kind.is_pax_global_extensions() {
            continue;
        }
        let raw = entry.path_bytes().into_owned();
        let comps = confined(&raw)?;
        let shown = String::from_utf8_lossy(&raw).into_owned();
        let Some((name, parents)) = comps.split_last() else {
            if kind.is_dir() {
                dirs.push((Vec::new(), mode, mtime));
                count += 1;
                continue;
            }
            return Err(Failure::invalid(format!("tar entry {shown:?} has no name")));
        };
        let parent = walk(root, parents, true, &shown)?;
        let name = cstr(name)?;
        if kind.is_dir() {
            make_dir(&parent, &name, &shown)?;
            dirs.push((comps.clone(), mode, mtime));
        } else if kind.is_file() || kind == tar::EntryType::Continuous {
            clear(&parent, &name, &shown)?;
            let file = openat(
                &parent,
                &name,
                libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW,
                0o600,
            )
            .map_err(|e| Failure::io(&e, format!("cannot create {shown}")))?;
            let mut file = File::from(file);
            io::copy(&mut entry, &mut file)
                .map_err(|e| Failure::io(&e, format!("cannot write {shown}")))?;
            file.set_permissions(fs::Permissions::from_mode(mode))
                .map_err(|e| Failure::io(&e, format!("cannot set the mode of {shown}")))?;
            set_times(file.as_raw_fd(), None, mtime, 0);
        } else if kind.is_symlink() {
            let target = entry
                .link_name_bytes()
                .ok_or_else(|| Failure::invalid(format!("symlink {shown} has no target")))?;
            let target = cstr(&target)?;
            clear(&parent, &name, &shown)?;
            // SAFETY: valid fd and NUL-terminated strings.
            let rc = unsafe { libc::symlinkat(target.as_ptr(), parent.as_raw_fd(), name.as_ptr()) };
            check(rc).map_err(|e| Failure::io(&e, format!("cannot create symlink {shown}")))?;
            set_times(
                parent.as_raw_fd(),
                Some(&name),
                mtime,
                libc::AT_SYMLINK_NOFOLLOW,
            );
        } else if kind.is_hard_link() {
            let link = entry
                .link_name_bytes()
                .ok_or_else(|| Failure::invalid(format!("hard link {shown} has no target")))?;
            let lcomps = confined(&link)?;
            let Some((lname, lparents)) = lcomps.split_last() else {
                return Err(Failure::invalid(format!("hard link {shown} has no target")));
            };
            let lparent = walk(root, lparents, false, &shown)?;
            let lname = cstr(lname)?;
            clear(&parent, &name, &shown)?;
            // SAFETY: valid fds and NUL-terminated strings; flags 0 links a symlink itself.
            let rc = unsafe {
                libc::linkat(
                    lparent.as_raw_fd(),
                    lname.as_ptr(),
                    parent.as_raw_fd(),
                    name.as_ptr(),
                    0,
                )
            };
            check(rc).map_err(|e| Failure::io(&e, format!("cannot create hard link {shown}")))?;
        } else if kind.is_fifo() || kind.is_character_special() || kind.is_block_special() {
            let fmt = if kind.is_fifo() {
                libc::S_IFIFO
            } else if kind.is_character_special() {
                libc::S_IFCHR
            } else {
                libc::S_IFBLK
            };
            let major = header.device_major().ok().flatten().unwrap_or(0);
            let minor = header.device_minor().ok().flatten().unwrap_or(0);
            clear(&parent, &name, &shown)?;
            let dev = libc::makedev(major, minor);
            // SAFETY: valid fd and NUL-terminated name.
            let rc = unsafe { libc::mknodat(parent.as_raw_fd(), name.as_ptr(), fmt | mode, dev) };
            check(rc).map_err(|e| Failure::io(&e, format!("cannot create {shown}")))?;
        } else {
            // GNU sparse files, Solaris ACLs, ...: not produced by kiln or ordinary `tar -c`.
            return Err(Failure::new(
                ErrorCode::Unsupported,
                format!("tar entry {shown} has an unsupported type ({kind:?})"),
            ));
        }
        count += 1;
    }
    // Deepest first, so setting a parent's time comes after its children were touched.
    dirs.sort_by_key(|d| std::cmp::Reverse(d.0.len()));
    for (comps, mode, mtime) in dirs {
        let shown = String::from_utf8_lossy(&comps.join(&b'/')).into_owned();
        let dir = walk(root, &comps, false, &shown)?;
        // SAFETY: valid fd.
        let rc = unsafe { libc::fchmod(dir.as_raw_fd(), mode) };
        check(rc).map_err(|e| Failure::io(&e, format!("cannot set the mode of {shown}")))?;
        set_times(dir.as_raw_fd(), None, mtime, 0);
    }
    Ok(count)
}

/// The entry's path as components, refusing anything that could leave the directory.
fn confined(raw: &[u8]) -> Result<Vec<Vec<u8>>> {
    let shown = || String::from_utf8_lossy(raw).into_owned();
    if raw.contains(&0) {
        return Err(Failure::invalid(format!(
            "tar entry {:?} contains NUL",
            shown()
        )));
    }
    let mut out = Vec::new();
    for c in Path::new(OsStr::from_bytes(raw)).components() {
        match c {
            Component::Normal(n) => out.push(n.as_bytes().to_vec()),
            Component::CurDir => {}
            Component::RootDir | Component::ParentDir | Component::Prefix(_) => {
                return Err(Failure::new(
                    ErrorCode::PathEscape,
                    format!(
                        "tar entry {:?} is absolute or contains '..'; entries must be relative paths inside the target directory",
                        shown()
                    ),
                ))
            }
        }
    }
    Ok(out)
}

/// Opens the directory `comps` below `root` one component at a time, never following a symlink;
/// missing directories are created when `create`.
fn walk(root: &OwnedFd, comps: &[Vec<u8>], create: bool, shown: &str) -> Result<OwnedFd> {
    let mut cur = dup(root).map_err(|e| Failure::io(&e, "cannot duplicate a directory fd"))?;
    for comp in comps {
        let name = cstr(comp)?;
        let flags = libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW;
        let next = match openat(&cur, &name, flags, 0) {
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) && create => {
                make_dir(&cur, &name, shown)?;
                openat(&cur, &name, flags, 0)
            }
            other => other,
        };
        cur = next.map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP | libc::ENOTDIR) if is_symlink(&cur, &name) => {
                escape_through_symlink(shown, comp)
            }
            _ => Failure::io(&e, format!("cannot open the directory of {shown}")),
        })?;
    }
    Ok(cur)
}

fn make_dir(parent: &OwnedFd, name: &CString, shown: &str) -> Result<()> {
    // SAFETY: valid fd and NUL-terminated name.
    let rc = unsafe { libc::mkdirat(parent.as_raw_fd(), name.as_ptr(), 0o700) };
    match check(rc) {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => match lstat_at(parent, name) {
            Some(st) if st.st_mode & libc::S_IFMT == libc::S_IFDIR => Ok(()),
            Some(st) if st.st_mode & libc::S_IFMT == libc::S_IFLNK => {
                Err(escape_through_symlink(shown, name.as_bytes()))
            }
            _ => Err(Failure::new(
                ErrorCode::AlreadyExists,
                format!("{shown}: a file is in the way of a directory"),
            )),
        },
        Err(e) => Err(Failure::io(&e, format!("cannot create directory {shown}"))),
    }
}

/// Removes a non-directory at `name` so the entry can be created fresh (never written through).
fn clear(parent: &OwnedFd, name: &CString, shown: &str) -> Result<()> {
    match lstat_at(parent, name) {
        None => Ok(()),
        Some(st) if st.st_mode & libc::S_IFMT == libc::S_IFDIR => Err(Failure::new(
            ErrorCode::IsADirectory,
            format!("{shown}: a directory is in the way"),
        )),
        Some(_) => {
            // SAFETY: valid fd and NUL-terminated name.
            let rc = unsafe { libc::unlinkat(parent.as_raw_fd(), name.as_ptr(), 0) };
            check(rc).map_err(|e| Failure::io(&e, format!("cannot replace {shown}")))
        }
    }
}

fn escape_through_symlink(shown: &str, comp: &[u8]) -> Failure {
    Failure::new(
        ErrorCode::PathEscape,
        format!(
            "tar entry {shown:?} goes through the symlink {:?}; entries are never written through symlinks",
            String::from_utf8_lossy(comp)
        ),
    )
}

fn is_symlink(dir: &OwnedFd, name: &CString) -> bool {
    lstat_at(dir, name).is_some_and(|st| st.st_mode & libc::S_IFMT == libc::S_IFLNK)
}

fn lstat_at(dir: &OwnedFd, name: &CString) -> Option<libc::stat> {
    // SAFETY: all-zero is a valid `stat`; the call fills it.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: valid fd, NUL-terminated name, valid out-pointer.
    let rc = unsafe {
        libc::fstatat(
            dir.as_raw_fd(),
            name.as_ptr(),
            &mut st,
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    (rc == 0).then_some(st)
}

fn openat(dir: &OwnedFd, name: &CString, flags: i32, mode: libc::mode_t) -> io::Result<OwnedFd> {
    // SAFETY: valid fd and NUL-terminated name; the returned fd is owned by us.
    let fd = unsafe {
        libc::openat(
            dir.as_raw_fd(),
            name.as_ptr(),
            flags | libc::O_CLOEXEC,
            mode,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn open_dir(path: &Path) -> io::Result<OwnedFd> {
    let c = CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)?;
    // SAFETY: NUL-terminated path; the returned fd is owned by us.
    let fd = unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fresh descriptor.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn dup(fd: &OwnedFd) -> io::Result<OwnedFd> {
    fd.try_clone()
}

/// Sets atime and mtime to `mtime` (best effort: a time the filesystem refuses is not worth failing for).
fn set_times(fd: RawFd, name: Option<&CString>, mtime: i64, flags: i32) {
    let t = libc::timespec {
        tv_sec: mtime as libc::time_t,
        tv_nsec: 0,
    };
    let times = [t, t];
    // SAFETY: valid fd, optional NUL-terminated name, two timespecs.
    unsafe {
        match name {
            Some(n) => libc::utimensat(fd, n.as_ptr(), times.as_ptr(), flags),
            None => libc::futimens(fd, times.as_ptr()),
        };
    }
}

fn cstr(bytes: &[u8]) -> Result<CString> {
    CString::new(bytes).map_err(|_| Failure::invalid("a tar path contains NUL"))
}

fn check(rc: i32) -> io::Result<()> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// A new directory built under a temporary name, removed unless renamed into place.
struct Staging {
    path: PathBuf,
    kept: bool,
}

impl Staging {
    fn create(target: &Path) -> Result<Staging> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let (Some(parent), Some(_)) = (target.parent(), target.file_name()) else {
            return Err(Failure::invalid(format!(
                "cannot unpack into {}",
                target.display()
            )));
        };
        fs::create_dir_all(parent).map_err(|e| {
            Failure::io(&e, format!("cannot create directory {}", parent.display()))
        })?;
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = parent.join(format!(".kiln-unpack-{}-{n}", std::process::id()));
        fs::create_dir(&path)
            .map_err(|e| Failure::io(&e, format!("cannot create {}", path.display())))?;
        let _ = fs::set_permissions(&path, fs::Permissions::from_mode(0o755));
        Ok(Staging { path, kept: false })
    }

    fn persist(mut self, to: &Path) -> Result<()> {
        // RENAME_NOREPLACE: a directory created there meanwhile is not silently replaced.
        let from = CString::new(self.path.as_os_str().as_bytes())
            .map_err(|_| Failure::invalid("NUL in path"))?;
        let dest =
            CString::new(to.as_os_str().as_bytes()).map_err(|_| Failure::invalid("NUL in path"))?;
        // SAFETY: NUL-terminated paths.
        let rc = unsafe {
            libc::renameat2(
                libc::AT_FDCWD,
                from.as_ptr(),
                libc::AT_FDCWD,
                dest.as_ptr(),
                libc::RENAME_NOREPLACE,
            )
        };
        check(rc).map_err(|e| {
            Failure::io(
                &e,
                format!("cannot move the unpacked tree to {}", to.display()),
            )
        })?;
        self.kept = true;
        Ok(())
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.kept {
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}

#[cfg(test)]
mod tests;
