//! How a sandbox's VM is put together on disk: kernel, disk chain and guest RAM. Persisted with the
//! sandbox so the same machine can be started again (after hibernation or a daemon restart), and copied
//! into snapshots.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// One immutable or writable image of the root disk chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Layer {
    pub path: PathBuf,
    pub format: String,
    /// xxh3 of the file once it became immutable (None for the writable top layer).
    #[serde(default)]
    pub checksum: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "mode", rename_all = "snake_case")]
pub enum Memory {
    /// Guest RAM is this sandbox's own file, mapped shared: it always holds the current RAM. `file` is its
    /// place on the data disk (where a stop saves it); `live` the file the VM maps while it runs, on the
    /// RAM directory (a tmpfs, see `ramdir`), or None when that is `file` itself.
    Owned {
        file: PathBuf,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        live: Option<PathBuf>,
    },
    /// Guest RAM is an immutable base file (a snapshot's, hard-linked here) mapped privately; what the guest
    /// changed lives in anonymous memory of the QEMU process and is saved as a delta when needed.
    Private {
        base: PathBuf,
        base_checksum: Option<String>,
    },
}

/// Where a sandbox came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Origin {
    Template { name: String },
    Snapshot { id: String },
}

/// Volume slots every new machine gets. The number is part of the machine (its device set), so it can
/// never change for a machine or anything restored from it.
pub const VOLUME_SLOTS: usize = 4;

/// What one volume slot of a machine holds, as far as the guest is concerned.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum VolumeSlot {
    /// An empty disk; free for a volume.
    Empty,
    /// A volume attached to this sandbox.
    Attached {
        volume: String,
        /// Mount point in the guest.
        path: String,
        read_only: bool,
        /// What QEMU opens: the volume file, under a throwaway overlay when read-only.
        layers: Vec<Layer>,
        /// Mounted in the guest already.
        mounted: bool,
        /// The guest probed this slot while it held another disk, so it must re-read it before mounting.
        rescan: bool,
    },
    /// A restored machine's guest may still have its source's volume mounted here; the disk behind it is
    /// empty now. `released`: the stale mount was detached (the slot frees up once nothing holds it).
    Stale { path: String, released: bool },
}

impl VolumeSlot {
    /// The slot as a machine restored from a capture of it sees it: volumes are not part of snapshots,
    /// so a mounted one leaves a stale mount behind, and one never mounted leaves nothing.
    pub fn in_restored_copy(&self) -> VolumeSlot {
        match self {
            VolumeSlot::Attached {
                path,
                mounted: true,
                ..
            } => VolumeSlot::Stale {
                path: path.clone(),
                released: false,
            },
            VolumeSlot::Attached { mounted: false, .. } | VolumeSlot::Empty => VolumeSlot::Empty,
            stale @ VolumeSlot::Stale { .. } => stale.clone(),
        }
    }

