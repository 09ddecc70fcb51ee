//! Starting a sandbox's VM from its layout: a cold boot, or a restore of saved state (device state plus
//! guest RAM as a base file and an optional delta). Also preparing a fresh sandbox's files from a template.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use kiln_agent_client::ExecRequest;
use kiln_image::Image;
use kiln_vmm::VmSpec;

use crate::engine::Engine;
use crate::error::{Error, ErrorCode, Result};
use crate::fsutil;
use crate::layout::{Layer, Layout, Memory, Origin, VolumeSlot, VOLUME_SLOTS};
use crate::model::{Sandbox, SandboxState};
use crate::vm::vm_name;
use crate::vm::{agent_error, Vm};

/// Saved state to restore instead of booting.
pub struct Incoming {
    /// QEMU device state (migration stream without RAM).
    pub state: PathBuf,
    /// Continue the vCPUs once loaded (otherwise the sandbox stays paused).
    pub resume: bool,
    /// Make the restored machine a new one (resume and fork); None keeps its identity (start, roll back).
    pub identity: Option<NewIdentity>,
    /// The RAM file's copy still being made while QEMU starts (a start from hibernation).
    pub ram_fill: Option<crate::ramdir::RamFill>,
    /// A memory delta to write into the RAM mapping after the state is loaded, before `cont`.
    pub delta: Option<IncomingDelta>,
}

/// A snapshot's memory delta and the RAM file it applies to.
#[derive(Clone)]
pub struct IncomingDelta {
    pub file: PathBuf,
    /// The file the VM maps privately, and its checksum (the delta's base identity).
    pub base: PathBuf,
    pub base_id: String,
}

/// What makes a copy of a machine its own: name, machine id, and a reseeded kernel RNG (otherwise two
/// copies would produce the same "random" bytes and UUIDs from the same RNG state).
pub struct NewIdentity {
    pub hostname: String,
    /// The MAC QEMU gives the copy's NIC. A restored guest kernel keeps the address it read from its
    /// source's NIC, so it is set in the guest too (None for a cold boot, whose kernel read its own).
    pub mac: Option<String>,
}

const RESTORE_TIMEOUT: Duration = Duration::from_secs(30);

/// Whether new machines' balloons report free pages, under either accelerator: a guest that freed memory
/// gives it back to the host and its RAM file shrinks before a snapshot (measured in docs/kvm.md).
/// `KILN_FREE_PAGE_REPORTING=0` makes machines without it (as older kilns did).
pub(crate) fn free_page_reporting() -> bool {
    !matches!(
        std::env::var("KILN_FREE_PAGE_REPORTING").as_deref(),
        Ok("0" | "off" | "false")
    )
}

/// How long the guest gets to take its new MAC (`ip link set`) after a restore.
const MAC_TIMEOUT: Duration = Duration::from_secs(5);

