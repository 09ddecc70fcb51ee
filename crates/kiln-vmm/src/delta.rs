//! Memory deltas: the pages of a VM's private RAM mapping that differ from the immutable file it maps,
//! saved as a file against that file, and written back into a new VM's mapping before it runs.
//!
//! Layout (little-endian): a 4 KiB header — magic `KILNDLTA`, format version, page size, the base's size
//! and content identity (its checksum string), the number of ranges, where the range index is, the
//! index's and the header's own xxh3 — then the page data of every data range, then the index: per range
//! its offset and length in the base, its kind (data, or zero: a hole in a file cannot say "zero, unlike
//! the base"), where its data is and the data's xxh3. Ranges are sorted, page aligned, never overlap and
//! hold at most [`MAX_RUN`] bytes, so a range is checked whole before any of it is written.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Instant;

use crate::error::VmmError;
use crate::pagemap::{self, Region, ScanMethod, PAGE};

pub const MAGIC: &[u8; 8] = b"KILNDLTA";
pub const VERSION: u32 = 1;
const HEADER: u64 = 4096;
const BASE_ID_LEN: usize = 64;
const ENTRY: usize = 40;
/// Largest range: a range's data is checked in memory before it is written into the guest.
pub const MAX_RUN: u64 = 1 << 20;
const KIND_DATA: u32 = 0;
const KIND_ZERO: u32 = 1;

#[derive(Debug)]
pub enum DeltaError {
    /// The file is damaged (checksum mismatch, truncated, malformed).
    Corrupt(String),
    /// The file is a delta against another base.
    BaseMismatch(String),
    Io(VmmError),
}

impl std::fmt::Display for DeltaError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeltaError::Corrupt(s) | DeltaError::BaseMismatch(s) => f.write_str(s),
            DeltaError::Io(e) => write!(f, "{e}"),
        }
    }
}

impl From<VmmError> for DeltaError {
    fn from(e: VmmError) -> Self {
        DeltaError::Io(e)
    }
}

fn io_err(what: String, e: std::io::Error) -> DeltaError {
    DeltaError::Io(VmmError::io(what, e))
}

/// One range of the index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub offset: u64,
    pub len: u64,
    pub zero: bool,
    pub data_pos: u64,
    pub checksum: u64,
}

/// What a capture or an apply did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Stats {
    pub data_pages: u64,
    pub zero_pages: u64,
    pub ranges: u64,
    pub file_bytes: u64,
    pub scan_ms: f64,
    pub total_ms: f64,
    pub method: Option<ScanMethod>,
}

fn h64(b: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(b)
}

