//! Pause/resume (frozen in memory) and stop/start (hibernated to disk, VM process gone).

use std::time::Duration;

use tracing::info;

use crate::engine::{Engine, Locked};
use crate::error::{Error, ErrorCode, Result};
use crate::fsutil;
use crate::layout::Memory;
use crate::machine::Incoming;
use crate::model::{Sandbox, SandboxState};

const STATE_FILE: &str = "state";
/// A hibernated sandbox resumed from a snapshot: the pages of its RAM that differ from its base.
const DELTA_FILE: &str = "memory.delta";

impl Engine {
    /// Stops the vCPUs; memory stays as it is.
    pub async fn pause(&self, id_or_name: &str) -> Result<Sandbox> {
        let Locked { sb, _guard, .. } = self.lock_sandbox(id_or_name).await?;
        if sb.state == SandboxState::Paused {
            return Ok(sb);
        }
        self.require_state(&sb, &[SandboxState::Running])?;
        let vm = self.live_vm(&sb).await?;
        let stopped = async { Ok::<_, Error>(vm.qmp().await?.execute("stop", None).await?) };
        self.note_unresponsive(&sb, stopped.await)?;
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
        let resumed = async {
            vm.qmp().await?.execute("cont", None).await?;
            let after = self.after_resume(&sb.id, &vm, None);
            crate::deadline::unless_stopped(vm.pid, after).await
        };
        self.note_unresponsive(&sb, resumed.await)?;
        self.db()
            .set_state(&sb.id, SandboxState::Running, Some(vm.pid), None)?;
        self.get(&sb.id)
    }

    /// Hibernates: saves the whole machine to the sandbox's directory and ends the VM process.
    pub async fn stop(&self, id_or_name: &str) -> Result<Sandbox> {
        let Locked { sb, slot, _guard } = self.lock_sandbox(id_or_name).await?;
        let stopped = self.stop_locked(&sb, &slot).await;
        self.note_unresponsive(&sb, stopped)
    }

