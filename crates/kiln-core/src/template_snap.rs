//! Create is a resume (issue 15): each template boots once per machine shape, and that boot's memory
//! snapshot (a *template snapshot*) is what every later create of that template and shape resumes, with the
//! request's own identity, env, labels, ports, volumes and egress. A warm spare of it makes the common case a
//! continue of an already-resumed copy.
//!
//! A template snapshot is an ordinary full snapshot in the daemon's store, id `template-<key>`, labelled
//! [`LABEL`] and left out of `snapshot list`. `<key>` hashes everything the saved machine depends on
//! (the image's `image.json` digest, which holds its files' SHA-256, the kernel command line, machine
//! options, accelerator, QEMU version, CPU model, snapshot format and the shape), so a rebuilt template never
//! resumes an old one. Daemons sharing an images directory share them: one is published (temp → fsync →
//! rename → fsync dir) under `<images>/<template>/snapshots/<id>` by the daemon that made it, under a file
//! lock, and the others hard-link it into their own store.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use kiln_image::Image;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tracing::{info, warn};
use utoipa::ToSchema;

use crate::engine::{CreateSandbox, Engine};
use crate::error::{Error, ErrorCode, Result};
use crate::fsutil;
use crate::model::{PortMapping, Sandbox};
use crate::snapshot::manifest::{Manifest, MANIFEST};
use crate::snapshot::restore::ResumeSnapshot;

/// Label (key) on template snapshots; its value is the template's name.
pub const LABEL: &str = "kiln.template-snapshot";
/// Origin of the hidden sandbox a template snapshot is captured from (`building:<snapshot id>`).
const BUILDER_ORIGIN: &str = "building:";
/// The console of the boot a template snapshot was captured from, kept in its directory: a copy's
/// console log starts with it (a resumed machine prints no boot lines of its own).
pub(crate) const BOOT_CONSOLE: &str = "boot-console.log";
/// How long a create waits for another daemon making the same template snapshot.
const LOCK_WAIT: Duration = Duration::from_secs(180);
/// `off`: every create boots cold; `lazy`: made on first use only; anything else (default `on`): the
/// default template's default shape is also prepared when the daemon starts.
pub const MODE_ENV: &str = "KILN_TEMPLATE_SNAPSHOTS";
/// Where template snapshots are shared instead of beside the images (`<dir>/<template>/`): for an images
/// directory this daemon must not write, e.g. tests run on another checkout's built images.
pub const STORE_ENV: &str = "KILN_TEMPLATE_STORE";
/// Logged once the start-up preparation is over, whatever its outcome (tests wait for it before counting
/// VMs and files).
pub const PREPARED_LOG: &str = "template snapshot preparation finished";

/// How a sandbox made from a template started (only in the create's answer).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct BootInfo {
    /// `resume` (from the template's snapshot or a warm spare of it) or `cold` (booted).
    pub mode: String,
    /// Why: which of the two resumes, or what ruled a resume out.
    pub reason: String,
    /// The template snapshot resumed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<String>,
}

impl BootInfo {
    pub(crate) fn cold(reason: String) -> BootInfo {
        BootInfo {
            mode: "cold".into(),
            reason,
            snapshot: None,
        }
    }
    pub(crate) fn resume(snapshot: &str, reason: &str) -> BootInfo {
        BootInfo {
            mode: "resume".into(),
            reason: reason.into(),
            snapshot: Some(snapshot.into()),
        }
    }
}

/// What a resume from a template snapshot changes beyond a snapshot resume.
#[derive(Debug, Clone)]
pub(crate) struct TemplateUse {
    pub template: String,
    pub ports: Vec<PortMapping>,
}

/// The machine shape a template snapshot is made for: a create of another shape uses another snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Shape {
    pub memory_mib: u64,
    pub max_memory_mib: Option<u64>,
    pub cpus: u32,
}

