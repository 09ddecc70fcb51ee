//! Test harness: runs the real agent binary in `--connect-unix` mode against a socket the test
//! listens on, optionally behind a stand-in for QEMU's chardev so host clients can come and go.

#![allow(dead_code)] // each test binary uses a different part of the harness

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use kiln_agent_client::{AgentClient, HelloInfo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::OwnedWriteHalf;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Mutex;

pub const TIMEOUT: Duration = Duration::from_secs(10);

/// The agent binary: `$KILN_AGENT_BIN` if set (e.g. the static release build), otherwise
/// built once per test binary (cargo makes that a no-op when it is up to date) at the path
/// cargo reports.
pub fn agent_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(bin) = std::env::var_os("KILN_AGENT_BIN") {
            return PathBuf::from(bin);
        }
        let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../Cargo.toml");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let out = Command::new(cargo)
            .args([
                "build",
                "-p",
                "kiln-agent",
                "--message-format=json-render-diagnostics",
            ])
            .arg("--manifest-path")
            .arg(&manifest)
            .stderr(Stdio::inherit())
            .output()
            .expect("run cargo build -p kiln-agent");
        assert!(out.status.success(), "building kiln-agent failed");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
            .filter(|msg| msg["target"]["name"] == "kiln-agent")
            .find_map(|msg| msg["executable"].as_str().map(PathBuf::from))
            .expect("cargo reported no kiln-agent executable")
    })
}

/// A running agent process, killed on drop.
pub struct Agent {
    pub child: Child,
    pub dir: tempfile::TempDir,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts an agent that connects to `socket`, wrapped in `wrapper` (e.g. `unshare ...`) if given.
fn spawn_agent(socket: &Path, wrapper: &[&str]) -> Child {
    let (prog, args) = match wrapper.split_first() {
        Some((prog, args)) => (
            PathBuf::from(prog),
            args.iter()
                .map(PathBuf::from)
                .chain([agent_bin().to_path_buf()])
                .collect(),
        ),
        None => (agent_bin().to_path_buf(), Vec::new()),
    };
    Command::new(prog)
        .args(args)
        .arg("--connect-unix")
        .arg(socket)
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn kiln-agent")
}

async fn accept(listener: &UnixListener) -> UnixStream {
    let (stream, _) = tokio::time::timeout(TIMEOUT, listener.accept())
        .await
        .expect("the agent did not connect")
        .expect("accept");
    stream
}

/// An agent connected straight to the test, which plays the host.
pub async fn direct_agent_raw(wrapper: &[&str]) -> (Agent, UnixStream) {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("agent.sock");
    let listener = UnixListener::bind(&socket).expect("bind");
    let child = spawn_agent(&socket, wrapper);
    let stream = accept(&listener).await;
    (Agent { child, dir }, stream)
}

pub async fn direct_agent() -> (Agent, AgentClient, HelloInfo) {
    direct_agent_in(&[]).await
}

pub async fn direct_agent_in(wrapper: &[&str]) -> (Agent, AgentClient, HelloInfo) {
    let (agent, stream) = direct_agent_raw(wrapper).await;
    let (client, hello) = AgentClient::from_stream(stream, TIMEOUT)
        .await
        .expect("hello");
    (agent, client, hello)
}

/// Stands in for QEMU's `-chardev socket,server=on`: the agent stays connected while host
/// clients connect to `host_socket` one at a time; agent output with no host attached is
/// dropped, like QEMU does.
pub struct Chardev {
    pub agent: Agent,
    pub host_socket: PathBuf,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Chardev {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub async fn chardev_agent() -> Chardev {
    let dir = tempfile::tempdir().expect("tempdir");
    let agent_socket = dir.path().join("agent.sock");
    let host_socket = dir.path().join("host.sock");
    let agent_listener = UnixListener::bind(&agent_socket).expect("bind");
    let host_listener = UnixListener::bind(&host_socket).expect("bind");
    let child = spawn_agent(&agent_socket, &[]);
    let agent_stream = accept(&agent_listener).await;
    let task = tokio::spawn(relay(agent_stream, host_listener));
    Chardev {
        agent: Agent { child, dir },
        host_socket,
        task,
    }
}

async fn relay(agent: UnixStream, hosts: UnixListener) {
    let (mut agent_rd, mut agent_wr) = agent.into_split();
    let host: Arc<Mutex<Option<OwnedWriteHalf>>> = Arc::new(Mutex::new(None));
    let to_host = Arc::clone(&host);
    let forward = tokio::spawn(async move {
        let mut buf = vec![0u8; 64 * 1024];
        while let Ok(n) = agent_rd.read(&mut buf).await {
            if n == 0 {
                break;
            }
            let mut slot = to_host.lock().await;
            if let Some(w) = slot.as_mut() {
                if w.write_all(&buf[..n]).await.is_err() {
                    *slot = None;
                }
            }
        }
    });
    while let Ok((stream, _)) = hosts.accept().await {
        let (mut rd, wr) = stream.into_split();
        *host.lock().await = Some(wr);
        let mut buf = vec![0u8; 64 * 1024];
        while let Ok(n) = rd.read(&mut buf).await {
            if n == 0 || agent_wr.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
        *host.lock().await = None;
    }
    forward.abort();
}
