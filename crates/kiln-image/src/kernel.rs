//! The guest kernel: Debian's 6.12 cloud kernel, downloaded with apt and unpacked once into
//! `<cache_root>/kernel/<release>/` (vmlinuz, vmlinux, modules/, kernel.json) for every later build to
//! reuse.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde::{Deserialize, Serialize};

use crate::error::{ImageError, IoContext, Result};
use crate::progress::BuildProgress;
use crate::tools::{self, APT_CACHE, APT_GET, DPKG_DEB};

/// The meta-package that always depends on the newest 6.12 cloud kernel of the distribution.
pub(crate) const KERNEL_META_PACKAGE: &str = "linux-image-6.12-cloud-amd64";

const MARKER: &str = "kernel.json";
const VMLINUX: &str = "vmlinux";

/// A kernel unpacked in the cache.
#[derive(Debug, Clone)]
pub(crate) struct Kernel {
    pub info: KernelInfo,
    pub vmlinuz: PathBuf,
    /// The uncompressed kernel for PVH boot; `None` if it could not be extracted (see [`crate::bzimage`]).
    pub vmlinux: Option<PathBuf>,
    pub modules_dir: PathBuf,
}

/// Written last into a cached kernel directory: its presence marks the entry complete.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct KernelInfo {
    /// `uname -r` of the kernel, e.g. `6.12.117+deb12-cloud-amd64`.
    pub release: String,
    pub package: String,
    pub package_version: String,
}

/// Returns the current guest kernel, downloading and unpacking it if the cache does not have it yet.
pub(crate) fn ensure_kernel(cache_root: &Path, progress: &dyn BuildProgress) -> Result<Kernel> {
    let kernel_root = cache_root.join("kernel");
    let mut apt = Apt { updated: false };
    let package = match apt.kernel_package(progress) {
        Ok(package) => package,
        Err(err) => {
            // Without apt (or without its lists) a previously cached kernel is still perfectly usable.
            if let Some(kernel) = newest_cached(&kernel_root) {
                progress.detail(&format!(
                    "cannot ask apt for the current kernel ({err}); using cached kernel {}",
                    kernel.info.release
                ));
                let dir = kernel_root.join(&kernel.info.release);
                return ensure_vmlinux(kernel, &dir, progress);
            }
            return Err(err);
        }
    };
    let release = package
        .strip_prefix("linux-image-")
        .unwrap_or(&package)
        .to_string();
    let dir = kernel_root.join(&release);
    let kernel = match load_cached(&dir) {
        Some(kernel) => {
            progress.detail(&format!("using cached kernel {release}"));
            kernel
        }
        None => {
            progress.detail(&format!("downloading {package}"));
            std::fs::create_dir_all(&kernel_root).at("create", &kernel_root)?;
            let work = kernel_root.join(format!(".download-{}", std::process::id()));
            let result = download_and_unpack(&mut apt, &package, &release, &work, &dir, progress);
            // The scratch directory holds the .deb and the unpacked package; it is never needed again.
            let _ = std::fs::remove_dir_all(&work);
            result?
        }
    };
    ensure_vmlinux(kernel, &dir, progress)
}

/// Adds the uncompressed PVH kernel to a cached kernel that does not have it yet. Failing to extract
/// it is not fatal: images then only offer the bzImage.
fn ensure_vmlinux(mut kernel: Kernel, dir: &Path, progress: &dyn BuildProgress) -> Result<Kernel> {
    if kernel.vmlinux.is_some() {
        return Ok(kernel);
    }
    progress.detail("extracting the uncompressed kernel for PVH boot");
    let bzimage = std::fs::read(&kernel.vmlinuz).at("read", &kernel.vmlinuz)?;
    match crate::bzimage::extract_pvh_vmlinux(&bzimage) {
        Ok(vmlinux) => {
            let path = dir.join(VMLINUX);
            let partial = dir.join(format!(".{VMLINUX}.{}", std::process::id()));
            std::fs::write(&partial, vmlinux).at("write", &partial)?;
            std::fs::rename(&partial, &path).at("move into place", &path)?;
            kernel.vmlinux = Some(path);
        }
        Err(reason) => progress.detail(&format!(
            "warning: no PVH kernel, images will boot the bzImage only: {reason}"
        )),
    }
    Ok(kernel)
}

