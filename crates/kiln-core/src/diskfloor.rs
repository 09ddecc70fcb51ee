//! The free-space floor: new sandboxes and snapshots are refused (507 `insufficient_storage`) while the
//! filesystem holding the data directory has less free space than the floor, so the database and the disks
//! of running VMs keep room to grow.

use std::path::Path;

use crate::error::{Error, ErrorCode, Result};

/// `kiln serve --min-free-disk`: bytes, or a percentage of the filesystem's size.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum DiskFloor {
    Bytes(u64),
    Percent(f64),
}

/// 2 GiB by default.
pub const DEFAULT_FLOOR: DiskFloor = DiskFloor::Bytes(2 << 30);

impl std::str::FromStr for DiskFloor {
    type Err = String;

    /// `5%`, `2G`/`2GiB`, `512M`, `1048576`; `0` turns the floor off.
    fn from_str(s: &str) -> std::result::Result<DiskFloor, String> {
        let t = s.trim();
        let bad = || {
            format!("'{s}' is not a free-space floor; give bytes with an optional K/M/G/T suffix (e.g. 2G) or a percentage (e.g. 5%)")
        };
        if let Some(p) = t.strip_suffix('%') {
            let p: f64 = p.trim().parse().map_err(|_| bad())?;
            if !(0.0..=100.0).contains(&p) {
                return Err(bad());
            }
            return Ok(DiskFloor::Percent(p));
        }
        let upper = t.to_ascii_uppercase();
        let digits = upper.trim_end_matches("IB").trim_end_matches('B');
        let (num, mult) = match digits.chars().last() {
            Some('K') => (&digits[..digits.len() - 1], 1u64 << 10),
            Some('M') => (&digits[..digits.len() - 1], 1 << 20),
            Some('G') => (&digits[..digits.len() - 1], 1 << 30),
            Some('T') => (&digits[..digits.len() - 1], 1 << 40),
            _ => (digits, 1),
        };
        let n: u64 = num.trim().parse().map_err(|_| bad())?;
        n.checked_mul(mult).map(DiskFloor::Bytes).ok_or_else(bad)
    }
}

/// Free (available to unprivileged users) and total bytes of the filesystem holding `path`.
pub fn space(path: &Path) -> std::io::Result<(u64, u64)> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::other("path holds a NUL byte"))?;
    // SAFETY: statvfs(3) fills the zeroed struct; `c` is a valid NUL-terminated path.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let frsize = st.f_frsize as u64;
    Ok((
        (st.f_bavail as u64).saturating_mul(frsize),
        (st.f_blocks as u64).saturating_mul(frsize),
    ))
}

impl DiskFloor {
    /// The floor in bytes on a filesystem of `total` bytes.
    pub fn bytes(&self, total: u64) -> u64 {
        match *self {
            DiskFloor::Bytes(b) => b,
            DiskFloor::Percent(p) => (total as f64 * p / 100.0) as u64,
        }
    }

    /// Refuses `what` with 507 and the numbers when `data_dir`'s filesystem is below the floor.
    pub fn check(&self, data_dir: &Path, what: &str) -> Result<()> {
        let (free, total) = match space(data_dir) {
            Ok(s) => s,
            // Not knowing is no reason to refuse; the write itself reports a full disk.
            Err(_) => return Ok(()),
        };
        let floor = self.bytes(total);
        if free >= floor {
            return Ok(());
        }
        Err(Error::new(
            ErrorCode::InsufficientStorage,
            format!(
                "cannot {what}: the filesystem holding {} has {} MiB free ({free} bytes), below the floor of {} MiB ({floor} bytes, `kiln serve --min-free-disk`); delete sandboxes, snapshots or volumes, or free space on that disk, and try again",
                data_dir.display(),
                free >> 20,
                floor >> 20,
            ),
        ))
    }
}

/// Bytes allocated (blocks, not apparent sizes: disks are sparse) under the data directory's `sandboxes`,
/// `snapshots` and `volumes`, each inode counted once (snapshots and sandboxes share layers by hard link).
/// Links are not followed. The daemon's template snapshots (`snapshots/template-*`) are part of their
/// templates, as images are: neither they nor the links sandboxes hold to their files are counted.
pub fn used_bytes(data_dir: &Path) -> u64 {
    let mut seen = std::collections::HashSet::new();
    let templates: Vec<std::path::PathBuf> = std::fs::read_dir(data_dir.join("snapshots"))
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("template-"))
        .map(|e| e.path())
        .collect();
    walk_files(templates, &mut seen);
    walk_files(
        ["sandboxes", "snapshots", "volumes"]
            .iter()
            .map(|d| data_dir.join(d))
            .collect(),
        &mut seen,
    )
}

