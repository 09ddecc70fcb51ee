//! Bridged networking (`kiln serve --network bridged`): each sandbox its own IPv4 address on a TAP device.
//!
//! The design is routed rather than switched: every VM's TAP is a point-to-point link to the host, which
//! holds the guests' gateway on kiln's bridge device (`--bridge`, default `kiln0`, no ports), routes each
//! guest's address (`/32`) to its TAP and answers the guests' ARP requests (proxy ARP). So every packet a
//! guest sends crosses the host's IP layer, where iptables sees which TAP it came in on: strict reverse
//! path filtering drops packets whose source is not the TAP's own address (a guest cannot pose as
//! another), and the rules below decide what each address may reach. No bridge-netfilter, no ebtables.
//!
//! What stays on the host per sandbox — the TAP, its /32 route and its settings — lives as long as the
//! TAP's descriptor, which only its QEMU holds after launch: it goes with the VM, whatever happens to the
//! daemon. Addresses are stored with the sandbox (`sandboxes.address`, unique) and the rules are rendered
//! from the database as a whole (`apply`), so a restarted daemon puts back exactly what its sandboxes need.

pub mod fastpath;
mod glue;
mod preflight;
pub mod proxy;
mod rules;
pub mod tap;
mod v6;

pub(crate) use glue::setup;
pub use v6::{Subnet6, DEFAULT_SUBNET6};

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::process::Command;
use std::str::FromStr;

use crate::confine::netguard::Cidr;
use crate::db::Db;
use crate::error::{Error, ErrorCode, Result};

pub const DEFAULT_BRIDGE: &str = "kiln0";
pub const DEFAULT_SUBNET: &str = "10.213.0.0/24";
/// The host side's MAC on every TAP (locally administered, unicast).
const HOST_MAC: &str = "02:6b:69:6c:6e:01";

/// How guests are networked: `kiln serve --network user|bridged`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum NetMode {
    /// QEMU's user-mode network: every guest 10.0.2.15 behind its own QEMU, ports on 127.0.0.1.
    #[default]
    User,
    Bridged(BridgeConfig),
    /// No `--network`: bridged where the daemon can build it (root, and `preflight` passes), else user
    /// networking; the daemon resolves it at start (`glue::setup`).
    Auto(BridgeConfig),
}

impl NetMode {
    pub fn name(&self) -> &'static str {
        match self {
            NetMode::User => "user",
            NetMode::Bridged(_) => "bridged",
            NetMode::Auto(_) => "auto",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BridgeConfig {
    /// The host device holding the guests' gateway address.
    pub bridge: String,
    pub subnet: Subnet,
    /// The IPv6 pool (None: IPv4 only); used where the host has IPv6.
    pub subnet6: Option<Subnet6>,
}

impl BridgeConfig {
    pub fn new(bridge: &str, subnet: &str) -> std::result::Result<BridgeConfig, String> {
        let valid = !bridge.is_empty()
            && bridge.len() < libc::IFNAMSIZ
            && !bridge.starts_with(tap::PREFIX)
            && bridge
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        if !valid {
            return Err(format!(
                "'{bridge}' cannot be kiln's bridge: give 1-15 letters, digits, '-' or '_', not starting with '{}'",
                tap::PREFIX
            ));
        }
        Ok(BridgeConfig {
            bridge: bridge.to_string(),
            subnet: subnet.parse()?,
            subnet6: Some(DEFAULT_SUBNET6.parse()?),
        })
    }

    /// `--subnet6`: an IPv6 /64 pool, or `off`.
    pub fn with_subnet6(mut self, subnet6: &str) -> std::result::Result<BridgeConfig, String> {
        self.subnet6 = match subnet6.trim() {
            "off" | "none" | "" => None,
            s => Some(s.parse()?),
        };
        Ok(self)
    }
}

/// An IPv4 pool: the first address is the network, the second the guests' gateway, the last broadcast.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Subnet {
    network: Ipv4Addr,
    prefix: u8,
}

impl Subnet {
    pub fn network(&self) -> Ipv4Addr {
        self.network
    }
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network) + 1)
    }
    pub fn prefix(&self) -> u8 {
        self.prefix
    }
    /// Addresses guests may get, lowest first.
    pub fn hosts(&self) -> impl Iterator<Item = Ipv4Addr> {
        let first = u32::from(self.network) + 2;
        let last = u32::from(self.network) + (1u32 << (32 - self.prefix)) - 2;
        (first..=last).map(Ipv4Addr::from)
    }
    pub fn contains(&self, a: Ipv4Addr) -> bool {
        let mask = u32::MAX << (32 - self.prefix);
        u32::from(a) & mask == u32::from(self.network)
    }
}

