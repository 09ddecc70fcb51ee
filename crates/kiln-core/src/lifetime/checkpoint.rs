//! Continuous checkpoints (issue 16): a per-sandbox policy takes a memory snapshot every `every` seconds
//! in the background, keeps the newest `keep`, and `rewind` rolls the sandbox back to one of them (the
//! restore into its own identity). For a sandbox running from a snapshot's RAM (a resumed copy, a fork
//! child, a rolled-back or rewound sandbox, a create from a template snapshot) a checkpoint is a memory
//! delta plus a RAM-less state, so it pauses the guest for milliseconds and costs about what the guest
//! changed; a booted sandbox owning its RAM file copies that file each time.
//!
//! The policy is in SQLite (it survives a restart); the time of the last checkpoint is the newest
//! checkpoint's `created_at`. A checkpoint is a full snapshot labelled [`LABEL`] = sandbox id, so nothing
//! depends on another; pruning deletes the oldest beyond `keep` unless something depends on it (a diff
//! snapshot, then it stays and is tried again later).

use std::collections::BTreeMap;
use std::sync::{Arc, Weak};
use std::time::Duration;

use rusqlite::{params, OptionalExtension};
use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};
use utoipa::ToSchema;

use super::now_ms;
use crate::db::Db;
use crate::engine::Engine;
use crate::error::{Error, ErrorCode, Result};
use crate::model::SandboxState;
use crate::snapshot::capture::CreateSnapshot;
use crate::snapshot::{CreateSnapshotInternal, Snapshot, SnapshotType};

/// Label (value: the sandbox id) kiln gives the snapshots its checkpoint policy takes.
pub const LABEL: &str = "kiln.checkpoint";
/// Shortest interval.
pub const MIN_EVERY_SECS: u64 = 1;
/// Most checkpoints one sandbox keeps.
pub const MAX_KEEP: u32 = 1000;
/// Default `keep` when only `every` is given.
pub const DEFAULT_KEEP: u32 = 10;
/// The scheduler looks again at least this often.
const MAX_SLEEP: Duration = Duration::from_secs(5);
/// A checkpoint that could not be taken (busy sandbox, failure) is tried again this much later.
const RETRY_MS: i64 = 1_000;

/// A sandbox's checkpoint policy (in `GET /v1/sandboxes/{id}` as `checkpoint_policy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct CheckpointPolicy {
    /// Seconds between checkpoints.
    pub every: u64,
    /// How many checkpoints are kept (the oldest beyond are deleted unless a snapshot depends on them).
    pub keep: u32,
}

/// `PUT /v1/sandboxes/{id}/checkpoint-policy`: `every` 0 (or `DELETE`) removes the policy; the
/// sandbox's checkpoints stay.
#[derive(Debug, Clone, Copy, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetCheckpointPolicy {
    /// Seconds between checkpoints (0: no policy).
    pub every: u64,
    /// Checkpoints kept (default 10).
    pub keep: Option<u32>,
}

/// `POST /v1/sandboxes/{id}/rewind`.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Rewind {
    /// A checkpoint (or any memory snapshot of this sandbox) by id or name; or a time: RFC 3339, or
    /// `90s`/`5m`/`2h` ago — the newest checkpoint taken at or before it.
    pub to: String,
}

impl SetCheckpointPolicy {
    fn policy(&self) -> Result<Option<CheckpointPolicy>> {
        if self.every == 0 {
            return Ok(None);
        }
        if self.every > super::MAX_SECS {
            return Err(Error::invalid(format!(
                "checkpoint interval must be at most {} seconds; 0 removes the policy",
                super::MAX_SECS
            )));
        }
        let keep = self.keep.unwrap_or(DEFAULT_KEEP);
        if keep == 0 || keep > MAX_KEEP {
            return Err(Error::invalid(format!(
                "keep must be from 1 to {MAX_KEEP} checkpoints"
            )));
        }
        Ok(Some(CheckpointPolicy {
            every: self.every.max(MIN_EVERY_SECS),
            keep,
        }))
    }
}

