"""Python SDK for kiln, the self-hosted microVM sandbox engine.

    import kiln

    with kiln.Sandbox.create(template="tiny") as sb:
        print(sb.run("echo hello").stdout)
        snap = sb.snapshot(name="checkpoint")
        copy = snap.restore(name="copy")

The daemon is found through ``KILN_SOCKET`` / ``KILN_URL`` + ``KILN_TOKEN`` or the default socket; pass
``client=kiln.Client(...)`` to any class method to use another.
"""

from ._async import AsyncCommands, AsyncFiles, AsyncSandbox, AsyncSnapshot
from ._client import Client, default_socket, get_default_client, set_default_client
from ._sync import Commands, Files, Sandbox, Snapshot
from .errors import (
    AuthenticationError,
    CapacityError,
    ConflictError,
    GuestPathNotFoundError,
    InvalidRequestError,
    KilnConnectionError,
    KilnError,
    NotFoundError,
    SandboxNotFoundError,
    SnapshotAlreadyExistsError,
    SnapshotNotFoundError,
    TimeoutError,
)
from .models import DirEntry, ExecResult, FileStat, PortMapping, SnapshotDeleted, WriteResult

__version__ = "0.1.0"

__all__ = [
    "Client",
    "default_socket",
    "get_default_client",
    "set_default_client",
    "Sandbox",
    "Snapshot",
    "Commands",
    "Files",
    "AsyncSandbox",
    "AsyncSnapshot",
    "AsyncCommands",
    "AsyncFiles",
    "ExecResult",
    "DirEntry",
    "FileStat",
    "PortMapping",
    "SnapshotDeleted",
    "WriteResult",
    "KilnError",
    "KilnConnectionError",
    "InvalidRequestError",
    "AuthenticationError",
    "NotFoundError",
    "SandboxNotFoundError",
    "SnapshotNotFoundError",
    "GuestPathNotFoundError",
    "ConflictError",
    "SnapshotAlreadyExistsError",
    "CapacityError",
    "TimeoutError",
]
