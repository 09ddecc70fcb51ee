//! kiln's iptables rules for bridged guests, rendered from the sandboxes' addresses as one
//! `iptables-restore --noflush` transaction (declaring a chain empties it, so a whole replacement is
//! atomic and idempotent).
//!
//! - `KILN-NET-IN` (from INPUT): nothing from a guest reaches the host itself — the API port, the host's
//!   services, other addresses — except replies on connections the host opened (e.g. published ports).
//! - `KILN-NET-FWD` (from FORWARD): guests reach each other only within a named network; nothing from
//!   outside reaches a guest unless it answers the guest; egress off refuses everything else; the rest
//!   goes through `KILN-NET-GUARD`, the same judgement as user networking's (`confine::netguard`:
//!   no metadata, private or link-local ranges unless `--allow-net`, DNS only to the host's resolvers).
//! - `KILN-NET-NAT` (nat, from POSTROUTING): guests' connections out are masqueraded.

use super::{tap, Lease, Subnet, Subnet6};
use crate::confine::netguard::run;

pub const IN: &str = "KILN-NET-IN";
pub const FWD: &str = "KILN-NET-FWD";
pub const GUARD: &str = "KILN-NET-GUARD";
pub const NAT: &str = "KILN-NET-NAT";
/// IPv6 only (raw, from PREROUTING): strict reverse-path filtering of packets from guests.
pub const RAW: &str = "KILN-NET-RAW";

/// The built-in chains kiln's chains hang from, per tool.
fn hooks(tool: &str) -> Vec<(&'static str, &'static str, &'static str)> {
    let mut h = vec![
        ("filter", "INPUT", IN),
        ("filter", "FORWARD", FWD),
        ("nat", "POSTROUTING", NAT),
    ];
    if tool == "ip6tables" {
        h.push(("raw", "PREROUTING", RAW));
    }
    h
}

pub(crate) fn render(subnet: &Subnet, leases: &[Lease], guard: &[String]) -> String {
    let hosts: Vec<(&Lease, String)> = leases
        .iter()
        .map(|l| (l, format!("{}/32", l.address)))
        .collect();
    render_family(&subnet.to_string(), &hosts, guard, false)
}

/// The IPv6 rules (`ip6tables-restore`): the same chains over the guests' IPv6 addresses, plus
/// neighbour discovery with the host, and strict reverse-path filtering (`KILN-NET-RAW`), which IPv6
/// has no sysctl for.
pub(crate) fn render6(
    subnet6: &Subnet6,
    leases: &[(Lease, std::net::Ipv6Addr)],
    guard: &[String],
) -> String {
    let hosts: Vec<(&Lease, String)> = leases
        .iter()
        .map(|(l, a)| (l, format!("{a}/128")))
        .collect();
    render_family(&subnet6.to_string(), &hosts, guard, true)
}

fn render_family(pool: &str, hosts: &[(&Lease, String)], guard: &[String], v6: bool) -> String {
    let t = format!("{}+", tap::PREFIX);
    let mut r = Vec::new();
    if v6 {
        r.push("*raw".to_string());
        r.push(format!(":{RAW} - [0:0]"));
        r.push(format!("-A {RAW} -i {t} -m rpfilter --invert -j DROP"));
        r.push("COMMIT".into());
    }
    r.extend([
        "*filter".to_string(),
        format!(":{IN} - [0:0]"),
        format!(":{FWD} - [0:0]"),
        format!(":{GUARD} - [0:0]"),
        format!("-A {IN} -i {t} -m conntrack --ctstate ESTABLISHED,RELATED -j RETURN"),
    ]);
    if v6 {
        // The host and its guest find each other's link-layer address.
        for kind in ["neighbour-solicitation", "neighbour-advertisement"] {
            r.push(format!(
                "-A {IN} -i {t} -p ipv6-icmp --icmpv6-type {kind} -j RETURN"
            ));
        }
    }
    r.extend([
        format!("-A {IN} -i {t} -p tcp -j REJECT --reject-with tcp-reset"),
        format!("-A {IN} -i {t} -j DROP"),
        format!("-A {FWD} -o {t} -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT"),
    ]);
    // Members of a named network reach each other (both ways: each pair, ordered).
    for (a, aa) in hosts {
        for (b, ba) in hosts {
            if a.sandbox != b.sandbox && a.network.is_some() && a.network == b.network {
                r.push(format!("-A {FWD} -i {t} -o {t} -s {aa} -d {ba} -j ACCEPT"));
            }
        }
    }
    r.push(format!(
        "-A {FWD} -i {t} -o {t} -p tcp -j REJECT --reject-with tcp-reset"
    ));
    r.push(format!("-A {FWD} -i {t} -o {t} -j REJECT"));
    r.push(format!("-A {FWD} -o {t} -j DROP"));
    r.push(format!("-A {FWD} -i {t} -d {pool} -j REJECT"));
    for (_, a) in hosts.iter().filter(|(l, _)| !l.egress) {
        r.push(format!(
            "-A {FWD} -i {t} -s {a} -p tcp -j REJECT --reject-with tcp-reset"
        ));
        r.push(format!("-A {FWD} -i {t} -s {a} -j REJECT"));
    }
    r.push(format!("-A {FWD} -i {t} -j {GUARD}"));
    r.push(format!("-A {FWD} -i {t} -j ACCEPT"));
    r.extend(guard.iter().cloned());
    r.push("COMMIT".into());
    r.push("*nat".into());
    r.push(format!(":{NAT} - [0:0]"));
    r.push(format!("-A {NAT} -s {pool} ! -o {t} -j MASQUERADE"));
    r.push("COMMIT".into());
    let mut text = r.join("\n");
    text.push('\n');
    text
}

