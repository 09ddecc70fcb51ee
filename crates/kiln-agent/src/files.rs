//! File requests: read, write (atomic replace), list, stat, mkdir, remove.

use std::fs::{self, DirBuilder, File, OpenOptions, Permissions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{fchown, DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, TryRecvError};
use std::time::Duration;

use kiln_proto::{
    DirEntry, ErrorCode, Event, FileKind, FileStat, FrameKind, Response, ACK_EVERY, DATA_CHUNK,
};

use crate::conn::{Inbound, Stream};
use crate::failure::{Failure, Result};

/// A write whose host went quiet this long is abandoned (and its temporary file removed).
const WRITE_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

pub fn read_file(
    stream: &Stream,
    rx: &Receiver<Inbound>,
    path: &str,
    offset: u64,
    length: Option<u64>,
) -> Result<Response> {
    let p = guest_path(path)?;
    let mut file = File::open(p).map_err(|e| Failure::io(&e, format!("cannot open {path}")))?;
    let meta = file
        .metadata()
        .map_err(|e| Failure::io(&e, format!("cannot stat {path}")))?;
    if meta.is_dir() {
        return Err(is_a_directory(path));
    }
    if offset > 0 {
        file.seek(SeekFrom::Start(offset))
            .map_err(|e| Failure::io(&e, format!("cannot seek in {path}")))?;
    }
    stream.event(&Event::ReadStart {
        size: meta.len(),
        mode: meta.mode() & 0o7777,
    });
    let mut remaining = length.unwrap_or(u64::MAX);
    let mut sent = 0u64;
    let mut buf = vec![0u8; DATA_CHUNK];
    while remaining > 0 {
        match rx.try_recv() {
            Ok(Inbound::Cancel) => return Err(cancelled("read cancelled")),
            Ok(Inbound::Detached) | Err(TryRecvError::Disconnected) => {
                return Err(cancelled("host session ended"))
            }
            Ok(_) | Err(TryRecvError::Empty) => {}
        }
        let want = usize::try_from(remaining).map_or(buf.len(), |r| r.min(buf.len()));
        let n = match file.read(&mut buf[..want]) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(Failure::io(&e, format!("cannot read {path}"))),
        };
        stream.send(FrameKind::Data, &buf[..n]);
        sent += n as u64;
        remaining -= n as u64;
    }
    Ok(Response::ReadDone { bytes: sent })
}

/// Receives the file from `Data` frames. Unless appending, it goes to a temporary file in the
/// same directory that is renamed over the target, so readers never see a partial file.
pub fn write_file(
    rx: &Receiver<Inbound>,
    ack: &dyn Fn(u64),
    path: &str,
    mode: Option<u32>,
    append: bool,
    create_parents: bool,
) -> Result<Response> {
    let p = guest_path(path)?;
    let parent = match (p.parent(), p.file_name()) {
        (Some(parent), Some(_)) if !path.ends_with('/') => parent,
        _ => return Err(Failure::invalid(format!("not a file path: {path}"))),
    };
    check_mode(mode)?;
    if create_parents {
        fs::create_dir_all(parent).map_err(|e| {
            Failure::io(&e, format!("cannot create directory {}", parent.display()))
        })?;
    }
    let existing = match fs::metadata(p) {
        Ok(meta) if meta.is_dir() => return Err(is_a_directory(path)),
        Ok(meta) => Some(meta),
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => return Err(Failure::io(&e, format!("cannot stat {path}"))),
    };
    if append {
        let mut file = OpenOptions::new()
            .append(true)
            .create(true)
            .mode(mode.unwrap_or(0o644))
            .open(p)
            .map_err(|e| Failure::io(&e, format!("cannot open {path}")))?;
        let bytes = receive(rx, ack, &mut file, path)?;
        if let Some(mode) = mode {
            set_mode(&file, mode, path)?;
        }
        return Ok(Response::Written { bytes });
    }
    let mut tmp = TempFile::create_in(parent)?;
    let bytes = receive(rx, ack, &mut tmp.file, path)?;
    if let Some(meta) = &existing {
        // Keep the replaced file's owner; chown before chmod since chown clears setuid bits.
        let _ = fchown(&tmp.file, Some(meta.uid()), Some(meta.gid()));
    }
    let mode = mode
        .or(existing.map(|m| m.mode() & 0o7777))
        .unwrap_or(0o644);
    set_mode(&tmp.file, mode, path)?;
    tmp.persist(p)
        .map_err(|e| Failure::io(&e, format!("cannot replace {path}")))?;
    Ok(Response::Written { bytes })
}

