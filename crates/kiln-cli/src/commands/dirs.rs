//! `kiln files upload-dir|download-dir|watch` and `kiln cp -r`: whole directories as tar streams.
//! The tar is built and unpacked on a blocking thread and handed to or from the HTTP body through a
//! bounded channel, so neither side holds more than a few chunks.

use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use bytes::Bytes;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use hyper::Method;
use serde_json::Value;
use tokio::sync::mpsc;

use crate::client::{encode, read_ndjson, ReqBody};
use crate::output::{human_bytes, print_json_or};
use crate::Cli;

const CHUNK: usize = 256 * 1024;
const QUEUE: usize = 8;

fn dir_path(sandbox: &str, suffix: &str, guest: &str) -> String {
    format!(
        "/v1/sandboxes/{}/files/{suffix}?path={}",
        encode(sandbox),
        encode(guest)
    )
}

/// A `Write` that hands full chunks to an async consumer (blocking while the queue is full).
struct ChunkSender {
    tx: mpsc::Sender<io::Result<Bytes>>,
    buf: Vec<u8>,
}

impl ChunkSender {
    fn push(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = Bytes::from(std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK)));
        self.tx
            .blocking_send(Ok(chunk))
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the upload stopped"))
    }
}

impl Write for ChunkSender {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = data.len().min(CHUNK - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == CHUNK {
            self.push()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.push()
    }
}

/// Packs `local` (a directory, entries named relative to it; symlinks kept as symlinks).
fn pack(local: &Path, out: ChunkSender) -> io::Result<()> {
    let mut builder = tar::Builder::new(out);
    builder.follow_symlinks(false);
    let mut todo = vec![PathBuf::new()];
    while let Some(rel) = todo.pop() {
        let dir = local.join(&rel);
        let mut names: Vec<_> = std::fs::read_dir(&dir)?
            .filter_map(|e| e.ok().map(|e| e.file_name()))
            .collect();
        names.sort();
        let mut subdirs = Vec::new();
        for name in names {
            let rel_child = rel.join(&name);
            let abs = dir.join(&name);
            let meta = std::fs::symlink_metadata(&abs)?;
            if std::os::unix::fs::FileTypeExt::is_socket(&meta.file_type()) {
                continue;
            }
            builder.append_path_with_name(&abs, &rel_child)?;
            if meta.is_dir() {
                subdirs.push(rel_child);
            }
        }
        todo.extend(subdirs.into_iter().rev());
    }
    builder.into_inner()?.flush()
}

pub async fn upload_dir(
    cli: &Cli,
    sandbox: &str,
    local: &Path,
    guest: &str,
) -> anyhow::Result<Value> {
    if !local.is_dir() {
        anyhow::bail!("{} is not a directory", local.display());
    }
    let (tx, rx) = mpsc::channel::<io::Result<Bytes>>(QUEUE);
    let root = local.to_path_buf();
    let packer = tokio::task::spawn_blocking(move || {
        let err_tx = tx.clone();
        let out = ChunkSender {
            tx,
            buf: Vec::with_capacity(CHUNK),
        };
        match pack(&root, out) {
            // The request ended early (the daemon refused it): its answer says why.
            Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(()),
            Err(e) => {
                // The request fails with it rather than sending a truncated tar.
                let msg = format!("cannot pack {}: {e}", root.display());
                let _ = err_tx.blocking_send(Err(io::Error::other(msg.clone())));
                Err(msg)
            }
            Ok(()) => Ok(()),
        }
    });
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item.map(Frame::data), rx))
    });
    let body: ReqBody = BodyExt::boxed(StreamBody::new(stream));
    let sent = cli
        .client()?
        .call(
            Method::PUT,
            &dir_path(sandbox, "dir", guest),
            Some("application/x-tar"),
            body,
        )
        .await;
    if let Ok(Err(msg)) = packer.await {
        anyhow::bail!(msg);
    }
    let bytes = sent?.into_body().collect().await?.to_bytes();
    Ok(serde_json::from_slice(&bytes)?)
}

/// A `Read` over chunks arriving from the async side.
struct ChunkReceiver {
    rx: mpsc::Receiver<Bytes>,
    chunk: Bytes,
}

impl Read for ChunkReceiver {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.chunk.is_empty() {
            match self.rx.blocking_recv() {
                Some(c) => self.chunk = c,
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.chunk.len());
        buf[..n].copy_from_slice(&self.chunk[..n]);
        self.chunk = self.chunk.slice(n..);
        Ok(n)
    }
}

