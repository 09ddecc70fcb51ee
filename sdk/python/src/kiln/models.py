"""Plain data returned by the API, shared by the sync and async SDKs."""

from __future__ import annotations

import posixpath
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

__all__ = [
    "SandboxState",
    "SnapshotType",
    "PortMapping",
    "ExecResult",
    "DirEntry",
    "FileStat",
    "WriteResult",
    "SnapshotDeleted",
    "VolumeMount",
    "VolumeAttachment",
]

SandboxState = Literal["creating", "running", "paused", "stopped", "failed", "deleting"]
SnapshotType = Literal["full", "diff", "disk"]


def parse_time(value: str | None) -> datetime | None:
    """The daemon's RFC 3339 timestamps (``2026-01-02T03:04:05.678Z``) as aware datetimes."""
    if not value:
        return None
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


@dataclass(frozen=True)
class Lifetime:
    """A sandbox's lifetime policy and deadlines (``Sandbox.create(timeout=..., idle_timeout=...)``)."""

    timeout: int | None
    """Seconds of life, counted from creation, every start or wake, and the last ``set_timeout``."""
    expires_at: datetime | None
    idle_timeout: int | None
    """Seconds without use (API requests, background process output) before ``on_timeout`` applies."""
    idle_expires_at: datetime | None
    """When the idle timeout runs out if nothing happens before (only while the VM runs)."""
    on_timeout: Literal["hibernate", "delete"]
    auto_resume: bool
    """A hibernated sandbox is started again by the first exec, file, process or port call."""

    @classmethod
    def from_json(cls, d: dict[str, Any] | None) -> Lifetime | None:
        if not d:
            return None
        return cls(
            timeout=d.get("timeout"),
            expires_at=parse_time(d.get("expires_at")),
            idle_timeout=d.get("idle_timeout"),
            idle_expires_at=parse_time(d.get("idle_expires_at")),
            on_timeout=d.get("on_timeout", "hibernate"),
            auto_resume=bool(d.get("auto_resume", False)),
        )


@dataclass(frozen=True)
class PortMapping:
    """A TCP port of the guest forwarded to ``127.0.0.1:host`` on the host."""

    host: int
    guest: int
    auto: bool = False
    """The daemon picked the host port (copies made by resume or fork always get their own)."""

    @property
    def address(self) -> str:
        """``127.0.0.1:HOST``, where the guest port is reachable from the host."""
        return f"127.0.0.1:{self.host}"


@dataclass(frozen=True)
class ExecResult:
    """The outcome of a command run in a sandbox."""

    stdout: str
    stderr: str
    exit_code: int | None
    """``None`` when the command was killed by a signal (see :attr:`signal`)."""
    signal: int | None = None
    timed_out: bool = False
    duration_ms: int = 0
    truncated: bool = False
    """Collected output went past the daemon's cap (1 MiB each of stdout and stderr) and was cut;
    pass ``on_stdout``/``on_stderr`` (streaming) to receive all of it."""

    @property
    def ok(self) -> bool:
        """Whether the command exited with status 0 (and was not killed)."""
        return self.exit_code == 0 and not self.timed_out

    @property
    def output(self) -> str:
        """Standard output without surrounding whitespace (what smolvm's ``result.output`` gives)."""
        return self.stdout.strip()

    @classmethod
    def from_json(cls, d: dict[str, Any], stdout: str | None = None, stderr: str | None = None) -> ExecResult:
        return cls(
            stdout=d.get("stdout", "") if stdout is None else stdout,
            stderr=d.get("stderr", "") if stderr is None else stderr,
            exit_code=d.get("exit_code"),
            signal=d.get("signal"),
            timed_out=bool(d.get("timed_out", False)),
            duration_ms=int(d.get("duration_ms", 0)),
            truncated=bool(d.get("truncated", False)),
        )


@dataclass(frozen=True)
class FileStat:
    """Metadata of a guest path."""

    kind: str
    """``file``, ``dir``, ``symlink`` or ``other``."""
    size: int
    mode: int
    """Permission bits, e.g. ``0o644``."""
    mtime: datetime

    @property
    def is_dir(self) -> bool:
        return self.kind == "dir"

    @property
    def is_file(self) -> bool:
        return self.kind == "file"

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> FileStat:
        return cls(
            kind=d["kind"],
            size=int(d["size"]),
            mode=int(d["mode"]),
            mtime=datetime.fromtimestamp(int(d["mtime_unix"])).astimezone(),
        )


