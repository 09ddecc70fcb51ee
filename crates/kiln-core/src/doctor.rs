//! `kiln doctor`: checks that the state database, the data directory and the running QEMU processes agree,
//! and with `repair` fixes what can be fixed without losing anything (files that belong to nothing are
//! moved to `lost+found`, not deleted). It runs inside the daemon, which holds the per-sandbox locks:
//! sandboxes busy with an operation are skipped rather than judged mid-change.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;
use tracing::{info, warn};
use utoipa::ToSchema;

use crate::engine::Engine;
use crate::error::Result;
use crate::model::{now_rfc3339, Sandbox, SandboxState};
use crate::snapshot::delete::SnapshotDebris;
use crate::snapshot::manifest::Manifest;
use crate::vm::vm_name;

/// One inconsistency.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Problem {
    /// Stable kind: `stray_qemu`, `sandbox_dir_missing`, `vm_gone`, `orphan_sandbox_dir`,
    /// `snapshot_damaged`, `snapshot_unrecorded`, `snapshot_debris`, `network_leftover`.
    pub kind: String,
    /// The sandbox, snapshot, path or process concerned.
    pub subject: String,
    /// What is wrong, in words.
    pub message: String,
    /// What repair does (or did) about it.
    pub repair: String,
    /// Whether this run fixed it.
    pub repaired: bool,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct DoctorReport {
    /// True when nothing is wrong (or everything found was repaired).
    pub ok: bool,
    /// Whether this run repaired (`POST /v1/doctor/repair`) or only looked.
    pub repair: bool,
    pub sandboxes_checked: usize,
    pub snapshots_checked: usize,
    /// Sandboxes skipped because an operation on them was in progress.
    pub skipped_busy: Vec<String>,
    pub problems: Vec<Problem>,
}

impl Engine {
    /// Checks (and with `repair`, fixes) the data directory. `deep` also verifies snapshot checksums.
    pub async fn doctor(&self, repair: bool, deep: bool) -> Result<DoctorReport> {
        let mut problems = Vec::new();
        let mut skipped_busy = Vec::new();
        let rows: HashMap<String, Sandbox> = self
            .db()
            .list_sandboxes()?
            .into_iter()
            .map(|s| (s.id.clone(), s))
            .collect();

        self.check_processes(&rows, repair, &mut problems).await;
        for sb in rows.values() {
            if matches!(sb.state, SandboxState::Creating | SandboxState::Deleting) {
                continue; // another operation owns it right now; start-up settles interrupted ones
            }
            let slot = self.slot(&sb.id);
            let Ok(_guard) = slot.op.clone().try_write_owned() else {
                skipped_busy.push(sb.name.clone());
                continue;
            };
            let Some(sb) = self.db().find_sandbox(&sb.id)? else {
                continue;
            };
            if let Some(p) = self.check_sandbox(&sb, repair).await? {
                problems.push(p);
            }
        }
        self.check_orphan_dirs(&rows, repair, &mut problems);
        self.check_net_leftovers(&rows, &mut problems);
        let snapshots_checked = self.check_snapshots(repair, deep, &mut problems)?;
        for p in &problems {
            warn!(kind = %p.kind, subject = %p.subject, repaired = p.repaired, "doctor: {}", p.message);
        }
        Ok(DoctorReport {
            ok: problems.iter().all(|p| p.repaired),
            repair,
            sandboxes_checked: rows.len(),
            snapshots_checked,
            skipped_busy,
            problems,
        })
    }

    /// kiln's TAP devices no VM of a sandbox accounts for, and bridged rules on a user-mode daemon. A TAP
    /// lives as long as the QEMU holding it, so repairing the stray QEMU (`stray_qemu`) removes it.
    fn check_net_leftovers(&self, rows: &HashMap<String, Sandbox>, problems: &mut Vec<Problem>) {
        for (tap, owner) in crate::net::taps() {
            let accounted = rows.get(&owner).is_some_and(|sb| {
                sb.state.has_vm()
                    || matches!(sb.state, SandboxState::Creating | SandboxState::Deleting)
            });
            if !accounted {
                problems.push(Problem {
                    kind: "network_leftover".into(),
                    subject: tap.clone(),
                    message: format!("TAP device {tap} belongs to '{owner}', which has no VM here"),
                    repair: "none: it goes with the QEMU process holding it (see stray_qemu)"
                        .into(),
                    repaired: false,
                });
            }
        }
        if self.bridge().is_none() && crate::net::rules_installed() {
            problems.push(Problem {
                kind: "network_leftover".into(),
                subject: "iptables".into(),
                message: "bridged networking's rules (KILN-NET-*) are installed but the daemon runs on user networking".into(),
                repair: "none: a daemon started on user networking removes them once no TAP is left".into(),
                repaired: false,
            });
        }
    }

