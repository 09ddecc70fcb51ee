"""A real `kiln serve` in a temporary data directory (real QEMU VMs), for the MCP and metrics tests.

Environment: KILN_BIN (default target/release/kiln), KILN_TEST_IMAGES (default .kiln-data/images).
"""

from __future__ import annotations

import http.client
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def kiln_bin() -> Path:
    return Path(os.environ.get("KILN_BIN") or REPO / "target/release/kiln")


def images_dir() -> Path:
    return Path(os.environ.get("KILN_TEST_IMAGES") or REPO / ".kiln-data/images")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("kiln", timeout=120)
        self.path = path

    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(120)
        s.connect(self.path)
        self.sock = s


class Daemon:
    """One `kiln serve` with a unix socket and a TCP listener (bearer token); ``stop()`` kills it and its VMs."""

    def __init__(self, warm_spares: int = 0) -> None:
        binary, images = kiln_bin(), images_dir()
        if not binary.is_file():
            pytest.exit(f"{binary} is missing: run `make build` (or set KILN_BIN)", returncode=2)
        if not (images / "tiny/image.json").is_file():
            pytest.exit(f"image 'tiny' is not built in {images}: run `make image-tiny`", returncode=2)
        self.bin = binary
        # Short path: unix socket paths are limited to 107 bytes.
        self.dir = Path(tempfile.mkdtemp(prefix="ko", dir="/tmp"))
        (self.dir / "images").symlink_to(images.resolve())
        self.socket = self.dir / "kiln.sock"
        self.token = secrets.token_hex(16)
        (self.dir / "token").write_text(self.token)
        self.tcp = f"127.0.0.1:{free_port()}"
        args = [str(binary), "--data-dir", str(self.dir), "--socket", str(self.socket), "serve",
                "--listen", self.tcp, "--token-file", str(self.dir / "token")]
        self.log_path = self.dir / "daemon.log"
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                args, stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                # As the other suites: no template snapshots (a background builder VM); warm spares (VMs of
                # their own) only where a test asks.
                env={**os.environ, "KILN_LOG": "info", "KILN_TEMPLATE_SNAPSHOTS": "off", "KILN_NETWORK": "user",
                     "KILN_WARM_SPARES": str(warm_spares)},
            )
        deadline = time.monotonic() + 30
        while not self.socket.exists() or not self._listening():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"kiln serve did not start:\n{self.log_tail()}")
            time.sleep(0.05)

    def _listening(self) -> bool:
        with socket.socket(socket.AF_UNIX) as s:
            try:
                s.connect(str(self.socket))
            except OSError:
                return False
            return True

    def get(self, path: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        c = UnixHTTPConnection(str(self.socket))
        try:
            c.request("GET", path, headers=headers or {})
            r = c.getresponse()
            return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
        finally:
            c.close()

    def get_tcp(self, path: str, token: str | None) -> tuple[int, bytes]:
        host, port = self.tcp.split(":")
        c = http.client.HTTPConnection(host, int(port), timeout=30)
        try:
            c.request("GET", path, headers={"Authorization": f"Bearer {token}"} if token else {})
            r = c.getresponse()
            return r.status, r.read()
        finally:
            c.close()

    def kiln(self, *args: str) -> str:
        out = subprocess.run([str(self.bin), "--socket", str(self.socket), *args],
                             capture_output=True, text=True, timeout=600)
        if out.returncode != 0:
            raise AssertionError(f"kiln {args} failed: {out.stderr}\n{self.log_tail()}")
        return out.stdout

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                cmd = (entry / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if cmd.startswith("qemu-system") and str(self.dir) in cmd:
                try:
                    os.kill(int(entry.name), signal.SIGKILL)
                except ProcessLookupError:
                    pass
        subprocess.run(["umount", str(self.dir / "ram")], capture_output=True, check=False)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="session")
def daemon() -> Iterator[Daemon]:
    d = Daemon()
    try:
        yield d
    finally:
        d.stop()