/// Why a create did not resume.
pub(crate) enum NotResumed {
    /// The request itself fails (name taken, port in use, capacity): a cold boot would fail the same way.
    Client(Error),
    /// Boot cold instead, for this reason.
    Fallback(String),
}

#[derive(PartialEq)]
enum Mode {
    On,
    Lazy,
    Off,
}

fn mode() -> Mode {
    match std::env::var(MODE_ENV).unwrap_or_default().as_str() {
        "off" | "0" | "false" => Mode::Off,
        "lazy" => Mode::Lazy,
        _ => Mode::On,
    }
}

pub(crate) fn is_builder(sb: &Sandbox) -> bool {
    sb.origin.starts_with(BUILDER_ORIGIN)
}

/// Errors of a resume that a cold boot may not have: those fall back, the rest are the client's.
fn falls_back(code: ErrorCode) -> bool {
    matches!(
        code,
        ErrorCode::SnapshotNotFound
            | ErrorCode::SnapshotCorrupt
            | ErrorCode::SnapshotIncompatible
            | ErrorCode::SnapshotBaseMissing
            | ErrorCode::SnapshotBaseChanged
            | ErrorCode::SnapshotInUse
            | ErrorCode::VmFailed
            | ErrorCode::BootFailed
            | ErrorCode::SandboxUnresponsive
            | ErrorCode::ResourceOverrideRefused
            | ErrorCode::Internal
    )
}

/// One async lock per template snapshot id: creates in this daemon wait for the one making it.
fn key_lock(id: &str) -> Arc<tokio::sync::Mutex<()>> {
    static LOCKS: OnceLock<Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>> = OnceLock::new();
    LOCKS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .entry(id.to_string())
        .or_default()
        .clone()
}

impl Engine {
    /// The shape to resume, or why this create boots cold (checked before anything is made).
    pub(crate) fn template_route(
        &self,
        req: &CreateSandbox,
        image: &Image,
    ) -> std::result::Result<Shape, String> {
        if req.boot == Some(true) {
            return Err("a cold boot was asked for (boot: true)".into());
        }
        if mode() == Mode::Off {
            return Err(format!("template snapshots are off ({MODE_ENV}=off)"));
        }
        if std::env::var("KILN_GUEST_CMDLINE_EXTRA").is_ok_and(|s| !s.trim().is_empty()) {
            return Err(
                "KILN_GUEST_CMDLINE_EXTRA changes the kernel command line, which a saved machine cannot take"
                    .into(),
            );
        }
        // A larger disk than the template's is grown online after the resume (template_fit.rs).
        Ok(self.shape_for(image, req.memory_mib, req.max_memory_mib, req.cpus))
    }

    /// The machine a create with these sizes boots: the daemon's defaults fill what is not asked for,
    /// headroom included, so a daemon with another default never resumes a snapshot of another size.
    fn shape_for(
        &self,
        image: &Image,
        memory_mib: Option<u64>,
        max_memory_mib: Option<u64>,
        cpus: Option<u32>,
    ) -> Shape {
        let memory_mib = memory_mib.unwrap_or(self.config().default_memory_mib);
        Shape {
            memory_mib,
            max_memory_mib: self
                .max_memory_for(image, memory_mib, max_memory_mib)
                .filter(|max| *max > memory_mib),
            cpus: cpus.unwrap_or(self.config().default_cpus),
        }
    }

