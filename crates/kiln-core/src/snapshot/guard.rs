//! Claims that make snapshot check-then-act steps atomic: the database alone cannot, since a snapshot's row
//! appears only at the end of its capture and disappears in the middle of its deletion.
//!
//! - A name is reserved from the moment it is checked free (in the database and among reservations) until
//!   its row exists or the capture fails.
//! - A snapshot in use as a base (a diff being built on it, a resume or restore reading its files) cannot be
//!   deleted, and one being deleted cannot be used.
//!
//! All checks and changes happen under one short-lived mutex; claims are released on drop.

use std::collections::{HashMap, HashSet};

use sha2::{Digest, Sha256};

use super::manifest::{Manifest, MANIFEST};
use crate::engine::Engine;
use crate::error::{Error, ErrorCode, Result};
use crate::model::Sandbox;
use crate::validate;

#[derive(Debug, Default)]
pub(crate) struct Claims {
    names: HashSet<String>,
    in_use: HashMap<String, usize>,
    deleting: HashSet<String>,
}

/// A snapshot name reserved for a capture in progress.
pub(crate) struct NameClaim<'a> {
    engine: &'a Engine,
    pub name: String,
}

/// A snapshot whose files are being read (kept from deletion).
pub(crate) struct UseClaim<'a> {
    engine: &'a Engine,
    id: String,
}

/// A snapshot being deleted (kept from new uses).
pub(crate) struct DeleteClaim<'a> {
    engine: &'a Engine,
    id: String,
}

impl Claims {
    pub(crate) fn is_deleting(&self, id: &str) -> bool {
        self.deleting.contains(id)
    }
}

impl Drop for NameClaim<'_> {
    fn drop(&mut self) {
        self.engine.with_claims(|c| c.names.remove(&self.name));
    }
}

impl Drop for UseClaim<'_> {
    fn drop(&mut self) {
        self.engine.with_claims(|c| {
            if let Some(n) = c.in_use.get_mut(&self.id) {
                *n -= 1;
                if *n == 0 {
                    c.in_use.remove(&self.id);
                }
            }
        });
    }
}

impl Drop for DeleteClaim<'_> {
    fn drop(&mut self) {
        self.engine.with_claims(|c| c.deleting.remove(&self.id));
    }
}

impl Engine {
    /// Content identity of a diff's base (`template:NAME` or `snapshot:ID`): the SHA-256 of the template's
    /// `image.json` (which names its files' digests) or of the parent snapshot's manifest (which names its
    /// files' checksums). A rebuilt template or a re-created snapshot of the same name has another.
    pub(crate) fn base_digest(&self, parent: &str) -> Result<String> {
        let missing = |why: String| {
            Error::new(
                ErrorCode::SnapshotBaseMissing,
                format!("the base {parent} {why}; use a full snapshot instead"),
            )
        };
        let path = match parent.split_once(':') {
            Some(("snapshot", id)) => {
                if self.db().find_snapshot(id)?.is_none() {
                    return Err(missing("was deleted".into()));
                }
                self.config().snapshot_dir(id).join(MANIFEST)
            }
            Some(("template", name)) => {
                self.images()
                    .get(name)
                    .map_err(|e| missing(format!("is gone ({e})")))?;
                self.config()
                    .images_dir()
                    .join(name)
                    .join(kiln_image::MANIFEST_FILE)
            }
            _ => return Err(Error::internal(format!("unknown base '{parent}'"))),
        };
        let bytes = std::fs::read(&path)
            .map_err(|e| missing(format!("cannot be read ({}: {e})", path.display())))?;
        Ok(format!("sha256:{}", hex::encode(Sha256::digest(&bytes))))
    }

    /// Refuses (`snapshot_base_changed`) a diff snapshot whose base is no longer the content it was
    /// taken on. Manifests without a pin (written before pinning) pass: they are "unpinned".
    pub(crate) fn check_base_pin(&self, m: &Manifest) -> Result<()> {
        let (Some(parent), Some(pinned)) = (&m.parent, &m.base_digest) else {
            return Ok(());
        };
        let now = match self.base_digest(parent) {
            Ok(now) => now,
            // A base that is gone is reported by the file check, which names the missing path.
            Err(e) if e.code == ErrorCode::SnapshotBaseMissing => return Ok(()),
            Err(e) => return Err(e),
        };
        if &now != pinned {
            return Err(Error::new(
                ErrorCode::SnapshotBaseChanged,
                format!("diff snapshot {} was taken on {parent} with digest {pinned}, but {parent} is now {now} (rebuilt, or deleted and its name reused): its base is not the one it was built on. Resume or restore a full snapshot instead", m.id),
            ));
        }
        Ok(())
    }

