//! Resets the TCP connections of addresses the guest no longer has (`reset_connections`, feature
//! `net_reset`): a restored copy is re-addressed, and the connections its snapshot carried belong to the
//! source's address, where nothing will ever answer them again. An idle one would wait forever.
//!
//! The guest kernel's socket-destroy interface needs the `inet_diag`/`tcp_diag` modules, which kiln's
//! images do not load, so each socket is reached through a process that holds it instead: its inode is
//! found in /proc/net/tcp{,6}, its descriptor in /proc/PID/fd, a duplicate taken with `pidfd_getfd`, and
//! `connect(AF_UNSPEC)` on that duplicate aborts it (RFC 793's ABORT: the kernel sends a reset and the
//! owner's next or pending read, write or poll fails with ECONNRESET).

use std::collections::HashSet;
use std::fs;
use std::net::IpAddr;

use kiln_proto::Response;

use crate::failure::{Failure, Result};

const TCP_LISTEN: u8 = 0x0A;
const TCP_TIME_WAIT: u8 = 0x06;
const TCP_CLOSE: u8 = 0x07;

pub fn reset_connections(addresses: &[String]) -> Result<Response> {
    let mut wanted = Vec::new();
    for a in addresses {
        let ip: IpAddr = a
            .parse()
            .map_err(|_| Failure::invalid(format!("'{a}' is not an IP address")))?;
        wanted.push(ip);
    }
    let mut inodes = HashSet::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let text = fs::read_to_string(table).unwrap_or_default();
        inodes.extend(sockets_of(&text, &wanted));
    }
    let mut reset = 0u32;
    if !inodes.is_empty() {
        let own = std::process::id();
        for entry in fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            if pid != own {
                reset += reset_in(pid, &mut inodes);
            }
            if inodes.is_empty() {
                break;
            }
        }
    }
    Ok(Response::Reset { connections: reset })
}

/// Inodes of the connections (not listeners, not already closed) whose local address is one of `wanted`
/// in a /proc/net/tcp or tcp6 table; an IPv4 address also matches its IPv4-mapped IPv6 form.
fn sockets_of(table: &str, wanted: &[IpAddr]) -> Vec<u64> {
    let mut found = Vec::new();
    for line in table.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 10 {
            continue;
        }
        let Some(local) = f[1].split(':').next().and_then(parse_addr) else {
            continue;
        };
        let Ok(state) = u8::from_str_radix(f[3], 16) else {
            continue;
        };
        let Ok(inode) = f[9].parse::<u64>() else {
            continue;
        };
        if inode == 0 || matches!(state, TCP_LISTEN | TCP_TIME_WAIT | TCP_CLOSE) {
            continue;
        }
        let local = match local {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(local),
            v4 => v4,
        };
        if wanted.contains(&local) {
            found.push(inode);
        }
    }
    found
}

/// An address as /proc/net/tcp prints it: each 32-bit word in hex, in the host's byte order.
fn parse_addr(hex: &str) -> Option<IpAddr> {
    let words: Vec<u32> = (0..hex.len() / 8)
        .map(|i| u32::from_str_radix(hex.get(i * 8..i * 8 + 8)?, 16).ok())
        .collect::<Option<_>>()?;
    let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_ne_bytes()).collect();
    match bytes.len() {
        4 => Some(IpAddr::from(<[u8; 4]>::try_from(bytes.as_slice()).ok()?)),
        16 => Some(IpAddr::from(<[u8; 16]>::try_from(bytes.as_slice()).ok()?)),
        _ => None,
    }
}

/// Aborts the sockets of `inodes` that process `pid` holds; removes them from `inodes`.
fn reset_in(pid: u32, inodes: &mut HashSet<u64>) -> u32 {
    let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fd")) else {
        return 0;
    };
    let mut pidfd = None;
    let mut reset = 0;
    for fd in fds.flatten() {
        let Ok(target) = fs::read_link(fd.path()) else {
            continue;
        };
        let Some(inode) = target
            .to_str()
            .and_then(|t| t.strip_prefix("socket:["))
            .and_then(|t| t.strip_suffix(']'))
            .and_then(|t| t.parse::<u64>().ok())
        else {
            continue;
        };
        if !inodes.contains(&inode) {
            continue;
        }
        let Some(num) = fd.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let pfd = match pidfd {
            Some(p) => p,
            None => {
                // SAFETY: pidfd_open(pid, 0) takes no pointers; a failure returns -1.
                let p = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
                if p < 0 {
                    return reset;
                }
                pidfd = Some(p as i32);
                p as i32
            }
        };
        // SAFETY: pidfd_getfd(pidfd, fd, 0) takes no pointers; it returns a new descriptor or -1.
        let dup = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pfd, num, 0) };
        if dup < 0 {
            continue;
        }
        let dup = dup as i32;
        let unspec = libc::sockaddr {
            sa_family: libc::AF_UNSPEC as libc::sa_family_t,
            sa_data: [0; 14],
        };
        // SAFETY: `unspec` is a valid sockaddr of the size given; `dup` is our own descriptor.
        let rc = unsafe {
            libc::connect(
                dup,
                &unspec,
                std::mem::size_of::<libc::sockaddr>() as libc::socklen_t,
            )
        };
        // SAFETY: closing the duplicate this function made.
        unsafe { libc::close(dup) };
        if rc == 0 {
            reset += 1;
            inodes.remove(&inode);
        }
    }
    if let Some(p) = pidfd {
        // SAFETY: closing the pidfd this function opened.
        unsafe { libc::close(p) };
    }
    reset
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_of_the_old_address_are_found() {
        // From 10.213.0.5: one connection and one listener; one connection from 10.213.0.9.
        let line = |local: &str, st: &str, inode: u32| {
            format!("   0: {local}:D2F0 016433C6:0051 {st} 00000000:00000000 00:00000000 00000000     0        0 {inode} 1 0")
        };
        let table = format!(
            "header\n{}\n{}\n{}\n",
            line("0500D50A", "01", 1111),
            line("0500D50A", "0A", 2222),
            line("0900D50A", "01", 3333)
        );
        let old: IpAddr = "10.213.0.5".parse().unwrap();
        assert_eq!(sockets_of(&table, &[old]), vec![1111]);
        // IPv4-mapped in tcp6: ::ffff:10.213.0.5.
        let t6 = "header\n   0: 0000000000000000FFFF00000500D50A:D2F0 00000000000000000000000000000000:0000 01 00000000:00000000 00:00000000 00000000     0        0 4444 1 0\n";
        assert_eq!(sockets_of(t6, &[old]), vec![4444]);
        let v6: IpAddr = "fd00::5".parse().unwrap();
        let t6 = "header\n   0: 000000FD000000000000000005000000:D2F0 00000000000000000000000000000000:0000 01 00000000:00000000 00:00000000 00000000     0        0 5555 1 0\n";
        assert_eq!(sockets_of(t6, &[v6]), vec![5555]);
    }
}