impl FromStr for Subnet {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Subnet, String> {
        let bad = || {
            format!("'{s}' is not an IPv4 pool; write it as ADDRESS/PREFIX with a prefix from 16 to 29, e.g. {DEFAULT_SUBNET}")
        };
        let (a, p) = s.trim().split_once('/').ok_or_else(bad)?;
        let a: Ipv4Addr = a.parse().map_err(|_| bad())?;
        let prefix: u8 = p
            .parse()
            .ok()
            .filter(|p| (16..=29).contains(p))
            .ok_or_else(bad)?;
        let mask = u32::MAX << (32 - prefix);
        Ok(Subnet {
            network: Ipv4Addr::from(u32::from(a) & mask),
            prefix,
        })
    }
}

impl fmt::Display for Subnet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

/// What a guest's `eth0` is configured with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestNet {
    pub address: Ipv4Addr,
    pub prefix: u8,
    pub gateway: Ipv4Addr,
    pub dns: Vec<Ipv4Addr>,
    /// Its IPv6 address (a /128 routed through `fe80::1`), if the daemon gives guests IPv6.
    pub address6: Option<Ipv6Addr>,
}

impl GuestNet {
    /// QEMU user networking's fixed layout (what the image's init uses without parameters).
    pub fn user() -> GuestNet {
        GuestNet {
            address: Ipv4Addr::new(10, 0, 2, 15),
            prefix: 24,
            gateway: Ipv4Addr::new(10, 0, 2, 2),
            dns: vec![Ipv4Addr::new(10, 0, 2, 3)],
            address6: None,
        }
    }

    /// Kernel parameters the image's init reads at a cold boot (images/init.sh); later ones win.
    pub fn cmdline(&self) -> String {
        let dns: Vec<String> = self.dns.iter().map(|d| d.to_string()).collect();
        format!(
            "kiln.ip={}/{} kiln.gw={} kiln.dns={}",
            self.address,
            self.prefix,
            self.gateway,
            dns.join(",")
        )
    }

    /// The guest-side re-addressing of a restored machine, run by the agent with the image's busybox
    /// (`/kiln/busybox`, in every kiln image): the old address goes, the new one and its default route
    /// come, the neighbour cache is emptied and a gratuitous ARP announces the new MAC and address.
    pub fn script(&self) -> String {
        let mut s = format!(
            "b=/kiln/busybox\n\
             $b ip addr flush dev eth0\n\
             $b ip addr add {a}/{p} dev eth0 || exit 1\n\
             $b ip link set eth0 up\n\
             $b ip route replace default via {g} dev eth0 || exit 1\n\
             $b ip neigh flush dev eth0\n",
            a = self.address,
            p = self.prefix,
            g = self.gateway
        );
        if !self.dns.is_empty() {
            let lines: String = self
                .dns
                .iter()
                .map(|d| format!("nameserver {d}\\n"))
                .collect();
            // In place: /etc/resolv.conf may be a file bind-mounted by init.
            s.push_str(&format!("printf '{lines}' >/etc/resolv.conf\n"));
        }
        // IPv6: the old global address goes; a new one comes without duplicate detection (the host
        // routes it to this TAP alone), with the host's link-local address as the default route.
        s.push_str("$b ip -6 addr flush dev eth0 scope global 2>/dev/null\n");
        if let Some(a6) = self.address6 {
            s.push_str(&format!(
                "echo 0 >/proc/sys/net/ipv6/conf/eth0/accept_dad\n\
                 $b ip -6 addr add {a6}/128 dev eth0 || exit 1\n\
                 $b ip -6 route replace default via {} dev eth0 || exit 1\n",
                v6::GATEWAY6
            ));
        }
        // In the background with its own descriptors: the exec returns without waiting for it.
        s.push_str(&format!(
            "$b arping -U -c 1 -I eth0 {} </dev/null >/dev/null 2>&1 &\n",
            self.address
        ));
        s
    }
}

