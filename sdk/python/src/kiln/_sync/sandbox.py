# Generated from src/kiln/_async/sandbox.py by scripts/unasync.py: do not edit; edit that file and rerun.
"""Sandboxes, snapshots, volumes and operations. The asyncio classes in ``kiln/_async`` are the source;
``kiln/_sync`` is generated from them by ``sdk/python/scripts/unasync.py``."""

from __future__ import annotations

import builtins
import os
import tempfile
from collections.abc import Iterator, Iterable, Mapping, Sequence
from contextlib import contextmanager
from types import TracebackType
from typing import Any, Literal, overload

from .. import _dirs, _io, _wire
from .._client import Client, get_default_client, operation_path, sandbox_path, snapshot_path, volume_path
from .._dirs import UnpackResult, WatchEvent
from .._hybrid import hybridmethod
from .._io import OutputCallback
from ..errors import ConflictError, GuestPathNotFoundError, SandboxNotFoundError
from ..models import (
    DirEntry,
    ExecResult,
    FileStat,
    OperationFields,
    PortMapping,
    SandboxFields,
    SnapshotDeleted,
    SnapshotFields,
    VolumeFields,
    WriteResult,
)
from .processes import Processes

__all__ = ["Sandbox", "Snapshot", "Volume", "Operation", "Commands", "Files"]


class Commands:
    """Runs processes in a sandbox (``sandbox.commands``)."""

    def __init__(self, sandbox: Sandbox) -> None:
        self._sb = sandbox

    def run(
        self,
        cmd: str | Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        timeout: float | None = None,
        stdin: str | bytes | None = None,
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
        user: str | int | None = None,
    ) -> ExecResult:
        """Runs a command and waits for it.

        Args:
            cmd: a shell command line (run with ``/bin/sh -c``), or an argv list run directly.
            env: extra environment variables.
            cwd: working directory in the guest.
            timeout: seconds after which the command is killed; the result then has ``timed_out=True``.
            stdin: text or bytes fed to the command's standard input.
            on_stdout, on_stderr: called with each chunk of output as it arrives (the output is also
                collected in the result).
            user: run as this guest user (name or uid) instead of root.

        A non-zero exit is not an error: check :attr:`ExecResult.ok` or ``exit_code``.
        """
        stream = on_stdout is not None or on_stderr is not None
        body = _wire.exec_body(cmd, env=env, cwd=cwd, timeout=timeout, stdin=stdin, stream=stream)
        if user is not None:
            body["user"] = str(user)
        path = sandbox_path(self._sb.id, "/exec")
        http_timeout = _wire.exec_http_timeout(timeout)
        client = self._sb._client
        if not stream:
            return ExecResult.from_json(client.request_json("POST", path, json=body, timeout=http_timeout))
        decoder = _wire.ExecStream()
        callbacks = {"stdout": on_stdout, "stderr": on_stderr}
        with client.stream("POST", path, json=body, timeout=http_timeout) as resp:
            for event in client.iter_ndjson(resp):
                chunk = decoder.feed(event)
                if chunk is not None and (cb := callbacks[chunk[0]]) is not None:
                    _io.call(cb, chunk[1])
        return decoder.finish()


