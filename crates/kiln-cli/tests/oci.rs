//! OCI/Docker images as templates: images built locally with umoci from the host's static busybox, pushed
//! with skopeo to a real registry (Debian's docker-registry) on a loopback port, pulled or imported with
//! `kiln image`, booted in real VMs.

mod common;
#[path = "oci_support/mod.rs"]
mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use common::world::sh_ok;
use common::{require_image, Daemon};
use serde_json::Value;
use support::{busybox, busybox_rootfs, private_images, pull, run, Layout, Registry};

/// Pull, boot, exec with the config's Env/WorkingDir/User; a second image sharing the first layer
/// transfers only its new layer; a layer whose bytes do not match its digest is refused and nothing is
/// kept; `image rm` refuses while a sandbox uses the image.
#[test]
fn pull_boot_exec_shared_layers_and_corrupt_blob() {
    require_image("tiny");
    let d = Daemon::start();
    private_images(&d);
    let reg = Registry::start();
    let layout = Layout::new();
    layout.layer(None, "v1", busybox_rootfs);
    layout.config(
        "v1",
        &[
            "--config.env",
            "GREETING=hello from config",
            "--config.env",
            "PATH=/bin",
            "--config.workingdir",
            "/srv",
            "--config.user",
            "app",
        ],
    );
    reg.push(&layout.dir, "v1", "kiln/busy:v1");
    let first = pull(&d, &reg.reference("kiln/busy:v1"), &["--name", "busy"]);
    let src = &first["manifest"]["source"];
    assert_eq!(src["kind"], "registry");
    assert!(
        src["digest"].as_str().unwrap().starts_with("sha256:"),
        "{first}"
    );
    assert_eq!(first["fetched_layers"], 1, "{first}");
    assert_eq!(first["cached_layers"], 0, "{first}");

    let sb = d.create(&["--template", "busy", "--name", "busy1"]);
    assert_eq!(sb["template"], "busy");
    let out = sh_ok(&d, "busy1", "echo \"$GREETING\"; pwd; id -u; cat data");
    assert_eq!(out, "hello from config\n/srv\n1000\nfrom the image\n");
    // The request overrides the image's defaults.
    let out = d.kiln_ok(&[
        "exec",
        "--user",
        "root",
        "--cwd",
        "/",
        "busy1",
        "--",
        "sh",
        "-c",
        "id -u; pwd",
    ]);
    assert_eq!(out, "0\n/\n");
    // File owners from the layer survive into the guest.
    assert_eq!(sh_ok(&d, "busy1", "stat -c %u:%g /srv/data"), "1000:1000\n");

    // The template is in use: removing it is refused.
    let rm = d.kiln(&["image", "rm", "-y", "busy"]);
    assert!(!rm.status.success());
    assert!(
        String::from_utf8_lossy(&rm.stderr).contains("in use"),
        "{rm:?}"
    );

    // A second image on top of the first: only its new layer travels.
    layout.layer(Some("v1"), "v2", |root| {
        std::fs::write(root.join("srv/extra"), vec![7u8; 300_000]).unwrap();
    });
    reg.push(&layout.dir, "v2", "kiln/busy:v2");
    let second = pull(&d, &reg.reference("kiln/busy:v2"), &["--name", "busy2"]);
    assert_eq!(second["fetched_layers"], 1, "{second}");
    assert_eq!(second["cached_layers"], 1, "{second}");
    let layers = second["manifest"]["source"]["layers"].as_array().unwrap();
    let new_layer = layers[1].as_str().unwrap();
    let new_size = std::fs::metadata(reg.blob_file(new_layer)).unwrap().len();
    assert_eq!(second["fetched_bytes"], new_size, "{second}");
    assert_eq!(second["cached_bytes"], first["fetched_bytes"], "{second}");

    // A corrupt layer in the registry's storage: the pull fails and keeps nothing.
    layout.layer(Some("v1"), "v3", |root| {
        std::fs::write(root.join("srv/third"), "third\n").unwrap();
    });
    reg.push(&layout.dir, "v3", "kiln/busy:v3");
    let manifest: Value = serde_json::from_str(&run(Command::new("skopeo").args([
        "inspect",
        "--raw",
        "--tls-verify=false",
        &format!("docker://{}", reg.reference("kiln/busy:v3")),
    ])))
    .unwrap();
    let bad = manifest["layers"][1]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let blob = reg.blob_file(&bad);
    let mut bytes = std::fs::read(&blob).unwrap();
    let last = bytes.len() - 10;
    bytes[last] ^= 0xff;
    std::fs::write(&blob, bytes).unwrap();
    let out = d.kiln(&[
        "image",
        "pull",
        "--insecure",
        "--name",
        "busy3",
        &reg.reference("kiln/busy:v3"),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a corrupt layer was accepted");
    assert!(err.contains("verif") || err.contains("digest"), "{err}");
    assert!(!d.data_dir().join("images/busy3").exists());
    let cached = d
        .data_dir()
        .join("cache/oci/blobs/sha256")
        .join(bad.trim_start_matches("sha256:"));
    assert!(!cached.exists(), "the corrupt blob was cached");
}

/// A `docker save`-style archive imports; a scratch image holding one static binary (no shell, libc,
/// /etc or init) boots, runs commands, and starts its entrypoint at boot with --start-cmd.
#[test]
fn docker_archive_import_and_scratch_image_boot() {
    require_image("tiny");
    let d = Daemon::start();
    private_images(&d);
    let layout = Layout::new();
    layout.layer(None, "scratch", |root| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::write(root.join("busybox"), busybox()).unwrap();
        std::fs::set_permissions(root.join("busybox"), std::fs::Permissions::from_mode(0o755))
            .unwrap();
    });
    layout.config(
        "scratch",
        &[
            "--config.entrypoint",
            "/busybox",
            "--config.cmd",
            "sh",
            "--config.cmd",
            "-c",
            "--config.cmd",
            "echo started as $(/busybox id -u) in $(/busybox pwd) > /tmp/started; exec /busybox sleep 1000",
            "--config.workingdir",
            "/tmp",
        ],
    );
    let archive = layout.work.join("scratch-docker.tar");
    run(Command::new("skopeo").args([
        "copy",
        "--quiet",
        &format!("oci:{}", layout.image("scratch")),
        &format!("docker-archive:{}:kiln/scratch:1", archive.display()),
    ]));
    let out = d.kiln_ok(&[
        "--json",
        "image",
        "import",
        archive.to_str().unwrap(),
        "--start-cmd",
    ]);
    let imported: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(imported["name"], "scratch");
    assert_eq!(imported["manifest"]["source"]["kind"], "docker-archive");
    let reference = imported["manifest"]["source"]["reference"]
        .as_str()
        .unwrap();
    assert!(reference.ends_with("kiln/scratch:1"), "{reference}");
    d.create(&["--template", "scratch", "--name", "s1"]);
    // The start command runs in the background: give it time to write its file (TCG is slow).
    let deadline = Instant::now() + Duration::from_secs(30);
    let out = loop {
        let o = d.kiln(&["exec", "s1", "--", "/busybox", "cat", "/tmp/started"]);
        if o.status.success() || Instant::now() > deadline {
            break String::from_utf8_lossy(&o.stdout).into_owned();
        }
        std::thread::sleep(Duration::from_millis(300));
    };
    assert_eq!(out, "started as 0 in /tmp\n");
    let procs = d.kiln_ok(&["--json", "process", "list", "s1"]);
    assert!(procs.contains("sleep 1000"), "{procs}");

    // The same image as an OCI archive and as a layout directory.
    let oci_archive = layout.work.join("scratch-oci.tar");
    run(Command::new("skopeo").args([
        "copy",
        "--quiet",
        &format!("oci:{}", layout.image("scratch")),
        &format!("oci-archive:{}:v1", oci_archive.display()),
    ]));
    let a: Value = serde_json::from_str(&d.kiln_ok(&[
        "--json",
        "image",
        "import",
        oci_archive.to_str().unwrap(),
        "--name",
        "scratch-oci",
    ]))
    .unwrap();
    assert_eq!(a["manifest"]["source"]["kind"], "oci-archive");
    // Its one layer is the docker archive's (same uncompressed tar? not necessarily), but a layout
    // import of the very same blobs transfers nothing new.
    let b: Value = serde_json::from_str(&d.kiln_ok(&[
        "--json",
        "image",
        "import",
        layout.dir.to_str().unwrap(),
        "--name",
        "scratch-dir",
    ]))
    .unwrap();
    assert_eq!(b["manifest"]["source"]["kind"], "oci-layout");
    assert_eq!(b["fetched_bytes"], 0, "{b}");
    assert_eq!(
        b["manifest"]["source"]["digest"],
        a["manifest"]["source"]["digest"]
    );
    let list = d.kiln_ok(&["image", "list"]);
    assert!(list.contains("kiln/scratch:1@"), "{list}");
}

/// Snapshot, resume and fork a sandbox from a pulled image; the snapshot records the image's digest.
#[test]
fn snapshot_resume_and_fork_of_a_pulled_image() {
    require_image("tiny");
    let d = Daemon::start();
    private_images(&d);
    let reg = Registry::start();
    let layout = Layout::new();
    layout.layer(None, "v1", busybox_rootfs);
    layout.config(
        "v1",
        &["--config.env", "MARK=pulled", "--config.env", "PATH=/bin"],
    );
    reg.push(&layout.dir, "v1", "kiln/snap:v1");
    let pulled = pull(&d, &reg.reference("kiln/snap:v1"), &["--name", "snapimg"]);
    let digest = pulled["manifest"]["source"]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    d.create(&["--template", "snapimg", "--name", "p1"]);
    sh_ok(&d, "p1", "echo kept > /srv/state");
    let snap: Value =
        serde_json::from_str(&d.kiln_ok(&["--json", "snapshot", "create", "p1", "--name", "s1"]))
            .unwrap();
    let id = snap["id"].as_str().unwrap();
    let manifest = std::fs::read_to_string(
        d.data_dir()
            .join("snapshots")
            .join(id)
            .join("manifest.json"),
    )
    .unwrap();
    assert!(
        manifest.contains(&digest),
        "the snapshot does not record {digest}: {manifest}"
    );
    d.create(&["--snapshot", "s1", "--name", "r1"]);
    assert_eq!(
        sh_ok(&d, "r1", "cat /srv/state; echo $MARK"),
        "kept\npulled\n"
    );
    d.kiln_ok(&["fork", "p1", "--name", "f"]);
    assert_eq!(
        sh_ok(&d, "f-1", "cat /srv/state; echo $MARK"),
        "kept\npulled\n"
    );
}
