//! The QEMU command line for a kiln VM, and launching it.
//!
//! Every VM has the same snapshot-friendly shape: a `microvm` machine whose RAM is a `memory-backend-file`
//! in the sandbox's directory (so a snapshot can keep RAM in a file and migrate only device state), only
//! migratable virtio-mmio devices, a QMP socket, a virtio-serial port for the guest agent, and the serial
//! console on a unix socket that the daemon reads into a bounded ring. QEMU runs in a session of its own (see `launch`) so it outlives the kiln daemon
//! and can be re-adopted, under a seccomp filter, and optionally as an unprivileged user in cgroups.

use std::path::{Path, PathBuf};

use crate::accel::Accel;
use crate::error::VmmError;

/// The virtio-serial port name the guest agent looks for.
pub const AGENT_PORT_NAME: &str = "kiln.agent";

/// QEMU's seccomp policy for every VM.
pub const SECCOMP: &str = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny";

/// Unix socket paths are limited to 107 bytes plus a NUL by the kernel.
const MAX_SOCKET_PATH: usize = 107;
/// The descriptor number a VM's TAP device has in QEMU (`launch` dup2s it there; /dev/kvm is 3).
pub const TAP_FD: i32 = 4;
/// The descriptor number a `/dev/vhost-net` descriptor gets in QEMU (with a TAP).
pub const VHOST_FD: i32 = 5;
/// Most queue pairs a NIC on a TAP gets (multiqueue, one pair per vCPU of a multi-vCPU guest).
pub const MAX_NET_QUEUES: usize = 8;

/// Queue pair `i`'s TAP and vhost-net descriptor numbers in QEMU: [`TAP_FD`] and [`VHOST_FD`] for the
/// first, then 6 and 7, 8 and 9, ...
pub fn queue_fds(i: usize) -> (i32, i32) {
    (TAP_FD + 2 * i as i32, VHOST_FD + 2 * i as i32)
}

/// A restore on a TAP: the unconnected user-mode netdev that receives a user-mode machine's slirp state.
pub const SLIRP_SINK: &str = "user,id=slirp-sink,restrict=on";

/// One image of a disk chain.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DiskLayer {
    pub path: PathBuf,
    /// `raw` or `qcow2`.
    pub format: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PortForward {
    pub host: u16,
    pub guest: u16,
}

/// What backs one volume slot: a virtio disk that every kiln VM has, so that the device set (and with it
/// the saved device state) is the same whether or not volumes are attached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VolumeBackend {
    /// No volume: a disk of size zero, so any I/O a stale mount still sends to it fails.
    Empty,
    /// A volume as a disk chain (a raw volume file, possibly under a throwaway qcow2 overlay).
    Chain(Vec<DiskLayer>),
}

/// Serial of the disk in volume slot `i`, which is how the guest agent finds it.
pub fn volume_serial(i: usize) -> String {
    format!("kiln-vol{i}")
}

/// Everything needed to start (or restore) one VM.
#[derive(Debug, Clone)]
pub struct VmSpec {
    /// Process and guest name, `kiln-<sandbox id>`; also how a re-adopted process is recognised.
    pub name: String,
    /// Where QEMU itself creates files: QMP and agent sockets, pid file, logs, migration output. The
    /// only directory of a sandbox that its VM's uid may write (`<sandbox>/vm`).
    pub run_dir: PathBuf,
    pub accel: Accel,
    /// The machine's recorded `-M` options (see [`known_machines`]); None: [`machine`] for `accel`.
    pub machine: Option<String>,
    /// Guest TSC frequency to ask KVM for (the machine's recorded one); ignored under TCG.
    pub tsc_khz: Option<u64>,
    /// RAM of the machine (`-m`): with a balloon, the most the guest can be given, not what it has.
    pub memory_mib: u64,
    /// A `virtio-balloon-device` (the last virtio-mmio device, so the others keep their addresses): it
    /// holds the part of `memory_mib` the guest is not given, so a restored copy can be given more.
    pub balloon: bool,
    /// The balloon has free page reporting (`free-page-reporting=on`): the guest hands pages it freed back
    /// to QEMU, which punches them out of the RAM file. A virtio feature and queue of the device, so part
    /// of the saved state: recorded per machine (`Layout::free_page_reporting`).
    pub balloon_reporting: bool,
    /// vCPUs the guest runs (online).
    pub vcpus: u32,
    /// vCPUs QEMU creates; those above `vcpus` stay offline in the guest until a resume asks for them.
    /// `microvm` has no CPU hotplug, so they must exist from boot for a saved machine to gain vCPUs.
    pub max_vcpus: u32,
    /// Backing file of guest RAM.
    pub memory_file: PathBuf,
    /// `share=on` writes guest RAM through to `memory_file`; `false` maps it privately (copy-on-write), which
    /// is how restored VMs share an immutable snapshot memory file.
    pub memory_shared: bool,
    /// Firmware (`-bios`); None for QEMU's default.
    pub firmware: Option<PathBuf>,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub cmdline: String,
    /// The root disk as a chain of images, bottom (the template) first. Only the last is writable; lower
    /// layers are immutable and may be shared with snapshots and other sandboxes.
    pub disk_layers: Vec<DiskLayer>,
    pub mac: String,
    pub forwards: Vec<PortForward>,
    /// Volume slots, in order; their number is fixed for a machine's lifetime (restores need the same).
    pub volumes: Vec<VolumeBackend>,
    /// Start with `-incoming defer` to receive migrated device state over QMP.
    pub incoming: bool,
    /// Start with vCPUs stopped (`-S`).
    pub start_paused: bool,
    /// Whether the guest may open connections through user networking; `false` is slirp's `restrict=on`
    /// (port forwards into the guest still work).
    pub egress: bool,
    /// A TAP device's descriptor (opened by the daemon, attached to its bridge): the NIC's backend is that
    /// TAP, passed to QEMU as [`TAP_FD`], instead of user-mode networking (`forwards` and `egress` then do
    /// not apply: the daemon's firewall and port proxy do that job).
    pub tap_fd: Option<i32>,
    /// An open `/dev/vhost-net` (the daemon's; the VM's uid cannot open it) for the TAP: the kernel
    /// moves the NIC's packets instead of QEMU's thread. Passed as [`VHOST_FD`]; ignored without a TAP.
    pub vhost_fd: Option<i32>,
    /// The TAP's further queues (multiqueue), each a descriptor of the same device and its own
    /// `/dev/vhost-net` one (vhost-net is used only when every queue has one). The queue-pair count is
    /// part of the NIC's saved state: fixed for the machine and everything restored from it. Ignored
    /// without `tap_fd`; at most [`MAX_NET_QUEUES`] in all.
    pub tap_queues: Vec<(i32, Option<i32>)>,
    /// Who the process runs as and which cgroups it joins.
    pub confine: crate::launch::Confine,
}