    /// QEMU processes of this data directory that no sandbox accounts for.
    async fn check_processes(
        &self,
        rows: &HashMap<String, Sandbox>,
        repair: bool,
        problems: &mut Vec<Problem>,
    ) {
        let dir = self.config().sandboxes_dir().to_string_lossy().into_owned();
        for (pid, name) in kiln_vmm::process::find_named("kiln-", &format!("{dir}/")) {
            let id = name.trim_start_matches("kiln-");
            let owner = rows.get(id);
            // A sandbox being created or changed may not have recorded its new pid yet.
            if owner.is_some_and(|sb| {
                sb.pid == Some(pid)
                    || matches!(sb.state, SandboxState::Creating | SandboxState::Deleting)
                    || self.slot(&sb.id).op.try_write().is_err()
            }) {
                continue;
            }
            let message = match owner {
                Some(sb) => format!(
                    "QEMU process {pid} ({name}) runs for sandbox {} but that sandbox records {}",
                    sb.name,
                    sb.pid
                        .map_or("no process".to_string(), |p| format!("process {p}"))
                ),
                None => {
                    format!("QEMU process {pid} ({name}) belongs to no sandbox in the database")
                }
            };
            if repair {
                kiln_vmm::process::terminate(pid, &name, Duration::from_secs(3)).await;
                info!(pid, %name, "doctor: terminated a stray QEMU process");
            }
            problems.push(Problem {
                kind: "stray_qemu".into(),
                subject: format!("pid {pid}"),
                message,
                repair: "terminate the process (SIGTERM, then SIGKILL)".into(),
                repaired: repair && !kiln_vmm::process::is_running(pid),
            });
        }
    }

    /// One sandbox, with its lifecycle lock held.
    async fn check_sandbox(&self, sb: &Sandbox, repair: bool) -> Result<Option<Problem>> {
        let dir = self.config().sandbox_dir(&sb.id);
        let name = vm_name(&sb.id);
        let alive = sb
            .pid
            .is_some_and(|pid| kiln_vmm::process::is_our_qemu(pid, &name));
        if !dir.is_dir() && sb.state != SandboxState::Failed {
            let reason = format!(
                "its directory {} is missing (disk and memory are gone); delete the sandbox",
                dir.display()
            );
            if repair {
                if let Some(vm) = self.slot(&sb.id).vm.lock().await.take() {
                    vm.terminate().await;
                } else if let Some(pid) = sb.pid.filter(|_| alive) {
                    kiln_vmm::process::terminate(pid, &name, Duration::from_secs(3)).await;
                }
                self.db()
                    .set_state(&sb.id, SandboxState::Failed, None, Some(&reason))?;
            }
            return Ok(Some(Problem {
                kind: "sandbox_dir_missing".into(),
                subject: sb.name.clone(),
                message: format!("sandbox {} ({}): {reason}", sb.name, sb.state.as_str()),
                repair: "stop its VM if any and mark it failed with this reason".into(),
                repaired: repair,
            }));
        }
        if sb.state == SandboxState::Failed && alive {
            // Left by an operation whose QEMU stopped answering (deadline.rs): end that QEMU.
            let pid = sb.pid.unwrap_or(0);
            if repair {
                *self.slot(&sb.id).vm.lock().await = None;
                kiln_vmm::process::terminate(pid, &name, Duration::from_secs(3)).await;
            }
            return Ok(Some(Problem {
                kind: "failed_vm_running".into(),
                subject: sb.name.clone(),
                message: format!(
                    "sandbox {} is failed ({}) but its QEMU process {pid} still exists",
                    sb.name,
                    sb.error.as_deref().unwrap_or("no reason recorded")
                ),
                repair: "terminate the process (SIGTERM, then SIGKILL); the sandbox stays failed: delete it".into(),
                repaired: repair && !kiln_vmm::process::is_running(pid),
            }));
        }
        if sb.state.has_vm() && !alive {
            let mut repair_note = "mark it failed (or stopped, if a hibernation had finished)";
            if repair {
                *self.slot(&sb.id).vm.lock().await = None;
                if self.settle_dead_vm(&sb.id, "while kiln was running")? == SandboxState::Stopped {
                    repair_note = "marked stopped: its hibernation had finished";
                }
            }
            return Ok(Some(Problem {
                kind: "vm_gone".into(),
                subject: sb.name.clone(),
                message: format!(
                    "sandbox {} is recorded as {} but its QEMU process{} is gone",
                    sb.name,
                    sb.state.as_str(),
                    sb.pid.map(|p| format!(" {p}")).unwrap_or_default()
                ),
                repair: repair_note.into(),
                repaired: repair,
            }));
        }
        Ok(None)
    }

