//! Volumes: durable ext4 disks that live outside any sandbox and are attached to sandboxes at creation.
//!
//! A volume is a sparse raw file in `<data>/volumes/<name>/volume.img`. Attached read-write it belongs to
//! one sandbox at a time; read-only it can be shared, each sandbox writing to a throwaway overlay. Every
//! machine has [`VOLUME_SLOTS`] virtio disks whether or not volumes fill them, so a machine's device set
//! never changes and its saved state loads with or without volumes. Volumes are not part of snapshots:
//! stop/start keeps them attached; a resumed or forked copy gets its source's volumes back where they are
//! free (`remount_plan`) unless given others (see docs/snapshots.md, "Volumes").

mod remount;
pub(crate) mod store;

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tracing::{info, warn};
use utoipa::ToSchema;

use crate::engine::Engine;
use crate::error::{Error, ErrorCode, Result};
use crate::fsutil;
use crate::layout::{Layer, VolumeSlot, VOLUME_SLOTS};
use crate::model::now_rfc3339;
use crate::validate;
use crate::vm::{agent_error, Vm};

pub const MIN_VOLUME_MIB: u64 = 16;
pub const MAX_VOLUME_MIB: u64 = 1 << 20;
pub const DEFAULT_VOLUME_MIB: u64 = 1024;

/// A volume attached to a sandbox: which one, where in the guest, how.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VolumeMount {
    /// Volume name.
    pub volume: String,
    /// Absolute mount point in the guest, e.g. `/data`.
    pub path: String,
    /// Mount read-only; several sandboxes may share a volume this way.
    #[serde(default)]
    pub read_only: bool,
}

impl std::str::FromStr for VolumeMount {
    type Err = Error;
    /// `NAME:/PATH` or `NAME:/PATH:ro`.
    fn from_str(s: &str) -> Result<VolumeMount> {
        let bad = || {
            Error::invalid(format!(
                "invalid volume '{s}': use NAME:/PATH or NAME:/PATH:ro, e.g. data:/data"
            ))
        };
        let (volume, rest) = s.split_once(':').ok_or_else(bad)?;
        let (path, read_only) = match rest.rsplit_once(':') {
            Some((path, "ro")) => (path, true),
            Some((path, "rw")) => (path, false),
            Some(_) => return Err(bad()),
            None => (rest, false),
        };
        Ok(VolumeMount {
            volume: volume.to_string(),
            path: path.to_string(),
            read_only,
        })
    }
}