/// Writes `contents` to `path` atomically (temporary file + rename).
pub fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> io::Result<()> {
    let parent = path.parent().unwrap_or(Path::new("/"));
    let mut tmp = TempFile::create_in(parent).map_err(|f| io::Error::other(f.message))?;
    tmp.file.write_all(contents)?;
    tmp.file.set_permissions(Permissions::from_mode(mode))?;
    tmp.persist(path)
}

/// Writes `Data` until `DataEnd`, acknowledging progress so the host keeps sending.
fn receive(rx: &Receiver<Inbound>, ack: &dyn Fn(u64), out: &mut File, path: &str) -> Result<u64> {
    let mut total = 0u64;
    let mut acked = 0u64;
    loop {
        match rx.recv_timeout(WRITE_IDLE_TIMEOUT) {
            Ok(Inbound::Data(bytes)) => {
                out.write_all(&bytes)
                    .map_err(|e| Failure::io(&e, format!("cannot write {path}")))?;
                total += bytes.len() as u64;
                if total - acked >= ACK_EVERY {
                    ack(total);
                    acked = total;
                }
            }
            Ok(Inbound::DataEnd(Some(sent))) if sent != total => {
                return Err(Failure::new(
                    ErrorCode::Protocol,
                    format!("received {total} bytes for {path} but the host sent {sent}"),
                ))
            }
            Ok(Inbound::DataEnd(_)) => return Ok(total),
            Ok(Inbound::Cancel) => return Err(cancelled("write cancelled")),
            Ok(Inbound::Detached) | Err(RecvTimeoutError::Disconnected) => {
                return Err(cancelled("host session ended"))
            }
            Ok(_) => {}
            Err(RecvTimeoutError::Timeout) => {
                return Err(Failure::new(
                    ErrorCode::Timeout,
                    format!("no data for {path} for {} s", WRITE_IDLE_TIMEOUT.as_secs()),
                ))
            }
        }
    }
}

/// Lists a directory without following symlinks, sorted by name.
pub fn list_dir(path: &str) -> Result<Response> {
    let p = guest_path(path)?;
    let fail = |e: io::Error| Failure::io(&e, format!("cannot list {path}"));
    let mut entries = Vec::new();
    for entry in fs::read_dir(p).map_err(fail)? {
        let entry = entry.map_err(fail)?;
        // Entries can vanish while we list; skip those.
        let Ok(meta) = entry.metadata() else { continue };
        entries.push(DirEntry {
            name: entry.file_name().to_string_lossy().into_owned(),
            kind: kind_of(&meta),
            size: meta.len(),
            mode: meta.mode() & 0o7777,
            mtime_unix: meta.mtime(),
        });
    }
    entries.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(Response::Entries { entries })
}

/// Follows symlinks, except that a dangling symlink is described itself.
pub fn stat(path: &str) -> Result<FileStat> {
    let p = guest_path(path)?;
    let meta = fs::metadata(p)
        .or_else(|e| match e.kind() {
            io::ErrorKind::NotFound => fs::symlink_metadata(p),
            _ => Err(e),
        })
        .map_err(|e| Failure::io(&e, format!("cannot stat {path}")))?;
    Ok(FileStat {
        size: meta.len(),
        mode: meta.mode() & 0o7777,
        kind: kind_of(&meta),
        mtime_unix: meta.mtime(),
    })
}