    /// Resumes a template snapshot as the sandbox `req` asks for: the one of `shape` if this daemon has it,
    /// else one whose copies can be resized to `shape` (template_fit.rs), else the one of `shape` made
    /// (or imported) first. A disk larger than the snapshot's grows online before the create returns.
    pub(crate) async fn create_from_template_snapshot(
        &self,
        req: &CreateSandbox,
        template: &str,
        image: &Image,
        shape: Shape,
        ports: &[PortMapping],
        disk_size_bytes: u64,
    ) -> std::result::Result<Sandbox, NotResumed> {
        let exact = self
            .template_snapshot_id(template, shape)
            .ok()
            .filter(|id| self.has_template_snapshot(id));
        let served = match exact {
            Some(id) => Some((id, shape)),
            None => self.template_snapshot_serving(template, shape, req.max_memory_mib),
        };
        let (snap, have) = match served {
            Some(found) => found,
            None => match self.ensure_template_snapshot(template, image, shape).await {
                Ok(id) => (id, shape),
                Err(e) => {
                    warn!(template, error = %e, "no template snapshot");
                    return Err(NotResumed::Fallback(format!(
                        "no template snapshot could be made: {}",
                        e.message
                    )));
                }
            },
        };
        let resumed = self
            .resume_within(
                &snap,
                ResumeSnapshot {
                    name: req.name.clone(),
                    // The snapshot's own sizes for its own shape (a warm spare may serve it).
                    memory_mib: Some(shape.memory_mib),
                    cpus: Some(shape.cpus),
                    labels: req.labels.clone(),
                    // Given or not, these are the request's: the template's machine had none.
                    volumes: Some(req.volumes.clone()),
                    egress: Some(req.egress.unwrap_or(true)),
                    network: req.network.clone(),
                    env: req.env.clone(),
                    from_template: Some(TemplateUse {
                        template: template.to_string(),
                        ports: ports.to_vec(),
                    }),
                    ..Default::default()
                },
                None,
            )
            .await;
        let mut sb = match resumed {
            Ok(sb) => sb,
            Err(e) if falls_back(e.code) => {
                warn!(template, snapshot = %snap, error = %e, "resuming the template snapshot failed; booting cold");
                return Err(NotResumed::Fallback(format!(
                    "resuming the template snapshot {snap} failed: {}",
                    e.message
                )));
            }
            Err(e) => return Err(NotResumed::Client(e)),
        };
        // Said after "the template's snapshot": how the copy differs from it.
        let mut resized = if have == shape {
            String::new()
        } else {
            format!(
                " of {} MiB and {} vCPU(s), resized to {} MiB and {} vCPU(s)",
                have.memory_mib, have.cpus, shape.memory_mib, shape.cpus
            )
        };
        if disk_size_bytes > sb.disk_size_bytes {
            let from = sb.disk_size_bytes;
            if let Err(e) = self.grow_disk_online(&sb.id, disk_size_bytes).await {
                warn!(template, snapshot = %snap, sandbox = %sb.id, error = %e, "growing the disk of the resumed copy failed; booting cold");
                // Nothing of it is kept: the cold boot makes the sandbox again under the same name.
                if let Err(del) = self.delete(&sb.id).await {
                    warn!(sandbox = %sb.id, error = %del, "could not remove the copy whose disk did not grow");
                    return Err(NotResumed::Client(e));
                }
                return Err(NotResumed::Fallback(format!(
                    "growing the disk of the copy of {snap} to {} GiB online failed: {}",
                    disk_size_bytes >> 30,
                    e.message
                )));
            }
            info!(sandbox = %sb.id, from, to = disk_size_bytes, "disk and filesystem grown online");
            sb.disk_size_bytes = disk_size_bytes;
            resized.push_str(&format!(
                ", its disk grown online to {} GiB",
                disk_size_bytes >> 30
            ));
        }
        match &mut sb.boot {
            // A warm spare (warm.rs) said so; the growth is added to it.
            Some(boot) if have == shape => boot.reason.push_str(&resized),
            _ => {
                let how = format!("the template's snapshot{resized}");
                sb.boot = Some(BootInfo::resume(&snap, &how));
            }
        }
        Ok(sb)
    }

    /// A diff built on a template snapshot shows its template as parent (`template:T`, as a diff of a
    /// booted sandbox does: kiln's own snapshot is no parent a client made) and names the template
    /// snapshot in `template_snapshot`. The record keeps `snapshot:<id>` (deletion checks and pins use it).
    pub(crate) fn present_parent(&self, mut snap: crate::Snapshot) -> crate::Snapshot {
        let Some(base) = snap
            .parent
            .as_deref()
            .and_then(|p| p.strip_prefix("snapshot:"))
        else {
            return snap;
        };
        let template = self
            .db()
            .find_snapshot(base)
            .ok()
            .flatten()
            .and_then(|b| b.labels.get(LABEL).cloned());
        if let Some(template) = template {
            snap.template_snapshot = Some(base.to_string());
            snap.parent = Some(format!("template:{template}"));
        }
        snap
    }

