//! `kiln`: the daemon (`kiln serve`) and its command-line client.

mod client;
mod commands;
mod output;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

use crate::client::{Client, Target};

#[derive(Parser)]
#[command(
    name = "kiln",
    version,
    about = "Self-hosted microVM sandboxes with snapshots, restore and fork"
)]
pub struct Cli {
    /// The daemon's unix socket (default: kiln.sock in the data directory).
    #[arg(long, global = true, env = "KILN_SOCKET")]
    socket: Option<PathBuf>,
    /// Reach the daemon over TCP instead (HOST:PORT); needs --token or KILN_TOKEN.
    #[arg(long, global = true, env = "KILN_URL")]
    url: Option<String>,
    #[arg(long, global = true, env = "KILN_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// kiln's data directory (state database, images, sandboxes).
    #[arg(long, global = true, env = "KILN_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Print machine-readable JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the kiln daemon.
    Serve(commands::serve::ServeArgs),
    /// Create, list, inspect and delete sandboxes.
    #[command(subcommand, alias = "sb")]
    Sandbox(commands::sandbox::SandboxCmd),
    /// Checkpoint sandboxes and bring them back.
    #[command(subcommand, alias = "snap")]
    Snapshot(commands::snapshot::SnapshotCmd),
    /// Create, list and delete volumes (durable disks for sandboxes).
    #[command(subcommand, alias = "vol")]
    Volume(commands::volume::VolumeCmd),
    /// Publish guest ports of a running sandbox on 127.0.0.1 (a free host port is picked by default).
    #[command(subcommand)]
    Port(commands::port::PortCmd),
    /// Object-storage remotes that snapshots are pushed to and pulled from.
    #[command(subcommand)]
    Remote(commands::remote::RemoteCmd),
    /// Show the daemon's record of mutating requests and wait for them.
    #[command(subcommand, alias = "op")]
    Operation(commands::operation::OperationCmd),
    /// Hibernate sandboxes: save them to disk and free their RAM.
    Stop {
        #[arg(required = true)]
        sandboxes: Vec<String>,
    },
    /// Bring hibernated sandboxes back where they were.
    Start {
        #[arg(required = true)]
        sandboxes: Vec<String>,
    },
    /// Freeze sandboxes in memory.
    Pause {
        #[arg(required = true)]
        sandboxes: Vec<String>,
    },
    /// Fork a running sandbox into new sandboxes that continue from its current state.
    Fork {
        sandbox: String,
        #[arg(long, short = 'n', default_value_t = 1)]
        count: u64,
        /// Name prefix for the children (PREFIX-1, PREFIX-2, ...).
        #[arg(long)]
        name: Option<String>,
        /// Seconds of life of each child (children inherit no lifetime from the source).
        #[arg(long)]
        timeout: Option<u64>,
        #[command(flatten)]
        life: commands::sandbox::LifetimeArgs,
    },
    /// Continue paused sandboxes.
    Resume {
        #[arg(required = true)]
        sandboxes: Vec<String>,
    },
    /// Run a command in a sandbox: `kiln exec SANDBOX -- CMD...` (exits with the command's exit code).
    Exec(commands::exec::ExecArgs),
    /// Background processes: start, list, logs (-f), write (stdin), kill, wait.
    #[command(subcommand, alias = "ps")]
    Process(commands::process::ProcessCmd),
    /// Move files in and out of a sandbox.
    #[command(subcommand)]
    Files(commands::files::FilesCmd),
    /// Copy a file: `kiln cp LOCAL SANDBOX:/path` or `kiln cp SANDBOX:/path LOCAL` (`-r`: a directory).
    Cp(commands::files::CpArgs),
    /// Build, list and remove guest images (templates). Runs locally, not through the daemon.
    #[command(subcommand)]
    Image(commands::image::ImageCmd),
    /// Show the daemon's version and accelerator.
    Info,
    /// Check that the daemon's database, data directory and QEMU processes agree (--repair fixes).
    Doctor(commands::doctor::DoctorArgs),
    /// Print the daemon's events (sandbox, snapshot, volume and operation changes) as they happen.
    Events(commands::events::EventsArgs),
    /// Serve kiln's tools to AI agents over the Model Context Protocol (stdio, or --http ADDR).
    Mcp(commands::mcp::McpArgs),
    /// Manage the API token that TCP clients present (works on the data directory).
    #[command(subcommand)]
    Token(commands::token::TokenCmd),
}

impl Cli {
    fn data_dir(&self) -> PathBuf {
        self.data_dir
            .clone()
            .unwrap_or_else(kiln_core::config::default_data_dir)
    }

