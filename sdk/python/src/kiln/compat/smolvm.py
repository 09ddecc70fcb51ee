"""smolvm's Python snapshot API on kiln: ``from kiln.compat.smolvm import SmolVM`` in place of
``from smolvm import SmolVM``.

A ``SmolVM`` is a kiln sandbox named by its ``vm_id``. Its snapshots are kiln snapshots with smolvm's
defaults: ``vm.snapshot()`` leaves the VM paused unless ``resume_source=True``; ``SmolVM.from_snapshot``
rolls the snapshot's source VM back to it (recreating it if it was deleted), paused unless ``resume_vm=True``,
once per snapshot unless ``force=True``. VMs boot kiln's ``base`` image (Debian with python3) unless
``template=`` says otherwise; there is no ``apk``. ``close()`` deletes a VM this object started or restored.
"""

from __future__ import annotations

import builtins
import contextlib
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from enum import Enum
from types import TracebackType
from typing import Any

from .._client import Client, get_default_client
from .._sync import Sandbox, Snapshot
from ..errors import KilnError, SandboxNotFoundError
from ..errors import SnapshotAlreadyExistsError as _KilnSnapshotExists
from ..errors import SnapshotNotFoundError as _KilnSnapshotNotFound
from ..models import ExecResult

__all__ = [
    "SmolVM",
    "SmolVMManager",
    "SnapshotInfo",
    "SnapshotType",
    "VMState",
    "CommandResult",
    "SmolVMError",
    "SnapshotAlreadyExistsError",
    "SnapshotNotFoundError",
]

DEFAULT_TEMPLATE = "base"

CommandResult = ExecResult
"""``run``'s result: ``ok``, ``output`` (stdout, stripped), ``exit_code``, ``stdout``, ``stderr``."""


class SnapshotType(str, Enum):
    FULL = "full"
    DIFF = "diff"
    DISK = "disk"

    def __str__(self) -> str:
        return f"SnapshotType.{self.name}"


class VMState(str, Enum):
    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"
    ERROR = "error"

    def __str__(self) -> str:
        return f"VMState.{self.name}"


_STATES = {
    "creating": VMState.CREATED,
    "running": VMState.RUNNING,
    "paused": VMState.PAUSED,
    "stopped": VMState.STOPPED,
    "deleting": VMState.STOPPED,
    "failed": VMState.ERROR,
}


class SmolVMError(Exception):
    """Base of this module's errors; ``message`` says what went wrong and what to do (``code``: kiln's code)."""

    def __init__(self, message: str, code: str = "internal") -> None:
        super().__init__(message)
        self.message = message
        self.code = code


class SnapshotAlreadyExistsError(SmolVMError):
    """A snapshot with this ID already exists."""


class SnapshotNotFoundError(SmolVMError):
    """No snapshot has this ID."""


@contextlib.contextmanager
def _translated() -> Iterator[None]:
    """kiln's errors as this module's."""
    try:
        yield
    except _KilnSnapshotExists as e:
        raise SnapshotAlreadyExistsError(e.message, e.code) from e
    except _KilnSnapshotNotFound as e:
        raise SnapshotNotFoundError(e.message, e.code) from e
    except KilnError as e:
        raise SmolVMError(e.message, e.code) from e


@dataclass
class SnapshotInfo:
    snapshot_id: str
    vm_id: str
    """Name of the VM (kiln sandbox) it was taken from."""
    snapshot_type: SnapshotType
    restored: bool
    created_at: datetime | None
    size_bytes: int

    @classmethod
    def _of(cls, s: Snapshot) -> SnapshotInfo:
        return cls(
            snapshot_id=s.id,
            vm_id=s.sandbox_name or s.sandbox_id,
            snapshot_type=SnapshotType(s.type),
            restored=s.restored,
            created_at=s.created_at,
            size_bytes=s.size_bytes,
        )


