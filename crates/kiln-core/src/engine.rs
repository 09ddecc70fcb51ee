//! The engine: creates, finds, runs commands in and deletes sandboxes.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use kiln_agent_client::{ExecHandle, ExecRequest, FileDownload};
use kiln_image::{Image, ImageStore};
use kiln_vmm::{AccelChoice, VmSpec};
use serde::Deserialize;
use tokio::io::AsyncRead;
use tokio::sync::RwLock;
use tracing::{info, warn};
use utoipa::ToSchema;

use crate::config::Config;
use crate::db::Db;
use crate::error::{Error, ErrorCode, Result};
use crate::model::{now_rfc3339, PortMapping, Sandbox, SandboxState};
use crate::vm::{agent_error, Vm};
use crate::{ids, validate};

pub const MIN_MEMORY_MIB: u64 = 64;
pub const MAX_MEMORY_MIB: u64 = 65536;
pub const MAX_CPUS: u64 = 16;
pub const MAX_DISK_GIB: u64 = 1024;

/// What a client asks for when creating a sandbox.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateSandbox {
    /// Guest image to boot (default `tiny`).
    pub template: Option<String>,
    pub name: Option<String>,
    pub memory_mib: Option<u64>,
    pub cpus: Option<u32>,
    /// Disk size in GiB; at least the template's size.
    pub disk_size_gib: Option<u64>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default, alias = "metadata")]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub ports: Vec<PortMapping>,
}

/// A command to run in a sandbox.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ExecSpec {
    /// Program and arguments, run directly.
    pub argv: Option<Vec<String>>,
    /// A shell command line, run with `/bin/sh -c`.
    pub cmd: Option<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    pub cwd: Option<String>,
    /// Kill the command (its whole process group) after this many milliseconds.
    pub timeout_ms: Option<u64>,
}

struct Slot {
    /// Lifecycle operations take it exclusively; commands and file transfers share it.
    op: RwLock<()>,
    vm: tokio::sync::Mutex<Option<Arc<Vm>>>,
}

pub struct Engine {
    cfg: Config,
    db: Db,
    images: ImageStore,
    accel: AccelChoice,
    slots: Mutex<HashMap<String, Arc<Slot>>>,
}

impl Engine {
    /// Opens the data directory and re-adopts VMs that outlived a previous daemon.
    pub async fn open(cfg: Config) -> Result<Arc<Engine>> {
        for dir in [
            cfg.data_dir.clone(),
            cfg.sandboxes_dir(),
            cfg.images_dir(),
            cfg.cache_dir(),
        ] {
            std::fs::create_dir_all(&dir)
                .map_err(|e| Error::internal(format!("cannot create {}: {e}", dir.display())))?;
        }
        let db = Db::open(&cfg.db_path())?;
        let accel = tokio::task::spawn_blocking({
            let requested = cfg.accel;
            move || kiln_vmm::accel::choose(requested)
        })
        .await
        .map_err(|e| Error::internal(format!("accelerator probe panicked: {e}")))?;
        info!(accel = %accel.accel, reason = %accel.reason, "accelerator chosen");
        let images = ImageStore::new(cfg.images_dir(), cfg.cache_dir());
        let engine = Arc::new(Engine {
            cfg,
            db,
            images,
            accel,
            slots: Mutex::new(HashMap::new()),
        });
        engine.adopt().await?;
        Ok(engine)
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }
    pub fn accel(&self) -> &AccelChoice {
        &self.accel
    }
    pub fn images(&self) -> &ImageStore {
        &self.images
    }

    fn slot(&self, id: &str) -> Arc<Slot> {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        slots
            .entry(id.to_string())
            .or_insert_with(|| {
                Arc::new(Slot {
                    op: RwLock::new(()),
                    vm: tokio::sync::Mutex::new(None),
                })
            })
            .clone()
    }

