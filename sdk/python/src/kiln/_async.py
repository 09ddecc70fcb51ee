"""The asyncio SDK: :class:`AsyncSandbox`, :class:`AsyncSnapshot` and :class:`AsyncVolume`, twins of the sync
classes."""

from __future__ import annotations

import asyncio
import builtins
import inspect
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any, BinaryIO, Literal, overload

from . import _wire
from ._client import Client, get_default_client, operation_path, sandbox_path, snapshot_path, volume_path
from ._hybrid import hybridmethod
from ._procs import AsyncProcesses
from .errors import ConflictError, GuestPathNotFoundError, SandboxNotFoundError
from .models import (
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

__all__ = ["AsyncSandbox", "AsyncSnapshot", "AsyncVolume", "AsyncOperation", "AsyncCommands", "AsyncFiles"]

AsyncOutputCallback = Callable[[str], "Awaitable[object] | object"]


class AsyncCommands:
    """Runs processes in a sandbox (``sandbox.commands``); see :class:`kiln.Commands`."""

    def __init__(self, sandbox: AsyncSandbox) -> None:
        self._sb = sandbox

    async def run(
        self,
        cmd: str | Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        timeout: float | None = None,
        stdin: str | bytes | None = None,
        on_stdout: AsyncOutputCallback | None = None,
        on_stderr: AsyncOutputCallback | None = None,
        user: str | int | None = None,
    ) -> ExecResult:
        """Runs a command and waits for it; callbacks may be plain functions or coroutines.
        See :meth:`kiln.Commands.run`."""
        stream = on_stdout is not None or on_stderr is not None
        body = _wire.exec_body(cmd, env=env, cwd=cwd, timeout=timeout, stdin=stdin, stream=stream)
        if user is not None:
            body["user"] = str(user)
        path = sandbox_path(self._sb.id, "/exec")
        http_timeout = _wire.exec_http_timeout(timeout)
        client = self._sb._client
        if not stream:
            return ExecResult.from_json(await client.arequest_json("POST", path, json=body, timeout=http_timeout))
        decoder = _wire.ExecStream()
        callbacks = {"stdout": on_stdout, "stderr": on_stderr}
        async with client.astream("POST", path, json=body, timeout=http_timeout) as resp:
            async for event in client.aiter_ndjson(resp):
                chunk = decoder.feed(event)
                if chunk is not None and (cb := callbacks[chunk[0]]) is not None:
                    ret = cb(chunk[1])
                    if inspect.isawaitable(ret):
                        await ret
        return decoder.finish()


class AsyncFiles:
    """Reads and writes files in a sandbox (``sandbox.files``); see :class:`kiln.Files`."""

    def __init__(self, sandbox: AsyncSandbox) -> None:
        self._sb = sandbox

    def _path(self, suffix: str = "") -> str:
        return sandbox_path(self._sb.id, "/files" + suffix)

    async def write(self, path: str, data: str | bytes, mode: int | str | None = None) -> WriteResult:
        content = data.encode("utf-8") if isinstance(data, str) else data
        return await self._put(path, content, mode, len(content))

    async def _put(self, path: str, content: Any, mode: int | str | None, length: int) -> WriteResult:
        d = await self._sb._client.arequest_json(
            "PUT",
            self._path(),
            params=_wire.file_params(path, mode=_wire.mode_param(mode)),
            content=content,
            headers={"Content-Type": "application/octet-stream", "Content-Length": str(length)},
        )
        return WriteResult(path=d["path"], bytes=int(d["bytes"]))

    async def read_bytes(self, path: str) -> bytes:
        resp = await self._sb._client.arequest("GET", self._path(), params=_wire.file_params(path))
        return resp.content

    async def read(self, path: str, encoding: str = "utf-8") -> str:
        return (await self.read_bytes(path)).decode(encoding)

    async def list(self, path: str) -> builtins.list[DirEntry]:
        items = await self._sb._client.arequest_json("GET", self._path("/list"), params=_wire.file_params(path))
        return [DirEntry.from_listing(path, d) for d in items]

    async def stat(self, path: str) -> FileStat:
        return FileStat.from_json(
            await self._sb._client.arequest_json("GET", self._path("/stat"), params=_wire.file_params(path))
        )

    async def exists(self, path: str) -> bool:
        try:
            await self.stat(path)
        except GuestPathNotFoundError:
            return False
        return True

    async def mkdir(self, path: str) -> None:
        await self._sb._client.arequest("POST", self._path("/mkdir"), json={"path": path})

    async def remove(self, path: str, recursive: bool = False) -> None:
        params = _wire.file_params(path, recursive="true" if recursive else None)
        await self._sb._client.arequest("DELETE", self._path(), params=params)

    async def upload(
        self, local_path: str | os.PathLike[str], remote_path: str, mode: int | str | None = None
    ) -> WriteResult:
        """Copies a local file into the guest, streaming it (disk reads happen off the event loop)."""
        f = await asyncio.to_thread(open, local_path, "rb")
        try:
            size = os.fstat(f.fileno()).st_size
            return await self._put(remote_path, _aread_chunks(f), mode, size)
        finally:
            f.close()

    async def download(self, remote_path: str, local_path: str | os.PathLike[str]) -> int:
        client = self._sb._client
        written = 0
        async with client.astream("GET", self._path(), params=_wire.file_params(remote_path)) as resp:
            f = await asyncio.to_thread(open, local_path, "wb")
            try:
                async for chunk in resp.aiter_bytes(_wire.CHUNK):
                    await asyncio.to_thread(f.write, chunk)
                    written += len(chunk)
            finally:
                f.close()
        return written


async def _aread_chunks(f: BinaryIO) -> AsyncIterator[bytes]:
    while chunk := await asyncio.to_thread(f.read, _wire.CHUNK):
        yield chunk


class AsyncSandbox(SandboxFields):
    """The asyncio twin of :class:`kiln.Sandbox`::

    async with await AsyncSandbox.create() as sb:
        print((await sb.run("uname -a")).stdout)
    """

    commands: AsyncCommands
    files: AsyncFiles
    processes: AsyncProcesses

    def __init__(self, data: dict[str, Any], client: Client) -> None:
        self._client = client
        self.commands = AsyncCommands(self)
        self.files = AsyncFiles(self)
        self.processes = AsyncProcesses(self)
        self._apply(data)

    @classmethod
    async def create(
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
        max_memory_mib: int | None = None,
        client: Client | None = None,
    ) -> AsyncSandbox:
        """See :meth:`kiln.Sandbox.create`."""
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
            max_memory_mib=max_memory_mib,
        )
        client = client or get_default_client()
        return cls(await client.arequest_json("POST", "/v1/sandboxes", json=body), client)

    @classmethod
    async def connect(cls, sandbox_id: str, *, client: Client | None = None) -> AsyncSandbox:
        """See :meth:`kiln.Sandbox.connect` (wakes a paused or hibernated sandbox)."""
        client = client or get_default_client()
        sb = cls(await client.arequest_json("GET", sandbox_path(sandbox_id)), client)
        return await sb._wake()

    async def _wake(self) -> AsyncSandbox:
        for _ in range(3):
            action = _wire.WAKE_ACTIONS.get(self.state)
            if action is None:
                return self
            try:
                return await self._lifecycle(action)
            except ConflictError:
                await self.refresh()
        return self

    @classmethod
    async def list(
        cls, metadata: Mapping[str, str] | None = None, *, client: Client | None = None
    ) -> builtins.list[AsyncSandbox]:
        client = client or get_default_client()
        items = await client.arequest_json("GET", "/v1/sandboxes", params=_wire.label_params(metadata))
        return [cls(d, client) for d in items]

    @classmethod
    async def from_snapshot(
        cls, snapshot_id: str, resume: bool = True, force: bool = False, *, client: Client | None = None
    ) -> AsyncSandbox:
        """See :meth:`kiln.Sandbox.from_snapshot`."""
        client = client or get_default_client()
        body = {"resume": resume, "force": force}
        return cls(await client.arequest_json("POST", snapshot_path(snapshot_id, "/restore"), json=body), client)

    async def refresh(self) -> AsyncSandbox:
        self._apply(await self._client.arequest_json("GET", sandbox_path(self.id)))
        return self

    async def run(
        self,
        cmd: str | Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        timeout: float | None = None,
        stdin: str | bytes | None = None,
        on_stdout: AsyncOutputCallback | None = None,
        on_stderr: AsyncOutputCallback | None = None,
        user: str | int | None = None,
    ) -> ExecResult:
        """Shortcut for :meth:`AsyncCommands.run`."""
        return await self.commands.run(
            cmd, env=env, cwd=cwd, timeout=timeout, stdin=stdin, on_stdout=on_stdout, on_stderr=on_stderr, user=user
        )

    async def logs(self) -> str:
        return (await self._client.arequest("GET", sandbox_path(self.id, "/logs"))).text

    async def snapshot(
        self,
        name: str | None = None,
        type: Literal["full", "diff", "disk"] = "full",
        resume_source: bool = True,
        metadata: Mapping[str, str] | None = None,
    ) -> AsyncSnapshot:
        """See :meth:`kiln.Sandbox.snapshot`."""
        body = _wire.snapshot_body(name, type, resume_source, metadata)
        d = await self._client.arequest_json("POST", sandbox_path(self.id, "/snapshots"), json=body)
        if not resume_source:
            self.state = "paused"
        return AsyncSnapshot(d, self._client)

    create_snapshot = snapshot

    @overload
    async def fork(
        self, count: None = None, name: str | None = None, metadata: Mapping[str, str] | None = None
    ) -> AsyncSandbox: ...

    @overload
    async def fork(
        self, count: int, name: str | None = None, metadata: Mapping[str, str] | None = None
    ) -> builtins.list[AsyncSandbox]: ...

    async def fork(
        self, count: int | None = None, name: str | None = None, metadata: Mapping[str, str] | None = None
    ) -> AsyncSandbox | builtins.list[AsyncSandbox]:
        """See :meth:`kiln.Sandbox.fork` (no ``count``: the one child; a ``count``: a list)."""
        d = await self._client.arequest_json(
            "POST", sandbox_path(self.id, "/fork"), json=_wire.fork_body(count or 1, name, metadata)
        )
        children = [AsyncSandbox(s, self._client) for s in d["sandboxes"]]
        return children[0] if count is None else children

    async def publish_port(self, guest: int, host: int | None = None) -> PortMapping:
        """Publishes a guest TCP port on ``127.0.0.1``: on ``host``, or on a free port the daemon picks."""
        d = await self._client.arequest_json(
            "POST", sandbox_path(self.id, "/ports"), json=_wire.publish_body(guest, host)
        )
        await self.refresh()
        return PortMapping(host=d["host"], guest=d["guest"], auto=bool(d.get("auto", False)))

    async def unpublish_port(self, guest: int) -> None:
        """Stops forwarding a guest port (``port_not_found`` if it is not published)."""
        self._apply(await self._client.arequest_json("DELETE", sandbox_path(self.id, f"/ports/{int(guest)}")))

    async def get_host(self, port: int) -> str:
        """``127.0.0.1:HOST`` where the guest's TCP ``port`` is reachable; publishes it first if needed."""
        p = _wire.find_port(self.ports, port) or await self.publish_port(port)
        return p.address

    async def _lifecycle(self, action: str) -> AsyncSandbox:
        self._apply(await self._client.arequest_json("POST", sandbox_path(self.id, f"/{action}")))
        return self

    async def pause(self) -> AsyncSandbox:
        return await self._lifecycle("pause")

    @hybridmethod
    async def resume(
        self_or_cls: AsyncSandbox | type[AsyncSandbox],  # noqa: N805 - hybridmethod: the class or an instance
        sandbox_id: str | None = None,
        *,
        client: Client | None = None,
    ) -> AsyncSandbox:
        """See :meth:`kiln.Sandbox.resume`: ``sb.resume()`` continues, ``AsyncSandbox.resume("id")`` wakes."""
        if isinstance(self_or_cls, AsyncSandbox):
            return await self_or_cls._lifecycle("resume")
        if sandbox_id is None:
            raise TypeError("AsyncSandbox.resume() needs the sandbox's id")
        return await self_or_cls.connect(sandbox_id, client=client)

    async def stop(self) -> AsyncSandbox:
        return await self._lifecycle("stop")

    async def start(self) -> AsyncSandbox:
        return await self._lifecycle("start")

    async def delete(self) -> None:
        await self._client.arequest("DELETE", sandbox_path(self.id))
        self.state = "deleting"

    kill = delete

    async def __aenter__(self) -> AsyncSandbox:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            await self.delete()
        except SandboxNotFoundError:
            pass


