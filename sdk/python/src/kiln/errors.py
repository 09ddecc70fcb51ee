"""Exceptions raised by the kiln SDK.

Every error the daemon reports (``{"error": {"code", "message"}}``) becomes a :class:`KilnError`
subclass chosen by its code, falling back to its HTTP status. ``str(err)`` is the server's message,
which says what went wrong and what to do about it.
"""

from __future__ import annotations

from typing import Any

__all__ = [
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
    "ServerError",
    "ImageNotFoundError",
    "OperationNotFoundError",
    "PortNotFoundError",
    "ProcessNotFoundError",
    "RouteNotFoundError",
    "GuestPermissionDeniedError",
    "MethodNotAllowedError",
    "PayloadTooLargeError",
    "SandboxNameTakenError",
    "SandboxNotRunningError",
    "SandboxBusyError",
    "SnapshotInUseError",
    "SnapshotBaseMissingError",
    "SnapshotBaseChangedError",
    "SnapshotAlreadyRestoredError",
    "ResourceOverrideRefusedError",
    "PortInUseError",
    "GuestPathConflictError",
    "AgentOutdatedError",
    "SnapshotCorruptError",
    "ExecFailedError",
    "SnapshotIncompatibleError",
    "CapacityExceededError",
    "RateLimitedError",
    "BootFailedError",
    "VmFailedError",
    "OperationInterruptedError",
    "InternalError",
    "AgentUnavailableError",
    "GuestError",
    "SandboxUnresponsiveError",
    "InsufficientStorageError",
    "GuestDiskFullError",
    "RemoteNotFoundError",
    "RemoteAlreadyExistsError",
    "RemoteUnavailableError",
    "ImageInUseError",
    "ImageBuilderMissingError",
    "error_from_response",
    "error_from_code",
]