impl VmSpec {
    /// Queue pairs of the NIC: one, or the TAP's queues.
    pub fn net_queues(&self) -> usize {
        if self.tap_fd.is_some() {
            (1 + self.tap_queues.len()).min(MAX_NET_QUEUES)
        } else {
            1
        }
    }

    pub fn qmp_socket(&self) -> PathBuf {
        self.run_dir.join("qmp.sock")
    }
    pub fn agent_socket(&self) -> PathBuf {
        self.run_dir.join("agent.sock")
    }
    pub fn pid_file(&self) -> PathBuf {
        self.run_dir.join("qemu.pid")
    }
    /// The serial console's chardev socket. QEMU drops console output while no one is connected, so a
    /// guest never blocks on its console when the daemon is away.
    pub fn console_socket(&self) -> PathBuf {
        self.run_dir.join("console.sock")
    }
    pub fn qemu_log(&self) -> PathBuf {
        self.run_dir.join("qemu.log")
    }

    /// The full QEMU argument list (without the binary). Pure, so it is unit-tested.
    pub fn args(&self) -> Vec<String> {
        let mut a: Vec<String> = Vec::with_capacity(64);
        let mut push = |items: &[&str]| a.extend(items.iter().map(|s| s.to_string()));
        push(&["-name", &format!("{},process={}", self.name, self.name)]);
        let accel = self.accel.qemu_args();
        push(&accel.iter().map(String::as_str).collect::<Vec<_>>());
        let machine = self.machine.clone().unwrap_or_else(|| machine(self.accel));
        push(&["-M", &machine]);
        let mut cpu = crate::cpu::model(self.accel);
        // The frequency the guest's TSC was recorded with: QEMU then fails (instead of warning) where KVM
        // cannot run the TSC at it.
        if let Some(khz) = self.tsc_khz.filter(|_| self.accel == Accel::Kvm) {
            cpu.push_str(&format!(",tsc-frequency={}", khz * 1000));
        }
        push(&["-cpu", &cpu]);
        push(&["-smp", &self.vcpus.max(self.max_vcpus).to_string()]);
        push(&["-m", &format!("{}M", self.memory_mib)]);
        // A private mapping opens its (immutable, shared) file read-only with writable RAM on top
        // (`readonly=on,rom=off`): the VM's user may only read a snapshot's RAM file.
        push(&[
            "-object",
            &format!(
                "memory-backend-file,id=mem,size={}M,mem-path={},{},prealloc=off",
                self.memory_mib,
                qemu_opt_path(&self.memory_file),
                if self.memory_shared {
                    "share=on"
                } else {
                    "share=off,readonly=on,rom=off"
                }
            ),
        ]);
        // A guest reboot or panic ends the VM instead of looping, so a crash is seen as one.
        push(&["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"]);
        push(&[
            "-chardev",
            &format!(
                "socket,id=console,path={},server=on,wait=off",
                qemu_opt_path(&self.console_socket())
            ),
        ]);
        push(&["-serial", "chardev:console"]);
        if let Some(fw) = &self.firmware {
            push(&["-bios", &fw.to_string_lossy()]);
        }
        push(&["-kernel", &self.kernel.to_string_lossy()]);
        push(&["-initrd", &self.initrd.to_string_lossy()]);
        push(&["-append", &self.guest_cmdline()]);
        let io = disk_io(self.accel);
        if io.iothread {
            push(&["-object", &format!("iothread,id={DISK_IOTHREAD}")]);
        }
        for blockdev in chain_blockdevs("disk0", "layer", &self.disk_layers, io.aio) {
            push(&["-blockdev", &blockdev]);
        }
        let mut rootdisk = "virtio-blk-device,drive=disk0,id=rootdisk".to_string();
        if io.iothread {
            rootdisk.push_str(&format!(",iothread={DISK_IOTHREAD}"));
        }
        push(&["-device", &rootdisk]);
        // The same NIC (and so the same device state) either way: a machine saved in one mode restores
        // in the other.
        let queues = self.net_queues();
        let netdev = if self.tap_fd.is_some() {
            let numbers = |pick: fn((i32, i32)) -> i32| {
                (0..queues)
                    .map(|i| pick(queue_fds(i)).to_string())
                    .collect::<Vec<_>>()
                    .join(":")
            };
            let vhost = self.vhost_fd.is_some() && self.tap_queues.iter().all(|(_, v)| v.is_some());
            if queues == 1 {
                let mut netdev = format!("tap,id=net0,fd={TAP_FD}");
                if vhost {
                    netdev.push_str(&format!(",vhost=on,vhostfd={VHOST_FD}"));
                }
                netdev
            } else {
                let mut netdev = format!("tap,id=net0,fds={}", numbers(|q| q.0));
                if vhost {
                    netdev.push_str(&format!(",vhost=on,vhostfds={}", numbers(|q| q.1)));
                }
                netdev
            }
        } else {
            let mut netdev = "user,id=net0".to_string();
            if !self.egress {
                netdev.push_str(",restrict=on");
            }
            for f in &self.forwards {
                netdev.push_str(&format!(",hostfwd=tcp:127.0.0.1:{}-:{}", f.host, f.guest));
            }
            netdev
        };
        push(&["-netdev", &netdev]);
        // User networking saves its own state ("slirp") in the stream, and a stream holding a section
        // the receiving QEMU has nowhere to put fails to load (QEMU exits): a restore on a TAP gets a
        // slirp with no NIC and no egress to take it, so a machine saved on user networking loads.
        if self.tap_fd.is_some() && self.incoming {
            push(&["-netdev", SLIRP_SINK]);
        }
        let mut nic = format!("virtio-net-device,netdev=net0,mac={}", self.mac);
        if queues > 1 {
            nic.push_str(",mq=on");
        }
        push(&["-device", &nic]);
        push(&["-device", "virtio-serial-device"]);
        for (i, backend) in self.volumes.iter().enumerate() {
            let node = format!("vol{i}");
            match backend {
                VolumeBackend::Empty => push(&[
                    "-blockdev",
                    &format!("driver=null-co,node-name={node},size=0"),
                ]),
                VolumeBackend::Chain(layers) => {
                    for blockdev in chain_blockdevs(&node, &format!("{node}-layer"), layers, None) {
                        push(&["-blockdev", &blockdev]);
                    }
                }
            }
            push(&[
                "-device",
                &format!(
                    "virtio-blk-device,drive={node},id={node},serial={}",
                    volume_serial(i)
                ),
            ]);
        }
        push(&[
            "-chardev",
            &format!(
                "socket,id=agent,path={},server=on,wait=off",
                qemu_opt_path(&self.agent_socket())
            ),
        ]);
        push(&[
            "-device",
            &format!("virtserialport,chardev=agent,name={AGENT_PORT_NAME}"),
        ]);
        if self.balloon {
            let reporting = if self.balloon_reporting {
                ",free-page-reporting=on"
            } else {
                ""
            };
            push(&[
                "-device",
                &format!("virtio-balloon-device,id=balloon0{reporting}"),
            ]);
        }
        push(&[
            "-qmp",
            &format!(
                "unix:{},server=on,wait=off",
                qemu_opt_path(&self.qmp_socket())
            ),
        ]);
        push(&["-pidfile", &self.pid_file().to_string_lossy()]);
        push(&["-D", &self.qemu_log().to_string_lossy()]);
        // seccomp: no exec/fork, no privilege or scheduler/affinity changes, no obsolete syscalls. This is
        // why QEMU is not started with `-daemonize` (its fork and setsid would be refused): `launch`
        // detaches it instead.
        push(&["-sandbox", SECCOMP]);
        if self.incoming {
            push(&["-incoming", "defer"]);
        }
        if self.start_paused {
            push(&["-S"]);
        }
        a
    }