impl Engine {
    /// Creates the sandbox directory for a cold boot from `image`: hard links to the kernel, initramfs and
    /// root filesystem (so the sandbox survives the image being removed or rebuilt), a qcow2 top layer and
    /// an owned RAM file.
    pub(crate) fn provision_from_template(
        &self,
        sb: &Sandbox,
        image: &Image,
        cmdline: String,
        mounts: &[crate::volume::VolumeMount],
        max_memory_mib: Option<u64>,
    ) -> Result<Layout> {
        // Headroom only when there is some: otherwise no balloon device at all.
        let max_memory_mib = max_memory_mib.filter(|m| *m > sb.memory_mib);
        let dir = self.config().sandbox_dir(&sb.id);
        std::fs::create_dir_all(dir.join("layers"))
            .map_err(|e| fsutil::io_error(&format!("creating {}", dir.display()), e))?;
        self.own_sandbox_dir(sb)?;
        // An uncompressed kernel with qboot skips the guest's self-decompression (much faster under TCG).
        let (firmware, kernel_src) = match (&image.vmlinux, kiln_vmm::qemu::qboot_firmware()) {
            (Some(vmlinux), Some(qboot)) => (Some(qboot), vmlinux.clone()),
            _ => (None, image.kernel.clone()),
        };
        fsutil::link_or_copy(&kernel_src, &dir.join("kernel"))?;
        fsutil::link_or_copy(&image.initrd, &dir.join("initrd"))?;
        let base = dir.join("layers/0.raw");
        fsutil::link_or_copy(&image.rootfs, &base)?;
        for f in [dir.join("kernel"), dir.join("initrd"), base.clone()] {
            self.confine().make_readable(&f)?;
        }
        let machine = kiln_vmm::qemu::machine_for_boot(self.accel().accel, &cmdline);
        let mut layout = Layout {
            firmware,
            kernel: dir.join("kernel"),
            initrd: dir.join("initrd"),
            kernel_version: image.manifest.kernel_version.clone(),
            cmdline,
            disk_layers: vec![Layer {
                path: base,
                format: "raw".into(),
                checksum: Some(format!("sha256:{}", image.manifest.files.rootfs.sha256)),
            }],
            memory: self.owned_memory(sb, max_memory_mib.unwrap_or(sb.memory_mib))?,
            origin: Origin::Template {
                name: sb.template.clone(),
            },
            inherited_layers: 1,
            generation: 0,
            volume_slots: vec![VolumeSlot::Empty; VOLUME_SLOTS],
            origin_digest: Some(self.base_digest(&format!("template:{}", sb.template))?),
            max_cpus: Some(self.machine_max_cpus(sb.cpus)),
            max_memory_mib,
            cpu: kiln_vmm::cpu::identity(self.accel().accel),
            machine: Some(machine),
            // Not on a template snapshot's builder: its copies map the saved RAM read-only, so QEMU could not
            // discard what their guests report (it logs an error for every report instead).
            free_page_reporting: Some(
                free_page_reporting() && !crate::template_snap::is_builder(sb),
            ),
            // A template's builder too (its snapshots are this network mode's own, template_snap.rs): per
            // vCPU online, not per vCPU its machine has, as the guest's driver sets its channels at probe
            // from the CPUs online and a copy given more would not use them; a 1-vCPU machine keeps one
            // queue, so its memory snapshots still resume on user networking.
            net_queues: crate::net::boot_queues(self.bridge().is_some(), sb.cpus),
        };
        self.place_mounts(&dir, sb.qemu_uid, &mut layout.volume_slots, mounts, false)?;
        let top = layout.next_top_path(&dir);
        create_top_layer(&top, &layout.disk_layers[0], sb.disk_size_bytes)?;
        self.confine().own_file(&top, sb.qemu_uid)?;
        layout.disk_layers.push(Layer {
            path: top,
            format: "qcow2".into(),
            checksum: None,
        });
        Ok(layout)
    }

    /// The sandbox directory and its `layers/` are root's (`root:<uid> 0710`: the VM passes through to
    /// the files it was given and can plant nothing where the daemon acts; other VMs cannot enter); `vm/`
    /// is the VM user's own (`0700`), for what QEMU itself creates.
    pub(crate) fn own_sandbox_dir(&self, sb: &Sandbox) -> Result<()> {
        let dir = self.config().sandbox_dir(&sb.id);
        self.confine().root_dir(&dir, sb.qemu_uid)?;
        self.confine().root_dir(&dir.join("layers"), sb.qemu_uid)?;
        let vm = dir.join(crate::vm::VM_DIR);
        std::fs::create_dir_all(&vm)
            .map_err(|e| fsutil::io_error(&format!("creating {}", vm.display()), e))?;
        self.confine().own_dir(&vm, sb.qemu_uid)
    }

    /// Where QEMU writes `name` (migration output) for this sandbox: in `vm/`, created when a VM from an
    /// older kiln runs without one, with no entry of that name left (a planted FIFO would block QEMU).
    pub(crate) fn vm_file(&self, sb: &Sandbox, name: &str) -> Result<PathBuf> {
        let vm = self.config().sandbox_dir(&sb.id).join(crate::vm::VM_DIR);
        if !vm.is_dir() {
            std::fs::create_dir_all(&vm)
                .map_err(|e| fsutil::io_error(&format!("creating {}", vm.display()), e))?;
            self.confine().own_dir(&vm, sb.qemu_uid)?;
        }
        let path = vm.join(name);
        let _ = std::fs::remove_file(&path);
        Ok(path)
    }