    pub(crate) async fn stop_locked(
        &self,
        sb: &Sandbox,
        slot: &crate::engine::Slot,
    ) -> Result<Sandbox> {
        if sb.state == SandboxState::Stopped {
            return Ok(sb.clone());
        }
        self.require_state(sb, &[SandboxState::Running, SandboxState::Paused])?;
        let vm = self.live_vm(sb).await?;
        let mut ph = crate::timing::Phases::new("stop", &sb.id);
        let layout = self
            .db()
            .layout(&sb.id)?
            .ok_or_else(|| Error::internal("sandbox has no layout"))?;
        let dir = self.config().sandbox_dir(&sb.id);
        let qmp = vm.qmp().await?;
        let status = qmp.status().await?;
        crate::snapshot::capture::require_saveable(sb, &status)?;
        let was_running = status == "running";
        if was_running {
            qmp.execute("stop", None).await?;
        }
        ph.mark("stop");
        // The vCPUs are stopped and QEMU's block I/O drained: RAM no longer changes. Its copy to the data
        // disk runs while the device state is saved.
        let ram_save = crate::ramdir::start_ram_save(&layout.memory);
        // A RAM privately mapped from a snapshot's file: its changed pages go to a delta and the state
        // is saved without them (as for a snapshot, see snapshot/capture.rs).
        let delta_tmp = dir.join("memory.delta.tmp");
        let delta = self
            .hibernation_delta(sb, vm.pid, &layout.memory, &delta_tmp)
            .await;
        let saved = async {
            if delta {
                let saved = self
                    .save_state_without_ram(
                        sb,
                        &qmp,
                        vm.pid,
                        &dir.join("state.tmp"),
                        Duration::from_secs(60),
                    )
                    .await;
                match saved {
                    Ok(_) => {
                        // Written by the daemon: QEMU reads it at the start.
                        self.confine().seal(&dir.join("state.tmp"))?;
                        return Ok::<_, Error>((dir.join("state.tmp"), true));
                    }
                    Err(e) => {
                        tracing::warn!(sandbox = %sb.id, error = %e.message, "saving the device state without RAM failed; saving it with RAM");
                    }
                }
            }
            // QEMU writes in vm/; the checked, synced file moves into the root-owned directory.
            let written = self.vm_file(sb, "state.tmp")?;
            kiln_vmm::migration::save_state(&qmp, &written, Duration::from_secs(60)).await?;
            let tmp_state = dir.join("state.tmp");
            let taken = self.take_vm_file(sb, &written, &tmp_state);
            let _ = std::fs::remove_file(&written);
            taken?;
            Ok::<_, Error>((tmp_state, false))
        };
        let saved = saved.await;
        let ram_saved = match ram_save {
            Some(copy) => copy
                .await
                .unwrap_or_else(|e| Err(Error::internal(format!("saving the RAM: {e}")))),
            None => Ok(()),
        };
        let (tmp_state, ramless) = match (saved, ram_saved) {
            (Ok(p), Ok(())) => p,
            (saved, ram_saved) => {
                let _ = std::fs::remove_file(dir.join("memory.tmp"));
                let _ = std::fs::remove_file(&delta_tmp);
                if let Ok((p, _)) = &saved {
                    let _ = std::fs::remove_file(p);
                }
                if was_running {
                    let _ = qmp.execute("cont", None).await;
                }
                return Err(saved
                    .err()
                    .or(ram_saved.err())
                    .unwrap_or_else(|| Error::internal("saving the machine failed")));
            }
        };
        ph.mark("save_state");
        self.faults().hold("stop.saved").await;
        // The machine is saved. Make the RAM file durable and publish the state file that marks the save
        // complete while QEMU still lives, its vCPUs stopped for good: a crash from here on leaves a
        // complete save, which recovery keeps (it never lets this VM run again). Only then end QEMU.
        // The delta goes before the state that needs it; a state saved with its RAM must not find an
        // older delta next to it.
        let delta_published = if ramless {
            fsutil::publish(&delta_tmp, &dir.join(DELTA_FILE))
        } else {
            let _ = std::fs::remove_file(&delta_tmp);
            match dir.join(DELTA_FILE).exists() {
                true => fsutil::remove_file_durably(&dir.join(DELTA_FILE)),
                false => Ok(()),
            }
        };
        if let Err(e) =
            delta_published.and_then(|()| publish_save(&layout.memory, &tmp_state, &dir))
        {
            let _ = std::fs::remove_file(dir.join("memory.tmp"));
            let _ = std::fs::remove_file(&delta_tmp);
            // Not published (or not durably): withdraw it before the vCPUs run again.
            let _ = std::fs::remove_file(&tmp_state);
            let _ = std::fs::remove_file(dir.join(STATE_FILE));
            let _ = fsutil::fsync_path(&dir);
            if was_running {
                let _ = qmp.execute("cont", None).await;
            }
            return Err(e);
        }
        ph.mark("save_ram_publish");
        self.faults().hold("stop.published").await;
        let _ = qmp.execute("quit", None).await;
        slot.vm.lock().await.take();
        vm.terminate().await;
        ph.mark("quit");
        self.confine().remove_cgroup(&sb.id);
        ph.mark("cgroup");
        // Saved on the data disk above; the copy on the RAM directory is stale once QEMU is gone.
        self.ram().remove(&sb.id);
        ph.mark("ram_remove");
        self.faults().hold("stop.quit").await;
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
        let mut ph = crate::timing::Phases::new("start", &sb.id);
        // The row already exists (stopped), so it starts counting once its state says running.
        let reservation = self.reserve(1, sb.memory_mib).await?;
        let mut layout = self
            .db()
            .layout(&sb.id)?
            .ok_or_else(|| Error::internal("sandbox has no layout"))?;
        self.check_machine_accel(&sb)?;
        let dir = self.config().sandbox_dir(&sb.id);
        let state = dir.join(STATE_FILE);
        if !state.exists() {
            return Err(Error::internal(format!(
                "the saved state of {} ({}) is missing; the sandbox cannot be started (delete it)",
                sb.name,
                state.display()
            )));
        }
        ph.mark("checks");
        let ram_fill = self.place_saved_ram(&sb, &mut layout)?;
        let placed = ram_fill.is_some();
        ph.mark("place_ram");
        // Saved by the stop next to its RAM-less state (only for RAM mapped from a snapshot's file).
        let delta_file = dir.join(DELTA_FILE);
        let delta = match &layout.memory {
            Memory::Private {
                base,
                base_checksum: Some(id),
            } if delta_file.exists() => Some(crate::machine::IncomingDelta {
                file: delta_file.clone(),
                base: base.clone(),
                base_id: id.clone(),
            }),
            _ => None,
        };
        let incoming = Incoming {
            state: state.clone(),
            resume: true,
            identity: None,
            ram_fill,
            delta,
        };
        let started = self.start_vm(&sb, &layout, Some(incoming)).await;
        ph.mark("start_vm");
        if started.is_err() && placed {
            self.ram().remove(&sb.id);
        }
        let vm = match started {
            Ok(vm) => {
                if let (true, Memory::Owned { file, .. }) = (placed, &layout.memory) {
                    // The guest runs on its copy in the RAM directory; the saved file is stale now.
                    let _ = fsutil::remove_file_durably(file);
                }
                // Its pages are in the running VM now; the state it belonged to is retired.
                if delta_file.exists() {
                    let _ = fsutil::remove_file_durably(&delta_file);
                }
                vm
            }
            Err(e) if !state.exists() => {
                // The state was retired before the vCPUs ran: the disk has moved past it, so the
                // sandbox cannot go back to it.
                let why = format!("{}; its saved state was loaded and its vCPUs ran, so that state is stale and was retired. Its snapshots are unaffected: resume one, or delete the sandbox", e.message);
                self.db()
                    .set_state(&sb.id, SandboxState::Failed, None, Some(&why))?;
                return Err(Error::new(
                    e.code,
                    format!("starting {} failed: {why}", sb.name),
                ));
            }
            Err(e) => return Err(e),
        };
        let pid = vm.pid;
        *slot.vm.lock().await = Some(vm);
        // Running rows count: the reservation goes in the same step.
        reservation.record(|| {
            self.db()
                .set_state(&sb.id, SandboxState::Running, Some(pid), None)
        })?;
        info!(sandbox = %sb.id, pid, "sandbox started from hibernation");
        self.lifetime_started(&sb.id);
        self.get(&sb.id)
    }