class AsyncSnapshot(SnapshotFields):
    """The asyncio twin of :class:`kiln.Snapshot`."""

    def __init__(self, data: dict[str, Any], client: Client) -> None:
        self._client = client
        self._apply(data)

    @classmethod
    async def get(cls, snapshot_id: str, *, client: Client | None = None) -> AsyncSnapshot:
        client = client or get_default_client()
        return cls(await client.arequest_json("GET", snapshot_path(snapshot_id)), client)

    @classmethod
    async def list(
        cls,
        sandbox_id: str | None = None,
        metadata: Mapping[str, str] | None = None,
        *,
        client: Client | None = None,
    ) -> builtins.list[AsyncSnapshot]:
        client = client or get_default_client()
        params = _wire.label_params(metadata)
        if sandbox_id is not None:
            params.append(("sandbox", sandbox_id))
        return [cls(d, client) for d in await client.arequest_json("GET", "/v1/snapshots", params=params)]

    @hybridmethod
    async def delete(
        self_or_cls: AsyncSnapshot | type[AsyncSnapshot],  # noqa: N805 - hybridmethod: the class or an instance
        snapshot_id: str | None = None,
        *,
        unless_restored: bool = False,
        client: Client | None = None,
    ) -> SnapshotDeleted:
        """``await AsyncSnapshot.delete("id")`` or ``await snap.delete()``; see :meth:`kiln.Snapshot.delete`."""
        if isinstance(self_or_cls, AsyncSnapshot):
            snapshot_id = snapshot_id or self_or_cls.id
            client = client or self_or_cls._client
        if snapshot_id is None:
            raise TypeError("AsyncSnapshot.delete() needs the snapshot's id")
        client = client or get_default_client()
        params = {"unless_restored": "true"} if unless_restored else None
        d = await client.arequest_json("DELETE", snapshot_path(snapshot_id), params=params)
        return SnapshotDeleted(id=d["id"], files_kept_for=builtins.list(d.get("files_kept_for") or []))

    async def refresh(self) -> AsyncSnapshot:
        self._apply(await self._client.arequest_json("GET", snapshot_path(self.id)))
        return self

    async def save_named(self, name: str) -> AsyncSnapshot:
        """See :meth:`kiln.Snapshot.save_named`."""
        d = await self._client.arequest_json("POST", snapshot_path(self.id, "/names"), json={"name": name})
        self._apply(d)
        return self

    async def restore(
        self,
        name: str | None = None,
        memory_mib: int | None = None,
        cpus: int | None = None,
        disk_size_gib: int | None = None,
        metadata: Mapping[str, str] | None = None,
        volumes: Iterable[_wire.VolumeSpec] | None = None,
    ) -> AsyncSandbox:
        """A **new** sandbox from this snapshot; see :meth:`kiln.Snapshot.restore`."""
        body = _wire.resume_body(name, memory_mib, cpus, disk_size_gib, metadata, volumes)
        d = await self._client.arequest_json("POST", snapshot_path(self.id, "/resume"), json=body)
        return AsyncSandbox(d, self._client)


