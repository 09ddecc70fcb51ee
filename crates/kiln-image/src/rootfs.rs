//! Root filesystem trees for each template and the ext4 image made from them. No loop mounts: the tree is
//! staged in a directory and `mkfs.ext4 -d` copies it into a sparse image file.

use std::collections::HashSet;
use std::fs;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::error::{ImageError, IoContext, Result};
use crate::modules::{load_module_unsigned, ModuleFile};
use crate::tools::{self, Tool, MKFS_EXT4};

/// The guest init (images/init.sh), installed as /kiln/init.
pub(crate) const GUEST_INIT: &str = include_str!("../../../images/init.sh");

const LDD: Tool = Tool {
    name: "ldd",
    package: "libc-bin",
    purpose: "find the libraries resize2fs needs",
};
const RESIZE2FS: Tool = Tool {
    name: "resize2fs",
    package: "e2fsprogs",
    purpose: "grow the root filesystem at boot",
};

pub(crate) fn create_dir(path: &Path, mode: u32) -> Result<()> {
    fs::create_dir_all(path).at("create", path)?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).at("set permissions of", path)
}

pub(crate) fn write_file(path: &Path, contents: &[u8], mode: u32) -> Result<()> {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).at("create", parent)?;
    }
    // Replace rather than write through: the target may be a symlink (e.g. resolv.conf) or read-only.
    let _ = fs::remove_file(path);
    fs::write(path, contents).at("write", path)?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).at("set permissions of", path)
}

/// Directories every image needs, whatever else it contains: mount points for /kiln/init and the
/// initramfs hand-over, plus the usual FHS skeleton.
fn create_skeleton(root: &Path) -> Result<()> {
    for (dir, mode) in [
        ("proc", 0o555),
        ("sys", 0o555),
        ("dev", 0o755),
        ("run", 0o755),
        ("tmp", 0o1777),
        ("root", 0o700),
        ("kiln", 0o755),
        ("etc", 0o755),
        ("var/tmp", 0o1777),
    ] {
        let path = root.join(dir);
        // An imported image may have symlinks here (even to host paths, from the host's view): never
        // create through one.
        if !path.exists() && !through_symlink(root, Path::new(dir)) {
            create_dir(&path, mode)?;
        }
    }
    Ok(())
}

/// Whether `rel` or one of its ancestors under `root` is a symlink.
fn through_symlink(root: &Path, rel: &Path) -> bool {
    let mut path = root.to_path_buf();
    rel.components().any(|c| {
        path.push(c);
        fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_symlink())
    })
}

/// Installs what kiln itself puts in every image: /kiln/init, the static busybox it runs on (so init
/// behaves the same whatever the image's own tools are) and the agent.
pub(crate) fn install_kiln_files(root: &Path, busybox: &[u8], agent: &[u8]) -> Result<()> {
    create_skeleton(root)?;
    let kiln_busybox = root.join("kiln/busybox");
    let bin_busybox = root.join("bin/busybox");
    // The tiny image already has this very binary as /bin/busybox: share it instead of a second copy.
    if tools::is_executable(&bin_busybox)
        && fs::read(&bin_busybox).is_ok_and(|existing| existing == busybox)
    {
        let _ = fs::remove_file(&kiln_busybox);
        fs::hard_link(&bin_busybox, &kiln_busybox).at("link", &kiln_busybox)?;
    } else {
        write_file(&kiln_busybox, busybox, 0o755)?;
    }
    write_file(&root.join("kiln/init"), GUEST_INIT.as_bytes(), 0o755)?;
    write_file(&root.join("kiln/kiln-agent"), agent, 0o755)
}

/// Puts the modules /kiln/init loads after boot into /kiln/modules, named `NN-name.ko` so a shell glob
/// lists them in load order.
pub(crate) fn install_late_modules(root: &Path, modules: &[ModuleFile]) -> Result<()> {
    let dir = root.join("kiln/modules");
    create_dir(&dir, 0o755)?;
    for (index, module) in modules.iter().enumerate() {
        let data = load_module_unsigned(module)?;
        write_file(
            &dir.join(format!("{:02}-{}.ko", index + 1, module.name)),
            &data,
            0o644,
        )?;
    }
    Ok(())
}

/// Stages the tiny image: static busybox with a link per applet, minimal /etc, and resize2fs with its
/// libraries so `kiln.resize=1` works here too.
pub(crate) fn stage_tiny(root: &Path, busybox_path: &Path, busybox: &[u8]) -> Result<()> {
    create_skeleton(root)?;
    for dir in [
        "bin", "sbin", "usr/bin", "usr/sbin", "home", "mnt", "var/log",
    ] {
        create_dir(&root.join(dir), 0o755)?;
    }
    write_file(&root.join("bin/busybox"), busybox, 0o755)?;
    let applets = tools::run_stdout(Command::new(busybox_path).arg("--list-full"))?;
    for applet in applets
        .lines()
        .map(str::trim)
        .filter(|a| !a.is_empty() && *a != "bin/busybox")
    {
        let link = root.join(applet);
        if !link.exists() {
            if let Some(parent) = link.parent() {
                fs::create_dir_all(parent).at("create", parent)?;
            }
            symlink("/bin/busybox", &link).at("create symlink", &link)?;
        }
    }
    let files: [(&str, &str, u32); 7] = [
        ("etc/passwd", "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n", 0o644),
        // gid 5 (tty) is what /kiln/init mounts devpts with.
        ("etc/group", "root:x:0:\ntty:x:5:\nnogroup:x:65534:\n", 0o644),
        ("etc/shadow", "root:*:19000:0:99999:7:::\nnobody:*:19000:0:99999:7:::\n", 0o600),
        ("etc/hostname", "kiln\n", 0o644),
        ("etc/hosts", "127.0.0.1 localhost\n::1 localhost ip6-localhost ip6-loopback\n", 0o644),
        ("etc/profile", "export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\nexport PS1='\\h:\\w\\$ '\n", 0o644),
        ("etc/os-release", "NAME=\"kiln tiny\"\nID=kiln-tiny\nPRETTY_NAME=\"kiln tiny (busybox)\"\n", 0o644),
    ];
    for (path, contents, mode) in files {
        write_file(&root.join(path), contents.as_bytes(), mode)?;
    }
    // /kiln/init rewrites it at boot; an empty file keeps resolvers quiet until then.
    write_file(&root.join("etc/resolv.conf"), b"", 0o644)?;
    let resize2fs = tools::find_tool(&RESIZE2FS)?;
    copy_dynamic_binary(&resize2fs, root, Path::new("sbin/resize2fs"))
}