    /// The id of the template snapshot for this template's content, this host and `shape`.
    pub(crate) fn template_snapshot_id(&self, template: &str, shape: Shape) -> Result<String> {
        let accel = self.accel().accel;
        let image = self
            .images()
            .get(template)
            .map_err(|e| Error::new(ErrorCode::ImageNotFound, e.to_string()))?;
        let cmdline = kiln_image::kernel_cmdline(
            &image,
            &kiln_image::CmdlineParams {
                hostname: Some("kiln".into()),
                kvm: !accel.tuning().tsc_cmdline,
                ..Default::default()
            },
        );
        // The host TSC frequency is measured per process (it varies in its last digits): not part of
        // the machine's identity, as any snapshot resumes across daemons.
        let cmdline: String = cmdline
            .split_whitespace()
            .filter(|p| !p.starts_with("tsc_early_khz="))
            .collect::<Vec<_>>()
            .join(" ");
        let parts = [
            template.to_string(),
            self.base_digest(&format!("template:{template}"))?,
            kiln_vmm::qemu::machine_for_boot(accel, &cmdline),
            cmdline,
            accel.to_string(),
            kiln_vmm::qemu_version(),
            kiln_vmm::cpu::model(accel),
            crate::snapshot::manifest::FORMAT_VERSION.to_string(),
            // "2": the headroom a create boots with is part of the shape since this version; ids made
            // before (which keyed only what the client asked for) must not be found again.
            format!(
                "2 {} {:?} {} {}",
                shape.memory_mib,
                shape.max_memory_mib,
                shape.cpus,
                self.machine_max_cpus(shape.cpus)
            ),
        ];
        let mut key = parts.join("\n");
        // A bridged builder's guest holds a pool address (and IPv6 routes) that a user-mode copy does not
        // fully shed: each mode has template snapshots of its own (user mode's ids are unchanged).
        if self.bridge().is_some() {
            key.push_str("\nnetwork bridged");
            // The builder's NIC queue pairs when several (machine.rs): older kilns' single-queue
            // snapshots of multi-vCPU shapes are not found again; single-queue ids are unchanged.
            if let Some(queues) = crate::net::boot_queues(true, shape.cpus) {
                key.push_str(&format!("\nnet_queues {queues}"));
            }
        }
        let digest = Sha256::digest(key.as_bytes());
        Ok(format!("template-{}", &hex::encode(digest)[..16]))
    }

    pub(crate) fn has_template_snapshot(&self, id: &str) -> bool {
        matches!(self.db().find_snapshot(id), Ok(Some(_)))
            && self.config().snapshot_dir(id).join(MANIFEST).is_file()
    }

    /// Where template snapshots of `template` are shared: beside the image, or in the data directory when
    /// the images directory cannot be written.
    pub fn template_store(&self, template: &str) -> PathBuf {
        if let Some(dir) = std::env::var_os(STORE_ENV).filter(|d| !d.is_empty()) {
            return PathBuf::from(dir).join(template);
        }
        let beside = self.config().images_dir().join(template).join("snapshots");
        if writable_dir(&beside) {
            return beside;
        }
        self.config()
            .data_dir
            .join("template-snapshots")
            .join(template)
    }

