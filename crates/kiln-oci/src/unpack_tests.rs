use super::*;
use std::os::unix::fs::MetadataExt;

/// A tar entry written byte by byte, so names the tar crate would refuse (`..`, absolute) can be made.
fn entry(tar: &mut Vec<u8>, name: &str, kind: tar::EntryType, data: &[u8], link: &str, mode: u32) {
    let mut h = tar::Header::new_ustar();
    h.as_mut_bytes()[..name.len()].copy_from_slice(name.as_bytes());
    h.set_entry_type(kind);
    h.set_size(data.len() as u64);
    h.set_mode(mode);
    h.set_uid(1234);
    h.set_gid(2345);
    h.set_mtime(1_000_000);
    if !link.is_empty() {
        h.as_mut_bytes()[157..157 + link.len()].copy_from_slice(link.as_bytes());
    }
    h.set_cksum();
    tar.extend_from_slice(h.as_bytes());
    tar.extend_from_slice(data);
    tar.resize(tar.len().div_ceil(512) * 512, 0);
}

fn finish(mut tar: Vec<u8>) -> Vec<u8> {
    tar.extend_from_slice(&[0u8; 1024]);
    tar
}

use tar::EntryType as T;

#[test]
fn layers_stack_with_whiteouts_links_and_owners() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    fs::create_dir(&root).unwrap();
    let mut l1 = Vec::new();
    entry(&mut l1, "etc/", T::Directory, b"", "", 0o755);
    entry(&mut l1, "etc/gone", T::Regular, b"x", "", 0o644);
    entry(&mut l1, "etc/keep", T::Regular, b"keep", "", 0o4755);
    entry(&mut l1, "opq/", T::Directory, b"", "", 0o755);
    entry(&mut l1, "opq/old", T::Regular, b"old", "", 0o644);
    entry(&mut l1, "bin/sh", T::Symlink, b"", "busybox", 0o777);
    entry(&mut l1, "bin/hard", T::Link, b"", "etc/keep", 0o644);
    entry(&mut l1, "dev/null", T::Char, b"", "", 0o666);
    entry(&mut l1, "fifo", T::Fifo, b"", "", 0o600);
    apply_layer(&root, &finish(l1)[..]).unwrap();
    let mut l2 = Vec::new();
    entry(&mut l2, "etc/.wh.gone", T::Regular, b"", "", 0o644);
    entry(&mut l2, "opq/", T::Directory, b"", "", 0o755);
    entry(&mut l2, "opq/new", T::Regular, b"new", "", 0o644);
    entry(&mut l2, "opq/.wh..wh..opq", T::Regular, b"", "", 0o644);
    apply_layer(&root, &finish(l2)[..]).unwrap();

    assert!(!root.join("etc/gone").exists());
    let keep = fs::metadata(root.join("etc/keep")).unwrap();
    assert_eq!(
        (keep.uid(), keep.gid(), keep.mode() & 0o7777),
        (1234, 2345, 0o4755)
    );
    assert_eq!(keep.mtime(), 1_000_000);
    assert_eq!(keep.nlink(), 2);
    assert_eq!(
        fs::read_link(root.join("bin/sh")).unwrap(),
        Path::new("busybox")
    );
    assert!(!root.join("opq/old").exists());
    assert_eq!(fs::read(root.join("opq/new")).unwrap(), b"new");
    let null = fs::symlink_metadata(root.join("dev/null")).unwrap();
    assert!(std::os::unix::fs::FileTypeExt::is_char_device(
        &null.file_type()
    ));
    assert!(std::os::unix::fs::FileTypeExt::is_fifo(
        &fs::symlink_metadata(root.join("fifo")).unwrap().file_type()
    ));
}

