//! `image.json`: what an image is made of, written last so that its presence marks a complete image.

use std::io::Read;
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{ImageError, IoContext, Result};

pub const MANIFEST_FILE: &str = "image.json";
pub const KERNEL_FILE: &str = "vmlinuz";
/// The same kernel uncompressed, for PVH direct boot (see [`Image::vmlinux`]).
pub const VMLINUX_FILE: &str = "vmlinux";
pub const INITRD_FILE: &str = "initrd.img";
pub const ROOTFS_FILE: &str = "rootfs.img";

/// Bumped when the layout of an image changes incompatibly.
pub const FORMAT_VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageManifest {
    pub format: u32,
    pub name: String,
    pub description: String,
    /// `uname -r` of the guest kernel.
    pub kernel_version: String,
    /// The Debian package the kernel came from, with its version.
    pub kernel_package: String,
    /// Kernel command line the host starts from; see [`crate::kernel_cmdline`].
    pub cmdline_base: String,
    /// Size of the ext4 filesystem in rootfs.img (the file is sparse, so it uses less disk).
    pub rootfs_size_bytes: u64,
    /// UUID of the root filesystem; identifies exactly which template an overlay was made from.
    pub rootfs_uuid: String,
    pub agent: AgentInfo,
    pub created_at: DateTime<Utc>,
    /// Version of kiln-image that built the image.
    pub builder_version: String,
    pub files: ImageFiles,
    /// Set for images made from an OCI/Docker image (`kiln image pull` / `import`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<ImageSource>,
}

/// Where a pulled or imported image came from, and the run settings its config gives.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageSource {
    /// `registry`, `oci-layout`, `oci-archive` or `docker-archive`.
    pub kind: String,
    /// The registry reference, or the archive's tag or path.
    pub reference: String,
    /// The image's content identity: its manifest digest (a docker-save archive has no manifest: its
    /// config digest, Docker's image id). The same image pulled twice has the same digest.
    pub digest: String,
    pub config_digest: String,
    /// Layer blob digests, lowest first.
    pub layers: Vec<String>,
    /// `Env` of the config (`KEY=VALUE`): defaults for every command run in the sandbox.
    #[serde(default)]
    pub env: Vec<String>,
    /// `WorkingDir`: the default working directory of commands.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub working_dir: Option<String>,
    /// `User` (`name`, `uid`, `uid:gid`...): the default user of commands.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default)]
    pub entrypoint: Vec<String>,
    #[serde(default)]
    pub cmd: Vec<String>,
    /// Whether `entrypoint` + `cmd` is started as a background process when a sandbox boots.
    #[serde(default)]
    pub start_cmd: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentInfo {
    /// First line of `kiln-agent --version`, when the agent answers it.
    pub version: Option<String>,
    pub sha256: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageFiles {
    pub kernel: FileDigest,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vmlinux: Option<FileDigest>,
    pub initrd: FileDigest,
    pub rootfs: FileDigest,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileDigest {
    pub file: String,
    /// Apparent size in bytes.
    pub size: u64,
    pub sha256: String,
}

impl FileDigest {
    pub(crate) fn of(path: &Path) -> Result<Self> {
        let file = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let (sha256, size) = sha256_file(path)?;
        Ok(FileDigest { file, size, sha256 })
    }
}

impl ImageManifest {
    pub fn load(name: &str, path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).at("read", path)?;
        serde_json::from_slice(&bytes).map_err(|source| ImageError::Manifest {
            name: name.to_string(),
            path: path.to_path_buf(),
            source,
        })
    }

    pub(crate) fn save(&self, path: &Path) -> Result<()> {
        let mut json = serde_json::to_vec_pretty(self)
            .map_err(|e| ImageError::io("cannot encode image.json", e.into()))?;
        json.push(b'\n');
        std::fs::write(path, json).at("write", path)
    }
}

/// Hex SHA-256 and length of a file, streamed so multi-GiB root filesystems do not need memory.
///
/// Holes in sparse files are hashed as the zeros they read as, without reading them: reading a freshly
/// made 1 GiB image would otherwise fill the page cache with zero pages, which took longer (2.7 s
/// here) than hashing.
pub(crate) fn sha256_file(path: &Path) -> Result<(String, u64)> {
    use std::io::{Seek, SeekFrom};
    use std::os::fd::AsRawFd;

    let mut file = std::fs::File::open(path).at("open", path)?;
    let len = file.metadata().at("inspect", path)?.len();
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let zeros = vec![0u8; 1 << 20];
    let mut pos = 0u64;
    while pos < len {
        // ENXIO: only a hole is left up to the end of the file.
        let data_start = seek_data(file.as_raw_fd(), pos, libc::SEEK_DATA)
            .unwrap_or(len)
            .min(len);
        let mut hole = data_start - pos;
        while hole > 0 {
            let n = hole.min(zeros.len() as u64);
            hasher.update(&zeros[..n as usize]);
            hole -= n;
        }
        let data_end = seek_data(file.as_raw_fd(), data_start, libc::SEEK_HOLE)
            .unwrap_or(len)
            .min(len)
            .max(data_start);
        file.seek(SeekFrom::Start(data_start)).at("seek in", path)?;
        let mut remaining = data_end - data_start;
        while remaining > 0 {
            let want = remaining.min(buf.len() as u64) as usize;
            let n = file.read(&mut buf[..want]).at("read", path)?;
            if n == 0 {
                return Err(ImageError::Build(format!(
                    "{} shrank while it was being hashed",
                    path.display()
                )));
            }
            hasher.update(&buf[..n]);
            remaining -= n as u64;
        }
        pos = data_end;
    }
    Ok((hex::encode(hasher.finalize()), len))
}

/// lseek(2) with SEEK_DATA or SEEK_HOLE. `None` when the filesystem cannot say (then the caller treats
/// everything as data) or, for SEEK_DATA, when only a hole is left (ENXIO).
fn seek_data(fd: std::os::fd::RawFd, offset: u64, whence: libc::c_int) -> Option<u64> {
    let offset = libc::off_t::try_from(offset).ok()?;
    // SAFETY: lseek only repositions the file offset of a descriptor we own; no memory is involved.
    let result = unsafe { libc::lseek(fd, offset, whence) };
    u64::try_from(result).ok()
}

/// A built image as listed by [`crate::ImageStore::list`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageInfo {
    pub name: String,
    pub dir: PathBuf,
    pub manifest: ImageManifest,
    /// Space the image really occupies on the host (the root filesystem is sparse).
    pub disk_usage_bytes: u64,
}