    /// The kernel command line: a cold boot with spare vCPUs brings up only `vcpus` of them (`maxcpus=`
    /// keeps the rest present but offline, never started, so they cost no host CPU). A restored guest has
    /// booted already: its command line is left as it was.
    ///
    /// With a balloon, `init_on_alloc=0`: the guest would otherwise zero every page before handing it to
    /// the balloon, which made filling it 10 times slower under TCG (~4 s instead of ~0.4 s for 256 MiB).
    /// The guest kernel still zeroes every page it gives to user space.
    fn guest_cmdline(&self) -> String {
        let mut cmdline = self.cmdline.clone();
        if self.incoming {
            return cmdline;
        }
        if self.max_vcpus > self.vcpus {
            cmdline.push_str(&format!(" maxcpus={}", self.vcpus));
        }
        if self.balloon {
            cmdline.push_str(" init_on_alloc=0");
        }
        cmdline
    }

    pub(crate) fn check_paths(&self) -> Result<(), VmmError> {
        for sock in [
            self.qmp_socket(),
            self.agent_socket(),
            self.console_socket(),
        ] {
            if sock.as_os_str().len() > MAX_SOCKET_PATH {
                return Err(VmmError::LaunchFailed {
                    detail: format!(
                        "socket path {} is longer than the kernel's {MAX_SOCKET_PATH}-byte limit; use a shorter --data-dir",
                        sock.display()
                    ),
                });
            }
        }
        Ok(())
    }
}