    /// Takes a file QEMU wrote in `vm/` into a root-owned directory, refusing anything but a regular file
    /// of the VM's own (see `kiln_vmm::safefs::take_file`).
    pub(crate) fn take_vm_file(&self, sb: &Sandbox, src: &Path, dst: &Path) -> Result<()> {
        let owner = self.confine().run_as(sb.qemu_uid).map(|r| r.uid);
        kiln_vmm::safefs::take_file(src, dst, owner)
            .map(drop)
            .map_err(|e| {
                fsutil::io_error(
                    &format!("taking {} into {}", src.display(), dst.display()),
                    e,
                )
            })
    }

    /// Creates the (empty) RAM file QEMU maps for a sandbox that owns its RAM: QEMU cannot create files
    /// in the root-owned sandbox directory, and sizes it itself.
    pub(crate) fn create_memory_file(&self, sb: &Sandbox, file: &Path) -> Result<()> {
        kiln_vmm::safefs::create_new(file, 0o600)
            .map_err(|e| fsutil::io_error(&format!("creating {}", file.display()), e))?;
        self.confine().own_file(file, sb.qemu_uid)
    }

    /// vCPUs a new machine gets: room to resume copies of it with up to `--max-vcpus` (at least `cpus`).
    pub(crate) fn machine_max_cpus(&self, cpus: u32) -> u32 {
        cpus.max(self.config().max_vcpus)
    }

    pub(crate) fn vm_spec(&self, sb: &Sandbox, layout: &Layout, incoming: bool) -> VmSpec {
        let (memory_file, memory_shared) = match &layout.memory {
            Memory::Owned { file, live } => (live.clone().unwrap_or_else(|| file.clone()), true),
            Memory::Private { base, .. } => (base.clone(), false),
        };
        VmSpec {
            name: vm_name(&sb.id),
            run_dir: self.config().sandbox_dir(&sb.id).join(crate::vm::VM_DIR),
            accel: self.accel().accel,
            machine: Some(layout.machine_options(self.accel().accel)),
            tsc_khz: layout.cpu.as_ref().and_then(|c| c.tsc_khz),
            memory_mib: layout.machine_memory_mib(sb.memory_mib),
            balloon: layout.max_memory_mib.is_some(),
            balloon_reporting: layout.free_page_reporting == Some(true),
            vcpus: sb.cpus,
            max_vcpus: layout.max_cpus.unwrap_or(sb.cpus).max(sb.cpus),
            memory_file,
            memory_shared,
            firmware: layout.firmware.clone(),
            kernel: layout.kernel.clone(),
            initrd: layout.initrd.clone(),
            cmdline: layout.cmdline.clone(),
            disk_layers: layout.vm_layers(),
            mac: sb.mac.clone(),
            // Published through QMP once QEMU runs (ports.rs), where a host port in use can be retried.
            forwards: Vec::new(),
            volumes: layout
                .volume_slots
                .iter()
                .map(VolumeSlot::backend)
                .collect(),
            incoming,
            start_paused: incoming,
            egress: sb.egress,
            tap_fd: None,
            vhost_fd: None,
            tap_queues: Vec::new(),
            confine: kiln_vmm::Confine {
                run_as: self.confine().run_as(sb.qemu_uid),
                cgroup_procs: Vec::new(),
            },
        }
    }