/// A built image, with the paths QEMU needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    pub name: String,
    pub dir: PathBuf,
    /// The compressed kernel (bzImage); boots with any firmware.
    pub kernel: PathBuf,
    /// The uncompressed kernel (ELF with a PVH entry point). Booting it is about 1.5 s faster under TCG
    /// because the guest no longer decompresses itself, but it needs QEMU's qboot firmware
    /// (`-bios qboot.rom`): with the default SeaBIOS, QEMU 10's microvm loads the initrd over the ACPI
    /// tables when booting PVH and the guest stalls. `None` for kernels without PVH support.
    pub vmlinux: Option<PathBuf>,
    pub initrd: PathBuf,
    pub rootfs: PathBuf,
    pub manifest: ImageManifest,
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn sample() -> ImageManifest {
        let digest = |file: &str| FileDigest {
            file: file.into(),
            size: 3,
            sha256: "ab".repeat(32),
        };
        ImageManifest {
            format: FORMAT_VERSION,
            name: "tiny".into(),
            description: "busybox".into(),
            kernel_version: "6.12.117+deb12-cloud-amd64".into(),
            kernel_package: "linux-image-6.12.117+deb12-cloud-amd64 6.12.117-1~deb12u1".into(),
            cmdline_base: "console=ttyS0".into(),
            rootfs_size_bytes: 1 << 30,
            rootfs_uuid: "2f7a0c52-8a43-4c36-a1c1-2a3c4d5e6f70".into(),
            agent: AgentInfo {
                version: Some("kiln-agent 0.1.0".into()),
                sha256: "cd".repeat(32),
            },
            created_at: DateTime::parse_from_rfc3339("2025-01-02T03:04:05Z")
                .unwrap()
                .with_timezone(&Utc),
            builder_version: "0.1.0".into(),
            files: ImageFiles {
                kernel: digest("vmlinuz"),
                vmlinux: Some(digest("vmlinux")),
                initrd: digest("initrd.img"),
                rootfs: digest("rootfs.img"),
            },
            source: None,
        }
    }

    #[test]
    fn manifest_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(MANIFEST_FILE);
        let manifest = sample();
        manifest.save(&path).unwrap();
        assert_eq!(ImageManifest::load("tiny", &path).unwrap(), manifest);
    }

    #[test]
    fn vmlinux_is_optional_in_manifests() {
        let mut manifest = sample();
        manifest.files.vmlinux = None;
        let json = serde_json::to_string(&manifest).unwrap();
        assert!(!json.contains("vmlinux"));
        assert_eq!(
            serde_json::from_str::<ImageManifest>(&json).unwrap(),
            manifest
        );
    }

    #[test]
    fn corrupt_manifest_suggests_rebuild() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(MANIFEST_FILE);
        std::fs::write(&path, b"{\"name\": ").unwrap();
        let err = ImageManifest::load("tiny", &path).unwrap_err().to_string();
        assert!(err.contains("kiln image build --force tiny"), "{err}");
    }

    #[test]
    fn hashes_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"abc").unwrap();
        let digest = FileDigest::of(&path).unwrap();
        assert_eq!(
            digest.sha256,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!((digest.file.as_str(), digest.size), ("f", 3));
    }

    #[test]
    fn hashes_sparse_files_like_dense_ones() {
        use std::io::{Seek, SeekFrom, Write};
        let dir = tempfile::tempdir().unwrap();
        let (sparse, dense) = (dir.path().join("sparse"), dir.path().join("dense"));
        let mut file = std::fs::File::create(&sparse).unwrap();
        file.set_len(5 << 20).unwrap();
        file.seek(SeekFrom::Start(3 << 20)).unwrap();
        file.write_all(b"data in the middle").unwrap();
        drop(file);
        let mut contents = vec![0u8; 5 << 20];
        contents[3 << 20..(3 << 20) + 18].copy_from_slice(b"data in the middle");
        std::fs::write(&dense, &contents).unwrap();
        assert_eq!(sha256_file(&sparse).unwrap(), sha256_file(&dense).unwrap());
    }
}
