"""Background processes (sandbox.processes), sync and async, against a real VM."""

from __future__ import annotations

import pytest

import kiln
from kiln import AsyncSandbox, Sandbox


def test_processes_sync(sandbox: Sandbox) -> None:
    p = sandbox.processes.start("while read l; do echo \"got $l\"; done", stdin=True)
    assert p.running and p.pid in [q.pid for q in sandbox.processes.list()]
    sandbox.processes.write(p.pid, "x\n")
    sandbox.processes.write(p.pid, b"y\n", close=True)
    done = sandbox.processes.wait(p.pid, timeout=20)
    assert (done.running, done.exit_code) == (False, 0)
    out = sandbox.processes.logs(p.pid)
    assert (out.stdout, out.exited, out.exit_code) == ("got x\ngot y\n", True, 0)

    sl = sandbox.processes.start(["sleep", "1000"], user=1234)
    assert sandbox.processes.wait(sl.pid, timeout=0.2).running
    sandbox.processes.kill(sl.pid, "KILL")
    assert sandbox.processes.wait(sl.pid, timeout=20).signal == 9
    assert sandbox.processes.get(sl.pid).user == "1234"
    assert sandbox.run("id -u", user="1234").stdout == "1234\n"
    with pytest.raises(kiln.NotFoundError):
        sandbox.processes.get(999999)


@pytest.mark.asyncio
async def test_processes_async(sandbox: Sandbox) -> None:
    sb = await AsyncSandbox.connect(sandbox.name)
    p = await sb.processes.start("for i in 1 2 3; do echo $i; sleep 0.2; done; exit 4")
    seen: list[str] = []
    out = await sb.processes.logs(p.pid, follow=True, on_stdout=seen.append)
    assert (out.stdout, "".join(seen), out.exit_code) == ("1\n2\n3\n", "1\n2\n3\n", 4)
    assert (await sb.processes.wait(p.pid)).exit_code == 4
