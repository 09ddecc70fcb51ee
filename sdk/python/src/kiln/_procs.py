"""Background processes (``sandbox.processes``): they outlive the client and are carried by snapshots,
forks and stop/start, since they live in the guest."""

from __future__ import annotations

import base64
import codecs
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ._client import sandbox_path
from .errors import error_from_code
from .models import ProcessInfo, ProcessOutput

if TYPE_CHECKING:
    from ._async import AsyncSandbox
    from ._sync import Sandbox

__all__ = ["Processes", "AsyncProcesses"]

OutputCallback = Callable[[str], object]
# The daemon takes at most this much per stdin write.
_STDIN_CHUNK = 256 * 1024


def start_body(
    cmd: str | Sequence[str],
    *,
    env: Mapping[str, str] | None,
    cwd: str | None,
    user: str | None,
    stdin: bool,
    timeout: float | None,
) -> dict[str, Any]:
    body: dict[str, Any] = {"cmd": cmd} if isinstance(cmd, str) else {"argv": list(cmd)}
    if env:
        body["env"] = dict(env)
    if cwd is not None:
        body["cwd"] = cwd
    if user is not None:
        body["user"] = str(user)
    if stdin:
        body["stdin"] = True
    if timeout is not None:
        body["timeout_ms"] = max(1, round(timeout * 1000))
    return body


def stdin_bodies(data: str | bytes, close: bool) -> list[dict[str, Any]]:
    raw = data.encode("utf-8") if isinstance(data, str) else bytes(data)
    chunks = [raw[i : i + _STDIN_CHUNK] for i in range(0, len(raw), _STDIN_CHUNK)] or [b""]
    return [
        {"data_b64": base64.b64encode(c).decode("ascii"), "close": close and i == len(chunks) - 1}
        for i, c in enumerate(chunks)
    ]


def signal_value(signal: int | str) -> int | str:
    return signal if isinstance(signal, int) else str(signal)


class LogDecoder:
    """Turns ``logs`` NDJSON events into text (UTF-8 decoded across chunk boundaries)."""

    def __init__(self) -> None:
        self._dec = {k: codecs.getincrementaldecoder("utf-8")(errors="replace") for k in ("stdout", "stderr")}
        self._parts: dict[str, list[str]] = {"stdout": [], "stderr": []}
        self.out = ProcessOutput(stdout="", stderr="")

    def feed(self, ev: Mapping[str, Any]) -> tuple[str, str] | None:
        kind = ev.get("type")
        if kind in ("stdout", "stderr"):
            raw = str(ev["data"]).encode("utf-8") if ev.get("data") is not None else base64.b64decode(ev.get("data_b64") or "")
            text = self._dec[kind].decode(raw)
            self._parts[kind].append(text)
            return (kind, text) if text else None
        if kind == "dropped":
            self.out.dropped_bytes += int(ev.get("bytes", 0))
        elif kind == "exit":
            self.out.exited = True
            self.out.exit_code = ev.get("exit_code")
            self.out.signal = ev.get("signal")
        elif kind == "error":
            raise error_from_code(str(ev.get("code")), str(ev.get("message")))
        return None

    def finish(self) -> ProcessOutput:
        for k in ("stdout", "stderr"):
            self._parts[k].append(self._dec[k].decode(b"", final=True))
        self.out.stdout = "".join(self._parts["stdout"])
        self.out.stderr = "".join(self._parts["stderr"])
        return self.out


