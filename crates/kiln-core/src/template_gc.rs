//! Upkeep of template snapshots (template_snap.rs): stale ones go once nothing uses them, and a daemon
//! does not re-hash a template snapshot's GiBs at every start.
//!
//! A template snapshot is *stale* when its template is gone or no longer has that content (a rebuilt
//! image, another QEMU: its id is not the one a create would use now). It is *used* while a sandbox was
//! resumed from it (a diff snapshot of that sandbox builds on it) or a diff snapshot builds on it. Stale
//! and unused ones are deleted at daemon start and whenever a sandbox or snapshot made from one goes; the
//! copy in the shared store goes with them (other daemons keep their own hard links).

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::engine::Engine;
use crate::fsutil;
use crate::layout::Origin;
use crate::snapshot::manifest::Manifest;
use crate::template_snap::{Shape, LABEL};

/// Label with the shape a template snapshot was made for (`memory max cpus`, max `-` when none), so its
/// current id can be computed again.
pub(crate) const SHAPE_LABEL: &str = "kiln.template-shape";
/// Per file of a deep-verified template snapshot: what it looked like then (snapshot directory).
const STAT_RECORD: &str = ".verified-stat.json";

pub(crate) fn shape_label(shape: Shape) -> String {
    format!(
        "{} {} {}",
        shape.memory_mib,
        shape
            .max_memory_mib
            .map_or_else(|| "-".to_string(), |m| m.to_string()),
        shape.cpus
    )
}

pub(crate) fn parse_shape(label: &str) -> Option<Shape> {
    let mut it = label.split_whitespace();
    let memory_mib = it.next()?.parse().ok()?;
    let max_memory_mib = match it.next()? {
        "-" => None,
        m => Some(m.parse().ok()?),
    };
    let cpus = it.next()?.parse().ok()?;
    Some(Shape {
        memory_mib,
        max_memory_mib,
        cpus,
    })
}

/// One GC at a time: deletions it makes trigger no second one.
static RUNNING: AtomicBool = AtomicBool::new(false);

impl Engine {
    /// Whether template snapshot `id` of `labels` is not the one a create would resume now.
    fn template_snapshot_stale(&self, id: &str, labels: &BTreeMap<String, String>) -> bool {
        let Some(template) = labels.get(LABEL) else {
            return false;
        };
        // Made before the shape was recorded: its current id cannot be told, so it goes when unused (a
        // create makes or imports the current one again).
        let Some(shape) = labels.get(SHAPE_LABEL).and_then(|s| parse_shape(s)) else {
            return true;
        };
        match self.template_snapshot_id(template, shape) {
            Ok(current) => current != id,
            // The template is gone.
            Err(_) => true,
        }
    }

    /// Deletes stale template snapshots nothing uses any more (see the module comment).
    pub(crate) async fn remove_stale_template_snapshots(&self) {
        if RUNNING.swap(true, Ordering::SeqCst) {
            return;
        }
        let snaps = self.db().list_snapshots().unwrap_or_default();
        let sandboxes = self.db().list_sandboxes().unwrap_or_default();
        // Warm spares are no users: deleting the snapshot discards them.
        let used: std::collections::HashSet<String> = sandboxes
            .iter()
            .filter(|sb| !crate::warm::is_spare(sb))
            .filter_map(|sb| match self.db().layout(&sb.id) {
                Ok(Some(l)) => match l.origin {
                    Origin::Snapshot { id } => Some(id),
                    Origin::Template { .. } => None,
                },
                _ => None,
            })
            .collect();
        for snap in snaps {
            if !snap.labels.contains_key(LABEL)
                || used.contains(&snap.id)
                || !self.template_snapshot_stale(&snap.id, &snap.labels)
                || !self
                    .db()
                    .snapshot_children(&snap.id)
                    .unwrap_or_default()
                    .is_empty()
            {
                continue;
            }
            let template = snap.labels.get(LABEL).cloned().unwrap_or_default();
            match self.delete_snapshot(&snap.id).await {
                Ok(_) => {
                    info!(snapshot = %snap.id, template = %template, "stale template snapshot removed");
                    self.remove_shared_template_snapshot(&template, &snap.id)
                        .await;
                }
                Err(e) => {
                    warn!(snapshot = %snap.id, error = %e, "could not remove a stale template snapshot")
                }
            }
        }
        RUNNING.store(false, Ordering::SeqCst);
    }

