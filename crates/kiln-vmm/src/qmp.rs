//! A small async QMP client: one command in flight at a time, events collected on the side.

use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;
use tokio::sync::Mutex;

use crate::error::VmmError;

/// How long one QMP command may take before QEMU counts as unresponsive. Every command kiln sends
/// returns at once (a migration is started and then polled), so this only fires on a QEMU that stopped
/// answering; `KILN_QMP_TIMEOUT_MS` overrides it.
pub fn command_timeout() -> Duration {
    static T: std::sync::OnceLock<Duration> = std::sync::OnceLock::new();
    *T.get_or_init(|| {
        std::env::var("KILN_QMP_TIMEOUT_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .map_or(Duration::from_secs(10), Duration::from_millis)
    })
}

pub struct Qmp {
    inner: Mutex<Conn>,
}

struct Conn {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
    events: Vec<Value>,
    next_id: u64,
}

impl Qmp {
    /// Connects to a QMP socket, retrying until `timeout` (QEMU may still be creating it), and negotiates
    /// capabilities.
    pub async fn connect(path: &Path, timeout: Duration) -> Result<Qmp, VmmError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let stream = loop {
            match UnixStream::connect(path).await {
                Ok(s) => break s,
                Err(e) if tokio::time::Instant::now() >= deadline => {
                    return Err(VmmError::QmpConnect {
                        path: path.to_path_buf(),
                        source: e,
                    })
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        };
        let (r, w) = stream.into_split();
        let mut conn = Conn {
            reader: BufReader::new(r),
            writer: w,
            events: Vec::new(),
            next_id: 1,
        };
        // A connect succeeds even when QEMU is stopped (the kernel queues it); the greeting shows it lives.
        let greeting = tokio::time::timeout(timeout, conn.read_message())
            .await
            .map_err(|_| VmmError::Unresponsive {
                what: "the QMP greeting".into(),
                after_ms: timeout.as_millis() as u64,
            })??;
        if greeting.get("QMP").is_none() {
            return Err(VmmError::QmpProtocol(format!(
                "expected a QMP greeting, got {greeting}"
            )));
        }
        let qmp = Qmp {
            inner: Mutex::new(conn),
        };
        qmp.execute("qmp_capabilities", None).await?;
        Ok(qmp)
    }

    /// Runs one command and returns its `return` value, failing with `Unresponsive` after
    /// [`command_timeout`]. A late answer to a command given up on is skipped by its id.
    pub async fn execute(
        &self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<Value, VmmError> {
        let limit = command_timeout();
        tokio::time::timeout(limit, self.execute_unbounded(command, arguments))
            .await
            .map_err(|_| VmmError::Unresponsive {
                what: format!("the QMP command '{command}'"),
                after_ms: limit.as_millis() as u64,
            })?
    }

    async fn execute_unbounded(
        &self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<Value, VmmError> {
        let mut conn = self.inner.lock().await;
        let id = conn.next_id;
        conn.next_id += 1;
        let mut msg = json!({ "execute": command, "id": id });
        if let Some(args) = arguments {
            msg["arguments"] = args;
        }
        let mut line = msg.to_string();
        line.push('\n');
        conn.writer
            .write_all(line.as_bytes())
            .await
            .map_err(|_| VmmError::QmpClosed)?;
        loop {
            let reply = conn.read_message().await?;
            if reply.get("event").is_some() {
                conn.events.push(reply);
                continue;
            }
            if reply.get("id").and_then(Value::as_u64) != Some(id) {
                continue;
            }
            if let Some(ret) = reply.get("return") {
                return Ok(ret.clone());
            }
            let err = reply.get("error").cloned().unwrap_or(Value::Null);
            return Err(VmmError::QmpCommand {
                command: command.to_string(),
                class: err["class"].as_str().unwrap_or("unknown").to_string(),
                desc: err["desc"].as_str().unwrap_or("no description").to_string(),
            });
        }
    }

    /// `query-status`'s `status` field: "running", "paused", "inmigrate", "postmigrate", ...
    pub async fn status(&self) -> Result<String, VmmError> {
        let v = self.execute("query-status", None).await?;
        Ok(v["status"].as_str().unwrap_or("unknown").to_string())
    }

    /// Events received so far (drained).
    pub async fn take_events(&self) -> Vec<Value> {
        std::mem::take(&mut self.inner.lock().await.events)
    }
}

impl Conn {
    async fn read_message(&mut self) -> Result<Value, VmmError> {
        let mut line = String::new();
        loop {
            line.clear();
            let n = self
                .reader
                .read_line(&mut line)
                .await
                .map_err(|_| VmmError::QmpClosed)?;
            if n == 0 {
                return Err(VmmError::QmpClosed);
            }
            if line.trim().is_empty() {
                continue;
            }
            return parse_message(line.trim()).map_err(|e| {
                let shown: String = line.chars().take(300).collect();
                VmmError::QmpProtocol(format!("bad JSON from QEMU ({e}): {shown}"))
            });
        }
    }
}

impl Qmp {
    /// Node name of the active (top) image behind the block device whose qdev path contains `device_id`.
    pub async fn active_node(&self, device_id: &str) -> Result<String, VmmError> {
        let blocks = self.execute("query-block", None).await?;
        blocks
            .as_array()
            .into_iter()
            .flatten()
            .find(|b| b["qdev"].as_str().is_some_and(|q| q.contains(device_id)))
            .and_then(|b| b["inserted"]["node-name"].as_str())
            .map(str::to_string)
            .ok_or_else(|| {
                VmmError::QmpProtocol(format!("no block device '{device_id}' in query-block"))
            })
    }

    /// Makes `overlay_path` (a qcow2 file already created on top of the current top image) the new
    /// active layer: QEMU writes there from now on and the old top becomes a read-only backing file.
    pub async fn snapshot_disk(
        &self,
        device_id: &str,
        overlay_path: &std::path::Path,
        overlay_node: &str,
    ) -> Result<(), VmmError> {
        let current = self.active_node(device_id).await?;
        self.execute(
            "blockdev-add",
            Some(serde_json::json!({
                "driver": "qcow2",
                "node-name": overlay_node,
                "file": {"driver": "file", "filename": overlay_path.to_string_lossy()},
                "backing": null,
                "discard": "unmap",
            })),
        )
        .await?;
        self.execute(
            "blockdev-snapshot",
            Some(serde_json::json!({"node": current, "overlay": overlay_node})),
        )
        .await
        .map(|_| ())
    }
}

/// Parses one QMP message. `query-block` nests one `backing-image` object per disk layer, and a sandbox
/// snapshotted many times has a deep chain, so serde_json's default nesting limit (128) is lifted.
fn parse_message(line: &str) -> serde_json::Result<Value> {
    use serde::Deserialize;
    let mut de = serde_json::Deserializer::from_str(line);
    de.disable_recursion_limit();
    let v = Value::deserialize(&mut de)?;
    de.end()?;
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A real QEMU that stops answering after the greeting (SIGSTOP): the next command fails as
    /// `Unresponsive` after the command deadline instead of waiting forever.
    #[tokio::test]
    async fn a_stopped_qemu_fails_a_command_at_its_deadline() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("qmp.sock");
        let spawned = std::process::Command::new(crate::qemu_binary())
            .args([
                "-M",
                "none",
                "-accel",
                "tcg",
                "-nodefaults",
                "-display",
                "none",
                "-S",
            ])
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", sock.display()))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn();
        let Ok(mut child) = spawned else {
            eprintln!("QEMU not installed; skipped");
            return;
        };
        let qmp = Qmp::connect(&sock, Duration::from_secs(10)).await.unwrap();
        assert!(!qmp.status().await.unwrap().is_empty());
        crate::process::signal(child.id(), libc::SIGSTOP);
        let t0 = std::time::Instant::now();
        let r = qmp.status().await;
        let took = t0.elapsed();
        crate::process::signal(child.id(), libc::SIGCONT);
        let _ = child.kill();
        let _ = child.wait();
        assert!(matches!(r, Err(VmmError::Unresponsive { .. })), "{r:?}");
        assert!(took >= command_timeout() && took < command_timeout() + Duration::from_secs(5));
    }

    #[test]
    fn answers_nested_deeper_than_serde_default_parse() {
        let depth = 400;
        let line = format!("{}1{}", "{\"a\":".repeat(depth), "}".repeat(depth));
        assert!(parse_message(&line).is_ok());
        assert!(parse_message("{\"a\": 1} trailing").is_err());
    }
}