@dataclass(frozen=True)
class DirEntry(FileStat):
    """One entry of a guest directory listing."""

    name: str
    path: str
    """The entry's absolute guest path."""

    @classmethod
    def from_listing(cls, directory: str, d: dict[str, Any]) -> DirEntry:
        st = FileStat.from_json(d)
        return cls(
            kind=st.kind,
            size=st.size,
            mode=st.mode,
            mtime=st.mtime,
            name=d["name"],
            path=posixpath.join(directory, d["name"]),
        )


@dataclass(frozen=True)
class WriteResult:
    """What an upload wrote."""

    path: str
    bytes: int


@dataclass(frozen=True)
class SnapshotDeleted:
    """Result of deleting a snapshot."""

    id: str
    files_kept_for: list[str] = field(default_factory=list)
    """Sandboxes still running on the snapshot's files; the data is freed when the last is gone."""


@dataclass(frozen=True)
class VolumeMount:
    """A volume attached to a sandbox: which one, where in the guest, and whether read-only."""

    volume: str
    """The volume's name."""
    path: str
    """Absolute mount point in the guest, e.g. ``/data``."""
    read_only: bool = False
    """Read-only attachments may be shared by several sandboxes; a read-write one is exclusive."""

    def __str__(self) -> str:
        return f"{self.volume}:{self.path}{':ro' if self.read_only else ''}"


@dataclass(frozen=True)
class VolumeAttachment:
    """A sandbox a volume is attached to (running, paused, stopped or failed)."""

    sandbox_id: str
    sandbox_name: str
    path: str
    read_only: bool = False


class SandboxFields:
    """The sandbox record as the daemon reports it (shared by ``Sandbox`` and ``AsyncSandbox``)."""

    id: str
    name: str
    template: str
    state: SandboxState
    memory_mib: int
    max_memory_mib: int | None
    """RAM its machine has: copies restored from its memory snapshots may have up to this much memory
    (``None``: no headroom, they keep ``memory_mib``)."""
    cpus: int
    disk_size_bytes: int
    env: dict[str, str]
    metadata: dict[str, str]
    """The sandbox's labels (``labels`` in the REST API)."""
    ports: list[PortMapping]
    hostname: str
    mac: str
    accel: str
    pid: int | None
    error: str | None
    """Why the sandbox failed, with the last lines of its console."""
    origin: str
    """What it was made from: ``template:NAME`` or ``snapshot:ID``."""
    restored_from: str | None
    volumes: list[VolumeMount]
    """Volumes attached to it (given at creation; kept by stop/start, not carried by snapshots)."""
    volume_notes: list[str]
    """After a resume from a snapshot: what happened to its source's volumes (remounted, or why not)."""
    created_at: datetime | None
    updated_at: datetime | None
    lifetime: Lifetime | None
    """Its timeout, idle timeout and what happens then; ``None`` without one."""
    checkpoint_policy: dict[str, int] | None
    """Its continuous checkpoints, ``{"every": seconds, "keep": n}``; ``None`` without."""
    network: str | None
    """The private network it is in (bridged networking); ``None``: none."""
    address: str | None
    """Its own IPv4 address under bridged networking; ``None`` on user networking (every guest 10.0.2.15)."""
    address6: str | None
    """Its own IPv6 address under bridged networking where the daemon gives guests IPv6; else ``None``."""

    def _apply(self, d: dict[str, Any]) -> None:
        self.id = d["id"]
        self.name = d["name"]
        self.lifetime = Lifetime.from_json(d.get("lifetime"))
        self.checkpoint_policy = d.get("checkpoint_policy")
        self.template = d.get("template", "")
        self.state = d["state"]
        self.memory_mib = int(d.get("memory_mib", 0))
        self.max_memory_mib = d.get("max_memory_mib")
        self.cpus = int(d.get("cpus", 0))
        self.disk_size_bytes = int(d.get("disk_size_bytes", 0))
        self.env = dict(d.get("env") or {})
        self.metadata = dict(d.get("labels") or {})
        self.ports = [
            PortMapping(host=p["host"], guest=p["guest"], auto=bool(p.get("auto", False))) for p in d.get("ports") or []
        ]
        self.hostname = d.get("hostname", "")
        self.mac = d.get("mac", "")
        self.accel = d.get("accel", "")
        self.pid = d.get("pid")
        self.error = d.get("error")
        self.origin = d.get("origin", "")
        self.restored_from = d.get("restored_from")
        self.volumes = [
            VolumeMount(volume=v["volume"], path=v["path"], read_only=bool(v.get("read_only", False)))
            for v in d.get("volumes") or []
        ]
        self.volume_notes = list(d.get("volume_notes") or [])
        self.created_at = parse_time(d.get("created_at"))
        self.updated_at = parse_time(d.get("updated_at"))
        self.network = d.get("network")
        self.address = d.get("address")
        self.address6 = d.get("address6")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(id={self.id!r}, name={self.name!r}, state={self.state!r})"


