//! Warm spares: copies of a snapshot resumed ahead of time, run until the guest has answered once
//! (so the restore, the agent's reconnection and the code paths of a first command are behind them),
//! then paused. The next resume of that snapshot continues a spare and gives it its identity instead of
//! starting a VM: under TCG most of a resume is the guest running its code cold in a fresh process.
//!
//! Spares are sandbox rows in state `creating` with origin `spare:SNAPSHOT`, hidden from clients. A
//! daemon that dies with spares therefore rolls them back on start-up like any unfinished creation. A
//! snapshot gets a spare once it has been resumed (a snapshot resumed once is likely resumed again);
//! the pool holds `--warm-spares` of them, least recently used evicted first, and gives them up when a
//! client's request needs the capacity.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use tracing::{debug, info, warn};

use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::ids;
use crate::machine::{Incoming, NewIdentity};
use crate::model::{Sandbox, SandboxState};
use crate::snapshot::manifest::{Manifest, Role};
use crate::snapshot::restore::{with_hostname, ResumeSnapshot};

/// Origin recorded for spares (`spare:SNAPSHOT`); claiming one sets `snapshot:SNAPSHOT`.
pub(crate) const SPARE_ORIGIN: &str = "spare:";
/// Hostname a spare runs under until it is claimed.
const SPARE_HOSTNAME: &str = "kiln-spare";
/// How long warming a spare may take before it is given up.
const WARM_TIMEOUT: Duration = Duration::from_secs(60);

struct Entry {
    snapshot: String,
    sandbox_id: String,
    ready: bool,
}

/// Which spares exist, least recently used first.
#[derive(Default)]
pub(crate) struct WarmPool {
    entries: Mutex<Vec<Entry>>,
    /// Set when the daemon exits: no new spares.
    closed: AtomicBool,
    /// Spares being warmed right now (each ends by being marked ready or discarding itself).
    warming: AtomicUsize,
}

/// Counts a spare as warming until dropped.
struct Warming<'a>(&'a AtomicUsize);

impl Drop for Warming<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl WarmPool {
    fn entries(&self) -> std::sync::MutexGuard<'_, Vec<Entry>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Spares, ready or warming.
    pub(crate) fn count(&self) -> usize {
        self.entries().len()
    }

    /// Spares ready to hand out, of any snapshot.
    pub(crate) fn ready(&self) -> usize {
        self.entries().iter().filter(|e| e.ready).count()
    }

    /// Ready spares of `snapshot`.
    pub(crate) fn ready_for(&self, snapshot: &str) -> usize {
        self.entries()
            .iter()
            .filter(|e| e.ready && e.snapshot == snapshot)
            .count()
    }

    fn take_ready(&self, snapshot: &str) -> Option<String> {
        let mut entries = self.entries();
        let i = entries
            .iter()
            .position(|e| e.ready && e.snapshot == snapshot)?;
        Some(entries.remove(i).sandbox_id)
    }

    /// Registers a spare about to be warmed. None if `snapshot` has one already or every place is taken
    /// by a spare still warming; otherwise the ready spare evicted to make room, if any.
    fn begin(&self, snapshot: &str, sandbox_id: &str, capacity: usize) -> Option<Option<String>> {
        let mut entries = self.entries();
        if self.closed.load(Ordering::SeqCst) || entries.iter().any(|e| e.snapshot == snapshot) {
            return None;
        }
        let mut evicted = None;
        if entries.len() >= capacity {
            let i = entries.iter().position(|e| e.ready)?;
            evicted = Some(entries.remove(i).sandbox_id);
        }
        entries.push(Entry {
            snapshot: snapshot.to_string(),
            sandbox_id: sandbox_id.to_string(),
            ready: false,
        });
        Some(evicted)
    }

    /// Marks a spare ready; false when it was dropped from the pool while it warmed.
    fn mark_ready(&self, sandbox_id: &str) -> bool {
        let mut entries = self.entries();
        match entries.iter_mut().find(|e| e.sandbox_id == sandbox_id) {
            Some(e) => {
                e.ready = true;
                true
            }
            None => false,
        }
    }

    fn forget(&self, sandbox_id: &str) {
        self.entries().retain(|e| e.sandbox_id != sandbox_id);
    }

