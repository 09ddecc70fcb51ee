//! Just enough ELF64 parsing for two questions: is an executable statically linked (the tiny image and the
//! initramfs have no C library), and what does a kernel module's `.modinfo` section say.

const PT_INTERP: u32 = 3;
const PT_NOTE: u32 = 4;

/// A little-endian 64-bit ELF file held in memory.
pub(crate) struct Elf<'a> {
    data: &'a [u8],
}

impl<'a> Elf<'a> {
    pub(crate) fn parse(data: &'a [u8]) -> Result<Self, String> {
        if data.len() < 64 || &data[..4] != b"\x7fELF" {
            return Err("not an ELF file".into());
        }
        if data[4] != 2 || data[5] != 1 {
            return Err("not a little-endian 64-bit ELF file".into());
        }
        Ok(Elf { data })
    }

    fn u16_at(&self, off: usize) -> Option<u16> {
        Some(u16::from_le_bytes(
            self.data.get(off..off + 2)?.try_into().ok()?,
        ))
    }

    fn u32_at(&self, off: usize) -> Option<u32> {
        Some(u32::from_le_bytes(
            self.data.get(off..off + 4)?.try_into().ok()?,
        ))
    }

    fn u64_at(&self, off: usize) -> Option<usize> {
        let v = u64::from_le_bytes(self.data.get(off..off + 8)?.try_into().ok()?);
        usize::try_from(v).ok()
    }

    /// e_machine: 62 is x86-64.
    pub(crate) fn machine(&self) -> Option<u16> {
        self.u16_at(18)
    }

