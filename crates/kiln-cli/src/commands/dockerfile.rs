//! `kiln image build NAME -f Dockerfile CONTEXT`: kiln does not build images itself; it runs an installed
//! builder (buildah, or docker with a running daemon), exports the result as an OCI layout or a
//! `docker save` archive and makes the template through the same import path as `kiln image import`
//! (digests, config defaults, kiln's agent and init added). The builder's own images and containers
//! are removed afterwards, also when the build fails.

use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kiln_image::on_path;

use crate::client::ApiError;
use crate::Cli;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Builder {
    Buildah,
    Docker,
}

/// buildah when installed (it needs no daemon), else docker when its daemon answers.
pub fn find_builder(wanted: Option<&str>) -> anyhow::Result<Builder> {
    let missing = |why: String| -> anyhow::Error {
        ApiError {
            code: kiln_core::ErrorCode::ImageBuilderMissing.as_str().into(),
            message: format!(
                "{why}: `kiln image build -f` runs an installed image builder. Install buildah \
                 (`apt-get install buildah`) or docker with a running daemon (`apt-get install docker.io`), \
                 then try again"
            ),
        }
        .into()
    };
    let docker_answers = || {
        on_path("docker").is_some()
            && run_quiet(
                Command::new("docker").args(["info", "--format", "{{.ServerVersion}}"]),
                Duration::from_secs(15),
            )
    };
    match wanted {
        Some("buildah") => on_path("buildah")
            .map(|_| Builder::Buildah)
            .ok_or_else(|| missing("buildah is not installed".into())),
        Some("docker") if docker_answers() => Ok(Builder::Docker),
        Some("docker") => Err(missing(
            "docker is not installed or its daemon does not answer (`docker info` failed)".into(),
        )),
        Some(other) => anyhow::bail!("unknown builder {other:?}: use buildah or docker"),
        None if on_path("buildah").is_some() => Ok(Builder::Buildah),
        None if docker_answers() => Ok(Builder::Docker),
        None if on_path("docker").is_some() => Err(missing(
            "no image builder found (buildah is not installed; docker is, but its daemon does not answer)"
                .into(),
        )),
        None => Err(missing(
            "no image builder found (neither buildah nor docker is installed)".into(),
        )),
    }
}

/// Runs a command with no output, true when it exits 0 within `timeout`.
fn run_quiet(cmd: &mut Command, timeout: Duration) -> bool {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    run_until(cmd, timeout).is_ok()
}

