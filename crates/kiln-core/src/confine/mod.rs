//! Confinement of VM processes: each sandbox's QEMU runs as a uid of its own, inside cgroups with
//! limits, under seccomp (see kiln-vmm's `launch`), and is kept off the host's own addresses by firewall
//! rules (`netguard`).
//!
//! File access model (per-sandbox uids):
//! - `<data>` is traversable (o+x), `<data>/sandboxes` is 0711 (no listing), `<data>/snapshots` is 0700:
//!   a QEMU reaches only its own sandbox directory, which is `uid:uid 0700`.
//! - What a sandbox writes (top disk layer, RAM file, saved state, sockets, logs) is `uid:uid 0600`.
//! - Immutable files shared through hard links (frozen disk layers, snapshot RAM and state) are
//!   `root:kiln-qemu 0640`; every QEMU has `kiln-qemu` as a supplementary group, and reaches such a file only
//!   through a link in its own directory, so it can read what it was given and write none of it.
//!
//! The uids come from a reserved range without passwd entries (like systemd's dynamic users), picked at
//! random per sandbox and stored with it.

pub mod cgroup;
pub mod netguard;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use tracing::{info, warn};

use crate::error::{Error, ErrorCode, Result};
use crate::fsutil;
use kiln_vmm::safefs;

/// The system group created by `scripts/install-deps.sh` (`useradd --system kiln-qemu`).
pub const QEMU_GROUP: &str = "kiln-qemu";
/// First uid of the range kiln hands to VM processes, and its size.
pub const UID_BASE: u32 = 1_000_000_000;
pub const UID_COUNT: u32 = 65536;

#[derive(Debug, Clone)]
pub enum Users {
    /// Each sandbox's QEMU runs as its own uid; `group` (kiln-qemu) may read shared immutable files;
    /// `kvm` is the group owning /dev/kvm, when there is one.
    PerSandbox { group: u32, kvm: Option<u32> },
    /// QEMU runs as the daemon's user; the reason is logged at start.
    Off { reason: String },
}

/// What this daemon enforces on its VMs.
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct Summary {
    /// VMs run as per-sandbox uids behind the firewall (false only under `kiln serve --unconfined`).
    pub confined: bool,
    pub per_sandbox_uids: bool,
    pub firewall: bool,
    /// Memory, CPU and pid limits per VM (a missing hierarchy only warns).
    pub cgroups: bool,
    /// What is missing, and how to fix it.
    pub missing: Vec<String>,
}

pub struct Confinement {
    pub users: Users,
    pub cgroups: Option<cgroup::Cgroups>,
    pub netguard: Option<netguard::NetGuard>,
    /// Uids handed out by this daemon, so concurrent creations (a fork's children) never share one before
    /// their records reach the database.
    handed_out: std::sync::Mutex<std::collections::HashSet<u32>>,
}

impl Confinement {
    /// Works out what this host allows, prepares the data directory's modes and installs the firewall rules.
    /// Fails closed: when VMs could not run as their own uids or behind the firewall, this is an error
    /// naming what is missing and the fix, unless `unconfined` (`kiln serve --unconfined`) accepts that.
    /// `allow_net` opens ranges the firewall denies guests by default (see `netguard`).
    pub fn setup(
        data_dir: &Path,
        sandboxes: &Path,
        snapshots: &Path,
        unconfined: bool,
        allow_net: &[netguard::Cidr],
    ) -> Result<Confinement> {
        let c = Confinement::detect(data_dir, sandboxes, snapshots, allow_net);
        let missing = c.missing();
        if missing.is_empty() {
            return Ok(c);
        }
        if !unconfined {
            c.shutdown();
            return Err(Error::new(
                ErrorCode::Internal,
                format!(
                    "refusing to run VMs unconfined: {}. Fix that, or start with `kiln serve --unconfined` to run VMs without this protection (guests that escape into QEMU would not be contained)",
                    missing.join("; ")
                ),
            ));
        }
        warn!("running UNCONFINED (--unconfined): {}", missing.join("; "));
        Ok(c)
    }

