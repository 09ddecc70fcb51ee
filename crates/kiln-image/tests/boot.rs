//! Builds the tiny image and boots it under QEMU (TCG) the way kiln's VMM does, checking the serial
//! console for `kiln-init: ready` and for the network and hostname set-up.
//!
//! Needs QEMU, the host tools the builder uses and network access to the Debian mirror for the first
//! kernel download, so it only runs when asked:
//!
//! ```text
//! cargo test -p kiln-image --test boot -- --ignored --nocapture   (or: make test-images)
//! ```
//!
//! The agent is `KILN_AGENT_BIN` if set, else the workspace's static agent build if present, else a
//! stand-in (a copy of static busybox, which exits at once and is restarted by /kiln/init; enough to
//! test booting). The kernel cache lives in cargo's test scratch directory, so reruns skip the download.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kiln_image::{kernel_cmdline, BuildOptions, CmdlineParams, Image, ImageStore, StderrProgress};

const READY: &str = "kiln-init: ready";
const QBOOT: &str = "/usr/share/qemu/qboot.rom";

fn agent_binary(scratch: &Path) -> PathBuf {
    if let Some(path) = std::env::var_os("KILN_AGENT_BIN") {
        return PathBuf::from(path);
    }
    let workspace_agent = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../target/x86_64-unknown-linux-gnu/agent/kiln-agent");
    if workspace_agent.is_file() {
        return workspace_agent;
    }
    let stand_in = scratch.join("kiln-agent");
    std::fs::copy("/bin/busybox", &stand_in)
        .expect("a static busybox at /bin/busybox (apt-get install busybox-static)");
    stand_in
}

