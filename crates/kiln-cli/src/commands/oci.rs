//! `kiln image pull` and `kiln image import`: OCI/Docker images as templates. Like `image build`, they run
//! in the CLI, not the daemon: they only write a new image directory (published atomically), which the
//! daemon reads when a sandbox is created, and a long download then needs no daemon-side operation,
//! cancellation or credentials handling.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use kiln_image::{BuildOptions, ImageError, ImageSource, ImageStore};
use kiln_oci::{BlobCache, Fetched};

use crate::output::human_bytes;
use crate::Cli;

/// Options shared by pull and import.
#[derive(clap::Args)]
pub struct TemplateArgs {
    /// Template name (default: from the image's repository name, e.g. `alpine`).
    #[arg(long)]
    pub name: Option<String>,
    /// Start the image's Entrypoint + Cmd as a background process whenever a sandbox of it boots.
    #[arg(long)]
    pub start_cmd: bool,
    /// Replace an existing template of that name.
    #[arg(long)]
    pub force: bool,
    /// The static guest agent binary (default: found beside `kiln`, or KILN_AGENT_BIN).
    #[arg(long, env = "KILN_AGENT_BIN")]
    pub agent: Option<PathBuf>,
}

/// A byte progress bar for downloads and copies (hidden when stderr is not a terminal).
struct Bar(ProgressBar);

impl kiln_oci::Progress for Bar {
    fn begin(&self, what: &str, total: Option<u64>) {
        self.0.set_position(0);
        match total {
            Some(n) => self.0.set_length(n),
            None => self.0.unset_length(),
        }
        self.0.set_message(what.to_string());
    }
    fn advance(&self, bytes: u64) {
        self.0.inc(bytes);
    }
    fn note(&self, msg: &str) {
        self.0.println(msg);
    }
}

impl kiln_image::BuildProgress for Bar {
    fn step(&self, msg: &str) {
        self.0.set_message(msg.to_string());
    }
}

fn bar() -> Bar {
    let pb = ProgressBar::new(0);
    pb.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed}] {msg} {bytes}/{total_bytes} ({bytes_per_sec})",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    pb.enable_steady_tick(Duration::from_millis(120));
    Bar(pb)
}

/// A template name from an image reference or file: the repository's last path element, cleaned.
fn default_name(reference: &str) -> String {
    let last = reference.rsplit('/').next().unwrap_or(reference);
    let base = last.split(['@', ':']).next().unwrap_or(last);
    let base = base.strip_suffix(".tar").unwrap_or(base);
    let mut name: String = base
        .to_ascii_lowercase()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '-'
            }
        })
        .collect();
    name = name
        .trim_start_matches(['-', '_'])
        .chars()
        .take(63)
        .collect();
    if name.is_empty() {
        "image".into()
    } else {
        name
    }
}

pub async fn pull(
    cli: &Cli,
    reference: &str,
    insecure: bool,
    username: Option<String>,
    password_stdin: bool,
    args: &TemplateArgs,
) -> anyhow::Result<()> {
    let password = if password_stdin {
        let mut line = String::new();
        std::io::stdin().read_line(&mut line)?;
        Some(line.trim_end_matches(['\r', '\n']).to_string())
    } else {
        std::env::var("KILN_REGISTRY_PASSWORD").ok()
    };
    let username = username.or_else(|| std::env::var("KILN_REGISTRY_USERNAME").ok());
    if username.is_some() != password.is_some() {
        anyhow::bail!(
            "give both a username (--username) and a password (--password-stdin), or neither"
        );
    }
    let opts = kiln_oci::PullOptions {
        insecure,
        username,
        password,
    };
    let data = cli.data_dir();
    let cache = BlobCache::new(&data.join("cache"));
    let _using = use_cache(&cache).await?;
    let started = Instant::now();
    let progress = bar();
    let fetched = kiln_oci::pull(&cache, reference, &opts, &progress).await;
    progress.0.finish_and_clear();
    finish(cli, cache, fetched?, args, started).await
}

pub async fn import(cli: &Cli, file: &Path, args: &TemplateArgs) -> anyhow::Result<()> {
    import_as(cli, file, "", "", args).await
}

/// `import`, recording the template's source as `kind` and `reference` when they are not empty (a
/// Dockerfile build imports what its builder exported).
pub async fn import_as(
    cli: &Cli,
    file: &Path,
    kind: &'static str,
    reference: &str,
    args: &TemplateArgs,
) -> anyhow::Result<()> {
    let data = cli.data_dir();
    let cache = BlobCache::new(&data.join("cache"));
    let _using = use_cache(&cache).await?;
    let started = Instant::now();
    let (file, c) = (file.to_path_buf(), cache.clone());
    let mut fetched = tokio::task::spawn_blocking(move || {
        let progress = bar();
        let r = kiln_oci::import(&c, &file, &progress);
        progress.0.finish_and_clear();
        r
    })
    .await??;
    if !kind.is_empty() {
        fetched.kind = kind;
        fetched.reference = reference.to_string();
    }
    finish(cli, cache, fetched, args, started).await
}

