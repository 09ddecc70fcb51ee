//! Extracting the uncompressed kernel (vmlinux) from a bzImage, for PVH direct boot.
//!
//! Under TCG the kernel's self-decompression is the slowest part of booting a bzImage (about 1.5 s for
//! Debian's zstd-compressed 57 MiB kernel). QEMU can instead load the uncompressed ELF and enter it
//! through its PVH entry point, skipping both firmware disk boot and decompression. Doing the
//! decompression once at build time is what the `vmlinux` file of an image is for.

use std::io::Read;

use crate::elf::Elf;

/// `XEN_ELFNOTE_PHYS32_ENTRY`: the note that makes a vmlinux bootable through PVH.
const PVH_NOTE_TYPE: u32 = 18;

fn u32_at(data: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(data.get(off..off + 4)?.try_into().ok()?))
}

/// The compressed kernel inside a bzImage, as described by its setup header (boot protocol >= 2.08).
pub(crate) fn payload(bzimage: &[u8]) -> Result<&[u8], String> {
    if bzimage.get(0x202..0x206) != Some(b"HdrS") {
        return Err("not a bzImage (no HdrS setup header)".into());
    }
    let protocol = u16::from_le_bytes([bzimage[0x206], bzimage[0x207]]);
    if protocol < 0x208 {
        return Err(format!(
            "boot protocol {protocol:#x} is too old to describe its payload"
        ));
    }
    // The protected-mode code (which the payload offset is relative to) follows the real-mode setup
    // sectors; a count of 0 means the historical default of 4.
    let setup_sects = match bzimage[0x1f1] {
        0 => 4,
        n => usize::from(n),
    };
    let start = (setup_sects + 1) * 512;
    let truncated = || "truncated bzImage".to_string();
    let offset = u32_at(bzimage, 0x248).ok_or_else(truncated)? as usize;
    let length = u32_at(bzimage, 0x24c).ok_or_else(truncated)? as usize;
    bzimage
        .get(start + offset..start + offset + length)
        .ok_or_else(truncated)
}

/// Decompresses the payload of `bzimage` and checks that the result can be booted through PVH.
pub(crate) fn extract_pvh_vmlinux(bzimage: &[u8]) -> Result<Vec<u8>, String> {
    let payload = payload(bzimage)?;
    let mut out = Vec::new();
    match payload {
        // zstd; the kernel appends the uncompressed size as 4 more bytes, which the frame decoder
        // leaves alone because it stops at the end of the first frame.
        [0x28, 0xb5, 0x2f, 0xfd, ..] => {
            ruzstd::decoding::StreamingDecoder::new(payload)
                .map_err(|e| format!("bad zstd payload: {e}"))?
                .read_to_end(&mut out)
                .map_err(|e| format!("cannot decompress the zstd payload: {e}"))?;
        }
        [0xfd, b'7', b'z', b'X', b'Z', 0, ..] => {
            lzma_rs::xz_decompress(&mut &payload[..], &mut out).map_err(|e| format!("cannot decompress the xz payload: {e}"))?;
        }
        [0x1f, 0x8b, ..] => {
            flate2::read::GzDecoder::new(payload)
                .read_to_end(&mut out)
                .map_err(|e| format!("cannot decompress the gzip payload: {e}"))?;
        }
        _ => return Err("the kernel payload uses a compression kiln cannot unpack (zstd, xz and gzip are supported)".into()),
    }
    let elf = Elf::parse(&out).map_err(|e| format!("the decompressed kernel is {e}"))?;
    if !elf.has_note("Xen", PVH_NOTE_TYPE)? {
        return Err("the kernel has no PVH entry point (built without CONFIG_PVH)".into());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_bzimage(payload: &[u8]) -> Vec<u8> {
        let mut image = vec![0u8; 0x400];
        image[0x1f1] = 1; // one setup sector: protected-mode code starts at 1024
        image[0x202..0x206].copy_from_slice(b"HdrS");
        image[0x206..0x208].copy_from_slice(&0x20fu16.to_le_bytes());
        image[0x248..0x24c].copy_from_slice(&16u32.to_le_bytes());
        image[0x24c..0x250].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        image.extend([0u8; 16]);
        image.extend(payload);
        image.extend(b"trailing");
        image
    }

    #[test]
    fn finds_the_payload() {
        let image = fake_bzimage(b"\x1f\x8bPAYLOAD");
        assert_eq!(payload(&image).unwrap(), b"\x1f\x8bPAYLOAD");
        assert!(payload(b"not a kernel").is_err());
        let mut truncated = image.clone();
        truncated.truncate(0x410);
        assert!(payload(&truncated).is_err());
    }

    #[test]
    fn rejects_unknown_compression_and_non_pvh_kernels() {
        let err = extract_pvh_vmlinux(&fake_bzimage(b"BZh91AY&SY")).unwrap_err();
        assert!(err.contains("compression"), "{err}");
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut gz, b"definitely not ELF").unwrap();
        let err = extract_pvh_vmlinux(&fake_bzimage(&gz.finish().unwrap())).unwrap_err();
        assert!(err.contains("not an ELF"), "{err}");
    }
}
