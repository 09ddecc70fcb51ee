//! Model-based lifecycle test: a seeded random walk over the API (create, exec, snapshots of every type,
//! resume, fork, pause/resume, stop/start, restore, deletes, volumes, clients that hang up mid-request,
//! daemon SIGKILL + restart) across a few sandboxes, checked after every step against a model of what must
//! exist. A failing run prints its seed; `KILN_MODEL_SEED=N` replays it (`random`: a new one; default 7), `KILN_MODEL_STEPS=N` sets the
//! length (short in `make test`, long in `make reliability`).

#[path = "../common/mod.rs"]
mod common;
mod walker;

use common::Daemon;
use rand::SeedableRng;
use walker::{Model, Walker};

#[test]
fn random_lifecycle_walk_keeps_the_model_and_the_daemon_in_agreement() {
    common::require_image("tiny");
    // A fixed seed by default, so `make test` (and CI) is repeatable; `make reliability` walks from a new
    // seed each run (`KILN_MODEL_SEED=random`), and a failing seed is printed for replay.
    let seed: u64 = match std::env::var("KILN_MODEL_SEED").ok().as_deref() {
        Some("random") => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1),
        Some(s) => s.parse().expect("KILN_MODEL_SEED is a number or 'random'"),
        None => 7,
    };
    let steps: usize = std::env::var("KILN_MODEL_STEPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(24);
    println!(
        "MODEL seed={seed} steps={steps} (replay: KILN_MODEL_SEED={seed} KILN_MODEL_STEPS={steps})"
    );
    let d = Daemon::start_with(&["--max-sandboxes", "8"]);
    let mut w = Walker {
        d,
        rng: rand::rngs::StdRng::seed_from_u64(seed),
        m: Model::default(),
        seed,
        history: Vec::new(),
        tally: Default::default(),
    };
    for step in 0..steps {
        w.step(step);
        w.check(step);
    }
    w.finish();
    w.tally.report(
        "random_lifecycle_walk_keeps_the_model_and_the_daemon_in_agreement",
        &format!("operations-seed-{seed}"),
    );
}
