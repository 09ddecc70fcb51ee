//! Building an image: kernel, initramfs and root filesystem are assembled in
//! `<images_root>/.build-<name>-<pid>` and only renamed into place once complete.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::cmdline::CMDLINE_BASE;
use crate::debootstrap;
use crate::elf::Elf;
use crate::error::{ImageError, IoContext, Result};
use crate::initramfs::write_initramfs;
use crate::kernel::ensure_kernel;
use crate::manifest::{
    sha256_file, AgentInfo, FileDigest, ImageFiles, ImageManifest, ImageSource, FORMAT_VERSION,
    INITRD_FILE, KERNEL_FILE, MANIFEST_FILE, ROOTFS_FILE, VMLINUX_FILE,
};
use crate::modules::{ModuleFile, ModuleTree, BOOT_MODULES, LATE_MODULES};
use crate::progress::BuildProgress;
use crate::rootfs::{install_kiln_files, install_late_modules, make_ext4, stage_tiny};
use crate::tools::{self, BUSYBOX, MKFS_EXT4};
use crate::BuildOptions;

/// The images kiln knows how to build.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Template {
    Tiny,
    Base,
}

pub(crate) const TEMPLATES: &[(&str, &str)] = &[
    (
        "tiny",
        "busybox and the kiln agent; builds in seconds, boots fastest",
    ),
    (
        "base",
        "Debian bookworm (minbase) with python3, bash and coreutils",
    ),
];

impl Template {
    pub(crate) fn from_name(name: &str) -> Option<Self> {
        match name {
            "tiny" => Some(Template::Tiny),
            "base" => Some(Template::Base),
            _ => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Template::Tiny => "tiny",
            Template::Base => "base",
        }
    }

    fn description(self) -> &'static str {
        TEMPLATES
            .iter()
            .find(|(n, _)| *n == self.name())
            .map_or("", |(_, d)| d)
    }

    /// Enough free space for a sandbox to work in; the file is sparse, so unused space costs nothing.
    fn default_size_mib(self) -> u64 {
        match self {
            Template::Tiny => 1024,
            Template::Base => 4096,
        }
    }
}

/// Smallest root filesystem we accept: below this mkfs and the journal leave no room to work.
const MIN_SIZE_MIB: u64 = 64;

/// Removes the build directory unless the build succeeded and moved it away.
struct BuildDir {
    path: PathBuf,
}

impl Drop for BuildDir {
    fn drop(&mut self) {
        if self.path.exists() {
            if let Err(e) = fs::remove_dir_all(&self.path) {
                tracing::warn!(path = %self.path.display(), error = %e, "cannot remove build directory");
            }
        }
    }
}

/// What fills an image's root filesystem.
pub(crate) enum Contents<'a> {
    Template(Template),
    /// A tree the caller stages (an OCI image's layers), named `name`, with where it came from.
    Tree {
        name: &'a str,
        description: String,
        source: Box<ImageSource>,
        stage: &'a dyn Fn(&Path) -> Result<()>,
    },
}

/// Room left in a tree image's filesystem beyond its files; the file is sparse, so it costs nothing
/// until used.
const TREE_HEADROOM_MIB: u64 = 1024;