    /// Drops the spares of `snapshot` (all with None) from the pool and returns the ready ones, which
    /// the caller discards; one still warming discards itself when it finds its entry gone.
    fn drain(&self, snapshot: Option<&str>) -> Vec<String> {
        let mut entries = self.entries();
        let (gone, kept): (Vec<Entry>, Vec<Entry>) = entries
            .drain(..)
            .partition(|e| snapshot.is_none_or(|s| e.snapshot == s));
        *entries = kept;
        gone.into_iter()
            .filter(|e| e.ready)
            .map(|e| e.sandbox_id)
            .collect()
    }
}

/// How long after the resume that asks for it a spare starts warming.
const SPARE_DELAY: Duration = Duration::from_secs(1);

impl Engine {
    /// Keeps a spare of memory snapshot `snapshot` warming in the background (if the pool has room).
    pub(crate) fn schedule_spare(&self, snapshot: &str) {
        if self.config().warm_spares == 0 {
            return;
        }
        let Some(engine) = self.me() else { return };
        let snapshot = snapshot.to_string();
        tokio::spawn(async move {
            // Not at once: the client of the copy just resumed runs its first commands now, and under
            // TCG a spare's QEMU start and first guest code would take the CPU from them.
            tokio::time::sleep(SPARE_DELAY).await;
            engine.make_spare(&snapshot).await
        });
    }

    async fn make_spare(&self, snapshot: &str) {
        let sandbox_id = ids::new_id("sb");
        let pool = self.warm_pool();
        pool.warming.fetch_add(1, Ordering::SeqCst);
        let _warming = Warming(&pool.warming);
        let Some(evicted) = pool.begin(snapshot, &sandbox_id, self.config().warm_spares) else {
            return;
        };
        if let Some(old) = evicted {
            self.discard_spare(&old).await;
        }
        let warmed = tokio::time::timeout(WARM_TIMEOUT, self.warm_spare(snapshot, &sandbox_id))
            .await
            .unwrap_or_else(|_| Err(Error::internal("warming took too long")));
        match warmed {
            Ok(()) if self.warm_pool().mark_ready(&sandbox_id) => {
                info!(snapshot, sandbox = %sandbox_id, "warm spare ready");
            }
            Ok(()) => self.discard_spare(&sandbox_id).await,
            Err(e) => {
                // Not a client's request: a spare that cannot be made is only a missed speed-up.
                debug!(snapshot, error = %e, "no warm spare");
                self.warm_pool().forget(&sandbox_id);
                self.discard_spare(&sandbox_id).await;
            }
        }
    }

    /// Resumes a hidden copy of `snapshot`, lets its guest answer a command, and pauses it.
    async fn warm_spare(&self, snapshot: &str, sandbox_id: &str) -> Result<()> {
        let (_, m) = self.load_manifest(snapshot)?;
        if !m.kind.has_memory() || m.file(Role::State).is_none() {
            return Err(Error::internal("disk snapshots boot; nothing to keep warm"));
        }
        let reservation = self.try_reserve(1, m.memory_mib)?;
        let sb = Sandbox {
            id: sandbox_id.to_string(),
            name: sandbox_id.to_string(),
            hostname: SPARE_HOSTNAME.to_string(),
            mac: ids::new_mac(),
            origin: format!("{SPARE_ORIGIN}{snapshot}"),
            ..self.record_from_manifest(&m, snapshot)?
        };
        reservation.record(|| self.db().insert_sandbox(&sb))?;
        let slot = self.slot(&sb.id);
        let _guard = slot.op.write().await;
        let cmdline = with_hostname(&m.cmdline, SPARE_HOSTNAME, false);
        let (layout, incoming) = self.provision_from_snapshot(&sb, snapshot, &m, cmdline, &[])?;
        self.db().set_layout(&sb.id, &layout)?;
        let incoming = incoming.map(|inc| Incoming {
            identity: Some(NewIdentity {
                hostname: SPARE_HOSTNAME.to_string(),
                mac: Some(sb.mac.clone()),
            }),
            ..inc
        });
        let vm = self.start_vm(&sb, &layout, incoming).await?;
        *slot.vm.lock().await = Some(vm.clone());
        // A first command takes the agent's exec path (fork, pipes, wait) through TCG once.
        let agent = vm.agent(Duration::from_secs(10)).await?;
        agent
            .exec_collect(kiln_agent_client::ExecRequest {
                argv: Some(vec!["true".into()]),
                shell: None,
                env: Default::default(),
                cwd: None,
                stdin: false,
                timeout_ms: Some(10_000),
                user: None,
            })
            .await
            .map_err(|e| crate::vm::agent_error(e, &sb.name))?;
        vm.qmp().await?.execute("stop", None).await?;
        self.db()
            .set_state(&sb.id, SandboxState::Creating, Some(vm.pid), None)?;
        Ok(())
    }

