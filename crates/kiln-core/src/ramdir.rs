//! Where the RAM of a sandbox that owns it (booted from a template or a disk snapshot) lives while its VM
//! runs: a file on a tmpfs, not on the data disk. A shared file mapping on a disk filesystem is written
//! back continuously while the guest dirties memory; on tmpfs it never touches the disk. It stays a named
//! file, so QEMU's migration skips it (`x-ignore-shared`) and a snapshot copies it hole-preserving. A stop
//! (hibernation) copies it to the sandbox directory on the data disk; a start copies it back.
//!
//! By default kiln mounts a tmpfs of its own at `<data>/ram` (`root 0711`: VMs pass through to their own
//! `uid:uid 0600` file, can list and create nothing), reused as it is after a daemon restart, since running
//! VMs' RAM is there. `kiln serve --ram-dir DIR` uses an existing directory instead, `--ram-dir disk` keeps
//! RAM on the data disk as before.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use tracing::{info, warn};

use crate::engine::Engine;
use crate::error::{Error, ErrorCode, Result};
use crate::fsutil;
use crate::layout::{Layout, Memory};
use crate::model::Sandbox;

/// `kiln serve --ram-dir`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RamPlacement {
    /// A tmpfs kiln mounts at `<data>/ram` (falls back to the data disk where mounting is not allowed).
    Auto,
    /// An existing directory (normally on a tmpfs the administrator mounted).
    Dir(PathBuf),
    /// On the data disk, next to the sandbox's other files.
    Disk,
}

impl std::str::FromStr for RamPlacement {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" | "" => Ok(RamPlacement::Auto),
            "disk" => Ok(RamPlacement::Disk),
            p if p.starts_with('/') => Ok(RamPlacement::Dir(PathBuf::from(p))),
            other => Err(format!(
                "--ram-dir takes auto, disk or an absolute directory path, not '{other}'"
            )),
        }
    }
}

const TMPFS_MAGIC: i64 = 0x0102_1994;
const SUFFIX: &str = ".ram";

pub struct RamDir {
    /// None: RAM stays on the data disk.
    dir: Option<PathBuf>,
    /// kiln mounted it (unmounted at exit when no VM uses it).
    mounted: bool,
    /// Held across "is there room" and creating the file that takes it.
    room: std::sync::Mutex<()>,
}

impl RamDir {
    pub fn disk() -> RamDir {
        RamDir {
            dir: None,
            mounted: false,
            room: Default::default(),
        }
    }

    /// Prepares the RAM directory. `size_mib` sizes kiln's own tmpfs; `huge` asks it for transparent huge
    /// pages (worth it under KVM; under TCG they only round each guest's RAM up to 2 MiB pieces).
    pub fn setup(
        data_dir: &Path,
        placement: &RamPlacement,
        size_mib: u64,
        huge: bool,
    ) -> Result<RamDir> {
        let dir = match placement {
            RamPlacement::Disk => return Ok(RamDir::disk()),
            RamPlacement::Dir(dir) => {
                check_dir(dir)?;
                if statfs_type(dir) != Some(TMPFS_MAGIC) {
                    warn!(dir = %dir.display(), "the RAM directory is not on a tmpfs: guest RAM written there may be written back to a disk");
                }
                return Ok(RamDir {
                    dir: Some(dir.clone()),
                    mounted: false,
                    room: Default::default(),
                });
            }
            RamPlacement::Auto => data_dir.join("ram"),
        };
        if let Err(e) = std::fs::create_dir(&dir) {
            if e.kind() != std::io::ErrorKind::AlreadyExists {
                return Err(fsutil::io_error(&format!("creating {}", dir.display()), e));
            }
        }
        if is_mount_point(&dir) && statfs_type(&dir) == Some(TMPFS_MAGIC) {
            // A previous daemon's: running VMs' RAM is in it.
            info!(dir = %dir.display(), "guest RAM on kiln's tmpfs (mounted by an earlier daemon)");
        } else if let Err(e) = mount_tmpfs(&dir, size_mib, huge) {
            warn!(dir = %dir.display(), error = %e, "could not mount a tmpfs for guest RAM, so it stays on the data disk (the host writes it back while guests run); run kiln as root, or give --ram-dir DIR on a tmpfs");
            return Ok(RamDir::disk());
        } else {
            info!(dir = %dir.display(), size_mib, huge, "guest RAM on a tmpfs kiln mounted");
        }
        Ok(RamDir {
            dir: Some(dir),
            mounted: true,
            room: Default::default(),
        })
    }

