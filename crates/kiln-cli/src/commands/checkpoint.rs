//! `kiln sandbox checkpoint-policy | checkpoints | rewind` (issue 16: continuous checkpoints).

use hyper::Method;
use serde_json::{json, Value};

use crate::client::encode;
use crate::output::{human_bytes, print_json_or, table_of};
use crate::Cli;

/// Seconds in `90`, `90s`, `5m`, `2h`.
pub fn duration_secs(text: &str) -> anyhow::Result<u64> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (n, unit) = t.split_at(split);
    let n: u64 = n
        .parse()
        .map_err(|_| anyhow::anyhow!("'{text}' is not a duration (90, 90s, 5m, 2h)"))?;
    let mult = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        _ => anyhow::bail!("'{text}' is not a duration (90, 90s, 5m, 2h)"),
    };
    Ok(n * mult)
}

/// Adds `--checkpoint-every`/`--keep` of create to its body.
pub fn apply_create(
    every: Option<&str>,
    keep: Option<u32>,
    body: &mut Value,
) -> anyhow::Result<()> {
    if let Some(e) = every {
        body["checkpoint_every"] = json!(duration_secs(e)?);
    }
    if let Some(k) = keep {
        body["checkpoint_keep"] = json!(k);
    }
    Ok(())
}

pub fn print_policy(s: &Value) {
    let p = &s["checkpoint_policy"];
    if let (Some(every), Some(keep)) = (p["every"].as_u64(), p["keep"].as_u64()) {
        println!("{:<12} every {every} s, keep {keep}", "checkpoints:");
    }
}

pub async fn set_policy(
    cli: &Cli,
    sandbox: &str,
    every: Option<&str>,
    keep: Option<u32>,
    clear: bool,
) -> anyhow::Result<()> {
    let client = cli.client()?;
    let path = format!("/v1/sandboxes/{}/checkpoint-policy", encode(sandbox));
    let s: Value = if clear {
        client.json(Method::DELETE, &path, None).await?
    } else {
        let every = every.ok_or_else(|| anyhow::anyhow!("give --every DURATION (or --clear)"))?;
        let mut body = json!({ "every": duration_secs(every)? });
        if let Some(k) = keep {
            body["keep"] = json!(k);
        }
        client.json(Method::PUT, &path, Some(body)).await?
    };
    print_json_or(cli, &s, || {
        if s["checkpoint_policy"].is_object() {
            print_policy(&s)
        } else {
            println!("no checkpoint policy");
        }
    });
    Ok(())
}

pub async fn list(cli: &Cli, sandbox: &str) -> anyhow::Result<()> {
    let client = cli.client()?;
    let v: Value = client
        .json(
            Method::GET,
            &format!("/v1/sandboxes/{}/checkpoints", encode(sandbox)),
            None,
        )
        .await?;
    print_json_or(cli, &v, || {
        table_of(&["ID", "CREATED", "PAUSE", "SIZE"], &v, |s| {
            vec![
                s["id"].as_str().unwrap_or("").to_string(),
                s["created_at"].as_str().unwrap_or("").to_string(),
                s["pause_ms"]
                    .as_u64()
                    .map_or("-".into(), |p| format!("{p} ms")),
                human_bytes(s["size_bytes"].as_u64().unwrap_or(0)),
            ]
        })
    });
    Ok(())
}

pub async fn rewind(cli: &Cli, sandbox: &str, to: &str) -> anyhow::Result<()> {
    let client = cli.client()?;
    let s: Value = client
        .json(
            Method::POST,
            &format!("/v1/sandboxes/{}/rewind", encode(sandbox)),
            Some(json!({ "to": to })),
        )
        .await?;
    print_json_or(cli, &s, || {
        println!(
            "{} rewound to {}",
            s["name"].as_str().unwrap_or(sandbox),
            s["restored_from"].as_str().unwrap_or(to)
        )
    });
    Ok(())
}
