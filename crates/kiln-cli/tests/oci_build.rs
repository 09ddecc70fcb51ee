//! Templates from Dockerfiles (`kiln image build -f`, with buildah), `User` with a group, `image rm`
//! against a create under way, and pruning of the layer cache.

mod common;
#[path = "oci_support/mod.rs"]
mod support;

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use common::world::sh_ok;
use common::{require_image, Daemon};
use serde_json::Value;
use support::{busybox_rootfs, private_images, pull, run, Layout, Registry};

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
