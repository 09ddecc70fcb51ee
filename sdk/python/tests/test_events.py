"""``client.events()``: the daemon's event stream as a sync and an async iterator, with filters and
replay (``since``), against a real daemon. Volumes make the changes: no VM needed."""

from __future__ import annotations

import threading
import time

import pytest

import kiln
from kiln import AsyncVolume, Volume


def test_events_sync_iterator_replay_filter_and_live(daemon: object, name: str) -> None:
    client = kiln.get_default_client()
    Volume.create(name, size_mib=16)
    # Replay from the start, only volume creations.
    stream = client.events(kinds=["volume.created"], since=0)
    it = iter(stream)
    created = next(e for e in it if e.id == name)
    assert created.kind == "volume.created" and created.sandbox is None
    assert created.object is not None and created.object["name"] == name and created.seq >= 1
    assert stream.last_seq == created.seq
    it.close()  # type: ignore[attr-defined]
    # Live: the deletion arrives while the loop waits (since= makes it certain even if it came first).
    seen: list[kiln.Event] = []

    def watch() -> None:
        for e in client.events(kinds="volume.", since=created.seq):
            seen.append(e)
            if e.kind == "volume.deleted" and e.id == name:
                return

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    time.sleep(0.5)
    Volume.delete(name)
    t.join(timeout=30)
    assert not t.is_alive(), f"no volume.deleted event; saw {seen}"
    assert [e.kind for e in seen if e.id == name] == ["volume.deleted"]
    assert seen[-1].object is None and seen[-1].seq > created.seq


@pytest.mark.asyncio
async def test_events_async_iterator(daemon: object, name: str) -> None:
    client = kiln.get_default_client()
    await AsyncVolume.create(name, size_mib=16)
    try:
        kinds = []
        async for e in client.events(kinds=["volume.", "operation.finished"], since=0):
            if e.id == name or (e.object or {}).get("target") == name:
                kinds.append(e.kind)
            if e.kind == "operation.finished" and (e.object or {}).get("target") == name:
                assert e.state == "succeeded"
                break
        assert kinds == ["volume.created", "operation.finished"]
        with pytest.raises(kiln.InvalidRequestError):
            async for _ in client.events(kinds="volume.creat"):
                pass
    finally:
        await AsyncVolume.delete(name)
