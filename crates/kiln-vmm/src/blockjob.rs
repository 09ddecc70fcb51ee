//! Live shortening of a disk chain: `block-stream` copies the data of the layers between a base node and
//! the active layer into the active layer, after which QEMU drops them from the chain. It only reads
//! nodes QEMU already has open and writes the active layer, so a confined QEMU opens no file.

use std::time::Duration;

use serde_json::{json, Value};

use crate::error::VmmError;
use crate::qmp::Qmp;

/// How often a running job is looked at.
const POLL: Duration = Duration::from_millis(50);
/// How long a cancelled job may take to end.
pub const CANCEL_GRACE: Duration = Duration::from_secs(10);

impl Qmp {
    /// Depth of the chain behind the block device whose qdev path contains `device_id` (1: no backing).
    pub async fn chain_depth(&self, device_id: &str) -> Result<usize, VmmError> {
        let blocks = self.execute("query-block", None).await?;
        let block = blocks
            .as_array()
            .into_iter()
            .flatten()
            .find(|b| b["qdev"].as_str().is_some_and(|q| q.contains(device_id)))
            .ok_or_else(|| {
                VmmError::QmpProtocol(format!("no block device '{device_id}' in query-block"))
            })?;
        let mut depth = 0;
        let mut image = &block["inserted"]["image"];
        while image.is_object() {
            depth += 1;
            image = &image["backing-image"];
        }
        Ok(depth)
    }

    /// Names of every format node QEMU has (`query-named-block-nodes`), generated ones (`#block…`) left out.
    pub async fn node_names(&self) -> Result<Vec<String>, VmmError> {
        let nodes = self
            .execute("query-named-block-nodes", Some(json!({"flat": true})))
            .await?;
        Ok(nodes
            .as_array()
            .into_iter()
            .flatten()
            .filter(|n| n["drv"] != "file")
            .filter_map(|n| n["node-name"].as_str())
            .filter(|n| !n.starts_with('#'))
            .map(str::to_string)
            .collect())
    }

    /// Starts streaming every layer above `base_node` into the active layer of `device_id` (at most
    /// `speed` bytes a second, if given) as job `job_id`; [`Qmp::wait_stream`] waits for it.
    pub async fn start_stream(
        &self,
        device_id: &str,
        base_node: &str,
        job_id: &str,
        speed: Option<u64>,
    ) -> Result<(), VmmError> {
        let top = self.active_node(device_id).await?;
        let mut args = json!({
            "job-id": job_id,
            "device": top,
            "base-node": base_node,
            "auto-finalize": true,
            "auto-dismiss": false,
        });
        if let Some(speed) = speed {
            args["speed"] = speed.into();
        }
        self.execute("block-stream", Some(args)).await.map(|_| ())
    }

    /// Waits for the stream `job_id` ([`Qmp::start_stream`]), at most `timeout`; past it the job is
    /// cancelled. Ok once the job ended without error (the layers left the chain; their nodes stay open
    /// until removed); on an error or a cancel QEMU leaves the chain as it was (what was copied already
    /// is the same data the chain reads).
    pub async fn wait_stream(&self, job_id: &str, timeout: Duration) -> Result<(), VmmError> {
        let started = tokio::time::Instant::now();
        let mut cancelled: Option<tokio::time::Instant> = None;
        loop {
            let job = self.job(job_id).await?;
            let Some(job) = job else {
                return Err(VmmError::QmpProtocol(format!(
                    "block job {job_id} vanished before it concluded"
                )));
            };
            if job["status"] == "concluded" {
                let _ = self
                    .execute("job-dismiss", Some(json!({"id": job_id})))
                    .await;
                return match job["error"].as_str() {
                    None => Ok(()),
                    Some(e) => Err(VmmError::QmpCommand {
                        command: "block-stream".into(),
                        class: if cancelled.is_some() {
                            "Cancelled".into()
                        } else {
                            "JobFailed".into()
                        },
                        desc: e.to_string(),
                    }),
                };
            }
            match cancelled {
                None if started.elapsed() >= timeout => {
                    let _ = self
                        .execute("job-cancel", Some(json!({"id": job_id})))
                        .await;
                    cancelled = Some(tokio::time::Instant::now());
                }
                Some(at) if at.elapsed() >= CANCEL_GRACE => {
                    return Err(VmmError::Timeout {
                        what: format!("block job {job_id} to end after its cancel"),
                        after_ms: (timeout + CANCEL_GRACE).as_millis() as u64,
                    });
                }
                _ => {}
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Ends every job whose id starts with `prefix`: cancels those still going, waits (at most
    /// `grace`) until each has concluded and dismisses it. For jobs a daemon that died left behind: a
    /// stream still writing the active layer must not run on under a capture that freezes that layer.
    /// Returns the ids ended. A stream that had already completed keeps its effect (the chain is short).
    pub async fn end_jobs(&self, prefix: &str, grace: Duration) -> Result<Vec<String>, VmmError> {
        let ours = |jobs: &Value| -> Vec<(String, String)> {
            jobs.as_array()
                .into_iter()
                .flatten()
                .filter_map(|j| {
                    let id = j["id"].as_str()?;
                    id.starts_with(prefix).then(|| {
                        (
                            id.to_string(),
                            j["status"].as_str().unwrap_or("").to_string(),
                        )
                    })
                })
                .collect()
        };
        let found = ours(&self.execute("query-jobs", None).await?);
        for (id, status) in &found {
            if status != "concluded" && status != "null" {
                // May race with the job concluding on its own: then the cancel fails, harmlessly.
                let _ = self.execute("job-cancel", Some(json!({"id": id}))).await;
            }
        }
        let deadline = tokio::time::Instant::now() + grace;
        loop {
            let left = ours(&self.execute("query-jobs", None).await?);
            if left
                .iter()
                .all(|(_, status)| status == "concluded" || status == "null")
            {
                break;
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(VmmError::Timeout {
                    what: format!("block jobs {left:?} to end after their cancel"),
                    after_ms: grace.as_millis() as u64,
                });
            }
            tokio::time::sleep(POLL).await;
        }
        for (id, _) in &found {
            let _ = self.execute("job-dismiss", Some(json!({"id": id}))).await;
        }
        Ok(found.into_iter().map(|(id, _)| id).collect())
    }

    async fn job(&self, job_id: &str) -> Result<Option<Value>, VmmError> {
        let jobs = self.execute("query-jobs", None).await?;
        Ok(jobs
            .as_array()
            .into_iter()
            .flatten()
            .find(|j| j["id"] == job_id)
            .cloned())
    }
}
