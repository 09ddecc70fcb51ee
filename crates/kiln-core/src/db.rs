//! The state database (SQLite, WAL). One connection behind a mutex: every statement is short.

use std::path::Path;
use std::sync::Mutex;

use rusqlite::{params, Connection, OptionalExtension, Row};

use crate::error::{Error, Result};
use crate::model::{Sandbox, SandboxState};

const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE sandboxes (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    template TEXT NOT NULL,
    state TEXT NOT NULL,
    memory_mib INTEGER NOT NULL,
    cpus INTEGER NOT NULL,
    disk_size_bytes INTEGER NOT NULL,
    env TEXT NOT NULL,
    labels TEXT NOT NULL,
    ports TEXT NOT NULL,
    hostname TEXT NOT NULL,
    mac TEXT NOT NULL,
    accel TEXT NOT NULL,
    pid INTEGER,
    error TEXT,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
"#,
    r#"
ALTER TABLE sandboxes ADD COLUMN layout TEXT;
ALTER TABLE sandboxes ADD COLUMN origin TEXT NOT NULL DEFAULT '';
ALTER TABLE sandboxes ADD COLUMN restored_from TEXT;
CREATE TABLE snapshots (
    id TEXT PRIMARY KEY,
    sandbox_id TEXT NOT NULL,
    sandbox_name TEXT NOT NULL,
    kind TEXT NOT NULL,
    parent TEXT,
    template TEXT NOT NULL,
    memory_mib INTEGER NOT NULL,
    cpus INTEGER NOT NULL,
    disk_size_bytes INTEGER NOT NULL,
    size_bytes INTEGER NOT NULL,
    labels TEXT NOT NULL,
    restored INTEGER NOT NULL DEFAULT 0,
    restored_at TEXT,
    ephemeral INTEGER NOT NULL DEFAULT 0,
    created_at TEXT NOT NULL
);
CREATE INDEX snapshots_by_sandbox ON snapshots(sandbox_id);
"#,
    r#"
CREATE TABLE volumes (
    name TEXT PRIMARY KEY,
    size_bytes INTEGER NOT NULL,
    labels TEXT NOT NULL,
    created_at TEXT NOT NULL
);
CREATE TABLE attachments (
    sandbox_id TEXT NOT NULL REFERENCES sandboxes(id) ON DELETE CASCADE,
    volume TEXT NOT NULL REFERENCES volumes(name),
    path TEXT NOT NULL,
    read_only INTEGER NOT NULL,
    PRIMARY KEY (sandbox_id, path)
);
CREATE INDEX attachments_by_volume ON attachments(volume);
"#,
    r#"
ALTER TABLE sandboxes ADD COLUMN egress INTEGER NOT NULL DEFAULT 1;
ALTER TABLE sandboxes ADD COLUMN qemu_uid INTEGER;
"#,
    // Names given to snapshots after they were taken (snapshot/names.rs); they go with their snapshot.
    r#"
CREATE TABLE snapshot_names (
    name TEXT PRIMARY KEY,
    snapshot_id TEXT NOT NULL REFERENCES snapshots(id) ON DELETE CASCADE,
    created_at TEXT NOT NULL
);
CREATE INDEX snapshot_names_by_snapshot ON snapshot_names(snapshot_id);
"#,
    // Sandbox lifetimes and snapshot expiry (lifetime/); times in unix milliseconds.
    r#"
CREATE TABLE lifetimes (
    sandbox_id TEXT PRIMARY KEY REFERENCES sandboxes(id) ON DELETE CASCADE,
    timeout_secs INTEGER,
    expires_at_ms INTEGER,
    idle_secs INTEGER,
    on_timeout TEXT NOT NULL,
    auto_resume INTEGER NOT NULL
);
CREATE TABLE snapshot_expiry (
    snapshot_id TEXT PRIMARY KEY REFERENCES snapshots(id) ON DELETE CASCADE,
    expires_at_ms INTEGER NOT NULL
);
"#,
    // The headroom a snapshot's machine has (issue 12); NULL for none and for snapshots taken before.
    r#"
ALTER TABLE snapshots ADD COLUMN max_memory_mib INTEGER;
"#,
    // Continuous checkpoints (issue 16): per-sandbox policies, and the pause each capture cost.
    r#"
CREATE TABLE checkpoint_policies (
    sandbox_id TEXT PRIMARY KEY REFERENCES sandboxes(id) ON DELETE CASCADE,
    every_secs INTEGER NOT NULL,
    keep INTEGER NOT NULL
);
ALTER TABLE snapshots ADD COLUMN pause_ms INTEGER;
"#,
    // The sandbox a fork's child was forked from (the dashboard's lineage tree); NULL for others.
    r#"
ALTER TABLE sandboxes ADD COLUMN forked_from TEXT;
"#,
    // Bridged networking (issue 19): the sandbox's named network and its address (net/mod.rs), unique
    // so two sandboxes never hold one.
    r#"
ALTER TABLE sandboxes ADD COLUMN network TEXT;
ALTER TABLE sandboxes ADD COLUMN address TEXT;
CREATE UNIQUE INDEX sandboxes_address ON sandboxes(address);
"#,
];