    /// After a daemon restart: VMs whose QEMU is still alive are taken over; the rest are marked failed.
    async fn adopt(&self) -> Result<()> {
        for sb in self.db.list_sandboxes()? {
            let name = vm_name(&sb.id);
            let alive = sb
                .pid
                .is_some_and(|pid| kiln_vmm::process::is_our_qemu(pid, &name));
            match sb.state {
                s if s.has_vm() && alive => {
                    let vm = Vm::new(
                        name,
                        self.cfg.sandbox_dir(&sb.id),
                        sb.pid.unwrap_or(0),
                        None,
                    );
                    let state = match vm.qmp().await {
                        Ok(qmp) => match qmp.status().await.as_deref() {
                            Ok("paused") => SandboxState::Paused,
                            _ => SandboxState::Running,
                        },
                        Err(_) => sb.state,
                    };
                    self.db.set_state(&sb.id, state, sb.pid, None)?;
                    *self.slot(&sb.id).vm.lock().await = Some(Arc::new(vm));
                    info!(sandbox = %sb.id, pid = ?sb.pid, "re-adopted running VM");
                }
                s if s.has_vm() => {
                    let vm = Vm::new(name, self.cfg.sandbox_dir(&sb.id), 0, None);
                    let err = vm.died_error().message;
                    warn!(sandbox = %sb.id, "VM process gone while kiln was down");
                    self.db.set_state(
                        &sb.id,
                        SandboxState::Failed,
                        None,
                        Some(&format!("QEMU exited while kiln was not running: {err}")),
                    )?;
                }
                SandboxState::Creating => {
                    if let Some(pid) = sb.pid.filter(|_| alive) {
                        kiln_vmm::process::terminate(pid, &name, Duration::from_secs(3)).await;
                    }
                    self.db.set_state(
                        &sb.id,
                        SandboxState::Failed,
                        None,
                        Some("kiln stopped while this sandbox was being created; delete it and create it again"),
                    )?;
                }
                SandboxState::Deleting => {
                    if let Some(pid) = sb.pid.filter(|_| alive) {
                        kiln_vmm::process::terminate(pid, &name, Duration::from_secs(3)).await;
                    }
                    self.remove_files(&sb.id);
                    self.db.delete_sandbox(&sb.id)?;
                }
                _ => {}
            }
        }
        Ok(())
    }

    pub fn get(&self, id_or_name: &str) -> Result<Sandbox> {
        self.db
            .find_sandbox(id_or_name)?
            .ok_or_else(|| Error::sandbox_not_found(id_or_name))
    }

    pub fn list(&self, labels: &BTreeMap<String, String>) -> Result<Vec<Sandbox>> {
        Ok(self
            .db
            .list_sandboxes()?
            .into_iter()
            .filter(|s| s.matches_labels(labels))
            .collect())
    }

    fn resolve_image(&self, template: &str) -> Result<Image> {
        validate::name("template", template)?;
        self.images.get(template).map_err(|e| {
            Error::new(
                ErrorCode::ImageNotFound,
                format!("{e} (build it with `kiln image build {template}`)"),
            )
        })
    }

    fn check_capacity(&self, memory_mib: u64) -> Result<()> {
        let active: Vec<Sandbox> = self
            .db
            .list_sandboxes()?
            .into_iter()
            .filter(|s| s.state.has_vm() || s.state == SandboxState::Creating)
            .collect();
        if active.len() >= self.cfg.max_sandboxes {
            return Err(Error::new(
                ErrorCode::CapacityExceeded,
                format!(
                    "{} sandboxes are running, the limit is {}; stop or delete some first",
                    active.len(),
                    self.cfg.max_sandboxes
                ),
            ));
        }
        let used: u64 = active.iter().map(|s| s.memory_mib).sum();
        if used + memory_mib > self.cfg.max_total_memory_mib {
            return Err(Error::new(
                ErrorCode::CapacityExceeded,
                format!(
                    "guest memory would reach {} MiB (in use {used} MiB + requested {memory_mib} MiB), over the limit of {} MiB",
                    used + memory_mib,
                    self.cfg.max_total_memory_mib
                ),
            ));
        }
        Ok(())
    }

