use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Subcommand};
use futures::TryStreamExt;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use hyper::Method;
use serde_json::Value;
use tokio::io::AsyncWriteExt;

use crate::client::{encode, ReqBody};
use crate::output::{human_bytes, print_json_or, table};
use crate::Cli;

#[derive(Subcommand)]
pub enum FilesCmd {
    /// Print a guest file to stdout (or save it with --output).
    Read {
        sandbox: String,
        path: String,
        #[arg(long, short = 'o')]
        output: Option<PathBuf>,
    },
    /// Write a guest file from LOCAL_FILE or stdin.
    Write {
        sandbox: String,
        path: String,
        local_file: Option<PathBuf>,
        /// Octal mode, e.g. 0755.
        #[arg(long)]
        mode: Option<String>,
    },
    /// List a guest directory.
    Ls { sandbox: String, dir: String },
    /// Show a guest path's metadata.
    Stat { sandbox: String, path: String },
    /// Create a guest directory with its parents.
    Mkdir { sandbox: String, path: String },
    /// Remove a guest file or directory.
    Rm {
        sandbox: String,
        path: String,
        #[arg(short = 'r', long)]
        recursive: bool,
    },
    /// Copy a local directory into the guest (as a tar stream: modes, symlinks, empty dirs, mtimes).
    UploadDir {
        sandbox: String,
        local_dir: PathBuf,
        /// Guest directory (created if missing; existing entries are replaced).
        dir: String,
    },
    /// Copy a guest directory to a local one (created if missing).
    DownloadDir {
        sandbox: String,
        dir: String,
        local_dir: PathBuf,
    },
    /// Print changes under a guest directory as they happen, until interrupted.
    Watch {
        sandbox: String,
        dir: String,
        /// Watch subdirectories too.
        #[arg(short = 'r', long)]
        recursive: bool,
    },
}

#[derive(Args)]
pub struct CpArgs {
    /// LOCAL or SANDBOX:/path
    src: String,
    /// LOCAL or SANDBOX:/path
    dst: String,
    #[arg(long)]
    mode: Option<String>,
    /// Copy a directory (as a tar stream).
    #[arg(short = 'r', long)]
    recursive: bool,
}

fn files_path(sandbox: &str, suffix: &str, guest: &str) -> String {
    format!(
        "/v1/sandboxes/{}/files{suffix}?path={}",
        encode(sandbox),
        encode(guest)
    )
}

async fn upload(
    cli: &Cli,
    sandbox: &str,
    guest: &str,
    local: Option<&PathBuf>,
    mode: Option<&str>,
) -> anyhow::Result<Value> {
    let reader: Box<dyn tokio::io::AsyncRead + Unpin + Send + Sync> = match local {
        Some(p) => Box::new(
            tokio::fs::File::open(p)
                .await
                .map_err(|e| anyhow::anyhow!("cannot open {}: {e}", p.display()))?,
        ),
        None => Box::new(tokio::io::stdin()),
    };
    let stream =
        tokio_util::io::ReaderStream::with_capacity(reader, 256 * 1024).map_ok(Frame::data);
    let body: ReqBody = BodyExt::boxed(StreamBody::new(stream));
    let mut path = files_path(sandbox, "", guest);
    if let Some(m) = mode {
        path.push_str(&format!("&mode={}", encode(m)));
    }
    let resp = cli
        .client()?
        .call(Method::PUT, &path, Some("application/octet-stream"), body)
        .await?;
    let bytes = resp.into_body().collect().await?.to_bytes();
    Ok(serde_json::from_slice(&bytes)?)
}

async fn download(
    cli: &Cli,
    sandbox: &str,
    guest: &str,
    local: Option<&PathBuf>,
) -> anyhow::Result<u64> {
    let resp = cli
        .client()?
        .call(
            Method::GET,
            &files_path(sandbox, "", guest),
            None,
            crate::client::empty(),
        )
        .await?;
    let mut body = resp.into_body();
    let mut out: Box<dyn tokio::io::AsyncWrite + Unpin + Send> = match local {
        // Written beside the target and renamed, so a failed transfer never leaves half a file.
        Some(p) => Box::new(
            tokio::fs::File::create(tmp_path(p))
                .await
                .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", p.display()))?,
        ),
        None => Box::new(tokio::io::stdout()),
    };
    let mut total = 0u64;
    while let Some(frame) = body.frame().await {
        let frame = frame?;
        if let Some(data) = frame.data_ref() {
            total += data.len() as u64;
            out.write_all(data).await?;
        }
    }
    out.flush().await?;
    drop(out);
    if let Some(p) = local {
        tokio::fs::rename(tmp_path(p), p).await?;
    }
    Ok(total)
}

fn tmp_path(p: &std::path::Path) -> PathBuf {
    let mut name = p.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(".kiln-partial");
    p.with_file_name(name)
}