    /// True when the file asks for no program interpreter, i.e. it runs without a dynamic loader and
    /// libc on the target (this includes static-pie executables).
    pub(crate) fn is_static(&self) -> Result<bool, String> {
        let bad = || "truncated program headers".to_string();
        let phoff = self.u64_at(32).ok_or_else(bad)?;
        let phentsize = usize::from(self.u16_at(54).ok_or_else(bad)?);
        let phnum = usize::from(self.u16_at(56).ok_or_else(bad)?);
        for i in 0..phnum {
            let p_type = self.u32_at(phoff + i * phentsize).ok_or_else(bad)?;
            if p_type == PT_INTERP {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// True when a PT_NOTE segment holds a note with this owner name and type.
    pub(crate) fn has_note(&self, owner: &str, note_type: u32) -> Result<bool, String> {
        let bad = || "truncated program headers".to_string();
        let phoff = self.u64_at(32).ok_or_else(bad)?;
        let phentsize = usize::from(self.u16_at(54).ok_or_else(bad)?);
        let phnum = usize::from(self.u16_at(56).ok_or_else(bad)?);
        for i in 0..phnum {
            let header = phoff + i * phentsize;
            if self.u32_at(header).ok_or_else(bad)? != PT_NOTE {
                continue;
            }
            let offset = self.u64_at(header + 8).ok_or_else(bad)?;
            let size = self.u64_at(header + 32).ok_or_else(bad)?;
            let notes = self
                .data
                .get(offset..offset.saturating_add(size))
                .ok_or("truncated note segment")?;
            if notes_contain(notes, owner, note_type) {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// The contents of the section called `name`, if present.
    pub(crate) fn section(&self, name: &str) -> Result<Option<&'a [u8]>, String> {
        let bad = || "truncated section headers".to_string();
        let shoff = self.u64_at(40).ok_or_else(bad)?;
        let shentsize = usize::from(self.u16_at(58).ok_or_else(bad)?);
        let shnum = usize::from(self.u16_at(60).ok_or_else(bad)?);
        let shstrndx = usize::from(self.u16_at(62).ok_or_else(bad)?);
        let header = |i: usize| shoff + i * shentsize;
        let body = |i: usize| -> Option<&'a [u8]> {
            let off = self.u64_at(header(i) + 24)?;
            let size = self.u64_at(header(i) + 32)?;
            self.data.get(off..off.checked_add(size)?)
        };
        let names = body(shstrndx).ok_or_else(bad)?;
        for i in 0..shnum {
            let name_off = self.u32_at(header(i)).ok_or_else(bad)? as usize;
            let Some(rest) = names.get(name_off..) else {
                continue;
            };
            let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
            if &rest[..end] == name.as_bytes() {
                return body(i).map(Some).ok_or_else(bad);
            }
        }
        Ok(None)
    }
}

/// Walks ELF notes (namesz, descsz, type, name, desc; name and desc padded to 4 bytes).
fn notes_contain(mut notes: &[u8], owner: &str, note_type: u32) -> bool {
    let word = |b: &[u8], i: usize| {
        b.get(i..i + 4)
            .and_then(|w| w.try_into().ok())
            .map(u32::from_le_bytes)
    };
    while let (Some(namesz), Some(descsz), Some(kind)) =
        (word(notes, 0), word(notes, 4), word(notes, 8))
    {
        let (namesz, descsz) = (namesz as usize, descsz as usize);
        let name = notes.get(12..12 + namesz).unwrap_or_default();
        if kind == note_type && name.strip_suffix(b"\0").unwrap_or(name) == owner.as_bytes() {
            return true;
        }
        let next = 12 + namesz.next_multiple_of(4) + descsz.next_multiple_of(4);
        let Some(rest) = notes.get(next..) else {
            return false;
        };
        notes = rest;
    }
    false
}

/// The value of `key` in a `.modinfo` section (NUL-separated `key=value` strings).
pub(crate) fn modinfo_value<'a>(modinfo: &'a [u8], key: &str) -> Option<&'a str> {
    modinfo
        .split(|&b| b == 0)
        .filter_map(|entry| std::str::from_utf8(entry).ok())
        .find_map(|entry| entry.strip_prefix(key)?.strip_prefix('='))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds a minimal ELF64 with the given program header types and named sections.
    fn fake_elf(phdrs: &[u32], sections: &[(&str, &[u8])]) -> Vec<u8> {
        let mut data = vec![0u8; 64];
        data[..4].copy_from_slice(b"\x7fELF");
        data[4] = 2;
        data[5] = 1;
        data[18..20].copy_from_slice(&62u16.to_le_bytes());
        // Program headers right after the ELF header.
        data[32..40].copy_from_slice(&64u64.to_le_bytes());
        data[54..56].copy_from_slice(&56u16.to_le_bytes());
        data[56..58].copy_from_slice(&(phdrs.len() as u16).to_le_bytes());
        for &p in phdrs {
            let mut ph = vec![0u8; 56];
            ph[..4].copy_from_slice(&p.to_le_bytes());
            data.extend(ph);
        }
        // Section bodies: index 0 is the null section, the last one the name table.
        let mut strtab = vec![0u8];
        let mut bodies = vec![(0u32, Vec::new())];
        for (name, body) in sections {
            bodies.push((strtab.len() as u32, body.to_vec()));
            strtab.extend(name.as_bytes());
            strtab.push(0);
        }
        let strtab_name = strtab.len() as u32;
        strtab.extend(b".shstrtab\0");
        bodies.push((strtab_name, strtab));
        let mut placed = Vec::new();
        for (name, body) in &bodies {
            placed.push((*name, data.len(), body.len()));
            data.extend(body);
        }
        let shoff = data.len();
        for (name, off, size) in placed {
            let mut sh = vec![0u8; 64];
            sh[..4].copy_from_slice(&name.to_le_bytes());
            sh[24..32].copy_from_slice(&(off as u64).to_le_bytes());
            sh[32..40].copy_from_slice(&(size as u64).to_le_bytes());
            data.extend(sh);
        }
        data[40..48].copy_from_slice(&(shoff as u64).to_le_bytes());
        data[58..60].copy_from_slice(&64u16.to_le_bytes());
        data[60..62].copy_from_slice(&(bodies.len() as u16).to_le_bytes());
        data[62..64].copy_from_slice(&((bodies.len() - 1) as u16).to_le_bytes());
        data
    }

    #[test]
    fn detects_interpreter() {
        let dynamic = fake_elf(&[6, PT_INTERP, 1], &[]);
        assert!(!Elf::parse(&dynamic).unwrap().is_static().unwrap());
        let fully_static = fake_elf(&[1, 1, 2], &[]);
        assert!(Elf::parse(&fully_static).unwrap().is_static().unwrap());
    }

    #[test]
    fn finds_modinfo_depends() {
        let info = b"license=GPL\0depends=net_failover,failover\0name=virtio_net\0";
        let elf = fake_elf(&[], &[(".text", b"code"), (".modinfo", info)]);
        let section = Elf::parse(&elf)
            .unwrap()
            .section(".modinfo")
            .unwrap()
            .unwrap();
        assert_eq!(
            modinfo_value(section, "depends"),
            Some("net_failover,failover")
        );
        assert_eq!(modinfo_value(section, "name"), Some("virtio_net"));
        assert_eq!(modinfo_value(section, "vermagic"), None);
    }

    #[test]
    fn finds_notes() {
        let mut notes = Vec::new();
        for (name, kind, desc) in [
            (&b"GNU\0"[..], 3u32, &b"buildid!"[..]),
            (b"Xen\0", 18, b"\x00\x10\x00\x01"),
        ] {
            notes.extend((name.len() as u32).to_le_bytes());
            notes.extend((desc.len() as u32).to_le_bytes());
            notes.extend(kind.to_le_bytes());
            notes.extend(name);
            notes.extend(desc);
        }
        assert!(notes_contain(&notes, "Xen", 18));
        assert!(notes_contain(&notes, "GNU", 3));
        assert!(!notes_contain(&notes, "Xen", 3));
        assert!(!notes_contain(&notes[..20], "Xen", 18));
    }

    #[test]
    fn rejects_non_elf_and_truncated() {
        assert!(Elf::parse(b"#!/bin/sh\necho hi\n").is_err());
        let mut elf = fake_elf(&[1], &[(".modinfo", b"a=b")]);
        elf.truncate(100);
        let parsed = Elf::parse(&elf).unwrap();
        assert!(parsed.section(".modinfo").is_err());
    }
}
