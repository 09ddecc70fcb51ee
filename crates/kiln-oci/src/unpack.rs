//! Flattening image layers into one root filesystem directory, in order, as overlayfs would see them:
//! whiteouts (`.wh.NAME`) delete what lower layers put there, opaque markers (`.wh..wh..opq`) empty a
//! directory of lower-layer content, and hard links, symlinks, device nodes, ownership and modes are kept.
//!
//! A layer is untrusted input: no entry may create or change anything outside the root. Paths with `..`
//! or that are absolute are taken relative to the root and `..` never climbs above it; a symlink met on
//! the way to an entry is resolved inside the root (as the guest will see it), never on the host; the
//! entry itself is created without following a symlink that may already be there.

use std::collections::HashSet;
use std::ffi::CString;
use std::fs;
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use anyhow::{bail, Context, Result};

const WHITEOUT: &str = ".wh.";
const OPAQUE: &str = ".wh..wh..opq";
/// As Linux's path resolution: more symlinks than this on one path is a loop.
const MAX_SYMLINKS: usize = 40;

/// Opens a layer blob, undoing gzip or zstd compression (recognised by their magic numbers, so the media
/// type's spelling does not matter).
pub fn open_layer(path: &Path) -> Result<Box<dyn Read>> {
    let mut file = fs::File::open(path).with_context(|| format!("open {}", path.display()))?;
    let mut magic = [0u8; 4];
    let n = read_full(&mut file, &mut magic)?;
    let head = io::Cursor::new(magic[..n].to_vec());
    let stream = head.chain(file);
    Ok(match magic {
        [0x1f, 0x8b, ..] => Box::new(flate2::read::MultiGzDecoder::new(stream)),
        [0x28, 0xb5, 0x2f, 0xfd] => Box::new(
            ruzstd::decoding::StreamingDecoder::new(stream)
                .map_err(|e| anyhow::anyhow!("{}: bad zstd stream: {e}", path.display()))?,
        ),
        _ => Box::new(stream),
    })
}

fn read_full(r: &mut impl Read, buf: &mut [u8]) -> Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// Totals of one layer, for the caller's report.
#[derive(Debug, Default, Clone, Copy)]
pub struct UnpackStats {
    pub entries: u64,
    pub bytes: u64,
    pub whiteouts: u64,
}

