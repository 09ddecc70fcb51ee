//! IPv6 for bridged guests (where the host has it): a /64 pool, by default a ULA one, routed like the
//! IPv4 pool. A guest's IPv6 address is derived from its IPv4 one (the pool's prefix and the IPv4
//! address's host number), so it needs no storage of its own, is unique when the IPv4 address is, and
//! changes with it on every resumed copy and fork child.
//!
//! Each guest holds its address as a `/128` and routes everything through `fe80::1`, the host's
//! link-local address on its TAP: it never asks the link for another guest's address, so no proxy NDP
//! is needed, and every packet crosses the host's IP layer, where the same chains as IPv4's judge it
//! (`ip6tables`), strict reverse-path filtering is an `rpfilter` match, and egress is masqueraded.

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use super::Subnet;

pub const DEFAULT_SUBNET6: &str = "fd6b:696c:6e00::/64";
/// The host's address on every TAP: the guests' IPv6 gateway.
pub const GATEWAY6: &str = "fe80::1";

/// An IPv6 pool: always a /64.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Subnet6 {
    network: Ipv6Addr,
}

impl Subnet6 {
    /// The IPv6 address that goes with IPv4 address `v4` of pool `pool`.
    pub fn address_for(&self, pool: &Subnet, v4: Ipv4Addr) -> Ipv6Addr {
        let host = u32::from(v4).wrapping_sub(u32::from(pool.network()));
        Ipv6Addr::from(u128::from(self.network) | u128::from(host))
    }
}

impl FromStr for Subnet6 {
    type Err = String;
    fn from_str(s: &str) -> Result<Subnet6, String> {
        let bad = || {
            format!("'{s}' is not an IPv6 /64 pool; write it as ADDRESS/64, e.g. {DEFAULT_SUBNET6}, or 'off'")
        };
        let (a, p) = s.trim().split_once('/').ok_or_else(bad)?;
        let a: Ipv6Addr = a.parse().map_err(|_| bad())?;
        if p != "64" {
            return Err(bad());
        }
        Ok(Subnet6 {
            network: Ipv6Addr::from(u128::from(a) & (u128::MAX << 64)),
        })
    }
}

impl fmt::Display for Subnet6 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/64", self.network)
    }
}

/// Whether this network namespace can carry IPv6 for guests: the kernel has it and ip6tables works.
pub(crate) fn host_has_ipv6() -> Result<(), String> {
    if !std::path::Path::new("/proc/sys/net/ipv6/conf/all/forwarding").exists() {
        return Err("the kernel has no IPv6".into());
    }
    if std::fs::read_to_string("/proc/sys/net/ipv6/conf/all/disable_ipv6")
        .is_ok_and(|v| v.trim() == "1")
    {
        return Err("IPv6 is disabled on this host".into());
    }
    crate::confine::netguard::run("ip6tables", &["-w", "-n", "-L", "INPUT"])
}

/// Turns on IPv6 forwarding. A forwarding interface ignores router advertisements unless its
/// `accept_ra` is 2, so interfaces that take them (1) are set to 2 first: the host keeps the routes it
/// learns that way.
pub(crate) fn enable_forwarding() -> Result<(), String> {
    if let Ok(dirs) = std::fs::read_dir("/proc/sys/net/ipv6/conf") {
        for d in dirs.flatten() {
            let name = d.file_name().to_string_lossy().into_owned();
            if matches!(name.as_str(), "all" | "default" | "lo") {
                continue;
            }
            let key = d.path().join("accept_ra");
            if std::fs::read_to_string(&key).is_ok_and(|v| v.trim() == "1") {
                let _ = std::fs::write(&key, "2");
                tracing::info!(interface = %name, "accept_ra set to 2 so the interface keeps taking router advertisements with IPv6 forwarding on");
            }
        }
    }
    super::sysctl("net/ipv6/conf/all/forwarding", "1")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_pools_parse_and_follow_the_ipv4_host_number() {
        let p6: Subnet6 = "fd6b:696c:6e00::77/64".parse().unwrap();
        assert_eq!(p6.to_string(), "fd6b:696c:6e00::/64");
        let p4: Subnet = "10.213.0.0/24".parse().unwrap();
        assert_eq!(
            p6.address_for(&p4, Ipv4Addr::new(10, 213, 0, 5)),
            "fd6b:696c:6e00::5".parse::<Ipv6Addr>().unwrap()
        );
        let p4: Subnet = "10.200.0.0/16".parse().unwrap();
        assert_eq!(
            p6.address_for(&p4, Ipv4Addr::new(10, 200, 3, 9)),
            "fd6b:696c:6e00::309".parse::<Ipv6Addr>().unwrap()
        );
        for bad in ["fd00::/48", "fd00::", "10.0.0.0/64", "x/64"] {
            assert!(bad.parse::<Subnet6>().is_err(), "{bad}");
        }
    }
}
