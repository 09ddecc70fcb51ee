use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use tracing_subscriber::EnvFilter;

use crate::Cli;

#[derive(Args)]
pub struct ServeArgs {
    /// Also listen on TCP at ADDR (e.g. 127.0.0.1:7070); requires --token-file.
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// File holding the bearer token that TCP clients must present.
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// Accelerator: auto (probe for KVM, else TCG), kvm or tcg.
    #[arg(long, env = "KILN_ACCEL", default_value = "auto")]
    accel: String,
    /// Log as JSON lines instead of text.
    #[arg(long)]
    log_json: bool,
    /// Seconds a cold boot may take before the sandbox is marked failed.
    #[arg(long, default_value_t = 60)]
    boot_timeout: u64,
    /// Most sandboxes with a VM at once (creates, resumes, starts and forks beyond it get 429).
    #[arg(long, env = "KILN_MAX_SANDBOXES", default_value_t = 64)]
    max_sandboxes: usize,
    /// Guest RAM of all VMs together may reach host RAM × RATIO (e.g. 1.5); beyond it requests get 429.
    #[arg(long, env = "KILN_MEMORY_OVERCOMMIT", default_value_t = kiln_core::config::DEFAULT_OVERCOMMIT)]
    memory_overcommit: f64,
}

pub async fn run(cli: &Cli, args: &ServeArgs) -> anyhow::Result<ExitCode> {
    let filter = EnvFilter::try_from_env("KILN_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    if args.log_json {
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .json()
            .init();
    } else {
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .init();
    }
    let data_dir = cli.data_dir();
    let mut cfg = kiln_core::Config::new(data_dir.clone());
    cfg.accel = match args.accel.as_str() {
        "auto" => None,
        other => Some(
            other
                .parse::<kiln_vmm::Accel>()
                .map_err(anyhow::Error::msg)?,
        ),
    };
    cfg.boot_timeout = std::time::Duration::from_secs(args.boot_timeout);
    if args.max_sandboxes == 0 {
        anyhow::bail!("--max-sandboxes must be at least 1");
    }
    cfg.max_sandboxes = args.max_sandboxes;
    let mut cfg = cfg
        .with_overcommit(args.memory_overcommit)
        .map_err(anyhow::Error::msg)?;
    // Test-only fault injection; see kiln_core::faults.
    if let Ok(spec) = std::env::var("KILN_FAULTS") {
        cfg.faults = kiln_core::faults::Faults::parse(&spec).map_err(|e| anyhow::anyhow!("{e}"))?;
        if !cfg.faults.is_empty() {
            tracing::warn!(%spec, "fault injection is on (KILN_FAULTS); do not use this daemon for real work");
        }
    }
    tracing::info!(
        max_sandboxes = cfg.max_sandboxes,
        max_guest_memory_mib = cfg.max_total_memory_mib,
        "capacity limits"
    );
    let token = match (&args.listen, &args.token_file) {
        (Some(_), None) => {
            anyhow::bail!("--listen needs --token-file: TCP access requires a bearer token")
        }
        (_, Some(path)) => {
            let t = std::fs::read_to_string(path)
                .with_context(|| format!("reading token file {}", path.display()))?;
            if t.trim().len() < 16 {
                anyhow::bail!(
                    "the token in {} is shorter than 16 characters; use a long random token",
                    path.display()
                );
            }
            Some(t.trim().to_string())
        }
        _ => None,
    };
    let engine = kiln_core::Engine::open(cfg)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let socket = cli
        .socket
        .clone()
        .unwrap_or_else(|| kiln_core::config::default_socket_for(&data_dir));
    kiln_server::serve(
        engine,
        kiln_server::ServeOptions {
            socket,
            listen: args.listen,
            token,
        },
    )
    .await?;
    Ok(ExitCode::SUCCESS)
}
