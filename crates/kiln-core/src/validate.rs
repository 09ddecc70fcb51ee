//! Validation of everything a request names: ids, names, sizes, environment, labels and guest paths.
//! Names reach the filesystem, so the rule is strict and shared by sandboxes, snapshots, volumes and images.

use std::collections::BTreeMap;

use crate::error::{Error, Result};

pub const NAME_RULE: &str =
    "1-63 characters: lowercase letters, digits, '-' and '_', starting with a letter or digit";

/// `^[a-z0-9][a-z0-9_-]{0,62}$`
pub fn is_valid_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 63
        && (bytes[0].is_ascii_lowercase() || bytes[0].is_ascii_digit())
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-' || *b == b'_')
}

pub fn name(kind: &str, name: &str) -> Result<()> {
    if is_valid_name(name) {
        Ok(())
    } else {
        Err(Error::invalid(format!(
            "invalid {kind} name '{}': use {NAME_RULE}",
            name.escape_debug()
        )))
    }
}

pub fn range(what: &str, value: u64, min: u64, max: u64, unit: &str) -> Result<()> {
    if (min..=max).contains(&value) {
        Ok(())
    } else {
        Err(Error::invalid(format!(
            "{what} {value}{unit} is out of range: allowed {min}{unit} to {max}{unit}"
        )))
    }
}

/// Environment variable names: POSIX-portable, so the guest shell accepts them.
pub fn env(vars: &BTreeMap<String, String>) -> Result<()> {
    for (k, v) in vars {
        let ok = !k.is_empty()
            && !k.as_bytes()[0].is_ascii_digit()
            && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if !ok {
            return Err(Error::invalid(format!(
                "invalid environment variable name '{}': use letters, digits and '_', not starting with a digit",
                k.escape_debug()
            )));
        }
        if v.contains('\0') {
            return Err(Error::invalid(format!(
                "environment variable {k} contains a NUL byte"
            )));
        }
    }
    Ok(())
}

pub fn labels(labels: &BTreeMap<String, String>) -> Result<()> {
    for (k, v) in labels {
        let ok = !k.is_empty()
            && k.len() <= 63
            && k.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_./".contains(&b));
        if !ok {
            return Err(Error::invalid(format!(
                "invalid label key '{}': 1-63 characters of letters, digits, '-', '_', '.', '/'",
                k.escape_debug()
            )));
        }
        if v.len() > 256 || v.contains('\0') {
            return Err(Error::invalid(format!(
                "label {k}: values are at most 256 bytes without NUL"
            )));
        }
    }
    Ok(())
}

/// Guest paths must be absolute and free of NUL bytes; the guest resolves them inside the VM, so `..` is
/// harmless to the host, but a relative path is almost always a mistake.
pub fn guest_path(path: &str) -> Result<()> {
    if !path.starts_with('/') {
        return Err(Error::invalid(format!(
            "guest path '{}' must be absolute (start with '/')",
            path.escape_debug()
        )));
    }
    if path.contains('\0') || path.len() > 4096 {
        return Err(Error::invalid(
            "guest path must be at most 4096 bytes without NUL",
        ));
    }
    Ok(())
}

/// Where a volume is mounted in the guest: an absolute, normalised path (no `.`, `..` or empty parts),
/// not `/` and not inside the kernel's own trees, where a mount would hide the system.
pub fn mount_path(path: &str) -> Result<()> {
    guest_path(path)?;
    let parts: Vec<&str> = path[1..].split('/').collect();
    let normal = parts
        .iter()
        .all(|p| !p.is_empty() && *p != "." && *p != "..");
    if !normal {
        return Err(Error::invalid(format!(
            "volume mount path '{}' must be a normalised absolute path like /data (no '.', '..', '//' or trailing '/')",
            path.escape_debug()
        )));
    }
    const RESERVED: [&str; 5] = ["proc", "sys", "dev", "run", "kiln"];
    if RESERVED.contains(&parts[0]) {
        return Err(Error::invalid(format!(
            "volume mount path '{}' is inside /{}, which the guest system owns; mount volumes elsewhere (e.g. /data)",
            path.escape_debug(),
            parts[0]
        )));
    }
    Ok(())
}

/// Parses `KEY=VALUE` label filters and flags.
pub fn parse_key_value(s: &str) -> Result<(String, String)> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(Error::invalid(format!("expected KEY=VALUE, got '{s}'"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_rule() {
        for good in ["a", "web-1", "snap_2024", "0abc", &"x".repeat(63)] {
            assert!(is_valid_name(good), "{good}");
        }
        for bad in [
            "",
            "-a",
            "_a",
            "A",
            "a b",
            "../x",
            "a/b",
            "a.b",
            "é",
            &"x".repeat(64),
            "a\0",
        ] {
            assert!(!is_valid_name(bad), "{bad:?}");
        }
        let err = name("sandbox", "Bad").unwrap_err();
        assert!(err.message.contains("lowercase"));
    }

    #[test]
    fn mount_paths_are_normalised_and_outside_system_trees() {
        for good in ["/data", "/mnt/cache", "/home/user/work"] {
            assert!(mount_path(good).is_ok(), "{good}");
        }
        for bad in [
            "", "/", "data", "/data/", "/a//b", "/a/../b", "/./a", "/proc", "/sys/x", "/dev",
            "/a\0b",
        ] {
            assert!(mount_path(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn ranges_name_the_bounds() {
        let e = range("memory", 10, 64, 8192, " MiB").unwrap_err();
        assert_eq!(e.code, crate::ErrorCode::InvalidRequest);
        assert!(e.message.contains("64 MiB to 8192 MiB"), "{}", e.message);
        assert!(range("memory", 64, 64, 8192, " MiB").is_ok());
    }

    #[test]
    fn env_and_labels() {
        let mut m = BTreeMap::new();
        m.insert("GOOD_1".to_string(), "x".to_string());
        assert!(env(&m).is_ok());
        m.insert("1BAD".to_string(), "x".to_string());
        assert!(env(&m).is_err());
        let mut l = BTreeMap::new();
        l.insert("team/app".to_string(), "v".to_string());
        assert!(labels(&l).is_ok());
        l.insert("bad key".to_string(), "v".to_string());
        assert!(labels(&l).is_err());
    }

    #[test]
    fn guest_paths() {
        assert!(guest_path("/etc/hosts").is_ok());
        assert!(guest_path("etc/hosts").is_err());
        assert!(guest_path("/a\0b").is_err());
        assert_eq!(
            parse_key_value("a=b=c").unwrap(),
            ("a".to_string(), "b=c".to_string())
        );
        assert!(parse_key_value("=x").is_err());
    }
}
