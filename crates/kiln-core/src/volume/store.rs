//! Volume rows and attachments in the state database.

use std::collections::HashMap;

use rusqlite::{params, Connection, OptionalExtension};

use super::{Attachment, Volume, VolumeMount};
use crate::db::{from_json, to_json, Db};
use crate::error::Result;

impl Db {
    pub fn insert_volume(&self, v: &Volume) -> Result<()> {
        self.conn().execute(
            "INSERT INTO volumes (name, size_bytes, labels, created_at) VALUES (?1, ?2, ?3, ?4)",
            params![v.name, v.size_bytes, to_json(&v.labels), v.created_at],
        )?;
        let object = self
            .find_volume(&v.name)?
            .and_then(|v| serde_json::to_value(v).ok());
        self.events()
            .publish("volume.created", &v.name, None, None, object);
        Ok(())
    }

    pub fn find_volume(&self, name: &str) -> Result<Option<Volume>> {
        let conn = self.conn();
        let vol = conn
            .query_row(
                "SELECT name, size_bytes, labels, created_at FROM volumes WHERE name = ?1",
                [name],
                row_to_volume,
            )
            .optional()?;
        let Some(mut vol) = vol else {
            return Ok(None);
        };
        vol.attachments = attachments_of(&conn, name)?;
        Ok(Some(vol))
    }

    pub fn list_volumes(&self) -> Result<Vec<Volume>> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT name, size_bytes, labels, created_at FROM volumes ORDER BY name",
        )?;
        let mut vols = stmt
            .query_map([], row_to_volume)?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        for v in &mut vols {
            v.attachments = attachments_of(&conn, &v.name)?;
        }
        Ok(vols)
    }

    pub fn delete_volume(&self, name: &str) -> Result<()> {
        self.conn()
            .execute("DELETE FROM volumes WHERE name = ?1", [name])?;
        self.events()
            .publish("volume.deleted", name, None, None, None);
        Ok(())
    }

    /// Records the volumes of a sandbox, replacing what it had.
    pub fn set_attachments(&self, sandbox_id: &str, mounts: &[VolumeMount]) -> Result<()> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        tx.execute(
            "DELETE FROM attachments WHERE sandbox_id = ?1",
            [sandbox_id],
        )?;
        for m in mounts {
            tx.execute(
                "INSERT INTO attachments (sandbox_id, volume, path, read_only) VALUES (?1, ?2, ?3, ?4)",
                params![sandbox_id, m.volume, m.path, m.read_only],
            )?;
        }
        tx.commit()?;
        Ok(())
    }
}

fn row_to_volume(r: &rusqlite::Row<'_>) -> rusqlite::Result<Volume> {
    Ok(Volume {
        name: r.get(0)?,
        size_bytes: r.get(1)?,
        labels: from_json(r.get(2)?),
        created_at: r.get(3)?,
        allocated_bytes: 0,
        attachments: Vec::new(),
    })
}

fn attachments_of(conn: &Connection, volume: &str) -> Result<Vec<Attachment>> {
    let mut stmt = conn.prepare_cached(
        "SELECT a.sandbox_id, s.name, a.path, a.read_only FROM attachments a
         JOIN sandboxes s ON s.id = a.sandbox_id WHERE a.volume = ?1 ORDER BY s.name",
    )?;
    let rows = stmt.query_map([volume], |r| {
        Ok(Attachment {
            sandbox_id: r.get(0)?,
            sandbox_name: r.get(1)?,
            path: r.get(2)?,
            read_only: r.get(3)?,
        })
    })?;
    Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
}

/// The volumes of one sandbox, by mount path.
pub(crate) fn mounts_of(conn: &Connection, sandbox_id: &str) -> rusqlite::Result<Vec<VolumeMount>> {
    let mut stmt = conn.prepare_cached(
        "SELECT volume, path, read_only FROM attachments WHERE sandbox_id = ?1 ORDER BY path",
    )?;
    let rows = stmt.query_map([sandbox_id], |r| {
        Ok(VolumeMount {
            volume: r.get(0)?,
            path: r.get(1)?,
            read_only: r.get(2)?,
        })
    })?;
    rows.collect()
}

/// The volumes of every sandbox, by sandbox id.
pub(crate) fn all_mounts(conn: &Connection) -> rusqlite::Result<HashMap<String, Vec<VolumeMount>>> {
    let mut stmt = conn.prepare_cached(
        "SELECT sandbox_id, volume, path, read_only FROM attachments ORDER BY sandbox_id, path",
    )?;
    let mut out: HashMap<String, Vec<VolumeMount>> = HashMap::new();
    let rows = stmt.query_map([], |r| {
        Ok((
            r.get::<_, String>(0)?,
            VolumeMount {
                volume: r.get(1)?,
                path: r.get(2)?,
                read_only: r.get(3)?,
            },
        ))
    })?;
    for row in rows {
        let (id, m) = row?;
        out.entry(id).or_default().push(m);
    }
    Ok(out)
}