    /// The template snapshot for `shape`: this daemon's, else imported from the shared store, else made
    /// (one daemon at a time per snapshot, under a file lock) and published there.
    pub(crate) async fn ensure_template_snapshot(
        &self,
        template: &str,
        image: &Image,
        shape: Shape,
    ) -> Result<String> {
        let id = self.template_snapshot_id(template, shape)?;
        if self.has_template_snapshot(&id) {
            return Ok(id);
        }
        let lock = key_lock(&id);
        let _held = lock.lock().await;
        if self.has_template_snapshot(&id) {
            return Ok(id);
        }
        let store = self.template_store(template);
        std::fs::create_dir_all(&store)
            .map_err(|e| fsutil::io_error(&format!("creating {}", store.display()), e))?;
        let _file_lock = lock_file(store.join(format!(".lock-{id}"))).await?;
        let shared = store.join(&id);
        if shared.join(MANIFEST).is_file() {
            let imported = {
                let (shared, id) = (shared.clone(), id.clone());
                fsutil::off_runtime(|| self.import_template_snapshot(&shared, &id, shape))
            };
            match imported {
                Ok(()) => return Ok(id),
                // A damaged shared copy is moved aside (never deleted) and made again.
                Err(e) => {
                    warn!(snapshot = %id, error = %e, "the shared template snapshot fails its checks; making it again");
                    let aside = store.join(format!(".bad-{id}-{}", std::process::id()));
                    fsutil::rename_durably(&shared, &aside)?;
                }
            }
        }
        // Debris of a daemon that died publishing this one (the lock says none is at it now).
        for entry in std::fs::read_dir(&store).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(&format!(".tmp-{id}-")) {
                let _ = fsutil::remove_dir_durably(&entry.path());
            }
        }
        self.make_template_snapshot(template, image, shape, &id)
            .await?;
        let published = {
            let (local, shared) = (self.config().snapshot_dir(&id), shared.clone());
            fsutil::off_runtime(|| copy_published(&local, &shared))
        };
        if let Err(e) = published {
            // This daemon has it all the same; others make their own.
            warn!(snapshot = %id, error = %e, "could not share the template snapshot");
        }
        // It may replace one of a rebuilt template.
        self.template_user_gone(Some(&id));
        Ok(id)
    }

    /// Boots the template once as a hidden sandbox, captures it and deletes the sandbox.
    async fn make_template_snapshot(
        &self,
        template: &str,
        image: &Image,
        shape: Shape,
        id: &str,
    ) -> Result<()> {
        let started = Instant::now();
        let origin = format!("{BUILDER_ORIGIN}{id}");
        let req = CreateSandbox {
            template: Some(template.to_string()),
            memory_mib: Some(shape.memory_mib),
            // Always explicit (equal to memory_mib for none): the daemon's default must not add any.
            max_memory_mib: Some(shape.max_memory_mib.unwrap_or(shape.memory_mib)),
            cpus: Some(shape.cpus),
            ..Default::default()
        };
        let booted = self
            .create_cold(
                req,
                template,
                image.clone(),
                image.manifest.rootfs_size_bytes,
                Vec::new(),
                Some(origin.clone()),
            )
            .await;
        let captured = match booted {
            Ok(sb) => {
                let ring = crate::console::ring_path(
                    &crate::vm::vm_name(&sb.id),
                    &self.config().sandbox_dir(&sb.id),
                );
                let boot_log = crate::console::tail_bytes(&ring, crate::console::RING_BYTES)
                    .unwrap_or_default();
                let captured = self
                    .create_snapshot_internal(
                        &sb.id,
                        crate::CreateSnapshot {
                            name: Some(id.to_string()),
                            labels: BTreeMap::from([
                                (LABEL.to_string(), template.to_string()),
                                (
                                    crate::template_gc::SHAPE_LABEL.to_string(),
                                    crate::template_gc::shape_label(shape),
                                ),
                            ]),
                            ..Default::default()
                        },
                        Default::default(),
                    )
                    .await;
                if captured.is_ok() {
                    let dir = self.config().snapshot_dir(id);
                    if let Ok(m) = Manifest::read(&dir, id) {
                        crate::template_gc::record_verified(&dir, &m);
                    }
                    let kept = fsutil::write_atomic(
                        &self.config().snapshot_dir(id).join(BOOT_CONSOLE),
                        &boot_log,
                    );
                    if let Err(e) = kept {
                        warn!(snapshot = id, error = %e, "could not keep the template's boot console");
                    }
                }
                captured
            }
            Err(e) => Err(e),
        };
        self.remove_builders(Some(&origin)).await;
        captured?;
        info!(
            template,
            snapshot = id,
            ms = started.elapsed().as_millis() as u64,
            "template snapshot made"
        );
        Ok(())
    }

    /// Links a shared template snapshot into this daemon's store, checks it whole and records it.
    fn import_template_snapshot(&self, shared: &Path, id: &str, shape: Shape) -> Result<()> {
        let dst = self.config().snapshot_dir(id);
        let tmp = self.config().snapshots_dir().join(format!(
            ".tmp-{id}-{:08x}-{}",
            rand::random::<u32>(),
            std::process::id()
        ));
        let linked = link_tree(shared, &tmp).and_then(|()| fsutil::publish(&tmp, &dst));
        if let Err(e) = linked {
            let _ = fsutil::remove_dir_durably(&tmp);
            return Err(e);
        }
        let checked = Manifest::read(&dst, id)
            .and_then(|m| m.verify(&dst, true).map(|()| m))
            .and_then(|m| {
                // The store is shared: what is there must be the machine this id names.
                let made = (m.memory_mib, m.max_memory_mib, m.cpus);
                let want = (shape.memory_mib, shape.max_memory_mib, shape.cpus);
                if made == want {
                    Ok(m)
                } else {
                    Err(Error::new(
                        ErrorCode::SnapshotIncompatible,
                        format!("the shared template snapshot {id} is of another machine (memory, headroom, cpus) {made:?}, not {want:?}"),
                    ))
                }
            });
        let m = match checked {
            Ok(m) => m,
            Err(e) => {
                let _ = fsutil::remove_dir_durably(&dst);
                return Err(e);
            }
        };
        let snap = crate::recovery::snapshot_from_manifest(&m, &dst);
        self.db().insert_snapshot(&snap, false)?;
        crate::template_gc::record_verified(&dst, &m);
        self.mark_verified(id);
        info!(snapshot = id, from = %shared.display(), "template snapshot imported");
        Ok(())
    }

    /// Deletes hidden template-building sandboxes: the one with `origin`, or all (at start-up: left by a
    /// daemon that stopped while making one).
    pub(crate) async fn remove_builders(&self, origin: Option<&str>) {
        let rows = self.db().list_sandboxes().unwrap_or_default();
        for sb in rows
            .into_iter()
            .filter(|s| origin.map_or(is_builder(s), |o| s.origin == o))
        {
            if let Err(e) = self.delete(&sb.id).await {
                warn!(sandbox = %sb.id, error = %e, "could not remove a template-building sandbox");
            }
        }
    }

    /// At start: removes leftover builders, then prepares the default template's default shape in the
    /// background (unless `KILN_TEMPLATE_SNAPSHOTS` is `off` or `lazy`), so the first create resumes.
    pub(crate) fn spawn_template_prepare(&self) {
        let Some(engine) = self.me() else { return };
        tokio::spawn(async move {
            engine.remove_builders(None).await;
            if mode() != Mode::On {
                return;
            }
            let template = engine.config().default_template.clone();
            match engine.images().get(&template) {
                // Not built (yet): nothing to prepare; the first create tries again.
                Err(_) => {
                    info!(template = %template, "no template snapshot prepared: the default template is not built")
                }
                Ok(image) => {
                    let shape = engine.shape_for(&image, None, None, None);
                    match engine
                        .ensure_template_snapshot(&template, &image, shape)
                        .await
                    {
                        Ok(id) => {
                            info!(template = %template, snapshot = %id, "template snapshot ready")
                        }
                        Err(e) => {
                            warn!(template = %template, error = %e, "could not prepare the template snapshot")
                        }
                    }
                }
            }
            engine.remove_stale_template_snapshots().await;
            info!(template = %template, "{}", PREPARED_LOG);
        });
    }
}

