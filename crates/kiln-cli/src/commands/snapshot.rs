use std::process::ExitCode;

use clap::Subcommand;
use hyper::Method;
use serde_json::{json, Value};

use crate::client::encode;
use crate::output::{confirm, fields, human_bytes, print_json_or, table_of};
use crate::Cli;

#[derive(Subcommand)]
pub enum SnapshotCmd {
    /// Checkpoint a running or paused sandbox: memory, vCPUs, devices and disk.
    Create {
        sandbox: String,
        /// Snapshot id (default: snap-<sandbox>-<unix time>).
        #[arg(long, visible_alias = "snapshot-id")]
        name: Option<String>,
        /// full (self-contained), diff (only what changed since its parent) or disk (filesystem only).
        #[arg(long = "type", visible_alias = "snapshot-type", default_value = "full")]
        kind: String,
        /// Leave the sandbox paused after the capture (continue it with `kiln resume`). The default under
        /// `kiln sandbox snapshot create`, smolvm's spelling.
        #[arg(long)]
        leave_paused: bool,
        /// Continue the sandbox after the capture (the default, except under `kiln sandbox snapshot`).
        #[arg(long, conflicts_with = "leave_paused")]
        resume_source: bool,
        #[arg(long = "label", short = 'l')]
        labels: Vec<String>,
        /// Seconds until the snapshot expires; it is then deleted once nothing depends on it.
        #[arg(long)]
        ttl: Option<u64>,
    },
    /// List snapshots.
    #[command(alias = "ls")]
    List {
        /// Only snapshots of this source sandbox.
        #[arg(long, visible_alias = "vm-id")]
        sandbox: Option<String>,
        #[arg(long = "label")]
        labels: Vec<String>,
    },
    /// Show one snapshot.
    #[command(alias = "inspect")]
    Get { snapshot: String },
    /// Delete snapshots.
    #[command(alias = "rm")]
    Delete {
        #[arg(required = true)]
        snapshots: Vec<String>,
        #[arg(short = 'y', long)]
        yes: bool,
    },
    /// Start a new sandbox from a snapshot, exactly where it was (no boot).
    Resume {
        snapshot: String,
        #[arg(long)]
        name: Option<String>,
        /// Memory in MiB: a memory snapshot's copy may have from its own up to its `max_memory_mib`
        /// (by default twice its own: `kiln serve --memory-headroom`); a `disk` snapshot boots with any.
        #[arg(long)]
        memory: Option<u64>,
        /// vCPUs of the copy; a memory snapshot's may have 1 up to the vCPUs its machine has.
        #[arg(long)]
        cpus: Option<u32>,
        #[arg(long)]
        disk_size: Option<u64>,
        /// Attach a volume (NAME:/PATH or NAME:/PATH:ro); repeatable. Without it the source's volumes are
        /// remounted where free (snapshots hold no volumes).
        #[arg(long = "volume", short = 'v')]
        volumes: Vec<String>,
        /// Cut the new sandbox off from the network (default: as the snapshot's source was).
        #[arg(long)]
        no_egress: bool,
        /// Seconds of life of the new sandbox (renew with `kiln sandbox set-timeout`).
        #[arg(long)]
        timeout: Option<u64>,
        #[command(flatten)]
        life: crate::commands::sandbox::LifetimeArgs,
    },
    /// Give a snapshot a further name, under which every command finds it (ids and names share one
    /// namespace; the name goes when the snapshot is deleted).
    Name { snapshot: String, name: String },
    /// Write a snapshot to one bundle file (compressed, checksummed) to move it to another host.
    Export {
        snapshot: String,
        /// The bundle file to write (written beside it and renamed when complete).
        #[arg(short = 'o', long)]
        output: std::path::PathBuf,
        /// A diff snapshot leaves its base out (the importing host must have the same base).
        #[arg(long)]
        without_base: bool,
    },
    /// Add a snapshot from a bundle file (verified whole before it appears).
    Import {
        file: std::path::PathBuf,
        /// Import under this id (default: the id it was exported under).
        #[arg(long)]
        name: Option<String>,
    },
    /// Upload a snapshot to a remote: only chunks the remote lacks travel; an interrupted push resumes.
    Push {
        snapshot: String,
        remote: String,
        /// Name on the remote (default: the snapshot's id).
        #[arg(long = "as")]
        as_name: Option<String>,
    },
    /// Download REMOTE/SNAPSHOT: only chunks this host lacks travel, each checked on arrival.
    Pull {
        reference: String,
        /// Local id (default: the remote snapshot's name).
        #[arg(long)]
        name: Option<String>,
    },
    /// Roll the snapshot's source sandbox back to it (same id and name); paused unless --resume.
    Restore {
        snapshot: String,
        #[arg(long)]
        resume: bool,
        /// Restore a snapshot that was restored before.
        #[arg(long)]
        force: bool,
    },
}

