//! Guest-RAM files and the memory of live QEMU processes.
//!
//! Snapshots keep guest RAM as an immutable *base* file that restored VMs map privately (copy-on-write),
//! plus an optional *delta*: the pages a VM changed since its base, read out of the QEMU process through
//! `/proc/PID/pagemap` and `/proc/PID/mem`, and written back into a new VM the same way before it runs.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;

use crate::error::VmmError;

pub const PAGE_SIZE: u64 = 4096;

/// Copies `src` to `dst` preserving holes (only data extents are copied). Does not fsync: callers that
/// copy while a VM is paused sync afterwards, outside the pause.
/// Returns the number of data bytes copied.
pub fn sparse_copy(src: &Path, dst: &Path) -> Result<u64, VmmError> {
    let io = |what: &str, p: &Path, e: std::io::Error| {
        VmmError::io(format!("{what} {}", p.display()), e)
    };
    let input = File::open(src).map_err(|e| io("opening", src, e))?;
    let len = input.metadata().map_err(|e| io("stat", src, e))?.len();
    let output = File::create(dst).map_err(|e| io("creating", dst, e))?;
    output.set_len(len).map_err(|e| io("sizing", dst, e))?;
    let mut copied = 0u64;
    let mut pos: i64 = 0;
    let len_i = len as i64;
    while pos < len_i {
        // SAFETY: lseek on a valid fd.
        let data = unsafe { libc::lseek(input.as_raw_fd(), pos, libc::SEEK_DATA) };
        if data < 0 {
            break; // ENXIO: no more data
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(input.as_raw_fd(), data, libc::SEEK_HOLE) };
        let end = if hole < 0 { len_i } else { hole };
        let mut off_in = data;
        let mut off_out = data;
        while off_in < end {
            let want = (end - off_in) as usize;
            // SAFETY: copy_file_range between two valid fds with valid offset pointers.
            let n = unsafe {
                libc::copy_file_range(
                    input.as_raw_fd(),
                    &mut off_in,
                    output.as_raw_fd(),
                    &mut off_out,
                    want,
                    0,
                )
            };
            if n < 0 {
                let err = std::io::Error::last_os_error();
                // Across filesystems (or where the kernel cannot offload) copy through a buffer instead.
                if matches!(
                    err.raw_os_error(),
                    Some(libc::EXDEV | libc::ENOSYS | libc::EOPNOTSUPP | libc::EINVAL)
                ) {
                    copied += copy_range_buffered(&input, &output, off_in as u64, end as u64)
                        .map_err(|e| io("copying to", dst, e))?;
                    break;
                }
                return Err(io("copying to", dst, err));
            }
            if n == 0 {
                break;
            }
            copied += n as u64;
        }
        pos = end;
    }
    Ok(copied)
}

/// Copies `[from, to)` of `input` to the same offsets of `output` through a buffer.
fn copy_range_buffered(input: &File, output: &File, from: u64, to: u64) -> std::io::Result<u64> {
    let mut buf = vec![0u8; 1 << 20];
    let mut pos = from;
    while pos < to {
        let want = ((to - pos) as usize).min(buf.len());
        let n = input.read_at(&mut buf[..want], pos)?;
        if n == 0 {
            break;
        }
        output.write_all_at(&buf[..n], pos)?;
        pos += n as u64;
    }
    Ok(pos - from)
}