/// Jumps to kiln's chains from the built-in ones, once (IPv6's too when guests have it).
pub(crate) fn hook(v6: bool) -> Result<(), String> {
    let tools: &[&str] = if v6 {
        &["iptables", "ip6tables"]
    } else {
        &["iptables"]
    };
    for tool in tools {
        for (table, builtin, chain) in hooks(tool) {
            let check = ["-w", "-t", table, "-C", builtin, "-j", chain];
            if run(tool, &check).is_err() {
                run(tool, &["-w", "-t", table, "-I", builtin, "1", "-j", chain])?;
            }
        }
    }
    Ok(())
}

/// Whether kiln's bridged chains are installed (a leftover when the daemon runs in user mode).
pub(crate) fn installed() -> bool {
    run("iptables", &["-w", "-n", "-L", FWD]).is_ok()
        || run("ip6tables", &["-w", "-n", "-L", FWD]).is_ok()
}

/// Unhooks and deletes kiln's chains (a daemon back on user networking, with no TAPs left).
pub(crate) fn remove() {
    for tool in ["iptables", "ip6tables"] {
        let hooks = hooks(tool);
        for (table, builtin, chain) in &hooks {
            while run(tool, &["-w", "-t", table, "-D", builtin, "-j", chain]).is_ok() {}
        }
        for (table, _, chain) in hooks.iter().chain([&("filter", "", GUARD)]) {
            let _ = run(tool, &["-w", "-t", table, "-F", chain]);
            let _ = run(tool, &["-w", "-t", table, "-X", chain]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(id: &str, net: Option<&str>, last: u8, egress: bool) -> Lease {
        Lease {
            sandbox: id.into(),
            network: net.map(str::to_string),
            address: std::net::Ipv4Addr::new(10, 213, 0, last),
            egress,
        }
    }

    #[test]
    fn named_networks_pair_up_and_egress_off_is_refused() {
        let subnet: Subnet = "10.213.0.0/24".parse().unwrap();
        let leases = [
            lease("a", Some("n1"), 2, true),
            lease("b", Some("n1"), 3, true),
            lease("c", None, 4, false),
            lease("d", Some("n2"), 5, true),
        ];
        let text = render(&subnet, &leases, &[]);
        let accept = |s: u8, d: u8| format!("-s 10.213.0.{s}/32 -d 10.213.0.{d}/32 -j ACCEPT");
        assert!(text.contains(&accept(2, 3)) && text.contains(&accept(3, 2)));
        for (s, d) in [(2, 4), (4, 2), (2, 5), (5, 3), (4, 5)] {
            assert!(!text.contains(&accept(s, d)), "{s}->{d}");
        }
        assert!(text.contains(&format!("-A {FWD} -i kt+ -s 10.213.0.4/32 -j REJECT")));
        assert!(!text.contains("-s 10.213.0.2/32 -j REJECT"));
        // The pairs come before the refusal between guests; the guard after the egress refusals.
        let at = |needle: &str| text.find(needle).unwrap();
        assert!(at(&accept(2, 3)) < at(&format!("-A {FWD} -i kt+ -o kt+ -j REJECT")));
        assert!(at("-s 10.213.0.4/32 -j REJECT") < at(&format!("-j {GUARD}")));
        assert!(text.contains("-A KILN-NET-NAT -s 10.213.0.0/24 ! -o kt+ -j MASQUERADE"));
    }
}
