//! Whole directories in and out of a sandbox (tar streams the guest agent packs and unpacks), batch
//! writes and directory watches. The daemon never touches guest paths: all of it happens in the agent.

use kiln_agent_client::{AgentClient, AgentError, FileDownload, FileWatch};
use tokio::io::AsyncRead;

use crate::engine::Engine;
use crate::error::{Error, ErrorCode, Result};
use crate::model::Sandbox;
use crate::validate;
use crate::vm::agent_error;

/// Most files one batch write may carry.
pub const MAX_BATCH_FILES: usize = 1000;

/// One file of a batch write.
#[derive(Debug, Clone)]
pub struct BatchFile {
    pub path: String,
    pub mode: Option<u32>,
    pub content: Vec<u8>,
}

impl Engine {
    async fn dirs_agent(
        &self,
        id_or_name: &str,
        feature: &str,
        what: &str,
    ) -> Result<(Sandbox, AgentClient)> {
        let sb = self.get(id_or_name)?;
        let agent = self.agent_of(&sb).await?;
        if !agent.has_feature(feature) {
            return Err(Error::new(
                ErrorCode::AgentOutdated,
                format!("the guest agent of sandbox {} predates {what}; rebuild its image (kiln image build --force) and create the sandbox again", sb.name),
            ));
        }
        Ok((sb, agent))
    }

    /// Unpacks a tar stream under the guest directory `path`; returns (entries, tar bytes).
    pub async fn upload_dir<R: AsyncRead + Unpin + Send>(
        &self,
        id_or_name: &str,
        path: &str,
        body: R,
    ) -> Result<(u64, u64)> {
        validate::guest_path(path)?;
        let (sb, agent) = self
            .dirs_agent(id_or_name, "tar", "directory uploads")
            .await?;
        agent
            .unpack_tar(path, body)
            .await
            .map_err(|e| dir_error(e, &sb.name))
    }

    /// Streams a tar of the guest directory `path`.
    pub async fn download_dir(&self, id_or_name: &str, path: &str) -> Result<FileDownload> {
        validate::guest_path(path)?;
        let (sb, agent) = self
            .dirs_agent(id_or_name, "tar", "directory downloads")
            .await?;
        agent
            .pack_tar(path)
            .await
            .map_err(|e| dir_error(e, &sb.name))
    }

    /// Watches the guest directory `path`; dropping the watch ends it in the guest.
    pub async fn watch_dir(
        &self,
        id_or_name: &str,
        path: &str,
        recursive: bool,
    ) -> Result<FileWatch> {
        validate::guest_path(path)?;
        let (sb, agent) = self
            .dirs_agent(id_or_name, "watch", "directory watches")
            .await?;
        agent
            .watch(path, recursive)
            .await
            .map_err(|e| dir_error(e, &sb.name))
    }

    /// Writes several files, each atomically and in order, creating parents. Stops at the first
    /// failure: the files before it are written, the rest are not (the error says which failed).
    pub async fn write_files(&self, id_or_name: &str, files: &[BatchFile]) -> Result<Vec<u64>> {
        if files.is_empty() || files.len() > MAX_BATCH_FILES {
            return Err(Error::invalid(format!(
                "a batch write takes 1 to {MAX_BATCH_FILES} files; send more in several batches or as a tar (PUT /v1/sandboxes/{{id}}/files/dir)"
            )));
        }
        for f in files {
            validate::guest_path(&f.path)?;
            if f.mode.is_some_and(|m| m > 0o7777) {
                return Err(Error::invalid(format!(
                    "file mode of {} must be at most 0o7777",
                    f.path
                )));
            }
        }
        let sb = self.get(id_or_name)?;
        let agent = self.agent_of(&sb).await?;
        let mut written = Vec::with_capacity(files.len());
        for (i, f) in files.iter().enumerate() {
            let bytes = agent
                .write_file(&f.path, f.mode, true, f.content.as_slice())
                .await
                .map_err(|e| {
                    let e = agent_error(e, &sb.name);
                    let message = format!(
                        "{} (file {} of the batch, {}; the {i} before it were written)",
                        e.message,
                        i + 1,
                        f.path
                    );
                    Error::new(e.code, message)
                })?;
            written.push(bytes);
        }
        Ok(written)
    }
}

fn dir_error(e: AgentError, name: &str) -> Error {
    match e {
        AgentError::Guest {
            code: kiln_agent_client::ErrorCode::PathEscape,
            message,
        } => Error::new(ErrorCode::PathEscape, message),
        AgentError::Guest {
            code: kiln_agent_client::ErrorCode::Unsupported,
            message,
        } => Error::invalid(message),
        other => agent_error(other, name),
    }
}