/// Where a file is mapped in a process: `(start address, length, file offset)`.
pub fn find_mapping(pid: u32, file: &Path) -> Result<(u64, u64, u64), VmmError> {
    let maps_path = format!("/proc/{pid}/maps");
    let maps = std::fs::read_to_string(&maps_path)
        .map_err(|e| VmmError::io(format!("reading {maps_path}"), e))?;
    let want = file.to_string_lossy();
    let mut found: Option<(u64, u64, u64)> = None;
    for line in maps.lines() {
        let mut parts = line.split_whitespace();
        let (Some(range), Some(_perms), Some(offset)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        let path = line
            .split_whitespace()
            .skip(5)
            .collect::<Vec<_>>()
            .join(" ");
        let matches = path == want || path == format!("{want} (deleted)");
        if !matches {
            continue;
        }
        let Some((a, b)) = range.split_once('-') else {
            continue;
        };
        let (Ok(a), Ok(b), Ok(off)) = (
            u64::from_str_radix(a, 16),
            u64::from_str_radix(b, 16),
            u64::from_str_radix(offset, 16),
        ) else {
            continue;
        };
        // Keep the largest mapping of the file (QEMU maps guest RAM once).
        if found.is_none_or(|(_, len, _)| b - a > len) {
            found = Some((a, b - a, off));
        }
    }
    found.ok_or_else(|| {
        VmmError::io(
            format!("finding the mapping of {want} in process {pid}"),
            std::io::ErrorKind::NotFound.into(),
        )
    })
}

/// Pages of a mapping that the process has written privately (copy-on-write anonymous pages), as page
/// indices relative to `start`. Untouched pages and pages still shared with the file are not included.
pub fn private_pages(pid: u32, start: u64, len: u64) -> Result<Vec<u64>, VmmError> {
    let path = format!("/proc/{pid}/pagemap");
    let f = File::open(&path).map_err(|e| VmmError::io(format!("opening {path}"), e))?;
    let pages = len / PAGE_SIZE;
    let mut out = Vec::new();
    let chunk_pages = 64 * 1024u64;
    let mut buf = vec![0u8; (chunk_pages * 8) as usize];
    let mut i = 0u64;
    while i < pages {
        let n = chunk_pages.min(pages - i);
        let bytes = &mut buf[..(n * 8) as usize];
        f.read_exact_at(bytes, (start / PAGE_SIZE + i) * 8)
            .map_err(|e| VmmError::io(format!("reading {path}"), e))?;
        for (j, entry) in bytes.chunks_exact(8).enumerate() {
            let e = u64::from_le_bytes(entry.try_into().unwrap_or([0; 8]));
            let present = e & (1 << 63) != 0;
            let swapped = e & (1 << 62) != 0;
            let file_or_shared = e & (1 << 61) != 0;
            if (present || swapped) && !file_or_shared {
                out.push(i + j as u64);
            }
        }
        i += n;
    }
    Ok(out)
}

/// Reads whole pages of another process's memory.
pub fn read_pages(
    pid: u32,
    start: u64,
    pages: &[u64],
    mut sink: impl FnMut(u64, &[u8]) -> Result<(), VmmError>,
) -> Result<(), VmmError> {
    let path = format!("/proc/{pid}/mem");
    let f = File::open(&path).map_err(|e| VmmError::io(format!("opening {path}"), e))?;
    let mut buf = vec![0u8; PAGE_SIZE as usize];
    for &p in pages {
        f.read_exact_at(&mut buf, start + p * PAGE_SIZE)
            .map_err(|e| VmmError::io(format!("reading page {p} of process {pid}"), e))?;
        sink(p, &buf)?;
    }
    Ok(())
}

/// Writes whole pages into another process's memory (used on a stopped VM before it runs).
pub fn write_pages<'a>(
    pid: u32,
    start: u64,
    pages: impl Iterator<Item = (u64, &'a [u8])>,
) -> Result<u64, VmmError> {
    let path = format!("/proc/{pid}/mem");
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .map_err(|e| VmmError::io(format!("opening {path}"), e))?;
    let mut n = 0;
    for (p, data) in pages {
        f.write_all_at(data, start + p * PAGE_SIZE)
            .map_err(|e| VmmError::io(format!("writing page {p} of process {pid}"), e))?;
        n += 1;
    }
    Ok(n)
}

/// Delta file: `KLNDLT01`, page size (u32), page count (u64), the page indices (u64 each), then the pages.
pub const DELTA_MAGIC: &[u8; 8] = b"KLNDLT01";

pub fn write_delta(path: &Path, pid: u32, start: u64, pages: &[u64]) -> Result<u64, VmmError> {
    let io = |e: std::io::Error| VmmError::io(format!("writing {}", path.display()), e);
    let f = File::create(path).map_err(io)?;
    let mut w = std::io::BufWriter::with_capacity(1 << 20, f);
    w.write_all(DELTA_MAGIC).map_err(io)?;
    w.write_all(&(PAGE_SIZE as u32).to_le_bytes()).map_err(io)?;
    w.write_all(&(pages.len() as u64).to_le_bytes())
        .map_err(io)?;
    for p in pages {
        w.write_all(&p.to_le_bytes()).map_err(io)?;
    }
    read_pages(pid, start, pages, |_, data| w.write_all(data).map_err(io))?;
    let f = w.into_inner().map_err(|e| io(e.into_error()))?;
    f.sync_all().map_err(io)?;
    Ok(pages.len() as u64 * PAGE_SIZE)
}

/// Reads a delta file into (indices, page data).
pub fn read_delta(path: &Path) -> Result<(Vec<u64>, Vec<u8>), VmmError> {
    let io = |e: std::io::Error| VmmError::io(format!("reading {}", path.display()), e);
    let mut f = std::io::BufReader::new(File::open(path).map_err(io)?);
    let mut head = [0u8; 20];
    f.read_exact(&mut head).map_err(io)?;
    if &head[..8] != DELTA_MAGIC
        || u32::from_le_bytes([head[8], head[9], head[10], head[11]]) as u64 != PAGE_SIZE
    {
        return Err(VmmError::io(
            format!("{} is not a kiln memory delta", path.display()),
            std::io::ErrorKind::InvalidData.into(),
        ));
    }
    let count = u64::from_le_bytes(head[12..20].try_into().unwrap_or([0; 8]));
    let max_pages = 1u64 << 26; // 256 GiB of guest RAM
    if count > max_pages {
        return Err(VmmError::io(
            format!("{} claims {count} pages", path.display()),
            std::io::ErrorKind::InvalidData.into(),
        ));
    }
    let mut idx = vec![0u8; (count * 8) as usize];
    f.read_exact(&mut idx).map_err(io)?;
    let indices: Vec<u64> = idx
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
        .collect();
    let mut data = vec![0u8; (count * PAGE_SIZE) as usize];
    f.read_exact(&mut data).map_err(io)?;
    Ok((indices, data))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn sparse_copy_keeps_holes_and_data() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        let f = File::create(&src).unwrap();
        f.set_len(64 << 20).unwrap();
        f.write_all_at(b"hello", 0).unwrap();
        f.write_all_at(b"world", 40 << 20).unwrap();
        drop(f);
        let dst = dir.path().join("dst");
        let copied = sparse_copy(&src, &dst).unwrap();
        assert!(
            copied < 1 << 20,
            "copied {copied} bytes of a mostly empty file"
        );
        assert_eq!(std::fs::read(&src).unwrap(), std::fs::read(&dst).unwrap());
        assert!(std::fs::metadata(&dst).unwrap().blocks() * 512 < 1 << 20);
    }

    #[test]
    fn private_pages_of_a_cow_mapping_are_found_and_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ram");
        std::fs::write(&path, vec![7u8; 16 * PAGE_SIZE as usize]).unwrap();
        let file = File::open(&path).unwrap();
        // SAFETY: a private, read-write mapping of a file we own, unmapped at the end of the test.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                16 * PAGE_SIZE as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE,
                file.as_raw_fd(),
                0,
            )
        };
        assert_ne!(addr, libc::MAP_FAILED);
        let base = addr as *mut u8;
        // SAFETY: within the mapping.
        unsafe {
            let _ = std::ptr::read_volatile(base.add(PAGE_SIZE as usize)); // read only: stays a file page
            *base.add(3 * PAGE_SIZE as usize) = 1;
            *base.add(9 * PAGE_SIZE as usize + 5) = 2;
        }
        let pid = std::process::id();
        let (start, len, _) = find_mapping(pid, &path).unwrap();
        assert_eq!(start, addr as u64);
        let pages = private_pages(pid, start, len).unwrap();
        assert_eq!(pages, vec![3, 9]);
        let delta = dir.path().join("delta");
        write_delta(&delta, pid, start, &pages).unwrap();
        let (idx, data) = read_delta(&delta).unwrap();
        assert_eq!(idx, vec![3, 9]);
        assert_eq!(data[0], 1);
        assert_eq!(data[PAGE_SIZE as usize + 5], 2);
        // Write the pages back over fresh values through /proc/self/mem.
        // SAFETY: within the mapping.
        unsafe { *base.add(3 * PAGE_SIZE as usize) = 42 };
        let n = write_pages(
            pid,
            start,
            idx.iter().copied().zip(data.chunks(PAGE_SIZE as usize)),
        )
        .unwrap();
        assert_eq!(n, 2);
        // SAFETY: within the mapping.
        assert_eq!(
            unsafe { std::ptr::read_volatile(base.add(3 * PAGE_SIZE as usize)) },
            1
        );
        // SAFETY: unmapping what we mapped.
        unsafe { libc::munmap(addr, 16 * PAGE_SIZE as usize) };
    }
}
