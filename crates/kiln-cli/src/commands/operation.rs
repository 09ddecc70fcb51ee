//! `kiln operation`: the daemon's record of mutating requests (snapshot, stop, fork, ...), for finding
//! the outcome of one whose client went away.

use std::process::ExitCode;

use clap::Subcommand;
use hyper::Method;
use serde_json::Value;

use crate::client::encode;
use crate::output::{print_json_or, table_of};
use crate::Cli;

#[derive(Subcommand)]
pub enum OperationCmd {
    /// List recent operations, newest first (kept for 24 hours, at most 1000).
    #[command(alias = "ls")]
    List {
        /// Only operations on this sandbox (id or name), snapshot or volume.
        #[arg(long)]
        target: Option<String>,
        /// Only operations in this state: running, succeeded or failed.
        #[arg(long)]
        state: Option<String>,
    },
    /// Show one operation with its result or error.
    Get { id: String },
    /// Wait until an operation finished (or the timeout passed) and show it; exits 1 if it failed.
    Wait {
        id: String,
        /// Seconds to wait at most (up to 3600).
        #[arg(long, default_value_t = 60)]
        timeout: u64,
    },
}

fn error_text(v: &Value) -> String {
    match v["error"].as_object() {
        Some(e) => format!(
            "{}: {}",
            e.get("code").and_then(Value::as_str).unwrap_or(""),
            e.get("message").and_then(Value::as_str).unwrap_or("")
        ),
        None => String::new(),
    }
}

fn show(cli: &Cli, v: &Value) {
    print_json_or(cli, v, || {
        println!("id:       {}", v["id"].as_str().unwrap_or(""));
        println!("kind:     {}", v["kind"].as_str().unwrap_or(""));
        println!("target:   {}", v["target"].as_str().unwrap_or(""));
        println!("state:    {}", v["state"].as_str().unwrap_or(""));
        if let Some(stage) = v["stage"].as_str() {
            println!("stage:    {stage}");
        }
        println!("created:  {}", v["created_at"].as_str().unwrap_or(""));
        println!("updated:  {}", v["updated_at"].as_str().unwrap_or(""));
        if v["error"].is_object() {
            println!("error:    {}", error_text(v));
        }
        if !v["result"].is_null() {
            println!(
                "result:   {}",
                serde_json::to_string_pretty(&v["result"]).unwrap_or_default()
            );
        }
    });
}

pub async fn run(cli: &Cli, cmd: &OperationCmd) -> anyhow::Result<ExitCode> {
    let client = cli.client()?;
    match cmd {
        OperationCmd::List { target, state } => {
            let mut query = Vec::new();
            if let Some(t) = target {
                query.push(format!("target={}", encode(t)));
            }
            if let Some(s) = state {
                query.push(format!("state={}", encode(s)));
            }
            let path = if query.is_empty() {
                "/v1/operations".to_string()
            } else {
                format!("/v1/operations?{}", query.join("&"))
            };
            let list: Value = client.json(Method::GET, &path, None).await?;
            print_json_or(cli, &list, || {
                table_of(
                    &["ID", "KIND", "TARGET", "STATE", "CREATED", "ERROR"],
                    &list,
                    |v| {
                        vec![
                            v["id"].as_str().unwrap_or("").to_string(),
                            v["kind"].as_str().unwrap_or("").to_string(),
                            v["target"].as_str().unwrap_or("").to_string(),
                            match v["stage"].as_str() {
                                Some(stage) => format!("running ({stage})"),
                                None => v["state"].as_str().unwrap_or("").to_string(),
                            },
                            v["created_at"].as_str().unwrap_or("").to_string(),
                            v["error"]["code"].as_str().unwrap_or("").to_string(),
                        ]
                    },
                );
            });
            Ok(ExitCode::SUCCESS)
        }
        OperationCmd::Get { id } => {
            let v: Value = client
                .json(Method::GET, &format!("/v1/operations/{}", encode(id)), None)
                .await?;
            show(cli, &v);
            Ok(ExitCode::SUCCESS)
        }
        OperationCmd::Wait { id, timeout } => {
            let v: Value = client
                .json(
                    Method::GET,
                    &format!("/v1/operations/{}/wait?timeout={timeout}", encode(id)),
                    None,
                )
                .await?;
            show(cli, &v);
            Ok(match v["state"].as_str() {
                Some("succeeded") => ExitCode::SUCCESS,
                Some("running") => {
                    eprintln!("operation {id} is still running after {timeout} s");
                    ExitCode::from(2)
                }
                _ => ExitCode::from(1),
            })
        }
    }
}