class AsyncVolume(VolumeFields):
    """The asyncio twin of :class:`kiln.Volume`."""

    def __init__(self, data: dict[str, Any], client: Client) -> None:
        self._client = client
        self._apply(data)

    @classmethod
    async def create(
        cls,
        name: str,
        size_mib: int = 1024,
        labels: Mapping[str, str] | None = None,
        *,
        metadata: Mapping[str, str] | None = None,
        client: Client | None = None,
    ) -> AsyncVolume:
        """See :meth:`kiln.Volume.create`."""
        client = client or get_default_client()
        body = _wire.volume_body(name, size_mib, {**(labels or {}), **(metadata or {})})
        return cls(await client.arequest_json("POST", "/v1/volumes", json=body), client)

    @classmethod
    async def get(cls, name: str, *, client: Client | None = None) -> AsyncVolume:
        client = client or get_default_client()
        return cls(await client.arequest_json("GET", volume_path(name)), client)

    @classmethod
    async def list(cls, *, client: Client | None = None) -> builtins.list[AsyncVolume]:
        client = client or get_default_client()
        return [cls(d, client) for d in await client.arequest_json("GET", "/v1/volumes")]

    @hybridmethod
    async def delete(
        self_or_cls: AsyncVolume | type[AsyncVolume],  # noqa: N805 - hybridmethod: the class or an instance
        name: str | None = None,
        *,
        client: Client | None = None,
    ) -> None:
        """``await AsyncVolume.delete("name")`` or ``await vol.delete()``; see :meth:`kiln.Volume.delete`."""
        if isinstance(self_or_cls, AsyncVolume):
            name = name or self_or_cls.name
            client = client or self_or_cls._client
        if name is None:
            raise TypeError("AsyncVolume.delete() needs the volume's name")
        client = client or get_default_client()
        await client.arequest("DELETE", volume_path(name))

    async def refresh(self) -> AsyncVolume:
        self._apply(await self._client.arequest_json("GET", volume_path(self.name)))
        return self