/// A copy's console log, for a copy of a template snapshot: the template's boot console, then a line
/// saying which snapshot it was resumed from and when. Nothing for other snapshots.
pub(crate) fn seed_console(snap_dir: &Path, snap_id: &str, sandbox_id: &str, sandbox_dir: &Path) {
    let Ok(mut log) = std::fs::read(snap_dir.join(BOOT_CONSOLE)) else {
        return;
    };
    if !log.ends_with(b"\n") {
        log.extend_from_slice(b"\r\n");
    }
    log.extend_from_slice(
        format!(
            "[kiln] resumed from template snapshot {snap_id} at {} (the lines above are that snapshot's boot)\r\n",
            crate::model::now_rfc3339()
        )
        .as_bytes(),
    );
    let ring = crate::console::ring_path(&crate::vm::vm_name(sandbox_id), sandbox_dir);
    if let Err(e) = crate::console::seed(&ring, &log) {
        warn!(sandbox = sandbox_id, error = %e, "could not start the console log with the template's boot");
    }
}

/// Whether `dir` exists (or can be made) and can be written: false on a read-only filesystem.
fn writable_dir(dir: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    if std::fs::create_dir_all(dir).is_err() {
        return false;
    }
    let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: access(2) on a NUL-terminated path.
    unsafe { libc::access(c.as_ptr(), libc::W_OK) == 0 }
}

