//! Deleting snapshots, and cleaning up snapshot directories an interrupted capture or deletion left.

use serde::Serialize;
use tracing::{info, warn};
use utoipa::ToSchema;

use super::manifest::Manifest;
use crate::engine::Engine;
use crate::error::{Error, ErrorCode, Result};
use crate::fsutil;
use crate::model::SandboxState;

/// Result of deleting a snapshot.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct SnapshotDeleted {
    pub id: String,
    /// Sandboxes still running on this snapshot's memory or disk; its files stay until the last is gone.
    pub files_kept_for: Vec<String>,
}

impl Engine {
    /// Deletes a snapshot. Refused while diff snapshots build on it; sandboxes resumed from it keep
    /// running on their own hard links to its files (reported in the answer).
    pub async fn delete_snapshot(&self, id_or_name: &str) -> Result<SnapshotDeleted> {
        self.delete_snapshot_with(id_or_name, false).await
    }

    /// `delete_snapshot`; with `unless_restored` (smolvm's rule) also refused while a sandbox rolled back
    /// to it is running or paused.
    pub async fn delete_snapshot_with(
        &self,
        id_or_name: &str,
        unless_restored: bool,
    ) -> Result<SnapshotDeleted> {
        let snap = self.get_snapshot(id_or_name)?;
        let id = snap.id.as_str();
        // Refused while a diff is being built on it or it is being resumed or restored; diffs being built
        // or resumes starting after this see it as deleted.
        let _deleting = self.claim_delete(id)?;
        if unless_restored {
            // No restore can start or be under way now (the delete claim excludes them).
            let live = self.db().list_sandboxes()?.into_iter().find(|s| {
                s.restored_from.as_deref() == Some(id)
                    && matches!(s.state, SandboxState::Running | SandboxState::Paused)
            });
            if let Some(sb) = live {
                return Err(Error::new(
                    ErrorCode::SnapshotInUse,
                    format!(
                        "snapshot {id} is restored into sandbox {}, which is {}; stop and delete {} first",
                        sb.name,
                        sb.state.as_str(),
                        sb.name
                    ),
                ));
            }
        }
        self.discard_spares(Some(id)).await;
        let users: Vec<String> = self
            .db()
            .list_sandboxes()?
            .into_iter()
            .filter(|s| {
                s.origin == format!("snapshot:{id}") || s.restored_from.as_deref() == Some(id)
            })
            .map(|s| s.name)
            .collect();
        let dir = self.config().snapshot_dir(id);
        let trash = self
            .config()
            .snapshots_dir()
            .join(format!(".trash-{id}-{}", std::process::id()));
        if dir.exists() {
            fsutil::rename_durably(&dir, &trash)?;
        }
        self.faults().hold("snapshot.deleting").await;
        self.db().delete_snapshot(&snap.id)?;
        let _ = fsutil::remove_dir_durably(&trash);
        self.forget_verified(id);
        info!(snapshot = id, kept_for = users.len(), "snapshot deleted");
        self.template_user_gone(snap.template_snapshot.as_deref());
        Ok(SnapshotDeleted {
            id: snap.id,
            files_kept_for: users,
        })
    }

    /// Snapshot directories that are not (or no longer) whole, recorded snapshots: half-written ones
    /// (`.tmp-*`), interrupted deletions (`.trash-*`), fork captures (marked ephemeral), and directories
    /// without a record. With `skip_own` (a running daemon looking at itself), work in progress of this
    /// process and fork captures (which their fork removes) are left out.
    pub(crate) fn snapshot_debris(&self, skip_own: bool) -> Vec<SnapshotDebris> {
        let own = format!("-{}", std::process::id());
        let mut out = Vec::new();
        for entry in std::fs::read_dir(self.config().snapshots_dir())
            .into_iter()
            .flatten()
            .flatten()
        {
            let name = entry.file_name().to_string_lossy().into_owned();
            let path = entry.path();
            if name.starts_with(".tmp-") || name.starts_with(".trash-") {
                if !(skip_own && name.ends_with(&own)) {
                    out.push(SnapshotDebris::Interrupted(path));
                }
                continue;
            }
            if path.join(crate::recovery::EPHEMERAL_MARK).exists() {
                if !skip_own {
                    out.push(SnapshotDebris::Interrupted(path));
                }
                continue;
            }
            if matches!(self.db().find_snapshot(&name), Ok(None)) {
                let checked =
                    Manifest::read(&path, &name).and_then(|m| m.verify(&path, true).map(|()| m));
                out.push(match checked {
                    Ok(m) => SnapshotDebris::Unrecorded(path, Box::new(m)),
                    Err(e) => SnapshotDebris::Incomplete(path, e.message),
                });
            }
        }
        out
    }

    pub(crate) fn clean_debris(&self, d: &SnapshotDebris) {
        match d {
            SnapshotDebris::Interrupted(path) => {
                // The row goes too: a deletion (`.trash-ID-PID`) was past its point of no return, and a
                // fork capture's children hold their own links to its files.
                let name = path
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                let recorded = match name.strip_prefix(".trash-") {
                    Some(rest) => rest.rsplit_once('-').map(|(id, _pid)| id.to_string()),
                    None if path.join(crate::recovery::EPHEMERAL_MARK).exists() => Some(name),
                    None => None,
                };
                if let Some(id) = recorded {
                    if let Err(e) = self.db().delete_snapshot(&id) {
                        warn!(snapshot = %id, error = %e, "could not remove the record of a snapshot being deleted");
                    }
                }
                warn!(path = %path.display(), "removing debris of an interrupted snapshot operation");
                let _ = fsutil::remove_dir_durably(path);
            }
            SnapshotDebris::Unrecorded(path, m) => {
                let snap = crate::recovery::snapshot_from_manifest(m, path);
                if self.db().insert_snapshot(&snap, false).is_ok() {
                    info!(snapshot = %m.id, "recorded a snapshot completed just before kiln stopped");
                }
            }
            SnapshotDebris::Incomplete(path, error) => {
                // Not provably worthless (it may be the only copy of something): quarantined, not deleted.
                let name = path
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                match self.to_lost_found("snapshots", path, &name) {
                    Ok(dest) => {
                        warn!(path = %path.display(), to = %dest.display(), %error, "moved an unrecorded snapshot that fails verification to lost+found")
                    }
                    Err(e) => {
                        warn!(path = %path.display(), %error, move_error = %e, "an unrecorded snapshot fails verification and could not be moved to lost+found; left in place")
                    }
                }
            }
        }
    }
}

/// A snapshot directory without a record.
pub(crate) enum SnapshotDebris {
    /// `.tmp-*` / `.trash-*`: a capture or deletion that did not finish.
    Interrupted(std::path::PathBuf),
    /// Complete and intact: moved into place just before kiln stopped, so it gets recorded.
    Unrecorded(std::path::PathBuf, Box<Manifest>),
    /// Fails its checks; the error says how.
    Incomplete(std::path::PathBuf, String),
}