/// Like `mkdir [-p] [-m mode]`: with `parents` an existing directory is fine, and `mode`
/// applies (exactly, regardless of umask) to a directory this call created.
pub fn mkdir(path: &str, parents: bool, mode: Option<u32>) -> Result<Response> {
    let p = guest_path(path)?;
    check_mode(mode)?;
    let existed = parents && p.is_dir();
    DirBuilder::new()
        .recursive(parents)
        .mode(mode.unwrap_or(0o755))
        .create(p)
        .map_err(|e| Failure::io(&e, format!("cannot create directory {path}")))?;
    if let (Some(mode), false) = (mode, existed) {
        fs::set_permissions(p, Permissions::from_mode(mode))
            .map_err(|e| Failure::io(&e, format!("cannot set the mode of {path}")))?;
    }
    Ok(Response::Ok)
}

/// Removes a file, symlink or (empty, unless `recursive`) directory.
pub fn remove(path: &str, recursive: bool) -> Result<Response> {
    let p = guest_path(path)?;
    let fail = |e: io::Error| Failure::io(&e, format!("cannot remove {path}"));
    let meta = fs::symlink_metadata(p).map_err(fail)?;
    if meta.is_dir() {
        if fs::canonicalize(p).map_err(fail)? == Path::new("/") {
            return Err(Failure::invalid("refusing to remove the root directory"));
        }
        if recursive {
            fs::remove_dir_all(p).map_err(fail)?;
        } else {
            fs::remove_dir(p).map_err(fail)?;
        }
    } else {
        fs::remove_file(p).map_err(fail)?;
    }
    Ok(Response::Ok)
}

/// Paths must be absolute: the agent's own working directory means nothing to the host.
pub(crate) fn guest_path(path: &str) -> Result<&Path> {
    if !path.starts_with('/') || path.contains('\0') {
        return Err(Failure::invalid(format!("path must be absolute: {path:?}")));
    }
    Ok(Path::new(path))
}

fn check_mode(mode: Option<u32>) -> Result<()> {
    match mode {
        Some(m) if m > 0o7777 => Err(Failure::invalid(format!("invalid mode {m:o}"))),
        _ => Ok(()),
    }
}

fn set_mode(file: &File, mode: u32, path: &str) -> Result<()> {
    file.set_permissions(Permissions::from_mode(mode))
        .map_err(|e| Failure::io(&e, format!("cannot set the mode of {path}")))
}

fn kind_of(meta: &fs::Metadata) -> FileKind {
    let t = meta.file_type();
    if t.is_file() {
        FileKind::File
    } else if t.is_dir() {
        FileKind::Dir
    } else if t.is_symlink() {
        FileKind::Symlink
    } else {
        FileKind::Other
    }
}

fn is_a_directory(path: &str) -> Failure {
    Failure::new(ErrorCode::IsADirectory, format!("{path} is a directory"))
}

fn cancelled(message: &str) -> Failure {
    Failure::new(ErrorCode::Cancelled, message)
}

/// A temporary file that is deleted unless it was renamed into place.
struct TempFile {
    path: PathBuf,
    file: File,
    kept: bool,
}

impl TempFile {
    fn create_in(dir: &Path) -> Result<TempFile> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = dir.join(format!(".kiln-{}-{n}.tmp", std::process::id()));
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| {
                Failure::io(
                    &e,
                    format!("cannot create a temporary file in {}", dir.display()),
                )
            })?;
        Ok(TempFile {
            path,
            file,
            kept: false,
        })
    }

    fn persist(mut self, to: &Path) -> io::Result<()> {
        fs::rename(&self.path, to)?;
        self.kept = true;
        Ok(())
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.kept {
            let _ = fs::remove_file(&self.path);
        }
    }
}

#[cfg(test)]
mod tests;
