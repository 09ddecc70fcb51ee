//! Fault injection for tests: off unless `KILN_FAULTS` is set when the daemon starts.
//!
//! `KILN_FAULTS` is a comma-separated list of rules:
//! - `qemu.kill_after_launch=NAME`: SIGKILL the QEMU of the sandbox named NAME right after it is launched
//!   (once), so the operation meets a really dead VM.
//! - `hold.POINT=MS`: sleep MS milliseconds at POINT (every time), leaving a window in which a test can
//!   kill the daemon mid-operation. Points are listed in [`POINTS`]; the daemon logs
//!   `fault injection: holding at POINT` when it gets there.
//! - `compact.stream_speed=BYTES`: disk chain compactions stream at most BYTES per second, so a test can
//!   end the daemon while QEMU still runs the stream.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tracing::warn;

use crate::error::{Error, Result};

/// Where an operation can be held. Each is a moment when a crash leaves half-done work behind.
pub const POINTS: &[&str] = &[
    "create.launched",        // QEMU of a new sandbox started, agent not yet answered
    "create.image_resolved",  // the template found, the sandbox not yet recorded
    "snapshot.paused",        // source paused, state being saved
    "snapshot.overlay_added", // new top layer opened by QEMU, not yet its active layer
    "snapshot.written",       // files written to .tmp-*, not yet moved into place
    "resume.launched",        // QEMU of a sandbox made from a snapshot started
    "fork.captured",          // the fork's capture exists, no child started yet
    "stop.saved",             // state saved to state.tmp, QEMU still alive
    "start.launched",         // QEMU loading a hibernated sandbox's state
    "start.retired",          // hibernated state loaded and retired, vCPUs not yet continued
    "start.continued",        // vCPUs of a started sandbox continued, agent not yet answered
    "stop.published",         // saved state published, QEMU still alive (stopped)
    "stop.quit",              // QEMU of a stopping sandbox ended, sandbox not yet recorded stopped
    "snapshot.diff_based",    // a diff's parent files read, the diff not yet recorded
    "delete.marked",          // sandbox marked deleting, VM not yet ended
    "snapshot.deleting",      // snapshot moved to .trash-*, row not yet removed
    "create.disk_resized",    // a resumed copy's disk grown by QEMU, its filesystem not yet
    "create.recorded",        // a booting sandbox recorded, its QEMU not yet started
    "restore.recorded", // a rolled-back sandbox marked creating, its old VM gone, no new QEMU yet
];

#[derive(Debug, Clone)]
enum Rule {
    KillAfterLaunch { name: String, fired: bool },
    Hold { point: String, ms: u64 },
    StreamSpeed(u64),
}

/// The parsed `KILN_FAULTS` rules; cheap to clone (shared).
#[derive(Debug, Clone, Default)]
pub struct Faults {
    rules: Arc<Mutex<Vec<Rule>>>,
}

impl Faults {
    pub fn parse(spec: &str) -> Result<Faults> {
        let mut rules = Vec::new();
        for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let bad = |why: &str| {
                Error::invalid(format!(
                    "KILN_FAULTS rule '{item}': {why}; use qemu.kill_after_launch=NAME, compact.stream_speed=BYTES or hold.POINT=MS with POINT one of {}",
                    POINTS.join(", ")
                ))
            };
            let (key, value) = item.split_once('=').ok_or_else(|| bad("missing '='"))?;
            if key == "qemu.kill_after_launch" && !value.is_empty() {
                rules.push(Rule::KillAfterLaunch {
                    name: value.to_string(),
                    fired: false,
                });
            } else if key == "compact.stream_speed" {
                let speed =
                    value.parse().ok().filter(|b| *b > 0).ok_or_else(|| {
                        bad("the speed is not a positive number of bytes per second")
                    })?;
                rules.push(Rule::StreamSpeed(speed));
            } else if let Some(point) = key.strip_prefix("hold.") {
                if !POINTS.contains(&point) {
                    return Err(bad("unknown point"));
                }
                let ms = value
                    .parse()
                    .map_err(|_| bad("the hold time is not a number of milliseconds"))?;
                rules.push(Rule::Hold {
                    point: point.to_string(),
                    ms,
                });
            } else {
                return Err(bad("unknown rule"));
            }
        }
        Ok(Faults {
            rules: Arc::new(Mutex::new(rules)),
        })
    }

    pub fn is_empty(&self) -> bool {
        self.rules
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_empty()
    }

    /// Whether the QEMU just launched for sandbox `name` is to be killed (true once per rule).
    pub fn kill_after_launch(&self, name: &str) -> bool {
        let mut rules = self.rules.lock().unwrap_or_else(|p| p.into_inner());
        for r in rules.iter_mut() {
            if let Rule::KillAfterLaunch { name: n, fired } = r {
                if n == name && !*fired {
                    *fired = true;
                    warn!(sandbox = name, "fault injection: killing QEMU after launch");
                    return true;
                }
            }
        }
        false
    }

    /// The bytes per second a rule limits disk streams to, if one does.
    pub fn stream_speed(&self) -> Option<u64> {
        let rules = self.rules.lock().unwrap_or_else(|p| p.into_inner());
        rules.iter().find_map(|r| match r {
            Rule::StreamSpeed(b) => Some(*b),
            _ => None,
        })
    }

    /// Sleeps if a rule holds operations at `point`.
    pub async fn hold(&self, point: &str) {
        // These points are the milestones an operation reports as its stage.
        if let Some(stage) = crate::operations::stage_of_point(point) {
            crate::operations::stage(stage);
        }
        let ms = {
            let rules = self.rules.lock().unwrap_or_else(|p| p.into_inner());
            rules.iter().find_map(|r| match r {
                Rule::Hold { point: p, ms } if p == point => Some(*ms),
                _ => None,
            })
        };
        if let Some(ms) = ms {
            warn!(point, ms, "fault injection: holding at {point}");
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Faults;

    #[test]
    fn rules_parse_and_fire_once() {
        let f = Faults::parse("qemu.kill_after_launch=kid-3, hold.fork.captured=10").unwrap();
        assert_eq!(f.stream_speed(), None);
        let slow = Faults::parse("compact.stream_speed=65536").unwrap();
        assert_eq!(slow.stream_speed(), Some(65536));
        assert!(!f.kill_after_launch("kid-2"));
        assert!(f.kill_after_launch("kid-3"));
        assert!(!f.kill_after_launch("kid-3"));
        assert!(Faults::parse("").unwrap().is_empty());
    }

    #[test]
    fn bad_rules_are_refused() {
        for spec in [
            "nonsense",
            "hold.nowhere=5",
            "hold.exec.running=soon",
            "x=1",
            "compact.stream_speed=0",
        ] {
            let e = Faults::parse(spec).unwrap_err();
            assert!(e.message.contains("KILN_FAULTS"), "{spec}: {e}");
        }
    }
}