    /// Hands out a ready spare of `snapshot` as the sandbox `req` asks for, if there is one that fits
    /// (no volumes, the snapshot's own egress). None: resume the usual way. A spare that fails while it
    /// is handed out is discarded and None returned, so the client never sees a spare's failure.
    pub(crate) async fn claim_spare(
        &self,
        snapshot: &str,
        m: &Manifest,
        req: &ResumeSnapshot,
    ) -> Option<Result<Sandbox>> {
        if req.volumes.as_ref().is_some_and(|v| !v.is_empty())
            || req.egress.is_some_and(|e| e != m.source.egress)
        {
            return None;
        }
        let Some(id) = self.warm_pool().take_ready(snapshot) else {
            if self.config().warm_spares > 0 {
                self.metrics().warm_spare(false);
            }
            return None;
        };
        let slot = self.slot(&id);
        let _guard = slot.op.write().await;
        let vm = slot.vm.lock().await.clone();
        let spare = self.db().find_sandbox(&id).ok().flatten();
        let (Some(vm), Some(spare)) = (vm, spare) else {
            self.discard_locked(&id).await;
            return None;
        };
        if !vm.is_alive() {
            self.discard_locked(&id).await;
            return None;
        }
        let name = req.name.clone().unwrap_or_else(|| id.clone());
        let template = req.from_template.as_ref();
        let spare_network = spare.network.clone();
        let claimed = Sandbox {
            name: name.clone(),
            hostname: name.replace('_', "-"),
            labels: req.labels.clone(),
            origin: template.map_or_else(
                || format!("snapshot:{snapshot}"),
                |t| format!("template:{}", t.template),
            ),
            // Merged over the snapshot's, as a resume does (exec adds them host-side).
            env: spare
                .env
                .clone()
                .into_iter()
                .chain(req.env.clone())
                .collect(),
            ports: template.map_or_else(|| spare.ports.clone(), |t| t.ports.clone()),
            network: req.network.clone(),
            ..spare
        };
        if let Err(e) = self.db().claim_spare(&id, &claimed) {
            // The name is taken: the spare stays for the next request.
            if self.warm_pool().begin(snapshot, &id, usize::MAX).is_some() {
                self.warm_pool().mark_ready(&id);
            } else {
                self.discard_locked(&id).await;
            }
            return Some(Err(e));
        }
        // The recorded kernel command line names the hostname too (a later cold boot of this machine).
        if let Ok(Some(layout)) = self.db().layout(&id) {
            let layout = crate::layout::Layout {
                cmdline: with_hostname(&layout.cmdline, &claimed.hostname, false),
                ..layout
            };
            let _ = self.db().set_layout(&id, &layout);
        }
        // The spare's NIC got its MAC when the spare was made; that stays its address.
        let identity = NewIdentity {
            hostname: claimed.hostname.clone(),
            mac: None,
        };
        self.confine().set_background(
            &id,
            &crate::confine::cgroup::Limits::for_vm(claimed.memory_mib, claimed.cpus),
            false,
        );
        let continued = async {
            // Bridged: the spare has an address of its own (given when it was made, never a client's);
            // it joins the client's network before its guest runs again.
            if spare_network != claimed.network {
                crate::net::set_network(self.db(), &id, claimed.network.as_deref())?;
                self.refresh_net().await?;
            }
            if template.is_some() {
                // The spare published nothing (a template's machine has no ports); the client's ports now.
                self.apply_ports(&claimed, &vm).await?;
            }
            vm.qmp().await?.execute("cont", None).await?;
            self.after_resume(&id, &vm, Some(&identity)).await?;
            self.db()
                .set_state(&id, SandboxState::Running, Some(vm.pid), None)
        };
        if let Err(e) = continued.await {
            warn!(sandbox = %id, error = %e, "a warm spare failed as it was handed out; resuming the usual way");
            self.discard_locked(&id).await;
            return None;
        }
        info!(sandbox = %id, snapshot, "sandbox resumed from a warm spare");
        self.metrics().warm_spare(true);
        Some(
            self.db()
                .find_sandbox(&id)
                .and_then(|s| s.ok_or_else(|| Error::sandbox_not_found(&id)))
                .map(|s| Sandbox {
                    boot: Some(crate::template_snap::BootInfo::resume(
                        snapshot,
                        "a warm spare of the snapshot",
                    )),
                    ..s
                }),
        )
    }

