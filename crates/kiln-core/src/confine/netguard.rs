//! Firewall rules that keep guests off the host itself and off the networks around it.
//!
//! With user-mode networking a guest's connections are made by its QEMU process, and 10.0.2.2 is the
//! host's loopback: without rules a guest could reach anything listening on 127.0.0.1 (kiln's TCP API,
//! other sandboxes' forwarded ports), the host's own addresses, the cloud metadata service, and whatever
//! the host's LAN holds. The rules match the owner of the socket, i.e. kiln's reserved VM uid range, and
//! reject *new* connections (replies on connections that come in through port forwards are not new, so
//! forwards keep working) to:
//! - the host's own addresses (`addrtype LOCAL`) and the metadata addresses, always;
//! - port 53 of anything but the host's resolvers (slirp relays the guest's DNS to them; they may well be
//!   on a private or loopback address, e.g. systemd-resolved's 127.0.0.53);
//! - link-local, RFC 1918, CGNAT and ULA ranges, unless an `--allow-net` range opens them.
//!
//! One shared chain for the whole uid range, replaced atomically (`iptables-restore --noflush`) by each
//! daemon at start: installing is idempotent, and on a host with several daemons the last one started
//! sets the allowlist and resolvers.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::process::{Command, Stdio};
use std::str::FromStr;

pub const CHAIN: &str = "KILN-VM-OUT";

/// Cloud metadata services (AWS, GCP, Azure, OpenStack on 169.254.169.254; AWS's IPv6 endpoint).
const METADATA: [&str; 2] = ["169.254.169.254/32", "fd00:ec2::254/128"];
/// Ranges guests may not reach unless `--allow-net` opens them: link-local, RFC 1918, CGNAT; ULA.
const DENIED: [&str; 7] = [
    "169.254.0.0/16",
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "100.64.0.0/10",
    "fe80::/10",
    "fc00::/7",
];

/// An address range: `10.0.0.0/8`, `2001:db8::/32`, or a bare address (one host). Host bits are cleared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    pub fn is_ipv6(&self) -> bool {
        self.addr.is_ipv6()
    }
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Cidr, String> {
        let s = s.trim();
        let bad = || {
            format!("'{s}' is not an address range; write it as ADDRESS/PREFIX, e.g. 10.20.0.0/16")
        };
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| bad())?;
        let max = if addr.is_ipv6() { 128 } else { 32 };
        let prefix = match prefix {
            Some(p) => p.parse::<u8>().ok().filter(|p| *p <= max).ok_or_else(bad)?,
            None => max,
        };
        let addr = match addr {
            IpAddr::V4(a) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
                IpAddr::V4(Ipv4Addr::from(u32::from(a) & mask))
            }
            IpAddr::V6(a) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
                IpAddr::V6(Ipv6Addr::from(u128::from(a) & mask))
            }
        };
        Ok(Cidr { addr, prefix })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// The resolvers named by `nameserver` lines of a resolv.conf; without any, the C library's default
/// (the local host), which is also where slirp then sends the guest's queries.
pub fn resolvers(resolv_conf: &str) -> Vec<IpAddr> {
    let mut found: Vec<IpAddr> = Vec::new();
    for line in resolv_conf.lines() {
        let mut words = line.split_whitespace();
        if words.next() != Some("nameserver") {
            continue;
        }
        // A link-local IPv6 resolver carries its interface (`fe80::1%eth0`); the rule matches the address.
        let addr = words.next().and_then(|w| w.split('%').next()?.parse().ok());
        if let Some(a) = addr {
            if !found.contains(&a) {
                found.push(a);
            }
        }
    }
    if found.is_empty() {
        found = vec![Ipv4Addr::LOCALHOST.into(), Ipv6Addr::LOCALHOST.into()];
    }
    found
}

#[derive(Debug)]
pub struct NetGuard {
    /// Whether the IPv6 rules were installed too.
    pub ipv6: bool,
    /// The resolvers guests' DNS may go to (from /etc/resolv.conf at start).
    pub resolvers: Vec<IpAddr>,
}