class KilnError(Exception):
    """Base class of every SDK error.

    Attributes:
        code: the daemon's stable machine-readable code (``sandbox_not_found``, ...), or a
            client-side one (``connection_failed``, ``client_timeout``).
        status: the HTTP status, or ``None`` when the error arose in the client.
        message: the explanation, usually with a hint on what to do.
        retry_after: seconds the daemon asked to wait (its ``Retry-After`` header), if any.
    """

    def __init__(
        self, message: str, *, code: str = "internal", status: int | None = None, retry_after: float | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.status = status
        self.retry_after = retry_after

    def __repr__(self) -> str:
        return f"{type(self).__name__}(code={self.code!r}, status={self.status!r}, message={self.message!r})"


class KilnConnectionError(KilnError):
    """The daemon could not be reached (socket missing, connection refused, ...)."""


class InvalidRequestError(KilnError):
    """A parameter is out of range or malformed (HTTP 400); the message names the rule."""


class PathEscapeError(InvalidRequestError):
    """HTTP 400 ``path_escape``: a tar entry of a directory upload would land outside the target directory
    (an absolute name, ``..``, or a path through a symlink)."""


class AuthenticationError(KilnError):
    """Missing or wrong bearer token on a TCP connection (HTTP 401)."""


class NotFoundError(KilnError):
    """Something named in the request does not exist (HTTP 404)."""


class SandboxNotFoundError(NotFoundError):
    """No sandbox has the given id or name."""


class SnapshotNotFoundError(NotFoundError):
    """No snapshot has the given id."""


class GuestPathNotFoundError(NotFoundError):
    """A path inside the guest does not exist."""


class VolumeNotFoundError(NotFoundError):
    """No volume has the given name (also when a sandbox is created with one that does not exist)."""


class ConflictError(KilnError):
    """The request conflicts with the current state (HTTP 409): a name in use, a sandbox that is
    not running, a snapshot in use or already restored, a volume in use, ..."""


class SnapshotAlreadyExistsError(ConflictError):
    """A snapshot with that name already exists."""


class VolumeAlreadyExistsError(ConflictError):
    """A volume with that name already exists."""


class VolumeInUseError(ConflictError):
    """The volume is attached where that is not allowed: deleting a volume some sandbox has attached,
    attaching a volume that another sandbox has read-write, or attaching one read-write that is attached
    anywhere. The message names the sandboxes holding it."""


class CapacityError(KilnError):
    """HTTP 429: the daemon's sandbox count or memory limit is reached, or this client is rate limited.
    The SDK already retried it (see :class:`kiln.RetryPolicy`) before raising; :attr:`retry_after` is the
    daemon's ``Retry-After`` in seconds, if it sent one."""


class TimeoutError(KilnError):  # noqa: A001 - deliberately kiln.TimeoutError, like the daemon's code
    """A boot or command took too long on the server (HTTP 504), or the client gave up waiting."""


class ServerError(KilnError):
    """The daemon or a VM failed (HTTP 5xx other than 504): see the subclass and the message."""


# One class per code the daemon can return (crates/kiln-core/src/error.rs plus the HTTP layer's own);
# tests/test_error_codes.py fails when the daemon gains a code that is missing here.


class ImageNotFoundError(NotFoundError):
    """No guest image has that name (build it with ``kiln image build``)."""


class OperationNotFoundError(NotFoundError):
    """No operation has that id (finished ones are kept for a while, then forgotten)."""


class PortNotFoundError(NotFoundError):
    """The guest port is not published on this sandbox."""


class ProcessNotFoundError(NotFoundError):
    """No background process with that pid in the sandbox."""


class RouteNotFoundError(NotFoundError):
    """The daemon has no such API route (it may be older than this SDK)."""


class GuestPermissionDeniedError(KilnError):
    """The guest refused access to a path (HTTP 403)."""


class MethodNotAllowedError(KilnError):
    """The route exists but not with this HTTP method (HTTP 405)."""


class PayloadTooLargeError(KilnError):
    """The request body is over the daemon's limit (HTTP 413; ``kiln serve --max-body-bytes``)."""


class SandboxNameTakenError(ConflictError):
    """Another sandbox has that name."""


class SandboxNotRunningError(ConflictError):
    """The sandbox is not in a state that allows this (e.g. stopped or paused); the message says which."""


class SandboxBusyError(ConflictError):
    """Another operation on the sandbox is in progress; retry when it has finished."""


class SnapshotInUseError(ConflictError):
    """The snapshot cannot be deleted: other snapshots or sandboxes depend on it."""


class SnapshotBaseMissingError(ConflictError):
    """A diff snapshot's base snapshot is gone."""


class SnapshotBaseChangedError(ConflictError):
    """A diff snapshot's base is not the one it was taken against any more."""


class SnapshotAlreadyRestoredError(ConflictError):
    """The snapshot was restored before; pass ``force=True`` to restore it again."""


class ResourceOverrideRefusedError(ConflictError):
    """A resume asked for resources the snapshot's machine cannot take (less memory than it holds, more
    vCPUs than it has)."""


class PortInUseError(ConflictError):
    """The host port is taken (or the guest port is already published)."""


class GuestPathConflictError(ConflictError):
    """The guest path exists with another kind (e.g. a file where a directory is needed)."""


class AgentOutdatedError(ConflictError):
    """The sandbox's guest agent is too old for the request: rebuild its image."""


class SnapshotCorruptError(KilnError):
    """The snapshot's files fail their checks (HTTP 422); it cannot be used."""


class ExecFailedError(KilnError):
    """The guest could not start the command (HTTP 422 ``exec_failed``): no such program, not executable, a
    bad format. The sandbox is fine; fix the command."""


class SnapshotIncompatibleError(KilnError):
    """The snapshot cannot run here, e.g. taken with another QEMU, CPU model or accelerator (HTTP 422)."""


class CapacityExceededError(CapacityError):
    """The daemon's sandbox count or memory limit is reached (HTTP 429)."""


class RateLimitedError(CapacityError):
    """This client sent too many requests (HTTP 429, ``kiln serve --rate-limit``)."""


class BootFailedError(ServerError):
    """The VM did not boot or its agent did not answer in time."""


class VmFailedError(ServerError):
    """QEMU failed or exited."""


class OperationInterruptedError(ServerError):
    """The operation was cut off (e.g. by a daemon restart) and rolled back."""


class InternalError(ServerError):
    """An unexpected daemon error; its log has details."""


class AgentUnavailableError(ServerError):
    """The guest agent does not answer (HTTP 502)."""


class GuestError(ServerError):
    """The guest agent reported a failure (HTTP 502)."""


class SandboxUnresponsiveError(ServerError):
    """The VM stopped answering QEMU's monitor in time (HTTP 503)."""


class InsufficientStorageError(ServerError):
    """The host's disk is too full for the operation (HTTP 507)."""


class GuestDiskFullError(ServerError):
    """The guest's disk is full (HTTP 507)."""


class RemoteNotFoundError(NotFoundError):
    """No remote by that name (HTTP 404)."""


class RemoteAlreadyExistsError(ConflictError):
    """A remote by that name exists already (HTTP 409)."""


class RemoteUnavailableError(ServerError):
    """The remote's object storage did not answer or refused (HTTP 502)."""


class ImageInUseError(ConflictError):
    """Sandboxes made from the image exist, so it cannot be removed (HTTP 409)."""


class ImageBuilderMissingError(ServerError):
    """No image builder (buildah or docker) is installed for a Dockerfile build (HTTP 501)."""


_BY_CODE: dict[str, type[KilnError]] = {
    "invalid_request": InvalidRequestError,
    "unauthorized": AuthenticationError,
    "guest_permission_denied": GuestPermissionDeniedError,
    "sandbox_not_found": SandboxNotFoundError,
    "snapshot_not_found": SnapshotNotFoundError,
    "image_not_found": ImageNotFoundError,
    "guest_path_not_found": GuestPathNotFoundError,
    "volume_not_found": VolumeNotFoundError,
    "operation_not_found": OperationNotFoundError,
    "port_not_found": PortNotFoundError,
    "process_not_found": ProcessNotFoundError,
    "route_not_found": RouteNotFoundError,
    "method_not_allowed": MethodNotAllowedError,
    "payload_too_large": PayloadTooLargeError,
    "sandbox_name_taken": SandboxNameTakenError,
    "sandbox_not_running": SandboxNotRunningError,
    "sandbox_busy": SandboxBusyError,
    "snapshot_already_exists": SnapshotAlreadyExistsError,
    "snapshot_in_use": SnapshotInUseError,
    "snapshot_base_missing": SnapshotBaseMissingError,
    "snapshot_base_changed": SnapshotBaseChangedError,
    "snapshot_already_restored": SnapshotAlreadyRestoredError,
    "volume_already_exists": VolumeAlreadyExistsError,
    "volume_in_use": VolumeInUseError,
    "resource_override_refused": ResourceOverrideRefusedError,
    "port_in_use": PortInUseError,
    "guest_path_conflict": GuestPathConflictError,
    "agent_outdated": AgentOutdatedError,
    "snapshot_corrupt": SnapshotCorruptError,
    "exec_failed": ExecFailedError,
    "snapshot_incompatible": SnapshotIncompatibleError,
    "capacity_exceeded": CapacityExceededError,
    "rate_limited": RateLimitedError,
    "boot_failed": BootFailedError,
    "vm_failed": VmFailedError,
    "operation_interrupted": OperationInterruptedError,
    "internal": InternalError,
    "agent_unavailable": AgentUnavailableError,
    "guest_error": GuestError,
    "sandbox_unresponsive": SandboxUnresponsiveError,
    "timeout": TimeoutError,
    "insufficient_storage": InsufficientStorageError,
    "guest_disk_full": GuestDiskFullError,
    "path_escape": PathEscapeError,
    "remote_not_found": RemoteNotFoundError,
    "remote_already_exists": RemoteAlreadyExistsError,
    "remote_unavailable": RemoteUnavailableError,
    "image_in_use": ImageInUseError,
    "image_builder_missing": ImageBuilderMissingError,
}

# The HTTP status of each code (for errors that arrive inside a stream, without one).
STATUS_BY_CODE: dict[str, int] = {
    "invalid_request": 400,
    "path_escape": 400,
    "unauthorized": 401,
    "guest_permission_denied": 403,
    **dict.fromkeys(
        [
            "sandbox_not_found",
            "snapshot_not_found",
            "image_not_found",
            "guest_path_not_found",
            "volume_not_found",
            "operation_not_found",
            "port_not_found",
            "process_not_found",
            "route_not_found",
            "remote_not_found",
        ],
        404,
    ),
    "method_not_allowed": 405,
    **dict.fromkeys(
        [
            "sandbox_name_taken",
            "snapshot_already_exists",
            "sandbox_not_running",
            "snapshot_in_use",
            "snapshot_already_restored",
            "snapshot_base_missing",
            "snapshot_base_changed",
            "sandbox_busy",
            "volume_already_exists",
            "volume_in_use",
            "resource_override_refused",
            "port_in_use",
            "guest_path_conflict",
            "agent_outdated",
            "remote_already_exists",
            "image_in_use",
        ],
        409,
    ),
    "payload_too_large": 413,
    "snapshot_corrupt": 422,
    "exec_failed": 422,
    "snapshot_incompatible": 422,
    "capacity_exceeded": 429,
    "rate_limited": 429,
    "boot_failed": 500,
    "vm_failed": 500,
    "operation_interrupted": 500,
    "internal": 500,
    "image_builder_missing": 501,
    "agent_unavailable": 502,
    "remote_unavailable": 502,
    "guest_error": 502,
    "sandbox_unresponsive": 503,
    "timeout": 504,
    "insufficient_storage": 507,
    "guest_disk_full": 507,
}

# Codes this SDK does not know yet (a newer daemon) still get the class of their status.
_BY_STATUS: dict[int, type[KilnError]] = {
    400: InvalidRequestError,
    401: AuthenticationError,
    404: NotFoundError,
    409: ConflictError,
    429: CapacityError,
    500: ServerError,
    501: ServerError,
    502: ServerError,
    503: ServerError,
    504: TimeoutError,
    507: ServerError,
}


def error_from_response(status: int, body: Any, fallback_text: str = "", retry_after: float | None = None) -> KilnError:
    """Builds the exception for an error response; ``body`` is its decoded JSON (or anything else)."""
    detail = body.get("error") if isinstance(body, dict) else None
    if isinstance(detail, dict) and isinstance(detail.get("code"), str):
        code = detail["code"]
        message = str(detail.get("message") or code)
    else:
        # Not kiln's error shape (e.g. a proxy in between): keep whatever text came back.
        code = f"http_{status}"
        message = fallback_text.strip() or f"HTTP {status}"
    cls = _BY_CODE.get(code) or _BY_STATUS.get(status) or KilnError
    return cls(message, code=code, status=status, retry_after=retry_after)


def error_from_code(code: str, message: str) -> KilnError:
    """Builds the exception for an error that arrived without an HTTP status (inside a stream)."""
    status = STATUS_BY_CODE.get(code, 500)
    return error_from_response(status, {"error": {"code": code, "message": message}})
