//! Every manifest field is untrusted input: a snapshot directory may have been edited or planted (the
//! checksum line detects damage, not tampering), and its fields reach the filesystem, QEMU's command line
//! and the guest. Checked once, when a manifest is read; a failure is `snapshot_corrupt` naming the field.

use std::path::{Component, Path, PathBuf};

use super::manifest::{FileEntry, Manifest, Role};
use crate::engine::{MAX_CPUS, MAX_DISK_GIB, MAX_MEMORY_MIB, MIN_MEMORY_MIB};
use crate::error::Result;
use crate::layout::VolumeSlot;
use crate::validate;

/// The kernel's own limit on x86 is 2048; anything longer was not written by kiln.
const MAX_CMDLINE: usize = 4096;
/// No file of a snapshot is larger than a whole disk (plus qcow2 metadata) or the largest RAM.
const MAX_FILE_BYTES: u64 = 2 * (MAX_DISK_GIB << 30);
const DISK_FORMATS: [&str; 2] = ["raw", "qcow2"];

/// Checks `m`, read from `dir` (`<data>/snapshots/<id>`) as snapshot `id`.
pub(super) fn check(m: &Manifest, dir: &Path, id: &str) -> Result<()> {
    let bad = |field: &str, why: String| {
        super::manifest::corrupt(
            id,
            format!("its manifest field `{field}` is not acceptable ({why})"),
        )
    };
    let named = |field: &str, r: Result<()>| r.map_err(|e| bad(field, e.message));
    named("id", validate::name("snapshot", &m.id))?;
    if m.id != id {
        return Err(bad(
            "id",
            format!(
                "'{}' is not its directory's name '{id}'",
                m.id.escape_debug()
            ),
        ));
    }
    named(
        "source.sandbox_id",
        validate::name("sandbox id", &m.source.sandbox_id),
    )?;
    named(
        "source.sandbox_name",
        validate::name("sandbox", &m.source.sandbox_name),
    )?;
    named(
        "source.template",
        validate::name("template", &m.source.template),
    )?;
    named("source.env", validate::env(&m.source.env))?;
    named("labels", validate::labels(&m.labels))?;
    if !is_mac(&m.source.mac) {
        return Err(bad(
            "source.mac",
            format!("'{}' is not a MAC address", m.source.mac.escape_debug()),
        ));
    }
    if m.source.hostname.len() > 253 || !m.source.hostname.bytes().all(is_host_byte) {
        return Err(bad("source.hostname", "not a host name".into()));
    }
    if let Some(p) = &m.parent {
        let name = p
            .strip_prefix("template:")
            .or_else(|| p.strip_prefix("snapshot:"))
            .unwrap_or(p);
        named("parent", validate::name("parent", name))?;
    }
    named(
        "memory_mib",
        validate::range(
            "memory",
            m.memory_mib,
            MIN_MEMORY_MIB,
            MAX_MEMORY_MIB,
            " MiB",
        ),
    )?;
    named(
        "cpus",
        validate::range("cpus", u64::from(m.cpus), 1, MAX_CPUS, ""),
    )?;
    if let Some(max) = m.max_cpus {
        named(
            "max_cpus",
            validate::range("max_cpus", u64::from(max), u64::from(m.cpus), MAX_CPUS, ""),
        )?;
    }
    if let Some(max) = m.max_memory_mib {
        named(
            "max_memory_mib",
            validate::range("max_memory_mib", max, m.memory_mib, MAX_MEMORY_MIB, " MiB"),
        )?;
    }
    named(
        "disk_size_bytes",
        validate::range(
            "disk size",
            m.disk_size_bytes,
            1,
            MAX_DISK_GIB << 30,
            " bytes",
        ),
    )?;
    if m.cmdline.len() > MAX_CMDLINE || m.cmdline.contains(['\n', '\r', '\0']) {
        return Err(bad(
            "cmdline",
            format!("at most {MAX_CMDLINE} bytes on one line without NUL"),
        ));
    }
    if let Some(fw) = &m.firmware {
        if !kiln_vmm::qemu::QBOOT_PATHS
            .iter()
            .any(|allowed| fw == Path::new(allowed))
        {
            return Err(bad(
                "firmware",
                format!(
                    "{} is not firmware kiln uses (only {})",
                    fw.display(),
                    kiln_vmm::qemu::QBOOT_PATHS.join(" or ")
                ),
            ));
        }
    }
    for (i, slot) in m.volume_slots.iter().enumerate() {
        if let VolumeSlot::Attached { path, .. } | VolumeSlot::Stale { path, .. } = slot {
            named(
                &format!("volume_slots[{i}].path"),
                validate::mount_path(path),
            )?;
        }
    }
    let roots = external_roots(dir);
    for (i, f) in m.files.iter().enumerate() {
        check_file(f, &roots).map_err(|why| bad(&format!("files[{i}].{why}"), f_desc(f)))?;
    }
    Ok(())
}

