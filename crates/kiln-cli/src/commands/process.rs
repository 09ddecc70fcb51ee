//! `kiln process start|list|logs|write|kill|wait`: background processes that outlive the client
//! (and are carried by snapshots, forks and stop/start).

use std::io::Read;
use std::process::ExitCode;
use std::time::Duration;

use base64::Engine as _;
use clap::Subcommand;
use hyper::Method;
use serde_json::{json, Value};

use crate::client::{empty, encode, read_ndjson};
use crate::output::{print_json_or, table};
use crate::Cli;

#[derive(Subcommand)]
pub enum ProcessCmd {
    /// Start a command in the background and print its pid: `kiln process start SANDBOX -- CMD...`.
    Start {
        sandbox: String,
        /// Extra environment (KEY=VALUE); repeatable.
        #[arg(long = "env", short = 'e')]
        env: Vec<String>,
        /// Working directory in the guest.
        #[arg(long, short = 'w')]
        cwd: Option<String>,
        /// Run as this guest user (name or numeric uid).
        #[arg(long, short = 'u')]
        user: Option<String>,
        /// Keep its standard input open for `kiln process write`.
        #[arg(long)]
        stdin: bool,
        /// Kill it after this many seconds.
        #[arg(long)]
        timeout: Option<f64>,
        #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
        command: Vec<String>,
    },
    /// List a sandbox's background processes (running, and recently finished).
    #[command(alias = "ls")]
    List { sandbox: String },
    /// Print a process's output from the start (what its 1 MiB ring still holds); -f follows it.
    Logs {
        sandbox: String,
        pid: u32,
        #[arg(long, short = 'f')]
        follow: bool,
    },
    /// Write to a process's stdin: --data TEXT, or this command's standard input.
    Write {
        sandbox: String,
        pid: u32,
        #[arg(long)]
        data: Option<String>,
        /// Close its stdin afterwards (it reads EOF).
        #[arg(long)]
        close: bool,
    },
    /// Send a signal (default TERM) to a process's group.
    Kill {
        sandbox: String,
        pid: u32,
        #[arg(long, short = 's', default_value = "TERM")]
        signal: String,
    },
    /// Wait for a process to end (exits with its exit code; 124 if --timeout passes first).
    Wait {
        sandbox: String,
        pid: u32,
        /// Seconds to wait at most (default 30).
        #[arg(long, default_value_t = 30.0)]
        timeout: f64,
    },
}

fn base(sandbox: &str) -> String {
    format!("/v1/sandboxes/{}/processes", encode(sandbox))
}