impl NetGuard {
    /// Installs (or replaces) the rules with iptables, and ip6tables when IPv6 is there. `allow` opens
    /// ranges that are denied by default (never the host's own addresses).
    /// The rules cover kiln's VM uid range (`super::UID_BASE`, `super::UID_COUNT`).
    pub fn install(allow: &[Cidr]) -> Result<NetGuard, String> {
        let range = format!(
            "{}-{}",
            super::UID_BASE,
            super::UID_BASE + super::UID_COUNT - 1
        );
        let resolvers = resolvers(&std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default());
        install_with("iptables", &rules(false, &range, &resolvers, allow))?;
        let ipv6 = match install_with("ip6tables", &rules(true, &range, &resolvers, allow)) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!("IPv6 firewall rules not installed: {e}");
                false
            }
        };
        Ok(NetGuard { ipv6, resolvers })
    }

    pub fn remove(&self) {
        let mut tools = vec!["iptables"];
        if self.ipv6 {
            tools.push("ip6tables");
        }
        for tool in tools {
            while run(tool, &["-w", "-D", "OUTPUT", "-j", CHAIN]).is_ok() {}
            let _ = run(tool, &["-w", "-F", CHAIN]);
            let _ = run(tool, &["-w", "-X", CHAIN]);
        }
    }
}

/// The same judgement for guests' routed traffic (bridged networking, `crate::net`) in `chain`: IPv4, any
/// sender (no owner match: the packets are forwarded, not a VM process's own).
pub(crate) fn forward_rules(chain: &str, resolvers: &[IpAddr], allow: &[Cidr]) -> Vec<String> {
    rules(false, "0-0", resolvers, allow)
        .into_iter()
        .skip(1)
        .map(|r| r.replacen(&format!("-A {CHAIN} "), &format!("-A {chain} "), 1))
        .collect()
}

/// `forward_rules` for IPv6 (`ip6tables`).
pub(crate) fn forward_rules6(chain: &str, resolvers: &[IpAddr], allow: &[Cidr]) -> Vec<String> {
    rules(true, "0-0", resolvers, allow)
        .into_iter()
        .skip(1)
        .map(|r| r.replacen(&format!("-A {CHAIN} "), &format!("-A {chain} "), 1))
        .collect()
}

/// The chain's rules for one address family, in `iptables-restore` syntax, in order.
fn rules(ipv6: bool, uids: &str, resolvers: &[IpAddr], allow: &[Cidr]) -> Vec<String> {
    let c = CHAIN;
    let mut r = vec![
        // Only new connections of VM processes are judged; everything else leaves the chain at once.
        format!("-A {c} -m owner ! --uid-owner {uids} -j RETURN"),
        format!("-A {c} -m conntrack ! --ctstate NEW -j RETURN"),
    ];
    for dns in resolvers.iter().filter(|a| a.is_ipv6() == ipv6) {
        for proto in ["udp", "tcp"] {
            r.push(format!("-A {c} -d {dns} -p {proto} --dport 53 -j RETURN"));
        }
    }
    // A TCP reset makes a guest's connect fail at once rather than time out.
    let reject = |r: &mut Vec<String>, what: &str| {
        r.push(format!(
            "-A {c} {what} -p tcp -j REJECT --reject-with tcp-reset"
        ));
        r.push(format!("-A {c} {what} -j REJECT"));
    };
    reject(&mut r, "-m addrtype --dst-type LOCAL");
    for m in METADATA.iter().filter(|m| m.contains(':') == ipv6) {
        // Only an allowlist entry naming exactly the metadata address opens it, not a wider range.
        if !allow.iter().any(|a| a.to_string() == *m) {
            reject(&mut r, &format!("-d {m}"));
        }
    }
    for a in allow.iter().filter(|a| a.is_ipv6() == ipv6) {
        r.push(format!("-A {c} -d {a} -j RETURN"));
    }
    r.push(format!(
        "-A {c} -p tcp --dport 53 -j REJECT --reject-with tcp-reset"
    ));
    r.push(format!("-A {c} -p udp --dport 53 -j REJECT"));
    for d in DENIED.iter().filter(|d| d.contains(':') == ipv6) {
        reject(&mut r, &format!("-d {d}"));
    }
    r
}

