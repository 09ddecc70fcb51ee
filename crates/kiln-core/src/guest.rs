//! Working inside a running sandbox through its guest agent: commands and files.

use std::time::Duration;

use kiln_agent_client::{ExecHandle, ExecRequest, FileDownload};
use tokio::io::AsyncRead;

use crate::engine::{Engine, ExecSpec};
use crate::error::{Error, Result};
use crate::model::Sandbox;
use crate::validate;
use crate::vm::agent_error;

impl Engine {
    pub(crate) async fn agent_of(&self, sb: &Sandbox) -> Result<kiln_agent_client::AgentClient> {
        // Shared lifecycle lock while the VM is found and connected, not while the command runs (engine.rs
        // Slot). The record is read again under it: a stop or delete may have finished meanwhile.
        let (_shared, sb) = self.read_locked_awake(&sb.id).await?;
        let vm = self.running_vm(&sb).await?;
        vm.agent(Duration::from_secs(10)).await
    }

    /// Starts a command; the handle streams its output and exit status.
    pub async fn exec(&self, id_or_name: &str, spec: ExecSpec, stdin: bool) -> Result<ExecHandle> {
        let began = std::time::Instant::now();
        let sb = self.get(id_or_name)?;
        let req = self.exec_request(&sb, spec, stdin)?;
        // As in `agent_of`: the shared lifecycle lock while the VM is found and the command started, and
        // the record read again under it, so a command never meets a VM a stop or delete is tearing down.
        let started = {
            let (_shared, sb) = self.read_locked_awake(&sb.id).await?;
            let vm = self.running_vm(&sb).await?;
            let started = async {
                let agent = vm.agent(Duration::from_secs(10)).await?;
                need_user_feature(&agent, &req, &sb.name)?;
                agent.exec(req).await.map_err(|e| agent_error(e, &sb.name))
            };
            crate::deadline::unless_stopped(vm.pid, started).await
        };
        self.metrics()
            .exec_started(started.is_ok(), began.elapsed());
        self.note_unresponsive(&sb, started)
    }

    pub(crate) fn exec_request(
        &self,
        sb: &Sandbox,
        spec: ExecSpec,
        stdin: bool,
    ) -> Result<ExecRequest> {
        validate::env(&spec.env)?;
        match (&spec.argv, &spec.cmd) {
            (Some(argv), None) if !argv.is_empty() && !argv[0].is_empty() => {}
            (None, Some(cmd)) if !cmd.trim().is_empty() => {}
            _ => {
                return Err(Error::invalid(
                    "give exactly one of 'argv' (a non-empty list) or 'cmd' (a shell command line)",
                ))
            }
        }
        // execve takes C strings: a NUL would fail in the guest as a 502 instead of a 400 here.
        let mut words = spec.argv.iter().flatten().chain(spec.cmd.iter());
        if words.any(|w| w.contains('\0')) {
            return Err(Error::invalid(
                "'argv' and 'cmd' must not contain NUL bytes: a program's arguments are C strings",
            ));
        }
        if let Some(cwd) = &spec.cwd {
            validate::guest_path(cwd)?;
        }
        // An image pulled from a registry brings defaults (its config's Env, WorkingDir, User); the
        // sandbox's env and then the request override them.
        let defaults = self.image_defaults(&sb.template);
        let mut env = defaults.env;
        env.extend(sb.env.clone());
        env.extend(spec.env);
        // The image's User is checked like a request's: a bad one is an error, never a silent root.
        let user = spec.user.or(defaults.user);
        if let Some(user) = &user {
            validate_user(user)?;
        }
        Ok(ExecRequest {
            argv: spec.argv,
            shell: spec.cmd,
            env,
            cwd: spec.cwd.or(defaults.cwd),
            stdin,
            timeout_ms: spec.timeout_ms,
            user,
        })
    }

    pub async fn read_file(&self, id_or_name: &str, path: &str) -> Result<FileDownload> {
        validate::guest_path(path)?;
        let sb = self.get(id_or_name)?;
        let agent = self.agent_of(&sb).await?;
        agent
            .read_file(path)
            .await
            .map_err(|e| agent_error(e, &sb.name))
    }

    pub async fn write_file<R: AsyncRead + Unpin + Send>(
        &self,
        id_or_name: &str,
        path: &str,
        mode: Option<u32>,
        body: R,
    ) -> Result<u64> {
        validate::guest_path(path)?;
        if mode.is_some_and(|m| m > 0o7777) {
            return Err(Error::invalid("file mode must be at most 0o7777"));
        }
        let sb = self.get(id_or_name)?;
        let agent = self.agent_of(&sb).await?;
        agent
            .write_file(path, mode, true, body)
            .await
            .map_err(|e| agent_error(e, &sb.name))
    }

    pub async fn list_dir(
        &self,
        id_or_name: &str,
        path: &str,
    ) -> Result<Vec<kiln_agent_client::DirEntry>> {
        validate::guest_path(path)?;
        let sb = self.get(id_or_name)?;
        let agent = self.agent_of(&sb).await?;
        agent
            .list_dir(path)
            .await
            .map_err(|e| agent_error(e, &sb.name))
    }

    pub async fn stat(&self, id_or_name: &str, path: &str) -> Result<kiln_agent_client::FileStat> {
        validate::guest_path(path)?;
        let sb = self.get(id_or_name)?;
        let agent = self.agent_of(&sb).await?;
        agent.stat(path).await.map_err(|e| agent_error(e, &sb.name))
    }

