//! The engine: creates, finds, runs commands in and deletes sandboxes.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kiln_image::ImageStore;
use kiln_vmm::AccelChoice;
use serde::Deserialize;
use tokio::sync::RwLock;
use tracing::{info, warn};
use utoipa::ToSchema;

use crate::config::Config;
use crate::db::Db;
use crate::error::{Error, ErrorCode, Result};
use crate::model::{PortRequest, Sandbox, SandboxState};
use crate::vm::Vm;

/// Moved to vm.rs (a lower module); still named here for callers that use this path.
pub use crate::vm::vm_name;

pub const MIN_MEMORY_MIB: u64 = 64;
pub const MAX_MEMORY_MIB: u64 = 65536;
pub const MAX_CPUS: u64 = 16;
pub const MAX_DISK_GIB: u64 = 1024;

/// What a client asks for when creating a sandbox.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateSandbox {
    /// Guest image to boot (default `tiny`).
    pub template: Option<String>,
    pub name: Option<String>,
    pub memory_mib: Option<u64>,
    /// Room for copies resumed from this sandbox's memory snapshots to have more memory, up to this many
    /// MiB (at least `memory_mib`; default `memory_mib`: no headroom, no balloon device).
    pub max_memory_mib: Option<u64>,
    pub cpus: Option<u32>,
    /// Disk size in GiB; at least the template's size.
    pub disk_size_gib: Option<u64>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default, alias = "metadata")]
    pub labels: BTreeMap<String, String>,
    /// Guest ports to publish on 127.0.0.1: `{"guest": 80}` picks a free host port, `{"guest": 80,
    /// "host": 8080}` uses that one.
    #[serde(default)]
    pub ports: Vec<PortRequest>,
    /// Make the sandbox from this snapshot instead of a template (same as `POST /v1/snapshots/{id}/resume`).
    pub snapshot: Option<String>,
    /// Volumes to attach (at most 4).
    #[serde(default)]
    pub volumes: Vec<crate::volume::VolumeMount>,
    /// Let the guest open connections out (default true). `false` cuts it off from the network (slirp
    /// `restrict=on`); ports forwarded into it still work. A guest never reaches the host's own addresses.
    pub egress: Option<bool>,
    /// Seconds of life (renewable with `POST /v1/sandboxes/{id}/timeout`); then `on_timeout` applies.
    pub timeout: Option<u64>,
    /// Seconds without use (API requests for it, output of its background processes); then `on_timeout`.
    pub idle_timeout: Option<u64>,
    /// `hibernate` (default) or `delete`.
    pub on_timeout: Option<crate::lifetime::OnTimeout>,
    /// Start it again when a client uses it while hibernated (default true with a lifetime, else false).
    pub auto_resume: Option<bool>,
    /// Take a checkpoint (a memory snapshot labelled `kiln.checkpoint`) every this many seconds.
    pub checkpoint_every: Option<u64>,
    /// Checkpoints kept (default 10; needs `checkpoint_every`).
    pub checkpoint_keep: Option<u32>,
    /// Boot it cold instead of resuming the template's snapshot (default false; see docs/snapshots.md).
    pub boot: Option<bool>,
    /// Private network to join under bridged networking: members reach each other, nothing else does
    /// (docs/networking.md). Default: none.
    pub network: Option<String>,
}

/// A command to run in a sandbox.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ExecSpec {
    /// Program and arguments, run directly.
    pub argv: Option<Vec<String>>,
    /// A shell command line, run with `/bin/sh -c`.
    pub cmd: Option<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    pub cwd: Option<String>,
    /// Kill the command (its whole process group) after this many milliseconds.
    pub timeout_ms: Option<u64>,
    /// Run as this guest user (a name from the guest's /etc/passwd, or a numeric uid), optionally
    /// `user:group` (a name from /etc/group, or a numeric gid), instead of root.
    pub user: Option<String>,
}

pub(crate) struct Slot {
    /// Lifecycle operations take it exclusively. Commands and file transfers share it only while they find
    /// the VM and connect to its agent (so they never act on a VM half-way through a lifecycle operation),
    /// not while they run: a long command must not hold off a snapshot. A VM ended under a running
    /// command breaks its connection, and the command fails with that error.
    pub(crate) op: Arc<RwLock<()>>,
    pub(crate) vm: tokio::sync::Mutex<Option<Arc<Vm>>>,
}

