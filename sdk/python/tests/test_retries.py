"""Retries, against a small scripted HTTP server on loopback that answers 429/502/503 (or drops the
connection) before answering 200: this tests the client's behaviour, so the server is a stand-in. The
real daemon's 429 is tested in test_retry_against_the_daemon below."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

import kiln
from conftest import Daemon
from kiln import AsyncSandbox, Client, RetryPolicy, Sandbox

SANDBOX = {"id": "sb1", "name": "sb1", "state": "running", "template": "tiny", "created_at": "2026-01-01T00:00:00Z"}
FAST = RetryPolicy(max_attempts=4, backoff=0.05, max_backoff=0.2, max_elapsed=10)


def err(status: int, code: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], Any]:
    return (status, headers or {}, {"error": {"code": code, "message": f"{code} (scripted)"}})


class Scripted:
    """Answers each (method, path) with the next scripted reply; the last one repeats. A reply is
    ``(status, headers, json body)`` or ``"drop"`` (close the connection without answering)."""

    def __init__(self) -> None:
        self.script: dict[tuple[str, str], list[Any]] = {}
        self.seen: list[tuple[str, str, float]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _reply(self) -> None:
                path = self.path.split("?")[0]
                n = int(self.headers.get("content-length") or 0)
                if n:
                    self.rfile.read(n)
                outer.seen.append((self.command, path, time.monotonic()))
                replies = outer.script.get((self.command, path)) or [(404, {}, {"error": {"code": "route_not_found"}})]
                reply = replies.pop(0) if len(replies) > 1 else replies[0]
                if reply == "drop":
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                status, headers, body = reply
                raw = body if isinstance(body, bytes) else json.dumps(body).encode()
                self.send_response(status)
                for k, v in {"content-type": "application/json", **headers}.items():
                    self.send_header(k, v)
                self.send_header("content-length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            do_GET = do_POST = do_DELETE = do_PUT = _reply  # noqa: N815

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def client(self, retry: RetryPolicy = FAST) -> Client:
        return Client(url=f"127.0.0.1:{self.server.server_address[1]}", retry=retry, timeout=10)

    def count(self, method: str, path: str) -> int:
        return sum(1 for m, p, _ in self.seen if (m, p) == (method, path))

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def server() -> Iterator[Scripted]:
    s = Scripted()
    yield s
    s.close()


def test_429_is_retried_after_retry_after_for_get_and_post(server: Scripted) -> None:
    server.script[("GET", "/v1/sandboxes")] = [err(429, "rate_limited", {"Retry-After": "1"}), (200, {}, [SANDBOX])]
    t0 = time.monotonic()
    assert [s.id for s in Sandbox.list(client=server.client())] == ["sb1"]
    assert time.monotonic() - t0 >= 1.0, "Retry-After: 1 was not waited out"
    assert server.count("GET", "/v1/sandboxes") == 2
    # A 429 means the daemon refused before doing anything, so even a create (POST) is sent again.
    server.script[("POST", "/v1/sandboxes")] = [err(429, "capacity_exceeded", {"Retry-After": "0"}), (201, {}, SANDBOX)]
    assert Sandbox.create(client=server.client()).id == "sb1"
    assert server.count("POST", "/v1/sandboxes") == 2


def test_idempotent_calls_retry_502_503_and_back_off(server: Scripted) -> None:
    server.script[("GET", "/v1/sandboxes/sb1")] = [
        err(502, "agent_unavailable"),
        err(503, "sandbox_unresponsive"),
        err(503, "sandbox_unresponsive"),
        (200, {}, SANDBOX),
    ]
    assert Sandbox.connect("sb1", client=server.client()).id == "sb1"
    times = [t for m, p, t in server.seen if p == "/v1/sandboxes/sb1"]
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert len(times) == 4
    # Jittered exponential: 50-100 % of 0.05, 0.1, 0.2 s.
    for gap, cap in zip(gaps, (0.05, 0.1, 0.2), strict=True):
        assert cap / 2 - 0.01 <= gap <= cap + 0.25, gaps
    server.script[("DELETE", "/v1/sandboxes/sb1")] = [err(503, "sandbox_unresponsive"), (204, {}, b"")]
    Sandbox({**SANDBOX}, server.client()).delete()
    assert server.count("DELETE", "/v1/sandboxes/sb1") == 2


def test_a_post_is_never_retried_on_an_error_response(server: Scripted) -> None:
    server.script[("POST", "/v1/sandboxes/sb1/snapshots")] = [err(503, "sandbox_unresponsive"), (201, {}, {})]
    sb = Sandbox({**SANDBOX}, server.client())
    with pytest.raises(kiln.SandboxUnresponsiveError) as e:
        sb.snapshot(name="s")
    assert (e.value.status, e.value.code) == (503, "sandbox_unresponsive")
    assert server.count("POST", "/v1/sandboxes/sb1/snapshots") == 1
    # Nor when the connection breaks after the request went out: the daemon may have acted on it.
    server.script[("POST", "/v1/sandboxes/sb1/stop")] = ["drop", (200, {}, SANDBOX)]
    with pytest.raises(kiln.KilnConnectionError):
        sb.stop()
    assert server.count("POST", "/v1/sandboxes/sb1/stop") == 1


def test_broken_connections_are_retried_for_idempotent_calls(server: Scripted) -> None:
    server.script[("GET", "/v1/sandboxes")] = ["drop", "drop", (200, {}, [SANDBOX])]
    assert len(Sandbox.list(client=server.client())) == 1
    assert server.count("GET", "/v1/sandboxes") == 3


def test_retries_are_bounded_by_attempts_and_time(server: Scripted) -> None:
    server.script[("GET", "/v1/sandboxes")] = [err(503, "sandbox_unresponsive")]
    with pytest.raises(kiln.SandboxUnresponsiveError):
        Sandbox.list(client=server.client())
    assert server.count("GET", "/v1/sandboxes") == FAST.max_attempts
    # A Retry-After beyond the time budget surfaces at once, carrying the daemon's advice.
    server.script[("GET", "/v1/volumes")] = [err(429, "rate_limited", {"Retry-After": "60"})]
    t0 = time.monotonic()
    with pytest.raises(kiln.RateLimitedError) as e:
        kiln.Volume.list(client=server.client())
    assert time.monotonic() - t0 < 2 and e.value.retry_after == 60
    assert isinstance(e.value, kiln.CapacityError)
    assert server.count("GET", "/v1/volumes") == 1
    # Retries off.
    server.script[("GET", "/v1/snapshots")] = [err(429, "rate_limited", {"Retry-After": "0"}), (200, {}, [])]
    with pytest.raises(kiln.RateLimitedError):
        kiln.Snapshot.list(client=server.client(RetryPolicy.disabled()))
    assert server.count("GET", "/v1/snapshots") == 1


def test_unknown_codes_fall_back_to_the_class_of_their_status(server: Scripted) -> None:
    server.script[("GET", "/v1/sandboxes/sb1")] = [err(409, "brand_new_conflict")]
    with pytest.raises(kiln.ConflictError) as e:
        Sandbox.connect("sb1", client=server.client())
    assert type(e.value) is kiln.ConflictError and e.value.code == "brand_new_conflict"
    server.script[("GET", "/v1/volumes")] = [err(418, "teapot")]
    with pytest.raises(kiln.KilnError) as e2:
        kiln.Volume.list(client=server.client())
    assert type(e2.value) is kiln.KilnError and (e2.value.status, e2.value.code) == (418, "teapot")


@pytest.mark.asyncio
async def test_async_client_retries_too(server: Scripted) -> None:
    server.script[("GET", "/v1/sandboxes")] = [err(429, "rate_limited", {"Retry-After": "0"}), (200, {}, [SANDBOX])]
    server.script[("POST", "/v1/sandboxes/sb1/fork")] = [err(502, "agent_unavailable"), (201, {}, {"sandboxes": []})]
    client = server.client()
    assert [s.id for s in await AsyncSandbox.list(client=client)] == ["sb1"]
    with pytest.raises(kiln.AgentUnavailableError):
        await AsyncSandbox({**SANDBOX}, client).fork(count=1)
    assert (server.count("GET", "/v1/sandboxes"), server.count("POST", "/v1/sandboxes/sb1/fork")) == (2, 1)
    await client.aclose()


def test_retry_against_the_daemon() -> None:
    """The real daemon's rate limit answers 429 rate_limited with Retry-After; the SDK waits it out."""
    d = Daemon("--rate-limit", "1", "--rate-burst", "1")
    try:
        quiet = d.client(retry=RetryPolicy.disabled())
        Sandbox.list(client=quiet)
        with pytest.raises(kiln.RateLimitedError) as e:
            Sandbox.list(client=quiet)
        assert e.value.status == 429 and e.value.retry_after is not None and e.value.retry_after >= 1
        patient = d.client()
        t0 = time.monotonic()
        for _ in range(3):
            assert Sandbox.list(client=patient) == []
        # Three calls at one per second after an empty bucket: the SDK waited about 3 s instead of failing.
        assert time.monotonic() - t0 >= 2
    finally:
        d.stop()