fn f_desc(f: &FileEntry) -> String {
    format!("{:?} file '{}'", f.role, f.path.escape_debug())
}

/// Returns the sub-field at fault (`path`, `format`, `size`).
fn check_file(f: &FileEntry, roots: &[PathBuf]) -> std::result::Result<(), &'static str> {
    if f.size > MAX_FILE_BYTES {
        return Err("size");
    }
    match (&f.role, f.format.as_deref()) {
        (Role::Disk, Some(fmt)) if DISK_FORMATS.contains(&fmt) => {}
        (Role::Disk, None) => {}
        (Role::Disk, Some(_)) => return Err("format"),
        (_, Some(_)) => return Err("format"),
        (_, None) => {}
    }
    if f.external {
        // A diff's base: kiln's own snapshot or image files only, wherever symlinks lead.
        if f.role != Role::Disk && f.role != Role::Memory {
            return Err("external");
        }
        if inside(Path::new(&f.path), roots) {
            Ok(())
        } else {
            Err("path")
        }
    } else if own_name_ok(f) {
        Ok(())
    } else {
        Err("path")
    }
}

/// Own files have the fixed names capture gives them.
fn own_name_ok(f: &FileEntry) -> bool {
    match f.role {
        Role::State => f.path == "state",
        Role::Memory => f.path == "memory",
        Role::MemoryDelta => f.path == "memory.delta",
        Role::Kernel => f.path == "kernel",
        Role::Initrd => f.path == "initrd",
        Role::Disk => f
            .path
            .strip_prefix("disk-")
            .and_then(|rest| rest.split_once('.'))
            .is_some_and(|(n, ext)| {
                !n.is_empty()
                    && n.len() <= 3
                    && n.bytes().all(|b| b.is_ascii_digit())
                    && DISK_FORMATS.contains(&ext)
                    && f.format.as_deref().is_none_or(|fmt| fmt == ext)
            }),
    }
}

/// `<data>/snapshots` and `<data>/images`, canonical (the images tree may be a symlink).
fn external_roots(dir: &Path) -> Vec<PathBuf> {
    let Some(snapshots) = dir.parent() else {
        return Vec::new();
    };
    let mut roots = vec![snapshots.to_path_buf()];
    if let Some(data) = snapshots.parent() {
        roots.push(data.join("images"));
    }
    // Both forms: a base that is gone is checked lexically against the path kiln recorded it under.
    let canonical: Vec<PathBuf> = roots.iter().filter_map(|r| r.canonicalize().ok()).collect();
    roots.extend(canonical);
    roots
}

/// An absolute, normal path whose canonical form (or, when it is gone, its lexical form: `verify` then says
/// `snapshot_base_missing`) lies under one of `roots`.
fn inside(path: &Path, roots: &[PathBuf]) -> bool {
    let normal = path.is_absolute()
        && path
            .components()
            .all(|c| matches!(c, Component::RootDir | Component::Normal(_)));
    if !normal {
        return false;
    }
    let real = match path.canonicalize() {
        Ok(p) => p,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => path.to_path_buf(),
        Err(_) => return false,
    };
    roots.iter().any(|r| real.starts_with(r) && real != *r)
}