/// Runs a command to completion, killing it when `timeout` passes; its output goes where `cmd` says.
fn run_until(cmd: &mut Command, timeout: Duration) -> anyhow::Result<()> {
    let shown = format!("{cmd:?}");
    let mut child = cmd
        .spawn()
        .map_err(|e| anyhow::anyhow!("cannot run {shown}: {e}"))?;
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait()? {
            if status.success() {
                return Ok(());
            }
            anyhow::bail!("{shown} failed ({status})");
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            anyhow::bail!(
                "{shown} did not finish within {} s and was stopped",
                timeout.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The builder's progress goes to our stderr, so `--json` output on stdout stays clean.
fn to_stderr() -> Stdio {
    std::io::stderr()
        .as_fd()
        .try_clone_to_owned()
        .map(Stdio::from)
        .unwrap_or_else(|_| Stdio::inherit())
}

/// A build's scratch directory (buildah's private storage, the export), and the builder's leftovers:
/// removed on drop, whatever happened.
struct Scratch {
    dir: PathBuf,
    builder: Builder,
    tag: String,
}

impl Scratch {
    fn buildah(&self) -> Command {
        let mut c = Command::new("buildah");
        c.arg("--root")
            .arg(self.dir.join("storage"))
            .arg("--runroot")
            .arg(self.dir.join("run"))
            .args(["--storage-driver", "vfs"]);
        c
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let t = Duration::from_secs(120);
        match self.builder {
            Builder::Buildah => {
                run_quiet(self.buildah().args(["rm", "--all"]), t);
                run_quiet(self.buildah().args(["rmi", "--all", "--force"]), t);
            }
            Builder::Docker => {
                run_quiet(
                    Command::new("docker").args(["rmi", "--force", &self.tag]),
                    t,
                );
            }
        }
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                eprintln!("warning: cannot remove {}: {e}", self.dir.display());
            }
        }
    }
}

/// Scratch directories of builds whose process is gone (killed mid-build).
fn clean_stale(root: &Path) {
    for e in std::fs::read_dir(root).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let pid = name.split('-').next().and_then(|p| p.parse::<u32>().ok());
        if pid.is_some_and(|p| !Path::new(&format!("/proc/{p}")).exists()) {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

pub struct BuildArgs<'a> {
    pub name: &'a str,
    pub file: PathBuf,
    pub context: PathBuf,
    pub builder: Option<&'a str>,
    pub timeout: Duration,
    pub template: super::oci::TemplateArgs,
}

pub async fn build(cli: &Cli, args: BuildArgs<'_>) -> anyhow::Result<()> {
    let file = args
        .file
        .canonicalize()
        .map_err(|e| anyhow::anyhow!("Dockerfile {}: {e}", args.file.display()))?;
    let context = args
        .context
        .canonicalize()
        .map_err(|e| anyhow::anyhow!("build context {}: {e}", args.context.display()))?;
    if !context.is_dir() {
        anyhow::bail!("the build context {} is not a directory", context.display());
    }
    kiln_image::validate_image_name(args.name)?;
    let data = cli.data_dir();
    // Refuse before a long build, not after it.
    if data
        .join("images")
        .join(args.name)
        .join(kiln_image::MANIFEST_FILE)
        .is_file()
        && !args.template.force
    {
        anyhow::bail!(
            "image {:?} already exists; pass --force to rebuild it",
            args.name
        );
    }
    let builder = find_builder(args.builder)?;
    let root = data.join("cache/build");
    clean_stale(&root);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let id = format!("{}-{nanos}", std::process::id());
    let scratch = Scratch {
        dir: root.join(&id),
        builder,
        tag: format!("localhost/kiln-build-{id}:latest"),
    };
    std::fs::create_dir_all(&scratch.dir)?;
    let started = Instant::now();
    let export = {
        let (scratch, file, context, timeout) = (&scratch, &file, &context, args.timeout);
        tokio::task::block_in_place(move || -> anyhow::Result<PathBuf> {
            match builder {
                Builder::Buildah => {
                    eprintln!("==> building {} with buildah", file.display());
                    run_until(
                        scratch
                            .buildah()
                            .args(["bud", "--isolation", "chroot", "-f"])
                            .arg(file)
                            .args(["-t", &scratch.tag])
                            .arg(context)
                            .stdin(Stdio::null())
                            .stdout(to_stderr()),
                        timeout,
                    )?;
                    let out = scratch.dir.join("layout");
                    run_until(
                        scratch
                            .buildah()
                            .args(["push", "--quiet", &scratch.tag])
                            .arg(format!("oci:{}:latest", out.display()))
                            .stdin(Stdio::null())
                            .stdout(to_stderr()),
                        timeout,
                    )?;
                    Ok(out)
                }
                Builder::Docker => {
                    eprintln!("==> building {} with docker", file.display());
                    run_until(
                        Command::new("docker")
                            .args(["build", "--rm", "--force-rm", "-f"])
                            .arg(file)
                            .args(["-t", &scratch.tag])
                            .arg(context)
                            .stdin(Stdio::null())
                            .stdout(to_stderr()),
                        timeout,
                    )?;
                    let out = scratch.dir.join("image.tar");
                    run_until(
                        Command::new("docker")
                            .args(["save", "-o"])
                            .arg(&out)
                            .arg(&scratch.tag)
                            .stdin(Stdio::null())
                            .stdout(to_stderr()),
                        timeout,
                    )?;
                    Ok(out)
                }
            }
        })?
    };
    let build_secs = started.elapsed().as_secs_f64();
    eprintln!(
        "==> built in {build_secs:.1} s; making template {}",
        args.name
    );
    let reference = format!("dockerfile:{}", file.display());
    super::oci::import_as(cli, &export, "dockerfile", &reference, &args.template).await
    // `scratch` drops here: the builder's image and the export go.
}
