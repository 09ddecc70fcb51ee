"""Sandbox lifetimes through the sync and async SDKs: idle hibernation and wake on use, set_timeout,
snapshot ttl (real VMs)."""

from __future__ import annotations

import time

import pytest

from kiln import AsyncSandbox, Lifetime, Sandbox


def wait_state(sb: Sandbox, state: str, limit: float) -> None:
    t = time.monotonic()
    while sb.refresh().state != state:
        assert time.monotonic() - t < limit, f"{sb.name} is {sb.state}, not {state}"
        time.sleep(0.2)


def test_idle_hibernation_wakes_on_exec_and_set_timeout_renews(daemon: object, name: str) -> None:
    with Sandbox.create(name=name, idle_timeout=3, timeout=300) as sb:
        assert isinstance(sb.lifetime, Lifetime)
        assert (sb.lifetime.idle_timeout, sb.lifetime.on_timeout, sb.lifetime.auto_resume) == (3, "hibernate", True)
        first_expiry = sb.lifetime.expires_at
        sb.run("echo in-ram > /dev/shm/x")
        wait_state(sb, "stopped", 30)
        assert sb.run("cat /dev/shm/x").stdout == "in-ram\n"
        assert sb.refresh().state == "running"
        sb.set_timeout(900, idle_timeout=0)
        assert sb.lifetime.timeout == 900 and sb.lifetime.idle_timeout is None
        assert first_expiry is not None and sb.lifetime.expires_at > first_expiry
        snap = sb.snapshot(name=f"{name}-ttl", ttl=600)
        assert snap.expires_at is not None
        snap.delete()


def test_sandbox_without_lifetime_has_none(sandbox: Sandbox) -> None:
    assert sandbox.refresh().lifetime is None


@pytest.mark.asyncio
async def test_async_create_with_delete_policy_and_set_timeout(daemon: object, name: str) -> None:
    sb = await AsyncSandbox.create(name=name, timeout=120, on_timeout="delete")
    try:
        assert sb.lifetime is not None and sb.lifetime.on_timeout == "delete" and sb.lifetime.timeout == 120
        await sb.set_timeout(0)
        assert sb.lifetime is not None and sb.lifetime.timeout is None and sb.lifetime.expires_at is None
    finally:
        await sb.delete()
