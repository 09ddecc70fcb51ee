//! The snapshot format: a directory holding the files and `manifest.json`, which names every file with its
//! size and checksum and records what the snapshot needs to be restored (versions, machine, accelerator,
//! kernel, resources). A snapshot directory appears under its final name only once complete (written in a
//! temporary directory, fsynced, renamed), so a crash leaves either no snapshot or a whole one.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::SnapshotType;
use crate::error::{Error, ErrorCode, Result};
use crate::fsutil;

/// The newest snapshot format this kiln reads and writes. Each snapshot is written with the oldest format that
/// can describe it, so older kilns keep reading what they can load: 2 = the machine's balloon reports free
/// pages; 3 = a snapshot of a resumed sandbox holds a `memory_delta` (its changed pages against `memory`);
/// 4 = the machine's NIC has several queue pairs (`Depends::net_queues`).
pub const FORMAT_VERSION: u32 = 4;
/// The oldest format this kiln reads.
pub const OLDEST_FORMAT_VERSION: u32 = 1;
pub const MANIFEST: &str = "manifest.json";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Device and vCPU state (QEMU migration stream without RAM).
    State,
    /// Guest RAM, a whole image (sparse).
    Memory,
    /// The pages of guest RAM that differ from `Memory` (`kiln_vmm::delta`), written into the restored
    /// VM's mapping before it runs.
    MemoryDelta,
    /// One disk layer; disk layers are listed bottom first.
    Disk,
    Kernel,
    Initrd,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    pub role: Role,
    /// Relative to the snapshot directory, or absolute for a diff snapshot's external base.
    pub path: String,
    pub size: u64,
    pub checksum: String,
    /// `raw`/`qcow2` for disk layers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<String>,
    /// Lives outside the snapshot (a diff snapshot's base); it must still exist to restore.
    #[serde(default)]
    pub external: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Source {
    pub sandbox_id: String,
    pub sandbox_name: String,
    pub hostname: String,
    pub template: String,
    pub env: BTreeMap<String, String>,
    pub mac: String,
    /// The source's network egress setting (snapshots from before it existed had egress).
    #[serde(default = "egress_default")]
    pub egress: bool,
    /// The source's published ports; copies publish the same guest ports on host ports of their own.
    #[serde(default)]
    pub ports: Vec<crate::model::PortMapping>,
    /// For a template pulled or imported from an OCI image: that image's digest (its content identity).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_digest: Option<String>,
    /// The address its guest was configured with under bridged networking (None: user networking's):
    /// a copy resumed on user networking is re-addressed only when this is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
}

fn egress_default() -> bool {
    true
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub format_version: u32,
    pub id: String,
    #[serde(rename = "type")]
    pub kind: SnapshotType,
    pub created_at: String,
    pub kiln_version: String,
    pub qemu_version: String,
    pub machine: String,
    pub cpu_model: String,
    pub accel: String,
    pub kernel_version: String,
    /// Firmware the VM was started with; QEMU must be given the same one to load the state.
    #[serde(default)]
    pub firmware: Option<PathBuf>,
    /// More of what the saved state depends on (checked by `compat::check`); absent in older manifests.
    #[serde(flatten, default)]
    pub depends: Depends,
    pub cmdline: String,
    pub memory_mib: u64,
    /// vCPUs online in the guest at capture.
    pub cpus: u32,
    /// vCPUs the machine has (`cpus` online, the rest offline): a memory snapshot resumes with any count
    /// up to this. Absent in snapshots of machines made before it existed: they resume with `cpus` only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_cpus: Option<u32>,
    /// RAM of a machine with growth headroom (it has a virtio balloon holding what `memory_mib` leaves
    /// out): a memory snapshot resumes with any `memory_mib` from its own up to this. Absent: no balloon.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_memory_mib: Option<u64>,
    pub disk_size_bytes: u64,
    pub source: Source,
    pub parent: Option<String>,
    /// A diff's pin: content identity of `parent` when the diff was taken (`Engine::base_digest`), checked
    /// before every resume or restore. Absent in manifests written before pinning: "unpinned".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_digest: Option<String>,
    pub labels: BTreeMap<String, String>,
    pub files: Vec<FileEntry>,
    /// How the `state` file was written when it holds no guest RAM (a memory delta beside it): absent for
    /// a migration stream (with its RAM section, stripped of the delta's pages or not), `devices` for
    /// QEMU's device-only save with a configuration section added. Both load the same way; recorded so
    /// tests and tools can tell them apart.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_format: Option<StateFormat>,
    /// The machine's volume slots at capture (their number is part of the machine; volumes themselves
    /// are not captured). Absent in snapshots of machines made before volumes existed.
    #[serde(default)]
    pub volume_slots: Vec<crate::layout::VolumeSlot>,
}

