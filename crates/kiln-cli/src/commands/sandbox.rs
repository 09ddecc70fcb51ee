use std::process::ExitCode;

use clap::{Args, Subcommand};
use hyper::Method;
use serde_json::{json, Value};

use crate::client::encode;
use crate::output::{confirm, fields, human_bytes, print_json_or, table_of};
use crate::Cli;

#[derive(Subcommand)]
pub enum SandboxCmd {
    /// Create a sandbox and wait until it answers.
    Create(CreateArgs),
    /// List sandboxes.
    #[command(alias = "ls")]
    List {
        /// Only sandboxes with this label (KEY=VALUE); repeatable.
        #[arg(long = "label")]
        labels: Vec<String>,
    },
    /// Show one sandbox (with its lifetime: deadlines and policy).
    #[command(alias = "get")]
    Inspect { sandbox: String },
    /// Set or renew a sandbox's lifetime: SECONDS of life from now (0 removes the limit).
    SetTimeout {
        sandbox: String,
        /// Seconds of life from now; 0 removes the limit.
        seconds: Option<u64>,
        #[command(flatten)]
        life: LifetimeArgs,
    },
    /// Delete sandboxes and free their resources.
    #[command(alias = "rm")]
    Delete {
        #[arg(required = true)]
        sandboxes: Vec<String>,
        /// Do not ask for confirmation.
        #[arg(short = 'y', long)]
        yes: bool,
    },
    /// Snapshots in smolvm's spelling (`create SANDBOX --snapshot-id ID --snapshot-type T --resume-source`,
    /// `restore`, `list --vm-id`, `delete`): as `kiln snapshot`, but `create` leaves the sandbox paused
    /// unless --resume-source and `delete` does not ask.
    #[command(subcommand)]
    Snapshot(crate::commands::snapshot::SnapshotCmd),
    /// Set (or --clear) a sandbox's continuous checkpoints: a memory snapshot every DURATION, the newest
    /// --keep kept.
    CheckpointPolicy {
        sandbox: String,
        /// Interval: 90, 90s, 5m, 2h.
        #[arg(long, required_unless_present = "clear")]
        every: Option<String>,
        /// Checkpoints kept (default 10).
        #[arg(long)]
        keep: Option<u32>,
        /// Remove the policy (its checkpoints stay).
        #[arg(long, conflicts_with_all = ["every", "keep"])]
        clear: bool,
    },
    /// List a sandbox's checkpoints, oldest first, with the pause each cost.
    Checkpoints { sandbox: String },
    /// Roll a sandbox back to a checkpoint: --to SNAPSHOT, or a time (RFC 3339, or 90s/5m/2h ago: the
    /// newest checkpoint at or before it).
    Rewind {
        sandbox: String,
        #[arg(long)]
        to: String,
    },
    /// Print a sandbox's serial console log.
    Logs {
        sandbox: String,
        /// Only the last N lines.
        #[arg(long)]
        tail: Option<usize>,
    },
}

