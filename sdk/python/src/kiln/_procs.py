"""Request bodies and the log decoder shared by the async and sync ``Processes`` classes."""

from __future__ import annotations

import base64
import codecs
from collections.abc import Mapping, Sequence
from typing import Any

from .errors import error_from_code
from .models import ProcessOutput

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
            raw = (
                str(ev["data"]).encode("utf-8")
                if ev.get("data") is not None
                else base64.b64decode(ev.get("data_b64") or "")
            )
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
