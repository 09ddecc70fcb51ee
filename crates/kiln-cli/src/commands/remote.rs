//! `kiln remote ...` and `kiln snapshot push/pull`: object-storage remotes for snapshots. Push and pull
//! run in the daemon (it holds the credentials, from its environment); the CLI shows their progress from
//! the operation's stage.

use std::process::ExitCode;
use std::time::Duration;

use clap::Subcommand;
use hyper::Method;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::{json, Value};

use crate::client::encode;
use crate::output::{human_bytes, print_json_or, table};
use crate::Cli;

#[derive(Subcommand)]
pub enum RemoteCmd {
    /// Add a remote: s3://BUCKET[/PREFIX] (AWS S3, MinIO, Ceph RGW, R2 with --endpoint) or
    /// file:///DIR. Credentials come from the daemon's environment (AWS_ACCESS_KEY_ID,
    /// AWS_SECRET_ACCESS_KEY) or ~/.aws/credentials, never from here.
    Add {
        name: String,
        /// s3://BUCKET[/PREFIX] or file:///DIR.
        #[arg(value_name = "URL")]
        location: String,
        #[arg(long)]
        region: Option<String>,
        /// S3-compatible endpoint, e.g. https://minio.example:9000.
        #[arg(long)]
        endpoint: Option<String>,
    },
    /// List the configured remotes.
    #[command(alias = "ls")]
    List,
    /// Forget a remote (its objects stay in the storage).
    Rm { name: String },
    /// List the snapshots pushed to a remote.
    Snapshots { name: String },
    /// Delete a pushed snapshot from a remote (`gc` then frees the chunks only it used).
    DeleteSnapshot { name: String, snapshot: String },
    /// Delete chunks no pushed snapshot references and older than the grace period.
    Gc {
        name: String,
        /// Seconds an unreferenced chunk is kept (default one day; below 12 hours is safe only while
        /// no push runs).
        #[arg(long)]
        grace: Option<u64>,
        #[arg(long)]
        dry_run: bool,
    },
}