/// What a memory snapshot's state depends on beyond the fields above. Every field is optional: a manifest
/// written before kiln recorded it reads as "unknown", and unknown values are not checked.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Depends {
    /// QEMU `-M` machine type and options.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine_options: Option<String>,
    /// CPU feature flags the guest saw (on flags of `cpu_model`, sorted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_features: Option<Vec<String>>,
    /// Checksum of the `firmware` file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub firmware_checksum: Option<String>,
    /// The guest CPU's vendor/family/model/stepping, physical address bits, TSC frequency and whether the
    /// recording host could scale the TSC.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_identity: Option<kiln_vmm::cpu::Identity>,
    /// The machine's balloon reports free pages (a virtio feature and queue in its saved state). Such
    /// snapshots are written as format 2, which older kilns refuse instead of loading them into a
    /// balloon without it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub free_page_reporting: Option<bool>,
    /// Queue pairs of the machine's NIC when more than one (multiqueue on bridged networking): the
    /// count is in the NIC's saved state, so a restore builds its NIC to match, which only a TAP can.
    /// Written as format 4, which older kilns refuse. Absent: one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub net_queues: Option<u32>,
}

/// How a RAM-less state was saved (see `Manifest::state_format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StateFormat {
    /// A migration stream (never written into a manifest: it is what an absent field means).
    Stream,
    /// `xen-save-devices-state` plus a configuration section (`kiln_vmm::devstate`).
    Devices,
}

/// Just the format version, read before anything else: a newer format may change the rest.
#[derive(Deserialize)]
struct VersionOnly {
    format_version: u32,
}

impl FileEntry {
    /// A template's rootfs as the external disk a snapshot made on it builds on.
    pub fn template_rootfs(image: &kiln_image::Image) -> FileEntry {
        FileEntry {
            role: Role::Disk,
            path: image.rootfs.to_string_lossy().into_owned(),
            size: image.manifest.files.rootfs.size,
            checksum: format!("sha256:{}", image.manifest.files.rootfs.sha256),
            format: Some("raw".into()),
            external: true,
        }
    }
}

impl Manifest {
    /// The format a snapshot of this machine is written as: the oldest that describes it.
    pub fn format_for(depends: &Depends, max_memory_mib: Option<u64>, has_delta: bool) -> u32 {
        if depends.net_queues.is_some_and(|n| n > 1) {
            4
        } else if has_delta {
            3
        } else if depends.free_page_reporting == Some(true) && max_memory_mib.is_some() {
            2
        } else {
            1
        }
    }

    pub fn file(&self, role: Role) -> Option<&FileEntry> {
        self.files.iter().find(|f| f.role == role)
    }

    pub fn disks(&self) -> impl Iterator<Item = &FileEntry> {
        self.files.iter().filter(|f| f.role == Role::Disk)
    }

    /// Absolute path of an entry.
    pub fn resolve(&self, dir: &Path, entry: &FileEntry) -> PathBuf {
        if entry.external {
            PathBuf::from(&entry.path)
        } else {
            dir.join(&entry.path)
        }
    }

    /// `entry` of this snapshot (in `dir`) as an external entry of a snapshot built on it.
    pub fn external(&self, dir: &Path, entry: &FileEntry) -> FileEntry {
        FileEntry {
            path: self.resolve(dir, entry).to_string_lossy().into_owned(),
            external: true,
            ..entry.clone()
        }
    }

    /// Writes `manifest.json` with a trailing checksum line of the JSON, so a torn or edited manifest is
    /// detected.
    pub fn write(&self, dir: &Path) -> Result<()> {
        fsutil::write_atomic(&dir.join(MANIFEST), self.to_doc()?.as_bytes())
    }

    /// The text of `manifest.json`: the JSON and its checksum line.
    pub(super) fn to_doc(&self) -> Result<String> {
        let json =
            serde_json::to_string_pretty(self).map_err(|e| Error::internal(e.to_string()))?;
        Ok(format!(
            "{json}\n# checksum {}\n",
            fsutil::checksum_bytes(json.as_bytes())
        ))
    }