/// Applies one layer (a tar stream) on top of `root`.
pub fn apply_layer(root: &Path, layer: impl Read) -> Result<UnpackStats> {
    let mut archive = tar::Archive::new(layer);
    let mut stats = UnpackStats::default();
    // What this layer itself created: its own whiteouts and opaque markers only hide lower layers.
    let mut created: HashSet<PathBuf> = HashSet::new();
    for entry in archive.entries().context("read the layer")? {
        let mut entry = entry.context("read the layer")?;
        let raw = entry.path().context("entry path")?.into_owned();
        let Some(rel) = clean(&raw) else {
            continue; // the root itself: its attributes come from kiln
        };
        stats.entries += 1;
        let name = rel
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let parent_rel = rel.parent().unwrap_or(Path::new("")).to_path_buf();
        let parent = resolve(root, &parent_rel, true)?;
        if name == OPAQUE {
            stats.whiteouts += 1;
            if parent.is_dir() && !is_symlink(&parent) {
                clear_lower(&parent, &parent_rel, &created)?;
            }
            continue;
        }
        if let Some(hidden) = name.strip_prefix(WHITEOUT) {
            stats.whiteouts += 1;
            if hidden.is_empty() || hidden == "." || hidden == ".." || hidden.contains('/') {
                bail!("layer entry {} is not a valid whiteout", raw.display());
            }
            if !created.contains(&parent_rel.join(hidden)) {
                remove_any(&parent.join(hidden))?;
            }
            continue;
        }
        // Directories on the way that the layer did not list (tar files may omit them).
        fs::create_dir_all(&parent).with_context(|| format!("create {}", parent.display()))?;
        let target = parent.join(&name);
        let header = entry.header().clone();
        let kind = header.entry_type();
        let mode = header.mode().unwrap_or(0o644) & 0o7777;
        let (uid, gid) = (
            header.uid().unwrap_or(0) as u32,
            header.gid().unwrap_or(0) as u32,
        );
        let mtime = header.mtime().unwrap_or(0) as i64;
        let xattrs = pax_xattrs(&mut entry)?;
        if kind.is_dir() {
            if !fs::symlink_metadata(&target).is_ok_and(|m| m.is_dir()) {
                remove_any(&target)?;
                fs::create_dir(&target).with_context(|| format!("mkdir {}", target.display()))?;
            }
        } else {
            remove_any(&target)?;
            if kind.is_file() || kind == tar::EntryType::Continuous {
                let mut file = fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(&target)
                    .with_context(|| format!("create {}", target.display()))?;
                stats.bytes += io::copy(&mut entry, &mut file)
                    .with_context(|| format!("write {}", target.display()))?;
            } else if kind.is_symlink() {
                let link = entry
                    .link_name()
                    .context("symlink target")?
                    .context("symlink without target")?;
                // The target is only ever resolved by the guest, inside its own root.
                symlink(&link, &target).with_context(|| format!("symlink {}", target.display()))?;
            } else if kind.is_hard_link() {
                let link = entry
                    .link_name()
                    .context("hard link target")?
                    .context("hard link without target")?;
                let Some(link_rel) = clean(&link) else {
                    bail!("hard link {} points at the root", raw.display());
                };
                // Resolve the target's directory in the root, but not its last component: a hard link
                // to a symlink links the symlink.
                let link_parent = resolve(root, link_rel.parent().unwrap_or(Path::new("")), true)?;
                let source = link_parent.join(link_rel.file_name().unwrap_or_default());
                let meta = fs::symlink_metadata(&source).with_context(|| {
                    format!(
                        "hard link {} to {}, which the layers do not contain",
                        raw.display(),
                        link.display()
                    )
                })?;
                if meta.is_dir() {
                    bail!("hard link {} points at a directory", raw.display());
                }
                fs::hard_link(&source, &target)
                    .with_context(|| format!("link {}", target.display()))?;
                created.insert(rel.clone());
                continue; // a hard link shares its inode's owner and mode
            } else if kind.is_character_special() || kind.is_block_special() || kind.is_fifo() {
                let kind_bits = if kind.is_character_special() {
                    libc::S_IFCHR
                } else if kind.is_block_special() {
                    libc::S_IFBLK
                } else {
                    libc::S_IFIFO
                };
                let dev = libc::makedev(
                    header.device_major().ok().flatten().unwrap_or(0),
                    header.device_minor().ok().flatten().unwrap_or(0),
                );
                let c = cstr(&target)?;
                // SAFETY: `c` is a valid NUL-terminated path that outlives the call.
                if unsafe { libc::mknod(c.as_ptr(), kind_bits | mode, dev) } != 0 {
                    return Err(io::Error::last_os_error())
                        .with_context(|| format!("mknod {}", target.display()));
                }
            } else {
                // PAX/GNU metadata entries are consumed by the tar reader; anything else (sockets,
                // unknown types) has no place in an image.
                tracing::debug!(path = %raw.display(), kind = ?kind, "skipping layer entry");
                continue;
            }
        }
        set_owner_mode_time(&target, uid, gid, mode, mtime, kind.is_symlink())?;
        // After the chown, which would clear a file capability.
        set_xattrs(&target, &xattrs)?;
        created.insert(rel);
    }
    Ok(stats)
}

/// Extended attributes recorded for an entry as PAX `SCHILY.xattr.NAME` records (GNU tar, Docker,
/// buildah and umoci write them so), e.g. `security.capability` for a file capability.
fn pax_xattrs(entry: &mut tar::Entry<'_, impl Read>) -> Result<Vec<(CString, Vec<u8>)>> {
    let mut out = Vec::new();
    let Some(pax) = entry.pax_extensions().context("read PAX records")? else {
        return Ok(out);
    };
    for ext in pax {
        let ext = ext.context("read PAX records")?;
        let Ok(key) = ext.key() else { continue };
        if let Some(name) = key.strip_prefix("SCHILY.xattr.") {
            if let Ok(name) = CString::new(name) {
                out.push((name, ext.value_bytes().to_vec()));
            }
        }
    }
    Ok(out)
}

/// Sets extended attributes without following a symlink. Attributes the host cannot hold here (an
/// unprivileged run, `user.*` on a symlink, a namespace the filesystem lacks) are skipped with a
/// warning; mkfs.ext4 -d then copies what was set into the image.
fn set_xattrs(path: &Path, xattrs: &[(CString, Vec<u8>)]) -> Result<()> {
    if xattrs.is_empty() {
        return Ok(());
    }
    let c = cstr(path)?;
    for (name, value) in xattrs {
        // SAFETY: valid NUL-terminated strings and a buffer of the length given.
        let rc = unsafe {
            libc::lsetxattr(
                c.as_ptr(),
                name.as_ptr(),
                value.as_ptr().cast(),
                value.len(),
                0,
            )
        };
        if rc != 0 {
            let err = io::Error::last_os_error();
            match err.raw_os_error() {
                Some(libc::EPERM | libc::EOPNOTSUPP | libc::EACCES) => {
                    tracing::warn!(path = %path.display(), xattr = ?name, error = %err, "extended attribute not kept")
                }
                _ => {
                    return Err(err).with_context(|| {
                        format!("set extended attribute {name:?} on {}", path.display())
                    })
                }
            }
        }
    }
    Ok(())
}

