//! The guest's wall clock after its vCPUs stood still: a snapshot or a fork pauses the source, whose clock
//! must be set again when it continues (issue 13 item 7). The pause is made long on purpose with
//! `KILN_FAULTS=hold.snapshot.paused=MS`.

mod common;

use std::time::{SystemTime, UNIX_EPOCH};

use common::{require_image, Daemon};

const PAUSE_MS: u64 = 4000;
/// Allowed gap between guest and host clocks beyond the exec's own round trip: the guest's busybox `date`
/// prints whole seconds only.
const BOUND_S: f64 = 1.2;

fn host_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs_f64()
}

/// How far the guest's clock is behind the host's (negative: ahead), measured against the window of
/// host time around the exec that read it; also that window's length.
fn guest_lag(d: &Daemon, sb: &str) -> (f64, f64) {
    let t0 = host_now();
    let out = d.kiln_ok(&["exec", sb, "--", "date", "+%s"]);
    let t1 = host_now();
    let guest: f64 = out
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("guest date printed {out:?}"));
    // The guest's whole second began at `guest` and ends before `guest + 1`.
    let lag = if guest + 1.0 < t0 {
        t0 - (guest + 1.0)
    } else if guest > t1 {
        t1 - guest
    } else {
        0.0
    };
    (lag, t1 - t0)
}

#[test]
fn the_source_clock_is_set_after_a_snapshot_and_a_fork_paused_it() {
    require_image("tiny");
    let d = Daemon::start_env(
        &[],
        &[("KILN_FAULTS", &format!("hold.snapshot.paused={PAUSE_MS}"))],
    );
    d.create(&["--name", "src"]);
    let (lag, rtt) = guest_lag(&d, "src");
    eprintln!("after boot: guest behind by {lag:.3} s (exec took {rtt:.3} s)");
    assert!(lag.abs() < BOUND_S, "clock off by {lag:.3} s after boot");

    d.kiln_ok(&["snapshot", "create", "src", "--name", "s1"]);
    let (lag, rtt) = guest_lag(&d, "src");
    eprintln!("after a snapshot paused it {PAUSE_MS} ms: guest behind by {lag:.3} s (exec took {rtt:.3} s)");
    assert!(
        lag.abs() < BOUND_S,
        "the source's clock is {lag:.3} s behind after a snapshot paused it for {PAUSE_MS} ms"
    );

    d.kiln_ok(&["fork", "src", "--name", "kid"]);
    let (lag, rtt) = guest_lag(&d, "src");
    eprintln!(
        "after a fork paused it {PAUSE_MS} ms: guest behind by {lag:.3} s (exec took {rtt:.3} s)"
    );
    assert!(
        lag.abs() < BOUND_S,
        "the source's clock is {lag:.3} s behind after a fork paused it for {PAUSE_MS} ms"
    );
    let (lag, _) = guest_lag(&d, "kid-1");
    eprintln!("fork child: guest behind by {lag:.3} s");
    assert!(
        lag.abs() < BOUND_S,
        "the child's clock is off by {lag:.3} s"
    );
}
