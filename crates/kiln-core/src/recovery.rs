//! Recovery: what a daemon does at start after its predecessor died (re-adopt VMs, finish or roll back
//! half-done operations, remove debris), and the watch that notices VMs dying under a running daemon.
//!
//! Rule for interrupted operations: an operation whose result the client never saw is rolled back when that
//! loses nothing (a new sandbox that was still being created or forked is removed, a fork's capture is
//! removed); an operation past its point of no return is finished (a deletion, a stop whose state was
//! saved, a start whose VM already runs).

use std::sync::{Arc, Weak};
use std::time::Duration;

use tracing::{info, warn};

use crate::engine::Engine;
use crate::error::Result;
use crate::fsutil;
use crate::model::{Sandbox, SandboxState};
use crate::snapshot::chain::end_left_streams;
use crate::snapshot::manifest::Manifest;
use crate::snapshot::rollback::RESTORING_MARK;
use crate::snapshot::Snapshot;
use crate::vm::vm_name;
use crate::vm::Vm;

/// Written into a fork capture's directory, so a capture found after a crash is removed, not listed.
pub(crate) const EPHEMERAL_MARK: &str = ".ephemeral";

impl Engine {
    /// The QEMU a sandbox may still have: the recorded pid, or the pid file of a launch that was not
    /// recorded yet. Only a live process with this sandbox's VM name counts.
    fn leftover_qemu(&self, id: &str, recorded: Option<u32>) -> Option<u32> {
        let name = vm_name(id);
        let vm = Vm::new(name.clone(), self.config().sandbox_dir(id), 0, None);
        let from_file = kiln_vmm::qemu::read_pid_file(&vm.qemu_file("qemu.pid")).ok();
        [recorded, from_file]
            .into_iter()
            .flatten()
            .find(|pid| kiln_vmm::process::is_our_qemu(*pid, &name))
    }

    /// After a daemon restart: VMs whose QEMU is still alive are taken over; the rest are marked failed;
    /// operations cut short are finished or rolled back.
    pub(crate) async fn adopt(&self) -> Result<()> {
        for sb in self.db().list_sandboxes()? {
            let name = vm_name(&sb.id);
            let dir = self.config().sandbox_dir(&sb.id);
            let alive = self.leftover_qemu(&sb.id, sb.pid);
            match sb.state {
                s if s.has_vm() && alive.is_some() && self.has_saved_state(&sb.id) => {
                    // A stop cut short after publishing its save: the VM has not run since (a published
                    // state is retired before any `cont`), so the save is complete; finish the stop.
                    let pid = alive.unwrap_or(0);
                    kiln_vmm::process::terminate(pid, &name, Duration::from_secs(3)).await;
                    self.confine().remove_cgroup(&sb.id);
                    let _ = std::fs::remove_file(dir.join("state.tmp"));
                    self.db()
                        .set_state(&sb.id, SandboxState::Stopped, None, None)?;
                    info!(sandbox = %sb.id, "finished a stop kiln did not complete");
                }
                s if s.has_vm() && alive.is_some() => {
                    let pid = alive.unwrap_or(0);
                    let vm = Vm::new(name, dir.clone(), pid, None).with_accel(self.accel().accel);
                    let state = match vm.qmp().await {
                        // Recorded as running but found paused: kiln went down in the middle of an
                        // operation that pauses the VM briefly (a snapshot or a stop); let it run again.
                        Ok(qmp) => {
                            // A disk stream of a compaction this daemon's predecessor did not finish
                            // runs on in QEMU with nobody holding the sandbox: ended before any
                            // operation can meet it (a capture would freeze the layer it writes).
                            if let Err(e) = end_left_streams(&sb.id, &qmp).await {
                                warn!(sandbox = %sb.id, error = %e.message, "could not end disk streams a daemon that died left running; the next snapshot tries again");
                            }
                            match (sb.state, qmp.status().await.as_deref()) {
                                (SandboxState::Running, Ok(status)) if status != "running" => {
                                    let _ = qmp.execute("cont", None).await;
                                    SandboxState::Running
                                }
                                (_, Ok("paused")) => SandboxState::Paused,
                                _ => SandboxState::Running,
                            }
                        }
                        Err(_) => sb.state,
                    };
                    // A stop cut short before its save was published: the VM runs on, the partial save goes.
                    let _ = fsutil::remove_file_durably(&dir.join("state.tmp"));
                    self.db().set_state(&sb.id, state, Some(pid), None)?;
                    *self.slot(&sb.id).vm.lock().await = Some(Arc::new(vm));
                    info!(sandbox = %sb.id, pid, "re-adopted running VM");
                }
                s if s.has_vm() && self.has_saved_state(&sb.id) => {
                    // A stop (hibernation) finished saving before kiln went down.
                    self.db()
                        .set_state(&sb.id, SandboxState::Stopped, None, None)?;
                    info!(sandbox = %sb.id, "sandbox was hibernated while kiln was down");
                }
                s if s.has_vm() => {
                    let vm = Vm::new(name, dir, 0, None);
                    let err = self.vm_died(&sb.id, &vm).message;
                    warn!(sandbox = %sb.id, "VM process gone while kiln was down");
                    self.db().set_state(
                        &sb.id,
                        SandboxState::Failed,
                        None,
                        Some(&format!("QEMU exited while kiln was not running: {err}")),
                    )?;
                }
                SandboxState::Stopped => {
                    let _ = fsutil::remove_file_durably(&dir.join("state.tmp"));
                    if let Some(pid) = alive {
                        self.finish_interrupted_start(&sb, pid).await?;
                    } else if !self.has_saved_state(&sb.id) {
                        // A start retired the state and let the vCPUs run, then kiln and the VM went down:
                        // the disk moved past the state, which must not be loaded again.
                        warn!(sandbox = %sb.id, "a start ran the VM and did not finish; the sandbox cannot be started again");
                        self.db().set_state(
                            &sb.id,
                            SandboxState::Failed,
                            None,
                            Some("kiln and the VM stopped during a start, after the VM had run: its saved state was stale and retired. Its snapshots are unaffected: resume one, or delete the sandbox"),
                        )?;
                    }
                }
                SandboxState::Creating => {
                    if let Some(pid) = alive {
                        kiln_vmm::process::terminate(pid, &name, Duration::from_secs(3)).await;
                    }
                    match sb
                        .error
                        .as_deref()
                        .and_then(|e| e.strip_prefix(RESTORING_MARK))
                    {
                        Some(snap) => {
                            // A roll back: the sandbox existed before and its snapshot still does.
                            self.db().set_state(
                                &sb.id,
                                SandboxState::Failed,
                                None,
                                Some(&format!("kiln stopped while restoring snapshot {snap} into this sandbox; restore it again (`kiln snapshot restore {snap}`) or delete the sandbox")),
                            )?;
                        }
                        None => {
                            // Never reported as created: roll back, so the name is free to try again.
                            self.remove_sandbox_files(&sb.id);
                            self.db().delete_sandbox(&sb.id)?;
                            warn!(sandbox = %sb.id, name = %sb.name, "removed a sandbox whose creation kiln did not finish");
                        }
                    }
                }
                SandboxState::Deleting => {
                    if let Some(pid) = alive {
                        kiln_vmm::process::terminate(pid, &name, Duration::from_secs(3)).await;
                    }
                    self.remove_sandbox_files(&sb.id);
                    self.db().delete_sandbox(&sb.id)?;
                    info!(sandbox = %sb.id, "finished a deletion kiln did not complete");
                }
                SandboxState::Failed => {
                    if let Some(pid) = alive {
                        kiln_vmm::process::terminate(pid, &name, Duration::from_secs(3)).await;
                        self.db().set_state(
                            &sb.id,
                            SandboxState::Failed,
                            None,
                            sb.error.as_deref(),
                        )?;
                    }
                }
                _ => {}
            }
        }
        self.remove_orphan_sandbox_dirs().await;
        self.adopt_net().await;
        Ok(())
    }

