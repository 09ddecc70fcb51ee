"""The daemon's event stream (``GET /v1/events``, server-sent events): the event type and the SSE parser
shared by the sync and async iterators."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Event:
    """One committed change of a sandbox, snapshot, volume or operation (docs/observability.md)."""

    seq: int
    """Increases by one per event from 1 at daemon start; pass it as ``since`` to resume after it."""
    time: str
    kind: str
    """``sandbox.created``, ``sandbox.state``, ``sandbox.deleted``, ``snapshot.created``, ``snapshot.deleted``,
    ``volume.created``, ``volume.deleted``, ``operation.started``, ``operation.finished``, or ``events.gap``
    (events were missed: ``object`` says which and why)."""
    id: str
    sandbox: str | None
    state: str | None
    object: dict[str, Any] | None
    """The API object after the change; ``None`` once deleted."""

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Event:
        return cls(
            seq=int(d["seq"]),
            time=d.get("time", ""),
            kind=d["kind"],
            id=d.get("id", ""),
            sandbox=d.get("sandbox"),
            state=d.get("state"),
            object=d.get("object"),
        )


def params(kinds: str | Sequence[str] | None, sandbox: str | None, since: int | None) -> dict[str, str]:
    p: dict[str, str] = {}
    if kinds:
        p["kind"] = kinds if isinstance(kinds, str) else ",".join(kinds)
    if sandbox:
        p["sandbox"] = sandbox
    if since is not None:
        p["since"] = str(since)
    return p


class SseDecoder:
    """Feeds on response lines; returns an event at each blank line that ends one (comments skipped)."""

    def __init__(self) -> None:
        self._data: list[str] = []

    def feed(self, lines: Iterable[str]) -> list[Event]:
        out = []
        for line in lines:
            line = line.rstrip("\r")
            if line == "":
                if self._data:
                    out.append(Event.from_json(json.loads("\n".join(self._data))))
                self._data = []
            elif line.startswith("data:"):
                self._data.append(line[5:].removeprefix(" "))
        return out
