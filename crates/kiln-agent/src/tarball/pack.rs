//! Packing a guest directory into a tar stream for the host.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, TryRecvError};

use kiln_proto::{ErrorCode, Event, FrameKind, Response, DATA_CHUNK};

use crate::conn::{Inbound, Stream};
use crate::failure::{code_of, Failure, Result};

/// Frames written as `Data`, a full chunk at a time; a `Cancel` from the host stops the writer.
struct Outflow<'a> {
    stream: &'a Stream,
    rx: &'a Receiver<Inbound>,
    buf: Vec<u8>,
    sent: u64,
    cancelled: bool,
}

impl Outflow<'_> {
    fn flush_chunk(&mut self) -> io::Result<()> {
        match self.rx.try_recv() {
            Ok(Inbound::Cancel | Inbound::Detached) | Err(TryRecvError::Disconnected) => {
                self.cancelled = true;
                return Err(io::Error::other("download cancelled"));
            }
            Ok(_) | Err(TryRecvError::Empty) => {}
        }
        if !self.buf.is_empty() {
            self.stream.send(FrameKind::Data, &self.buf);
            self.sent += self.buf.len() as u64;
            self.buf.clear();
        }
        Ok(())
    }
}

impl Write for Outflow<'_> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = data.len().min(DATA_CHUNK - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == DATA_CHUNK {
            self.flush_chunk()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Streams a tar of the tree at `path`: entries named relative to it, symlinks not followed, sockets
/// skipped (tar cannot hold them).
pub fn pack(stream: &Stream, rx: &Receiver<Inbound>, path: &str) -> Result<Response> {
    let root = crate::files::guest_path(path)?;
    let meta = fs::metadata(root).map_err(|e| Failure::io(&e, format!("cannot stat {path}")))?;
    if !meta.is_dir() {
        return Err(Failure::new(
            ErrorCode::NotADirectory,
            format!("{path} is not a directory"),
        ));
    }
    stream.event(&Event::ReadStart {
        size: 0,
        mode: meta.mode() & 0o7777,
    });
    let out = Outflow {
        stream,
        rx,
        buf: Vec::with_capacity(DATA_CHUNK),
        sent: 0,
        cancelled: false,
    };
    let mut builder = tar::Builder::new(out);
    builder.follow_symlinks(false);
    let result = pack_tree(&mut builder, root);
    let mut out = builder
        .into_inner()
        .map_err(|e| Failure::io(&e, "cannot finish the tar stream"));
    if let Ok(out) = &mut out {
        if out.cancelled {
            return Err(Failure::new(ErrorCode::Cancelled, "download cancelled"));
        }
    }
    result?;
    let mut out = out?;
    out.flush_chunk()
        .map_err(|_| Failure::new(ErrorCode::Cancelled, "download cancelled"))?;
    Ok(Response::ReadDone { bytes: out.sent })
}

/// Stays on `root`'s filesystem (like `tar --one-file-system`): a mount point below it is stored as an
/// empty directory, so a tar of `/` does not descend into /proc (whose kcore claims 128 TiB), /sys or /dev.
fn pack_tree(builder: &mut tar::Builder<Outflow<'_>>, root: &Path) -> Result<()> {
    let root_dev = fs::metadata(root)
        .map_err(|e| Failure::io(&e, format!("cannot stat {}", root.display())))?
        .dev();
    let mut todo: Vec<PathBuf> = vec![PathBuf::new()];
    while let Some(rel) = todo.pop() {
        let dir = root.join(&rel);
        let mut names: Vec<_> = match fs::read_dir(&dir) {
            Ok(rd) => rd.filter_map(|e| e.ok().map(|e| e.file_name())).collect(),
            // A directory removed while we pack is skipped, like an entry that vanished.
            Err(e) if e.kind() == io::ErrorKind::NotFound && !rel.as_os_str().is_empty() => {
                continue
            }
            Err(e) => return Err(Failure::io(&e, format!("cannot list {}", dir.display()))),
        };
        names.sort();
        // Pushed in reverse so the stack pops them in name order.
        let mut subdirs = Vec::new();
        for name in names {
            let rel_child = rel.join(&name);
            let abs = dir.join(&name);
            let Ok(meta) = fs::symlink_metadata(&abs) else {
                continue;
            };
            let t = meta.file_type();
            if std::os::unix::fs::FileTypeExt::is_socket(&t) {
                continue;
            }
            match builder.append_path_with_name(&abs, &rel_child) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => {
                    let code = code_of(&e);
                    return Err(Failure::new(
                        code,
                        format!("cannot pack {}: {e}", abs.display()),
                    ));
                }
            }
            if t.is_dir() && meta.dev() == root_dev {
                subdirs.push(rel_child);
            }
        }
        todo.extend(subdirs.into_iter().rev());
    }
    Ok(())
}
