"""`kiln mcp` driven by the official MCP Python SDK, against a real daemon with real VMs: an agent's
checkpoint → break something → roll back → verify, over stdio; and the streamable HTTP transport with
its bearer token."""

from __future__ import annotations

import os
import subprocess
import time
from typing import Any

import anyio
import httpx2
import pytest
from mcp import ClientSession, StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client

from conftest import Daemon, free_port

TOOLS = {
    "create_sandbox", "run_command", "read_file", "write_file", "list_files", "snapshot",
    "restore_snapshot", "resume_snapshot", "fork_sandbox", "list", "delete_sandbox", "delete_snapshot",
}


def data(result: Any) -> dict[str, Any]:
    assert not result.is_error, f"tool failed: {result.content}"
    assert isinstance(result.structured_content, dict), result
    return result.structured_content


async def call(session: ClientSession, tool: str, **args: Any) -> dict[str, Any]:
    return data(await session.call_tool(tool, args))


def stdio_params(d: Daemon) -> StdioServerParameters:
    return StdioServerParameters(command=str(d.bin), args=["--socket", str(d.socket), "mcp"],
                                 env={"PATH": os.environ.get("PATH", "")})


def test_checkpoint_break_rollback_verify(daemon: Daemon) -> None:
    async def flow() -> None:
        async with stdio_client(stdio_params(daemon)) as (read, write):
            async with ClientSession(read, write) as session:
                init = await session.initialize()
                assert init.server_info.name == "kiln"
                assert "restore_snapshot" in (init.instructions or "")
                tools = (await session.list_tools()).tools
                assert TOOLS <= {t.name for t in tools}, [t.name for t in tools]
                for t in tools:
                    assert t.description and len(t.description) > 40, t
                sb = await call(session, "create_sandbox", name="agent-box", memory_mib=256)
                assert sb["state"] == "running" and sb["name"] == "agent-box"
                await call(session, "write_file", sandbox="agent-box", path="/root/app/config.txt",
                           content="version=1\n")
                r = await call(session, "run_command", sandbox="agent-box",
                               command="cat /root/app/config.txt; echo err >&2; exit 3")
                assert (r["exit_code"], r["stdout"], r["stderr"]) == (3, "version=1\n", "err\n")
                # Checkpoint before the risky step.
                snap = await call(session, "snapshot", sandbox="agent-box", name="before-risky")
                assert snap["id"] == "before-risky"
                # The risky step breaks things: the config is gone and junk is left behind.
                r = await call(session, "run_command", sandbox="agent-box",
                               command="rm -rf /root/app && echo junk > /root/junk && echo broke")
                assert r["exit_code"] == 0 and r["stdout"] == "broke\n"
                broken = await call(session, "run_command", sandbox="agent-box",
                                    command="cat /root/app/config.txt")
                assert broken["exit_code"] != 0
                # Roll back, then verify the sandbox is as it was at the checkpoint.
                restored = await call(session, "restore_snapshot", snapshot="before-risky")
                assert restored["name"] == "agent-box" and restored["state"] == "running"
                f = await call(session, "read_file", sandbox="agent-box", path="/root/app/config.txt")
                assert (f["content"], f["base64"]) == ("version=1\n", False)
                ls = await call(session, "list_files", sandbox="agent-box", path="/root")
                names = {e["name"] for e in ls["entries"]}
                assert "app" in names and "junk" not in names, names
                # A second rollback to the same checkpoint works too (agents retry).
                await call(session, "run_command", sandbox="agent-box", command="rm -rf /root/app")
                await call(session, "restore_snapshot", snapshot="before-risky")
                r = await call(session, "run_command", sandbox="agent-box", command="cat /root/app/config.txt")
                assert r["stdout"] == "version=1\n"
                # A copy from the checkpoint, and a fork of the live sandbox.
                copy = await call(session, "resume_snapshot", snapshot="before-risky", name="agent-copy")
                assert copy["state"] == "running"
                forked = await call(session, "fork_sandbox", sandbox="agent-box")
                assert len(forked["sandboxes"]) == 1
                fork_name = forked["sandboxes"][0]["name"]
                r = await call(session, "run_command", sandbox=fork_name, command="cat /root/app/config.txt")
                assert r["stdout"] == "version=1\n"
                listed = await call(session, "list")
                assert {"agent-box", "agent-copy", fork_name} <= {s["name"] for s in listed["sandboxes"]}
                assert "before-risky" in {s["id"] for s in listed["snapshots"]}
                # Errors are tool errors that carry kiln's stable code.
                err = await session.call_tool("run_command", {"sandbox": "no-such-box", "command": "true"})
                assert err.is_error
                assert err.structured_content["error"]["code"] == "sandbox_not_found", err
                assert "[sandbox_not_found]" in err.content[0].text
                err = await session.call_tool("read_file", {"sandbox": "agent-box", "path": "/nope"})
                assert err.is_error and err.structured_content["error"]["code"], err
                for name in ("agent-copy", fork_name, "agent-box"):
                    await call(session, "delete_sandbox", sandbox=name)
                await call(session, "delete_snapshot", snapshot="before-risky")
                listed = await call(session, "list")
                assert listed["sandboxes"] == [] and listed["snapshots"] == []

    anyio.run(flow)


def test_streamable_http_needs_the_token(daemon: Daemon) -> None:
    port = free_port()
    token = "mcp-test-token-0123456789"
    server = subprocess.Popen(
        [str(daemon.bin), "--socket", str(daemon.socket), "mcp", "--http", f"127.0.0.1:{port}"],
        env={**os.environ, "KILN_MCP_TOKEN": token}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}/mcp"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                r = httpx2.post(url, json={"jsonrpc": "2.0", "id": 1, "method": "ping"}, timeout=5)
                break
            except httpx2.TransportError:
                assert time.monotonic() < deadline and server.poll() is None, "kiln mcp --http did not start"
                time.sleep(0.1)
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"

        async def flow() -> None:
            async with httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"}, timeout=120) as http:
                async with streamable_http_client(url, http_client=http) as (read, write):
                    async with ClientSession(read, write) as session:
                        await session.initialize()
                        assert TOOLS <= {t.name for t in (await session.list_tools()).tools}
                        listed = await call(session, "list")
                        assert isinstance(listed["sandboxes"], list)
                        err = await session.call_tool("delete_snapshot", {"snapshot": "nope"})
                        assert err.is_error and err.structured_content["error"]["code"] == "snapshot_not_found"

        anyio.run(flow)
    finally:
        server.kill()
        server.wait()
