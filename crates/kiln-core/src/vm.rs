//! A running VM as the engine sees it: its QEMU process, its QMP socket and its guest agent connection.

use std::path::PathBuf;
use std::time::Duration;

use kiln_agent_client::{AgentClient, AgentError};
use kiln_vmm::Qmp;
use tokio::sync::Mutex;

use crate::error::{Error, ErrorCode, Result};

/// The subdirectory of a sandbox's (root-owned) directory that belongs to its VM's uid: QEMU creates its
/// sockets, pid file, logs and migration output there, and nowhere else.
pub(crate) const VM_DIR: &str = "vm";

pub fn vm_name(id: &str) -> String {
    format!("kiln-{id}")
}

pub struct Vm {
    pub name: String,
    /// The sandbox's directory.
    pub run_dir: PathBuf,
    pub pid: u32,
    agent: Mutex<Option<AgentClient>>,
    /// How often connecting to the agent is retried (per accelerator: `Accel::tuning`).
    retry: kiln_agent_client::Retry,
    /// Copies the serial console into its ring while QEMU runs (see `console`).
    console_pump: Option<tokio::task::JoinHandle<()>>,
}

impl Vm {
    pub fn new(name: String, run_dir: PathBuf, pid: u32, agent: Option<AgentClient>) -> Vm {
        let console_pump = (pid != 0).then(|| {
            crate::console::spawn_pump(
                run_dir.join(VM_DIR).join("console.sock"),
                crate::console::ring_path(&name, &run_dir),
                pid,
                name.clone(),
            )
        });
        Vm {
            name,
            run_dir,
            pid,
            agent: Mutex::new(agent),
            retry: kiln_agent_client::Retry::default(),
            console_pump: console_pump.flatten(),
        }
    }

    /// The agent connection's retry intervals for this accelerator.
    pub fn with_accel(mut self, accel: kiln_vmm::Accel) -> Vm {
        let t = accel.tuning();
        self.retry = kiln_agent_client::Retry {
            connect: t.connect_retry,
            hello: t.hello_retry,
        };
        self
    }

    /// A file QEMU created: in `vm/`, or directly in the sandbox directory for a VM launched by an older
    /// kiln (still running, or its logs after it stopped).
    pub fn qemu_file(&self, name: &str) -> PathBuf {
        let new = self.run_dir.join(VM_DIR).join(name);
        let legacy = self.run_dir.join(name);
        if std::fs::symlink_metadata(&new).is_err() && std::fs::symlink_metadata(&legacy).is_ok() {
            return legacy;
        }
        new
    }

    pub fn agent_socket(&self) -> PathBuf {
        self.qemu_file("agent.sock")
    }
    pub fn qmp_socket(&self) -> PathBuf {
        self.qemu_file("qmp.sock")
    }
    /// The console ring (root-owned, bounded); read it with `console::tail_lines`/`tail_bytes`.
    pub fn console_log(&self) -> PathBuf {
        crate::console::ring_path(&self.name, &self.run_dir)
    }

    /// The console's last `n` lines; if QEMU is gone, first lets the pump take what it still had queued.
    pub async fn console_tail(&self, n: usize) -> String {
        if let Some(pump) = &self.console_pump {
            let deadline = std::time::Instant::now() + Duration::from_secs(1);
            while !pump.is_finished() && !self.is_alive() && std::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        crate::console::tail_lines(&self.console_log(), n)
    }

    pub fn is_alive(&self) -> bool {
        kiln_vmm::process::is_our_qemu(self.pid, &self.name)
    }

    /// The agent connection, reconnecting when it was lost (e.g. after a daemon restart).
    pub async fn agent(&self, timeout: Duration) -> Result<AgentClient> {
        let mut slot = self.agent.lock().await;
        if let Some(client) = slot.as_ref() {
            if client.is_connected() {
                return Ok(client.clone());
            }
        }
        if !self.is_alive() {
            return Err(self.died_error());
        }
        let (client, _hello) =
            AgentClient::connect_to(&self.agent_socket(), self.pid, timeout, self.retry)
                .await
                .map_err(|e| agent_error(e, &self.name))?;
        *slot = Some(client.clone());
        Ok(client)
    }

    pub async fn qmp(&self) -> Result<Qmp> {
        Ok(Qmp::connect_to(&self.qmp_socket(), self.pid, Duration::from_secs(5)).await?)
    }

    pub fn died_error(&self) -> Error {
        let tail = crate::console::tail_lines(&self.console_log(), 15);
        let mut message = format!(
            "the VM process of {} is gone (QEMU exited). Last console lines:\n{}",
            self.name, tail
        );
        // An abort or assertion in QEMU says why on its stderr; the guest's console cannot.
        let stderr = self.qemu_stderr_tail();
        if !stderr.is_empty() {
            message.push_str(&format!("\nQEMU's last stderr lines:\n{stderr}"));
        }
        Error::new(ErrorCode::VmFailed, message)
    }

    /// The last lines QEMU wrote to its stderr (a file in the VM's directory: read without following a
    /// link its uid may have planted, and bounded).
    fn qemu_stderr_tail(&self) -> String {
        const MAX: u64 = 2048;
        let bytes =
            kiln_vmm::safefs::read_tail(&self.qemu_file("qemu.stderr"), MAX).unwrap_or_default();
        let text = String::from_utf8_lossy(&bytes);
        // A full read may start mid-line: that first piece goes.
        let skip = usize::from(bytes.len() as u64 == MAX);
        let lines: Vec<&str> = text
            .lines()
            .skip(skip)
            .filter(|l| !l.trim().is_empty())
            .collect();
        lines[lines.len().saturating_sub(8)..].join("\n")
    }

    pub async fn terminate(&self) {
        *self.agent.lock().await = None;
        kiln_vmm::process::terminate(self.pid, &self.name, Duration::from_secs(3)).await;
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if let Some(pump) = &self.console_pump {
            pump.abort();
        }
    }
}

pub fn agent_error(e: AgentError, what: &str) -> Error {
    match e {
        AgentError::Guest { code, message } => {
            let code = match code {
                kiln_agent_client::ErrorCode::NotFound => ErrorCode::GuestPathNotFound,
                kiln_agent_client::ErrorCode::IsADirectory
                | kiln_agent_client::ErrorCode::NotADirectory
                | kiln_agent_client::ErrorCode::DirectoryNotEmpty
                | kiln_agent_client::ErrorCode::AlreadyExists => ErrorCode::GuestPathConflict,
                kiln_agent_client::ErrorCode::PermissionDenied => ErrorCode::GuestPermissionDenied,
                kiln_agent_client::ErrorCode::InvalidArgument => ErrorCode::InvalidRequest,
                kiln_agent_client::ErrorCode::NoSpace => ErrorCode::GuestDiskFull,
                kiln_agent_client::ErrorCode::ExecFailed => ErrorCode::ExecFailed,
                _ => ErrorCode::GuestError,
            };
            let message = if code == ErrorCode::GuestDiskFull {
                format!("{message}; nothing was written. Free space in the sandbox (or create it with a larger --disk-size) and try again")
            } else {
                message
            };
            Error::new(code, message)
        }
        AgentError::ForeignSocket { .. } => Error::new(ErrorCode::VmFailed, format!("{what}: {e}")),
        AgentError::Timeout { .. } | AgentError::Overrun { .. } => {
            Error::new(ErrorCode::Timeout, format!("{what}: {e}"))
        }
        other => Error::new(
            ErrorCode::AgentUnavailable,
            format!("the guest agent of {what} is not answering: {other}"),
        ),
    }
}