/// One sandbox's address as the rules see it.
#[derive(Debug, Clone)]
pub struct Lease {
    pub sandbox: String,
    pub network: Option<String>,
    pub address: Ipv4Addr,
    pub egress: bool,
}

/// NIC queue pairs a new machine gets: one per vCPU of a multi-vCPU guest on a TAP (at most
/// `kiln_vmm::qemu::MAX_NET_QUEUES`), one on user networking, whose netdev has a single queue.
pub(crate) fn boot_queues(bridged: bool, cpus: u32) -> Option<u32> {
    let n = (cpus as usize).min(kiln_vmm::qemu::MAX_NET_QUEUES) as u32;
    (bridged && n > 1).then_some(n)
}

/// A machine whose NIC has `queues` queue pairs cannot run on user networking (one queue; the count is
/// part of the NIC's saved state).
pub(crate) fn queues_refused(what: &str, queues: usize) -> Error {
    Error::new(
        ErrorCode::SnapshotIncompatible,
        format!("{what} cannot run on this daemon: its NIC has {queues} queue pairs (it was made with several vCPUs on bridged networking), and user networking has one; run it on a daemon with bridged networking (`kiln serve --network bridged`), or resume a `--type disk` snapshot of it here"),
    )
}

/// Whether `name` can be a private network's name (`--network NAME` on create).
pub fn check_network_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 32
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !matches!(name, "user" | "bridged" | "default");
    if ok {
        Ok(())
    } else {
        Err(Error::new(
            ErrorCode::InvalidRequest,
            format!("'{name}' is not a network name: use 1-32 lowercase letters, digits and '-' (not user, bridged or default)"),
        ))
    }
}

/// The host side of bridged networking for one daemon.
pub struct Bridge {
    pub cfg: BridgeConfig,
    /// IPv4 resolvers guests are given (the host's, from /etc/resolv.conf, except loopback ones).
    resolvers: Vec<Ipv4Addr>,
    allow: Vec<Cidr>,
    /// Serialises rule updates (each is a whole replacement).
    rules: std::sync::Mutex<()>,
    /// Published ports (`proxy`).
    pub proxies: proxy::Proxies,
    /// The IPv6 pool in use (None: the host has no IPv6 or `--subnet6 off`).
    pub v6: Option<Subnet6>,
    /// Whether VMs' NICs get vhost-net.
    pub vhost: fastpath::Vhost,
}

impl Bridge {
    /// Creates (or finds) the bridge device with the gateway address, turns on IPv4 forwarding, and
    /// installs the rules `leases` need (the sandboxes a previous daemon left) before hooking them.
    pub fn setup(
        cfg: BridgeConfig,
        allow: &[Cidr],
        leases: &[Lease],
    ) -> std::result::Result<Bridge, String> {
        let br = cfg.bridge.as_str();
        // Not judged from /sys/class/net, which shows the namespace sysfs was mounted in (a daemon
        // entered into a namespace with nsenter sees its parent's devices there).
        preflight::bridge_device(br)?;
        let gw = format!("{}/32", cfg.subnet.gateway());
        ip(&["addr", "replace", &gw, "dev", br])?;
        ip(&["link", "set", br, "up"])?;
        // Addresses of the pool no guest has are unreachable rather than routed out of the host.
        ip(&["route", "replace", "unreachable", &cfg.subnet.to_string()])?;
        sysctl("net/ipv4/ip_forward", "1")?;
        let _ = sysctl(&format!("net/ipv6/conf/{br}/disable_ipv6"), "1");
        let resolvers = crate::confine::netguard::resolvers(
            &std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default(),
        )
        .into_iter()
        .filter_map(|a| match a {
            std::net::IpAddr::V4(v4) if !v4.is_loopback() => Some(v4),
            _ => None,
        })
        .collect();
        let v6 = match cfg.subnet6 {
            Some(p6) => match v6::host_has_ipv6() {
                Ok(()) => {
                    v6::enable_forwarding()?;
                    ip(&["-6", "route", "replace", "unreachable", &p6.to_string()])?;
                    Some(p6)
                }
                Err(why) => {
                    tracing::info!(reason = %why, "bridged guests get no IPv6");
                    None
                }
            },
            None => None,
        };
        let bridge = Bridge {
            cfg,
            resolvers,
            allow: allow.to_vec(),
            rules: Default::default(),
            proxies: Default::default(),
            v6,
            vhost: fastpath::probe(),
        };
        bridge.apply(leases)?;
        rules::hook(v6.is_some())?;
        Ok(bridge)
    }