    /// Called once when the daemon exits, before `shutdown`: no new spares; the ready ones are discarded
    /// and those still warming are waited for (they discard themselves), so no VM outlives the daemon
    /// unrecorded. Clients' VMs keep running and are adopted by the next daemon.
    pub async fn discard_warm_spares(&self) {
        let pool = self.warm_pool();
        pool.closed.store(true, Ordering::SeqCst);
        self.discard_spares(None).await;
        // A template snapshot being made is not finished by this daemon (template_snap.rs).
        self.remove_builders(None).await;
        let deadline = tokio::time::Instant::now() + WARM_TIMEOUT;
        while pool.warming.load(Ordering::SeqCst) > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Discards the spares of `snapshot` (all spares with None), e.g. before the snapshot is deleted.
    pub(crate) async fn discard_spares(&self, snapshot: Option<&str>) {
        for id in self.warm_pool().drain(snapshot) {
            self.discard_spare(&id).await;
        }
    }

    async fn discard_spare(&self, id: &str) {
        let slot = self.slot(id);
        let _guard = slot.op.write().await;
        self.discard_locked(id).await;
    }

    /// Ends a spare's VM and removes its row and files, unless it has become a client's sandbox.
    async fn discard_locked(&self, id: &str) {
        let slot = self.slot(id);
        let row = self.db().find_sandbox(id).ok().flatten();
        if row.as_ref().is_some_and(|sb| !is_spare(sb)) {
            return;
        }
        let vm = slot.vm.lock().await.take();
        match (vm, row.and_then(|sb| sb.pid)) {
            (Some(vm), _) => vm.terminate().await,
            // Warming was cut short (timeout) after QEMU started: its pid is recorded.
            (None, Some(pid)) => {
                kiln_vmm::process::terminate(pid, &crate::vm::vm_name(id), Duration::from_secs(3))
                    .await
            }
            (None, None) => {}
        }
        self.remove_sandbox_files(id);
        if let Err(e) = self.db().delete_sandbox(id) {
            warn!(sandbox = %id, error = %e, "could not remove a warm spare's record");
        }
        self.forget_slot(id);
        debug!(sandbox = %id, "warm spare discarded");
    }
}

/// Whether a sandbox row is a warm spare (hidden from clients).
pub(crate) fn is_spare(sb: &Sandbox) -> bool {
    sb.origin.starts_with(SPARE_ORIGIN)
}

#[cfg(test)]
mod tests {
    use super::WarmPool;

    #[test]
    fn one_spare_per_snapshot_and_the_least_recently_used_ready_one_makes_room() {
        let pool = WarmPool::default();
        assert_eq!(pool.begin("a", "sb-1", 2), Some(None));
        assert_eq!(pool.begin("a", "sb-x", 2), None, "a has one already");
        assert_eq!(pool.begin("b", "sb-2", 2), Some(None));
        // Full, and nothing is ready to give way.
        assert_eq!(pool.begin("c", "sb-3", 2), None);
        assert!(pool.mark_ready("sb-1") && pool.mark_ready("sb-2"));
        assert_eq!(pool.begin("c", "sb-3", 2), Some(Some("sb-1".into())));
        assert_eq!(
            (pool.ready_for("a"), pool.ready_for("b"), pool.count()),
            (0, 1, 2)
        );
    }

    #[test]
    fn taken_or_drained_spares_leave_the_pool_and_warming_ones_learn_it() {
        let pool = WarmPool::default();
        pool.begin("a", "sb-1", 4);
        pool.begin("b", "sb-2", 4);
        assert_eq!(pool.take_ready("a"), None, "still warming");
        pool.mark_ready("sb-1");
        assert_eq!(pool.take_ready("a"), Some("sb-1".into()));
        assert_eq!(pool.take_ready("a"), None);
        // sb-2 is warming: drained without being returned, and told when it is done.
        assert_eq!(pool.drain(Some("b")), Vec::<String>::new());
        assert!(!pool.mark_ready("sb-2"));
        pool.begin("c", "sb-3", 4);
        pool.mark_ready("sb-3");
        assert_eq!(pool.drain(None), ["sb-3"]);
        assert_eq!(pool.count(), 0);
        // A closed pool (daemon exiting) takes no new spares.
        pool.closed.store(true, std::sync::atomic::Ordering::SeqCst);
        assert_eq!(pool.begin("d", "sb-4", 4), None);
    }
}