    /// Bridged networking after a restart: rules for the addresses left after recovery, and the
    /// published ports of running sandboxes bound again (the daemon relays them, net/proxy.rs).
    async fn adopt_net(&self) {
        let Some(br) = self.bridge() else {
            return;
        };
        if let Err(e) = self.refresh_net().await {
            warn!(error = %e, "network rules not updated after recovery");
        }
        for sb in self.db().list_sandboxes().unwrap_or_default() {
            if !sb.state.has_vm() || sb.address.is_none() {
                continue;
            }
            for p in &sb.ports {
                if let Err(e) = self.forward_bridged(br, &sb, *p) {
                    warn!(sandbox = %sb.id, guest = p.guest, error = %e, "published port not bound again");
                }
            }
        }
    }

    /// A stopped sandbox with a live QEMU: kiln went down while starting it. If the vCPUs already ran, the
    /// disk moved past the saved state, so the start is finished; if the state was loaded and retired (the
    /// step just before `cont`), QEMU holds the only copy and is continued; otherwise the VM is ended and
    /// the sandbox stays stopped with its saved state.
    async fn finish_interrupted_start(&self, sb: &Sandbox, pid: u32) -> Result<()> {
        let name = vm_name(&sb.id);
        let dir = self.config().sandbox_dir(&sb.id);
        let vm = Vm::new(name.clone(), dir.clone(), pid, None);
        let status = match vm.qmp().await {
            Ok(qmp) => qmp.status().await.unwrap_or_default(),
            Err(_) => String::new(),
        };
        let retired = !self.has_saved_state(&sb.id);
        if retired && status == "paused" {
            let continued = async {
                vm.qmp().await?.execute("cont", None).await?;
                self.after_resume(&sb.id, &vm, None).await
            };
            if let Err(e) = continued.await {
                kiln_vmm::process::terminate(pid, &name, Duration::from_secs(3)).await;
                let why = format!("kiln stopped during a start and continuing it failed ({}); its saved state was retired. Its snapshots are unaffected: resume one, or delete the sandbox", e.message);
                self.db()
                    .set_state(&sb.id, SandboxState::Failed, None, Some(&why))?;
                return Ok(());
            }
        }
        if status == "running" || (retired && status == "paused") {
            let _ = fsutil::remove_file_durably(&dir.join("state"));
            self.db()
                .set_state(&sb.id, SandboxState::Running, Some(pid), None)?;
            *self.slot(&sb.id).vm.lock().await = Some(Arc::new(vm));
            info!(sandbox = %sb.id, pid, "finished a start kiln did not complete");
        } else if retired {
            kiln_vmm::process::terminate(pid, &name, Duration::from_secs(3)).await;
            self.db().set_state(
                &sb.id,
                SandboxState::Failed,
                None,
                Some(&format!("kiln stopped during a start that had retired its saved state, and QEMU was {status:?}; delete the sandbox (its snapshots are unaffected)")),
            )?;
        } else {
            kiln_vmm::process::terminate(pid, &name, Duration::from_secs(3)).await;
            self.db()
                .set_state(&sb.id, SandboxState::Stopped, None, None)?;
            info!(sandbox = %sb.id, "rolled back a start kiln did not complete");
        }
        Ok(())
    }

