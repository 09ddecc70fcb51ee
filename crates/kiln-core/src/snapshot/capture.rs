//! Taking a snapshot of a running or paused sandbox.
//!
//! The VM is paused only while its device state is saved (milliseconds), its disk's top layer is frozen
//! (a new qcow2 layer becomes the active one, O(1)) and its RAM is captured: copied when the sandbox owns a
//! RAM file, or — for a sandbox restored from a snapshot — reduced to the pages it changed since its base.
//! Everything else (checksums, manifest, fsync) happens after the VM runs again.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Deserialize;
use tracing::info;
use utoipa::ToSchema;

use super::manifest::{FileEntry, Manifest, Role, Source, StateFormat};
use super::{CreateSnapshotInternal, Snapshot, SnapshotType};
use crate::engine::{Engine, Locked};
use crate::error::{Error, ErrorCode, Result};
use crate::fsutil;
use crate::layout::{Layer, Layout, Memory, Origin};
use crate::machine::create_top_layer;
use crate::model::{now_rfc3339, Sandbox, SandboxState};
use crate::validate;
use crate::vm::{agent_error, Vm};

/// What a client asks for when taking a snapshot.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateSnapshot {
    /// Snapshot id; default `snap-<sandbox>-<unix time>`.
    pub name: Option<String>,
    #[serde(rename = "type", default)]
    pub kind: SnapshotType,
    /// Keep the source paused after the capture (default: it continues running).
    #[serde(default)]
    pub leave_paused: bool,
    #[serde(default, alias = "metadata")]
    pub labels: BTreeMap<String, String>,
    /// Seconds until it expires; it is then deleted once nothing depends on it (no diff snapshot builds
    /// on it, no sandbox rolled back to it runs).
    pub ttl: Option<u64>,
}

const SAVE_TIMEOUT: Duration = Duration::from_secs(60);

impl Engine {
    /// Takes a snapshot of a running or paused sandbox.
    pub async fn create_snapshot(&self, sandbox: &str, req: CreateSnapshot) -> Result<Snapshot> {
        self.config().check_storage("create a snapshot")?;
        let ttl = req.ttl;
        if req.labels.contains_key(crate::lifetime::checkpoint::LABEL) {
            return Err(Error::invalid(format!(
                "the label {} is kiln's own (checkpoints); use another key",
                crate::lifetime::checkpoint::LABEL
            )));
        }
        if ttl.is_some_and(|t| t == 0 || t > crate::lifetime::MAX_SECS) {
            return Err(Error::invalid(format!(
                "ttl must be from 1 to {} seconds",
                crate::lifetime::MAX_SECS
            )));
        }
        let mut snap = self
            .create_snapshot_internal(sandbox, req, CreateSnapshotInternal::default())
            .await?;
        if let Some(ttl) = ttl {
            self.set_snapshot_ttl(&snap.id, ttl)?;
            snap.expires_at = self.snapshot_expires_at(&snap.id);
        }
        // Each snapshot froze a disk layer: a long chain is compacted in the background, as after a
        // checkpoint.
        self.compact_soon(&snap.sandbox_id);
        Ok(self.present_parent(snap))
    }

    pub(crate) async fn create_snapshot_internal(
        &self,
        sandbox: &str,
        req: CreateSnapshot,
        internal: CreateSnapshotInternal,
    ) -> Result<Snapshot> {
        validate::labels(&req.labels)?;
        let sb = self.get(sandbox)?;
        // Held until the row exists (or the capture fails): a concurrent capture cannot take the name.
        let claim = self.claim_snapshot_name(&sb, req.name.clone())?;
        let id = claim.name.clone();
        let Locked { sb, _guard, .. } = if internal.skip_if_busy {
            self.try_lock_sandbox(&sb.id)?
        } else {
            self.lock_sandbox(&sb.id).await?
        };
        self.require_state(&sb, &[SandboxState::Running, SandboxState::Paused])?;
        let vm = self.live_vm(&sb).await?;
        let started = Instant::now();
        // Unique per capture; ends in the pid so a daemon can tell its own work in progress (restore.rs).
        let tmp = self.config().snapshots_dir().join(format!(
            ".tmp-{id}-{:08x}-{}",
            rand::random::<u32>(),
            std::process::id()
        ));
        std::fs::create_dir(&tmp)
            .map_err(|e| fsutil::io_error(&format!("creating {}", tmp.display()), e))?;
        if internal.ephemeral {
            std::fs::write(tmp.join(crate::recovery::EPHEMERAL_MARK), b"fork capture\n")
                .map_err(|e| fsutil::io_error("marking a fork capture", e))?;
        }
        let mut ph = crate::timing::Phases::new("snapshot_create", &id);
        let job = Job {
            pid: vm.pid,
            id: &id,
            req: &req,
            tmp: &tmp,
            ephemeral: internal.ephemeral,
        };
        let result = self.capture(&sb, &vm, job, &mut ph).await;
        drop(claim);
        match result {
            Ok(snapshot) => {
                info!(snapshot = %id, sandbox = %sb.id, kind = snapshot.kind.as_str(), ms = started.elapsed().as_millis() as u64, "snapshot created");
                Ok(snapshot)
            }
            Err(e) => {
                let _ = fsutil::remove_dir_durably(&tmp);
                self.note_unresponsive(&sb, Err(e))
            }
        }
    }

