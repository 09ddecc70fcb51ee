//! Remotes for snapshots (object storage, `kiln_remote` has the format): their settings, kept in
//! `remotes.json` in the data directory (mode 0600; no credentials in it), and push, pull and gc run as
//! operations whose stage shows the bytes done.

use std::collections::HashMap;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use kiln_remote::{
    ErrorKind, GcReport, Progress, PullReport, PullSource, PushFile, PushReport, Remote,
    SnapshotEntry,
};
use serde::Serialize;
use tracing::info;

use crate::engine::Engine;
use crate::error::{Error, ErrorCode, Result};
use crate::fsutil;
use crate::snapshot::manifest::Manifest;
use crate::snapshot::Snapshot;

pub use kiln_remote::{
    GcReport as RemoteGc, PullReport as RemotePull, PushReport as RemotePush, RemoteSpec,
    SnapshotEntry as RemoteSnapshot,
};

const REMOTES_FILE: &str = "remotes.json";
/// Serializes changes to `remotes.json` (check-then-act under it).
static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// A pulled snapshot and what the pull transferred.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Pulled {
    pub snapshot: Snapshot,
    pub pull: PullReport,
}

fn map(e: kiln_remote::Error) -> Error {
    let code = match e.kind {
        ErrorKind::Invalid => ErrorCode::InvalidRequest,
        ErrorKind::NotFound => ErrorCode::SnapshotNotFound,
        ErrorKind::Corrupt => ErrorCode::SnapshotCorrupt,
        ErrorKind::Unreachable => ErrorCode::RemoteUnavailable,
        ErrorKind::Io => ErrorCode::Internal,
    };
    Error::new(code, e.message)
}

impl Engine {
    fn remotes_path(&self) -> PathBuf {
        self.config().data_dir.join(REMOTES_FILE)
    }

    /// The configured remotes, by name.
    pub fn list_remotes(&self) -> Result<Vec<RemoteSpec>> {
        match std::fs::read(self.remotes_path()) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| {
                Error::internal(format!(
                    "{} is not valid ({e}); fix or remove it",
                    self.remotes_path().display()
                ))
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(fsutil::io_error("reading the remotes", e)),
        }
    }

