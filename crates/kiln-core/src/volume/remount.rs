//! Volumes on a copy made from a snapshot: snapshots hold no volumes, but their manifest records where the
//! source had which, and a copy resumed without volumes of its own gets those back where they are free.

use super::VolumeMount;
use crate::engine::Engine;
use crate::layout::{VolumeSlot, VOLUME_SLOTS};
use crate::snapshot::manifest::Manifest;

impl Engine {
    /// The volumes the snapshot's source had attached when it was captured (volumes are not captured; the
    /// manifest records where they were).
    pub(crate) fn source_mounts(&self, m: &Manifest) -> Vec<VolumeMount> {
        m.volume_slots
            .iter()
            .filter_map(|slot| match slot {
                VolumeSlot::Attached {
                    volume,
                    path,
                    read_only,
                    ..
                } => Some(VolumeMount {
                    volume: volume.clone(),
                    path: path.clone(),
                    read_only: *read_only,
                }),
                _ => None,
            })
            .collect()
    }

    /// Which of the source's volumes a copy resumed from `m` gets back: read-only ones unless someone has
    /// them read-write, a read-write one only when no sandbox has it attached at all. Returns the mounts
    /// and one note per volume saying what happened. Call with the volume lock held.
    pub(crate) fn remount_plan(&self, m: &Manifest) -> (Vec<VolumeMount>, Vec<String>) {
        let mut mounts = Vec::new();
        let mut notes = Vec::new();
        // The slots the copy's machine has free (as provision_from_snapshot lays them out): a memory
        // snapshot's guest may still hold stale mounts of the very volumes being remounted.
        let free = if m.kind.has_memory() {
            m.volume_slots
                .iter()
                .filter(|s| matches!(s.in_restored_copy(), VolumeSlot::Empty))
                .count()
        } else {
            VOLUME_SLOTS
        };
        for want in self.source_mounts(m) {
            let how = if want.read_only {
                "read-only"
            } else {
                "read-write"
            };
            let (name, path) = (&want.volume, &want.path);
            let vol = match self.get_volume(name) {
                Ok(v) => v,
                Err(_) => {
                    notes.push(format!(
                        "volume {name} ({how} at {path}) not remounted: it no longer exists"
                    ));
                    continue;
                }
            };
            match vol
                .attachments
                .iter()
                .find(|a| !(want.read_only && a.read_only))
            {
                Some(a) => notes.push(format!(
                    "volume {name} ({how} at {path}) not remounted: sandbox {} has it attached {}; attach it when it is free, or read-only",
                    a.sandbox_name,
                    if a.read_only { "read-only" } else { "read-write" }
                )),
                None if mounts.len() >= free => notes.push(format!(
                    "volume {name} ({how} at {path}) not remounted: the copy has no free volume slot (its guest still holds the source's mounts); a disk snapshot starts with all slots free"
                )),
                None => {
                    notes.push(format!("volume {name} remounted {how} at {path}"));
                    mounts.push(want);
                }
            }
        }
        (mounts, notes)
    }
}