pub(crate) fn build(
    images_root: &Path,
    cache_root: &Path,
    contents: Contents<'_>,
    opts: &BuildOptions,
    progress: &dyn BuildProgress,
) -> Result<ImageManifest> {
    let name = match &contents {
        Contents::Template(t) => t.name(),
        Contents::Tree { name, .. } => name,
    };
    let final_dir = images_root.join(name);
    if final_dir.join(MANIFEST_FILE).is_file() && !opts.force {
        return Err(ImageError::AlreadyExists {
            name: name.to_string(),
            dir: final_dir,
        });
    }
    let mut size_mib = match &contents {
        Contents::Template(t) => opts.rootfs_size_mib.unwrap_or(t.default_size_mib()),
        Contents::Tree { .. } => opts.rootfs_size_mib.unwrap_or(MIN_SIZE_MIB),
    };
    if size_mib < MIN_SIZE_MIB {
        return Err(ImageError::Build(format!(
            "a root filesystem of {size_mib} MiB is too small; use at least {MIN_SIZE_MIB} MiB"
        )));
    }

    progress.step("Checking the host tools and the agent");
    tools::find_tool(&MKFS_EXT4)?;
    let (busybox_path, busybox) = host_busybox()?;
    // Only the static agent runs whatever userland (or none) an imported image has.
    let agent_kind = match &contents {
        Contents::Template(t) => *t,
        Contents::Tree { .. } => Template::Tiny,
    };
    let agent = read_agent(&opts.agent_bin, agent_kind, progress)?;
    let agent_version = agent_version(&opts.agent_bin);

    progress.step("Fetching the guest kernel");
    let kernel = ensure_kernel(cache_root, progress)?;

    fs::create_dir_all(images_root).at("create", images_root)?;
    remove_stale_builds(images_root);
    // The pid lets later builds recognise leftovers of dead processes; the counter keeps two builds in
    // one process apart.
    static BUILDS: AtomicU32 = AtomicU32::new(0);
    let build_dir = BuildDir {
        path: images_root.join(format!(
            ".build-{name}-{}.{}",
            std::process::id(),
            BUILDS.fetch_add(1, Ordering::Relaxed)
        )),
    };
    let _ = fs::remove_dir_all(&build_dir.path);
    fs::create_dir(&build_dir.path).at("create", &build_dir.path)?;
    let dir = &build_dir.path;

    link_or_copy(&kernel.vmlinuz, &dir.join(KERNEL_FILE))?;
    if let Some(vmlinux) = &kernel.vmlinux {
        link_or_copy(vmlinux, &dir.join(VMLINUX_FILE))?;
    }

    progress.step("Building the initramfs");
    let tree = ModuleTree::open(&kernel.modules_dir)?;
    let boot_modules = tree.resolve(BOOT_MODULES, &[])?;
    let late_modules = tree.resolve(LATE_MODULES, &boot_modules)?;
    let names = |modules: &[ModuleFile]| {
        modules
            .iter()
            .map(|m| m.name.as_str())
            .collect::<Vec<_>>()
            .join(" ")
    };
    progress.detail(&format!("boot modules: {}", names(&boot_modules)));
    progress.detail(&format!(
        "modules loaded after boot: {}",
        names(&late_modules)
    ));
    write_initramfs(&dir.join(INITRD_FILE), &busybox, &boot_modules)?;

    progress.step(match &contents {
        Contents::Template(Template::Tiny) => "Assembling the busybox root filesystem",
        Contents::Template(Template::Base) => "Assembling the Debian root filesystem",
        Contents::Tree { .. } => "Unpacking the image layers",
    });
    let staging = dir.join("staging");
    match &contents {
        Contents::Template(Template::Tiny) => stage_tiny(&staging, &busybox_path, &busybox)?,
        Contents::Template(Template::Base) => {
            debootstrap::stage_base(&staging, cache_root, progress)?
        }
        Contents::Tree { stage, .. } => {
            fs::create_dir(&staging).at("create", &staging)?;
            stage(&staging)?;
            // /kiln is kiln's: whatever the image put there (a symlink out of the tree included) goes.
            remove_kiln_dir(&staging)?;
            if opts.rootfs_size_mib.is_none() {
                size_mib =
                    size_mib.max(tree_usage(&staging) / (1 << 20) * 5 / 4 + TREE_HEADROOM_MIB);
            }
        }
    }
    install_kiln_files(&staging, &busybox, &agent)?;
    install_late_modules(&staging, &late_modules)?;

    progress.step(&format!("Creating the {size_mib} MiB ext4 root filesystem"));
    let uuid = uuid::Uuid::new_v4().to_string();
    make_ext4(&staging, &dir.join(ROOTFS_FILE), size_mib << 20, &uuid)?;
    fs::remove_dir_all(&staging).at("remove", &staging)?;

    progress.step("Writing the manifest");
    let (description, source) = match contents {
        Contents::Template(t) => (t.description().to_string(), None),
        Contents::Tree {
            description,
            source,
            ..
        } => (description, Some(*source)),
    };
    let manifest = ImageManifest {
        format: FORMAT_VERSION,
        name: name.to_string(),
        description,
        kernel_version: kernel.info.release.clone(),
        kernel_package: format!("{} {}", kernel.info.package, kernel.info.package_version),
        cmdline_base: CMDLINE_BASE.to_string(),
        rootfs_size_bytes: size_mib << 20,
        rootfs_uuid: uuid,
        agent: AgentInfo {
            version: agent_version,
            sha256: sha256_file(&opts.agent_bin)?.0,
        },
        created_at: chrono::Utc::now(),
        builder_version: env!("CARGO_PKG_VERSION").to_string(),
        files: ImageFiles {
            kernel: FileDigest::of(&dir.join(KERNEL_FILE))?,
            vmlinux: kernel
                .vmlinux
                .as_ref()
                .map(|_| FileDigest::of(&dir.join(VMLINUX_FILE)))
                .transpose()?,
            initrd: FileDigest::of(&dir.join(INITRD_FILE))?,
            rootfs: FileDigest::of(&dir.join(ROOTFS_FILE))?,
        },
        source,
    };
    manifest.save(&dir.join(MANIFEST_FILE))?;

    install(dir, &final_dir)?;
    Ok(manifest)
}