    /// Sandbox directories with no database row.
    fn check_orphan_dirs(
        &self,
        rows: &HashMap<String, Sandbox>,
        repair: bool,
        problems: &mut Vec<Problem>,
    ) {
        for entry in std::fs::read_dir(self.config().sandboxes_dir())
            .into_iter()
            .flatten()
            .flatten()
        {
            let name = entry.file_name().to_string_lossy().into_owned();
            // Re-read: a sandbox created since the list was taken has its row before its directory.
            if rows.contains_key(&name) || !matches!(self.db().find_sandbox(&name), Ok(None)) {
                continue;
            }
            let (repaired, repair_note) = if repair {
                match self.to_lost_found("sandboxes", &entry.path(), &name) {
                    Ok(dest) => (true, format!("moved to {}", dest.display())),
                    Err(e) => (false, format!("could not move it: {e}")),
                }
            } else {
                (false, "move it to lost+found in the data directory".into())
            };
            problems.push(Problem {
                kind: "orphan_sandbox_dir".into(),
                subject: entry.path().display().to_string(),
                message: format!(
                    "directory {} belongs to no sandbox in the database",
                    entry.path().display()
                ),
                repair: repair_note,
                repaired,
            });
        }
    }

    /// Snapshot records whose files are missing or damaged, and snapshot directories without a record.
    fn check_snapshots(
        &self,
        repair: bool,
        deep: bool,
        problems: &mut Vec<Problem>,
    ) -> Result<usize> {
        let snapshots = self.db().list_snapshots()?;
        for snap in &snapshots {
            let dir = self.config().snapshot_dir(&snap.id);
            let Err(e) = Manifest::read(&dir, &snap.id).and_then(|m| m.verify(&dir, deep)) else {
                continue;
            };
            let children = self.db().snapshot_children(&snap.id)?;
            let (repaired, repair_note) = if !children.is_empty() {
                (
                    false,
                    format!(
                        "not repaired: diff snapshots {} build on it; delete them, then run repair again",
                        children.join(", ")
                    ),
                )
            } else if repair {
                let moved = if dir.exists() {
                    self.to_lost_found("snapshots", &dir, &snap.id).map(Some)
                } else {
                    Ok(None)
                };
                match moved {
                    Ok(dest) => {
                        self.db().delete_snapshot(&snap.id)?;
                        self.forget_verified(&snap.id);
                        let place = dest
                            .map(|d| format!("; its files are in {}", d.display()))
                            .unwrap_or_default();
                        (true, format!("removed the unusable snapshot{place}"))
                    }
                    Err(e) => (false, format!("could not move its files: {e}")),
                }
            } else {
                (
                    false,
                    "remove the snapshot record and move its files to lost+found".into(),
                )
            };
            problems.push(Problem {
                kind: "snapshot_damaged".into(),
                subject: snap.id.clone(),
                message: format!("snapshot {} cannot be restored: {}", snap.id, e.message),
                repair: repair_note,
                repaired,
            });
        }
        for d in self.snapshot_debris(true) {
            // A capture moves its directory into place and then records it, holding the source's lock.
            let _source_guard = match &d {
                SnapshotDebris::Unrecorded(_, m) => {
                    match self.slot(&m.source.sandbox_id).op.clone().try_write_owned() {
                        Ok(g) => Some(g),
                        Err(_) => continue,
                    }
                }
                _ => None,
            };
            let (kind, subject, message, note) = match &d {
                SnapshotDebris::Interrupted(p) => (
                    "snapshot_debris",
                    p,
                    format!(
                        "{} is left over from an interrupted snapshot operation",
                        p.display()
                    ),
                    "remove it",
                ),
                SnapshotDebris::Unrecorded(p, _) => (
                    "snapshot_unrecorded",
                    p,
                    format!("{} is a complete snapshot without a record", p.display()),
                    "record it",
                ),
                SnapshotDebris::Incomplete(p, e) => (
                    "snapshot_debris",
                    p,
                    format!("{} is an unrecorded, incomplete snapshot: {e}", p.display()),
                    "move it to lost+found in the data directory",
                ),
            };
            let subject = subject.display().to_string();
            if repair {
                self.clean_debris(&d);
            }
            problems.push(Problem {
                kind: kind.into(),
                subject,
                message,
                repair: note.into(),
                repaired: repair,
            });
        }
        Ok(snapshots.len())
    }

    /// Moves `path` to `lost+found/<kind>/<name>-<time>`; returns where it went.
    pub(crate) fn to_lost_found(
        &self,
        kind: &str,
        path: &Path,
        name: &str,
    ) -> std::io::Result<PathBuf> {
        let dir = self.config().lost_found_dir().join(kind);
        std::fs::create_dir_all(&dir)?;
        let stamp = now_rfc3339().replace(':', "");
        let dest = dir.join(format!("{name}-{stamp}"));
        std::fs::rename(path, &dest)?;
        // Durable: a repair that a power cut undoes would be found (and "repaired") again.
        std::fs::File::open(&dir)?.sync_all()?;
        if let Some(parent) = path.parent() {
            std::fs::File::open(parent)?.sync_all()?;
        }
        Ok(dest)
    }
}