pub struct Db {
    conn: Mutex<Connection>,
    /// Every committed change is published here (events.rs), after the connection's lock is released.
    events: crate::events::Hub,
}

impl Db {
    pub fn open(path: &Path) -> Result<Db> {
        let conn = Connection::open(path).map_err(|e| {
            Error::internal(format!(
                "cannot open state database {}: {e}",
                path.display()
            ))
        })?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        // FULL: a commit is on disk when it returns (NORMAL in WAL mode may lose the last commits at a power
        // cut, so an acknowledged snapshot or delete could come back or vanish).
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        let db = Db {
            conn: Mutex::new(conn),
            events: Default::default(),
        };
        db.migrate()?;
        Ok(db)
    }

    pub fn events(&self) -> &crate::events::Hub {
        &self.events
    }

    /// Publishes a sandbox's change as it now stands in the database.
    fn sandbox_changed(&self, kind: &str, id: &str) {
        if let Ok(Some(sb)) = self.find_sandbox(id) {
            self.events.sandbox(kind, &sb);
        }
    }

    pub(crate) fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.lock()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave SQLite itself inconsistent, so poisoning is ignored.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn migrate(&self) -> Result<()> {
        let mut conn = self.lock();
        let version: usize = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        if version > MIGRATIONS.len() {
            return Err(Error::internal(format!(
                "the state database has schema version {version}, newer than this kiln understands ({}); upgrade kiln",
                MIGRATIONS.len()
            )));
        }
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(version) {
            let tx = conn.transaction()?;
            tx.execute_batch(sql)?;
            tx.pragma_update(None, "user_version", i + 1)?;
            tx.commit()?;
        }
        Ok(())
    }

