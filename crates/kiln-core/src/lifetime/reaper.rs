//! The reaper: one task that sleeps until the next deadline (a sandbox's timeout or idle timeout, a
//! snapshot's expiry), then acts through the normal operation path, under the sandbox's lock.

use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::Duration;

use tracing::{info, warn};

use super::{now_ms, secs_to_ms, OnTimeout, Row};
use crate::engine::{Engine, Locked};
use crate::error::{Error, Result};
use crate::model::SandboxState;
use crate::operations::{sandbox_resources, snapshot_resources};

/// The reaper looks again at least this often (also bounds the effect of a wall-clock jump).
const MAX_SLEEP_MS: i64 = 30_000;
/// After an action failed (or a snapshot could not go yet), the next try comes this much later.
const RETRY_MS: i64 = 10_000;
/// How long the reaper waits for a guest agent's process list.
const AGENT_DEADLINE: Duration = Duration::from_secs(5);

/// Why a sandbox's lifetime ran out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Why {
    Timeout,
    Idle,
}

impl Why {
    fn as_str(self) -> &'static str {
        match self {
            Why::Timeout => "timeout",
            Why::Idle => "idle_timeout",
        }
    }
}

enum Due {
    Now(Why),
    At(i64),
    Never,
}

pub(super) fn spawn(engine: &Arc<Engine>) {
    let weak: Weak<Engine> = Arc::downgrade(engine);
    let notify = engine.life().notify.clone();
    tokio::spawn(async move {
        let mut retry: HashMap<String, i64> = HashMap::new();
        loop {
            let notified = notify.notified();
            let Some(engine) = weak.upgrade() else { return };
            let next = engine.reap(&mut retry).await;
            drop(engine);
            let wait = (next - now_ms()).clamp(0, MAX_SLEEP_MS);
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(wait as u64)) => {}
                _ = notified => {}
            }
        }
    });
}

impl Engine {
    /// When a sandbox's lifetime runs out, given its state and activity.
    fn due(&self, id: &str, state: SandboxState, row: &Row, now: i64) -> Due {
        let acts = match row.on_timeout {
            OnTimeout::Hibernate => state.has_vm(),
            OnTimeout::Delete => !matches!(state, SandboxState::Creating | SandboxState::Deleting),
        };
        if !acts {
            return Due::Never;
        }
        let mut at: Option<(i64, Why)> = row.expires_at_ms.map(|t| (t, Why::Timeout));
        if let (Some(idle), true) = (row.idle_secs, state.has_vm()) {
            let (last, in_flight) = self.life().last_activity(id);
            // A request still being answered (a long exec, a followed log) is use: look again later.
            let t = if in_flight > 0 {
                now + secs_to_ms(idle)
            } else {
                last + secs_to_ms(idle)
            };
            if at.is_none_or(|(a, _)| t < a) {
                at = Some((t, Why::Idle));
            }
        }
        match at {
            Some((t, why)) if t <= now => Due::Now(why),
            Some((t, _)) => Due::At(t),
            None => Due::Never,
        }
    }

    /// Acts on what is due; returns when to look again (unix ms).
    async fn reap(self: &Arc<Self>, retry: &mut HashMap<String, i64>) -> i64 {
        let now = now_ms();
        let mut next = now + MAX_SLEEP_MS;
        retry.retain(|_, t| *t > now);
        let rows = match self.db().lifetimes() {
            Ok(r) => r,
            Err(e) => {
                warn!(error = %e, "reaper: cannot read lifetimes");
                return now + RETRY_MS;
            }
        };
        for (id, row) in rows {
            if let Some(t) = retry.get(&id) {
                next = next.min(*t);
                continue;
            }
            let Ok(Some(sb)) = self.db().find_sandbox(&id) else {
                continue;
            };
            match self.due(&id, sb.state, &row, now) {
                Due::Never => {}
                Due::At(t) => next = next.min(t),
                Due::Now(why) => {
                    if why == Why::Idle && self.processes_spoke(&sb).await {
                        self.life().touch(&id);
                        next = next.min(now + row.idle_secs.map_or(RETRY_MS, secs_to_ms));
                        continue;
                    }
                    if let Err(e) = self.expire_via_operation(&id, why).await {
                        warn!(sandbox = %id, error = %e, "lifetime action failed; retrying later");
                        retry.insert(id.clone(), now + RETRY_MS);
                        next = next.min(now + RETRY_MS);
                    }
                }
            }
        }
        match self.db().snapshot_expiries() {
            Ok(snaps) => {
                for (id, at) in snaps {
                    let key = format!("snapshot:{id}");
                    if let Some(t) = retry.get(&key) {
                        next = next.min(*t);
                    } else if at > now {
                        next = next.min(at);
                    } else if !self.expire_snapshot(&id).await {
                        retry.insert(key, now + RETRY_MS);
                        next = next.min(now + RETRY_MS);
                    }
                }
            }
            Err(e) => warn!(error = %e, "reaper: cannot read snapshot expiries"),
        }
        next
    }