class SmolVM:
    """One VM. ``SmolVM()`` names it (``vm_id``) and ``start()`` boots it; ``SmolVM(vm_id=...)`` attaches
    to an existing one. As a context manager it starts on entry and is closed (deleted) on exit."""

    def __init__(
        self,
        config: Any = None,
        *,
        vm_id: str | None = None,
        backend: str | None = None,
        mem_size_mib: int | None = None,
        disk_size_mib: int | None = None,
        template: str = DEFAULT_TEMPLATE,
        client: Client | None = None,
        **_ignored: Any,
    ) -> None:
        # config, backend and the SSH/socket options have no meaning here (kiln runs QEMU and talks to its
        # own guest agent); they are accepted so that programs run unchanged.
        self._client = client or get_default_client()
        self._template = template
        self._memory = mem_size_mib
        self._disk_gib = -(-disk_size_mib // 1024) if disk_size_mib else None
        self._sb: Sandbox | None = None
        self._owned = False
        if vm_id is not None:
            with _translated():
                self._sb = Sandbox.connect(vm_id, client=self._client)
        self._vm_id = vm_id or f"vm-{secrets.token_hex(4)}"

    @property
    def vm_id(self) -> str:
        return self._vm_id

    @property
    def status(self) -> VMState:
        if self._sb is None:
            return VMState.CREATED
        try:
            self._sb.refresh()
        except SandboxNotFoundError:
            return VMState.STOPPED
        return _STATES.get(self._sb.state, VMState.ERROR)

    @property
    def sandbox(self) -> Sandbox:
        """The kiln sandbox behind this VM (for everything kiln offers beyond smolvm's API)."""
        if self._sb is None:
            raise SmolVMError(f"VM {self._vm_id} is not started; call start() first", "sandbox_not_running")
        return self._sb

    def start(self, boot_timeout: float = 30.0) -> SmolVM:
        """Boots the VM, or wakes it if it is paused or stopped; a running VM is left as it is."""
        with _translated():
            if self._sb is None:
                self._sb = Sandbox.create(
                    template=self._template,
                    name=self._vm_id,
                    memory_mib=self._memory,
                    disk_size_gib=self._disk_gib,
                    client=self._client,
                )
                self._owned = True
            else:
                self._sb = Sandbox.connect(self._sb.id, client=self._client)
        return self

    def run(self, command: str, timeout: float | None = None) -> CommandResult:
        """Runs a shell command; a failing command is a result with ``ok`` false, not an exception."""
        with _translated():
            return self.sandbox.run(command, timeout=timeout)

    def snapshot(
        self,
        snapshot_id: str | None = None,
        snapshot_type: SnapshotType | str = SnapshotType.FULL,
        resume_source: bool = False,
    ) -> SnapshotInfo:
        """Saves the VM (running or paused); it is paused afterwards unless ``resume_source=True``."""
        kind = SnapshotType(snapshot_type).value
        with _translated():
            sb = self.sandbox
            if sb.refresh().state == "paused":
                # QEMU cannot save a VM still paused by an earlier save: it continues for the capture
                # (and is paused again after it unless resume_source).
                sb.resume()
            snap = sb.snapshot(name=snapshot_id, type=kind, resume_source=resume_source)  # type: ignore[arg-type]
        return SnapshotInfo._of(snap)

    @classmethod
    def from_snapshot(
        cls, snapshot_id: str, resume_vm: bool = False, force: bool = False, *, client: Client | None = None
    ) -> SmolVM:
        """The snapshot's VM, rolled back to it (recreated if it was deleted); paused unless ``resume_vm``.
        A snapshot is restored once; again only with ``force=True``."""
        client = client or get_default_client()
        with _translated():
            sb = Sandbox.from_snapshot(snapshot_id, resume=resume_vm, force=force, client=client)
        vm = cls(client=client)
        vm._sb, vm._vm_id, vm._owned = sb, sb.name, True
        return vm

    def resume(self) -> SmolVM:
        """Continues a paused (or stopped) VM."""
        return self.start()

    def stop(self, timeout: float = 3.0) -> SmolVM:
        """Stops the VM (kiln hibernates it: ``start()`` brings it back where it was)."""
        with _translated():
            sb = self.sandbox
            if sb.state == "paused":
                sb.resume()
            sb.stop()
        return self

    def delete(self) -> None:
        """Deletes the VM and its disk."""
        if self._sb is None:
            return
        with _translated():
            try:
                self._sb.delete()
            except SandboxNotFoundError:
                pass
        self._owned = False

    def close(self) -> None:
        """Releases the VM: deletes it if this object started or restored it (its snapshots stay)."""
        if self._owned:
            self.delete()

    def __enter__(self) -> SmolVM:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class SmolVMManager:
    """Snapshot administration (``with SmolVMManager() as sdk: sdk.list_snapshots()``)."""

    def __init__(self, *, client: Client | None = None, **_ignored: Any) -> None:
        self._client = client or get_default_client()

    def list_snapshots(self, vm_id: str | None = None) -> builtins.list[SnapshotInfo]:
        """Every snapshot, or those taken from the VM ``vm_id``."""
        with _translated():
            return [SnapshotInfo._of(s) for s in Snapshot.list(sandbox_id=vm_id, client=self._client)]

    def get_snapshot(self, snapshot_id: str) -> SnapshotInfo:
        with _translated():
            return SnapshotInfo._of(Snapshot.get(snapshot_id, client=self._client))

    def delete_snapshot(self, snapshot_id: str) -> None:
        """Deletes a snapshot and its files; refused while a VM restored from it is running or paused."""
        with _translated():
            Snapshot.delete(snapshot_id, unless_restored=True, client=self._client)

    def close(self) -> None:
        pass

    def __enter__(self) -> SmolVMManager:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