    /// Starts the VM: a cold boot (waiting for the agent), or a restore of `incoming` state.
    pub(crate) async fn start_vm(
        &self,
        sb: &Sandbox,
        layout: &Layout,
        incoming: Option<Incoming>,
    ) -> Result<Arc<Vm>> {
        let mut spec = self.vm_spec(sb, layout, incoming.is_some());
        let queues = layout.net_queues.unwrap_or(1).max(1) as usize;
        let net = self.prepare_net(sb, incoming.is_some(), queues).await?;
        spec.tap_fd = net.tap.as_ref().map(|t| t.fd());
        let vhost: Vec<i32> = net
            .vhost
            .iter()
            .map(std::os::fd::AsRawFd::as_raw_fd)
            .collect();
        spec.vhost_fd = vhost.first().copied();
        spec.tap_queues = net
            .tap
            .as_ref()
            .map(|t| t.queue_fds())
            .unwrap_or_default()
            .into_iter()
            .enumerate()
            .map(|(i, fd)| (fd, vhost.get(i + 1).copied()))
            .collect();
        if let Some(params) = &net.cmdline {
            spec.cmdline = format!("{} {params}", spec.cmdline);
        }
        let limits = crate::confine::cgroup::Limits::for_vm(sb.memory_mib, sb.cpus);
        spec.confine.cgroup_procs = self.confine().cgroup_for(&sb.id, &limits);
        if crate::warm::is_spare(sb) {
            // Warming a spare must not slow down the sandboxes clients are waiting for.
            self.confine().set_background(&sb.id, &limits, true);
        }
        let mut ph = crate::timing::Phases::new("start_vm", &sb.id);
        let pid = {
            let spec = spec.clone();
            tokio::task::spawn_blocking(move || kiln_vmm::launch::launch(&spec))
                .await
                .map_err(|e| Error::internal(e.to_string()))?
                .map_err(|e| Error::new(ErrorCode::BootFailed, e.to_string()))?
        };
        // QEMU has its own descriptor now: the TAP lives as long as QEMU does.
        drop(net.tap);
        drop(net.vhost);
        self.db().set_state(&sb.id, sb.state, Some(pid), None)?;
        let vm = Arc::new(
            Vm::new(
                spec.name.clone(),
                self.config().sandbox_dir(&sb.id),
                pid,
                None,
            )
            .with_accel(self.accel().accel),
        );
        if self.faults().kill_after_launch(&sb.name) {
            // SAFETY: kill(2) on the QEMU this call just launched.
            unsafe {
                libc::kill(pid as i32, libc::SIGKILL);
            }
        }
        let point = match (sb.state, incoming.is_some()) {
            (SandboxState::Stopped, _) => "start.launched",
            (_, true) => "resume.launched",
            (_, false) => "create.launched",
        };
        self.faults().hold(point).await;
        ph.mark("launch");
        let result = async {
            self.apply_ports(sb, &vm).await?;
            // A cold boot settles its balloon in `after_boot`, alongside the agent's first requests.
            let settle = spec.balloon && incoming.as_ref().is_some_and(|i| i.resume);
            ph.mark("ports");
            let resumes = incoming.as_ref().is_some_and(|i| i.resume);
            match incoming {
                None => self.wait_for_agent(&vm).await?,
                Some(mut inc) => self.restore_into(sb, &vm, &mut inc, &mut ph).await?,
            }
            // Before the restore returns: the guest answers on its own address (net/).
            match &net.readdress {
                Some(guest) if resumes => {
                    self.readdress(&vm, guest, net.old_address.as_deref())
                        .await?;
                    ph.mark("readdress");
                }
                Some(guest) => {
                    tracing::warn!(sandbox = %sb.id, address = %guest.address, "a paused restore keeps its guest's old address until it is re-addressed")
                }
                None => {}
            }
            if let Some(guest) = &net.boot6 {
                self.readdress(&vm, guest, None).await?;
                ph.mark("ipv6");
            }
            // A restored guest may be asked for more than its snapshot had (a paused one is left as
            // saved: it cannot move pages, and only a resume changes its size).
            if settle {
                let took = crate::balloon::settle(&vm, sb.memory_mib).await?;
                tracing::debug!(sandbox = %sb.id, ms = took.as_millis() as u64, memory_mib = sb.memory_mib, "balloon settled");
            }
            Ok::<_, Error>(())
        }
        .await;
        match result {
            Ok(()) => Ok(vm),
            Err(e) => {
                let died = !vm.is_alive();
                // QEMU says why a load failed on its stderr (e.g. a section of the stream it has no
                // device for); read before `terminate` cleans up.
                let said = qemu_said(&vm);
                vm.terminate().await;
                self.confine().remove_cgroup(&sb.id);
                if died && e.code != ErrorCode::BootFailed {
                    // Say that QEMU is gone rather than how the next request to it failed.
                    let tail = vm.console_tail(5).await;
                    return Err(Error::new(
                        ErrorCode::VmFailed,
                        format!(
                            "QEMU (pid {pid}) exited while its saved state was loaded ({}){said}; it was killed or crashed. Try again; if it recurs, see the console:\n{tail}",
                            e.message
                        ),
                    ));
                }
                Err(e)
            }
        }
    }