    /// What confinement lacks on this host (empty when VMs run as their own uids behind the firewall).
    pub fn missing(&self) -> Vec<String> {
        let mut missing = Vec::new();
        if let Users::Off { reason } = &self.users {
            missing.push(format!("VMs cannot run as per-sandbox uids ({reason})"));
        }
        if self.netguard.is_none() {
            missing.push(match &self.users {
                Users::PerSandbox { .. } => "the firewall that keeps guests off the host's addresses is not installed (iptables missing or not permitted: run scripts/install-deps.sh)".to_string(),
                Users::Off { .. } => "no firewall keeps guests off the host's addresses (its rules match the per-sandbox uids)".to_string(),
            });
        }
        missing
    }

    /// What is enforced, for `GET /v1/info` and `kiln info`.
    pub fn summary(&self) -> Summary {
        Summary {
            confined: self.missing().is_empty(),
            per_sandbox_uids: self.per_sandbox(),
            firewall: self.netguard.is_some(),
            cgroups: self.cgroups.is_some(),
            missing: self.missing(),
        }
    }

    fn detect(
        data_dir: &Path,
        sandboxes: &Path,
        snapshots: &Path,
        allow_net: &[netguard::Cidr],
    ) -> Confinement {
        let users = detect_users(data_dir);
        match &users {
            Users::PerSandbox { group, .. } => {
                let prepared = (|| -> std::io::Result<()> {
                    // VMs open their files by path: they may pass through, not list.
                    set_mode(data_dir, 0o711)?;
                    set_mode(sandboxes, 0o711)?;
                    set_mode(snapshots, 0o700)
                })();
                match prepared {
                    Ok(()) => info!(
                        group,
                        uid_base = UID_BASE,
                        "VMs run as per-sandbox unprivileged uids"
                    ),
                    Err(e) => warn!(error = %e, "could not set data directory modes"),
                }
            }
            Users::Off { reason } => {
                if let Err(e) = set_mode(data_dir, 0o700) {
                    warn!(error = %e, "could not make the data directory private");
                }
                warn!("VMs run as the daemon's own user, not as unprivileged per-sandbox users: {reason}")
            }
        }
        let cgroups = match cgroup::Cgroups::detect() {
            Ok(c) => {
                let pruned = c.prune_idle();
                info!(
                    kind = c.kind(),
                    pruned, "VMs get a cgroup each (memory, CPU and pid limits)"
                );
                Some(c)
            }
            Err(why) => {
                warn!("VMs run without cgroup limits: {why}");
                None
            }
        };
        let netguard = match &users {
            Users::PerSandbox { .. } => match netguard::NetGuard::install(allow_net) {
                Ok(g) => {
                    info!(
                        chain = netguard::CHAIN,
                        ipv6 = g.ipv6,
                        resolvers = ?g.resolvers,
                        allow_net = ?allow_net.iter().map(|c| c.to_string()).collect::<Vec<_>>(),
                        "guests are kept off the host's own addresses, metadata, link-local and private networks (iptables)"
                    );
                    Some(g)
                }
                Err(why) => {
                    warn!("guests can reach services on the host's loopback and addresses through 10.0.2.2: {why}");
                    None
                }
            },
            Users::Off { .. } => {
                warn!("guests can reach services on the host's loopback and addresses through 10.0.2.2: firewall rules need per-sandbox uids");
                None
            }
        };
        let c = Confinement {
            users,
            cgroups,
            netguard,
            handed_out: Default::default(),
        };
        c.migrate_sandbox_dirs(sandboxes);
        c
    }

    /// Confinement that does nothing (unit tests, and hosts where nothing is available).
    pub fn none(reason: &str) -> Confinement {
        Confinement {
            users: Users::Off {
                reason: reason.to_string(),
            },
            cgroups: None,
            netguard: None,
            handed_out: Default::default(),
        }
    }

    pub fn per_sandbox(&self) -> bool {
        matches!(self.users, Users::PerSandbox { .. })
    }