/// With the VM paused: writes the pages of `pid`'s private mapping of `base` that differ from it to
/// `out` (created; not fsynced). `base_id` is the base's content identity (its checksum).
pub fn capture(
    pid: u32,
    base: &Path,
    base_id: &str,
    out: &Path,
    force_words: bool,
) -> Result<Stats, DeltaError> {
    let started = Instant::now();
    if base_id.len() > BASE_ID_LEN {
        return Err(DeltaError::Corrupt("base identity too long".into()));
    }
    let base_size = std::fs::metadata(base)
        .map_err(|e| io_err(format!("stat {}", base.display()), e))?
        .len();
    let regions = pagemap::file_regions(pid, base)?;
    if regions.is_empty() {
        return Err(DeltaError::Io(VmmError::io(
            format!("guest RAM of pid {pid}"),
            std::io::Error::other(format!("{} is not mapped", base.display())),
        )));
    }
    let (ranges, method) = pagemap::private_ranges(pid, &regions, force_words)?;
    let scan_ms = started.elapsed().as_secs_f64() * 1000.0;
    let file = File::create(out).map_err(|e| io_err(format!("creating {}", out.display()), e))?;
    let mut w = std::io::BufWriter::with_capacity(1 << 20, &file);
    // The header is written last, over this placeholder.
    w.write_all(&[0u8; HEADER as usize])
        .map_err(|e| io_err(format!("writing {}", out.display()), e))?;
    let mut pos = HEADER;
    let mut entries: Vec<Entry> = Vec::new();
    let mut buf = vec![0u8; MAX_RUN as usize];
    let (mut data_pages, mut zero_pages) = (0u64, 0u64);
    for (s, e) in ranges {
        let e = e.min(base_size);
        let mut at = s;
        while at < e {
            let n = (e - at).min(MAX_RUN);
            let chunk = &mut buf[..n as usize];
            pagemap::read_at(pid, &regions, at, chunk)?;
            // Runs of data pages and of zero pages.
            let mut i = 0u64;
            while i < n {
                let page = |k: u64| &chunk[k as usize..(k + PAGE) as usize];
                let zero = page(i).iter().all(|b| *b == 0);
                let mut j = i + PAGE;
                while j < n && page(j).iter().all(|b| *b == 0) == zero {
                    j += PAGE;
                }
                let bytes = &chunk[i as usize..j as usize];
                let entry = if zero {
                    zero_pages += (j - i) / PAGE;
                    Entry {
                        offset: at + i,
                        len: j - i,
                        zero: true,
                        data_pos: 0,
                        checksum: 0,
                    }
                } else {
                    data_pages += (j - i) / PAGE;
                    w.write_all(bytes)
                        .map_err(|e| io_err(format!("writing {}", out.display()), e))?;
                    let en = Entry {
                        offset: at + i,
                        len: j - i,
                        zero: false,
                        data_pos: pos,
                        checksum: h64(bytes),
                    };
                    pos += j - i;
                    en
                };
                entries.push(entry);
                i = j;
            }
            at += n;
        }
    }
    let mut index = Vec::with_capacity(entries.len() * ENTRY);
    for en in &entries {
        index.extend_from_slice(&en.offset.to_le_bytes());
        index.extend_from_slice(&en.len.to_le_bytes());
        index.extend_from_slice(&(if en.zero { KIND_ZERO } else { KIND_DATA }).to_le_bytes());
        index.extend_from_slice(&0u32.to_le_bytes());
        index.extend_from_slice(&en.data_pos.to_le_bytes());
        index.extend_from_slice(&en.checksum.to_le_bytes());
    }
    w.write_all(&index)
        .map_err(|e| io_err(format!("writing {}", out.display()), e))?;
    w.flush()
        .map_err(|e| io_err(format!("writing {}", out.display()), e))?;
    drop(w);
    let header = header_bytes(base_size, base_id, entries.len() as u64, pos, h64(&index));
    file.write_all_at(&header, 0)
        .map_err(|e| io_err(format!("writing {}", out.display()), e))?;
    // Never publish a delta its own reader would refuse: check it as a restore will, so a bad capture
    // falls back to the full stream instead of leaving a snapshot that cannot be restored.
    let written = File::open(out).map_err(|e| io_err(format!("reopening {}", out.display()), e))?;
    read_index(&written, &out.display().to_string(), base_id, base_size)?;
    Ok(Stats {
        data_pages,
        zero_pages,
        ranges: entries.len() as u64,
        file_bytes: pos + index.len() as u64,
        scan_ms,
        total_ms: started.elapsed().as_secs_f64() * 1000.0,
        method: Some(method),
    })
}

fn header_bytes(
    base_size: u64,
    base_id: &str,
    count: u64,
    index_pos: u64,
    index_sum: u64,
) -> Vec<u8> {
    let mut h = Vec::with_capacity(128);
    h.extend_from_slice(MAGIC);
    h.extend_from_slice(&VERSION.to_le_bytes());
    h.extend_from_slice(&(PAGE as u32).to_le_bytes());
    h.extend_from_slice(&base_size.to_le_bytes());
    let mut id = [0u8; BASE_ID_LEN];
    id[..base_id.len()].copy_from_slice(base_id.as_bytes());
    h.extend_from_slice(&id);
    h.extend_from_slice(&count.to_le_bytes());
    h.extend_from_slice(&index_pos.to_le_bytes());
    h.extend_from_slice(&index_sum.to_le_bytes());
    let sum = h64(&h);
    h.extend_from_slice(&sum.to_le_bytes());
    h
}