    /// The directory, or None when RAM stays on the data disk.
    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }

    /// Where a sandbox's running RAM goes (None: on the data disk).
    pub fn live_path(&self, id: &str) -> Option<PathBuf> {
        self.dir.as_ref().map(|d| d.join(format!("{id}{SUFFIX}")))
    }

    /// Creates `path` for a machine of `machine_mib` whose guest is given `memory_mib` (less with
    /// headroom: the balloon holds the rest): a fresh empty file of the machine's size, or a
    /// hole-preserving copy of `from`. Refused when the directory cannot hold `memory_mib` more.
    fn create(
        &self,
        path: &Path,
        machine_mib: u64,
        memory_mib: u64,
        admitted: &Admitted,
        from: Option<&Path>,
    ) -> Result<()> {
        let _room = self.room.lock().unwrap_or_else(|p| p.into_inner());
        // Whatever had the name (a previous run's file) goes first; it would count against the room.
        let _ = std::fs::remove_file(path);
        self.check_room(memory_mib, admitted)?;
        let made = match from {
            None => kiln_vmm::safefs::create_new(path, 0o600)
                .and_then(|f| f.set_len(machine_mib << 20))
                .map_err(|e| fsutil::io_error(&format!("creating {}", path.display()), e)),
            Some(src) => kiln_vmm::memory::sparse_copy(src, path)
                .map(drop)
                .map_err(crate::snapshot::capture::storage_error),
        };
        if made.is_err() {
            let _ = std::fs::remove_file(path);
        }
        made
    }

    /// Creates `path` for a copy of `from` (sized at once, so QEMU may map it) and fills it with `from`'s
    /// data in the background; the copy must have finished before the guest's state is loaded.
    fn create_filling(
        &self,
        path: &Path,
        memory_mib: u64,
        admitted: &Admitted,
        from: &Path,
    ) -> Result<RamFill> {
        let _room = self.room.lock().unwrap_or_else(|p| p.into_inner());
        let _ = std::fs::remove_file(path);
        self.check_room(memory_mib, admitted)?;
        let len = std::fs::metadata(from)
            .map_err(|e| fsutil::io_error(&format!("stat {}", from.display()), e))?
            .len();
        let file = kiln_vmm::safefs::create_new(path, 0o600)
            .and_then(|f| f.set_len(len).map(|()| f))
            .map_err(|e| {
                let _ = std::fs::remove_file(path);
                fsutil::io_error(&format!("creating {}", path.display()), e)
            })?;
        let (src, dst) = (from.to_path_buf(), path.to_path_buf());
        Ok(tokio::task::spawn_blocking(move || {
            kiln_vmm::memory::sparse_copy_into(&src, &file, &dst)
                .map(drop)
                .map_err(crate::snapshot::capture::storage_error)
        }))
    }

    /// Guest RAM is allocated lazily as the guest touches it, and a guest that touches a page the tmpfs
    /// has no room for kills its QEMU (SIGBUS). So a new file is admitted only if the free space covers
    /// it and what the files already there may still grow by: up to their length, or up to the memory
    /// their guest is given (`admitted`, by sandbox id) where that is less (a machine with headroom, whose
    /// balloon holds the rest and whose cgroup caps what it may touch).
    fn check_room(&self, memory_mib: u64, admitted: &Admitted) -> Result<()> {
        let Some(dir) = &self.dir else {
            return Ok(());
        };
        let free = free_bytes(dir).map_err(|e| {
            fsutil::io_error(&format!("checking free space in {}", dir.display()), e)
        })?;
        let mut growth = 0u64;
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            if let Ok(m) = entry.metadata() {
                if m.is_file() {
                    let name = entry.file_name();
                    let given = name
                        .to_str()
                        .and_then(|n| n.strip_suffix(SUFFIX))
                        .and_then(|id| admitted.get(id))
                        .map_or(m.len(), |mib| m.len().min(mib << 20));
                    growth += given.saturating_sub(m.blocks() * 512);
                }
            }
        }
        let need = memory_mib << 20;
        if free < growth.saturating_add(need) {
            return Err(Error::new(
                ErrorCode::InsufficientStorage,
                format!(
                    "the RAM directory {} has {} MiB free, running guests may still fill {} MiB of it, and this sandbox needs {memory_mib} MiB; {}",
                    dir.display(),
                    free >> 20,
                    growth >> 20,
                    if self.mounted {
                        "start kiln serve with a larger --ram-size, or delete or stop sandboxes"
                    } else {
                        "make that tmpfs larger (mount -o remount,size=...), give --ram-dir another directory, or delete or stop sandboxes"
                    }
                ),
            ));
        }
        Ok(())
    }

    pub fn remove(&self, id: &str) {
        if let Some(p) = self.live_path(id) {
            if let Err(e) = fsutil::remove_file_durably(&p) {
                warn!(file = %p.display(), error = %e.message, "could not remove a guest RAM file");
            }
        }
    }

    /// RAM files whose sandbox has no VM any more (`keep` says which do): left by a daemon that died
    /// between a stop's save and removing the file, or by a VM that died. Run at start-up.
    pub fn sweep(&self, keep: impl Fn(&str) -> bool) {
        let Some(dir) = &self.dir else { return };
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(id) = name.strip_suffix(SUFFIX) else {
                continue;
            };
            if !keep(id) {
                info!(file = %entry.path().display(), "removing the RAM file of a sandbox without a VM");
                let _ = fsutil::remove_file_durably(&entry.path());
            }
        }
    }

    /// At daemon exit: kiln's own tmpfs is unmounted when no VM's RAM is in it (VMs outlive the daemon).
    pub fn shutdown(&self) {
        let (true, Some(dir)) = (self.mounted, &self.dir) else {
            return;
        };
        let in_use = std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .any(|e| e.file_name().to_string_lossy().ends_with(SUFFIX));
        if !in_use {
            if let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()) {
                // SAFETY: umount2 with a valid C string.
                unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
            }
        }
    }
}

