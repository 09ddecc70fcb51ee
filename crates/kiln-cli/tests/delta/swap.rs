//! Host swap for `tests/delta.rs`: a swap file the test enables and always turns off again, a sandbox's
//! memory cgroup lowered and put back, and the guest RAM pages of a QEMU that sit in swap.

use std::ffi::CString;
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};

const PAGE: u64 = 4096;

/// A swap file in a temp dir, enabled; dropping it (also while unwinding a panic) turns it off and
/// removes it.
pub struct SwapFile {
    path: PathBuf,
    _dir: tempfile::TempDir,
}

impl SwapFile {
    /// Err(why) when the host refuses to swap to a file (swapon's errno named).
    pub fn enable(mib: u64) -> Result<SwapFile, String> {
        assert!(mib <= 512);
        // /tmp, not tmpfs: a swap file needs a filesystem that maps its blocks (ext4, xfs).
        let dir = tempfile::Builder::new()
            .prefix("kiln-test-swap")
            .tempdir_in("/tmp")
            .map_err(|e| format!("temp dir: {e}"))?;
        let path = dir.path().join("swapfile");
        write_swap_file(&path, mib * (1 << 20) / PAGE)
            .map_err(|e| format!("writing {}: {e}", path.display()))?;
        let c = CString::new(path.as_os_str().as_encoded_bytes()).map_err(|e| e.to_string())?;
        // SAFETY: swapon(2) with a valid C string.
        if unsafe { libc::swapon(c.as_ptr(), 0) } != 0 {
            let e = std::io::Error::last_os_error();
            return Err(format!("swapon {}: {e}", path.display()));
        }
        Ok(SwapFile { path, _dir: dir })
    }

    /// KiB of this file in use, from /proc/swaps.
    pub fn used_kib(&self) -> u64 {
        let swaps = std::fs::read_to_string("/proc/swaps").unwrap_or_default();
        swaps
            .lines()
            .filter(|l| l.starts_with(&*self.path.to_string_lossy()))
            .filter_map(|l| l.split_whitespace().nth(3)?.parse::<u64>().ok())
            .sum()
    }
}

impl Drop for SwapFile {
    fn drop(&mut self) {
        if let Ok(c) = CString::new(self.path.as_os_str().as_encoded_bytes()) {
            // SAFETY: swapoff(2) with a valid C string; pages still in the file are read back first.
            if unsafe { libc::swapoff(c.as_ptr()) } != 0 {
                eprintln!(
                    "swapoff {}: {} (turn it off by hand)",
                    self.path.display(),
                    std::io::Error::last_os_error()
                );
            }
        }
    }
}

/// A swap file of `pages` pages with the version 1 header `mkswap` writes (no holes: every block is
/// written, as swapon requires).
fn write_swap_file(path: &Path, pages: u64) -> std::io::Result<()> {
    let mut f = File::create(path)?;
    f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    let zeros = vec![0u8; 1 << 20];
    for _ in 0..(pages * PAGE).div_ceil(zeros.len() as u64) {
        f.write_all(&zeros)?;
    }
    // union swap_header: bootbits[1024], then version, last_page, nr_badpages; the magic ends page 0.
    let mut head = [0u8; 12];
    head[..4].copy_from_slice(&1u32.to_ne_bytes());
    head[4..8].copy_from_slice(&((pages - 1) as u32).to_ne_bytes());
    f.write_all_at(&head, 1024)?;
    f.write_all_at(b"SWAPSPACE2", PAGE - 10)?;
    f.sync_all()
}

/// A QEMU's memory cgroup (v2 or v1), lowered for a while: dropping it restores what it changed.
pub struct MemoryCgroup {
    dir: PathBuf,
    v2: bool,
    restore: Vec<(PathBuf, String)>,
}

