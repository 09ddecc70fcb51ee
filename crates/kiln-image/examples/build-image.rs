//! Builds an image from the command line, for trying kiln-image without the kiln CLI:
//!
//! ```text
//! cargo run -p kiln-image --example build-image -- tiny --agent PATH [--images DIR] [--cache DIR] [--force] [--size-mib N]
//! ```

use std::path::PathBuf;
use std::process::ExitCode;

use kiln_image::{BuildOptions, ImageStore, StderrProgress};

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let mut name = None;
    let mut agent = None;
    let mut images = PathBuf::from(".kiln-data/images");
    let mut cache = PathBuf::from(".kiln-data/cache");
    let mut force = false;
    let mut size = None;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--agent" => agent = args.next().map(PathBuf::from),
            "--images" => images = args.next().map(PathBuf::from).unwrap_or(images),
            "--cache" => cache = args.next().map(PathBuf::from).unwrap_or(cache),
            "--size-mib" => size = args.next().and_then(|s| s.parse().ok()),
            "--force" => force = true,
            other => name = Some(other.to_string()),
        }
    }
    let (Some(name), Some(agent_bin)) = (name, agent) else {
        eprintln!("usage: build-image NAME --agent PATH [--images DIR] [--cache DIR] [--force] [--size-mib N]");
        return ExitCode::from(2);
    };
    let store = ImageStore::new(images, cache);
    let opts = BuildOptions {
        agent_bin,
        force,
        rootfs_size_mib: size,
    };
    let started = std::time::Instant::now();
    let result = {
        let progress = StderrProgress::new();
        store.build(&name, &opts, &progress)
    };
    match result {
        Ok(info) => {
            println!(
                "built {} in {:.1}s: {} ({} MiB on disk)",
                info.name,
                started.elapsed().as_secs_f64(),
                info.dir.display(),
                info.disk_usage_bytes >> 20
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