fn le64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

fn le32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

/// Reads and checks a delta's header and index against the base it must apply to (`base_id`,
/// `base_size`). Range data is checked as it is used.
pub fn read_index(
    file: &File,
    name: &str,
    base_id: &str,
    base_size: u64,
) -> Result<Vec<Entry>, DeltaError> {
    let corrupt = |why: &str| DeltaError::Corrupt(format!("memory delta {name} is damaged: {why}"));
    let len = file
        .metadata()
        .map_err(|e| io_err(format!("stat {name}"), e))?
        .len();
    let mut h = [0u8; 128];
    if len < HEADER {
        return Err(corrupt("shorter than its header"));
    }
    file.read_exact_at(&mut h, 0)
        .map_err(|e| io_err(format!("reading {name}"), e))?;
    let body = 8 + 4 + 4 + 8 + BASE_ID_LEN + 8 + 8 + 8;
    if &h[..8] != MAGIC {
        return Err(corrupt("not a kiln memory delta"));
    }
    if le64(&h, body) != h64(&h[..body]) {
        return Err(corrupt("header checksum mismatch"));
    }
    if le32(&h, 8) != VERSION || le32(&h, 12) as u64 != PAGE {
        return Err(DeltaError::Corrupt(format!(
            "memory delta {name} has format {} with {}-byte pages; this kiln reads format {VERSION} with {PAGE}-byte pages",
            le32(&h, 8),
            le32(&h, 12)
        )));
    }
    let their_size = le64(&h, 16);
    let id = &h[24..24 + BASE_ID_LEN];
    let their_id =
        String::from_utf8_lossy(&id[..id.iter().position(|b| *b == 0).unwrap_or(BASE_ID_LEN)])
            .into_owned();
    if their_id != base_id || their_size != base_size {
        return Err(DeltaError::BaseMismatch(format!(
            "memory delta {name} was taken against a RAM file {their_id} of {their_size} bytes, but its base is {base_id} of {base_size} bytes"
        )));
    }
    let count = le64(&h, 24 + BASE_ID_LEN);
    let index_pos = le64(&h, 32 + BASE_ID_LEN);
    let index_sum = le64(&h, 40 + BASE_ID_LEN);
    let index_len = count
        .checked_mul(ENTRY as u64)
        .filter(|n| index_pos.checked_add(*n) == Some(len) && index_pos >= HEADER)
        .ok_or_else(|| corrupt("its index does not end the file (truncated or extended)"))?;
    let mut index = vec![0u8; index_len as usize];
    file.read_exact_at(&mut index, index_pos)
        .map_err(|e| io_err(format!("reading {name}"), e))?;
    if h64(&index) != index_sum {
        return Err(corrupt("index checksum mismatch"));
    }
    let mut out = Vec::with_capacity(count as usize);
    let (mut end, mut data) = (0u64, HEADER);
    for e in index.chunks_exact(ENTRY) {
        let en = Entry {
            offset: le64(e, 0),
            len: le64(e, 8),
            zero: le32(e, 16) == KIND_ZERO,
            data_pos: le64(e, 24),
            checksum: le64(e, 32),
        };
        let kind = le32(e, 16);
        let ok = (kind == KIND_DATA || kind == KIND_ZERO)
            && en.offset.is_multiple_of(PAGE)
            && en.len.is_multiple_of(PAGE)
            && en.len > 0
            && en.len <= MAX_RUN
            && en.offset >= end
            && en
                .offset
                .checked_add(en.len)
                .is_some_and(|x| x <= base_size)
            && (en.zero || en.data_pos == data);
        if !ok {
            return Err(corrupt("its index has a malformed range"));
        }
        end = en.offset + en.len;
        if !en.zero {
            data += en.len;
        }
        out.push(en);
    }
    if data != index_pos {
        return Err(corrupt("its data does not match its index"));
    }
    Ok(out)
}