/// `path` made relative with `.` and leading `/` dropped and `..` refused by clamping: `a/../../b` is
/// `b`, never above the root. None for the root itself.
fn clean(path: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::ParentDir => {
                out.pop();
            }
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    (!out.as_os_str().is_empty()).then_some(out)
}

/// The host path of `rel` inside `root`, following symlinks as the guest would (absolute targets
/// start again at `root`, `..` stops at it), so the result is always under `root`. With `follow_last`
/// false the last component is not followed.
fn resolve(root: &Path, rel: &Path, follow_last: bool) -> Result<PathBuf> {
    let mut pending: Vec<std::ffi::OsString> = rel
        .components()
        .rev()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n.to_os_string()),
            Component::ParentDir => Some("..".into()),
            _ => None,
        })
        .collect();
    let mut current = PathBuf::new(); // relative to root, symlink-free
    let mut hops = 0;
    while let Some(part) = pending.pop() {
        if part == ".." {
            current.pop();
            continue;
        }
        let candidate = current.join(&part);
        let host = root.join(&candidate);
        let is_last = pending.is_empty();
        match fs::symlink_metadata(&host) {
            Ok(meta) if meta.file_type().is_symlink() && (follow_last || !is_last) => {
                hops += 1;
                if hops > MAX_SYMLINKS {
                    bail!("too many symlinks resolving {}", rel.display());
                }
                let target = fs::read_link(&host)?;
                if target.is_absolute() {
                    current = PathBuf::new();
                }
                for c in target.components().rev() {
                    match c {
                        Component::Normal(n) => pending.push(n.to_os_string()),
                        Component::ParentDir => pending.push("..".into()),
                        _ => {}
                    }
                }
            }
            _ => current = candidate,
        }
    }
    Ok(root.join(current))
}

fn is_symlink(path: &Path) -> bool {
    fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink())
}

/// Removes whatever is at `path` (file, link, node or whole directory) without following symlinks.
fn remove_any(path: &Path) -> Result<()> {
    match fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("inspect {}", path.display())),
        Ok(m) if m.is_dir() => {
            fs::remove_dir_all(path).with_context(|| format!("remove {}", path.display()))
        }
        Ok(_) => fs::remove_file(path).with_context(|| format!("remove {}", path.display())),
    }
}

/// Empties `dir` of what lower layers put there, keeping what this layer already created in it.
fn clear_lower(dir: &Path, dir_rel: &Path, created: &HashSet<PathBuf>) -> Result<()> {
    for entry in fs::read_dir(dir).with_context(|| format!("read {}", dir.display()))? {
        let entry = entry?;
        let rel = dir_rel.join(entry.file_name());
        if created.contains(&rel) {
            if entry.file_type()?.is_dir() {
                clear_lower(&entry.path(), &rel, created)?;
            }
            continue;
        }
        remove_any(&entry.path())?;
    }
    Ok(())
}

fn cstr(path: &Path) -> Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .with_context(|| format!("path {} contains a NUL byte", path.display()))
}

/// lchown, then chmod (chown clears set-uid bits), then the modification time; none follows a symlink.
fn set_owner_mode_time(
    path: &Path,
    uid: u32,
    gid: u32,
    mode: u32,
    mtime: i64,
    is_symlink: bool,
) -> Result<()> {
    let c = cstr(path)?;
    // SAFETY: `c` is a valid NUL-terminated path that outlives the call.
    if unsafe { libc::lchown(c.as_ptr(), uid, gid) } != 0 {
        let err = io::Error::last_os_error();
        // Unprivileged runs cannot give files away; the image still works for root in the guest.
        if err.raw_os_error() != Some(libc::EPERM) {
            return Err(err).with_context(|| format!("chown {}", path.display()));
        }
    }
    if !is_symlink {
        fs::set_permissions(path, fs::Permissions::from_mode(mode))
            .with_context(|| format!("chmod {}", path.display()))?;
    }
    let times = [
        libc::timespec {
            tv_sec: mtime,
            tv_nsec: 0,
        },
        libc::timespec {
            tv_sec: mtime,
            tv_nsec: 0,
        },
    ];
    // SAFETY: valid path and a two-element timespec array, as utimensat requires.
    unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    Ok(())
}

#[cfg(test)]
#[path = "unpack_tests.rs"]
mod tests;
