//! Removing one RAM block's pages from a QEMU migration stream while it is written.
//!
//! QEMU streams a privately mapped RAM block page by page (`x-ignore-shared` skips only shared file RAM).
//! For a sandbox whose RAM is a private mapping of an immutable file, the daemon saves the pages that
//! differ from the file itself (see `pagemap`), so the stream needs only the device and vCPU state. This
//! filter keeps the header, the configuration section, the RAM section's block list (`MEM_SIZE`), its
//! end-of-section markers and every device section, and drops the page records (`PAGE`, `ZERO`) of the
//! named block. The loading QEMU then keeps what the mapping holds, which the daemon patches before `cont`.
//!
//! Format facts (QEMU 10 `migration/savevm.c`, `migration/ram.c`): after magic and version come sections
//! tagged START/PART/END (iterable handlers such as `ram`) and FULL (devices), and commands to the
//! destination (kept as they are); all iterable sections come
//! before the first device section, so from the first FULL section on the rest is copied as it is.

use std::io::{self, Read, Write};

const MAGIC: u32 = 0x5145_564d;
const VERSION: u32 = 3;

const SEC_EOF: u8 = 0x00;
const SEC_START: u8 = 0x01;
const SEC_PART: u8 = 0x02;
const SEC_END: u8 = 0x03;
const SEC_FULL: u8 = 0x04;
const SUBSECTION: u8 = 0x05;
const CONFIGURATION: u8 = 0x07;
const COMMAND: u8 = 0x08;
const FOOTER: u8 = 0x7e;

const F_ZERO: u64 = 0x02;
const F_MEM_SIZE: u64 = 0x04;
const F_PAGE: u64 = 0x08;
const F_EOS: u64 = 0x10;
const F_CONTINUE: u64 = 0x20;
const F_MULTIFD_FLUSH: u64 = 0x200;
const TARGET_PAGE: u64 = 4096;

/// What the filter saw.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Stripped {
    /// Page records of the block dropped (`PAGE` and `ZERO`).
    pub pages_dropped: u64,
    /// Bytes read from QEMU.
    pub bytes_in: u64,
    /// Bytes written out.
    pub bytes_out: u64,
}

fn bad(what: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.into())
}

struct Filter<R, W> {
    r: R,
    w: W,
    st: Stripped,
    block: String,
}

impl<R: Read, W: Write> Filter<R, W> {
    fn take(&mut self, n: usize) -> io::Result<Vec<u8>> {
        let mut b = vec![0u8; n];
        self.r.read_exact(&mut b)?;
        self.st.bytes_in += n as u64;
        Ok(b)
    }
    fn skip(&mut self, n: u64) -> io::Result<()> {
        let got = io::copy(&mut (&mut self.r).take(n), &mut io::sink())?;
        self.st.bytes_in += got;
        if got != n {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        Ok(())
    }
    fn put(&mut self, b: &[u8]) -> io::Result<()> {
        self.st.bytes_out += b.len() as u64;
        self.w.write_all(b)
    }
    fn u8(&mut self) -> io::Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn be32(&mut self) -> io::Result<u32> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn be64(&mut self) -> io::Result<u64> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(&b);
        Ok(u64::from_be_bytes(a))
    }
    fn copy_u8(&mut self) -> io::Result<u8> {
        let v = self.u8()?;
        self.put(&[v])?;
        Ok(v)
    }
    fn copy_be32(&mut self) -> io::Result<u32> {
        let v = self.be32()?;
        self.put(&v.to_be_bytes())?;
        Ok(v)
    }
    fn copy_bytes(&mut self, n: usize) -> io::Result<Vec<u8>> {
        let b = self.take(n)?;
        self.put(&b)?;
        Ok(b)
    }
    /// A one-byte length and that many bytes, copied.
    fn copy_str(&mut self) -> io::Result<String> {
        let n = self.copy_u8()? as usize;
        Ok(String::from_utf8_lossy(&self.copy_bytes(n)?).into_owned())
    }

    fn configuration(&mut self) -> io::Result<()> {
        let len = self.copy_be32()?;
        if len > 256 {
            return Err(bad("configuration: machine name too long"));
        }
        self.copy_bytes(len as usize)?;
        // Subsections follow while the next byte says so; the caller reads the byte after them.
        loop {
            let tag = self.u8()?;
            if tag != SUBSECTION {
                return self.section(tag);
            }
            self.put(&[tag])?;
            let name = self.copy_str()?;
            self.copy_be32()?; // version
            match name.as_str() {
                "configuration/target-page-bits" => {
                    self.copy_be32()?;
                }
                "configuration/capabilities" => {
                    let n = self.copy_be32()?;
                    if n > 256 {
                        return Err(bad("configuration: too many capabilities"));
                    }
                    for _ in 0..n {
                        self.copy_str()?;
                    }
                }
                "configuration/uuid" => {
                    self.copy_bytes(16)?;
                }
                other => return Err(bad(format!("unknown configuration subsection {other}"))),
            }
        }
    }