fn install_with(tool: &str, rules: &[String]) -> Result<(), String> {
    // One transaction: declaring the chain empties it if it exists, and the new rules take its place at
    // once, so VMs of other daemons are never left without rules in between.
    let mut input = format!("*filter\n:{CHAIN} - [0:0]\n");
    for rule in rules {
        input.push_str(rule);
        input.push('\n');
    }
    input.push_str("COMMIT\n");
    restore(tool, &input)?;
    if run(tool, &["-w", "-C", "OUTPUT", "-j", CHAIN]).is_err() {
        run(tool, &["-w", "-I", "OUTPUT", "1", "-j", CHAIN])?;
    }
    Ok(())
}

pub(crate) fn restore(tool: &str, input: &str) -> Result<(), String> {
    use std::io::Write;
    let program = format!("{tool}-restore");
    let mut child = Command::new(&program)
        .args(["-w", "--noflush"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| spawn_error(&program, e))?;
    let written = child
        .stdin
        .take()
        .map(|mut stdin| stdin.write_all(input.as_bytes()));
    let out = child
        .wait_with_output()
        .map_err(|e| format!("running {program}: {e}"))?;
    if let Some(Err(e)) = written {
        return Err(format!("writing rules to {program}: {e}"));
    }
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{program}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn spawn_error(tool: &str, e: std::io::Error) -> String {
    if e.kind() == std::io::ErrorKind::NotFound {
        format!(
            "{tool} is not installed (apt-get install iptables, or run scripts/install-deps.sh)"
        )
    } else {
        format!("running {tool}: {e}")
    }
}

pub(crate) fn run(tool: &str, args: &[&str]) -> Result<(), String> {
    let out = Command::new(tool)
        .args(args)
        .output()
        .map_err(|e| spawn_error(tool, e))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{tool} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// How many processes on the host run with a uid in the range (confined VMs of any kiln daemon).
pub fn processes_in_uid_range(base: u32, count: u32) -> usize {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().parse::<u32>().is_ok())
        .filter_map(|e| std::fs::read_to_string(e.path().join("status")).ok())
        // Exited VMs waiting to be reaped hold no sockets.
        .filter(|s| {
            !s.lines()
                .any(|l| l.starts_with("State:") && l.contains("zombie"))
        })
        .filter_map(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|u| u.parse::<u32>().ok())
        })
        .filter(|uid| (base..base.saturating_add(count)).contains(uid))
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cidr(s: &str) -> Cidr {
        s.parse().unwrap()
    }

    #[test]
    fn ranges_parse_and_lose_their_host_bits() {
        assert_eq!(cidr("10.99.0.7/24").to_string(), "10.99.0.0/24");
        assert_eq!(cidr(" 192.0.2.1 ").to_string(), "192.0.2.1/32");
        assert_eq!(cidr("0.0.0.0/0").to_string(), "0.0.0.0/0");
        assert_eq!(cidr("fd00:ec2::254").to_string(), "fd00:ec2::254/128");
        assert_eq!(cidr("2001:db8::1/32").to_string(), "2001:db8::/32");
        for bad in [
            "",
            "10.0.0.0/33",
            "::/129",
            "10.0.0/8",
            "10.0.0.0/x",
            "-j ACCEPT",
        ] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
    }

    #[test]
    fn resolvers_come_from_nameserver_lines_or_default_to_the_local_host() {
        let conf = "# x\nsearch lan\nnameserver 127.0.0.53\nnameserver fe80::1%eth0\nnameserver 127.0.0.53\noptions edns0\n";
        assert_eq!(
            resolvers(conf),
            vec![
                "127.0.0.53".parse::<IpAddr>().unwrap(),
                "fe80::1".parse().unwrap()
            ]
        );
        assert_eq!(
            resolvers("search lan\n"),
            vec![
                IpAddr::from(Ipv4Addr::LOCALHOST),
                IpAddr::from(Ipv6Addr::LOCALHOST)
            ]
        );
    }

    fn position(rules: &[String], needle: &str) -> usize {
        rules
            .iter()
            .position(|r| r.contains(needle))
            .unwrap_or_else(|| panic!("no rule with '{needle}' in {rules:#?}"))
    }

    #[test]
    fn resolvers_pass_before_any_denial_and_allowed_ranges_before_private_ones() {
        let dns = resolvers("nameserver 10.255.255.53\nnameserver fe80::1\n");
        let allow = [cidr("10.99.0.0/24"), cidr("fd12::/16")];
        let v4 = rules(false, "1-2", &dns, &allow);
        assert!(v4[0].contains("! --uid-owner 1-2 -j RETURN"));
        assert!(v4[1].contains("! --ctstate NEW -j RETURN"));
        let resolver = position(&v4, "-d 10.255.255.53 -p udp --dport 53 -j RETURN");
        let local = position(&v4, "LOCAL");
        let metadata = position(&v4, "-d 169.254.169.254/32");
        let allowed = position(&v4, "-d 10.99.0.0/24 -j RETURN");
        let dns53 = position(&v4, "-p udp --dport 53 -j REJECT");
        let private = position(&v4, "-d 10.0.0.0/8");
        assert!(resolver < local && local < allowed && metadata < allowed);
        assert!(allowed < dns53 && dns53 < private);
        for range in [
            "169.254.0.0/16",
            "172.16.0.0/12",
            "192.168.0.0/16",
            "100.64.0.0/10",
        ] {
            position(&v4, range);
        }
        assert!(v4
            .iter()
            .all(|r| !r.contains("fe80") && !r.contains("fd12")));

        let v6 = rules(true, "1-2", &dns, &allow);
        let resolver = position(&v6, "-d fe80::1 -p tcp --dport 53 -j RETURN");
        let allowed = position(&v6, "-d fd12::/16 -j RETURN");
        assert!(resolver < position(&v6, "LOCAL"));
        assert!(position(&v6, "-d fd00:ec2::254/128") < allowed);
        assert!(allowed < position(&v6, "-d fc00::/7"));
        position(&v6, "-d fe80::/10");
        assert!(v6
            .iter()
            .all(|r| !r.contains("10.") && !r.contains("169.254")));
    }

    #[test]
    fn only_an_exact_entry_opens_the_metadata_address() {
        let wide = rules(false, "1-2", &[], &[cidr("169.254.0.0/16")]);
        position(&wide, "-d 169.254.169.254/32 -p tcp -j REJECT");
        let exact = rules(false, "1-2", &[], &[cidr("169.254.169.254")]);
        assert!(exact
            .iter()
            .all(|r| !r.contains("169.254.169.254/32 -p tcp -j REJECT")));
    }

    /// The generated rules are valid for iptables itself (parsed, not committed), where it can be run.
    #[test]
    fn iptables_restore_accepts_the_rules() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return;
        }
        let dns = resolvers("nameserver 127.0.0.53\nnameserver ::1\n");
        let allow = [cidr("10.99.0.0/24"), cidr("fd12::/16")];
        for (tool, v6) in [("iptables", false), ("ip6tables", true)] {
            let mut input = format!("*filter\n:{CHAIN} - [0:0]\n");
            for r in rules(v6, "1000000000-1000065535", &dns, &allow) {
                input.push_str(&r);
                input.push('\n');
            }
            input.push_str("COMMIT\n");
            let Ok(mut child) = Command::new(format!("{tool}-restore"))
                .args(["--test", "--noflush"])
                .stdin(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
            else {
                return;
            };
            use std::io::Write;
            child
                .stdin
                .take()
                .unwrap()
                .write_all(input.as_bytes())
                .unwrap();
            let out = child.wait_with_output().unwrap();
            assert!(
                out.status.success(),
                "{tool}-restore rejected:\n{input}\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}