    /// A free uid for a new sandbox, or None when VMs run unconfined. `taken` are the uids in use.
    pub fn allocate_uid(&self, taken: &[u32]) -> Result<Option<u32>> {
        if !self.per_sandbox() {
            return Ok(None);
        }
        // Random rather than lowest-free: daemons with different data directories on one host (tests) then
        // practically never share a uid.
        let mut handed_out = self.handed_out.lock().unwrap_or_else(|p| p.into_inner());
        let start: u32 = rand::random::<u32>() % UID_COUNT;
        for i in 0..UID_COUNT {
            let uid = UID_BASE + (start + i) % UID_COUNT;
            // SAFETY: getpwuid returns a pointer into static storage or null; only the null check is used.
            let in_passwd = unsafe { !libc::getpwuid(uid).is_null() };
            if !taken.contains(&uid) && !handed_out.contains(&uid) && !in_passwd {
                handed_out.insert(uid);
                return Ok(Some(uid));
            }
        }
        Err(Error::new(
            ErrorCode::CapacityExceeded,
            format!("all {UID_COUNT} VM uids are in use"),
        ))
    }

    /// The credentials for a sandbox's QEMU.
    pub fn run_as(&self, uid: Option<u32>) -> Option<kiln_vmm::RunAs> {
        match (&self.users, uid) {
            // No `kvm` group: the daemon hands QEMU an open /dev/kvm (kiln_vmm::accel::KVM_FD), and the
            // group of that name need not own the device anyway.
            (Users::PerSandbox { group, .. }, Some(uid)) => Some(kiln_vmm::RunAs {
                uid,
                gid: uid,
                groups: vec![*group],
            }),
            _ => None,
        }
    }

    /// Makes a directory the sandbox's own (`uid:uid 0700`).
    pub fn own_dir(&self, path: &Path, uid: Option<u32>) -> Result<()> {
        self.own(path, uid, 0o700)
    }

    /// Makes a file the sandbox may write its own (`uid:uid 0600`).
    pub fn own_file(&self, path: &Path, uid: Option<u32>) -> Result<()> {
        self.own(path, uid, 0o600)
    }

    // All of these act on a descriptor opened without following links (see kiln_vmm::safefs): a link or
    // FIFO planted under the path is refused, never chowned or chmodded through.
    fn own(&self, path: &Path, uid: Option<u32>, mode: u32) -> Result<()> {
        let (Users::PerSandbox { .. }, Some(uid)) = (&self.users, uid) else {
            return Ok(());
        };
        let open = if mode & 0o100 != 0 {
            open_dir(path)
        } else {
            safefs::open_read(path)
        };
        open.and_then(|f| safefs::fchown_mode(&f, uid, uid, mode))
            .map_err(|e| fsutil::io_error(&format!("giving {} to uid {uid}", path.display()), e))
    }

    /// Makes a directory of a sandbox root's, passable by that sandbox's VM only (`root:<uid> 0710`; each
    /// VM has a gid of its own): its VM reaches the files it was given, other VMs reach nothing, and none
    /// can create, rename or replace anything in it.
    pub fn root_dir(&self, path: &Path, uid: Option<u32>) -> Result<()> {
        let (Users::PerSandbox { .. }, Some(uid)) = (&self.users, uid) else {
            return Ok(());
        };
        open_dir(path)
            .and_then(|f| safefs::fchown_mode(&f, 0, uid, 0o710))
            .map_err(|e| fsutil::io_error(&format!("securing {}", path.display()), e))
    }

    /// Seals an immutable file kiln wrote (snapshot RAM, state, frozen layers): `root:kiln-qemu 0640`. All
    /// hard links share the inode, so this holds for every sandbox and snapshot that links it.
    pub fn seal(&self, path: &Path) -> Result<()> {
        let Users::PerSandbox { group, .. } = self.users else {
            return Ok(());
        };
        safefs::open_read(path)
            .and_then(|f| safefs::fchown_mode(&f, 0, group, 0o640))
            .map_err(|e| fsutil::io_error(&format!("sealing {}", path.display()), e))
    }