class Files:
    """Reads and writes files in a sandbox (``sandbox.files``). Guest paths must be absolute."""

    def __init__(self, sandbox: Sandbox) -> None:
        self._sb = sandbox

    def _path(self, suffix: str = "") -> str:
        return sandbox_path(self._sb.id, "/files" + suffix)

    def write(self, path: str, data: str | bytes, mode: int | str | None = None) -> WriteResult:
        """Writes a whole file (atomically replacing it; parent directories are created).

        ``mode`` is the permission bits, e.g. ``0o755``.
        """
        content = data.encode("utf-8") if isinstance(data, str) else data
        return self._put(path, content, mode, len(content))

    def _put(self, path: str, content: Any, mode: int | str | None, length: int) -> WriteResult:
        d = self._sb._client.request_json(
            "PUT",
            self._path(),
            params=_wire.file_params(path, mode=_wire.mode_param(mode)),
            content=content,
            headers={"Content-Type": "application/octet-stream", "Content-Length": str(length)},
        )
        return WriteResult(path=d["path"], bytes=int(d["bytes"]))

    def read_bytes(self, path: str) -> bytes:
        """A whole file's content."""
        resp = self._sb._client.request("GET", self._path(), params=_wire.file_params(path))
        return resp.content

    def read(self, path: str, encoding: str = "utf-8") -> str:
        """A whole file's content as text."""
        return (self.read_bytes(path)).decode(encoding)

    def list(self, path: str) -> builtins.list[DirEntry]:
        """The entries of a guest directory."""
        items = self._sb._client.request_json("GET", self._path("/list"), params=_wire.file_params(path))
        return [DirEntry.from_listing(path, d) for d in items]

    def stat(self, path: str) -> FileStat:
        """Size, mode, kind and modification time of a guest path (raises GuestPathNotFoundError)."""
        return FileStat.from_json(
            self._sb._client.request_json("GET", self._path("/stat"), params=_wire.file_params(path))
        )

    def exists(self, path: str) -> bool:
        try:
            self.stat(path)
        except GuestPathNotFoundError:
            return False
        return True

    def mkdir(self, path: str) -> None:
        """Creates a directory and its missing parents."""
        self._sb._client.request("POST", self._path("/mkdir"), json={"path": path})

    def remove(self, path: str, recursive: bool = False) -> None:
        """Removes a file, or a directory (non-empty ones only with ``recursive=True``)."""
        params = _wire.file_params(path, recursive="true" if recursive else None)
        self._sb._client.request("DELETE", self._path(), params=params)

    def upload(
        self, local_path: str | os.PathLike[str], remote_path: str, mode: int | str | None = None
    ) -> WriteResult:
        """Copies a local file into the guest, streaming it (any size)."""
        f = _io.offload(open, local_path, "rb")
        try:
            size = os.fstat(f.fileno()).st_size
            return self._put(remote_path, _io.read_chunks(f), mode, size)
        finally:
            f.close()

    def download(self, remote_path: str, local_path: str | os.PathLike[str]) -> int:
        """Copies a guest file to a local path, streaming it; returns the number of bytes."""
        client = self._sb._client
        written = 0
        with client.stream("GET", self._path(), params=_wire.file_params(remote_path)) as resp:
            f = _io.offload(open, local_path, "wb")
            try:
                for chunk in resp.iter_bytes(_wire.CHUNK):
                    _io.offload(f.write, chunk)
                    written += len(chunk)
            finally:
                f.close()
        return written

    def upload_dir(self, local_dir: str | os.PathLike[str], remote_dir: str) -> UnpackResult:
        """Copies a local directory into the guest as one tar stream: modes, symlinks, empty directories and
        mtimes are kept. ``remote_dir`` is created if missing; entries that would land outside it are
        refused (``PathEscapeError``)."""
        spool, size = _io.offload(_dirs.pack, local_dir)
        try:
            d = self._sb._client.request_json(
                "PUT",
                self._path("/dir"),
                params=_wire.file_params(remote_dir),
                content=_io.read_chunks(spool),
                headers={"Content-Type": "application/x-tar", "Content-Length": str(size)},
            )
        finally:
            spool.close()
        return UnpackResult(path=d["path"], entries=int(d["entries"]), bytes=int(d["bytes"]))

    def download_dir(self, remote_dir: str, local_dir: str | os.PathLike[str]) -> None:
        """Copies a guest directory to ``local_dir`` (created if missing), streaming it as a tar (spooled,
        then unpacked)."""
        spool = tempfile.SpooledTemporaryFile(max_size=_dirs.SPOOL)
        try:
            with self._sb._client.stream(
                "GET", self._path("/dir"), params=_wire.file_params(remote_dir)
            ) as resp:
                for chunk in resp.iter_bytes(_wire.CHUNK):
                    _io.offload(spool.write, chunk)
            spool.seek(0)
            _io.offload(_dirs.unpack, spool, local_dir)
        finally:
            spool.close()

    def write_files(self, files: _dirs.FileSpec) -> builtins.list[WriteResult]:
        """Writes several files in one request, in order, each atomically (parents created):
        ``{path: content}`` or ``(path, content[, mode])`` tuples; ``bytes`` content goes as base64."""
        d = self._sb._client.request_json("POST", self._path("/batch"), json=_dirs.batch_body(files))
        return [WriteResult(path=f["path"], bytes=int(f["bytes"])) for f in d["files"]]

    @contextmanager
    def watch(self, path: str, recursive: bool = False) -> Iterator[Iterator[WatchEvent]]:
        """Watches a guest directory: ``with sb.files.watch("/app") as events: for ev in events: ...``.
        The watch is in place when the ``with`` body starts and ends in the guest when it exits."""
        params = _wire.file_params(path, recursive="true" if recursive else None)
        client = self._sb._client

        def events(resp: Any) -> Iterator[WatchEvent]:
            for d in client.iter_ndjson(resp):
                yield WatchEvent.from_json(d)

        with client.stream("GET", self._path("/watch"), params=params, timeout=None) as resp:
            yield events(resp)