/// A hostile layer: `..` names, absolute names, symlinks to the host's / and to `..` as parents of
/// later entries, a hard link to a host file, a whiteout reaching out. Nothing outside the root changes.
#[test]
fn hostile_layer_stays_inside_the_root() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let outside = dir.path().join("outside");
    fs::create_dir(&root).unwrap();
    fs::create_dir(&outside).unwrap();
    fs::write(outside.join("victim"), b"safe").unwrap();
    let out = outside.display().to_string();
    let mut l = Vec::new();
    entry(&mut l, "../outside/dotdot", T::Regular, b"bad", "", 0o644);
    entry(
        &mut l,
        &format!("{out}/absolute"),
        T::Regular,
        b"bad",
        "",
        0o644,
    );
    entry(&mut l, "up", T::Symlink, b"", "../..", 0o777);
    entry(
        &mut l,
        "up/outside/via-dotdot-link",
        T::Regular,
        b"bad",
        "",
        0o644,
    );
    entry(&mut l, "abs", T::Symlink, b"", &out, 0o777);
    entry(&mut l, "abs/via-abs-link", T::Regular, b"bad", "", 0o644);
    entry(&mut l, "abs/.wh.victim", T::Regular, b"", "", 0o644);
    entry(
        &mut l,
        "victimlink",
        T::Symlink,
        b"",
        &format!("{out}/victim"),
        0o777,
    );
    entry(&mut l, "victimlink", T::Regular, b"replaced", "", 0o644);
    entry(&mut l, "hard", T::Link, b"", "../outside/victim", 0o644);
    let _ = apply_layer(&root, &finish(l)[..]);
    let names: Vec<_> = fs::read_dir(&outside)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names, ["victim"], "a layer wrote outside the root");
    assert_eq!(fs::read(outside.join("victim")).unwrap(), b"safe");
    // The writes landed inside instead, where the guest would have put them.
    assert_eq!(fs::read(root.join("outside/dotdot")).unwrap(), b"bad");
    assert!(root
        .join(out.trim_start_matches('/'))
        .join("absolute")
        .is_file());
    assert!(root.join("outside/via-dotdot-link").is_file());
    assert_eq!(fs::read(root.join("victimlink")).unwrap(), b"replaced");
}

#[test]
fn clean_and_resolve_never_leave_the_root() {
    assert_eq!(
        clean(Path::new("/a/../../b/./c")),
        Some(PathBuf::from("b/c"))
    );
    assert_eq!(clean(Path::new("./")), None);
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    symlink("/", root.join("slash")).unwrap();
    symlink("loop", root.join("loop")).unwrap();
    assert_eq!(
        resolve(root, Path::new("slash/etc"), true).unwrap(),
        root.join("etc")
    );
    assert!(resolve(root, Path::new("loop/x"), true).is_err());
    assert_eq!(
        resolve(root, Path::new("slash"), false).unwrap(),
        root.join("slash")
    );
}

/// A file's value of extended attribute `name`, if set (read without following symlinks).
fn get_xattr(path: &Path, name: &str) -> Option<Vec<u8>> {
    let p = cstr(path).unwrap();
    let n = CString::new(name).unwrap();
    let mut buf = vec![0u8; 256];
    // SAFETY: valid C strings and a buffer of the length given.
    let len =
        unsafe { libc::lgetxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    (len >= 0).then(|| buf[..len as usize].to_vec())
}

/// File capabilities and other extended attributes travel as PAX `SCHILY.xattr.*` records; they end up
/// on the staged file (after the chown that would clear a capability), and `mkfs.ext4 -d` carries them
/// into the image, where debugfs lists them.
#[test]
fn pax_xattrs_and_file_capabilities_are_kept() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    fs::create_dir(&root).unwrap();
    // VFS_CAP_REVISION_2 with cap_net_raw (bit 13) permitted and effective: what `setcap
    // cap_net_raw+ep` writes.
    let mut cap = vec![0u8; 20];
    cap[..4].copy_from_slice(&0x0200_0001u32.to_le_bytes());
    cap[4..8].copy_from_slice(&(1u32 << 13).to_le_bytes());
    let mut b = tar::Builder::new(Vec::new());
    b.append_pax_extensions([
        ("SCHILY.xattr.security.capability", &cap[..]),
        ("SCHILY.xattr.user.origin", &b"layer"[..]),
    ])
    .unwrap();
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(T::Regular);
    h.set_size(4);
    h.set_mode(0o755);
    h.set_uid(1234);
    h.set_gid(2345);
    b.append_data(&mut h, "bin/ping", &b"ping"[..]).unwrap();
    let tar = b.into_inner().unwrap();
    apply_layer(&root, &tar[..]).unwrap();
    let ping = root.join("bin/ping");
    assert_eq!(fs::metadata(&ping).unwrap().uid(), 1234);
    assert_eq!(get_xattr(&ping, "security.capability"), Some(cap.clone()));
    assert_eq!(get_xattr(&ping, "user.origin"), Some(b"layer".to_vec()));

    // Into the ext4 image as kiln makes it.
    let img = dir.path().join("rootfs.img");
    let ok = std::process::Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(&root)
        .arg(&img)
        .arg("16M")
        .status()
        .unwrap()
        .success();
    assert!(ok, "mkfs.ext4 -d failed");
    let out = std::process::Command::new("debugfs")
        .args(["-R", "ea_list /bin/ping"])
        .arg(&img)
        .output()
        .unwrap();
    let listed = String::from_utf8_lossy(&out.stdout);
    assert!(listed.contains("security.capability"), "{listed}");
    assert!(listed.contains("user.origin"), "{listed}");
}
