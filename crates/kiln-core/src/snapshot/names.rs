//! Names for snapshots: a snapshot can be given further names after it was taken (`saveNamed` in the
//! TypeScript SDK, `kiln snapshot name`), under which every route finds it. Ids and names share one
//! namespace, so a name resolves to exactly one snapshot. A name is a row of its own pointing at the
//! snapshot's id (nothing on disk is renamed: ids are baked into directories, manifests and diff bases), and
//! goes with its snapshot when that is deleted.

use rusqlite::{params, OptionalExtension};
use tracing::info;

use super::Snapshot;
use crate::db::Db;
use crate::engine::Engine;
use crate::error::{Error, ErrorCode, Result};
use crate::model::now_rfc3339;
use crate::validate;

impl Db {
    /// The id of the snapshot that has `name` as a further name.
    pub fn snapshot_named(&self, name: &str) -> Result<Option<String>> {
        let conn = self.conn();
        let mut stmt =
            conn.prepare_cached("SELECT snapshot_id FROM snapshot_names WHERE name = ?1")?;
        Ok(stmt.query_row([name], |r| r.get(0)).optional()?)
    }

    /// The further names of snapshot `id`, oldest first.
    pub fn snapshot_names(&self, id: &str) -> Result<Vec<String>> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT name FROM snapshot_names WHERE snapshot_id = ?1 ORDER BY created_at, name",
        )?;
        let rows = stmt.query_map([id], |r| r.get(0))?;
        Ok(rows.collect::<rusqlite::Result<Vec<String>>>()?)
    }

    fn insert_snapshot_name(&self, name: &str, id: &str) -> Result<()> {
        self.conn().execute(
            "INSERT INTO snapshot_names (name, snapshot_id, created_at) VALUES (?1, ?2, ?3)",
            params![name, id, now_rfc3339()],
        )?;
        Ok(())
    }
}

impl Engine {
    /// The id of the snapshot `id_or_name` is the id or a name of; `id_or_name` itself when it is neither
    /// (the lookup that follows then reports it missing, under the name the client used).
    pub fn resolve_snapshot(&self, id_or_name: &str) -> Result<String> {
        if self.db().find_snapshot(id_or_name)?.is_some() {
            return Ok(id_or_name.to_string());
        }
        Ok(self
            .db()
            .snapshot_named(id_or_name)?
            .unwrap_or_else(|| id_or_name.to_string()))
    }

    /// Gives snapshot `id_or_name` the further name `name`. Idempotent for a name it already has; a name
    /// that is another snapshot's id or name (or being taken by a capture) is refused with 409
    /// `snapshot_already_exists`.
    pub async fn name_snapshot(&self, id_or_name: &str, name: &str) -> Result<Snapshot> {
        validate::name("snapshot", name)?;
        let id = self.resolve_snapshot(id_or_name)?;
        // Checked and written under the claims mutex, like a capture's name and a deletion.
        let added = self.with_claims(|c| {
            if c.is_deleting(&id) || self.db().find_snapshot(&id)?.is_none() {
                return Err(Error::snapshot_not_found(id_or_name));
            }
            if name == id || self.db().snapshot_named(name)?.as_deref() == Some(id.as_str()) {
                return Ok(false);
            }
            if self.snapshot_name_taken(c, name)? {
                return Err(Error::new(
                    ErrorCode::SnapshotAlreadyExists,
                    format!("the name '{name}' is already taken by another snapshot (as its id or name); pick another name, or delete that snapshot first"),
                ));
            }
            self.db().insert_snapshot_name(name, &id)?;
            Ok(true)
        })?;
        if added {
            info!(snapshot = %id, name, "snapshot named");
        }
        self.get_snapshot(&id)
    }
}

#[cfg(test)]
mod tests {
    use crate::db::Db;

    #[test]
    fn names_go_with_their_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("kiln.db")).unwrap();
        let conn = db.conn();
        conn.execute(
            "INSERT INTO snapshots (id, sandbox_id, sandbox_name, kind, template, memory_mib, cpus,
               disk_size_bytes, size_bytes, labels, created_at)
             VALUES ('s1', 'sb', 'sb', 'full', 'tiny', 256, 1, 1, 1, '{}', 'now')",
            [],
        )
        .unwrap();
        drop(conn);
        db.insert_snapshot_name("keep", "s1").unwrap();
        assert!(db.insert_snapshot_name("keep", "s1").is_err());
        assert_eq!(db.snapshot_named("keep").unwrap().as_deref(), Some("s1"));
        assert_eq!(db.snapshot_names("s1").unwrap(), ["keep"]);
        // A name cannot point at a snapshot that does not exist.
        assert!(db.insert_snapshot_name("orphan", "nope").is_err());
        db.delete_snapshot("s1").unwrap();
        assert_eq!(db.snapshot_named("keep").unwrap(), None);
    }
}