impl Db {
    pub(crate) fn checkpoint_policy(&self, id: &str) -> Result<Option<CheckpointPolicy>> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT every_secs, keep FROM checkpoint_policies WHERE sandbox_id = ?1",
        )?;
        Ok(stmt
            .query_row([id], |r| {
                Ok(CheckpointPolicy {
                    every: r.get(0)?,
                    keep: r.get(1)?,
                })
            })
            .optional()?)
    }

    fn checkpoint_policies(&self) -> Result<Vec<(String, CheckpointPolicy)>> {
        let conn = self.conn();
        let mut stmt =
            conn.prepare_cached("SELECT sandbox_id, every_secs, keep FROM checkpoint_policies")?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                CheckpointPolicy {
                    every: r.get(1)?,
                    keep: r.get(2)?,
                },
            ))
        })?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    }

    fn put_checkpoint_policy(&self, id: &str, p: Option<CheckpointPolicy>) -> Result<()> {
        let conn = self.conn();
        match p {
            Some(p) => conn.execute(
                "INSERT INTO checkpoint_policies (sandbox_id, every_secs, keep) VALUES (?1, ?2, ?3)
                 ON CONFLICT(sandbox_id) DO UPDATE SET every_secs = ?2, keep = ?3",
                params![id, p.every, p.keep],
            )?,
            None => conn.execute(
                "DELETE FROM checkpoint_policies WHERE sandbox_id = ?1",
                [id],
            )?,
        };
        Ok(())
    }
}

/// Parses `90s`, `5m`, `2h` (seconds ago).
fn ago(s: &str) -> Option<u64> {
    let s = s.trim().strip_suffix(" ago").unwrap_or(s.trim());
    let (n, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit())?);
    let n: u64 = n.parse().ok()?;
    match unit {
        "s" => Some(n),
        "m" => n.checked_mul(60),
        "h" => n.checked_mul(3600),
        _ => None,
    }
}

impl Engine {
    /// A sandbox's checkpoints, oldest first.
    pub fn checkpoints(&self, sandbox: &str) -> Result<Vec<Snapshot>> {
        let sb = self.get(sandbox)?;
        let filter = BTreeMap::from([(LABEL.to_string(), sb.id.clone())]);
        let mut v = self.list_snapshots(Some(&sb.id), &filter)?;
        v.sort_by(|a, b| a.created_at.cmp(&b.created_at).then(a.id.cmp(&b.id)));
        Ok(v)
    }

    /// Sets or removes a sandbox's checkpoint policy, under its lifecycle lock.
    pub async fn set_checkpoint_policy(
        &self,
        sandbox: &str,
        req: SetCheckpointPolicy,
    ) -> Result<crate::Sandbox> {
        let policy = req.policy()?;
        let locked = self.lock_sandbox(sandbox).await?;
        self.db().put_checkpoint_policy(&locked.sb.id, policy)?;
        info!(sandbox = %locked.sb.id, ?policy, "checkpoint policy set");
        self.checkpoint_kick();
        self.get(&locked.sb.id)
    }

    /// On create: the policy asked for; a failure deletes the sandbox again (all or nothing).
    pub(crate) async fn checkpoint_policy_after_create(
        &self,
        sb: crate::Sandbox,
        every: Option<u64>,
        keep: Option<u32>,
    ) -> Result<crate::Sandbox> {
        let Some(every) = every.filter(|e| *e > 0) else {
            return Ok(sb);
        };
        let set = SetCheckpointPolicy { every, keep }
            .policy()
            .and_then(|p| self.db().put_checkpoint_policy(&sb.id, p));
        if let Err(e) = set {
            let _ = self.delete(&sb.id).await;
            return Err(e);
        }
        self.checkpoint_kick();
        let (notes, boot) = (sb.volume_notes.clone(), sb.boot.clone());
        let mut sb = self.get(&sb.id)?;
        sb.volume_notes = notes;
        sb.boot = boot;
        Ok(sb)
    }

    /// Checks a create request's checkpoint options before anything is made.
    pub(crate) fn check_checkpoint_options(every: Option<u64>, keep: Option<u32>) -> Result<()> {
        match every {
            Some(e) if e > 0 => SetCheckpointPolicy { every: e, keep }.policy().map(drop),
            _ if keep.is_some() => Err(Error::invalid(
                "keep needs a checkpoint interval (checkpoint_every / --checkpoint-every)",
            )),
            _ => Ok(()),
        }
    }

