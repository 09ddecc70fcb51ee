# Generated from src/kiln/_async/__init__.py by scripts/unasync.py: do not edit; edit that file and rerun.
"""The asyncio SDK, and the source the sync SDK (``kiln/_sync``) is generated from by
``sdk/python/scripts/unasync.py``: change code here, never in ``kiln/_sync``, then run that script."""

from .events import Events
from .processes import Processes
from .sandbox import Commands, Files, Operation, Sandbox, Snapshot, Volume

__all__ = [
    "Sandbox",
    "Snapshot",
    "Volume",
    "Operation",
    "Commands",
    "Files",
    "Processes",
    "Events",
]