    /// Whether the sandbox's background processes wrote output since the reaper last looked (the agent
    /// counts every process's output bytes). Never wakes or waits long: false when it cannot tell.
    async fn processes_spoke(&self, sb: &crate::Sandbox) -> bool {
        if sb.state != SandboxState::Running {
            return false;
        }
        let listed = async {
            let agent = self.agent_of(sb).await?;
            if !agent.has_feature("procs") {
                return Ok(None);
            }
            let procs = agent
                .proc_list()
                .await
                .map_err(|e| crate::vm::agent_error(e, &sb.name))?;
            Ok::<_, Error>(Some(procs.iter().map(|p| p.output_bytes).sum::<u64>()))
        };
        let Ok(Ok(Some(total))) = tokio::time::timeout(AGENT_DEADLINE, listed).await else {
            return false;
        };
        let mut seen = self
            .life()
            .output_seen
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let before = seen.insert(sb.id.clone(), total);
        // The first look has nothing to compare with: output already there counts as use.
        before.map_or(total > 0, |b| b != total)
    }

    /// Hibernates or deletes a sandbox whose lifetime ran out, as an operation (`sandbox.timeout`).
    async fn expire_via_operation(self: &Arc<Self>, id: &str, why: Why) -> Result<()> {
        let (target, res) = sandbox_resources(self, id);
        let id = id.to_string();
        info!(sandbox = %id, reason = why.as_str(), "sandbox lifetime ran out");
        let op = self.start_operation("sandbox.timeout", &target, res, move |e| async move {
            e.expire(&id).await
        })?;
        op.outcome().await.map(|_| ())
    }

    /// Under the sandbox's lock: checks again that its lifetime ran out (a client may have used it or
    /// changed its timeout meanwhile), then applies the policy.
    async fn expire(&self, id: &str) -> Result<serde_json::Value> {
        let locked = self.lock_sandbox(id).await?;
        let sb = locked.sb.clone();
        let Some(row) = self.db().lifetime(&sb.id)? else {
            return Ok(serde_json::json!({"id": sb.id, "action": "none"}));
        };
        let Due::Now(why_now) = self.due(&sb.id, sb.state, &row, now_ms()) else {
            return Ok(serde_json::json!({"id": sb.id, "action": "none"}));
        };
        crate::operations::stage(match row.on_timeout {
            OnTimeout::Hibernate => "hibernating",
            OnTimeout::Delete => "deleting",
        });
        match row.on_timeout {
            OnTimeout::Hibernate => {
                let Locked { sb, slot, _guard } = locked;
                let stopped = self.stop_locked(&sb, &slot).await;
                self.note_unresponsive(&sb, stopped)?;
            }
            OnTimeout::Delete => self.delete_locked(locked).await?,
        }
        info!(sandbox = %sb.id, reason = why_now.as_str(), action = row.on_timeout.as_str(), "lifetime policy applied");
        Ok(serde_json::json!({
            "id": sb.id,
            "action": row.on_timeout.as_str(),
            "reason": why_now.as_str(),
        }))
    }

    /// Deletes an expired snapshot when nothing depends on it (the delete path's own refusals: diff
    /// snapshots building on it, use in progress, a sandbox rolled back to it still running). Returns
    /// false to be tried again later.
    async fn expire_snapshot(self: &Arc<Self>, id: &str) -> bool {
        // Cheap check first, so a snapshot kept by a diff child does not log an operation every retry.
        match self.db().snapshot_children(id) {
            Ok(c) if c.is_empty() => {}
            _ => return false,
        }
        let (target, res) = snapshot_resources(self, id, false);
        let sid = id.to_string();
        let op = self.start_operation("snapshot.expire", &target, res, move |e| async move {
            let d = e.delete_snapshot_with(&sid, true).await?;
            Ok(serde_json::to_value(d).unwrap_or_default())
        });
        match op {
            Ok(op) => match op.outcome().await {
                Ok(_) => {
                    info!(snapshot = %id, "snapshot expired and was deleted");
                    true
                }
                Err(e) => {
                    info!(snapshot = %id, error = %e, "expired snapshot still needed; trying later");
                    false
                }
            },
            Err(_) => false,
        }
    }
}