/// A sandbox with its lifecycle lock held (released on drop).
pub(crate) struct Locked {
    pub sb: Sandbox,
    pub slot: Arc<Slot>,
    pub _guard: tokio::sync::OwnedRwLockWriteGuard<()>,
}

pub struct Engine {
    cfg: Config,
    db: Db,
    images: ImageStore,
    accel: AccelChoice,
    slots: Mutex<HashMap<String, Arc<Slot>>>,
    /// Snapshots whose checksums this daemon has verified (or written) already.
    verified: Mutex<std::collections::HashSet<String>>,
    /// Serialises volume creation, deletion and attachment decisions.
    volumes: tokio::sync::Mutex<()>,
    confine: crate::confine::Confinement,
    /// Capacity reserved by requests whose sandboxes have no row yet: (VMs, MiB).
    pending: crate::capacity::Pending,
    warm: crate::warm::WarmPool,
    /// Snapshot names being taken, snapshots in use or being deleted (snapshot/guard.rs).
    snapshot_claims: Mutex<crate::snapshot::guard::Claims>,
    /// This engine, for background work it starts itself (set once by `open`).
    me: std::sync::OnceLock<std::sync::Weak<Engine>>,
    /// Operations running in this daemon (see operations.rs).
    ops: crate::operations::Registry,
    /// Where owned guest RAM lives while VMs run (ramdir.rs).
    ram: crate::ramdir::RamDir,
    /// Activity and wake-ups for sandbox lifetimes (lifetime/).
    life: crate::lifetime::Lifetimes,
    /// Counters and histograms for `GET /metrics` (metrics.rs).
    metrics: crate::metrics::Metrics,
    /// Bridged networking's host side; None on user networking (net/).
    net: Option<Arc<crate::net::Bridge>>,
}