    /// Rolls a sandbox back to one of its checkpoints (or memory snapshots): restored into the same id
    /// and name, running. The checkpoints stay (a rewind can go forward again to a later one).
    pub async fn rewind(&self, sandbox: &str, req: Rewind) -> Result<crate::Sandbox> {
        let sb = self.get(sandbox)?;
        let to = req.to.trim();
        let when = chrono::DateTime::parse_from_rfc3339(to)
            .ok()
            .map(|t| t.timestamp_millis())
            .or_else(|| ago(to).map(|s| now_ms() - super::secs_to_ms(s)));
        let target = match when {
            Some(at) => {
                let list = self.checkpoints(&sb.id)?;
                list.into_iter()
                    .rfind(|s| created_ms(s).is_some_and(|c| c <= at))
                    .ok_or_else(|| {
                        Error::new(
                            ErrorCode::SnapshotNotFound,
                            format!("sandbox {} has no checkpoint taken at or before {to}; list them with `kiln sandbox checkpoints {}`", sb.name, sb.name),
                        )
                    })?
            }
            None => self.get_snapshot(to)?,
        };
        if target.sandbox_id != sb.id {
            return Err(Error::invalid(format!(
                "snapshot {} was taken of sandbox {}, not of {}; rewind goes back only to the sandbox's own snapshots (resume {} as a new sandbox instead)",
                target.id, target.sandbox_name, sb.name, target.id
            )));
        }
        if !target.kind.has_memory() {
            return Err(Error::invalid(format!(
                "snapshot {} is a disk snapshot; rewind needs a memory snapshot (a checkpoint)",
                target.id
            )));
        }
        info!(sandbox = %sb.id, snapshot = %target.id, "rewinding sandbox");
        self.restore_snapshot_again(&target.id, true).await
    }

    fn checkpoint_kick(&self) {
        self.life().checkpoint_notify.notify_one();
    }

