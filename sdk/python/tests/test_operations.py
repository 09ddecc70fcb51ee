"""Operations through the sync and async SDKs: a mutating call is found, read and waited for afterwards."""

from __future__ import annotations

import pytest

from kiln import AsyncOperation, AsyncVolume, NotFoundError, Operation, Volume


def test_operation_of_a_call_can_be_found_and_waited_for(daemon: object, name: str) -> None:
    Volume.create(name, size_mib=32)
    try:
        ops = Operation.list(target=name)
        assert [o.kind for o in ops] == ["volume.create"]
        op = ops[0]
        assert op.id.startswith("op-") and op.state == "succeeded" and op.done
        assert op.result["name"] == name and op.resources["volumes"] == [name] and op.error_code is None
        assert Operation.get(op.id).created_at == op.created_at
        assert Operation.wait(op.id, timeout=5).state == "succeeded"
        assert op.id in [o.id for o in Operation.list(state="succeeded")]
    finally:
        Volume.delete(name)
    assert [o.kind for o in Operation.list(target=name)] == ["volume.delete", "volume.create"]
    with pytest.raises(NotFoundError) as missing:
        Operation.get("op-nosuchthing")
    assert missing.value.code == "operation_not_found"


@pytest.mark.asyncio
async def test_async_operation(daemon: object, name: str) -> None:
    await AsyncVolume.create(name, size_mib=32)
    await AsyncVolume.delete(name)
    ops = await AsyncOperation.list(target=name)
    assert [(o.kind, o.state) for o in ops] == [("volume.delete", "succeeded"), ("volume.create", "succeeded")]
    assert (await AsyncOperation.wait(ops[0].id, timeout=1)).done
    assert (await AsyncOperation.get(ops[1].id)).result["name"] == name
