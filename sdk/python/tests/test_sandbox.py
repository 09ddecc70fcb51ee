"""Sandboxes, commands and files through the sync SDK, against the session daemon."""

from __future__ import annotations

import hashlib
import os
from datetime import datetime
from pathlib import Path

import pytest

import kiln
from kiln import ConflictError, ExecResult, GuestPathNotFoundError, KilnError, Sandbox


def test_create_reports_what_was_asked(sandbox: Sandbox, suite_id: str) -> None:
    assert sandbox.id.startswith("sb-")
    assert sandbox.name == f"py-{suite_id}"
    assert sandbox.state == "running"
    assert (sandbox.template, sandbox.memory_mib, sandbox.cpus) == ("tiny", 256, 1)
    assert sandbox.disk_size_bytes == 1 << 30
    assert sandbox.env == {"GREETING": "hello"}
    assert sandbox.metadata == {"suite": suite_id, "role": "main"}
    assert len(sandbox.ports) == 1 and sandbox.ports[0].guest == 8080
    assert sandbox.origin == "template:tiny"
    assert isinstance(sandbox.created_at, datetime) and sandbox.created_at.tzinfo is not None


def test_connect_list_refresh_and_logs(sandbox: Sandbox, suite_id: str) -> None:
    by_name = Sandbox.connect(sandbox.name)
    assert by_name.id == sandbox.id
    assert Sandbox.connect(sandbox.id).name == sandbox.name

    assert [s.id for s in Sandbox.list(metadata={"suite": suite_id, "role": "main"})] == [sandbox.id]
    assert Sandbox.list(metadata={"suite": "no-such-suite"}) == []
    assert sandbox.id in {s.id for s in Sandbox.list()}

    assert sandbox.refresh() is sandbox and sandbox.state == "running" and sandbox.pid
    assert "kiln-agent" in sandbox.logs()


def test_run_shell_string_and_argv(sandbox: Sandbox) -> None:
    r = sandbox.run('echo "$GREETING"; echo oops >&2; exit 3')
    assert (r.stdout, r.stderr, r.exit_code, r.ok, r.timed_out) == ("hello\n", "oops\n", 3, False, False)

    r = sandbox.commands.run(["printf", "%s|", "a b", "$HOME"])
    assert r.ok and r.stdout == "a b|$HOME|"

    r = sandbox.commands.run("echo $GREETING $EXTRA; pwd", env={"EXTRA": "there"}, cwd="/tmp")
    assert r.stdout == "hello there\n/tmp\n"


def test_run_stdin_text_and_bytes(sandbox: Sandbox) -> None:
    assert sandbox.run("tr a-z A-Z", stdin="shout").stdout == "SHOUT"
    assert sandbox.run("wc -c", stdin=bytes(range(256)) * 4).stdout.strip() == "1024"


def test_run_timeout_is_reported_not_raised(sandbox: Sandbox) -> None:
    r = sandbox.run("echo started; sleep 10", timeout=0.5)
    assert r.timed_out and not r.ok
    assert r.exit_code is None and r.signal == 9
    assert r.stdout == "started\n"
    assert r.duration_ms < 5000


def test_streaming_callbacks_see_output_as_it_arrives(sandbox: Sandbox) -> None:
    seen: list[tuple[str, str]] = []
    r = sandbox.commands.run(
        "for i in 1 2 3; do echo out$i; echo err$i >&2; sleep 0.1; done; exit 4",
        on_stdout=lambda s: seen.append(("out", s)),
        on_stderr=lambda s: seen.append(("err", s)),
    )
    assert isinstance(r, ExecResult) and r.exit_code == 4
    assert r.stdout == "out1\nout2\nout3\n" and r.stderr == "err1\nerr2\nerr3\n"
    assert "".join(s for k, s in seen if k == "out") == r.stdout
    # Chunks arrive while the command runs, one per sleep at least.
    assert len([k for k, _ in seen if k == "out"]) >= 2


def test_streaming_decodes_utf8_split_across_chunks(sandbox: Sandbox) -> None:
    chunks: list[str] = []
    # "é" is C3 A9: each half arrives alone (as data_b64), and a lone FF is invalid UTF-8.
    r = sandbox.run(r"printf '\303'; sleep 0.3; printf '\251!\377'", on_stdout=chunks.append)
    assert r.ok
    assert r.stdout == "é!\ufffd"
    assert "".join(chunks) == r.stdout


def test_streaming_timeout(sandbox: Sandbox) -> None:
    r = sandbox.run("sleep 10", timeout=0.3, on_stdout=lambda s: None)
    assert r.timed_out and r.signal == 9


def test_exec_of_missing_program_raises_exec_failed(sandbox: Sandbox) -> None:
    with pytest.raises(kiln.ExecFailedError) as e:
        sandbox.run(["/no/such/program"])
    assert e.value.code == "exec_failed" and e.value.status == 422
    assert "/no/such/program" in str(e.value)
    with pytest.raises(kiln.ExecFailedError) as e:
        sandbox.run(["/etc"])
    assert e.value.code == "exec_failed" and e.value.status == 422


