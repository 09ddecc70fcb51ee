//! Bringing snapshots back: as new sandboxes (resume / fork), or into their source's identity (roll back).
//! Also listing and deleting snapshots.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use tracing::{info, warn};
use utoipa::ToSchema;

use super::manifest::{Manifest, Role};
use super::{Snapshot, SnapshotType};
use crate::capacity::Reservation;
use crate::engine::Engine;
use crate::error::{Error, ErrorCode, Result};
use crate::fsutil;
use crate::ids;
use crate::layout::{Layer, Layout, Memory, Origin, VolumeSlot, VOLUME_SLOTS};
use crate::machine::{create_top_layer, Incoming, NewIdentity};
use crate::model::{now_rfc3339, Sandbox, SandboxState};
use crate::validate;

/// Recorded as the error of a sandbox while it is rolled back (state `creating`), so that a restart after a
/// crash tells a roll back (the sandbox existed before: keep it, as failed) from a new sandbox (remove it).
pub(crate) const RESTORING_MARK: &str = "being restored from snapshot ";

/// Options for a new sandbox made from a snapshot.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ResumeSnapshot {
    pub name: Option<String>,
    /// Memory snapshots may grow up to the headroom their machine was created with (`max_memory_mib`),
    /// never shrink (else `resource_override_refused`); disk snapshots boot with this.
    pub memory_mib: Option<u64>,
    /// vCPUs online in the copy: for memory snapshots from 1 up to the vCPUs its machine has (`max_cpus`
    /// of the snapshot, set by `kiln serve --max-vcpus`), continuing the same processes.
    pub cpus: Option<u32>,
    /// Disk size in GiB (disk snapshots only; at least the snapshot's).
    pub disk_size_gib: Option<u64>,
    #[serde(default, alias = "metadata")]
    pub labels: BTreeMap<String, String>,
    /// Volumes to attach. Absent: the volumes the snapshot's source had are remounted where they are free
    /// (read-only ones always, a read-write one when no other sandbox has it); `[]` attaches none.
    #[serde(default)]
    pub volumes: Option<Vec<crate::volume::VolumeMount>>,
    /// Let the guest open connections out; default: as the snapshot's source sandbox had it.
    pub egress: Option<bool>,
    /// The private network the copy joins under bridged networking (docs/networking.md); default none.
    /// Forks join their source's.
    pub network: Option<String>,
    /// Environment for commands run in the new sandbox, merged over the snapshot's (processes already
    /// running in the snapshot keep their own).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Seconds of life of the new sandbox (renewable); then `on_timeout` applies. Nothing is inherited.
    pub timeout: Option<u64>,
    /// Seconds without use; then `on_timeout` applies.
    pub idle_timeout: Option<u64>,
    /// `hibernate` (default) or `delete`.
    pub on_timeout: Option<crate::lifetime::OnTimeout>,
    /// Start it again when a client uses it while hibernated (default true with a lifetime).
    pub auto_resume: Option<bool>,
    /// Set by a create from a template (template_snap.rs): the copy becomes that template's sandbox, with
    /// the request's published ports.
    #[serde(skip)]
    pub(crate) from_template: Option<crate::template_snap::TemplateUse>,
}

/// Result of deleting a snapshot.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct SnapshotDeleted {
    pub id: String,
    /// Sandboxes still running on this snapshot's memory or disk; its files stay until the last is gone.
    pub files_kept_for: Vec<String>,
}

impl Engine {
    /// A snapshot by id or by any of its names (snapshot/names.rs).
    pub fn get_snapshot(&self, id_or_name: &str) -> Result<Snapshot> {
        let id = self.resolve_snapshot(id_or_name)?;
        self.db()
            .find_snapshot(&id)?
            .map(|s| self.with_spares(s))
            .ok_or_else(|| Error::snapshot_not_found(id_or_name))
    }

    pub(crate) fn with_spares(&self, snap: Snapshot) -> Snapshot {
        let snap = self.present_parent(snap);
        Snapshot {
            warm_spares: self.warm_pool().ready_for(&snap.id),
            names: self.db().snapshot_names(&snap.id).unwrap_or_default(),
            expires_at: self.snapshot_expires_at(&snap.id),
            ..snap
        }
    }