/// Kills QEMU when the test ends, however it ends.
struct Vm(Child);

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Boots `image` with the VMM's QEMU command line and returns the console log once `READY` appears.
fn boot(image: &Image, kernel: &Path, firmware: Option<&str>, dir: &Path) -> (String, Duration) {
    let disk = dir.join("disk.qcow2");
    let console = dir.join("console.log");
    let status = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
        .arg(&image.rootfs)
        .arg(&disk)
        .arg("2G")
        .status()
        .expect("qemu-img runs");
    assert!(status.success(), "qemu-img create failed");
    let params = CmdlineParams {
        hostname: Some("boot-test".into()),
        resize: true,
        debug: true,
        ..Default::default()
    };
    let cmdline = kernel_cmdline(image, &params);
    let path = |name: &str| dir.join(name).display().to_string();
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args([
        "-accel",
        "tcg",
        "-M",
        "microvm,acpi=on,pit=on,pic=on,rtc=on,memory-backend=mem",
    ])
    .args(["-cpu", "max", "-smp", "1", "-m", "256M"])
    .args([
        "-object",
        &format!(
            "memory-backend-file,id=mem,size=256M,mem-path={},share=on",
            path("mem")
        ),
    ])
    .args(["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"])
    .args(["-serial", &format!("file:{}", console.display())]);
    if let Some(firmware) = firmware {
        cmd.args(["-bios", firmware]);
    }
    cmd.arg("-kernel")
        .arg(kernel)
        .arg("-initrd")
        .arg(&image.initrd)
        .args(["-append", &cmdline])
        .args([
            "-blockdev",
            &format!(
                "driver=qcow2,node-name=disk0,file.driver=file,file.filename={}",
                disk.display()
            ),
        ])
        .args(["-device", "virtio-blk-device,drive=disk0"])
        .args([
            "-netdev",
            "user,id=net0",
            "-device",
            "virtio-net-device,netdev=net0",
        ])
        .args(["-device", "virtio-serial-device"])
        .args([
            "-chardev",
            &format!(
                "socket,id=agent,path={},server=on,wait=off",
                path("agent.sock")
            ),
        ])
        .args(["-device", "virtserialport,chardev=agent,name=kiln.agent"])
        .stdin(Stdio::null());
    let started = Instant::now();
    let mut vm = Vm(cmd.spawn().expect("qemu-system-x86_64 runs"));
    let deadline = started + Duration::from_secs(90);
    let mut ready_after = None;
    loop {
        let log = std::fs::read_to_string(&console).unwrap_or_default();
        if ready_after.is_none() && log.contains(READY) {
            ready_after = Some(started.elapsed());
        }
        // kiln.debug=1 output ends with `df` of the root filesystem.
        if let (Some(ready_after), true) = (ready_after, log.contains("Mounted on")) {
            std::thread::sleep(Duration::from_millis(200));
            return (
                std::fs::read_to_string(&console).unwrap_or(log),
                ready_after,
            );
        }
        if let Ok(Some(status)) = vm.0.try_wait() {
            panic!("QEMU exited ({status}) before the guest was ready; console:\n{log}");
        }
        assert!(
            Instant::now() < deadline,
            "no `{READY}` and debug output within 90 s; console:\n{log}"
        );
        assert!(
            !log.contains("kiln-initramfs:"),
            "the initramfs failed; console:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn check_console(log: &str) {
    assert!(
        log.contains("hostname boot-test"),
        "hostname not set; console:\n{log}"
    );
    assert!(
        log.contains("inet 10.0.2.15/24"),
        "eth0 not configured; console:\n{log}"
    );
    assert!(
        log.contains("default via 10.0.2.2"),
        "no default route; console:\n{log}"
    );
    assert!(
        log.contains("nameserver 10.0.2.3"),
        "resolv.conf not written; console:\n{log}"
    );
    assert!(
        log.contains("/dev/vda / ext4 rw"),
        "root not mounted read-write; console:\n{log}"
    );
    assert!(
        log.contains("kiln.agent -> ../vport"),
        "agent port link missing; console:\n{log}"
    );
    // kiln.resize=1 grew the 1 GiB filesystem to the 2 GiB overlay.
    assert!(
        log.lines()
            .any(|l| l.starts_with("/dev/vda") && l.contains("1.9G")),
        "root not resized; console:\n{log}"
    );
}

#[test]
#[ignore = "builds an image and boots it (minutes); run with `make test-images`"]
fn builds_and_boots_tiny() {
    let scratch = tempfile::tempdir().expect("temp dir");
    let cache = Path::new(env!("CARGO_TARGET_TMPDIR")).join("kiln-image-cache");
    let store = ImageStore::new(scratch.path().join("images"), cache);
    let opts = BuildOptions {
        agent_bin: agent_binary(scratch.path()),
        force: false,
        rootfs_size_mib: None,
    };
    let started = Instant::now();
    let info = store
        .build("tiny", &opts, &StderrProgress::new())
        .expect("tiny builds");
    eprintln!("built tiny in {:.1}s", started.elapsed().as_secs_f64());
    assert_eq!(store.list().expect("list").len(), 1);
    assert_eq!(info.manifest.rootfs_size_bytes, 1 << 30);
    let image = store.get("tiny").expect("tiny is complete");

    let vm_dir = scratch.path().join("vm-bzimage");
    std::fs::create_dir_all(&vm_dir).expect("vm dir");
    let (log, ready_after) = boot(&image, &image.kernel, None, &vm_dir);
    eprintln!(
        "bzImage + SeaBIOS: ready after {:.2}s",
        ready_after.as_secs_f64()
    );
    check_console(&log);

    if let (Some(vmlinux), true) = (&image.vmlinux, Path::new(QBOOT).is_file()) {
        let vm_dir = scratch.path().join("vm-pvh");
        std::fs::create_dir_all(&vm_dir).expect("vm dir");
        let (log, ready_after) = boot(&image, vmlinux, Some(QBOOT), &vm_dir);
        eprintln!(
            "PVH vmlinux + qboot: ready after {:.2}s",
            ready_after.as_secs_f64()
        );
        check_console(&log);
    }
}