fn download_and_unpack(
    apt: &mut Apt,
    package: &str,
    release: &str,
    work: &Path,
    dir: &Path,
    progress: &dyn BuildProgress,
) -> Result<Kernel> {
    let _ = std::fs::remove_dir_all(work);
    std::fs::create_dir_all(work).at("create", work)?;
    let deb = apt.download(package, work, progress)?;

    let unpacked = work.join("root");
    tools::run(
        Command::new(tools::find_tool(&DPKG_DEB)?)
            .arg("-x")
            .arg(&deb)
            .arg(&unpacked),
    )?;
    let package_version = tools::run_stdout(
        Command::new(tools::find_tool(&DPKG_DEB)?)
            .args(["-f"])
            .arg(&deb)
            .arg("Version"),
    )?
    .trim()
    .to_string();

    let vmlinuz = unpacked.join("boot").join(format!("vmlinuz-{release}"));
    // Newer Debian packages ship modules under /usr/lib (merged /usr), older ones under /lib.
    let modules = ["usr/lib/modules", "lib/modules"]
        .iter()
        .map(|base| unpacked.join(base).join(release))
        .find(|p| p.is_dir());
    let (true, Some(modules)) = (vmlinuz.is_file(), modules) else {
        return Err(ImageError::Build(format!(
            "{package} does not contain boot/vmlinuz-{release} and lib/modules/{release}; \
             is it really a kernel image package?"
        )));
    };

    let staged = work.join("kernel");
    std::fs::create_dir_all(&staged).at("create", &staged)?;
    std::fs::rename(&vmlinuz, staged.join("vmlinuz")).at("move", &vmlinuz)?;
    std::fs::rename(&modules, staged.join("modules")).at("move", &modules)?;
    let config = unpacked.join("boot").join(format!("config-{release}"));
    if config.is_file() {
        std::fs::rename(&config, staged.join("config")).at("move", &config)?;
    }
    let info = KernelInfo {
        release: release.to_string(),
        package: package.to_string(),
        package_version,
    };
    let marker = staged.join(MARKER);
    let json = serde_json::to_vec_pretty(&info)
        .map_err(|e| ImageError::io("cannot encode kernel.json", e.into()))?;
    std::fs::write(&marker, json).at("write", &marker)?;

    // Another build may have cached the same kernel meanwhile; theirs is as good as ours.
    if let Err(e) = std::fs::rename(&staged, dir) {
        if load_cached(dir).is_none() {
            return Err(ImageError::path("move the unpacked kernel to", dir, e));
        }
    }
    load_cached(dir)
        .ok_or_else(|| ImageError::Build(format!("kernel cache {} is incomplete", dir.display())))
}

fn load_cached(dir: &Path) -> Option<Kernel> {
    let info: KernelInfo = serde_json::from_slice(&std::fs::read(dir.join(MARKER)).ok()?).ok()?;
    let vmlinux = Some(dir.join(VMLINUX)).filter(|p| p.is_file());
    let kernel = Kernel {
        info,
        vmlinuz: dir.join("vmlinuz"),
        vmlinux,
        modules_dir: dir.join("modules"),
    };
    (kernel.vmlinuz.is_file() && kernel.modules_dir.is_dir()).then_some(kernel)
}

/// The most recently unpacked complete kernel in the cache.
fn newest_cached(kernel_root: &Path) -> Option<Kernel> {
    std::fs::read_dir(kernel_root)
        .ok()?
        .filter_map(|entry| entry.ok())
        .filter_map(|entry| {
            let kernel = load_cached(&entry.path())?;
            let modified = entry
                .path()
                .join(MARKER)
                .metadata()
                .and_then(|m| m.modified())
                .ok()?;
            Some((modified, kernel))
        })
        .max_by_key(|(modified, _)| *modified)
        .map(|(_, kernel)| kernel)
}

