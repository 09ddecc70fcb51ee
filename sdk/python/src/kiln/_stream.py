"""``client.events()``: one object that is both a sync and an async iterator of events."""

from __future__ import annotations

from ._async.events import AsyncEvents
from ._sync.events import Events

__all__ = ["EventStream"]


class EventStream(Events, AsyncEvents):
    """``for event in client.events()`` or ``async for event in client.events()``: see :class:`AsyncEvents`."""
