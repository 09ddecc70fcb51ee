"""The few spots where async and sync code differ by more than ``async``/``await``, as pairs of functions
with the same signature. ``scripts/unasync.py`` maps each ``a``-prefixed name in ``kiln/_async`` to its
sync twin here when it generates ``kiln/_sync``."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, TypeVar

from ._wire import CHUNK

T = TypeVar("T")

OutputCallback = Callable[[str], object]
"""Called with each chunk of output as it arrives."""
AsyncOutputCallback = Callable[[str], "Awaitable[object] | object"]
"""As :data:`OutputCallback`; in the asyncio classes it may also be a coroutine function."""


async def aoffload(fn: Callable[..., T], *args: Any) -> T:
    """Runs blocking ``fn`` (file I/O) off the event loop."""
    return await asyncio.to_thread(fn, *args)


def offload(fn: Callable[..., T], *args: Any) -> T:
    return fn(*args)


async def acall(cb: AsyncOutputCallback, text: str) -> None:
    """Calls a user callback, awaiting it if it is a coroutine function."""
    ret = cb(text)
    if inspect.isawaitable(ret):
        await ret


def call(cb: OutputCallback, text: str) -> None:
    cb(text)


async def aread_chunks(f: Any) -> AsyncIterator[bytes]:
    while chunk := await asyncio.to_thread(f.read, CHUNK):
        yield chunk


def read_chunks(f: Any) -> Iterator[bytes]:
    while chunk := f.read(CHUNK):
        yield chunk


async def asleep(seconds: float) -> None:
    await asyncio.sleep(seconds)


def sleep(seconds: float) -> None:
    time.sleep(seconds)
