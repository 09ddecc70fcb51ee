//! Growth headroom by default: a new machine gets `memory_mib` × `kiln serve --memory-headroom` of RAM
//! (default 2, at most `MAX_MEMORY_MIB`) behind a balloon (`crate::balloon`), so a copy resumed from any of
//! its memory snapshots may be given more memory. What is admitted and capped (capacity, the RAM
//! directory, the cgroup) is `memory_mib`; the headroom costs only the guest's page structures for it.
//!
//! Only images that carry the guest's balloon driver get it by default: an image built before it was
//! added would never give the memory back (and its create would fail), so it boots without headroom.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;

use kiln_image::Image;

use crate::engine::{Engine, MAX_MEMORY_MIB};
use crate::error::Result;
use crate::layout::Layout;
use crate::machine::NewIdentity;
use crate::model::Sandbox;
use crate::vm::Vm;

/// `kiln serve --memory-headroom` when not given.
pub const DEFAULT_FACTOR: f64 = 2.0;
/// Each MiB of headroom costs the guest ~16 KiB of page structures (and QEMU a larger mapping).
pub const MAX_FACTOR: f64 = 16.0;

/// Checks a `--memory-headroom` value.
pub fn check_factor(factor: f64) -> std::result::Result<f64, String> {
    if factor.is_finite() && (1.0..=MAX_FACTOR).contains(&factor) {
        Ok(factor)
    } else {
        Err(format!(
            "--memory-headroom {factor} is out of range; give a factor from 1 (no headroom) to {MAX_FACTOR} (e.g. 2: room to double)"
        ))
    }
}

/// The RAM a machine of `memory_mib` gets with `factor`: None when that is no more than `memory_mib`.
pub fn default_max(factor: f64, memory_mib: u64) -> Option<u64> {
    if factor <= 1.0 {
        return None;
    }
    let max = ((memory_mib as f64) * factor).floor() as u64;
    Some(max.min(MAX_MEMORY_MIB)).filter(|m| *m > memory_mib)
}

/// Whether the image's root filesystem carries the balloon driver among the modules /kiln/init loads
/// (`debugfs` reads the ext4 image without mounting it). Cached by the root filesystem's digest.
fn image_has_balloon(image: &Image) -> bool {
    static SEEN: Mutex<Option<HashMap<String, bool>>> = Mutex::new(None);
    let key = image.manifest.files.rootfs.sha256.clone();
    if let Some(known) = SEEN
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get_or_insert_with(HashMap::new)
        .get(&key)
    {
        return *known;
    }
    let has = rootfs_lists_balloon(&image.rootfs);
    if !has {
        tracing::warn!(image = %image.name, "the image has no virtio_balloon module, so its sandboxes get no memory headroom; rebuild it (`kiln image build NAME --force`) to let copies grow");
    }
    SEEN.lock()
        .unwrap_or_else(|p| p.into_inner())
        .get_or_insert_with(HashMap::new)
        .insert(key, has);
    has
}

fn rootfs_lists_balloon(rootfs: &Path) -> bool {
    // Read-only (no -w); the image file is root's and never changes under its digest.
    std::process::Command::new("debugfs")
        .arg("-R")
        .arg("ls /kiln/modules")
        .arg(rootfs)
        .stdin(std::process::Stdio::null())
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("virtio_balloon.ko"))
        .unwrap_or(false)
}

impl Engine {
    /// The headroom of a new machine booted from `image`: what the client asked for (`max_memory_mib`;
    /// equal to `memory_mib` for none), else the daemon's default where the image can use it.
    pub(crate) fn max_memory_for(
        &self,
        image: &Image,
        memory_mib: u64,
        asked: Option<u64>,
    ) -> Option<u64> {
        asked.or_else(|| {
            default_max(self.config().memory_headroom, memory_mib)
                .filter(|_| image_has_balloon(image))
        })
    }

    /// After a cold boot: the agent's clock and identity and the guest's volumes, and at the same time the
    /// balloon brought to `memory_mib` (the guest sees only that much by the time the sandbox is handed
    /// out: programs size themselves by MemTotal). Overlapping the two hides most of the balloon's time.
    pub(crate) async fn after_boot(
        &self,
        sb: &Sandbox,
        vm: &Vm,
        layout: &Layout,
        identity: Option<&NewIdentity>,
    ) -> Result<()> {
        let balloon = async {
            if layout.max_memory_mib.is_some() {
                let took = crate::balloon::settle(vm, sb.memory_mib).await?;
                tracing::debug!(sandbox = %sb.id, ms = took.as_millis() as u64, memory_mib = sb.memory_mib, "balloon settled");
            }
            Ok(())
        };
        let done = tokio::try_join!(self.after_resume(&sb.id, vm, identity), balloon).map(drop);
        if done.is_err() && layout.max_memory_mib.is_some() {
            // As a failed boot: no VM left behind with more memory than it was given.
            vm.terminate().await;
            self.confine().remove_cgroup(&sb.id);
        }
        done
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_headroom_doubles_within_the_limit() {
        assert_eq!(default_max(2.0, 256), Some(512));
        assert_eq!(default_max(1.5, 256), Some(384));
        assert_eq!(default_max(1.0, 256), None);
        assert_eq!(default_max(2.0, MAX_MEMORY_MIB), None);
        assert_eq!(default_max(2.0, 40_000), Some(MAX_MEMORY_MIB));
        assert!(check_factor(0.5).is_err());
        assert!(check_factor(f64::NAN).is_err());
        assert!(check_factor(17.0).is_err());
        assert_eq!(check_factor(1.0), Ok(1.0));
    }
}
