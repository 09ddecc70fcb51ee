//! Daemon configuration: where state lives, which accelerator to use, and limits.

use std::path::{Path, PathBuf};
use std::time::Duration;

use kiln_vmm::Accel;

#[derive(Debug, Clone)]
pub struct Config {
    pub data_dir: PathBuf,
    /// `None` probes for KVM and falls back to TCG.
    pub accel: Option<Accel>,
    /// How long a cold boot may take before the agent must answer.
    pub boot_timeout: Duration,
    /// Sandboxes with a VM (running or paused) allowed at once.
    pub max_sandboxes: usize,
    /// Sum of guest RAM of all VMs, in MiB (host RAM × the overcommit ratio, see `with_overcommit`).
    pub max_total_memory_mib: u64,
    /// Test-only fault injection (`KILN_FAULTS`); empty in normal operation.
    pub faults: crate::faults::Faults,
    pub default_template: String,
    pub default_memory_mib: u64,
    pub default_cpus: u32,
    /// Copies of recently resumed snapshots kept resumed and paused, ready to hand out (0: none).
    pub warm_spares: usize,
    /// `warm_spares` was not set: the accelerator's default applies (`Accel::tuning`).
    pub warm_spares_default: bool,
    /// Run VMs even when they cannot be confined (`kiln serve --unconfined`); otherwise the daemon refuses
    /// to start.
    pub unconfined: bool,
    /// New sandboxes and snapshots are refused while the data directory's disk has less free space.
    pub min_free_disk: crate::diskfloor::DiskFloor,
    /// `kiln serve --max-storage`: bytes sandboxes, snapshots and volumes may use; `None` for no quota.
    pub max_storage: Option<u64>,
    /// Ranges guests may reach although they are denied by default (link-local, private, ULA).
    pub allow_net: Vec<crate::confine::netguard::Cidr>,
    /// vCPUs every new machine has (at least its own `cpus`; the rest stay offline until a resume of a
    /// memory snapshot asks for them): `kiln serve --max-vcpus`.
    pub max_vcpus: u32,
    /// Where owned guest RAM lives while VMs run (`kiln serve --ram-dir`; see `ramdir`).
    pub ram_dir: crate::ramdir::RamPlacement,
    /// Size of kiln's own RAM tmpfs in MiB (`--ram-size`); None: `max_total_memory_mib`.
    pub ram_size_mib: Option<u64>,
    /// New machines get `memory_mib` × this of RAM behind a balloon, so copies resumed from their memory
    /// snapshots may grow (`kiln serve --memory-headroom`; 1: none). See `crate::headroom`.
    pub memory_headroom: f64,
    /// How guests are networked (`kiln serve --network`, see `crate::net`).
    pub network: crate::net::NetMode,
    /// Why the daemon runs in that mode (set when it starts; shown by `GET /v1/info`).
    pub network_reason: String,
}

/// Guest RAM may add up to this many times the host's RAM by default: idle guests touch little of it, and
/// forks share their parent's pages.
pub const DEFAULT_OVERCOMMIT: f64 = 2.0;

/// Warm spares kept by default under TCG: enough for the last two snapshots a client stamps copies from
/// (none under KVM, see `Accel::tuning`).
pub const DEFAULT_WARM_SPARES: usize = 2;

impl Config {
    /// Sets the memory limit to host RAM × `ratio`.
    pub fn with_overcommit(mut self, ratio: f64) -> Result<Config, String> {
        if !ratio.is_finite() || ratio <= 0.0 || ratio > 100.0 {
            return Err(format!(
                "memory overcommit {ratio} is out of range; give a ratio above 0 and at most 100 (e.g. 1.5)"
            ));
        }
        self.max_total_memory_mib = (host_memory_mib() as f64 * ratio) as u64;
        Ok(self)
    }

    pub fn new(data_dir: PathBuf) -> Config {
        Config {
            data_dir,
            accel: None,
            boot_timeout: Duration::from_secs(60),
            max_sandboxes: 64,
            max_total_memory_mib: host_memory_mib().saturating_mul(DEFAULT_OVERCOMMIT as u64),
            faults: crate::faults::Faults::default(),
            default_template: "tiny".to_string(),
            default_memory_mib: 256,
            default_cpus: 1,
            warm_spares: DEFAULT_WARM_SPARES,
            warm_spares_default: false,
            unconfined: false,
            min_free_disk: crate::diskfloor::DEFAULT_FLOOR,
            max_storage: None,
            allow_net: Vec::new(),
            max_vcpus: default_max_vcpus(),
            ram_dir: crate::ramdir::RamPlacement::Auto,
            ram_size_mib: None,
            memory_headroom: crate::headroom::DEFAULT_FACTOR,
            network: crate::net::NetMode::User,
            network_reason: String::new(),
        }
    }

    pub fn db_path(&self) -> PathBuf {
        self.data_dir.join("kiln.db")
    }
    pub fn images_dir(&self) -> PathBuf {
        self.data_dir.join("images")
    }
    pub fn cache_dir(&self) -> PathBuf {
        self.data_dir.join("cache")
    }
    pub fn sandboxes_dir(&self) -> PathBuf {
        self.data_dir.join("sandboxes")
    }
    pub fn sandbox_dir(&self, id: &str) -> PathBuf {
        self.sandboxes_dir().join(id)
    }
    pub fn snapshots_dir(&self) -> PathBuf {
        self.data_dir.join("snapshots")
    }
    pub fn snapshot_dir(&self, id: &str) -> PathBuf {
        self.snapshots_dir().join(id)
    }
    pub fn volumes_dir(&self) -> PathBuf {
        self.data_dir.join("volumes")
    }
    /// Where `kiln doctor --repair` moves files that belong to nothing, instead of deleting them.
    pub fn lost_found_dir(&self) -> PathBuf {
        self.data_dir.join("lost+found")
    }
    pub fn default_socket(&self) -> PathBuf {
        default_socket_for(&self.data_dir)
    }
}

/// The data directory when none is given: `$KILN_DATA_DIR`, else `/var/lib/kiln` for root, else
/// `$XDG_DATA_HOME/kiln` or `~/.local/share/kiln`.
pub fn default_data_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("KILN_DATA_DIR") {
        return PathBuf::from(dir);
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return PathBuf::from("/var/lib/kiln");
    }
    if let Some(xdg) = std::env::var_os("XDG_DATA_HOME") {
        return PathBuf::from(xdg).join("kiln");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/tmp"));
    home.join(".local/share/kiln")
}

pub fn default_socket_for(data_dir: &Path) -> PathBuf {
    data_dir.join("kiln.sock")
}

/// The host's cores, at most 8: more vCPUs than cores only time-share them, and each created vCPU is a
/// QEMU thread and a little saved state in every snapshot.
pub fn default_max_vcpus() -> u32 {
    std::thread::available_parallelism()
        .map_or(1, |n| n.get() as u32)
        .clamp(1, 8)
}

pub fn host_memory_mib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kib| kib.parse::<u64>().ok())
        })
        .map(|kib| kib / 1024)
        .unwrap_or(4096)
}
