use std::sync::mpsc;

use super::*;

fn dir() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

fn path_in(d: &tempfile::TempDir, name: &str) -> String {
    d.path().join(name).to_str().unwrap().to_string()
}

/// Only the expected entries exist: no temporary files were left behind.
fn names(d: &tempfile::TempDir) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(d.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn feed(msgs: Vec<Inbound>) -> Receiver<Inbound> {
    let (tx, rx) = mpsc::channel();
    for m in msgs {
        tx.send(m).unwrap();
    }
    rx
}

#[test]
fn write_replaces_atomically_and_keeps_mode() {
    let d = dir();
    let target = path_in(&d, "f");
    fs::write(&target, b"old").unwrap();
    fs::set_permissions(&target, Permissions::from_mode(0o640)).unwrap();
    let rx = feed(vec![
        Inbound::Data(b"new ".to_vec()),
        Inbound::Data(b"contents".to_vec()),
        Inbound::DataEnd(Some(12)),
    ]);
    assert_eq!(
        write_file(&rx, &|_| {}, &target, None, false, false),
        Ok(Response::Written { bytes: 12 })
    );
    assert_eq!(fs::read(&target).unwrap(), b"new contents");
    assert_eq!(fs::metadata(&target).unwrap().mode() & 0o7777, 0o640);
    assert_eq!(names(&d), ["f"]);
}

#[test]
fn write_creates_parents_and_applies_mode() {
    let d = dir();
    let target = path_in(&d, "a/b/c.sh");
    let rx = feed(vec![
        Inbound::Data(b"#!/bin/sh\n".to_vec()),
        Inbound::DataEnd(None),
    ]);
    write_file(&rx, &|_| {}, &target, Some(0o755), false, true).unwrap();
    assert_eq!(fs::metadata(&target).unwrap().mode() & 0o7777, 0o755);
}

#[test]
fn write_without_parents_fails_with_not_found() {
    let d = dir();
    let rx = feed(vec![Inbound::DataEnd(None)]);
    let err = write_file(&rx, &|_| {}, &path_in(&d, "missing/f"), None, false, false).unwrap_err();
    assert_eq!(err.code, ErrorCode::NotFound);
    assert!(err.message.contains("missing"), "{}", err.message);
}

#[test]
fn write_appends() {
    let d = dir();
    let target = path_in(&d, "log");
    fs::write(&target, b"one\n").unwrap();
    let rx = feed(vec![
        Inbound::Data(b"two\n".to_vec()),
        Inbound::DataEnd(Some(4)),
    ]);
    write_file(&rx, &|_| {}, &target, None, true, false).unwrap();
    assert_eq!(fs::read(&target).unwrap(), b"one\ntwo\n");
}

#[test]
fn short_or_cancelled_write_leaves_target_untouched() {
    let d = dir();
    let target = path_in(&d, "f");
    fs::write(&target, b"keep").unwrap();
    let cases = [
        (
            vec![Inbound::Data(b"abc".to_vec()), Inbound::DataEnd(Some(4))],
            ErrorCode::Protocol,
        ),
        (
            vec![Inbound::Data(b"abc".to_vec()), Inbound::Cancel],
            ErrorCode::Cancelled,
        ),
        (
            vec![Inbound::Data(b"abc".to_vec()), Inbound::Detached],
            ErrorCode::Cancelled,
        ),
        // The sender goes away without DataEnd.
        (vec![Inbound::Data(b"abc".to_vec())], ErrorCode::Cancelled),
    ];
    for (msgs, code) in cases {
        let err = write_file(&feed(msgs), &|_| {}, &target, None, false, false).unwrap_err();
        assert_eq!(err.code, code);
        assert_eq!(fs::read(&target).unwrap(), b"keep");
        assert_eq!(names(&d), ["f"]);
    }
}

#[test]
fn write_refuses_directories_and_relative_paths() {
    let d = dir();
    let rx = feed(vec![]);
    let err = write_file(&rx, &|_| {}, d.path().to_str().unwrap(), None, false, false).unwrap_err();
    assert_eq!(err.code, ErrorCode::IsADirectory);
    let err = write_file(&rx, &|_| {}, "relative/x", None, false, false).unwrap_err();
    assert_eq!(err.code, ErrorCode::InvalidArgument);
    let err = write_file(&rx, &|_| {}, &path_in(&d, "x"), Some(0o17777), false, false).unwrap_err();
    assert_eq!(err.code, ErrorCode::InvalidArgument);
}

#[test]
fn mkdir_stat_list_remove() {
    let d = dir();
    let nested = path_in(&d, "x/y");
    let err = mkdir(&nested, false, None).unwrap_err();
    assert_eq!(err.code, ErrorCode::NotFound);
    mkdir(&nested, true, Some(0o700)).unwrap();
    mkdir(&nested, true, None).unwrap();
    assert_eq!(
        mkdir(&nested, false, None).unwrap_err().code,
        ErrorCode::AlreadyExists
    );
    let st = stat(&nested).unwrap();
    assert_eq!((st.kind, st.mode), (FileKind::Dir, 0o700));

    fs::write(path_in(&d, "x/file"), b"12345").unwrap();
    std::os::unix::fs::symlink("/nonexistent", path_in(&d, "x/dangling")).unwrap();
    assert_eq!(
        stat(&path_in(&d, "x/dangling")).unwrap().kind,
        FileKind::Symlink
    );
    let Response::Entries { entries } = list_dir(&path_in(&d, "x")).unwrap() else {
        panic!("not entries")
    };
    let summary: Vec<(&str, FileKind)> =
        entries.iter().map(|e| (e.name.as_str(), e.kind)).collect();
    assert_eq!(
        summary,
        [
            ("dangling", FileKind::Symlink),
            ("file", FileKind::File),
            ("y", FileKind::Dir)
        ]
    );
    assert_eq!(entries[1].size, 5);
    assert_eq!(
        list_dir(&path_in(&d, "x/file")).unwrap_err().code,
        ErrorCode::NotADirectory
    );

    let x = path_in(&d, "x");
    assert_eq!(
        remove(&x, false).unwrap_err().code,
        ErrorCode::DirectoryNotEmpty
    );
    remove(&path_in(&d, "x/dangling"), false).unwrap();
    remove(&x, true).unwrap();
    assert_eq!(remove(&x, true).unwrap_err().code, ErrorCode::NotFound);
    assert_eq!(stat(&x).unwrap_err().code, ErrorCode::NotFound);
    assert_eq!(
        remove("/", true).unwrap_err().code,
        ErrorCode::InvalidArgument
    );
    assert_eq!(
        remove("/tmp/..", true).unwrap_err().code,
        ErrorCode::InvalidArgument
    );
}

#[test]
fn atomic_write_helper() {
    let d = dir();
    let p = d.path().join("machine-id");
    write_atomic(&p, b"abc\n", 0o444).unwrap();
    write_atomic(&p, b"def\n", 0o444).unwrap();
    assert_eq!(fs::read(&p).unwrap(), b"def\n");
    assert_eq!(fs::metadata(&p).unwrap().mode() & 0o7777, 0o444);
    assert_eq!(names(&d), ["machine-id"]);
}

#[test]
fn write_acknowledges_progress() {
    let d = dir();
    let chunk = vec![7u8; 256 * 1024];
    let mut msgs: Vec<Inbound> = (0..12).map(|_| Inbound::Data(chunk.clone())).collect();
    msgs.push(Inbound::DataEnd(Some(12 * 256 * 1024)));
    let acks = std::cell::RefCell::new(Vec::new());
    let rx = feed(msgs);
    write_file(
        &rx,
        &|n| acks.borrow_mut().push(n),
        &path_in(&d, "f"),
        None,
        false,
        false,
    )
    .unwrap();
    assert_eq!(*acks.borrow(), [1 << 20, 2 << 20, 3 << 20]);
}
