//! A cgroup per sandbox: memory cap, CPU quota and weight, pid limit. cgroup v2 when the unified hierarchy
//! has the memory, cpu and pids controllers, else v1 (one directory per controller).
//!
//! The groups live at `<controller root>/kiln/<sandbox id>`, outside the daemon's own cgroup: VMs outlive the
//! daemon (a service manager stopping kiln's cgroup must not kill them) and the path is the same after a
//! daemon restart, so delete finds the group without any stored state.

use std::path::{Path, PathBuf};

const ROOT: &str = "/sys/fs/cgroup";
const PARENT: &str = "kiln";
/// QEMU's own memory beyond guest RAM (device emulation, TCG translation cache, I/O buffers), for the
/// smallest guest; see `Limits::for_vm` for how it grows.
pub const OVERHEAD_MIB: u64 = 128;
/// Guest RAM per MiB of extra overhead: structures that grow with guest RAM (host page tables, dirty
/// bitmaps, KVM's memory maps) and bigger guests doing more I/O.
const OVERHEAD_RAM_DIVISOR: u64 = 16;
/// Extra overhead per vCPU (its thread, TCG per-CPU state and translation work).
const OVERHEAD_PER_VCPU_MIB: u64 = 16;
/// vCPU threads, QEMU's I/O worker pool (up to 64) and its other threads, with room to spare.
pub const PIDS_MAX: u64 = 256;
const CPU_PERIOD_US: u64 = 100_000;

#[derive(Debug, Clone)]
pub struct Limits {
    pub memory_bytes: u64,
    /// vCPUs: sets the CPU weight.
    pub cpus: u32,
    /// CPU time per `CPU_PERIOD_US` (cpu.max / cfs_quota_us): the vCPUs plus room for QEMU's main loop
    /// and I/O threads, which share the quota and would otherwise starve a busy guest's disk and network.
    pub cpu_quota_us: u64,
    pub pids: u64,
}

impl Limits {
    pub fn for_vm(memory_mib: u64, cpus: u32) -> Limits {
        let overhead = OVERHEAD_MIB
            + memory_mib / OVERHEAD_RAM_DIVISOR
            + u64::from(cpus) * OVERHEAD_PER_VCPU_MIB;
        // One more CPU for every four vCPUs (at least one): QEMU's other threads.
        let io_cpus = u64::from(cpus).div_ceil(4).max(1);
        Limits {
            memory_bytes: (memory_mib + overhead) << 20,
            cpus,
            cpu_quota_us: (u64::from(cpus) + io_cpus) * CPU_PERIOD_US,
            pids: PIDS_MAX,
        }
    }
}

#[derive(Debug, Clone)]
pub enum Cgroups {
    V2 {
        root: PathBuf,
    },
    V1 {
        memory: PathBuf,
        cpu: PathBuf,
        pids: PathBuf,
    },
}