#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateVolume {
    pub name: String,
    /// Size in MiB (default 1024).
    pub size_mib: Option<u64>,
    #[serde(default, alias = "metadata")]
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Attachment {
    pub sandbox_id: String,
    pub sandbox_name: String,
    pub path: String,
    pub read_only: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Volume {
    pub name: String,
    pub size_bytes: u64,
    /// Bytes the sparse volume file takes on the host's disk.
    pub allocated_bytes: u64,
    pub labels: BTreeMap<String, String>,
    pub created_at: String,
    /// Sandboxes the volume is attached to (running, paused, stopped or failed).
    pub attachments: Vec<Attachment>,
}

impl Engine {
    pub(crate) fn volume_file(&self, name: &str) -> PathBuf {
        self.config().volumes_dir().join(name).join("volume.img")
    }

    pub async fn create_volume(&self, req: CreateVolume) -> Result<Volume> {
        validate::name("volume", &req.name)?;
        validate::labels(&req.labels)?;
        let size_mib = req.size_mib.unwrap_or(DEFAULT_VOLUME_MIB);
        validate::range(
            "volume size",
            size_mib,
            MIN_VOLUME_MIB,
            MAX_VOLUME_MIB,
            " MiB",
        )?;
        let _lock = self.volume_lock().await;
        self.config().check_storage("create a volume")?;
        if self.db().find_volume(&req.name)?.is_some() {
            return Err(Error::new(
                ErrorCode::VolumeAlreadyExists,
                format!(
                    "a volume named '{}' already exists; pick another name or delete it first",
                    req.name
                ),
            ));
        }
        let dir = self.config().volumes_dir().join(&req.name);
        let tmp = self
            .config()
            .volumes_dir()
            .join(format!(".tmp-{}", req.name));
        let _ = std::fs::remove_dir_all(&tmp);
        let made = {
            let tmp = tmp.clone();
            let name = req.name.clone();
            tokio::task::spawn_blocking(move || make_ext4(&tmp, &name, size_mib << 20))
                .await
                .map_err(|e| Error::internal(format!("volume creation panicked: {e}")))?
        };
        if let Err(e) = made.and_then(|()| fsutil::publish(&tmp, &dir)) {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e);
        }
        let vol = Volume {
            name: req.name.clone(),
            size_bytes: size_mib << 20,
            allocated_bytes: 0,
            labels: req.labels,
            created_at: now_rfc3339(),
            attachments: Vec::new(),
        };
        if let Err(e) = self.db().insert_volume(&vol) {
            let _ = fsutil::remove_dir_durably(&dir);
            return Err(e);
        }
        info!(volume = %vol.name, size_mib, "volume created");
        self.get_volume(&vol.name)
    }

    pub fn get_volume(&self, name: &str) -> Result<Volume> {
        let mut vol = self
            .db()
            .find_volume(name)?
            .ok_or_else(|| volume_not_found(name))?;
        vol.allocated_bytes = fsutil::allocated_bytes(&self.volume_file(name));
        Ok(vol)
    }

    pub fn list_volumes(&self) -> Result<Vec<Volume>> {
        let mut vols = self.db().list_volumes()?;
        for v in &mut vols {
            v.allocated_bytes = fsutil::allocated_bytes(&self.volume_file(&v.name));
        }
        Ok(vols)
    }

    /// Deletes a volume and its data. Refused while any sandbox has it attached.
    pub async fn delete_volume(&self, name: &str) -> Result<()> {
        let _lock = self.volume_lock().await;
        let vol = self.get_volume(name)?;
        if !vol.attachments.is_empty() {
            let users: Vec<String> = vol
                .attachments
                .iter()
                .map(|a| format!("{} ({})", a.sandbox_name, a.path))
                .collect();
            return Err(Error::new(
                ErrorCode::VolumeInUse,
                format!(
                    "volume {name} is attached to {}; delete those sandboxes first",
                    users.join(", ")
                ),
            ));
        }
        self.db().delete_volume(name)?;
        let dir = self.config().volumes_dir().join(name);
        if let Err(e) = fsutil::remove_dir_durably(&dir) {
            warn!(volume = name, error = %e, "could not remove the volume's files");
        }
        info!(volume = name, "volume deleted");
        Ok(())
    }

    /// Checks that `mounts` can be attached to a new sandbox: volumes exist, mount paths are valid and
    /// distinct, and no sandbox holds a volume in a conflicting way. Call with the volume lock held, and
    /// record the attachments before releasing it.
    pub(crate) fn check_mounts(&self, mounts: &[VolumeMount]) -> Result<()> {
        if mounts.len() > VOLUME_SLOTS {
            return Err(Error::invalid(format!(
                "{} volumes asked for; a sandbox has {VOLUME_SLOTS} volume slots",
                mounts.len()
            )));
        }
        let mut paths = HashSet::new();
        let mut names = HashSet::new();
        for m in mounts {
            validate::name("volume", &m.volume)?;
            validate::mount_path(&m.path)?;
            if !paths.insert(m.path.as_str()) {
                return Err(Error::invalid(format!(
                    "two volumes are mounted at {}",
                    m.path
                )));
            }
            if !names.insert(m.volume.as_str()) {
                return Err(Error::invalid(format!(
                    "volume {} is listed twice",
                    m.volume
                )));
            }
            let vol = self.get_volume(&m.volume)?;
            let conflict = vol
                .attachments
                .iter()
                .find(|a| !(m.read_only && a.read_only));
            if let Some(a) = conflict {
                let how = if a.read_only {
                    "read-only"
                } else {
                    "read-write"
                };
                return Err(Error::new(
                    ErrorCode::VolumeInUse,
                    format!(
                        "volume {} is attached {how} to sandbox {}; a volume is attached read-write to one sandbox at a time (read-only to any number). Delete {} or attach with :ro",
                        m.volume, a.sandbox_name, a.sandbox_name
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Puts `mounts` into free slots of `slots` (the slots of a fresh machine, or of one restored from a
    /// capture), making read-only overlays in the sandbox's directory. `restored`: the guest has probed
    /// the slots already and must re-read the disks it gets.
    pub(crate) fn place_mounts(
        &self,
        sandbox_dir: &Path,
        qemu_uid: Option<u32>,
        slots: &mut [VolumeSlot],
        mounts: &[VolumeMount],
        restored: bool,
    ) -> Result<()> {
        let free = slots
            .iter()
            .filter(|s| matches!(s, VolumeSlot::Empty))
            .count();
        if mounts.len() > free {
            let why = if slots.is_empty() {
                "it was made by a kiln without volume support".to_string()
            } else {
                format!(
                    "{} of its {} volume slots still hold volumes of the machine it was captured from",
                    slots.len() - free,
                    slots.len()
                )
            };
            return Err(Error::invalid(format!(
                "cannot attach {} volumes: only {free} volume slots are free ({why}); take a `--type disk` snapshot to start with all slots free",
                mounts.len()
            )));
        }
        let mut empty = slots.iter_mut().filter(|s| matches!(s, VolumeSlot::Empty));
        for m in mounts {
            let Some(slot) = empty.next() else { break };
            let file = self.volume_file(&m.volume);
            self.open_volume_to_vm(&file, qemu_uid, m.read_only)?;
            let mut layers = vec![Layer {
                path: file,
                format: "raw".into(),
                checksum: None,
            }];
            if m.read_only {
                // The guest's writes (even a read-only ext4 mount replays its journal) go to a throwaway
                // overlay, so the volume itself is never written.
                let overlays = sandbox_dir.join("volumes");
                std::fs::create_dir_all(&overlays).map_err(|e| {
                    fsutil::io_error(&format!("creating {}", overlays.display()), e)
                })?;
                // Root's, like the sandbox directory: the overlay is the VM's, its name is not.
                self.confine().root_dir(&overlays, qemu_uid)?;
                let overlay = overlays.join(format!("{}.qcow2", m.volume));
                let size = self.get_volume(&m.volume)?.size_bytes;
                crate::machine::create_top_layer(&overlay, &layers[0], size)?;
                self.confine().own_file(&overlay, qemu_uid)?;
                layers.push(Layer {
                    path: overlay,
                    format: "qcow2".into(),
                    checksum: None,
                });
            }
            *slot = VolumeSlot::Attached {
                volume: m.volume.clone(),
                path: m.path.clone(),
                read_only: m.read_only,
                layers,
                mounted: false,
                rescan: restored,
            };
        }
        Ok(())
    }

    /// Lets the VM of the sandbox running as `qemu_uid` open a volume file: read-write it becomes that
    /// uid's alone (a read-write volume has one user); read-only it is sealed so that every VM may read
    /// it and none may write it. Its directories only need to be traversable.
    fn open_volume_to_vm(&self, file: &Path, qemu_uid: Option<u32>, read_only: bool) -> Result<()> {
        use std::os::unix::fs::PermissionsExt;
        for dir in [
            self.config().volumes_dir(),
            file.parent().map(Path::to_path_buf).unwrap_or_default(),
        ] {
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o711))
                .map_err(|e| fsutil::io_error(&format!("opening {} to VMs", dir.display()), e))?;
        }
        if read_only {
            self.confine().seal(file)
        } else {
            self.confine().own_file(file, qemu_uid)
        }
    }

    /// Brings the guest in line with its volume slots once its agent answers: detaches stale mounts of
    /// volumes that are not part of this machine any more, frees the slots nothing holds, and mounts
    /// attached volumes that are not mounted yet. Does nothing (no guest round trip) when all is settled.
    pub(crate) async fn settle_volumes(&self, sb_id: &str, vm: &Vm) -> Result<()> {
        let Some(mut layout) = self.db().layout(sb_id)? else {
            return Ok(());
        };
        let pending = |s: &VolumeSlot| {
            matches!(
                s,
                VolumeSlot::Stale { .. } | VolumeSlot::Attached { mounted: false, .. }
            )
        };
        if !layout.volume_slots.iter().any(pending) {
            return Ok(());
        }
        let agent = vm.agent(Duration::from_secs(20)).await?;
        let mut detach = Vec::new();
        let mut serials = Vec::new();
        for (i, slot) in layout.volume_slots.iter_mut().enumerate() {
            if let VolumeSlot::Stale { path, released } = slot {
                if !*released {
                    detach.push(path.clone());
                    *released = true;
                }
                serials.push(kiln_vmm::volume_serial(i));
            }
        }
        if !serials.is_empty() {
            let free = agent
                .release_volumes(&detach, &serials)
                .await
                .map_err(|e| agent_error(e, &vm.name))?;
            for (i, slot) in layout.volume_slots.iter_mut().enumerate() {
                if free.contains(&kiln_vmm::volume_serial(i)) {
                    *slot = VolumeSlot::Empty;
                }
            }
            self.db().set_layout(sb_id, &layout)?;
        }
        for i in 0..layout.volume_slots.len() {
            let VolumeSlot::Attached {
                volume,
                path,
                read_only,
                mounted: false,
                rescan,
                ..
            } = &layout.volume_slots[i]
            else {
                continue;
            };
            agent
                .mount_volume(&kiln_vmm::volume_serial(i), path, *read_only, *rescan)
                .await
                .map_err(|e| {
                    Error::new(
                        ErrorCode::GuestError,
                        format!(
                            "the guest could not mount volume {volume} at {path}: {}",
                            agent_error(e, &vm.name).message
                        ),
                    )
                })?;
            if let VolumeSlot::Attached {
                mounted, rescan, ..
            } = &mut layout.volume_slots[i]
            {
                *mounted = true;
                *rescan = false;
            }
            self.db().set_layout(sb_id, &layout)?;
        }
        Ok(())
    }

    /// Before a running machine with volumes is thrown away (delete, roll back): have the guest write its
    /// cached volume data out, so what was written to a volume survives its sandbox. Best effort: a guest
    /// that does not answer in time loses only what it had not flushed.
    pub(crate) async fn flush_volumes(&self, sb: &crate::model::Sandbox, vm: &Vm) {
        if sb.volumes.is_empty() || sb.state != crate::model::SandboxState::Running {
            return;
        }
        let flushed = tokio::time::timeout(Duration::from_secs(10), async {
            let agent = vm.agent(Duration::from_secs(5)).await?;
            agent.sync().await.map_err(|e| agent_error(e, &vm.name))
        })
        .await;
        if !matches!(flushed, Ok(Ok(()))) {
            warn!(sandbox = %sb.id, "could not flush the guest's volume data before stopping it");
        }
    }

    /// Once the VM of a deleted sandbox is gone: gives its read-write volumes back to root (`root:root
    /// 0600`, through a descriptor opened without following links). VM uids are recycled, and a later
    /// VM that gets the same number must not be able to open a volume it was never given.
    pub(crate) fn reclaim_volumes(&self, mounts: &[VolumeMount]) {
        use kiln_vmm::safefs;
        for m in mounts.iter().filter(|m| !m.read_only) {
            let file = self.volume_file(&m.volume);
            match safefs::open_read(&file).and_then(|f| safefs::fchown_mode(&f, 0, 0, 0o600)) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    warn!(volume = %m.volume, error = %e, "could not take the volume back from its VM's uid")
                }
            }
        }
    }

    /// After a crash during `create_volume`: removes half-made volumes, and records a finished one whose
    /// row was not written yet (its data is never thrown away).
    pub(crate) fn clean_volume_debris(&self) {
        let Ok(entries) = std::fs::read_dir(self.config().volumes_dir()) else {
            return;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with(".tmp-") {
                let _ = fsutil::remove_dir_durably(&e.path());
                continue;
            }
            let known = self.db().find_volume(&name).map(|v| v.is_some());
            let Ok(size) = std::fs::metadata(e.path().join("volume.img")).map(|m| m.len()) else {
                continue;
            };
            if matches!(known, Ok(false)) && validate::is_valid_name(&name) {
                let vol = Volume {
                    name: name.clone(),
                    size_bytes: size,
                    allocated_bytes: 0,
                    labels: BTreeMap::new(),
                    created_at: now_rfc3339(),
                    attachments: Vec::new(),
                };
                match self.db().insert_volume(&vol) {
                    Ok(()) => {
                        info!(volume = %name, "recorded a volume made just before kiln stopped")
                    }
                    Err(e) => warn!(volume = %name, error = %e, "cannot record volume"),
                }
            }
        }
    }
}

fn volume_not_found(name: &str) -> Error {
    Error::new(
        ErrorCode::VolumeNotFound,
        format!("no volume is named '{name}'; list volumes with `kiln volume list` or create it with `kiln volume create {name}`"),
    )
}

/// A sparse file of `size` bytes holding an empty ext4 filesystem, in a new directory `dir`.
fn make_ext4(dir: &Path, label: &str, size: u64) -> Result<()> {
    std::fs::create_dir_all(dir)
        .map_err(|e| fsutil::io_error(&format!("creating {}", dir.display()), e))?;
    let file = dir.join("volume.img");
    std::fs::File::create(&file)
        .and_then(|f| f.set_len(size))
        .map_err(|e| fsutil::io_error(&format!("creating {}", file.display()), e))?;
    // ext4 labels hold 16 bytes.
    let label: String = label.chars().take(16).collect();
    let out = std::process::Command::new("mkfs.ext4")
        .args(["-q", "-F", "-m", "0", "-L", &label])
        .args(["-E", "lazy_itable_init=1,lazy_journal_init=1"])
        .arg(&file)
        .output()
        .map_err(|e| {
            Error::internal(format!(
                "cannot run mkfs.ext4 ({e}); install e2fsprogs (`make deps` does)"
            ))
        })?;
    if !out.status.success() {
        return Err(fsutil::tool_error(
            &format!("mkfs.ext4 failed on {}", file.display()),
            &out.stderr,
        ));
    }
    fsutil::fsync_path(&file)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volume_flags_parse() {
        let m: VolumeMount = "data:/data".parse().unwrap();
        assert_eq!(
            (m.volume.as_str(), m.path.as_str(), m.read_only),
            ("data", "/data", false)
        );
        let m: VolumeMount = "cache:/var/cache/x:ro".parse().unwrap();
        assert_eq!(
            (m.volume.as_str(), m.path.as_str(), m.read_only),
            ("cache", "/var/cache/x", true)
        );
        assert!("nopath".parse::<VolumeMount>().is_err());
        assert!("a:/b:rx".parse::<VolumeMount>().is_err());
    }
}
