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
    /// Guest RAM is this sandbox's own file, mapped shared: it always holds the current RAM.
    Owned { file: PathBuf },
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
}

impl Layout {
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
        };
        let json = serde_json::to_string(&l).unwrap();
        assert!(json.contains(r#""mode":"private""#));
        assert_eq!(serde_json::from_str::<Layout>(&json).unwrap(), l);
    }
}
