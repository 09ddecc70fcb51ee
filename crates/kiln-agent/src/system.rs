//! Whole-guest requests: hello info, sync, clock, hostname, entropy, machine id.

use std::ffi::CStr;
use std::fs::{self, File};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::path::Path;

use kiln_proto::{HelloInfo, Response, PROTOCOL_VERSION};

use crate::failure::{Failure, Result};
use crate::files::write_atomic;

/// `_IOW('R', 0x03, int[2])` from linux/random.h.
const RNDADDENTROPY: libc::Ioctl = 0x4008_5203;
/// `_IO('R', 0x07)`: reseed the CRNG from the input pool now (Linux ≥ 4.17).
const RNDRESEEDCRNG: libc::Ioctl = 0x5207;
const MAX_ENTROPY: usize = 4096;
const MACHINE_ID: &str = "/etc/machine-id";
const HOSTNAME_FILE: &str = "/etc/hostname";

pub fn hello_info() -> HelloInfo {
    HelloInfo {
        agent_version: env!("CARGO_PKG_VERSION").to_string(),
        protocol_version: PROTOCOL_VERSION,
        boot_id: fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .map(|s| s.trim().to_string())
            .unwrap_or_default(),
        hostname: hostname().unwrap_or_default(),
        uptime_ms: uptime_ms(),
        pid: std::process::id(),
        features: vec![
            "procs".into(),
            "user".into(),
            "user-group".into(),
            "tar".into(),
            "watch".into(),
            "identity".into(),
            "net_reset".into(),
        ],
    }
}

fn hostname() -> Option<String> {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; glibc NUL-terminates within it.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return None;
    }
    let name = CStr::from_bytes_until_nul(&buf).ok()?;
    Some(name.to_string_lossy().into_owned())
}

pub fn uptime_ms() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid out-parameter.
    if unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) } != 0 {
        return 0;
    }
    let secs = u64::try_from(ts.tv_sec).unwrap_or(0);
    let nanos = u64::try_from(ts.tv_nsec).unwrap_or(0);
    secs * 1000 + nanos / 1_000_000
}

/// `sync()`, then `syncfs` on every block-device filesystem so that write-back errors, which
/// `sync()` swallows, are reported.
pub fn sync_all() -> Result<Response> {
    // SAFETY: no arguments, cannot fail.
    unsafe { libc::sync() };
    let mounts = fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    for line in mounts.lines() {
        let mut fields = line.split_whitespace();
        let (Some(source), Some(target)) = (fields.next(), fields.next()) else {
            continue;
        };
        if !source.starts_with("/dev/") {
            continue;
        }
        let target = unescape_mount_path(target);
        let Ok(dir) = File::open(&target) else {
            continue;
        };
        // SAFETY: `dir` is an open fd for the duration of the call.
        if unsafe { libc::syncfs(dir.as_raw_fd()) } != 0 {
            let err = io::Error::last_os_error();
            return Err(Failure::io(&err, format!("cannot sync {target}")));
        }
    }
    Ok(Response::Ok)
}

