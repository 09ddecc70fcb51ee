//! Creating a sandbox from a template: a resume of the template's boot snapshot (template_snap.rs) or, when
//! that is ruled out, a cold boot.

use std::time::Duration;

use kiln_image::Image;
use tracing::{info, warn};

use crate::engine::{
    CreateSandbox, Engine, MAX_CPUS, MAX_DISK_GIB, MAX_MEMORY_MIB, MIN_MEMORY_MIB,
};
use crate::error::{Error, ErrorCode, Result};
use crate::model::{now_rfc3339, Sandbox, SandboxState};
use crate::{ids, validate};

impl Engine {
    /// The images lock (kiln_image::ImageStore::images_lock_path), shared; waits while an `image rm`
    /// holds it, which is only for its check and rename.
    async fn images_lock_shared(&self) -> Result<kiln_image::FileLock> {
        let path = self.images().images_lock_path();
        let wait = Duration::from_secs(30);
        let taken = {
            let path = path.clone();
            tokio::task::spawn_blocking(move || kiln_image::FileLock::acquire(&path, false, wait))
                .await
                .map_err(|e| Error::internal(format!("images lock: {e}")))?
        };
        match taken {
            Ok(Some(lock)) => Ok(lock),
            Ok(None) => Err(Error::new(
                ErrorCode::Timeout,
                "an image removal held the images lock for 30 s; try again",
            )),
            Err(e) => Err(Error::internal(format!(
                "cannot lock {}: {e}",
                path.display()
            ))),
        }
    }

    fn resolve_image(&self, template: &str) -> Result<Image> {
        validate::name("template", template)?;
        self.images()
            .get(template)
            .map_err(|e| Error::new(ErrorCode::ImageNotFound, e.to_string()))
    }

    /// Creates a sandbox and boots it; returns once its agent answers.
    pub async fn create(&self, req: CreateSandbox) -> Result<Sandbox> {
        self.config().check_storage("create a sandbox")?;
        self.check_network(req.network.as_deref())?;
        if let Some(snapshot) = req.snapshot.clone() {
            // `env` is merged over the snapshot's for the commands run from now on.
            if req.template.is_some() || !req.ports.is_empty() || req.max_memory_mib.is_some() {
                return Err(Error::invalid(
                    "a sandbox made from a snapshot takes its template, ports and max_memory_mib from the snapshot; drop 'template', 'ports' and 'max_memory_mib'",
                ));
            }
            return self
                .resume_snapshot(
                    &snapshot,
                    crate::ResumeSnapshot {
                        name: req.name,
                        memory_mib: req.memory_mib,
                        cpus: req.cpus,
                        disk_size_gib: req.disk_size_gib,
                        labels: req.labels,
                        // No volumes given: the source's are remounted where free (see ResumeSnapshot).
                        volumes: (!req.volumes.is_empty()).then_some(req.volumes),
                        egress: req.egress,
                        env: req.env,
                        network: req.network,
                        ..Default::default()
                    },
                )
                .await;
        }
        let template = req
            .template
            .clone()
            .unwrap_or_else(|| self.config().default_template.clone());
        let memory_mib = req.memory_mib.unwrap_or(self.config().default_memory_mib);
        let cpus = req.cpus.unwrap_or(self.config().default_cpus);
        validate::range("memory", memory_mib, MIN_MEMORY_MIB, MAX_MEMORY_MIB, " MiB")?;
        if let Some(max) = req.max_memory_mib {
            validate::range("max_memory", max, memory_mib, MAX_MEMORY_MIB, " MiB")?;
        }
        validate::range("cpus", u64::from(cpus), 1, MAX_CPUS, "")?;
        validate::env(&req.env)?;
        validate::labels(&req.labels)?;
        if let Some(name) = &req.name {
            validate::name("sandbox", name)?;
        }
        let ports = crate::ports::requested(&[], &req.ports)?;
        self.check_host_ports_free("", &ports)?;
        // Held until this create returns (its sandbox is recorded by then, or it failed), so `kiln image
        // rm` cannot remove the template between this lookup and the record it checks for.
        let _images = self.images_lock_shared().await?;
        let image = self.resolve_image(&template)?;
        self.faults().hold("create.image_resolved").await;
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
        // Create is a resume of the template's boot snapshot unless something rules it out
        // (template_snap.rs); a cold boot says why.
        let reason = match self.template_route(&req, &image) {
            Ok(shape) => match self
                .create_from_template_snapshot(
                    &req,
                    &template,
                    &image,
                    shape,
                    &ports,
                    disk_size_bytes,
                )
                .await
            {
                Ok(sb) => return Ok(sb),
                Err(crate::template_snap::NotResumed::Client(e)) => return Err(e),
                Err(crate::template_snap::NotResumed::Fallback(why)) => why,
            },
            Err(why) => why,
        };
        info!(template = %template, reason = %reason, "cold boot");
        let mut sb = self
            .create_cold(req, &template, image, disk_size_bytes, ports, None)
            .await?;
        sb.boot = Some(crate::template_snap::BootInfo::cold(reason));
        Ok(sb)
    }

