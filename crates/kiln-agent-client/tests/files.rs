//! File operations against the real agent binary.

mod common;

use std::time::Instant;

use common::{direct_agent, direct_agent_in};
use kiln_agent_client::{AgentError, ErrorCode, FileKind};
use sha2::{Digest, Sha256};

fn guest_code<T: std::fmt::Debug>(r: Result<T, AgentError>) -> ErrorCode {
    match r {
        Err(AgentError::Guest { code, message }) => {
            assert!(!message.is_empty());
            code
        }
        other => panic!("expected a guest error, got {other:?}"),
    }
}

/// Deterministic pseudo-random bytes (xorshift), so the data is not trivially compressible.
fn pseudo_random(len: usize) -> Vec<u8> {
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

#[tokio::test]
async fn twenty_mib_round_trip() {
    let (agent, client, _) = direct_agent().await;
    let path = agent.dir.path().join("sub/dir/blob.bin");
    let path = path.to_str().unwrap();
    let data = pseudo_random(20 << 20);
    let want = Sha256::digest(&data);

    let started = Instant::now();
    let written = client
        .write_file(path, Some(0o600), true, &data[..])
        .await
        .unwrap();
    let write_time = started.elapsed();
    assert_eq!(written, data.len() as u64);
    assert_eq!(Sha256::digest(std::fs::read(path).unwrap()), want);

    let started = Instant::now();
    let mut download = client.read_file(path).await.unwrap();
    assert_eq!((download.size, download.mode), (data.len() as u64, 0o600));
    let mut back = Vec::new();
    while let Some(chunk) = download.next_chunk().await {
        let chunk = chunk.unwrap();
        assert!(chunk.len() <= 256 * 1024);
        back.extend_from_slice(&chunk);
    }
    let read_time = started.elapsed();
    assert_eq!(back.len(), data.len());
    assert_eq!(Sha256::digest(&back), want);
    println!("20 MiB write {write_time:?}, read {read_time:?}");

    // Ranges.
    let mut part = client.read_file_range(path, 1000, Some(10)).await.unwrap();
    let chunk = part.next_chunk().await.unwrap().unwrap();
    assert_eq!(&chunk[..], &data[1000..1010]);
    assert!(part.next_chunk().await.is_none());
}

#[tokio::test]
async fn write_replaces_atomically_and_keeps_mode() {
    let (agent, client, _) = direct_agent().await;
    let path = agent.dir.path().join("f.txt");
    std::fs::write(&path, "old").unwrap();
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o640)).unwrap();
    let p = path.to_str().unwrap();
    assert_eq!(
        client
            .write_file(p, None, false, &b"new"[..])
            .await
            .unwrap(),
        3
    );
    assert_eq!(client.read_file_to_vec(p).await.unwrap(), b"new");
    assert_eq!(client.stat(p).await.unwrap().mode, 0o640);
    assert_eq!(
        client.write_file(p, None, false, &b""[..]).await.unwrap(),
        0
    );
    assert_eq!(client.read_file_to_vec(p).await.unwrap(), b"");
    // No temporary files are left behind.
    let names: Vec<String> = client
        .list_dir(agent.dir.path().to_str().unwrap())
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.name)
        .collect();
    assert_eq!(names, ["agent.sock", "f.txt"]);
}

#[tokio::test]
async fn write_errors_come_back_early() {
    let (agent, client, _) = direct_agent().await;
    let missing = agent.dir.path().join("missing/f");
    // A large body: the agent refuses before reading it all.
    let body = vec![0u8; 8 << 20];
    let err = client
        .write_file(missing.to_str().unwrap(), None, false, &body[..])
        .await;
    assert_eq!(guest_code(err), ErrorCode::NotFound);
    let dir = agent.dir.path().to_str().unwrap();
    assert_eq!(
        guest_code(client.write_file(dir, None, false, &b"x"[..]).await),
        ErrorCode::IsADirectory
    );
    assert_eq!(
        guest_code(client.write_file("rel/path", None, false, &b"x"[..]).await),
        ErrorCode::InvalidArgument
    );
    client.ping().await.unwrap();
}

#[tokio::test]
async fn read_errors() {
    let (agent, client, _) = direct_agent().await;
    let dir = agent.dir.path().to_str().unwrap();
    assert_eq!(
        guest_code(client.read_file("/no/such/file").await.map(|_| ())),
        ErrorCode::NotFound
    );
    assert_eq!(
        guest_code(client.read_file(dir).await.map(|_| ())),
        ErrorCode::IsADirectory
    );
    // Files whose size is unknown up front are read to the end.
    let uptime = client.read_file_to_vec("/proc/uptime").await.unwrap();
    assert!(!uptime.is_empty());
}

#[tokio::test]
async fn dropping_a_download_cancels_it() {
    let (agent, client, _) = direct_agent().await;
    let path = agent.dir.path().join("big");
    std::fs::write(&path, vec![1u8; 4 << 20]).unwrap();
    let mut download = client.read_file(path.to_str().unwrap()).await.unwrap();
    download.next_chunk().await.unwrap().unwrap();
    drop(download);
    client.ping().await.unwrap();
}