/// /proc/self/mounts escapes space, tab, newline and backslash as octal.
fn unescape_mount_path(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let oct = b
            .get(i + 1..i + 4)
            .filter(|d| b[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match oct {
            Some(d) => {
                out.push((d[0] - b'0') << 6 | (d[1] - b'0') << 3 | (d[2] - b'0'));
                i += 4;
            }
            None => {
                out.push(b[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub fn set_clock(secs: i64, nanos: u32) -> Result<Response> {
    if nanos >= 1_000_000_000 {
        return Err(Failure::invalid(format!(
            "nanoseconds out of range: {nanos}"
        )));
    }
    let ts = libc::timespec {
        tv_sec: secs,
        tv_nsec: libc::c_long::from(nanos),
    };
    // SAFETY: `ts` is a valid timespec.
    if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) } != 0 {
        return Err(Failure::io(
            &io::Error::last_os_error(),
            "cannot set the clock",
        ));
    }
    Ok(Response::Ok)
}

pub fn set_hostname(name: &str) -> Result<Response> {
    let valid = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with(['-', '.'])
        && name
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'.');
    if !valid {
        return Err(Failure::invalid(format!("invalid hostname {name:?}")));
    }
    // SAFETY: pointer and length describe `name`'s bytes.
    if unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) } != 0 {
        return Err(Failure::io(
            &io::Error::last_os_error(),
            "cannot set the hostname",
        ));
    }
    // Best effort: the root filesystem may be read-only.
    let _ = write_in_place_or_atomic(
        Path::new(HOSTNAME_FILE),
        format!("{name}\n").as_bytes(),
        0o644,
    );
    Ok(Response::Ok)
}

/// Mixes `entropy_hex` into the kernel RNG, credits it, and forces a CRNG reseed, so VMs
/// restored from one snapshot stop sharing RNG state.
pub fn reseed(entropy_hex: &str) -> Result<Response> {
    let bytes = crate::util::decode_hex(entropy_hex)
        .filter(|b| !b.is_empty() && b.len() <= MAX_ENTROPY)
        .ok_or_else(|| {
            Failure::invalid(format!("entropy must be 1 to {MAX_ENTROPY} bytes of hex"))
        })?;
    let urandom = fs::OpenOptions::new()
        .write(true)
        .open("/dev/urandom")
        .map_err(|e| Failure::io(&e, "cannot open /dev/urandom"))?;
    if let Err(ioctl_err) = add_entropy(&urandom, &bytes) {
        // Without CAP_SYS_ADMIN the bytes can still be mixed in, just not credited.
        (&urandom).write_all(&bytes).map_err(|e| {
            Failure::io(
                &e,
                format!("cannot add entropy (ioctl failed: {ioctl_err})"),
            )
        })?;
    }
    // SAFETY: argument-less ioctl on an open fd; failure (old kernel, no privilege) is harmless.
    unsafe { libc::ioctl(urandom.as_raw_fd(), RNDRESEEDCRNG) };
    Ok(Response::Ok)
}

/// RNDADDENTROPY takes `struct rand_pool_info { int entropy_count; int buf_size; u32 buf[]; }`.
fn add_entropy(dev: &File, bytes: &[u8]) -> io::Result<()> {
    let len =
        i32::try_from(bytes.len()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let mut words = vec![0u32; 2 + bytes.len().div_ceil(4)];
    words[0] = len.saturating_mul(8) as u32;
    words[1] = len as u32;
    for (word, chunk) in words[2..].iter_mut().zip(bytes.chunks(4)) {
        let mut w = [0u8; 4];
        w[..chunk.len()].copy_from_slice(chunk);
        *word = u32::from_ne_bytes(w);
    }
    // SAFETY: `words` holds a complete rand_pool_info with buf_size bytes of data.
    if unsafe { libc::ioctl(dev.as_raw_fd(), RNDADDENTROPY, words.as_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

pub fn set_machine_id(id: &str) -> Result<Response> {
    if id.len() != 32 || !id.bytes().all(|c| c.is_ascii_hexdigit()) {
        return Err(Failure::invalid(format!(
            "machine id must be 32 hex digits, not {id:?}"
        )));
    }
    let contents = format!("{}\n", id.to_ascii_lowercase());
    write_in_place_or_atomic(Path::new(MACHINE_ID), contents.as_bytes(), 0o444)
        .map_err(|e| Failure::io(&e, format!("cannot write {MACHINE_ID}")))?;
    Ok(Response::Ok)
}

/// A restored machine's new identity in one request (`set_identity`): one agent round trip, where the
/// separate requests cost one each on a guest whose code is still cold. The MAC is set last and only
/// reported when it cannot be: the guest's network works either way (its own user-mode network).
pub fn set_identity(
    (secs, nanos): (i64, u32),
    machine_id: &str,
    hostname: &str,
    entropy_hex: &str,
    mac: Option<&str>,
) -> Result<Response> {
    set_clock(secs, nanos)?;
    set_machine_id(machine_id)?;
    set_hostname(hostname)?;
    reseed(entropy_hex)?;
    let mac_error = mac.and_then(|mac| set_mac("eth0", mac).err());
    Ok(Response::Identity { mac_error })
}

/// Sets a NIC's hardware address with SIOCSIFHWADDR, what `ip link set dev IF address MAC` does, without
/// needing `ip` in the guest.
fn set_mac(ifname: &str, mac: &str) -> std::result::Result<(), String> {
    let bytes: Vec<u8> = mac
        .split(':')
        .map(|p| u8::from_str_radix(p, 16))
        .collect::<std::result::Result<_, _>>()
        .map_err(|_| format!("invalid MAC {mac:?}"))?;
    if bytes.len() != 6 || mac.len() != 17 {
        return Err(format!("invalid MAC {mac:?}"));
    }
    // SAFETY: zeroed ifreq is a valid value; the name fits (checked) and stays NUL-terminated.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    if ifname.len() >= req.ifr_name.len() {
        return Err(format!("interface name {ifname:?} too long"));
    }
    for (dst, src) in req.ifr_name.iter_mut().zip(ifname.bytes()) {
        *dst = src as libc::c_char;
    }
    // SAFETY: writing the sockaddr member of the union we own.
    unsafe {
        req.ifr_ifru.ifru_hwaddr.sa_family = libc::ARPHRD_ETHER;
        for (dst, src) in req.ifr_ifru.ifru_hwaddr.sa_data.iter_mut().zip(&bytes) {
            *dst = *src as libc::c_char;
        }
    }
    // SAFETY: plain socket(2); closed below.
    let sock = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if sock < 0 {
        return Err(format!("socket: {}", io::Error::last_os_error()));
    }
    // SAFETY: SIOCSIFHWADDR reads a valid ifreq; `sock` is an open fd.
    let rc = unsafe { libc::ioctl(sock, libc::SIOCSIFHWADDR, &req) };
    let err = io::Error::last_os_error();
    // SAFETY: closing the fd opened above.
    unsafe { libc::close(sock) };
    if rc != 0 {
        return Err(format!("cannot set {ifname}'s MAC to {mac}: {err}"));
    }
    Ok(())
}

/// Replaces `path` atomically, or overwrites it in place when it is a mount point (kiln's init and
/// systemd bind-mount these files from /run), where a rename would fail with EBUSY. Checking first
/// skips creating a temporary file on the root filesystem: under TCG, that cold path alone cost a
/// resume tens of milliseconds.
fn write_in_place_or_atomic(path: &Path, contents: &[u8], mode: u32) -> io::Result<()> {
    if is_mount_point(path) {
        return write_in_place(path, contents);
    }
    match write_atomic(path, contents, mode) {
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => write_in_place(path, contents),
        other => other,
    }
}

fn write_in_place(path: &Path, contents: &[u8]) -> io::Result<()> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(path)?;
    f.write_all(contents)
}

/// A bind-mounted file sits on another device than the directory holding it.
fn is_mount_point(path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let parent = path.parent().unwrap_or(Path::new("/"));
    match (fs::metadata(path), fs::metadata(parent)) {
        (Ok(file), Ok(dir)) => file.dev() != dir.dev(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_proto::ErrorCode;

    #[test]
    fn set_mac_refuses_malformed_addresses_before_touching_a_nic() {
        for bad in [
            "",
            "52:54:00:12:34",
            "52:54:00:12:34:5g",
            "52-54-00-12-34-56",
            "52:54:00:12:34:56:78",
        ] {
            let e = set_mac("eth0", bad).unwrap_err();
            assert!(e.contains("invalid MAC"), "{bad}: {e}");
        }
        let e = set_mac("an-interface-name-too-long", "52:54:00:12:34:56").unwrap_err();
        assert!(e.contains("too long"), "{e}");
        // A NIC that does not exist is reported, not a panic.
        let e = set_mac("kiln-none0", "52:54:00:12:34:56").unwrap_err();
        assert!(e.contains("kiln-none0"), "{e}");
    }

    #[test]
    fn hello_describes_this_process() {
        let h = hello_info();
        assert_eq!(h.protocol_version, PROTOCOL_VERSION);
        assert_eq!(h.pid, std::process::id());
        assert!(h.uptime_ms > 0);
        assert_eq!(h.boot_id.len(), 36, "{h:?}");
        assert!(!h.hostname.is_empty());
    }

    #[test]
    fn rejects_bad_arguments() {
        let code = |r: Result<Response>| r.unwrap_err().code;
        assert_eq!(
            code(set_clock(0, 1_000_000_000)),
            ErrorCode::InvalidArgument
        );
        assert_eq!(code(set_hostname("")), ErrorCode::InvalidArgument);
        assert_eq!(code(set_hostname("a b")), ErrorCode::InvalidArgument);
        assert_eq!(
            code(set_hostname(&"x".repeat(65))),
            ErrorCode::InvalidArgument
        );
        assert_eq!(code(reseed("")), ErrorCode::InvalidArgument);
        assert_eq!(code(reseed("abc")), ErrorCode::InvalidArgument);
        assert_eq!(
            code(reseed(&"00".repeat(MAX_ENTROPY + 1))),
            ErrorCode::InvalidArgument
        );
        assert_eq!(code(set_machine_id("abc")), ErrorCode::InvalidArgument);
        assert_eq!(
            code(set_machine_id(&"g".repeat(32))),
            ErrorCode::InvalidArgument
        );
    }

    #[test]
    fn reseed_mixes_in_entropy() {
        assert_eq!(reseed(&"5a".repeat(64)), Ok(Response::Ok));
    }

    #[test]
    fn sync_succeeds() {
        assert_eq!(sync_all(), Ok(Response::Ok));
    }

    #[test]
    fn mount_paths_are_unescaped() {
        assert_eq!(unescape_mount_path(r"/mnt/a\040b\134c"), r"/mnt/a b\c");
        assert_eq!(unescape_mount_path(r"/plain\0"), r"/plain\0");
    }

    #[test]
    fn in_place_fallback_writes_contents() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("id");
        write_in_place_or_atomic(&p, b"one\n", 0o444).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"one\n");
    }
}