    pub fn read(dir: &Path, id: &str) -> Result<Manifest> {
        let path = dir.join(MANIFEST);
        let text = std::fs::read_to_string(&path).map_err(|e| {
            corrupt(
                id,
                format!("its manifest {} cannot be read ({e})", path.display()),
            )
        })?;
        let m = Self::parse_unchecked(&text, id)?;
        super::validate::check(&m, dir, id)?;
        Ok(m)
    }

    /// The manifest in `text` (format version and checksum line checked), its fields not yet validated:
    /// callers run `validate::check` (a bundle's import first maps its base to this host's files).
    pub(super) fn parse_unchecked(text: &str, id: &str) -> Result<Manifest> {
        let head = text.rsplit_once("\n# checksum ").map_or(text, |(j, _)| j);
        if let Ok(v) = serde_json::from_str::<VersionOnly>(head) {
            if v.format_version > FORMAT_VERSION {
                return Err(Error::new(
                    ErrorCode::SnapshotIncompatible,
                    format!(
                        "snapshot {id} was written by a newer kiln (snapshot format {}; this kiln reads up to {FORMAT_VERSION}); upgrade kiln to restore it",
                        v.format_version
                    ),
                ));
            }
        }
        let (json, tail) = text
            .rsplit_once("\n# checksum ")
            .ok_or_else(|| corrupt(id, "its manifest has no checksum line (truncated?)".into()))?;
        if fsutil::checksum_bytes(json.as_bytes()) != tail.trim() {
            return Err(corrupt(
                id,
                "its manifest does not match its checksum (modified or truncated)".into(),
            ));
        }
        let m: Manifest = serde_json::from_str(json)
            .map_err(|e| corrupt(id, format!("its manifest is not valid ({e})")))?;
        if !(OLDEST_FORMAT_VERSION..=FORMAT_VERSION).contains(&m.format_version) {
            return Err(Error::new(
                ErrorCode::SnapshotIncompatible,
                format!(
                    "snapshot {id} uses format version {}, this kiln reads version {FORMAT_VERSION}; restore it with a matching kiln",
                    m.format_version
                ),
            ));
        }
        Ok(m)
    }

    /// Checks the device-state file's checksum (when it is small enough to hash on every use).
    pub fn verify_state(&self, dir: &Path) -> Result<()> {
        const EVERY_TIME_UP_TO: u64 = 16 << 20;
        let Some(f) = self
            .file(Role::State)
            .filter(|f| f.size <= EVERY_TIME_UP_TO)
        else {
            return Ok(());
        };
        let path = self.resolve(dir, f);
        if fsutil::matches_checksum(&path, &f.checksum)? {
            return Ok(());
        }
        Err(corrupt(
            &self.id,
            format!(
                "its device state {} does not match its checksum",
                path.display()
            ),
        ))
    }

    /// Checks that every file exists with its recorded size; with `deep`, also its checksum. External bases
    /// that are gone produce `snapshot_base_missing` naming the path.
    pub fn verify(&self, dir: &Path, deep: bool) -> Result<()> {
        for f in &self.files {
            let path = self.resolve(dir, f);
            // Own files are not followed: a symlink or FIFO planted in the directory is not the file.
            let meta = if f.external {
                std::fs::metadata(&path)
            } else {
                std::fs::symlink_metadata(&path).and_then(|m| {
                    if m.is_file() {
                        Ok(m)
                    } else {
                        Err(std::io::Error::other("not a regular file"))
                    }
                })
            };
            let meta = match meta {
                Ok(m) => m,
                Err(_) if f.external => {
                    return Err(Error::new(
                        ErrorCode::SnapshotBaseMissing,
                        format!(
                            "diff snapshot {} needs its base {} which no longer exists (its parent {} was deleted or rebuilt); restore a full snapshot instead, and take `--type full` snapshots when bases may go away",
                            self.id,
                            path.display(),
                            self.parent.as_deref().unwrap_or("?")
                        ),
                    ))
                }
                Err(e) => return Err(corrupt(&self.id, format!("file {} is missing ({e})", path.display()))),
            };
            if meta.len() != f.size {
                let code = if f.external {
                    ErrorCode::SnapshotBaseMissing
                } else {
                    ErrorCode::SnapshotCorrupt
                };
                return Err(Error::new(
                    code,
                    format!(
                        "snapshot {}: {} is {} bytes, expected {} (truncated or replaced); the snapshot cannot be restored",
                        self.id,
                        path.display(),
                        meta.len(),
                        f.size
                    ),
                ));
            }
            if deep && !fsutil::matches_checksum(&path, &f.checksum)? {
                let code = if f.external {
                    ErrorCode::SnapshotBaseMissing
                } else {
                    ErrorCode::SnapshotCorrupt
                };
                return Err(Error::new(
                    code,
                    format!(
                        "snapshot {}: {} does not match its checksum (corrupted{}); the snapshot cannot be restored",
                        self.id,
                        path.display(),
                        if f.external { ", or the base was rebuilt" } else { "" }
                    ),
                ));
            }
        }
        Ok(())
    }
}