    /// The boot path of `create`: a new machine booted from the template (validated by the caller).
    /// `origin` replaces `template:T` (the hidden machine a template snapshot is captured from).
    pub(crate) async fn create_cold(
        &self,
        req: CreateSandbox,
        template: &str,
        image: Image,
        disk_size_bytes: u64,
        ports: Vec<crate::model::PortMapping>,
        origin: Option<String>,
    ) -> Result<Sandbox> {
        let template = template.to_string();
        let template_size = image.manifest.rootfs_size_bytes;
        let memory_mib = req.memory_mib.unwrap_or(self.config().default_memory_mib);
        let cpus = req.cpus.unwrap_or(self.config().default_cpus);
        let reservation = self.reserve(1, memory_mib).await?;

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
            ports,
            hostname: name.replace('_', "-"),
            mac: ids::new_mac(),
            accel: self.accel().accel.to_string(),
            pid: None,
            error: None,
            created_at: now.clone(),
            updated_at: now,
            origin: origin.unwrap_or_else(|| format!("template:{template}")),
            restored_from: None,
            forked_from: None,
            volumes: req.volumes.clone(),
            egress: req.egress.unwrap_or(true),
            qemu_uid: self.new_qemu_uid()?,
            confined: false,
            volume_notes: Vec::new(),
            lifetime: None,
            checkpoint_policy: None,
            max_memory_mib: None,
            boot: None,
            network: req.network.clone(),
            address: None,
            address6: None,
        };
        {
            let _volumes = self.volume_lock().await;
            self.check_mounts(&req.volumes)?;
            reservation.record(|| self.db().insert_sandbox(&sandbox))?;
            self.db().set_attachments(&id, &req.volumes)?;
        }
        self.faults().hold("create.recorded").await;
        let slot = self.slot(&id);
        let _guard = slot.op.write().await;
        let cmdline = kiln_image::kernel_cmdline(
            &image,
            &kiln_image::CmdlineParams {
                hostname: Some(sandbox.hostname.clone()),
                resize: disk_size_bytes > template_size,
                kvm: !self.accel().accel.tuning().tsc_cmdline,
                // Extra guest kernel parameters for debugging boots, e.g. `loglevel=7`.
                extra: std::env::var("KILN_GUEST_CMDLINE_EXTRA")
                    .map(|s| s.split_whitespace().map(str::to_string).collect())
                    .unwrap_or_default(),
                ..Default::default()
            },
        );
        let booted = async {
            let max_memory_mib = self.max_memory_for(&image, memory_mib, req.max_memory_mib);
            let layout = self.provision_from_template(
                &sandbox,
                &image,
                cmdline,
                &req.volumes,
                max_memory_mib,
            )?;
            self.db().set_layout(&id, &layout)?;
            let vm = self.start_vm(&sandbox, &layout, None).await?;
            // Every sandbox is its own machine: machine id and RNG seed of its own from the start.
            let identity = crate::machine::NewIdentity {
                hostname: sandbox.hostname.clone(),
                mac: None,
            };
            self.after_boot(&sandbox, &vm, &layout, Some(&identity))
                .await?;
            self.start_image_cmd(&sandbox, &image, &vm).await?;
            Ok::<_, Error>(vm)
        };
        match booted.await {
            Ok(vm) => {
                let pid = vm.pid;
                *slot.vm.lock().await = Some(vm);
                self.db()
                    .set_state(&id, SandboxState::Running, Some(pid), None)?;
                info!(sandbox = %id, name = %name, pid, "sandbox running");
                self.get(&id)
            }
            Err(e) => {
                warn!(sandbox = %id, error = %e, "sandbox failed to start");
                self.db()
                    .set_state(&id, SandboxState::Failed, None, Some(&e.message))?;
                Err(Error::new(
                    e.code,
                    format!("sandbox {id} failed to start: {}", e.message),
                ))
            }
        }
    }
}
