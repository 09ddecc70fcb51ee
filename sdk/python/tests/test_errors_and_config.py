"""Each error type, as the daemon really reports it, and how a Client finds the daemon."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

import kiln
from conftest import Daemon
from kiln import (
    AuthenticationError,
    CapacityError,
    Client,
    ConflictError,
    InvalidRequestError,
    KilnConnectionError,
    KilnError,
    NotFoundError,
    Sandbox,
    SandboxNotFoundError,
    Snapshot,
    SnapshotNotFoundError,
)


def test_not_found_errors_carry_code_status_and_message(daemon: Daemon) -> None:
    with pytest.raises(SandboxNotFoundError) as e:
        Sandbox.connect("no-such-sandbox")
    err = e.value
    assert isinstance(err, NotFoundError) and isinstance(err, KilnError)
    assert (err.code, err.status) == ("sandbox_not_found", 404)
    assert "no-such-sandbox" in err.message and str(err) == err.message

    with pytest.raises(SnapshotNotFoundError) as s:
        Snapshot.get("no-such-snapshot")
    assert s.value.code == "snapshot_not_found"
    with pytest.raises(SnapshotNotFoundError):
        Snapshot.delete("no-such-snapshot")
    with pytest.raises(SnapshotNotFoundError):
        Sandbox.from_snapshot("no-such-snapshot")

    with pytest.raises(NotFoundError) as img:
        Sandbox.create(template="no-such-image")
    assert img.value.code == "image_not_found"


def test_invalid_request(daemon: Daemon) -> None:
    with pytest.raises(InvalidRequestError) as e:
        Sandbox.create(memory_mib=1)
    assert (e.value.code, e.value.status) == ("invalid_request", 400)
    assert "out of range" in e.value.message
    with pytest.raises(InvalidRequestError, match="invalid sandbox name"):
        Sandbox.create(name="Not A Valid Name")


def test_name_taken_is_a_conflict(sandbox: Sandbox) -> None:
    with pytest.raises(ConflictError) as e:
        Sandbox.create(name=sandbox.name, memory_mib=256)
    assert (e.value.code, e.value.status) == ("sandbox_name_taken", 409)


def test_tcp_with_token_and_authentication_error(daemon: Daemon, sandbox: Sandbox) -> None:
    assert daemon.url is not None
    with Client(url=daemon.url, token=daemon.token) as tcp:
        assert tcp.url == f"http://{daemon.url}"
        remote = Sandbox.connect(sandbox.id, client=tcp)
        assert remote.run("echo over tcp").stdout == "over tcp\n"
        chunks: list[str] = []
        assert remote.run("echo streamed", on_stdout=chunks.append).ok and chunks == ["streamed\n"]
        remote.files.write("/tmp/tcp.txt", "via tcp")
        assert sandbox.files.read("/tmp/tcp.txt") == "via tcp"

    for token in ("wrong-token", None):
        with Client(url=f"http://{daemon.url}", token=token) as bad, pytest.raises(AuthenticationError) as e:
            Sandbox.list(client=bad)
        assert (e.value.code, e.value.status) == ("unauthorized", 401)


def test_capacity_error() -> None:
    full = Daemon("--memory-overcommit", "0.001")
    try:
        t0 = time.monotonic()
        with pytest.raises(kiln.CapacityExceededError) as e:
            Sandbox.create(memory_mib=256, client=full.client(retry=kiln.RetryPolicy(max_attempts=2)))
        assert isinstance(e.value, CapacityError)
        assert (e.value.code, e.value.status) == ("capacity_exceeded", 429)
        assert "limit" in e.value.message
        # The daemon says when to look again, and the SDK tried once more after that before giving up.
        assert e.value.retry_after == 2 and time.monotonic() - t0 >= 2
    finally:
        full.stop()


def test_timeout_error_from_a_boot_that_takes_too_long() -> None:
    impatient = Daemon("--boot-timeout", "1")
    try:
        with pytest.raises(kiln.TimeoutError) as e:
            # --boot-timeout bounds boots; a create resuming the template's snapshot has its own deadline.
            Sandbox.create(memory_mib=256, boot=True, client=impatient.client())
        assert (e.value.code, e.value.status) == ("timeout", 504)
        assert "did not answer within 1 s" in e.value.message
    finally:
        impatient.stop()


def test_connection_error_names_the_socket(tmp_path: Path) -> None:
    missing = tmp_path / "kiln.sock"
    with pytest.raises(KilnConnectionError) as e:
        Sandbox.list(client=Client(socket=missing))
    assert e.value.code == "connection_failed" and e.value.status is None
    assert str(missing) in e.value.message and "kiln serve" in e.value.message


def test_client_configuration_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("KILN_SOCKET", "KILN_URL", "KILN_TOKEN", "KILN_DATA_DIR", "XDG_DATA_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("KILN_DATA_DIR", "/srv/kiln")
    assert Client().socket == "/srv/kiln/kiln.sock"
    monkeypatch.setenv("KILN_SOCKET", "/run/k.sock")
    assert Client().socket == "/run/k.sock"
    # KILN_URL wins over KILN_SOCKET, as in the CLI; explicit arguments win over both.
    monkeypatch.setenv("KILN_URL", "10.0.0.5:7070")
    monkeypatch.setenv("KILN_TOKEN", "s3cret")
    c = Client()
    assert (c.socket, c.url) == (None, "http://10.0.0.5:7070")
    assert c._headers["Authorization"] == "Bearer s3cret"
    assert Client(socket="/x.sock").socket == "/x.sock"
    with pytest.raises(ValueError):
        Client(socket="/x.sock", url="h:1")
    monkeypatch.delenv("KILN_URL")
    monkeypatch.delenv("KILN_SOCKET")
    monkeypatch.delenv("KILN_DATA_DIR")
    expected = Path("/var/lib/kiln") if os.geteuid() == 0 else Path.home() / ".local/share/kiln"
    assert kiln.default_socket() == expected / "kiln.sock"


def test_error_mapping_of_every_documented_code() -> None:
    from kiln.errors import STATUS_BY_CODE, error_from_code

    expected = {
        400: InvalidRequestError,
        401: AuthenticationError,
        404: NotFoundError,
        409: ConflictError,
        429: CapacityError,
        504: kiln.TimeoutError,
    }
    for code, status in STATUS_BY_CODE.items():
        err = error_from_code(code, "why")
        assert err.status == status and err.code == code and err.message == "why"
        assert isinstance(err, expected.get(status, KilnError))
    assert type(error_from_code("snapshot_already_exists", "")) is kiln.SnapshotAlreadyExistsError
    assert type(error_from_code("guest_path_not_found", "")) is kiln.GuestPathNotFoundError
