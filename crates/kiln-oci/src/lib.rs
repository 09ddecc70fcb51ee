//! kiln-oci turns OCI and Docker images into root filesystem trees for kiln templates: it pulls them from
//! a registry ([`pull`]) or reads `docker save` archives, OCI archives and OCI layout directories
//! ([`import`]), keeps their layers in a cache by digest ([`BlobCache`]) after checking each against its
//! digest, and flattens the layers in order into a directory ([`flatten`]).

mod cache;
mod local;
mod registry;
mod unpack;

use std::path::Path;

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

pub use cache::{sha256_hex, BlobCache, NoProgress, Progress};
pub use local::import;
pub use registry::{pull, PullOptions};
pub use unpack::{apply_layer, open_layer, UnpackStats};

/// An image whose layers are all in the cache, ready to flatten.
#[derive(Debug, Clone)]
pub struct Fetched {
    /// Where it came from: the registry reference, or the archive's tag or path.
    pub reference: String,
    /// `registry`, `oci-layout`, `oci-archive` or `docker-archive`.
    pub kind: &'static str,
    /// Content identity: the manifest digest (for a docker-save archive, which has no manifest, the
    /// config digest, i.e. Docker's image id).
    pub digest: String,
    pub config_digest: String,
    pub config: ImageConfigFile,
    /// Layer blob digests, lowest first.
    pub layers: Vec<String>,
    /// Compressed sizes of the layers, in order.
    pub layer_sizes: Vec<u64>,
    /// Bytes actually transferred into the cache by this call, and how many layers.
    pub fetched_bytes: u64,
    pub fetched_layers: usize,
    /// Layers that were already cached (shared with an image fetched before), and their bytes.
    pub cached_layers: usize,
    pub cached_bytes: u64,
}

/// The parts of an image config file (OCI image spec `config`, Docker's alike) kiln uses.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ImageConfigFile {
    #[serde(default)]
    pub architecture: Option<String>,
    #[serde(default)]
    pub os: Option<String>,
    #[serde(default)]
    pub created: Option<String>,
    #[serde(default)]
    pub config: Option<RunConfig>,
    #[serde(default)]
    pub rootfs: Option<RootFs>,
}

/// How the image means its programs to run. Docker writes `null` for unset fields, hence the options.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct RunConfig {
    #[serde(default)]
    pub env: Option<Vec<String>>,
    #[serde(default)]
    pub working_dir: Option<String>,
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub entrypoint: Option<Vec<String>>,
    #[serde(default)]
    pub cmd: Option<Vec<String>>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RootFs {
    #[serde(default)]
    pub diff_ids: Vec<String>,
}

impl ImageConfigFile {
    pub(crate) fn parse(bytes: &[u8]) -> Result<Self> {
        let config: ImageConfigFile = serde_json::from_slice(bytes)
            .map_err(|e| anyhow::anyhow!("the image config is not valid JSON: {e}"))?;
        if let Some(arch) = &config.architecture {
            if !arch.is_empty() && arch != "amd64" {
                bail!("the image is for {arch}; kiln runs x86-64 (amd64) guests only: pick the linux/amd64 variant");
            }
        }
        if let Some(os) = &config.os {
            if !os.is_empty() && os != "linux" {
                bail!("the image is for {os}; kiln runs Linux images only");
            }
        }
        Ok(config)
    }
}

/// Flattens the layers of `image` into `root` (an empty directory) in order.
pub fn flatten(
    cache: &BlobCache,
    image: &Fetched,
    root: &Path,
    progress: &dyn Progress,
) -> Result<UnpackStats> {
    let mut total = UnpackStats::default();
    let n = image.layers.len();
    for (i, digest) in image.layers.iter().enumerate() {
        progress.begin(&format!("unpacking layer {}/{n}", i + 1), None);
        let path = cache.path(digest)?;
        let stats = apply_layer(root, open_layer(&path)?)
            .map_err(|e| anyhow::anyhow!("layer {digest}: {e:#}"))?;
        progress.advance(stats.bytes);
        total.entries += stats.entries;
        total.bytes += stats.bytes;
        total.whiteouts += stats.whiteouts;
    }
    Ok(total)
}