    fn save_remotes(&self, list: &[RemoteSpec]) -> Result<()> {
        let path = self.remotes_path();
        let tmp = path.with_extension("json.tmp");
        let body = serde_json::to_vec_pretty(list).map_err(|e| Error::internal(e.to_string()))?;
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(&body)?;
            f.sync_all()
        };
        write().map_err(|e| fsutil::io_error(&format!("writing {}", tmp.display()), e))?;
        fsutil::rename_durably(&tmp, &path)
    }

    /// Adds a remote; its URL and options are checked, nothing is contacted.
    pub fn add_remote(&self, spec: RemoteSpec) -> Result<RemoteSpec> {
        spec.check().map_err(map)?;
        self.check_local_remote(&spec.url)?;
        let _g = LOCK.lock().unwrap_or_else(|p| p.into_inner());
        let mut list = self.list_remotes()?;
        if list.iter().any(|r| r.name == spec.name) {
            return Err(Error::new(
                ErrorCode::RemoteAlreadyExists,
                format!("a remote named '{}' already exists; remove it first (`kiln remote rm {}`) or pick another name", spec.name, spec.name),
            ));
        }
        list.push(spec.clone());
        list.sort_by(|a, b| a.name.cmp(&b.name));
        self.save_remotes(&list)?;
        info!(remote = %spec.name, url = %spec.url, "remote added");
        Ok(spec)
    }

    /// A `file://` remote is a directory the root daemon creates and writes: only under its data dir's
    /// `remotes/` or a directory the operator listed in `KILN_REMOTE_DIRS` (colon-separated), never
    /// wherever an API client points it.
    fn check_local_remote(&self, url: &str) -> Result<()> {
        let Some(path) = url.strip_prefix("file://") else {
            return Ok(());
        };
        let mut roots = vec![self.config().data_dir.join("remotes")];
        if let Ok(dirs) = std::env::var("KILN_REMOTE_DIRS") {
            roots.extend(
                dirs.split(':')
                    .filter(|d| d.starts_with('/'))
                    .map(PathBuf::from),
            );
        }
        if roots
            .iter()
            .any(|r| std::path::Path::new(path).starts_with(r))
        {
            return Ok(());
        }
        let allowed: Vec<String> = roots.iter().map(|r| r.display().to_string()).collect();
        Err(Error::invalid(format!(
            "a file:// remote must be a directory under {}; to use another, start the daemon with KILN_REMOTE_DIRS listing it",
            allowed.join(" or ")
        )))
    }

    /// Removes a remote's settings (its objects stay in the storage).
    pub fn remove_remote(&self, name: &str) -> Result<()> {
        let _g = LOCK.lock().unwrap_or_else(|p| p.into_inner());
        let mut list = self.list_remotes()?;
        let before = list.len();
        list.retain(|r| r.name != name);
        if list.len() == before {
            return Err(remote_not_found(name));
        }
        self.save_remotes(&list)
    }

    pub fn get_remote(&self, name: &str) -> Result<RemoteSpec> {
        self.list_remotes()?
            .into_iter()
            .find(|r| r.name == name)
            .ok_or_else(|| remote_not_found(name))
    }

    fn open_remote(&self, name: &str) -> Result<Remote> {
        Remote::open(&self.get_remote(name)?).map_err(map)
    }

    /// Snapshots pushed to remote `name`.
    pub async fn remote_snapshots(&self, name: &str) -> Result<Vec<SnapshotEntry>> {
        self.open_remote(name)?.list_snapshots().await.map_err(map)
    }

    /// Deletes snapshot `snap` from remote `name` (its chunks stay until `gc_remote`).
    pub async fn delete_remote_snapshot(&self, name: &str, snap: &str) -> Result<()> {
        crate::validate::name("snapshot", snap)?;
        self.open_remote(name)?
            .delete_snapshot(snap)
            .await
            .map_err(map)
    }

    /// Pushes snapshot `snap` to remote `remote` as `as_name` (default: its id). A diff travels with its
    /// base, as a bundle does; the base's chunks are the template's or parent's, so stored once.
    pub async fn push_snapshot(
        &self,
        snap: &str,
        remote: &str,
        as_name: Option<String>,
    ) -> Result<PushReport> {
        let r = self.open_remote(remote)?;
        let (id, header, sources) = self.open_for_export(snap, false)?;
        let name = as_name.unwrap_or(id);
        crate::validate::name("snapshot", &name)?;
        let files = sources
            .into_iter()
            .map(|s| PushFile {
                name: s.name,
                file: s.file,
                size: s.size,
                checksum: s.checksum,
            })
            .collect();
        let progress = Arc::new(Progress::default());
        let report = with_progress(
            "pushing",
            progress.clone(),
            r.push(&name, header.manifest, files, progress),
        )
        .await
        .map_err(map)?;
        info!(snapshot = %name, remote, chunks = report.chunks, uploaded = report.chunks_uploaded,
              bytes = report.bytes_uploaded, "snapshot pushed");
        Ok(report)
    }

    /// Pulls snapshot `snap` from remote `remote` as `name` (default: `snap`): checked for this host
    /// like a bundle import (manifest, compatibility), every chunk checked against its hash as it
    /// arrives, every file against its checksum before it is published. Nothing is left on failure.
    pub async fn pull_snapshot(
        &self,
        remote: &str,
        snap: &str,
        name: Option<String>,
    ) -> Result<Pulled> {
        self.config().check_storage("pull a snapshot")?;
        crate::validate::name("snapshot", snap)?;
        let r = self.open_remote(remote)?;
        let rm = r.manifest(snap).await.map_err(map)?;
        let id = name.unwrap_or_else(|| snap.to_string());
        let claim = self.claim_import_name(&id)?;
        let tmp = self.config().snapshots_dir().join(format!(
            ".tmp-{id}-{:08x}-{}",
            rand::random::<u32>(),
            std::process::id()
        ));
        let prepared = self.prepare_import(&rm.manifest, &id, &tmp)?;
        check_files(&prepared.manifest, &rm, remote, snap)?;
        std::fs::create_dir(&tmp)
            .map_err(|e| fsutil::io_error(&format!("creating {}", tmp.display()), e))?;
        let src = PullSource {
            local_files: self.local_files(),
            cache: Some(self.config().cache_dir().join("remote-chunks")),
        };
        let progress = Arc::new(Progress::default());
        let pulled = with_progress(
            "pulling",
            progress.clone(),
            r.pull_files(&rm, &tmp, &src, progress),
        )
        .await
        .map_err(map);
        let res = match pulled {
            Ok(report) => {
                crate::operations::stage("verifying and publishing");
                let engine = self
                    .me()
                    .ok_or_else(|| Error::internal("the engine is shutting down"))?;
                let t = tmp.clone();
                tokio::task::spawn_blocking(move || {
                    // The chunks were checked on arrival; the whole files are checked here.
                    engine.import_staged(&t, &prepared, false)
                })
                .await
                .map_err(|e| Error::internal(format!("the pull task failed: {e}")))?
                .map(|snapshot| Pulled {
                    snapshot,
                    pull: report,
                })
            }
            Err(e) => Err(e),
        };
        drop(claim);
        match res {
            Ok(p) => {
                info!(snapshot = %p.snapshot.id, remote, chunks = p.pull.chunks,
                      downloaded = p.pull.bytes_downloaded, "snapshot pulled");
                Ok(p)
            }
            Err(e) => {
                let _ = fsutil::remove_dir_durably(&tmp);
                Err(e)
            }
        }
    }

    /// Deletes the chunks of remote `remote` that no snapshot references and that are older than
    /// `grace` (see kiln_remote's gc for why that is safe against a push running meanwhile).
    pub async fn gc_remote(
        &self,
        remote: &str,
        grace: Duration,
        dry_run: bool,
    ) -> Result<GcReport> {
        let r = self.open_remote(remote)?;
        let report = r.gc(grace, dry_run).await.map_err(map)?;
        info!(
            remote,
            deleted = report.deleted,
            bytes = report.deleted_bytes,
            dry_run,
            "remote gc"
        );
        Ok(report)
    }

    /// This host's template files by checksum: a pull copies them instead of downloading.
    fn local_files(&self) -> HashMap<String, PathBuf> {
        let mut out = HashMap::new();
        for info in self.images().list().unwrap_or_default() {
            let Ok(image) = self.images().get(&info.name) else {
                continue;
            };
            let f = &image.manifest.files;
            out.insert(format!("sha256:{}", f.rootfs.sha256), image.rootfs.clone());
            out.insert(format!("sha256:{}", f.kernel.sha256), image.kernel.clone());
            out.insert(format!("sha256:{}", f.initrd.sha256), image.initrd.clone());
            if let (Some(d), Some(p)) = (&f.vmlinux, &image.vmlinux) {
                out.insert(format!("sha256:{}", d.sha256), p.clone());
            }
        }
        out
    }
}

