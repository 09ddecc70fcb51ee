//! Images from files: an OCI layout directory, an OCI archive (a tar of one) or a `docker save`
//! archive (`manifest.json` naming a config and layer tars). Every blob is hashed and checked against
//! the digest that names it (for docker archives, the layer's uncompressed digest in the config's
//! `rootfs.diff_ids`) before it enters the cache.

use std::collections::HashMap;
use std::fs;
use std::path::{Component, Path, PathBuf};

use anyhow::{bail, Context, Result};
use oci_spec::image::{ImageIndex, ImageManifest, MediaType};
use serde::Deserialize;

use crate::cache::{digest_of, sha256_hex, BlobCache, Progress};
use crate::unpack::open_layer;
use crate::{Fetched, ImageConfigFile};

/// Files of the image by their path inside it.
enum Files {
    Dir(PathBuf),
    /// An extracted archive: its regular files as numbered temp files, and its symlinks.
    Archive {
        files: HashMap<String, PathBuf>,
        links: HashMap<String, String>,
        tmp: PathBuf,
    },
}

impl Drop for Files {
    fn drop(&mut self) {
        if let Files::Archive { tmp, .. } = self {
            let _ = fs::remove_dir_all(tmp);
        }
    }
}

fn clean(name: &str) -> String {
    Path::new(name)
        .components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n.to_string_lossy().into_owned()),
            _ => None,
        })
        .collect::<Vec<_>>()
        .join("/")
}

impl Files {
    fn get(&self, name: &str) -> Option<PathBuf> {
        let mut name = clean(name);
        match self {
            Files::Dir(dir) => {
                let p = dir.join(&name);
                p.is_file().then_some(p)
            }
            Files::Archive { files, links, .. } => {
                for _ in 0..8 {
                    if let Some(p) = files.get(&name) {
                        return Some(p.clone());
                    }
                    let target = links.get(&name)?;
                    // Old docker-save archives link repeated layers: `a/layer.tar -> ../b/layer.tar`.
                    let base = Path::new(&name).parent().unwrap_or(Path::new(""));
                    let mut joined = PathBuf::new();
                    for c in base.join(target).components() {
                        match c {
                            Component::Normal(n) => joined.push(n),
                            Component::ParentDir => {
                                joined.pop();
                            }
                            _ => {}
                        }
                    }
                    name = joined.to_string_lossy().into_owned();
                }
                None
            }
        }
    }

    fn read(&self, name: &str, what: &str) -> Result<Vec<u8>> {
        let p = self
            .get(name)
            .with_context(|| format!("the image has no {what} ({name})"))?;
        fs::read(&p).with_context(|| format!("read {}", p.display()))
    }

    fn blob_path(&self, digest: &str) -> Result<PathBuf> {
        let hex = sha256_hex(digest)?;
        self.get(&format!("blobs/sha256/{hex}"))
            .with_context(|| format!("the image has no blob {digest}"))
    }

    /// A blob's bytes, after checking they hash to `digest`.
    fn verified_blob(&self, digest: &str) -> Result<Vec<u8>> {
        let data = fs::read(self.blob_path(digest)?)?;
        let actual = digest_of(&data[..])?;
        if actual != digest {
            bail!("blob {digest} hashes to {actual}; the image file is corrupt");
        }
        Ok(data)
    }
}

/// Reads `path` (a directory or a tar file) and puts its layers in `cache`.
pub fn import(cache: &BlobCache, path: &Path, progress: &dyn Progress) -> Result<Fetched> {
    let meta = fs::metadata(path).with_context(|| format!("cannot read {}", path.display()))?;
    cache.clean_temps();
    let files = if meta.is_dir() {
        Files::Dir(path.to_path_buf())
    } else {
        extract(cache, path, progress)?
    };
    let display = path.display().to_string();
    if files.get("oci-layout").is_some() && files.get("index.json").is_some() {
        let kind = if meta.is_dir() {
            "oci-layout"
        } else {
            "oci-archive"
        };
        from_layout(cache, &files, kind, &display, progress)
    } else if files.get("manifest.json").is_some() {
        from_docker_archive(cache, &files, &display, progress)
    } else {
        bail!(
            "{} is neither an OCI layout (oci-layout + index.json) nor a docker-save archive (manifest.json)",
            path.display()
        )
    }
}

/// Unpacks the archive's regular files into a temporary directory in the cache (same filesystem as the
/// blobs), keyed by their cleaned names; nothing is created from its names.
fn extract(cache: &BlobCache, path: &Path, progress: &dyn Progress) -> Result<Files> {
    let tmp = cache.path(&format!("sha256:{}", "0".repeat(64)))?;
    let tmp = tmp
        .parent()
        .unwrap_or(Path::new("."))
        .join(format!(".import-{}", std::process::id()));
    let _ = fs::remove_dir_all(&tmp);
    fs::create_dir_all(&tmp).with_context(|| format!("create {}", tmp.display()))?;
    let mut out = Files::Archive {
        files: HashMap::new(),
        links: HashMap::new(),
        tmp: tmp.clone(),
    };
    let Files::Archive { files, links, .. } = &mut out else {
        unreachable!()
    };
    progress.begin(
        &format!("reading {}", path.display()),
        fs::metadata(path).ok().map(|m| m.len()),
    );
    let reader = open_layer(path)?;
    let mut archive = tar::Archive::new(reader);
    for (i, entry) in archive.entries()?.enumerate() {
        let mut entry = entry.context("read the archive")?;
        let name = clean(&entry.path()?.to_string_lossy());
        let kind = entry.header().entry_type();
        if kind.is_file() {
            let dest = tmp.join(i.to_string());
            let mut f = fs::File::create(&dest)?;
            let n = std::io::copy(&mut entry, &mut f)?;
            progress.advance(n);
            files.insert(name, dest);
        } else if kind.is_symlink() || kind.is_hard_link() {
            if let Some(target) = entry.link_name()? {
                let target = target.to_string_lossy().into_owned();
                // Hard link targets are archive paths; symlink targets are relative to the link.
                let target = if kind.is_hard_link() {
                    format!("/{target}")
                } else {
                    target
                };
                links.insert(name, target);
            }
        }
    }
    Ok(out)
}

