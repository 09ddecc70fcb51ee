"""Runs every program in examples/ against the session daemon (found through KILN_SOCKET)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import REPO, Daemon
from kiln import KilnError, Sandbox, Snapshot, Volume

EXAMPLES = sorted((REPO / "examples").glob("*.py"))

# A line each example must print, showing that its workflow really happened.
EXPECT = {
    "checkpoint_rollback.py": "config after rollback: 'mode=stable\\nworkers=4\\n'",
    "prepare_and_stamp.py": "3 copies in the pool",
    "fork_and_compare.py": "all approaches agree",
    "hibernate_wake.py": "the same counter process goes on",
    "disk_snapshot_cold_restore.py": "lines in /data/numbers: 100000",
    "snapshot_errors.py": "duplicate name -> SnapshotAlreadyExistsError",
    "volume_cache.py": "resumed copy with the volume re-attached: cache hit",
    "dev-server-fork.py": "3 forks serving on their own host ports, the original still says: the original",
    "agent_loop_autohibernate.py": "the agent loop survived an automatic hibernation",
}

# Examples that need more than the `tiny` image.
NEEDS_IMAGE = {"dev-server-fork.py": "base"}


def test_every_example_is_checked() -> None:
    assert sorted(p.name for p in EXAMPLES) == sorted(EXPECT)


def fork_available(sandbox: Sandbox) -> bool:
    try:
        sandbox.fork(count=0)  # invalid on purpose: answers 400 if the route exists, without forking
    except KilnError as e:
        return e.code != "route_not_found"
    return True


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_example_runs(example: os.PathLike[str], daemon: Daemon, sandbox: Sandbox) -> None:
    name = os.path.basename(example)
    if name == "fork_and_compare.py" and not fork_available(sandbox):
        pytest.skip("the daemon has no fork route yet (route_not_found)")
    image = NEEDS_IMAGE.get(name)
    if image and not (daemon.dir / "images" / image / "image.json").is_file():
        pytest.skip(f"image '{image}' is not built (`make image-{image}`)")
    sandboxes_before = {s.id for s in Sandbox.list()}
    snapshots_before = {s.id for s in Snapshot.list()}
    volumes_before = {v.name for v in Volume.list()}

    env = {**os.environ, "KILN_SOCKET": str(daemon.socket)}
    env.pop("KILN_URL", None)
    proc = subprocess.run(
        [sys.executable, str(example)], env=env, capture_output=True, text=True, timeout=600, cwd=REPO
    )
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout}\n{proc.stderr}\ndaemon log:\n{daemon.log_tail()}"
    assert EXPECT[name] in proc.stdout, proc.stdout

    # Examples clean up after themselves.
    assert {s.id for s in Sandbox.list()} == sandboxes_before
    assert {s.id for s in Snapshot.list()} == snapshots_before
    assert {v.name for v in Volume.list()} == volumes_before
