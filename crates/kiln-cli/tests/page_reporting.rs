//! Free page reporting on the balloon (issue 13 item 8): memory a guest freed leaves its RAM file (and so
//! its snapshots), and the choice is part of the machine: snapshots of machines without it (as older kilns
//! made them) resume into a balloon without it.
//!
//! Needs an image whose late modules include virtio_balloon (images built by this kiln).

mod common;

use std::os::unix::fs::MetadataExt;
use std::time::{Duration, Instant};

use common::{read_manifest, require_image, write_manifest, Daemon};

const FILL: &str = "dd if=/dev/zero of=/dev/shm/fill bs=1M count=150 2>/dev/null";

fn qemu_cmdline(pid: u32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
        .unwrap_or_default()
}

fn sandbox(d: &Daemon, name: &str) -> serde_json::Value {
    let (status, sb) = d.api("GET", &format!("/v1/sandboxes/{name}"), None);
    assert_eq!(status, 200, "{sb}");
    sb
}

fn pid_of(d: &Daemon, name: &str) -> u32 {
    sandbox(d, name)["pid"]
        .as_u64()
        .expect("a running sandbox has a pid") as u32
}

fn id_of(d: &Daemon, name: &str) -> String {
    sandbox(d, name)["id"].as_str().expect("id").to_string()
}

/// Host memory the sandbox's RAM file holds (allocated blocks), in MiB.
fn ram_file_mib(d: &Daemon, id: &str) -> u64 {
    let live = d.data_dir().join("ram").join(format!("{id}.ram"));
    let file = if live.exists() {
        live
    } else {
        d.data_dir().join("sandboxes").join(id).join("memory")
    };
    (std::fs::metadata(&file).expect("RAM file").blocks() * 512) >> 20
}

fn create_with_balloon(d: &Daemon, name: &str) {
    // Booted, not resumed from the template snapshot: the test watches the machine's own RAM file (a copy
    // maps its snapshot's RAM file privately and read-only).
    d.create(&[
        "--name",
        name,
        "--memory",
        "384",
        "--max-memory",
        "448",
        "--boot",
    ]);
}

#[test]
fn memory_the_guest_freed_leaves_the_ram_file_and_the_snapshot() {
    require_image("tiny");
    let d = Daemon::start_with(&["--warm-spares", "0"]);
    create_with_balloon(&d, "src");
    let id = id_of(&d, "src");
    let cmd = qemu_cmdline(pid_of(&d, "src"));
    assert!(
        cmd.contains("virtio-balloon-device,id=balloon0,free-page-reporting=on"),
        "{cmd}"
    );
    d.kiln_ok(&["exec", "src", "--", "sh", "-c", FILL]);
    let filled = ram_file_mib(&d, &id);
    d.kiln_ok(&["exec", "src", "--", "rm", "/dev/shm/fill"]);
    // The guest reports freed pages in 2 MiB blocks about 2 s after they are freed.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut now = filled;
    while Instant::now() < deadline {
        now = ram_file_mib(&d, &id);
        if now + 100 <= filled {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    eprintln!("RAM file: {filled} MiB filled, {now} MiB after the guest freed 150 MiB");
    assert!(
        now + 100 <= filled,
        "the RAM file still holds {now} MiB after the guest freed 150 MiB (it held {filled} MiB)"
    );

    // The snapshot copies only what the file holds, and records the device (format 2).
    d.kiln_ok(&["snapshot", "create", "src", "--name", "s"]);
    let snap = d.data_dir().join("snapshots/s");
    let (_, m) = read_manifest(&snap.join("manifest.json"));
    assert_eq!(m["format_version"], 2);
    assert_eq!(m["free_page_reporting"], true);
    let mem = m["files"]
        .as_array()
        .expect("files")
        .iter()
        .find(|f| f["role"] == "memory")
        .expect("memory file");
    let blocks = std::fs::metadata(snap.join(mem["path"].as_str().expect("path")))
        .expect("memory")
        .blocks();
    let held = (blocks * 512) >> 20;
    assert!(held + 100 <= filled, "the snapshot's RAM holds {held} MiB");
    d.kiln_ok(&["snapshot", "resume", "s", "--name", "copy"]);
    d.kiln_ok(&["exec", "copy", "--", "sh", "-c", FILL]);
    assert!(qemu_cmdline(pid_of(&d, "copy")).contains("free-page-reporting=on"));
}

#[test]
fn machines_without_reporting_keep_their_balloon_as_it_was() {
    require_image("tiny");
    // A machine made without reporting, as older kilns made every machine.
    let mut d = Daemon::start_env(
        &["--warm-spares", "0"],
        &[("KILN_FREE_PAGE_REPORTING", "0")],
    );
    create_with_balloon(&d, "old");
    let cmd = qemu_cmdline(pid_of(&d, "old"));
    assert!(
        cmd.contains("virtio-balloon-device") && !cmd.contains("free-page-reporting"),
        "{cmd}"
    );
    d.kiln_ok(&["snapshot", "create", "old", "--name", "old-snap"]);
    let path = d.data_dir().join("snapshots/old-snap/manifest.json");
    let (_, m) = read_manifest(&path);
    // What older kilns wrote: format 1, no reporting recorded.
    assert_eq!(m["format_version"], 1);
    assert!(
        m.get("free_page_reporting").is_none_or(|v| v == false),
        "{m}"
    );

    // Today's daemon resumes it into a balloon without reporting, hibernates and starts it the same;
    // a new machine gets reporting.
    d.restart_with_env(&[]);
    d.kiln_ok(&["snapshot", "resume", "old-snap", "--name", "copy"]);
    d.kiln_ok(&["exec", "copy", "--", "true"]);
    assert!(!qemu_cmdline(pid_of(&d, "copy")).contains("free-page-reporting"));
    d.kiln_ok(&["stop", "copy"]);
    d.kiln_ok(&["start", "copy"]);
    d.kiln_ok(&["exec", "copy", "--", "true"]);
    assert!(!qemu_cmdline(pid_of(&d, "copy")).contains("free-page-reporting"));
    create_with_balloon(&d, "new");
    assert!(qemu_cmdline(pid_of(&d, "new")).contains("free-page-reporting=on"));

    // The record is what keeps a reporting machine loading: its guest negotiated the feature, and a
    // balloon without it (what the manifest would say without the record) refuses the saved state.
    // (The other way round loads: a device offering more than the guest took.)
    d.kiln_ok(&["snapshot", "create", "new", "--name", "new-snap"]);
    let path = d.data_dir().join("snapshots/new-snap/manifest.json");
    let (_, m) = read_manifest(&path);
    assert_eq!(m["format_version"], 2);
    let mut lie = m.clone();
    lie["format_version"] = 1.into();
    lie.as_object_mut()
        .expect("manifest object")
        .remove("free_page_reporting");
    write_manifest(&path, &lie);
    let out = d.kiln(&["snapshot", "resume", "new-snap", "--name", "bad"]);
    assert!(
        !out.status.success(),
        "a balloon without free page reporting loaded the state of one with it"
    );
    write_manifest(&path, &m);
    d.kiln_ok(&["snapshot", "resume", "new-snap", "--name", "again"]);
    d.kiln_ok(&["exec", "again", "--", "true"]);
}
