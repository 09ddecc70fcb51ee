"""Volumes through the sync and async SDKs: durable data across sandboxes, snapshots without them, errors."""

from __future__ import annotations

import pytest

import kiln
from kiln import (
    AsyncSandbox,
    AsyncVolume,
    ConflictError,
    InvalidRequestError,
    NotFoundError,
    Sandbox,
    Snapshot,
    Volume,
    VolumeAlreadyExistsError,
    VolumeAttachment,
    VolumeInUseError,
    VolumeMount,
    VolumeNotFoundError,
)
from kiln._wire import volumes_json


def test_volume_specs_in_every_form() -> None:
    vol = Volume({"name": "v", "size_bytes": 1 << 20, "labels": {}, "created_at": None}, kiln.Client(socket="/x"))
    assert volumes_json(
        [
            "a:/data",
            "b:/mnt/b:ro",
            "c:/c:rw",
            ("d", "/d"),
            ("e", "/e", True),
            (vol, "/v"),
            {"volume": "f", "path": "/f", "read_only": True},
            {"volume": vol, "path": "/w"},
            VolumeMount("g", "/g"),
        ]
    ) == [
        {"volume": "a", "path": "/data", "read_only": False},
        {"volume": "b", "path": "/mnt/b", "read_only": True},
        {"volume": "c", "path": "/c", "read_only": False},
        {"volume": "d", "path": "/d", "read_only": False},
        {"volume": "e", "path": "/e", "read_only": True},
        {"volume": "v", "path": "/v", "read_only": False},
        {"volume": "f", "path": "/f", "read_only": True},
        {"volume": "v", "path": "/w", "read_only": False},
        {"volume": "g", "path": "/g", "read_only": False},
    ]
    assert volumes_json("a:/data") == [{"volume": "a", "path": "/data", "read_only": False}]
    assert volumes_json([]) == [] and volumes_json(None) is None
    assert str(VolumeMount("a", "/d", read_only=True)) == "a:/d:ro"
    # Malformed specs are refused before anything is sent.
    nowhere = kiln.Client(socket="/nonexistent/kiln.sock")
    for bad in ["data", "data:/d:rx", ("data",), {"name": "data", "path": "/d"}, 42]:
        with pytest.raises(InvalidRequestError, match="invalid volume"):
            Sandbox.create(volumes=[bad], client=nowhere)  # type: ignore[list-item]


def test_volume_crud_and_errors(daemon: object, name: str, suite_id: str) -> None:
    vol = Volume.create(name, size_mib=64, labels={"suite": suite_id})
    assert (vol.name, vol.id, vol.size_bytes, vol.size_mib) == (name, name, 64 << 20, 64)
    assert vol.metadata == {"suite": suite_id} and vol.attachments == [] and not vol.in_use
    assert vol.created_at is not None and vol.allocated_bytes >= 0

    assert Volume.get(name).size_bytes == 64 << 20
    assert name in [v.name for v in Volume.list()]

    with pytest.raises(VolumeAlreadyExistsError) as dup:
        Volume.create(name)
    assert isinstance(dup.value, ConflictError)
    assert (dup.value.code, dup.value.status) == ("volume_already_exists", 409) and name in dup.value.message

    with pytest.raises(InvalidRequestError):
        Volume.create(f"{name}-x", size_mib=1)  # below the minimum size

    # Attaching a volume that does not exist is refused before anything boots.
    with pytest.raises(VolumeNotFoundError) as missing:
        Sandbox.create(volumes=[f"{name}-missing:/data"])
    assert isinstance(missing.value, NotFoundError)
    assert (missing.value.code, missing.value.status) == ("volume_not_found", 404)

    vol.delete()
    with pytest.raises(VolumeNotFoundError):
        Volume.get(name)
    with pytest.raises(VolumeNotFoundError):
        Volume.delete(name)


def test_volume_outlives_its_sandbox_and_is_not_in_snapshots(daemon: object, name: str) -> None:
    vol = Volume.create(name, size_mib=64)
    made: list[Sandbox] = []
    snap: Snapshot | None = None
    try:
        first = Sandbox.create(name=f"{name}-1", memory_mib=256, volumes=[f"{name}:/data"])
        made.append(first)
        assert first.volumes == [VolumeMount(volume=name, path="/data", read_only=False)]
        first.files.write("/data/cache/result.txt", "computed once")
        # Deleting a sandbox stops its VM at once: flush the guest's page cache to the volume first.
        assert first.run("sync").ok
        assert vol.refresh().attachments == [
            VolumeAttachment(sandbox_id=first.id, sandbox_name=first.name, path="/data", read_only=False)
        ]

        # Attached read-write: neither deletable nor attachable elsewhere (checked before booting).
        with pytest.raises(VolumeInUseError) as in_use:
            vol.delete()
        assert isinstance(in_use.value, ConflictError) and in_use.value.code == "volume_in_use"
        assert first.name in in_use.value.message
        with pytest.raises(VolumeInUseError):
            Sandbox.create(volumes=[(vol, "/data", True)])

        # A snapshot does not hold the volume: a copy resumed from it has no /data.
        snap = first.snapshot(name=f"{name}-snap")
        with snap.restore(name=f"{name}-plain") as plain:
            assert plain.volumes == []
            assert not plain.files.exists("/data/cache/result.txt")
            assert " /data " not in plain.run("cat /proc/mounts").stdout

        first.delete()
        assert Volume.get(name).attachments == []

        # The data outlives its sandbox: a fresh sandbox mounts it read-only elsewhere ...
        second = Sandbox.create(
            name=f"{name}-2", memory_mib=256, volumes=[{"volume": name, "path": "/mnt/cache", "read_only": True}]
        )
        made.append(second)
        assert second.volumes == [VolumeMount(name, "/mnt/cache", read_only=True)]
        assert second.files.read("/mnt/cache/cache/result.txt") == "computed once"
        assert not second.run("echo x > /mnt/cache/x").ok

        # ... and a copy from the snapshot gets it back when asked, shared read-only with the other.
        copy = Sandbox.create(snapshot=snap.id, name=f"{name}-copy", volumes=[(name, "/data", True)])
        made.append(copy)
        assert copy.volumes == [VolumeMount(name, "/data", read_only=True)]
        assert copy.files.read("/data/cache/result.txt") == "computed once"
        assert {a.sandbox_name for a in vol.refresh().attachments} == {second.name, copy.name}
    finally:
        for sb in made:
            try:
                sb.delete()
            except kiln.SandboxNotFoundError:
                pass
        if snap is not None:
            snap.delete()
        Volume.delete(name)


@pytest.mark.asyncio
async def test_async_volume(daemon: object, name: str) -> None:
    vol = await AsyncVolume.create(name, size_mib=32, metadata={"flavour": "async"})
    assert vol.metadata == {"flavour": "async"}
    assert (await AsyncVolume.get(name)).size_mib == 32
    assert name in [v.name for v in await AsyncVolume.list()]
    with pytest.raises(VolumeAlreadyExistsError):
        await AsyncVolume.create(name, size_mib=32)
    try:
        async with await AsyncSandbox.create(memory_mib=256, volumes=[f"{name}:/work"]) as sb:
            assert sb.volumes == [VolumeMount(name, "/work")]
            await sb.files.write("/work/note", "async")
            assert await sb.files.read("/work/note") == "async"
            with pytest.raises(VolumeInUseError):
                await vol.delete()
            assert [a.sandbox_id for a in (await vol.refresh()).attachments] == [sb.id]
    finally:
        await AsyncVolume.delete(name)
    with pytest.raises(VolumeNotFoundError):
        await vol.refresh()
