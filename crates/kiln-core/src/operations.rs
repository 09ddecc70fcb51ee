//! Operations: every mutating call the API makes runs as a task the engine owns, recorded in the state
//! database. The HTTP handler that started it only waits for its outcome, so a client that disconnects
//! cannot cut the work short (dropping a handler's future used to drop the work with it, half done); the
//! outcome is recorded either way and can be read back (`GET /v1/operations/{id}`).

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use rusqlite::{params, OptionalExtension, Row};
use serde::{Deserialize, Serialize};
use tokio::sync::{oneshot, watch};
use tracing::{info, warn};
use utoipa::ToSchema;

use crate::db::{from_json, to_json, Db};
use crate::engine::Engine;
use crate::error::{Error, ErrorCode, Result};
use crate::ids;
use crate::model::now_rfc3339;

/// Finished operations are kept this long, and at most this many.
const KEEP_HOURS: i64 = 24;
const KEEP_AT_MOST: u32 = 1000;

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS operations (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    target TEXT NOT NULL,
    resources TEXT NOT NULL,
    state TEXT NOT NULL,
    stage TEXT,
    result TEXT,
    error_code TEXT,
    error_message TEXT,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS operations_by_state ON operations(state);
"#;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum OperationState {
    Running,
    Succeeded,
    Failed,
}

impl OperationState {
    pub fn as_str(self) -> &'static str {
        match self {
            OperationState::Running => "running",
            OperationState::Succeeded => "succeeded",
            OperationState::Failed => "failed",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "running" => Some(OperationState::Running),
            "succeeded" => Some(OperationState::Succeeded),
            "failed" => Some(OperationState::Failed),
            _ => None,
        }
    }
}

/// What an operation works on (ids); sandboxes and snapshots it creates are added when it succeeds.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct Resources {
    #[serde(default)]
    pub sandboxes: Vec<String>,
    #[serde(default)]
    pub snapshots: Vec<String>,
    #[serde(default)]
    pub volumes: Vec<String>,
}

impl Resources {
    fn contains(&self, id: &str) -> bool {
        [&self.sandboxes, &self.snapshots, &self.volumes]
            .iter()
            .any(|l| l.iter().any(|x| x == id))
    }
    fn add(list: &mut Vec<String>, id: &str) {
        if !id.is_empty() && !list.iter().any(|x| x == id) {
            list.push(id.to_string());
        }
    }
    /// Adds the ids a successful result names (a new sandbox, snapshot, fork children, volume).
    fn add_from_result(&mut self, kind: &str, v: &serde_json::Value) {
        let id = v["id"].as_str().unwrap_or_default();
        match kind.split('.').next() {
            _ if kind == "snapshot.create" => Self::add(&mut self.snapshots, id),
            _ if kind == "volume.create" => {
                Self::add(&mut self.volumes, v["name"].as_str().unwrap_or_default())
            }
            _ if kind == "sandbox.fork" => {
                for sb in v["sandboxes"].as_array().into_iter().flatten() {
                    Self::add(&mut self.sandboxes, sb["id"].as_str().unwrap_or_default());
                }
            }
            Some("sandbox") | Some("snapshot") => Self::add(&mut self.sandboxes, id),
            _ => {}
        }
    }
}

/// The error of a failed operation: the same code and message a waiting client got.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct OperationError {
    pub code: String,
    pub message: String,
}

/// A mutating call and its outcome.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Operation {
    /// `op-` and 10 characters.
    pub id: String,
    /// What it does, e.g. `snapshot.create`, `sandbox.stop`, `snapshot.resume`.
    pub kind: String,
    /// The id of the sandbox, snapshot or volume the request named.
    pub target: String,
    pub resources: Resources,
    pub state: OperationState,
    /// Where a running operation is, when it says (e.g. `saving state`).
    pub stage: Option<String>,
    /// The body a waiting client got on success (`null` for answers without one).
    #[schema(value_type = Object)]
    pub result: Option<serde_json::Value>,
    pub error: Option<OperationError>,
    pub created_at: String,
    pub updated_at: String,
}