    /// Creates a sandbox and boots it; returns once its agent answers.
    pub async fn create(&self, req: CreateSandbox) -> Result<Sandbox> {
        let template = req
            .template
            .clone()
            .unwrap_or_else(|| self.cfg.default_template.clone());
        let memory_mib = req.memory_mib.unwrap_or(self.cfg.default_memory_mib);
        let cpus = req.cpus.unwrap_or(self.cfg.default_cpus);
        validate::range("memory", memory_mib, MIN_MEMORY_MIB, MAX_MEMORY_MIB, " MiB")?;
        validate::range("cpus", u64::from(cpus), 1, MAX_CPUS, "")?;
        validate::env(&req.env)?;
        validate::labels(&req.labels)?;
        if let Some(name) = &req.name {
            validate::name("sandbox", name)?;
        }
        let mut seen = std::collections::HashSet::new();
        for p in &req.ports {
            if p.host == 0 || p.guest == 0 || !seen.insert(p.host) {
                return Err(Error::invalid(format!(
                    "invalid port mapping {}:{}: ports are 1-65535 and each host port is used once",
                    p.host, p.guest
                )));
            }
        }
        let image = self.resolve_image(&template)?;
        let template_size = image.manifest.rootfs_size_bytes;
        let disk_size_bytes = match req.disk_size_gib {
            Some(gib) => {
                validate::range("disk size", gib, 1, MAX_DISK_GIB, " GiB")?;
                let bytes = gib << 30;
                if bytes < template_size {
                    return Err(Error::invalid(format!(
                        "disk size {gib} GiB is smaller than the '{template}' template's {:.1} GiB",
                        template_size as f64 / (1u64 << 30) as f64
                    )));
                }
                bytes
            }
            None => template_size,
        };
        self.check_capacity(memory_mib)?;

        let id = ids::new_id("sb");
        let name = req.name.clone().unwrap_or_else(|| id.clone());
        let now = now_rfc3339();
        let sandbox = Sandbox {
            id: id.clone(),
            name: name.clone(),
            template: template.clone(),
            state: SandboxState::Creating,
            memory_mib,
            cpus,
            disk_size_bytes,
            env: req.env,
            labels: req.labels,
            ports: req.ports,
            hostname: name.replace('_', "-"),
            mac: ids::new_mac(),
            accel: self.accel.accel.to_string(),
            pid: None,
            error: None,
            created_at: now.clone(),
            updated_at: now,
        };
        self.db.insert_sandbox(&sandbox)?;
        let slot = self.slot(&id);
        let _guard = slot.op.write().await;
        match self.boot(&sandbox, &image).await {
            Ok(vm) => {
                let pid = vm.pid;
                *slot.vm.lock().await = Some(vm);
                self.db
                    .set_state(&id, SandboxState::Running, Some(pid), None)?;
                info!(sandbox = %id, name = %name, pid, "sandbox running");
                self.get(&id)
            }
            Err(e) => {
                warn!(sandbox = %id, error = %e, "sandbox failed to start");
                self.db
                    .set_state(&id, SandboxState::Failed, None, Some(&e.message))?;
                Err(Error::new(
                    e.code,
                    format!("sandbox {id} failed to start: {}", e.message),
                ))
            }
        }
    }

