//! What one template snapshot serves beyond its own shape (issue 15): a create asking for more memory
//! (within the snapshot's headroom), another vCPU count (up to the vCPUs its machine has) or a larger disk
//! resumes that snapshot and resizes the copy, instead of booting a template snapshot of its own.
//!
//! Memory grows by deflating the balloon and vCPUs are onlined or offlined on resume (snapshot/
//! resources.rs); the disk grows online here: QMP `block_resize` of the root node (virtio-blk tells the
//! guest its new capacity), then the image's own `resize2fs` grows the mounted ext4 through the agent.
//! The agent needs nothing new: every kiln image carries resize2fs for `kiln.resize=1` boots.

use std::time::Duration;

use kiln_agent_client::ExecRequest;
use serde_json::json;

use crate::engine::Engine;
use crate::error::{Error, ErrorCode, Result};
use crate::template_snap::{Shape, LABEL};
use crate::vm::agent_error;

/// How long the guest may take to see the new capacity and grow its filesystem (TCG, a few GiB).
const GROW_DEADLINE: Duration = Duration::from_secs(90);
/// QEMU's node name of a sandbox's writable root layer (kiln_vmm::qemu, `chain_blockdevs`).
const ROOT_NODE: &str = "disk0";

impl Engine {
    /// An existing, current template snapshot of `template` whose copies can be given `want`: memory
    /// within its [memory, headroom], vCPUs within the vCPUs its machine has, and, if the client asked for
    /// a headroom, that same headroom. The exact shape is not searched for here (the caller tries it first);
    /// of several, the one with the most memory (least to deflate) is taken.
    pub(crate) fn template_snapshot_serving(
        &self,
        template: &str,
        want: Shape,
        asked_max: Option<u64>,
    ) -> Option<(String, Shape)> {
        let snaps = self.db().list_snapshots().ok()?;
        snaps
            .into_iter()
            .filter(|s| s.labels.get(LABEL).map(String::as_str) == Some(template))
            .filter_map(|s| {
                let shape = s
                    .labels
                    .get(crate::template_gc::SHAPE_LABEL)
                    .and_then(|l| crate::template_gc::parse_shape(l))?;
                Some((s.id, shape))
            })
            .filter(|(_, have)| can_serve(*have, want, asked_max, self.machine_max_cpus(have.cpus)))
            // Only the one a create would make now (not one of a rebuilt template, another QEMU...).
            .filter(|(id, have)| {
                self.template_snapshot_id(template, *have)
                    .is_ok_and(|current| current == *id)
                    && self.has_template_snapshot(id)
            })
            .max_by_key(|(_, have)| (have.memory_mib, have.cpus == want.cpus))
    }