fn row_to_op(r: &Row<'_>) -> rusqlite::Result<Operation> {
    let state: String = r.get("state")?;
    let code: Option<String> = r.get("error_code")?;
    let message: Option<String> = r.get("error_message")?;
    let result: Option<String> = r.get("result")?;
    Ok(Operation {
        id: r.get("id")?,
        kind: r.get("kind")?,
        target: r.get("target")?,
        resources: from_json(r.get("resources")?),
        state: OperationState::parse(&state).unwrap_or(OperationState::Failed),
        stage: r.get("stage")?,
        result: result.and_then(|s| serde_json::from_str(&s).ok()),
        error: code.map(|code| OperationError {
            code,
            message: message.unwrap_or_default(),
        }),
        created_at: r.get("created_at")?,
        updated_at: r.get("updated_at")?,
    })
}

impl Db {
    /// Creates the operations table if missing (outside the numbered migrations: the table is a log
    /// that any kiln can recreate, and other schema changes need not be ordered against it).
    pub(crate) fn init_operations(&self) -> Result<()> {
        self.conn().execute_batch(SCHEMA)?;
        Ok(())
    }

    fn insert_operation(&self, op: &Operation) -> Result<()> {
        self.conn().execute(
            "INSERT INTO operations (id, kind, target, resources, state, stage, created_at, updated_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?7)",
            params![
                op.id,
                op.kind,
                op.target,
                to_json(&op.resources),
                op.state.as_str(),
                op.stage,
                op.created_at
            ],
        )?;
        self.operation_changed("operation.started", &op.id);
        Ok(())
    }

    fn set_operation_stage(&self, id: &str, stage: &str) -> Result<()> {
        self.conn().execute(
            "UPDATE operations SET stage = ?2, updated_at = ?3 WHERE id = ?1 AND state = 'running'",
            params![id, stage, now_rfc3339()],
        )?;
        Ok(())
    }

    fn finish_operation(
        &self,
        id: &str,
        resources: &Resources,
        outcome: &Result<serde_json::Value>,
    ) -> Result<()> {
        let (state, result, code, message) = match outcome {
            Ok(v) => (OperationState::Succeeded, Some(v.to_string()), None, None),
            Err(e) => (
                OperationState::Failed,
                None,
                Some(e.code.as_str()),
                Some(e.message.as_str()),
            ),
        };
        self.conn().execute(
            "UPDATE operations SET state = ?2, stage = NULL, result = ?3, error_code = ?4, error_message = ?5,
               resources = ?6, updated_at = ?7 WHERE id = ?1",
            params![
                id,
                state.as_str(),
                result,
                code,
                message,
                to_json(resources),
                now_rfc3339()
            ],
        )?;
        self.operation_changed("operation.finished", id);
        Ok(())
    }

    fn operation_changed(&self, kind: &str, id: &str) {
        if let Ok(Some(op)) = self.get_operation(id) {
            self.events().publish(
                kind,
                &op.id,
                op.resources.sandboxes.first().map(String::as_str),
                Some(op.state.as_str()),
                serde_json::to_value(&op).ok(),
            );
        }
    }

    pub fn get_operation(&self, id: &str) -> Result<Option<Operation>> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached("SELECT * FROM operations WHERE id = ?1")?;
        Ok(stmt.query_row([id], row_to_op).optional()?)
    }

    /// Newest first.
    pub fn list_operations(&self) -> Result<Vec<Operation>> {
        let conn = self.conn();
        let mut stmt =
            conn.prepare_cached("SELECT * FROM operations ORDER BY created_at DESC, rowid DESC")?;
        let rows = stmt.query_map([], row_to_op)?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    }

    /// Marks operations a previous daemon left running as failed; returns how many.
    fn interrupt_operations(&self) -> Result<usize> {
        Ok(self.conn().execute(
            "UPDATE operations SET state = 'failed', stage = NULL, error_code = ?1, error_message = ?2,
               updated_at = ?3 WHERE state = 'running'",
            params![
                ErrorCode::OperationInterrupted.as_str(),
                "the kiln daemon restarted while this operation ran; start-up recovery rolled its target back or finished it (see the sandbox's or snapshot's state), so check it and repeat the request if needed",
                now_rfc3339()
            ],
        )?)
    }

    /// Drops finished operations older than a day or beyond the newest thousand.
    fn prune_operations(&self) -> Result<()> {
        let cutoff = (chrono::Utc::now() - chrono::Duration::hours(KEEP_HOURS))
            .to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        self.conn().execute(
            "DELETE FROM operations WHERE state != 'running' AND (updated_at < ?1 OR id NOT IN
               (SELECT id FROM operations ORDER BY created_at DESC, rowid DESC LIMIT ?2))",
            params![cutoff, KEEP_AT_MOST],
        )?;
        Ok(())
    }
}

