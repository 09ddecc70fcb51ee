"""A real `kiln serve` daemon per test session, in a private data directory, with real QEMU VMs.

The daemon listens on a unix socket and on TCP (with a bearer token), so both transports are tested.
Environment: KILN_BIN (default target/release/kiln), KILN_TEST_IMAGES (default .kiln-data/images).
"""

from __future__ import annotations

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

import kiln


REPO = Path(__file__).resolve().parents[3]

# Template snapshots are on, as users get them; the daemons share them through this checkout's own store
# (the same one the Rust tests use), never beside the built images, which may be another checkout's.
# User networking: a root daemon's default (bridged) would build a bridge and NAT on the host.
DAEMON_ENV = {"KILN_TEMPLATE_STORE": str(REPO / "target/tmp/kiln-template-store"), "KILN_NETWORK": "user"}


def kiln_bin() -> Path:
    return Path(os.environ.get("KILN_BIN") or REPO / "target/release/kiln")


def images_dir() -> Path:
    return Path(os.environ.get("KILN_TEST_IMAGES") or REPO / ".kiln-data/images")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def qemu_pids_under(directory: Path) -> list[int]:
    """QEMU processes started for this data directory (they outlive the daemon by design)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if cmd.startswith("qemu-system") and str(directory) in cmd:
            pids.append(int(entry.name))
    return pids


class Daemon:
    """One `kiln serve` in a temporary directory; ``stop()`` kills it and every VM it started."""

    def __init__(self, *extra_args: str, tcp: bool = False) -> None:
        binary, images = kiln_bin(), images_dir()
        if not binary.is_file():
            pytest.exit(f"{binary} is missing: run `make build` (or set KILN_BIN)", returncode=2)
        if not (images / "tiny/image.json").is_file():
            pytest.exit(f"image 'tiny' is not built in {images}: run `make image-tiny`", returncode=2)
        # Short path: unix socket paths are limited to 107 bytes.
        self.dir = Path(tempfile.mkdtemp(prefix="kp", dir="/tmp"))
        (self.dir / "images").symlink_to(images.resolve())
        self.socket = self.dir / "kiln.sock"
        self.token = secrets.token_hex(16)
        self.url: str | None = None
        args = [str(binary), "--data-dir", str(self.dir), "--socket", str(self.socket), "serve", *extra_args]
        if tcp:
            (self.dir / "token").write_text(self.token)
            self.url = f"127.0.0.1:{free_port()}"
            args += ["--listen", self.url, "--token-file", str(self.dir / "token")]
        self.log_path = self.dir / "daemon.log"
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                args,
                stdout=log,
                stderr=log,
                stdin=subprocess.DEVNULL,
                env={**os.environ, "KILN_LOG": "info", **DAEMON_ENV},
            )
        deadline = time.monotonic() + 30
        while not self._listening():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"kiln serve did not start:\n{self.log_tail()}")
            time.sleep(0.02)

    def _listening(self) -> bool:
        with socket.socket(socket.AF_UNIX) as s:
            try:
                s.connect(str(self.socket))
            except OSError:
                return False
            return True

    def client(self, **kwargs: object) -> kiln.Client:
        return kiln.Client(socket=str(self.socket), **kwargs)  # type: ignore[arg-type]

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for pid in qemu_pids_under(self.dir):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        # The daemon mounts a tmpfs for guest RAM at <dir>/ram (it outlives the daemon, like its VMs).
        subprocess.run(["umount", str(self.dir / "ram")], capture_output=True, check=False)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="session")
def daemon() -> Iterator[Daemon]:
    d = Daemon(tcp=True)
    # Examples and any code using the defaults find this daemon through the environment.
    os.environ["KILN_SOCKET"] = str(d.socket)
    os.environ.pop("KILN_URL", None)
    kiln.set_default_client(d.client())
    try:
        yield d
    finally:
        kiln.set_default_client(None)
        d.stop()


@pytest.fixture(scope="session")
def suite_id() -> str:
    """Distinguishes this session's names and labels."""
    return secrets.token_hex(3)


@pytest.fixture(scope="session")
def sandbox(daemon: Daemon, suite_id: str) -> Iterator[kiln.Sandbox]:
    """The one cold-booted sandbox most tests share (tiny image, 256 MiB)."""
    with kiln.Sandbox.create(
        template="tiny",
        name=f"py-{suite_id}",
        memory_mib=256,
        cpus=1,
        disk_size_gib=1,
        env={"GREETING": "hello"},
        metadata={"suite": suite_id, "role": "main"},
        ports=[(free_port(), 8080)],
    ) as sb:
        yield sb


@pytest.fixture
def name(suite_id: str, request: pytest.FixtureRequest) -> str:
    """A unique, valid name for whatever a test creates."""
    base = request.node.name.removeprefix("test_").replace("_", "-").lower()[:30]
    return f"{base}-{suite_id}-{secrets.token_hex(2)}"