/// Picks the concrete kernel package out of `apt-cache depends <meta-package>` output.
pub(crate) fn parse_kernel_dependency(output: &str) -> Option<String> {
    output
        .lines()
        .filter_map(|line| line.trim().trim_start_matches('|').strip_prefix("Depends:"))
        .map(str::trim)
        .find(|dep| {
            dep.starts_with("linux-image-") && *dep != KERNEL_META_PACKAGE && !dep.starts_with('<')
        })
        .map(str::to_string)
}

/// apt access that runs `apt-get update` at most once, and only after something failed, since a host
/// that never updated its package lists cannot resolve or download anything.
struct Apt {
    updated: bool,
}

impl Apt {
    fn kernel_package(&mut self, progress: &dyn BuildProgress) -> Result<String> {
        let apt_cache = tools::find_tool(&APT_CACHE)?;
        loop {
            let found =
                tools::run_stdout(Command::new(&apt_cache).args(["depends", KERNEL_META_PACKAGE]))
                    .ok()
                    .and_then(|out| parse_kernel_dependency(&out));
            match found {
                Some(package) => return Ok(package),
                None if !self.updated => self.update(progress, "apt does not know the guest kernel package")?,
                None => {
                    return Err(ImageError::Build(format!(
                        "apt cannot find {KERNEL_META_PACKAGE} even after `apt-get update`; the host's apt \
                         sources need Debian bookworm with bookworm-security (or bookworm-backports)"
                    )))
                }
            }
        }
    }

    fn download(
        &mut self,
        package: &str,
        dir: &Path,
        progress: &dyn BuildProgress,
    ) -> Result<PathBuf> {
        let apt_get = tools::find_tool(&APT_GET)?;
        loop {
            let mut cmd = Command::new(&apt_get);
            cmd.current_dir(dir).arg("download");
            // As root, apt drops privileges to _apt, which cannot write into our cache directory; it
            // falls back with a warning. Downloading as root directly keeps the output clean.
            // SAFETY: geteuid has no preconditions and cannot fail.
            if unsafe { libc::geteuid() } == 0 {
                cmd.args(["-o", "APT::Sandbox::User=root"]);
            }
            cmd.arg(package);
            match tools::run(&mut cmd) {
                Ok(_) => break,
                Err(err) if self.updated => return Err(err),
                Err(_) => self.update(progress, &format!("`apt-get download {package}` failed"))?,
            }
        }
        std::fs::read_dir(dir)
            .at("read directory", dir)?
            .filter_map(|entry| entry.ok().map(|e| e.path()))
            .find(|p| p.extension().is_some_and(|ext| ext == "deb"))
            .ok_or_else(|| {
                ImageError::Build(format!("apt-get download {package} produced no .deb file"))
            })
    }

    fn update(&mut self, progress: &dyn BuildProgress, why: &str) -> Result<()> {
        self.updated = true;
        progress.detail(&format!(
            "{why}; the package lists may be missing or stale, running `apt-get update`"
        ));
        let apt_get = tools::find_tool(&APT_GET)?;
        tools::run(Command::new(apt_get).args(["update", "-qq"])).map_err(|err| {
            ImageError::Build(format!(
                "{why}, and `apt-get update` failed (it needs root: try `sudo apt-get update`, then build again): {err}"
            ))
        })?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_apt_cache_depends() {
        let out =
            "linux-image-6.12-cloud-amd64\n  Depends: linux-image-6.12.117+deb12-cloud-amd64\n";
        assert_eq!(
            parse_kernel_dependency(out).as_deref(),
            Some("linux-image-6.12.117+deb12-cloud-amd64")
        );
        let alt = "linux-image-6.12-cloud-amd64\n |Depends: <linux-image-virtual>\n  Depends: linux-image-6.12.1-cloud-amd64\n";
        assert_eq!(
            parse_kernel_dependency(alt).as_deref(),
            Some("linux-image-6.12.1-cloud-amd64")
        );
        assert_eq!(
            parse_kernel_dependency("linux-image-6.12-cloud-amd64\n"),
            None
        );
    }
}
