"""Directory transfer and watches, shared by the sync and async SDKs: tar packing and unpacking (local
I/O only), batch-write bodies and watch events."""

from __future__ import annotations

import base64
import os
import tarfile
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import IO, Any

SPOOL = 8 << 20
"""A tar bigger than this is spooled to a temporary file instead of memory."""


@dataclass(frozen=True)
class UnpackResult:
    """What a directory upload unpacked."""

    path: str
    entries: int
    bytes: int


@dataclass(frozen=True)
class WatchEvent:
    """One change under a watched guest directory."""

    event: str
    """``create``, ``modify``, ``delete``, ``moved_from``, ``moved_to`` or ``overflow`` (events were lost)."""
    path: str
    dir: bool
    cookie: int | None = None
    """Pairs a ``moved_from`` with its ``moved_to``."""

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> WatchEvent:
        return cls(event=d["event"], path=d["path"], dir=bool(d.get("dir")), cookie=d.get("cookie"))


FileSpec = Mapping[str, "str | bytes"] | Iterable[tuple[str, "str | bytes"] | tuple[str, "str | bytes", int | str]]
"""Files for a batch write: ``{path: content}``, or ``(path, content)`` / ``(path, content, mode)`` tuples."""


def batch_body(files: FileSpec) -> dict[str, Any]:
    items = files.items() if isinstance(files, Mapping) else files
    out = []
    for item in items:
        path, content = item[0], item[1]
        mode = item[2] if len(item) > 2 else None  # type: ignore[misc]
        f: dict[str, Any] = {"path": path}
        if isinstance(content, str):
            f["content"] = content
        else:
            f["content"] = base64.b64encode(content).decode("ascii")
            f["encoding"] = "base64"
        if mode is not None:
            f["mode"] = format(mode, "o") if isinstance(mode, int) else str(mode)
        out.append(f)
    return {"files": out}


def pack(local_dir: str | os.PathLike[str]) -> tuple[IO[bytes], int]:
    """A tar of ``local_dir`` (entries relative to it, symlinks kept as symlinks) in a spooled file,
    rewound, and its size."""
    root = os.fspath(local_dir)
    if not os.path.isdir(root):
        raise NotADirectoryError(root)
    spool = tempfile.SpooledTemporaryFile(max_size=SPOOL)
    with tarfile.open(fileobj=spool, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in sorted(os.listdir(root)):
            tar.add(os.path.join(root, name), arcname=name, recursive=True)
    size = spool.tell()
    spool.seek(0)
    return spool, size


def chunks(f: IO[bytes], size: int = 1 << 20) -> Iterator[bytes]:
    while chunk := f.read(size):
        yield chunk


def unpack(tar_file: IO[bytes], local_dir: str | os.PathLike[str]) -> None:
    """Unpacks a tar from the guest into ``local_dir``. The guest is not trusted: entries that would
    land outside ``local_dir`` (``..``, absolute names, links out) are refused."""
    os.makedirs(local_dir, exist_ok=True)
    with tarfile.open(fileobj=tar_file, mode="r|") as tar:
        # "tar" keeps modes (the "data" filter would strip executable bits from group/other) and still
        # refuses absolute names, '..' and links that leave the directory.
        tar.extractall(local_dir, filter="tar")


class ChunkReader:
    """A read-only file over an iterator of byte chunks (for streaming ``tarfile`` mode ``r|``)."""

    def __init__(self, it: Iterator[bytes]) -> None:
        self._it = it
        self._buf = b""

    def read(self, n: int = -1) -> bytes:
        while n < 0 or len(self._buf) < n:
            try:
                self._buf += next(self._it)
            except StopIteration:
                break
        if n < 0:
            out, self._buf = self._buf, b""
        else:
            out, self._buf = self._buf[:n], self._buf[n:]
        return out