/// Removes `<root>/kiln` without following it if it is a symlink.
fn remove_kiln_dir(root: &Path) -> Result<()> {
    let kiln = root.join("kiln");
    match fs::symlink_metadata(&kiln) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(&kiln).at("remove", &kiln),
        Ok(_) => fs::remove_file(&kiln).at("remove", &kiln),
        Err(_) => Ok(()),
    }
}

/// Bytes allocated by the files under `dir` (hard links counted once), without following symlinks.
fn tree_usage(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut seen = std::collections::HashSet::new();
    let mut stack = vec![dir.to_path_buf()];
    let mut total = 0;
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).into_iter().flatten().flatten() {
            let Ok(m) = e.metadata() else { continue };
            if m.is_dir() {
                stack.push(e.path());
            }
            if m.nlink() < 2 || m.is_dir() || seen.insert((m.dev(), m.ino())) {
                total += m.blocks() * 512 + 4096;
            }
        }
    }
    total
}

/// Hard-links a cached file into the image (the kernels are large and never modified in place), or
/// copies it when the cache is on another filesystem.
fn link_or_copy(from: &Path, to: &Path) -> Result<()> {
    if fs::hard_link(from, to).is_ok() {
        return Ok(());
    }
    fs::copy(from, to).at("copy", from).map(|_| ())
}

/// Moves the finished build to `final_dir`. An existing image is swapped out atomically with
/// renameat2(RENAME_EXCHANGE), so readers see either the old or the new image, never neither; the old
/// one then sits at the build path and is removed with it.
fn install(build_dir: &Path, final_dir: &Path) -> Result<()> {
    // Durable publish: the files and their directory reach the disk before the rename makes them the
    // image, and the rename itself is made durable by syncing the images directory after it.
    sync_files_in(build_dir)?;
    let root = final_dir.parent().unwrap_or(Path::new("."));
    match fs::rename(build_dir, final_dir) {
        Ok(()) => return sync_dir(root),
        // Renaming onto a non-empty directory fails; anything else is a real problem.
        Err(e) if !matches!(e.raw_os_error(), Some(libc::ENOTEMPTY) | Some(libc::EEXIST)) => {
            return Err(ImageError::path("move the new image to", final_dir, e));
        }
        Err(_) => {}
    }
    let c_path = |p: &Path| {
        std::ffi::CString::new(p.as_os_str().as_encoded_bytes())
            .map_err(|_| ImageError::Build(format!("path {} contains a NUL byte", p.display())))
    };
    let (from, to) = (c_path(build_dir)?, c_path(final_dir)?);
    // SAFETY: both pointers are valid NUL-terminated strings that outlive the call.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            from.as_ptr(),
            libc::AT_FDCWD,
            to.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if rc != 0 {
        return Err(ImageError::path(
            "replace the old image at",
            final_dir,
            std::io::Error::last_os_error(),
        ));
    }
    sync_dir(root)
}