impl Engine {
    /// Memory each sandbox's guest is given, by id: what its RAM file is admitted for.
    fn ram_admitted(&self) -> Result<Admitted> {
        Ok(self
            .db()
            .list_sandboxes()?
            .into_iter()
            .map(|s| (s.id, s.memory_mib))
            .collect())
    }

    /// Owned RAM for a new sandbox: its file on the RAM directory (or on the data disk), empty.
    /// `machine_mib` is the RAM QEMU maps (more than `memory_mib` when the machine has headroom); the
    /// RAM directory admits it for `memory_mib`.
    pub(crate) fn owned_memory(&self, sb: &Sandbox, machine_mib: u64) -> Result<Memory> {
        let file = self.config().sandbox_dir(&sb.id).join("memory");
        let live = self.ram().live_path(&sb.id);
        match &live {
            Some(path) => {
                let admitted = self.ram_admitted()?;
                self.ram()
                    .create(path, machine_mib, sb.memory_mib, &admitted, None)?;
                self.confine().own_file(path, sb.qemu_uid)?;
            }
            None => self.create_memory_file(sb, &file)?,
        }
        Ok(Memory::Owned { file, live })
    }

    /// Before a stopped sandbox starts: its saved RAM (on the data disk) is copied to the RAM directory,
    /// and the layout says where. The copy runs while QEMU starts (which maps the file but touches no
    /// guest RAM while it waits for its incoming state); `Incoming::ram_fill` is awaited before the load.
    /// Some when a copy is being made (the caller removes it if the start fails, and the saved file once
    /// the VM runs).
    pub(crate) fn place_saved_ram(
        &self,
        sb: &Sandbox,
        layout: &mut Layout,
    ) -> Result<Option<RamFill>> {
        let Memory::Owned { file, live } = &mut layout.memory else {
            return Ok(None);
        };
        let target = self.ram().live_path(&sb.id);
        let fill = match &target {
            Some(path) => {
                // Admitted for the memory the guest is given (the balloon holds the rest of the file).
                let admitted = self.ram_admitted()?;
                let fill = self
                    .ram()
                    .create_filling(path, sb.memory_mib, &admitted, file)?;
                if let Err(e) = self.confine().own_file(path, sb.qemu_uid) {
                    fill.abort();
                    return Err(e);
                }
                Some(fill)
            }
            None => None,
        };
        *live = target.clone();
        self.db().set_layout(&sb.id, layout)?;
        Ok(fill)
    }
}