    async fn capture(
        &self,
        sb: &Sandbox,
        vm: &Vm,
        job: Job<'_>,
        ph: &mut crate::timing::Phases,
    ) -> Result<Snapshot> {
        let req = job.req;
        let mut layout = self
            .db()
            .layout(&sb.id)?
            .ok_or_else(|| Error::internal(format!("sandbox {} has no recorded layout", sb.id)))?;
        let qmp = vm.qmp().await?;
        let status = qmp.status().await?;
        require_saveable(sb, &status)?;
        ph.mark("status");
        self.reconcile_chain(sb, &qmp, &mut layout).await?;
        ph.mark("reconcile_chain");
        if req.kind == SnapshotType::Disk {
            // Flush the guest's page cache so the disk holds what its programs wrote.
            let agent = vm.agent(Duration::from_secs(10)).await?;
            agent.sync().await.map_err(|e| agent_error(e, &sb.name))?;
        }
        // The new top layer is created before pausing: it only names its backing file, which QEMU keeps
        // writing to until the switch.
        let dir = self.config().sandbox_dir(&sb.id);
        let below = layout
            .top()
            .cloned()
            .ok_or_else(|| Error::internal("sandbox has no disk layers"))?;
        let new_top = layout.next_top_path(&dir);
        create_top_layer(&new_top, &below, sb.disk_size_bytes)?;
        // QEMU opens it (blockdev-add) as the sandbox's user.
        self.confine().own_file(&new_top, sb.qemu_uid)?;
        ph.mark("create_top_layer");
        let was_running = status == "running";
        if was_running {
            qmp.execute("stop", None).await?;
        }
        let paused_at = Instant::now();
        ph.mark("stop");
        self.faults().hold("snapshot.paused").await;
        let frozen = self.freeze(sb, &qmp, &mut layout, &job, &new_top, ph).await;
        if frozen.is_err() && layout.top().map(|l| &l.path) != Some(&new_top) {
            let _ = fsutil::remove_file_durably(&new_top);
        }
        let keep_paused = req.leave_paused || !was_running;
        let resumed = if keep_paused {
            Ok(serde_json::Value::Null)
        } else {
            qmp.execute("cont", None).await.map_err(Error::from)
        };
        let pause_ms = paused_at.elapsed().as_millis() as u64;
        ph.mark("cont");
        if req.leave_paused && was_running {
            self.db()
                .set_state(&sb.id, SandboxState::Paused, Some(vm.pid), None)?;
        }
        let mut captured = frozen?;
        captured.pause_ms = Some(pause_ms);
        resumed?;
        tracing::info!(snapshot = job.id, pause_ms, "source paused for capture");
        // The guest's clock stood still while it was paused: set it, as a resume does, while the
        // snapshot's files are written (the request is sent at once; its answer is awaited at the end).
        // The snapshot is taken either way; a guest that does not answer keeps its late clock (logged).
        let clock = async {
            if keep_paused {
                return;
            }
            if let Err(e) = self.set_clock(vm).await {
                tracing::warn!(sandbox = %sb.id, error = %e.message, "could not set the guest's clock after the capture");
            }
        };
        let ((), snapshot) =
            tokio::join!(clock, self.finish_snapshot(sb, &layout, job, captured, ph));
        snapshot
    }