/// fsyncs a directory (its entries: files created, renamed or removed in it).
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    fs::File::open(dir)
        .and_then(|f| f.sync_all())
        .at("sync", dir)
}

/// fsyncs every regular file directly in `dir`, then `dir`.
fn sync_files_in(dir: &Path) -> Result<()> {
    for entry in fs::read_dir(dir).at("read", dir)?.flatten() {
        if entry.file_type().is_ok_and(|t| t.is_file()) {
            let path = entry.path();
            fs::File::open(&path)
                .and_then(|f| f.sync_all())
                .at("sync", &path)?;
        }
    }
    sync_dir(dir)
}

/// Deletes `.build-*` and `.remove-*` directories left behind by processes that are gone (crashed or
/// killed mid-build or mid-removal).
fn remove_stale_builds(images_root: &Path) {
    let Ok(entries) = fs::read_dir(images_root) else {
        return;
    };
    for entry in entries.flatten() {
        let file_name = entry.file_name();
        let Some(rest) = file_name.to_str().and_then(|n| {
            n.strip_prefix(".build-")
                .or_else(|| n.strip_prefix(".remove-"))
        }) else {
            continue;
        };
        // `<name>-<pid>[.<counter>]`; image names never contain '.'.
        let pid = rest.rsplit('-').next().and_then(|p| p.split('.').next());
        let Some(pid) = pid.and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            tracing::info!(path = %entry.path().display(), "removing leftovers of a dead build");
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

/// The host's static busybox (from busybox-static): it runs in the initramfs and the tiny image, where
/// there is no C library.
fn host_busybox() -> Result<(PathBuf, Vec<u8>)> {
    let path = ["/bin/busybox", "/usr/bin/busybox"]
        .iter()
        .map(PathBuf::from)
        .find(|p| tools::is_executable(p))
        .map_or_else(|| tools::find_tool(&BUSYBOX), Ok)?;
    let data = fs::read(&path).at("read", &path)?;
    let is_static = Elf::parse(&data)
        .and_then(|elf| elf.is_static())
        .unwrap_or(false);
    if !is_static {
        return Err(ImageError::Build(format!(
            "{} is not a statically linked busybox; install the static build with `apt-get install busybox-static`",
            path.display()
        )));
    }
    Ok((path, data))
}

/// Reads and checks the agent binary: an x86-64 executable, statically linked for the tiny image.
fn read_agent(path: &Path, template: Template, progress: &dyn BuildProgress) -> Result<Vec<u8>> {
    const HOW: &str =
        "build it with `RUSTFLAGS=\"-C target-feature=+crt-static\" cargo build -p kiln-agent \
                       --profile agent --target x86_64-unknown-linux-gnu`";
    if !path.is_file() {
        return Err(ImageError::Build(format!(
            "the kiln agent binary {} does not exist; {HOW}",
            path.display()
        )));
    }
    let data = fs::read(path).at("read the agent binary", path)?;
    let elf = Elf::parse(&data).map_err(|e| {
        ImageError::Build(format!(
            "the agent {} is not a Linux executable ({e}); {HOW}",
            path.display()
        ))
    })?;
    if elf.machine() != Some(62) {
        return Err(ImageError::Build(format!(
            "the agent {} is not an x86-64 executable; {HOW}",
            path.display()
        )));
    }
    let is_static = elf
        .is_static()
        .map_err(|e| ImageError::Build(format!("the agent {} is damaged: {e}", path.display())))?;
    match (is_static, template) {
        (true, _) => {}
        (false, Template::Tiny) => {
            return Err(ImageError::Build(format!(
                "the agent {} is dynamically linked, but the tiny image lacks the shared libraries it needs; {HOW}",
                path.display()
            )))
        }
        (false, Template::Base) => progress.detail(
            "warning: the agent is dynamically linked; it will only run if Debian bookworm's libraries suit it",
        ),
    }
    Ok(data)
}

/// Asks the agent for its version (`--version`), giving up after two seconds: the manifest records it
/// when available, but an agent that does not implement the flag must not stall the build.
fn agent_version(path: &Path) -> Option<String> {
    let mut child = Command::new(path)
        .arg("--version")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let deadline = Instant::now() + Duration::from_secs(2);
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
        }
    };
    let mut out = String::new();
    child
        .stdout
        .take()?
        .take(4096)
        .read_to_string(&mut out)
        .ok()?;
    let line = out.lines().next()?.trim();
    (status.success() && !line.is_empty() && line.len() <= 100).then(|| line.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn install_replaces_an_existing_image_atomically() {
        let root = tempfile::tempdir().unwrap();
        let (build, target) = (
            root.path().join(".build-tiny-1.0"),
            root.path().join("tiny"),
        );
        for (dir, content) in [(&build, "new"), (&target, "old")] {
            fs::create_dir_all(dir).unwrap();
            fs::write(dir.join(MANIFEST_FILE), content).unwrap();
        }
        install(&build, &target).unwrap();
        assert_eq!(
            fs::read_to_string(target.join(MANIFEST_FILE)).unwrap(),
            "new"
        );
        // The old image is now where the build was, for BuildDir to delete.
        assert_eq!(
            fs::read_to_string(build.join(MANIFEST_FILE)).unwrap(),
            "old"
        );
        // A first build simply moves into place.
        let fresh = root.path().join(".build-base-1.1");
        fs::create_dir_all(&fresh).unwrap();
        install(&fresh, &root.path().join("base")).unwrap();
        assert!(root.path().join("base").is_dir() && !fresh.exists());
    }

    #[test]
    fn removes_only_leftovers_of_dead_processes() {
        let root = tempfile::tempdir().unwrap();
        // pid_max is at most 4194304, so this process cannot exist.
        let dead = [".build-tiny-4294967.0", ".remove-base-4294967"];
        let alive = format!(".build-tiny-{}.3", std::process::id());
        for dir in dead
            .iter()
            .copied()
            .chain([alive.as_str(), "tiny", ".build-odd"])
        {
            fs::create_dir_all(root.path().join(dir)).unwrap();
        }
        remove_stale_builds(root.path());
        for dir in dead {
            assert!(!root.path().join(dir).exists(), "{dir}");
        }
        for dir in [alive.as_str(), "tiny", ".build-odd"] {
            assert!(root.path().join(dir).exists(), "{dir}");
        }
    }

    #[test]
    fn agent_checks_explain_how_to_build_it() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("kiln-agent");
        let err = read_agent(&missing, Template::Tiny, &crate::NoProgress)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("does not exist") && err.contains("cargo build -p kiln-agent"),
            "{err}"
        );
        fs::write(&missing, b"#!/bin/sh\n").unwrap();
        let err = read_agent(&missing, Template::Tiny, &crate::NoProgress)
            .unwrap_err()
            .to_string();
        assert!(err.contains("not a Linux executable"), "{err}");
        // The host's dynamically linked `ls` is fine for base (with a warning) but not for tiny.
        let ls = Path::new("/bin/ls");
        if ls.is_file() {
            assert!(read_agent(ls, Template::Tiny, &crate::NoProgress).is_err());
            assert!(read_agent(ls, Template::Base, &crate::NoProgress).is_ok());
        }
    }
}