pub async fn run(cli: &Cli, cmd: &FilesCmd) -> anyhow::Result<ExitCode> {
    let client = cli.client()?;
    match cmd {
        FilesCmd::Read {
            sandbox,
            path,
            output,
        } => {
            download(cli, sandbox, path, output.as_ref()).await?;
        }
        FilesCmd::Write {
            sandbox,
            path,
            local_file,
            mode,
        } => {
            let v = upload(cli, sandbox, path, local_file.as_ref(), mode.as_deref()).await?;
            print_json_or(cli, &v, || {
                eprintln!(
                    "wrote {} to {path}",
                    human_bytes(v["bytes"].as_u64().unwrap_or(0))
                )
            });
        }
        FilesCmd::Ls { sandbox, dir } => {
            let v: Value = client
                .json(Method::GET, &files_path(sandbox, "/list", dir), None)
                .await?;
            print_json_or(cli, &v, || {
                let rows: Vec<Vec<String>> = v
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|e| {
                        vec![
                            format!("{:o}", e["mode"].as_u64().unwrap_or(0) & 0o7777),
                            e["kind"].as_str().unwrap_or("").to_string(),
                            e["size"].to_string(),
                            e["name"].as_str().unwrap_or("").to_string(),
                        ]
                    })
                    .collect();
                table(&["MODE", "KIND", "SIZE", "NAME"], &rows);
            });
        }
        FilesCmd::Stat { sandbox, path } => {
            let v: Value = client
                .json(Method::GET, &files_path(sandbox, "/stat", path), None)
                .await?;
            println!("{}", serde_json::to_string_pretty(&v)?);
        }
        FilesCmd::Mkdir { sandbox, path } => {
            let _: Value = client
                .json(
                    Method::POST,
                    &format!("/v1/sandboxes/{}/files/mkdir", encode(sandbox)),
                    Some(serde_json::json!({"path": path})),
                )
                .await?;
        }
        FilesCmd::Rm {
            sandbox,
            path,
            recursive,
        } => {
            let mut p = files_path(sandbox, "", path);
            if *recursive {
                p.push_str("&recursive=true");
            }
            client
                .call(Method::DELETE, &p, None, crate::client::empty())
                .await?;
        }
        FilesCmd::UploadDir {
            sandbox,
            local_dir,
            dir,
        } => {
            let v = super::dirs::upload_dir(cli, sandbox, local_dir, dir).await?;
            super::dirs::report_upload(cli, &v, &format!("{sandbox}:{dir}"));
        }
        FilesCmd::DownloadDir {
            sandbox,
            dir,
            local_dir,
        } => {
            let n = super::dirs::download_dir(cli, sandbox, dir, local_dir).await?;
            if !cli.json {
                eprintln!("copied {} of tar from {sandbox}:{dir}", human_bytes(n));
            }
        }
        FilesCmd::Watch {
            sandbox,
            dir,
            recursive,
        } => return super::dirs::watch(cli, sandbox, dir, *recursive).await,
    }
    Ok(ExitCode::SUCCESS)
}

/// `SANDBOX:/path` → (sandbox, path); anything else is local.
fn remote(spec: &str) -> Option<(&str, &str)> {
    let (sb, path) = spec.split_once(':')?;
    (!sb.is_empty() && !sb.contains('/') && path.starts_with('/')).then_some((sb, path))
}

pub async fn cp(cli: &Cli, a: &CpArgs) -> anyhow::Result<ExitCode> {
    if a.recursive {
        return cp_dir(cli, a).await;
    }
    match (remote(&a.src), remote(&a.dst)) {
        (None, Some((sb, path))) => {
            let v = upload(
                cli,
                sb,
                path,
                Some(&PathBuf::from(&a.src)),
                a.mode.as_deref(),
            )
            .await?;
            print_json_or(cli, &v, || {
                eprintln!(
                    "copied {} to {sb}:{path}",
                    human_bytes(v["bytes"].as_u64().unwrap_or(0))
                )
            });
        }
        (Some((sb, path)), None) => {
            let n = download(cli, sb, path, Some(&PathBuf::from(&a.dst))).await?;
            if !cli.json {
                eprintln!("copied {} from {sb}:{path}", human_bytes(n));
            }
        }
        _ => anyhow::bail!("exactly one side of `kiln cp` must be SANDBOX:/absolute/path"),
    }
    Ok(ExitCode::SUCCESS)
}

async fn cp_dir(cli: &Cli, a: &CpArgs) -> anyhow::Result<ExitCode> {
    match (remote(&a.src), remote(&a.dst)) {
        (None, Some((sb, path))) => {
            let v = super::dirs::upload_dir(cli, sb, std::path::Path::new(&a.src), path).await?;
            super::dirs::report_upload(cli, &v, &a.dst);
        }
        (Some((sb, path)), None) => {
            let n = super::dirs::download_dir(cli, sb, path, std::path::Path::new(&a.dst)).await?;
            if !cli.json {
                eprintln!("copied {} of tar from {sb}:{path}", human_bytes(n));
            }
        }
        _ => anyhow::bail!("exactly one side of `kiln cp -r` must be SANDBOX:/absolute/path"),
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    #[test]
    fn remote_specs() {
        assert_eq!(super::remote("web:/etc/hosts"), Some(("web", "/etc/hosts")));
        assert_eq!(super::remote("./a:b"), None);
        assert_eq!(super::remote("/tmp/x"), None);
        assert_eq!(super::remote("web:rel"), None);
    }
}
