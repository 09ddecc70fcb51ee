use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Subcommand;
use indicatif::{ProgressBar, ProgressStyle};
use kiln_image::{BuildOptions, BuildProgress, ImageStore};

use crate::client::ApiError;
use crate::output::{confirm, human_bytes, table};
use crate::Cli;

#[derive(Subcommand)]
pub enum ImageCmd {
    /// Build a guest image: `tiny` (busybox, seconds) or `base` (Debian bookworm with python3, minutes);
    /// or, with `-f Dockerfile [CONTEXT]`, a template from a Dockerfile, built by buildah or docker.
    Build {
        name: String,
        /// Build context directory for a Dockerfile (default: the Dockerfile's directory). Given alone,
        /// its `Dockerfile` is built.
        context: Option<PathBuf>,
        /// The Dockerfile to build (with buildah, or docker when its daemon runs).
        #[arg(short = 'f', long = "file")]
        file: Option<PathBuf>,
        /// The builder to use for a Dockerfile: buildah or docker (default: buildah when installed).
        #[arg(long, env = "KILN_IMAGE_BUILDER")]
        builder: Option<String>,
        /// Give up a Dockerfile build after this many seconds.
        #[arg(long, default_value_t = 3600)]
        timeout: u64,
        /// Start the built image's Entrypoint + Cmd as a background process whenever a sandbox boots.
        #[arg(long)]
        start_cmd: bool,
        /// The static guest agent binary (default: found beside `kiln`, or KILN_AGENT_BIN).
        #[arg(long, env = "KILN_AGENT_BIN")]
        agent: Option<PathBuf>,
        /// Rebuild even if the image exists.
        #[arg(long)]
        force: bool,
    },
    /// Make a template from an OCI/Docker image in a registry (Docker Hub, GHCR, a private registry).
    Pull {
        /// Image reference, e.g. docker.io/library/alpine:3.20 or localhost:5000/app@sha256:...
        reference: String,
        /// Talk plain HTTP to the registry (a local registry without TLS).
        #[arg(long)]
        insecure: bool,
        /// Registry user for basic or token auth (or KILN_REGISTRY_USERNAME).
        #[arg(long)]
        username: Option<String>,
        /// Read the registry password from stdin (or KILN_REGISTRY_PASSWORD).
        #[arg(long)]
        password_stdin: bool,
        #[command(flatten)]
        template: super::oci::TemplateArgs,
    },
    /// Make a template from a `docker save` archive, an OCI archive or an OCI layout directory.
    Import {
        file: PathBuf,
        #[command(flatten)]
        template: super::oci::TemplateArgs,
    },
    /// List built images.
    #[command(alias = "ls")]
    List,
    /// Remove an image (refused while sandboxes use it); then prune the layer cache.
    Rm {
        name: String,
        #[arg(short = 'y', long)]
        yes: bool,
        /// How long to wait for creates from images that are under way, in seconds.
        #[arg(long, default_value_t = 300)]
        wait: u64,
    },
    /// Remove cached OCI layer blobs that no installed image uses.
    Prune,
}

struct Spinner(ProgressBar);

impl BuildProgress for Spinner {
    fn step(&self, msg: &str) {
        self.0.println(format!("==> {msg}"));
        self.0.set_message(msg.to_string());
    }
    fn detail(&self, msg: &str) {
        self.0.set_message(msg.to_string());
    }
}

/// The agent binary: built by `make agent` into the cargo target dir, or installed beside `kiln`.
pub(crate) fn find_agent() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let dir = exe.parent().map(PathBuf::from).unwrap_or_default();
    let candidates = [
        dir.join("kiln-agent"),
        dir.join("../x86_64-unknown-linux-gnu/agent/kiln-agent"),
        dir.join("../../x86_64-unknown-linux-gnu/agent/kiln-agent"),
    ];
    candidates.iter().find(|p| p.is_file()).cloned().ok_or_else(|| {
        anyhow::anyhow!(
            "cannot find the guest agent binary (looked beside {}); build it with `make agent` or pass --agent PATH",
            exe.display()
        )
    })
}

pub(crate) fn image_json(i: &kiln_image::ImageInfo) -> serde_json::Value {
    serde_json::json!({
        "name": i.name,
        "dir": i.dir,
        "disk_usage_bytes": i.disk_usage_bytes,
        "manifest": serde_json::to_value(&i.manifest).unwrap_or_default(),
    })
}

