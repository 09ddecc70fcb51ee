//! `kiln token rotate`: a new API token for TCP clients. Works on the data directory directly, so it
//! needs write access to it (the same people who could replace the daemon's state anyway), and it takes
//! effect at once: a running daemon reads the stored digest on every TCP request.

use std::process::ExitCode;

use anyhow::Context;
use clap::Subcommand;

use crate::Cli;

#[derive(Subcommand)]
pub enum TokenCmd {
    /// Make a new API token, print it once and invalidate the old one.
    Rotate,
}

pub fn run(cli: &Cli, cmd: &TokenCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        TokenCmd::Rotate => {
            let data_dir = cli.data_dir();
            std::fs::create_dir_all(&data_dir)
                .with_context(|| format!("creating {}", data_dir.display()))?;
            let token = kiln_server::auth::rotate_token(&data_dir).with_context(|| {
                format!(
                    "writing {}",
                    kiln_server::auth::token_hash_path(&data_dir).display()
                )
            })?;
            if cli.json {
                println!("{}", serde_json::json!({ "token": token }));
            } else {
                println!("{token}");
                eprintln!(
                    "This is the new API token; it is shown only this once (kiln keeps only its SHA-256). \
                     The previous token no longer works."
                );
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
