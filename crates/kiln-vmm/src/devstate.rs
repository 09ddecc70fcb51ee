//! Device and vCPU state without any RAM, from QEMU's `xen-save-devices-state` (not Xen-only).
//!
//! For a VM whose guest RAM is a private mapping of an immutable file, the daemon saves the pages that
//! differ from that file itself (see `delta`). The migration stream would still walk and send every page
//! of the private RAM (`x-ignore-shared` skips only shared file RAM), which bounded the capture pause;
//! `xen-save-devices-state` writes only the non-iterable sections (QEMU 10 `qemu_save_device_state`:
//! magic, version, FULL device sections, EOF; it synchronizes the vCPUs first and leaves a stopped VM
//! stopped), in milliseconds.
//!
//! Its file lacks two things a `migrate-incoming` loader wants: the CONFIGURATION section (required while
//! `migration.send-configuration` is on, QEMU's default) and the trailing VM description (only a warning
//! when missing). [`complete`] inserts the former, built as QEMU writes it (`stripram` parses the same
//! shape), and appends a minimal description, so the result loads through the same path as every other
//! kiln state. Its global state says "running" (`global_state_store_running`); kiln starts incoming VMs
//! with `-S`, so the loader stays paused until kiln continues it.

use std::io::{self, Read, Write};

const MAGIC: u32 = 0x5145_564d;
const VERSION: u32 = 3;
const SEC_EOF: u8 = 0x00;
const SEC_FULL: u8 = 0x04;
const SUBSECTION: u8 = 0x05;
const VMDESCRIPTION: u8 = 0x06;
const CONFIGURATION: u8 = 0x07;

/// The CONFIGURATION section QEMU writes first in a migration stream: the machine type's name and the
/// migration capabilities the loader validates (kiln's loader sets `x-ignore-shared`, so the section
/// must name it, or the load fails with "Capability x-ignore-shared is on, but received capability is
/// off"). x86's page size is the minimum, so there is no target-page-bits subsection.
pub fn configuration_section(machine: &str, capabilities: &[&str]) -> Vec<u8> {
    let mut b = vec![CONFIGURATION];
    b.extend_from_slice(&(machine.len() as u32).to_be_bytes());
    b.extend_from_slice(machine.as_bytes());
    if !capabilities.is_empty() {
        b.push(SUBSECTION);
        let name = "configuration/capabilities";
        b.push(name.len() as u8);
        b.extend_from_slice(name.as_bytes());
        b.extend_from_slice(&1u32.to_be_bytes());
        b.extend_from_slice(&(capabilities.len() as u32).to_be_bytes());
        for c in capabilities {
            b.push(c.len() as u8);
            b.extend_from_slice(c.as_bytes());
        }
    }
    b
}

/// What [`complete`] wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completed {
    /// Bytes QEMU wrote.
    pub bytes_in: u64,
    /// Bytes of the loadable state.
    pub bytes_out: u64,
}

fn bad(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("device state: {what}"))
}

/// Copies the file `xen-save-devices-state` wrote (`r`) to `w` as a state `migrate-incoming` loads:
/// magic and version, the configuration section for `machine` with `capabilities`, QEMU's device
/// sections, EOF and a minimal VM description. Refuses anything not shaped like that file (another
/// stream, a RAM section, a cut file), so a caller can fall back to the migration stream.
pub fn complete<R: Read, W: Write>(
    mut r: R,
    mut w: W,
    machine: &str,
    capabilities: &[&str],
) -> io::Result<Completed> {
    let mut head = [0u8; 9];
    r.read_exact(&mut head)
        .map_err(|_| bad("shorter than a header"))?;
    let word = |i: usize| u32::from_be_bytes([head[i], head[i + 1], head[i + 2], head[i + 3]]);
    if word(0) != MAGIC {
        return Err(bad("not a QEMU state file"));
    }
    if word(4) != VERSION {
        return Err(bad("unsupported version"));
    }
    if head[8] != SEC_FULL {
        return Err(bad(&format!(
            "starts with section type {:#x}, not a device section",
            head[8]
        )));
    }
    let config = configuration_section(machine, capabilities);
    w.write_all(&head[..8])?;
    w.write_all(&config)?;
    w.write_all(&head[8..])?;
    let mut st = Completed {
        bytes_in: head.len() as u64,
        bytes_out: (head.len() + config.len()) as u64,
    };
    let mut buf = vec![0u8; 64 << 10];
    let mut last = head[8];
    loop {
        let n = match r.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        w.write_all(&buf[..n])?;
        last = buf[n - 1];
        st.bytes_in += n as u64;
        st.bytes_out += n as u64;
    }
    if last != SEC_EOF {
        return Err(bad("does not end with the end-of-file mark (cut short?)"));
    }
    let desc = br#"{"page_size": 4096, "devices": []}"#;
    w.write_all(&[VMDESCRIPTION])?;
    w.write_all(&(desc.len() as u32).to_be_bytes())?;
    w.write_all(desc)?;
    st.bytes_out += 1 + 4 + desc.len() as u64;
    w.flush()?;
    Ok(st)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The section as QEMU 10 wrote it in a `migrate` stream of a `microvm` with `x-ignore-shared`.
    #[test]
    fn configuration_matches_qemus_bytes() {
        let mut want = vec![0x07, 0, 0, 0, 7];
        want.extend_from_slice(b"microvm");
        want.extend_from_slice(&[0x05, 0x1a]);
        want.extend_from_slice(b"configuration/capabilities");
        want.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 1, 0x0f]);
        want.extend_from_slice(b"x-ignore-shared");
        assert_eq!(configuration_section("microvm", &["x-ignore-shared"]), want);
    }

    fn device_file() -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&MAGIC.to_be_bytes());
        b.extend_from_slice(&VERSION.to_be_bytes());
        b.push(SEC_FULL);
        b.extend_from_slice(&[0, 0, 0, 0, 5]);
        b.extend_from_slice(b"timer");
        b.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 2, 0xaa, 0x7e, 0, 0, 0, 0, SEC_EOF]);
        b
    }

    #[test]
    fn inserts_the_configuration_and_a_description() {
        let input = device_file();
        let mut out = Vec::new();
        let st = complete(&input[..], &mut out, "microvm", &["x-ignore-shared"]).unwrap();
        let config = configuration_section("microvm", &["x-ignore-shared"]);
        assert_eq!(&out[..8], &input[..8]);
        assert_eq!(&out[8..8 + config.len()], &config[..]);
        assert_eq!(
            &out[8 + config.len()..8 + config.len() + input.len() - 8],
            &input[8..]
        );
        assert_eq!(out[8 + config.len() + input.len() - 8], VMDESCRIPTION);
        assert_eq!(st.bytes_in, input.len() as u64);
        assert_eq!(st.bytes_out, out.len() as u64);
    }

    #[test]
    fn refuses_what_it_was_not_given() {
        let good = device_file();
        // Cut short: no EOF mark at the end.
        assert!(complete(&good[..good.len() - 6], Vec::new(), "microvm", &[]).is_err());
        // A migration stream (configuration first) is not a device-only file.
        let mut stream = good.clone();
        stream[8] = CONFIGURATION;
        assert!(complete(&stream[..], Vec::new(), "microvm", &[]).is_err());
        let mut other = good.clone();
        other[0] = b'X';
        assert!(complete(&other[..], Vec::new(), "microvm", &[]).is_err());
        assert!(complete(&good[..5], Vec::new(), "microvm", &[]).is_err());
    }
}