    async fn restore_into(
        &self,
        sb: &Sandbox,
        vm: &Vm,
        inc: &mut Incoming,
        ph: &mut crate::timing::Phases,
    ) -> Result<()> {
        let qmp = vm.qmp().await?;
        ph.mark("qmp_connect");
        if let Some(fill) = inc.ram_fill.take() {
            fill.await
                .map_err(|e| Error::internal(format!("copying the saved RAM: {e}")))??;
            ph.mark("ram_fill");
        }
        // The guest RAM must be whole before the state loads: device post-load hooks read it (virtio
        // reads its rings' indices from guest memory). The stream carries no page of it.
        if let Some(d) = inc.delta.clone() {
            self.apply_delta(vm.pid, d).await?;
            ph.mark("apply_delta");
        }
        // QEMU opens the state file itself, as the sandbox's user, which can only reach its own directory:
        // a snapshot's (immutable, sealed) state is hard-linked in for the load.
        let dir = self.config().sandbox_dir(&sb.id);
        let state = if inc.state.starts_with(&dir) {
            inc.state.clone()
        } else {
            let link = dir.join("incoming.state");
            let _ = std::fs::remove_file(&link);
            fsutil::link_or_copy(&inc.state, &link)?;
            self.confine().seal(&link)?;
            link
        };
        ph.mark("link_state");
        let loaded = kiln_vmm::migration::load_state(&qmp, &state, RESTORE_TIMEOUT).await;
        if state != inc.state {
            let _ = fsutil::remove_file_durably(&state);
        }
        // Compatibility and checksums were checked before QEMU started (snapshot/compat.rs), so a refusal
        // now is reported with QEMU's own words rather than guessed at.
        loaded.map_err(|e| {
            let code = match e {
                kiln_vmm::VmmError::Unresponsive { .. } => ErrorCode::SandboxUnresponsive,
                _ => ErrorCode::VmFailed,
            };
            Error::new(code, format!("QEMU could not load the saved state: {e}"))
        })?;
        ph.mark("load_state");
        if inc.resume {
            if state == inc.state {
                // The sandbox's own hibernation state (a start): once its vCPUs run, the guest writes the
                // disk past it, so it must never be loaded again. Retired durably before `cont`; from here
                // QEMU holds the only copy (a restart that finds it loaded and paused continues it).
                std::fs::remove_file(&state)
                    .map_err(|e| fsutil::io_error("retiring the loaded hibernation state", e))?;
                fsutil::fsync_path(&dir)?;
                self.faults().hold("start.retired").await;
                ph.mark("retire_state");
            }
            qmp.execute("cont", None).await?;
            ph.mark("cont");
            if sb.state == SandboxState::Stopped {
                self.faults().hold("start.continued").await;
            }
            self.after_resume(&sb.id, vm, inc.identity.as_ref()).await?;
            ph.mark("after_resume");
        }
        Ok(())
    }

    /// Writes a snapshot's memory delta into a loaded, not yet running VM's RAM mapping.
    async fn apply_delta(&self, pid: u32, d: IncomingDelta) -> Result<()> {
        let applied = tokio::task::spawn_blocking(move || {
            kiln_vmm::delta::apply(pid, &d.base, &d.base_id, &d.file)
        })
        .await
        .map_err(|e| Error::internal(e.to_string()))?;
        match applied {
            Ok(st) => {
                tracing::debug!(
                    pid,
                    data_pages = st.data_pages,
                    zero_pages = st.zero_pages,
                    ms = st.total_ms,
                    "memory delta applied"
                );
                Ok(())
            }
            Err(kiln_vmm::delta::DeltaError::Corrupt(m)) => Err(Error::new(
                ErrorCode::SnapshotCorrupt,
                format!("{m}; the snapshot cannot be restored, take a new one"),
            )),
            Err(kiln_vmm::delta::DeltaError::BaseMismatch(m)) => Err(Error::new(
                ErrorCode::SnapshotBaseChanged,
                format!("{m}; the snapshot's RAM file was replaced, so it cannot be restored"),
            )),
            Err(kiln_vmm::delta::DeltaError::Io(e)) => Err(Error::new(
                ErrorCode::VmFailed,
                format!("writing the memory delta into the restored VM failed: {e}"),
            )),
        }
    }

