//! The engine's side of networking: a sandbox's address and TAP before its VM starts, the guest's
//! re-addressing after a restore, the rules after every change of addresses.

use std::sync::Arc;
use std::time::Duration;

use kiln_agent_client::ExecRequest;

use super::{
    allocate, check_network_name, leases, release, rules, taps, Bridge, GuestNet, NetMode,
};
use crate::config::Config;
use crate::db::Db;
use crate::engine::Engine;
use crate::error::{Error, ErrorCode, Result};
use crate::model::Sandbox;
use crate::vm::{agent_error, Vm};

/// How long the guest gets to take its new address after a restore.
const READDRESS_TIMEOUT: Duration = Duration::from_secs(10);

/// What a VM about to start gets: its TAP (bridged), its boot parameters (a cold boot), and the
/// configuration the restored guest must switch to (None: it has the right one).
pub(crate) struct NetPlan {
    pub tap: Option<super::tap::Tap>,
    /// `/dev/vhost-net` for each of the TAP's queues, where the host has it (else empty).
    pub vhost: Vec<std::fs::File>,
    pub cmdline: Option<String>,
    pub readdress: Option<GuestNet>,
    /// The address the restored guest had (its connections are reset once it has the new one).
    pub old_address: Option<String>,
    /// A cold boot's IPv6 configuration, given by the agent once it runs (the image's init sets IPv4
    /// only).
    pub boot6: Option<GuestNet>,
}

/// At daemon start: bridged networking's host side, with the rules the recorded sandboxes need; on user
/// networking, removal of a previous bridged daemon's rules once no TAP of it is left.
pub(crate) async fn setup(cfg: &mut Config, db: &Db) -> Result<Option<Arc<Bridge>>> {
    let (bc, auto) = match &cfg.network {
        NetMode::User => {
            cfg.network_reason = "--network user".into();
            user_mode().await;
            return Ok(None);
        }
        NetMode::Bridged(bc) => (bc.clone(), false),
        NetMode::Auto(bc) => (bc.clone(), true),
    };
    if auto {
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        let (mode, why) = tokio::task::spawn_blocking(move || {
            super::preflight::choose(&bc, root, super::preflight::check)
        })
        .await
        .map_err(|e| Error::internal(format!("network preflight panicked: {e}")))?;
        if mode == NetMode::User {
            tracing::info!(reason = %why, "user networking");
            return Ok(fall_back(cfg, why).await);
        }
        cfg.network = mode;
        cfg.network_reason = why;
    } else {
        cfg.network_reason = "--network bridged".into();
    }
    let NetMode::Bridged(bc) = cfg.network.clone() else {
        return Ok(None);
    };
    // Spares only when asked for: each holds a pool address and a TAP while it waits.
    let spares = (cfg.warm_spares, cfg.warm_spares_default);
    if cfg.warm_spares_default {
        cfg.warm_spares = 0;
    }
    let leases = leases(db)?;
    let allow = cfg.allow_net.clone();
    let built = tokio::task::spawn_blocking(move || Bridge::setup(bc, &allow, &leases))
        .await
        .map_err(|e| Error::internal(format!("network setup panicked: {e}")))?;
    let bridge = match built {
        Ok(b) => b,
        // The default falls back whatever stopped it; an explicit `--network bridged` refuses to start.
        Err(e) if auto => {
            let why = format!("the default, since bridged networking could not be set up: {e}");
            tracing::warn!(reason = %why, "user networking");
            (cfg.warm_spares, cfg.warm_spares_default) = spares;
            return Ok(fall_back(cfg, why).await);
        }
        Err(e) => {
            return Err(Error::new(
                ErrorCode::InvalidRequest,
                format!("bridged networking could not be set up: {e}; the daemon needs root, /dev/net/tun and iptables (or start it with --network user)"),
            ))
        }
    };
    tracing::info!(bridge = %bridge.cfg.bridge, subnet = %bridge.cfg.subnet, reason = %cfg.network_reason, "bridged networking");
    Ok(Some(Arc::new(bridge)))
}

async fn fall_back(cfg: &mut Config, why: String) -> Option<Arc<Bridge>> {
    cfg.network = NetMode::User;
    cfg.network_reason = why;
    user_mode().await;
    None
}

/// On user networking: a previous bridged daemon's rules go once no TAP of it is left.
async fn user_mode() {
    let _ = tokio::task::spawn_blocking(|| {
        if taps().is_empty() && rules::installed() {
            rules::remove();
        }
    })
    .await;
}

impl Engine {
    /// Refuses a named network the daemon cannot give (user networking) or a malformed name.
    pub(crate) fn check_network(&self, network: Option<&str>) -> Result<()> {
        let Some(name) = network else {
            return Ok(());
        };
        if self.bridge().is_none() {
            return Err(Error::new(
                ErrorCode::InvalidRequest,
                "named networks need bridged networking: start the daemon with `kiln serve --network bridged`, or leave out 'network'",
            ));
        }
        check_network_name(name)
    }

