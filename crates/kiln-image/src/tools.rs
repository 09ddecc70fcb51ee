//! Host tools the builder shells out to, and a command runner whose errors say what failed and why.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use crate::error::{ImageError, Result};

/// A host program together with the Debian package that provides it, so a missing tool can be reported
/// with the exact install command.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Tool {
    pub name: &'static str,
    pub package: &'static str,
    pub purpose: &'static str,
}

pub(crate) const APT_GET: Tool = Tool {
    name: "apt-get",
    package: "apt",
    purpose: "download the Debian guest kernel",
};
pub(crate) const APT_CACHE: Tool = Tool {
    name: "apt-cache",
    package: "apt",
    purpose: "find the current Debian guest kernel package",
};
pub(crate) const DPKG_DEB: Tool = Tool {
    name: "dpkg-deb",
    package: "dpkg",
    purpose: "unpack the Debian guest kernel package",
};
pub(crate) const MKFS_EXT4: Tool = Tool {
    name: "mkfs.ext4",
    package: "e2fsprogs",
    purpose: "create the ext4 root filesystem image",
};
pub(crate) const DEBOOTSTRAP: Tool = Tool {
    name: "debootstrap",
    package: "debootstrap",
    purpose: "install Debian into the base image",
};
pub(crate) const TAR: Tool = Tool {
    name: "tar",
    package: "tar",
    purpose: "cache the debootstrap tree of the base image",
};
pub(crate) const BUSYBOX: Tool = Tool {
    name: "busybox",
    package: "busybox-static",
    purpose: "provide the shell and tools of the initramfs and the tiny image",
};
pub(crate) const ZSTD: Tool = Tool {
    name: "zstd",
    package: "zstd",
    purpose: "decompress zstd-compressed kernel modules",
};

/// Root-only tools live in sbin directories that a normal user's PATH often lacks.
const EXTRA_DIRS: &[&str] = &["/usr/local/sbin", "/usr/sbin", "/sbin", "/usr/bin", "/bin"];

/// Locates `tool` on PATH (plus the sbin directories), or explains how to install it.
pub(crate) fn find_tool(tool: &Tool) -> Result<PathBuf> {
    let path_var = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path_var)
        .chain(EXTRA_DIRS.iter().map(PathBuf::from))
        .map(|dir| dir.join(tool.name))
        .find(|candidate| is_executable(candidate))
        .ok_or_else(|| missing(tool))
}

pub(crate) fn missing(tool: &Tool) -> ImageError {
    ImageError::MissingTool {
        tool: tool.name.to_string(),
        package: tool.package.to_string(),
        purpose: tool.purpose.to_string(),
    }
}

/// An executable called `name` on PATH alone (no sbin directories added, unlike `find_tool`).
pub fn on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| is_executable(p))
}

pub(crate) fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Renders a command roughly as a shell would show it, for error messages.
pub(crate) fn describe(cmd: &Command) -> String {
    let quote = |s: &OsStr| {
        let s = s.to_string_lossy();
        if !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@".contains(c))
        {
            s.into_owned()
        } else {
            format!("'{}'", s.replace('\'', r"'\''"))
        }
    };
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(quote)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs `cmd` to completion with stdin closed, capturing its output; a non-zero exit becomes
/// [`ImageError::CommandFailed`] carrying the tail of stderr.
pub(crate) fn run(cmd: &mut Command) -> Result<Output> {
    let shown = describe(cmd);
    tracing::debug!(command = %shown, "running");
    let output = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| ImageError::io(format!("cannot run `{shown}`"), e))?;
    if output.status.success() {
        return Ok(output);
    }
    Err(ImageError::CommandFailed {
        command: shown,
        status: output.status.to_string(),
        stderr: tail(&String::from_utf8_lossy(&output.stderr), 20),
    })
}

/// Like [`run`] but returns stdout as text.
pub(crate) fn run_stdout(cmd: &mut Command) -> Result<String> {
    let output = run(cmd)?;
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// The last `lines` lines of `text`: enough to show why a tool failed without flooding the terminal.
fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn describe_quotes_only_when_needed() {
        let mut cmd = Command::new("mkfs.ext4");
        cmd.args(["-L", "kiln root", "/tmp/x.img", "it's"]);
        assert_eq!(
            describe(&cmd),
            r"mkfs.ext4 -L 'kiln root' /tmp/x.img 'it'\''s'"
        );
    }

    #[test]
    fn failed_command_reports_stderr() {
        let err = run(Command::new("sh").args(["-c", "echo oops >&2; exit 3"])).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("exit status: 3"), "{text}");
        assert!(text.contains("oops"), "{text}");
    }

    #[test]
    fn missing_tool_names_the_package() {
        let tool = Tool {
            name: "kiln-no-such-tool",
            package: "kiln-pkg",
            purpose: "test",
        };
        let text = find_tool(&tool).unwrap_err().to_string();
        assert!(text.contains("apt-get install kiln-pkg"), "{text}");
    }
}