    pub fn backend(&self) -> kiln_vmm::VolumeBackend {
        match self {
            VolumeSlot::Attached { layers, .. } => kiln_vmm::VolumeBackend::Chain(
                layers
                    .iter()
                    .map(|l| kiln_vmm::DiskLayer {
                        path: l.path.clone(),
                        format: l.format.clone(),
                    })
                    .collect(),
            ),
            VolumeSlot::Empty | VolumeSlot::Stale { .. } => kiln_vmm::VolumeBackend::Empty,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Layout {
    /// Firmware the VM started with (`-bios`); restores must use the same.
    #[serde(default)]
    pub firmware: Option<PathBuf>,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub kernel_version: String,
    pub cmdline: String,
    /// Bottom (template rootfs) first; the last is the writable top.
    pub disk_layers: Vec<Layer>,
    pub memory: Memory,
    pub origin: Origin,
    /// Number of disk layers that came with the origin (template or snapshot); layers above belong to this
    /// sandbox. A diff snapshot stores only those.
    pub inherited_layers: usize,
    /// Counter for naming the next writable layer.
    pub generation: u32,
    /// Volume slots (machines made before volumes existed have none).
    #[serde(default)]
    pub volume_slots: Vec<VolumeSlot>,
    /// Content identity of the origin when this sandbox was made from it (`Engine::base_digest`); a diff
    /// snapshot is refused if the origin has changed since. None in sandboxes made before it existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin_digest: Option<String>,
    /// vCPUs the machine has (QEMU creates them all; the sandbox's `cpus` are online in the guest, the
    /// rest offline), so a copy can resume with any count up to this. Part of the device set: fixed for
    /// the machine and everything restored from it. None in machines made before it existed (= `cpus`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_cpus: Option<u32>,
    /// RAM of a machine made with growth headroom (`max_memory_mib` at create): QEMU gets this much and a
    /// virtio balloon that holds what the sandbox's `memory_mib` leaves out, so a copy can be given up to
    /// this. Part of the device set like `max_cpus`. None: no balloon, the machine has `memory_mib`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_memory_mib: Option<u64>,
    /// The CPU the guest saw when it booted (its TSC frequency is asked of KVM again on every restore).
    /// None in machines made before it was recorded, or when QEMU could not report it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<kiln_vmm::cpu::Identity>,
    /// The machine's `-M` options, part of its device set: fixed for the machine and everything
    /// restored from it. None in machines made before it was recorded (see `machine_options`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine: Option<String>,
    /// Whether the machine's balloon (if it has one) reports free pages (`free-page-reporting=on`): part
    /// of its device set, fixed for the machine and everything restored from it. None in machines made
    /// before it existed: no reporting.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub free_page_reporting: Option<bool>,
    /// Queue pairs of the machine's NIC (multiqueue, on a TAP; see `net::boot_queues`): part of its
    /// saved state, fixed for the machine and everything restored from it. None: one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub net_queues: Option<u32>,
}

impl Layout {
    /// The `-M` options this machine runs with: its recorded ones, or what kiln built before recording.
    pub fn machine_options(&self, accel: kiln_vmm::Accel) -> String {
        self.machine
            .clone()
            .unwrap_or_else(|| kiln_vmm::qemu::machine_unrecorded(accel))
    }

    pub fn top(&self) -> Option<&Layer> {
        self.disk_layers.last()
    }

    pub fn vm_layers(&self) -> Vec<kiln_vmm::DiskLayer> {
        self.disk_layers
            .iter()
            .map(|l| kiln_vmm::DiskLayer {
                path: l.path.clone(),
                format: l.format.clone(),
            })
            .collect()
    }

    /// RAM QEMU gives the machine: its headroom if it has a balloon, else the sandbox's `memory_mib`.
    pub fn machine_memory_mib(&self, memory_mib: u64) -> u64 {
        self.max_memory_mib.unwrap_or(memory_mib).max(memory_mib)
    }

    /// The next writable layer's path in `dir`.
    pub fn next_top_path(&mut self, dir: &Path) -> PathBuf {
        self.generation += 1;
        dir.join(format!("disk-{}.qcow2", self.generation))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_round_trips_through_json() {
        let l = Layout {
            firmware: None,
            kernel: "/k".into(),
            initrd: "/i".into(),
            kernel_version: "6.12".into(),
            cmdline: "console=ttyS0".into(),
            disk_layers: vec![Layer {
                path: "/r".into(),
                format: "raw".into(),
                checksum: Some("ab".into()),
            }],
            memory: Memory::Private {
                base: "/m".into(),
                base_checksum: None,
            },
            origin: Origin::Snapshot { id: "s1".into() },
            inherited_layers: 1,
            generation: 0,
            volume_slots: vec![VolumeSlot::Empty],
            cpu: None,
            machine: Some(kiln_vmm::qemu::MACHINE.into()),
            origin_digest: Some("sha256:00".into()),
            max_cpus: Some(2),
            max_memory_mib: Some(512),
            free_page_reporting: Some(true),
            net_queues: Some(2),
        };
        let json = serde_json::to_string(&l).unwrap();
        assert!(json.contains(r#""mode":"private""#));
        assert_eq!(serde_json::from_str::<Layout>(&json).unwrap(), l);
    }

    #[test]
    fn restored_copies_see_mounted_volumes_as_stale_and_unmounted_ones_as_empty() {
        let attached = |mounted| VolumeSlot::Attached {
            volume: "data".into(),
            path: "/data".into(),
            read_only: false,
            layers: vec![],
            mounted,
            rescan: false,
        };
        let stale = VolumeSlot::Stale {
            path: "/data".into(),
            released: false,
        };
        assert_eq!(attached(true).in_restored_copy(), stale);
        assert_eq!(attached(false).in_restored_copy(), VolumeSlot::Empty);
        assert_eq!(stale.in_restored_copy(), stale);
        assert_eq!(VolumeSlot::Empty.in_restored_copy(), VolumeSlot::Empty);
    }

    #[test]
    fn layouts_from_before_volumes_have_no_slots() {
        let json = r#"{"kernel":"/k","initrd":"/i","kernel_version":"6.12","cmdline":"","disk_layers":[],
            "memory":{"mode":"owned","file":"/m"},"origin":{"kind":"template","name":"tiny"},
            "inherited_layers":1,"generation":1}"#;
        let old = serde_json::from_str::<Layout>(json).unwrap();
        assert!(old.volume_slots.is_empty());
        assert_eq!(old.max_cpus, None);
        assert_eq!(old.max_memory_mib, None);
        assert_eq!(old.free_page_reporting, None);
        // A TCG machine from before machines were recorded had the PIT, and keeps it.
        assert_eq!(old.machine, None);
        assert_eq!(
            old.machine_options(kiln_vmm::Accel::Tcg),
            kiln_vmm::qemu::MACHINE_TCG_PIT
        );
    }
}
