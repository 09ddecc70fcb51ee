//! kiln-image builds and manages guest images ("templates"). Each image is a directory
//! `<images_root>/<name>/` with:
//!
//! * `vmlinuz`: Debian's 6.12 cloud kernel, and `vmlinux`, the same kernel uncompressed for faster PVH
//!   boot (see [`Image::vmlinux`]),
//! * `initrd.img`: a small initramfs (static busybox + virtio/overlay/vsock modules) that mounts
//!   `/dev/vda` and runs `/kiln/init` from it,
//! * `rootfs.img`: a sparse raw ext4 image, used read-only as the backing file of each sandbox's overlay,
//! * `image.json`: the [`ImageManifest`], written last; a directory without it is not an image.
//!
//! Downloads and slow intermediate results (the kernel, the Debian tree of `base`) are cached under
//! `cache_root` so rebuilds are fast.

mod builder;
mod bzimage;
mod cmdline;
mod cpio;
mod debootstrap;
mod elf;
mod error;
mod initramfs;
mod kernel;
mod lock;
mod manifest;
mod modules;
mod progress;
mod rootfs;
mod tools;

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

pub use cmdline::{host_tsc_khz, kernel_cmdline, CmdlineParams, CMDLINE_BASE};
pub use error::ImageError;
pub use lock::FileLock;
pub use manifest::{
    AgentInfo, FileDigest, Image, ImageFiles, ImageInfo, ImageManifest, ImageSource, INITRD_FILE,
    KERNEL_FILE, MANIFEST_FILE, ROOTFS_FILE, VMLINUX_FILE,
};
pub use progress::{BuildProgress, NoProgress, StderrProgress};
pub use tools::on_path;

use error::IoContext;

/// What [`ImageStore::build`] should do.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    /// The statically linked kiln-agent executable to install as /kiln/kiln-agent.
    pub agent_bin: PathBuf,
    /// Rebuild even if the image already exists (the old one stays usable until the new one is done).
    pub force: bool,
    /// Size of the root filesystem; defaults to 1024 MiB for tiny and 4096 MiB for base.
    pub rootfs_size_mib: Option<u64>,
}

/// The images kiln can build, with a one-line description of each.
pub fn known_images() -> &'static [(&'static str, &'static str)] {
    builder::TEMPLATES
}

