"""Background processes (``sandbox.processes``): they outlive the client and are carried by snapshots,
forks and stop/start, since they live in the guest. The asyncio class is the source of the sync one
(``sdk/python/scripts/unasync.py`` generates ``kiln/_sync``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from .. import _io
from .._client import sandbox_path
from .._io import AsyncOutputCallback
from .._procs import LogDecoder, signal_value, start_body, stdin_bodies
from ..models import ProcessInfo, ProcessOutput

if TYPE_CHECKING:
    from .sandbox import AsyncSandbox

__all__ = ["AsyncProcesses"]


class AsyncProcesses:
    """Background processes of a sandbox (``sandbox.processes``)."""

    def __init__(self, sandbox: AsyncSandbox) -> None:
        self._sb = sandbox

    def _path(self, suffix: str = "") -> str:
        return sandbox_path(self._sb.id, "/processes" + suffix)

    async def start(
        self,
        cmd: str | Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        user: str | int | None = None,
        stdin: bool = False,
        timeout: float | None = None,
    ) -> ProcessInfo:
        """Starts ``cmd`` (a shell line, or an argv list) in the background and returns at once.

        ``stdin=True`` keeps its standard input open for :meth:`write`; ``user`` runs it as that guest
        user (name or uid); ``timeout`` kills it after that many seconds."""
        body = start_body(cmd, env=env, cwd=cwd, user=None if user is None else str(user), stdin=stdin, timeout=timeout)
        return ProcessInfo.from_json(await self._sb._client.arequest_json("POST", self._path(), json=body))

    async def list(self) -> list[ProcessInfo]:
        """Running processes and recently finished ones (with their exit codes)."""
        d = await self._sb._client.arequest_json("GET", self._path())
        return [ProcessInfo.from_json(p) for p in d["processes"]]

    async def get(self, pid: int) -> ProcessInfo:
        return ProcessInfo.from_json(await self._sb._client.arequest_json("GET", self._path(f"/{pid}")))

    async def logs(
        self,
        pid: int,
        *,
        follow: bool = False,
        on_stdout: AsyncOutputCallback | None = None,
        on_stderr: AsyncOutputCallback | None = None,
    ) -> ProcessOutput:
        """The output the process's ring still holds, from the start; with ``follow=True`` also live
        output until it exits (callbacks get each chunk as it arrives)."""
        dec = LogDecoder()
        callbacks = {"stdout": on_stdout, "stderr": on_stderr}
        client = self._sb._client
        params = {"follow": "true" if follow else "false"}
        async with client.astream("GET", self._path(f"/{pid}/logs"), params=params, timeout=None) as resp:
            async for ev in client.aiter_ndjson(resp):
                chunk = dec.feed(ev)
                if chunk is not None and (cb := callbacks[chunk[0]]) is not None:
                    await _io.acall(cb, chunk[1])
        return dec.finish()

    async def write(self, pid: int, data: str | bytes = b"", *, close: bool = False) -> None:
        """Writes to the process's stdin (it must have been started with ``stdin=True``)."""
        for body in stdin_bodies(data, close):
            await self._sb._client.arequest("POST", self._path(f"/{pid}/stdin"), json=body)

    async def kill(self, pid: int, signal: int | str = "TERM") -> None:
        """Sends ``signal`` (a name such as ``"TERM"``/``"KILL"`` or a number) to its process group."""
        await self._sb._client.arequest("POST", self._path(f"/{pid}/signal"), json={"signal": signal_value(signal)})

    async def wait(self, pid: int, timeout: float = 30) -> ProcessInfo:
        """Waits up to ``timeout`` seconds for it to end; check :attr:`ProcessInfo.running` for which."""
        ms = max(0, round(timeout * 1000))
        d = await self._sb._client.arequest_json(
            "POST",
            self._path(f"/{pid}/wait"),
            params={"timeout_ms": str(ms)},
            timeout=timeout + 30,
            idempotent=True,  # waiting changes nothing, so a 502/503 or broken connection is retried
        )
        return ProcessInfo.from_json(d)
