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
    /// Set once a line was refused: the stream is mid-line from then on, so nothing more is read.
    broken: Option<String>,
}

impl Qmp {
    /// Connects to a QMP socket, retrying until `timeout` (QEMU may still be creating it), and negotiates
    /// capabilities.
    pub async fn connect(path: &Path, timeout: Duration) -> Result<Qmp, VmmError> {
        Qmp::connect_inner(path, None, timeout).await
    }

    /// Like [`Qmp::connect`], but only to a socket served by process `qemu_pid`: the socket is found by name
    /// in a directory the VM's uid can write, so it may have been swapped for another VM's.
    pub async fn connect_to(
        path: &Path,
        qemu_pid: u32,
        timeout: Duration,
    ) -> Result<Qmp, VmmError> {
        Qmp::connect_inner(path, Some(qemu_pid), timeout).await
    }

    async fn connect_inner(
        path: &Path,
        qemu_pid: Option<u32>,
        timeout: Duration,
    ) -> Result<Qmp, VmmError> {
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
        if let Some(pid) = qemu_pid {
            check_peer(&stream, path, pid)?;
        }
        let (r, w) = stream.into_split();
        let mut conn = Conn {
            reader: BufReader::new(r),
            writer: w,
            events: Vec::new(),
            next_id: 1,
            broken: None,
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

/// Longest QMP line kiln accepts. The largest legitimate answer is `query-block` of a long disk chain
/// (under 0.5 KiB per layer, measured in the tests); anything longer is a hostile or broken QEMU, and reading it
/// whole would let that QEMU grow the root daemon without bound.
pub const MAX_LINE_BYTES: usize = 16 << 20;

/// Deepest JSON nesting kiln parses, the limit QEMU's own JSON parser applies to what it reads.
/// serde_json's limit (128) is lifted for deep `query-block` chains (one level per layer), but parsing
/// and dropping recurse once per level: unbounded nesting from a hostile QEMU would overflow a worker's
/// stack and abort the daemon (4096 levels already do on a 2 MiB stack; 1024 fit in 1 MiB).
pub const MAX_DEPTH: usize = 1024;

impl Conn {
    async fn read_message(&mut self) -> Result<Value, VmmError> {
        if let Some(why) = &self.broken {
            return Err(VmmError::QmpProtocol(why.clone()));
        }
        let mut line = Vec::new();
        loop {
            line.clear();
            let n = match read_line_bounded(&mut self.reader, &mut line, MAX_LINE_BYTES).await {
                Ok(n) => n,
                Err(e) => {
                    if let VmmError::QmpProtocol(why) = &e {
                        self.broken = Some(why.clone());
                    }
                    return Err(e);
                }
            };
            if n == 0 {
                return Err(VmmError::QmpClosed);
            }
            let text = String::from_utf8_lossy(&line);
            if text.trim().is_empty() {
                continue;
            }
            return parse_message(text.trim()).map_err(|e| {
                let shown: String = text.chars().take(300).collect();
                VmmError::QmpProtocol(format!("bad JSON from QEMU ({e}): {shown}"))
            });
        }
    }
}

/// Reads one line (up to and including `\n`) into `out`, failing once it passes `max` bytes instead of
/// buffering the rest. Returns the bytes read; 0 at end of stream.
async fn read_line_bounded<R: tokio::io::AsyncBufRead + Unpin>(
    reader: &mut R,
    out: &mut Vec<u8>,
    max: usize,
) -> Result<usize, VmmError> {
    let mut total = 0;
    loop {
        let buf = reader.fill_buf().await.map_err(|_| VmmError::QmpClosed)?;
        if buf.is_empty() {
            return Ok(total);
        }
        let (take, done) = match buf.iter().position(|&b| b == b'\n') {
            Some(i) => (i + 1, true),
            None => (buf.len(), false),
        };
        if total + take > max {
            return Err(VmmError::QmpProtocol(format!(
                "QEMU sent a QMP line longer than {max} bytes; the VM is treated as failed"
            )));
        }
        out.extend_from_slice(&buf[..take]);
        reader.consume(take);
        total += take;
        if done {
            return Ok(total);
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

    /// Opens `overlay_path` (a qcow2 file already created on top of the current top image) as node
    /// `overlay_node`, not yet attached to anything. [`Qmp::switch_to_overlay`] makes it the active layer.
    /// `aio` as the disk's other layers have it ([`crate::qemu::disk_io`]).
    pub async fn add_overlay(
        &self,
        overlay_path: &std::path::Path,
        overlay_node: &str,
        aio: Option<&str>,
    ) -> Result<(), VmmError> {
        let mut file =
            serde_json::json!({"driver": "file", "filename": overlay_path.to_string_lossy()});
        if let Some(aio) = aio {
            file["aio"] = aio.into();
        }
        self.execute(
            "blockdev-add",
            Some(serde_json::json!({
                "driver": "qcow2",
                "node-name": overlay_node,
                "file": file,
                "backing": null,
                "discard": "unmap",
            })),
        )
        .await
        .map(|_| ())
    }

    /// Makes the added `overlay_node` the active layer of `device_id`: QEMU writes there from now on and the
    /// old top becomes a read-only backing node. On failure the overlay node is removed again, so QEMU does
    /// not keep its file open for writing.
    pub async fn switch_to_overlay(
        &self,
        device_id: &str,
        overlay_node: &str,
    ) -> Result<(), VmmError> {
        let switched = match self.active_node(device_id).await {
            Ok(current) => self
                .execute(
                    "blockdev-snapshot",
                    Some(serde_json::json!({"node": current, "overlay": overlay_node})),
                )
                .await
                .map(|_| ()),
            Err(e) => Err(e),
        };
        if switched.is_err() {
            let _ = self.remove_node(overlay_node).await;
        }
        switched
    }

    /// Closes a node that nothing uses (`blockdev-del`), releasing its file and image lock.
    pub async fn remove_node(&self, node: &str) -> Result<(), VmmError> {
        self.execute("blockdev-del", Some(serde_json::json!({"node-name": node})))
            .await
            .map(|_| ())
    }

    /// Every file QEMU has open as a block device, with whether it is open for writing. Format nodes
    /// report synthesized `json:` names once their backing is set explicitly, so the plain paths come
    /// from the protocol (`file`) nodes.
    pub async fn open_files(&self) -> Result<Vec<(std::path::PathBuf, bool)>, VmmError> {
        let nodes = self
            .execute(
                "query-named-block-nodes",
                Some(serde_json::json!({"flat": true})),
            )
            .await?;
        Ok(nodes
            .as_array()
            .into_iter()
            .flatten()
            .filter(|n| n["drv"] == "file")
            .filter_map(|n| {
                let path = n["file"].as_str()?;
                Some((path.into(), !n["ro"].as_bool().unwrap_or(false)))
            })
            .collect())
    }
}

/// Fails unless the process at the other end of `stream` (SO_PEERCRED: the one that listens) is `qemu_pid`.
pub fn check_peer(stream: &UnixStream, path: &Path, qemu_pid: u32) -> Result<(), VmmError> {
    let cred = stream
        .peer_cred()
        .map_err(|e| VmmError::io(format!("reading the peer of {}", path.display()), e))?;
    let peer_pid = cred.pid().map(i64::from).unwrap_or(-1);
    if peer_pid == i64::from(qemu_pid) {
        return Ok(());
    }
    Err(VmmError::ForeignSocket {
        path: path.to_path_buf(),
        qemu_pid,
        peer_pid,
        peer_uid: cred.uid(),
    })
}

/// Parses one QMP message. `query-block` nests one `backing-image` object per disk layer, and a sandbox
/// snapshotted many times has a deep chain, so serde_json's default nesting limit (128) is lifted.
/// Nesting past [`MAX_DEPTH`] is refused before parsing, so a hostile line cannot overflow the stack.
fn parse_message(line: &str) -> serde_json::Result<Value> {
    use serde::de::Error as _;
    use serde::Deserialize;
    if nesting_depth(line.as_bytes()) > MAX_DEPTH {
        return Err(serde_json::Error::custom(format!(
            "nested deeper than {MAX_DEPTH} levels"
        )));
    }
    let mut de = serde_json::Deserializer::from_str(line);
    de.disable_recursion_limit();
    let v = Value::deserialize(&mut de)?;
    de.end()?;
    Ok(v)
}

/// Deepest bracket nesting of a JSON text, skipping brackets inside strings.
fn nesting_depth(text: &[u8]) -> usize {
    let (mut depth, mut max, mut in_str, mut escaped) = (0usize, 0usize, false, false);
    for &b in text {
        if in_str {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_str = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_str = true,
            b'{' | b'[' => {
                depth += 1;
                max = max.max(depth);
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    max
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

    /// A hostile QMP peer answers `qmp_capabilities` with a line that never ends: the client gives up
    /// after `MAX_LINE_BYTES` with a protocol error (the VM counts as failed) instead of buffering it.
    #[tokio::test]
    async fn an_endless_qmp_line_is_refused_at_the_bound() {
        use tokio::io::AsyncReadExt;
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("qmp.sock");
        let listener = tokio::net::UnixListener::bind(&sock).unwrap();
        let peer = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            s.write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\n")
                .await
                .unwrap();
            let mut cmd = [0u8; 256];
            let _ = s.read(&mut cmd).await;
            let chunk = vec![b'x'; 1 << 20];
            let mut sent = 0usize;
            // Until the client hangs up (or far past the bound, so a test of old code ends too).
            while sent < 4 * MAX_LINE_BYTES && s.write_all(&chunk).await.is_ok() {
                sent += chunk.len();
            }
            sent
        });
        let r = Qmp::connect(&sock, Duration::from_secs(5)).await;
        let err = r.err().expect("an endless line must not be accepted");
        assert!(
            matches!(&err, VmmError::QmpProtocol(m) if m.contains("longer than")),
            "{err:?}"
        );
        let sent = peer.await.unwrap();
        assert!(sent < 2 * MAX_LINE_BYTES, "client read {sent} bytes");
    }

    /// Nesting past `MAX_DEPTH` is refused before parsing; `MAX_DEPTH` itself parses (and drops) on a
    /// thread with half a tokio worker's 2 MiB stack.
    #[test]
    fn nesting_is_bounded_and_the_bound_fits_a_worker_stack() {
        let deep = |d: usize| format!("{}1{}", "{\"a\":".repeat(d), "}".repeat(d));
        assert!(parse_message(&deep(MAX_DEPTH + 1)).is_err());
        let hostile = "[".repeat(MAX_LINE_BYTES / 2);
        assert!(parse_message(&hostile).is_err());
        let ok = std::thread::Builder::new()
            .stack_size(1 << 20)
            .spawn(move || parse_message(&deep(MAX_DEPTH)).is_ok())
            .unwrap()
            .join()
            .unwrap();
        assert!(ok);
        assert_eq!(nesting_depth(br#"{"a": "[[[{{", "b": ["\"]"]}"#), 2);
    }

    /// Measures `query-block` of a real QEMU holding a 100-layer qcow2 chain: bytes per layer and depth
    /// stay far inside `MAX_LINE_BYTES` and `MAX_DEPTH`, so the bounds leave room for long chains.
    #[tokio::test]
    async fn a_long_chain_query_block_fits_the_bounds() {
        let layers = 100;
        let dir = tempfile::tempdir().unwrap();
        let img = |i: usize| dir.path().join(format!("l{i}.qcow2"));
        let made = std::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(img(0))
            .arg("1M")
            .status();
        if !made.is_ok_and(|s| s.success()) {
            eprintln!("qemu-img not installed; skipped");
            return;
        }
        for i in 1..layers {
            let ok = std::process::Command::new("qemu-img")
                .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
                .arg(img(i - 1))
                .arg(img(i))
                .status()
                .unwrap()
                .success();
            assert!(ok);
        }
        let sock = dir.path().join("qmp.sock");
        let mut child = std::process::Command::new(crate::qemu_binary())
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
            .arg("-drive")
            .arg(format!("file={},if=none,id=d0", img(layers - 1).display()))
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", sock.display()))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let qmp = Qmp::connect(&sock, Duration::from_secs(10)).await.unwrap();
        let blocks = qmp.execute("query-block", None).await;
        let _ = child.kill();
        let _ = child.wait();
        let line = blocks.unwrap().to_string();
        let depth = nesting_depth(line.as_bytes());
        eprintln!(
            "query-block, {layers} layers: {} bytes ({} per layer), depth {depth}",
            line.len(),
            line.len() / layers
        );
        assert!(line.len() * 100 < MAX_LINE_BYTES);
        assert!(depth >= layers && depth - layers < 10 && depth * 5 < MAX_DEPTH);
    }
}
