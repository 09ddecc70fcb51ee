"""Runs the seed pages' Python programs (examples/seeds/*.py) against the session daemon, and checks the
behaviour the pages state that their programs alone do not show (volumes remounted on restore)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import REPO, Daemon
from kiln import Sandbox, Snapshot, Volume

SEEDS = sorted((REPO / "examples/seeds").glob("*.py"))

# Lines each program must print, showing that the page's workflow really happened.
EXPECT = {
    "nullspace.py": [
        "baseline\n",
        "first child\n",
        "second child\n",
        "| source: running",
        "hibernated: stopped",
        "after Sandbox.resume: running baseline",
        "after Sandbox.connect of a paused sandbox: running",
        "after Sandbox.connect of a hibernated sandbox: running baseline",
    ],
    "smolvm.py": [
        "Snapshot created: my-checkpoint",
        "still running",
        "SnapshotType.DIFF",
        "after the cold boot: Python 3.",
        "Status: VMState.RUNNING",
        "restored again with force: VMState.RUNNING",
        "my-checkpoint  vm=vm-",
        "restored=True",
        "snapshots of my-vm: 0",
        "delete refused while the restored VM runs:",
        "my-checkpoint deleted",
        "Experiment failed — rolling back\n42\n",
        "invalid snapshot id refused:",
        "A snapshot with this ID already exists",
        "Snapshot not found",
        "all snapshots deleted",
    ],
}


def test_every_seed_program_is_checked() -> None:
    assert sorted(p.name for p in SEEDS) == sorted(EXPECT)


@pytest.mark.parametrize("program", SEEDS, ids=lambda p: p.name)
def test_seed_program_runs(program: os.PathLike[str], daemon: Daemon) -> None:
    name = os.path.basename(program)
    sandboxes_before = {s.id for s in Sandbox.list()}
    snapshots_before = {s.id for s in Snapshot.list()}
    env = {**os.environ, "KILN_SOCKET": str(daemon.socket)}
    env.pop("KILN_URL", None)
    proc = subprocess.run(
        [sys.executable, str(program)], env=env, capture_output=True, text=True, timeout=900, cwd=REPO
    )
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout}\n{proc.stderr}\ndaemon log:\n{daemon.log_tail()}"
    for line in EXPECT[name]:
        assert line in proc.stdout, f"{line!r} not in:\n{proc.stdout}"
    # The programs leave nothing behind.
    assert {s.id for s in Sandbox.list()} == sandboxes_before
    assert {s.id for s in Snapshot.list()} == snapshots_before


def mounted(sb: Sandbox, path: str) -> bool:
    return sb.run(f"grep -q ' {path} ' /proc/mounts").ok


def test_restore_remounts_shared_volumes(daemon: Daemon, name: str) -> None:
    """nullspace: shared volumes are remounted on a compatible restore, read-only ones on every copy, a
    read-write one on the copy when it is free; the answer says what happened."""
    ro, rw = Volume.create(f"{name}-ro", size_mib=32), Volume.create(f"{name}-rw", size_mib=32)
    src = Sandbox.create(template="tiny", name=f"{name}-src", volumes=[f"{ro.name}:/ref:ro", f"{rw.name}:/work"])
    made: list[Sandbox] = []
    try:
        src.run("echo shared > /work/f && sync")
        snap = src.snapshot(name=f"{name}-s")
        # The source still holds the read-write volume: the copy gets the read-only one only.
        a = Sandbox.create(snapshot_id=snap.id, name=f"{name}-a")
        made.append(a)
        assert [(v.volume, v.path, v.read_only) for v in a.volumes] == [(ro.name, "/ref", True)]
        assert mounted(a, "/ref") and not mounted(a, "/work")
        assert any(f"volume {ro.name} remounted read-only at /ref" in n for n in a.volume_notes), a.volume_notes
        assert any(rw.name in n and "not remounted" in n and src.name in n for n in a.volume_notes), a.volume_notes
        # Once the source is gone the read-write volume is free: the next copy gets both, with the data.
        src.delete()
        b = Sandbox.create(snapshot_id=snap.id, name=f"{name}-b")
        made.append(b)
        assert sorted(v.volume for v in b.volumes) == sorted([ro.name, rw.name])
        assert b.run("cat /work/f").stdout == "shared\n"
        assert mounted(b, "/ref")
        # Volumes given explicitly replace the source's; [] on the resume route attaches none.
        c = snap.restore(name=f"{name}-c", volumes=[])
        made.append(c)
        assert c.volumes == [] and c.volume_notes == []
        assert not mounted(c, "/ref")
        Snapshot.delete(snap.id)
    finally:
        for sb in [*made, src]:
            try:
                sb.delete()
            except Exception:
                pass
        for v in (ro, rw):
            Volume.delete(Volume.get(v.name).name)  # still there: volumes outlive sandboxes and snapshots


def test_remount_never_fails_a_resume_for_want_of_slots(daemon: Daemon, name: str) -> None:
    """A memory snapshot's copy still holds its source's stale mounts, so it may have no slot free for the
    volumes it would get back: those are skipped with a note, and the resume itself succeeds."""
    vols = [Volume.create(f"{name}-{i}", size_mib=16) for i in range(4)]
    src = Sandbox.create(template="tiny", name=f"{name}-src", volumes=[f"{v.name}:/v{i}" for i, v in enumerate(vols)])
    copy: Sandbox | None = None
    try:
        snap = src.snapshot(name=f"{name}-s")
        src.delete()  # every volume is free now
        copy = Sandbox.create(snapshot_id=snap.id, name=f"{name}-c")
        assert copy.state == "running" and copy.volumes == []
        assert len(copy.volume_notes) == 4 and all("no free volume slot" in n for n in copy.volume_notes)
        assert copy.run("echo alive").stdout == "alive\n"
        copy.delete()
        copy = None
        Snapshot.delete(snap.id)
    finally:
        for sb in (copy, src):
            if sb is not None:
                try:
                    sb.delete()
                except Exception:
                    pass
        for v in vols:
            try:
                Volume.delete(v.name)
            except Exception:
                pass