/// Checks that `name` can be used as an image directory name: `^[a-z0-9][a-z0-9_-]{0,62}$`, which also
/// rules out path separators, `..` and hidden names.
pub fn validate_image_name(name: &str) -> Result<(), ImageError> {
    let invalid = |reason| {
        Err(ImageError::InvalidName {
            name: name.to_string(),
            reason,
        })
    };
    let Some(first) = name.chars().next() else {
        return invalid("the name is empty");
    };
    if name.len() > 63 {
        return invalid("names are at most 63 characters long");
    }
    if !(first.is_ascii_lowercase() || first.is_ascii_digit()) {
        return invalid("names start with a lowercase letter or a digit");
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
    {
        return invalid("names may only contain lowercase letters, digits, '-' and '_'");
    }
    Ok(())
}

/// The images under `images_root`, plus the build cache under `cache_root`.
#[derive(Debug, Clone)]
pub struct ImageStore {
    images_root: PathBuf,
    cache_root: PathBuf,
}

impl ImageInfo {
    /// An installed image at `dir`, with the space its files take now.
    fn new(name: String, dir: PathBuf, manifest: ImageManifest) -> ImageInfo {
        ImageInfo {
            disk_usage_bytes: disk_usage(&dir),
            name,
            dir,
            manifest,
        }
    }
}

impl ImageStore {
    pub fn new(images_root: PathBuf, cache_root: PathBuf) -> Self {
        ImageStore {
            images_root,
            cache_root,
        }
    }

    pub fn images_root(&self) -> &Path {
        &self.images_root
    }

    pub fn cache_root(&self) -> &Path {
        &self.cache_root
    }

    /// The lock that makes `image rm`'s "no sandbox uses it" check and the removal one step against
    /// creates: a create holds it shared from finding the template until its sandbox is recorded (the
    /// daemon), a removal holds it exclusively (the CLI). In the cache directory, which is the daemon's
    /// own even when the images directory is shared and read-only.
    pub fn images_lock_path(&self) -> PathBuf {
        self.cache_root.join("images.lock")
    }

    /// All complete images (directories with a readable image.json), sorted by name. Unreadable
    /// manifests are skipped with a warning so one damaged image does not hide the others.
    pub fn list(&self) -> Result<Vec<ImageInfo>, ImageError> {
        let entries = match fs::read_dir(&self.images_root) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(ImageError::path("read directory", &self.images_root, e)),
        };
        let mut images = Vec::new();
        for entry in entries {
            let entry = entry.at("read directory", &self.images_root)?;
            let Some(name) = entry.file_name().to_str().map(str::to_string) else {
                continue;
            };
            let dir = entry.path();
            if validate_image_name(&name).is_err() || !dir.join(MANIFEST_FILE).is_file() {
                continue;
            }
            match ImageManifest::load(&name, &dir.join(MANIFEST_FILE)) {
                Ok(manifest) => images.push(ImageInfo::new(name, dir, manifest)),
                Err(e) => {
                    tracing::warn!(image = %name, error = %e, "skipping image with unreadable manifest")
                }
            }
        }
        images.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(images)
    }

    /// The image called `name`, ready to boot.
    pub fn get(&self, name: &str) -> Result<Image, ImageError> {
        validate_image_name(name)?;
        let dir = self.images_root.join(name);
        let manifest_path = dir.join(MANIFEST_FILE);
        if !manifest_path.is_file() {
            return Err(ImageError::NotFound {
                name: name.to_string(),
                dir,
            });
        }
        let manifest = ImageManifest::load(name, &manifest_path)?;
        let image = Image {
            name: name.to_string(),
            kernel: dir.join(KERNEL_FILE),
            vmlinux: manifest
                .files
                .vmlinux
                .as_ref()
                .map(|_| dir.join(VMLINUX_FILE)),
            initrd: dir.join(INITRD_FILE),
            rootfs: dir.join(ROOTFS_FILE),
            dir,
            manifest,
        };
        for file in [&image.kernel, &image.initrd, &image.rootfs]
            .into_iter()
            .chain(image.vmlinux.as_ref())
        {
            if !file.is_file() {
                return Err(ImageError::Build(format!(
                    "image {name} is incomplete: {} is missing; rebuild it with `kiln image build --force {name}`",
                    file.display()
                )));
            }
        }
        Ok(image)
    }

    /// Deletes the image called `name`. Sandboxes whose overlays use its rootfs.img as backing file
    /// cannot start again afterwards; checking for them is the caller's job.
    pub fn remove(&self, name: &str) -> Result<(), ImageError> {
        validate_image_name(name)?;
        let dir = self.images_root.join(name);
        if !dir.is_dir() {
            return Err(ImageError::NotFound {
                name: name.to_string(),
                dir,
            });
        }
        // Rename first so the image disappears at once, even if deleting its files takes a while.
        let doomed = self
            .images_root
            .join(format!(".remove-{name}-{}", std::process::id()));
        fs::rename(&dir, &doomed).at("move away", &dir)?;
        // The deletion is durable once the images directory is synced after each step.
        builder::sync_dir(&self.images_root)?;
        fs::remove_dir_all(&doomed).at("remove", &doomed)?;
        builder::sync_dir(&self.images_root)
    }

    /// Builds (or with `opts.force`, rebuilds) the image called `name`, which must be one of
    /// [`known_images`]. The build happens beside the images and replaces the old one only on success.
    pub fn build(
        &self,
        name: &str,
        opts: &BuildOptions,
        progress: &dyn BuildProgress,
    ) -> Result<ImageInfo, ImageError> {
        validate_image_name(name)?;
        let template =
            builder::Template::from_name(name).ok_or_else(|| ImageError::UnknownTemplate {
                name: name.to_string(),
                known: known_images()
                    .iter()
                    .map(|(n, _)| *n)
                    .collect::<Vec<_>>()
                    .join(", "),
            })?;
        let manifest = builder::build(
            &self.images_root,
            &self.cache_root,
            builder::Contents::Template(template),
            opts,
            progress,
        )?;
        Ok(ImageInfo::new(
            name.to_string(),
            self.images_root.join(name),
            manifest,
        ))
    }
}

