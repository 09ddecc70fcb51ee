#![allow(dead_code)]
//! Fixtures of the OCI tests (tests/oci.rs, tests/oci_build.rs): a registry on loopback, OCI layouts
//! built with umoci from the host's static busybox, a daemon with a private images directory.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::{free_port, Daemon};
use serde_json::Value;

pub fn run(cmd: &mut Command) -> String {
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
pub struct Registry {
    child: Child,
    pub port: u16,
    pub storage: PathBuf,
    _dir: tempfile::TempDir,
}

impl Registry {
    pub fn start() -> Registry {
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

    pub fn reference(&self, repo: &str) -> String {
        format!("127.0.0.1:{}/{repo}", self.port)
    }

    pub fn push(&self, layout: &Path, tag: &str, repo: &str) {
        run(Command::new("skopeo").args([
            "copy",
            "--quiet",
            "--dest-tls-verify=false",
            &format!("oci:{}:{tag}", layout.display()),
            &format!("docker://{}", self.reference(repo)),
        ]));
    }

    /// The file the registry serves for a blob.
    pub fn blob_file(&self, digest: &str) -> PathBuf {
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
pub struct Layout {
    pub dir: PathBuf,
    pub work: PathBuf,
    _tmp: tempfile::TempDir,
}

impl Layout {
    pub fn new() -> Layout {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("layout");
        run(Command::new("umoci").args(["init", "--layout"]).arg(&dir));
        Layout {
            dir,
            work: tmp.path().to_path_buf(),
            _tmp: tmp,
        }
    }

    pub fn image(&self, tag: &str) -> String {
        format!("{}:{tag}", self.dir.display())
    }

    /// A new image `tag` (from `base`, or empty) with `fill` run on its rootfs as one new layer.
    pub fn layer(&self, base: Option<&str>, tag: &str, fill: impl FnOnce(&Path)) {
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

    pub fn config(&self, tag: &str, args: &[&str]) {
        let mut cmd = Command::new("umoci");
        cmd.args(["config", "--image", &self.image(tag)]).args(args);
        run(&mut cmd);
    }
}

pub fn busybox() -> Vec<u8> {
    std::fs::read("/bin/busybox").expect("static busybox (apt-get install busybox-static)")
}

/// A busybox userland: /bin/busybox with applet links, an `app` user (uid 1000) and /srv/data.
pub fn busybox_rootfs(root: &Path) {
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
pub fn private_images(d: &Daemon) {
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

pub fn pull(d: &Daemon, reference: &str, extra: &[&str]) -> Value {
    let mut args = vec!["--json", "image", "pull", "--insecure", reference];
    args.extend_from_slice(extra);
    serde_json::from_str(&d.kiln_ok(&args)).expect("pull JSON")
}