/// Allocated bytes of the files under `dirs` whose inodes are not in `seen` yet (which it adds).
fn walk_files(
    mut stack: Vec<std::path::PathBuf>,
    seen: &mut std::collections::HashSet<(u64, u64)>,
) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0u64;
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let Ok(m) = entry.metadata() else { continue };
            if m.is_dir() {
                stack.push(entry.path());
            } else if m.is_file() && seen.insert((m.dev(), m.ino())) {
                total = total.saturating_add(m.blocks() * 512);
            }
        }
    }
    total
}

/// `kiln serve --max-storage`: refuses `what` with 507 and the numbers when the sandboxes, snapshots and
/// volumes in `data_dir` already use `max` bytes or more. `None`: no quota.
pub fn check_quota(data_dir: &Path, max: Option<u64>, what: &str) -> Result<()> {
    let Some(max) = max else { return Ok(()) };
    let used = used_bytes(data_dir);
    if used < max {
        return Ok(());
    }
    Err(Error::new(
        ErrorCode::InsufficientStorage,
        format!(
            "cannot {what}: sandboxes, snapshots and volumes in {} use {} MiB ({used} bytes), at or over the storage quota of {} MiB ({max} bytes, `kiln serve --max-storage`); delete sandboxes, snapshots or volumes, or raise the quota, and try again",
            data_dir.display(),
            used >> 20,
            max >> 20,
        ),
    ))
}

impl crate::config::Config {
    /// Both storage checks before something new is made on disk: the free-space floor and the quota.
    pub fn check_storage(&self, what: &str) -> Result<()> {
        self.min_free_disk.check(&self.data_dir, what)?;
        check_quota(&self.data_dir, self.max_storage, what)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Real files: allocated blocks are counted once per inode (hard links share), sparse holes are not,
    /// and the quota refuses with 507 and both numbers once reached.
    #[test]
    fn the_quota_counts_allocated_blocks_once_and_refuses_at_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let sb = dir.path().join("sandboxes/sb1");
        std::fs::create_dir_all(&sb).unwrap();
        std::fs::create_dir_all(dir.path().join("snapshots/s1")).unwrap();
        std::fs::write(sb.join("disk"), vec![1u8; 1 << 20]).unwrap();
        std::fs::hard_link(sb.join("disk"), dir.path().join("snapshots/s1/disk")).unwrap();
        std::fs::File::create(sb.join("sparse"))
            .unwrap()
            .set_len(1 << 30)
            .unwrap();
        std::fs::write(dir.path().join("kiln.db"), vec![1u8; 1 << 20]).unwrap();
        // A template snapshot's RAM, and a sandbox's link to it, belong to the template: not counted.
        let tpl = dir.path().join("snapshots/template-0123456789abcdef");
        std::fs::create_dir_all(&tpl).unwrap();
        std::fs::write(tpl.join("memory"), vec![1u8; 4 << 20]).unwrap();
        std::fs::hard_link(tpl.join("memory"), sb.join("memory.base")).unwrap();
        let used = used_bytes(dir.path());
        assert!((1 << 20..(1 << 20) + (64 << 10)).contains(&used), "{used}");
        assert!(check_quota(dir.path(), None, "x").is_ok());
        assert!(check_quota(dir.path(), Some(2 << 20), "x").is_ok());
        let e = check_quota(dir.path(), Some(1 << 20), "create a volume").unwrap_err();
        assert_eq!(e.code, ErrorCode::InsufficientStorage);
        assert!(
            e.message.contains("--max-storage") && e.message.contains(&used.to_string()),
            "{}",
            e.message
        );
    }

    #[test]
    fn parses_floors() {
        assert_eq!("2G".parse(), Ok(DiskFloor::Bytes(2 << 30)));
        assert_eq!("2GiB".parse(), Ok(DiskFloor::Bytes(2 << 30)));
        assert_eq!("512m".parse(), Ok(DiskFloor::Bytes(512 << 20)));
        assert_eq!("1000".parse(), Ok(DiskFloor::Bytes(1000)));
        assert_eq!("0".parse(), Ok(DiskFloor::Bytes(0)));
        assert_eq!("5%".parse(), Ok(DiskFloor::Percent(5.0)));
        assert!("x".parse::<DiskFloor>().is_err());
        assert!("150%".parse::<DiskFloor>().is_err());
        assert!("99999999999T".parse::<DiskFloor>().is_err());
        assert_eq!(DiskFloor::Percent(5.0).bytes(1000), 50);
    }

    #[test]
    fn a_floor_above_the_disk_refuses_with_the_numbers() {
        let dir = tempfile::tempdir().unwrap();
        assert!(DiskFloor::Bytes(0).check(dir.path(), "create").is_ok());
        let e = DiskFloor::Percent(100.0)
            .check(dir.path(), "create a sandbox")
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::InsufficientStorage);
        assert!(e.message.contains("MiB free"), "{}", e.message);
    }
}