def test_files_write_read_stat_list(sandbox: Sandbox) -> None:
    f = sandbox.files
    res = f.write("/tmp/sdk/notes/a.txt", "héllo\n", mode=0o600)  # parents are created
    assert (res.path, res.bytes) == ("/tmp/sdk/notes/a.txt", len("héllo\n".encode()))
    assert f.read("/tmp/sdk/notes/a.txt") == "héllo\n"
    f.write("/tmp/sdk/notes/b.bin", bytes([0, 255, 10]), mode="0755")
    assert f.read_bytes("/tmp/sdk/notes/b.bin") == b"\x00\xff\n"

    st = f.stat("/tmp/sdk/notes/a.txt")
    assert st.is_file and st.size == res.bytes and st.mode == 0o600
    assert f.stat("/tmp/sdk/notes/b.bin").mode == 0o755
    assert f.stat("/tmp/sdk/notes").is_dir

    entries = {e.name: e for e in f.list("/tmp/sdk/notes")}
    assert set(entries) == {"a.txt", "b.bin"}
    assert entries["b.bin"].path == "/tmp/sdk/notes/b.bin" and entries["b.bin"].size == 3
    # What the SDK wrote is what commands see.
    assert sandbox.run("cat /tmp/sdk/notes/a.txt").stdout == "héllo\n"


def test_files_mkdir_exists_remove(sandbox: Sandbox) -> None:
    f = sandbox.files
    f.mkdir("/tmp/sdk-dirs/x/y")
    assert f.exists("/tmp/sdk-dirs/x/y") and f.stat("/tmp/sdk-dirs/x/y").is_dir
    f.write("/tmp/sdk-dirs/x/y/file", "1")
    f.remove("/tmp/sdk-dirs/x/y/file")
    assert not f.exists("/tmp/sdk-dirs/x/y/file")

    f.write("/tmp/sdk-dirs/x/y/file", "1")
    with pytest.raises(KilnError) as e:
        f.remove("/tmp/sdk-dirs/x")  # not empty
    assert "not empty" in e.value.message
    f.remove("/tmp/sdk-dirs", recursive=True)
    assert not f.exists("/tmp/sdk-dirs")

    with pytest.raises(GuestPathNotFoundError):
        f.read("/tmp/sdk-dirs/x/y/file")
    with pytest.raises(kiln.InvalidRequestError, match="absolute"):
        f.read("relative/path")


def test_upload_and_download_stream_big_files(sandbox: Sandbox, tmp_path: Path) -> None:
    data = os.urandom(24 << 20)
    src, dst = tmp_path / "big.bin", tmp_path / "back.bin"
    src.write_bytes(data)
    res = sandbox.files.upload(src, "/tmp/big.bin", mode=0o640)
    assert res.bytes == len(data)
    digest = sandbox.run("sha256sum /tmp/big.bin").stdout.split()[0]
    assert digest == hashlib.sha256(data).hexdigest()

    assert sandbox.files.download("/tmp/big.bin", dst) == len(data)
    assert dst.read_bytes() == data
    sandbox.files.remove("/tmp/big.bin")

    with pytest.raises(GuestPathNotFoundError):
        sandbox.files.download("/tmp/big.bin", tmp_path / "never")
    assert not (tmp_path / "never").exists()


def test_pause_and_resume(sandbox: Sandbox) -> None:
    sandbox.files.write("/tmp/before-pause", "kept")
    assert sandbox.pause().state == "paused"
    try:
        with pytest.raises(ConflictError) as e:
            sandbox.run("true")
        assert e.value.code == "sandbox_not_running" and e.value.status == 409
        assert "paused" in e.value.message
    finally:
        assert sandbox.resume().state == "running"
    assert sandbox.files.read("/tmp/before-pause") == "kept"


def test_stop_hibernates_and_start_wakes(sandbox: Sandbox) -> None:
    sandbox.run("echo awake > /tmp/hibernated; sleep 1000 >/dev/null 2>&1 &")
    assert sandbox.stop().state == "stopped"
    assert sandbox.pid is None
    try:
        with pytest.raises(ConflictError):
            sandbox.run("true")
    finally:
        assert sandbox.start().state == "running"
    # Same machine: files and processes are where they were.
    assert sandbox.files.read("/tmp/hibernated") == "awake\n"
    assert "sleep 1000" in sandbox.run("ps").stdout


def test_get_host_publishes_a_guest_port_on_a_free_host_port(sandbox: Sandbox) -> None:
    import time
    import urllib.request

    fixed = sandbox.ports[0]
    assert sandbox.get_host(8080) == f"127.0.0.1:{fixed.host}" and not fixed.auto
    addr = sandbox.get_host(9000)
    host, port = addr.split(":")
    assert host == "127.0.0.1" and int(port) not in (0, fixed.host)
    assert sandbox.get_host(9000) == addr  # published once
    assert any(p.guest == 9000 and p.auto for p in sandbox.ports)
    sandbox.run("mkdir -p /www9 && echo py-served > /www9/index.html && (httpd -p 9000 -h /www9 &)")
    body = ""
    for _ in range(50):
        try:
            # No proxy: the request must go to loopback itself.
            opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
            body = opener.open(f"http://{addr}/index.html", timeout=5).read().decode()
            break
        except OSError:
            time.sleep(0.2)
    assert body == "py-served\n"
    sandbox.unpublish_port(9000)
    assert all(p.guest != 9000 for p in sandbox.ports)
    with pytest.raises(kiln.NotFoundError) as e:
        sandbox.unpublish_port(9000)
    assert e.value.code == "port_not_found"