/// Operations running in this daemon: each can be waited for.
#[derive(Default)]
pub(crate) struct Registry {
    running: Mutex<HashMap<String, watch::Receiver<bool>>>,
}

impl Registry {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, watch::Receiver<bool>>> {
        self.running.lock().unwrap_or_else(|p| p.into_inner())
    }
}

struct Current {
    id: String,
    engine: Weak<Engine>,
}

tokio::task_local! {
    static CURRENT: Current;
}

/// Records where the operation running this task is (a no-op outside operations). Cheap: one short
/// UPDATE; called at a few milestones.
pub(crate) fn stage(what: &str) {
    let _ = CURRENT.try_with(|c| {
        if let Some(engine) = c.engine.upgrade() {
            if let Err(e) = engine.db().set_operation_stage(&c.id, what) {
                warn!(operation = %c.id, error = %e, "could not record an operation's stage");
            }
        }
    });
}

/// A started operation: its record, and its outcome once it finishes.
pub struct Started {
    pub operation: Operation,
    pub outcome: oneshot::Receiver<Result<serde_json::Value>>,
}

impl Started {
    /// Waits for the outcome. The operation does not depend on this wait: dropping it changes nothing.
    pub async fn outcome(self) -> Result<serde_json::Value> {
        self.outcome.await.unwrap_or_else(|_| {
            Err(Error::internal(
                "the operation ended without reporting its outcome; see GET /v1/operations",
            ))
        })
    }
}

impl Engine {
    /// On start-up, after recovery: what a previous daemon left running is recorded as interrupted.
    pub(crate) fn settle_interrupted_operations(&self) -> Result<()> {
        self.db().init_operations()?;
        let n = self.db().interrupt_operations()?;
        if n > 0 {
            warn!(
                count = n,
                "operations of the previous daemon recorded as interrupted"
            );
        }
        self.db().prune_operations()
    }

    /// Starts `work` as an operation the engine owns: recorded as running, then run in its own task to
    /// the end, whoever waits for it. `resources` names what it works on.
    pub fn start_operation<F, Fut>(
        self: &Arc<Self>,
        kind: &str,
        target: &str,
        mut resources: Resources,
        work: F,
    ) -> Result<Started>
    where
        F: FnOnce(Arc<Engine>) -> Fut + Send + 'static,
        Fut: Future<Output = Result<serde_json::Value>> + Send + 'static,
    {
        let now = now_rfc3339();
        let operation = Operation {
            id: ids::new_id("op"),
            kind: kind.to_string(),
            target: target.to_string(),
            resources: resources.clone(),
            state: OperationState::Running,
            stage: None,
            result: None,
            error: None,
            created_at: now.clone(),
            updated_at: now,
        };
        self.db().insert_operation(&operation)?;
        let (done_tx, done_rx) = watch::channel(false);
        self.operations()
            .lock()
            .insert(operation.id.clone(), done_rx);
        let (tx, rx) = oneshot::channel();
        let engine = self.clone();
        let (id, kind) = (operation.id.clone(), operation.kind.clone());
        let began = std::time::Instant::now();
        tokio::spawn(async move {
            let current = Current {
                id: id.clone(),
                engine: Arc::downgrade(&engine),
            };
            // The work runs in a task of its own so that a panic in it still ends in a recorded outcome.
            let inner = tokio::spawn(CURRENT.scope(current, work(engine.clone())));
            let outcome = match inner.await {
                Ok(r) => r,
                Err(e) => Err(Error::internal(format!(
                    "operation {id} ({kind}) failed unexpectedly: {e}; check the target's state"
                ))),
            };
            if let Ok(v) = &outcome {
                resources.add_from_result(&kind, v);
            }
            engine
                .metrics()
                .operation(&kind, outcome.is_ok(), began.elapsed());
            if let Err(e) = engine.db().finish_operation(&id, &resources, &outcome) {
                warn!(operation = %id, error = %e, "could not record an operation's outcome");
            }
            match &outcome {
                Ok(_) => info!(operation = %id, kind = %kind, "operation succeeded"),
                Err(e) => info!(operation = %id, kind = %kind, code = %e.code, "operation failed"),
            }
            engine.operations().lock().remove(&id);
            let _ = done_tx.send(true);
            let _ = tx.send(outcome);
            if let Err(e) = engine.db().prune_operations() {
                warn!(error = %e, "could not prune old operations");
            }
        });
        Ok(Started {
            operation,
            outcome: rx,
        })
    }