pub async fn run(cli: &Cli, cmd: &RemoteCmd) -> anyhow::Result<ExitCode> {
    let client = cli.client()?;
    match cmd {
        RemoteCmd::Add {
            name,
            location,
            region,
            endpoint,
        } => {
            let mut body = json!({"name": name, "url": location});
            if let Some(r) = region {
                body["region"] = json!(r);
            }
            if let Some(e) = endpoint {
                body["endpoint"] = json!(e);
            }
            let v: Value = client.json(Method::POST, "/v1/remotes", Some(body)).await?;
            print_json_or(cli, &v, || println!("added remote {name} ({location})"));
        }
        RemoteCmd::List => {
            let v: Value = client.json(Method::GET, "/v1/remotes", None).await?;
            print_json_or(cli, &v, || {
                let rows: Vec<Vec<String>> = v
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|r| {
                        ["name", "url", "region", "endpoint"]
                            .iter()
                            .map(|k| r[*k].as_str().unwrap_or("-").to_string())
                            .collect()
                    })
                    .collect();
                table(&["NAME", "URL", "REGION", "ENDPOINT"], &rows);
            });
        }
        RemoteCmd::Rm { name } => {
            let _: Value = client
                .json(
                    Method::DELETE,
                    &format!("/v1/remotes/{}", encode(name)),
                    None,
                )
                .await?;
            if !cli.json {
                println!("removed remote {name}");
            }
        }
        RemoteCmd::Snapshots { name } => {
            let v: Value = client
                .json(
                    Method::GET,
                    &format!("/v1/remotes/{}/snapshots", encode(name)),
                    None,
                )
                .await?;
            print_json_or(cli, &v, || {
                let rows: Vec<Vec<String>> = v
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|s| {
                        vec![
                            s["name"].as_str().unwrap_or("").to_string(),
                            s["pushed_at"].as_str().unwrap_or("").to_string(),
                        ]
                    })
                    .collect();
                table(&["NAME", "PUSHED"], &rows);
            });
        }
        RemoteCmd::DeleteSnapshot { name, snapshot } => {
            let _: Value = client
                .json(
                    Method::DELETE,
                    &format!(
                        "/v1/remotes/{}/snapshots/{}",
                        encode(name),
                        encode(snapshot)
                    ),
                    None,
                )
                .await?;
            if !cli.json {
                println!("deleted {snapshot} from remote {name}");
            }
        }
        RemoteCmd::Gc {
            name,
            grace,
            dry_run,
        } => {
            let mut body = json!({"dry_run": dry_run});
            if let Some(g) = grace {
                body["grace_seconds"] = json!(g);
            }
            let v: Value = client
                .json(
                    Method::POST,
                    &format!("/v1/remotes/{}/gc", encode(name)),
                    Some(body),
                )
                .await?;
            print_json_or(cli, &v, || {
                println!(
                    "{} {} unreferenced chunks ({}); {} referenced, {} kept (younger than the grace period), {} manifests",
                    if *dry_run { "would delete" } else { "deleted" },
                    v["deleted"],
                    human_bytes(v["deleted_bytes"].as_u64().unwrap_or(0)),
                    v["referenced"],
                    v["kept_young"],
                    v["manifests"]
                )
            });
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `kiln snapshot push SNAP REMOTE`.
pub async fn push(
    cli: &Cli,
    snapshot: &str,
    remote: &str,
    name: Option<&str>,
) -> anyhow::Result<ExitCode> {
    let mut body = json!({"snapshot": snapshot});
    if let Some(n) = name {
        body["name"] = json!(n);
    }
    let path = format!("/v1/remotes/{}/push", encode(remote));
    let v = with_bar(cli, "remote.push", &path, body).await?;
    print_json_or(cli, &v, || {
        let (all, new) = (
            v["data_bytes"].as_u64().unwrap_or(0),
            v["new_data_bytes"].as_u64().unwrap_or(0),
        );
        println!(
            "pushed {snapshot} to {remote}: {} of {} chunks uploaded ({} of {} data, {} sent) in {:.1}s",
            v["chunks_uploaded"],
            v["chunks"],
            human_bytes(new),
            human_bytes(all),
            human_bytes(v["bytes_uploaded"].as_u64().unwrap_or(0)),
            v["seconds"].as_f64().unwrap_or(0.0)
        )
    });
    Ok(ExitCode::SUCCESS)
}

/// Splits `REMOTE/SNAP`.
pub fn split_ref(r: &str) -> anyhow::Result<(&str, &str)> {
    match r.split_once('/') {
        Some((a, b)) if !a.is_empty() && !b.is_empty() && !b.contains('/') => Ok((a, b)),
        _ => anyhow::bail!("'{r}' is not REMOTE/SNAPSHOT"),
    }
}

/// `kiln snapshot pull REMOTE/SNAP`: the pulled snapshot.
pub async fn pull(
    cli: &Cli,
    reference: &str,
    name: Option<&str>,
    quiet: bool,
) -> anyhow::Result<Value> {
    let (remote, snap) = split_ref(reference)?;
    let mut body = json!({"snapshot": snap});
    if let Some(n) = name {
        body["name"] = json!(n);
    }
    let path = format!("/v1/remotes/{}/pull", encode(remote));
    let v = with_bar(cli, "remote.pull", &path, body).await?;
    if !quiet {
        print_json_or(cli, &v, || {
            let p = &v["pull"];
            println!(
                "pulled {reference} as {}: {} chunks, {} downloaded, {} from the cache, {} files copied from this host ({} over the network) in {:.1}s",
                v["snapshot"]["id"].as_str().unwrap_or(""),
                p["chunks"],
                p["chunks_downloaded"],
                p["chunks_cached"],
                p["files_local"],
                human_bytes(p["bytes_downloaded"].as_u64().unwrap_or(0)),
                p["seconds"].as_f64().unwrap_or(0.0)
            )
        });
    }
    Ok(v)
}

/// Posts `body` to `path` and, meanwhile, shows the running operation's bytes (its stage reads
/// "pushing DONE/TOTAL bytes (SENT transferred)").
async fn with_bar(cli: &Cli, kind: &str, path: &str, body: Value) -> anyhow::Result<Value> {
    let client = cli.client()?;
    let call = client.json::<Value>(Method::POST, path, Some(body));
    tokio::pin!(call);
    let pb = ProgressBar::new(0).with_style(
        ProgressStyle::with_template(
            "{msg} {bar:30} {bytes}/{total_bytes} {binary_bytes_per_sec} {elapsed}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    pb.set_draw_target(ProgressDrawTarget::stderr());
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    let out = loop {
        tokio::select! {
            r = &mut call => break r,
            _ = tick.tick() => {
                let ops: Value = client
                    .json(Method::GET, "/v1/operations?state=running", None)
                    .await
                    .unwrap_or_default();
                let stage = ops
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find(|o| o["kind"] == kind)
                    .and_then(|o| o["stage"].as_str().map(str::to_string));
                if let Some((what, done, total)) = stage.as_deref().and_then(parse_stage) {
                    pb.set_message(what.to_string());
                    pb.set_length(total);
                    pb.set_position(done);
                }
            }
        }
    };
    pb.finish_and_clear();
    out
}

fn parse_stage(s: &str) -> Option<(&str, u64, u64)> {
    let (what, rest) = s.split_once(' ')?;
    let (nums, _) = rest.split_once(" bytes")?;
    let (done, total) = nums.split_once('/')?;
    Some((what, done.parse().ok()?, total.parse().ok()?))
}