impl Cgroups {
    pub fn kind(&self) -> &'static str {
        match self {
            Cgroups::V2 { .. } => "v2",
            Cgroups::V1 { .. } => "v1",
        }
    }

    /// Finds a usable hierarchy and makes sure kiln's parent group can be created there.
    pub fn detect() -> Result<Cgroups, String> {
        Self::detect_at(Path::new(ROOT))
    }

    fn detect_at(root: &Path) -> Result<Cgroups, String> {
        let controllers =
            std::fs::read_to_string(root.join("cgroup.controllers")).unwrap_or_default();
        let has = |c: &str| controllers.split_whitespace().any(|x| x == c);
        let found = if has("memory") && has("cpu") && has("pids") {
            Cgroups::V2 {
                root: root.to_path_buf(),
            }
        } else if ["memory", "cpu", "pids"]
            .iter()
            .all(|c| root.join(c).join("cgroup.procs").exists())
        {
            Cgroups::V1 {
                memory: root.join("memory"),
                cpu: root.join("cpu"),
                pids: root.join("pids"),
            }
        } else {
            return Err(format!(
                "no cgroup hierarchy with the memory, cpu and pids controllers under {}",
                root.display()
            ));
        };
        found.prepare_parent()?;
        Ok(found)
    }

    fn prepare_parent(&self) -> Result<(), String> {
        let mkdir = |p: &Path| match std::fs::create_dir(p) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
            Err(e) => Err(format!("cannot create {}: {e}", p.display())),
        };
        match self {
            Cgroups::V2 { root } => {
                // Controllers must be enabled on every level above the groups that use them.
                let enable = "+memory +cpu +pids";
                write(&root.join("cgroup.subtree_control"), enable)?;
                mkdir(&root.join(PARENT))?;
                write(&root.join(PARENT).join("cgroup.subtree_control"), enable)
            }
            Cgroups::V1 { memory, cpu, pids } => {
                for c in [memory, cpu, pids] {
                    mkdir(&c.join(PARENT))?;
                }
                Ok(())
            }
        }
    }

    /// Removes groups that no process uses any more, left by VMs that died while no daemon watched (or
    /// by a daemon that was killed). A group in use cannot be removed (rmdir fails), and one created in
    /// the last minute is skipped: another daemon may be about to start a VM in it.
    pub fn prune_idle(&self) -> usize {
        let parents: Vec<PathBuf> = match self {
            Cgroups::V2 { root } => vec![root.join(PARENT)],
            Cgroups::V1 { memory, cpu, pids } => {
                [memory, cpu, pids].iter().map(|c| c.join(PARENT)).collect()
            }
        };
        let recent = |p: &Path| {
            std::fs::metadata(p)
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_none_or(|age| age < std::time::Duration::from_secs(60))
        };
        let mut removed = 0;
        for parent in parents {
            for entry in std::fs::read_dir(&parent).into_iter().flatten().flatten() {
                let p = entry.path();
                if p.is_dir() && !recent(&p) && std::fs::remove_dir(&p).is_ok() {
                    removed += 1;
                }
            }
        }
        removed
    }

    /// The sandbox's group directories.
    pub fn dirs(&self, id: &str) -> Vec<PathBuf> {
        match self {
            Cgroups::V2 { root } => vec![root.join(PARENT).join(id)],
            Cgroups::V1 { memory, cpu, pids } => [memory, cpu, pids]
                .iter()
                .map(|c| c.join(PARENT).join(id))
                .collect(),
        }
    }

    /// Creates (or reuses) the sandbox's groups with `limits`; returns the `cgroup.procs` files to join.
    pub fn create(&self, id: &str, limits: &Limits) -> Result<Vec<PathBuf>, String> {
        for d in self.dirs(id) {
            if let Err(e) = std::fs::create_dir(&d) {
                if e.kind() != std::io::ErrorKind::AlreadyExists {
                    return Err(format!("cannot create {}: {e}", d.display()));
                }
            }
        }
        let quota = limits.cpu_quota_us;
        let mem = limits.memory_bytes.to_string();
        match self {
            Cgroups::V2 { root } => {
                let d = root.join(PARENT).join(id);
                write(&d.join("memory.max"), &mem)?;
                // Without swap accounting this fails harmlessly; with it, RAM cannot leak into swap.
                let _ = write(&d.join("memory.swap.max"), "0");
                write(&d.join("cpu.max"), &format!("{quota} {CPU_PERIOD_US}"))?;
                let weight = (100 * u64::from(limits.cpus)).min(10_000);
                write(&d.join("cpu.weight"), &weight.to_string())?;
                write(&d.join("pids.max"), &limits.pids.to_string())?;
            }
            Cgroups::V1 { memory, cpu, pids } => {
                let (m, c, p) = (
                    memory.join(PARENT).join(id),
                    cpu.join(PARENT).join(id),
                    pids.join(PARENT).join(id),
                );
                write(&m.join("memory.limit_in_bytes"), &mem)?;
                write(&c.join("cpu.cfs_period_us"), &CPU_PERIOD_US.to_string())?;
                write(&c.join("cpu.cfs_quota_us"), &quota.to_string())?;
                write(
                    &c.join("cpu.shares"),
                    &(1024 * u64::from(limits.cpus)).to_string(),
                )?;
                write(&p.join("pids.max"), &limits.pids.to_string())?;
            }
        }
        Ok(self
            .dirs(id)
            .into_iter()
            .map(|d| d.join("cgroup.procs"))
            .collect())
    }

    /// Gives the sandbox's VM the least CPU share (`background`: work nobody waits for, such as warming
    /// a spare) or its normal one.
    pub fn set_background(
        &self,
        id: &str,
        limits: &Limits,
        background: bool,
    ) -> Result<(), String> {
        match self {
            Cgroups::V2 { root } => {
                let weight = if background {
                    1
                } else {
                    (100 * u64::from(limits.cpus)).min(10_000)
                };
                write(
                    &root.join(PARENT).join(id).join("cpu.weight"),
                    &weight.to_string(),
                )
            }
            Cgroups::V1 { cpu, .. } => {
                let shares = if background {
                    2
                } else {
                    1024 * u64::from(limits.cpus)
                };
                write(
                    &cpu.join(PARENT).join(id).join("cpu.shares"),
                    &shares.to_string(),
                )
            }
        }
    }

    /// How many times the kernel's OOM killer ended a process of the sandbox's group (its memory cap
    /// was reached); None when the group or the counter is not there.
    pub fn oom_kills(&self, id: &str) -> Option<u64> {
        let file = match self {
            Cgroups::V2 { root } => root.join(PARENT).join(id).join("memory.events"),
            Cgroups::V1 { memory, .. } => memory.join(PARENT).join(id).join("memory.oom_control"),
        };
        oom_kill_count(&std::fs::read_to_string(file).ok()?)
    }

    /// Removes the sandbox's groups (after its VM exited). A group still holding a process is left alone.
    pub fn remove(&self, id: &str) {
        for d in self.dirs(id) {
            // The last task leaves the group a moment (usually a millisecond or two) after the process
            // is reaped; retry often (a stop waits for this), for up to a second.
            for attempt in 0..500 {
                match std::fs::remove_dir(&d) {
                    Ok(()) => break,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                    Err(e) if attempt == 499 => {
                        tracing::warn!(dir = %d.display(), error = %e, "could not remove cgroup")
                    }
                    Err(_) => std::thread::sleep(std::time::Duration::from_millis(2)),
                }
            }
        }
    }
}