    /// Reserves the requested snapshot name, or a generated `snap-<sandbox>-<unix time>[-N]`.
    pub(crate) fn claim_snapshot_name(
        &self,
        sb: &Sandbox,
        requested: Option<String>,
    ) -> Result<NameClaim<'_>> {
        if let Some(id) = &requested {
            validate::name("snapshot", id)?;
        }
        let unix = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let base: String = format!("snap-{}-{unix}", sb.name)
            .chars()
            .take(60)
            .collect();
        let name = self.with_claims(|c| {
            let taken = |c: &Claims, id: &str| self.snapshot_name_taken(c, id);
            let id = match requested {
                Some(id) => {
                    if taken(c, &id)? {
                        return Err(Error::new(
                            ErrorCode::SnapshotAlreadyExists,
                            format!("a snapshot named '{id}' already exists (or is being taken); pick another name or delete it first"),
                        ));
                    }
                    id
                }
                None => {
                    let mut id = base.clone();
                    let mut n = 2;
                    while taken(c, &id)? {
                        id = format!("{base}-{n}");
                        n += 1;
                    }
                    id
                }
            };
            c.names.insert(id.clone());
            Ok(id)
        })?;
        Ok(NameClaim { engine: self, name })
    }

    /// Reserves `id` for a snapshot being imported (same namespace and rule as captures).
    pub(crate) fn claim_import_name(&self, id: &str) -> Result<NameClaim<'_>> {
        validate::name("snapshot", id)?;
        self.with_claims(|c| {
            if self.snapshot_name_taken(c, id)? {
                return Err(Error::new(
                    ErrorCode::SnapshotAlreadyExists,
                    format!("a snapshot named '{id}' already exists (or is being taken); import under another name (`--name`) or delete it first"),
                ));
            }
            c.names.insert(id.to_string());
            Ok(())
        })?;
        Ok(NameClaim {
            engine: self,
            name: id.to_string(),
        })
    }

    /// Whether `name` is a snapshot's id, another name of one (snapshot/names.rs), or being taken by a
    /// capture: ids and names share one namespace. Called under the claims mutex.
    pub(crate) fn snapshot_name_taken(&self, c: &Claims, name: &str) -> Result<bool> {
        Ok(c.names.contains(name)
            || self.db().find_snapshot(name)?.is_some()
            || self.db().snapshot_named(name)?.is_some())
    }

    /// Keeps snapshot `id` from deletion while its files are read; refused (with `code`) if it is gone
    /// or being deleted.
    pub(crate) fn claim_use(&self, id: &str, code: ErrorCode) -> Result<UseClaim<'_>> {
        self.with_claims(|c| {
            if c.deleting.contains(id) || self.db().find_snapshot(id)?.is_none() {
                return Err(Error::new(
                    code,
                    format!(
                        "snapshot '{id}' was deleted (or is being deleted); nothing was changed"
                    ),
                ));
            }
            *c.in_use.entry(id.to_string()).or_default() += 1;
            Ok(())
        })?;
        Ok(UseClaim {
            engine: self,
            id: id.to_string(),
        })
    }

    /// Marks snapshot `id` as being deleted; refused while it is in use or diff snapshots build on it.
    pub(crate) fn claim_delete(&self, id: &str) -> Result<DeleteClaim<'_>> {
        self.with_claims(|c| {
            if c.in_use.contains_key(id) || c.deleting.contains(id) {
                return Err(Error::new(
                    ErrorCode::SnapshotInUse,
                    format!("snapshot {id} is in use right now (a diff snapshot is being built on it, or it is being resumed, restored or deleted); try again when that is done"),
                ));
            }
            let children = self.db().snapshot_children(id)?;
            if !children.is_empty() {
                return Err(Error::new(
                    ErrorCode::SnapshotInUse,
                    format!(
                        "diff snapshots build on {id}: {}; delete them first",
                        children.join(", ")
                    ),
                ));
            }
            c.deleting.insert(id.to_string());
            Ok(())
        })?;
        Ok(DeleteClaim {
            engine: self,
            id: id.to_string(),
        })
    }
}
