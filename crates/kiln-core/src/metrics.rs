//! Prometheus metrics (`GET /metrics`, docs/observability.md). Counters and histograms are recorded where
//! the work happens (operations.rs for every mutating call, guest.rs for commands, warm.rs for spares);
//! gauges of what exists (sandboxes, snapshots, capacity) are read from the state database at each scrape,
//! so they cannot drift from it.

use std::time::Duration;

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::model::SandboxState;

/// Seconds; TCG boots and snapshot writes take tens of seconds, KVM resumes well under one.
const BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
];

const STATES: &[SandboxState] = &[
    SandboxState::Creating,
    SandboxState::Running,
    SandboxState::Paused,
    SandboxState::Stopped,
    SandboxState::Failed,
    SandboxState::Deleting,
];

pub struct Metrics {
    registry: Registry,
    operations: IntCounterVec,
    operation_seconds: HistogramVec,
    exec_start_seconds: HistogramVec,
    warm_hits: IntCounter,
    warm_misses: IntCounter,
    sandboxes: IntGaugeVec,
    snapshots: IntGauge,
    snapshot_bytes: IntGauge,
    running_operations: IntGauge,
    capacity_sandboxes: IntGaugeVec,
    capacity_memory: IntGaugeVec,
    warm_ready: IntGauge,
    events: IntGauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new().expect("metric definitions are static and valid")
    }
}

fn gauge(name: &str, help: &str) -> prometheus::Result<IntGauge> {
    IntGauge::with_opts(Opts::new(name, help))
}

impl Metrics {
    fn new() -> prometheus::Result<Metrics> {
        let m = Metrics {
            registry: Registry::new(),
            operations: IntCounterVec::new(
                Opts::new(
                    "kiln_operations_total",
                    "Mutating operations finished, by kind (e.g. snapshot.create) and outcome (succeeded, failed).",
                ),
                &["kind", "outcome"],
            )?,
            operation_seconds: HistogramVec::new(
                HistogramOpts::new(
                    "kiln_operation_duration_seconds",
                    "How long operations took from start to outcome, by kind: sandbox.create, snapshot.resume, sandbox.fork, snapshot.create and the rest.",
                )
                .buckets(BUCKETS.to_vec()),
                &["kind", "outcome"],
            )?,
            exec_start_seconds: HistogramVec::new(
                HistogramOpts::new(
                    "kiln_exec_start_duration_seconds",
                    "How long starting a command took (finding the VM, reaching its agent, spawning), by outcome; not the command's own run time.",
                )
                .buckets(BUCKETS.to_vec()),
                &["outcome"],
            )?,
            warm_hits: IntCounter::new(
                "kiln_warm_spare_hits_total",
                "Resumes served by a ready warm spare.",
            )?,
            warm_misses: IntCounter::new(
                "kiln_warm_spare_misses_total",
                "Resumes that found no usable warm spare while warm spares are enabled.",
            )?,
            sandboxes: IntGaugeVec::new(
                Opts::new("kiln_sandboxes", "Sandboxes by state (kiln's own machines not counted)."),
                &["state"],
            )?,
            snapshots: gauge("kiln_snapshots", "Snapshots listed by the API.")?,
            snapshot_bytes: gauge(
                "kiln_snapshot_bytes",
                "Bytes the listed snapshots take, as recorded when each was taken.",
            )?,
            running_operations: gauge("kiln_operations_running", "Operations running now.")?,
            capacity_sandboxes: IntGaugeVec::new(
                Opts::new(
                    "kiln_capacity_sandboxes",
                    "Sandboxes holding a VM or starting one (used, including warm spares and requests in flight) and the limit (kiln serve --max-sandboxes).",
                ),
                &["kind"],
            )?,
            capacity_memory: IntGaugeVec::new(
                Opts::new(
                    "kiln_capacity_memory_mib",
                    "Guest memory held by those sandboxes (used) and the limit (limit), in MiB.",
                ),
                &["kind"],
            )?,
            warm_ready: gauge("kiln_warm_spares_ready", "Warm spares ready to be handed out.")?,
            events: gauge(
                "kiln_events_last_seq",
                "Sequence number of the newest event published on /v1/events.",
            )?,
        };
        m.registry.register(Box::new(m.operations.clone()))?;
        m.registry.register(Box::new(m.operation_seconds.clone()))?;
        m.registry
            .register(Box::new(m.exec_start_seconds.clone()))?;
        m.registry.register(Box::new(m.warm_hits.clone()))?;
        m.registry.register(Box::new(m.warm_misses.clone()))?;
        m.registry.register(Box::new(m.sandboxes.clone()))?;
        m.registry.register(Box::new(m.snapshots.clone()))?;
        m.registry.register(Box::new(m.snapshot_bytes.clone()))?;
        m.registry
            .register(Box::new(m.running_operations.clone()))?;
        m.registry
            .register(Box::new(m.capacity_sandboxes.clone()))?;
        m.registry.register(Box::new(m.capacity_memory.clone()))?;
        m.registry.register(Box::new(m.warm_ready.clone()))?;
        m.registry.register(Box::new(m.events.clone()))?;
        Ok(m)
    }

