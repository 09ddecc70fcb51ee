//! Nothing waits forever: a QEMU that stops answering fails the operation within seconds with
//! `sandbox_unresponsive`, and the sandbox is marked failed (its QEMU pid kept) so that a delete or
//! `kiln doctor --repair` ends it.

use std::future::Future;
use std::time::Duration;

use tracing::warn;

use crate::engine::Engine;
use crate::error::{Error, ErrorCode, Result};
use crate::model::{Sandbox, SandboxState};

/// How long a QEMU may sit stopped (`T` state) while a request waits on its guest before the request
/// gives up.
const STOPPED_GRACE: Duration = Duration::from_secs(3);

impl Engine {
    /// Passes `r` through; when it failed because QEMU stopped answering, records the sandbox as failed
    /// with the reason and returns an error saying what to do. Call with the sandbox's lock held.
    pub(crate) fn note_unresponsive<T>(&self, sb: &Sandbox, r: Result<T>) -> Result<T> {
        let e = match r {
            Err(e) if e.code == ErrorCode::SandboxUnresponsive => e,
            other => return other,
        };
        let message = format!(
            "sandbox {} is not responding ({}); delete it (`kiln sandbox delete {}`) or run `kiln doctor --repair`",
            sb.name, e.message, sb.name
        );
        warn!(sandbox = %sb.id, error = %e.message, "QEMU stopped answering; sandbox marked failed");
        if let Err(db) = self
            .db()
            .set_state(&sb.id, SandboxState::Failed, sb.pid, Some(&message))
        {
            warn!(sandbox = %sb.id, error = %db, "could not mark an unresponsive sandbox");
        }
        Err(Error::new(ErrorCode::SandboxUnresponsive, message))
    }
}

/// Runs `fut` (a request to the guest of QEMU `pid`), failing with `sandbox_unresponsive` once the QEMU
/// process has been stopped for [`STOPPED_GRACE`]: its guest cannot answer until it is continued.
pub(crate) async fn unless_stopped<T>(pid: u32, fut: impl Future<Output = Result<T>>) -> Result<T> {
    tokio::pin!(fut);
    let mut stopped_since: Option<tokio::time::Instant> = None;
    loop {
        tokio::select! {
            r = &mut fut => return r,
            _ = tokio::time::sleep(Duration::from_millis(250)) => {
                if !is_stopped(pid) {
                    stopped_since = None;
                    continue;
                }
                let since = *stopped_since.get_or_insert_with(tokio::time::Instant::now);
                if since.elapsed() >= STOPPED_GRACE {
                    return Err(Error::new(
                        ErrorCode::SandboxUnresponsive,
                        format!("its QEMU (pid {pid}) is stopped and has not run for {} s", STOPPED_GRACE.as_secs()),
                    ));
                }
            }
        }
    }
}

/// True while `pid` is stopped by a signal (state `T`; a ptrace stop, `t`, is brief and not counted).
pub(crate) fn is_stopped(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().starts_with('T'))
        })
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_running_process_is_not_stopped() {
        assert!(!is_stopped(std::process::id()));
        assert!(!is_stopped(u32::MAX));
    }

    #[tokio::test]
    async fn a_stopped_process_fails_the_wait_and_a_running_one_does_not() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pid = child.id();
        let quick = unless_stopped(pid, async { Ok::<_, Error>(1) }).await;
        assert_eq!(quick.unwrap(), 1);
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(pid as i32, libc::SIGSTOP) };
        let t0 = std::time::Instant::now();
        let r = unless_stopped(pid, std::future::pending::<Result<()>>()).await;
        let e = r.unwrap_err();
        assert_eq!(e.code, ErrorCode::SandboxUnresponsive);
        assert!(t0.elapsed() < Duration::from_secs(6), "{:?}", t0.elapsed());
        let _ = child.kill();
        let _ = child.wait();
    }
}