impl Engine {
    /// Opens the data directory and re-adopts VMs that outlived a previous daemon.
    pub async fn open(cfg: Config) -> Result<Arc<Engine>> {
        for dir in [
            cfg.data_dir.clone(),
            cfg.sandboxes_dir(),
            cfg.snapshots_dir(),
            cfg.images_dir(),
            cfg.cache_dir(),
            cfg.volumes_dir(),
        ] {
            std::fs::create_dir_all(&dir)
                .map_err(|e| Error::internal(format!("cannot create {}: {e}", dir.display())))?;
        }
        crate::console::set_dir(cfg.data_dir.join("consoles"))
            .map_err(|e| Error::internal(format!("cannot prepare the console directory: {e}")))?;
        let db = Db::open(&cfg.db_path())?;
        // The database holds every sandbox's environment: root's alone, also when an older kiln (or
        // another umask) made it readable.
        for f in ["kiln.db", "kiln.db-wal", "kiln.db-shm", "api-token.sha256"] {
            use std::os::unix::fs::PermissionsExt;
            let path = cfg.data_dir.join(f);
            if let Ok(file) = kiln_vmm::safefs::open_read(&path) {
                let _ = file.set_permissions(std::fs::Permissions::from_mode(0o600));
            }
        }
        let confine = tokio::task::spawn_blocking({
            let (data, sandboxes, snapshots, allow_net) = (
                cfg.data_dir.clone(),
                cfg.sandboxes_dir(),
                cfg.snapshots_dir(),
                cfg.allow_net.clone(),
            );
            let unconfined = cfg.unconfined;
            move || {
                crate::confine::Confinement::setup(
                    &data, &sandboxes, &snapshots, unconfined, &allow_net,
                )
            }
        })
        .await
        .map_err(|e| Error::internal(format!("confinement setup panicked: {e}")))??;
        // The probe runs as a VM will: as a VM uid, confined, on the same machine and CPU model.
        let probe_as = confine.run_as(Some(
            crate::confine::UID_BASE + crate::confine::UID_COUNT - 1,
        ));
        // The KVM probe boots the default template's kernel when it is built: only a real guest kernel
        // tells a KVM that runs Linux guests from one that runs a firmware stub only.
        let probe_kernel = cfg
            .images_dir()
            .join(&cfg.default_template)
            .join(kiln_image::KERNEL_FILE);
        let probe_kernel = probe_kernel.is_file().then_some(probe_kernel);
        let accel = tokio::task::spawn_blocking({
            let requested = cfg.accel;
            move || kiln_vmm::accel::choose(requested, probe_as.as_ref(), probe_kernel.as_deref())
        })
        .await
        .map_err(|e| Error::internal(format!("accelerator probe panicked: {e}")))?
        .map_err(|e| Error::new(ErrorCode::InvalidRequest, e))?;
        info!(accel = %accel.accel, reason = %accel.reason, cpu = %kiln_vmm::cpu::model(accel.accel), "accelerator chosen");
        // Cached for snapshot manifests and restore checks (snapshot/compat.rs); unknown if it fails.
        let features = tokio::task::spawn_blocking({
            let a = accel.accel;
            move || kiln_vmm::cpu::probe_features(a)
        })
        .await;
        if let Ok(Err(e)) = features {
            tracing::warn!(error = %e, "CPU features unknown; snapshots will not record them");
        }
        let mut cfg = cfg;
        if cfg.warm_spares_default {
            cfg.warm_spares = accel.accel.tuning().warm_spares;
        }
        let ram = crate::ramdir::RamDir::setup(
            &cfg.data_dir,
            &cfg.ram_dir,
            cfg.ram_size_mib.unwrap_or(cfg.max_total_memory_mib),
            accel.accel == kiln_vmm::Accel::Kvm,
        )?;
        let images = ImageStore::new(cfg.images_dir(), cfg.cache_dir());
        let net = crate::net::setup(&mut cfg, &db).await?;
        let engine = Arc::new(Engine {
            cfg,
            db,
            images,
            accel,
            slots: Mutex::new(HashMap::new()),
            verified: Mutex::new(Default::default()),
            volumes: tokio::sync::Mutex::new(()),
            confine,
            pending: Default::default(),
            warm: Default::default(),
            snapshot_claims: Default::default(),
            me: Default::default(),
            ops: Default::default(),
            ram,
            life: Default::default(),
            metrics: Default::default(),
            net,
        });
        let _ = engine.me.set(Arc::downgrade(&engine));
        engine.db.events().set_engine(Arc::downgrade(&engine));
        engine.clean_snapshot_debris();
        engine.clean_volume_debris();
        engine.adopt().await?;
        engine.ram.sweep(|id| match engine.db.find_sandbox(id) {
            Ok(Some(sb)) => {
                sb.id == id && matches!(sb.state, SandboxState::Running | SandboxState::Paused)
            }
            Ok(None) => false,
            Err(_) => true,
        });
        // After recovery rolled back or finished what they were doing.
        engine.settle_interrupted_operations()?;
        engine.spawn_watch();
        engine.spawn_reaper();
        engine.spawn_template_prepare();
        Ok(engine)
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }
    pub fn accel(&self) -> &AccelChoice {
        &self.accel
    }
    pub fn images(&self) -> &ImageStore {
        &self.images
    }
    pub(crate) fn is_verified(&self, snapshot: &str) -> bool {
        self.verified
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(snapshot)
    }
    pub(crate) fn mark_verified(&self, snapshot: &str) {
        self.verified
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(snapshot.to_string());
    }
    pub(crate) fn forget_verified(&self, snapshot: &str) {
        self.verified
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(snapshot);
    }
    pub(crate) fn confine(&self) -> &crate::confine::Confinement {
        &self.confine
    }
    pub(crate) fn bridge(&self) -> Option<&Arc<crate::net::Bridge>> {
        self.net.as_ref()
    }
    pub(crate) fn operations(&self) -> &crate::operations::Registry {
        &self.ops
    }
    pub(crate) fn warm_pool(&self) -> &crate::warm::WarmPool {
        &self.warm
    }
    pub(crate) fn me(&self) -> Option<Arc<Engine>> {
        self.me.get().and_then(std::sync::Weak::upgrade)
    }
    pub(crate) fn with_claims<R>(
        &self,
        f: impl FnOnce(&mut crate::snapshot::guard::Claims) -> R,
    ) -> R {
        f(&mut self
            .snapshot_claims
            .lock()
            .unwrap_or_else(|p| p.into_inner()))
    }
    pub(crate) fn forget_slot(&self, id: &str) {
        self.slots
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
    }
    /// What this daemon enforces on its VMs (`GET /v1/info`).
    pub fn confinement(&self) -> crate::confine::Summary {
        self.confine.summary()
    }
    /// Called once when the daemon exits: drops host-wide rules nothing needs any more.
    pub fn shutdown(&self) {
        self.confine.shutdown();
        self.ram.shutdown();
    }
    pub(crate) fn ram(&self) -> &crate::ramdir::RamDir {
        &self.ram
    }
    pub(crate) fn life(&self) -> &crate::lifetime::Lifetimes {
        &self.life
    }
    pub(crate) fn new_qemu_uid(&self) -> Result<Option<u32>> {
        self.confine.allocate_uid(&self.db.qemu_uids()?)
    }
    pub(crate) fn db(&self) -> &Db {
        &self.db
    }
    pub(crate) fn metrics(&self) -> &crate::metrics::Metrics {
        &self.metrics
    }
    pub(crate) fn pending(&self) -> &crate::capacity::Pending {
        &self.pending
    }
    pub(crate) async fn volume_lock(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.volumes.lock().await
    }

