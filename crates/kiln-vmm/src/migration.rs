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

/// The migration capabilities kiln turns on for every save and load; a state's configuration section
/// must name the same ones (`devstate::complete`).
pub const CAPABILITIES: [&str; 1] = ["x-ignore-shared"];

async fn set_ignore_shared(qmp: &Qmp) -> Result<(), VmmError> {
    let caps: Vec<_> = CAPABILITIES
        .iter()
        .map(|c| json!({"capability": c, "state": true}))
        .collect();
    qmp.execute(
        "migrate-set-capabilities",
        Some(json!({ "capabilities": caps })),
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

/// Writes the device and vCPU state of a *stopped* VM, without any RAM, to `path` with
/// `xen-save-devices-state` (milliseconds: QEMU does not walk guest RAM; see `devstate`). The VM stays
/// stopped; `live: false` keeps QEMU from handing its disks off (it would inactivate them for a paused
/// VM otherwise). The file is not loadable as it is: `devstate::complete` makes it so.
pub async fn save_device_state(qmp: &Qmp, path: &Path) -> Result<(), VmmError> {
    qmp.execute(
        "xen-save-devices-state",
        Some(json!({"filename": path.to_string_lossy(), "live": false})),
    )
    .await
    .map(|_| ())
}

/// Like [`save_state`], but QEMU streams to a unix socket at `sock` (in a directory only root may
/// change, reachable by QEMU's uid) and the daemon writes the stream to `out` without the page records of
/// RAM block `block` (see `stripram`): for a VM whose RAM is a private mapping of an immutable file, the
/// pages that differ from it are saved separately, so the state stays tens of KiB. Only QEMU `qemu_pid`
/// may connect. On a stream the filter does not understand, the save fails (the caller may save in full).
pub async fn save_state_without_ram(
    qmp: &Qmp,
    qemu_pid: u32,
    sock: &Path,
    out: &Path,
    block: &str,
    timeout: Duration,
) -> Result<crate::stripram::Stripped, VmmError> {
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::remove_file(sock);
    let listener = tokio::net::UnixListener::bind(sock)
        .map_err(|e| VmmError::io(format!("listening on {}", sock.display()), e))?;
    let result = async {
        std::fs::set_permissions(sock, std::fs::Permissions::from_mode(0o666))
            .map_err(|e| VmmError::io(format!("chmod {}", sock.display()), e))?;
        set_ignore_shared(qmp).await?;
        qmp.execute(
            "migrate",
            Some(json!({"uri": format!("unix:{}", sock.display())})),
        )
        .await?;
        let accepted = tokio::time::timeout(timeout, listener.accept()).await;
        let stream = match accepted {
            Ok(Ok((s, _))) => s,
            Ok(Err(e)) => return Err(VmmError::io("accepting QEMU's migration stream", e)),
            Err(_) => {
                let _ = qmp.execute("migrate_cancel", None).await;
                return Err(VmmError::Timeout {
                    what: "QEMU to connect its migration stream".into(),
                    after_ms: timeout.as_millis() as u64,
                });
            }
        };
        if let Err(e) = crate::qmp::check_peer(&stream, sock, qemu_pid) {
            let _ = qmp.execute("migrate_cancel", None).await;
            return Err(e);
        }
        let stream = stream
            .into_std()
            .map_err(|e| VmmError::io("migration stream", e))?;
        stream
            .set_nonblocking(false)
            .and_then(|()| stream.set_read_timeout(Some(timeout)))
            .map_err(|e| VmmError::io("migration stream", e))?;
        // Kept to end the filter's blocking read at once when QEMU reports the migration failed (it may
        // hold the socket open; the read would otherwise wait out its timeout).
        let closer = stream
            .try_clone()
            .map_err(|e| VmmError::io("migration stream", e))?;
        let out = out.to_path_buf();
        let block = block.to_string();
        let mut filter = tokio::task::spawn_blocking(move || {
            let file = std::fs::File::create(&out)?;
            let w = std::io::BufWriter::with_capacity(1 << 20, file);
            let r = std::io::BufReader::with_capacity(1 << 20, stream);
            // Returning drops the stream: QEMU's write fails and its migration ends, either way.
            crate::stripram::strip(r, w, &block)
        });
        let wait = wait_for_migration(qmp, timeout, "saving VM state");
        tokio::pin!(wait);
        let (waited, filtered) = tokio::select! {
            w = &mut wait => {
                if w.is_err() {
                    let _ = closer.shutdown(std::net::Shutdown::Both);
                }
                (w, filter.await)
            }
            f = &mut filter => {
                // The filter gave up (a stream it does not understand, a write error): QEMU need not
                // run on into a closed socket.
                if !matches!(f, Ok(Ok(_))) {
                    let _ = qmp.execute("migrate_cancel", None).await;
                }
                (wait.await, f)
            }
        };
        let filtered = filtered
            .map_err(|e| VmmError::io("migration stream filter", std::io::Error::other(e)))?
            .map_err(|e| VmmError::io("filtering QEMU's migration stream", e))?;
        waited?;
        Ok(filtered)
    }
    .await;
    drop(listener);
    let _ = std::fs::remove_file(sock);
    result
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