    /// Grows the root disk of running sandbox `sb_id` to `bytes` and its ext4 filesystem with it, while
    /// the guest runs; records the new size once the guest's filesystem has it.
    pub(crate) async fn grow_disk_online(&self, sb_id: &str, bytes: u64) -> Result<()> {
        let locked = self.lock_sandbox(sb_id).await?;
        let vm = self.running_vm(&locked.sb).await?;
        let qmp = vm.qmp().await?;
        qmp.execute(
            "block_resize",
            Some(json!({ "node-name": ROOT_NODE, "size": bytes })),
        )
        .await
        .map_err(|e| {
            Error::new(
                ErrorCode::VmFailed,
                format!("QEMU could not grow the disk to {bytes} bytes: {e}"),
            )
        })?;
        self.faults().hold("create.disk_resized").await;
        let agent = vm.agent(Duration::from_secs(10)).await?;
        let mut req = ExecRequest::argv(["/kiln/busybox", "sh", "-c", &grow_script(bytes)]);
        req.timeout_ms = Some(GROW_DEADLINE.as_millis() as u64);
        let out = tokio::time::timeout(
            GROW_DEADLINE + Duration::from_secs(5),
            agent.exec_collect(req),
        )
        .await
        .map_err(|_| {
            Error::new(
                ErrorCode::Timeout,
                format!(
                    "the guest did not grow its filesystem within {} s",
                    GROW_DEADLINE.as_secs()
                ),
            )
        })?
        .map_err(|e| agent_error(e, &vm.name))?;
        if out.status.code != Some(0) {
            return Err(Error::new(
                ErrorCode::GuestError,
                format!(
                    "growing the guest's filesystem failed ({:?}): {}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
            ));
        }
        self.db().set_disk_size(sb_id, bytes)?;
        Ok(())
    }
}

/// Whether a copy of a snapshot of shape `have` (whose machine has `max_cpus` vCPUs) can be `want`. A
/// machine that would boot with headroom gets a copy with headroom (perhaps less), one that would boot
/// without gets none.
fn can_serve(have: Shape, want: Shape, asked_max: Option<u64>, max_cpus: u32) -> bool {
    let headroom = have.max_memory_mib.unwrap_or(have.memory_mib);
    (have.memory_mib..=headroom).contains(&want.memory_mib)
        && (1..=max_cpus).contains(&want.cpus)
        && have.max_memory_mib.is_some() == want.max_memory_mib.is_some()
        && asked_max.is_none_or(|asked| asked == headroom)
}

/// Waits (bounded) until the guest sees the disk's new capacity, then grows the mounted root ext4.
fn grow_script(bytes: u64) -> String {
    let sectors = bytes / 512;
    format!(
        r#"i=0
while [ "$(cat /sys/block/vda/size)" != "{sectors}" ]; do
  i=$((i+1))
  if [ $i -gt 400 ]; then echo "the guest still sees $(cat /sys/block/vda/size) sectors, not {sectors}" >&2; exit 3; fi
  sleep 0.05
done
PATH=/usr/local/sbin:/usr/sbin:/sbin:/usr/bin:/bin:$PATH
command -v resize2fs >/dev/null 2>&1 || {{ echo "the image has no resize2fs" >&2; exit 4; }}
resize2fs /dev/vda >/tmp/.kiln-resize.log 2>&1 || {{ cat /tmp/.kiln-resize.log >&2; rm -f /tmp/.kiln-resize.log; exit 5; }}
rm -f /tmp/.kiln-resize.log
"#
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(memory_mib: u64, max: Option<u64>, cpus: u32) -> Shape {
        Shape {
            memory_mib,
            max_memory_mib: max,
            cpus,
        }
    }

    #[test]
    fn serves_within_headroom_and_vcpus() {
        let have = shape(256, Some(512), 1);
        assert!(can_serve(have, shape(384, Some(768), 1), None, 2));
        assert!(can_serve(have, shape(512, Some(1024), 2), None, 2));
        assert!(can_serve(have, shape(256, Some(512), 2), Some(512), 2));
        // Less than the snapshot holds, more than its headroom, more vCPUs than its machine has.
        assert!(!can_serve(have, shape(128, Some(256), 1), None, 2));
        assert!(!can_serve(have, shape(640, None, 1), None, 2));
        assert!(!can_serve(have, shape(256, Some(512), 3), None, 2));
        // A headroom asked for is kept.
        assert!(!can_serve(have, shape(300, Some(1024), 1), Some(1024), 2));
        // No headroom: only its own memory.
        assert!(can_serve(shape(256, None, 1), shape(256, None, 1), None, 1));
        assert!(!can_serve(
            shape(256, None, 1),
            shape(300, None, 1),
            None,
            1
        ));
        // A create that would boot with headroom never gets a copy without, nor the other way round.
        assert!(!can_serve(
            shape(128, None, 1),
            shape(128, Some(192), 1),
            None,
            2
        ));
        assert!(!can_serve(have, shape(256, None, 1), None, 2));
    }

    #[test]
    fn script_waits_for_the_exact_sector_count() {
        let s = grow_script(3 << 30);
        assert!(s.contains("\"6291456\""), "{s}");
        assert!(s.contains("resize2fs /dev/vda"));
    }
}