/// Template snapshots kept for an image (docs/snapshots.md, "Create is a resume"): beside it, or in the
/// data directory when the images directory is read-only. (count, bytes on disk)
fn template_snapshots(data: &std::path::Path, i: &kiln_image::ImageInfo) -> (usize, u64) {
    fn usage(p: &std::path::Path) -> u64 {
        use std::os::unix::fs::MetadataExt;
        match std::fs::symlink_metadata(p) {
            Ok(m) if m.is_dir() => std::fs::read_dir(p)
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| usage(&e.path()))
                .sum(),
            Ok(m) => m.blocks() * 512,
            Err(_) => 0,
        }
    }
    let mut found = (0, 0);
    for store in [
        i.dir.join("snapshots"),
        data.join("template-snapshots").join(&i.name),
    ] {
        for e in std::fs::read_dir(&store).into_iter().flatten().flatten() {
            if e.file_name().to_string_lossy().starts_with("template-") {
                found.0 += 1;
                found.1 += usage(&e.path());
            }
        }
    }
    found
}

pub async fn run(cli: &Cli, cmd: &ImageCmd) -> anyhow::Result<ExitCode> {
    let data = cli.data_dir();
    let store = ImageStore::new(data.join("images"), data.join("cache"));
    match cmd {
        ImageCmd::Build {
            name,
            context,
            file,
            builder,
            timeout,
            start_cmd,
            agent,
            force,
        } if file.is_some() || context.is_some() => {
            let context = context.clone().unwrap_or_else(|| {
                file.as_deref()
                    .and_then(|f| f.parent())
                    .filter(|p| !p.as_os_str().is_empty())
                    .map_or_else(|| PathBuf::from("."), PathBuf::from)
            });
            let file = file.clone().unwrap_or_else(|| context.join("Dockerfile"));
            let args = super::dockerfile::BuildArgs {
                name,
                file,
                context,
                builder: builder.as_deref(),
                timeout: Duration::from_secs(*timeout),
                template: super::oci::TemplateArgs {
                    name: Some(name.clone()),
                    start_cmd: *start_cmd,
                    force: *force,
                    agent: agent.clone(),
                },
            };
            super::dockerfile::build(cli, args).await?
        }
        ImageCmd::Build {
            name,
            agent,
            force,
            start_cmd,
            ..
        } => {
            if *start_cmd {
                anyhow::bail!("--start-cmd is for images built from a Dockerfile (-f)");
            }
            let agent_bin = match agent {
                Some(p) => p.clone(),
                None => find_agent()?,
            };
            let opts = BuildOptions {
                agent_bin,
                force: *force,
                rootfs_size_mib: None,
            };
            let name = name.clone();
            let started = std::time::Instant::now();
            let info = tokio::task::spawn_blocking(move || {
                let pb = ProgressBar::new_spinner();
                pb.set_style(
                    ProgressStyle::with_template("{spinner} [{elapsed}] {msg}")
                        .unwrap_or_else(|_| ProgressStyle::default_spinner()),
                );
                pb.enable_steady_tick(Duration::from_millis(120));
                let spinner = Spinner(pb);
                let res = store.build(&name, &opts, &spinner);
                spinner.0.finish_and_clear();
                res
            })
            .await??;
            if cli.json {
                println!("{}", serde_json::to_string_pretty(&image_json(&info))?);
            } else {
                println!(
                    "built image {} in {:.1} s ({} rootfs, kernel {})",
                    info.name,
                    started.elapsed().as_secs_f64(),
                    human_bytes(info.manifest.rootfs_size_bytes),
                    info.manifest.kernel_version
                );
            }
        }
        ImageCmd::Pull {
            reference,
            insecure,
            username,
            password_stdin,
            template,
        } => {
            super::oci::pull(
                cli,
                reference,
                *insecure,
                username.clone(),
                *password_stdin,
                template,
            )
            .await?
        }
        ImageCmd::Import { file, template } => super::oci::import(cli, file, template).await?,
        ImageCmd::List => {
            let list = store.list()?;
            if cli.json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(
                        &list
                            .iter()
                            .map(|i| {
                                let mut v = image_json(i);
                                let (count, bytes) = template_snapshots(&data, i);
                                v["template_snapshots"] = serde_json::json!(count);
                                v["template_snapshot_bytes"] = serde_json::json!(bytes);
                                v
                            })
                            .collect::<Vec<_>>()
                    )?
                );
            } else {
                let rows: Vec<Vec<String>> = list
                    .iter()
                    .map(|i| {
                        let source = i.manifest.source.as_ref().map_or_else(
                            || "kiln".to_string(),
                            |s| {
                                let hex = s.digest.strip_prefix("sha256:").unwrap_or(&s.digest);
                                format!("{}@{}", s.reference, &hex[..hex.len().min(12)])
                            },
                        );
                        let snaps = match template_snapshots(&data, i) {
                            (0, _) => "none".to_string(),
                            (n, bytes) => format!("{n} ({})", human_bytes(bytes)),
                        };
                        vec![
                            i.name.clone(),
                            source,
                            i.manifest.kernel_version.clone(),
                            human_bytes(i.manifest.rootfs_size_bytes),
                            human_bytes(i.disk_usage_bytes),
                            snaps,
                            i.manifest.created_at.to_rfc3339(),
                        ]
                    })
                    .collect();
                table(
                    &[
                        "NAME",
                        "SOURCE",
                        "KERNEL",
                        "ROOTFS",
                        "ON DISK",
                        "TEMPLATE SNAPSHOTS",
                        "CREATED",
                    ],
                    &rows,
                );
            }
        }
        ImageCmd::Rm { name, yes, wait } => {
            if !confirm(&format!("remove image {name}?"), *yes)? {
                return Ok(ExitCode::from(1));
            }
            // Exclusive against creates, which hold the lock from finding the template until their
            // sandbox is recorded: the check below then sees every sandbox that uses it.
            let path = store.images_lock_path();
            let wait = Duration::from_secs(*wait);
            let lock = tokio::task::spawn_blocking(move || {
                kiln_image::FileLock::acquire(&path, true, wait)
            })
            .await??;
            let Some(lock) = lock else {
                return Err(ApiError {
                    code: kiln_core::ErrorCode::ImageInUse.as_str().into(),
                    message: format!("sandboxes were still being created from images after {} s; try again (or pass a longer --wait)", wait.as_secs()),
                }
                .into());
            };
            refuse_if_used(&data, name)?;
            store.remove(name)?;
            drop(lock);
            let pruned = super::oci::prune_cache(&data)?;
            if cli.json {
                println!(
                    "{}",
                    serde_json::json!({
                        "removed": name,
                        "pruned_blobs": pruned.map(|p| p.0),
                        "pruned_bytes": pruned.map(|p| p.1),
                    })
                );
            } else {
                println!("removed image {name}");
                match pruned {
                    Some((0, _)) => {}
                    Some((n, bytes)) => println!(
                        "removed {n} cached layers ({}) no image uses",
                        human_bytes(bytes)
                    ),
                    None => println!(
                        "the layer cache is in use by a pull; run `kiln image prune` later"
                    ),
                }
            }
        }
        ImageCmd::Prune => {
            let Some((n, bytes)) = super::oci::prune_cache(&data)? else {
                anyhow::bail!("a pull, import or build is using the layer cache; try again when it has finished");
            };
            if cli.json {
                println!(
                    "{}",
                    serde_json::json!({"pruned_blobs": n, "pruned_bytes": bytes})
                );
            } else {
                println!("removed {n} cached layers ({})", human_bytes(bytes));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Refuses to remove a template that sandboxes were made from: their disks are overlays on its rootfs.img.
fn refuse_if_used(data: &std::path::Path, name: &str) -> anyhow::Result<()> {
    let db_path = data.join("kiln.db");
    if !db_path.is_file() {
        return Ok(());
    }
    let db = kiln_core::db::Db::open(&db_path)?;
    // Snapshots do not hold it: each keeps hard links to the files it needs, so a full snapshot still
    // resumes after the image is gone and a diff on it says its base is missing (tests/snapshots.rs).
    // kiln's own machines (warm spares, template-snapshot builders) run on those links too.
    let sandboxes: Vec<String> = db
        .list_sandboxes()?
        .into_iter()
        .filter(|s| s.template == name && !kiln_core::is_internal_sandbox(s))
        .map(|s| s.name)
        .collect();
    if sandboxes.is_empty() {
        return Ok(());
    }
    Err(ApiError {
        code: kiln_core::ErrorCode::ImageInUse.as_str().into(),
        message: format!(
            "image {name} is in use by sandboxes [{}]; delete them first (`kiln sandbox rm`)",
            sandboxes.join(", ")
        ),
    }
    .into())
}
