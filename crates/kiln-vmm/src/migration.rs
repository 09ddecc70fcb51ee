//! Saving and loading a VM's device and vCPU state with QEMU's migration machinery.
//!
//! Guest RAM lives in a named file-backed memory region; with the `x-ignore-shared` capability the
//! migration stream skips it and holds only device and vCPU state (tens of KiB), which makes saving and
//! loading take milliseconds. RAM itself is handled by the caller as files (see `memory`).

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::error::VmmError;
use crate::qmp::Qmp;

async fn set_ignore_shared(qmp: &Qmp) -> Result<(), VmmError> {
    qmp.execute(
        "migrate-set-capabilities",
        Some(json!({"capabilities": [{"capability": "x-ignore-shared", "state": true}]})),
    )
    .await
    .map(|_| ())
}

fn file_uri(path: &Path) -> String {
    format!("file:{}", path.display())
}

/// Writes the device state of a *stopped* VM to `path` and waits for completion.
pub async fn save_state(qmp: &Qmp, path: &Path, timeout: Duration) -> Result<(), VmmError> {
    set_ignore_shared(qmp).await?;
    qmp.execute("migrate", Some(json!({"uri": file_uri(path)})))
        .await?;
    wait_for_migration(qmp, timeout, "saving VM state").await
}

/// Loads device state into a VM started with `-incoming defer` and waits until it is loaded.
pub async fn load_state(qmp: &Qmp, path: &Path, timeout: Duration) -> Result<(), VmmError> {
    set_ignore_shared(qmp).await?;
    qmp.execute("migrate-incoming", Some(json!({"uri": file_uri(path)})))
        .await?;
    wait_for_migration(qmp, timeout, "loading VM state").await
}

async fn wait_for_migration(qmp: &Qmp, timeout: Duration, what: &str) -> Result<(), VmmError> {
    let started = Instant::now();
    let mut delay = Duration::from_micros(200);
    loop {
        let info = qmp.execute("query-migrate", None).await?;
        match info["status"].as_str().unwrap_or("") {
            "completed" => return Ok(()),
            "failed" | "cancelled" => {
                let why = info["error-desc"]
                    .as_str()
                    .unwrap_or("no reason given")
                    .to_string();
                return Err(VmmError::LaunchFailed {
                    detail: format!("{what} failed: {why}"),
                });
            }
            _ => {}
        }
        if started.elapsed() > timeout {
            let _ = qmp.execute("migrate_cancel", None).await;
            return Err(VmmError::Timeout {
                what: what.to_string(),
                after_ms: timeout.as_millis() as u64,
            });
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_millis(5));
    }
}
