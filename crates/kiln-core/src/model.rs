//! The sandbox record as stored and as returned by the API.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum SandboxState {
    /// Being created: disk prepared, VM booting, agent not yet answering.
    Creating,
    Running,
    /// Frozen in memory (vCPUs stopped); no disk write.
    Paused,
    /// Hibernated to disk; no VM process.
    Stopped,
    /// The VM died or never came up; `error` says why. Delete it or look at its console log.
    Failed,
    Deleting,
}

impl SandboxState {
    pub fn as_str(self) -> &'static str {
        match self {
            SandboxState::Creating => "creating",
            SandboxState::Running => "running",
            SandboxState::Paused => "paused",
            SandboxState::Stopped => "stopped",
            SandboxState::Failed => "failed",
            SandboxState::Deleting => "deleting",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "creating" => SandboxState::Creating,
            "running" => SandboxState::Running,
            "paused" => SandboxState::Paused,
            "stopped" => SandboxState::Stopped,
            "failed" => SandboxState::Failed,
            "deleting" => SandboxState::Deleting,
            _ => return None,
        })
    }

    /// A VM process should exist in these states.
    pub fn has_vm(self) -> bool {
        matches!(self, SandboxState::Running | SandboxState::Paused)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct PortMapping {
    /// Port on the host's loopback interface (127.0.0.1).
    pub host: u16,
    /// Port inside the guest.
    pub guest: u16,
    /// kiln chose the host port (asked for without one). It keeps it across stop/start while it is free;
    /// copies (resume, fork) always get host ports of their own.
    #[serde(default)]
    pub auto: bool,
}

/// A guest port to publish: on `host` (127.0.0.1), or on a free host port kiln picks when `host` is left
/// out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PortRequest {
    pub guest: u16,
    pub host: Option<u16>,
}

impl std::str::FromStr for PortRequest {
    type Err = crate::Error;
    /// `GUEST` (host port picked by kiln) or `HOST:GUEST`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(p) = s.parse::<u16>().ok().filter(|p| *p != 0) {
            return Ok(PortRequest {
                guest: p,
                host: None,
            });
        }
        let m: PortMapping = s.parse()?;
        Ok(PortRequest {
            guest: m.guest,
            host: Some(m.host),
        })
    }
}

impl std::str::FromStr for PortMapping {
    type Err = crate::Error;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || {
            crate::Error::invalid(format!(
                "invalid port mapping '{s}': use GUEST (a free host port is picked) or HOST:GUEST, e.g. 80 or 8080:80"
            ))
        };
        let (h, g) = s.split_once(':').ok_or_else(bad)?;
        let host: u16 = h.parse().map_err(|_| bad())?;
        let guest: u16 = g.parse().map_err(|_| bad())?;
        if host == 0 || guest == 0 {
            return Err(bad());
        }
        Ok(PortMapping {
            host,
            guest,
            auto: false,
        })
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Sandbox {
    pub id: String,
    pub name: String,
    pub template: String,
    pub state: SandboxState,
    pub memory_mib: u64,
    pub cpus: u32,
    pub disk_size_bytes: u64,
    pub env: BTreeMap<String, String>,
    pub labels: BTreeMap<String, String>,
    pub ports: Vec<PortMapping>,
    pub hostname: String,
    pub mac: String,
    pub accel: String,
    /// Pid of the QEMU process while the VM runs.
    pub pid: Option<u32>,
    /// Why the sandbox failed, with the last lines of its console.
    pub error: Option<String>,
    pub created_at: String,
    pub updated_at: String,
    /// What the sandbox was made from: `template:NAME` or `snapshot:ID`.
    pub origin: String,
    /// The snapshot this sandbox was last rolled back to (`kiln snapshot restore`), if any.
    pub restored_from: Option<String>,
    /// The sandbox this one was forked from (its `origin` names the fork's capture, which is deleted once
    /// the children run); null for sandboxes not made by a fork.
    #[serde(default)]
    pub forked_from: Option<String>,
    /// Volumes attached to this sandbox.
    #[serde(default)]
    pub volumes: Vec<crate::volume::VolumeMount>,
    /// Whether the guest may open network connections out (to the internet); forwarded ports work either way.
    pub egress: bool,
    /// The unprivileged uid its VM process runs as; None when the daemon cannot confine VMs (not root, or
    /// the kiln-qemu group is missing).
    pub qemu_uid: Option<u32>,
    /// Whether its VM is confined: its own uid (seccomp and cgroups as available) and the firewall that
    /// keeps guests off the host. False only for sandboxes of a daemon started with `--unconfined` (or made
    /// by one).
    #[serde(default)]
    pub confined: bool,
    /// Only in the answer to a resume from a snapshot: what happened to the volumes the snapshot's source
    /// had (remounted, or why not). Not stored.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volume_notes: Vec<String>,
    /// Its timeout, idle timeout and what happens then (`POST /v1/sandboxes/{id}/timeout`); null: none.
    #[serde(default)]
    pub lifetime: Option<crate::lifetime::Lifetime>,
    /// Its continuous checkpoints (`PUT /v1/sandboxes/{id}/checkpoint-policy`); null: none.
    #[serde(default)]
    pub checkpoint_policy: Option<crate::lifetime::checkpoint::CheckpointPolicy>,
    /// RAM its machine has (MiB): a balloon holds what `memory_mib` leaves out, so copies resumed from
    /// its memory snapshots may have up to this much. null: no headroom (copies keep `memory_mib`).
    #[serde(default)]
    pub max_memory_mib: Option<u64>,
    /// Only in the answer to a create from a template: whether it resumed the template's snapshot or
    /// booted cold, and why (docs/snapshots.md, "Create is a resume"). Not stored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot: Option<crate::template_snap::BootInfo>,
    /// The private network it is in (`--network NAME` on create; forks inherit it): members reach each
    /// other under bridged networking. null: none (reaches no other sandbox).
    #[serde(default)]
    pub network: Option<String>,
    /// Its IPv4 address under bridged networking (`kiln serve --network bridged`); null on user
    /// networking, where every guest is 10.0.2.15 behind its own QEMU.
    #[serde(default)]
    pub address: Option<String>,
    /// Its IPv6 address under bridged networking where the daemon gives guests IPv6 (derived from
    /// `address`, docs/networking.md); null otherwise.
    #[serde(default)]
    pub address6: Option<String>,
}

impl Sandbox {
    pub fn matches_labels(&self, filter: &BTreeMap<String, String>) -> bool {
        filter.iter().all(|(k, v)| self.labels.get(k) == Some(v))
    }
}

pub fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_mappings_parse() {
        let p: PortMapping = "8080:80".parse().unwrap();
        assert_eq!((p.host, p.guest), (8080, 80));
        for bad in ["8080", "a:80", "0:80", "70000:1", ":"] {
            assert!(bad.parse::<PortMapping>().is_err(), "{bad}");
        }
        let auto: PortRequest = "80".parse().unwrap();
        assert_eq!((auto.host, auto.guest), (None, 80));
        let fixed: PortRequest = "8080:80".parse().unwrap();
        assert_eq!((fixed.host, fixed.guest), (Some(8080), 80));
        for bad in ["0", "a", "0:80", "70000"] {
            assert!(bad.parse::<PortRequest>().is_err(), "{bad}");
        }
    }

    #[test]
    fn states_round_trip() {
        for s in [
            SandboxState::Creating,
            SandboxState::Running,
            SandboxState::Paused,
            SandboxState::Stopped,
            SandboxState::Failed,
            SandboxState::Deleting,
        ] {
            assert_eq!(SandboxState::parse(s.as_str()), Some(s));
        }
    }
}
