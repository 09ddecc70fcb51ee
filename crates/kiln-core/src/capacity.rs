//! Capacity accounting: how many VMs and how much guest memory running, starting and about-to-be-recorded
//! sandboxes take, checked against `--max-sandboxes` and the memory limit before a VM starts.

use std::sync::{Arc, Mutex};

use tracing::info;

use crate::engine::Engine;
use crate::error::{Error, ErrorCode, Result};
use crate::model::{Sandbox, SandboxState};

/// Capacity reserved by requests whose sandboxes have no row yet: (VMs, MiB). Only this module counts it.
#[derive(Default)]
pub(crate) struct Pending(Arc<Mutex<(usize, u64)>>);

/// Capacity held for sandboxes about to be recorded; released on drop.
pub(crate) struct Reservation {
    pending: Arc<Mutex<(usize, u64)>>,
    /// What is still held: (VMs, MiB). A fork's children leave it one by one as they are recorded.
    held: Mutex<(usize, u64)>,
    /// MiB held per sandbox.
    each_mib: u64,
}

impl Reservation {
    /// Records the new sandbox (`record` inserts its row) and releases this reservation in one step under
    /// the capacity lock, so `try_reserve` never counts that sandbox twice, as its row and as pending (a
    /// second template builder was refused that way while the first was being recorded).
    pub(crate) fn record<T>(mut self, record: impl FnOnce() -> Result<T>) -> Result<T> {
        let mut p = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        let done = record();
        if done.is_ok() {
            let held = self.held.get_mut().unwrap_or_else(|p| p.into_inner());
            p.0 -= held.0;
            p.1 -= held.1;
            *held = (0, 0);
        }
        done
    }

    /// `record` for one of several sandboxes reserved together (a fork's children): that sandbox's share
    /// leaves the reservation as its row is inserted, the rest stays held.
    pub(crate) fn record_one<T>(&self, record: impl FnOnce() -> Result<T>) -> Result<T> {
        let mut p = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        let done = record();
        if done.is_ok() {
            let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
            if held.0 > 0 {
                let mib = self.each_mib.min(held.1);
                held.0 -= 1;
                held.1 -= mib;
                p.0 -= 1;
                p.1 -= mib;
            }
        }
        done
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let mut p = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        let held = self.held.get_mut().unwrap_or_else(|p| p.into_inner());
        p.0 -= held.0;
        p.1 -= held.1;
    }
}

impl Engine {
    /// Capacity reserved by requests whose sandboxes have no row yet: (VMs, MiB).
    pub(crate) fn pending_capacity(&self) -> (usize, u64) {
        *self.pending().0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `try_reserve`, giving up warm spares when they stand in the way: a client's request comes first.
    pub(crate) async fn reserve(&self, count: usize, memory_mib: u64) -> Result<Reservation> {
        match self.try_reserve(count, memory_mib) {
            Err(e) if e.code == ErrorCode::CapacityExceeded && self.warm_pool().count() > 0 => {
                info!("giving up warm spares to make room");
                self.discard_spares(None).await;
                self.try_reserve(count, memory_mib)
            }
            other => other,
        }
    }

    /// Reserves room for `count` more VMs of `memory_mib` each, or refuses with `capacity_exceeded` and
    /// the numbers. Checking and reserving happen under one lock, so concurrent requests cannot all pass
    /// the check and overshoot; each sandbox's share is released in the same step (under this lock) as its
    /// row is inserted or marked starting (`Reservation::record`/`record_one`), so it counts exactly once.
    pub(crate) fn try_reserve(&self, count: usize, memory_mib: u64) -> Result<Reservation> {
        let mut pending = self.pending().0.lock().unwrap_or_else(|p| p.into_inner());
        let active: Vec<Sandbox> = self
            .db()
            .list_sandboxes()?
            .into_iter()
            .filter(|s| s.state.has_vm() || s.state == SandboxState::Creating)
            .collect();
        let what = if count == 1 {
            "1 more sandbox".to_string()
        } else {
            format!("{count} more sandboxes")
        };
        let running = active.len() + pending.0;
        if running + count > self.config().max_sandboxes {
            return Err(Error::new(
                ErrorCode::CapacityExceeded,
                format!(
                    "{running} sandboxes are running or starting and the limit is {}, so {what} do not fit; stop or delete some first (or raise `kiln serve --max-sandboxes`)",
                    self.config().max_sandboxes
                ),
            ));
        }
        let used: u64 = active.iter().map(|s| s.memory_mib).sum::<u64>() + pending.1;
        let asked = memory_mib.saturating_mul(count as u64);
        if used.saturating_add(asked) > self.config().max_total_memory_mib {
            return Err(Error::new(
                ErrorCode::CapacityExceeded,
                format!(
                    "guest memory would reach {} MiB (in use {used} MiB + requested {count} × {memory_mib} MiB), over the limit of {} MiB; stop or delete some sandboxes first (or raise `kiln serve --memory-overcommit`)",
                    used.saturating_add(asked),
                    self.config().max_total_memory_mib
                ),
            ));
        }
        pending.0 += count;
        pending.1 += asked;
        Ok(Reservation {
            pending: self.pending().0.clone(),
            held: Mutex::new((count, asked)),
            each_mib: memory_mib,
        })
    }
}
