"""Python SDK for kiln, the self-hosted microVM sandbox engine.

    import kiln

    with kiln.Sandbox.create(template="tiny") as sb:
        print(sb.run("echo hello").stdout)
        snap = sb.snapshot(name="checkpoint")
        copy = snap.restore(name="copy")

    cache = kiln.Volume.create("cache", size_mib=512)  # durable: outlives every sandbox
    with kiln.Sandbox.create(volumes=["cache:/cache"]) as sb:
        sb.run("echo kept > /cache/f; sync")

The daemon is found through ``KILN_SOCKET`` / ``KILN_URL`` + ``KILN_TOKEN`` or the default socket; pass
``client=kiln.Client(...)`` to any class method to use another.
"""

from ._async import AsyncCommands, AsyncFiles, AsyncOperation, AsyncSandbox, AsyncSnapshot, AsyncVolume
from ._procs import AsyncProcesses, Processes
from ._dirs import UnpackResult, WatchEvent
from ._client import Client, default_socket, get_default_client, set_default_client
from ._sync import Commands, Files, Operation, Sandbox, Snapshot, Volume
from .errors import (
    AuthenticationError,
    CapacityError,
    ConflictError,
    GuestPathNotFoundError,
    InvalidRequestError,
    KilnConnectionError,
    KilnError,
    NotFoundError,
    PathEscapeError,
    SandboxNotFoundError,
    SnapshotAlreadyExistsError,
    SnapshotNotFoundError,
    TimeoutError,
    VolumeAlreadyExistsError,
    VolumeInUseError,
    VolumeNotFoundError,
)
from .models import (
    DirEntry,
    ExecResult,
    FileStat,
    PortMapping,
    ProcessInfo,
    ProcessOutput,
    SnapshotDeleted,
    VolumeAttachment,
    VolumeMount,
    WriteResult,
)

__version__ = "0.1.0"

__all__ = [
    "Client",
    "PathEscapeError",
    "UnpackResult",
    "WatchEvent",
    "default_socket",
    "get_default_client",
    "set_default_client",
    "Sandbox",
    "Snapshot",
    "Volume",
    "Operation",
    "AsyncOperation",
    "Commands",
    "Files",
    "AsyncSandbox",
    "AsyncSnapshot",
    "AsyncVolume",
    "AsyncCommands",
    "AsyncFiles",
    "Processes",
    "AsyncProcesses",
    "ProcessInfo",
    "ProcessOutput",
    "ExecResult",
    "DirEntry",
    "FileStat",
    "PortMapping",
    "SnapshotDeleted",
    "VolumeMount",
    "VolumeAttachment",
    "WriteResult",
    "KilnError",
    "KilnConnectionError",
    "InvalidRequestError",
    "AuthenticationError",
    "NotFoundError",
    "SandboxNotFoundError",
    "SnapshotNotFoundError",
    "GuestPathNotFoundError",
    "VolumeNotFoundError",
    "ConflictError",
    "SnapshotAlreadyExistsError",
    "VolumeAlreadyExistsError",
    "VolumeInUseError",
    "CapacityError",
    "TimeoutError",
]
