//! Kernel module selection for the initramfs: find the modules the guest needs, add their dependencies
//! and order them so that each one is loaded after everything it depends on.
//!
//! Debian's kernel package ships no `modules.dep` (its postinst runs depmod on the installed system), so
//! when the file is missing the dependencies come from each module's own `.modinfo` `depends=` entry,
//! which is what depmod would have derived. Only the handful of modules we need are decompressed.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::elf::{modinfo_value, Elf};
use crate::error::{ImageError, IoContext, Result};
use crate::tools;

/// Modules the initramfs loads before mounting the root filesystem. Everything else boot needs
/// (virtio-pci, virtio-console, ext4, 8250 serial) is built into Debian's cloud kernel.
pub(crate) const BOOT_MODULES: &[&str] = &[
    // microvm describes its virtio-mmio devices in ACPI; without this driver no device is visible.
    "virtio_mmio",
    "virtio_blk",
    // /kiln/init configures eth0 before it reports ready.
    "virtio_net",
];

/// Modules /kiln/init loads in the background once the agent runs: nothing at boot needs them, and
/// loading them costs about 0.15 s of emulated CPU under TCG.
pub(crate) const LATE_MODULES: &[&str] = &[
    // Sandboxed workloads (container tools, layered installs) expect overlayfs.
    "overlay",
    // vsock for a future host<->guest transport; cheap to have and avoids an image rebuild later.
    "vsock",
    "vmw_vsock_virtio_transport",
    // Memory headroom (`--max-memory`): the balloon holds what the guest is not given.
    "virtio_balloon",
];

/// A module chosen for the initramfs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ModuleFile {
    pub name: String,
    /// The file in the kernel tree, possibly compressed.
    pub path: PathBuf,
}

/// The modules of one kernel (`lib/modules/<version>`).
pub(crate) struct ModuleTree {
    dir: PathBuf,
    paths: HashMap<String, PathBuf>,
    /// Present when the tree has a modules.dep; otherwise dependencies are read from each module.
    deps: Option<HashMap<String, Vec<String>>>,
}

/// `kernel/fs/fuse/cuse.ko.xz` -> `cuse`; module names use `_` where file names may use `-`.
pub(crate) fn module_name(path: &str) -> Option<String> {
    let file = path.rsplit('/').next()?;
    let (stem, _) = file.split_once(".ko")?;
    (!stem.is_empty()).then(|| stem.replace('-', "_"))
}

/// The contents of a modules.dep file, by module name.
#[derive(Debug, Default)]
pub(crate) struct ModulesDep {
    /// Module file, relative to the modules directory.
    pub paths: HashMap<String, PathBuf>,
    pub deps: HashMap<String, Vec<String>>,
}

/// Parses modules.dep (`path: dep-path dep-path ...`).
pub(crate) fn parse_modules_dep(text: &str) -> Result<ModulesDep, String> {
    let mut paths = HashMap::new();
    let mut deps = HashMap::new();
    for (lineno, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (module, rest) = line
            .split_once(':')
            .ok_or_else(|| format!("line {}: missing ':'", lineno + 1))?;
        let name = module_name(module)
            .ok_or_else(|| format!("line {}: bad module path {module:?}", lineno + 1))?;
        let dep_names = rest
            .split_whitespace()
            .map(|d| {
                module_name(d).ok_or_else(|| format!("line {}: bad dependency {d:?}", lineno + 1))
            })
            .collect::<Result<Vec<_>, _>>()?;
        paths.insert(name.clone(), PathBuf::from(module));
        deps.insert(name, dep_names);
    }
    Ok(ModulesDep { paths, deps })
}

/// Orders `wanted` plus their transitive dependencies so every module comes after its dependencies.
/// The order is deterministic: modules appear as early as `wanted` and the dependency lists allow.
pub(crate) fn load_order<F>(wanted: &[&str], mut deps_of: F) -> Result<Vec<String>>
where
    F: FnMut(&str) -> Result<Vec<String>>,
{
    fn visit<F>(
        name: &str,
        deps_of: &mut F,
        done: &mut Vec<String>,
        stack: &mut Vec<String>,
    ) -> Result<()>
    where
        F: FnMut(&str) -> Result<Vec<String>>,
    {
        if done.iter().any(|d| d == name) {
            return Ok(());
        }
        if stack.iter().any(|s| s == name) {
            stack.push(name.to_string());
            return Err(ImageError::Build(format!(
                "kernel modules depend on each other in a cycle: {}",
                stack.join(" -> ")
            )));
        }
        stack.push(name.to_string());
        for dep in deps_of(name)? {
            visit(&dep, deps_of, done, stack)?;
        }
        stack.pop();
        done.push(name.to_string());
        Ok(())
    }

    let mut done = Vec::new();
    for name in wanted {
        visit(
            &name.replace('-', "_"),
            &mut deps_of,
            &mut done,
            &mut Vec::new(),
        )?;
    }
    Ok(done)
}