    pub fn guest(&self, address: Ipv4Addr) -> GuestNet {
        GuestNet {
            address,
            prefix: self.cfg.subnet.prefix(),
            gateway: self.cfg.subnet.gateway(),
            dns: self.resolvers.clone(),
            address6: self.v6.map(|p6| p6.address_for(&self.cfg.subnet, address)),
        }
    }

    /// A new TAP for `sandbox`'s VM with `queues` queues, routed to `address`.
    pub fn open_tap(
        &self,
        sandbox: &str,
        address: Ipv4Addr,
        queues: usize,
    ) -> std::result::Result<tap::Tap, String> {
        let t = tap::Tap::open(queues).map_err(|e| format!("cannot create a TAP device: {e}"))?;
        let n = t.name.as_str();
        // No IPv6 on the host side (a guest would reach the host's services over link-local), ARP answered
        // for the gateway and other guests at once, and only the guest's own address accepted from it.
        // Absent when the kernel has no IPv6 at all, which is as good. With IPv6 for guests the TAP
        // gets only fe80::1 (no address of its own making, no router advertisements, no duplicate
        // detection), and KILN-NET-IN keeps the guest off it but for neighbour discovery.
        match self.v6 {
            None => {
                let _ = sysctl(&format!("net/ipv6/conf/{n}/disable_ipv6"), "1");
            }
            Some(_) => {
                sysctl(&format!("net/ipv6/conf/{n}/addr_gen_mode"), "1")?;
                sysctl(&format!("net/ipv6/conf/{n}/accept_ra"), "0")?;
                sysctl(&format!("net/ipv6/conf/{n}/accept_dad"), "0")?;
                sysctl(&format!("net/ipv6/conf/{n}/disable_ipv6"), "0")?;
            }
        }
        sysctl(&format!("net/ipv4/conf/{n}/proxy_arp"), "1")?;
        sysctl(&format!("net/ipv4/conf/{n}/rp_filter"), "1")?;
        sysctl(&format!("net/ipv4/neigh/{n}/proxy_delay"), "0")?;
        // One host-side MAC for every TAP (each is a link of its own): a guest's neighbour entries for
        // the gateway and the other guests stay right when its VM comes back on a new TAP (a start from
        // hibernation, a roll back), where the kernel's random MAC would strand them.
        ip(&["link", "set", "dev", n, "address", HOST_MAC])?;
        ip(&["link", "set", "dev", n, "alias", sandbox])?;
        ip(&["link", "set", "dev", n, "up"])?;
        // `replace`: the route moves from a previous VM of the same sandbox whose TAP is still going.
        ip(&["route", "replace", &format!("{address}/32"), "dev", n])?;
        if let Some(p6) = self.v6 {
            let gw = format!("{}/64", v6::GATEWAY6);
            ip(&["-6", "addr", "replace", &gw, "dev", n, "nodad"])?;
            let a6 = p6.address_for(&self.cfg.subnet, address);
            ip(&["-6", "route", "replace", &format!("{a6}/128"), "dev", n])?;
        }
        Ok(t)
    }

    /// Replaces kiln's rules with those `leases` need, in one `iptables-restore` transaction.
    pub fn apply(&self, leases: &[Lease]) -> std::result::Result<(), String> {
        let _g = self.rules.lock().unwrap_or_else(|p| p.into_inner());
        let guard = crate::confine::netguard::forward_rules(
            rules::GUARD,
            &self
                .resolvers
                .iter()
                .map(|a| std::net::IpAddr::V4(*a))
                .collect::<Vec<_>>(),
            &self.allow,
        );
        let text = rules::render(&self.cfg.subnet, leases, &guard);
        crate::confine::netguard::restore("iptables", &text)?;
        let Some(p6) = self.v6 else {
            return Ok(());
        };
        let guard6 =
            crate::confine::netguard::forward_rules6(rules::GUARD, &self.resolvers6(), &self.allow);
        let leases6: Vec<(Lease, Ipv6Addr)> = leases
            .iter()
            .map(|l| (l.clone(), p6.address_for(&self.cfg.subnet, l.address)))
            .collect();
        let text = rules::render6(&p6, &leases6, &guard6);
        crate::confine::netguard::restore("ip6tables", &text)
    }

