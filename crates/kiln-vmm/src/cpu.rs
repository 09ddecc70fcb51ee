//! The CPU a guest sees: the model kiln passes (`-cpu`) and the feature flags QEMU expands it to on this
//! host. Recorded in snapshots and compared on restore: a guest that saw a feature at boot may use it
//! at any time, so a host whose QEMU lacks it cannot continue that guest.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::accel::Accel;
use crate::error::VmmError;

/// The `-cpu` model kiln runs guests with under `accel`.
pub fn model(accel: Accel) -> &'static str {
    match accel {
        Accel::Kvm => "host",
        Accel::Tcg => "max",
    }
}

static CACHE: Mutex<Vec<(Accel, Vec<String>)>> = Mutex::new(Vec::new());

/// The feature flags of [`model`] on this host, if [`probe_features`] has found them.
pub fn features(accel: Accel) -> Option<Vec<String>> {
    let cache = CACHE.lock().unwrap_or_else(|p| p.into_inner());
    cache
        .iter()
        .find(|(a, _)| *a == accel)
        .map(|(_, f)| f.clone())
}

/// Asks QEMU (a throwaway `-M none` process, ~0.1 s) which boolean CPU properties are on for
/// [`model`] (QMP `query-cpu-model-expansion`, type `full`), sorted, and caches them. Blocking.
pub fn probe_features(accel: Accel) -> Result<Vec<String>, VmmError> {
    if let Some(f) = features(accel) {
        return Ok(f);
    }
    let mut child = Command::new(crate::qemu_binary())
        .args([
            "-M",
            "none",
            "-accel",
            accel.as_str(),
            "-nodefaults",
            "-display",
            "none",
        ])
        .args(["-S", "-qmp", "stdio"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| VmmError::io("starting QEMU to list CPU features", e))?;
    let cmds = format!(
        "{{\"execute\":\"qmp_capabilities\"}}\n{{\"execute\":\"query-cpu-model-expansion\",\"arguments\":{{\"type\":\"full\",\"model\":{{\"name\":\"{}\"}}}}}}\n{{\"execute\":\"quit\"}}\n",
        model(accel)
    );
    let written = child.stdin.take().map(|mut s| s.write_all(cmds.as_bytes()));
    let stdout = child.stdout.take();
    // Bounded: a QEMU that never answers is killed after the deadline.
    let deadline = Instant::now() + Duration::from_secs(10);
    let reader = std::thread::spawn(move || {
        let mut found = None;
        for line in BufReader::new(stdout?).lines().map_while(Result::ok) {
            let v: Value = serde_json::from_str(&line).ok()?;
            if let Some(props) = v["return"]["model"]["props"].as_object() {
                let mut on: Vec<String> = props
                    .iter()
                    .filter(|(_, v)| v.as_bool() == Some(true))
                    .map(|(k, _)| k.clone())
                    .collect();
                on.sort();
                found = Some(on);
            }
        }
        found
    });
    while !reader.is_finished() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = child.kill();
    let _ = child.wait();
    let found = reader.join().ok().flatten();
    match (written, found) {
        (Some(Ok(())), Some(on)) => {
            CACHE
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push((accel, on.clone()));
            Ok(on)
        }
        _ => Err(VmmError::LaunchFailed {
            detail: format!(
                "QEMU did not list the features of CPU model '{}'",
                model(accel)
            ),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tcg_max_lists_features() {
        let Ok(f) = probe_features(Accel::Tcg) else {
            eprintln!("QEMU not installed; skipped");
            return;
        };
        assert!(f.iter().any(|x| x == "sse2"), "{f:?}");
        assert!(f.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(features(Accel::Tcg), Some(f));
    }
}