    /// While the VM is stopped: saves device state, freezes the disk's top layer and captures RAM.
    async fn freeze(
        &self,
        sb: &Sandbox,
        qmp: &kiln_vmm::Qmp,
        layout: &mut Layout,
        job: &Job<'_>,
        new_top: &Path,
        ph: &mut crate::timing::Phases,
    ) -> Result<Captured> {
        let (kind, tmp) = (job.req.kind, job.tmp);
        // The vCPUs are stopped and QEMU's block I/O drained, so owned RAM no longer changes: its copy
        // (from the RAM directory when it is there, checksummed in the same pass: never read back) runs
        // while the device state is saved and the disk frozen.
        let ram_copy = match (&layout.memory, kind.has_memory()) {
            (Memory::Owned { file, live }, true) => {
                let src = live.clone().unwrap_or_else(|| file.clone());
                let dst = tmp.join("memory");
                Some(tokio::task::spawn_blocking(move || {
                    fsutil::copy_with_checksum(&src, &dst)
                }))
            }
            _ => None,
        };
        // A privately mapped RAM (a sandbox resumed from a snapshot): the pages that differ from the file
        // it maps are read from the paused QEMU into a delta, while QEMU saves the state without them.
        let delta = match (&layout.memory, kind.has_memory() && memory_deltas()) {
            (
                Memory::Private {
                    base,
                    base_checksum,
                },
                true,
            ) => {
                let base = base.clone();
                let base_id = base_checksum.clone();
                let out = tmp.join(DELTA_FILE);
                let pid = job.pid;
                Some(tokio::task::spawn_blocking(move || {
                    let base_id = match base_id {
                        Some(id) => id,
                        None => fsutil::checksum(&base)?,
                    };
                    kiln_vmm::delta::capture(pid, &base, &base_id, &out, false)
                        .map_err(|e| Error::internal(format!("capturing the memory delta: {e}")))
                }))
            }
            _ => None,
        };
        // Taken first (milliseconds): if it fails, the state is saved with the RAM as before.
        let delta = match delta {
            Some(d) => match d
                .await
                .map_err(|e| Error::internal(e.to_string()))
                .and_then(|r| r)
            {
                Ok(stats) => Some(stats),
                Err(e) => {
                    tracing::warn!(sandbox = %sb.id, error = %e.message, "no memory delta; saving the RAM in the device state");
                    let _ = std::fs::remove_file(tmp.join(DELTA_FILE));
                    None
                }
            },
            None => None,
        };
        ph.mark("capture_delta");
        let frozen = self
            .freeze_device_and_disk(sb, qmp, layout, job, new_top, delta.is_some(), ph)
            .await;
        let copied = match ram_copy {
            Some(copy) => Some(
                copy.await
                    .map_err(|e| Error::internal(e.to_string()))
                    .and_then(|r| r.map_err(storage_error)),
            ),
            None => None,
        };
        let ramless = frozen?;
        let delta = match (delta, ramless) {
            (Some(stats), Some(_)) => {
                self.confine().seal(&tmp.join(DELTA_FILE))?;
                tracing::debug!(sandbox = %sb.id, data_pages = stats.data_pages, zero_pages = stats.zero_pages, ranges = stats.ranges, scan_ms = stats.scan_ms, ms = stats.total_ms, method = ?stats.method, "memory delta captured");
                Some(stats)
            }
            // The state holds the RAM after all (the filter fell back): no delta.
            (Some(_), None) => {
                let _ = std::fs::remove_file(tmp.join(DELTA_FILE));
                None
            }
            (None, _) => None,
        };
        let memory = match (copied, &layout.memory) {
            (Some(checksum), _) => {
                let checksum = checksum?;
                self.confine().seal(&tmp.join("memory"))?;
                CapturedMemory::Copied { checksum }
            }
            // QEMU migrates a privately mapped RAM block in full (only shared file-backed RAM can be
            // skipped), so the saved state already holds every page; the base is kept for the mapping.
            (
                None,
                Memory::Private {
                    base,
                    base_checksum,
                },
            ) if kind.has_memory() => CapturedMemory::OnBase {
                base: base.clone(),
                base_checksum: base_checksum.clone(),
                delta,
            },
            (None, _) => CapturedMemory::None,
        };
        ph.mark("capture_ram");
        Ok(Captured {
            memory,
            pause_ms: None,
            state_format: ramless.filter(|f| *f == StateFormat::Devices),
        })
    }