/// The layer cache's lock, shared: held by a pull or import from its first blob until its template is
/// published, so a prune (exclusive) never deletes a blob that is being written or about to be used.
async fn use_cache(cache: &BlobCache) -> anyhow::Result<kiln_image::FileLock> {
    let path = cache.lock_path();
    tokio::task::spawn_blocking(move || {
        kiln_image::FileLock::acquire(&path, false, Duration::from_secs(120))
            .map_err(|e| anyhow::anyhow!("cannot lock {}: {e}", path.display()))?
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "the layer cache stayed locked by `kiln image prune` for 120 s; try again"
                )
            })
    })
    .await?
}

/// Removes cached layer blobs that no installed image lists, unless a pull, import or build is using
/// the cache right now (then None: nothing was removed). Returns (blobs, bytes) removed.
pub fn prune_cache(data: &Path) -> anyhow::Result<Option<(usize, u64)>> {
    let cache = BlobCache::new(&data.join("cache"));
    let path = cache.lock_path();
    let Some(_lock) = kiln_image::FileLock::try_acquire(&path, true)
        .map_err(|e| anyhow::anyhow!("cannot lock {}: {e}", path.display()))?
    else {
        return Ok(None);
    };
    let store = ImageStore::new(data.join("images"), data.join("cache"));
    let keep: std::collections::HashSet<String> = store
        .list()?
        .into_iter()
        .filter_map(|i| i.manifest.source)
        .flat_map(|s| s.layers)
        .collect();
    Ok(Some(cache.prune(&keep)?))
}

/// Flattens the fetched image into a new template and reports what was transferred.
async fn finish(
    cli: &Cli,
    cache: BlobCache,
    fetched: Fetched,
    args: &TemplateArgs,
    started: Instant,
) -> anyhow::Result<()> {
    let fetch_secs = started.elapsed().as_secs_f64();
    let name = args
        .name
        .clone()
        .unwrap_or_else(|| default_name(&fetched.reference));
    let agent_bin = match &args.agent {
        Some(p) => p.clone(),
        None => super::image::find_agent()?,
    };
    let opts = BuildOptions {
        agent_bin,
        force: args.force,
        rootfs_size_mib: None,
    };
    let run = fetched.config.config.clone().unwrap_or_default();
    let source = ImageSource {
        kind: fetched.kind.to_string(),
        reference: fetched.reference.clone(),
        digest: fetched.digest.clone(),
        config_digest: fetched.config_digest.clone(),
        layers: fetched.layers.clone(),
        env: run.env.unwrap_or_default(),
        working_dir: run.working_dir.filter(|d| !d.is_empty()),
        user: run.user.filter(|u| !u.is_empty()),
        entrypoint: run.entrypoint.unwrap_or_default(),
        cmd: run.cmd.unwrap_or_default(),
        start_cmd: args.start_cmd,
    };
    if args.start_cmd && source.entrypoint.is_empty() && source.cmd.is_empty() {
        anyhow::bail!("--start-cmd: the image has neither Entrypoint nor Cmd to start");
    }
    let description = format!("{} ({})", fetched.reference, fetched.kind);
    let data = cli.data_dir();
    let store = ImageStore::new(data.join("images"), data.join("cache"));
    let image = fetched.clone();
    let build_started = Instant::now();
    let info = tokio::task::spawn_blocking(move || {
        let progress = bar();
        let stage = |root: &Path| -> Result<(), ImageError> {
            kiln_oci::flatten(&cache, &image, root, &progress)
                .map(|_| ())
                .map_err(|e| ImageError::Build(format!("{e:#}")))
        };
        let r = store.build_from_tree(&name, description, source, &stage, &opts, &progress);
        progress.0.finish_and_clear();
        r
    })
    .await??;
    let build_secs = build_started.elapsed().as_secs_f64();
    if cli.json {
        let mut v = super::image::image_json(&info);
        v["fetched_bytes"] = fetched.fetched_bytes.into();
        v["fetched_layers"] = fetched.fetched_layers.into();
        v["cached_bytes"] = fetched.cached_bytes.into();
        v["cached_layers"] = fetched.cached_layers.into();
        v["fetch_seconds"] = fetch_secs.into();
        v["build_seconds"] = build_secs.into();
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!(
            "image {} from {} ({}): {} layers, {} transferred ({} layers), {} already cached ({} layers); \
             fetched in {fetch_secs:.1} s, built in {build_secs:.1} s",
            info.name,
            fetched.reference,
            fetched.digest,
            fetched.layers.len(),
            human_bytes(fetched.fetched_bytes),
            fetched.fetched_layers,
            human_bytes(fetched.cached_bytes),
            fetched.cached_layers,
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn default_names() {
        for (r, n) in [
            ("docker.io/library/alpine:3.20", "alpine"),
            ("127.0.0.1:5000/kiln/busy_box@sha256:ab", "busy_box"),
            ("/tmp/My.App.tar", "my-app"),
            ("::", "image"),
        ] {
            assert_eq!(super::default_name(r), n);
        }
    }
}