    /// RAM records of one section, up to and including EOS; `block` records are dropped.
    fn ram_records(&mut self, block: &str, last: &mut String) -> io::Result<()> {
        loop {
            let header = self.be64()?;
            let flags = header & (TARGET_PAGE - 1);
            let addr = header & !(TARGET_PAGE - 1);
            let kind = flags & !F_CONTINUE;
            if kind & F_MEM_SIZE != 0 {
                self.put(&header.to_be_bytes())?;
                let mut left = addr;
                while left > 0 {
                    self.copy_str()?;
                    let used = self.be64()?;
                    self.put(&used.to_be_bytes())?;
                    // The block's address (`x-ignore-shared` is always set here).
                    let a = self.be64()?;
                    self.put(&a.to_be_bytes())?;
                    left = left
                        .checked_sub(used)
                        .ok_or_else(|| bad("RAM block list longer than the RAM size"))?;
                }
                continue;
            }
            if kind & (F_PAGE | F_ZERO) != 0 {
                let mut idstr = Vec::new();
                if flags & F_CONTINUE == 0 {
                    let n = self.u8()? as usize;
                    idstr = self.take(n)?;
                    *last = String::from_utf8_lossy(&idstr).into_owned();
                }
                let payload = if kind & F_PAGE != 0 { TARGET_PAGE } else { 1 };
                if last == block {
                    self.skip(payload)?;
                    self.st.pages_dropped += 1;
                } else {
                    self.put(&header.to_be_bytes())?;
                    if flags & F_CONTINUE == 0 {
                        self.put(&[idstr.len() as u8])?;
                        self.put(&idstr)?;
                    }
                    let p = self.take(payload as usize)?;
                    self.put(&p)?;
                }
                continue;
            }
            if kind == F_MULTIFD_FLUSH {
                self.put(&header.to_be_bytes())?;
                continue;
            }
            if kind == F_EOS {
                self.put(&header.to_be_bytes())?;
                return Ok(());
            }
            return Err(bad(format!(
                "RAM record with flags {flags:#x} is not handled"
            )));
        }
    }

    fn footer(&mut self, id: u32) -> io::Result<()> {
        if self.copy_u8()? != FOOTER || self.copy_be32()? != id {
            return Err(bad("section footer missing"));
        }
        Ok(())
    }

    /// Handles sections from a tag on; returns at EOF or when the rest was copied.
    fn section(&mut self, mut tag: u8) -> io::Result<()> {
        let mut ram_id: Option<u32> = None;
        let mut last = String::new();
        loop {
            match tag {
                SEC_START | SEC_FULL => {
                    self.put(&[tag])?;
                    let id = self.copy_be32()?;
                    let name = self.copy_str()?;
                    self.copy_be32()?; // instance
                    self.copy_be32()?; // version
                    if tag == SEC_START && name == "ram" {
                        ram_id = Some(id);
                        let block = self.block.clone();
                        self.ram_records(&block, &mut last)?;
                        self.footer(id)?;
                    } else if tag == SEC_FULL {
                        // Device state from here on: copied as it is (no iterable section follows).
                        return self.rest();
                    } else {
                        return Err(bad(format!("iterable section {name} is not handled")));
                    }
                }
                SEC_PART | SEC_END => {
                    self.put(&[tag])?;
                    let id = self.copy_be32()?;
                    if Some(id) != ram_id {
                        return Err(bad(format!("section {id} is not the RAM section")));
                    }
                    let block = self.block.clone();
                    self.ram_records(&block, &mut last)?;
                    self.footer(id)?;
                }
                SEC_EOF => {
                    self.put(&[tag])?;
                    return self.rest();
                }
                COMMAND => {
                    // A command to the destination (QEMU 10 sends `switchover-start` before the
                    // final sections): be16 command, be16 length, data; kept as it is.
                    self.put(&[tag])?;
                    self.copy_bytes(2)?;
                    let len = self.take(2)?;
                    self.put(&len)?;
                    self.copy_bytes(u16::from_be_bytes([len[0], len[1]]) as usize)?;
                }
                CONFIGURATION => {
                    self.put(&[tag])?;
                    return self.configuration();
                }
                other => return Err(bad(format!("section type {other:#x} is not handled"))),
            }
            tag = self.u8()?;
        }
    }

    fn rest(&mut self) -> io::Result<()> {
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let n = match self.r.read(&mut buf) {
                Ok(0) => return Ok(()),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            self.st.bytes_in += n as u64;
            self.put(&buf[..n])?;
        }
    }
}