class Sandbox(SandboxFields):
    """A microVM sandbox. Make one with :meth:`create`, :meth:`connect` or :meth:`Snapshot.restore`.

    Used as a context manager, the sandbox is deleted on exit::

        with Sandbox.create() as sb:  # asyncio: async with await AsyncSandbox.create() as sb:
            print(sb.run("uname -a").stdout)

    Attributes mirror the daemon's record (see :class:`kiln.models.SandboxFields`) as of the last call
    that returned it; :meth:`refresh` fetches it again.
    """

    commands: Commands
    files: Files
    processes: Processes

    def __init__(self, data: dict[str, Any], client: Client) -> None:
        self._client = client
        self.commands = Commands(self)
        self.files = Files(self)
        self.processes = Processes(self)
        self._apply(data)

    @classmethod
    def create(
        cls,
        template: str = "tiny",
        name: str | None = None,
        memory_mib: int | None = None,
        cpus: int | None = None,
        env: Mapping[str, str] | None = None,
        metadata: Mapping[str, str] | None = None,
        snapshot: str | None = None,
        volumes: Iterable[_wire.VolumeSpec] | None = None,
        disk_size_gib: int | None = None,
        ports: Iterable[_wire.PortSpec] | None = None,
        *,
        snapshot_id: str | None = None,
        timeout: int | None = None,
        idle_timeout: int | None = None,
        on_timeout: Literal["hibernate", "delete"] | None = None,
        auto_resume: bool | None = None,
        max_memory_mib: int | None = None,
        boot: bool = False,
        checkpoint_every: int | None = None,
        checkpoint_keep: int | None = None,
        client: Client | None = None,
    ) -> Sandbox:
        """Boots a new sandbox and returns once its guest agent answers.

        Args:
            template: guest image to boot (ignored when ``snapshot`` is given).
            name: unique name (default: the id).
            memory_mib, cpus, disk_size_gib: resources (daemon defaults when omitted).
            env: environment variables for every command run in it.
            metadata: labels, for :meth:`list` filters.
            snapshot, snapshot_id: make it from this snapshot instead of booting (see :meth:`Snapshot.restore`).
            volumes: volumes to attach (at most 4), each ``"name:/path"``, ``"name:/path:ro"``, ``(name, path)``,
                ``(name, path, read_only)``, ``{"volume": .., "path": .., "read_only": ..}`` or
                :class:`VolumeMount`. A read-write volume belongs to one sandbox at a time; read-only ones may be
                shared. With ``snapshot`` and no ``volumes``, the source's volumes are remounted where free
                (``volume_notes`` says what happened); given ``volumes`` replace them.
            ports: guest ports to publish on 127.0.0.1: a guest port (a free host port is picked; see
                :meth:`get_host`), ``(host, guest)`` or :class:`PortMapping`.
            timeout: seconds of life (renew with :meth:`set_timeout`); then ``on_timeout`` applies.
            idle_timeout: seconds without use (API calls for it, background process output); then ``on_timeout``.
            on_timeout: ``"hibernate"`` (default: RAM to disk, resumable) or ``"delete"``.
            auto_resume: start it again when it is used while hibernated (default True with a lifetime).
            max_memory_mib: room for copies restored from its memory snapshots to have more memory
                (up to this many MiB; default ``memory_mib`` × the daemon's ``--memory-headroom``, 2;
                ``memory_mib`` for none).
            boot: boot cold instead of resuming the template's snapshot (the answer's ``boot`` says how it
                started).
            checkpoint_every, checkpoint_keep: take a checkpoint every this many seconds, keeping the newest
                ``checkpoint_keep`` (default 10); see :meth:`checkpoints` and :meth:`rewind`.
        """
        body = _wire.create_body(
            template=template,
            name=name,
            memory_mib=memory_mib,
            cpus=cpus,
            env=env,
            metadata=metadata,
            snapshot=snapshot or snapshot_id,
            volumes=volumes,
            disk_size_gib=disk_size_gib,
            ports=ports,
            lifetime={
                **_wire.lifetime_body(timeout, idle_timeout, on_timeout, auto_resume),
                **_wire.drop_none({"checkpoint_every": checkpoint_every, "checkpoint_keep": checkpoint_keep}),
            },
            max_memory_mib=max_memory_mib,
            boot=boot,
        )
        client = client or get_default_client()
        return cls(client.request_json("POST", "/v1/sandboxes", json=body), client)

    @classmethod
    def connect(cls, sandbox_id: str, *, client: Client | None = None) -> Sandbox:
        """An existing sandbox, by id or name (raises :class:`SandboxNotFoundError`), woken up if it was
        paused or hibernated (as :meth:`resume` on the class does)."""
        client = client or get_default_client()
        sb = cls(client.request_json("GET", sandbox_path(sandbox_id)), client)
        return sb._wake()

    def _wake(self) -> Sandbox:
        # Another client may wake it between our look and our request: then the daemon refuses with
        # sandbox_not_running and a fresh look finds it running.
        for _ in range(3):
            action = _wire.WAKE_ACTIONS.get(self.state)
            if action is None:
                return self
            try:
                return self._lifecycle(action)
            except ConflictError:
                self.refresh()
        return self

    @classmethod
    def list(
        cls, metadata: Mapping[str, str] | None = None, *, client: Client | None = None
    ) -> builtins.list[Sandbox]:
        """All sandboxes, or those carrying every ``metadata`` label given."""
        client = client or get_default_client()
        items = client.request_json("GET", "/v1/sandboxes", params=_wire.label_params(metadata))
        return [cls(d, client) for d in items]

    @classmethod
    def from_snapshot(
        cls, snapshot_id: str, resume: bool = True, force: bool = False, *, client: Client | None = None
    ) -> Sandbox:
        """Rolls the snapshot's source sandbox back to it, keeping the sandbox's id and name (it is
        recreated if it was deleted). ``resume=False`` leaves it paused; ``force`` allows restoring a
        snapshot again. For a *new* sandbox from a snapshot use :meth:`Snapshot.restore`.
        """
        client = client or get_default_client()
        body = {"resume": resume, "force": force}
        return cls(client.request_json("POST", snapshot_path(snapshot_id, "/restore"), json=body), client)

    def refresh(self) -> Sandbox:
        """Fetches the current record (state, pid, ...)."""
        self._apply(self._client.request_json("GET", sandbox_path(self.id)))
        return self

    def run(
        self,
        cmd: str | Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        timeout: float | None = None,
        stdin: str | bytes | None = None,
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
        user: str | int | None = None,
    ) -> ExecResult:
        """Shortcut for :meth:`Commands.run`."""
        return self.commands.run(
            cmd, env=env, cwd=cwd, timeout=timeout, stdin=stdin, on_stdout=on_stdout, on_stderr=on_stderr, user=user
        )

    def logs(self) -> str:
        """The serial console output (kernel and init messages)."""
        return (self._client.request("GET", sandbox_path(self.id, "/logs"))).text

    def snapshot(
        self,
        name: str | None = None,
        type: Literal["full", "diff", "disk"] = "full",
        resume_source: bool = True,
        metadata: Mapping[str, str] | None = None,
        ttl: int | None = None,
    ) -> Snapshot:
        """Captures the sandbox; snapshots are durable and outlive the sandbox.

        Args:
            name: the snapshot's id (default ``snap-<sandbox>-<unix time>``); must be unused.
            type: ``full`` (memory and disk, self-contained), ``diff`` (only what changed since the
                sandbox's origin) or ``disk`` (disk only; restores by cold boot, resources may change).
            resume_source: ``False`` leaves the sandbox paused after the capture.
            metadata: labels, for :meth:`Snapshot.list` filters.
            ttl: seconds after which the snapshot is deleted, once nothing depends on it.
        """
        body = _wire.snapshot_body(name, type, resume_source, metadata, ttl)
        d = self._client.request_json("POST", sandbox_path(self.id, "/snapshots"), json=body)
        if not resume_source:
            self.state = "paused"
        return Snapshot(d, self._client)

    create_snapshot = snapshot

    @overload
    def fork(
        self, count: None = None, name: str | None = None, metadata: Mapping[str, str] | None = None
    ) -> Sandbox: ...

    @overload
    def fork(
        self, count: int, name: str | None = None, metadata: Mapping[str, str] | None = None
    ) -> builtins.list[Sandbox]: ...

    def fork(
        self, count: int | None = None, name: str | None = None, metadata: Mapping[str, str] | None = None
    ) -> Sandbox | builtins.list[Sandbox]:
        """New running sandboxes that continue from this one's current state (memory and disk); this one
        keeps running. ``fork()`` returns the one child; ``fork(count=N)`` a list of N.

        All or nothing: if one child cannot start, none is left. Children are named ``NAME-1``, ``NAME-2``,
        ... (default prefix: this sandbox's name plus ``-fork-XXXX``).
        """
        d = self._client.request_json(
            "POST", sandbox_path(self.id, "/fork"), json=_wire.fork_body(count or 1, name, metadata)
        )
        children = [Sandbox(s, self._client) for s in d["sandboxes"]]
        return children[0] if count is None else children

    def publish_port(self, guest: int, host: int | None = None) -> PortMapping:
        """Publishes a guest TCP port on ``127.0.0.1``: on ``host``, or on a free port the daemon picks.

        Works on a running sandbox; publishing a published guest port again returns its mapping.
        """
        d = self._client.request_json(
            "POST", sandbox_path(self.id, "/ports"), json=_wire.publish_body(guest, host)
        )
        self.refresh()
        return PortMapping(host=d["host"], guest=d["guest"], auto=bool(d.get("auto", False)))

    def unpublish_port(self, guest: int) -> None:
        """Stops forwarding a guest port (:class:`NotFoundError` ``port_not_found`` if it is not published)."""
        self._apply(self._client.request_json("DELETE", sandbox_path(self.id, f"/ports/{int(guest)}")))

    def get_host(self, port: int) -> str:
        """``127.0.0.1:HOST`` where the guest's TCP ``port`` is reachable from the host; publishes it on a
        free host port first if it is not published yet. Copies (resume, fork) have host ports of their own."""
        p = _wire.find_port(self.ports, port) or self.publish_port(port)
        return p.address

    def _lifecycle(self, action: str) -> Sandbox:
        self._apply(self._client.request_json("POST", sandbox_path(self.id, f"/{action}")))
        return self

    def pause(self) -> Sandbox:
        """Freezes the vCPUs; memory stays (see :meth:`resume`)."""
        return self._lifecycle("pause")

    @hybridmethod
    def resume(
        self_or_cls: Sandbox | type[Sandbox],  # noqa: N805 - hybridmethod: the class or an instance
        sandbox_id: str | None = None,
        *,
        client: Client | None = None,
    ) -> Sandbox:
        """``sb.resume()`` continues a paused sandbox. ``Sandbox.resume("id")`` wakes the sandbox with that
        id or name, whether paused or hibernated (:meth:`stop`), and returns it (a running one as it is)."""
        if isinstance(self_or_cls, Sandbox):
            return self_or_cls._lifecycle("resume")
        if sandbox_id is None:
            raise TypeError("resume() on the class needs the sandbox's id")
        return self_or_cls.connect(sandbox_id, client=client)

    def stop(self) -> Sandbox:
        """Hibernates: saves the whole machine to disk and frees its RAM (see :meth:`start`)."""
        return self._lifecycle("stop")

    def start(self) -> Sandbox:
        """Brings a hibernated sandbox back where it was."""
        return self._lifecycle("start")

    def set_timeout(
        self,
        timeout: int | None = None,
        *,
        idle_timeout: int | None = None,
        on_timeout: Literal["hibernate", "delete"] | None = None,
        auto_resume: bool | None = None,
    ) -> Sandbox:
        """Renews or changes the sandbox's lifetime: ``timeout`` seconds of life from now (0 removes the
        limit); the other fields change when given. :attr:`lifetime` shows the new deadlines."""
        body = _wire.lifetime_body(timeout, idle_timeout, on_timeout, auto_resume)
        self._apply(self._client.request_json("POST", sandbox_path(self.id, "/timeout"), json=body))
        return self

    def set_checkpoint_policy(self, every: int, *, keep: int | None = None) -> Sandbox:
        """Takes a checkpoint (a memory snapshot) every ``every`` seconds in the background, keeping the
        newest ``keep`` (default 10); ``every=0`` removes the policy. :attr:`checkpoint_policy` shows it."""
        body = _wire.drop_none({"every": every, "keep": keep})
        self._apply(
            self._client.request_json("PUT", sandbox_path(self.id, "/checkpoint-policy"), json=body)
        )
        return self

    def clear_checkpoint_policy(self) -> Sandbox:
        """Removes the checkpoint policy; the checkpoints taken stay."""
        self._apply(self._client.request_json("DELETE", sandbox_path(self.id, "/checkpoint-policy")))
        return self

    def checkpoints(self) -> builtins.list[Snapshot]:
        """The sandbox's checkpoints, oldest first (each with ``pause_ms``, the pause it cost)."""
        data = self._client.request_json("GET", sandbox_path(self.id, "/checkpoints"))
        return [Snapshot(d, self._client) for d in data]

    def rewind(self, to: str) -> Sandbox:
        """Rolls the sandbox back to a checkpoint: ``to`` is a snapshot id, or a time (RFC 3339, or
        ``"90s"``/``"5m"``/``"2h"`` ago: the newest checkpoint taken at or before it). Same id and name;
        running afterwards."""
        self._apply(self._client.request_json("POST", sandbox_path(self.id, "/rewind"), json={"to": to}))
        return self

    def delete(self) -> None:
        """Deletes the sandbox: its VM, disk and memory are freed."""
        self._client.request("DELETE", sandbox_path(self.id))
        self.state = "deleting"

    kill = delete

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            self.delete()
        except SandboxNotFoundError:
            pass


