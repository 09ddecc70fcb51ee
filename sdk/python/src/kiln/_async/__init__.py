"""The asyncio SDK, and the source the sync SDK (``kiln/_sync``) is generated from by
``sdk/python/scripts/unasync.py``: change code here, never in ``kiln/_sync``, then run that script."""

from .events import AsyncEvents
from .processes import AsyncProcesses
from .sandbox import AsyncCommands, AsyncFiles, AsyncOperation, AsyncSandbox, AsyncSnapshot, AsyncVolume

__all__ = [
    "AsyncSandbox",
    "AsyncSnapshot",
    "AsyncVolume",
    "AsyncOperation",
    "AsyncCommands",
    "AsyncFiles",
    "AsyncProcesses",
    "AsyncEvents",
]