    /// `freeze` without the RAM: saves device state and switches the disk to its new top layer. Returns how
    /// a state without guest RAM was written (None: the state holds the RAM).
    // The capture's pieces are distinct borrows of the caller's state; bundling them would only move them.
    #[allow(clippy::too_many_arguments)]
    async fn freeze_device_and_disk(
        &self,
        sb: &Sandbox,
        qmp: &kiln_vmm::Qmp,
        layout: &mut Layout,
        job: &Job<'_>,
        new_top: &Path,
        without_ram: bool,
        ph: &mut crate::timing::Phases,
    ) -> Result<Option<StateFormat>> {
        let (kind, tmp) = (job.req.kind, job.tmp);
        let mut ramless = None;
        if kind.has_memory() && without_ram {
            // The guest RAM's pages are in the delta: the state is saved without them.
            match self
                .save_state_without_ram(sb, qmp, job.pid, &tmp.join("state"), SAVE_TIMEOUT)
                .await
            {
                Ok(format) => {
                    ramless = Some(format);
                    self.confine().seal(&tmp.join("state"))?;
                    ph.mark("save_state");
                }
                Err(e) => {
                    tracing::warn!(sandbox = %sb.id, error = %e.message, "saving the device state without RAM failed; saving it with RAM");
                }
            }
        }
        if kind.has_memory() && ramless.is_none() {
            // QEMU writes the file as the sandbox's user, which can only write in its own directory; the
            // result moves into the snapshot and is sealed read-only.
            let own = self.vm_file(sb, "snapshot.state")?;
            kiln_vmm::migration::save_state(qmp, &own, SAVE_TIMEOUT).await?;
            let moved = self.take_vm_file(sb, &own, &tmp.join("state"));
            let _ = std::fs::remove_file(&own);
            moved?;
            self.confine().seal(&tmp.join("state"))?;
            ph.mark("save_state");
        }
        // Freeze the disk: the new empty top layer takes the writes from now on; the old top is immutable.
        let node = format!("top{}", layout.generation);
        layout.disk_layers.push(Layer {
            path: new_top.to_path_buf(),
            format: "qcow2".into(),
            checksum: None,
        });
        // Recorded before QEMU switches: if kiln dies between the two, the recorded chain merely has an
        // empty layer over the one QEMU still writes (same contents). Recorded after, a crash in between
        // would leave QEMU writing a layer the record does not know, which the next snapshot would
        // recreate (same generation, same file name) under the running VM.
        let switched = async {
            self.db().set_layout(&sb.id, layout)?;
            let aio = kiln_vmm::qemu::disk_io(self.accel().accel).aio;
            qmp.add_overlay(new_top, &node, aio).await?;
            self.faults().hold("snapshot.overlay_added").await;
            qmp.switch_to_overlay("rootdisk", &node).await?;
            Ok::<(), Error>(())
        }
        .await;
        if let Err(e) = switched {
            layout.disk_layers.pop();
            let _ = self.db().set_layout(&sb.id, layout);
            return Err(e);
        }
        // The old top is immutable from now on and will be shared with the snapshot and its resumes.
        self.confine()
            .seal(&layout.disk_layers[layout.disk_layers.len() - 2].path)?;
        ph.mark("switch_overlay");
        Ok(ramless)
    }

