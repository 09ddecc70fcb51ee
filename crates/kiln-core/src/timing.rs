//! Per-phase timing of the slow lifecycle operations (snapshot create, resume, stop, start), logged at
//! debug level as one line per step (`KILN_LOG=kiln_core=debug`): where the time of an operation goes.

use std::fmt::Write as _;
use std::time::Instant;

pub(crate) struct Phases {
    op: &'static str,
    id: String,
    started: Instant,
    last: Instant,
    marks: Vec<(&'static str, f64)>,
}

impl Phases {
    pub(crate) fn new(op: &'static str, id: &str) -> Phases {
        let now = Instant::now();
        Phases {
            op,
            id: id.to_string(),
            started: now,
            last: now,
            marks: Vec::new(),
        }
    }

    /// Ends the phase `name` (the time since the previous mark).
    pub(crate) fn mark(&mut self, name: &'static str) {
        let now = Instant::now();
        self.marks
            .push((name, (now - self.last).as_secs_f64() * 1000.0));
        self.last = now;
    }

    /// Logs the phases (also when the operation failed half-way: the marks so far).
    fn log(&self) {
        let mut phases = String::new();
        for (name, ms) in &self.marks {
            let _ = write!(phases, "{name}={ms:.1} ");
        }
        tracing::debug!(
            op = self.op,
            id = %self.id,
            total_ms = format!("{:.1}", self.started.elapsed().as_secs_f64() * 1000.0),
            phases = phases.trim_end(),
            "phase timing"
        );
    }
}

impl Drop for Phases {
    fn drop(&mut self) {
        self.log();
    }
}