/// The machine type of every kiln VM (the first word of each `MACHINE*`): a saved state names it.
pub const MACHINE_TYPE: &str = "microvm";

/// The machine type and options of a TCG VM booted by this kiln (`-M`); recorded in its layout and
/// snapshots, whose saved state loads only into the same machine. No PIT: a guest told its TSC frequency
/// (`tsc_early_khz=`) calibrates nothing against it and runs on the LAPIC timer, but QEMU kept the PIT
/// toggling as the firmware programmed it, waking its main loop ~36 times a second per idle VM. The PIC
/// stays (the kernel expects the legacy interrupt controller under TCG).
pub const MACHINE: &str = "microvm,acpi=on,pit=off,pic=on,rtc=on,isa-serial=on,memory-backend=mem";

/// TCG machines with the PIT: those booted without a TSC frequency on the kernel command line (the
/// kernel then hangs calibrating the TSC without a PIT) and every TCG machine of older kilns, whose
/// saved state holds a PIT and loads only into a machine that has one.
pub const MACHINE_TCG_PIT: &str =
    "microvm,acpi=on,pit=on,pic=on,rtc=on,isa-serial=on,memory-backend=mem";

/// Under KVM the guest has kvm-clock and the in-kernel LAPIC timer, so the legacy PIT and PIC (whose
/// emulation costs exits and whose ticks only add noise) are left out; the RTC stays for the boot clock.
pub const MACHINE_KVM: &str =
    "microvm,acpi=on,pit=off,pic=off,rtc=on,isa-serial=on,memory-backend=mem";

/// The machine (`-M`) this kiln builds for `accel` today.
pub fn machine(accel: Accel) -> String {
    match accel {
        Accel::Tcg => MACHINE.to_string(),
        Accel::Kvm => MACHINE_KVM.to_string(),
    }
}

/// The machine for a cold boot with kernel command line `cmdline`: under TCG the PIT is left out only
/// when the command line gives the guest its TSC frequency.
pub fn machine_for_boot(accel: Accel, cmdline: &str) -> String {
    let tsc_given = cmdline
        .split_whitespace()
        .any(|p| p.starts_with("tsc_early_khz="));
    match accel {
        Accel::Tcg if !tsc_given => MACHINE_TCG_PIT.to_string(),
        _ => machine(accel),
    }
}

/// The machine of a machine that recorded none: what kiln built before it recorded machines.
pub fn machine_unrecorded(accel: Accel) -> String {
    match accel {
        Accel::Tcg => MACHINE_TCG_PIT.to_string(),
        Accel::Kvm => MACHINE_KVM.to_string(),
    }
}

/// Every `-M` option string this kiln builds (and so restores saved state into) for `accel`.
pub fn known_machines(accel: Accel) -> Vec<String> {
    match accel {
        Accel::Tcg => vec![MACHINE.to_string(), MACHINE_TCG_PIT.to_string()],
        Accel::Kvm => vec![MACHINE_KVM.to_string()],
    }
}

/// Where `qboot` is looked for: the only firmware kiln ever gives QEMU (snapshot manifests naming any
/// other are refused).
pub const QBOOT_PATHS: [&str; 2] = ["/usr/share/qemu/qboot.rom", "/usr/share/seabios/qboot.rom"];

/// QEMU's minimal `qboot` firmware, when installed. With an uncompressed kernel it boots a microvm
/// about 1.5 s faster under TCG than SeaBIOS with a compressed one (no self-decompression).
pub fn qboot_firmware() -> Option<PathBuf> {
    QBOOT_PATHS.iter().map(PathBuf::from).find(|p| p.is_file())
}

/// The iothread the root disk runs in where [`disk_io`] asks for one.
pub const DISK_IOTHREAD: &str = "kiln-io0";

