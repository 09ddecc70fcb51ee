//! Build progress reporting. The CLI renders it with indicatif; [`StderrProgress`] is a plain fallback.

use std::sync::Mutex;
use std::time::Instant;

/// Receives progress from [`crate::ImageStore::build`]. `step` starts a new phase ("Building the
/// initramfs"), `detail` reports something within it (a sub-step, a fallback that was taken).
pub trait BuildProgress: Sync {
    fn step(&self, msg: &str);
    fn detail(&self, msg: &str) {
        let _ = msg;
    }
}

/// Discards all progress.
pub struct NoProgress;

impl BuildProgress for NoProgress {
    fn step(&self, _msg: &str) {}
}

/// Prints each step to stderr with the time spent on the previous one.
pub struct StderrProgress {
    last: Mutex<Option<(String, Instant)>>,
}

impl StderrProgress {
    pub fn new() -> Self {
        StderrProgress {
            last: Mutex::new(None),
        }
    }

    fn finish_previous(&self, last: &mut Option<(String, Instant)>) {
        if let Some((msg, started)) = last.take() {
            eprintln!("  done: {msg} ({:.1}s)", started.elapsed().as_secs_f64());
        }
    }
}

impl Default for StderrProgress {
    fn default() -> Self {
        Self::new()
    }
}

impl BuildProgress for StderrProgress {
    fn step(&self, msg: &str) {
        // A poisoned lock only means another thread panicked mid-print; keep reporting.
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        self.finish_previous(&mut last);
        eprintln!("==> {msg}");
        *last = Some((msg.to_string(), Instant::now()));
    }

    fn detail(&self, msg: &str) {
        eprintln!("    {msg}");
    }
}

impl Drop for StderrProgress {
    fn drop(&mut self) {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        self.finish_previous(&mut last);
    }
}