    /// After a snapshot taken by hand: the checkpoint task compacts the sandbox's disk chain if it is
    /// long, in the background (the request does not wait for the stream).
    pub(crate) fn compact_soon(&self, id: &str) {
        self.life()
            .compact_pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.to_string());
        self.checkpoint_kick();
    }

    pub(crate) fn spawn_checkpointer(self: &Arc<Engine>) {
        let weak: Weak<Engine> = Arc::downgrade(self);
        let notify = self.life().checkpoint_notify.clone();
        tokio::spawn(async move {
            let mut retry: BTreeMap<String, i64> = BTreeMap::new();
            loop {
                let notified = notify.notified();
                let Some(engine) = weak.upgrade() else { return };
                let next = engine.checkpoint_round(&mut retry).await;
                drop(engine);
                let wait = (next - now_ms()).clamp(0, MAX_SLEEP.as_millis() as i64);
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(wait as u64)) => {}
                    _ = notified => {}
                }
            }
        });
    }

    /// Takes the checkpoints that are due and prunes; returns when to look again (unix ms).
    async fn checkpoint_round(&self, retry: &mut BTreeMap<String, i64>) -> i64 {
        let now = now_ms();
        let mut next = now + MAX_SLEEP.as_millis() as i64;
        let pending = std::mem::take(
            &mut *self
                .life()
                .compact_pending
                .lock()
                .unwrap_or_else(|p| p.into_inner()),
        );
        for id in pending {
            if !self.compact_after_checkpoint(&id).await {
                // Busy: tried again shortly.
                self.life()
                    .compact_pending
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(id);
                next = next.min(now_ms() + RETRY_MS);
            }
        }
        let policies = match self.db().checkpoint_policies() {
            Ok(p) => p,
            Err(e) => {
                warn!(error = %e, "checkpoints: cannot read the policies");
                return now + RETRY_MS;
            }
        };
        for (id, policy) in policies {
            let Ok(Some(sb)) = self.db().find_sandbox(&id) else {
                continue;
            };
            // Only a running guest changes; a paused or stopped one keeps its last checkpoint.
            if sb.state != SandboxState::Running {
                continue;
            }
            let last = self
                .checkpoints(&id)
                .ok()
                .and_then(|v| v.iter().filter_map(created_ms).max());
            let mut due = last.map_or(now, |t| t + super::secs_to_ms(policy.every));
            if let Some(r) = retry.get(&id).copied() {
                due = due.max(r);
            }
            if due > now {
                next = next.min(due);
                // A compaction skipped while the sandbox was busy is tried again between checkpoints.
                if !self.compact_after_checkpoint(&id).await {
                    next = next.min(now_ms() + RETRY_MS);
                }
                continue;
            }
            match self.take_checkpoint(&sb).await {
                Ok(snap) => {
                    retry.remove(&id);
                    info!(sandbox = %id, snapshot = %snap.id, pause_ms = ?snap.pause_ms, size_bytes = snap.size_bytes, "checkpoint taken");
                    self.prune_checkpoints(&id, policy.keep).await;
                    if !self.compact_after_checkpoint(&id).await {
                        next = next.min(now_ms() + RETRY_MS);
                    }
                    next = next.min(now_ms() + super::secs_to_ms(policy.every));
                }
                Err(e) if e.code == ErrorCode::SandboxBusy => {
                    debug!(sandbox = %id, "checkpoint skipped: an operation holds the sandbox");
                    retry.insert(id, now_ms() + RETRY_MS);
                    next = next.min(now_ms() + RETRY_MS);
                }
                Err(e) => {
                    warn!(sandbox = %id, error = %e.message, "checkpoint failed");
                    let later = now_ms() + super::secs_to_ms(policy.every).max(RETRY_MS);
                    retry.insert(id, later);
                    next = next.min(later);
                }
            }
        }
        next
    }

    async fn take_checkpoint(&self, sb: &crate::Sandbox) -> Result<Snapshot> {
        let ms = now_ms();
        let mut name = format!("ckpt-{}-{ms}", sb.name);
        if !crate::validate::is_valid_name(&name) {
            name = format!("ckpt-{}-{ms}", sb.id);
        }
        let req = CreateSnapshot {
            name: Some(name),
            kind: SnapshotType::Full,
            leave_paused: false,
            labels: BTreeMap::from([(LABEL.to_string(), sb.id.clone())]),
            ttl: None,
        };
        self.create_snapshot_internal(
            &sb.id,
            req,
            CreateSnapshotInternal {
                ephemeral: false,
                skip_if_busy: true,
            },
        )
        .await
    }

    /// Each checkpoint adds a disk layer: a long chain is streamed into its top layer. False when an
    /// operation held the sandbox (tried again next round: commands hold it briefly, often).
    async fn compact_after_checkpoint(&self, id: &str) -> bool {
        match self.compact_chain(id).await {
            Ok(_) => true,
            Err(e) if e.code == ErrorCode::SandboxBusy => {
                debug!(sandbox = %id, "disk chain compaction skipped: an operation holds the sandbox");
                false
            }
            Err(e) => {
                warn!(sandbox = %id, error = %e.message, "disk chain compaction failed; the chain is left as it was");
                true
            }
        }
    }

    /// Deletes the oldest checkpoints beyond `keep`; one that another snapshot depends on (or that is
    /// in use right now) stays, and is tried again after the next checkpoint.
    async fn prune_checkpoints(&self, id: &str, keep: u32) {
        let Ok(list) = self.checkpoints(id) else {
            return;
        };
        let extra = list.len().saturating_sub(keep as usize);
        for snap in list.into_iter().take(extra) {
            match self.delete_snapshot(&snap.id).await {
                Ok(_) => debug!(sandbox = %id, snapshot = %snap.id, "old checkpoint deleted"),
                Err(e) => {
                    debug!(sandbox = %id, snapshot = %snap.id, error = %e.message, "old checkpoint kept")
                }
            }
        }
    }
}

fn created_ms(s: &Snapshot) -> Option<i64> {
    chrono::DateTime::parse_from_rfc3339(&s.created_at)
        .ok()
        .map(|t| t.timestamp_millis())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policies_and_times_parse() {
        assert_eq!(ago("90s"), Some(90));
        assert_eq!(ago("5m ago"), Some(300));
        assert_eq!(ago("2h"), Some(7200));
        assert_eq!(ago("snap-1"), None);
        assert_eq!(ago("10"), None);
        let p = SetCheckpointPolicy {
            every: 60,
            keep: None,
        };
        assert_eq!(
            p.policy().unwrap(),
            Some(CheckpointPolicy {
                every: 60,
                keep: DEFAULT_KEEP
            })
        );
        assert_eq!(SetCheckpointPolicy::default().policy().unwrap(), None);
        for keep in [0, MAX_KEEP + 1] {
            let bad = SetCheckpointPolicy {
                every: 5,
                keep: Some(keep),
            };
            assert!(bad.policy().is_err());
        }
        assert!(Engine::check_checkpoint_options(None, Some(3)).is_err());
    }
}