impl MemoryCgroup {
    /// The memory cgroup `pid` is in (kiln puts each sandbox's QEMU in its own).
    pub fn of(pid: u32) -> Option<MemoryCgroup> {
        let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
        for line in text.lines() {
            let mut f = line.splitn(3, ':');
            let (_, controllers, path) = (f.next()?, f.next()?, f.next()?);
            let rel = path.trim_start_matches('/');
            if controllers.split(',').any(|c| c == "memory") {
                let dir = Path::new("/sys/fs/cgroup/memory").join(rel);
                if dir.join("memory.limit_in_bytes").exists() {
                    return Some(MemoryCgroup {
                        dir,
                        v2: false,
                        restore: Vec::new(),
                    });
                }
            }
            if controllers.is_empty() {
                for root in ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"] {
                    let dir = Path::new(root).join(rel);
                    if !rel.is_empty() && dir.join("memory.max").exists() {
                        return Some(MemoryCgroup {
                            dir,
                            v2: true,
                            restore: Vec::new(),
                        });
                    }
                }
            }
        }
        None
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn read(&self, file: &str) -> String {
        std::fs::read_to_string(self.dir.join(file))
            .unwrap_or_default()
            .trim()
            .to_string()
    }

    /// Bytes charged to the group now.
    pub fn usage(&self) -> u64 {
        let file = if self.v2 {
            "memory.current"
        } else {
            "memory.usage_in_bytes"
        };
        self.read(file).parse().unwrap_or(0)
    }

    /// Bytes of the group in swap (v2 `memory.swap.current`, v1 the `swap` line of `memory.stat`).
    pub fn swap(&self) -> u64 {
        if self.v2 {
            return self.read("memory.swap.current").parse().unwrap_or(0);
        }
        self.read("memory.stat")
            .lines()
            .find_map(|l| l.strip_prefix("swap "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    }

    fn set(&mut self, file: &str, value: &str) -> std::io::Result<()> {
        let path = self.dir.join(file);
        let was = self.read(file);
        std::fs::write(&path, value)?;
        if !self.restore.iter().any(|(p, _)| *p == path) {
            self.restore.push((path, was));
        }
        Ok(())
    }

    /// Lets the group's memory go to swap (kiln's v2 groups have `memory.swap.max` 0) and, on v1, makes
    /// its reclaim prefer anonymous pages (guest RAM) to the page cache.
    pub fn allow_swap(&mut self) -> std::io::Result<()> {
        if self.v2 {
            self.set("memory.swap.max", "max")
        } else {
            self.set("memory.swappiness", "100")
        }
    }

    /// Lowers the limit to `bytes`; the kernel reclaims the group's memory down to it as the write
    /// returns (v2 `memory.high`: reclaim without the OOM killer; v1 `memory.limit_in_bytes`, which
    /// fails with EBUSY rather than kill when it cannot).
    pub fn limit(&mut self, bytes: u64) -> std::io::Result<()> {
        let file = if self.v2 {
            "memory.high"
        } else {
            "memory.limit_in_bytes"
        };
        self.set(file, &bytes.to_string())
    }

    /// Puts back every setting changed, latest first.
    pub fn restore(&mut self) {
        while let Some((path, was)) = self.restore.pop() {
            if let Err(e) = std::fs::write(&path, &was) {
                eprintln!("restoring {} to {was}: {e}", path.display());
            }
        }
    }
}

impl Drop for MemoryCgroup {
    fn drop(&mut self) {
        self.restore();
    }
}

/// Offsets in `base` of the pages of `pid`'s mapping of it that are in swap (pagemap words: swapped, not
/// a file page).
pub fn swapped_offsets(pid: u32, base: &Path) -> Vec<u64> {
    const PM_SWAP: u64 = 1 << 62;
    const PM_FILE: u64 = 1 << 61;
    let regions = kiln_vmm::pagemap::file_regions(pid, base).unwrap();
    let pagemap = File::open(format!("/proc/{pid}/pagemap")).unwrap();
    let mut out = Vec::new();
    for r in regions {
        let mut words = vec![0u8; ((r.end - r.start) / PAGE * 8) as usize];
        pagemap
            .read_exact_at(&mut words, r.start / PAGE * 8)
            .unwrap();
        for (i, w) in words.chunks_exact(8).enumerate() {
            let w = u64::from_ne_bytes(w.try_into().unwrap());
            if w & PM_SWAP != 0 && w & PM_FILE == 0 {
                out.push(r.offset + i as u64 * PAGE);
            }
        }
    }
    out
}

/// VmSwap of `pid` in KiB.
pub fn vm_swap_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmSwap:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}
