//! A push, pull and gc through a `file://` remote, with sparse files and a damaged chunk.

use std::os::unix::fs::{FileExt, MetadataExt};
use std::sync::Arc;
use std::time::Duration;

use crate::{ErrorKind, Progress, PullSource, PushFile, Remote, RemoteSpec, CHUNK};

fn remote(dir: &std::path::Path) -> Remote {
    Remote::open(&RemoteSpec {
        name: "r".into(),
        url: format!("file://{}", dir.display()),
        region: None,
        endpoint: None,
    })
    .unwrap()
}

/// A 64 MiB sparse file with data in two chunks (one all zeros, which is not stored).
fn sample(path: &std::path::Path, seed: u8) {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(64 << 20).unwrap();
    f.write_all_at(&[seed; 8192], 5 << 20).unwrap();
    f.write_all_at(&[0u8; 1 << 20], 40 << 20).unwrap();
    f.write_all_at(b"tail", (64 << 20) - 4).unwrap();
}

fn files(path: &std::path::Path) -> Vec<PushFile> {
    vec![PushFile {
        name: "memory".into(),
        file: std::fs::File::open(path).unwrap(),
        size: 64 << 20,
        checksum: "xxh3:0".into(),
    }]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_pull_dedupe_corruption_and_gc() {
    let store = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let r = remote(store.path());
    let src = work.path().join("memory");
    sample(&src, 7);

    let p = Arc::new(Progress::default());
    let first = r
        .push("s1", "{}".into(), files(&src), p.clone())
        .await
        .unwrap();
    assert_eq!((first.chunks, first.chunks_uploaded), (2, 2), "{first:?}");
    assert_eq!(first.data_bytes, 2 * CHUNK);
    // Again: everything is there.
    let again = r.push("s1", "{}".into(), files(&src), p).await.unwrap();
    assert_eq!(again.chunks_uploaded, 0, "{again:?}");
    // Another snapshot changing one chunk uploads one.
    let src2 = work.path().join("memory2");
    sample(&src2, 8);
    let second = r
        .push(
            "s2",
            "{}".into(),
            files(&src2),
            Arc::new(Progress::default()),
        )
        .await
        .unwrap();
    assert_eq!(second.chunks_uploaded, 1, "{second:?}");

    // Pulled back: same bytes, still sparse; the second pull of s2 comes from the cache.
    let m = r.manifest("s1").await.unwrap();
    let out = tempfile::tempdir().unwrap();
    let cache = work.path().join("cache");
    let srcs = PullSource {
        local_files: Default::default(),
        cache: Some(cache.clone()),
    };
    let rep = r
        .pull_files(&m, out.path(), &srcs, Arc::new(Progress::default()))
        .await
        .unwrap();
    assert_eq!(rep.chunks_downloaded, 2);
    let got = out.path().join("memory");
    assert_eq!(std::fs::read(&got).unwrap(), std::fs::read(&src).unwrap());
    assert!(
        std::fs::metadata(&got).unwrap().blocks() * 512 < 16 << 20,
        "sparse"
    );
    let m2 = r.manifest("s2").await.unwrap();
    let out2 = tempfile::tempdir().unwrap();
    let rep = r
        .pull_files(&m2, out2.path(), &srcs, Arc::new(Progress::default()))
        .await
        .unwrap();
    assert_eq!(
        (rep.chunks_cached, rep.chunks_downloaded),
        (1, 1),
        "{rep:?}"
    );

    // A damaged chunk is refused, naming it (a fresh cache, so it comes from the remote).
    let c = &m.files[0].chunks[0];
    let key = crate::chunk_key(&c.sha256);
    let obj = store.path().join(&key);
    let mut bytes = std::fs::read(&obj).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    std::fs::write(&obj, &bytes).unwrap();
    let out3 = tempfile::tempdir().unwrap();
    let e = r
        .pull_files(
            &m,
            out3.path(),
            &PullSource::default(),
            Arc::new(Progress::default()),
        )
        .await
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::Corrupt, "{e}");
    assert!(e.message.contains(&key), "{e}");

    // gc: with s1 gone, only its own chunk goes (and none within the grace period).
    r.delete_snapshot("s1").await.unwrap();
    let g = r.gc(Duration::from_secs(3600), false).await.unwrap();
    assert_eq!((g.deleted, g.kept_young), (0, 1), "{g:?}");
    let g = r.gc(Duration::ZERO, false).await.unwrap();
    assert_eq!((g.deleted, g.referenced), (1, 2), "{g:?}");
    let out4 = tempfile::tempdir().unwrap();
    r.pull_files(
        &m2,
        out4.path(),
        &PullSource::default(),
        Arc::new(Progress::default()),
    )
    .await
    .unwrap();
    assert_eq!(
        r.manifest("s1").await.unwrap_err().kind,
        ErrorKind::NotFound
    );
}