    pub fn get_operation(&self, id: &str) -> Result<Operation> {
        self.db().get_operation(id)?.ok_or_else(|| {
            Error::new(
                ErrorCode::OperationNotFound,
                format!("no operation has the id '{id}' (finished operations are kept for 24 hours, at most 1000); list them with `kiln operation list`"),
            )
        })
    }

    /// Operations, newest first; `target` matches an id any of them works on (a sandbox's name is
    /// taken for its id), `state` their state.
    pub fn list_operations(
        &self,
        target: Option<&str>,
        state: Option<&str>,
    ) -> Result<Vec<Operation>> {
        let state = match state {
            None => None,
            Some(s) => Some(OperationState::parse(s).ok_or_else(|| {
                Error::invalid(format!(
                    "unknown operation state '{s}'; use running, succeeded or failed"
                ))
            })?),
        };
        let ids: Vec<String> = match target {
            None => vec![],
            Some(t) => {
                let mut v = vec![t.to_string()];
                if let Ok(Some(sb)) = self.db().find_sandbox(t) {
                    v.push(sb.id);
                }
                v
            }
        };
        Ok(self
            .db()
            .list_operations()?
            .into_iter()
            .filter(|o| state.is_none_or(|s| o.state == s))
            .filter(|o| {
                target.is_none()
                    || ids
                        .iter()
                        .any(|id| o.target == *id || o.resources.contains(id))
            })
            .collect())
    }

    /// The operation once it finished, or as it is when `timeout` runs out.
    pub async fn wait_operation(&self, id: &str, timeout: Duration) -> Result<Operation> {
        let rx = self.operations().lock().get(id).cloned();
        if let Some(mut rx) = rx {
            let _ = tokio::time::timeout(timeout, rx.wait_for(|done| *done)).await;
        }
        self.get_operation(id)
    }

    /// How many operations are running in this daemon.
    pub fn running_operations(&self) -> usize {
        self.operations().lock().len()
    }

    /// For an orderly exit: waits until no operation runs, at most `limit`; returns how many still do.
    pub async fn drain_operations(&self, limit: Duration) -> usize {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let waiting: Vec<watch::Receiver<bool>> =
                self.operations().lock().values().cloned().collect();
            if waiting.is_empty() {
                return 0;
            }
            info!(
                count = waiting.len(),
                "waiting for running operations to finish"
            );
            for mut rx in waiting {
                if tokio::time::timeout_at(deadline, rx.wait_for(|done| *done))
                    .await
                    .is_err()
                {
                    return self.running_operations();
                }
            }
        }
    }
}

/// Resources naming one sandbox (by id when it exists, else as given).
pub fn sandbox_resources(engine: &Engine, id_or_name: &str) -> (String, Resources) {
    let id = engine
        .get(id_or_name)
        .map(|s| s.id)
        .unwrap_or_else(|_| id_or_name.to_string());
    (
        id.clone(),
        Resources {
            sandboxes: vec![id],
            ..Default::default()
        },
    )
}

