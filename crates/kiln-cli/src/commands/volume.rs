//! `kiln volume`: durable disks that sandboxes mount (`kiln sandbox create --volume NAME:/path`).

use std::process::ExitCode;

use clap::Subcommand;
use hyper::Method;
use serde_json::{json, Value};

use crate::client::encode;
use crate::commands::sandbox::key_values;
use crate::output::{confirm, human_bytes, print_json_or, table_of};
use crate::Cli;

#[derive(Subcommand)]
pub enum VolumeCmd {
    /// Create a volume (an empty ext4 filesystem, sparse on the host).
    Create {
        name: String,
        /// Size, e.g. 512M, 10G (default 1G).
        #[arg(long, short = 's', default_value = "1G")]
        size: String,
        /// Label (KEY=VALUE); repeatable.
        #[arg(long = "label", short = 'l')]
        labels: Vec<String>,
    },
    /// List volumes and where they are attached.
    #[command(alias = "ls")]
    List,
    /// Delete volumes and their data (refused while attached).
    #[command(alias = "rm")]
    Delete {
        #[arg(required = true)]
        volumes: Vec<String>,
        /// Do not ask for confirmation.
        #[arg(short = 'y', long)]
        yes: bool,
    },
}

/// `512M`, `10G`, `1T` or a number of MiB.
pub fn parse_size_mib(s: &str) -> anyhow::Result<u64> {
    let t = s.trim();
    let (num, mult) = match t.char_indices().last() {
        Some((i, 'M' | 'm')) => (&t[..i], 1),
        Some((i, 'G' | 'g')) => (&t[..i], 1024),
        Some((i, 'T' | 't')) => (&t[..i], 1024 * 1024),
        _ => (t, 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| anyhow::anyhow!("invalid size '{s}': use e.g. 512M, 10G or 1T"))
}

/// `WHO:/path` or `WHO:/path:ro` for an attachment (`path`, `read_only`) of `who`.
pub fn mount_label(who: &Value, m: &Value) -> String {
    format!(
        "{}:{}{}",
        who.as_str().unwrap_or(""),
        m["path"].as_str().unwrap_or(""),
        if m["read_only"].as_bool() == Some(true) {
            ":ro"
        } else {
            ""
        }
    )
}

fn attachments(v: &Value) -> String {
    let list: Vec<String> = v["attachments"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|a| mount_label(&a["sandbox_name"], a))
                .collect()
        })
        .unwrap_or_default();
    if list.is_empty() {
        "-".into()
    } else {
        list.join(", ")
    }
}

pub async fn run(cli: &Cli, cmd: &VolumeCmd) -> anyhow::Result<ExitCode> {
    let client = cli.client()?;
    match cmd {
        VolumeCmd::Create { name, size, labels } => {
            let body = json!({
                "name": name,
                "size_mib": parse_size_mib(size)?,
                "labels": key_values(labels, "--label")?,
            });
            let v: Value = client.json(Method::POST, "/v1/volumes", Some(body)).await?;
            print_json_or(cli, &v, || {
                println!(
                    "created volume {} ({})",
                    v["name"].as_str().unwrap_or(""),
                    human_bytes(v["size_bytes"].as_u64().unwrap_or(0))
                );
            });
        }
        VolumeCmd::List => {
            let list: Value = client.json(Method::GET, "/v1/volumes", None).await?;
            print_json_or(cli, &list, || {
                table_of(
                    &["NAME", "SIZE", "USED ON HOST", "ATTACHED TO", "CREATED"],
                    &list,
                    |v| {
                        vec![
                            v["name"].as_str().unwrap_or("").to_string(),
                            human_bytes(v["size_bytes"].as_u64().unwrap_or(0)),
                            human_bytes(v["allocated_bytes"].as_u64().unwrap_or(0)),
                            attachments(v),
                            v["created_at"].as_str().unwrap_or("").to_string(),
                        ]
                    },
                );
            });
        }
        VolumeCmd::Delete { volumes, yes } => {
            let question = format!(
                "delete {} volume(s) and all their data: {}?",
                volumes.len(),
                volumes.join(", ")
            );
            if !confirm(&question, *yes)? {
                return Ok(ExitCode::from(1));
            }
            for v in volumes {
                client
                    .call(
                        Method::DELETE,
                        &format!("/v1/volumes/{}", encode(v)),
                        None,
                        crate::client::empty(),
                    )
                    .await?;
                if !cli.json {
                    println!("deleted volume {v}");
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `--volume NAME:/path[:ro]` flags as the API's `volumes` list.
pub fn volume_flags(flags: &[String]) -> anyhow::Result<Value> {
    let mut out = Vec::new();
    for f in flags {
        let m: kiln_core::VolumeMount = f
            .parse()
            .map_err(|e: kiln_core::Error| anyhow::anyhow!(e.message))?;
        out.push(serde_json::to_value(m)?);
    }
    Ok(Value::Array(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_units() {
        assert_eq!(parse_size_mib("512M").unwrap(), 512);
        assert_eq!(parse_size_mib("10G").unwrap(), 10240);
        assert_eq!(parse_size_mib("2048").unwrap(), 2048);
        assert!(parse_size_mib("lots").is_err());
        assert!(parse_size_mib("99999999999999999T").is_err());
    }
}
