"""Continuous checkpoints and rewind through the sync SDK: a policy takes checkpoints in the background,
keeps the newest ``keep``, and ``rewind`` brings back the files of one of them in the same sandbox."""

from __future__ import annotations

import time

from kiln import Sandbox


def wait_checkpoints(sb: Sandbox, seen: set[str], n: int, timeout: float = 240.0) -> list:
    """Waits until ``n`` checkpoints not in ``seen`` were taken (adding every id it sees)."""
    deadline, fresh = time.monotonic() + timeout, 0
    while True:
        now = sb.checkpoints()
        for c in now:
            if c.id not in seen:
                seen.add(c.id)
                fresh += 1
        if fresh >= n:
            return now
        assert time.monotonic() < deadline, f"{fresh} of {n} checkpoints of {sb.name} in {timeout} s"
        time.sleep(0.3)


def test_checkpoint_policy_and_rewind(sandbox: Sandbox, name: str) -> None:
    base = sandbox.snapshot(name=f"{name}-base")
    with base.restore(name=name) as sb:
        sb.files.write("/root/mark", "A")
        sb.run("sync")
        sb = sb.set_checkpoint_policy(2, keep=2)
        assert sb.checkpoint_policy == {"every": 2, "keep": 2}
        seen: set[str] = set()
        # The second one after the write holds it.
        at_a = wait_checkpoints(sb, seen, 2)[-1]
        assert at_a.pause_ms is not None and at_a.sandbox_id == sb.id
        sb.files.write("/root/mark", "B")
        sb.run("sync")
        kept = wait_checkpoints(sb, seen, 3)
        sb.clear_checkpoint_policy()
        assert sb.refresh().checkpoint_policy is None
        # Retention: more were taken than are kept.
        assert len(seen) > 2 and len(sb.checkpoints()) <= 2 and len(kept) <= 3
        latest = sb.checkpoints()[-1]
        sb.files.write("/root/mark", "C")
        back = sb.rewind(latest.id)
        assert back.id == sb.id and back.state == "running"
        assert sb.files.read("/root/mark") == "B"
