//! The pages of a QEMU's private (copy-on-write) mapping of a RAM file that differ from the file, and
//! reading/writing them in the paused process.
//!
//! A sandbox resumed from a snapshot maps the snapshot's immutable RAM file privately: a page the guest
//! wrote is an anonymous copy-on-write page of QEMU, every other page still reads the file. So the pages
//! that differ from the file are exactly those present and not file-backed, or swapped out. They are found
//! with the `PAGEMAP_SCAN` ioctl (Linux 6.7+) or, on older kernels, by reading `/proc/PID/pagemap` words;
//! never through PFNs, which race with compaction (a page being migrated reads as a swap entry here, and is
//! counted as changed).

use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::os::unix::io::AsRawFd;
use std::path::Path;

use crate::error::VmmError;

pub const PAGE: u64 = 4096;

/// One VMA of the process that maps (part of) the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region {
    pub start: u64,
    pub end: u64,
    /// File offset mapped at `start`.
    pub offset: u64,
}

/// The VMAs of `pid` that map `file` (matched by device and inode, so any hard link counts), sorted by
/// file offset.
pub fn file_regions(pid: u32, file: &Path) -> Result<Vec<Region>, VmmError> {
    let meta =
        std::fs::metadata(file).map_err(|e| VmmError::io(format!("stat {}", file.display()), e))?;
    let (major, minor) = (libc::major(meta.dev()), libc::minor(meta.dev()));
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .map_err(|e| VmmError::io(format!("reading /proc/{pid}/maps"), e))?;
    let mut out = Vec::new();
    for line in maps.lines() {
        let mut f = line.split_whitespace();
        let (Some(range), Some(_perms), Some(off), Some(dev), Some(ino)) =
            (f.next(), f.next(), f.next(), f.next(), f.next())
        else {
            continue;
        };
        if ino.parse::<u64>().ok() != Some(meta.ino()) {
            continue;
        }
        let Some((ma, mi)) = dev.split_once(':') else {
            continue;
        };
        if u32::from_str_radix(ma, 16).ok() != Some(major)
            || u32::from_str_radix(mi, 16).ok() != Some(minor)
        {
            continue;
        }
        let (Some((s, e)), Ok(offset)) = (range.split_once('-'), u64::from_str_radix(off, 16))
        else {
            continue;
        };
        if let (Ok(start), Ok(end)) = (u64::from_str_radix(s, 16), u64::from_str_radix(e, 16)) {
            out.push(Region { start, end, offset });
        }
    }
    out.sort_by_key(|r| r.offset);
    // The same part of the file mapped twice would leave it unclear which mapping is guest RAM: reading
    // or writing the wrong one would lose pages silently, so refuse (a capture then falls back to the
    // full stream).
    for w in out.windows(2) {
        if w[1].offset < w[0].offset + (w[0].end - w[0].start) {
            return Err(VmmError::io(
                format!("guest RAM of pid {pid}"),
                std::io::Error::other(format!(
                    "{} is mapped more than once at file offset {:#x}",
                    file.display(),
                    w[1].offset
                )),
            ));
        }
    }
    Ok(out)
}

/// How the changed pages were found (reported in benchmarks and logs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScanMethod {
    PagemapScan,
    PagemapWords,
}

/// File ranges `[from, to)` (page aligned, sorted, merged) of the private pages of `regions` in `pid`.
pub fn private_ranges(
    pid: u32,
    regions: &[Region],
    force_words: bool,
) -> Result<(Vec<(u64, u64)>, ScanMethod), VmmError> {
    let pagemap = File::open(format!("/proc/{pid}/pagemap"))
        .map_err(|e| VmmError::io(format!("opening /proc/{pid}/pagemap"), e))?;
    let mut method = ScanMethod::PagemapScan;
    let mut out: Vec<(u64, u64)> = Vec::new();
    for r in regions {
        let mut found = Vec::new();
        let scanned = if force_words || method == ScanMethod::PagemapWords {
            None
        } else {
            scan_ioctl(&pagemap, r.start, r.end, &mut found)?
        };
        if scanned.is_none() {
            method = ScanMethod::PagemapWords;
            found.clear();
            scan_words(&pagemap, r.start, r.end, &mut found)
                .map_err(|e| VmmError::io(format!("reading /proc/{pid}/pagemap"), e))?;
        }
        for (s, e) in found {
            push_merged(&mut out, s - r.start + r.offset, e - r.start + r.offset);
        }
    }
    Ok((union(out), method))
}

/// Sorted, disjoint ranges covering exactly the pages of `ranges`, which may overlap or repeat:
/// `PAGEMAP_SCAN` can report a `walk_end` before the last region it returned (seen on 6.18 with a 512
/// MiB mapping), so the next call reports those regions again.
fn union(mut ranges: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    ranges.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
    for (s, e) in ranges {
        match merged.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => merged.push((s, e)),
        }
    }
    merged
}

fn push_merged(v: &mut Vec<(u64, u64)>, s: u64, e: u64) {
    match v.last_mut() {
        Some(last) if last.1 == s => last.1 = e,
        _ => v.push((s, e)),
    }
}

