//! Garbage collection: deletes the chunks no manifest references.
//!
//! The rule that keeps it safe against a push running at the same time: a chunk is deleted only when no
//! manifest references it **and** it was written longer ago than the grace period (24 h by default). A
//! push uploads every chunk it does not find, and uploads again every chunk it finds older than
//! [`crate::push::REFRESH_AFTER`] (12 h), so each chunk a running push relies on is younger than the grace
//! period until its manifest is written, as long as the push takes less than 12 h. Chunks are listed
//! before manifests, so a manifest written after the listing still protects them through their age. A
//! grace period shorter than 12 h is safe only while no push runs.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use object_store::path::Path as ObjPath;
use object_store::ObjectMeta;
use serde::Serialize;

use crate::chunk::chunk_key;
use crate::{Error, Remote, Result, PARALLEL};

#[derive(Debug, Clone, Default, Serialize, utoipa::ToSchema)]
pub struct GcReport {
    pub remote: String,
    pub manifests: u64,
    pub chunks: u64,
    pub referenced: u64,
    /// Unreferenced, but younger than the grace period: kept.
    pub kept_young: u64,
    pub deleted: u64,
    pub deleted_bytes: u64,
    pub grace_seconds: u64,
    pub dry_run: bool,
    pub seconds: f64,
}

impl Remote {
    pub async fn gc(&self, grace: Duration, dry_run: bool) -> Result<GcReport> {
        let started = Instant::now();
        let list = |prefix: &'static str| {
            let p = ObjPath::from(prefix);
            self.store.list(Some(&p)).try_collect::<Vec<ObjectMeta>>()
        };
        let chunks = list("chunks")
            .await
            .map_err(|e| Error::store(&self.name, "listing chunks", e))?;
        let snaps = self.list_snapshots().await?;
        let mut referenced = HashSet::new();
        for s in &snaps {
            // A manifest that cannot be read stops the collection: its chunks are unknown.
            let m = self.manifest(&s.name).await?;
            for f in &m.files {
                for c in &f.chunks {
                    referenced.insert(chunk_key(&c.sha256));
                }
            }
        }
        let cutoff = chrono::Utc::now()
            - chrono::TimeDelta::from_std(grace).unwrap_or(chrono::TimeDelta::MAX);
        let mut report = GcReport {
            remote: self.name.clone(),
            manifests: snaps.len() as u64,
            chunks: chunks.len() as u64,
            grace_seconds: grace.as_secs(),
            dry_run,
            ..Default::default()
        };
        let mut doomed = Vec::new();
        for c in chunks {
            if referenced.contains(c.location.as_ref()) {
                report.referenced += 1;
            } else if c.last_modified > cutoff {
                report.kept_young += 1;
            } else {
                report.deleted += 1;
                report.deleted_bytes += c.size;
                doomed.push(c.location);
            }
        }
        if !dry_run {
            let store = self.store.clone();
            futures::stream::iter(doomed)
                .map(|p| {
                    let store = store.clone();
                    async move {
                        match store.delete(&p).await {
                            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                            Err(e) => Err(Error::store(&self.name, &format!("deleting {p}"), e)),
                        }
                    }
                })
                .buffer_unordered(PARALLEL)
                .try_collect::<Vec<()>>()
                .await?;
        }
        report.seconds = started.elapsed().as_secs_f64();
        Ok(report)
    }
}
