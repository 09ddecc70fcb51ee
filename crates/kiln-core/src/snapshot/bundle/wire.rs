//! The byte-level pieces of a bundle: a writer and a reader that hash and count everything passing
//! through them, and the checksum a manifest records for a file, computed as its pieces go by.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;

use sha2::Digest;
use xxhash_rust::xxh3::Xxh3;

use crate::error::{Error, ErrorCode, Result};

/// Writes through, hashing and counting every byte (for the trailer).
pub(super) struct HashingWriter<W: Write> {
    pub inner: W,
    pub hash: Xxh3,
    pub pos: u64,
}

impl<W: Write> HashingWriter<W> {
    pub fn new(inner: W) -> Self {
        HashingWriter {
            inner,
            hash: Xxh3::new(),
            pos: 0,
        }
    }

    pub fn put(&mut self, b: &[u8]) -> std::io::Result<()> {
        self.inner.write_all(b)?;
        self.hash.update(b);
        self.pos += b.len() as u64;
        Ok(())
    }
}

/// Reads, hashing and counting every byte, so an error can say where the bundle went wrong.
pub(super) struct CountingReader<R: Read> {
    inner: R,
    pub hash: Xxh3,
    pub pos: u64,
}

impl<R: Read> CountingReader<R> {
    pub fn new(inner: R) -> Self {
        CountingReader {
            inner,
            hash: Xxh3::new(),
            pos: 0,
        }
    }

    pub fn exact(&mut self, buf: &mut [u8]) -> Result<()> {
        let mut got = 0;
        while got < buf.len() {
            match self.inner.read(&mut buf[got..]) {
                Ok(0) => {
                    return Err(damaged(
                        self.pos + got as u64,
                        "the bundle ends here (truncated)".into(),
                    ))
                }
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    return Err(damaged(
                        self.pos + got as u64,
                        format!("reading the bundle failed ({e})"),
                    ))
                }
            }
        }
        self.hash.update(buf);
        self.pos += buf.len() as u64;
        Ok(())
    }

    pub fn u8(&mut self) -> Result<u8> {
        let mut b = [0u8; 1];
        self.exact(&mut b)?;
        Ok(b[0])
    }
    pub fn u16(&mut self) -> Result<u16> {
        let mut b = [0u8; 2];
        self.exact(&mut b)?;
        Ok(u16::from_le_bytes(b))
    }
    pub fn u32(&mut self) -> Result<u32> {
        let mut b = [0u8; 4];
        self.exact(&mut b)?;
        Ok(u32::from_le_bytes(b))
    }
    pub fn u64(&mut self) -> Result<u64> {
        let mut b = [0u8; 8];
        self.exact(&mut b)?;
        Ok(u64::from_le_bytes(b))
    }
    pub fn vec(&mut self, n: usize) -> Result<Vec<u8>> {
        let mut v = vec![0u8; n];
        self.exact(&mut v)?;
        Ok(v)
    }
    /// Whether anything follows (read after the trailer: a bundle with extra bytes is not whole).
    pub fn at_end(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.inner.read(&mut b), Ok(0))
    }
}

/// A damaged bundle: `snapshot_corrupt` naming the byte offset.
pub(super) fn damaged(offset: u64, why: String) -> Error {
    Error::new(
        ErrorCode::SnapshotCorrupt,
        format!("the bundle is damaged at byte {offset}: {why}; nothing was imported (export it again, or copy it again whole)"),
    )
}

/// The checksum a manifest records for a file (`xxh3:` by kiln, `sha256:` for template files), computed
/// from the file's pieces in order, holes as zeros.
pub(super) enum ContentHash {
    Xxh3(Box<Xxh3>),
    Sha256(sha2::Sha256),
}

impl ContentHash {
    /// For a file whose recorded checksum is `like`.
    pub fn like(like: &str) -> Option<ContentHash> {
        match like.split_once(':') {
            Some(("xxh3", _)) => Some(ContentHash::Xxh3(Box::new(Xxh3::new()))),
            Some(("sha256", _)) => Some(ContentHash::Sha256(sha2::Sha256::new())),
            _ => None,
        }
    }

    pub fn update(&mut self, b: &[u8]) {
        match self {
            ContentHash::Xxh3(h) => h.update(b),
            ContentHash::Sha256(h) => h.update(b),
        }
    }

    pub fn zeros(&mut self, mut n: u64) {
        static ZEROS: [u8; 1 << 16] = [0; 1 << 16];
        while n > 0 {
            let k = n.min(ZEROS.len() as u64) as usize;
            self.update(&ZEROS[..k]);
            n -= k as u64;
        }
    }

    pub fn finish(self) -> String {
        match self {
            ContentHash::Xxh3(h) => format!("xxh3:{:016x}", h.digest()),
            ContentHash::Sha256(h) => format!("sha256:{}", hex::encode(h.finalize())),
        }
    }
}

/// The next data extent `[data, end)` of `f` at or after `pos` (SEEK_DATA/SEEK_HOLE); a filesystem that
/// cannot tell holes (EINVAL) is data to the end.
pub(super) fn next_extent(f: &File, pos: u64, len: u64) -> std::io::Result<Option<(u64, u64)>> {
    if pos >= len {
        return Ok(None);
    }
    let seek = |at: u64, whence| {
        // SAFETY: lseek on a valid fd.
        let r = unsafe { libc::lseek(f.as_raw_fd(), at as i64, whence) };
        if r < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(r as u64)
        }
    };
    match seek(pos, libc::SEEK_DATA) {
        Ok(data) if data >= len => Ok(None),
        Ok(data) => match seek(data, libc::SEEK_HOLE) {
            Ok(hole) => Ok(Some((data, hole.min(len)))),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(Some((data, len))),
            Err(e) => Err(e),
        },
        Err(e) if e.raw_os_error() == Some(libc::ENXIO) => Ok(None),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(Some((pos, len))),
        Err(e) => Err(e),
    }
}
