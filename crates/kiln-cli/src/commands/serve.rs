use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use tracing_subscriber::EnvFilter;

use crate::Cli;

#[derive(Args)]
pub struct ServeArgs {
    /// Read flags from this TOML file (keys are the flags' long names, e.g. `max_sandboxes = 8`; also
    /// `data_dir` and `socket`). Flags and environment variables override it. Default:
    /// /etc/kiln/config.toml if it exists.
    #[arg(long, env = "KILN_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    /// Also listen on TCP at ADDR (e.g. 127.0.0.1:7070); needs an API token (`kiln token rotate` or
    /// --token-file).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Install the token in this file as the API token (only its SHA-256 digest is kept, in
    /// <data dir>/api-token.sha256), replacing the previous one.
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// Accelerator: auto (probe for KVM, else TCG), kvm or tcg.
    #[arg(long, env = "KILN_ACCEL", default_value = "auto")]
    accel: String,
    /// Log as JSON lines instead of text.
    #[arg(long)]
    log_json: bool,
    /// Seconds a cold boot (also the one that makes a template snapshot) may take before the sandbox is
    /// marked failed. Resumes, also creates that resume a template snapshot, have a deadline of their own.
    #[arg(long, default_value_t = 60)]
    boot_timeout: u64,
    /// Most sandboxes with a VM at once (creates, resumes, starts and forks beyond it get 429).
    #[arg(long, env = "KILN_MAX_SANDBOXES", default_value_t = 64)]
    max_sandboxes: usize,
    /// Largest JSON request body, in bytes (larger ones get 413 payload_too_large).
    #[arg(long, default_value_t = kiln_server::limits::DEFAULT_MAX_BODY_BYTES)]
    max_body_bytes: u64,
    /// Largest file upload (PUT .../files), in bytes.
    #[arg(long, default_value_t = kiln_server::limits::DEFAULT_MAX_UPLOAD_BYTES)]
    max_upload_bytes: u64,
    /// Requests per second each client may send (by uid on the unix socket, by IP on TCP); 0 turns the
    /// limit off. Over it, requests get 429 rate_limited with Retry-After.
    #[arg(long, default_value_t = kiln_server::limits::DEFAULT_RATE_PER_SEC)]
    rate_limit: f64,
    /// Requests a client may send in a burst above --rate-limit.
    #[arg(long, default_value_t = kiln_server::limits::DEFAULT_RATE_BURST)]
    rate_burst: f64,
    /// Guest RAM of all VMs together may reach host RAM × RATIO (e.g. 1.5); beyond it requests get 429.
    #[arg(long, env = "KILN_MEMORY_OVERCOMMIT", default_value_t = kiln_core::config::DEFAULT_OVERCOMMIT)]
    memory_overcommit: f64,
    /// Copies of recently resumed snapshots to keep resumed and paused, so the next resume of such a
    /// snapshot only continues one (0 turns this off). Each holds a VM; they are given up first when
    /// capacity runs short.
    /// Default: 2 under TCG, 0 under KVM (where a resume is fast anyway).
    #[arg(long, env = "KILN_WARM_SPARES")]
    warm_spares: Option<usize>,
    /// A named QEMU CPU model (e.g. EPYC-v4) instead of the host's CPU under KVM, for fleets whose
    /// memory snapshots move between hosts; QEMU refuses to start VMs on a host that lacks a feature of it.
    #[arg(long, env = "KILN_CPU_MODEL")]
    cpu_model: Option<String>,
    /// vCPUs every new machine has: a sandbox's own `cpus` run, the rest are created offline so that
    /// copies resumed from its memory snapshots may use up to this many. Default: the host's cores, at
    /// most 8.
    #[arg(long, env = "KILN_MAX_VCPUS", default_value_t = kiln_core::config::default_max_vcpus(),
          value_parser = clap::value_parser!(u32).range(1..=kiln_core::engine::MAX_CPUS as i64))]
    max_vcpus: u32,
    /// Run VMs even when they cannot be confined (no kiln-qemu group, no iptables, not root, or a data
    /// directory whose parents other users cannot traverse). Without it the daemon refuses to start.
    #[arg(long)]
    unconfined: bool,
    /// Refuse new sandboxes and snapshots (507 insufficient_storage) while the data directory's disk has
    /// less free space than this: bytes with an optional K/M/G/T suffix, or a percentage (e.g. 5%); 0 turns
    /// it off.
    #[arg(long, env = "KILN_MIN_FREE_DISK", default_value = "2G")]
    min_free_disk: kiln_core::diskfloor::DiskFloor,
    /// Refuse new sandboxes, snapshots and volumes (507 insufficient_storage) once those in the data
    /// directory use this much disk (allocated blocks): bytes with an optional K/M/G/T suffix. Unset: no
    /// quota.
    #[arg(long, env = "KILN_MAX_STORAGE")]
    max_storage: Option<kiln_core::diskfloor::DiskFloor>,
    /// Let guests reach this range although it is denied by default (link-local, RFC 1918, CGNAT, ULA),
    /// e.g. a company proxy: --allow-net 10.20.0.0/16 (repeatable; the environment variable takes a
    /// comma-separated list). The host's own addresses stay closed.
    #[arg(
        long = "allow-net",
        value_name = "CIDR",
        env = "KILN_ALLOW_NET",
        value_delimiter = ','
    )]
    allow_net: Vec<String>,
    /// How guests are networked: `user` (QEMU user-mode networking: every guest 10.0.2.15, ports on
    /// 127.0.0.1), `bridged` (each sandbox its own address on a TAP device, routed by the host through
    /// --bridge, NAT out; needs root, /dev/net/tun and iptables), or `auto`: bridged where the daemon can
    /// build it, else user (`kiln info` says which and why). See docs/networking.md.
    #[arg(long, env = "KILN_NETWORK", default_value = "auto", value_parser = ["auto", "user", "bridged"])]
    network: String,
    /// Bridged networking: the host device that holds the guests' gateway address.
    #[arg(long, env = "KILN_BRIDGE", default_value = kiln_core::net::DEFAULT_BRIDGE)]
    bridge: String,
    /// Bridged networking: the IPv4 pool guests get addresses from (prefix 16-29; the first address is
    /// the gateway).
    #[arg(long, env = "KILN_SUBNET", default_value = kiln_core::net::DEFAULT_SUBNET)]
    subnet: String,
    /// Bridged networking: the IPv6 /64 pool guests get addresses from where the host has IPv6 (each
    /// guest's is the pool's prefix and its IPv4 address's host number), or `off`.
    #[arg(long, env = "KILN_SUBNET6", default_value = kiln_core::net::DEFAULT_SUBNET6)]
    subnet6: String,
    /// Where guest RAM of booted sandboxes lives while they run: `auto` (a tmpfs kiln mounts at
    /// <data dir>/ram, so guest memory is not written back to disk; the data disk where mounting is not
    /// allowed), an absolute path of a root-owned 0711 directory (on a tmpfs), or `disk`. A stop copies
    /// RAM to the data disk either way.
    #[arg(long, env = "KILN_RAM_DIR", default_value = "auto")]
    ram_dir: kiln_core::ramdir::RamPlacement,
    /// Size of kiln's own RAM tmpfs (`--ram-dir auto`): bytes with a K/M/G/T suffix. Default: host RAM
    /// × --memory-overcommit. A sandbox whose RAM would not fit is refused (507 insufficient_storage).
    #[arg(long, env = "KILN_RAM_SIZE")]
    ram_size: Option<kiln_core::diskfloor::DiskFloor>,
    /// Memory headroom of new sandboxes: a sandbox created without `max_memory_mib` gets a machine of
    /// its memory × FACTOR (at most 64 GiB) with a balloon holding the rest, so copies resumed from its
    /// memory snapshots may have up to that much. Only its memory is admitted and capped; 1 turns it off.
    #[arg(long, env = "KILN_MEMORY_HEADROOM", value_name = "FACTOR",
          default_value_t = kiln_core::headroom::DEFAULT_FACTOR)]
    memory_headroom: f64,
}

