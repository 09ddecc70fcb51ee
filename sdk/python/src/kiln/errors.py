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
    """

    def __init__(self, message: str, *, code: str = "internal", status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.status = status

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
    """HTTP 429: the daemon's sandbox count or memory limit is reached, or this client is rate limited."""


class TimeoutError(KilnError):  # noqa: A001 - deliberately kiln.TimeoutError, like the daemon's code
    """A boot or command took too long on the server (HTTP 504), or the client gave up waiting."""


_BY_CODE: dict[str, type[KilnError]] = {
    "sandbox_not_found": SandboxNotFoundError,
    "snapshot_not_found": SnapshotNotFoundError,
    "guest_path_not_found": GuestPathNotFoundError,
    "snapshot_already_exists": SnapshotAlreadyExistsError,
    "volume_not_found": VolumeNotFoundError,
    "volume_already_exists": VolumeAlreadyExistsError,
    "volume_in_use": VolumeInUseError,
    "path_escape": PathEscapeError,
}

# The daemon's documented codes and their HTTP statuses (docs/api.md).
STATUS_BY_CODE: dict[str, int] = {
    "invalid_request": 400,
    "path_escape": 400,
    "unauthorized": 401,
    **dict.fromkeys(
        [
            "sandbox_not_found",
            "snapshot_not_found",
            "image_not_found",
            "guest_path_not_found",
            "volume_not_found",
            "operation_not_found",
            "port_not_found",
            "route_not_found",
        ],
        404,
    ),
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
        ],
        409,
    ),
    "snapshot_corrupt": 422,
    "snapshot_incompatible": 422,
    "method_not_allowed": 405,
    "payload_too_large": 413,
    "capacity_exceeded": 429,
    "rate_limited": 429,
    "boot_failed": 500,
    "vm_failed": 500,
    "operation_interrupted": 500,
    "internal": 500,
    "agent_unavailable": 502,
    "guest_error": 502,
    "sandbox_unresponsive": 503,
    "timeout": 504,
    "insufficient_storage": 507,
}

_BY_STATUS: dict[int, type[KilnError]] = {
    400: InvalidRequestError,
    401: AuthenticationError,
    404: NotFoundError,
    409: ConflictError,
    429: CapacityError,
    504: TimeoutError,
}


def error_from_response(status: int, body: Any, fallback_text: str = "") -> KilnError:
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
    return cls(message, code=code, status=status)


def error_from_code(code: str, message: str) -> KilnError:
    """Builds the exception for an error that arrived without an HTTP status (inside a stream)."""
    status = STATUS_BY_CODE.get(code, 500)
    return error_from_response(status, {"error": {"code": code, "message": message}})