#[derive(Args)]
pub struct CreateArgs {
    #[arg(long, short = 't')]
    template: Option<String>,
    #[arg(long, short = 'n')]
    name: Option<String>,
    /// Guest RAM in MiB.
    #[arg(long)]
    memory: Option<u64>,
    /// Room in MiB for copies resumed from this sandbox's memory snapshots to have more memory
    /// (`snapshot resume --memory`, up to this); default: --memory × the daemon's --memory-headroom
    /// (2); equal to --memory for none.
    #[arg(long)]
    max_memory: Option<u64>,
    #[arg(long)]
    cpus: Option<u32>,
    /// Disk size in GiB.
    #[arg(long)]
    disk_size: Option<u64>,
    /// Environment for every command (KEY=VALUE); repeatable.
    #[arg(long = "env", short = 'e')]
    env: Vec<String>,
    /// Label (KEY=VALUE); repeatable.
    #[arg(long = "label", short = 'l')]
    labels: Vec<String>,
    /// Make the sandbox from this snapshot (same as `kiln snapshot resume`).
    #[arg(long)]
    snapshot: Option<String>,
    /// Publish a guest port on 127.0.0.1: GUEST (a free host port is picked) or HOST:GUEST; repeatable.
    #[arg(long = "port", short = 'p')]
    ports: Vec<String>,
    /// Attach a volume (NAME:/PATH or NAME:/PATH:ro); repeatable.
    #[arg(long = "volume", short = 'v')]
    volumes: Vec<String>,
    /// Cut the guest off from the network (no outgoing connections); forwarded ports still work.
    #[arg(long)]
    no_egress: bool,
    /// Join this private network (bridged networking: `kiln serve --network bridged`); its members reach
    /// each other, nothing else does.
    #[arg(long)]
    network: Option<String>,
    /// Boot cold instead of resuming the template's snapshot (docs/snapshots.md, "Create is a resume").
    #[arg(long)]
    boot: bool,
    /// Seconds of life (renew with `kiln sandbox set-timeout`).
    #[arg(long)]
    timeout: Option<u64>,
    #[command(flatten)]
    life: LifetimeArgs,
    /// Take a checkpoint every DURATION (90, 90s, 5m, 2h): `kiln sandbox checkpoints`, `rewind`.
    #[arg(long)]
    checkpoint_every: Option<String>,
    /// Checkpoints kept (default 10).
    #[arg(long, requires = "checkpoint_every")]
    keep: Option<u32>,
}

/// Lifetime flags shared by create, resume and set-timeout.
#[derive(Args)]
pub struct LifetimeArgs {
    /// Seconds without use (API requests, background process output) before --on-timeout applies.
    #[arg(long)]
    idle_timeout: Option<u64>,
    /// What happens when the timeout or idle timeout runs out: hibernate (default) or delete.
    #[arg(long, value_parser = ["hibernate", "delete"])]
    on_timeout: Option<String>,
    /// Do not start the sandbox when a client uses it while hibernated.
    #[arg(long)]
    no_auto_resume: bool,
    /// Start the sandbox when a client uses it while hibernated (the default with a lifetime).
    #[arg(long, conflicts_with = "no_auto_resume")]
    auto_resume: bool,
}

impl LifetimeArgs {
    /// Adds the lifetime fields given to a request body.
    pub fn apply(&self, timeout: Option<u64>, body: &mut Value) {
        if let Some(t) = timeout {
            body["timeout"] = json!(t);
        }
        if let Some(t) = self.idle_timeout {
            body["idle_timeout"] = json!(t);
        }
        if let Some(o) = &self.on_timeout {
            body["on_timeout"] = json!(o);
        }
        if self.no_auto_resume {
            body["auto_resume"] = json!(false);
        } else if self.auto_resume {
            body["auto_resume"] = json!(true);
        }
    }
}

/// Prints a sandbox's lifetime (nothing when it has none).
pub fn print_lifetime(s: &Value) {
    let l = &s["lifetime"];
    if !l.is_object() {
        return;
    }
    let or_dash = |v: &Value| v.as_str().map_or("-".to_string(), str::to_string);
    let secs = |v: &Value| v.as_u64().map_or("none".to_string(), |n| format!("{n} s"));
    println!(
        "{:<12} timeout {} (expires {}), idle timeout {} (idle expiry {}), on timeout: {}, auto-resume: {}",
        "lifetime:",
        secs(&l["timeout"]),
        or_dash(&l["expires_at"]),
        secs(&l["idle_timeout"]),
        or_dash(&l["idle_expires_at"]),
        l["on_timeout"].as_str().unwrap_or("hibernate"),
        l["auto_resume"].as_bool().unwrap_or(false)
    );
}