class SnapshotFields:
    """The snapshot record as the daemon reports it (shared by ``Snapshot`` and ``AsyncSnapshot``)."""

    id: str
    """The snapshot's name; kiln snapshots are identified by name."""
    sandbox_id: str
    """The sandbox it was taken from (which may since have been deleted)."""
    sandbox_name: str
    type: SnapshotType
    parent: str | None
    """What a diff or disk snapshot builds on: ``template:NAME`` or ``snapshot:ID``."""
    template_snapshot: str | None
    """For a diff of a sandbox whose create resumed its template's snapshot: that template snapshot,
    which the diff builds on (``parent`` is then ``template:NAME``)."""
    template: str
    memory_mib: int
    max_memory_mib: int | None
    """A copy restored from this memory snapshot may have from ``memory_mib`` up to this much memory
    (``None``: no headroom)."""
    cpus: int
    disk_size_bytes: int
    size_bytes: int
    """Space its own files take on disk."""
    metadata: dict[str, str]
    """The snapshot's labels."""
    restored: bool
    """Whether it has been rolled back into its source sandbox."""
    restored_at: datetime | None
    created_at: datetime | None
    warm_spares: int
    """Copies resumed ahead of time and ready to hand out: the next resume of this snapshot only
    continues one (see ``kiln serve --warm-spares``)."""
    names: list[str]
    """Further names given with ``save_named``; every lookup finds the snapshot by any of them."""
    expires_at: datetime | None
    """When its ``ttl`` runs out; it is then deleted as soon as nothing depends on it."""
    pause_ms: int | None
    """How long its source was paused for the capture (ms)."""

    @property
    def name(self) -> str:
        """Same as :attr:`id`."""
        return self.id

    def _apply(self, d: dict[str, Any]) -> None:
        self.id = d["id"]
        self.sandbox_id = d.get("sandbox_id", "")
        self.sandbox_name = d.get("sandbox_name", "")
        self.type = d["type"]
        self.parent = d.get("parent")
        self.template_snapshot = d.get("template_snapshot")
        self.template = d.get("template", "")
        self.memory_mib = int(d.get("memory_mib", 0))
        self.max_memory_mib = d.get("max_memory_mib")
        self.cpus = int(d.get("cpus", 0))
        self.disk_size_bytes = int(d.get("disk_size_bytes", 0))
        self.size_bytes = int(d.get("size_bytes", 0))
        self.metadata = dict(d.get("labels") or {})
        self.restored = bool(d.get("restored", False))
        self.restored_at = parse_time(d.get("restored_at"))
        self.created_at = parse_time(d.get("created_at"))
        self.warm_spares = int(d.get("warm_spares", 0))
        self.names = list(d.get("names") or [])
        self.expires_at = parse_time(d.get("expires_at"))
        self.pause_ms = d.get("pause_ms")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(id={self.id!r}, type={self.type!r}, sandbox_id={self.sandbox_id!r})"