    /// After vCPUs run again: reconnect the agent and set the guest's wall clock (it stood still while the
    /// state sat on disk); for a copy, also give it its own identity.
    /// Then settle the guest's volumes.
    pub(crate) async fn after_resume(
        &self,
        sb_id: &str,
        vm: &Vm,
        identity: Option<&NewIdentity>,
    ) -> Result<()> {
        let mut ph = crate::timing::Phases::new("after_resume", sb_id);
        self.set_clock_and_identity(vm, identity, &mut ph).await?;
        self.settle_volumes(sb_id, vm).await?;
        ph.mark("settle_volumes");
        Ok(())
    }

    /// Sets the guest's wall clock from the host's (after its vCPUs stood still).
    pub(crate) async fn set_clock(&self, vm: &Vm) -> Result<()> {
        let agent = vm.agent(Duration::from_secs(10)).await?;
        agent
            .set_clock(SystemTime::now())
            .await
            .map_err(|e| agent_error(e, &vm.name))
    }

    async fn set_clock_and_identity(
        &self,
        vm: &Vm,
        identity: Option<&NewIdentity>,
        ph: &mut crate::timing::Phases,
    ) -> Result<()> {
        let agent = vm
            .agent(self.accel().accel.tuning().agent_after_resume)
            .await?;
        ph.mark("agent_connect");
        let clock = agent.set_clock(SystemTime::now());
        let Some(identity) = identity else {
            return clock.await.map_err(|e| agent_error(e, &vm.name));
        };
        let mut entropy = [0u8; 64];
        rand::Rng::fill(&mut rand::thread_rng(), &mut entropy[..]);
        let machine_id = format!("{:032x}", rand::random::<u128>());
        let named = |e| agent_error(e, &vm.name);
        if agent.has_feature("identity") {
            // One round trip for all of it (each costs tens of milliseconds on a just-restored guest).
            drop(clock);
            let mac_error = agent
                .set_identity(&kiln_agent_client::Identity {
                    time: SystemTime::now(),
                    machine_id: &machine_id,
                    hostname: &identity.hostname,
                    entropy: &entropy,
                    mac: identity.mac.as_deref(),
                })
                .await
                .map_err(named)?;
            if let Some(why) = mac_error {
                tracing::warn!(vm = %vm.name, mac = ?identity.mac, error = %why, "could not give the guest's NIC its new MAC");
            }
            ph.mark("identity");
            return Ok(());
        }
        // An older agent: one request each, one after the other: on a guest that has just been restored,
        // concurrent requests cost more (each wakes its own agent thread through cold guest code) than
        // they overlap (measured under TCG).
        clock.await.map_err(named)?;
        agent.set_machine_id(&machine_id).await.map_err(named)?;
        agent
            .set_hostname(&identity.hostname)
            .await
            .map_err(named)?;
        agent.reseed(&entropy).await.map_err(named)?;
        ph.mark("identity");
        if let Some(mac) = &identity.mac {
            // eth0 is the NIC the image's init configures. A guest without `ip` keeps its old address
            // (its network works either way: every sandbox has its own user-mode network).
            // Bounded: the guest's own `ip` may hang or be replaced, which only costs it its new MAC.
            let mut set =
                ExecRequest::argv(["ip", "link", "set", "dev", "eth0", "address", mac.as_str()]);
            set.timeout_ms = Some(MAC_TIMEOUT.as_millis() as u64);
            match tokio::time::timeout(MAC_TIMEOUT * 2, agent.exec_collect(set)).await {
                Ok(Ok(out)) if out.status.code == Some(0) => {}
                Ok(Ok(out)) => {
                    tracing::warn!(vm = %vm.name, mac, status = ?out.status, stderr = %String::from_utf8_lossy(&out.stderr), "could not give the guest's NIC its new MAC")
                }
                // A guest without `ip` (the Debian `base` image) cannot run it; a lost agent shows at
                // the next request.
                Ok(Err(e)) => {
                    tracing::warn!(vm = %vm.name, mac, error = %e, "could not give the guest's NIC its new MAC")
                }
                Err(_) => {
                    tracing::warn!(vm = %vm.name, mac, "setting the guest's NIC MAC timed out")
                }
            }
            ph.mark("mac");
        }
        Ok(())
    }