    pub(crate) fn operation(&self, kind: &str, ok: bool, took: Duration) {
        let outcome = if ok { "succeeded" } else { "failed" };
        self.operations.with_label_values(&[kind, outcome]).inc();
        self.operation_seconds
            .with_label_values(&[kind, outcome])
            .observe(took.as_secs_f64());
    }

    pub(crate) fn exec_started(&self, ok: bool, took: Duration) {
        let outcome = if ok { "succeeded" } else { "failed" };
        self.exec_start_seconds
            .with_label_values(&[outcome])
            .observe(took.as_secs_f64());
    }

    pub(crate) fn warm_spare(&self, hit: bool) {
        if hit {
            self.warm_hits.inc();
        } else {
            self.warm_misses.inc();
        }
    }
}

fn int(v: impl TryInto<i64>) -> i64 {
    v.try_into().unwrap_or(i64::MAX)
}

impl Engine {
    /// The metrics in Prometheus' text format (version 0.0.4).
    pub fn render_metrics(&self) -> Result<String> {
        let m = self.metrics();
        let all = self.db().list_sandboxes()?;
        for state in STATES {
            let n = all
                .iter()
                .filter(|s| s.state == *state && !crate::is_internal_sandbox(s))
                .count();
            m.sandboxes.with_label_values(&[state.as_str()]).set(int(n));
        }
        // As capacity checks count it (engine.rs try_reserve): every machine with a VM or starting one.
        let active: Vec<_> = all
            .iter()
            .filter(|s| s.state.has_vm() || s.state == SandboxState::Creating)
            .collect();
        let (pending_vms, pending_mib) = self.pending_capacity();
        m.capacity_sandboxes
            .with_label_values(&["used"])
            .set(int(active.len() + pending_vms));
        m.capacity_sandboxes
            .with_label_values(&["limit"])
            .set(int(self.config().max_sandboxes));
        m.capacity_memory
            .with_label_values(&["used"])
            .set(int(
                active.iter().map(|s| s.memory_mib).sum::<u64>() + pending_mib
            ));
        m.capacity_memory
            .with_label_values(&["limit"])
            .set(int(self.config().max_total_memory_mib));
        let snaps = self.list_snapshots(None, &Default::default())?;
        m.snapshots.set(int(snaps.len()));
        m.snapshot_bytes
            .set(int(snaps.iter().map(|s| s.size_bytes).sum::<u64>()));
        m.running_operations.set(int(self.running_operations()));
        m.warm_ready.set(int(self.warm_pool().ready()));
        m.events.set(int(self.events().last_seq()));
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&m.registry.gather(), &mut out)
            .map_err(|e| Error::internal(format!("cannot encode metrics: {e}")))?;
        String::from_utf8(out).map_err(|e| Error::internal(format!("metrics are not UTF-8: {e}")))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn counters_render() {
        let m = super::Metrics::default();
        m.operation(
            "sandbox.create",
            true,
            std::time::Duration::from_millis(1500),
        );
        m.warm_spare(false);
        let mut out = Vec::new();
        prometheus::Encoder::encode(
            &prometheus::TextEncoder::new(),
            &m.registry.gather(),
            &mut out,
        )
        .unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(
            text.contains("kiln_operations_total{kind=\"sandbox.create\",outcome=\"succeeded\"} 1")
        );
        assert!(text.contains("kiln_warm_spare_misses_total 1"));
        assert!(text.contains("kiln_operation_duration_seconds_bucket{kind=\"sandbox.create\",outcome=\"succeeded\",le=\"2.5\"} 1"));
    }
}