    pub fn list_snapshots(
        &self,
        sandbox: Option<&str>,
        labels: &BTreeMap<String, String>,
    ) -> Result<Vec<Snapshot>> {
        // Filter by id or name of the source; the source may be gone, so compare with the stored fields.
        Ok(self
            .db()
            .list_snapshots()?
            .into_iter()
            .filter(|s| sandbox.is_none_or(|f| s.sandbox_id == f || s.sandbox_name == f))
            .filter(|s| s.matches_labels(labels))
            // Template snapshots are kiln's own (template_snap.rs).
            .filter(|s| !s.labels.contains_key(crate::template_snap::LABEL))
            .map(|s| self.with_spares(s))
            .collect())
    }

    /// Reads and checks a snapshot before any VM starts: the manifest always, file sizes always, and
    /// checksums of every file the first time this daemon uses the snapshot.
    pub(crate) fn load_manifest(&self, id: &str) -> Result<(Snapshot, Manifest)> {
        let snap = self.get_snapshot(id)?;
        let dir = self.config().snapshot_dir(id);
        let manifest = Manifest::read(&dir, id)?;
        super::compat::check(&manifest, &super::compat::Host::this(self.accel().accel))?;
        if let Some(n) = manifest.depends.net_queues.filter(|n| *n > 1) {
            if self.bridge().is_none() && manifest.kind.has_memory() {
                return Err(crate::net::queues_refused(
                    &format!("snapshot {id}"),
                    n as usize,
                ));
            }
        }
        self.check_base_pin(&manifest)?;
        // A template snapshot's files, unchanged since a deep check (template_gc.rs), are not re-hashed.
        let template = snap.labels.contains_key(crate::template_snap::LABEL);
        let verified = self.is_verified(id);
        let unchanged =
            !verified && template && crate::template_gc::unchanged_since_verified(&dir, &manifest);
        let deep = !verified && !unchanged;
        if deep {
            tracing::debug!(snapshot = id, "reading every checksum of the snapshot");
        } else if unchanged {
            tracing::debug!(
                snapshot = id,
                "template snapshot files unchanged since verified; checksums not read again"
            );
        }
        manifest.verify(&dir, deep)?;
        // The device state is small: checked every time, so a torn or damaged one is `snapshot_corrupt`
        // and never reaches QEMU (whose load errors then mean something else).
        if !deep {
            manifest.verify_state(&dir)?;
        }
        if deep && template {
            crate::template_gc::record_verified(&dir, &manifest);
        }
        self.mark_verified(id);
        Ok((snap, manifest))
    }