    fn client(&self) -> anyhow::Result<Client> {
        if let Some(url) = &self.url {
            let addr = url
                .trim_start_matches("http://")
                .trim_end_matches('/')
                .to_string();
            let token = self.token.clone().ok_or_else(|| {
                anyhow::anyhow!("--url needs a token: pass --token or set KILN_TOKEN")
            })?;
            return Ok(Client::new(Target::Tcp { addr, token }));
        }
        let socket = self
            .socket
            .clone()
            .unwrap_or_else(|| kiln_core::config::default_socket_for(&self.data_dir()));
        Ok(Client::new(Target::Unix(socket)))
    }
}

/// Parses the command line; for `serve`, with the flags of its config file added (commands::config).
fn parse_cli() -> Cli {
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let cmd = Cli::command();
    let matches = cmd.clone().get_matches_from(argv.clone());
    let Some(path) = commands::config::path_for(&matches) else {
        return Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    };
    let argv = match commands::config::apply(&cmd, &matches, argv, &path) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(2);
        }
    };
    match Cli::command().try_get_matches_from(argv) {
        Ok(m) => Cli::from_arg_matches(&m).unwrap_or_else(|e| e.exit()),
        Err(e) => {
            eprintln!("error in the config file {}:", path.display());
            e.exit()
        }
    }
}

fn main() -> ExitCode {
    let cli = parse_cli();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            // Like a shell's 126: the command could not be executed.
            match e
                .downcast_ref::<client::ApiError>()
                .map(|a| a.code.as_str())
            {
                Some("exec_failed") => ExitCode::from(126),
                _ => ExitCode::from(1),
            }
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match &cli.command {
        Command::Serve(args) => commands::serve::run(&cli, args).await,
        Command::Sandbox(cmd) => commands::sandbox::run(&cli, cmd).await,
        Command::Snapshot(cmd) => commands::snapshot::run(&cli, cmd).await,
        Command::Volume(cmd) => commands::volume::run(&cli, cmd).await,
        Command::Port(cmd) => commands::port::run(&cli, cmd).await,
        Command::Operation(cmd) => commands::operation::run(&cli, cmd).await,
        Command::Remote(cmd) => commands::remote::run(&cli, cmd).await,
        Command::Stop { sandboxes } => commands::snapshot::lifecycle(&cli, "stop", sandboxes).await,
        Command::Start { sandboxes } => {
            commands::snapshot::lifecycle(&cli, "start", sandboxes).await
        }
        Command::Pause { sandboxes } => {
            commands::snapshot::lifecycle(&cli, "pause", sandboxes).await
        }
        Command::Resume { sandboxes } => {
            commands::snapshot::lifecycle(&cli, "resume", sandboxes).await
        }
        Command::Fork {
            sandbox,
            count,
            name,
            timeout,
            life,
        } => {
            let mut lifetime = serde_json::json!({});
            life.apply(*timeout, &mut lifetime);
            commands::snapshot::fork(&cli, sandbox, *count, name.as_deref(), lifetime).await
        }
        Command::Exec(args) => commands::exec::run(&cli, args).await,
        Command::Process(cmd) => commands::process::run(&cli, cmd).await,
        Command::Files(cmd) => commands::files::run(&cli, cmd).await,
        Command::Cp(args) => commands::files::cp(&cli, args).await,
        Command::Image(cmd) => commands::image::run(&cli, cmd).await,
        Command::Doctor(args) => commands::doctor::run(&cli, args).await,
        Command::Token(cmd) => commands::token::run(&cli, cmd),
        Command::Events(args) => commands::events::run(&cli, args).await,
        Command::Mcp(args) => commands::mcp::run(&cli, args).await,
        Command::Info => {
            let v: serde_json::Value = cli
                .client()?
                .json(hyper::Method::GET, "/v1/info", None)
                .await?;
            output::print_json_or(&cli, &v, || {
                println!("kiln daemon {}", v["version"].as_str().unwrap_or("?"));
                println!(
                    "accelerator: {} ({})",
                    v["accel"].as_str().unwrap_or("?"),
                    v["accel_reason"].as_str().unwrap_or("")
                );
                println!("data dir:    {}", v["data_dir"].as_str().unwrap_or("?"));
                println!(
                    "network:     {} ({})",
                    v["network"].as_str().unwrap_or("?"),
                    v["network_reason"].as_str().unwrap_or("")
                );
                let c = &v["confinement"];
                if c["confined"].as_bool() == Some(true) {
                    println!("confinement: VMs run as per-sandbox uids behind the firewall");
                } else {
                    println!("confinement: UNCONFINED (kiln serve --unconfined)");
                    for m in c["missing"].as_array().into_iter().flatten() {
                        println!("  - {}", m.as_str().unwrap_or(""));
                    }
                }
            });
            Ok(ExitCode::SUCCESS)
        }
    }
}
