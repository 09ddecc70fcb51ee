//! `kiln port`: publish guest ports of a running sandbox on 127.0.0.1.

use std::process::ExitCode;

use clap::Subcommand;
use hyper::Method;
use serde_json::{json, Value};

use crate::client::encode;
use crate::output::{print_json_or, table_of};
use crate::Cli;

#[derive(Subcommand)]
pub enum PortCmd {
    /// Publish a guest port; prints the host address (127.0.0.1:PORT) it is reachable on.
    #[command(alias = "add")]
    Publish {
        sandbox: String,
        /// The guest port.
        guest: u16,
        /// Host port to use (default: a free one is picked).
        #[arg(long)]
        host: Option<u16>,
    },
    /// Stop forwarding a guest port.
    #[command(alias = "rm")]
    Unpublish { sandbox: String, guest: u16 },
    /// List a sandbox's published ports.
    #[command(alias = "ls")]
    List { sandbox: String },
}

/// `--port` of `kiln sandbox create`: `GUEST` (host port picked) or `HOST:GUEST`.
pub fn port_flag(p: &str) -> anyhow::Result<Value> {
    let bad = || anyhow::anyhow!("--port '{p}' must look like GUEST or HOST:GUEST (1-65535)");
    match p.split_once(':') {
        None => Ok(json!({"guest": p.parse::<u16>().map_err(|_| bad())?})),
        Some((h, g)) => Ok(json!({
            "host": h.parse::<u16>().map_err(|_| bad())?,
            "guest": g.parse::<u16>().map_err(|_| bad())?,
        })),
    }
}

pub async fn run(cli: &Cli, cmd: &PortCmd) -> anyhow::Result<ExitCode> {
    let client = cli.client()?;
    match cmd {
        PortCmd::Publish {
            sandbox,
            guest,
            host,
        } => {
            let mut body = json!({ "guest": guest });
            if let Some(h) = host {
                body["host"] = json!(h);
            }
            let path = format!("/v1/sandboxes/{}/ports", encode(sandbox));
            let p: Value = client.json(Method::POST, &path, Some(body)).await?;
            print_json_or(cli, &p, || println!("127.0.0.1:{}", p["host"]));
        }
        PortCmd::Unpublish { sandbox, guest } => {
            let path = format!("/v1/sandboxes/{}/ports/{guest}", encode(sandbox));
            let sb: Value = client.json(Method::DELETE, &path, None).await?;
            print_json_or(cli, &sb["ports"], || {
                println!("guest port {guest} of {sandbox} unpublished")
            });
        }
        PortCmd::List { sandbox } => {
            let path = format!("/v1/sandboxes/{}/ports", encode(sandbox));
            let list: Value = client.json(Method::GET, &path, None).await?;
            print_json_or(cli, &list, || {
                table_of(&["GUEST", "HOST", "AUTO"], &list, |p| {
                    vec![
                        p["guest"].to_string(),
                        format!("127.0.0.1:{}", p["host"]),
                        p["auto"].to_string(),
                    ]
                })
            });
        }
    }
    Ok(ExitCode::SUCCESS)
}