    /// Lays out a sandbox directory from a snapshot: links to its kernel, disk layers and RAM base, and a
    /// fresh writable top layer. Returns the layout and the incoming state to load (None for disk snapshots).
    pub(crate) fn provision_from_snapshot(
        &self,
        sb: &Sandbox,
        snap_id: &str,
        m: &Manifest,
        cmdline: String,
        mounts: &[crate::volume::VolumeMount],
    ) -> Result<(Layout, Option<Incoming>)> {
        let snap_dir = self.config().snapshot_dir(snap_id);
        let dir = self.config().sandbox_dir(&sb.id);
        std::fs::create_dir_all(dir.join("layers"))
            .map_err(|e| fsutil::io_error(&format!("creating {}", dir.display()), e))?;
        self.own_sandbox_dir(sb)?;
        crate::template_snap::seed_console(&snap_dir, snap_id, &sb.id, &dir);
        let need = |role: Role| {
            m.file(role).ok_or_else(|| {
                Error::new(
                    ErrorCode::SnapshotCorrupt,
                    format!("snapshot {snap_id} has no {role:?} file"),
                )
            })
        };
        let kernel = dir.join("kernel");
        fsutil::link_or_copy(&m.resolve(&snap_dir, need(Role::Kernel)?), &kernel)?;
        let initrd = dir.join("initrd");
        fsutil::link_or_copy(&m.resolve(&snap_dir, need(Role::Initrd)?), &initrd)?;
        // Kernel and initrd may be a template's files (world-readable, left as they are).
        self.confine().make_readable(&kernel)?;
        self.confine().make_readable(&initrd)?;
        let mut layers = Vec::new();
        for (i, f) in m.disks().enumerate() {
            let format = f.format.clone().unwrap_or_else(|| "qcow2".into());
            let path = dir.join(format!("layers/{i}.{format}"));
            fsutil::link_or_copy(&m.resolve(&snap_dir, f), &path)?;
            self.confine().make_readable(&path)?;
            layers.push(Layer {
                path,
                format,
                checksum: Some(f.checksum.clone()),
            });
        }
        let inherited = layers.len();
        // A memory snapshot's machine keeps its RAM and balloon; a disk snapshot boots a new machine,
        // keeping the headroom where it is still above the memory asked for.
        // A disk snapshot whose machine had headroom (its image has the balloon driver) gets at least the
        // daemon's default for the memory it boots with.
        let max_memory_mib = if m.kind.has_memory() {
            m.max_memory_mib
        } else {
            m.max_memory_mib
                .map(|max| {
                    max.max(
                        crate::headroom::default_max(self.config().memory_headroom, sb.memory_mib)
                            .unwrap_or(0),
                    )
                })
                .filter(|max| *max > sb.memory_mib)
        };
        let mut delta = None;
        let memory = if m.kind.has_memory() {
            let base = dir.join("memory.base");
            let f = need(Role::Memory)?;
            fsutil::link_or_copy(&m.resolve(&snap_dir, f), &base)?;
            // Read by the daemon (never by QEMU) after the state is loaded.
            delta = m
                .file(Role::MemoryDelta)
                .map(|d| crate::machine::IncomingDelta {
                    file: m.resolve(&snap_dir, d),
                    base: base.clone(),
                    base_id: f.checksum.clone(),
                });
            // Mapped privately: QEMU falls back to opening it read-only, and guest writes stay in its
            // own anonymous memory.
            self.confine().seal(&base)?;
            Memory::Private {
                base,
                base_checksum: Some(f.checksum.clone()),
            }
        } else {
            self.owned_memory(sb, max_memory_mib.unwrap_or(sb.memory_mib))?
        };
        // A memory snapshot's machine keeps its device set (None: one from before it was recorded); a
        // disk snapshot boots a new machine.
        let machine = if m.kind.has_memory() {
            m.depends.machine_options.clone()
        } else {
            Some(kiln_vmm::qemu::machine_for_boot(
                self.accel().accel,
                &cmdline,
            ))
        };
        let mut layout = Layout {
            firmware: m.firmware.clone(),
            kernel,
            initrd,
            kernel_version: m.kernel_version.clone(),
            cmdline,
            disk_layers: layers,
            memory,
            origin: Origin::Snapshot {
                id: snap_id.to_string(),
            },
            inherited_layers: inherited,
            generation: 0,
            // A memory snapshot's machine keeps its slots (its guest may still mount stale volumes in
            // them); a disk snapshot boots a fresh machine.
            volume_slots: if m.kind.has_memory() {
                m.volume_slots
                    .iter()
                    .map(VolumeSlot::in_restored_copy)
                    .collect()
            } else {
                vec![VolumeSlot::Empty; VOLUME_SLOTS]
            },
            origin_digest: Some(self.base_digest(&format!("snapshot:{snap_id}"))?),
            // A memory snapshot's machine keeps its vCPUs; a disk snapshot boots a new machine.
            max_cpus: if m.kind.has_memory() {
                Some(m.max_cpus.unwrap_or(m.cpus))
            } else {
                Some(self.machine_max_cpus(sb.cpus))
            },
            max_memory_mib,
            // A memory snapshot's guest keeps the CPU (and TSC frequency) it saw; a disk snapshot boots
            // on this host's.
            cpu: if m.kind.has_memory() {
                m.depends.cpu_identity.clone()
            } else {
                kiln_vmm::cpu::identity(self.accel().accel)
            },
            machine,
            // A memory snapshot's machine keeps its balloon as it was (None: from before reporting).
            free_page_reporting: if m.kind.has_memory() {
                m.depends.free_page_reporting
            } else {
                Some(crate::machine::free_page_reporting())
            },
            // A memory snapshot's NIC keeps its queues; a disk snapshot boots a new machine.
            net_queues: if m.kind.has_memory() {
                m.depends.net_queues
            } else {
                crate::net::boot_queues(self.bridge().is_some(), sb.cpus)
            },
        };
        self.place_mounts(
            &dir,
            sb.qemu_uid,
            &mut layout.volume_slots,
            mounts,
            m.kind.has_memory(),
        )?;
        let below = layout.top().cloned().ok_or_else(|| {
            Error::new(
                ErrorCode::SnapshotCorrupt,
                format!("snapshot {snap_id} has no disk"),
            )
        })?;
        let top = layout.next_top_path(&dir);
        create_top_layer(&top, &below, sb.disk_size_bytes)?;
        self.confine().own_file(&top, sb.qemu_uid)?;
        layout.disk_layers.push(Layer {
            path: top,
            format: "qcow2".into(),
            checksum: None,
        });
        let incoming = m.kind.has_memory().then(|| Incoming {
            state: snap_dir.join(m.file(Role::State).map_or("state", |f| f.path.as_str())),
            resume: true,
            identity: Some(NewIdentity {
                hostname: sb.hostname.clone(),
                mac: Some(sb.mac.clone()),
            }),
            ram_fill: None,
            delta,
        });
        Ok((layout, incoming))
    }

