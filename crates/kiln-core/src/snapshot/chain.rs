//! The recorded disk chain against the one QEMU really writes.
//!
//! A capture records the new top layer before QEMU switches to it (see `capture::freeze`), so a daemon that
//! dies in between leaves a recorded top that QEMU never made active — possibly still open in QEMU as an
//! unattached node that holds the file's write lock. Left alone, the next snapshot would freeze and share
//! that layer while QEMU still holds it writable, and every copy resumed from it would fail to lock its
//! disk. Each capture therefore checks the chain first.

use std::path::Path;

use tracing::warn;

use super::compact::STREAM_JOB_PREFIX;
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::fsutil;
use crate::layout::Layout;
use crate::model::Sandbox;

impl Engine {
    /// Brings the record of a running sandbox's disk chain in line with QEMU before a capture or a
    /// compaction changes it, in this order:
    /// 1. A daemon that died mid-compaction left its stream running in QEMU, writing the active layer a
    ///    capture is about to freeze (and share with every copy): it is cancelled (`recovery::adopt`
    ///    does the same at start-up).
    /// 2. A top a crashed capture recorded but never attached is dropped (`reconcile_top`).
    /// 3. A stream that completed before its daemon recorded it left QEMU's chain at `[bottom, active]`
    ///    under a longer record: the compaction is recorded now.
    pub(crate) async fn reconcile_chain(
        &self,
        sb: &Sandbox,
        qmp: &kiln_vmm::Qmp,
        layout: &mut Layout,
    ) -> Result<()> {
        end_left_streams(&sb.id, qmp).await?;
        self.reconcile_top(sb, qmp, layout).await?;
        if layout.disk_layers.len() > 2 && qmp.chain_depth("rootdisk").await? == 2 {
            // Only when QEMU writes the recorded top: then the short chain is that top on the bottom
            // image, and the layers in between are the streamed ones.
            let top = layout.disk_layers[layout.disk_layers.len() - 1]
                .path
                .clone();
            let open = qmp.open_files().await?;
            if !open.iter().any(|(f, w)| *f == top && *w) {
                return Err(Error::internal(format!(
                    "QEMU of sandbox {} has a 2-layer disk chain that does not end in the recorded top {}; stop and start the sandbox before snapshotting it",
                    sb.name,
                    top.display()
                )));
            }
            let nodes = qmp.node_names().await?;
            self.record_compaction(sb, qmp, layout, &nodes).await?;
            warn!(sandbox = %sb.id, "recorded a disk chain compaction that completed while no daemon watched it");
        }
        Ok(())
    }

    /// Makes the recorded top layer the one QEMU writes: a top QEMU never switched to is closed in QEMU,
    /// dropped from the record and deleted. Refuses when QEMU's open files match neither.
    async fn reconcile_top(
        &self,
        sb: &Sandbox,
        qmp: &kiln_vmm::Qmp,
        layout: &mut Layout,
    ) -> Result<()> {
        let n = layout.disk_layers.len();
        if n < 2 {
            return Ok(());
        }
        let open = qmp.open_files().await?;
        let writable = |p: &Path| open.iter().any(|(f, w)| f == p && *w);
        let (top, below) = (
            &layout.disk_layers[n - 1].path,
            &layout.disk_layers[n - 2].path,
        );
        if !writable(below) {
            return Ok(());
        }
        if writable(top) && !is_unattached_top(top, layout.generation) {
            return Err(Error::internal(format!(
                "QEMU of sandbox {} writes both {} and {}; stop and start the sandbox before snapshotting it",
                sb.name,
                below.display(),
                top.display()
            )));
        }
        let phantom = layout.disk_layers[n - 1].clone();
        if open.iter().any(|(f, _)| *f == phantom.path) {
            let node = format!("top{}", layout.generation);
            qmp.remove_node(&node).await?;
            let still = qmp.open_files().await?;
            if still.iter().any(|(f, _)| *f == phantom.path) {
                return Err(Error::internal(format!(
                    "QEMU of sandbox {} keeps {} open after closing node {node}; stop and start the sandbox before snapshotting it",
                    sb.name,
                    phantom.path.display()
                )));
            }
        }
        layout.disk_layers.pop();
        self.db().set_layout(&sb.id, layout)?;
        fsutil::remove_file_durably(&phantom.path)?;
        warn!(sandbox = %sb.id, layer = %phantom.path.display(), "dropped a disk layer an interrupted snapshot recorded but never switched to");
        Ok(())
    }
}

/// Ends the disk streams (`kiln-stream-*` jobs) a daemon that died left running in a sandbox's QEMU:
/// cancelled and waited for, or dismissed once concluded (`Qmp::end_jobs`).
pub(crate) async fn end_left_streams(id: &str, qmp: &kiln_vmm::Qmp) -> Result<()> {
    let ended = qmp
        .end_jobs(STREAM_JOB_PREFIX, kiln_vmm::blockjob::CANCEL_GRACE)
        .await?;
    if !ended.is_empty() {
        warn!(sandbox = %id, jobs = ?ended, "ended disk streams a daemon that died left running");
    }
    Ok(())
}

/// Whether `top` is the layer the last capture created (named after the recorded generation), the only
/// one that can be open without being attached.
fn is_unattached_top(top: &Path, generation: u32) -> bool {
    top.file_name().and_then(|n| n.to_str()) == Some(&format!("disk-{generation}.qcow2"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_last_generation_can_be_unattached() {
        assert!(is_unattached_top(Path::new("/d/sb/disk-7.qcow2"), 7));
        assert!(!is_unattached_top(Path::new("/d/sb/disk-6.qcow2"), 7));
        assert!(!is_unattached_top(Path::new("/d/sb/base.raw"), 7));
    }
}