    /// With the VM stopped: for RAM mapped privately from a snapshot's file, writes its changed pages to
    /// `out` and says whether it did (false: the state is saved with the RAM, as before).
    async fn hibernation_delta(
        &self,
        sb: &Sandbox,
        pid: u32,
        memory: &Memory,
        out: &std::path::Path,
    ) -> bool {
        let Memory::Private {
            base,
            base_checksum: Some(id),
        } = memory
        else {
            return false;
        };
        if !crate::snapshot::capture::memory_deltas() {
            return false;
        }
        let (base, id, out2) = (base.clone(), id.clone(), out.to_path_buf());
        let took = tokio::task::spawn_blocking(move || {
            kiln_vmm::delta::capture(pid, &base, &id, &out2, false)
        })
        .await;
        match took {
            Ok(Ok(_)) => true,
            Ok(Err(e)) => {
                tracing::warn!(sandbox = %sb.id, error = %e, "no memory delta; saving the RAM in the device state");
                let _ = std::fs::remove_file(out);
                false
            }
            Err(e) => {
                tracing::warn!(sandbox = %sb.id, error = %e, "no memory delta");
                let _ = std::fs::remove_file(out);
                false
            }
        }
    }

    /// A hibernated machine's saved vCPU state loads only under the accelerator it was saved under (a KVM
    /// machine is never loaded into TCG, nor the reverse).
    pub(crate) fn check_machine_accel(&self, sb: &Sandbox) -> Result<()> {
        let here = self.accel().accel.to_string();
        if sb.accel == here {
            return Ok(());
        }
        Err(Error::new(
            ErrorCode::SnapshotIncompatible,
            format!(
                "sandbox {} cannot be started on this daemon: accel differs (machine: {}; this daemon: {here}); its saved state loads only under {}: start the daemon with `kiln serve --accel {}` (on a host where it works), or delete the sandbox",
                sb.name, sb.accel, sb.accel, sb.accel
            ),
        ))
    }

    /// Whether a sandbox whose VM is gone left a complete saved state (a stop that finished).
    pub(crate) fn has_saved_state(&self, id: &str) -> bool {
        self.config().sandbox_dir(id).join(STATE_FILE).exists()
    }
}

/// Makes a stop's save durable and complete: the RAM saved to the data disk and synced, then `state.tmp`
/// renamed to `state` and the directory synced (the state file is what marks the save complete).
fn publish_save(memory: &Memory, tmp_state: &std::path::Path, dir: &std::path::Path) -> Result<()> {
    crate::ramdir::publish_saved_ram(memory)?;
    fsutil::publish(tmp_state, &dir.join(STATE_FILE))
}
