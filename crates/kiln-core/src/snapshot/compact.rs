//! Keeps a running sandbox's disk chain short. Every capture freezes the top qcow2 layer and puts a new
//! one over it, so a sandbox under a checkpoint policy gained a layer (and an open file in QEMU, and a
//! longer walk for reads) per checkpoint, and a pruned checkpoint's layers stayed on disk because the
//! running chain still used them. Past [`MAX_LAYERS`] the layers between the bottom image (the template
//! rootfs) and the active layer are streamed into the active layer while the guest runs (`block-stream`);
//! then the record says `[rootfs, top]` and the sandbox's links to the merged layers are removed, so the
//! data goes once no snapshot holds it.

use std::time::{Duration, Instant};

use tracing::{info, warn};

use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::fsutil;
use crate::layout::Layout;
use crate::model::{Sandbox, SandboxState};

/// A running chain longer than this is compacted (a checkpoint or snapshot adds one layer each).
pub const MAX_LAYERS: usize = 6;
/// Longest a stream may run before it is cancelled (it copies what the guest wrote since its origin).
const STREAM_TIMEOUT: Duration = Duration::from_secs(300);
/// Ids of the streams kiln starts; one found when no compaction runs was left by a daemon that died.
pub(crate) const STREAM_JOB_PREFIX: &str = "kiln-stream-";
/// The bottom layer's node: QEMU's command line names the lower layers `layerN` (`kiln_vmm::qemu`), and
/// captures only add layers on top.
pub(crate) const BASE_NODE: &str = "layer0";

/// Where a root chain node sits, bottom lowest: `layerN` (the command line's lower layers), then `disk0`
/// (the active layer at launch), then `topN` (added by captures, N the generation).
fn close_order(name: &str) -> (u8, u64) {
    let num = |s: &str| s.parse::<u64>().unwrap_or(0);
    if let Some(n) = name.strip_prefix("top") {
        (2, num(n))
    } else if name == "disk0" {
        (1, 0)
    } else {
        (0, name.strip_prefix("layer").map(num).unwrap_or(0))
    }
}

/// Whether a node belongs to the root disk's chain (`disk0`/`layerN` from the command line, `topN` added
/// by captures; volumes are `volN…`).
fn is_root_chain_node(name: &str) -> bool {
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    name == "disk0"
        || name.strip_prefix("layer").is_some_and(digits)
        || name.strip_prefix("top").is_some_and(digits)
}

impl Engine {
    /// Compacts the disk chain of a running sandbox longer than [`MAX_LAYERS`], under its lifecycle lock
    /// (`sandbox_busy` at once when an operation holds it: the caller tries later). Returns the chain's
    /// length before and after, or None when nothing was done. On a failed or timed-out stream the chain
    /// and the record stay as they were.
    pub(crate) async fn compact_chain(&self, id: &str) -> Result<Option<(usize, usize)>> {
        // Looked at without the lock first: the checkpoint task asks every round.
        let long = |l: &crate::layout::Layout| l.disk_layers.len() > MAX_LAYERS;
        if !self.db().layout(id)?.is_some_and(|l| long(&l)) {
            return Ok(None);
        }
        let locked = self.try_lock_sandbox(id)?;
        let sb = locked.sb.clone();
        if sb.state != SandboxState::Running && sb.state != SandboxState::Paused {
            return Ok(None);
        }
        let Some(mut layout) = self.db().layout(&sb.id)? else {
            return Ok(None);
        };
        let before = layout.disk_layers.len();
        if before <= MAX_LAYERS {
            return Ok(None);
        }
        let vm = self.live_vm(&sb).await?;
        let qmp = vm.qmp().await?;
        // What a daemon that died left (a stream, a top it never attached) is settled first, as a
        // capture does; a stream that completed meanwhile may have done the work already.
        self.reconcile_chain(&sb, &qmp, &mut layout).await?;
        if layout.disk_layers.len() <= MAX_LAYERS {
            return Ok(
                (layout.disk_layers.len() < before).then_some((before, layout.disk_layers.len()))
            );
        }
        let started = Instant::now();
        let job = format!("{STREAM_JOB_PREFIX}{:08x}", rand::random::<u32>());
        let nodes = qmp.node_names().await?;
        if !nodes.iter().any(|n| n == BASE_NODE) {
            return Err(Error::internal(format!(
                "sandbox {}: QEMU has no node {BASE_NODE} at the bottom of its disk",
                sb.id
            )));
        }
        let speed = self.faults().stream_speed();
        qmp.start_stream("rootdisk", BASE_NODE, &job, speed).await?;
        info!(sandbox = %sb.id, job = %job, layers = before, "streaming the disk chain into its active layer");
        qmp.wait_stream(&job, STREAM_TIMEOUT).await?;
        // QEMU's own view decides: the active layer must now sit right on the bottom image.
        let depth = qmp.chain_depth("rootdisk").await?;
        if depth != 2 {
            return Err(Error::internal(format!(
                "sandbox {}: the disk chain is {depth} deep after streaming it, not 2; left as recorded",
                sb.id
            )));
        }
        self.record_compaction(&sb, &qmp, &mut layout, &nodes)
            .await?;
        let after = layout.disk_layers.len();
        info!(sandbox = %sb.id, layers_before = before, layers_after = after, ms = started.elapsed().as_millis() as u64, "disk chain compacted");
        Ok(Some((before, after)))
    }

