"""Snapshots, restore, roll back, hibernate and fork through the sync SDK."""

from __future__ import annotations

import pytest

from kiln import (
    ConflictError,
    InvalidRequestError,
    KilnError,
    Sandbox,
    SandboxNotFoundError,
    Snapshot,
    SnapshotAlreadyExistsError,
    SnapshotCorruptError,
    SnapshotNotFoundError,
)


def test_snapshot_restore_list_and_delete(sandbox: Sandbox, name: str, suite_id: str) -> None:
    sandbox.files.write("/root/marker", "at-snapshot")
    snap = sandbox.snapshot(name=name, metadata={"suite": suite_id, "kind": "marker"})
    assert (snap.id, snap.name, snap.type) == (name, name, "full")
    assert (snap.sandbox_id, snap.sandbox_name) == (sandbox.id, sandbox.name)
    assert snap.metadata == {"suite": suite_id, "kind": "marker"}
    assert snap.size_bytes > 0 and snap.memory_mib == 256 and not snap.restored
    assert snap.created_at is not None

    # The source goes on running and diverges.
    assert sandbox.refresh().state == "running"
    sandbox.files.write("/root/marker", "after-snapshot")

    got = Snapshot.get(name)
    assert got.id == name and got.size_bytes == snap.size_bytes
    assert name in [s.id for s in Snapshot.list(sandbox_id=sandbox.id)]
    assert name in [s.id for s in Snapshot.list(sandbox_id=sandbox.name)]
    assert [s.id for s in Snapshot.list(metadata={"suite": suite_id, "kind": "marker"})] == [name]
    assert Snapshot.list(metadata={"kind": "nothing"}) == []

    with pytest.raises(SnapshotAlreadyExistsError) as e:
        sandbox.snapshot(name=name)
    assert isinstance(e.value, ConflictError) and e.value.status == 409 and name in e.value.message

    # A new sandbox continues from the snapshot; the context manager deletes it.
    with snap.restore(name=f"{name}-copy", metadata={"copy": "1"}) as copy:
        assert copy.id != sandbox.id and copy.state == "running"
        assert copy.origin == f"snapshot:{name}" and copy.metadata == {"copy": "1"}
        assert copy.files.read("/root/marker") == "at-snapshot"
        assert copy.env == sandbox.env
    with pytest.raises(SandboxNotFoundError):
        Sandbox.connect(copy.id)

    # Same thing through Sandbox.create(snapshot=...).
    with Sandbox.create(snapshot=name) as again:
        assert again.run("cat /root/marker").stdout == "at-snapshot"

    # More than the source's headroom (2 x 256 MiB by default) is refused.
    with pytest.raises(ConflictError, match="512 MiB") as refused:
        snap.restore(memory_mib=1024)
    assert refused.value.code == "resource_override_refused"

    deleted = Snapshot.delete(name)
    assert deleted.id == name
    with pytest.raises(SnapshotNotFoundError) as nf:
        Snapshot.get(name)
    assert nf.value.code == "snapshot_not_found" and nf.value.status == 404
    with pytest.raises(SnapshotNotFoundError):
        snap.delete()


def test_create_snapshot_paused_then_roll_back(sandbox: Sandbox, name: str) -> None:
    base = sandbox.snapshot(name=f"{name}-base")
    try:
        with base.restore(name=name) as child:
            child.files.write("/root/state", "good")
            checkpoint = child.create_snapshot(name=f"{name}-cp", resume_source=False)
            assert child.state == "paused" and child.refresh().state == "paused"
            child.resume()
            child.run("echo broken > /root/state; rm -rf /etc/hostname")

            rolled = Sandbox.from_snapshot(checkpoint.id)
            assert (rolled.id, rolled.name) == (child.id, child.name)
            assert rolled.state == "running" and rolled.restored_from == checkpoint.id
            assert rolled.files.read("/root/state") == "good"
            assert rolled.files.exists("/etc/hostname")
            assert checkpoint.refresh().restored and checkpoint.restored_at is not None

            # Restoring again while the rolled-back sandbox runs from it is refused.
            with pytest.raises(ConflictError) as e:
                Sandbox.from_snapshot(checkpoint.id, force=True)
            assert e.value.code == "snapshot_in_use"

            # resume=False leaves the restored sandbox paused.
            child.stop()
            paused = Sandbox.from_snapshot(checkpoint.id, resume=False, force=True)
            assert paused.state == "paused"
            assert paused.resume().files.read("/root/state") == "good"
            Snapshot.delete(checkpoint.id)
    finally:
        Snapshot.delete(base.id)


def test_diff_snapshot_restores(sandbox: Sandbox, name: str) -> None:
    sandbox.files.write("/root/diff", "diff-data")
    snap = sandbox.snapshot(name=name, type="diff")
    try:
        assert snap.type == "diff" and snap.parent == "template:tiny"
        # The sandbox was created by resuming the template's snapshot, which the diff builds on.
        assert (snap.template_snapshot or "").startswith("template-")
        with snap.restore() as copy:
            assert copy.files.read("/root/diff") == "diff-data"
    finally:
        snap.delete()