/// How the root disk does I/O. Neither choice is part of the saved device state (virtio-blk migrates the
/// same with or without them), so it follows the accelerator QEMU runs under, not the machine's record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskIo {
    /// The disk's virtqueue is served by an iothread of its own instead of QEMU's main loop.
    pub iothread: bool,
    /// `aio=` of the disk's file nodes; None: QEMU's default thread pool.
    pub aio: Option<&'static str>,
}

/// Under KVM an iothread with `aio=io_uring` (where io_uring is usable: see [`io_uring_usable`]); under TCG
/// QEMU's defaults, which measured the same within noise (docs/kvm.md), so no extra thread per VM.
pub fn disk_io(accel: Accel) -> DiskIo {
    disk_io_with(accel, accel == Accel::Kvm && io_uring_usable())
}

fn disk_io_with(accel: Accel, io_uring: bool) -> DiskIo {
    match accel {
        Accel::Tcg => DiskIo {
            iothread: false,
            aio: None,
        },
        Accel::Kvm => DiskIo {
            iothread: true,
            aio: io_uring.then_some("io_uring"),
        },
    }
}

/// Whether VMs can use io_uring here: `kernel.io_uring_disabled` is 0 (VMs run unprivileged; 1 or 2 deny
/// them) and the syscall is allowed (container seccomp profiles often refuse it). Checked once.
pub fn io_uring_usable() -> bool {
    static USABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *USABLE.get_or_init(|| {
        let allowed = std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled")
            .map(|s| s.trim() == "0")
            .unwrap_or(true);
        // struct io_uring_params is 120 bytes; zeroed asks for no special set-up.
        let mut params = [0u8; 120];
        // SAFETY: io_uring_setup writes at most sizeof(struct io_uring_params) into `params`.
        let fd = unsafe { libc::syscall(libc::SYS_io_uring_setup, 1u32, params.as_mut_ptr()) };
        if fd >= 0 {
            // SAFETY: closing the descriptor io_uring_setup just returned.
            unsafe { libc::close(fd as i32) };
        }
        allowed && fd >= 0
    })
}

/// `-blockdev` values for a disk chain. Each layer names its backing node explicitly, so the backing paths
/// recorded inside qcow2 headers are never used: a chain can be assembled from hard links anywhere. The top
/// layer is node `disk0`.
pub fn disk_chain_blockdevs(layers: &[DiskLayer]) -> Vec<String> {
    chain_blockdevs("disk0", "layer", layers, None)
}

/// A chain whose top node is `top` and whose lower nodes are `<lower>N`; `aio` for every file node.
fn chain_blockdevs(top: &str, lower: &str, layers: &[DiskLayer], aio: Option<&str>) -> Vec<String> {
    let last = layers.len().saturating_sub(1);
    layers
        .iter()
        .enumerate()
        .map(|(i, layer)| {
            let node = if i == last {
                top.to_string()
            } else {
                format!("{lower}{i}")
            };
            let aio = aio.map(|a| format!("file.aio={a},")).unwrap_or_default();
            let mut v = format!(
                "driver={},node-name={node},file.driver=file,{aio}file.filename={}",
                layer.format,
                qemu_opt_path(&layer.path)
            );
            if layer.format == "qcow2" {
                if i == 0 {
                    v.push_str(",backing=null");
                } else {
                    v.push_str(&format!(",backing={lower}{}", i - 1));
                }
            }
            if i == last {
                v.push_str(",discard=unmap");
            } else {
                v.push_str(",read-only=on");
            }
            v
        })
        .collect()
}

/// QEMU's option syntax uses ',' as separator; a literal comma in a value is written ",,".
fn qemu_opt_path(p: &Path) -> String {
    p.to_string_lossy().replace(',', ",,")
}

pub fn read_pid_file(path: &Path) -> Result<u32, VmmError> {
    // QEMU writes it in a directory its (possibly hostile) uid controls: never follow or block.
    let bytes = crate::safefs::read_tail(path, 64)
        .map_err(|e| VmmError::io(format!("reading {}", path.display()), e))?;
    let text = String::from_utf8_lossy(&bytes);
    text.trim().parse().map_err(|_| VmmError::LaunchFailed {
        detail: format!("pid file {} holds '{}'", path.display(), text.trim()),
    })
}

