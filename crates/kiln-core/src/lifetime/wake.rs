//! Waking a hibernated sandbox when a client uses it (`auto_resume`).

use std::sync::Arc;
use std::time::Duration;

use crate::engine::Engine;
use crate::error::{Error, ErrorCode, Result};
use crate::model::{Sandbox, SandboxState};
use crate::operations::sandbox_resources;

/// The longest a request waits for a wake (its own or another request's).
const WAKE_DEADLINE: Duration = Duration::from_secs(120);

impl Engine {
    /// Whether a request would wake this sandbox: hibernated, with `auto_resume`.
    fn wakes_on_use(&self, sb: &Sandbox) -> Result<bool> {
        Ok(sb.state == SandboxState::Stopped
            && self.db().lifetime(&sb.id)?.is_some_and(|r| r.auto_resume))
    }

    /// The sandbox's shared lifecycle lock and its record read under it, after waking it if a request
    /// wakes it. Tried again when a hibernation (its idle timeout) finished between the wake check and
    /// the lock; after that the caller meets the state as it is.
    pub(crate) async fn read_locked_awake(
        &self,
        id: &str,
    ) -> Result<(tokio::sync::OwnedRwLockReadGuard<()>, Sandbox)> {
        let slot = self.slot(id);
        for _ in 0..2 {
            self.wake_for_use(id).await?;
            let shared = slot.op.clone().read_owned().await;
            let sb = self.get(id)?;
            if !self.wakes_on_use(&sb)? {
                return Ok((shared, sb));
            }
        }
        let shared = slot.op.clone().read_owned().await;
        Ok((shared, self.get(id)?))
    }

    /// Starts a stopped sandbox that has `auto_resume`, once, however many requests arrive meanwhile:
    /// the first runs the start (operation `sandbox.wake`), the others wait for it and then go on. Does
    /// nothing for other sandboxes (the request then meets the state as it is).
    pub(crate) async fn wake_for_use(&self, id_or_name: &str) -> Result<()> {
        let Ok(sb) = self.get(id_or_name) else {
            return Ok(());
        };
        if !self.wakes_on_use(&sb)? {
            return Ok(());
        }
        let lock = {
            let mut locks = self
                .life()
                .wake_locks
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            locks.entry(sb.id.clone()).or_default().clone()
        };
        let woken = async {
            let _one = lock.lock().await;
            // Another request may have woken it while this one waited.
            if self.get(&sb.id)?.state != SandboxState::Stopped {
                return Ok(());
            }
            let engine: Arc<Engine> = self
                .me()
                .ok_or_else(|| Error::internal("the engine is shutting down"))?;
            let (target, res) = sandbox_resources(&engine, &sb.id);
            let id = sb.id.clone();
            let op = engine.start_operation("sandbox.wake", &target, res, move |e| async move {
                let s = e.start(&id).await?;
                Ok(serde_json::to_value(s).unwrap_or_default())
            })?;
            op.outcome().await.map(|_| ())
        };
        match tokio::time::timeout(WAKE_DEADLINE, woken).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(Error::new(
                e.code,
                format!(
                    "sandbox {} was hibernated and waking it for this request failed: {}",
                    sb.name, e.message
                ),
            )),
            Err(_) => Err(Error::new(
                ErrorCode::SandboxBusy,
                format!(
                    "sandbox {} is hibernated and did not wake within {} s; see `kiln operation list --target {}` and retry",
                    sb.name,
                    WAKE_DEADLINE.as_secs(),
                    sb.name
                ),
            )),
        }
    }
}