/// Unpacks with the tar crate's confinement (`unpack_in` refuses paths that would leave `dest`), then sets
/// directory modes and mtimes deepest first (entries written into a directory change its mtime).
fn unpack(src: impl Read, dest: &Path) -> io::Result<()> {
    let mut archive = tar::Archive::new(src);
    archive.set_preserve_permissions(true);
    archive.set_preserve_mtime(true);
    let root = dest.canonicalize()?;
    let mut dirs = Vec::new();
    for entry in archive.entries()? {
        let mut entry = entry?;
        let path = entry.path()?.into_owned();
        let (is_dir, mode, mtime) = {
            let h = entry.header();
            (h.entry_type().is_dir(), h.mode().ok(), h.mtime().ok())
        };
        if !entry.unpack_in(dest)? {
            let msg = format!(
                "refusing tar entry {} from the guest: it would land outside {}",
                path.display(),
                dest.display()
            );
            return Err(io::Error::new(io::ErrorKind::InvalidData, msg));
        }
        if is_dir {
            dirs.push((dest.join(&path), mode, mtime));
        }
    }
    dirs.sort_by_key(|d| std::cmp::Reverse(d.0.components().count()));
    for (dir, mode, mtime) in dirs {
        // Only real directories still inside `dest` (never through a symlink).
        let inside = dir.canonicalize().is_ok_and(|c| c.starts_with(&root));
        let real = std::fs::symlink_metadata(&dir).is_ok_and(|m| m.is_dir());
        if !inside || !real {
            continue;
        }
        if let Some(mode) = mode {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(mode & 0o7777))?;
        }
        if let Some(t) = mtime {
            let when = std::time::UNIX_EPOCH + std::time::Duration::from_secs(t);
            std::fs::File::open(&dir)?.set_modified(when)?;
        }
    }
    Ok(())
}

/// Downloads the guest directory as a tar and unpacks it into `local` (created if missing). The tar
/// crate refuses entries that would land outside `local` (the guest is not trusted).
pub async fn download_dir(
    cli: &Cli,
    sandbox: &str,
    guest: &str,
    local: &Path,
) -> anyhow::Result<u64> {
    let resp = cli
        .client()?
        .call(
            Method::GET,
            &dir_path(sandbox, "dir", guest),
            None,
            crate::client::empty(),
        )
        .await?;
    std::fs::create_dir_all(local)
        .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", local.display()))?;
    let (tx, rx) = mpsc::channel::<Bytes>(QUEUE);
    let dest = local.to_path_buf();
    let unpacker = tokio::task::spawn_blocking(move || {
        unpack(
            ChunkReceiver {
                rx,
                chunk: Bytes::new(),
            },
            &dest,
        )
    });
    let mut body = resp.into_body();
    let mut total = 0u64;
    let mut failed = None;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => {
                if let Some(data) = frame.data_ref() {
                    total += data.len() as u64;
                    if tx.send(data.clone()).await.is_err() {
                        break;
                    }
                }
            }
            Err(e) => {
                failed = Some(e);
                break;
            }
        }
    }
    drop(tx);
    let unpacked = unpacker.await?;
    if let Some(e) = failed {
        anyhow::bail!("the download of {sandbox}:{guest} broke off after {total} bytes: {e}");
    }
    unpacked.map_err(|e| anyhow::anyhow!("cannot unpack into {}: {e}", local.display()))?;
    Ok(total)
}

pub async fn watch(
    cli: &Cli,
    sandbox: &str,
    guest: &str,
    recursive: bool,
) -> anyhow::Result<ExitCode> {
    let mut path = dir_path(sandbox, "watch", guest);
    if recursive {
        path.push_str("&recursive=true");
    }
    let resp = cli
        .client()?
        .call(Method::GET, &path, None, crate::client::empty())
        .await?;
    let json = cli.json;
    read_ndjson::<()>(resp.into_body(), |ev| {
        if json {
            println!("{ev}");
        } else {
            let slash = if ev["dir"].as_bool() == Some(true) {
                "/"
            } else {
                ""
            };
            println!(
                "{:<10} {}{slash}",
                ev["event"].as_str().unwrap_or("?"),
                ev["path"].as_str().unwrap_or("")
            );
        }
        io::stdout().flush()?;
        Ok(None)
    })
    .await?;
    Ok(ExitCode::SUCCESS)
}

pub fn report_upload(cli: &Cli, v: &Value, dest: &str) {
    print_json_or(cli, v, || {
        eprintln!(
            "copied {} entries ({}) to {dest}",
            v["entries"].as_u64().unwrap_or(0),
            human_bytes(v["bytes"].as_u64().unwrap_or(0))
        )
    });
}
