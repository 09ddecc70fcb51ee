//! Snapshot rows in the state database.

use rusqlite::{params, OptionalExtension, Row};

use super::{Snapshot, SnapshotType};
use crate::db::Db;
use crate::error::{Error, ErrorCode, Result};

impl Db {
    pub fn insert_snapshot(&self, s: &Snapshot, ephemeral: bool) -> Result<()> {
        let conn = self.conn();
        conn.execute(
            "INSERT INTO snapshots (id, sandbox_id, sandbox_name, kind, parent, template, memory_mib, cpus,
               disk_size_bytes, size_bytes, labels, restored, restored_at, ephemeral, created_at,
               max_memory_mib, pause_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17)",
            params![
                s.id,
                s.sandbox_id,
                s.sandbox_name,
                s.kind.as_str(),
                s.parent,
                s.template,
                s.memory_mib,
                s.cpus,
                s.disk_size_bytes,
                s.size_bytes,
                serde_json::to_string(&s.labels).unwrap_or_default(),
                s.restored,
                s.restored_at,
                ephemeral,
                s.created_at,
                s.max_memory_mib,
                s.pause_ms
            ],
        )
        .map_err(|e| match e {
            rusqlite::Error::SqliteFailure(f, _) if f.code == rusqlite::ErrorCode::ConstraintViolation => Error::new(
                ErrorCode::SnapshotAlreadyExists,
                format!("a snapshot named '{}' already exists; pick another name or delete it first", s.id),
            ),
            other => other.into(),
        })?;
        drop(conn);
        self.events().snapshot("snapshot.created", s, ephemeral);
        Ok(())
    }

    pub fn find_snapshot(&self, id: &str) -> Result<Option<Snapshot>> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached("SELECT * FROM snapshots WHERE id = ?1")?;
        Ok(stmt.query_row([id], row_to_snapshot).optional()?)
    }

    /// Named snapshots (fork captures are ephemeral and not listed).
    pub fn list_snapshots(&self) -> Result<Vec<Snapshot>> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT * FROM snapshots WHERE ephemeral = 0 ORDER BY created_at, id",
        )?;
        let rows = stmt.query_map([], row_to_snapshot)?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    }

    pub fn mark_restored(&self, id: &str, when: &str) -> Result<()> {
        self.conn().execute(
            "UPDATE snapshots SET restored = 1, restored_at = ?2 WHERE id = ?1",
            params![id, when],
        )?;
        Ok(())
    }

    pub fn delete_snapshot(&self, id: &str) -> Result<()> {
        let before = self.find_snapshot(id)?;
        let ephemeral: bool = self
            .conn()
            .query_row("SELECT ephemeral FROM snapshots WHERE id = ?1", [id], |r| {
                r.get(0)
            })
            .optional()?
            .unwrap_or(false);
        self.conn()
            .execute("DELETE FROM snapshots WHERE id = ?1", [id])?;
        if let Some(snap) = before {
            self.events().snapshot("snapshot.deleted", &snap, ephemeral);
        }
        Ok(())
    }

    /// Diff snapshots whose parent is `snapshot:ID`.
    pub fn snapshot_children(&self, id: &str) -> Result<Vec<String>> {
        let conn = self.conn();
        let mut stmt =
            conn.prepare_cached("SELECT id FROM snapshots WHERE parent = ?1 AND kind = 'diff'")?;
        let rows = stmt.query_map([format!("snapshot:{id}")], |r| r.get(0))?;
        Ok(rows.collect::<rusqlite::Result<Vec<String>>>()?)
    }
}

fn row_to_snapshot(r: &Row<'_>) -> rusqlite::Result<Snapshot> {
    let kind: String = r.get("kind")?;
    let labels: String = r.get("labels")?;
    Ok(Snapshot {
        id: r.get("id")?,
        sandbox_id: r.get("sandbox_id")?,
        sandbox_name: r.get("sandbox_name")?,
        kind: SnapshotType::parse(&kind).unwrap_or_default(),
        parent: r.get("parent")?,
        template: r.get("template")?,
        memory_mib: r.get("memory_mib")?,
        cpus: r.get("cpus")?,
        disk_size_bytes: r.get("disk_size_bytes")?,
        size_bytes: r.get("size_bytes")?,
        labels: serde_json::from_str(&labels).unwrap_or_default(),
        restored: r.get("restored")?,
        restored_at: r.get("restored_at")?,
        created_at: r.get("created_at")?,
        warm_spares: 0,
        names: Vec::new(),
        expires_at: None,
        max_memory_mib: r.get("max_memory_mib")?,
        pause_ms: r.get("pause_ms")?,
        template_snapshot: None,
    })
}