    /// Records a chain QEMU has streamed down to `[bottom, active]`: the layers in between leave the
    /// record, their nodes (`nodes`: the node names from before the stream) are closed and the sandbox's
    /// own links to their files removed.
    pub(crate) async fn record_compaction(
        &self,
        sb: &Sandbox,
        qmp: &kiln_vmm::Qmp,
        layout: &mut Layout,
        nodes: &[String],
    ) -> Result<()> {
        let n = layout.disk_layers.len();
        if n < 3 {
            return Ok(());
        }
        let merged: Vec<_> = layout.disk_layers.drain(1..n - 1).collect();
        layout.inherited_layers = layout.inherited_layers.min(1);
        // Recorded before the files go: a crash in between leaves unused files in the sandbox directory,
        // never a record naming files that are gone.
        self.db().set_layout(&sb.id, layout)?;
        let active = qmp.active_node("rootdisk").await?;
        let mut merged_nodes: Vec<&String> = nodes
            .iter()
            .filter(|n| is_root_chain_node(n) && *n != BASE_NODE && **n != active)
            .collect();
        // The merged nodes still back one another (QEMU refuses to close a node something uses), so
        // they close from the top of that detached chain down, newest first.
        merged_nodes.sort_by_key(|n| std::cmp::Reverse(close_order(n)));
        for node in merged_nodes {
            if let Err(e) = qmp.remove_node(node).await {
                warn!(sandbox = %sb.id, node = %node, error = %e, "could not close a merged disk layer");
            }
        }
        let dir = self.config().sandbox_dir(&sb.id);
        for layer in &merged {
            // Only the sandbox's own links (its layers and `layers/`): snapshots hold theirs.
            if layer.path.starts_with(&dir) {
                if let Err(e) = fsutil::remove_file_durably(&layer.path) {
                    warn!(sandbox = %sb.id, layer = %layer.path.display(), error = %e.message, "could not remove a merged disk layer");
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merged_nodes_close_from_the_top_down() {
        let mut nodes = vec!["layer1", "layer2", "disk0", "top1", "top10", "top2"];
        nodes.sort_by_key(|n| std::cmp::Reverse(close_order(n)));
        assert_eq!(
            nodes,
            ["top10", "top2", "top1", "disk0", "layer2", "layer1"]
        );
    }

    #[test]
    fn only_root_disk_nodes_are_chain_nodes() {
        for n in ["disk0", "layer0", "layer12", "top3"] {
            assert!(is_root_chain_node(n), "{n}");
        }
        for n in ["vol0", "vol1-layer0", "layer", "top", "topx", "#block123"] {
            assert!(!is_root_chain_node(n), "{n}");
        }
    }
}
