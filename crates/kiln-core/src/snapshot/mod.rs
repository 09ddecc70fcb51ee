//! Snapshots: the record, the on-disk format (manifest + files) and its verification.

pub mod bundle;
pub mod capture;
pub(crate) mod chain;
pub(crate) mod compact;
pub mod compat;
pub mod db;
pub mod delete;
pub(crate) mod guard;
pub mod manifest;
pub mod names;
mod ramless;
pub(crate) mod resources;
pub mod restore;
pub(crate) mod rollback;
mod validate;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema, Default)]
#[serde(rename_all = "lowercase")]
pub enum SnapshotType {
    /// Memory, vCPU and device state and the whole disk: restores on its own.
    #[default]
    Full,
    /// Like full, but stores only what differs from its parent (template or parent snapshot), which must
    /// still exist at restore time.
    Diff,
    /// The filesystem only; restoring it boots fresh from that disk.
    Disk,
}

impl SnapshotType {
    pub fn as_str(self) -> &'static str {
        match self {
            SnapshotType::Full => "full",
            SnapshotType::Diff => "diff",
            SnapshotType::Disk => "disk",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "full" => Some(SnapshotType::Full),
            "diff" => Some(SnapshotType::Diff),
            "disk" => Some(SnapshotType::Disk),
            _ => None,
        }
    }
    pub fn has_memory(self) -> bool {
        self != SnapshotType::Disk
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Snapshot {
    pub id: String,
    /// The sandbox it was taken from (which may since have been deleted).
    pub sandbox_id: String,
    pub sandbox_name: String,
    #[serde(rename = "type")]
    pub kind: SnapshotType,
    /// What a diff snapshot builds on: `template:NAME` or `snapshot:ID`.
    pub parent: Option<String>,
    pub template: String,
    pub memory_mib: u64,
    pub cpus: u32,
    pub disk_size_bytes: u64,
    /// Space its own files take on disk.
    pub size_bytes: u64,
    pub labels: BTreeMap<String, String>,
    /// Whether it has been restored into its source sandbox (`kiln snapshot restore`).
    pub restored: bool,
    pub restored_at: Option<String>,
    pub created_at: String,
    /// Copies resumed ahead of time and ready to hand out, so the next resume only continues one
    /// (`kiln serve --warm-spares`).
    #[serde(default)]
    pub warm_spares: usize,
    /// Further names it was given (`POST /v1/snapshots/{id}/names`); every route finds it by any of them.
    #[serde(default)]
    pub names: Vec<String>,
    /// When its `ttl` runs out (RFC 3339): then it is deleted as soon as nothing depends on it.
    #[serde(default)]
    pub expires_at: Option<String>,
    /// RAM its machine has (MiB): a copy resumed from a memory snapshot may have from `memory_mib` up to
    /// this. null: no headroom (copies keep `memory_mib`; a disk snapshot's copy may have any).
    #[serde(default)]
    pub max_memory_mib: Option<u64>,
    /// How long the source's guest was paused for the capture (ms; null for snapshots from before).
    #[serde(default)]
    pub pause_ms: Option<u64>,
    /// For a diff of a sandbox whose create resumed its template's snapshot (`parent` is then
    /// `template:NAME`, as for a booted one): that template snapshot, which the diff builds on and which
    /// stays while the diff does (see `kiln image list`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template_snapshot: Option<String>,
}

impl Snapshot {
    pub fn matches_labels(&self, filter: &BTreeMap<String, String>) -> bool {
        filter.iter().all(|(k, v)| self.labels.get(k) == Some(v))
    }
}

/// Options of snapshot creation that only kiln itself uses.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct CreateSnapshotInternal {
    /// Not listed (a fork's capture, deleted once the children run).
    pub ephemeral: bool,
    /// Fail with `sandbox_busy` instead of waiting while an operation holds the sandbox (checkpoints).
    pub skip_if_busy: bool,
}