    /// Sandbox directories without a row (a creation rolled back above, or cut short before its row).
    async fn remove_orphan_sandbox_dirs(&self) {
        for entry in std::fs::read_dir(self.config().sandboxes_dir())
            .into_iter()
            .flatten()
            .flatten()
        {
            let id = entry.file_name().to_string_lossy().into_owned();
            if !matches!(self.db().find_sandbox(&id), Ok(None)) {
                continue;
            }
            if let Some(pid) = self.leftover_qemu(&id, None) {
                kiln_vmm::process::terminate(pid, &vm_name(&id), Duration::from_secs(3)).await;
            }
            warn!(dir = %entry.path().display(), "removing the directory of a sandbox kiln has no record of");
            let _ = fsutil::remove_dir_durably(&entry.path());
        }
    }

    /// Removes half-written snapshots (`.tmp-*`), finishes interrupted deletions (`.trash-*`), removes
    /// fork captures left by a fork cut short, records complete snapshots moved into place just before
    /// kiln went down and removes unrecorded incomplete ones. Runs on start-up, before any operation.
    pub(crate) fn clean_snapshot_debris(&self) {
        for d in self.snapshot_debris(false) {
            self.clean_debris(&d);
        }
    }

    /// Starts the watch that marks sandboxes failed when their QEMU dies under a running daemon, so
    /// `get` and `list` tell the truth without waiting for the next command to fail.
    pub(crate) fn spawn_watch(self: &Arc<Engine>) {
        let weak: Weak<Engine> = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let Some(engine) = weak.upgrade() else { return };
                engine.reap_dead_vms().await;
            }
        });
    }

    async fn reap_dead_vms(&self) {
        let Ok(sandboxes) = self.db().list_sandboxes() else {
            return;
        };
        for sb in sandboxes.into_iter().filter(|s| s.state.has_vm()) {
            let slot = self.slot(&sb.id);
            // An operation in progress owns the VM's fate (a stop ends QEMU on purpose); skip it.
            let Ok(_guard) = slot.op.clone().try_write_owned() else {
                continue;
            };
            let vm = slot.vm.lock().await.clone();
            let Some(vm) = vm else { continue };
            if vm.is_alive() {
                continue;
            }
            // Read again under the lock: the state may have changed since the list.
            if !self.get(&sb.id).is_ok_and(|s| s.state.has_vm()) {
                continue;
            }
            let err = self.vm_died(&sb.id, &vm);
            warn!(sandbox = %sb.id, error = %err.message, "the VM process died; marking the sandbox failed");
            let _ = self.db().set_state(
                &sb.id,
                SandboxState::Failed,
                None,
                Some(&format!(
                    "{}. Its snapshots are unaffected: resume one, or delete the sandbox",
                    err.message
                )),
            );
            slot.vm.lock().await.take();
        }
    }
}

pub(crate) fn snapshot_from_manifest(m: &Manifest, dir: &std::path::Path) -> Snapshot {
    Snapshot {
        id: m.id.clone(),
        sandbox_id: m.source.sandbox_id.clone(),
        sandbox_name: m.source.sandbox_name.clone(),
        kind: m.kind,
        parent: m.parent.clone(),
        template: m.source.template.clone(),
        memory_mib: m.memory_mib,
        cpus: m.cpus,
        disk_size_bytes: m.disk_size_bytes,
        size_bytes: fsutil::dir_allocated_bytes(dir),
        labels: m.labels.clone(),
        restored: false,
        restored_at: None,
        created_at: m.created_at.clone(),
        warm_spares: 0,
        names: Vec::new(),
        expires_at: None,
        max_memory_mib: m.max_memory_mib,
        pause_ms: None,
        template_snapshot: None,
    }
}