/// A range's bytes, checked against its checksum.
pub fn range_data(file: &File, name: &str, en: &Entry, buf: &mut [u8]) -> Result<(), DeltaError> {
    let buf = &mut buf[..en.len as usize];
    if en.zero {
        buf.fill(0);
        return Ok(());
    }
    file.read_exact_at(buf, en.data_pos)
        .map_err(|e| io_err(format!("reading {name}"), e))?;
    if h64(buf) != en.checksum {
        return Err(DeltaError::Corrupt(format!(
            "memory delta {name} is damaged: checksum mismatch in the range at {:#x}",
            en.offset
        )));
    }
    Ok(())
}

/// Into a VM that is not running yet (`-incoming defer`, state loaded): writes every range of `delta`
/// into `pid`'s private mapping of `base`, after checking it is a delta against that base.
pub fn apply(pid: u32, base: &Path, base_id: &str, delta: &Path) -> Result<Stats, DeltaError> {
    let started = Instant::now();
    let name = delta.display().to_string();
    let base_size = std::fs::metadata(base)
        .map_err(|e| io_err(format!("stat {}", base.display()), e))?
        .len();
    let file = File::open(delta).map_err(|e| io_err(format!("opening {name}"), e))?;
    let entries = read_index(&file, &name, base_id, base_size)?;
    let regions = pagemap::file_regions(pid, base)?;
    let mut buf = vec![0u8; MAX_RUN as usize];
    // Every range is checked before any is written: a damaged delta leaves the guest's RAM as it was.
    for en in &entries {
        range_data(&file, &name, en, &mut buf)?;
    }
    let (mut data_pages, mut zero_pages) = (0u64, 0u64);
    for en in &entries {
        range_data(&file, &name, en, &mut buf)?;
        pagemap::write_at(pid, &regions, en.offset, &buf[..en.len as usize])?;
        if en.zero {
            zero_pages += en.len / PAGE;
        } else {
            data_pages += en.len / PAGE;
        }
    }
    Ok(Stats {
        data_pages,
        zero_pages,
        ranges: entries.len() as u64,
        file_bytes: file.metadata().map(|m| m.len()).unwrap_or(0),
        scan_ms: 0.0,
        total_ms: started.elapsed().as_secs_f64() * 1000.0,
        method: None,
    })
}

/// xxh3 of `pid`'s whole mapping of `base`, in file order (a check that a restore is exact: compare a
/// paused source with a restored copy before it runs).
pub fn mapping_digest(pid: u32, base: &Path) -> Result<u64, VmmError> {
    let regions = pagemap::file_regions(pid, base)?;
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut regs: Vec<Region> = regions.clone();
    regs.sort_by_key(|r| r.offset);
    for r in &regs {
        let mut at = r.offset;
        let end = r.offset + (r.end - r.start);
        while at < end {
            let n = (end - at).min(buf.len() as u64) as usize;
            pagemap::read_at(pid, &regions, at, &mut buf[..n])?;
            h.update(&buf[..n]);
            at += n as u64;
        }
    }
    Ok(h.digest())
}

