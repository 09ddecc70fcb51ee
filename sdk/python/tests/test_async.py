"""The asyncio twins (AsyncSandbox, AsyncSnapshot) against the same daemon."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

import kiln
from kiln import AsyncSandbox, AsyncSnapshot, Sandbox

pytestmark = pytest.mark.asyncio


async def test_async_sandbox_commands_and_files(sandbox: Sandbox, name: str, tmp_path: Path) -> None:
    sb = await AsyncSandbox.connect(sandbox.name)
    assert sb.id == sandbox.id and sb.state == "running"
    assert sandbox.id in [s.id for s in await AsyncSandbox.list(metadata={"role": "main"})]
    assert (await sb.refresh()).pid is not None
    assert "kiln-agent" in await sb.logs()

    r = await sb.run("echo $GREETING; exit 2")
    assert (r.stdout, r.exit_code, r.ok) == ("hello\n", 2, False)
    r = await sb.commands.run(["cat"], stdin=b"bytes in", cwd="/", env={"X": "1"}, timeout=10)
    assert r.stdout == "bytes in"
    assert (await sb.run("sleep 5", timeout=0.3)).timed_out

    # Callbacks may be coroutines or plain functions.
    out: list[str] = []
    err: list[str] = []

    async def on_out(s: str) -> None:
        out.append(s)

    r = await sb.run("echo a; sleep 0.1; echo b >&2; echo c", on_stdout=on_out, on_stderr=err.append)
    assert "".join(out) == "a\nc\n" == r.stdout and err == ["b\n"]

    f = sb.files
    await f.mkdir(f"/tmp/{name}")
    await f.write(f"/tmp/{name}/t.txt", "async", mode=0o644)
    assert await f.read(f"/tmp/{name}/t.txt") == "async"
    assert await f.read_bytes(f"/tmp/{name}/t.txt") == b"async"
    assert [e.name for e in await f.list(f"/tmp/{name}")] == ["t.txt"]
    assert (await f.stat(f"/tmp/{name}/t.txt")).mode == 0o644
    assert await f.exists(f"/tmp/{name}/t.txt")

    data = os.urandom(3 << 20)
    (tmp_path / "up").write_bytes(data)
    assert (await f.upload(tmp_path / "up", f"/tmp/{name}/up")).bytes == len(data)
    assert await f.download(f"/tmp/{name}/up", tmp_path / "down") == len(data)
    assert (tmp_path / "down").read_bytes() == data
    await f.remove(f"/tmp/{name}", recursive=True)
    assert not await f.exists(f"/tmp/{name}")

    with pytest.raises(kiln.GuestPathNotFoundError):
        await f.read(f"/tmp/{name}/t.txt")


async def test_async_snapshots_lifecycle_and_fork(sandbox: Sandbox, name: str) -> None:
    src = await AsyncSandbox.connect(sandbox.id)
    await src.files.write("/root/async", "v1")
    snap = await src.snapshot(name=name, metadata={"async": "yes"})
    assert isinstance(snap, AsyncSnapshot) and snap.id == name
    try:
        assert (await AsyncSnapshot.get(name)).metadata == {"async": "yes"}
        assert [s.id for s in await AsyncSnapshot.list(sandbox_id=src.id, metadata={"async": "yes"})] == [name]
        with pytest.raises(kiln.SnapshotAlreadyExistsError):
            await src.create_snapshot(name=name)

        # Two copies at once, through both ways of making a sandbox from a snapshot.
        a, b = await asyncio.gather(
            snap.restore(name=f"{name}-a"), AsyncSandbox.create(snapshot=name, name=f"{name}-b")
        )
        async with a, b:
            assert [await c.files.read("/root/async") for c in (a, b)] == ["v1", "v1"]

            assert (await a.pause()).state == "paused"
            with pytest.raises(kiln.ConflictError):
                await a.run("true")
            assert (await a.resume()).state == "running"
            assert (await a.stop()).state == "stopped"
            assert (await a.start()).state == "running"

            cp = await b.snapshot(name=f"{name}-cp", type="full", resume_source=False)
            assert b.state == "paused"
            await b.resume()
            await b.files.write("/root/async", "v2")
            rolled = await AsyncSandbox.from_snapshot(cp.id)
            assert rolled.id == b.id and await rolled.files.read("/root/async") == "v1"

            try:
                kids = await a.fork(count=1, name=f"{name}-k")
            except kiln.KilnError as e:
                if e.code != "route_not_found":
                    raise
                kids = []  # fork is covered (and skipped with a reason) in test_snapshots.py
            for k in kids:
                assert await k.files.read("/root/async") == "v1"
                await k.kill()
            await b.delete()
            await cp.refresh()
            assert cp.restored
            assert (await cp.delete()).id == cp.id
        with pytest.raises(kiln.SandboxNotFoundError):
            await AsyncSandbox.connect(a.id)
    finally:
        await AsyncSnapshot.delete(name)
    with pytest.raises(kiln.SnapshotNotFoundError):
        await AsyncSnapshot.get(name)