    /// Before a VM of `sb` starts. `sb.address` is what the guest to be restored is configured with
    /// (its source's for a new copy); the database has the address the sandbox holds, if any. `queues`:
    /// the machine's NIC queue pairs (`Layout::net_queues`), which only a TAP can give beyond one.
    pub(crate) async fn prepare_net(
        &self,
        sb: &Sandbox,
        incoming: bool,
        queues: usize,
    ) -> Result<NetPlan> {
        let stored = self
            .db()
            .find_sandbox(&sb.id)?
            .filter(|s| s.id == sb.id)
            .and_then(|s| s.address);
        let guest_has = sb.address.clone();
        // A guest without a recorded address was on user networking.
        let old_address = Some(
            guest_has
                .clone()
                .unwrap_or_else(|| GuestNet::user().address.to_string()),
        );
        let Some(br) = self.bridge() else {
            if queues > 1 {
                return Err(super::queues_refused(&format!("sandbox {}", sb.id), queues));
            }
            if stored.is_some() {
                release(self.db(), &sb.id)?;
            }
            return Ok(NetPlan {
                tap: None,
                vhost: Vec::new(),
                cmdline: None,
                readdress: (incoming && guest_has.is_some()).then(GuestNet::user),
                old_address,
                boot6: None,
            });
        };
        let address = match stored.as_deref().and_then(|a| a.parse().ok()) {
            Some(a) if br.cfg.subnet.contains(a) => a,
            _ => allocate(self.db(), &sb.id, sb.network.as_deref(), &br.cfg.subnet)?,
        };
        // The rules for the address are in place before its guest runs (egress off, its network).
        self.refresh_net().await?;
        let tap = {
            let (br, id) = (br.clone(), sb.id.clone());
            tokio::task::spawn_blocking(move || br.open_tap(&id, address, queues))
                .await
                .map_err(|e| Error::internal(format!("TAP setup panicked: {e}")))?
                .map_err(|e| {
                    Error::new(
                        ErrorCode::VmFailed,
                        format!("cannot give sandbox {} its network device: {e}; `kiln doctor` checks the host", sb.id),
                    )
                })?
        };
        let vhost = match br.vhost {
            super::fastpath::Vhost::On => (0..queues)
                .map(|_| super::fastpath::open())
                .collect::<std::io::Result<Vec<_>>>()
                .map_err(
                    |e| tracing::warn!(sandbox = %sb.id, error = %e, "no vhost-net for this VM"),
                )
                .unwrap_or_default(),
            super::fastpath::Vhost::Off(_) => Vec::new(),
        };
        let guest = br.guest(address);
        let boot6 = (!incoming && guest.address6.is_some()).then(|| guest.clone());
        Ok(NetPlan {
            tap: Some(tap),
            vhost,
            cmdline: (!incoming).then(|| guest.cmdline()),
            readdress: (incoming && guest_has.as_deref() != Some(address.to_string().as_str()))
                .then_some(guest),
            old_address,
            boot6,
        })
    }

    /// Re-renders the rules from the recorded addresses (after an address was given or freed).
    pub(crate) async fn refresh_net(&self) -> Result<()> {
        let Some(br) = self.bridge() else {
            return Ok(());
        };
        let leases = leases(self.db())?;
        let br = br.clone();
        tokio::task::spawn_blocking(move || br.apply(&leases))
            .await
            .map_err(|e| Error::internal(format!("rule update panicked: {e}")))?
            .map_err(|e| Error::internal(format!("cannot update the network rules: {e}")))
    }

    /// Switches a restored guest to `guest` (its agent runs the image's busybox `ip`, see
    /// `GuestNet::script`); the restore fails if it cannot, rather than leave a guest on an address the
    /// host does not route to it.
    pub(crate) async fn readdress(
        &self,
        vm: &Vm,
        guest: &GuestNet,
        old: Option<&str>,
    ) -> Result<()> {
        let agent = vm.agent(READDRESS_TIMEOUT).await?;
        self.set_address(&agent, vm, guest).await?;
        // The old address's connections are the source's: nothing answers them here any more, and an
        // idle one would wait forever. Best effort: the guest works on its new address either way.
        let Some(old) = old.filter(|o| *o != guest.address.to_string()) else {
            return Ok(());
        };
        if !agent.has_feature("net_reset") {
            tracing::info!(vm = %vm.name, "the guest agent predates connection resets; connections of the old address time out instead");
            return Ok(());
        }
        let mut addresses = vec![old.to_string()];
        if let (Some(br), Ok(v4)) = (self.bridge(), old.parse()) {
            addresses.extend(br.address6_for(v4).map(|a| a.to_string()));
        }
        let reset = agent.reset_connections(&addresses);
        match tokio::time::timeout(READDRESS_TIMEOUT, reset).await {
            Ok(Ok(n)) => {
                tracing::debug!(vm = %vm.name, old, connections = n, "reset the old address's connections")
            }
            Ok(Err(e)) => {
                tracing::warn!(vm = %vm.name, old, error = %e, "could not reset the old address's connections")
            }
            Err(_) => {
                tracing::warn!(vm = %vm.name, old, "resetting the old address's connections timed out")
            }
        }
        Ok(())
    }

    async fn set_address(
        &self,
        agent: &kiln_agent_client::AgentClient,
        vm: &Vm,
        guest: &GuestNet,
    ) -> Result<()> {
        let mut req = ExecRequest::argv(["/kiln/busybox", "sh", "-c", &guest.script()]);
        req.timeout_ms = Some(READDRESS_TIMEOUT.as_millis() as u64);
        let what = format!("giving the guest its address {}", guest.address);
        match tokio::time::timeout(READDRESS_TIMEOUT * 2, agent.exec_collect(req)).await {
            Ok(Ok(out)) if out.status.code == Some(0) => Ok(()),
            Ok(Ok(out)) => Err(Error::new(
                ErrorCode::GuestError,
                format!(
                    "{what} failed ({:?}): {}; the image needs kiln's /kiln/busybox",
                    out.status,
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
            )),
            Ok(Err(e)) => Err(agent_error(e, &vm.name)),
            Err(_) => Err(Error::new(
                ErrorCode::Timeout,
                format!("{what} took more than {}s", READDRESS_TIMEOUT.as_secs() * 2),
            )),
        }
    }
}