    /// The host's IPv6 resolvers that guests may ask (none is given to guests: they get IPv4 ones).
    fn resolvers6(&self) -> Vec<std::net::IpAddr> {
        crate::confine::netguard::resolvers(
            &std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default(),
        )
        .into_iter()
        .filter(|a| a.is_ipv6() && !a.is_loopback())
        .collect()
    }

    /// The IPv6 addresses a guest at IPv4 `address` had (for resetting its connections).
    pub fn address6_for(&self, address: Ipv4Addr) -> Option<Ipv6Addr> {
        self.v6
            .filter(|_| self.cfg.subnet.contains(address))
            .map(|p6| p6.address_for(&self.cfg.subnet, address))
    }

    /// Host-side leftovers: TAPs no running sandbox of `running` has.
    pub fn leftovers(&self, running: &[String]) -> Vec<String> {
        let mut found = Vec::new();
        for (name, alias) in taps() {
            if !running.contains(&alias) {
                found.push(format!(
                    "TAP device {name} of sandbox '{alias}', which has no running VM"
                ));
            }
        }
        found
    }
}

/// Whether bridged networking's chains are installed in this network namespace.
pub fn rules_installed() -> bool {
    rules::installed()
}

/// kiln's TAP devices in this network namespace and the sandbox each belongs to (its alias). From
/// `ip -o -d link`, which asks the namespace itself (see `Bridge::setup` on /sys).
pub fn taps() -> Vec<(String, String)> {
    let Ok(out) = Command::new("ip")
        .args(["-o", "-d", "link", "show"])
        .output()
    else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some(name) = line.split(": ").nth(1) else {
            continue;
        };
        let name = name.split('@').next().unwrap_or(name);
        if !name.starts_with(tap::PREFIX) || !line.contains(" tun ") {
            continue;
        }
        let alias = line
            .split("alias ")
            .nth(1)
            .and_then(|a| a.split_whitespace().next())
            .unwrap_or_default();
        found.push((name.to_string(), alias.to_string()));
    }
    found.sort();
    found
}

/// The addresses stored with sandboxes.
pub(crate) fn leases(db: &Db) -> Result<Vec<Lease>> {
    let conn = db.conn();
    let mut stmt = conn.prepare_cached(
        "SELECT id, network, address, egress FROM sandboxes WHERE address IS NOT NULL ORDER BY id",
    )?;
    let rows = stmt.query_map([], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, Option<String>>(1)?,
            r.get::<_, String>(2)?,
            r.get::<_, bool>(3)?,
        ))
    })?;
    let mut out = Vec::new();
    for row in rows {
        let (sandbox, network, address, egress) = row?;
        if let Ok(address) = address.parse() {
            out.push(Lease {
                sandbox,
                network,
                address,
                egress,
            });
        }
    }
    Ok(out)
}

/// Gives sandbox `id` the lowest free address of `subnet` (checked and taken under the database lock).
pub(crate) fn allocate(
    db: &Db,
    id: &str,
    network: Option<&str>,
    subnet: &Subnet,
) -> Result<Ipv4Addr> {
    let conn = db.conn();
    let used: std::collections::HashSet<String> = {
        let mut stmt = conn.prepare_cached(
            "SELECT address FROM sandboxes WHERE address IS NOT NULL AND id != ?1",
        )?;
        let rows = stmt.query_map([id], |r| r.get::<_, String>(0))?;
        rows.collect::<rusqlite::Result<_>>()?
    };
    let Some(address) = subnet.hosts().find(|a| !used.contains(&a.to_string())) else {
        return Err(Error::new(
            ErrorCode::CapacityExceeded,
            format!("every address of the pool {subnet} is taken; delete sandboxes or start the daemon with a larger --subnet"),
        ));
    };
    conn.execute(
        "UPDATE sandboxes SET network = ?2, address = ?3 WHERE id = ?1",
        rusqlite::params![id, network, address.to_string()],
    )?;
    Ok(address)
}