/// Memory in MiB each sandbox's guest is given, by sandbox id (see `RamDir::check_room`).
pub(crate) type Admitted = std::collections::HashMap<String, u64>;

/// A RAM file being filled in the background (`place_saved_ram`).
pub(crate) type RamFill = tokio::task::JoinHandle<Result<()>>;

/// Starts copying a stopped VM's RAM from the RAM directory to `<file>.tmp` on the data disk, in the
/// background (while its device state is saved), with writeback started as it goes. None when the RAM
/// already is on the data disk (or is a snapshot's, mapped privately).
pub(crate) fn start_ram_save(memory: &Memory) -> Option<RamFill> {
    let Memory::Owned {
        file,
        live: Some(live),
    } = memory
    else {
        return None;
    };
    let (live, tmp) = (live.clone(), file.with_extension("tmp"));
    Some(tokio::task::spawn_blocking(move || {
        let _ = std::fs::remove_file(&tmp);
        kiln_vmm::memory::sparse_copy_inspect(&live, &tmp, |_, _| {})
            .map(drop)
            .map_err(crate::snapshot::capture::storage_error)
    }))
}

/// Makes the RAM saved by [`start_ram_save`] durable under its name (fsync, rename, fsync of the
/// directory); without a RAM directory the file is already there and is synced.
pub(crate) fn publish_saved_ram(memory: &Memory) -> Result<()> {
    match memory {
        Memory::Owned {
            file,
            live: Some(_),
        } => fsutil::publish(&file.with_extension("tmp"), file),
        Memory::Owned { file, live: None } => fsutil::fsync_path(file),
        Memory::Private { .. } => Ok(()),
    }
}

fn check_dir(dir: &Path) -> Result<()> {
    let bad = |why: String| {
        Error::new(
            ErrorCode::Internal,
            format!("--ram-dir {}: {why}", dir.display()),
        )
    };
    let m = std::fs::symlink_metadata(dir).map_err(|e| bad(e.to_string()))?;
    if !m.is_dir() {
        return Err(bad("not a directory".into()));
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        // Root acts on files there by path: no VM uid (nor anyone else) may create entries in it.
        if m.uid() != 0 || m.mode() & 0o022 != 0 {
            return Err(bad(format!("must be root's and writable by root alone (it is uid {} mode {:o}); e.g. `mkdir -m 0711 /dev/shm/kiln`", m.uid(), m.mode() & 0o7777)));
        }
        if m.mode() & 0o001 == 0 {
            return Err(bad(format!(
                "VMs must be able to pass through it (mode {:o}; use 0711)",
                m.mode() & 0o7777
            )));
        }
    }
    Ok(())
}

// The libc field types differ between architectures.
#[allow(clippy::unnecessary_cast)]
fn statfs_type(dir: &Path) -> Option<i64> {
    let c = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()).ok()?;
    // SAFETY: statfs into a zeroed struct with a valid C string.
    unsafe {
        let mut s: libc::statfs = std::mem::zeroed();
        (libc::statfs(c.as_ptr(), &mut s) == 0).then_some(s.f_type as i64)
    }
}

#[allow(clippy::unnecessary_cast)]
fn free_bytes(dir: &Path) -> std::io::Result<u64> {
    let c = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes())
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    // SAFETY: statvfs into a zeroed struct with a valid C string.
    unsafe {
        let mut s: libc::statvfs = std::mem::zeroed();
        if libc::statvfs(c.as_ptr(), &mut s) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(s.f_bavail as u64 * s.f_frsize as u64)
    }
}