    /// A new sandbox that continues from the snapshot (memory snapshots) or boots from its disk.
    pub async fn resume_snapshot(&self, id_or_name: &str, req: ResumeSnapshot) -> Result<Sandbox> {
        self.config().check_storage("create a sandbox")?;
        let id = self.resolve_snapshot(id_or_name)?;
        self.resume_within(&id, req, None).await
    }

    /// `resume_snapshot`, counted against `held` capacity (a fork reserves for all its children at once)
    /// or, without it, against a reservation of its own.
    pub(crate) async fn resume_within(
        &self,
        id: &str,
        req: ResumeSnapshot,
        held: Option<&Reservation>,
    ) -> Result<Sandbox> {
        validate::labels(&req.labels)?;
        self.check_network(req.network.as_deref())?;
        validate::env(&req.env)?;
        if let Some(name) = &req.name {
            validate::name("sandbox", name)?;
        }
        let mut ph = crate::timing::Phases::new("resume", id);
        let (_, m) = self.load_manifest(id)?;
        ph.mark("manifest");
        // Kept from deletion while its files are linked into the new sandbox.
        let _in_use = self.claim_use(id, ErrorCode::SnapshotNotFound)?;
        let (memory_mib, cpus, disk_size_bytes) = self.resume_resources(&m, &req)?;
        // A fork's children come from a capture made for them alone: no spares there.
        // Volumes not given: remount the source's (decided under the volume lock below). A copy with
        // volumes is never a warm spare.
        let remount = req.volumes.is_none() && !self.source_mounts(&m).is_empty();
        let keep_warm = held.is_none() && m.kind.has_memory() && !remount;
        // Spares run with the snapshot's own resources.
        if keep_warm && (memory_mib, cpus) == (m.memory_mib, m.cpus) {
            if let Some(claimed) = self.claim_spare(id, &m, &req).await {
                if claimed.is_ok() {
                    self.schedule_spare(id);
                }
                return claimed;
            }
        }
        let own = match held {
            Some(_) => None,
            None => Some(self.reserve(1, memory_mib).await?),
        };
        let sb_id = ids::new_id("sb");
        let name = req.name.clone().unwrap_or_else(|| sb_id.clone());
        let hostname = name.replace('_', "-");
        let mut sb = Sandbox {
            id: sb_id.clone(),
            name: name.clone(),
            memory_mib,
            cpus,
            disk_size_bytes,
            labels: req.labels.clone(),
            hostname: hostname.clone(),
            mac: ids::new_mac(),
            volumes: req.volumes.clone().unwrap_or_default(),
            egress: req.egress.unwrap_or(m.source.egress),
            network: req.network.clone(),
            env: m
                .source
                .env
                .clone()
                .into_iter()
                .chain(req.env.clone())
                .collect(),
            ..self.record_from_manifest(&m, id)?
        };
        if let Some(t) = &req.from_template {
            sb.origin = format!("template:{}", t.template);
            sb.template = t.template.clone();
            sb.ports = t.ports.clone();
            self.check_host_ports_free("", &sb.ports)?;
        }
        let mut notes = Vec::new();
        {
            let _volumes = self.volume_lock().await;
            if remount {
                (sb.volumes, notes) = self.remount_plan(&m);
            }
            self.check_mounts(&sb.volumes)?;
            // Its share of the capacity is released as its row appears: it never counts twice.
            match (own, held) {
                (Some(own), _) => own.record(|| self.db().insert_sandbox(&sb))?,
                (None, Some(held)) => held.record_one(|| self.db().insert_sandbox(&sb))?,
                (None, None) => self.db().insert_sandbox(&sb)?,
            }
            self.db().set_attachments(&sb.id, &sb.volumes)?;
        }
        let slot = self.slot(&sb.id);
        let _guard = slot.op.write().await;
        let cmdline = with_hostname(&m.cmdline, &hostname, disk_size_bytes > m.disk_size_bytes);
        let started = async {
            ph.mark("record");
            let (layout, incoming) =
                self.provision_from_snapshot(&sb, id, &m, cmdline, &sb.volumes)?;
            self.db().set_layout(&sb.id, &layout)?;
            ph.mark("provision");
            let booted = incoming.is_none();
            let max_cpus = layout.max_cpus.unwrap_or(m.cpus);
            let vm = self.start_vm(&sb, &layout, incoming).await?;
            if booted {
                // A disk snapshot boots fresh: a new machine, like a template boot.
                let identity = NewIdentity {
                    hostname: sb.hostname.clone(),
                    mac: None,
                };
                self.after_boot(&sb, &vm, &layout, Some(&identity)).await?;
            } else if cpus != m.cpus {
                super::resources::set_online_cpus(&vm, cpus, max_cpus).await?;
            }
            ph.mark("start_vm");
            Ok::<_, Error>(vm)
        };
        match started.await {
            Ok(vm) => {
                let pid = vm.pid;
                *slot.vm.lock().await = Some(vm);
                self.db()
                    .set_state(&sb.id, SandboxState::Running, Some(pid), None)?;
                info!(sandbox = %sb.id, snapshot = id, "sandbox resumed from snapshot");
                if keep_warm {
                    self.schedule_spare(id);
                }
                let mut resumed = self.get(&sb.id)?;
                resumed.volume_notes = notes;
                Ok(resumed)
            }
            Err(e) => {
                warn!(sandbox = %sb.id, snapshot = id, error = %e, "resume failed");
                // Nothing of a failed resume is worth keeping: remove the row and the files.
                self.remove_sandbox_files(&sb.id);
                self.db().delete_sandbox(&sb.id)?;
                Err(Error::new(
                    e.code,
                    format!("resuming snapshot {id} failed: {}", e.message),
                ))
            }
        }
    }

