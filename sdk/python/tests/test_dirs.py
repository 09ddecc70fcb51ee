"""Directories (tar up and down), batch writes, listings with kinds and watches, sync and async."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from kiln import AsyncSandbox, PathEscapeError, Sandbox


def _tree(root: Path) -> None:
    (root / "a" / "b").mkdir(parents=True)
    (root / "empty").mkdir()
    (root / "a" / "x.sh").write_text("#!/bin/sh\necho x\n")
    (root / "a" / "x.sh").chmod(0o750)
    (root / "a" / "b" / "data.bin").write_bytes(bytes(range(256)) * 40)
    os.symlink("a/x.sh", root / "link")
    os.utime(root / "a" / "x.sh", (1_600_000_000, 1_600_000_000))


def _describe(root: Path) -> dict[str, tuple]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = Path(dirpath) / n
            st = p.lstat()
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = ("link", os.readlink(p))
            elif p.is_dir():
                out[rel] = ("dir", st.st_mode & 0o7777)
            else:
                out[rel] = ("file", st.st_mode & 0o7777, int(st.st_mtime) if rel == "a/x.sh" else 0, p.read_bytes())
    return out


def test_dirs_round_trip_batch_list_and_escape(sandbox: Sandbox, tmp_path: Path) -> None:
    src = tmp_path / "src"
    _tree(src)
    r = sandbox.files.upload_dir(src, "/root/pytree")
    assert r.entries == 6 and r.path == "/root/pytree"
    assert sandbox.run("/root/pytree/link").stdout == "x\n"
    kinds = {e.name: e.kind for e in sandbox.files.list("/root/pytree")}
    assert kinds == {"a": "dir", "empty": "dir", "link": "symlink"}
    back = tmp_path / "back"
    sandbox.files.download_dir("/root/pytree", back)
    assert _describe(back) == _describe(src)

    written = sandbox.files.write_files({"/root/pyb/t.txt": "text", "/root/pyb/b.bin": b"\x00\xff"})
    assert [w.bytes for w in written] == [4, 2]
    assert sandbox.files.read_bytes("/root/pyb/b.bin") == b"\x00\xff"
    sandbox.files.write_files([("/root/pyb/run.sh", "#!/bin/sh\n", 0o700)])
    assert sandbox.files.stat("/root/pyb/run.sh").mode == 0o700

    # A symlink planted in the guest is never written through.
    sandbox.run("mkdir -p /root/pyesc && ln -sfn /etc /root/pyesc/evil")
    evil = tmp_path / "evil"
    (evil / "evil").mkdir(parents=True)
    (evil / "evil" / "pwned").write_text("no")
    with pytest.raises(PathEscapeError):
        sandbox.files.upload_dir(evil, "/root/pyesc")
    assert not sandbox.files.exists("/etc/pwned")


def test_watch_sees_changes_in_order(sandbox: Sandbox) -> None:
    sandbox.files.mkdir("/root/pywatch")
    seen: list[tuple[str, str]] = []
    with sandbox.files.watch("/root/pywatch") as events:
        threading.Thread(
            target=lambda: sandbox.run("cd /root/pywatch && echo 1 > f && echo 2 >> f && rm f"), daemon=True
        ).start()
        for ev in events:
            seen.append((ev.event, ev.path))
            if ev.event == "delete":
                break
    assert seen[0] == ("create", "/root/pywatch/f") and seen[-1] == ("delete", "/root/pywatch/f")
    assert ("modify", "/root/pywatch/f") in seen


@pytest.mark.asyncio
async def test_async_dirs_and_watch(sandbox: Sandbox, tmp_path: Path) -> None:
    sb = await AsyncSandbox.connect(sandbox.name)
    src = tmp_path / "src"
    _tree(src)
    assert (await sb.files.upload_dir(src, "/root/pyatree")).entries == 6
    back = tmp_path / "back"
    await sb.files.download_dir("/root/pyatree", back)
    assert _describe(back) == _describe(src)
    assert [w.path for w in await sb.files.write_files({"/root/pya/x": "1"})] == ["/root/pya/x"]
    async with sb.files.watch("/root/pya") as events:
        await sb.files.write("/root/pya/y", "2")
        async for ev in events:
            if ev.path == "/root/pya/y":
                # API writes are atomic: a temporary file renamed into place.
                assert ev.event == "moved_to"
                break
