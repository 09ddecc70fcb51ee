//! The default network mode (`kiln serve` without `--network`): bridged where this daemon can build it,
//! user networking otherwise. The checks change nothing on the host but the bridge device itself (made
//! last, and kept, since bridged networking uses it next): a daemon that falls back leaves the host as
//! it found it.

use std::fs::OpenOptions;
use std::process::Command;

use super::NetMode;

/// The mode a daemon started without `--network` runs in, and why. `preflight` runs only for root.
pub(crate) fn choose(
    cfg: &super::BridgeConfig,
    root: bool,
    preflight: impl FnOnce(&str) -> Result<(), String>,
) -> (NetMode, String) {
    let why = if !root {
        Err("the daemon does not run as root".to_string())
    } else {
        preflight(&cfg.bridge)
    };
    match why {
        Ok(()) => (
            NetMode::Bridged(cfg.clone()),
            "the default: the daemon can create network devices (root, /dev/net/tun, iptables, forwarding)"
                .into(),
        ),
        Err(why) => (
            NetMode::User,
            format!("the default, since bridged networking is not possible here: {why} (`--network user` chooses it explicitly)"),
        ),
    }
}

/// Whether bridged networking can be set up in this network namespace with bridge device `bridge`.
pub(crate) fn check(bridge: &str) -> Result<(), String> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .map_err(|e| format!("cannot open /dev/net/tun: {e}"))?;
    // The tables bridged networking writes (nat is a module of its own).
    for table in ["filter", "nat"] {
        crate::confine::netguard::run("iptables", &["-w", "-t", table, "-n", "-L"])?;
    }
    which("iptables-restore")?;
    // Opening for writing is refused where /proc/sys is read-only (a container) or not ours.
    OpenOptions::new()
        .write(true)
        .open("/proc/sys/net/ipv4/ip_forward")
        .map_err(|e| {
            format!("cannot turn on IPv4 forwarding (/proc/sys/net/ipv4/ip_forward): {e}")
        })?;
    bridge_device(bridge)
}

/// `bridge` is an existing bridge, or one is made: never another kind of device (the gateway address
/// and kiln's routes would land on it).
pub(crate) fn bridge_device(bridge: &str) -> Result<(), String> {
    let out = Command::new("ip")
        .args(["-j", "-d", "link", "show", "dev", bridge])
        .output()
        .map_err(|e| format!("running ip: {e}"))?;
    if out.status.success() {
        let text = String::from_utf8_lossy(&out.stdout);
        if text.contains("\"info_kind\":\"bridge\"") {
            return Ok(());
        }
        return Err(format!(
            "the device {bridge} exists and is not a bridge (give kiln's bridge another name: --bridge)"
        ));
    }
    super::ip(&["link", "add", bridge, "type", "bridge"])
        .map_err(|e| format!("cannot create the bridge {bridge}: {e}"))
}

fn which(program: &str) -> Result<(), String> {
    match kiln_image::on_path(program) {
        Some(_) => Ok(()),
        None => Err(format!(
            "{program} is not installed (apt-get install iptables)"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_is_bridged_only_for_root_with_a_passing_preflight() {
        let cfg = super::super::BridgeConfig::new("kiln0", super::super::DEFAULT_SUBNET).unwrap();
        let (mode, why) = choose(&cfg, false, |_| panic!("no preflight without root"));
        assert_eq!(mode, NetMode::User);
        assert!(why.contains("not run as root"), "{why}");
        let (mode, why) = choose(&cfg, true, |b| Err(format!("{b}: nft is missing")));
        assert_eq!(mode, NetMode::User);
        assert!(why.contains("kiln0: nft is missing"), "{why}");
        let (mode, _) = choose(&cfg, true, |_| Ok(()));
        assert_eq!(mode, NetMode::Bridged(cfg));
    }
}
