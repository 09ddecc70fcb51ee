use std::os::unix::fs::{symlink, MetadataExt};
use std::sync::mpsc;

use super::*;

/// A tar whose entry names are written raw (the tar crate refuses to build `..` or absolute names).
fn raw_tar(entries: &[(&str, tar::EntryType, &[u8], Option<&str>)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, kind, data, link) in entries {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(*kind);
        h.set_size(data.len() as u64);
        h.set_mode(0o640);
        h.set_mtime(1_600_000_000);
        if let Some(link) = link {
            h.set_link_name(link).unwrap();
        }
        let gnu = h.as_gnu_mut().unwrap();
        gnu.name = [0; 100];
        gnu.name[..name.len()].copy_from_slice(name.as_bytes());
        h.set_cksum();
        out.extend_from_slice(h.as_bytes());
        out.extend_from_slice(data);
        out.resize(out.len().div_ceil(512) * 512, 0);
    }
    out.resize(out.len() + 1024, 0);
    out
}

fn run(tar: &[u8], target: &Path) -> Result<Response> {
    let (tx, rx) = mpsc::channel();
    for chunk in tar.chunks(700) {
        tx.send(Inbound::Data(chunk.to_vec())).unwrap();
    }
    tx.send(Inbound::DataEnd(Some(tar.len() as u64))).unwrap();
    unpack(&rx, &|_| {}, target.to_str().unwrap())
}

const FILE: tar::EntryType = tar::EntryType::Regular;

#[test]
fn unpacks_files_dirs_links_with_modes_and_times() {
    let d = tempfile::tempdir().unwrap();
    let t = d.path().join("new");
    let tar = raw_tar(&[
        ("a/", tar::EntryType::Directory, b"", None),
        ("a/f", FILE, b"hello", None),
        ("l", tar::EntryType::Symlink, b"", Some("a/f")),
        ("h", tar::EntryType::Link, b"", Some("a/f")),
    ]);
    assert_eq!(
        run(&tar, &t).unwrap(),
        Response::Unpacked {
            entries: 4,
            bytes: tar.len() as u64
        }
    );
    assert_eq!(fs::read(t.join("l")).unwrap(), b"hello");
    let m = fs::metadata(t.join("a/f")).unwrap();
    assert_eq!(
        (m.mode() & 0o7777, m.mtime(), m.nlink()),
        (0o640, 1_600_000_000, 2)
    );
    assert_eq!(fs::metadata(t.join("a")).unwrap().mtime(), 1_600_000_000);
    // Built aside, then renamed: no staging directory is left.
    assert_eq!(fs::read_dir(d.path()).unwrap().count(), 1);
}

#[test]
fn escapes_are_refused_and_a_new_target_is_rolled_back() {
    let d = tempfile::tempdir().unwrap();
    let outside = d.path().join("outside");
    fs::create_dir(&outside).unwrap();
    let t = d.path().join("t");
    fs::create_dir(&t).unwrap();
    symlink(&outside, t.join("evil")).unwrap();
    let out = outside.to_str().unwrap().to_string();
    let cases: Vec<Vec<u8>> = vec![
        raw_tar(&[("../x", FILE, b"x", None)]),
        raw_tar(&[(&format!("{out}/x"), FILE, b"x", None)]),
        raw_tar(&[("evil/x", FILE, b"x", None)]),
        raw_tar(&[("evil/sub/x", FILE, b"x", None)]),
        raw_tar(&[
            ("s", tar::EntryType::Symlink, b"", Some(&out)),
            ("s/x", FILE, b"x", None),
        ]),
        raw_tar(&[("h", tar::EntryType::Link, b"", Some("../outside/y"))]),
    ];
    for (i, tar) in cases.iter().enumerate() {
        let err = run(tar, &t).unwrap_err();
        assert_eq!(err.code, ErrorCode::PathEscape, "case {i}: {err:?}");
    }
    assert_eq!(fs::read_dir(&outside).unwrap().count(), 0);
    // An entry replacing the planted symlink itself replaces the link, never writes through it.
    run(&raw_tar(&[("evil", FILE, b"mine", None)]), &t).unwrap();
    assert!(!fs::symlink_metadata(t.join("evil"))
        .unwrap()
        .file_type()
        .is_symlink());
    assert_eq!(fs::read_dir(&outside).unwrap().count(), 0);

    let fresh = d.path().join("fresh");
    let err = run(
        &raw_tar(&[("ok", FILE, b"ok", None), ("../y", FILE, b"y", None)]),
        &fresh,
    )
    .unwrap_err();
    assert_eq!(err.code, ErrorCode::PathEscape);
    let left: Vec<_> = fs::read_dir(d.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left.len(), 2, "{left:?}");
}

#[test]
fn a_truncated_stream_is_an_error() {
    let d = tempfile::tempdir().unwrap();
    let tar = raw_tar(&[("f", FILE, &[1u8; 4000], None)]);
    let (tx, rx) = mpsc::channel();
    tx.send(Inbound::Data(tar[..1500].to_vec())).unwrap();
    tx.send(Inbound::Cancel).unwrap();
    let err = unpack(&rx, &|_| {}, d.path().join("n").to_str().unwrap()).unwrap_err();
    assert_eq!(err.code, ErrorCode::Cancelled, "{err:?}");
    assert_eq!(fs::read_dir(d.path()).unwrap().count(), 0);
}