class AsyncOperation(OperationFields):
    """The asyncio twin of :class:`kiln.Operation`."""

    def __init__(self, data: dict[str, Any], client: Client) -> None:
        self._client = client
        self._apply(data)

    @classmethod
    async def get(cls, operation_id: str, *, client: Client | None = None) -> AsyncOperation:
        """An operation by id (raises :class:`NotFoundError` with code ``operation_not_found``)."""
        client = client or get_default_client()
        return cls(await client.arequest_json("GET", operation_path(operation_id)), client)

    @classmethod
    async def list(
        cls, *, target: str | None = None, state: str | None = None, client: Client | None = None
    ) -> builtins.list[AsyncOperation]:
        """Recent operations, newest first, optionally on one sandbox/snapshot/volume id or in one state."""
        client = client or get_default_client()
        params = {k: v for k, v in (("target", target), ("state", state)) if v is not None}
        return [cls(d, client) for d in await client.arequest_json("GET", "/v1/operations", params=params)]

    @classmethod
    async def wait(cls, operation_id: str, timeout: float = 60, *, client: Client | None = None) -> AsyncOperation:
        """Waits until the operation finished or ``timeout`` seconds passed; returns it as it is then."""
        client = client or get_default_client()
        secs = max(0, int(timeout))
        data = await client.arequest_json(
            "GET", operation_path(operation_id, "/wait"), params={"timeout": secs}, timeout=secs + 30
        )
        return cls(data, client)