fn is_mac(s: &str) -> bool {
    let parts: Vec<&str> = s.split(':').collect();
    parts.len() == 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && p.bytes().all(|b| b.is_ascii_hexdigit()))
}

fn is_host_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_'
}

#[cfg(test)]
mod tests {
    use super::super::manifest::tests::sample;
    use super::super::manifest::{FileEntry, Manifest, Role};
    use crate::error::ErrorCode;

    /// `<tmp>/snapshots/s1` holding a valid sample, and `<tmp>/images`.
    fn setup() -> (tempfile::TempDir, std::path::PathBuf, Manifest) {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("snapshots/s1");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::create_dir_all(tmp.path().join("images/tiny")).unwrap();
        let m = sample(&dir);
        m.write(&dir).unwrap();
        Manifest::read(&dir, "s1").expect("the valid sample reads");
        (tmp, dir, m)
    }

    /// Writes `m` (with a correct checksum line) and asserts reading it is refused naming `field`.
    fn refused(dir: &std::path::Path, m: &Manifest, field: &str) {
        m.write(dir).unwrap();
        let e = Manifest::read(dir, "s1").unwrap_err();
        assert_eq!(e.code, ErrorCode::SnapshotCorrupt, "{field}: {}", e.message);
        assert!(
            e.message.contains(&format!("`{field}`")),
            "{field} not named: {}",
            e.message
        );
    }

    /// One hostile edit of a manifest.
    type Edit = fn(&mut Manifest);

    fn disk(path: &str, format: &str, external: bool) -> FileEntry {
        FileEntry {
            role: Role::Disk,
            path: path.into(),
            size: 1,
            checksum: "0".into(),
            format: Some(format.into()),
            external,
        }
    }

    #[test]
    fn own_files_have_fixed_plain_names() {
        let (_tmp, dir, m) = setup();
        for path in [
            "/etc/shadow",
            "../s2/state",
            "sub/state",
            "state/..",
            "",
            "disk-0.qcow2",
        ] {
            let mut bad = m.clone();
            bad.files[0].path = path.into();
            refused(&dir, &bad, "files[0].path");
        }
        for path in [
            "/etc/shadow",
            "../../etc/shadow",
            "disk-0.img",
            "disk-.raw",
            "disk-0.qcow2/x",
        ] {
            let mut bad = m.clone();
            bad.files.push(disk(path, "qcow2", false));
            refused(&dir, &bad, "files[1].path");
        }
        let mut ok = m.clone();
        ok.files.push(disk("disk-12.qcow2", "qcow2", false));
        ok.write(&dir).unwrap();
        Manifest::read(&dir, "s1").unwrap();
    }

    #[test]
    fn format_is_raw_or_qcow2_without_options() {
        let (_tmp, dir, m) = setup();
        for fmt in ["qcow2,file.driver=ssh,file.host=x", "vmdk", "raw\n", ""] {
            let mut bad = m.clone();
            bad.files.push(disk("disk-0.qcow2", fmt, false));
            refused(&dir, &bad, "files[1].format");
        }
        // A format on a file that is not a disk.
        let mut bad = m.clone();
        bad.files[0].format = Some("raw".into());
        refused(&dir, &bad, "files[0].format");
    }

    #[test]
    fn external_bases_stay_in_kilns_trees() {
        let (tmp, dir, m) = setup();
        let images = tmp.path().join("images");
        std::fs::write(images.join("tiny/rootfs.img"), b"x").unwrap();
        // A symlink inside the images tree that leads out of it.
        std::os::unix::fs::symlink("/etc/passwd", images.join("tiny/escape.img")).unwrap();
        let outside = [
            "/etc/passwd".to_string(),
            "relative/rootfs.img".to_string(),
            format!("{}/../../etc/passwd", images.display()),
            images.join("tiny/escape.img").display().to_string(),
            images.display().to_string(),
        ];
        for path in &outside {
            let mut bad = m.clone();
            bad.files.push(disk(path, "raw", true));
            refused(&dir, &bad, "files[1].path");
        }
        for path in [
            images.join("tiny/rootfs.img"),
            images.join("gone/rootfs.img"),
            tmp.path().join("snapshots/s0/disk-0.qcow2"),
        ] {
            let mut ok = m.clone();
            ok.files
                .push(disk(&path.display().to_string(), "raw", true));
            ok.write(&dir).unwrap();
            Manifest::read(&dir, "s1").unwrap();
        }
    }