pub(super) fn corrupt(id: &str, why: String) -> Error {
    Error::new(
        ErrorCode::SnapshotCorrupt,
        format!("snapshot {id} is damaged: {why}; delete it and take a new one"),
    )
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn sample(dir: &Path) -> Manifest {
        std::fs::write(dir.join("state"), b"device state").unwrap();
        Manifest {
            format_version: FORMAT_VERSION,
            id: "s1".into(),
            kind: SnapshotType::Full,
            created_at: "now".into(),
            kiln_version: "0".into(),
            qemu_version: "10".into(),
            machine: "microvm".into(),
            cpu_model: "max".into(),
            accel: "tcg".into(),
            kernel_version: "6.12".into(),
            firmware: None,
            depends: Depends::default(),
            cmdline: "c".into(),
            memory_mib: 256,
            cpus: 1,
            max_cpus: Some(2),
            max_memory_mib: None,
            disk_size_bytes: 1,
            source: Source {
                sandbox_id: "sb".into(),
                sandbox_name: "n".into(),
                hostname: "n".into(),
                template: "tiny".into(),
                env: Default::default(),
                mac: "52:54:00:12:34:56".into(),
                egress: true,
                address: None,
                ports: vec![],
                image_digest: None,
            },
            parent: None,
            base_digest: None,
            labels: Default::default(),
            files: vec![FileEntry {
                role: Role::State,
                path: "state".into(),
                size: 12,
                checksum: fsutil::checksum_bytes(b"device state"),
                format: None,
                external: false,
            }],
            state_format: None,
            volume_slots: vec![crate::layout::VolumeSlot::Empty; 4],
        }
    }

    #[test]
    fn manifest_round_trip_and_tamper_detection() {
        let dir = tempfile::tempdir().unwrap();
        let m = sample(dir.path());
        m.write(dir.path()).unwrap();
        let back = Manifest::read(dir.path(), "s1").unwrap();
        assert_eq!(back, m);
        back.verify(dir.path(), true).unwrap();

        // A flipped byte in a file: caught by the deep check, not by the size check.
        std::fs::write(dir.path().join("state"), b"device stat!").unwrap();
        back.verify(dir.path(), false).unwrap();
        let e = back.verify(dir.path(), true).unwrap_err();
        assert_eq!(e.code, ErrorCode::SnapshotCorrupt);
        // Truncation: caught by size.
        std::fs::write(dir.path().join("state"), b"dev").unwrap();
        assert_eq!(
            back.verify(dir.path(), false).unwrap_err().code,
            ErrorCode::SnapshotCorrupt
        );

        // An edited manifest.
        let p = dir.path().join(MANIFEST);
        let text = std::fs::read_to_string(&p)
            .unwrap()
            .replace("\"memory_mib\": 256", "\"memory_mib\": 512");
        std::fs::write(&p, text).unwrap();
        assert_eq!(
            Manifest::read(dir.path(), "s1").unwrap_err().code,
            ErrorCode::SnapshotCorrupt
        );
        // A truncated one.
        std::fs::write(&p, "{").unwrap();
        assert_eq!(
            Manifest::read(dir.path(), "s1").unwrap_err().code,
            ErrorCode::SnapshotCorrupt
        );
    }

    #[test]
    fn a_newer_format_is_recognised_before_the_rest_is_parsed() {
        let dir = tempfile::tempdir().unwrap();
        // Fields this kiln does not know and a changed shape: only the version is read.
        let json = r#"{"format_version": 7, "files": "a future shape"}"#;
        let doc = format!(
            "{json}\n# checksum {}\n",
            fsutil::checksum_bytes(json.as_bytes())
        );
        std::fs::write(dir.path().join(MANIFEST), doc).unwrap();
        let e = Manifest::read(dir.path(), "s1").unwrap_err();
        assert_eq!(e.code, ErrorCode::SnapshotIncompatible);
        assert!(
            e.message.contains("newer kiln") && e.message.contains("upgrade kiln"),
            "{}",
            e.message
        );
        // Torn state file: corrupt, not incompatible.
        let m = sample(dir.path());
        m.verify_state(dir.path()).unwrap();
        std::fs::write(dir.path().join("state"), b"device stat!").unwrap();
        assert_eq!(
            m.verify_state(dir.path()).unwrap_err().code,
            ErrorCode::SnapshotCorrupt
        );
    }

    #[test]
    fn only_machines_whose_balloon_reports_free_pages_need_format_two() {
        let dir = tempfile::tempdir().unwrap();
        let mut m = sample(dir.path());
        // What older kilns wrote (and this one writes for every other machine) still reads.
        m.format_version = Manifest::format_for(&m.depends, m.max_memory_mib, false);
        assert_eq!(m.format_version, 1);
        m.write(dir.path()).unwrap();
        assert_eq!(Manifest::read(dir.path(), "s1").unwrap().format_version, 1);
        // Reporting without a balloon changes no device: still 1.
        m.depends.free_page_reporting = Some(true);
        assert_eq!(Manifest::format_for(&m.depends, None, false), 1);
        m.max_memory_mib = Some(512);
        m.format_version = Manifest::format_for(&m.depends, m.max_memory_mib, false);
        assert_eq!(m.format_version, 2);
        m.write(dir.path()).unwrap();
        let text = std::fs::read_to_string(dir.path().join(MANIFEST)).unwrap();
        assert!(text.contains("\"free_page_reporting\": true"), "{text}");
        let back = Manifest::read(dir.path(), "s1").unwrap();
        assert_eq!(back.depends.free_page_reporting, Some(true));
        m.depends.free_page_reporting = Some(false);
        assert_eq!(Manifest::format_for(&m.depends, m.max_memory_mib, false), 1);
    }

    #[test]
    fn a_multiqueue_nic_is_recorded_as_format_four_and_absent_reads_as_one_queue() {
        let dir = tempfile::tempdir().unwrap();
        let mut m = sample(dir.path());
        m.write(dir.path()).unwrap();
        let text = std::fs::read_to_string(dir.path().join(MANIFEST)).unwrap();
        assert!(!text.contains("net_queues"), "{text}");
        assert_eq!(
            Manifest::read(dir.path(), "s1").unwrap().depends.net_queues,
            None
        );
        m.depends.net_queues = Some(2);
        m.format_version = Manifest::format_for(&m.depends, m.max_memory_mib, true);
        assert_eq!(m.format_version, 4);
        m.write(dir.path()).unwrap();
        let back = Manifest::read(dir.path(), "s1").unwrap();
        assert_eq!((back.format_version, back.depends.net_queues), (4, Some(2)));
    }

    #[test]
    fn manifests_without_a_pin_read_as_unpinned() {
        let dir = tempfile::tempdir().unwrap();
        let mut m = sample(dir.path());
        m.kind = SnapshotType::Diff;
        m.parent = Some("template:tiny".into());
        m.write(dir.path()).unwrap();
        let text = std::fs::read_to_string(dir.path().join(MANIFEST)).unwrap();
        assert!(!text.contains("base_digest"), "an old-format manifest");
        assert_eq!(Manifest::read(dir.path(), "s1").unwrap().base_digest, None);
        m.base_digest = Some("sha256:ab".into());
        m.write(dir.path()).unwrap();
        let back = Manifest::read(dir.path(), "s1").unwrap();
        assert_eq!(back.base_digest.as_deref(), Some("sha256:ab"));
    }

    #[test]
    fn missing_external_base_names_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let mut m = sample(dir.path());
        m.kind = SnapshotType::Diff;
        m.parent = Some("template:tiny".into());
        m.files.push(FileEntry {
            role: Role::Disk,
            path: "/nonexistent/rootfs.img".into(),
            size: 1,
            checksum: "0".into(),
            format: Some("raw".into()),
            external: true,
        });
        let e = m.verify(dir.path(), false).unwrap_err();
        assert_eq!(e.code, ErrorCode::SnapshotBaseMissing);
        assert!(
            e.message.contains("/nonexistent/rootfs.img") && e.message.contains("full"),
            "{}",
            e.message
        );
    }
}
