//! `kiln doctor`: asks the daemon to check (and with --repair, fix) its state. Exits 1 while problems
//! remain, so scripts can act on it.

use std::process::ExitCode;

use clap::Args;
use hyper::Method;

use crate::Cli;

#[derive(Args)]
pub struct DoctorArgs {
    /// Fix what can be fixed safely (files that belong to nothing go to lost+found, not away).
    #[arg(long)]
    repair: bool,
    /// Also verify every snapshot file's checksum (reads all snapshot data).
    #[arg(long)]
    deep: bool,
}

pub async fn run(cli: &Cli, args: &DoctorArgs) -> anyhow::Result<ExitCode> {
    let (method, route) = if args.repair {
        (Method::POST, "/v1/doctor/repair")
    } else {
        (Method::GET, "/v1/doctor")
    };
    let path = format!("{route}?deep={}", args.deep);
    let report: serde_json::Value = cli.client()?.json(method, &path, None).await?;
    let problems = report["problems"].as_array().cloned().unwrap_or_default();
    crate::output::print_json_or(cli, &report, || {
        for p in &problems {
            let state = match (p["repaired"].as_bool(), args.repair) {
                (Some(true), _) => "repaired",
                (_, true) => "NOT repaired",
                _ => "problem",
            };
            println!("{state}: {}", p["message"].as_str().unwrap_or("?"));
            println!("    repair: {}", p["repair"].as_str().unwrap_or("?"));
        }
        for busy in report["skipped_busy"].as_array().into_iter().flatten() {
            println!(
                "skipped: sandbox {} is busy with an operation; run doctor again later",
                busy.as_str().unwrap_or("?")
            );
        }
        println!(
            "checked {} sandboxes and {} snapshots: {}",
            report["sandboxes_checked"],
            report["snapshots_checked"],
            if problems.is_empty() {
                "no problems".to_string()
            } else if report["ok"] == true {
                format!("{} problems, all repaired", problems.len())
            } else if args.repair {
                format!("{} problems, some not repaired", problems.len())
            } else {
                format!(
                    "{} problems; `kiln doctor --repair` fixes what it can",
                    problems.len()
                )
            }
        );
    });
    Ok(if report["ok"] == true {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