    /// Lets VMs read an immutable file that kiln does not own (a template's kernel or disk, linked from
    /// the image store): left alone when already world-readable, else given to the kiln-qemu group.
    pub fn make_readable(&self, path: &Path) -> Result<()> {
        let Users::PerSandbox { group, .. } = self.users else {
            return Ok(());
        };
        let f = safefs::open_read(path)
            .map_err(|e| fsutil::io_error(&format!("reading {}", path.display()), e))?;
        let meta = f
            .metadata()
            .map_err(|e| fsutil::io_error(&format!("reading {}", path.display()), e))?;
        if meta.mode() & 0o004 != 0 {
            return Ok(());
        }
        safefs::fchown_mode(&f, 0, group, 0o640)
            .map_err(|e| fsutil::io_error(&format!("sealing {}", path.display()), e))
    }

    /// Brings sandbox directories made by older kilns (`uid:uid 0700`, written by the VM's uid
    /// throughout) to today's layout: the directory, `layers/` and `volumes/` become root's (`root:<uid>
    /// 0710`) and a
    /// `vm/` subdirectory is the VM's own. Run at start-up, before any sandbox is touched. Entries the
    /// VM's uid may have planted before stay, but every root operation on them refuses links and FIFOs.
    pub fn migrate_sandbox_dirs(&self, sandboxes: &Path) {
        if !self.per_sandbox() {
            return;
        }
        let mut migrated = 0;
        for entry in std::fs::read_dir(sandboxes).into_iter().flatten().flatten() {
            match migrate_sandbox_dir(&entry.path()) {
                Ok(true) => migrated += 1,
                Ok(false) => {}
                Err(e) => {
                    warn!(dir = %entry.path().display(), error = %e, "could not secure a sandbox directory")
                }
            }
        }
        if migrated > 0 {
            info!(
                migrated,
                "sandbox directories from an older kiln made root-owned, with a vm/ directory for QEMU"
            );
        }
    }

    /// Cgroup `cgroup.procs` files for a sandbox about to start (created with its limits); empty when
    /// cgroups are unavailable or could not be created (logged).
    pub fn cgroup_for(&self, id: &str, limits: &cgroup::Limits) -> Vec<std::path::PathBuf> {
        let Some(cg) = &self.cgroups else {
            return Vec::new();
        };
        match cg.create(id, limits) {
            Ok(procs) => procs,
            Err(e) => {
                warn!(sandbox = id, error = %e, "could not create the sandbox's cgroup; its VM runs without limits");
                Vec::new()
            }
        }
    }

    /// See `Cgroups::set_background`; without cgroups, nothing to do.
    pub fn set_background(&self, id: &str, limits: &cgroup::Limits, background: bool) {
        if let Some(cg) = &self.cgroups {
            if let Err(e) = cg.set_background(id, limits, background) {
                warn!(sandbox = id, error = %e, "could not change the CPU share of the sandbox's VM");
            }
        }
    }

    /// See `Cgroups::oom_kills`.
    pub fn oom_kills(&self, id: &str) -> Option<u64> {
        self.cgroups.as_ref().and_then(|cg| cg.oom_kills(id))
    }

    pub fn remove_cgroup(&self, id: &str) {
        if let Some(cg) = &self.cgroups {
            cg.remove(id);
        }
    }

    /// On daemon exit: drops the firewall rules unless confined VMs still run (they outlive the daemon).
    pub fn shutdown(&self) {
        if let Some(g) = &self.netguard {
            let running = netguard::processes_in_uid_range(UID_BASE, UID_COUNT);
            if running == 0 {
                g.remove();
                info!("firewall rules for guests removed");
            } else {
                info!(
                    vms = running,
                    "firewall rules for guests kept: confined VMs are still running"
                );
            }
        }
    }
}

fn open_dir(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_DIRECTORY)
        .open(path)
}