    pub fn insert_sandbox(&self, s: &Sandbox) -> Result<()> {
        let conn = self.lock();
        conn.execute(
            "INSERT INTO sandboxes (id, name, template, state, memory_mib, cpus, disk_size_bytes, env, labels,
               ports, hostname, mac, accel, pid, error, created_at, updated_at, origin, egress, qemu_uid)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20)",
            params![
                s.id,
                s.name,
                s.template,
                s.state.as_str(),
                s.memory_mib,
                s.cpus,
                s.disk_size_bytes,
                to_json(&s.env),
                to_json(&s.labels),
                to_json(&s.ports),
                s.hostname,
                s.mac,
                s.accel,
                s.pid,
                s.error,
                s.created_at,
                s.updated_at,
                s.origin,
                s.egress,
                s.qemu_uid
            ],
        )
        .map_err(|e| match e {
            rusqlite::Error::SqliteFailure(f, _) if f.code == rusqlite::ErrorCode::ConstraintViolation => {
                name_taken(&s.name)
            }
            other => other.into(),
        })?;
        drop(conn);
        self.sandbox_changed("sandbox.created", &s.id);
        Ok(())
    }

    /// Looks a sandbox up by id, then by name.
    pub fn find_sandbox(&self, id_or_name: &str) -> Result<Option<Sandbox>> {
        let conn = self.lock();
        let mut stmt = conn.prepare_cached(
            "SELECT * FROM sandboxes WHERE id = ?1 OR name = ?1 ORDER BY id = ?1 DESC LIMIT 1",
        )?;
        let Some(mut sb) = stmt.query_row([id_or_name], row_to_sandbox).optional()? else {
            return Ok(None);
        };
        sb.volumes = crate::volume::store::mounts_of(&conn, &sb.id)?;
        Ok(Some(sb))
    }

    pub fn list_sandboxes(&self) -> Result<Vec<Sandbox>> {
        let conn = self.lock();
        let mut stmt = conn.prepare_cached("SELECT * FROM sandboxes ORDER BY created_at, id")?;
        let rows = stmt.query_map([], row_to_sandbox)?;
        let mut sandboxes = rows.collect::<rusqlite::Result<Vec<_>>>()?;
        let mut mounts = crate::volume::store::all_mounts(&conn)?;
        for sb in &mut sandboxes {
            sb.volumes = mounts.remove(&sb.id).unwrap_or_default();
        }
        Ok(sandboxes)
    }

    pub fn set_state(
        &self,
        id: &str,
        state: SandboxState,
        pid: Option<u32>,
        error: Option<&str>,
    ) -> Result<()> {
        let conn = self.lock();
        conn.execute(
            "UPDATE sandboxes SET state = ?2, pid = ?3, error = ?4, updated_at = ?5 WHERE id = ?1",
            params![id, state.as_str(), pid, error, crate::model::now_rfc3339()],
        )?;
        drop(conn);
        self.sandbox_changed("sandbox.state", id);
        Ok(())
    }

    /// After the root disk grew online (template_fit.rs).
    pub fn set_disk_size(&self, id: &str, bytes: u64) -> Result<()> {
        self.lock().execute(
            "UPDATE sandboxes SET disk_size_bytes = ?2, updated_at = ?3 WHERE id = ?1",
            params![id, bytes as i64, crate::model::now_rfc3339()],
        )?;
        Ok(())
    }

    pub fn set_ports(&self, id: &str, ports: &[crate::model::PortMapping]) -> Result<()> {
        self.lock().execute(
            "UPDATE sandboxes SET ports = ?2, updated_at = ?3 WHERE id = ?1",
            params![id, to_json(&ports), crate::model::now_rfc3339()],
        )?;
        Ok(())
    }

    pub fn set_layout(&self, id: &str, layout: &crate::layout::Layout) -> Result<()> {
        self.lock().execute(
            "UPDATE sandboxes SET layout = ?2, updated_at = ?3 WHERE id = ?1",
            params![id, to_json(layout), crate::model::now_rfc3339()],
        )?;
        Ok(())
    }

    pub fn layout(&self, id: &str) -> Result<Option<crate::layout::Layout>> {
        let conn = self.lock();
        let raw: Option<Option<String>> = conn
            .query_row("SELECT layout FROM sandboxes WHERE id = ?1", [id], |r| {
                r.get(0)
            })
            .optional()?;
        match raw.flatten() {
            None => Ok(None),
            Some(json) => serde_json::from_str(&json).map(Some).map_err(|e| {
                Error::internal(format!(
                    "the stored layout of sandbox {id} is unreadable ({e}); run `kiln doctor`"
                ))
            }),
        }
    }

    pub fn set_forked_from(&self, id: &str, source: &str) -> Result<()> {
        self.lock().execute(
            "UPDATE sandboxes SET forked_from = ?2 WHERE id = ?1",
            params![id, source],
        )?;
        Ok(())
    }

    pub fn set_restored_from(&self, id: &str, snapshot: Option<&str>) -> Result<()> {
        self.lock().execute(
            "UPDATE sandboxes SET restored_from = ?2 WHERE id = ?1",
            params![id, snapshot],
        )?;
        Ok(())
    }

    /// Makes a warm spare the sandbox a client asked for: its name, hostname, labels and origin.
    pub fn claim_spare(&self, id: &str, claimed: &Sandbox) -> Result<()> {
        let now = crate::model::now_rfc3339();
        self.lock()
            .execute(
                "UPDATE sandboxes SET name = ?2, hostname = ?3, labels = ?4, origin = ?5, created_at = ?6,
                   updated_at = ?6, env = ?7, ports = ?8 WHERE id = ?1",
                params![
                    id,
                    claimed.name,
                    claimed.hostname,
                    to_json(&claimed.labels),
                    claimed.origin,
                    now,
                    to_json(&claimed.env),
                    to_json(&claimed.ports)
                ],
            )
            .map_err(|e| match e {
                rusqlite::Error::SqliteFailure(f, _)
                    if f.code == rusqlite::ErrorCode::ConstraintViolation =>
                {
                    name_taken(&claimed.name)
                }
                other => other.into(),
            })?;
        // A warm spare becomes a client's sandbox here: its creation as far as clients can tell.
        self.sandbox_changed("sandbox.created", id);
        Ok(())
    }

    /// VM uids held by sandboxes (whatever their state: a stopped sandbox keeps its files' owner).
    pub fn qemu_uids(&self) -> Result<Vec<u32>> {
        let conn = self.lock();
        let mut stmt =
            conn.prepare_cached("SELECT qemu_uid FROM sandboxes WHERE qemu_uid IS NOT NULL")?;
        let rows = stmt.query_map([], |r| r.get::<_, u32>(0))?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    }

    pub fn delete_sandbox(&self, id: &str) -> Result<()> {
        let before = self.find_sandbox(id)?;
        self.lock()
            .execute("DELETE FROM sandboxes WHERE id = ?1", [id])?;
        if let Some(sb) = before.filter(|sb| sb.id == id) {
            self.events.sandbox("sandbox.deleted", &sb);
        }
        Ok(())
    }
}