def test_disk_snapshot_cold_boots_with_new_resources(sandbox: Sandbox, name: str) -> None:
    sandbox.run("echo on-disk > /root/disk-note")
    snap = sandbox.snapshot(name=name, type="disk")
    try:
        assert snap.type == "disk"
        with snap.restore(memory_mib=320, disk_size_gib=2) as cold:
            assert (cold.memory_mib, cold.disk_size_bytes) == (320, 2 << 30)
            assert cold.files.read("/root/disk-note") == "on-disk\n"
    finally:
        snap.delete()


def test_fork(sandbox: Sandbox, name: str) -> None:
    sandbox.run("echo parent > /root/forked")
    try:
        children = sandbox.fork(count=2, name=name, metadata={"forked": "yes"})
    except KilnError as e:
        if e.code == "route_not_found":
            pytest.skip("the daemon has no POST /v1/sandboxes/{id}/fork yet (route_not_found); fork() is untested")
        raise
    try:
        assert [c.name for c in children] == [f"{name}-1", f"{name}-2"]
        assert all(c.state == "running" and c.id != sandbox.id for c in children)
        assert all(c.metadata.get("forked") == "yes" for c in children)
        # Each child starts from the parent's state and then diverges on its own.
        for i, c in enumerate(children):
            assert c.files.read("/root/forked") == "parent\n"
            c.files.write("/root/forked", f"child{i}")
        assert [c.files.read("/root/forked") for c in children] == ["child0", "child1"]
        assert sandbox.files.read("/root/forked") == "parent\n"
        assert sandbox.refresh().state == "running"
    finally:
        for c in children:
            c.delete()


def test_save_named_gives_a_snapshot_a_further_name(sandbox: Sandbox, name: str) -> None:
    # Disk snapshots: no VM is resumed here, only names are looked up.
    snap = sandbox.snapshot(type="disk")
    other = sandbox.snapshot(name=f"{name}-b", type="disk")
    try:
        assert snap.save_named(name) is snap and snap.names == [name]
        assert snap.save_named(name).names == [name]  # again: nothing changes
        got = Snapshot.get(name)
        assert (got.id, got.names) == (snap.id, [name])
        assert [s.names for s in Snapshot.list() if s.id == snap.id] == [[name]]
        # Ids and names share one namespace.
        with pytest.raises(SnapshotAlreadyExistsError):
            other.save_named(name)
        with pytest.raises(SnapshotAlreadyExistsError):
            snap.save_named(other.id)
        with pytest.raises(InvalidRequestError):
            snap.save_named("Not Valid")
        # Deleting by name deletes the snapshot and its names.
        assert Snapshot.delete(name).id == snap.id
        for gone in (name, snap.id):
            with pytest.raises(SnapshotNotFoundError):
                Snapshot.get(gone)
    finally:
        for s in (snap, other):
            try:
                s.delete()
            except SnapshotNotFoundError:
                pass


def test_restore_with_more_memory_and_vcpus_within_the_headroom(daemon: object, name: str) -> None:
    # Headroom at create (a balloon holds the rest); a copy may then have up to it, and other vCPU counts.
    with Sandbox.create(template="tiny", name=name, memory_mib=256, max_memory_mib=512, cpus=1) as src:
        src.run("echo kept > /root/marker")
        snap = src.snapshot(name=f"{name}-s")
        with snap.restore(name=f"{name}-big", memory_mib=512, cpus=2) as big:
            assert (big.memory_mib, big.cpus) == (512, 2)
            assert big.run("nproc").stdout.strip() == "2"
            kib = int(big.run("awk '/^MemTotal:/ {print $2}' /proc/meminfo").stdout)
            assert kib // 1024 > 400, kib
            assert big.run("cat /root/marker").stdout.strip() == "kept"
        with pytest.raises(ConflictError, match="at most 512 MiB") as refused:
            snap.restore(memory_mib=1024)
        assert refused.value.code == "resource_override_refused"
        Snapshot.delete(snap.id)


def test_export_and_import_a_bundle(sandbox: Sandbox, name: str, tmp_path: object) -> None:
    # A disk snapshot: no VM is resumed, the bundle only travels out and back in.
    sandbox.files.write("/root/bundled", "in-the-bundle")
    snap = sandbox.snapshot(type="disk")
    path = tmp_path / "snap.kiln"  # type: ignore[operator]
    imported = None
    try:
        size = snap.export(path)
        assert size == path.stat().st_size and size > 0
        with pytest.raises(SnapshotAlreadyExistsError):
            Snapshot.import_(path)
        # Truncated: refused naming the byte where it ends, nothing added.
        cut = tmp_path / "cut.kiln"  # type: ignore[operator]
        cut.write_bytes(path.read_bytes()[: size // 2])
        with pytest.raises(SnapshotCorruptError, match=f"at byte {size // 2}"):
            Snapshot.import_(cut, name=f"{name}-cut")
        with pytest.raises(SnapshotNotFoundError):
            Snapshot.get(f"{name}-cut")
        imported = Snapshot.import_(path, name=f"{name}-moved")
        assert (imported.id, imported.type, imported.disk_size_bytes) == (
            f"{name}-moved",
            "disk",
            snap.disk_size_bytes,
        )
    finally:
        for s in (imported, snap):
            if s is not None:
                s.delete()
