//! Rolling a sandbox back to one of its snapshots: the snapshot's source, same id and name, put back to it.

use tracing::info;

use super::restore::with_hostname;
use crate::engine::Engine;
use crate::error::{Error, ErrorCode, Result};
use crate::layout::VolumeSlot;
use crate::model::{now_rfc3339, Sandbox, SandboxState};

/// Recorded as the error of a sandbox while it is rolled back (state `creating`), so that a restart after a
/// crash tells a roll back (the sandbox existed before: keep it, as failed) from a new sandbox (remove it).
pub(crate) const RESTORING_MARK: &str = "being restored from snapshot ";

impl Engine {
    /// Puts the snapshot's source sandbox back to the snapshot (same id and name). Paused unless `resume`.
    pub async fn restore_snapshot(
        &self,
        id_or_name: &str,
        resume: bool,
        force: bool,
    ) -> Result<Sandbox> {
        self.restore_snapshot_with(id_or_name, resume, force, false)
            .await
    }

    /// A rewind (lifetime/checkpoint.rs): like `--force`, and also into a sandbox running from this
    /// snapshot right now (going back to the same checkpoint twice).
    pub(crate) async fn restore_snapshot_again(
        &self,
        id_or_name: &str,
        resume: bool,
    ) -> Result<Sandbox> {
        self.restore_snapshot_with(id_or_name, resume, true, true)
            .await
    }

    async fn restore_snapshot_with(
        &self,
        id_or_name: &str,
        resume: bool,
        force: bool,
        again: bool,
    ) -> Result<Sandbox> {
        let id = &self.resolve_snapshot(id_or_name)?;
        let (_, m) = self.load_manifest(id)?;
        // Every check below is made under the source's lifecycle lock (its slot exists even when its row
        // does not) and with the snapshot kept from deletion: two restores cannot both pass them.
        let slot = self.slot(&m.source.sandbox_id);
        let _guard = slot.op.clone().write_owned().await;
        let _in_use = self.claim_use(id, ErrorCode::SnapshotNotFound)?;
        let snap = self.get_snapshot(id)?;
        let existing = self.db().find_sandbox(&m.source.sandbox_id)?;
        if snap.restored && !force {
            return Err(Error::new(
                ErrorCode::SnapshotAlreadyRestored,
                format!(
                    "snapshot {id} was already restored (at {}); pass --force to restore it again",
                    snap.restored_at.as_deref().unwrap_or("?")
                ),
            ));
        }
        if let Some(sb) = &existing {
            if !again
                && snap.restored
                && sb.restored_from.as_deref() == Some(id)
                && sb.state.has_vm()
            {
                return Err(Error::new(
                    ErrorCode::SnapshotInUse,
                    format!(
                        "sandbox {} is {} from snapshot {id} right now; stop or delete it before restoring {id} again",
                        sb.name,
                        sb.state.as_str()
                    ),
                ));
            }
        }
        // Rolling back a sandbox that has no VM now starts one more.
        let mut reservation = match &existing {
            Some(sb) if sb.state.has_vm() || sb.state == SandboxState::Creating => None,
            _ => Some(self.reserve(1, m.memory_mib).await?),
        };
        let sb = match existing {
            Some(sb) => sb,
            None => {
                // The source is gone: recreate it under its old id and name. Its row (`creating`) counts
                // from now on, so the reservation is released in the same step.
                let sb = Sandbox {
                    labels: snap.labels.clone(),
                    ..self.record_from_manifest(&m, id)?
                };
                match reservation.take() {
                    Some(r) => r.record(|| self.db().insert_sandbox(&sb))?,
                    None => self.db().insert_sandbox(&sb)?,
                }
                sb
            }
        };
        if m.kind.has_memory() {
            let free = m
                .volume_slots
                .iter()
                .filter(|s| s.in_restored_copy() == VolumeSlot::Empty)
                .count();
            if sb.volumes.len() > free {
                return Err(Error::new(
                    ErrorCode::VolumeInUse,
                    format!(
                        "sandbox {} has {} volumes but the machine in snapshot {id} has only {free} free volume slots; nothing was changed",
                        sb.name,
                        sb.volumes.len()
                    ),
                ));
            }
        }
        // Throw away the current machine and files; the snapshot holds the state to go back to.
        if let Some(vm) = slot.vm.lock().await.take() {
            self.flush_volumes(&sb, &vm).await;
            vm.terminate().await;
        } else if let Some(pid) = sb.pid {
            kiln_vmm::process::terminate(
                pid,
                &crate::vm::vm_name(&sb.id),
                std::time::Duration::from_secs(3),
            )
            .await;
        }
        self.remove_sandbox_files(&sb.id);
        // A stopped sandbox starts counting as its row once it is `creating`: release the reservation then.
        let mark = || {
            self.db().set_state(
                &sb.id,
                SandboxState::Creating,
                None,
                Some(&format!("{RESTORING_MARK}{id}")),
            )
        };
        match reservation {
            Some(r) => r.record(mark)?,
            None => mark()?,
        }
        self.faults().hold("restore.recorded").await;
        let mut incoming_resume = resume;
        let started = async {
            let cmdline = with_hostname(&m.cmdline, &sb.hostname, false);
            // The sandbox keeps the volumes it has now; they go into slots its restored guest has free.
            let (layout, mut incoming) =
                self.provision_from_snapshot(&sb, id, &m, cmdline, &sb.volumes)?;
            if let Some(inc) = incoming.as_mut() {
                inc.resume = resume;
                inc.identity = None; // rolled back into its own identity
            } else {
                incoming_resume = true; // a disk snapshot restores by booting
            }
            self.db().set_layout(&sb.id, &layout)?;
            let booted = incoming.is_none();
            let vm = self.start_vm(&sb, &layout, incoming).await?;
            if booted {
                // A disk snapshot boots: wait for its agent and mount the sandbox's volumes, as a resume
                // of one does (found by tests/model: a rolled-back sandbox's volume was not mounted).
                self.after_boot(&sb, &vm, &layout, None).await?;
            }
            Ok::<_, Error>(vm)
        };
        match started.await {
            Ok(vm) => {
                let pid = vm.pid;
                *slot.vm.lock().await = Some(vm);
                let state = if incoming_resume {
                    SandboxState::Running
                } else {
                    SandboxState::Paused
                };
                self.db().set_state(&sb.id, state, Some(pid), None)?;
                self.db().set_restored_from(&sb.id, Some(id))?;
                self.db().mark_restored(id, &now_rfc3339())?;
                info!(sandbox = %sb.id, snapshot = id, "sandbox rolled back to snapshot");
                self.get(&sb.id)
            }
            Err(e) => {
                self.db()
                    .set_state(&sb.id, SandboxState::Failed, None, Some(&e.message))?;
                Err(Error::new(
                    e.code,
                    format!(
                        "restoring snapshot {id} into {} failed: {}",
                        sb.name, e.message
                    ),
                ))
            }
        }
    }
}