/// xxh3 of `base` patched with `delta` (`skip`: leave out that range, a negative control), computed the
/// same way as [`mapping_digest`] over the first `len` bytes.
pub fn patched_digest(
    base: &Path,
    delta: &Path,
    base_id: &str,
    len: u64,
    skip: Option<usize>,
) -> Result<u64, DeltaError> {
    let name = delta.display().to_string();
    let b = File::open(base).map_err(|e| io_err(format!("opening {}", base.display()), e))?;
    let base_size = b.metadata().map_err(|e| io_err("stat".into(), e))?.len();
    let d = File::open(delta).map_err(|e| io_err(format!("opening {name}"), e))?;
    let entries = read_index(&d, &name, base_id, base_size)?;
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    let mut buf = vec![0u8; MAX_RUN as usize];
    let mut at = 0u64;
    let mut next = entries
        .iter()
        .enumerate()
        .filter(|(i, _)| Some(*i) != skip)
        .peekable();
    while at < len {
        if let Some((_, en)) = next.peek().filter(|(_, en)| en.offset == at) {
            range_data(&d, &name, en, &mut buf)?;
            h.update(&buf[..en.len as usize]);
            at += en.len;
            next.next();
            continue;
        }
        let stop = next.peek().map_or(len, |(_, en)| en.offset).min(len);
        let n = (stop - at).min(MAX_RUN) as usize;
        buf[..n].fill(0);
        // Past the file's end the mapping reads zeros.
        let got = b
            .read_at(&mut buf[..n], at)
            .map_err(|e| io_err("reading base".into(), e))?;
        if got < n {
            let mut filled = got;
            while filled < n {
                match b.read_at(&mut buf[filled..n], at + filled as u64) {
                    Ok(0) => break,
                    Ok(k) => filled += k,
                    Err(e) => return Err(io_err("reading base".into(), e)),
                }
            }
            buf[filled..n].fill(0);
        }
        h.update(&buf[..n]);
        at += n as u64;
    }
    Ok(h.digest())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::io::AsRawFd;

    /// A delta captured from a private mapping in this process: applied to a second mapping of the same
    /// base it reproduces the first exactly; dropping a range does not; a damaged or foreign delta is
    /// refused before anything is written.
    #[test]
    fn capture_then_apply_reproduces_the_mapping() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base");
        let len = 512 * PAGE;
        let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        std::fs::write(&base, &data).unwrap();
        let map = || {
            let f = File::open(&base).unwrap();
            // SAFETY: a fresh private mapping of a file this test owns.
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
            p as *mut u8
        };
        let a = map();
        // SAFETY: within the mapping: a data run crossing MAX_RUN, zeroed pages, a lone page.
        unsafe {
            for i in 10..300u64 {
                *a.add((i * PAGE + 5) as usize) = 0xee;
            }
            std::ptr::write_bytes(a.add((400 * PAGE) as usize), 0, (3 * PAGE) as usize);
            *a.add((511 * PAGE) as usize) = 1;
        }
        let pid = std::process::id();
        let out = dir.path().join("delta");
        let st = capture(pid, &base, "xxh3:test", &out, false).unwrap();
        assert_eq!(st.data_pages, 291);
        assert_eq!(st.zero_pages, 3);
        let want = mapping_digest(pid, &base).unwrap();
        assert_eq!(
            patched_digest(&base, &out, "xxh3:test", len, None).unwrap(),
            want
        );
        assert_ne!(
            patched_digest(&base, &out, "xxh3:test", len, Some(1)).unwrap(),
            want
        );
        // SAFETY: unmapping `a`; then `b` is the only mapping of the base, unchanged.
        unsafe { libc::munmap(a.cast(), len as usize) };
        let b = map();
        let before = mapping_digest(pid, &base).unwrap();
        assert_ne!(before, want);
        // A foreign base is refused.
        assert!(matches!(
            apply(pid, &base, "xxh3:other", &out),
            Err(DeltaError::BaseMismatch(_))
        ));
        // A flipped data byte is refused.
        let mut bytes = std::fs::read(&out).unwrap();
        bytes[HEADER as usize + 3] ^= 1;
        let bad = dir.path().join("bad");
        std::fs::write(&bad, &bytes).unwrap();
        assert!(matches!(
            apply(pid, &base, "xxh3:test", &bad),
            Err(DeltaError::Corrupt(_))
        ));
        // A truncated one too.
        std::fs::write(&bad, &std::fs::read(&out).unwrap()[..5000]).unwrap();
        assert!(matches!(
            apply(pid, &base, "xxh3:test", &bad),
            Err(DeltaError::Corrupt(_))
        ));
        apply(pid, &base, "xxh3:test", &out).unwrap();
        assert_eq!(mapping_digest(pid, &base).unwrap(), want);
        // SAFETY: unmapping `b`.
        unsafe { libc::munmap(b.cast(), len as usize) };
    }
}
