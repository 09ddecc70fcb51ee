"""Request bodies and response decoding shared by the sync and async SDKs (no I/O here)."""

from __future__ import annotations

import base64
import codecs
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

from .errors import InvalidRequestError, error_from_code
from .models import ExecResult, PortMapping, VolumeFields, VolumeMount

PortSpec = int | PortMapping | tuple[int, int] | Mapping[str, int]
"""A published port: a guest port (``8080``: the daemon picks a free host port), ``PortMapping(host, guest)``,
a ``(host, guest)`` tuple or ``{"host": .., "guest": ..}`` (``host`` may be left out)."""

VolumeSpec = (
    VolumeMount | str | tuple[str | VolumeFields, str] | tuple[str | VolumeFields, str, bool] | Mapping[str, Any]
)
"""A volume to attach: ``VolumeMount(volume, path, read_only)``, ``"name:/path"`` or ``"name:/path:ro"``,
``(name, path)`` or ``(name, path, read_only)`` (``name`` may be a ``Volume``), or
``{"volume": name, "path": path, "read_only": bool}``."""

CHUNK = 1 << 20
"""Upload chunk size."""

# How much longer than a command's own timeout to wait for the daemon's answer before giving up.
EXEC_GRACE_S = 30.0


def drop_none(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if v is not None}


def label_params(metadata: Mapping[str, str] | None) -> list[tuple[str, str]]:
    """``label=K=V`` query parameters: the daemon keeps items carrying every one of them."""
    return [("label", f"{k}={v}") for k, v in (metadata or {}).items()]


def port_json(p: PortSpec) -> dict[str, int]:
    if isinstance(p, int):
        return {"guest": p}
    if isinstance(p, PortMapping):
        return {"host": p.host, "guest": p.guest}
    if isinstance(p, tuple):
        host, guest = p
        return {"host": int(host), "guest": int(guest)}
    if "host" not in p:
        return {"guest": int(p["guest"])}
    return {"host": int(p["host"]), "guest": int(p["guest"])}


def publish_body(guest: int, host: int | None) -> dict[str, int]:
    return {"guest": int(guest)} if host is None else {"guest": int(guest), "host": int(host)}


def find_port(ports: list[PortMapping], guest: int) -> PortMapping | None:
    return next((p for p in ports if p.guest == guest), None)


def _bad_volume(spec: object, why: str) -> InvalidRequestError:
    return InvalidRequestError(
        f"invalid volume {spec!r}: {why}; use 'NAME:/PATH', 'NAME:/PATH:ro', (NAME, PATH[, READ_ONLY]), "
        "{'volume': NAME, 'path': PATH, 'read_only': BOOL} or kiln.VolumeMount",
        code="invalid_request",
    )


def parse_volume(spec: VolumeSpec) -> VolumeMount:
    """One volume spec as a :class:`VolumeMount`; the daemon checks names, paths and the count."""
    if isinstance(spec, VolumeMount):
        return spec
    if isinstance(spec, str):
        # Like the CLI's --volume: NAME:/PATH or NAME:/PATH:ro (or :rw).
        volume, sep, rest = spec.partition(":")
        if not sep:
            raise _bad_volume(spec, "no ':' between the volume's name and the mount path")
        path, flag_sep, flag = rest.rpartition(":")
        if not flag_sep:
            return VolumeMount(volume=volume, path=rest)
        if flag not in ("ro", "rw"):
            raise _bad_volume(spec, f"unknown flag {flag!r} (only 'ro' or 'rw')")
        return VolumeMount(volume=volume, path=path, read_only=flag == "ro")
    if isinstance(spec, tuple):
        if len(spec) not in (2, 3):
            raise _bad_volume(spec, "a tuple needs 2 or 3 items")
        name = spec[0].name if isinstance(spec[0], VolumeFields) else spec[0]
        read_only = bool(spec[2]) if len(spec) == 3 else False
        return VolumeMount(volume=str(name), path=str(spec[1]), read_only=read_only)
    if isinstance(spec, Mapping):
        unknown = set(spec) - {"volume", "path", "read_only"}
        if unknown or "volume" not in spec or "path" not in spec:
            raise _bad_volume(spec, "a dict needs 'volume' and 'path' (and optionally 'read_only') only")
        volume = spec["volume"]
        name = volume.name if isinstance(volume, VolumeFields) else volume
        return VolumeMount(volume=str(name), path=str(spec["path"]), read_only=bool(spec.get("read_only", False)))
    raise _bad_volume(spec, f"a {type(spec).__name__} is not a volume spec")


def volumes_json(volumes: Iterable[VolumeSpec] | None) -> list[dict[str, Any]] | None:
    if volumes is None:
        return None
    if isinstance(volumes, (str, Mapping, VolumeMount)):
        volumes = [volumes]  # one spec given on its own
    mounts = [parse_volume(v) for v in volumes]
    # An empty list is sent as such: on a resume it means "no volumes" (absent: the source's, where free).
    return [{"volume": m.volume, "path": m.path, "read_only": m.read_only} for m in mounts]


def create_body(
    *,
    template: str | None,
    name: str | None,
    memory_mib: int | None,
    cpus: int | None,
    env: Mapping[str, str] | None,
    metadata: Mapping[str, str] | None,
    snapshot: str | None,
    volumes: Iterable[VolumeSpec] | None,
    disk_size_gib: int | None,
    ports: Iterable[PortSpec] | None,
    lifetime: dict[str, Any] | None = None,
    max_memory_mib: int | None = None,
    boot: bool | None = None,
) -> dict[str, Any]:
    return drop_none(
        {
            **(lifetime or {}),
            "max_memory_mib": max_memory_mib,
            "boot": boot or None,
            # A snapshot carries its own image, so the template only matters for a cold boot.
            "template": template if snapshot is None else None,
            "name": name,
            "memory_mib": memory_mib,
            "cpus": cpus,
            "disk_size_gib": disk_size_gib,
            "env": dict(env) if env else None,
            "labels": dict(metadata) if metadata else None,
            "ports": [port_json(p) for p in ports] if ports else None,
            "snapshot": snapshot,
            "volumes": volumes_json(volumes),
        }
    )