    /// Waits for the guest agent, failing early (with the console's last lines) if QEMU dies.
    async fn wait_for_agent(&self, vm: &Vm) -> Result<()> {
        let timeout = self.config().boot_timeout;
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
                let tail = if res.is_err() { vm.console_tail(15).await } else { String::new() };
                let agent = res.map_err(|e| {
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
                let tail = vm.console_tail(15).await;
                let qemu_log = kiln_vmm::safefs::read_tail(&vm.qemu_file("qemu.log"), 4096).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default();
                Err(Error::new(ErrorCode::BootFailed, format!(
                    "QEMU exited during boot. {}Last console lines:\n{tail}",
                    if qemu_log.trim().is_empty() { String::new() } else { format!("QEMU said: {}. ", qemu_log.trim()) }
                )))
            }
        }
    }

    /// The live VM of a running sandbox.
    pub(crate) async fn running_vm(&self, sb: &Sandbox) -> Result<Arc<Vm>> {
        self.require_state(sb, &[SandboxState::Running])?;
        self.live_vm(sb).await
    }

    /// The live VM of a running or paused sandbox.
    pub(crate) async fn live_vm(&self, sb: &Sandbox) -> Result<Arc<Vm>> {
        let vm = self.slot(&sb.id).vm.lock().await.clone();
        match vm {
            Some(vm) if vm.is_alive() => Ok(vm),
            Some(vm) => {
                let err = self.vm_died(&sb.id, &vm);
                self.db()
                    .set_state(&sb.id, SandboxState::Failed, None, Some(&err.message))?;
                Err(err)
            }
            None => Err(Error::internal(format!(
                "sandbox {} has no VM handle",
                sb.id
            ))),
        }
    }

    pub(crate) fn require_state(&self, sb: &Sandbox, allowed: &[SandboxState]) -> Result<()> {
        if allowed.contains(&sb.state) {
            return Ok(());
        }
        let hint = match sb.state {
            SandboxState::Paused => format!("resume it first (`kiln resume {}`)", sb.name),
            SandboxState::Stopped => format!("start it first (`kiln start {}`)", sb.name),
            SandboxState::Running => format!("pause or stop it first (`kiln pause {}`)", sb.name),
            SandboxState::Failed => format!(
                "it failed{}; delete it",
                sb.error
                    .as_deref()
                    .map(|e| format!(": {e}"))
                    .unwrap_or_default()
            ),
            SandboxState::Creating | SandboxState::Deleting => {
                "wait for the operation in progress".to_string()
            }
        };
        let wanted: Vec<&str> = allowed.iter().map(|s| s.as_str()).collect();
        Err(Error::new(
            ErrorCode::SandboxNotRunning,
            format!(
                "sandbox {} is {}, not {}; {hint}",
                sb.name,
                sb.state.as_str(),
                wanted.join(" or ")
            ),
        ))
    }
}

/// A new writable qcow2 layer on top of `below`, of the sandbox's disk size. `-u`: the backing file is
/// not opened (it may be in use), the chain is given explicitly when QEMU starts.
pub(crate) fn create_top_layer(path: &Path, below: &Layer, size: u64) -> Result<()> {
    // qemu-img follows a link at `path`: whatever has the name goes first (unlink never follows). The
    // directory is root's, so nothing can be planted again in between.
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(fsutil::io_error(
                &format!("replacing {}", path.display()),
                e,
            ))
        }
        _ => {}
    }
    let out = std::process::Command::new(kiln_vmm::qemu_img_binary())
        .args([
            "create",
            "-q",
            "-u",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=65536,lazy_refcounts=on",
            "-F",
        ])
        .arg(&below.format)
        .arg("-b")
        .arg(&below.path)
        .arg(path)
        .arg(size.to_string())
        .output()
        .map_err(|e| Error::internal(format!("running qemu-img: {e} (install qemu-utils)")))?;
    if !out.status.success() {
        return Err(fsutil::tool_error(
            &format!("creating disk layer {}", path.display()),
            &out.stderr,
        ));
    }
    Ok(())
}

/// QEMU's last stderr lines (its own reports, e.g. a failed migration load) as ` (QEMU: ...)`, or "".
fn qemu_said(vm: &crate::vm::Vm) -> String {
    let text = std::fs::read_to_string(vm.qemu_file("qemu.stderr")).unwrap_or_default();
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let last = &lines[lines.len().saturating_sub(4)..];
    if last.is_empty() {
        return String::new();
    }
    format!(" (QEMU: {})", last.join(" | "))
}