    async fn boot(&self, sb: &Sandbox, image: &Image) -> Result<Arc<Vm>> {
        let dir = self.cfg.sandbox_dir(&sb.id);
        std::fs::create_dir_all(&dir)
            .map_err(|e| Error::internal(format!("cannot create {}: {e}", dir.display())))?;
        let disk = dir.join("disk.qcow2");
        let grow = sb.disk_size_bytes > image.manifest.rootfs_size_bytes;
        {
            let (disk, rootfs, size) = (disk.clone(), image.rootfs.clone(), sb.disk_size_bytes);
            tokio::task::spawn_blocking(move || {
                kiln_vmm::img::create_overlay(&disk, &rootfs, "raw", Some(size))
            })
            .await
            .map_err(|e| Error::internal(e.to_string()))??;
        }
        let cmdline = kiln_image::kernel_cmdline(
            image,
            &kiln_image::CmdlineParams {
                hostname: Some(sb.hostname.clone()),
                resize: grow,
                // Extra guest kernel parameters for debugging boots, e.g. `loglevel=7`.
                extra: std::env::var("KILN_GUEST_CMDLINE_EXTRA")
                    .map(|s| s.split_whitespace().map(str::to_string).collect())
                    .unwrap_or_default(),
                ..Default::default()
            },
        );
        let spec = VmSpec {
            name: vm_name(&sb.id),
            run_dir: dir.clone(),
            accel: self.accel.accel,
            memory_mib: sb.memory_mib,
            vcpus: sb.cpus,
            memory_file: dir.join("memory"),
            memory_shared: true,
            kernel: image.kernel.clone(),
            initrd: image.initrd.clone(),
            cmdline,
            disk,
            mac: sb.mac.clone(),
            forwards: sb
                .ports
                .iter()
                .map(|p| kiln_vmm::PortForward {
                    host: p.host,
                    guest: p.guest,
                })
                .collect(),
            incoming: false,
            start_paused: false,
        };
        let pid = {
            let spec = spec.clone();
            tokio::task::spawn_blocking(move || kiln_vmm::qemu::launch(&spec))
                .await
                .map_err(|e| Error::internal(e.to_string()))?
                .map_err(|e| Error::new(ErrorCode::BootFailed, e.to_string()))?
        };
        self.db
            .set_state(&sb.id, SandboxState::Creating, Some(pid), None)?;
        let vm = Arc::new(Vm::new(spec.name.clone(), dir, pid, None));
        match self.wait_for_agent(&vm).await {
            Ok(()) => Ok(vm),
            Err(e) => {
                vm.terminate().await;
                Err(e)
            }
        }
    }

    /// Waits for the guest agent, failing early (with the console's last lines) if QEMU dies.
    async fn wait_for_agent(&self, vm: &Vm) -> Result<()> {
        let timeout = self.cfg.boot_timeout;
        let watch = async {
            loop {
                tokio::time::sleep(Duration::from_millis(50)).await;
                if !vm.is_alive() {
                    return;
                }
            }
        };
        tokio::select! {
            res = vm.agent(timeout) => {
                let agent = res.map_err(|e| {
                    let tail = kiln_vmm::qemu::tail_lines(&vm.console_log(), 15);
                    let code = if e.code == ErrorCode::Timeout { ErrorCode::Timeout } else { ErrorCode::BootFailed };
                    Error::new(code, format!(
                        "the guest agent did not answer within {} s ({}). Last console lines:\n{tail}",
                        timeout.as_secs(), e.message
                    ))
                })?;
                // The guest's clock starts from the RTC at boot; set it precisely anyway.
                agent.set_clock(SystemTime::now()).await.map_err(|e| agent_error(e, &vm.name))?;
                Ok(())
            }
            () = watch => {
                let tail = kiln_vmm::qemu::tail_lines(&vm.console_log(), 15);
                let qemu_log = std::fs::read_to_string(vm.run_dir.join("qemu.log")).unwrap_or_default();
                Err(Error::new(ErrorCode::BootFailed, format!(
                    "QEMU exited during boot. {}Last console lines:\n{tail}",
                    if qemu_log.trim().is_empty() { String::new() } else { format!("QEMU said: {}. ", qemu_log.trim()) }
                )))
            }
        }
    }