fn from_layout(
    cache: &BlobCache,
    files: &Files,
    kind: &'static str,
    display: &str,
    progress: &dyn Progress,
) -> Result<Fetched> {
    let index: ImageIndex = serde_json::from_slice(&files.read("index.json", "index.json")?)
        .context("index.json is not an OCI image index")?;
    // Pick the linux/amd64 (or only) manifest, descending through nested indexes.
    let mut candidates = index.manifests().clone();
    let mut reference = display.to_string();
    for _ in 0..4 {
        let pick = candidates
            .iter()
            .find(|d| {
                d.platform().as_ref().is_some_and(|p| {
                    p.architecture().to_string() == "amd64" && p.os().to_string() == "linux"
                })
            })
            .or_else(|| candidates.first())
            .cloned()
            .context("the image index lists no manifests")?;
        if let Some(name) = pick
            .annotations()
            .as_ref()
            .and_then(|a| a.get("org.opencontainers.image.ref.name"))
        {
            reference = format!("{display}:{name}");
        }
        let digest = pick.digest().to_string();
        let data = files.verified_blob(&digest)?;
        if *pick.media_type() == MediaType::ImageIndex {
            let nested: ImageIndex = serde_json::from_slice(&data).context("nested image index")?;
            candidates = nested.manifests().clone();
            continue;
        }
        let manifest: ImageManifest =
            serde_json::from_slice(&data).context("the manifest is not an OCI image manifest")?;
        let config_digest = manifest.config().digest().to_string();
        let config = ImageConfigFile::parse(&files.verified_blob(&config_digest)?)?;
        let mut fetched = new_fetched(reference, kind, digest, config_digest, config);
        for layer in manifest.layers() {
            let d = layer.digest().to_string();
            add_layer(
                cache,
                &mut fetched,
                &files.blob_path(&d)?,
                &d,
                layer.size(),
                progress,
            )?;
        }
        return Ok(fetched);
    }
    bail!("the image index nests too deeply")
}

fn new_fetched(
    reference: String,
    kind: &'static str,
    digest: String,
    config_digest: String,
    config: ImageConfigFile,
) -> Fetched {
    Fetched {
        reference,
        kind,
        digest,
        config_digest,
        config,
        layers: Vec::new(),
        layer_sizes: Vec::new(),
        fetched_bytes: 0,
        fetched_layers: 0,
        cached_layers: 0,
        cached_bytes: 0,
    }
}

fn add_layer(
    cache: &BlobCache,
    fetched: &mut Fetched,
    src: &Path,
    digest: &str,
    size: u64,
    progress: &dyn Progress,
) -> Result<()> {
    fetched.layers.push(digest.to_string());
    fetched.layer_sizes.push(size);
    if cache.contains(digest) {
        fetched.cached_layers += 1;
        fetched.cached_bytes += size;
        return Ok(());
    }
    progress.begin(
        &format!("layer {}/{}", fetched.layers.len(), digest),
        Some(size),
    );
    let n = cache.insert_from(src, digest, progress)?;
    fetched.fetched_layers += 1;
    fetched.fetched_bytes += n;
    Ok(())
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DockerManifest {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
}

fn from_docker_archive(
    cache: &BlobCache,
    files: &Files,
    display: &str,
    progress: &dyn Progress,
) -> Result<Fetched> {
    let list: Vec<DockerManifest> =
        serde_json::from_slice(&files.read("manifest.json", "manifest.json")?)
            .context("manifest.json is not a docker-save manifest")?;
    let Some(m) = list.into_iter().next() else {
        bail!("{display}: manifest.json lists no image");
    };
    let config_bytes = files.read(&m.config, "config")?;
    let config_digest = digest_of(&config_bytes[..])?;
    let config = ImageConfigFile::parse(&config_bytes)?;
    let diff_ids = config
        .rootfs
        .as_ref()
        .map(|r| r.diff_ids.clone())
        .unwrap_or_default();
    if diff_ids.len() != m.layers.len() {
        bail!(
            "{display}: the config lists {} layer digests but manifest.json {} layers",
            diff_ids.len(),
            m.layers.len()
        );
    }
    let reference = m
        .repo_tags
        .and_then(|t| t.into_iter().next())
        .unwrap_or_else(|| display.to_string());
    let mut fetched = new_fetched(
        reference,
        "docker-archive",
        config_digest.clone(),
        config_digest,
        config,
    );
    for (name, diff_id) in m.layers.iter().zip(&diff_ids) {
        let src = files
            .get(name)
            .with_context(|| format!("{display}: layer {name} is missing"))?;
        let blob_digest = digest_of(fs::File::open(&src)?)?;
        // diff_ids name the uncompressed tar; a compressed layer file must decompress to it.
        if &blob_digest != diff_id {
            let uncompressed = digest_of(open_layer(&src)?)?;
            if &uncompressed != diff_id {
                bail!("layer {name} hashes to {uncompressed}, not {diff_id} as the config says; the archive is corrupt");
            }
        }
        let size = fs::metadata(&src)?.len();
        add_layer(cache, &mut fetched, &src, &blob_digest, size, progress)?;
    }
    Ok(fetched)
}