pub fn key_values(items: &[String], what: &str) -> anyhow::Result<serde_json::Map<String, Value>> {
    let mut m = serde_json::Map::new();
    for item in items {
        let (k, v) = item
            .split_once('=')
            .filter(|(k, _)| !k.is_empty())
            .ok_or_else(|| anyhow::anyhow!("{what} '{item}' must look like KEY=VALUE"))?;
        m.insert(k.to_string(), Value::String(v.to_string()));
    }
    Ok(m)
}

pub fn summary_row(s: &Value) -> Vec<String> {
    vec![
        s["id"].as_str().unwrap_or("").to_string(),
        s["name"].as_str().unwrap_or("").to_string(),
        s["state"].as_str().unwrap_or("").to_string(),
        s["template"].as_str().unwrap_or("").to_string(),
        format!("{} MiB", s["memory_mib"]),
        s["cpus"].to_string(),
        s["created_at"].as_str().unwrap_or("").to_string(),
    ]
}

pub const SUMMARY_HEADERS: [&str; 7] = [
    "ID", "NAME", "STATE", "TEMPLATE", "MEMORY", "CPUS", "CREATED",
];

pub async fn run(cli: &Cli, cmd: &SandboxCmd) -> anyhow::Result<ExitCode> {
    let client = cli.client()?;
    match cmd {
        SandboxCmd::Create(a) => {
            let mut body = json!({ "labels": key_values(&a.labels, "--label")? });
            if !a.env.is_empty() {
                body["env"] = Value::Object(key_values(&a.env, "--env")?);
            }
            if let Some(s) = &a.snapshot {
                body["snapshot"] = json!(s);
            }
            if let Some(t) = &a.template {
                body["template"] = json!(t);
            }
            if let Some(n) = &a.name {
                body["name"] = json!(n);
            }
            if let Some(m) = a.memory {
                body["memory_mib"] = json!(m);
            }
            if let Some(m) = a.max_memory {
                body["max_memory_mib"] = json!(m);
            }
            if let Some(c) = a.cpus {
                body["cpus"] = json!(c);
            }
            if let Some(d) = a.disk_size {
                body["disk_size_gib"] = json!(d);
            }
            if a.boot {
                body["boot"] = json!(true);
            }
            if a.no_egress {
                body["egress"] = json!(false);
            }
            if let Some(n) = &a.network {
                body["network"] = json!(n);
            }
            a.life.apply(a.timeout, &mut body);
            crate::commands::checkpoint::apply_create(
                a.checkpoint_every.as_deref(),
                a.keep,
                &mut body,
            )?;
            let ports = a
                .ports
                .iter()
                .map(|p| crate::commands::port::port_flag(p))
                .collect::<anyhow::Result<Vec<_>>>()?;
            if !ports.is_empty() {
                body["ports"] = Value::Array(ports);
            }
            if !a.volumes.is_empty() {
                body["volumes"] = crate::commands::volume::volume_flags(&a.volumes)?;
            }
            let sb: Value = client
                .json(Method::POST, "/v1/sandboxes", Some(body))
                .await?;
            print_json_or(cli, &sb, || {
                println!(
                    "created sandbox {} ({})",
                    sb["name"].as_str().unwrap_or(""),
                    sb["id"].as_str().unwrap_or("")
                );
                if let Some(mode) = sb["boot"]["mode"].as_str() {
                    println!("{mode}: {}", sb["boot"]["reason"].as_str().unwrap_or(""));
                }
            });
        }
        SandboxCmd::List { labels } => {
            let mut path = "/v1/sandboxes".to_string();
            let q: Vec<String> = labels
                .iter()
                .map(|l| format!("label={}", encode(l)))
                .collect();
            if !q.is_empty() {
                path = format!("{path}?{}", q.join("&"));
            }
            let list: Value = client.json(Method::GET, &path, None).await?;
            print_json_or(cli, &list, || {
                table_of(&SUMMARY_HEADERS, &list, summary_row);
            });
        }
        SandboxCmd::Inspect { sandbox } => {
            let s: Value = client
                .json(
                    Method::GET,
                    &format!("/v1/sandboxes/{}", encode(sandbox)),
                    None,
                )
                .await?;
            print_json_or(cli, &s, || {
                fields(
                    &s,
                    &[
                        "id",
                        "name",
                        "state",
                        "template",
                        "hostname",
                        "mac",
                        "accel",
                        "pid",
                        "egress",
                        "network",
                        "address",
                        "address6",
                        "qemu_uid",
                        "confined",
                        "created_at",
                        "updated_at",
                    ],
                    12,
                );
                println!(
                    "{:<12} {} MiB{}, {} vCPU, disk {}",
                    "resources:",
                    s["memory_mib"],
                    s["max_memory_mib"]
                        .as_u64()
                        .map(|m| format!(" (copies may grow to {m} MiB)"))
                        .unwrap_or_default(),
                    s["cpus"],
                    human_bytes(s["disk_size_bytes"].as_u64().unwrap_or(0))
                );
                for (k, label) in [("labels", "labels:"), ("env", "env:")] {
                    if let Some(m) = s[k].as_object().filter(|m| !m.is_empty()) {
                        let parts: Vec<String> = m
                            .iter()
                            .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("")))
                            .collect();
                        println!("{label:<12} {}", parts.join(", "));
                    }
                }
                if let Some(v) = s["volumes"].as_array().filter(|v| !v.is_empty()) {
                    let parts: Vec<String> = v
                        .iter()
                        .map(|m| crate::commands::volume::mount_label(&m["volume"], m))
                        .collect();
                    println!("{:<12} {}", "volumes:", parts.join(", "));
                }
                print_lifetime(&s);
                crate::commands::checkpoint::print_policy(&s);
                if let Some(e) = s["error"].as_str() {
                    println!("error:\n{e}");
                }
            });
        }
        SandboxCmd::SetTimeout {
            sandbox,
            seconds,
            life,
        } => {
            let mut body = json!({});
            life.apply(*seconds, &mut body);
            let s: Value = client
                .json(
                    Method::POST,
                    &format!("/v1/sandboxes/{}/timeout", encode(sandbox)),
                    Some(body),
                )
                .await?;
            print_json_or(cli, &s, || print_lifetime(&s));
        }
        SandboxCmd::CheckpointPolicy {
            sandbox,
            every,
            keep,
            clear,
        } => {
            crate::commands::checkpoint::set_policy(cli, sandbox, every.as_deref(), *keep, *clear)
                .await?;
        }
        SandboxCmd::Checkpoints { sandbox } => {
            crate::commands::checkpoint::list(cli, sandbox).await?;
        }
        SandboxCmd::Rewind { sandbox, to } => {
            crate::commands::checkpoint::rewind(cli, sandbox, to).await?;
        }
        SandboxCmd::Delete { sandboxes, yes } => {
            if !confirm(
                &format!(
                    "delete {} sandbox(es): {}?",
                    sandboxes.len(),
                    sandboxes.join(", ")
                ),
                *yes,
            )? {
                return Ok(ExitCode::from(1));
            }
            for sb in sandboxes {
                client
                    .call(
                        Method::DELETE,
                        &format!("/v1/sandboxes/{}", encode(sb)),
                        None,
                        crate::client::empty(),
                    )
                    .await?;
                if !cli.json {
                    println!("deleted {sb}");
                }
            }
        }
        SandboxCmd::Snapshot(cmd) => {
            return crate::commands::snapshot::run_as(cli, cmd, true).await
        }
        SandboxCmd::Logs { sandbox, tail } => {
            let query = tail.map(|n| format!("?lines={n}")).unwrap_or_default();
            let resp = client
                .call(
                    Method::GET,
                    &format!("/v1/sandboxes/{}/logs{query}", encode(sandbox)),
                    None,
                    crate::client::empty(),
                )
                .await?;
            let bytes = http_body_util::BodyExt::collect(resp.into_body())
                .await?
                .to_bytes();
            print!("{}", String::from_utf8_lossy(&bytes));
        }
    }
    Ok(ExitCode::SUCCESS)
}