fn remote_not_found(name: &str) -> Error {
    Error::new(
        ErrorCode::RemoteNotFound,
        format!("no remote named '{}' (`kiln remote list` shows them; `kiln remote add NAME URL` adds one)", name.escape_debug()),
    )
}

/// The remote's file list must be exactly the manifest's own files (names, sizes, checksums).
fn check_files(
    m: &Manifest,
    rm: &kiln_remote::RemoteManifest,
    remote: &str,
    snap: &str,
) -> Result<()> {
    let bad = |why: String| {
        Error::new(
            ErrorCode::SnapshotCorrupt,
            format!("remote {remote}: snapshot {snap} is not consistent ({why}); nothing was pulled (push it again)"),
        )
    };
    let own: Vec<_> = m.files.iter().filter(|f| !f.external).collect();
    if own.len() != rm.files.len() {
        return Err(bad(format!(
            "its manifest names {} files, the remote has {}",
            own.len(),
            rm.files.len()
        )));
    }
    for f in own {
        let found = rm
            .files
            .iter()
            .filter(|r| r.name == f.path && r.size == f.size && r.checksum == f.checksum)
            .count();
        if found != 1 {
            return Err(bad(format!(
                "file {} is not there once with its size and checksum",
                f.path
            )));
        }
    }
    Ok(())
}

/// Runs `work`, recording its progress as the operation's stage twice a second.
async fn with_progress<T>(
    what: &str,
    progress: Arc<Progress>,
    work: impl std::future::Future<Output = T>,
) -> T {
    tokio::pin!(work);
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            out = &mut work => return out,
            _ = tick.tick() => {
                let (done, total, sent) = progress.snapshot();
                crate::operations::stage(&format!("{what} {done}/{total} bytes ({sent} transferred)"));
            }
        }
    }
}