    pub async fn mkdir(&self, id_or_name: &str, path: &str) -> Result<()> {
        validate::guest_path(path)?;
        let sb = self.get(id_or_name)?;
        let agent = self.agent_of(&sb).await?;
        agent
            .mkdir(path, true, None)
            .await
            .map_err(|e| agent_error(e, &sb.name))
    }

    pub async fn remove(&self, id_or_name: &str, path: &str, recursive: bool) -> Result<()> {
        validate::guest_path(path)?;
        if path == "/" {
            return Err(Error::invalid(
                "refusing to remove the guest's root directory",
            ));
        }
        let sb = self.get(id_or_name)?;
        let agent = self.agent_of(&sb).await?;
        agent
            .remove(path, recursive)
            .await
            .map_err(|e| agent_error(e, &sb.name))
    }
}

/// What an image's config says about commands run in it (nothing for kiln's own images).
#[derive(Default)]
pub(crate) struct ImageDefaults {
    pub env: std::collections::BTreeMap<String, String>,
    pub cwd: Option<String>,
    pub user: Option<String>,
}

impl Engine {
    /// The OCI digest of a pulled or imported template, recorded in its snapshots.
    pub(crate) fn image_digest(&self, template: &str) -> Option<String> {
        let path = self
            .images()
            .images_root()
            .join(template)
            .join(kiln_image::MANIFEST_FILE);
        kiln_image::ImageManifest::load(template, &path)
            .ok()
            .and_then(|m| m.source)
            .map(|s| s.digest)
    }

    /// Reads the template's image.json (a small file, read per command so a re-pulled template applies
    /// at once). Values the agent could not take are left out rather than failing every command.
    pub(crate) fn image_defaults(&self, template: &str) -> ImageDefaults {
        let path = self
            .images()
            .images_root()
            .join(template)
            .join(kiln_image::MANIFEST_FILE);
        let Some(src) = kiln_image::ImageManifest::load(template, &path)
            .ok()
            .and_then(|m| m.source)
        else {
            return ImageDefaults::default();
        };
        let env = src
            .env
            .iter()
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let env = if validate::env(&env).is_ok() {
            env
        } else {
            Default::default()
        };
        // `user` or `user:group`, resolved by the agent from the guest's /etc/passwd and /etc/group.
        let user = src.user.filter(|u| !u.is_empty());
        let cwd = src.working_dir.filter(|d| validate::guest_path(d).is_ok());
        ImageDefaults { env, cwd, user }
    }
}

impl Engine {
    /// For an image pulled with `--start-cmd`: starts its Entrypoint + Cmd as a background process of a
    /// freshly booted sandbox (with the image's env, working directory and user). The sandbox fails to
    /// start if the command cannot be started, rather than running without it unnoticed.
    pub(crate) async fn start_image_cmd(
        &self,
        sb: &Sandbox,
        image: &kiln_image::Image,
        vm: &crate::vm::Vm,
    ) -> Result<()> {
        let Some(src) = image.manifest.source.as_ref().filter(|s| s.start_cmd) else {
            return Ok(());
        };
        let argv: Vec<String> = src.entrypoint.iter().chain(&src.cmd).cloned().collect();
        let spec = ExecSpec {
            argv: Some(argv),
            ..Default::default()
        };
        let req = self.exec_request(sb, spec, false)?;
        let agent = vm.agent(Duration::from_secs(10)).await?;
        need_user_feature(&agent, &req, &sb.name)?;
        let proc = agent.proc_start(req).await.map_err(|e| {
            let e = agent_error(e, &sb.name);
            Error::new(
                e.code,
                format!(
                    "the image's start command could not be started: {}",
                    e.message
                ),
            )
        })?;
        tracing::info!(sandbox = %sb.id, pid = proc.pid, "started the image's command");
        Ok(())
    }
}

/// `user` or `user:group`: names (letters, digits, '_', '-', '.') or numbers.
fn validate_user(user: &str) -> Result<()> {
    let part = |p: &str| {
        !p.is_empty()
            && p.len() <= 32
            && !p.starts_with('-')
            && p.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
    };
    let ok = match user.split_once(':') {
        Some((u, g)) => part(u) && part(g),
        None => part(user),
    };
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(format!(
            "invalid user {user:?}: give a guest user name (letters, digits, '_', '-', '.') or a numeric uid, optionally with ':group' (a group name or numeric gid)"
        )))
    }
}

/// An agent that predates `user` would ignore it and run the command as root: refuse instead.
pub(crate) fn need_user_feature(
    agent: &kiln_agent_client::AgentClient,
    req: &ExecRequest,
    name: &str,
) -> Result<()> {
    if req.user.as_deref().is_some_and(|u| u.contains(':')) && !agent.has_feature("user-group") {
        return Err(Error::new(
            crate::ErrorCode::AgentOutdated,
            format!("the guest agent of sandbox {name} cannot run commands with a group (user:group); rebuild its image (kiln image build --force, or pull it again) and create the sandbox again"),
        ));
    }
    if req.user.is_some() && !agent.has_feature("user") {
        return Err(Error::new(
            crate::ErrorCode::AgentOutdated,
            format!("the guest agent of sandbox {name} cannot run commands as another user; rebuild its image (kiln image build --force) and create the sandbox again, or drop 'user'"),
        ));
    }
    Ok(())
}
