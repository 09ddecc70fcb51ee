//! Saving the device state of a stopped VM whose RAM the daemon captures itself (a memory delta), for a
//! snapshot, fork capture, checkpoint or stop of a sandbox resumed from a snapshot.
//!
//! First choice: QEMU's `xen-save-devices-state`, which writes only device and vCPU sections (QEMU does
//! not walk guest RAM, so the pause no longer grows with it; see `kiln_vmm::devstate`). QEMU writes the
//! file as the sandbox's user in its own `vm/` directory; the daemon takes it (a regular file of that
//! user, synced) and writes the loadable state next to its destination. Fallback, and the path
//! `KILN_DEVICE_STATE=stream` forces: the migration stream without the RAM's page records
//! (`kiln_vmm::stripram`). Both load the same way (`migrate-incoming` into a `-S -incoming defer` QEMU).

use std::path::Path;
use std::time::Duration;

use super::manifest::StateFormat;
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::fsutil;
use crate::model::Sandbox;

/// Device-only states unless `KILN_DEVICE_STATE=stream` (the RAM-less migration stream, for comparisons
/// and to make snapshots of the previous kind).
pub(crate) fn device_state_only() -> bool {
    std::env::var("KILN_DEVICE_STATE").map_or(true, |v| v != "stream")
}

impl Engine {
    /// Saves the stopped VM's state without its guest RAM to `dst` (in a root-owned directory, not yet
    /// there). Returns the kind written; an error means neither way worked and `dst` does not exist.
    pub(crate) async fn save_state_without_ram(
        &self,
        sb: &Sandbox,
        qmp: &kiln_vmm::Qmp,
        qemu_pid: u32,
        dst: &Path,
        timeout: Duration,
    ) -> Result<StateFormat> {
        if device_state_only() {
            match self.save_device_state(sb, qmp, dst).await {
                Ok(st) => {
                    tracing::debug!(sandbox = %sb.id, bytes = st.bytes_out, "device state saved (no RAM walked)");
                    return Ok(StateFormat::Devices);
                }
                Err(e) => {
                    let _ = std::fs::remove_file(dst);
                    tracing::warn!(sandbox = %sb.id, error = %e.message, "saving the device state alone failed; streaming it without RAM");
                }
            }
        }
        let sock = self.config().sandbox_dir(&sb.id).join("migrate.sock");
        match kiln_vmm::migration::save_state_without_ram(qmp, qemu_pid, &sock, dst, "mem", timeout)
            .await
        {
            Ok(st) => {
                tracing::debug!(sandbox = %sb.id, pages_dropped = st.pages_dropped, bytes_in = st.bytes_in, bytes_out = st.bytes_out, "device state saved without RAM");
                Ok(StateFormat::Stream)
            }
            Err(e) => {
                let _ = std::fs::remove_file(dst);
                Err(Error::internal(format!(
                    "saving the device state without RAM: {e}"
                )))
            }
        }
    }

    async fn save_device_state(
        &self,
        sb: &Sandbox,
        qmp: &kiln_vmm::Qmp,
        dst: &Path,
    ) -> Result<kiln_vmm::devstate::Completed> {
        let own = self.vm_file(sb, "devices.state")?;
        let taken_path = dst.with_extension("qemu");
        // Debris of a save that died half-way (both in root-owned directories).
        let _ = std::fs::remove_file(&taken_path);
        let _ = std::fs::remove_file(dst);
        let saved = kiln_vmm::migration::save_device_state(qmp, &own).await;
        let result = async {
            saved.map_err(|e| Error::internal(format!("xen-save-devices-state: {e}")))?;
            // A regular file of the VM's user with one link, synced; moved out of its reach first.
            self.take_vm_file(sb, &own, &taken_path)?;
            let (src, out) = (taken_path.clone(), dst.to_path_buf());
            tokio::task::spawn_blocking(move || {
                let input = std::fs::File::open(&src)?;
                let output = kiln_vmm::safefs::create_new(&out, 0o600)?;
                let r = std::io::BufReader::with_capacity(256 << 10, input);
                let mut w = std::io::BufWriter::with_capacity(256 << 10, output);
                let st = kiln_vmm::devstate::complete(
                    r,
                    &mut w,
                    kiln_vmm::qemu::MACHINE_TYPE,
                    &kiln_vmm::migration::CAPABILITIES,
                )?;
                w.into_inner().map_err(|e| e.into_error())?.sync_all()?;
                Ok::<_, std::io::Error>(st)
            })
            .await
            .map_err(|e| Error::internal(e.to_string()))?
            .map_err(|e| fsutil::io_error("completing the device state", e))
        }
        .await;
        let _ = std::fs::remove_file(&own);
        let _ = std::fs::remove_file(&taken_path);
        result
    }
}