    pub(crate) fn slot(&self, id: &str) -> Arc<Slot> {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        slots
            .entry(id.to_string())
            .or_insert_with(|| {
                Arc::new(Slot {
                    op: Arc::new(RwLock::new(())),
                    vm: tokio::sync::Mutex::new(None),
                })
            })
            .clone()
    }

    /// Finds a sandbox and takes its lifecycle lock; the record is read again under the lock, since another
    /// operation may have changed it while this one waited.
    /// [`Engine::lock_sandbox`] that fails with `sandbox_busy` at once if an operation holds the sandbox.
    pub(crate) fn try_lock_sandbox(&self, id_or_name: &str) -> Result<Locked> {
        let sb = self.get(id_or_name)?;
        let slot = self.slot(&sb.id);
        let guard = slot.op.clone().try_write_owned().map_err(|_| {
            Error::new(
                crate::error::ErrorCode::SandboxBusy,
                format!(
                    "sandbox {} is busy with another operation; try again",
                    sb.name
                ),
            )
        })?;
        Ok(Locked {
            sb: self.get(&sb.id)?,
            slot,
            _guard: guard,
        })
    }

    pub(crate) async fn lock_sandbox(&self, id_or_name: &str) -> Result<Locked> {
        let sb = self.get(id_or_name)?;
        let slot = self.slot(&sb.id);
        let guard = slot.op.clone().write_owned().await;
        Ok(Locked {
            sb: self.get(&sb.id)?,
            slot,
            _guard: guard,
        })
    }

    /// Why a sandbox's QEMU is gone: its console's and stderr's last lines (`Vm::died_error`), and
    /// whether the kernel's OOM killer ended it at the sandbox's memory cap.
    pub(crate) fn vm_died(&self, id: &str, vm: &Vm) -> Error {
        let mut err = vm.died_error();
        if let Some(n) = self.confine().oom_kills(id).filter(|n| *n > 0) {
            err.message.push_str(&format!(
                "\nThe kernel's OOM killer ended {n} process(es) in the sandbox's memory cgroup: QEMU reached its memory cap (guest RAM plus overhead)"
            ));
        }
        err
    }

    /// A sandbox recorded with a VM whose QEMU is gone: stopped if a hibernation finished saving its
    /// state, else failed with the console's last lines. Used on start-up and by `kiln doctor`.
    pub(crate) fn settle_dead_vm(&self, id: &str, when: &str) -> Result<SandboxState> {
        if self.has_saved_state(id) {
            self.db.set_state(id, SandboxState::Stopped, None, None)?;
            info!(sandbox = %id, "sandbox was hibernated {when}");
            return Ok(SandboxState::Stopped);
        }
        let vm = Vm::new(vm_name(id), self.cfg.sandbox_dir(id), 0, None);
        let err = self.vm_died(id, &vm).message;
        warn!(sandbox = %id, "VM process gone {when}");
        self.db.set_state(
            id,
            SandboxState::Failed,
            None,
            Some(&format!("QEMU exited {when}: {err}")),
        )?;
        Ok(SandboxState::Failed)
    }

