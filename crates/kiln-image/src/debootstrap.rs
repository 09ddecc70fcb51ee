//! The Debian tree of the `base` image. debootstrap takes minutes, so its result is kept as a tarball in
//! `<cache_root>/base/`, keyed by everything that shapes it; later builds only unpack it (seconds).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

use crate::error::{ImageError, IoContext, Result};
use crate::progress::BuildProgress;
use crate::rootfs::write_file;
use crate::tools::{self, DEBOOTSTRAP, TAR};

const SUITE: &str = "bookworm";
const MIRROR: &str = "http://deb.debian.org/debian";
/// busybox provides `ip` for /kiln/init (minbase has no iproute2); e2fsprogs provides resize2fs.
const PACKAGES: &[&str] = &[
    "python3",
    "bash",
    "coreutils",
    "ca-certificates",
    "e2fsprogs",
    "procps",
    "busybox",
];
/// Bump when [`customize`] changes, so cached trees built by older code are not reused.
const RECIPE_VERSION: u32 = 1;

/// Unpacks the cached debootstrap tree into `root`, creating the cache first if needed.
pub(crate) fn stage_base(
    root: &Path,
    cache_root: &Path,
    progress: &dyn BuildProgress,
) -> Result<()> {
    let tarball = ensure_tarball(cache_root, progress)?;
    progress.detail(&format!("unpacking {}", tarball.display()));
    fs::create_dir_all(root).at("create", root)?;
    let tar = tools::find_tool(&TAR)?;
    tools::run(
        Command::new(tar)
            .args(["--numeric-owner", "--xattrs", "-xpf"])
            .arg(&tarball)
            .arg("-C")
            .arg(root),
    )?;
    Ok(())
}

fn cache_key() -> String {
    let mut hasher = Sha256::new();
    hasher.update(format!(
        "{RECIPE_VERSION}\n{SUITE}\n{MIRROR}\nminbase\n{}",
        PACKAGES.join(",")
    ));
    hex::encode(hasher.finalize())[..12].to_string()
}

fn ensure_tarball(cache_root: &Path, progress: &dyn BuildProgress) -> Result<PathBuf> {
    let dir = cache_root.join("base");
    let tarball = dir.join(format!("debootstrap-{SUITE}-{}.tar", cache_key()));
    if tarball.is_file() {
        progress.detail("using the cached Debian tree");
        return Ok(tarball);
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Err(ImageError::Build(
            "building the base image runs debootstrap, which needs root; run the build as root (e.g. with sudo)".into(),
        ));
    }
    let debootstrap = tools::find_tool(&DEBOOTSTRAP)?;
    let tar = tools::find_tool(&TAR)?;
    fs::create_dir_all(&dir).at("create", &dir)?;
    let work = dir.join(format!(".work-{}", std::process::id()));
    let result = (|| {
        let _ = fs::remove_dir_all(&work);
        let tree = work.join("root");
        let debs = dir.join("debs");
        fs::create_dir_all(&debs).at("create", &debs)?;
        progress.detail(&format!(
            "running debootstrap --variant=minbase {SUITE} from {MIRROR} (a few minutes; cached afterwards)"
        ));
        let mut cmd = Command::new(debootstrap);
        cmd.args(["--variant=minbase", "--components=main"])
            .arg(format!("--include={}", PACKAGES.join(",")))
            // Keeping the downloaded .debs makes a rebuild after a recipe change much faster.
            .arg(format!("--cache-dir={}", debs.display()))
            .arg(SUITE)
            .arg(&tree)
            .arg(MIRROR);
        tools::run(&mut cmd).map_err(|err| with_debootstrap_log(err, &tree))?;

        progress.detail("preparing the Debian tree for kiln");
        customize(&tree)?;

        progress.detail("caching the Debian tree");
        let partial = work.join("tree.tar");
        tools::run(
            Command::new(&tar)
                .args(["--numeric-owner", "--xattrs", "-cpf"])
                .arg(&partial)
                .arg("-C")
                .arg(&tree)
                .arg("."),
        )?;
        fs::rename(&partial, &tarball).at("move into place", &tarball)
    })();
    let _ = fs::remove_dir_all(&work);
    result.map(|()| tarball)
}

/// debootstrap's own error output is terse; its log in the target says what really failed.
fn with_debootstrap_log(err: ImageError, tree: &Path) -> ImageError {
    let log = fs::read_to_string(tree.join("debootstrap/debootstrap.log")).unwrap_or_default();
    let tail: Vec<&str> = log.lines().rev().take(15).collect();
    if tail.is_empty() {
        return err;
    }
    let tail: Vec<&str> = tail.into_iter().rev().collect();
    ImageError::Build(format!(
        "{err}\nlast lines of debootstrap.log:\n{}\n(check network access to {MIRROR})",
        tail.join("\n")
    ))
}

/// Adjusts the fresh Debian tree: configuration /kiln/init expects, apt sources that work inside a
/// sandbox, and none of the caches that would only bloat every image.
fn customize(tree: &Path) -> Result<()> {
    let sources = format!(
        "deb {MIRROR} {SUITE} main\n\
         deb {MIRROR} {SUITE}-updates main\n\
         deb http://security.debian.org/debian-security {SUITE}-security main\n"
    );
    write_file(
        &tree.join("etc/apt/sources.list"),
        sources.as_bytes(),
        0o644,
    )?;
    // debootstrap leaves the build host's resolv.conf and hostname behind; /kiln/init writes the guest's.
    write_file(&tree.join("etc/resolv.conf"), b"", 0o644)?;
    write_file(&tree.join("etc/hostname"), b"kiln\n", 0o644)?;
    write_file(
        &tree.join("etc/hosts"),
        b"127.0.0.1 localhost\n::1 localhost ip6-localhost ip6-loopback\n",
        0o644,
    )?;
    write_file(
        &tree.join("etc/fstab"),
        b"# kiln: /kiln/init mounts the root and API filesystems\n",
        0o644,
    )?;
    for dir in ["var/lib/apt/lists", "var/cache/apt/archives"] {
        remove_contents(&tree.join(dir))?;
    }
    for file in [
        "var/cache/apt/pkgcache.bin",
        "var/cache/apt/srcpkgcache.bin",
    ] {
        let _ = fs::remove_file(tree.join(file));
    }
    Ok(())
}

/// Removes the files (not subdirectories such as `partial/`, which apt expects) in `dir`.
fn remove_contents(dir: &Path) -> Result<()> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Ok(());
    };
    for entry in entries {
        let path = entry.at("read directory", dir)?.path();
        if !path.is_dir() {
            fs::remove_file(&path).at("remove", &path)?;
        }
    }
    Ok(())
}