    /// A new sandbox record for the machine a snapshot holds: the source's identity and resources, in state
    /// `creating`. Callers override what differs (a resumed copy gets its own id, name and MAC).
    pub(crate) fn record_from_manifest(&self, m: &Manifest, snap_id: &str) -> Result<Sandbox> {
        let now = now_rfc3339();
        Ok(Sandbox {
            id: m.source.sandbox_id.clone(),
            name: m.source.sandbox_name.clone(),
            template: m.source.template.clone(),
            state: SandboxState::Creating,
            memory_mib: m.memory_mib,
            cpus: m.cpus,
            disk_size_bytes: m.disk_size_bytes,
            env: m.source.env.clone(),
            labels: BTreeMap::new(),
            // The same guest ports, each on a host port of its own (the source keeps its own).
            ports: m
                .source
                .ports
                .iter()
                .map(|p| crate::model::PortMapping {
                    host: 0,
                    guest: p.guest,
                    auto: true,
                })
                .collect(),
            hostname: m.source.hostname.clone(),
            mac: m.source.mac.clone(),
            accel: self.accel().accel.to_string(),
            pid: None,
            error: None,
            created_at: now.clone(),
            updated_at: now,
            origin: format!("snapshot:{snap_id}"),
            restored_from: None,
            forked_from: None,
            volumes: Vec::new(),
            egress: m.source.egress,
            qemu_uid: self.new_qemu_uid()?,
            confined: false,
            volume_notes: Vec::new(),
            lifetime: None,
            checkpoint_policy: None,
            max_memory_mib: None,
            boot: None,
            network: None,
            // What the saved guest is configured with (see net/: a copy gets its own).
            address: m.source.address.clone(),
            address6: None,
        })
    }

