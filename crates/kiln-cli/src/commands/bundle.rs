//! `kiln snapshot export` / `import`: snapshot bundles streamed to and from a file, with a progress bar.

use std::path::Path;
use std::process::ExitCode;
use std::time::Instant;

use futures::TryStreamExt;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use hyper::Method;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;

use crate::client::{encode, ReqBody};
use crate::output::{human_bytes, print_json_or};
use crate::Cli;

fn bar(len: Option<u64>) -> ProgressBar {
    let pb = match len {
        Some(n) => ProgressBar::new(n).with_style(
            ProgressStyle::with_template(
                "{bar:30} {bytes}/{total_bytes} {binary_bytes_per_sec} {elapsed}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        ),
        None => ProgressBar::new_spinner().with_style(
            ProgressStyle::with_template("{spinner} {bytes} {binary_bytes_per_sec} {elapsed}")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        ),
    };
    // Drawn on stderr only when it is a terminal (indicatif hides it otherwise).
    pb.set_draw_target(ProgressDrawTarget::stderr());
    pb
}

pub async fn export(
    cli: &Cli,
    snapshot: &str,
    output: &Path,
    without_base: bool,
) -> anyhow::Result<ExitCode> {
    let mut path = format!("/v1/snapshots/{}/export", encode(snapshot));
    if without_base {
        path.push_str("?without_base=true");
    }
    let started = Instant::now();
    let resp = cli
        .client()?
        .call(Method::GET, &path, None, crate::client::empty())
        .await?;
    let data_bytes = resp
        .headers()
        .get("x-kiln-bundle-data-bytes")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let partial = partial_path(output);
    let mut out = tokio::fs::File::create(&partial)
        .await
        .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", partial.display()))?;
    let pb = bar(None);
    let mut body = resp.into_body();
    let mut total = 0u64;
    let copied: anyhow::Result<()> = async {
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| {
                anyhow::anyhow!("the export was cut short ({e}); see the daemon's log")
            })?;
            if let Some(data) = frame.data_ref() {
                total += data.len() as u64;
                pb.set_position(total);
                out.write_all(data).await?;
            }
        }
        out.flush().await?;
        out.sync_all().await?;
        Ok(())
    }
    .await;
    pb.finish_and_clear();
    if let Err(e) = copied {
        let _ = tokio::fs::remove_file(&partial).await;
        return Err(e);
    }
    // The body ends cleanly only after the trailer; a missing trailer is caught on import too.
    tokio::fs::rename(&partial, output).await?;
    let secs = started.elapsed().as_secs_f64();
    let v = json!({"snapshot": snapshot, "file": output, "bytes": total, "data_bytes": data_bytes, "seconds": secs});
    print_json_or(cli, &v, || {
        println!(
            "exported {snapshot} to {} ({} for {} of data, {:.1} s)",
            output.display(),
            human_bytes(total),
            human_bytes(data_bytes.unwrap_or(0)),
            secs
        );
    });
    Ok(ExitCode::SUCCESS)
}

pub async fn import(cli: &Cli, file: &Path, name: Option<&str>) -> anyhow::Result<ExitCode> {
    let f = tokio::fs::File::open(file)
        .await
        .map_err(|e| anyhow::anyhow!("cannot open {}: {e}", file.display()))?;
    let len = f.metadata().await?.len();
    let pb = bar(Some(len));
    let progress = pb.clone();
    let stream = tokio_util::io::ReaderStream::with_capacity(f, 256 * 1024)
        .inspect_ok(move |b| progress.inc(b.len() as u64))
        .map_ok(Frame::data);
    let body: ReqBody = BodyExt::boxed(StreamBody::new(stream));
    let mut path = "/v1/snapshots/import".to_string();
    if let Some(n) = name {
        path.push_str(&format!("?name={}", encode(n)));
    }
    let started = Instant::now();
    let res = cli
        .client()?
        .call(Method::POST, &path, Some("application/octet-stream"), body)
        .await;
    pb.finish_and_clear();
    let bytes = res?.into_body().collect().await?.to_bytes();
    let s: Value = serde_json::from_slice(&bytes)?;
    print_json_or(cli, &s, || {
        println!(
            "imported snapshot {} ({} type, {}) from {} in {:.1} s",
            s["id"].as_str().unwrap_or(""),
            s["type"].as_str().unwrap_or(""),
            human_bytes(s["size_bytes"].as_u64().unwrap_or(0)),
            file.display(),
            started.elapsed().as_secs_f64()
        );
    });
    Ok(ExitCode::SUCCESS)
}

fn partial_path(p: &Path) -> std::path::PathBuf {
    let mut name = p.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(".kiln-partial");
    p.with_file_name(name)
}
