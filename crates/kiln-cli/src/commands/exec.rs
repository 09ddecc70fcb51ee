use std::io::{Read, Write};
use std::process::ExitCode;

use base64::Engine as _;
use clap::Args;
use http_body_util::BodyExt;
use hyper::Method;
use serde_json::{json, Value};

use crate::client::{encode, json_body, read_ndjson};
use crate::Cli;

#[derive(Args)]
pub struct ExecArgs {
    /// Sandbox id or name.
    sandbox: String,
    /// Extra environment (KEY=VALUE); repeatable.
    #[arg(long = "env", short = 'e')]
    env: Vec<String>,
    /// Working directory in the guest.
    #[arg(long, short = 'w')]
    cwd: Option<String>,
    /// Kill the command after this many seconds (exit status 124).
    #[arg(long)]
    timeout: Option<f64>,
    /// Run as this guest user (name or numeric uid) instead of root.
    #[arg(long, short = 'u')]
    user: Option<String>,
    /// Send this process's standard input to the command.
    #[arg(long, short = 'i')]
    interactive: bool,
    /// The command and its arguments (after `--`).
    #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
    command: Vec<String>,
}

pub async fn run(cli: &Cli, a: &ExecArgs) -> anyhow::Result<ExitCode> {
    let mut env = serde_json::Map::new();
    for item in &a.env {
        let (k, v) = item
            .split_once('=')
            .ok_or_else(|| anyhow::anyhow!("--env '{item}' must look like KEY=VALUE"))?;
        env.insert(k.to_string(), json!(v));
    }
    let mut body = json!({ "argv": a.command, "env": env, "stream": !cli.json });
    if let Some(cwd) = &a.cwd {
        body["cwd"] = json!(cwd);
    }
    if let Some(user) = &a.user {
        body["user"] = json!(user);
    }
    if let Some(t) = a.timeout {
        if !(t > 0.0 && t.is_finite()) {
            anyhow::bail!("--timeout must be a positive number of seconds");
        }
        body["timeout_ms"] = json!((t * 1000.0).round() as u64);
    }
    if a.interactive {
        let mut input = Vec::new();
        std::io::stdin().read_to_end(&mut input)?;
        body["stdin_b64"] = json!(base64::engine::general_purpose::STANDARD.encode(input));
    }
    let path = format!("/v1/sandboxes/{}/exec", encode(&a.sandbox));
    let resp = cli
        .client()?
        .call(
            Method::POST,
            &path,
            Some("application/json"),
            json_body(&body),
        )
        .await?;
    if cli.json {
        let bytes = resp.into_body().collect().await?.to_bytes();
        let v: Value = serde_json::from_slice(&bytes)?;
        println!("{}", serde_json::to_string_pretty(&v)?);
        if v["truncated"].as_bool() == Some(true) {
            eprintln!("kiln: output was cut at 1 MiB per stream (\"truncated\": true); run without --json to stream all of it");
        }
        return Ok(exit_code_of(&v));
    }
    if let Some(code) = read_ndjson(resp.into_body(), |ev| handle_event(&ev)).await? {
        return Ok(code);
    }
    anyhow::bail!("the daemon closed the output stream before the command finished")
}

fn decode(ev: &Value) -> anyhow::Result<Vec<u8>> {
    if let Some(s) = ev["data"].as_str() {
        return Ok(s.as_bytes().to_vec());
    }
    Ok(base64::engine::general_purpose::STANDARD.decode(ev["data_b64"].as_str().unwrap_or(""))?)
}

pub(crate) fn handle_event(ev: &Value) -> anyhow::Result<Option<ExitCode>> {
    match ev["type"].as_str() {
        Some("stdout") => {
            let mut out = std::io::stdout().lock();
            out.write_all(&decode(ev)?)?;
            out.flush()?;
        }
        Some("stderr") => {
            let mut err = std::io::stderr().lock();
            err.write_all(&decode(ev)?)?;
            err.flush()?;
        }
        Some("exit") => {
            if ev["timed_out"].as_bool() == Some(true) {
                eprintln!("kiln: command timed out and was killed");
            }
            return Ok(Some(exit_code_of(ev)));
        }
        Some("error") => anyhow::bail!(
            "{} [{}]",
            ev["message"].as_str().unwrap_or(""),
            ev["code"].as_str().unwrap_or("")
        ),
        _ => {}
    }
    Ok(None)
}

/// The command's exit code; 128+N for a signal, 124 for a timeout (like `timeout(1)`).
pub(crate) fn exit_code_of(v: &Value) -> ExitCode {
    if v["timed_out"].as_bool() == Some(true) {
        return ExitCode::from(124);
    }
    if let Some(code) = v["exit_code"].as_i64() {
        return ExitCode::from((code & 0xff) as u8);
    }
    if let Some(sig) = v["signal"].as_i64() {
        return ExitCode::from((128 + sig).clamp(0, 255) as u8);
    }
    ExitCode::from(1)
}