    fn resume_resources(&self, m: &Manifest, req: &ResumeSnapshot) -> Result<(u64, u32, u64)> {
        if m.kind == SnapshotType::Disk {
            let memory = req.memory_mib.unwrap_or(m.memory_mib);
            let cpus = req.cpus.unwrap_or(m.cpus);
            validate::range(
                "memory",
                memory,
                crate::engine::MIN_MEMORY_MIB,
                crate::engine::MAX_MEMORY_MIB,
                " MiB",
            )?;
            validate::range("cpus", u64::from(cpus), 1, crate::engine::MAX_CPUS, "")?;
            let disk = match req.disk_size_gib {
                Some(gib) => {
                    validate::range("disk size", gib, 1, crate::engine::MAX_DISK_GIB, " GiB")?;
                    if gib << 30 < m.disk_size_bytes {
                        return Err(Error::invalid(format!(
                            "disk size {gib} GiB is smaller than the snapshot's {} bytes",
                            m.disk_size_bytes
                        )));
                    }
                    gib << 30
                }
                None => m.disk_size_bytes,
            };
            return Ok((memory, cpus, disk));
        }
        let (memory, cpus) = super::resources::for_memory_snapshot(m, req.memory_mib, req.cpus)?;
        if req
            .disk_size_gib
            .is_some_and(|g| g << 30 != m.disk_size_bytes)
        {
            return Err(Error::invalid("the disk size of a memory snapshot cannot change on resume; take a `--type disk` snapshot"));
        }
        Ok((memory, cpus, m.disk_size_bytes))
    }

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

    /// Deletes a snapshot. Refused while diff snapshots build on it; sandboxes resumed from it keep
    /// running on their own hard links to its files (reported in the answer).
    pub async fn delete_snapshot(&self, id_or_name: &str) -> Result<SnapshotDeleted> {
        self.delete_snapshot_with(id_or_name, false).await
    }

    /// `delete_snapshot`; with `unless_restored` (smolvm's rule) also refused while a sandbox rolled back
    /// to it is running or paused.
    pub async fn delete_snapshot_with(
        &self,
        id_or_name: &str,
        unless_restored: bool,
    ) -> Result<SnapshotDeleted> {
        let snap = self.get_snapshot(id_or_name)?;
        let id = snap.id.as_str();
        // Refused while a diff is being built on it or it is being resumed or restored; diffs being built
        // or resumes starting after this see it as deleted.
        let _deleting = self.claim_delete(id)?;
        if unless_restored {
            // No restore can start or be under way now (the delete claim excludes them).
            let live = self.db().list_sandboxes()?.into_iter().find(|s| {
                s.restored_from.as_deref() == Some(id)
                    && matches!(s.state, SandboxState::Running | SandboxState::Paused)
            });
            if let Some(sb) = live {
                return Err(Error::new(
                    ErrorCode::SnapshotInUse,
                    format!(
                        "snapshot {id} is restored into sandbox {}, which is {}; stop and delete {} first",
                        sb.name,
                        sb.state.as_str(),
                        sb.name
                    ),
                ));
            }
        }
        self.discard_spares(Some(id)).await;
        let users: Vec<String> = self
            .db()
            .list_sandboxes()?
            .into_iter()
            .filter(|s| {
                s.origin == format!("snapshot:{id}") || s.restored_from.as_deref() == Some(id)
            })
            .map(|s| s.name)
            .collect();
        let dir = self.config().snapshot_dir(id);
        let trash = self
            .config()
            .snapshots_dir()
            .join(format!(".trash-{id}-{}", std::process::id()));
        if dir.exists() {
            fsutil::rename_durably(&dir, &trash)?;
        }
        self.faults().hold("snapshot.deleting").await;
        self.db().delete_snapshot(&snap.id)?;
        let _ = fsutil::remove_dir_durably(&trash);
        self.forget_verified(id);
        info!(snapshot = id, kept_for = users.len(), "snapshot deleted");
        self.template_user_gone(snap.template_snapshot.as_deref());
        Ok(SnapshotDeleted {
            id: snap.id,
            files_kept_for: users,
        })
    }

    /// Snapshot directories that are not (or no longer) whole, recorded snapshots: half-written ones
    /// (`.tmp-*`), interrupted deletions (`.trash-*`), fork captures (marked ephemeral), and directories
    /// without a record. With `skip_own` (a running daemon looking at itself), work in progress of this
    /// process and fork captures (which their fork removes) are left out.
    pub(crate) fn snapshot_debris(&self, skip_own: bool) -> Vec<SnapshotDebris> {
        let own = format!("-{}", std::process::id());
        let mut out = Vec::new();
        for entry in std::fs::read_dir(self.config().snapshots_dir())
            .into_iter()
            .flatten()
            .flatten()
        {
            let name = entry.file_name().to_string_lossy().into_owned();
            let path = entry.path();
            if name.starts_with(".tmp-") || name.starts_with(".trash-") {
                if !(skip_own && name.ends_with(&own)) {
                    out.push(SnapshotDebris::Interrupted(path));
                }
                continue;
            }
            if path.join(crate::recovery::EPHEMERAL_MARK).exists() {
                if !skip_own {
                    out.push(SnapshotDebris::Interrupted(path));
                }
                continue;
            }
            if matches!(self.db().find_snapshot(&name), Ok(None)) {
                let checked =
                    Manifest::read(&path, &name).and_then(|m| m.verify(&path, true).map(|()| m));
                out.push(match checked {
                    Ok(m) => SnapshotDebris::Unrecorded(path, Box::new(m)),
                    Err(e) => SnapshotDebris::Incomplete(path, e.message),
                });
            }
        }
        out
    }