impl ModuleTree {
    pub(crate) fn open(dir: &Path) -> Result<Self> {
        let dep_file = dir.join("modules.dep");
        if dep_file.is_file() {
            let text = std::fs::read_to_string(&dep_file).at("read", &dep_file)?;
            let ModulesDep { paths, deps } = parse_modules_dep(&text).map_err(|e| {
                ImageError::Build(format!("{} is malformed: {e}", dep_file.display()))
            })?;
            return Ok(ModuleTree {
                dir: dir.to_path_buf(),
                paths,
                deps: Some(deps),
            });
        }
        let mut paths = HashMap::new();
        collect_modules(dir, dir, &mut paths)?;
        if paths.is_empty() {
            return Err(ImageError::Build(format!(
                "no kernel modules found under {}",
                dir.display()
            )));
        }
        Ok(ModuleTree {
            dir: dir.to_path_buf(),
            paths,
            deps: None,
        })
    }

    fn path(&self, name: &str) -> Result<PathBuf> {
        self.paths
            .get(name)
            .map(|p| self.dir.join(p))
            .ok_or_else(|| {
                ImageError::Build(format!(
                    "kernel module {name} is not in {}; the guest kernel was built without it",
                    self.dir.display()
                ))
            })
    }

    fn dependencies(&self, name: &str) -> Result<Vec<String>> {
        if let Some(deps) = &self.deps {
            return Ok(deps.get(name).cloned().unwrap_or_default());
        }
        let path = self.path(name)?;
        let data = read_module(&path)?;
        let bad = |what: String| {
            ImageError::Build(format!(
                "{} is not a valid kernel module: {what}",
                path.display()
            ))
        };
        let elf = Elf::parse(&data).map_err(bad)?;
        let modinfo = elf
            .section(".modinfo")
            .map_err(bad)?
            .ok_or_else(|| bad("no .modinfo section".into()))?;
        let depends = modinfo_value(modinfo, "depends").unwrap_or("");
        Ok(depends
            .split(',')
            .filter(|d| !d.is_empty())
            .map(|d| d.replace('-', "_"))
            .collect())
    }

    /// The modules to load for `wanted`, dependencies first, leaving out those in `already_loaded`.
    pub(crate) fn resolve(
        &self,
        wanted: &[&str],
        already_loaded: &[ModuleFile],
    ) -> Result<Vec<ModuleFile>> {
        load_order(wanted, |name| self.dependencies(name))?
            .into_iter()
            .filter(|name| !already_loaded.iter().any(|m| &m.name == name))
            .map(|name| {
                Ok(ModuleFile {
                    path: self.path(&name)?,
                    name,
                })
            })
            .collect()
    }
}

/// Records every `*.ko*` file under `dir` by module name, relative to `root`.
fn collect_modules(root: &Path, dir: &Path, out: &mut HashMap<String, PathBuf>) -> Result<()> {
    for entry in std::fs::read_dir(dir).at("read directory", dir)? {
        let entry = entry.at("read directory", dir)?;
        let path = entry.path();
        let file_type = entry.file_type().at("inspect", &path)?;
        if file_type.is_dir() {
            collect_modules(root, &path, out)?;
        } else if let Some(name) = module_name(&entry.file_name().to_string_lossy()) {
            let relative = path.strip_prefix(root).unwrap_or(&path).to_path_buf();
            out.insert(name, relative);
        }
    }
    Ok(())
}

/// Reads a module file, decompressing `.ko.xz`, `.ko.gz` and `.ko.zst`: busybox insmod hands the bytes
/// to init_module(2), which only accepts plain ELF.
pub(crate) fn read_module(path: &Path) -> Result<Vec<u8>> {
    let name = path.to_string_lossy();
    let mut out = Vec::new();
    if name.ends_with(".xz") {
        let file = std::fs::File::open(path).at("open", path)?;
        lzma_rs::xz_decompress(&mut std::io::BufReader::new(file), &mut out)
            .map_err(|e| ImageError::Build(format!("cannot decompress {}: {e}", path.display())))?;
    } else if name.ends_with(".gz") {
        let file = std::fs::File::open(path).at("open", path)?;
        flate2::read::GzDecoder::new(file)
            .read_to_end(&mut out)
            .at("decompress", path)?;
    } else if name.ends_with(".zst") {
        let zstd = tools::find_tool(&tools::ZSTD)?;
        out = tools::run(Command::new(zstd).arg("-dcq").arg(path))?.stdout;
    } else {
        out = std::fs::read(path).at("read", path)?;
    }
    Ok(out)
}

/// The module's bytes as they go into the image: decompressed and without signature.
pub(crate) fn load_module_unsigned(module: &ModuleFile) -> Result<Vec<u8>> {
    let mut data = read_module(&module.path)?;
    strip_signature(&mut data).map_err(|e| {
        ImageError::Build(format!(
            "{} has a malformed signature: {e}",
            module.path.display()
        ))
    })?;
    Ok(data)
}

/// Trailer of a signed module: `<module><signature><struct module_signature (12 bytes)><MAGIC>`.
const SIGNATURE_MAGIC: &[u8] = b"~Module signature appended~\n";