    /// The live VM of a running sandbox.
    async fn running_vm(&self, sb: &Sandbox) -> Result<Arc<Vm>> {
        match sb.state {
            SandboxState::Running => {}
            SandboxState::Paused => {
                return Err(Error::new(
                    ErrorCode::SandboxNotRunning,
                    format!(
                        "sandbox {} is paused; resume it first (`kiln resume {}`)",
                        sb.name, sb.name
                    ),
                ))
            }
            SandboxState::Stopped => {
                return Err(Error::new(
                    ErrorCode::SandboxNotRunning,
                    format!(
                        "sandbox {} is stopped; start it first (`kiln start {}`)",
                        sb.name, sb.name
                    ),
                ))
            }
            other => {
                return Err(Error::new(
                    ErrorCode::SandboxNotRunning,
                    format!(
                        "sandbox {} is {}{}",
                        sb.name,
                        other.as_str(),
                        sb.error
                            .as_deref()
                            .map(|e| format!(": {e}"))
                            .unwrap_or_default()
                    ),
                ))
            }
        }
        let vm = self.slot(&sb.id).vm.lock().await.clone();
        match vm {
            Some(vm) if vm.is_alive() => Ok(vm),
            Some(vm) => {
                let err = vm.died_error();
                self.db
                    .set_state(&sb.id, SandboxState::Failed, None, Some(&err.message))?;
                Err(err)
            }
            None => Err(Error::internal(format!(
                "sandbox {} has no VM handle",
                sb.id
            ))),
        }
    }

    async fn agent_of(&self, sb: &Sandbox) -> Result<kiln_agent_client::AgentClient> {
        let vm = self.running_vm(sb).await?;
        vm.agent(Duration::from_secs(10)).await
    }

    /// Starts a command; the handle streams its output and exit status.
    pub async fn exec(&self, id_or_name: &str, spec: ExecSpec, stdin: bool) -> Result<ExecHandle> {
        let sb = self.get(id_or_name)?;
        let req = self.exec_request(&sb, spec, stdin)?;
        let agent = self.agent_of(&sb).await?;
        agent.exec(req).await.map_err(|e| agent_error(e, &sb.name))
    }

    fn exec_request(&self, sb: &Sandbox, spec: ExecSpec, stdin: bool) -> Result<ExecRequest> {
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
        if let Some(cwd) = &spec.cwd {
            validate::guest_path(cwd)?;
        }
        let mut env = sb.env.clone();
        env.extend(spec.env);
        Ok(ExecRequest {
            argv: spec.argv,
            shell: spec.cmd,
            env,
            cwd: spec.cwd,
            stdin,
            timeout_ms: spec.timeout_ms,
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

    /// Deletes a sandbox: stops its VM and frees its disk, memory file and sockets.
    pub async fn delete(&self, id_or_name: &str) -> Result<()> {
        let sb = self.get(id_or_name)?;
        let slot = self.slot(&sb.id);
        let _guard = slot.op.write().await;
        self.db
            .set_state(&sb.id, SandboxState::Deleting, sb.pid, None)?;
        let vm = slot.vm.lock().await.take();
        match vm {
            Some(vm) => vm.terminate().await,
            None => {
                if let Some(pid) = sb.pid {
                    kiln_vmm::process::terminate(pid, &vm_name(&sb.id), Duration::from_secs(3))
                        .await;
                }
            }
        }
        self.remove_files(&sb.id);
        self.db.delete_sandbox(&sb.id)?;
        self.slots
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&sb.id);
        info!(sandbox = %sb.id, "sandbox deleted");
        Ok(())
    }

    fn remove_files(&self, id: &str) {
        let dir = self.cfg.sandbox_dir(id);
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                warn!(dir = %dir.display(), error = %e, "could not remove sandbox directory");
            }
        }
    }

    /// Path of a sandbox's console log, for `kiln sandbox logs`.
    pub fn console_log(&self, id_or_name: &str) -> Result<std::path::PathBuf> {
        let sb = self.get(id_or_name)?;
        Ok(self.cfg.sandbox_dir(&sb.id).join("console.log"))
    }

    pub fn data_dir(&self) -> &Path {
        &self.cfg.data_dir
    }
}

pub fn vm_name(id: &str) -> String {
    format!("kiln-{id}")
}