    pub fn get(&self, id_or_name: &str) -> Result<Sandbox> {
        self.db
            .find_sandbox(id_or_name)?
            .filter(|s| !crate::warm::is_spare(s))
            .map(|s| self.with_confinement(s))
            .ok_or_else(|| Error::sandbox_not_found(id_or_name))
    }

    /// Sets `confined`: the VM runs as its own uid and guests are firewalled off the host.
    pub(crate) fn with_confinement(&self, mut sb: Sandbox) -> Sandbox {
        sb.confined = sb.qemu_uid.is_some() && self.confine.netguard.is_some();
        sb.lifetime = self.lifetime_of(&sb);
        sb.checkpoint_policy = self.db().checkpoint_policy(&sb.id).ok().flatten();
        sb.address6 = self.bridge().and_then(|br| {
            let v4 = sb.address.as_deref()?.parse().ok()?;
            br.address6_for(v4).map(|a| a.to_string())
        });
        sb
    }

    pub fn list(&self, labels: &BTreeMap<String, String>) -> Result<Vec<Sandbox>> {
        Ok(self
            .db
            .list_sandboxes()?
            .into_iter()
            .filter(|s| {
                !crate::warm::is_spare(s)
                    && !crate::template_snap::is_builder(s)
                    && s.matches_labels(labels)
            })
            .map(|s| self.with_confinement(s))
            .collect())
    }

    pub(crate) fn faults(&self) -> &crate::faults::Faults {
        &self.cfg.faults
    }

    /// Deletes a sandbox: stops its VM and frees its disk, memory file and sockets.
    pub async fn delete(&self, id_or_name: &str) -> Result<()> {
        let locked = self.lock_sandbox(id_or_name).await?;
        self.delete_locked(locked).await
    }

    /// `delete` with the sandbox's lock already held (the lifetime reaper checks first under it).
    pub(crate) async fn delete_locked(&self, locked: Locked) -> Result<()> {
        let Locked { sb, slot, _guard } = locked;
        let base = self.template_base_of(&sb.id);
        self.db
            .set_state(&sb.id, SandboxState::Deleting, sb.pid, None)?;
        self.faults().hold("delete.marked").await;
        let vm = slot.vm.lock().await.take();
        match vm {
            Some(vm) => {
                self.flush_volumes(&sb, &vm).await;
                vm.terminate().await
            }
            None => {
                if let Some(pid) = sb.pid {
                    kiln_vmm::process::terminate(pid, &vm_name(&sb.id), Duration::from_secs(3))
                        .await;
                }
            }
        }
        // While the attachments still stand, so no new sandbox has been given the volumes yet.
        self.reclaim_volumes(&sb.volumes);
        self.remove_sandbox_files(&sb.id);
        self.db.delete_sandbox(&sb.id)?;
        if let Some(br) = self.bridge() {
            br.proxies.unpublish_all(&sb.id);
        }
        // Its address is free: the rules naming it go (its TAP went with its QEMU).
        if let Err(e) = self.refresh_net().await {
            warn!(sandbox = %sb.id, error = %e, "network rules not updated after a delete");
        }
        self.forget_slot(&sb.id);
        info!(sandbox = %sb.id, "sandbox deleted");
        self.template_user_gone(base.as_deref());
        Ok(())
    }

    /// Path of a sandbox's console ring (root-owned, at most `console::RING_BYTES` in two parts).
    pub fn console_log(&self, id_or_name: &str) -> Result<std::path::PathBuf> {
        let sb = self.get(id_or_name)?;
        Ok(crate::console::ring_path(
            &vm_name(&sb.id),
            &self.cfg.sandbox_dir(&sb.id),
        ))
    }

    /// The last `max_bytes` of a sandbox's console (its kept part is at most `console::RING_BYTES`).
    pub async fn console_tail(&self, id_or_name: &str, max_bytes: u64) -> Result<Vec<u8>> {
        let ring = self.console_log(id_or_name)?;
        tokio::task::spawn_blocking(move || crate::console::tail_bytes(&ring, max_bytes))
            .await
            .map_err(|e| Error::internal(e.to_string()))?
            .map_err(|e| Error::internal(format!("cannot read the console: {e}")))
    }

    pub fn data_dir(&self) -> &Path {
        &self.cfg.data_dir
    }
}