/// Forgets sandbox `id`'s address (it now runs on user networking).
pub(crate) fn release(db: &Db, id: &str) -> Result<()> {
    db.conn()
        .execute("UPDATE sandboxes SET address = NULL WHERE id = ?1", [id])?;
    Ok(())
}

/// Puts sandbox `id` in private network `network` (a claimed warm spare, made in none).
pub(crate) fn set_network(db: &Db, id: &str, network: Option<&str>) -> Result<()> {
    db.conn().execute(
        "UPDATE sandboxes SET network = ?2 WHERE id = ?1",
        rusqlite::params![id, network],
    )?;
    Ok(())
}

fn ip(args: &[&str]) -> std::result::Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("running ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn sysctl(key: &str, value: &str) -> std::result::Result<(), String> {
    let path = format!("/proc/sys/{key}");
    std::fs::write(&path, value).map_err(|e| format!("cannot set {path} to {value}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subnets_parse_and_enumerate() {
        let s: Subnet = "10.213.0.77/24".parse().unwrap();
        assert_eq!(s.to_string(), "10.213.0.0/24");
        assert_eq!(s.gateway(), Ipv4Addr::new(10, 213, 0, 1));
        let hosts: Vec<_> = s.hosts().collect();
        assert_eq!(hosts.len(), 253);
        assert_eq!(hosts[0], Ipv4Addr::new(10, 213, 0, 2));
        assert_eq!(hosts[252], Ipv4Addr::new(10, 213, 0, 254));
        assert!(s.contains(Ipv4Addr::new(10, 213, 0, 9)));
        assert!(!s.contains(Ipv4Addr::new(10, 213, 1, 9)));
        for bad in ["10.0.0.0", "10.0.0.0/8", "10.0.0.0/30", "x/24", "::1/64"] {
            assert!(bad.parse::<Subnet>().is_err(), "{bad}");
        }
    }

    #[test]
    fn bridge_and_network_names_are_checked() {
        assert!(BridgeConfig::new("kiln0", DEFAULT_SUBNET).is_ok());
        for bad in ["", "kt0", "a-very-long-bridge-name", "br 0", "br/0"] {
            assert!(BridgeConfig::new(bad, DEFAULT_SUBNET).is_err(), "{bad}");
        }
        assert!(check_network_name("team-a").is_ok());
        for bad in ["", "Team", "a b", "default", "user", &"x".repeat(33)] {
            assert!(check_network_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_guest_script_readdresses_and_announces() {
        let g = GuestNet {
            address: Ipv4Addr::new(10, 213, 0, 5),
            prefix: 24,
            gateway: Ipv4Addr::new(10, 213, 0, 1),
            dns: vec![Ipv4Addr::new(192, 0, 2, 53)],
            address6: None,
        };
        let s = g.script();
        assert!(s.contains("ip addr flush dev eth0"));
        assert!(s.contains("ip addr add 10.213.0.5/24 dev eth0"));
        assert!(s.contains("ip route replace default via 10.213.0.1 dev eth0"));
        assert!(s.contains("ip neigh flush dev eth0"));
        assert!(s.contains("nameserver 192.0.2.53"));
        assert!(s.contains("arping -U -c 1 -I eth0 10.213.0.5"));
        assert!(
            s.contains("ip -6 addr flush dev eth0 scope global") && !s.contains("ip -6 addr add")
        );
        let g6 = GuestNet {
            address6: Some("fd6b:696c:6e00::5".parse().unwrap()),
            ..g.clone()
        };
        let s = g6.script();
        assert!(s.contains("ip -6 addr add fd6b:696c:6e00::5/128 dev eth0"));
        assert!(s.contains("ip -6 route replace default via fe80::1 dev eth0"));
        assert_eq!(
            g.cmdline(),
            "kiln.ip=10.213.0.5/24 kiln.gw=10.213.0.1 kiln.dns=192.0.2.53"
        );
    }
}
