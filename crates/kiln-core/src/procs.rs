//! Background processes: started, listed, read, fed, signalled and waited for through the guest
//! agent's process table. The table lives in guest memory, so snapshots, forks and stop/start
//! carry it; nothing about processes is kept on the host.

use std::time::Duration;

use kiln_agent_client::{AgentClient, AgentError, ProcAttach, ProcInfo};

use crate::engine::{Engine, ExecSpec};
use crate::error::{Error, ErrorCode, Result};
use crate::guest::need_user_feature;
use crate::model::Sandbox;
use crate::vm::agent_error;

/// The most one stdin write may carry (the agent gets it hex-encoded in one frame).
pub const MAX_STDIN_WRITE: usize = 256 * 1024;

impl Engine {
    async fn procs_agent(&self, id_or_name: &str) -> Result<(Sandbox, AgentClient)> {
        let sb = self.get(id_or_name)?;
        let agent = self.agent_of(&sb).await?;
        if !agent.has_feature("procs") {
            return Err(Error::new(
                ErrorCode::AgentOutdated,
                format!("the guest agent of sandbox {} predates background processes; rebuild its image (kiln image build --force) and create the sandbox again", sb.name),
            ));
        }
        Ok((sb, agent))
    }

    /// Starts a command in the background; it runs on whether or not anyone reads its output.
    pub async fn process_start(
        &self,
        id_or_name: &str,
        spec: ExecSpec,
        stdin: bool,
    ) -> Result<ProcInfo> {
        let sb = self.get(id_or_name)?;
        let req = self.exec_request(&sb, spec, stdin)?;
        let (sb, agent) = self.procs_agent(&sb.id).await?;
        need_user_feature(&agent, &req, &sb.name)?;
        agent
            .proc_start(req)
            .await
            .map_err(|e| proc_error(e, &sb, None))
    }

    pub async fn process_list(&self, id_or_name: &str) -> Result<Vec<ProcInfo>> {
        let (sb, agent) = self.procs_agent(id_or_name).await?;
        agent
            .proc_list()
            .await
            .map_err(|e| proc_error(e, &sb, None))
    }

    pub async fn process_get(&self, id_or_name: &str, pid: u32) -> Result<ProcInfo> {
        let (sb, agent) = self.procs_agent(id_or_name).await?;
        let procs = agent
            .proc_list()
            .await
            .map_err(|e| proc_error(e, &sb, None))?;
        procs
            .into_iter()
            .find(|p| p.pid == pid)
            .ok_or_else(|| not_found(&sb, pid))
    }

    /// Sends `signal` (1-64) to the process's whole process group.
    pub async fn process_signal(&self, id_or_name: &str, pid: u32, signal: i32) -> Result<()> {
        if !(1..=64).contains(&signal) {
            return Err(Error::invalid(format!(
                "signal {signal} is out of range: give 1-64 or a name such as TERM, KILL, INT, HUP"
            )));
        }
        let (sb, agent) = self.procs_agent(id_or_name).await?;
        agent
            .proc_signal(pid, signal)
            .await
            .map_err(|e| proc_error(e, &sb, Some(pid)))
    }

    pub async fn process_stdin(
        &self,
        id_or_name: &str,
        pid: u32,
        data: &[u8],
        close: bool,
    ) -> Result<()> {
        if data.len() > MAX_STDIN_WRITE {
            return Err(Error::invalid(format!(
                "a stdin write carries at most {MAX_STDIN_WRITE} bytes; split it"
            )));
        }
        let (sb, agent) = self.procs_agent(id_or_name).await?;
        agent
            .proc_stdin(pid, data, close)
            .await
            .map_err(|e| proc_error(e, &sb, Some(pid)))
    }

    /// Waits up to `timeout` for the process to end; the answer's `state` says whether it did.
    pub async fn process_wait(
        &self,
        id_or_name: &str,
        pid: u32,
        timeout: Duration,
    ) -> Result<ProcInfo> {
        let (sb, agent) = self.procs_agent(id_or_name).await?;
        agent
            .proc_wait(pid, timeout)
            .await
            .map_err(|e| proc_error(e, &sb, Some(pid)))
    }

    /// Replays the process's retained output, then (if `follow`) streams it live.
    pub async fn process_attach(
        &self,
        id_or_name: &str,
        pid: u32,
        follow: bool,
    ) -> Result<ProcAttach> {
        let (sb, agent) = self.procs_agent(id_or_name).await?;
        agent
            .proc_attach(pid, follow)
            .await
            .map_err(|e| proc_error(e, &sb, Some(pid)))
    }
}

fn not_found(sb: &Sandbox, pid: u32) -> Error {
    Error::new(
        ErrorCode::ProcessNotFound,
        format!(
            "sandbox {} has no background process {pid} (finished ones are kept for a while only); list them with GET /v1/sandboxes/{}/processes",
            sb.name, sb.name
        ),
    )
}

fn proc_error(e: AgentError, sb: &Sandbox, pid: Option<u32>) -> Error {
    use kiln_agent_client::ErrorCode as Guest;
    match (&e, pid) {
        (
            AgentError::Guest {
                code: Guest::NotFound,
                ..
            },
            Some(pid),
        ) => not_found(sb, pid),
        (
            AgentError::Guest {
                code: Guest::Busy,
                message,
            },
            _,
        ) => Error::new(ErrorCode::SandboxBusy, message.clone()),
        (
            AgentError::Guest {
                code: Guest::Unsupported,
                message,
            },
            _,
        ) => Error::new(ErrorCode::AgentOutdated, message.clone()),
        _ => agent_error(e, &sb.name),
    }
}