/// Resources naming one snapshot (and, when it has one, its source sandbox).
pub fn snapshot_resources(engine: &Engine, id: &str, with_source: bool) -> (String, Resources) {
    // By id, whichever name the client used (names: snapshot/names.rs).
    let resolved = engine.resolve_snapshot(id);
    let id = resolved.as_deref().unwrap_or(id);
    let mut r = Resources {
        snapshots: vec![id.to_string()],
        ..Default::default()
    };
    if with_source {
        if let Ok(s) = engine.get_snapshot(id) {
            Resources::add(&mut r.sandboxes, &s.sandbox_id);
        }
    }
    (id.to_string(), r)
}

/// Resources naming one volume.
pub fn volume_resources(name: &str) -> (String, Resources) {
    (
        name.to_string(),
        Resources {
            volumes: vec![name.to_string()],
            ..Default::default()
        },
    )
}

/// A human-readable stage for a milestone an operation reaches (the fault-injection points).
pub(crate) fn stage_of_point(point: &str) -> Option<&'static str> {
    Some(match point {
        "create.launched" | "resume.launched" => "waiting for the guest",
        "snapshot.paused" => "saving device state and copying memory",
        "snapshot.written" => "publishing the snapshot's files",
        "fork.captured" => "starting the children",
        "stop.saved" => "publishing the saved state",
        "start.launched" => "loading the saved state",
        "delete.marked" => "ending the VM and removing files",
        "snapshot.deleting" => "removing the snapshot's files",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_finish_interrupt_prune() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("kiln.db")).unwrap();
        db.init_operations().unwrap();
        let mk = |id: &str, created: &str| Operation {
            id: id.into(),
            kind: "sandbox.stop".into(),
            target: "sb-1".into(),
            resources: Resources {
                sandboxes: vec!["sb-1".into()],
                ..Default::default()
            },
            state: OperationState::Running,
            stage: None,
            result: None,
            error: None,
            created_at: created.into(),
            updated_at: created.into(),
        };
        db.insert_operation(&mk("op-a", &now_rfc3339())).unwrap();
        db.insert_operation(&mk("op-b", "2000-01-01T00:00:00.000Z"))
            .unwrap();
        db.set_operation_stage("op-a", "saving").unwrap();
        assert_eq!(
            db.get_operation("op-a").unwrap().unwrap().stage.as_deref(),
            Some("saving")
        );
        let r = Resources::default();
        db.finish_operation("op-a", &r, &Ok(serde_json::json!({"state": "stopped"})))
            .unwrap();
        let a = db.get_operation("op-a").unwrap().unwrap();
        assert_eq!(a.state, OperationState::Succeeded);
        assert_eq!(a.result.unwrap()["state"], "stopped");
        // op-b was left running by a "previous daemon".
        assert_eq!(db.interrupt_operations().unwrap(), 1);
        let b = db.get_operation("op-b").unwrap().unwrap();
        assert_eq!(b.state, OperationState::Failed);
        assert_eq!(b.error.unwrap().code, "operation_interrupted");
        // op-b is finished and older than a day: pruned. op-a stays.
        db.conn()
            .execute(
                "UPDATE operations SET updated_at = created_at WHERE id = 'op-b'",
                [],
            )
            .unwrap();
        db.prune_operations().unwrap();
        assert!(db.get_operation("op-b").unwrap().is_none());
        assert!(db.get_operation("op-a").unwrap().is_some());
    }

    #[test]
    fn results_add_what_they_created() {
        let mut r = Resources::default();
        r.add_from_result(
            "sandbox.fork",
            &serde_json::json!({"sandboxes": [{"id": "sb-1"}, {"id": "sb-2"}]}),
        );
        r.add_from_result("snapshot.resume", &serde_json::json!({"id": "sb-3"}));
        r.add_from_result("snapshot.create", &serde_json::json!({"id": "s1"}));
        assert_eq!(r.sandboxes, ["sb-1", "sb-2", "sb-3"]);
        assert_eq!(r.snapshots, ["s1"]);
    }
}