    /// After the VM runs again: links and checksums the files, writes the manifest and moves the snapshot
    /// into place.
    async fn finish_snapshot(
        &self,
        sb: &Sandbox,
        layout: &Layout,
        job: Job<'_>,
        captured: Captured,
        ph: &mut crate::timing::Phases,
    ) -> Result<Snapshot> {
        let Job {
            pid: _,
            id,
            req,
            tmp,
            ephemeral,
        } = job;
        let mut layout = layout.clone();
        let frozen_top = layout.disk_layers.len() - 2;
        let mut files = Vec::new();
        let parent = match (&layout.origin, req.kind) {
            // Full and disk snapshots hold all their layers; only diff snapshots build on a parent.
            (_, SnapshotType::Full | SnapshotType::Disk) => None,
            (Origin::Template { name }, _) => Some(format!("template:{name}")),
            (Origin::Snapshot { id }, _) => Some(format!("snapshot:{id}")),
        };
        // A diff's parent snapshot stays (no deletion) until the diff's row exists; the diff is pinned to
        // the parent's content, which must be what this sandbox was made from.
        let _parent_in_use = match &layout.origin {
            Origin::Snapshot { id } if parent.is_some() => {
                Some(self.claim_use(id, ErrorCode::SnapshotBaseMissing)?)
            }
            _ => None,
        };
        let base_digest = match &parent {
            Some(p) => {
                let now = self.base_digest(p)?;
                if let Some(was) = layout.origin_digest.as_ref().filter(|was| **was != now) {
                    return Err(Error::new(
                        ErrorCode::SnapshotBaseChanged,
                        format!("sandbox {} was made from {p} with digest {was}, but {p} is now {now} (rebuilt, or deleted and its name reused), so a diff would build on a base it did not come from; take a `--type full` snapshot instead", sb.name),
                    ));
                }
                Some(now)
            }
            None => None,
        };
        let engine_files = FileCtx {
            tmp: tmp.to_path_buf(),
        };
        if req.kind.has_memory() {
            files.push(engine_files.internal(Role::State, "state", None)?);
        }
        ph.mark("base_digest");
        match captured.memory {
            CapturedMemory::None => {}
            CapturedMemory::Copied { checksum } => {
                // Copied while the VM was paused; made durable now that it runs again.
                fsutil::fsync_path(&tmp.join("memory"))?;
                files.push(engine_files.internal_known(Role::Memory, "memory", None, checksum)?)
            }
            CapturedMemory::OnBase {
                base,
                base_checksum,
                delta,
            } => {
                if delta.is_some() {
                    files.push(engine_files.internal(Role::MemoryDelta, DELTA_FILE, None)?);
                }
                let external_base = if req.kind == SnapshotType::Diff {
                    self.origin_memory(&layout.origin)?
                } else {
                    None
                };
                match external_base {
                    Some(entry) => files.push(entry),
                    None => {
                        fsutil::link_or_copy(&base, &tmp.join("memory"))?;
                        let checksum = match base_checksum {
                            Some(c) => c,
                            None => fsutil::checksum(&base)?,
                        };
                        files.push(engine_files.internal_known(
                            Role::Memory,
                            "memory",
                            None,
                            checksum,
                        )?);
                    }
                }
            }
        }
        ph.mark("memory_file");
        // Disk layers, bottom first. The layer frozen just now gets its checksum here, once.
        let top_sum = fsutil::checksum(&layout.disk_layers[frozen_top].path)?;
        layout.disk_layers[frozen_top].checksum = Some(top_sum);
        let external_layers = if req.kind != SnapshotType::Diff {
            0
        } else {
            layout.inherited_layers.min(frozen_top + 1)
        };
        let origin_disks = if external_layers > 0 {
            self.origin_disks(&layout.origin)?
        } else {
            Vec::new()
        };
        if req.kind == SnapshotType::Diff {
            self.faults().hold("snapshot.diff_based").await;
        }
        for (i, layer) in layout.disk_layers[..=frozen_top].iter().enumerate() {
            if i < external_layers {
                let entry = origin_disks.get(i).cloned().ok_or_else(|| {
                    Error::internal("origin has fewer disk layers than the sandbox inherited")
                })?;
                files.push(entry);
                continue;
            }
            let name = format!("disk-{i}.{}", layer.format);
            fsutil::link_or_copy(&layer.path, &tmp.join(&name))?;
            let checksum = match &layer.checksum {
                Some(c) => c.clone(),
                None => fsutil::checksum(&layer.path)?,
            };
            files.push(engine_files.internal_known(
                Role::Disk,
                &name,
                Some(layer.format.clone()),
                checksum,
            )?);
        }
        ph.mark("disk_files");
        // The same kernel and initrd (hard links) go into every snapshot: hashed once per daemon.
        for (role, name, src) in [
            (Role::Kernel, "kernel", &layout.kernel),
            (Role::Initrd, "initrd", &layout.initrd),
        ] {
            fsutil::link_or_copy(src, &tmp.join(name))?;
            let checksum = fsutil::checksum_immutable(&tmp.join(name))?;
            files.push(engine_files.internal_known(role, name, None, checksum)?);
        }
        ph.mark("kernel_initrd");
        self.db().set_layout(&sb.id, &layout)?;
        ph.mark("db_layout");

        let created_at = now_rfc3339();
        // Only saved state depends on the balloon's features: a disk snapshot boots a new machine.
        let depends = super::manifest::Depends {
            free_page_reporting: layout.free_page_reporting.filter(|_| req.kind.has_memory()),
            net_queues: layout
                .net_queues
                .filter(|n| *n > 1 && req.kind.has_memory()),
            ..super::compat::recorded(
                self.accel().accel,
                layout.firmware.as_deref(),
                layout.cpu.clone(),
                layout.machine_options(self.accel().accel),
            )
        };
        let manifest = Manifest {
            format_version: Manifest::format_for(
                &depends,
                layout.max_memory_mib,
                files.iter().any(|f| f.role == Role::MemoryDelta),
            ),
            id: id.to_string(),
            kind: req.kind,
            created_at: created_at.clone(),
            kiln_version: env!("CARGO_PKG_VERSION").to_string(),
            qemu_version: kiln_vmm::qemu_version(),
            machine: "microvm".into(),
            cpu_model: kiln_vmm::cpu::model(self.accel().accel),
            // The machine's own accelerator (a sandbox running under another than the daemon's now).
            accel: sb.accel.clone(),
            kernel_version: layout.kernel_version.clone(),
            firmware: layout.firmware.clone(),
            depends,
            cmdline: layout.cmdline.clone(),
            memory_mib: sb.memory_mib,
            cpus: sb.cpus,
            max_cpus: layout.max_cpus,
            max_memory_mib: layout.max_memory_mib,
            disk_size_bytes: sb.disk_size_bytes,
            source: Source {
                sandbox_id: sb.id.clone(),
                sandbox_name: sb.name.clone(),
                hostname: sb.hostname.clone(),
                template: sb.template.clone(),
                env: sb.env.clone(),
                mac: sb.mac.clone(),
                egress: sb.egress,
                ports: sb.ports.clone(),
                image_digest: self.image_digest(&sb.template),
                address: sb.address.clone(),
            },
            parent: parent.clone(),
            base_digest,
            labels: req.labels.clone(),
            files,
            state_format: captured.state_format,
            volume_slots: layout.volume_slots.clone(),
        };
        // Every file's data is durable before the manifest vouches for it (hard-linked layers may still
        // hold QEMU's unflushed writes in the page cache).
        fsutil::fsync_files_in(tmp)?;
        ph.mark("fsync_files");
        manifest.write(tmp)?;
        ph.mark("manifest");
        let dir = self.config().snapshot_dir(id);
        self.faults().hold("snapshot.written").await;
        fsutil::publish(tmp, &dir)?;
        ph.mark("publish");
        let snapshot = Snapshot {
            id: id.to_string(),
            sandbox_id: sb.id.clone(),
            sandbox_name: sb.name.clone(),
            kind: req.kind,
            parent,
            template: sb.template.clone(),
            memory_mib: sb.memory_mib,
            cpus: sb.cpus,
            disk_size_bytes: sb.disk_size_bytes,
            size_bytes: fsutil::dir_allocated_bytes(&dir),
            labels: req.labels.clone(),
            restored: false,
            restored_at: None,
            created_at,
            warm_spares: 0,
            names: Vec::new(),
            expires_at: None,
            max_memory_mib: layout.max_memory_mib,
            pause_ms: captured.pause_ms,
            template_snapshot: None,
        };
        if let Err(e) = self.db().insert_snapshot(&snapshot, ephemeral) {
            let _ = fsutil::remove_dir_durably(&dir);
            return Err(e);
        }
        ph.mark("db_insert");
        self.mark_verified(id);
        Ok(snapshot)
    }