#[tokio::test]
async fn directories() {
    let (agent, client, _) = direct_agent().await;
    let base = agent.dir.path().to_str().unwrap().to_string();
    let nested = format!("{base}/a/b/c");
    assert_eq!(
        guest_code(client.mkdir(&nested, false, None).await),
        ErrorCode::NotFound
    );
    client.mkdir(&nested, true, Some(0o700)).await.unwrap();
    client.mkdir(&nested, true, None).await.unwrap();
    assert_eq!(
        guest_code(client.mkdir(&nested, false, None).await),
        ErrorCode::AlreadyExists
    );
    let st = client.stat(&nested).await.unwrap();
    assert_eq!((st.kind, st.mode), (FileKind::Dir, 0o700));

    client
        .write_file(&format!("{base}/a/file"), None, false, &b"12345"[..])
        .await
        .unwrap();
    std::os::unix::fs::symlink("file", format!("{base}/a/link")).unwrap();
    let entries = client.list_dir(&format!("{base}/a")).await.unwrap();
    let summary: Vec<(&str, FileKind, u64)> = entries
        .iter()
        .map(|e| {
            (
                e.name.as_str(),
                e.kind,
                if e.kind == FileKind::File { e.size } else { 0 },
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            ("b", FileKind::Dir, 0),
            ("file", FileKind::File, 5),
            ("link", FileKind::Symlink, 0)
        ]
    );
    // stat follows the symlink.
    let st = client.stat(&format!("{base}/a/link")).await.unwrap();
    assert_eq!((st.kind, st.size), (FileKind::File, 5));
    assert!(st.mtime_unix > 1_600_000_000);

    assert_eq!(
        guest_code(client.list_dir(&format!("{base}/a/file")).await),
        ErrorCode::NotADirectory
    );
    assert_eq!(
        guest_code(client.list_dir(&format!("{base}/nope")).await),
        ErrorCode::NotFound
    );
    assert_eq!(
        guest_code(client.stat(&format!("{base}/nope")).await),
        ErrorCode::NotFound
    );
    assert_eq!(
        guest_code(client.remove(&format!("{base}/a"), false).await),
        ErrorCode::DirectoryNotEmpty
    );
    client
        .remove(&format!("{base}/a/link"), false)
        .await
        .unwrap();
    client.remove(&format!("{base}/a"), true).await.unwrap();
    assert_eq!(
        guest_code(client.remove(&format!("{base}/a"), true).await),
        ErrorCode::NotFound
    );
    assert_eq!(
        guest_code(client.remove("/", true).await),
        ErrorCode::InvalidArgument
    );
}

#[tokio::test]
async fn sync_and_reseed() {
    let (_agent, client, _) = direct_agent().await;
    client.sync().await.unwrap();
    client.reseed(&[0x5a; 64]).await.unwrap();
    assert_eq!(
        guest_code(client.reseed(&[]).await),
        ErrorCode::InvalidArgument
    );
    assert_eq!(
        guest_code(client.set_machine_id("nope").await),
        ErrorCode::InvalidArgument
    );
    assert_eq!(
        guest_code(client.set_hostname("bad name").await),
        ErrorCode::InvalidArgument
    );
}

/// Hostname and machine id change host-wide state, so this runs the agent in private UTS and
/// mount namespaces with /etc/hostname and /etc/machine-id bind-mounted from scratch files.
#[tokio::test]
async fn hostname_and_machine_id_in_a_namespace() {
    let scratch = tempfile::tempdir().unwrap();
    let (hostname, machine_id) = (
        scratch.path().join("hostname"),
        scratch.path().join("machine-id"),
    );
    std::fs::write(&hostname, "old\n").unwrap();
    std::fs::write(&machine_id, "old\n").unwrap();
    let script = format!(
        "mount --bind {} /etc/hostname && mount --bind {} /etc/machine-id && exec \"$0\" \"$@\"",
        hostname.display(),
        machine_id.display()
    );
    let probe = std::process::Command::new("unshare")
        .args([
            "--mount",
            "--uts",
            "--propagation",
            "private",
            "sh",
            "-c",
            &script,
            "true",
        ])
        .status();
    if !probe.is_ok_and(|s| s.success()) || !std::path::Path::new("/etc/machine-id").exists() {
        eprintln!("skipping: cannot create namespaces with bind mounts here");
        return;
    }
    let wrapper = [
        "unshare",
        "--mount",
        "--uts",
        "--propagation",
        "private",
        "sh",
        "-c",
        &script,
    ];
    let (_agent, client, _) = direct_agent_in(&wrapper).await;
    client.set_hostname("kiln-test-box").await.unwrap();
    let id = "0123456789abcdef0123456789ABCDEF";
    client.set_machine_id(id).await.unwrap();
    assert_eq!(
        std::fs::read_to_string(&hostname).unwrap(),
        "kiln-test-box\n"
    );
    assert_eq!(
        std::fs::read_to_string(&machine_id).unwrap(),
        format!("{}\n", id.to_lowercase())
    );
    let out = client
        .exec_collect(kiln_agent_client::ExecRequest::argv(["hostname"]))
        .await
        .unwrap();
    assert_eq!(out.stdout, b"kiln-test-box\n");
}
