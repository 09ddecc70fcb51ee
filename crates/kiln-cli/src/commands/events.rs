//! `kiln events`: prints the daemon's event stream (`GET /v1/events`) as it happens.

use std::io::Write;
use std::process::ExitCode;

use clap::Args;
use http_body_util::BodyExt;
use hyper::Method;
use serde_json::Value;

use crate::client::{empty, encode};
use crate::Cli;

#[derive(Args)]
pub struct EventsArgs {
    /// Only these kinds (comma-separated or repeated); a prefix such as `sandbox.` takes all of its kinds.
    #[arg(long)]
    kind: Vec<String>,
    /// Only events about this sandbox (id or name).
    #[arg(long)]
    sandbox: Option<String>,
    /// First replay the events after this sequence number (the daemon keeps the newest 4096).
    #[arg(long)]
    since: Option<u64>,
}

pub async fn run(cli: &Cli, args: &EventsArgs) -> anyhow::Result<ExitCode> {
    let mut query = Vec::new();
    if !args.kind.is_empty() {
        query.push(format!("kind={}", encode(&args.kind.join(","))));
    }
    if let Some(s) = &args.sandbox {
        query.push(format!("sandbox={}", encode(s)));
    }
    if let Some(s) = args.since {
        query.push(format!("since={s}"));
    }
    let path = if query.is_empty() {
        "/v1/events".to_string()
    } else {
        format!("/v1/events?{}", query.join("&"))
    };
    let resp = cli
        .client()?
        .call(Method::GET, &path, None, empty())
        .await?;
    let mut body = resp.into_body();
    let mut pending: Vec<u8> = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame?;
        let Some(data) = frame.data_ref() else {
            continue;
        };
        pending.extend_from_slice(data);
        // One event per blank-line-terminated block; only its `data:` lines matter here.
        while let Some(end) = find_block_end(&pending) {
            let block: Vec<u8> = pending.drain(..end).collect();
            let text = String::from_utf8_lossy(&block);
            let data: String = text
                .lines()
                .filter_map(|l| l.strip_prefix("data:"))
                .map(|l| l.strip_prefix(' ').unwrap_or(l))
                .collect::<Vec<_>>()
                .join("\n");
            if data.is_empty() {
                continue; // a heartbeat comment
            }
            print_event(cli, &data);
        }
    }
    // The daemon closed the stream (it is shutting down).
    Ok(ExitCode::SUCCESS)
}

/// The end (exclusive, blank line included) of the first complete event block.
fn find_block_end(buf: &[u8]) -> Option<usize> {
    buf.windows(2).position(|w| w == b"\n\n").map(|p| p + 2)
}

fn print_event(cli: &Cli, data: &str) {
    let mut out = std::io::stdout().lock();
    if cli.json {
        let _ = writeln!(out, "{data}");
    } else {
        let v: Value = serde_json::from_str(data).unwrap_or(Value::Null);
        let s = |k: &str| v[k].as_str().unwrap_or("-").to_string();
        let mut line = format!(
            "{:>6}  {}  {:<18}  {}",
            v["seq"].as_u64().unwrap_or(0),
            s("time"),
            s("kind"),
            s("id")
        );
        if let Some(state) = v["state"].as_str() {
            line.push_str(&format!("  {state}"));
        }
        if let Some(sb) = v["sandbox"].as_str().filter(|sb| *sb != s("id")) {
            line.push_str(&format!("  sandbox={sb}"));
        }
        if v["kind"] == "events.gap" {
            line.push_str(&format!(
                "  {}",
                v["object"]["reason"]
                    .as_str()
                    .unwrap_or("events were missed")
            ));
        }
        let _ = writeln!(out, "{line}");
    }
    let _ = out.flush();
}