fn is_mount_point(dir: &Path) -> bool {
    match (std::fs::metadata(dir), dir.parent().map(std::fs::metadata)) {
        (Ok(d), Some(Ok(p))) => d.dev() != p.dev(),
        _ => false,
    }
}

fn mount_tmpfs(dir: &Path, size_mib: u64, huge: bool) -> std::io::Result<()> {
    let target = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes())
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    let flags = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    let attempt = |huge: bool| {
        let opts = format!(
            "size={size_mib}m,mode=0711{}",
            if huge { ",huge=within_size" } else { "" }
        );
        let data = std::ffi::CString::new(opts).expect("no NUL in mount options");
        // SAFETY: mount(2) with valid C strings.
        let r = unsafe {
            libc::mount(
                c"tmpfs".as_ptr(),
                target.as_ptr(),
                c"tmpfs".as_ptr(),
                flags,
                data.as_ptr().cast(),
            )
        };
        if r == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    };
    match attempt(huge) {
        // A kernel without huge pages for tmpfs refuses the option.
        Err(e) if huge && e.raw_os_error() == Some(libc::EINVAL) => attempt(false),
        r => r,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placement_parses() {
        assert_eq!("auto".parse::<RamPlacement>().unwrap(), RamPlacement::Auto);
        assert_eq!("disk".parse::<RamPlacement>().unwrap(), RamPlacement::Disk);
        assert_eq!(
            "/dev/shm/kiln".parse::<RamPlacement>().unwrap(),
            RamPlacement::Dir("/dev/shm/kiln".into())
        );
        assert!("relative".parse::<RamPlacement>().is_err());
    }

    #[test]
    fn room_counts_what_existing_files_may_still_grow_by() {
        let dir = tempfile::tempdir().unwrap();
        let ram = RamDir {
            dir: Some(dir.path().to_path_buf()),
            mounted: true,
            room: Default::default(),
        };
        let half = (free_bytes(dir.path()).unwrap() >> 20) / 2;
        // A sparse file of half the free space takes no blocks but claims them.
        let big = dir.path().join("a.ram");
        let none = Admitted::new();
        ram.create(&big, half, half, &none, None).unwrap();
        let e = ram
            .create(
                &dir.path().join("b.ram"),
                half + 1024,
                half + 1024,
                &none,
                None,
            )
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::InsufficientStorage);
        assert!(e.message.contains("--ram-size"), "{}", e.message);
        assert_eq!(std::fs::metadata(&big).unwrap().len(), half << 20);
        assert!(!dir.path().join("b.ram").exists());
        std::fs::remove_file(&big).unwrap();
        ram.create(&dir.path().join("b.ram"), 64, 64, &none, None)
            .unwrap();
    }

    #[test]
    fn a_machine_with_headroom_is_admitted_for_the_memory_its_guest_is_given() {
        let dir = tempfile::tempdir().unwrap();
        let ram = RamDir {
            dir: Some(dir.path().to_path_buf()),
            mounted: true,
            room: Default::default(),
        };
        let free = free_bytes(dir.path()).unwrap() >> 20;
        let quarter = free / 4;
        // A file three quarters of the free space long whose guest is given a quarter...
        let admitted: Admitted = [("a".to_string(), quarter)].into();
        ram.create(
            &dir.path().join("a.ram"),
            3 * quarter,
            quarter,
            &admitted,
            None,
        )
        .unwrap();
        // ... leaves room for another half, not only for a quarter.
        ram.create(
            &dir.path().join("b.ram"),
            free / 2,
            free / 2 - 64,
            &admitted,
            None,
        )
        .unwrap();
        std::fs::remove_file(dir.path().join("b.ram")).unwrap();
        // Counted at its length, it would not have.
        let e = ram
            .create(
                &dir.path().join("b.ram"),
                free / 2,
                free / 2 - 64,
                &Admitted::new(),
                None,
            )
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::InsufficientStorage);
    }
}
