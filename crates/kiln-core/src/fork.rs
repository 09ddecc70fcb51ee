//! Live fork: N new sandboxes that continue from a running sandbox's current state.
//!
//! The source is captured as an unlisted snapshot (paused only for the capture), the children are
//! resumed from it concurrently, and the capture is deleted at once: each child holds hard links to the
//! capture's files, so the data lives exactly as long as some child needs it. Children share the captured
//! memory copy-on-write (a private mapping of the same file) and the captured disk layers.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use tracing::{info, warn};
use utoipa::ToSchema;

use crate::engine::Engine;
use crate::error::{Error, ErrorCode, Result};
use crate::model::Sandbox;
use crate::snapshot::{CreateSnapshotInternal, SnapshotType};
use crate::{ids, validate, CreateSnapshot, ResumeSnapshot};

pub const MAX_FORK_COUNT: u64 = 64;

#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ForkRequest {
    /// How many children (default 1).
    pub count: Option<u64>,
    /// Name prefix: children are named PREFIX-1, PREFIX-2, ... (default: the source's name + "-fork-XXXX").
    pub name: Option<String>,
    #[serde(default, alias = "metadata")]
    pub labels: BTreeMap<String, String>,
    /// Lifetime of every child (children inherit none from the source): seconds of life.
    pub timeout: Option<u64>,
    /// Seconds without use before `on_timeout` applies to a child.
    pub idle_timeout: Option<u64>,
    /// `hibernate` (default) or `delete`.
    pub on_timeout: Option<crate::lifetime::OnTimeout>,
    /// Start a hibernated child again when it is used (default true with a lifetime).
    pub auto_resume: Option<bool>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ForkResult {
    pub sandboxes: Vec<Sandbox>,
}

impl Engine {
    /// Forks a running or paused sandbox into `count` children. All or nothing: if any child fails to
    /// start, the others are deleted and the error names the failed child and why.
    pub async fn fork(&self, source: &str, req: ForkRequest) -> Result<ForkResult> {
        self.config().check_storage("fork a sandbox")?;
        let count = req.count.unwrap_or(1);
        validate::range("fork count", count, 1, MAX_FORK_COUNT, "")?;
        validate::labels(&req.labels)?;
        let sb = self.get(source)?;
        let prefix = match &req.name {
            Some(p) => {
                validate::name("sandbox", p)?;
                p.clone()
            }
            None => {
                let tag = ids::new_id("f");
                let base: String = sb.name.chars().take(40).collect();
                format!("{base}-fork-{}", &tag[2..6])
            }
        };
        let names: Vec<String> = (1..=count).map(|i| format!("{prefix}-{i}")).collect();
        for n in &names {
            validate::name("sandbox", n)?;
            if self.db().find_sandbox(n)?.is_some() {
                return Err(Error::new(
                    ErrorCode::SandboxNameTaken,
                    format!("a sandbox named '{n}' already exists; pick another --name prefix"),
                ));
            }
        }
        // Room for all children is reserved before anything starts: a fork fits as a whole or not at all.
        // Each child's share is released as its row is inserted (`record_one`), so it never counts twice.
        let reservation = self.reserve(count as usize, sb.memory_mib).await?;
        let capture_id = format!("fork-{}", &ids::new_id("x")[2..]);
        self.create_snapshot_internal(
            &sb.id,
            CreateSnapshot {
                name: Some(capture_id.clone()),
                kind: SnapshotType::Full,
                leave_paused: false,
                labels: BTreeMap::new(),
                ttl: None,
            },
            CreateSnapshotInternal {
                ephemeral: true,
                ..Default::default()
            },
        )
        .await?;
        self.faults().hold("fork.captured").await;
        let results = futures::future::join_all(names.iter().map(|name| {
            self.resume_within(
                &capture_id,
                ResumeSnapshot {
                    name: Some(name.clone()),
                    labels: req.labels.clone(),
                    network: sb.network.clone(),
                    ..Default::default()
                },
                Some(&reservation),
            )
        }))
        .await;
        // Children recorded have released their shares already; what is left (failed children) goes now.
        drop(reservation);
        // The capture froze the source's top disk layer, as a snapshot does: a long chain is compacted in
        // the background (before, repeated forks grew it by one layer each, without bound).
        self.compact_soon(&sb.id);
        // The children hold their own links to the capture's files; the capture itself is not needed.
        if let Err(e) = self.delete_snapshot(&capture_id).await {
            warn!(snapshot = %capture_id, error = %e, "could not remove a fork capture");
        }
        let mut started = Vec::new();
        let mut failures = Vec::new();
        for (name, r) in names.iter().zip(results) {
            match r {
                Ok(mut child) => {
                    // Recorded after the resume: a failure here only loses the lineage link, not the child.
                    match self.db().set_forked_from(&child.id, &sb.id) {
                        Ok(()) => child.forked_from = Some(sb.id.clone()),
                        Err(e) => {
                            warn!(child = %child.id, error = %e, "could not record the fork source")
                        }
                    }
                    started.push(child)
                }
                Err(e) => failures.push((name.clone(), e)),
            }
        }
        if let Some((first_name, first_err)) = failures.first() {
            for child in &started {
                let _ = self.delete(&child.id).await;
            }
            let list: Vec<String> = failures
                .iter()
                .map(|(n, e)| format!("{n}: {}", e.message))
                .collect();
            return Err(Error::new(
                first_err.code,
                format!(
                    "fork of {} failed for {} of {count} children (first: {first_name}); the {} that started were removed. {}",
                    sb.name,
                    failures.len(),
                    started.len(),
                    list.join("; ")
                ),
            ));
        }
        info!(source = %sb.id, count, "forked");
        Ok(ForkResult { sandboxes: started })
    }
}