/// The last `lines` lines of a (console) log, for error messages.
pub fn tail_lines(path: &Path, lines: usize) -> String {
    // The log lies in the VM's own directory: no links followed, no blocking on a planted FIFO.
    let Ok(buf) = crate::safefs::read_tail(path, 16 * 1024) else {
        return String::new();
    };
    let text = String::from_utf8_lossy(&buf);
    let all: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_machine_is_of_the_machine_type() {
        for m in [MACHINE, MACHINE_TCG_PIT, MACHINE_KVM] {
            assert_eq!(m.split(',').next(), Some(MACHINE_TYPE), "{m}");
        }
    }

    fn spec() -> VmSpec {
        VmSpec {
            name: "kiln-sb1".into(),
            run_dir: "/data/sb1".into(),
            accel: Accel::Tcg,
            machine: None,
            tsc_khz: Some(2_000_000),
            memory_mib: 256,
            balloon: false,
            balloon_reporting: false,
            vcpus: 2,
            max_vcpus: 2,
            memory_file: "/data/sb1/mem,x".into(),
            memory_shared: true,
            firmware: None,
            kernel: "/img/vmlinuz".into(),
            initrd: "/img/initrd.img".into(),
            cmdline: "console=ttyS0 root=/dev/vda".into(),
            disk_layers: vec![
                DiskLayer {
                    path: "/img/rootfs.img".into(),
                    format: "raw".into(),
                },
                DiskLayer {
                    path: "/data/sb1/disk.qcow2".into(),
                    format: "qcow2".into(),
                },
            ],
            mac: "52:54:00:12:34:56".into(),
            forwards: vec![PortForward {
                host: 8080,
                guest: 80,
            }],
            volumes: vec![],
            incoming: false,
            start_paused: false,
            egress: true,
            tap_fd: None,
            vhost_fd: None,
            tap_queues: Vec::new(),
            confine: Default::default(),
        }
    }

    fn value_after<'a>(args: &'a [String], flag: &str) -> Vec<&'a str> {
        args.windows(2)
            .filter(|w| w[0] == flag)
            .map(|w| w[1].as_str())
            .collect()
    }

    #[test]
    fn memory_is_a_shared_file_backend_with_escaped_path() {
        let args = spec().args();
        let objects = value_after(&args, "-object");
        assert_eq!(
            objects,
            ["memory-backend-file,id=mem,size=256M,mem-path=/data/sb1/mem,,x,share=on,prealloc=off"]
        );
        assert!(value_after(&args, "-M")[0].contains("memory-backend=mem"));
    }

    #[test]
    fn restored_vm_maps_memory_privately_and_waits_for_incoming() {
        let mut s = spec();
        s.memory_shared = false;
        s.incoming = true;
        s.start_paused = true;
        let args = s.args();
        assert!(value_after(&args, "-object")[0].contains("share=off,readonly=on,rom=off"));
        assert_eq!(value_after(&args, "-incoming"), ["defer"]);
        assert!(args.iter().any(|a| a == "-S"));
    }

    #[test]
    fn disk_chain_names_backing_nodes_explicitly() {
        let layers = vec![
            DiskLayer {
                path: "/i/root.img".into(),
                format: "raw".into(),
            },
            DiskLayer {
                path: "/s/a.qcow2".into(),
                format: "qcow2".into(),
            },
            DiskLayer {
                path: "/s/b.qcow2".into(),
                format: "qcow2".into(),
            },
        ];
        assert_eq!(
            disk_chain_blockdevs(&layers),
            [
                "driver=raw,node-name=layer0,file.driver=file,file.filename=/i/root.img,read-only=on",
                "driver=qcow2,node-name=layer1,file.driver=file,file.filename=/s/a.qcow2,backing=layer0,read-only=on",
                "driver=qcow2,node-name=disk0,file.driver=file,file.filename=/s/b.qcow2,backing=layer1,discard=unmap",
            ]
        );
    }

    #[test]
    fn volume_slots_are_disks_with_serials_empty_or_not() {
        let mut s = spec();
        s.volumes = vec![
            VolumeBackend::Chain(vec![DiskLayer {
                path: "/v/data.img".into(),
                format: "raw".into(),
            }]),
            VolumeBackend::Empty,
        ];
        let args = s.args();
        let blockdevs = value_after(&args, "-blockdev");
        assert!(blockdevs.contains(
            &"driver=raw,node-name=vol0,file.driver=file,file.filename=/v/data.img,discard=unmap"
        ));
        assert!(blockdevs.contains(&"driver=null-co,node-name=vol1,size=0"));
        let devices = value_after(&args, "-device");
        assert!(devices.contains(&"virtio-blk-device,drive=vol0,id=vol0,serial=kiln-vol0"));
        assert!(devices.contains(&"virtio-blk-device,drive=vol1,id=vol1,serial=kiln-vol1"));
    }

    #[test]
    fn port_forwards_bind_loopback_only() {
        let args = spec().args();
        assert_eq!(
            value_after(&args, "-netdev"),
            ["user,id=net0,hostfwd=tcp:127.0.0.1:8080-:80"]
        );
    }

    #[test]
    fn a_tap_descriptor_replaces_user_networking_behind_the_same_nic() {
        let mut s = spec();
        s.tap_fd = Some(17);
        let args = s.args();
        assert_eq!(value_after(&args, "-netdev"), ["tap,id=net0,fd=4"]);
        s.incoming = true;
        assert_eq!(
            value_after(&s.args(), "-netdev"),
            ["tap,id=net0,fd=4", SLIRP_SINK]
        );
        assert!(value_after(&args, "-device")
            .iter()
            .any(|d| d.starts_with("virtio-net-device,netdev=net0,mac=52:54:00:12:34:56")));
        s.vhost_fd = Some(18);
        assert_eq!(
            value_after(&s.args(), "-netdev")[0],
            "tap,id=net0,fd=4,vhost=on,vhostfd=5"
        );
    }

    #[test]
    fn a_multiqueue_tap_gets_one_descriptor_pair_per_queue_and_an_mq_nic() {
        let mut s = spec();
        s.tap_fd = Some(17);
        s.tap_queues = vec![(19, None)];
        let args = s.args();
        assert_eq!(value_after(&args, "-netdev"), ["tap,id=net0,fds=4:6"]);
        assert!(value_after(&args, "-device")
            .iter()
            .any(|d| d.starts_with("virtio-net-device,netdev=net0,mac=") && d.ends_with(",mq=on")));
        // vhost-net only when every queue has a descriptor of it.
        s.vhost_fd = Some(18);
        assert_eq!(value_after(&s.args(), "-netdev")[0], "tap,id=net0,fds=4:6");
        s.tap_queues = vec![(19, Some(20)), (21, Some(22))];
        assert_eq!(
            value_after(&s.args(), "-netdev")[0],
            "tap,id=net0,fds=4:6:8,vhost=on,vhostfds=5:7:9"
        );
        // One queue: the NIC is the same as ever (no mq), so single-queue machines restore anywhere.
        s.tap_queues.clear();
        assert!(!s.args().iter().any(|a| a.contains("mq=on")));
    }

    #[test]
    fn no_egress_restricts_user_networking_and_seccomp_is_always_on() {
        let mut s = spec();
        s.egress = false;
        let args = s.args();
        assert_eq!(
            value_after(&args, "-netdev"),
            ["user,id=net0,restrict=on,hostfwd=tcp:127.0.0.1:8080-:80"]
        );
        assert_eq!(value_after(&args, "-sandbox"), [SECCOMP]);
        assert!(!args.iter().any(|a| a == "-daemonize"));
    }

    #[test]
    fn cpu_machine_and_device_follow_accelerator() {
        let mut s = spec();
        // TCG: no fixed TSC frequency, the PIC on (the PIT only where the machine has it), no descriptor
        // handed over.
        assert_eq!(value_after(&s.args(), "-cpu"), ["max"]);
        assert_eq!(value_after(&s.args(), "-accel"), ["tcg"]);
        assert!(value_after(&s.args(), "-M")[0].contains("pit=off,pic=on"));
        assert!(value_after(&s.args(), "-add-fd").is_empty());
        s.accel = Accel::Kvm;
        let args = s.args();
        assert_eq!(
            value_after(&args, "-cpu"),
            ["host,vmx=off,svm=off,pmu=off,tsc-frequency=2000000000"]
        );
        // KVM comes through the descriptor the daemon opened, not by path as the VM's uid.
        assert_eq!(
            value_after(&args, "-add-fd"),
            ["fd=3,set=1,opaque=kiln-kvm"]
        );
        assert_eq!(value_after(&args, "-accel"), ["kvm,device=/dev/fdset/1"]);
        assert!(value_after(&args, "-M")[0].contains("pit=off,pic=off,rtc=on"));
    }

    #[test]
    fn root_disk_io_follows_accelerator() {
        // TCG: QEMU's defaults (an iothread and io_uring measured the same there).
        let s = spec();
        let args = s.args();
        assert!(!value_after(&args, "-object")
            .iter()
            .any(|o| o.starts_with("iothread")));
        assert!(!args.iter().any(|a| a.contains("aio=")));
        assert!(
            value_after(&args, "-device").contains(&"virtio-blk-device,drive=disk0,id=rootdisk")
        );
        // KVM: the root disk in an iothread, every layer of its chain with io_uring where usable.
        assert_eq!(
            disk_io_with(Accel::Kvm, true),
            DiskIo {
                iothread: true,
                aio: Some("io_uring")
            }
        );
        assert_eq!(
            disk_io_with(Accel::Kvm, false),
            DiskIo {
                iothread: true,
                aio: None
            }
        );
        assert_eq!(disk_io_with(Accel::Tcg, true), disk_io(Accel::Tcg));
        let mut k = spec();
        k.accel = Accel::Kvm;
        k.volumes = vec![VolumeBackend::Chain(vec![DiskLayer {
            path: "/v/data.img".into(),
            format: "raw".into(),
        }])];
        let args = k.args();
        assert!(value_after(&args, "-object").contains(&"iothread,id=kiln-io0"));
        assert!(value_after(&args, "-device")
            .contains(&"virtio-blk-device,drive=disk0,id=rootdisk,iothread=kiln-io0"));
        let aio = if io_uring_usable() {
            "file.aio=io_uring,"
        } else {
            ""
        };
        let blockdevs = value_after(&args, "-blockdev");
        assert_eq!(
            &blockdevs[..2],
            [
                format!("driver=raw,node-name=layer0,file.driver=file,{aio}file.filename=/img/rootfs.img,read-only=on"),
                format!("driver=qcow2,node-name=disk0,file.driver=file,{aio}file.filename=/data/sb1/disk.qcow2,backing=layer0,discard=unmap"),
            ]
        );
        // Volumes keep QEMU's defaults.
        assert!(blockdevs.contains(
            &"driver=raw,node-name=vol0,file.driver=file,file.filename=/v/data.img,discard=unmap"
        ));
    }

    #[test]
    fn tcg_machines_drop_the_pit_only_when_the_guest_knows_its_tsc_and_old_ones_keep_theirs() {
        let tcg = |cmdline| machine_for_boot(Accel::Tcg, cmdline);
        assert!(tcg("console=ttyS0 tsc=reliable tsc_early_khz=2445300").contains("pit=off,pic=on"));
        // Without the frequency the kernel calibrates the TSC against the PIT.
        assert_eq!(tcg("console=ttyS0 tsc=reliable"), MACHINE_TCG_PIT);
        assert_eq!(tcg("x.tsc_early_khz=1"), MACHINE_TCG_PIT);
        assert_eq!(machine_for_boot(Accel::Kvm, "console=ttyS0"), MACHINE_KVM);
        // Machines that recorded no machine were built with the PIT under TCG; both stay restorable.
        assert_eq!(machine_unrecorded(Accel::Tcg), MACHINE_TCG_PIT);
        assert_eq!(machine_unrecorded(Accel::Kvm), MACHINE_KVM);
        assert_eq!(known_machines(Accel::Tcg), [MACHINE, MACHINE_TCG_PIT]);
        assert_eq!(known_machines(Accel::Kvm), [MACHINE_KVM]);
        // A machine's recorded options win over today's default.
        let mut s = spec();
        s.machine = Some(MACHINE_TCG_PIT.into());
        assert_eq!(value_after(&s.args(), "-M"), [MACHINE_TCG_PIT]);
        s.machine = None;
        assert_eq!(value_after(&s.args(), "-M"), [MACHINE]);
    }

    #[test]
    fn spare_vcpus_are_created_but_kept_offline_at_boot() {
        let mut s = spec();
        s.vcpus = 1;
        s.max_vcpus = 4;
        let args = s.args();
        assert_eq!(value_after(&args, "-smp"), ["4"]);
        assert_eq!(
            value_after(&args, "-append"),
            ["console=ttyS0 root=/dev/vda maxcpus=1"]
        );
        // A restore keeps the command line the guest booted with (it is not read again).
        s.incoming = true;
        assert_eq!(value_after(&s.args(), "-smp"), ["4"]);
        assert_eq!(
            value_after(&s.args(), "-append"),
            ["console=ttyS0 root=/dev/vda"]
        );
        // Without spares (and for machines recorded before they existed) nothing changes.
        let plain = spec();
        assert_eq!(value_after(&plain.args(), "-smp"), ["2"]);
        assert_eq!(
            value_after(&plain.args(), "-append"),
            ["console=ttyS0 root=/dev/vda"]
        );
    }

    #[test]
    fn a_balloon_is_the_last_virtio_device_and_only_when_asked_for() {
        let plain = spec().args();
        assert!(!plain.iter().any(|a| a.contains("balloon")));
        let mut s = spec();
        s.balloon = true;
        let args = s.args();
        let devices = value_after(&args, "-device");
        assert_eq!(devices.last(), Some(&"virtio-balloon-device,id=balloon0"));
        assert_eq!(
            value_after(&args, "-append"),
            ["console=ttyS0 root=/dev/vda init_on_alloc=0"]
        );
        // Everything else is as without it, so the other devices keep their virtio-mmio slots.
        assert_eq!(
            &devices[..devices.len() - 1],
            &value_after(&plain, "-device")[..]
        );
        // Free page reporting is the machine's recorded choice, the same under either accelerator, and
        // only on a balloon.
        for accel in [Accel::Tcg, Accel::Kvm] {
            s.accel = accel;
            s.balloon_reporting = true;
            assert_eq!(
                value_after(&s.args(), "-device").last(),
                Some(&"virtio-balloon-device,id=balloon0,free-page-reporting=on")
            );
            s.balloon_reporting = false;
            assert_eq!(
                value_after(&s.args(), "-device").last(),
                Some(&"virtio-balloon-device,id=balloon0")
            );
        }
        let mut no_balloon = spec();
        no_balloon.balloon_reporting = true;
        assert!(!no_balloon.args().iter().any(|a| a.contains("balloon")));
    }

    #[test]
    fn overlong_socket_paths_are_refused() {
        let mut s = spec();
        s.run_dir = PathBuf::from(format!("/{}", "d".repeat(120)));
        let err = s.check_paths().unwrap_err().to_string();
        assert!(err.contains("shorter --data-dir"), "{err}");
    }

    #[test]
    fn tail_keeps_last_nonempty_lines() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("log");
        std::fs::write(&p, "a\n\nb\nc\nd\n").unwrap();
        assert_eq!(tail_lines(&p, 2), "c\nd");
        assert_eq!(tail_lines(&dir.path().join("missing"), 2), "");
    }
}