impl ImageStore {
    /// Makes the image `name` from a root filesystem tree that `stage` writes into the (empty) directory
    /// it is given, e.g. an OCI image's flattened layers; kiln's init, agent and modules are added
    /// afterwards, so the tree needs nothing of its own to boot. Replaces an existing image only with
    /// `opts.force`, and only on success.
    pub fn build_from_tree(
        &self,
        name: &str,
        description: String,
        source: ImageSource,
        stage: &dyn Fn(&Path) -> Result<(), ImageError>,
        opts: &BuildOptions,
        progress: &dyn BuildProgress,
    ) -> Result<ImageInfo, ImageError> {
        validate_image_name(name)?;
        if builder::Template::from_name(name).is_some() {
            return Err(ImageError::Build(format!(
                "'{name}' is the name of an image kiln builds itself; choose another name with --name"
            )));
        }
        let manifest = builder::build(
            &self.images_root,
            &self.cache_root,
            builder::Contents::Tree {
                name,
                description,
                source: Box::new(source),
                stage,
            },
            opts,
            progress,
        )?;
        Ok(ImageInfo::new(
            name.to_string(),
            self.images_root.join(name),
            manifest,
        ))
    }
}

/// Bytes actually allocated by the files in `dir` (sparse files count only their data).
fn disk_usage(dir: &Path) -> u64 {
    fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.blocks() * 512)
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_names() {
        for ok in ["tiny", "base", "0", "py-3_11", &"a".repeat(63)] {
            assert!(validate_image_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "Tiny",
            "-x",
            "_x",
            "a/b",
            "..",
            ".hidden",
            "a b",
            "é",
            &"a".repeat(64),
            "x\0",
        ] {
            assert!(validate_image_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn missing_image_suggests_build() {
        let dir = tempfile::tempdir().unwrap();
        let store = ImageStore::new(dir.path().join("images"), dir.path().join("cache"));
        let err = store.get("tiny").unwrap_err().to_string();
        assert!(err.contains("kiln image build tiny"), "{err}");
        assert!(store.list().unwrap().is_empty());
        assert!(matches!(
            store.remove("tiny"),
            Err(ImageError::NotFound { .. })
        ));
    }

    #[test]
    fn unknown_template_lists_known_ones() {
        let dir = tempfile::tempdir().unwrap();
        let store = ImageStore::new(dir.path().join("images"), dir.path().join("cache"));
        let opts = BuildOptions {
            agent_bin: "/nonexistent".into(),
            force: false,
            rootfs_size_mib: None,
        };
        let err = store
            .build("fancy", &opts, &NoProgress)
            .unwrap_err()
            .to_string();
        assert!(err.contains("tiny, base"), "{err}");
    }

    #[test]
    fn lists_and_removes_complete_images() {
        let dir = tempfile::tempdir().unwrap();
        let store = ImageStore::new(dir.path().to_path_buf(), dir.path().join(".cache"));
        let image_dir = dir.path().join("tiny");
        fs::create_dir_all(&image_dir).unwrap();
        fs::create_dir_all(dir.path().join("half-built")).unwrap();
        manifest::tests::sample()
            .save(&image_dir.join(MANIFEST_FILE))
            .unwrap();
        let listed = store.list().unwrap();
        assert_eq!(
            listed.iter().map(|i| i.name.as_str()).collect::<Vec<_>>(),
            ["tiny"]
        );
        // The manifest alone is not enough to boot.
        assert!(store
            .get("tiny")
            .unwrap_err()
            .to_string()
            .contains("incomplete"));
        for file in [KERNEL_FILE, VMLINUX_FILE, INITRD_FILE, ROOTFS_FILE] {
            fs::write(image_dir.join(file), b"x").unwrap();
        }
        assert_eq!(
            store.get("tiny").unwrap().rootfs,
            image_dir.join(ROOTFS_FILE)
        );
        store.remove("tiny").unwrap();
        assert!(!image_dir.exists());
        assert!(store.list().unwrap().is_empty());
    }
}