fn write(path: &Path, value: &str) -> Result<(), String> {
    std::fs::write(path, value).map_err(|e| format!("writing '{value}' to {}: {e}", path.display()))
}

/// The `oom_kill N` line of v2's `memory.events` and v1's `memory.oom_control`.
fn oom_kill_count(text: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix("oom_kill "))
        .and_then(|n| n.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oom_kills_are_read_from_either_hierarchy() {
        let v2 = "low 0\nhigh 0\nmax 12\noom 2\noom_kill 2\noom_group_kill 0\n";
        let v1 = "oom_kill_disable 0\nunder_oom 0\noom_kill 1\n";
        assert_eq!(oom_kill_count(v2), Some(2));
        assert_eq!(oom_kill_count(v1), Some(1));
        assert_eq!(oom_kill_count("oom_kill_disable 0\n"), None);
    }

    #[test]
    fn limits_cover_guest_ram_plus_overhead() {
        let l = Limits::for_vm(256, 2);
        assert_eq!(l.memory_bytes, (256 + OVERHEAD_MIB + 16 + 32) << 20);
        assert_eq!(l.pids, PIDS_MAX);
    }

    #[test]
    fn memory_overhead_grows_with_guest_ram_and_vcpus() {
        let mib = |l: Limits| l.memory_bytes >> 20;
        let small = mib(Limits::for_vm(256, 1));
        assert!(
            small - 256 >= OVERHEAD_MIB,
            "never below the old fixed overhead"
        );
        // A 16 GiB guest gets more than the 128 MiB a 256 MiB guest gets.
        let big = mib(Limits::for_vm(16384, 1));
        assert_eq!(big - 16384, OVERHEAD_MIB + 1024 + 16);
        assert!(mib(Limits::for_vm(256, 8)) > small);
    }

    #[test]
    fn cpu_quota_leaves_room_for_qemu_io_threads() {
        let cores = |cpus| Limits::for_vm(256, cpus).cpu_quota_us as f64 / CPU_PERIOD_US as f64;
        assert_eq!(
            cores(1),
            2.0,
            "one vCPU plus one for QEMU's main loop and I/O"
        );
        assert_eq!(cores(4), 5.0);
        assert_eq!(cores(8), 10.0);
        assert_eq!(cores(16), 20.0);
    }

    #[test]
    fn v1_layout_in_a_fake_hierarchy() {
        let root = tempfile::tempdir().unwrap();
        for c in ["memory", "cpu", "pids"] {
            std::fs::create_dir(root.path().join(c)).unwrap();
            std::fs::write(root.path().join(c).join("cgroup.procs"), "").unwrap();
        }
        let cg = Cgroups::detect_at(root.path()).unwrap();
        assert_eq!(cg.kind(), "v1");
        let procs = cg.create("sb-1", &Limits::for_vm(64, 2)).unwrap();
        assert_eq!(procs.len(), 3);
        let read = |p: &str| std::fs::read_to_string(root.path().join(p)).unwrap();
        assert_eq!(read("cpu/kiln/sb-1/cpu.cfs_quota_us"), "300000");
        assert_eq!(
            read("memory/kiln/sb-1/memory.limit_in_bytes"),
            Limits::for_vm(64, 2).memory_bytes.to_string()
        );
        assert_eq!(read("pids/kiln/sb-1/pids.max"), PIDS_MAX.to_string());
        assert_eq!(read("cpu/kiln/sb-1/cpu.shares"), "2048");
        cg.set_background("sb-1", &Limits::for_vm(64, 2), true)
            .unwrap();
        assert_eq!(read("cpu/kiln/sb-1/cpu.shares"), "2");
        cg.set_background("sb-1", &Limits::for_vm(64, 2), false)
            .unwrap();
        assert_eq!(read("cpu/kiln/sb-1/cpu.shares"), "2048");
    }

    #[test]
    fn v2_is_preferred_when_it_has_the_controllers() {
        let root = tempfile::tempdir().unwrap();
        std::fs::write(
            root.path().join("cgroup.controllers"),
            "cpuset cpu io memory pids",
        )
        .unwrap();
        let cg = Cgroups::detect_at(root.path()).unwrap();
        assert_eq!(cg.kind(), "v2");
        cg.create("sb-2", &Limits::for_vm(128, 1)).unwrap();
        let read = |p: &str| std::fs::read_to_string(root.path().join(p)).unwrap();
        assert_eq!(read("kiln/sb-2/cpu.max"), "200000 100000");
        cg.set_background("sb-2", &Limits::for_vm(128, 1), true)
            .unwrap();
        assert_eq!(read("kiln/sb-2/cpu.weight"), "1");
        assert_eq!(read("kiln/cgroup.subtree_control"), "+memory +cpu +pids");
    }

    #[test]
    fn no_controllers_is_an_error() {
        let root = tempfile::tempdir().unwrap();
        assert!(Cgroups::detect_at(root.path()).is_err());
    }
}