/// See [`Confinement::migrate_sandbox_dirs`]; true when the directory was an old one.
fn migrate_sandbox_dir(dir: &Path) -> std::io::Result<bool> {
    let top = open_dir(dir)?;
    let uid = top.metadata()?.uid();
    if !(UID_BASE..UID_BASE + UID_COUNT).contains(&uid) {
        return Ok(false);
    }
    // First the directory itself, so the VM's uid can change nothing in it from here on.
    safefs::fchown_mode(&top, 0, uid, 0o710)?;
    for sub in ["layers", "volumes"] {
        if let Ok(d) = open_dir(&dir.join(sub)) {
            safefs::fchown_mode(&d, 0, uid, 0o710)?;
        }
    }
    let vm = dir.join(crate::vm::VM_DIR);
    if std::fs::symlink_metadata(&vm).is_ok_and(|m| !m.is_dir()) {
        std::fs::remove_file(&vm)?;
    }
    if let Err(e) = std::fs::create_dir(&vm) {
        if e.kind() != std::io::ErrorKind::AlreadyExists {
            return Err(e);
        }
    }
    safefs::fchown_mode(&open_dir(&vm)?, uid, uid, 0o700)?;
    Ok(true)
}

fn set_mode(path: &Path, mode: u32) -> std::io::Result<()> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}

fn detect_users(data_dir: &Path) -> Users {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Users::Off {
            reason: "kiln is not running as root, so it cannot switch VMs to other users".into(),
        };
    }
    if std::env::var("KILN_CONFINE_USERS").as_deref() == Ok("off") {
        return Users::Off {
            reason: "KILN_CONFINE_USERS=off".into(),
        };
    }
    let Some(group) = group_id(QEMU_GROUP) else {
        return Users::Off {
            reason: format!("the '{QEMU_GROUP}' group does not exist; run scripts/install-deps.sh (it runs `useradd --system {QEMU_GROUP}`)"),
        };
    };
    // QEMU opens its files by path, so every directory above the data directory must be traversable.
    let canonical = data_dir
        .canonicalize()
        .unwrap_or_else(|_| data_dir.to_path_buf());
    for dir in canonical.ancestors().skip(1) {
        let mode = std::fs::metadata(dir).map(|m| m.mode()).unwrap_or(0);
        if mode & 0o001 == 0 {
            return Users::Off {
                reason: format!(
                    "{} is not traversable by other users (mode {:o}); put the data directory elsewhere (e.g. /var/lib/kiln)",
                    dir.display(),
                    mode & 0o7777
                ),
            };
        }
    }
    Users::PerSandbox {
        group,
        kvm: group_id("kvm"),
    }
}

fn group_id(name: &str) -> Option<u32> {
    let cname = std::ffi::CString::new(name).ok()?;
    // SAFETY: getgrnam returns null or a pointer to static storage, read at once.
    unsafe {
        let g = libc::getgrnam(cname.as_ptr());
        (!g.is_null()).then(|| (*g).gr_gid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unconfined_mode_touches_nothing() {
        let c = Confinement::none("test");
        assert_eq!(c.allocate_uid(&[]).unwrap(), None);
        assert!(c.run_as(Some(5)).is_none());
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("f");
        std::fs::write(&f, b"x").unwrap();
        set_mode(&f, 0o644).unwrap();
        c.own_file(&f, Some(1)).unwrap();
        c.seal(&f).unwrap();
        assert_eq!(std::fs::metadata(&f).unwrap().mode() & 0o777, 0o644);
    }

    #[test]
    fn per_sandbox_uids_are_free_and_in_range() {
        let c = Confinement {
            users: Users::PerSandbox {
                group: 4242,
                kvm: Some(36),
            },
            cgroups: None,
            netguard: None,
            handed_out: Default::default(),
        };
        let uid = c.allocate_uid(&[]).unwrap().unwrap();
        let others: std::collections::HashSet<u32> = (0..100)
            .map(|_| c.allocate_uid(&[]).unwrap().unwrap())
            .collect();
        assert_eq!(others.len(), 100);
        assert!(!others.contains(&uid), "a uid was handed out twice");
        assert!((UID_BASE..UID_BASE + UID_COUNT).contains(&uid));
        let r = c.run_as(Some(uid)).unwrap();
        assert_eq!((r.uid, r.gid, r.groups.clone()), (uid, uid, vec![4242]));
        assert!(
            c.run_as(None).is_none(),
            "sandboxes without a uid stay as they were"
        );
    }
}