    pub(crate) fn clean_debris(&self, d: &SnapshotDebris) {
        match d {
            SnapshotDebris::Interrupted(path) => {
                // The row goes too: a deletion (`.trash-ID-PID`) was past its point of no return, and a
                // fork capture's children hold their own links to its files.
                let name = path
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                let recorded = match name.strip_prefix(".trash-") {
                    Some(rest) => rest.rsplit_once('-').map(|(id, _pid)| id.to_string()),
                    None if path.join(crate::recovery::EPHEMERAL_MARK).exists() => Some(name),
                    None => None,
                };
                if let Some(id) = recorded {
                    if let Err(e) = self.db().delete_snapshot(&id) {
                        warn!(snapshot = %id, error = %e, "could not remove the record of a snapshot being deleted");
                    }
                }
                warn!(path = %path.display(), "removing debris of an interrupted snapshot operation");
                let _ = fsutil::remove_dir_durably(path);
            }
            SnapshotDebris::Unrecorded(path, m) => {
                let snap = crate::recovery::snapshot_from_manifest(m, path);
                if self.db().insert_snapshot(&snap, false).is_ok() {
                    info!(snapshot = %m.id, "recorded a snapshot completed just before kiln stopped");
                }
            }
            SnapshotDebris::Incomplete(path, error) => {
                // Not provably worthless (it may be the only copy of something): quarantined, not deleted.
                let name = path
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                match self.to_lost_found("snapshots", path, &name) {
                    Ok(dest) => {
                        warn!(path = %path.display(), to = %dest.display(), %error, "moved an unrecorded snapshot that fails verification to lost+found")
                    }
                    Err(e) => {
                        warn!(path = %path.display(), %error, move_error = %e, "an unrecorded snapshot fails verification and could not be moved to lost+found; left in place")
                    }
                }
            }
        }
    }

    /// Removes a sandbox's directory and cgroup (its VM must be gone).
    pub(crate) fn remove_sandbox_files(&self, id: &str) {
        self.confine().remove_cgroup(id);
        self.ram().remove(id);
        let dir = self.config().sandbox_dir(id);
        crate::console::remove(&crate::console::ring_path(&crate::vm::vm_name(id), &dir));
        if let Err(e) = fsutil::remove_dir_durably(&dir) {
            warn!(dir = %dir.display(), error = %e, "could not remove sandbox directory");
        }
    }
}

/// A snapshot directory without a record.
pub(crate) enum SnapshotDebris {
    /// `.tmp-*` / `.trash-*`: a capture or deletion that did not finish.
    Interrupted(std::path::PathBuf),
    /// Complete and intact: moved into place just before kiln stopped, so it gets recorded.
    Unrecorded(std::path::PathBuf, Box<Manifest>),
    /// Fails its checks; the error says how.
    Incomplete(std::path::PathBuf, String),
}

/// The snapshot's kernel command line with another hostname (and the resize flag for grown disks).
pub(crate) fn with_hostname(cmdline: &str, hostname: &str, resize: bool) -> String {
    let mut parts: Vec<String> = cmdline
        .split_whitespace()
        .filter(|p| !p.starts_with("kiln.hostname=") && !p.starts_with("kiln.resize="))
        .map(str::to_string)
        .collect();
    parts.push(format!("kiln.hostname={hostname}"));
    if resize {
        parts.push("kiln.resize=1".into());
    }
    parts.join(" ")
}

#[cfg(test)]
mod tests {
    #[test]
    fn hostname_is_replaced_in_cmdline() {
        assert_eq!(
            super::with_hostname("console=ttyS0 kiln.hostname=old quiet", "new", false),
            "console=ttyS0 quiet kiln.hostname=new"
        );
        assert!(super::with_hostname("a kiln.resize=1", "h", true)
            .ends_with("kiln.hostname=h kiln.resize=1"));
    }
}