class Snapshot(SnapshotFields):
    """A durable capture of a sandbox, identified by its name (:attr:`id`)."""

    def __init__(self, data: dict[str, Any], client: Client) -> None:
        self._client = client
        self._apply(data)

    @classmethod
    def get(cls, snapshot_id: str, *, client: Client | None = None) -> Snapshot:
        """A snapshot by id (raises :class:`SnapshotNotFoundError`)."""
        client = client or get_default_client()
        return cls(client.request_json("GET", snapshot_path(snapshot_id)), client)

    @classmethod
    def list(
        cls,
        sandbox_id: str | None = None,
        metadata: Mapping[str, str] | None = None,
        *,
        client: Client | None = None,
    ) -> builtins.list[Snapshot]:
        """Snapshots, optionally only those of one source sandbox (id or name) and/or with labels."""
        client = client or get_default_client()
        params = _wire.label_params(metadata)
        if sandbox_id is not None:
            params.append(("sandbox", sandbox_id))
        return [cls(d, client) for d in client.request_json("GET", "/v1/snapshots", params=params)]

    @hybridmethod
    def delete(
        self_or_cls: Snapshot | type[Snapshot],  # noqa: N805 - hybridmethod: the class or an instance
        snapshot_id: str | None = None,
        *,
        unless_restored: bool = False,
        client: Client | None = None,
    ) -> SnapshotDeleted:
        """Deletes a snapshot: ``Snapshot.delete("id")`` or ``snap.delete()``.

        Sandboxes running from it keep its files (listed in ``files_kept_for``). Refused with
        :class:`ConflictError` while diff snapshots build on it, and with ``unless_restored=True`` while a
        sandbox rolled back to it (:meth:`Sandbox.from_snapshot`) is running or paused.
        """
        if isinstance(self_or_cls, Snapshot):
            snapshot_id = snapshot_id or self_or_cls.id
            client = client or self_or_cls._client
        if snapshot_id is None:
            raise TypeError("delete() on the class needs the snapshot's id")
        client = client or get_default_client()
        params = {"unless_restored": "true"} if unless_restored else None
        d = client.request_json("DELETE", snapshot_path(snapshot_id), params=params)
        return SnapshotDeleted(id=d["id"], files_kept_for=builtins.list(d.get("files_kept_for") or []))

    def refresh(self) -> Snapshot:
        self._apply(self._client.request_json("GET", snapshot_path(self.id)))
        return self

    def save_named(self, name: str) -> Snapshot:
        """Keeps this snapshot under ``name`` too, beyond the life of its sandbox.

        :meth:`get`, :meth:`delete`, :meth:`restore` (and the CLI and REST API) then find it by that name.
        Ids and names share one namespace: a name another snapshot has as its id or name raises
        :class:`SnapshotAlreadyExistsError`; a name this snapshot already has changes nothing.
        """
        d = self._client.request_json("POST", snapshot_path(self.id, "/names"), json={"name": name})
        self._apply(d)
        return self

    def export(self, path: str | os.PathLike[str], *, without_base: bool = False) -> int:
        """Writes this snapshot to a bundle file (streamed; compressed, checksummed) for
        :meth:`import_` on another host; returns the bundle's size in bytes.

        A diff snapshot carries its base and imports as a full one, unless ``without_base``: then the
        importing host must have the same base. The file appears only once the export is complete.
        """
        params = {"without_base": "true"} if without_base else None
        partial = os.fspath(path) + ".kiln-partial"
        written = 0
        with self._client.stream("GET", snapshot_path(self.id, "/export"), params=params) as resp:
            f = _io.offload(open, partial, "wb")
            try:
                for chunk in resp.iter_bytes(_wire.CHUNK):
                    _io.offload(f.write, chunk)
                    written += len(chunk)
            except BaseException:
                f.close()
                os.unlink(partial)
                raise
            f.close()
        os.replace(partial, path)
        return written

    @classmethod
    def import_(
        cls, path: str | os.PathLike[str], name: str | None = None, *, client: Client | None = None
    ) -> Snapshot:
        """Adds the snapshot in a bundle file (from :meth:`export`), verified whole before it appears.

        Raises :class:`SnapshotCorruptError` (the message names the byte offset) for a damaged bundle,
        :class:`SnapshotIncompatibleError` when this host cannot resume it, and
        :class:`SnapshotAlreadyExistsError` when its id (or ``name``) is taken.
        """
        client = client or get_default_client()
        params = {"name": name} if name else None
        f = _io.offload(open, path, "rb")
        try:
            size = os.fstat(f.fileno()).st_size
            d = client.request_json(
                "POST",
                "/v1/snapshots/import",
                params=params,
                content=_io.read_chunks(f),
                headers={"Content-Type": "application/octet-stream", "Content-Length": str(size)},
            )
        finally:
            f.close()
        return cls(d, client)

    def restore(
        self,
        name: str | None = None,
        memory_mib: int | None = None,
        cpus: int | None = None,
        disk_size_gib: int | None = None,
        metadata: Mapping[str, str] | None = None,
        volumes: Iterable[_wire.VolumeSpec] | None = None,
        *,
        timeout: int | None = None,
        idle_timeout: int | None = None,
        on_timeout: Literal["hibernate", "delete"] | None = None,
        auto_resume: bool | None = None,
    ) -> Sandbox:
        """A **new** sandbox that continues exactly where the snapshot was (new id, name and MAC).

        Repeatable: every call makes another copy. A memory snapshot's copy may have another ``cpus``
        (1 up to the vCPUs its machine has) and more ``memory_mib`` (up to the ``max_memory_mib`` its sandbox
        was created with), continuing the same processes; less memory, or more than that, is refused with
        :class:`ResourceOverrideRefusedError` (a :class:`ConflictError`);
        ``disk`` snapshots cold-boot, so their resources may change. To roll the *source* sandbox back
        instead, use :meth:`Sandbox.from_snapshot`.

        Snapshots do not capture volumes. Without ``volumes`` the source's volumes are remounted where they
        are free (read-only ones always, a read-write one when no other sandbox has it); ``volume_notes`` on
        the copy says what happened. Given ``volumes`` (same forms as :meth:`Sandbox.create`; ``[]`` for
        none) replace them.
        """
        body = _wire.resume_body(
            name,
            memory_mib,
            cpus,
            disk_size_gib,
            metadata,
            volumes,
            _wire.lifetime_body(timeout, idle_timeout, on_timeout, auto_resume),
        )
        d = self._client.request_json("POST", snapshot_path(self.id, "/resume"), json=body)
        return Sandbox(d, self._client)


