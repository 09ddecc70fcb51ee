//! Just enough ELF64 parsing for two questions: is an executable statically linked (the tiny image and the
//! initramfs have no C library), and what does a kernel module's `.modinfo` section say.

const PT_INTERP: u32 = 3;

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
        Some(u16::from_le_bytes(self.data.get(off..off + 2)?.try_into().ok()?))
    }

    fn u32_at(&self, off: usize) -> Option<u32> {
        Some(u32::from_le_bytes(self.data.get(off..off + 4)?.try_into().ok()?))
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
            let Some(rest) = names.get(name_off..) else { continue };
            let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
            if &rest[..end] == name.as_bytes() {
                return body(i).map(Some).ok_or_else(bad);
            }
        }
        Ok(None)
    }
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
        let section = Elf::parse(&elf).unwrap().section(".modinfo").unwrap().unwrap();
        assert_eq!(modinfo_value(section, "depends"), Some("net_failover,failover"));
        assert_eq!(modinfo_value(section, "name"), Some("virtio_net"));
        assert_eq!(modinfo_value(section, "vermagic"), None);
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