class Processes:
    """Background processes of a sandbox (``sandbox.processes``)."""

    def __init__(self, sandbox: Sandbox) -> None:
        self._sb = sandbox

    def _path(self, suffix: str = "") -> str:
        return sandbox_path(self._sb.id, "/processes" + suffix)

    def start(
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
        return ProcessInfo.from_json(self._sb._client.request_json("POST", self._path(), json=body))

    def list(self) -> list[ProcessInfo]:
        """Running processes and recently finished ones (with their exit codes)."""
        d = self._sb._client.request_json("GET", self._path())
        return [ProcessInfo.from_json(p) for p in d["processes"]]

    def get(self, pid: int) -> ProcessInfo:
        return ProcessInfo.from_json(self._sb._client.request_json("GET", self._path(f"/{pid}")))

    def logs(
        self,
        pid: int,
        *,
        follow: bool = False,
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
    ) -> ProcessOutput:
        """The output the process's ring still holds, from the start; with ``follow=True`` also live
        output until it exits (callbacks get each chunk as it arrives)."""
        dec = LogDecoder()
        callbacks = {"stdout": on_stdout, "stderr": on_stderr}
        client = self._sb._client
        params = {"follow": "true" if follow else "false"}
        with client.stream("GET", self._path(f"/{pid}/logs"), params=params, timeout=None) as resp:
            for ev in client.iter_ndjson(resp):
                chunk = dec.feed(ev)
                if chunk is not None and (cb := callbacks[chunk[0]]) is not None:
                    cb(chunk[1])
        return dec.finish()

    def write(self, pid: int, data: str | bytes = b"", *, close: bool = False) -> None:
        """Writes to the process's stdin (it must have been started with ``stdin=True``)."""
        for body in stdin_bodies(data, close):
            self._sb._client.request("POST", self._path(f"/{pid}/stdin"), json=body)

    def kill(self, pid: int, signal: int | str = "TERM") -> None:
        """Sends ``signal`` (a name such as ``"TERM"``/``"KILL"`` or a number) to its process group."""
        self._sb._client.request("POST", self._path(f"/{pid}/signal"), json={"signal": signal_value(signal)})

    def wait(self, pid: int, timeout: float = 30) -> ProcessInfo:
        """Waits up to ``timeout`` seconds for it to end; check :attr:`ProcessInfo.running` for which."""
        ms = max(0, round(timeout * 1000))
        d = self._sb._client.request_json(
            "POST", self._path(f"/{pid}/wait"), params={"timeout_ms": str(ms)}, timeout=timeout + 30
        )
        return ProcessInfo.from_json(d)


class AsyncProcesses:
    """Background processes of a sandbox; see :class:`kiln.Processes`."""

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
        body = start_body(cmd, env=env, cwd=cwd, user=None if user is None else str(user), stdin=stdin, timeout=timeout)
        return ProcessInfo.from_json(await self._sb._client.arequest_json("POST", self._path(), json=body))

    async def list(self) -> list[ProcessInfo]:
        d = await self._sb._client.arequest_json("GET", self._path())
        return [ProcessInfo.from_json(p) for p in d["processes"]]

    async def get(self, pid: int) -> ProcessInfo:
        return ProcessInfo.from_json(await self._sb._client.arequest_json("GET", self._path(f"/{pid}")))

    async def logs(
        self,
        pid: int,
        *,
        follow: bool = False,
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
    ) -> ProcessOutput:
        dec = LogDecoder()
        callbacks = {"stdout": on_stdout, "stderr": on_stderr}
        client = self._sb._client
        params = {"follow": "true" if follow else "false"}
        async with client.astream("GET", self._path(f"/{pid}/logs"), params=params, timeout=None) as resp:
            async for ev in client.aiter_ndjson(resp):
                chunk = dec.feed(ev)
                if chunk is not None and (cb := callbacks[chunk[0]]) is not None:
                    cb(chunk[1])
        return dec.finish()

    async def write(self, pid: int, data: str | bytes = b"", *, close: bool = False) -> None:
        for body in stdin_bodies(data, close):
            await self._sb._client.arequest("POST", self._path(f"/{pid}/stdin"), json=body)

    async def kill(self, pid: int, signal: int | str = "TERM") -> None:
        await self._sb._client.arequest("POST", self._path(f"/{pid}/signal"), json={"signal": signal_value(signal)})

    async def wait(self, pid: int, timeout: float = 30) -> ProcessInfo:
        ms = max(0, round(timeout * 1000))
        d = await self._sb._client.arequest_json(
            "POST", self._path(f"/{pid}/wait"), params={"timeout_ms": str(ms)}, timeout=timeout + 30
        )
        return ProcessInfo.from_json(d)