    /// Removes the shared store's copy of a stale template snapshot, under its file lock (no daemon is
    /// linking it then); daemons that imported it keep their own links.
    async fn remove_shared_template_snapshot(&self, template: &str, id: &str) {
        let store = self.template_store(template);
        let shared = store.join(id);
        if !shared.exists() {
            return;
        }
        let Ok(_lock) = crate::template_snap::lock_file(store.join(format!(".lock-{id}"))).await
        else {
            return;
        };
        let trash = store.join(format!(".trash-{id}-{}", std::process::id()));
        let removed = fsutil::rename_durably(&shared, &trash)
            .and_then(|()| fsutil::remove_dir_durably(&trash));
        if let Err(e) = removed {
            warn!(snapshot = id, error = %e, "could not remove a stale shared template snapshot");
        }
        let _ = fsutil::remove_file_durably(&store.join(format!(".lock-{id}")));
    }

    /// The snapshot sandbox `id` was resumed from, if any (recorded in its layout).
    pub(crate) fn template_base_of(&self, id: &str) -> Option<String> {
        match self.db().layout(id).ok().flatten()?.origin {
            Origin::Snapshot { id } => Some(id),
            Origin::Template { .. } => None,
        }
    }

    /// Runs the GC in the background when `origin` (a deleted sandbox's or diff's base) may have been the
    /// last user of a template snapshot.
    pub(crate) fn template_user_gone(&self, base: Option<&str>) {
        if !base.is_some_and(|b| b.starts_with("template-")) {
            return;
        }
        if let Some(engine) = self.me() {
            tokio::spawn(async move { engine.remove_stale_template_snapshots().await });
        }
    }
}

#[derive(Serialize, Deserialize, PartialEq, Eq)]
struct FileStat {
    size: u64,
    mtime_ns: i128,
    ino: u64,
    dev: u64,
}

fn stat_of(path: &Path) -> Option<FileStat> {
    let m = std::fs::metadata(path).ok()?;
    Some(FileStat {
        size: m.len(),
        mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
        ino: m.ino(),
        dev: m.dev(),
    })
}

fn stats(dir: &Path, m: &Manifest) -> Option<BTreeMap<String, FileStat>> {
    m.files
        .iter()
        .map(|f| Some((f.path.clone(), stat_of(&m.resolve(dir, f))?)))
        .collect()
}

/// Whether the files of the template snapshot in `dir` are the very files a deep verification of it
/// recorded (same inode, size and modification time): then their checksums need not be read again.
pub(crate) fn unchanged_since_verified(dir: &Path, m: &Manifest) -> bool {
    let Ok(bytes) = std::fs::read(dir.join(STAT_RECORD)) else {
        return false;
    };
    let Ok(recorded) = serde_json::from_slice::<BTreeMap<String, FileStat>>(&bytes) else {
        return false;
    };
    stats(dir, m).is_some_and(|now| now == recorded)
}

/// Records what the files of a just deep-verified template snapshot look like.
pub(crate) fn record_verified(dir: &Path, m: &Manifest) {
    let Some(now) = stats(dir, m) else { return };
    let Ok(bytes) = serde_json::to_vec(&now) else {
        return;
    };
    if let Err(e) = fsutil::write_atomic(&dir.join(STAT_RECORD), &bytes) {
        warn!(snapshot = %m.id, error = %e, "could not record the verified template snapshot");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_round_trip_through_their_label() {
        for shape in [
            Shape {
                memory_mib: 256,
                max_memory_mib: None,
                cpus: 1,
            },
            Shape {
                memory_mib: 512,
                max_memory_mib: Some(2048),
                cpus: 4,
            },
        ] {
            assert_eq!(parse_shape(&shape_label(shape)), Some(shape));
        }
        assert_eq!(parse_shape("256 x 1"), None);
        assert_eq!(parse_shape(""), None);
    }
}