const PAGE_IS_FILE: u64 = 1 << 2;
const PAGE_IS_PRESENT: u64 = 1 << 3;
const PAGE_IS_SWAPPED: u64 = 1 << 4;

#[repr(C)]
#[derive(Default)]
struct PmScanArg {
    size: u64,
    flags: u64,
    start: u64,
    end: u64,
    walk_end: u64,
    vec: u64,
    vec_len: u64,
    max_pages: u64,
    category_inverted: u64,
    category_mask: u64,
    category_anyof_mask: u64,
    return_mask: u64,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct PageRegion {
    start: u64,
    end: u64,
    categories: u64,
}

/// `_IOWR('f', 16, struct pm_scan_arg)`.
const PAGEMAP_SCAN: u64 =
    (3 << 30) | ((std::mem::size_of::<PmScanArg>() as u64) << 16) | (0x66 << 8) | 16;

/// Pages that are (present or swapped) and not file pages, via `PAGEMAP_SCAN`. Ok(None) when the kernel
/// does not have the ioctl.
fn scan_ioctl(
    pagemap: &File,
    start: u64,
    end: u64,
    out: &mut Vec<(u64, u64)>,
) -> Result<Option<()>, VmmError> {
    let mut vec = vec![PageRegion::default(); 4096];
    let mut pos = start;
    while pos < end {
        let mut arg = PmScanArg {
            size: std::mem::size_of::<PmScanArg>() as u64,
            start: pos,
            end,
            vec: vec.as_mut_ptr() as u64,
            vec_len: vec.len() as u64,
            category_inverted: PAGE_IS_FILE,
            category_mask: PAGE_IS_FILE,
            category_anyof_mask: PAGE_IS_PRESENT | PAGE_IS_SWAPPED,
            return_mask: PAGE_IS_PRESENT | PAGE_IS_SWAPPED,
            ..Default::default()
        };
        // SAFETY: the ioctl writes at most vec_len regions into `vec` and updates `arg`.
        let n = unsafe { libc::ioctl(pagemap.as_raw_fd(), PAGEMAP_SCAN as _, &mut arg) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if matches!(e.raw_os_error(), Some(libc::ENOTTY | libc::EINVAL)) && pos == start {
                return Ok(None);
            }
            return Err(VmmError::io("PAGEMAP_SCAN", e));
        }
        for r in &vec[..n as usize] {
            push_merged(out, r.start, r.end);
        }
        if arg.walk_end <= pos {
            return Err(VmmError::io(
                "PAGEMAP_SCAN",
                std::io::Error::other("the scan made no progress"),
            ));
        }
        pos = arg.walk_end;
    }
    Ok(Some(()))
}

const PM_PRESENT: u64 = 1 << 63;
const PM_SWAP: u64 = 1 << 62;
const PM_FILE: u64 = 1 << 61;

/// The same from `/proc/PID/pagemap` words (kernels before 6.7).
fn scan_words(
    pagemap: &File,
    start: u64,
    end: u64,
    out: &mut Vec<(u64, u64)>,
) -> std::io::Result<()> {
    const WORDS: u64 = 8192;
    let mut buf = vec![0u8; (WORDS * 8) as usize];
    let mut page = start / PAGE;
    let last = end / PAGE;
    while page < last {
        let n = (last - page).min(WORDS);
        let bytes = &mut buf[..(n * 8) as usize];
        pagemap.read_exact_at(bytes, page * 8)?;
        for (i, w) in bytes.chunks_exact(8).enumerate() {
            let mut word = [0u8; 8];
            word.copy_from_slice(w);
            let w = u64::from_ne_bytes(word);
            if w & (PM_PRESENT | PM_SWAP) != 0 && w & PM_FILE == 0 {
                let addr = (page + i as u64) * PAGE;
                push_merged(out, addr, addr + PAGE);
            }
        }
        page += n;
    }
    Ok(())
}

/// The process address of file offset `off` (which must lie in one of `regions`).
pub fn address_of(regions: &[Region], off: u64) -> Option<u64> {
    regions
        .iter()
        .find(|r| off >= r.offset && off < r.offset + (r.end - r.start))
        .map(|r| r.start + (off - r.offset))
}

/// Reads `buf.len()` bytes at file offset `off` of the mapping from `pid` (`process_vm_readv`; the
/// range may span VMAs).
pub fn read_at(pid: u32, regions: &[Region], off: u64, buf: &mut [u8]) -> Result<(), VmmError> {
    transfer(pid, regions, off, buf.len(), |addr, done, len| {
        let local = libc::iovec {
            iov_base: buf[done..].as_mut_ptr().cast(),
            iov_len: len,
        };
        let remote = libc::iovec {
            iov_base: addr as *mut libc::c_void,
            iov_len: len,
        };
        // SAFETY: `local` points into `buf` with `len` bytes of room.
        unsafe { libc::process_vm_readv(pid as i32, &local, 1, &remote, 1, 0) }
    })
}

/// Writes `data` at file offset `off` of the mapping in `pid` (`process_vm_writev`): the pages become the
/// process's private copies.
pub fn write_at(pid: u32, regions: &[Region], off: u64, data: &[u8]) -> Result<(), VmmError> {
    transfer(pid, regions, off, data.len(), |addr, done, len| {
        let local = libc::iovec {
            iov_base: data[done..].as_ptr() as *mut libc::c_void,
            iov_len: len,
        };
        let remote = libc::iovec {
            iov_base: addr as *mut libc::c_void,
            iov_len: len,
        };
        // SAFETY: `local` points into `data` with `len` readable bytes; the kernel only reads it.
        unsafe { libc::process_vm_writev(pid as i32, &local, 1, &remote, 1, 0) }
    })
}

fn transfer(
    pid: u32,
    regions: &[Region],
    off: u64,
    len: usize,
    mut call: impl FnMut(u64, usize, usize) -> isize,
) -> Result<(), VmmError> {
    let mut done = 0usize;
    while done < len {
        let at = off + done as u64;
        let region = regions
            .iter()
            .find(|r| at >= r.offset && at < r.offset + (r.end - r.start))
            .ok_or_else(|| {
                VmmError::io(
                    format!("guest RAM of pid {pid}"),
                    std::io::Error::other(format!("offset {at:#x} is not mapped")),
                )
            })?;
        let room = (region.offset + (region.end - region.start) - at) as usize;
        let n = (len - done).min(room);
        let r = call(region.start + (at - region.offset), done, n);
        if r <= 0 {
            let e = if r < 0 {
                std::io::Error::last_os_error()
            } else {
                std::io::Error::other("no progress")
            };
            return Err(VmmError::io(
                format!("accessing the guest RAM of pid {pid} at {at:#x}"),
                e,
            ));
        }
        done += r as usize;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeated_and_overlapping_scan_regions_become_disjoint_ranges() {
        let p = |a: u64, b: u64| (a * PAGE, b * PAGE);
        // A second PAGEMAP_SCAN call from an early walk_end repeats regions already returned.
        let got = union(vec![
            p(0, 1),
            p(5, 7),
            p(9, 10),
            p(5, 7),
            p(9, 10),
            p(6, 8),
            p(1, 2),
        ]);
        assert_eq!(got, vec![p(0, 2), p(5, 8), p(9, 10)]);
        assert_eq!(union(Vec::new()), Vec::new());
    }

    /// A private mapping of a file made in this process: the pages written (and only those) are found,
    /// by both methods, and reads/writes through process_vm_{read,write}v see the mapping's bytes.
    #[test]
    fn private_pages_of_a_file_mapping_are_found_by_both_methods() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("base");
        let f = File::create(&path).unwrap();
        let len = 64 * PAGE;
        f.write_all_at(&vec![0xabu8; len as usize], 0).unwrap();
        drop(f);
        let f = File::open(&path).unwrap();
        // SAFETY: a fresh private mapping of a file we own, unmapped at the end of the test.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE,
                f.as_raw_fd(),
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        let base = p as *mut u8;
        // SAFETY: within the mapping.
        unsafe {
            // Read faults (file pages, not changed), then writes to pages 3, 4, 10 and 63.
            for i in 0..64 {
                std::ptr::read_volatile(base.add((i * PAGE) as usize));
            }
            for i in [3u64, 4, 10, 63] {
                *base.add((i * PAGE + 7) as usize) = i as u8;
            }
        }
        let pid = std::process::id();
        let regions = file_regions(pid, &path).unwrap();
        assert_eq!(regions.len(), 1, "{regions:?}");
        let want = vec![
            (3 * PAGE, 5 * PAGE),
            (10 * PAGE, 11 * PAGE),
            (63 * PAGE, 64 * PAGE),
        ];
        let (words, m) = private_ranges(pid, &regions, true).unwrap();
        assert_eq!(m, ScanMethod::PagemapWords);
        assert_eq!(words, want);
        let (scan, m) = private_ranges(pid, &regions, false).unwrap();
        eprintln!("scan method: {m:?}");
        assert_eq!(scan, want);
        let mut page = vec![0u8; PAGE as usize];
        read_at(pid, &regions, 10 * PAGE, &mut page).unwrap();
        assert_eq!(page[7], 10);
        assert_eq!(page[8], 0xab);
        // A write makes a file page private.
        write_at(pid, &regions, 20 * PAGE, &[1, 2, 3]).unwrap();
        let (after, _) = private_ranges(pid, &regions, false).unwrap();
        assert!(after.contains(&(20 * PAGE, 21 * PAGE)), "{after:?}");
        // A dropped private page reads the file again and is no longer counted.
        // SAFETY: within the mapping.
        unsafe {
            libc::madvise(
                base.add((63 * PAGE) as usize).cast(),
                PAGE as usize,
                libc::MADV_DONTNEED,
            )
        };
        let (after, _) = private_ranges(pid, &regions, true).unwrap();
        assert!(!after.iter().any(|r| r.1 > 63 * PAGE), "{after:?}");
        read_at(pid, &regions, 63 * PAGE, &mut page).unwrap();
        assert!(page.iter().all(|b| *b == 0xab));
        // SAFETY: unmapping what was mapped above.
        unsafe { libc::munmap(p, len as usize) };
    }
}