/// Takes an exclusive `flock` on `path` (created if missing), waiting at most `LOCK_WAIT`.
pub(crate) async fn lock_file(path: PathBuf) -> Result<kiln_image::FileLock> {
    tokio::task::spawn_blocking(move || {
        match kiln_image::FileLock::acquire(&path, true, LOCK_WAIT) {
            Ok(Some(lock)) => Ok(lock),
            Ok(None) => Err(Error::new(
                ErrorCode::Internal,
                format!(
                    "another kiln has been making the template snapshot locked by {} for {} s; try again, or boot cold (boot: true)",
                    path.display(),
                    LOCK_WAIT.as_secs()
                ),
            )),
            Err(e) => Err(fsutil::io_error(&format!("locking {}", path.display()), e)),
        }
    })
    .await
    .map_err(|e| Error::internal(format!("template snapshot lock: {e}")))?
}

/// Hard-links (or copies, across filesystems) every file under `src` into a new directory `dst`, and
/// fsyncs what it made.
fn link_tree(src: &Path, dst: &Path) -> Result<()> {
    std::fs::create_dir(dst)
        .map_err(|e| fsutil::io_error(&format!("creating {}", dst.display()), e))?;
    let entries = std::fs::read_dir(src)
        .map_err(|e| fsutil::io_error(&format!("reading {}", src.display()), e))?;
    for entry in entries {
        let entry = entry.map_err(|e| fsutil::io_error("reading a snapshot directory", e))?;
        let kind = entry
            .file_type()
            .map_err(|e| fsutil::io_error("reading a snapshot directory", e))?;
        let to = dst.join(entry.file_name());
        if kind.is_dir() {
            link_tree(&entry.path(), &to)?;
        } else if kind.is_file() {
            fsutil::link_or_copy(&entry.path(), &to)?;
        }
    }
    fsutil::fsync_files_in(dst)
}

/// Publishes a copy (links) of the snapshot directory `local` as `shared`.
fn copy_published(local: &Path, shared: &Path) -> Result<()> {
    let parent = shared
        .parent()
        .ok_or_else(|| Error::internal("template snapshot store has no parent"))?;
    let name = shared
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = parent.join(format!(".tmp-{name}-{}", std::process::id()));
    let done = link_tree(local, &tmp).and_then(|()| fsutil::publish(&tmp, shared));
    if done.is_err() {
        let _ = fsutil::remove_dir_durably(&tmp);
    }
    done
}
