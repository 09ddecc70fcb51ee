//! Guest-RAM files: snapshots keep guest RAM as an immutable file that restored VMs map privately
//! (copy-on-write), so copying a RAM file quickly and without filling its holes matters.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;

use crate::error::VmmError;

/// Copies `src` to `dst` preserving holes (only data extents are copied). Does not fsync: callers that
/// copy while a VM is paused sync afterwards, outside the pause.
/// Returns the number of data bytes copied.
pub fn sparse_copy(src: &Path, dst: &Path) -> Result<u64, VmmError> {
    let output =
        File::create(dst).map_err(|e| VmmError::io(format!("creating {}", dst.display()), e))?;
    sparse_copy_into(src, &output, dst)
}

/// Like [`sparse_copy`], into `output`, an open file (named `dst` in errors) that holds no data yet:
/// sized to `src`'s length here, never truncated (it may already be mapped, e.g. by a QEMU that waits for
/// its incoming state), and only `src`'s data extents are written.
pub fn sparse_copy_into(src: &Path, output: &File, dst: &Path) -> Result<u64, VmmError> {
    let io = |what: &str, p: &Path, e: std::io::Error| {
        VmmError::io(format!("{what} {}", p.display()), e)
    };
    // A VM's RAM file may sit where its (hostile) uid could have planted a link or FIFO.
    let input = crate::safefs::open_read(src).map_err(|e| io("opening", src, e))?;
    let len = input.metadata().map_err(|e| io("stat", src, e))?.len();
    if output.metadata().map_err(|e| io("stat", dst, e))?.len() != len {
        output.set_len(len).map_err(|e| io("sizing", dst, e))?;
    }
    let mut copied = 0u64;
    let mut pos: i64 = 0;
    let len_i = len as i64;
    while pos < len_i {
        // Only ENXIO means "no data past pos". A file whose filesystem cannot answer (EINVAL) is copied
        // from here on in full; any other error fails the copy rather than leaving zeros where data was.
        let (data, end) = match seek(&input, pos, libc::SEEK_DATA) {
            Ok(data) => match seek(&input, data, libc::SEEK_HOLE) {
                Ok(hole) => (data, hole.min(len_i)),
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => (data, len_i),
                Err(e) => return Err(io("finding holes in", src, e)),
            },
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => break,
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => (pos, len_i),
            Err(e) => return Err(io("finding data in", src, e)),
        };
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
                    copied += copy_range_buffered(&input, output, off_in as u64, end as u64)
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

/// Like [`sparse_copy`], but through a buffer: each piece of data is handed to `seen(offset, bytes)` in
/// file order before it is written (so a caller can checksum the file in the same pass), and writeback of
/// `dst` is started as the copy goes (`sync_file_range`), so the caller's fsync finds little left to write
/// and the disk works while the copy still runs. Returns the number of data bytes copied.
pub fn sparse_copy_inspect(
    src: &Path,
    dst: &Path,
    mut seen: impl FnMut(u64, &[u8]),
) -> Result<u64, VmmError> {
    let io = |what: &str, p: &Path, e: std::io::Error| {
        VmmError::io(format!("{what} {}", p.display()), e)
    };
    let input = crate::safefs::open_read(src).map_err(|e| io("opening", src, e))?;
    let len = input.metadata().map_err(|e| io("stat", src, e))?.len();
    let output = File::create(dst).map_err(|e| io("creating", dst, e))?;
    output.set_len(len).map_err(|e| io("sizing", dst, e))?;
    let mut buf = vec![0u8; CHUNK];
    let mut copied = 0u64;
    // Written but not yet handed to writeback.
    let mut unflushed_from = 0u64;
    let mut pos: i64 = 0;
    while let Some((data, end)) =
        next_extent(&input, pos, len as i64).map_err(|e| io("finding data in", src, e))?
    {
        let mut off = data as u64;
        while off < end as u64 {
            let want = ((end as u64 - off) as usize).min(buf.len());
            let n = input
                .read_at(&mut buf[..want], off)
                .map_err(|e| io("reading", src, e))?;
            if n == 0 {
                break;
            }
            seen(off, &buf[..n]);
            output
                .write_all_at(&buf[..n], off)
                .map_err(|e| io("copying to", dst, e))?;
            off += n as u64;
            copied += n as u64;
            if off - unflushed_from >= WRITEBACK_STEP {
                start_writeback(&output, unflushed_from, off);
                unflushed_from = off;
            }
        }
        pos = end;
    }
    start_writeback(&output, unflushed_from, len);
    Ok(copied)
}

/// Read in pieces of this size.
const CHUNK: usize = 1 << 20;
/// Hand written data to writeback every this many bytes.
const WRITEBACK_STEP: u64 = 8 << 20;

/// Asks the kernel to start writing `[from, to)` of `f` back, without waiting (a hint: errors are left
/// to the caller's fsync).
fn start_writeback(f: &File, from: u64, to: u64) {
    if to <= from {
        return;
    }
    // SAFETY: sync_file_range on a valid fd; it only schedules I/O.
    unsafe {
        libc::sync_file_range(
            f.as_raw_fd(),
            from as i64,
            (to - from) as i64,
            libc::SYNC_FILE_RANGE_WRITE,
        )
    };
}

/// The next data extent `[data, end)` at or after `pos`, None when there is no more data. Only ENXIO
/// means "no data past pos"; a file whose filesystem cannot answer (EINVAL) is data from here on; any
/// other error fails rather than leaving zeros where data was.
fn next_extent(input: &File, pos: i64, len: i64) -> std::io::Result<Option<(i64, i64)>> {
    if pos >= len {
        return Ok(None);
    }
    match seek(input, pos, libc::SEEK_DATA) {
        Ok(data) if data >= len => Ok(None),
        Ok(data) => match seek(input, data, libc::SEEK_HOLE) {
            Ok(hole) => Ok(Some((data, hole.min(len)))),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(Some((data, len))),
            Err(e) => Err(e),
        },
        Err(e) if e.raw_os_error() == Some(libc::ENXIO) => Ok(None),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(Some((pos, len))),
        Err(e) => Err(e),
    }
}

/// `lseek(2)` with SEEK_DATA/SEEK_HOLE, as a Result.
fn seek(f: &File, pos: i64, whence: libc::c_int) -> std::io::Result<i64> {
    // SAFETY: lseek on a valid fd.
    let r = unsafe { libc::lseek(f.as_raw_fd(), pos, whence) };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(r)
    }
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
    fn inspecting_copy_sees_every_data_byte_in_order_and_keeps_holes() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        let f = File::create(&src).unwrap();
        f.set_len(64 << 20).unwrap();
        f.write_all_at(&[7u8; 3 << 20], 1 << 20).unwrap();
        f.write_all_at(b"world", 40 << 20).unwrap();
        drop(f);
        let dst = dir.path().join("dst");
        let mut pieces = Vec::new();
        let copied =
            sparse_copy_inspect(&src, &dst, |off, b| pieces.push((off, b.to_vec()))).unwrap();
        assert_eq!(std::fs::read(&src).unwrap(), std::fs::read(&dst).unwrap());
        assert!(std::fs::metadata(&dst).unwrap().blocks() * 512 < 8 << 20);
        let seen: u64 = pieces.iter().map(|(_, b)| b.len() as u64).sum();
        assert_eq!(seen, copied);
        assert!(pieces
            .windows(2)
            .all(|w| w[0].0 + w[0].1.len() as u64 <= w[1].0));
        let whole = std::fs::read(&src).unwrap();
        for (off, b) in &pieces {
            assert_eq!(&whole[*off as usize..*off as usize + b.len()], &b[..]);
        }
        assert!(pieces
            .iter()
            .any(|(off, b)| *off <= 40 << 20 && off + b.len() as u64 >= (40 << 20) + 5));
    }

    /// procfs answers SEEK_DATA with EINVAL (a real file, no mock): that is not "no more data", and the
    /// copy must hold the file's bytes, not zeros of its length.
    #[test]
    fn a_file_that_cannot_seek_data_is_copied_in_full() {
        let src = Path::new("/proc/cmdline");
        let len = std::fs::metadata(src).unwrap().len();
        if len == 0 {
            eprintln!("skipped: this kernel reports /proc/cmdline as empty");
            return;
        }
        let input = File::open(src).unwrap();
        assert_eq!(
            seek(&input, 0, libc::SEEK_DATA).map_err(|e| e.raw_os_error()),
            Err(Some(libc::EINVAL)),
            "the test needs a file whose SEEK_DATA fails with EINVAL"
        );
        let dir = tempfile::tempdir().unwrap();
        let dst = dir.path().join("dst");
        let copied = sparse_copy(src, &dst).unwrap();
        let want = std::fs::read(src).unwrap();
        assert_eq!(copied, want.len() as u64);
        assert_eq!(&std::fs::read(&dst).unwrap()[..want.len()], &want[..]);
    }
}
