//! Pulling from an OCI distribution registry (Docker Hub, GHCR, a private registry) with `oci-client`:
//! it speaks the protocol, including anonymous and basic-credential token auth, and picks the
//! linux/amd64 manifest of a multi-platform index. kiln streams each missing layer into its cache,
//! hashing as it goes, and keeps it only if it matches its digest.

use std::io::Write;
use std::time::Duration;

use anyhow::{Context, Result};
use futures::StreamExt;
use oci_client::client::{linux_amd64_resolver, ClientConfig, ClientProtocol};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};

use crate::cache::{BlobCache, HashingWriter, Progress};
use crate::{Fetched, ImageConfigFile};

#[derive(Debug, Clone, Default)]
pub struct PullOptions {
    /// Plain HTTP (a local registry without TLS).
    pub insecure: bool,
    /// Basic credentials (also used to obtain a bearer token when the registry asks for one).
    pub username: Option<String>,
    pub password: Option<String>,
}

fn client(opts: &PullOptions) -> Client {
    // reqwest is built without a default TLS crypto provider; install ring's once (a second install
    // attempt just reports that one is there).
    let _ = rustls::crypto::ring::default_provider().install_default();
    Client::new(ClientConfig {
        protocol: if opts.insecure {
            ClientProtocol::Http
        } else {
            ClientProtocol::Https
        },
        platform_resolver: Some(Box::new(linux_amd64_resolver)),
        connect_timeout: Some(Duration::from_secs(30)),
        read_timeout: Some(Duration::from_secs(120)),
        ..Default::default()
    })
}

/// Fetches the manifest and config of `reference` and every layer not yet in `cache`.
pub async fn pull(
    cache: &BlobCache,
    reference: &str,
    opts: &PullOptions,
    progress: &dyn Progress,
) -> Result<Fetched> {
    let image: Reference = reference
        .parse()
        .with_context(|| format!("{reference:?} is not an image reference (e.g. docker.io/library/alpine:3.20 or localhost:5000/app@sha256:...)"))?;
    let auth = match (&opts.username, &opts.password) {
        (Some(u), Some(p)) => RegistryAuth::Basic(u.clone(), p.clone()),
        _ => RegistryAuth::Anonymous,
    };
    let client = client(opts);
    progress.begin(&format!("resolving {image}"), None);
    let (manifest, digest, config) = client
        .pull_manifest_and_config(&image, &auth)
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot get the manifest of {image}: {e}{}",
                hint(&e.to_string(), opts)
            )
        })?;
    let config_bytes = config.into_bytes();
    let config_digest = manifest.config.digest.clone();
    let actual = crate::cache::digest_of(&config_bytes[..])?;
    if actual != config_digest {
        anyhow::bail!("the config of {image} hashes to {actual}, not {config_digest}; refusing it");
    }
    let parsed = ImageConfigFile::parse(&config_bytes)?;
    cache.clean_temps();
    let mut fetched = Fetched {
        reference: image.whole(),
        kind: "registry",
        digest,
        config_digest,
        config: parsed,
        layers: Vec::new(),
        layer_sizes: Vec::new(),
        fetched_bytes: 0,
        fetched_layers: 0,
        cached_layers: 0,
        cached_bytes: 0,
    };
    let n = manifest.layers.len();
    for (i, layer) in manifest.layers.iter().enumerate() {
        let size = u64::try_from(layer.size).unwrap_or(0);
        crate::cache::sha256_hex(&layer.digest)?;
        fetched.layers.push(layer.digest.clone());
        fetched.layer_sizes.push(size);
        if cache.contains(&layer.digest) {
            progress.note(&format!(
                "layer {}/{n} {} already cached",
                i + 1,
                short(&layer.digest)
            ));
            fetched.cached_layers += 1;
            fetched.cached_bytes += size;
            continue;
        }
        progress.begin(
            &format!("layer {}/{n} {}", i + 1, short(&layer.digest)),
            Some(size),
        );
        let mut stream = client
            .pull_blob_stream(&image, layer)
            .await
            .map_err(|e| anyhow::anyhow!("cannot download layer {}: {e}", layer.digest))?;
        let (tmp, file) = cache.temp()?;
        let mut out = HashingWriter::new(file, progress);
        let copied: Result<()> = async {
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.map_err(|e| {
                    anyhow::anyhow!("downloading layer {} failed: {e}", layer.digest)
                })?;
                out.write_all(&chunk)?;
                // A registry that sends more than the manifest promised is not to be trusted.
                if size > 0 && out_bytes(&out) > size {
                    anyhow::bail!(
                        "layer {} is larger than its manifest says ({size} bytes); refusing it",
                        layer.digest
                    );
                }
            }
            Ok(())
        }
        .await;
        if let Err(e) = copied {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        let (bytes, actual) = out.finish();
        cache.commit(&tmp, &layer.digest, &actual)?;
        fetched.fetched_bytes += bytes;
        fetched.fetched_layers += 1;
    }
    Ok(fetched)
}

fn out_bytes(w: &HashingWriter<'_>) -> u64 {
    w.bytes()
}

fn short(digest: &str) -> &str {
    let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
    &hex[..hex.len().min(12)]
}

/// A next step for common failures.
fn hint(err: &str, opts: &PullOptions) -> &'static str {
    if !opts.insecure
        && (err.contains("http") && err.contains("tls") || err.contains("InvalidContentType"))
    {
        "; if the registry speaks plain HTTP, pass --insecure"
    } else if err.contains("401") || err.contains("nauthorized") || err.contains("denied") {
        "; give credentials with --username and --password-stdin (or KILN_REGISTRY_USERNAME/KILN_REGISTRY_PASSWORD)"
    } else {
        ""
    }
}
