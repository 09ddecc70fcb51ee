//! Sandbox lifetimes: a deadline (`timeout`, renewable), an idle timeout, what happens when either runs out
//! (`hibernate` = kiln stop, or `delete`), waking a hibernated sandbox when a client uses it, and snapshot
//! expiry (`ttl`). Deadlines live in SQLite (they survive a restart); activity is kept in memory only.

pub mod checkpoint;
mod reaper;
mod wake;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use rusqlite::{params, OptionalExtension};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::db::Db;
use crate::engine::Engine;
use crate::error::{Error, Result};

/// The longest `timeout`, `idle_timeout` or snapshot `ttl` accepted: a year.
pub const MAX_SECS: u64 = 365 * 24 * 3600;

/// What happens when a sandbox's timeout or idle timeout runs out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum OnTimeout {
    /// `kiln stop`: RAM and device state to disk, the VM process ends; `start` (or any use, with
    /// `auto_resume`) brings it back where it was.
    #[default]
    Hibernate,
    /// The sandbox is deleted.
    Delete,
}

impl OnTimeout {
    pub fn as_str(self) -> &'static str {
        match self {
            OnTimeout::Hibernate => "hibernate",
            OnTimeout::Delete => "delete",
        }
    }
    fn parse(s: &str) -> OnTimeout {
        if s == "delete" {
            OnTimeout::Delete
        } else {
            OnTimeout::Hibernate
        }
    }
}

/// A sandbox's lifetime policy and its deadlines (in `GET /v1/sandboxes/{id}`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Lifetime {
    /// Seconds of life, counted from create/resume, from every start (also an automatic wake) and from the
    /// last `set_timeout`; null: no limit.
    pub timeout: Option<u64>,
    /// When `timeout` runs out (RFC 3339).
    pub expires_at: Option<String>,
    /// Seconds without API use of the sandbox and without output of its background processes after which
    /// the policy applies (only while its VM runs); null: none.
    pub idle_timeout: Option<u64>,
    /// When the idle timeout runs out if nothing happens before then (RFC 3339; only while its VM runs).
    pub idle_expires_at: Option<String>,
    pub on_timeout: OnTimeout,
    /// A hibernated (stopped) sandbox is started by the first exec, file, process or port request.
    pub auto_resume: bool,
}

/// Lifetime options on create, resume and `POST /v1/sandboxes/{id}/timeout` (absent: unchanged).
#[derive(Debug, Clone, Copy, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetTimeout {
    /// Seconds of life from now (0 removes the limit).
    pub timeout: Option<u64>,
    /// Seconds of inactivity before the policy applies (0 removes it).
    pub idle_timeout: Option<u64>,
    pub on_timeout: Option<OnTimeout>,
    /// Start the sandbox when a client uses it while it is hibernated (default true once a lifetime is set).
    pub auto_resume: Option<bool>,
}

impl SetTimeout {
    pub fn is_empty(&self) -> bool {
        self.timeout.is_none()
            && self.idle_timeout.is_none()
            && self.on_timeout.is_none()
            && self.auto_resume.is_none()
    }

    fn validate(&self) -> Result<()> {
        for (what, v) in [
            ("timeout", self.timeout),
            ("idle_timeout", self.idle_timeout),
        ] {
            if v.is_some_and(|v| v > MAX_SECS) {
                return Err(Error::invalid(format!(
                    "{what} must be at most {MAX_SECS} seconds (a year); 0 removes it"
                )));
            }
        }
        Ok(())
    }
}

/// The stored row (times in unix milliseconds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Row {
    pub timeout_secs: Option<u64>,
    pub expires_at_ms: Option<i64>,
    pub idle_secs: Option<u64>,
    pub on_timeout: OnTimeout,
    pub auto_resume: bool,
}

pub(crate) fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

fn rfc3339(ms: i64) -> Option<String> {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
}

fn secs_to_ms(s: u64) -> i64 {
    i64::try_from(s.saturating_mul(1000)).unwrap_or(i64::MAX)
}