class Volume(VolumeFields):
    """A durable ext4 disk that lives outside any sandbox, identified by its name.

    Attach it when making a sandbox (``Sandbox.create(volumes=["cache:/cache"])`` or
    ``snap.restore(volumes=...)``); its data outlives every sandbox that used it. Hibernation
    (``stop``/``start``) keeps it attached; snapshots do not hold it, and restored copies and forks get it
    back only where it is free (read-only always, read-write when no other sandbox has it).
    """

    def __init__(self, data: dict[str, Any], client: Client) -> None:
        self._client = client
        self._apply(data)

    @classmethod
    def create(
        cls,
        name: str,
        size_mib: int = 1024,
        labels: Mapping[str, str] | None = None,
        *,
        metadata: Mapping[str, str] | None = None,
        client: Client | None = None,
    ) -> Volume:
        """Makes an empty volume of ``size_mib`` MiB (sparse: it takes host disk only as it fills).

        ``labels`` (or ``metadata``, the SDK's usual name for labels) are stored with it. Raises
        :class:`VolumeAlreadyExistsError` if the name is taken.
        """
        client = client or get_default_client()
        body = _wire.volume_body(name, size_mib, {**(labels or {}), **(metadata or {})})
        return cls(client.request_json("POST", "/v1/volumes", json=body), client)

    @classmethod
    def get(cls, name: str, *, client: Client | None = None) -> Volume:
        """A volume by name (raises :class:`VolumeNotFoundError`)."""
        client = client or get_default_client()
        return cls(client.request_json("GET", volume_path(name)), client)

    @classmethod
    def list(cls, *, client: Client | None = None) -> builtins.list[Volume]:
        """Every volume."""
        client = client or get_default_client()
        return [cls(d, client) for d in client.request_json("GET", "/v1/volumes")]

    @hybridmethod
    def delete(
        self_or_cls: Volume | type[Volume],  # noqa: N805 - hybridmethod: the class or an instance
        name: str | None = None,
        *,
        client: Client | None = None,
    ) -> None:
        """Deletes a volume and its data: ``Volume.delete("name")`` or ``vol.delete()``.

        Refused with :class:`VolumeInUseError` while any sandbox (even a stopped one) has it attached.
        """
        if isinstance(self_or_cls, Volume):
            name = name or self_or_cls.name
            client = client or self_or_cls._client
        if name is None:
            raise TypeError("delete() on the class needs the volume's name")
        client = client or get_default_client()
        client.request("DELETE", volume_path(name))

    def refresh(self) -> Volume:
        """Fetches the current record (attachments, allocated bytes)."""
        self._apply(self._client.request_json("GET", volume_path(self.name)))
        return self