pub async fn run(cli: &Cli, cmd: &ProcessCmd) -> anyhow::Result<ExitCode> {
    let client = cli.client()?;
    match cmd {
        ProcessCmd::Start {
            sandbox,
            env,
            cwd,
            user,
            stdin,
            timeout,
            command,
        } => {
            let mut envs = serde_json::Map::new();
            for item in env {
                let (k, v) = item
                    .split_once('=')
                    .ok_or_else(|| anyhow::anyhow!("--env '{item}' must look like KEY=VALUE"))?;
                envs.insert(k.to_string(), json!(v));
            }
            let mut body = json!({"argv": command, "env": envs, "stdin": stdin});
            if let Some(cwd) = cwd {
                body["cwd"] = json!(cwd);
            }
            if let Some(user) = user {
                body["user"] = json!(user);
            }
            if let Some(t) = timeout {
                if !(*t > 0.0 && t.is_finite()) {
                    anyhow::bail!("--timeout must be a positive number of seconds");
                }
                body["timeout_ms"] = json!((t * 1000.0).round() as u64);
            }
            let v: Value = client
                .json(Method::POST, &base(sandbox), Some(body))
                .await?;
            print_json_or(cli, &v, || println!("{}", v["pid"]));
        }
        ProcessCmd::List { sandbox } => {
            let v: Value = client.json(Method::GET, &base(sandbox), None).await?;
            print_json_or(cli, &v, || {
                let rows: Vec<Vec<String>> = v["processes"]
                    .as_array()
                    .map(Vec::as_slice)
                    .unwrap_or_default()
                    .iter()
                    .map(|p| {
                        let exit = match (p["exit_code"].as_i64(), p["signal"].as_i64()) {
                            (Some(c), _) => c.to_string(),
                            (None, Some(s)) => format!("signal {s}"),
                            _ => String::new(),
                        };
                        let argv: Vec<&str> = p["argv"]
                            .as_array()
                            .map(|a| a.iter().filter_map(Value::as_str).collect())
                            .unwrap_or_default();
                        vec![
                            p["pid"].to_string(),
                            p["state"].as_str().unwrap_or("").into(),
                            exit,
                            p["user"].as_str().unwrap_or("root").into(),
                            argv.join(" "),
                        ]
                    })
                    .collect();
                table(&["PID", "STATE", "EXIT", "USER", "COMMAND"], &rows);
            });
        }
        ProcessCmd::Logs {
            sandbox,
            pid,
            follow,
        } => {
            let path = format!("{}/{pid}/logs?follow={follow}", base(sandbox));
            let resp = client.call(Method::GET, &path, None, empty()).await?;
            let done = read_ndjson(resp.into_body(), |ev| match ev["type"].as_str() {
                Some("dropped") => {
                    eprintln!(
                        "kiln: {} earlier bytes of output were dropped (the ring keeps the last 1 MiB)",
                        ev["bytes"]
                    );
                    Ok(None)
                }
                Some("running") => Ok(Some(ExitCode::SUCCESS)),
                _ => super::exec::handle_event(&ev),
            })
            .await?;
            if let Some(code) = done {
                return Ok(code);
            }
        }
        ProcessCmd::Write {
            sandbox,
            pid,
            data,
            close,
        } => {
            let bytes = match data {
                Some(d) => d.clone().into_bytes(),
                None => {
                    let mut input = Vec::new();
                    std::io::stdin().read_to_end(&mut input)?;
                    input
                }
            };
            let path = format!("{}/{pid}/stdin", base(sandbox));
            // The daemon takes at most 256 KiB per write.
            let chunks: Vec<&[u8]> = if bytes.is_empty() {
                vec![&[]]
            } else {
                bytes.chunks(256 * 1024).collect()
            };
            let last = chunks.len() - 1;
            for (i, chunk) in chunks.into_iter().enumerate() {
                let body = json!({
                    "data_b64": base64::engine::general_purpose::STANDARD.encode(chunk),
                    "close": *close && i == last,
                });
                let _: Value = client.json(Method::POST, &path, Some(body)).await?;
            }
        }
        ProcessCmd::Kill {
            sandbox,
            pid,
            signal,
        } => {
            let signal = signal
                .parse::<i64>()
                .map(|n| json!(n))
                .unwrap_or_else(|_| json!(signal));
            let path = format!("{}/{pid}/signal", base(sandbox));
            let _: Value = client
                .json(Method::POST, &path, Some(json!({ "signal": signal })))
                .await?;
        }
        ProcessCmd::Wait {
            sandbox,
            pid,
            timeout,
        } => {
            if !(*timeout >= 0.0 && timeout.is_finite()) {
                anyhow::bail!("--timeout must be a number of seconds");
            }
            let ms = Duration::from_secs_f64(*timeout).as_millis();
            let path = format!("{}/{pid}/wait?timeout_ms={ms}", base(sandbox));
            let v: Value = client.json(Method::POST, &path, None).await?;
            print_json_or(cli, &v, || {
                if v["state"] == "running" {
                    eprintln!("kiln: process {pid} still runs after {timeout} s");
                }
            });
            if v["state"] == "running" {
                return Ok(ExitCode::from(124));
            }
            return Ok(super::exec::exit_code_of(&v));
        }
    }
    Ok(ExitCode::SUCCESS)
}