class VolumeFields:
    """The volume record as the daemon reports it (shared by ``Volume`` and ``AsyncVolume``)."""

    name: str
    """The volume's name, which identifies it."""
    size_bytes: int
    """Capacity of its filesystem."""
    allocated_bytes: int
    """Space the (sparse) volume file takes on the host's disk."""
    metadata: dict[str, str]
    """The volume's labels."""
    created_at: datetime | None
    attachments: list[VolumeAttachment]
    """Sandboxes it is attached to; a volume can only be deleted when there are none."""

    @property
    def id(self) -> str:
        """Same as :attr:`name`."""
        return self.name

    @property
    def size_mib(self) -> int:
        return self.size_bytes >> 20

    @property
    def in_use(self) -> bool:
        """Whether any sandbox has it attached (as of the last fetch)."""
        return bool(self.attachments)

    def _apply(self, d: dict[str, Any]) -> None:
        self.name = d["name"]
        self.size_bytes = int(d.get("size_bytes", 0))
        self.allocated_bytes = int(d.get("allocated_bytes", 0))
        self.metadata = dict(d.get("labels") or {})
        self.created_at = parse_time(d.get("created_at"))
        self.attachments = [
            VolumeAttachment(
                sandbox_id=a["sandbox_id"],
                sandbox_name=a.get("sandbox_name", ""),
                path=a["path"],
                read_only=bool(a.get("read_only", False)),
            )
            for a in d.get("attachments") or []
        ]

    def __repr__(self) -> str:
        n = len(self.attachments)
        return f"{type(self).__name__}(name={self.name!r}, size_mib={self.size_mib}, attachments={n})"


OperationState = Literal["running", "succeeded", "failed"]


class OperationFields:
    """A mutating request the daemon runs to its end whatever the client does (shared by ``Operation`` and
    ``AsyncOperation``); see "Operations" in docs/api.md."""

    id: str
    kind: str
    """What it does, e.g. ``snapshot.create``, ``sandbox.stop``."""
    target: str
    """The id of the sandbox, snapshot or volume the request named."""
    resources: dict[str, list[str]]
    """Ids it works on and created: ``{"sandboxes": [...], "snapshots": [...], "volumes": [...]}``."""
    state: OperationState
    stage: str | None
    """Where a running operation is, at a few milestones."""
    result: Any
    """The body a waiting client got on success."""
    error_code: str | None
    error_message: str | None
    created_at: datetime | None
    updated_at: datetime | None

    @property
    def done(self) -> bool:
        return self.state != "running"

    def _apply(self, d: dict[str, Any]) -> None:
        self.id = d["id"]
        self.kind = d.get("kind", "")
        self.target = d.get("target", "")
        self.resources = {k: list(v) for k, v in (d.get("resources") or {}).items()}
        self.state = d.get("state", "running")
        self.stage = d.get("stage")
        self.result = d.get("result")
        err = d.get("error") or {}
        self.error_code = err.get("code")
        self.error_message = err.get("message")
        self.created_at = parse_time(d.get("created_at"))
        self.updated_at = parse_time(d.get("updated_at"))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(id={self.id!r}, kind={self.kind!r}, state={self.state!r})"


@dataclass
class ProcessInfo:
    """A background process in a sandbox (``sandbox.processes``)."""

    pid: int
    """The guest pid (also its process group id): the handle for the other calls."""
    argv: list[str]
    state: str
    """``running`` or ``exited``."""
    user: str | None = None
    exit_code: int | None = None
    signal: int | None = None
    timed_out: bool = False
    output_bytes: int = 0
    dropped_bytes: int = 0
    """Output pushed out of the process's 1 MiB ring, which later readers cannot see."""
    started_uptime_ms: int = 0

    @property
    def running(self) -> bool:
        return self.state == "running"

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ProcessInfo:
        return cls(
            pid=int(d["pid"]),
            argv=list(d.get("argv", [])),
            state=str(d.get("state", "")),
            user=d.get("user"),
            exit_code=d.get("exit_code"),
            signal=d.get("signal"),
            timed_out=bool(d.get("timed_out", False)),
            output_bytes=int(d.get("output_bytes", 0)),
            dropped_bytes=int(d.get("dropped_bytes", 0)),
            started_uptime_ms=int(d.get("started_uptime_ms", 0)),
        )


@dataclass
class ProcessOutput:
    """What :meth:`Processes.logs` read: the retained output, and how the process ended if it did."""

    stdout: str
    stderr: str
    dropped_bytes: int = 0
    """Bytes lost from the ring before the output here."""
    exited: bool = False
    exit_code: int | None = None
    signal: int | None = None