    #[test]
    fn firmware_only_from_the_allowlist() {
        let (_tmp, dir, m) = setup();
        for fw in [
            "/tmp/evil.rom",
            "/usr/share/qemu/../../../tmp/x",
            "qboot.rom",
        ] {
            let mut bad = m.clone();
            bad.firmware = Some(fw.into());
            refused(&dir, &bad, "firmware");
        }
        let mut ok = m.clone();
        ok.firmware = Some(kiln_vmm::qemu::QBOOT_PATHS[0].into());
        ok.write(&dir).unwrap();
        Manifest::read(&dir, "s1").unwrap();
    }

    #[test]
    fn resources_are_in_range() {
        let (_tmp, dir, m) = setup();
        let cases: Vec<(&str, Edit)> = vec![
            ("memory_mib", |m| m.memory_mib = 1 << 40),
            ("memory_mib", |m| m.memory_mib = 0),
            ("cpus", |m| m.cpus = 4096),
            ("cpus", |m| m.cpus = 0),
            ("disk_size_bytes", |m| m.disk_size_bytes = u64::MAX),
            ("disk_size_bytes", |m| m.disk_size_bytes = 0),
            ("files[0].size", |m| m.files[0].size = u64::MAX),
            ("cmdline", |m| {
                m.cmdline = "console=ttyS0\n-device evil".into()
            }),
            ("cmdline", |m| m.cmdline = "x".repeat(5000)),
        ];
        for (field, edit) in cases {
            let mut bad = m.clone();
            edit(&mut bad);
            refused(&dir, &bad, field);
        }
    }

    #[test]
    fn ids_names_and_strings_are_revalidated() {
        let (_tmp, dir, m) = setup();
        let cases: Vec<(&str, Edit)> = vec![
            ("id", |m| m.id = "s2".into()),
            ("id", |m| m.id = "../s1".into()),
            ("source.sandbox_id", |m| {
                m.source.sandbox_id = "../../etc".into()
            }),
            ("source.sandbox_id", |m| m.source.sandbox_id = "/".into()),
            ("source.sandbox_id", |m| m.source.sandbox_id = String::new()),
            ("source.sandbox_name", |m| {
                m.source.sandbox_name = "A B".into()
            }),
            ("source.template", |m| m.source.template = "../x".into()),
            ("source.mac", |m| {
                m.source.mac = "52:54:00:00:00:01,id=x".into()
            }),
            ("source.hostname", |m| m.source.hostname = "a\nb".into()),
            ("parent", |m| m.parent = Some("template:../../x".into())),
            ("labels", |m| {
                m.labels.insert("bad key!".into(), "v".into());
            }),
            ("source.env", |m| {
                m.source.env.insert("1X".into(), "v".into());
            }),
        ];
        for (field, edit) in cases {
            let mut bad = m.clone();
            edit(&mut bad);
            refused(&dir, &bad, field);
        }
    }

    #[test]
    fn own_files_must_be_regular_files_not_symlinks() {
        let (tmp, dir, m) = setup();
        let target = tmp.path().join("outside");
        std::fs::write(&target, b"device state").unwrap();
        std::fs::remove_file(dir.join("state")).unwrap();
        std::os::unix::fs::symlink(&target, dir.join("state")).unwrap();
        let e = m.verify(&dir, true).unwrap_err();
        assert_eq!(e.code, ErrorCode::SnapshotCorrupt, "{}", e.message);
        // A FIFO is refused without being opened (it would block).
        std::fs::remove_file(dir.join("state")).unwrap();
        let ok = std::process::Command::new("mkfifo")
            .arg(dir.join("state"))
            .status()
            .unwrap();
        assert!(ok.success());
        let e = m.verify(&dir, true).unwrap_err();
        assert_eq!(e.code, ErrorCode::SnapshotCorrupt, "{}", e.message);
    }
}
