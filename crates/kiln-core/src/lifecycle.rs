//! Pause/resume (frozen in memory) and stop/start (hibernated to disk, VM process gone).

use std::time::Duration;

use tracing::info;

use crate::engine::{Engine, Locked};
use crate::error::{Error, Result};
use crate::fsutil;
use crate::layout::Memory;
use crate::machine::Incoming;
use crate::model::{Sandbox, SandboxState};

const STATE_FILE: &str = "state";

impl Engine {
    /// Stops the vCPUs; memory stays as it is.
    pub async fn pause(&self, id_or_name: &str) -> Result<Sandbox> {
        let Locked { sb, _guard, .. } = self.lock_sandbox(id_or_name).await?;
        if sb.state == SandboxState::Paused {
            return Ok(sb);
        }
        self.require_state(&sb, &[SandboxState::Running])?;
        let vm = self.live_vm(&sb).await?;
        vm.qmp().await?.execute("stop", None).await?;
        self.db()
            .set_state(&sb.id, SandboxState::Paused, Some(vm.pid), None)?;
        self.get(&sb.id)
    }

    /// Continues a paused sandbox (also one left paused by a snapshot or a restore).
    pub async fn resume(&self, id_or_name: &str) -> Result<Sandbox> {
        let Locked { sb, _guard, .. } = self.lock_sandbox(id_or_name).await?;
        if sb.state == SandboxState::Running {
            return Ok(sb);
        }
        self.require_state(&sb, &[SandboxState::Paused])?;
        let vm = self.live_vm(&sb).await?;
        vm.qmp().await?.execute("cont", None).await?;
        self.after_resume(&sb.id, &vm, None).await?;
        self.db()
            .set_state(&sb.id, SandboxState::Running, Some(vm.pid), None)?;
        self.get(&sb.id)
    }

    /// Hibernates: saves the whole machine to the sandbox's directory and ends the VM process.
    pub async fn stop(&self, id_or_name: &str) -> Result<Sandbox> {
        let Locked { sb, slot, _guard } = self.lock_sandbox(id_or_name).await?;
        if sb.state == SandboxState::Stopped {
            return Ok(sb);
        }
        self.require_state(&sb, &[SandboxState::Running, SandboxState::Paused])?;
        let vm = self.live_vm(&sb).await?;
        let layout = self
            .db()
            .layout(&sb.id)?
            .ok_or_else(|| Error::internal("sandbox has no layout"))?;
        let dir = self.config().sandbox_dir(&sb.id);
        let qmp = vm.qmp().await?;
        let status = qmp.status().await?;
        crate::snapshot::capture::require_saveable(&sb, &status)?;
        let was_running = status == "running";
        if was_running {
            qmp.execute("stop", None).await?;
        }
        let saved = async {
            // QEMU writes in vm/; the checked, synced file moves into the root-owned directory.
            let written = self.vm_file(&sb, "state.tmp")?;
            kiln_vmm::migration::save_state(&qmp, &written, Duration::from_secs(60)).await?;
            let tmp_state = dir.join("state.tmp");
            let taken = self.take_vm_file(&sb, &written, &tmp_state);
            let _ = std::fs::remove_file(&written);
            taken?;
            Ok::<_, Error>(tmp_state)
        };
        let tmp_state = match saved.await {
            Ok(p) => p,
            Err(e) => {
                if was_running {
                    let _ = qmp.execute("cont", None).await;
                }
                return Err(e);
            }
        };
        self.faults().hold("stop.saved").await;
        // The machine is saved; end QEMU, then make the RAM file durable (its pages stay in the page cache
        // after QEMU exits) and only then publish the state file that marks the save complete.
        let _ = qmp.execute("quit", None).await;
        slot.vm.lock().await.take();
        vm.terminate().await;
        self.confine().remove_cgroup(&sb.id);
        if let Memory::Owned { file } = &layout.memory {
            fsutil::fsync_path(file)?;
        }
        std::fs::rename(&tmp_state, dir.join(STATE_FILE))
            .map_err(|e| fsutil::io_error("publishing the saved state", e))?;
        fsutil::fsync_path(&dir)?;
        self.db()
            .set_state(&sb.id, SandboxState::Stopped, None, None)?;
        info!(sandbox = %sb.id, "sandbox hibernated");
        self.get(&sb.id)
    }

    /// Brings a stopped sandbox back where it was: same id, name, disk and memory.
    pub async fn start(&self, id_or_name: &str) -> Result<Sandbox> {
        let Locked { sb, slot, _guard } = self.lock_sandbox(id_or_name).await?;
        if sb.state == SandboxState::Running {
            return Ok(sb);
        }
        self.require_state(&sb, &[SandboxState::Stopped])?;
        // The row already exists (stopped), so it starts counting once its state says running.
        let _reservation = self.reserve(1, sb.memory_mib).await?;
        let layout = self
            .db()
            .layout(&sb.id)?
            .ok_or_else(|| Error::internal("sandbox has no layout"))?;
        let dir = self.config().sandbox_dir(&sb.id);
        let state = dir.join(STATE_FILE);
        if !state.exists() {
            return Err(Error::internal(format!(
                "the saved state of {} ({}) is missing; the sandbox cannot be started (delete it)",
                sb.name,
                state.display()
            )));
        }
        let incoming = Incoming {
            state: state.clone(),
            resume: true,
            identity: None,
        };
        let vm = self.start_vm(&sb, &layout, Some(incoming)).await?;
        // The saved state was consumed; it must never be loaded again over newer disk contents.
        let _ = std::fs::remove_file(&state);
        let pid = vm.pid;
        *slot.vm.lock().await = Some(vm);
        self.db()
            .set_state(&sb.id, SandboxState::Running, Some(pid), None)?;
        info!(sandbox = %sb.id, pid, "sandbox started from hibernation");
        self.get(&sb.id)
    }

    /// Whether a sandbox whose VM is gone left a complete saved state (a stop that finished).
    pub(crate) fn has_saved_state(&self, id: &str) -> bool {
        self.config().sandbox_dir(id).join(STATE_FILE).exists()
    }
}