    /// The memory base of a sandbox's origin snapshot, as an external entry for a diff snapshot.
    fn origin_memory(&self, origin: &Origin) -> Result<Option<FileEntry>> {
        let Origin::Snapshot { id } = origin else {
            return Ok(None);
        };
        let dir = self.config().snapshot_dir(id);
        let Ok(m) = Manifest::read(&dir, id) else {
            return Ok(None);
        };
        Ok(m.file(Role::Memory).map(|f| m.external(&dir, f)))
    }

    /// The disk layers of a sandbox's origin (template rootfs, or a snapshot's layers), as external entries.
    fn origin_disks(&self, origin: &Origin) -> Result<Vec<FileEntry>> {
        match origin {
            Origin::Template { name } => {
                let image = self.images().get(name).map_err(|e| {
                    Error::new(ErrorCode::SnapshotBaseMissing, format!("the template '{name}' this sandbox was made from is gone ({e}); take a full snapshot instead"))
                })?;
                Ok(vec![FileEntry::template_rootfs(&image)])
            }
            Origin::Snapshot { id } => {
                let dir = self.config().snapshot_dir(id);
                if self.db().find_snapshot(id)?.is_none() {
                    return Err(Error::new(
                        ErrorCode::SnapshotBaseMissing,
                        format!("this sandbox came from snapshot '{id}', which was deleted, so a diff has no base; take a `--type full` snapshot instead"),
                    ));
                }
                let m = Manifest::read(&dir, id).map_err(|e| {
                    Error::new(ErrorCode::SnapshotBaseMissing, format!("the snapshot '{id}' this sandbox came from is unusable ({}); take a full snapshot instead", e.message))
                })?;
                Ok(m.disks().map(|f| m.external(&dir, f)).collect())
            }
        }
    }
}