class Operation(OperationFields):
    """A mutating request (snapshot, stop, fork, ...) the daemon runs to its end even if its client went away.

    Every call waits for its operation already; use these to find the outcome of one whose client was
    cut off: ``Operation.list(target=sandbox.id)``, ``Operation.get(op_id)``, ``Operation.wait(op_id)``.
    """

    def __init__(self, data: dict[str, Any], client: Client) -> None:
        self._client = client
        self._apply(data)

    @classmethod
    def get(cls, operation_id: str, *, client: Client | None = None) -> Operation:
        """An operation by id (raises :class:`NotFoundError` with code ``operation_not_found``)."""
        client = client or get_default_client()
        return cls(client.request_json("GET", operation_path(operation_id)), client)

    @classmethod
    def list(
        cls, *, target: str | None = None, state: str | None = None, client: Client | None = None
    ) -> builtins.list[Operation]:
        """Recent operations, newest first, optionally on one sandbox/snapshot/volume id or in one state."""
        client = client or get_default_client()
        params = {k: v for k, v in (("target", target), ("state", state)) if v is not None}
        return [cls(d, client) for d in client.request_json("GET", "/v1/operations", params=params)]

    @classmethod
    def wait(cls, operation_id: str, timeout: float = 60, *, client: Client | None = None) -> Operation:
        """Waits until the operation finished or ``timeout`` seconds passed; returns it as it is then."""
        client = client or get_default_client()
        secs = max(0, int(timeout))
        data = client.request_json(
            "GET", operation_path(operation_id, "/wait"), params={"timeout": secs}, timeout=secs + 30
        )
        return cls(data, client)