pub fn snapshot_row(s: &Value) -> Vec<String> {
    vec![
        s["id"].as_str().unwrap_or("").to_string(),
        names_of(s),
        s["sandbox_name"].as_str().unwrap_or("").to_string(),
        s["type"].as_str().unwrap_or("").to_string(),
        s["parent"].as_str().unwrap_or("-").to_string(),
        human_bytes(s["size_bytes"].as_u64().unwrap_or(0)),
        if s["restored"].as_bool() == Some(true) {
            "yes".into()
        } else {
            "no".into()
        },
        s["created_at"].as_str().unwrap_or("").to_string(),
    ]
}

/// A snapshot's further names, comma-separated ("-" when it has none).
fn names_of(s: &Value) -> String {
    let names: Vec<&str> = s["names"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    if names.is_empty() {
        "-".into()
    } else {
        names.join(",")
    }
}

const HEADERS: [&str; 8] = [
    "ID", "NAMES", "SANDBOX", "TYPE", "PARENT", "SIZE", "RESTORED", "CREATED",
];

pub async fn run(cli: &Cli, cmd: &SnapshotCmd) -> anyhow::Result<ExitCode> {
    run_as(cli, cmd, false).await
}

/// `smolvm`: the command was spelled `kiln sandbox snapshot ...` (smolvm's CLI), whose defaults differ:
/// `create` leaves the source paused unless `--resume-source`, and `delete` does not ask and is refused
/// while a sandbox rolled back to the snapshot is running or paused.
pub async fn run_as(cli: &Cli, cmd: &SnapshotCmd, smolvm: bool) -> anyhow::Result<ExitCode> {
    let client = cli.client()?;
    match cmd {
        SnapshotCmd::Export {
            snapshot,
            output,
            without_base,
        } => return crate::commands::bundle::export(cli, snapshot, output, *without_base).await,
        SnapshotCmd::Push {
            snapshot,
            remote,
            as_name,
        } => {
            return crate::commands::remote::push(cli, snapshot, remote, as_name.as_deref()).await;
        }
        SnapshotCmd::Pull { reference, name } => {
            crate::commands::remote::pull(cli, reference, name.as_deref(), false).await?;
        }
        SnapshotCmd::Import { file, name } => {
            return crate::commands::bundle::import(cli, file, name.as_deref()).await
        }
        SnapshotCmd::Create {
            sandbox,
            name,
            kind,
            leave_paused,
            resume_source,
            labels,
            ttl,
        } => {
            let leave_paused = *leave_paused || (smolvm && !*resume_source);
            let mut body = json!({"type": kind, "leave_paused": leave_paused, "labels": crate::commands::sandbox::key_values(labels, "--label")?});
            if let Some(t) = ttl {
                body["ttl"] = json!(t);
            }
            if let Some(n) = name {
                body["name"] = json!(n);
            }
            let s: Value = client
                .json(
                    Method::POST,
                    &format!("/v1/sandboxes/{}/snapshots", encode(sandbox)),
                    Some(body),
                )
                .await?;
            print_json_or(cli, &s, || {
                println!(
                    "created {} snapshot {} of {} ({})",
                    s["type"].as_str().unwrap_or(""),
                    s["id"].as_str().unwrap_or(""),
                    sandbox,
                    human_bytes(s["size_bytes"].as_u64().unwrap_or(0))
                );
            });
        }
        SnapshotCmd::List { sandbox, labels } => {
            let mut q: Vec<String> = labels
                .iter()
                .map(|l| format!("label={}", encode(l)))
                .collect();
            if let Some(sb) = sandbox {
                q.push(format!("sandbox={}", encode(sb)));
            }
            let path = if q.is_empty() {
                "/v1/snapshots".to_string()
            } else {
                format!("/v1/snapshots?{}", q.join("&"))
            };
            let list: Value = client.json(Method::GET, &path, None).await?;
            print_json_or(cli, &list, || {
                table_of(&HEADERS, &list, snapshot_row);
            });
        }
        SnapshotCmd::Get { snapshot } => {
            let s: Value = client
                .json(
                    Method::GET,
                    &format!("/v1/snapshots/{}", encode(snapshot)),
                    None,
                )
                .await?;
            print_json_or(cli, &s, || {
                fields(
                    &s,
                    &[
                        "id",
                        "sandbox_id",
                        "sandbox_name",
                        "type",
                        "parent",
                        "template",
                        "memory_mib",
                        "max_memory_mib",
                        "cpus",
                        "size_bytes",
                        "restored",
                        "restored_at",
                        "created_at",
                        "expires_at",
                        "labels",
                        "warm_spares",
                        "names",
                    ],
                    14,
                )
            });
        }
        SnapshotCmd::Delete { snapshots, yes } => {
            if !confirm(
                &format!("delete snapshot(s) {}?", snapshots.join(", ")),
                *yes || smolvm,
            )? {
                return Ok(ExitCode::from(1));
            }
            let query = if smolvm { "?unless_restored=true" } else { "" };
            for id in snapshots {
                let v: Value = client
                    .json(
                        Method::DELETE,
                        &format!("/v1/snapshots/{}{query}", encode(id)),
                        None,
                    )
                    .await?;
                print_json_or(cli, &v, || {
                    let kept: Vec<&str> = v["files_kept_for"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(Value::as_str)
                        .collect();
                    if kept.is_empty() {
                        println!("deleted snapshot {id}");
                    } else {
                        println!("deleted snapshot {id}; its files stay until these sandboxes are gone: {}", kept.join(", "));
                    }
                });
            }
        }
        SnapshotCmd::Resume {
            snapshot,
            name,
            memory,
            cpus,
            disk_size,
            volumes,
            no_egress,
            timeout,
            life,
        } => {
            // REMOTE/SNAP: pulled first unless this host has it (a local snapshot of that id).
            let snapshot = &match crate::commands::remote::split_ref(snapshot) {
                Ok((_, snap)) if snapshot.contains('/') => {
                    let here = client
                        .json::<Value>(
                            Method::GET,
                            &format!("/v1/snapshots/{}", encode(snap)),
                            None,
                        )
                        .await;
                    match here {
                        Ok(_) => {}
                        Err(e)
                            if e.downcast_ref::<crate::client::ApiError>()
                                .is_some_and(|a| a.code == "snapshot_not_found") =>
                        {
                            crate::commands::remote::pull(cli, snapshot, None, true).await?;
                        }
                        Err(e) => return Err(e),
                    }
                    snap.to_string()
                }
                _ => snapshot.clone(),
            };
            let mut body = json!({});
            life.apply(*timeout, &mut body);
            if !volumes.is_empty() {
                body["volumes"] = crate::commands::volume::volume_flags(volumes)?;
            }
            if *no_egress {
                body["egress"] = json!(false);
            }
            if let Some(n) = name {
                body["name"] = json!(n);
            }
            if let Some(m) = memory {
                body["memory_mib"] = json!(m);
            }
            if let Some(c) = cpus {
                body["cpus"] = json!(c);
            }
            if let Some(d) = disk_size {
                body["disk_size_gib"] = json!(d);
            }
            let sb: Value = client
                .json(
                    Method::POST,
                    &format!("/v1/snapshots/{}/resume", encode(snapshot)),
                    Some(body),
                )
                .await?;
            print_json_or(cli, &sb, || {
                println!(
                    "resumed snapshot {snapshot} as sandbox {} ({})",
                    sb["name"].as_str().unwrap_or(""),
                    sb["id"].as_str().unwrap_or("")
                );
            });
        }
        SnapshotCmd::Name { snapshot, name } => {
            let s: Value = client
                .json(
                    Method::POST,
                    &format!("/v1/snapshots/{}/names", encode(snapshot)),
                    Some(json!({ "name": name })),
                )
                .await?;
            print_json_or(cli, &s, || {
                println!(
                    "snapshot {} is also named {name}",
                    s["id"].as_str().unwrap_or("")
                );
            });
        }
        SnapshotCmd::Restore {
            snapshot,
            resume,
            force,
        } => {
            let body = json!({"resume": resume, "force": force});
            let sb: Value = client
                .json(
                    Method::POST,
                    &format!("/v1/snapshots/{}/restore", encode(snapshot)),
                    Some(body),
                )
                .await?;
            print_json_or(cli, &sb, || {
                println!(
                    "restored {} to snapshot {snapshot}; it is {}",
                    sb["name"].as_str().unwrap_or(""),
                    sb["state"].as_str().unwrap_or("")
                );
            });
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `kiln stop|start|pause|resume SANDBOX`.
pub async fn lifecycle(cli: &Cli, action: &str, sandboxes: &[String]) -> anyhow::Result<ExitCode> {
    let client = cli.client()?;
    for sb in sandboxes {
        let v: Value = client
            .json(
                Method::POST,
                &format!("/v1/sandboxes/{}/{action}", encode(sb)),
                None,
            )
            .await?;
        print_json_or(cli, &v, || {
            println!(
                "{} is {}",
                v["name"].as_str().unwrap_or(sb),
                v["state"].as_str().unwrap_or("?")
            )
        });
    }
    Ok(ExitCode::SUCCESS)
}

/// `kiln fork SANDBOX [--count N] [--name PREFIX]`.
pub async fn fork(
    cli: &Cli,
    sandbox: &str,
    count: u64,
    name: Option<&str>,
    lifetime: Value,
) -> anyhow::Result<ExitCode> {
    let mut body = json!({ "count": count });
    for (k, v) in lifetime.as_object().into_iter().flatten() {
        body[k] = v.clone();
    }
    if let Some(n) = name {
        body["name"] = json!(n);
    }
    let v: Value = cli
        .client()?
        .json(
            Method::POST,
            &format!("/v1/sandboxes/{}/fork", encode(sandbox)),
            Some(body),
        )
        .await?;
    print_json_or(cli, &v, || {
        table_of(
            &crate::commands::sandbox::SUMMARY_HEADERS,
            &v["sandboxes"],
            crate::commands::sandbox::summary_row,
        );
    });
    Ok(ExitCode::SUCCESS)
}