/// What is being written, for `finish_snapshot`.
struct Job<'a> {
    /// The source's QEMU.
    pid: u32,
    id: &'a str,
    req: &'a CreateSnapshot,
    tmp: &'a Path,
    ephemeral: bool,
}

struct Captured {
    memory: CapturedMemory,
    /// How long the guest stood still (set once it runs again).
    pause_ms: Option<u64>,
    /// Recorded in the manifest (None: a migration stream).
    state_format: Option<StateFormat>,
}

enum CapturedMemory {
    None,
    Copied {
        checksum: String,
    },
    OnBase {
        base: PathBuf,
        base_checksum: Option<String>,
        /// The pages that differ from `base`, in `DELTA_FILE` (None: the state holds them).
        delta: Option<kiln_vmm::delta::Stats>,
    },
}

/// A snapshot's memory delta file.
pub(crate) const DELTA_FILE: &str = "memory.delta";

/// Memory deltas are on unless `KILN_MEMORY_DELTA=0` (the previous path, full private RAM in the state,
/// for comparisons).
pub(crate) fn memory_deltas() -> bool {
    std::env::var("KILN_MEMORY_DELTA").map_or(true, |v| v != "0")
}

struct FileCtx {
    tmp: PathBuf,
}

impl FileCtx {
    fn internal(&self, role: Role, name: &str, format: Option<String>) -> Result<FileEntry> {
        let checksum = fsutil::checksum(&self.tmp.join(name))?;
        self.internal_known(role, name, format, checksum)
    }

    fn internal_known(
        &self,
        role: Role,
        name: &str,
        format: Option<String>,
        checksum: String,
    ) -> Result<FileEntry> {
        let size = std::fs::metadata(self.tmp.join(name))
            .map_err(|e| fsutil::io_error(name, e))?
            .len();
        Ok(FileEntry {
            role,
            path: name.to_string(),
            size,
            checksum,
            format,
            external: false,
        })
    }
}

pub(crate) fn storage_error(e: kiln_vmm::VmmError) -> Error {
    let text = e.to_string();
    if text.contains("No space left") || text.contains("os error 28") {
        Error::new(
            ErrorCode::InsufficientStorage,
            format!(
                "{text}: the disk holding kiln's data directory is full; free space and try again"
            ),
        )
    } else {
        Error::internal(text)
    }
}

/// QEMU refuses to save a VM that is still paused from an earlier save (`postmigrate`: a snapshot taken
/// with `leave_paused`): its disks are handed off until the guest runs again. Found by `make fuzz`.
pub(crate) fn require_saveable(sb: &Sandbox, qemu_status: &str) -> Result<()> {
    if qemu_status == "postmigrate" {
        return Err(Error::new(
            ErrorCode::SandboxNotRunning,
            format!(
                "sandbox {} is still paused by the snapshot that left it paused; resume it (`kiln resume {}`) before snapshotting, forking or stopping it again",
                sb.name, sb.name
            ),
        ));
    }
    Ok(())
}
