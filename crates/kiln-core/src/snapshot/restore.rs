//! Bringing snapshots back as new sandboxes (resume / fork); also listing and loading snapshots. Rolling a
//! sandbox back is in rollback.rs, deleting snapshots in delete.rs.

use serde::Deserialize;
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