/// Copies a migration stream from `r` to `w` without the page records of RAM block `block` (QEMU's
/// block id, `mem` for kiln's guest RAM). Fails on anything it does not understand, so a caller can fall
/// back to the unfiltered stream.
pub fn strip<R: Read, W: Write>(r: R, w: W, block: &str) -> io::Result<Stripped> {
    let mut f = Filter {
        r,
        w,
        st: Stripped::default(),
        block: block.to_string(),
    };
    if f.copy_be32()? != MAGIC {
        return Err(bad("not a QEMU migration stream"));
    }
    if f.copy_be32()? != VERSION {
        return Err(bad("unsupported migration stream version"));
    }
    let tag = f.u8()?;
    f.section(tag)?;
    f.w.flush()?;
    Ok(f.st)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(b: &mut Vec<u8>, t: &str) {
        b.push(t.len() as u8);
        b.extend_from_slice(t.as_bytes());
    }

    /// A stream shaped like QEMU 10's: pages of `mem` go, the ROM's page, block list, EOS markers and the
    /// device section stay.
    #[test]
    fn drops_only_the_named_blocks_pages() {
        let mut b = Vec::new();
        let mut want = Vec::new();
        b.extend_from_slice(&MAGIC.to_be_bytes());
        b.extend_from_slice(&VERSION.to_be_bytes());
        b.push(CONFIGURATION);
        b.extend_from_slice(&7u32.to_be_bytes());
        b.extend_from_slice(b"microvm");
        b.push(SUBSECTION);
        s(&mut b, "configuration/capabilities");
        b.extend_from_slice(&1u32.to_be_bytes());
        b.extend_from_slice(&1u32.to_be_bytes());
        s(&mut b, "x-ignore-shared");
        // START ram: MEM_SIZE with two blocks, EOS.
        b.push(SEC_START);
        b.extend_from_slice(&2u32.to_be_bytes());
        s(&mut b, "ram");
        b.extend_from_slice(&0u32.to_be_bytes());
        b.extend_from_slice(&4u32.to_be_bytes());
        b.extend_from_slice(&((8192 + 4096) | F_MEM_SIZE).to_be_bytes());
        s(&mut b, "mem");
        b.extend_from_slice(&8192u64.to_be_bytes());
        b.extend_from_slice(&0u64.to_be_bytes());
        s(&mut b, "rom");
        b.extend_from_slice(&4096u64.to_be_bytes());
        b.extend_from_slice(&0xfff0_0000u64.to_be_bytes());
        b.extend_from_slice(&F_EOS.to_be_bytes());
        b.push(FOOTER);
        b.extend_from_slice(&2u32.to_be_bytes());
        want.extend_from_slice(&b);
        // A command (switchover-start: 7, no data), kept.
        let cmd = [COMMAND, 0, 7, 0, 0];
        b.extend_from_slice(&cmd);
        want.extend_from_slice(&cmd);
        // END: a mem page, a mem zero page (continue), a rom page, EOS.
        let mut end = vec![SEC_END];
        end.extend_from_slice(&2u32.to_be_bytes());
        let mut kept = end.clone();
        end.extend_from_slice(&F_PAGE.to_be_bytes());
        s(&mut end, "mem");
        end.extend_from_slice(&[9u8; 4096]);
        end.extend_from_slice(&(4096 | F_ZERO | F_CONTINUE).to_be_bytes());
        end.push(0);
        let mut rom = Vec::new();
        rom.extend_from_slice(&F_PAGE.to_be_bytes());
        s(&mut rom, "rom");
        rom.extend_from_slice(&[5u8; 4096]);
        rom.extend_from_slice(&F_EOS.to_be_bytes());
        rom.push(FOOTER);
        rom.extend_from_slice(&2u32.to_be_bytes());
        end.extend_from_slice(&rom);
        kept.extend_from_slice(&rom);
        // A device section and EOF, then the description: copied as they are.
        let mut dev = vec![SEC_FULL];
        dev.extend_from_slice(&3u32.to_be_bytes());
        s(&mut dev, "cpu");
        dev.extend_from_slice(&[
            0, 0, 0, 0, 0, 0, 0, 1, 0xde, 0xad, FOOTER, 0, 0, 0, 3, SEC_EOF,
        ]);
        dev.extend_from_slice(b"\x06json");
        end.extend_from_slice(&dev);
        kept.extend_from_slice(&dev);
        b.extend_from_slice(&end);
        want.extend_from_slice(&kept);
        let mut out = Vec::new();
        let st = strip(&b[..], &mut out, "mem").unwrap();
        assert_eq!(st.pages_dropped, 2);
        assert_eq!(out, want);
        assert_eq!(st.bytes_in, b.len() as u64);
        // A cut stream fails rather than producing a short state.
        assert!(strip(&b[..b.len() / 2], &mut Vec::new(), "mem").is_err());
    }
}
