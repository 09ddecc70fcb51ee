//! Capacity while template snapshots are being made (issue 15): a create sent right after `kiln serve`
//! starts, with `--max-sandboxes 2` and no template snapshot anywhere yet, makes its own template snapshot
//! beside the start-up one. Each booting machine counts once: a sandbox recorded while its reservation is
//! still held was once counted twice (row and reservation), so the second builder was refused "2
//! sandboxes are running or starting" while only one existed.

mod common;

use std::time::Duration;

use common::{require_image, Daemon, NO_PREPARE_WAIT};
use serde_json::json;

#[test]
fn a_create_during_the_startup_template_boot_is_not_refused() {
    require_image("tiny");
    // An empty store of its own: both template snapshots are really booted here.
    let store = tempfile::tempdir_in("/tmp").expect("store");
    let store_path = store.path().to_string_lossy().into_owned();
    let d = Daemon::start_env(
        &["--max-sandboxes", "2"],
        &[
            ("KILN_TEMPLATE_SNAPSHOTS", "on"),
            ("KILN_TEMPLATE_STORE", &store_path),
            // Widens the moment between a boot's record and the start of its QEMU.
            ("KILN_FAULTS", "hold.create.recorded=3000"),
            (NO_PREPARE_WAIT, "1"),
        ],
    );
    // The start-up builder (default shape) is recorded and held there.
    assert!(
        d.wait_log("holding at create.recorded", 1, Duration::from_secs(60)),
        "{}",
        common::tail(&d.log(), 30)
    );
    let (status, v) = d.api(
        "POST",
        "/v1/sandboxes",
        Some(json!({"name": "x", "memory_mib": 128})),
    );
    assert_eq!(status, 201, "{v}\n{}", common::tail(&d.log(), 30));
    assert_eq!(v["boot"]["mode"], "resume", "{v}");
    assert!(
        d.wait_log(
            "template snapshot preparation finished",
            1,
            Duration::from_secs(300)
        ),
        "{}",
        common::tail(&d.log(), 30)
    );
    let log = d.log();
    assert!(
        !log.contains("running or starting"),
        "{}",
        common::tail(&log, 40)
    );
    assert_eq!(
        log.matches("template snapshot made").count(),
        2,
        "{}",
        common::tail(&log, 40)
    );
    assert_eq!(d.kiln_ok(&["exec", "x", "--", "hostname"]).trim(), "x");
    // Both builders are gone: only x runs.
    assert_eq!(d.qemu_pids().len(), 1);
}