fn name_taken(name: &str) -> Error {
    Error::new(
        crate::ErrorCode::SandboxNameTaken,
        format!("a sandbox named '{name}' already exists; pick another name or delete it first"),
    )
}

pub(crate) fn to_json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_else(|_| "null".to_string())
}

pub(crate) fn from_json<T: serde::de::DeserializeOwned + Default>(s: String) -> T {
    serde_json::from_str(&s).unwrap_or_default()
}

fn row_to_sandbox(r: &Row<'_>) -> rusqlite::Result<Sandbox> {
    let state: String = r.get("state")?;
    Ok(Sandbox {
        id: r.get("id")?,
        name: r.get("name")?,
        template: r.get("template")?,
        // An unknown state (a row written by a newer kiln, or edited by hand) is reported as failed rather
        // than crashing the daemon.
        state: SandboxState::parse(&state).unwrap_or(SandboxState::Failed),
        memory_mib: r.get("memory_mib")?,
        cpus: r.get("cpus")?,
        disk_size_bytes: r.get("disk_size_bytes")?,
        env: from_json(r.get("env")?),
        labels: from_json(r.get("labels")?),
        ports: from_json(r.get("ports")?),
        hostname: r.get("hostname")?,
        mac: r.get("mac")?,
        accel: r.get("accel")?,
        pid: r.get("pid")?,
        error: r.get("error")?,
        created_at: r.get("created_at")?,
        updated_at: r.get("updated_at")?,
        origin: r.get("origin")?,
        restored_from: r.get("restored_from")?,
        forked_from: r.get("forked_from")?,
        volumes: Vec::new(),
        egress: r.get("egress")?,
        qemu_uid: r.get("qemu_uid")?,
        // Filled in by the engine, which knows what this daemon enforces.
        confined: false,
        volume_notes: Vec::new(),
        lifetime: None,
        checkpoint_policy: None,
        max_memory_mib: r
            .get::<_, Option<String>>("layout")?
            .as_deref()
            .and_then(layout_max_memory),
        boot: None,
        network: r.get("network")?,
        address: r.get("address")?,
        address6: None,
    })
}

/// `max_memory_mib` of a stored layout, without reading the rest of it.
fn layout_max_memory(layout: &str) -> Option<u64> {
    #[derive(serde::Deserialize)]
    struct Headroom {
        max_memory_mib: Option<u64>,
    }
    serde_json::from_str::<Headroom>(layout)
        .ok()
        .and_then(|h| h.max_memory_mib)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(id: &str, name: &str) -> Sandbox {
        Sandbox {
            id: id.into(),
            name: name.into(),
            template: "tiny".into(),
            state: SandboxState::Creating,
            memory_mib: 256,
            cpus: 1,
            disk_size_bytes: 1 << 30,
            env: [("A".to_string(), "1".to_string())].into(),
            labels: Default::default(),
            ports: vec![],
            hostname: name.into(),
            mac: "52:54:00:00:00:01".into(),
            accel: "tcg".into(),
            pid: None,
            error: None,
            created_at: crate::model::now_rfc3339(),
            updated_at: crate::model::now_rfc3339(),
            origin: "template:tiny".into(),
            restored_from: None,
            forked_from: None,
            volumes: vec![],
            egress: true,
            qemu_uid: None,
            confined: false,
            volume_notes: Vec::new(),
            lifetime: None,
            checkpoint_policy: None,
            max_memory_mib: None,
            boot: None,
            network: None,
            address: None,
            address6: None,
        }
    }

    #[test]
    fn insert_find_update_delete() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("kiln.db")).unwrap();
        db.insert_sandbox(&sample("sb-1", "one")).unwrap();
        let err = db.insert_sandbox(&sample("sb-2", "one")).unwrap_err();
        assert_eq!(err.code, crate::ErrorCode::SandboxNameTaken);
        assert_eq!(db.find_sandbox("one").unwrap().unwrap().id, "sb-1");
        assert_eq!(db.find_sandbox("sb-1").unwrap().unwrap().env["A"], "1");
        db.set_state("sb-1", SandboxState::Running, Some(42), None)
            .unwrap();
        let s = db.find_sandbox("sb-1").unwrap().unwrap();
        assert_eq!((s.state, s.pid), (SandboxState::Running, Some(42)));
        db.delete_sandbox("sb-1").unwrap();
        assert!(db.find_sandbox("sb-1").unwrap().is_none());
        // Reopening runs no migration twice.
        drop(db);
        Db::open(&dir.path().join("kiln.db")).unwrap();
    }
}