impl Db {
    pub(crate) fn lifetime(&self, id: &str) -> Result<Option<Row>> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT timeout_secs, expires_at_ms, idle_secs, on_timeout, auto_resume FROM lifetimes WHERE sandbox_id = ?1",
        )?;
        Ok(stmt.query_row([id], row).optional()?)
    }

    pub(crate) fn lifetimes(&self) -> Result<Vec<(String, Row)>> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT sandbox_id, timeout_secs, expires_at_ms, idle_secs, on_timeout, auto_resume FROM lifetimes",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                Row {
                    timeout_secs: r.get(1)?,
                    expires_at_ms: r.get(2)?,
                    idle_secs: r.get(3)?,
                    on_timeout: OnTimeout::parse(&r.get::<_, String>(4)?),
                    auto_resume: r.get(5)?,
                },
            ))
        })?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    }

    pub(crate) fn put_lifetime(&self, id: &str, l: &Row) -> Result<()> {
        self.conn().execute(
            "INSERT INTO lifetimes (sandbox_id, timeout_secs, expires_at_ms, idle_secs, on_timeout, auto_resume)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)
             ON CONFLICT(sandbox_id) DO UPDATE SET timeout_secs = ?2, expires_at_ms = ?3, idle_secs = ?4,
               on_timeout = ?5, auto_resume = ?6",
            params![
                id,
                l.timeout_secs,
                l.expires_at_ms,
                l.idle_secs,
                l.on_timeout.as_str(),
                l.auto_resume
            ],
        )?;
        Ok(())
    }

    pub(crate) fn snapshot_expiry(&self, id: &str) -> Result<Option<i64>> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare_cached("SELECT expires_at_ms FROM snapshot_expiry WHERE snapshot_id = ?1")?;
        Ok(stmt.query_row([id], |r| r.get(0)).optional()?)
    }

    pub(crate) fn snapshot_expiries(&self) -> Result<Vec<(String, i64)>> {
        let conn = self.conn();
        let mut stmt =
            conn.prepare_cached("SELECT snapshot_id, expires_at_ms FROM snapshot_expiry")?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    }

    pub(crate) fn set_snapshot_expiry(&self, id: &str, at_ms: i64) -> Result<()> {
        self.conn().execute(
            "INSERT INTO snapshot_expiry (snapshot_id, expires_at_ms) VALUES (?1, ?2)
             ON CONFLICT(snapshot_id) DO UPDATE SET expires_at_ms = ?2",
            params![id, at_ms],
        )?;
        Ok(())
    }
}

fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Row> {
    Ok(Row {
        timeout_secs: r.get(0)?,
        expires_at_ms: r.get(1)?,
        idle_secs: r.get(2)?,
        on_timeout: OnTimeout::parse(&r.get::<_, String>(3)?),
        auto_resume: r.get(4)?,
    })
}

/// What the daemon knows about recent use of each sandbox (in memory).
#[derive(Default)]
pub(crate) struct Lifetimes {
    /// Last API use (unix ms) and requests still being answered (a streaming exec counts until it ends).
    activity: Mutex<HashMap<String, (i64, usize)>>,
    /// Total output bytes of background processes when last looked at.
    output_seen: Mutex<HashMap<String, u64>>,
    /// One wake at a time per sandbox; the others wait for it.
    wake_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Deadlines changed: the reaper computes its next wake-up again.
    notify: Arc<tokio::sync::Notify>,
    /// When this daemon started (unix ms): idle time counts from here for sandboxes not used since.
    started_ms: std::sync::OnceLock<i64>,
    /// Checkpoint policies changed (checkpoint.rs).
    checkpoint_notify: Arc<tokio::sync::Notify>,
    /// Sandboxes whose disk chain a snapshot taken by hand may have made long (checkpoint.rs compacts).
    compact_pending: Mutex<std::collections::BTreeSet<String>>,
}

/// Marks a sandbox in use while it lives (a request being answered); its end counts as activity too.
pub struct ActivityGuard {
    engine: std::sync::Weak<Engine>,
    id: String,
}

impl Drop for ActivityGuard {
    fn drop(&mut self) {
        if let Some(e) = self.engine.upgrade() {
            let mut a = e.life().activity.lock().unwrap_or_else(|p| p.into_inner());
            let entry = a.entry(self.id.clone()).or_insert((0, 1));
            entry.0 = now_ms();
            entry.1 = entry.1.saturating_sub(1);
        }
    }
}

