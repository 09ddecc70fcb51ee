//! Firewall rules that keep guests off the host itself.
//!
//! With user-mode networking a guest's connections are made by its QEMU process, and 10.0.2.2 is the
//! host's loopback: without rules a guest could reach anything listening on 127.0.0.1 (kiln's TCP API,
//! other sandboxes' forwarded ports) or on the host's own addresses. The rules match the owner of the
//! socket, i.e. kiln's reserved VM uid range, and reject *new* connections to any local address; replies on
//! connections that come in through port forwards are not new, so forwards keep working. DNS (port 53) to
//! a local resolver stays allowed, since slirp relays the guest's queries to the host's resolvers.
//!
//! One shared chain for the whole uid range: the rules do not depend on which daemon installed them, so
//! installing is idempotent and any number of daemons on one host agree.

use std::process::Command;

pub const CHAIN: &str = "KILN-VM-OUT";

#[derive(Debug)]
pub struct NetGuard {
    /// Whether the IPv6 rules were installed too.
    pub ipv6: bool,
}

impl NetGuard {
    /// Installs (or refreshes) the rules with iptables, and ip6tables when IPv6 is there.
    pub fn install(uid_base: u32, uid_count: u32) -> Result<NetGuard, String> {
        let range = format!("{}-{}", uid_base, uid_base + uid_count - 1);
        install_with("iptables", &range)?;
        let ipv6 = match install_with("ip6tables", &range) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!("IPv6 firewall rules not installed: {e}");
                false
            }
        };
        Ok(NetGuard { ipv6 })
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

fn install_with(tool: &str, range: &str) -> Result<(), String> {
    // Create or empty the chain, then fill it: re-running leaves exactly one copy of each rule.
    if run(tool, &["-w", "-N", CHAIN]).is_err() {
        run(tool, &["-w", "-F", CHAIN])?;
    }
    let owner = ["-m", "owner", "--uid-owner", range];
    let new_local = [
        "-m",
        "conntrack",
        "--ctstate",
        "NEW",
        "-m",
        "addrtype",
        "--dst-type",
        "LOCAL",
    ];
    let rules: [Vec<&str>; 4] = [
        [&owner[..], &["-p", "udp", "--dport", "53", "-j", "RETURN"]].concat(),
        [&owner[..], &["-p", "tcp", "--dport", "53", "-j", "RETURN"]].concat(),
        [
            &owner[..],
            &new_local[..],
            &["-p", "tcp", "-j", "REJECT", "--reject-with", "tcp-reset"],
        ]
        .concat(),
        [&owner[..], &new_local[..], &["-j", "REJECT"]].concat(),
    ];
    for rule in rules {
        let mut args = vec!["-w", "-A", CHAIN];
        args.extend(rule);
        run(tool, &args)?;
    }
    if run(tool, &["-w", "-C", "OUTPUT", "-j", CHAIN]).is_err() {
        run(tool, &["-w", "-I", "OUTPUT", "1", "-j", CHAIN])?;
    }
    Ok(())
}

fn run(tool: &str, args: &[&str]) -> Result<(), String> {
    let out = Command::new(tool).args(args).output().map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            format!("{tool} is not installed (apt-get install iptables, or run scripts/install-deps.sh)")
        } else {
            format!("running {tool}: {e}")
        }
    })?;
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