def resume_body(
    name: str | None,
    memory_mib: int | None,
    cpus: int | None,
    disk_size_gib: int | None,
    metadata: Mapping[str, str] | None,
    volumes: Iterable[VolumeSpec] | None = None,
    lifetime: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return drop_none(
        {
            **(lifetime or {}),
            "name": name,
            "memory_mib": memory_mib,
            "cpus": cpus,
            "disk_size_gib": disk_size_gib,
            "labels": dict(metadata) if metadata else None,
            "volumes": volumes_json(volumes),
        }
    )


def volume_body(name: str, size_mib: int | None, metadata: Mapping[str, str] | None) -> dict[str, Any]:
    return drop_none({"name": name, "size_mib": size_mib, "labels": dict(metadata) if metadata else None})


def snapshot_body(
    name: str | None,
    type: Literal["full", "diff", "disk"],
    resume_source: bool,
    metadata: Mapping[str, str] | None,
    ttl: int | None = None,
) -> dict[str, Any]:
    return drop_none(
        {
            "ttl": ttl,
            "name": name,
            "type": type,
            "leave_paused": not resume_source,
            "labels": dict(metadata) if metadata else None,
        }
    )


# What wakes a sandbox in each state (connect and Sandbox.resume("id")): continue a paused one, start a
# hibernated one; any other state is answered as it is.
WAKE_ACTIONS = {"paused": "resume", "stopped": "start"}


def fork_body(count: int, name: str | None, metadata: Mapping[str, str] | None) -> dict[str, Any]:
    return drop_none({"count": count, "name": name, "labels": dict(metadata) if metadata else None})


def exec_body(
    cmd: str | Sequence[str],
    *,
    env: Mapping[str, str] | None,
    cwd: str | None,
    timeout: float | None,
    stdin: str | bytes | None,
    stream: bool,
) -> dict[str, Any]:
    body: dict[str, Any] = {"cmd": cmd} if isinstance(cmd, str) else {"argv": list(cmd)}
    if env:
        body["env"] = dict(env)
    if cwd is not None:
        body["cwd"] = cwd
    if timeout is not None:
        body["timeout_ms"] = max(1, round(timeout * 1000))
    if isinstance(stdin, str):
        body["stdin"] = stdin
    elif stdin is not None:
        body["stdin_b64"] = base64.b64encode(stdin).decode("ascii")
    if stream:
        body["stream"] = True
    return body


def exec_http_timeout(timeout: float | None) -> float | None:
    """How long to wait for an exec's answer: the command's own limit plus a grace, else forever."""
    return None if timeout is None else timeout + EXEC_GRACE_S


def file_params(path: str, **extra: str | None) -> dict[str, str]:
    return drop_none({"path": path, **extra})


def mode_param(mode: int | str | None) -> str | None:
    """``0o644`` or ``"644"``/``"0644"`` as the octal string the daemon takes."""
    if mode is None:
        return None
    return f"{mode:04o}" if isinstance(mode, int) else mode


class ExecStream:
    """Decodes a streamed exec's NDJSON events into text chunks and the final :class:`ExecResult`.

    Output is decoded incrementally per stream, so a UTF-8 character split across two chunks (the daemon
    then sends ``data_b64``) still comes out whole.
    """

    def __init__(self) -> None:
        self._out: list[str] = []
        self._err: list[str] = []
        self._dec = {
            "stdout": codecs.getincrementaldecoder("utf-8")(errors="replace"),
            "stderr": codecs.getincrementaldecoder("utf-8")(errors="replace"),
        }
        self.pid: int | None = None
        self.result: ExecResult | None = None

    def feed(self, event: Mapping[str, Any]) -> tuple[str, str] | None:
        """Consumes one event; returns ``(stream, text)`` when it carried output for a callback."""
        kind = event.get("type")
        if kind in ("stdout", "stderr"):
            if event.get("data") is not None:
                raw = str(event["data"]).encode("utf-8")
            else:
                raw = base64.b64decode(event.get("data_b64") or "")
            text = self._dec[kind].decode(raw)
            return self._emit(kind, text)
        if kind == "started":
            self.pid = event.get("pid")
        elif kind == "exit":
            tail_out = self._dec["stdout"].decode(b"", final=True)
            tail_err = self._dec["stderr"].decode(b"", final=True)
            self._out.append(tail_out)
            self._err.append(tail_err)
            self.result = ExecResult.from_json(dict(event), stdout="".join(self._out), stderr="".join(self._err))
        elif kind == "error":
            raise error_from_code(str(event.get("code")), str(event.get("message")))
        return None

    def _emit(self, kind: str, text: str) -> tuple[str, str] | None:
        if not text:
            return None
        (self._out if kind == "stdout" else self._err).append(text)
        return kind, text

    def finish(self) -> ExecResult:
        if self.result is None:
            raise error_from_code("agent_unavailable", "the exec stream ended without an exit event")
        return self.result


def lifetime_body(
    timeout: int | None,
    idle_timeout: int | None,
    on_timeout: Literal["hibernate", "delete"] | None,
    auto_resume: bool | None,
) -> dict[str, Any]:
    """Lifetime fields for create, resume and ``set_timeout`` (left out when not given)."""
    return drop_none(
        {"timeout": timeout, "idle_timeout": idle_timeout, "on_timeout": on_timeout, "auto_resume": auto_resume}
    )