impl Lifetimes {
    fn last_activity(&self, id: &str) -> (i64, usize) {
        let started = *self.started_ms.get_or_init(now_ms);
        let a = self.activity.lock().unwrap_or_else(|p| p.into_inner());
        a.get(id)
            .map_or((started, 0), |(t, n)| ((*t).max(started), *n))
    }

    fn touch(&self, id: &str) {
        let mut a = self.activity.lock().unwrap_or_else(|p| p.into_inner());
        a.entry(id.to_string()).or_insert((0, 0)).0 = now_ms();
    }

    fn kick(&self) {
        self.notify.notify_one();
    }
}

impl Engine {
    /// Records use of a sandbox by a client until the guard is dropped (the API's requests under
    /// `/v1/sandboxes/{id}/...`). Returns None for an unknown sandbox.
    pub fn activity_guard(&self, id_or_name: &str) -> Option<ActivityGuard> {
        let sb = self.get(id_or_name).ok()?;
        let engine = Arc::downgrade(&self.me()?);
        {
            let mut a = self
                .life()
                .activity
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            let entry = a.entry(sb.id.clone()).or_insert((0, 0));
            entry.0 = now_ms();
            entry.1 += 1;
        }
        Some(ActivityGuard { engine, id: sb.id })
    }

    /// The lifetime as the API shows it, or None for a sandbox without one.
    pub(crate) fn lifetime_of(&self, sb: &crate::Sandbox) -> Option<Lifetime> {
        let row = self.db().lifetime(&sb.id).ok()??;
        let idle_expires_at = match row.idle_secs {
            Some(idle) if sb.state.has_vm() => {
                rfc3339(self.life().last_activity(&sb.id).0 + secs_to_ms(idle))
            }
            _ => None,
        };
        Some(Lifetime {
            timeout: row.timeout_secs,
            expires_at: row.expires_at_ms.and_then(rfc3339),
            idle_timeout: row.idle_secs,
            idle_expires_at,
            on_timeout: row.on_timeout,
            auto_resume: row.auto_resume,
        })
    }

    /// Sets (or changes) a sandbox's lifetime; `timeout` counts from now. Fields left out keep their
    /// value; a sandbox that had none gets `on_timeout: hibernate` and `auto_resume: true`.
    pub(crate) fn apply_lifetime(&self, id: &str, req: &SetTimeout) -> Result<()> {
        req.validate()?;
        let old = self.db().lifetime(id)?;
        if old.is_none() && req.is_empty() {
            return Ok(());
        }
        let mut row = old.unwrap_or(Row {
            timeout_secs: None,
            expires_at_ms: None,
            idle_secs: None,
            on_timeout: OnTimeout::Hibernate,
            auto_resume: true,
        });
        if let Some(t) = req.timeout {
            row.timeout_secs = (t > 0).then_some(t);
            row.expires_at_ms = row.timeout_secs.map(|t| now_ms() + secs_to_ms(t));
        }
        if let Some(i) = req.idle_timeout {
            row.idle_secs = (i > 0).then_some(i);
        }
        if let Some(o) = req.on_timeout {
            row.on_timeout = o;
        }
        if let Some(a) = req.auto_resume {
            row.auto_resume = a;
        }
        self.db().put_lifetime(id, &row)?;
        self.life().touch(id);
        self.life().kick();
        Ok(())
    }

    /// Changes a sandbox's lifetime (`POST /v1/sandboxes/{id}/timeout`), under its lifecycle lock so it
    /// cannot race the reaper's check.
    pub async fn set_timeout(&self, id_or_name: &str, req: SetTimeout) -> Result<crate::Sandbox> {
        if req.is_empty() {
            return Err(Error::invalid(
                "give at least one of 'timeout', 'idle_timeout', 'on_timeout', 'auto_resume'",
            ));
        }
        let locked = self.lock_sandbox(id_or_name).await?;
        self.apply_lifetime(&locked.sb.id, &req)?;
        self.get(&locked.sb.id)
    }

    /// After a start (by a client or a wake): the timeout counts again from now, and so does idle time.
    pub(crate) fn lifetime_started(&self, id: &str) {
        if let Ok(Some(mut row)) = self.db().lifetime(id) {
            if let Some(t) = row.timeout_secs {
                row.expires_at_ms = Some(now_ms() + secs_to_ms(t));
                if let Err(e) = self.db().put_lifetime(id, &row) {
                    tracing::warn!(sandbox = %id, error = %e, "could not renew the sandbox's timeout");
                }
            }
        }
        self.life().touch(id);
        self.life().kick();
    }