/// Copies a dynamically linked host binary into `root` at `dest`, together with its loader and shared
/// libraries at the paths the loader will look for them.
fn copy_dynamic_binary(binary: &Path, root: &Path, dest: &Path) -> Result<()> {
    let ldd = tools::find_tool(&LDD)?;
    let output = tools::run_stdout(Command::new(ldd).arg(binary))?;
    let mut seen = HashSet::new();
    for lib in parse_ldd(&output) {
        if seen.insert(lib.clone()) {
            let target = root.join(lib.strip_prefix("/").unwrap_or(&lib));
            let contents = fs::read(&lib).at("read", &lib)?;
            write_file(&target, &contents, 0o755)?;
        }
    }
    let contents = fs::read(binary).at("read", binary)?;
    let target = root.join(dest);
    // Replace a busybox applet link of the same name, if any.
    let _ = fs::remove_file(&target);
    write_file(&target, &contents, 0o755)
}

/// Absolute library paths from `ldd` output (`name => /path (addr)` and `/path (addr)` lines).
pub(crate) fn parse_ldd(output: &str) -> Vec<PathBuf> {
    output
        .lines()
        .filter_map(|line| {
            let line = line.trim();
            let path = line.split_once("=>").map_or(line, |(_, rest)| rest.trim());
            let path = path.split_whitespace().next()?;
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect()
}

/// Creates `image` as a sparse ext4 filesystem of `size_bytes` holding the tree at `root`.
pub(crate) fn make_ext4(root: &Path, image: &Path, size_bytes: u64, uuid: &str) -> Result<()> {
    let mkfs = tools::find_tool(&MKFS_EXT4)?;
    let file = fs::File::create(image).at("create", image)?;
    file.set_len(size_bytes).at("size", image)?;
    drop(file);
    let mut cmd = Command::new(mkfs);
    cmd.args(["-q", "-F", "-t", "ext4", "-L", "kiln-root", "-U", uuid])
        // No blocks reserved for root: everything in a sandbox runs as root anyway.
        .args(["-m", "0"])
        // root_owner: the staging directory may belong to the build user; the guest's / must be root's.
        // nodiscard: the file is freshly created and already sparse, so discarding it is wasted time.
        .args(["-E", "root_owner=0:0,nodiscard"])
        .arg("-d")
        .arg(root)
        .arg(image)
        // mke2fs treats sizes without a suffix as KiB blocks.
        .arg(format!("{}k", size_bytes / 1024));
    tools::run(&mut cmd).map_err(|err| match err {
        ImageError::CommandFailed { command, status, stderr } if stderr.contains("Could not allocate") => {
            ImageError::Build(format!(
                "the root filesystem does not fit in {} MiB; build with a larger size (`{command}` failed: {status})",
                size_bytes >> 20
            ))
        }
        other => other,
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn parses_ldd_output() {
        let out = "\tlinux-vdso.so.1 (0x00007ffd)\n\
                   \tlibe2p.so.2 => /lib/x86_64-linux-gnu/libe2p.so.2 (0x00007f35)\n\
                   \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f35)\n\
                   \t/lib64/ld-linux-x86-64.so.2 (0x00007f35)\n";
        assert_eq!(
            parse_ldd(out),
            [
                PathBuf::from("/lib/x86_64-linux-gnu/libe2p.so.2"),
                PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2"),
            ]
        );
    }

    #[test]
    fn skeleton_never_goes_through_symlinks() {
        let dir = tempfile::tempdir().unwrap();
        let (root, outside) = (dir.path().join("root"), dir.path().join("outside"));
        fs::create_dir_all(&root).unwrap();
        fs::create_dir_all(&outside).unwrap();
        symlink(&outside, root.join("var")).unwrap();
        symlink(outside.join("tmp"), root.join("tmp")).unwrap();
        install_kiln_files(&root, b"bb", b"agent").unwrap();
        assert_eq!(fs::read_dir(&outside).unwrap().count(), 0);
        assert!(tools::is_executable(&root.join("kiln/init")));
    }

    #[test]
    fn installs_kiln_files() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("bin")).unwrap();
        write_file(&dir.path().join("bin/busybox"), b"bb", 0o755).unwrap();
        install_kiln_files(dir.path(), b"bb", b"agent").unwrap();
        assert!(tools::is_executable(&dir.path().join("kiln/init")));
        assert!(tools::is_executable(&dir.path().join("kiln/busybox")));
        let linked = |p: &str| fs::metadata(dir.path().join(p)).unwrap().nlink();
        assert_eq!((linked("bin/busybox"), linked("kiln/busybox")), (2, 2));
        assert_eq!(
            fs::read(dir.path().join("kiln/kiln-agent")).unwrap(),
            b"agent"
        );
        let tmp_mode = fs::metadata(dir.path().join("tmp"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(tmp_mode & 0o7777, 0o1777);
    }
}