pub async fn run(cli: &Cli, args: &ServeArgs) -> anyhow::Result<ExitCode> {
    // Everything the daemon creates (database, token digest, sockets, snapshot files) is private unless
    // it widens a mode on purpose (the VM-facing directories and sealed files).
    // SAFETY: umask has no preconditions.
    unsafe { libc::umask(0o077) };
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
    cfg.warm_spares = args
        .warm_spares
        .unwrap_or(kiln_core::config::DEFAULT_WARM_SPARES);
    cfg.warm_spares_default = args.warm_spares.is_none();
    if let Some(model) = &args.cpu_model {
        kiln_vmm::cpu::set_model_override(model)
            .map_err(|e| anyhow::anyhow!("--cpu-model: {e}"))?;
    }
    cfg.max_vcpus = args.max_vcpus;
    cfg.unconfined = args.unconfined;
    cfg.min_free_disk = args.min_free_disk;
    cfg.max_storage = match args.max_storage {
        None => None,
        Some(kiln_core::diskfloor::DiskFloor::Bytes(b)) => Some(b),
        Some(kiln_core::diskfloor::DiskFloor::Percent(_)) => {
            anyhow::bail!("--max-storage takes bytes (e.g. 50G), not a percentage")
        }
    };
    // Parsed here rather than by clap so an empty KILN_ALLOW_NET means "none".
    cfg.allow_net = args
        .allow_net
        .iter()
        .filter(|s| !s.trim().is_empty())
        .map(|s| s.parse().map_err(|e| anyhow::anyhow!("--allow-net: {e}")))
        .collect::<anyhow::Result<_>>()?;
    if args.network != "user" {
        let bc = kiln_core::net::BridgeConfig::new(&args.bridge, &args.subnet)
            .and_then(|b| b.with_subnet6(&args.subnet6))
            .map_err(|e| anyhow::anyhow!("--bridge/--subnet/--subnet6: {e}"))?;
        cfg.network = match args.network.as_str() {
            "bridged" => kiln_core::net::NetMode::Bridged(bc),
            _ => kiln_core::net::NetMode::Auto(bc),
        };
    }
    cfg.memory_headroom =
        kiln_core::headroom::check_factor(args.memory_headroom).map_err(anyhow::Error::msg)?;
    cfg.ram_dir = args.ram_dir.clone();
    cfg.ram_size_mib = match args.ram_size {
        None => None,
        Some(kiln_core::diskfloor::DiskFloor::Bytes(b)) if b >= 1 << 20 => Some(b >> 20),
        Some(_) => anyhow::bail!("--ram-size takes a size of at least 1M (e.g. 8G)"),
    };
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
        warm_spares = cfg.warm_spares,
        "capacity limits"
    );
    if !(args.rate_limit.is_finite() && args.rate_limit >= 0.0 && args.rate_burst.is_finite()) {
        anyhow::bail!(
            "--rate-limit and --rate-burst must be non-negative numbers (0 turns the limit off)"
        );
    }
    if let Some(path) = &args.token_file {
        let t = std::fs::read_to_string(path)
            .with_context(|| format!("reading token file {}", path.display()))?;
        if t.trim().len() < kiln_server::auth::MIN_TOKEN_LEN {
            anyhow::bail!(
                "the token in {} is shorter than {} characters; use a long random token (`kiln token rotate` makes one)",
                path.display(),
                kiln_server::auth::MIN_TOKEN_LEN
            );
        }
        std::fs::create_dir_all(&data_dir)
            .with_context(|| format!("creating {}", data_dir.display()))?;
        kiln_server::auth::install_token(&data_dir, t.trim())
            .with_context(|| format!("storing the token digest in {}", data_dir.display()))?;
    }
    if args.listen.is_some() && !kiln_server::auth::has_token(&data_dir) {
        anyhow::bail!(
            "--listen needs an API token: run `kiln token rotate` to create one (or pass --token-file)"
        );
    }
    let engine = kiln_core::Engine::open(cfg)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let socket = cli
        .socket
        .clone()
        .unwrap_or_else(|| kiln_core::config::default_socket_for(&data_dir));
    let result = kiln_server::serve(
        engine.clone(),
        kiln_server::ServeOptions {
            socket,
            listen: args.listen,
            data_dir,
            limits: kiln_server::limits::Limits {
                max_body_bytes: args.max_body_bytes,
                max_upload_bytes: args.max_upload_bytes,
            },
            rate: kiln_server::limits::RateConfig {
                per_sec: args.rate_limit,
                burst: args.rate_burst,
            },
        },
    )
    .await;
    engine.discard_warm_spares().await;
    engine.shutdown();
    result?;
    Ok(ExitCode::SUCCESS)
}