    /// Gives a new snapshot an expiry `ttl` seconds from now.
    pub(crate) fn set_snapshot_ttl(&self, id: &str, ttl: u64) -> Result<()> {
        if ttl == 0 || ttl > MAX_SECS {
            return Err(Error::invalid(format!(
                "ttl must be from 1 to {MAX_SECS} seconds"
            )));
        }
        self.db()
            .set_snapshot_expiry(id, now_ms() + secs_to_ms(ttl))?;
        self.life().kick();
        Ok(())
    }

    /// When a snapshot expires (RFC 3339), if it has a ttl.
    pub(crate) fn snapshot_expires_at(&self, id: &str) -> Option<String> {
        self.db().snapshot_expiry(id).ok()?.and_then(rfc3339)
    }

    /// Creates a sandbox and then gives it the lifetime asked for (`POST /v1/sandboxes`).
    pub async fn create_with_lifetime(&self, req: crate::CreateSandbox) -> Result<crate::Sandbox> {
        let life = SetTimeout {
            timeout: req.timeout,
            idle_timeout: req.idle_timeout,
            on_timeout: req.on_timeout,
            auto_resume: req.auto_resume,
        };
        life.validate()?;
        let (every, keep) = (req.checkpoint_every, req.checkpoint_keep);
        Engine::check_checkpoint_options(every, keep)?;
        let sb = self.create(req).await?;
        let sb = self.lifetime_after_create(sb, &life).await?;
        self.checkpoint_policy_after_create(sb, every, keep).await
    }

    /// Resumes a snapshot into a new sandbox with the lifetime asked for (`POST /v1/snapshots/{id}/resume`).
    pub async fn resume_with_lifetime(
        &self,
        snapshot: &str,
        req: crate::ResumeSnapshot,
    ) -> Result<crate::Sandbox> {
        let life = SetTimeout {
            timeout: req.timeout,
            idle_timeout: req.idle_timeout,
            on_timeout: req.on_timeout,
            auto_resume: req.auto_resume,
        };
        life.validate()?;
        let sb = self.resume_snapshot(snapshot, req).await?;
        self.lifetime_after_create(sb, &life).await
    }

    /// Forks a sandbox and gives every child the lifetime asked for (`POST /v1/sandboxes/{id}/fork`); all
    /// or nothing, as the fork itself.
    pub async fn fork_with_lifetime(
        &self,
        source: &str,
        req: crate::ForkRequest,
    ) -> Result<crate::ForkResult> {
        let life = SetTimeout {
            timeout: req.timeout,
            idle_timeout: req.idle_timeout,
            on_timeout: req.on_timeout,
            auto_resume: req.auto_resume,
        };
        life.validate()?;
        let mut forked = self.fork(source, req).await?;
        if life.is_empty() {
            return Ok(forked);
        }
        let applied = forked
            .sandboxes
            .iter()
            .try_for_each(|c| self.apply_lifetime(&c.id, &life));
        if let Err(e) = applied {
            for c in &forked.sandboxes {
                let _ = self.delete(&c.id).await;
            }
            return Err(e);
        }
        for c in &mut forked.sandboxes {
            *c = self.get(&c.id)?;
        }
        Ok(forked)
    }

    async fn lifetime_after_create(
        &self,
        sb: crate::Sandbox,
        life: &SetTimeout,
    ) -> Result<crate::Sandbox> {
        if life.is_empty() {
            return Ok(sb);
        }
        let (notes, boot) = (sb.volume_notes.clone(), sb.boot.clone());
        // The sandbox exists and runs; without its lifetime recorded it would live on unlimited, so a
        // failure here removes it again (all or nothing).
        if let Err(e) = self.apply_lifetime(&sb.id, life) {
            let _ = self.delete(&sb.id).await;
            return Err(e);
        }
        let mut sb = self.get(&sb.id)?;
        sb.volume_notes = notes;
        sb.boot = boot;
        Ok(sb)
    }

    pub(crate) fn spawn_reaper(self: &Arc<Engine>) {
        let _ = self.life().started_ms.set(now_ms());
        reaper::spawn(self);
        self.spawn_checkpointer();
    }
}
