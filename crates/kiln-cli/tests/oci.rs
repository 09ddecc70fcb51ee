//! OCI/Docker images as templates: images built locally with umoci from the host's static busybox, pushed
//! with skopeo to a real registry (Debian's docker-registry) on a loopback port, pulled or imported with
//! `kiln image`, booted in real VMs.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::world::sh_ok;
use common::{free_port, require_image, Daemon};
use serde_json::Value;

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().expect("spawn");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A registry on 127.0.0.1 with its own storage, stopped when dropped.
struct Registry {
    child: Child,
    port: u16,
    storage: PathBuf,
    _dir: tempfile::TempDir,
}

impl Registry {
    fn start() -> Registry {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let storage = dir.path().join("storage");
        let config = dir.path().join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n",
                storage.display()
            ),
        )
        .unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("docker-registry (apt-get install docker-registry)");
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "registry did not listen");
            std::thread::sleep(Duration::from_millis(50));
        }
        Registry {
            child,
            port,
            storage,
            _dir: dir,
        }
    }

    fn reference(&self, repo: &str) -> String {
        format!("127.0.0.1:{}/{repo}", self.port)
    }

    fn push(&self, layout: &Path, tag: &str, repo: &str) {
        run(Command::new("skopeo").args([
            "copy",
            "--quiet",
            "--dest-tls-verify=false",
            &format!("oci:{}:{tag}", layout.display()),
            &format!("docker://{}", self.reference(repo)),
        ]));
    }

    /// The file the registry serves for a blob.
    fn blob_file(&self, digest: &str) -> PathBuf {
        let hex = digest.trim_start_matches("sha256:");
        self.storage
            .join("docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Builds OCI images in a layout directory with umoci.
struct Layout {
    dir: PathBuf,
    work: PathBuf,
    _tmp: tempfile::TempDir,
}

impl Layout {
    fn new() -> Layout {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("layout");
        run(Command::new("umoci").args(["init", "--layout"]).arg(&dir));
        Layout {
            dir,
            work: tmp.path().to_path_buf(),
            _tmp: tmp,
        }
    }

    fn image(&self, tag: &str) -> String {
        format!("{}:{tag}", self.dir.display())
    }

    /// A new image `tag` (from `base`, or empty) with `fill` run on its rootfs as one new layer.
    fn layer(&self, base: Option<&str>, tag: &str, fill: impl FnOnce(&Path)) {
        match base {
            None => run(Command::new("umoci").args(["new", "--image", &self.image(tag)])),
            Some(b) => {
                run(Command::new("umoci").args(["config", "--image", &self.image(b), "--tag", tag]))
            }
        };
        let bundle = self.work.join(format!("bundle-{tag}"));
        run(Command::new("umoci")
            .args(["unpack", "--image", &self.image(tag)])
            .arg(&bundle));
        fill(&bundle.join("rootfs"));
        run(Command::new("umoci")
            .args(["repack", "--image", &self.image(tag)])
            .arg(&bundle));
        std::fs::remove_dir_all(&bundle).unwrap();
    }

    fn config(&self, tag: &str, args: &[&str]) {
        let mut cmd = Command::new("umoci");
        cmd.args(["config", "--image", &self.image(tag)]).args(args);
        run(&mut cmd);
    }
}

fn busybox() -> Vec<u8> {
    std::fs::read("/bin/busybox").expect("static busybox (apt-get install busybox-static)")
}

/// A busybox userland: /bin/busybox with applet links, an `app` user (uid 1000) and /srv/data.
fn busybox_rootfs(root: &Path) {
    use std::os::unix::fs::{symlink, PermissionsExt};
    for d in ["bin", "etc", "srv"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::write(root.join("bin/busybox"), busybox()).unwrap();
    std::fs::set_permissions(
        root.join("bin/busybox"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    for applet in [
        "sh", "ls", "cat", "id", "pwd", "echo", "sleep", "env", "stat", "ps",
    ] {
        symlink("busybox", root.join("bin").join(applet)).unwrap();
    }
    std::fs::write(
        root.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/srv:/bin/sh\n",
    )
    .unwrap();
    std::fs::write(
        root.join("etc/group"),
        "root:x:0:\nstaff:x:50:app\napp:x:1000:\n",
    )
    .unwrap();
    std::fs::write(root.join("srv/data"), "from the image\n").unwrap();
    std::os::unix::fs::chown(root.join("srv/data"), Some(1000), Some(1000)).unwrap();
}

/// Gives the daemon a private images directory (the shared one stays untouched: it links the shared
/// images one by one) and the shared kernel cache by hard links, so a pull builds without downloading.
fn private_images(d: &Daemon) {
    // Imported images need the static agent (target/release/kiln-agent may be a dynamic build).
    let agent = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../target/x86_64-unknown-linux-gnu/agent/kiln-agent");
    if std::env::var_os("KILN_AGENT_BIN").is_none() && agent.is_file() {
        std::env::set_var("KILN_AGENT_BIN", agent);
    }
    let images = d.data_dir().join("images");
    let shared = std::fs::read_link(&images).expect("shared images link");
    std::fs::remove_file(&images).unwrap();
    std::fs::create_dir(&images).unwrap();
    for name in ["tiny", "base"] {
        if shared.join(name).is_dir() {
            std::os::unix::fs::symlink(shared.join(name), images.join(name)).unwrap();
        }
    }
    let kernel = shared.join("../cache/kernel");
    if kernel.is_dir() {
        std::fs::create_dir_all(d.data_dir().join("cache")).unwrap();
        run(Command::new("cp")
            .arg("-al")
            .arg(&kernel)
            .arg(d.data_dir().join("cache/kernel")));
    }
}

fn pull(d: &Daemon, reference: &str, extra: &[&str]) -> Value {
    let mut args = vec!["--json", "image", "pull", "--insecure", reference];
    args.extend_from_slice(extra);
    serde_json::from_str(&d.kiln_ok(&args)).expect("pull JSON")
}

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

/// `kiln image build NAME -f Dockerfile CONTEXT` with buildah: FROM a local busybox image, ENV, WORKDIR,
/// COPY from the context, RUN, and `USER app:staff` (the group's name resolved from the image's
/// /etc/group). A sandbox of the template sees all of it. A group the image does not list is a clear
/// error, not root's group.
///
/// `image rm` while a create from the template is between finding it and recording its sandbox (held
/// there by `KILN_FAULTS`): the removal waits for the images lock, then sees the sandbox and refuses;
/// the create succeeds on an intact template. (Without the lock the removal went through and the
/// create lost its template.)
#[test]
fn dockerfile_build_user_group_and_rm_against_a_create() {
    require_image("tiny");
    let d = Daemon::start_env(&[], &[("KILN_FAULTS", "hold.create.image_resolved=5000")]);
    private_images(&d);
    let layout = Layout::new();
    layout.layer(None, "v1", busybox_rootfs);
    layout.config("v1", &["--config.env", "PATH=/bin"]);
    // buildah names an `oci:` base after its path, which must then be lowercase (a temp dir's is not).
    let base = LowerDir(PathBuf::from(format!(
        "/tmp/kiln-df-{}",
        std::process::id()
    )));
    run(Command::new("cp").arg("-a").arg(&layout.dir).arg(&base.0));
    let ctx = layout.work.join("ctx");
    std::fs::create_dir(&ctx).unwrap();
    std::fs::write(ctx.join("hello.txt"), "hello from the context\n").unwrap();
    std::fs::write(
        ctx.join("Dockerfile"),
        format!(
            "FROM oci:{}:v1\nENV GREETING=\"built by kiln\"\nWORKDIR /work\nCOPY hello.txt /work/hello.txt\n\
             RUN echo ran > /work/ran.txt\nUSER app:staff\n",
            base.0.display()
        ),
    )
    .unwrap();
    let dockerfile = ctx.join("Dockerfile");
    let built: Value = serde_json::from_str(&d.kiln_ok(&[
        "--json",
        "image",
        "build",
        "built",
        "-f",
        dockerfile.to_str().unwrap(),
        ctx.to_str().unwrap(),
    ]))
    .expect("build JSON");
    let src = &built["manifest"]["source"];
    assert_eq!(src["kind"], "dockerfile", "{built}");
    assert_eq!(src["user"], "app:staff", "{built}");
    // The builder's scratch storage is gone.
    let scratch = d.data_dir().join("cache/build");
    assert_eq!(
        std::fs::read_dir(&scratch).map_or(0, |e| e.count()),
        0,
        "builder leftovers in {}",
        scratch.display()
    );

    std::thread::scope(|s| {
        let create = s.spawn(|| d.create(&["--template", "built", "--name", "b1"]));
        let deadline = Instant::now() + Duration::from_secs(60);
        while !d.log().contains("holding at create.image_resolved") {
            assert!(
                Instant::now() < deadline,
                "the create never reached its hold"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let rm = d.kiln(&["image", "rm", "-y", "built"]);
        let err = String::from_utf8_lossy(&rm.stderr);
        assert!(
            !rm.status.success(),
            "image rm went through during a create"
        );
        assert!(err.contains("image_in_use") && err.contains("b1"), "{err}");
        create.join().unwrap();
    });
    assert!(d.data_dir().join("images/built/image.json").is_file());

    let out = sh_ok(
        &d,
        "b1",
        "echo \"$GREETING\"; pwd; cat hello.txt ran.txt; id -u; id -g",
    );
    assert_eq!(
        out,
        "built by kiln\n/work\nhello from the context\nran\n1000\n50\n"
    );
    // A numeric group, and a group name the image lacks.
    let out = d.kiln_ok(&["exec", "--user", "app:7", "b1", "--", "id", "-g"]);
    assert_eq!(out, "7\n");
    let bad = d.kiln(&["exec", "--user", "app:nosuch", "b1", "--", "id", "-g"]);
    assert!(!bad.status.success(), "a missing group ran anyway");
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("no group \"nosuch\""), "{err}");
}

/// A directory removed when dropped.
struct LowerDir(PathBuf);
impl Drop for LowerDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Without buildah or docker on PATH, `image build -f` fails at once with a stable code naming the
/// packages to install, and leaves nothing behind.
#[test]
fn dockerfile_build_without_a_builder() {
    let data = tempfile::tempdir().unwrap();
    let ctx = data.path().join("ctx");
    std::fs::create_dir(&ctx).unwrap();
    std::fs::write(ctx.join("Dockerfile"), "FROM scratch\n").unwrap();
    let empty = data.path().join("empty-path");
    std::fs::create_dir(&empty).unwrap();
    let out = Command::new(common::KILN)
        .arg("--data-dir")
        .arg(data.path())
        .args(["image", "build", "app", "-f"])
        .arg(ctx.join("Dockerfile"))
        .arg(&ctx)
        .env("PATH", &empty)
        .env_remove("KILN_IMAGE_BUILDER")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("[image_builder_missing]"), "{err}");
    assert!(err.contains("apt-get install buildah"), "{err}");
    assert!(!data.path().join("images/app").exists());
}

/// The layer cache keeps a blob while any installed image lists it: removing one of two images that
/// share a layer removes only the other's own layer; removing both empties the cache. `image prune`
/// removes blobs no image uses (here: one planted by hand).
#[test]
fn image_rm_prunes_unused_layers() {
    require_image("tiny");
    let d = Daemon::start();
    private_images(&d);
    let reg = Registry::start();
    let layout = Layout::new();
    layout.layer(None, "v1", busybox_rootfs);
    layout.layer(Some("v1"), "v2", |root| {
        std::fs::write(root.join("srv/extra"), "second layer\n").unwrap();
    });
    reg.push(&layout.dir, "v1", "kiln/p:v1");
    reg.push(&layout.dir, "v2", "kiln/p:v2");
    let one = pull(&d, &reg.reference("kiln/p:v1"), &["--name", "p1"]);
    let two = pull(&d, &reg.reference("kiln/p:v2"), &["--name", "p2"]);
    let blobs = d.data_dir().join("cache/oci/blobs/sha256");
    let cached = || {
        let mut v: Vec<String> = std::fs::read_dir(&blobs)
            .unwrap()
            .map(|e| format!("sha256:{}", e.unwrap().file_name().to_string_lossy()))
            .collect();
        v.sort();
        v
    };
    let shared = one["manifest"]["source"]["layers"][0]
        .as_str()
        .unwrap()
        .to_string();
    let own = two["manifest"]["source"]["layers"][1]
        .as_str()
        .unwrap()
        .to_string();
    let mut both = vec![shared.clone(), own.clone()];
    both.sort();
    assert_eq!(cached(), both);

    // A blob no image lists (as an interrupted pull of another image leaves): prune removes it.
    let stray = format!("{:064x}", 7);
    std::fs::write(blobs.join(&stray), "stray").unwrap();
    let pruned: Value = serde_json::from_str(&d.kiln_ok(&["--json", "image", "prune"])).unwrap();
    assert_eq!(pruned["pruned_blobs"], 1, "{pruned}");
    assert_eq!(cached(), both);

    let rm: Value =
        serde_json::from_str(&d.kiln_ok(&["--json", "image", "rm", "-y", "p2"])).unwrap();
    assert_eq!(rm["pruned_blobs"], 1, "{rm}");
    assert_eq!(cached(), vec![shared]);
    d.kiln_ok(&["image", "rm", "-y", "p1"]);
    assert_eq!(cached(), Vec::<String>::new());
}