/// Removes the appended signature from a module, if it has one.
///
/// Verifying a module's RSA signature costs tens of milliseconds of emulated CPU per module under TCG,
/// about a quarter of a second per boot for the modules we load. Unsigned modules still load (Debian does
/// not enforce signatures outside secure-boot lockdown); the kernel only marks itself tainted ('E').
pub(crate) fn strip_signature(module: &mut Vec<u8>) -> Result<(), String> {
    let Some(body_end) = module.len().checked_sub(SIGNATURE_MAGIC.len()) else {
        return Ok(());
    };
    if &module[body_end..] != SIGNATURE_MAGIC {
        return Ok(());
    }
    // struct module_signature ends with the signature length as a big-endian u32.
    let info_start = body_end
        .checked_sub(12)
        .ok_or("truncated module signature")?;
    let len_bytes: [u8; 4] = module[body_end - 4..body_end]
        .try_into()
        .map_err(|_| "truncated module signature")?;
    let sig_len = u32::from_be_bytes(len_bytes) as usize;
    let new_len = info_start
        .checked_sub(sig_len)
        .ok_or("module signature is longer than the module")?;
    module.truncate(new_len);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn graph<'a>(
        edges: &'a [(&'a str, &'a [&'a str])],
    ) -> impl FnMut(&str) -> Result<Vec<String>> + 'a {
        move |name| {
            edges
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, d)| d.iter().map(|s| s.to_string()).collect())
                .ok_or_else(|| ImageError::Build(format!("unknown module {name}")))
        }
    }

    #[test]
    fn dependencies_come_first_and_once() {
        let edges: &[(&str, &[&str])] = &[
            ("virtio_mmio", &[]),
            ("virtio_net", &["net_failover"]),
            ("net_failover", &["failover"]),
            ("failover", &[]),
            (
                "vmw_vsock_virtio_transport",
                &["vmw_vsock_virtio_transport_common", "vsock"],
            ),
            ("vmw_vsock_virtio_transport_common", &["vsock"]),
            ("vsock", &[]),
        ];
        let order = load_order(
            &[
                "virtio_mmio",
                "virtio_net",
                "vmw_vsock_virtio_transport",
                "vsock",
            ],
            graph(edges),
        )
        .unwrap();
        assert_eq!(
            order,
            [
                "virtio_mmio",
                "failover",
                "net_failover",
                "virtio_net",
                "vsock",
                "vmw_vsock_virtio_transport_common",
                "vmw_vsock_virtio_transport"
            ]
        );
    }

    #[test]
    fn cycles_and_unknown_modules_are_errors() {
        let edges: &[(&str, &[&str])] = &[("a", &["b"]), ("b", &["c"]), ("c", &["a"])];
        let err = load_order(&["a"], graph(edges)).unwrap_err().to_string();
        assert!(err.contains("a -> b -> c -> a"), "{err}");
        assert!(load_order(&["nope"], graph(edges)).is_err());
    }

    #[test]
    fn parses_modules_dep() {
        let text = "kernel/drivers/net/virtio_net.ko.xz: kernel/drivers/net/net_failover.ko.xz kernel/net/core/failover.ko.xz\n\
                    kernel/drivers/net/net_failover.ko.xz: kernel/net/core/failover.ko.xz\n\
                    kernel/net/core/failover.ko.xz:\n\
                    kernel/drivers/hid/hid-generic.ko:\n";
        let ModulesDep { paths, deps } = parse_modules_dep(text).unwrap();
        assert_eq!(
            paths["virtio_net"],
            PathBuf::from("kernel/drivers/net/virtio_net.ko.xz")
        );
        assert_eq!(deps["virtio_net"], ["net_failover", "failover"]);
        assert!(deps["failover"].is_empty());
        assert!(paths.contains_key("hid_generic"));
        // modules.dep lists transitive dependencies too; the order must still be valid.
        let order = load_order(&["virtio_net"], |n| Ok(deps[n].clone())).unwrap();
        assert_eq!(order, ["failover", "net_failover", "virtio_net"]);
        assert!(parse_modules_dep("no colon here\n").is_err());
    }

    #[test]
    fn strips_signatures() {
        let mut signed = b"ELFDATA".to_vec();
        signed.extend(b"SIG");
        signed.extend([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 3]);
        signed.extend(SIGNATURE_MAGIC);
        strip_signature(&mut signed).unwrap();
        assert_eq!(signed, b"ELFDATA");
        // Unsigned modules are left alone.
        strip_signature(&mut signed).unwrap();
        assert_eq!(signed, b"ELFDATA");
        let mut bogus = vec![0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10, 0];
        bogus.extend(SIGNATURE_MAGIC);
        assert!(strip_signature(&mut bogus).is_err());
    }

    #[test]
    fn module_names_from_paths() {
        assert_eq!(
            module_name("kernel/fs/overlayfs/overlay.ko.xz").as_deref(),
            Some("overlay")
        );
        assert_eq!(
            module_name("hid-generic.ko").as_deref(),
            Some("hid_generic")
        );
        assert_eq!(module_name("modules.order"), None);
    }
}
