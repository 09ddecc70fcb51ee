//! `qemu-img` wrappers: overlays on read-only bases, resizing, inspection.

use std::path::Path;
use std::process::Command;

use crate::error::VmmError;

fn run(args: &[&str]) -> Result<String, VmmError> {
    let binary = crate::qemu_img_binary();
    let out = Command::new(&binary)
        .args(args)
        .output()
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => VmmError::MissingTool {
                tool: binary.clone(),
                hint: "install it: sudo apt-get install qemu-utils".into(),
            },
            _ => VmmError::io(format!("running {binary}"), e),
        })?;
    if !out.status.success() {
        return Err(VmmError::QemuImg {
            args: args.join(" "),
            detail: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Creates a qcow2 overlay at `overlay` backed by `backing` (format `backing_format`), optionally with a
/// larger virtual size.
pub fn create_overlay(
    overlay: &Path,
    backing: &Path,
    backing_format: &str,
    size_bytes: Option<u64>,
) -> Result<(), VmmError> {
    let overlay_s = overlay.to_string_lossy();
    let backing_s = backing.to_string_lossy();
    let size_s = size_bytes.map(|s| s.to_string());
    let mut args = vec![
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=65536,lazy_refcounts=on",
        "-b",
        &backing_s,
        "-F",
        backing_format,
        &overlay_s,
    ];
    if let Some(s) = &size_s {
        args.push(s);
    }
    run(&args).map(|_| ())
}

/// Virtual size of an image in bytes.
pub fn virtual_size(image: &Path) -> Result<u64, VmmError> {
    let out = run(&["info", "-U", "--output=json", &image.to_string_lossy()])?;
    let v: serde_json::Value = serde_json::from_str(&out).map_err(|e| VmmError::QemuImg {
        args: "info".into(),
        detail: format!("unparseable output: {e}"),
    })?;
    v["virtual-size"].as_u64().ok_or_else(|| VmmError::QemuImg {
        args: "info".into(),
        detail: "no virtual-size in output".into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlay_on_raw_base_grows_virtual_size() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.raw");
        std::fs::File::create(&base)
            .unwrap()
            .set_len(1 << 20)
            .unwrap();
        let overlay = dir.path().join("o.qcow2");
        create_overlay(&overlay, &base, "raw", Some(4 << 20)).unwrap();
        assert_eq!(virtual_size(&overlay).unwrap(), 4 << 20);
        let err = create_overlay(
            &dir.path().join("x.qcow2"),
            &dir.path().join("nope"),
            "raw",
            None,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("nope"), "{err}");
    }
}
