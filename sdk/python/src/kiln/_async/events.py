"""The event stream as an iterator (``client.events()``). The asyncio class is the source of the sync one
(``sdk/python/scripts/unasync.py`` generates ``kiln/_sync``)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING

from .._events import Event, SseDecoder, params

if TYPE_CHECKING:
    from .._client import Client

__all__ = ["AsyncEvents"]


class AsyncEvents:
    """Events as they happen, from ``client.events(kinds=["sandbox."])``. The stream stays
    open until the loop ends (``break``) or the daemon closes it; ``last_seq`` is the newest event seen,
    to pass as ``since`` when reconnecting."""

    def __init__(
        self,
        client: Client,
        *,
        kinds: str | Sequence[str] | None = None,
        sandbox: str | None = None,
        since: int | None = None,
    ) -> None:
        self._client = client
        self._params = params(kinds, sandbox, since)
        self.last_seq: int | None = since

    async def __aiter__(self) -> AsyncIterator[Event]:
        client = self._client
        decoder = SseDecoder()
        async with client.astream("GET", "/v1/events", params=self._params, timeout=None) as resp:
            async for line in resp.aiter_lines():
                for event in decoder.feed([line]):
                    self.last_seq = event.seq
                    yield event
