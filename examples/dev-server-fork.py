#!/usr/bin/env python3
"""A dev server, checkpointed and forked: each copy serves on its own host port.

A web server starts in the background in a `base` sandbox; its guest port is published on a host port
the daemon picks. The running machine is snapshotted (a checkpoint to come back to) and forked three
times: every fork continues the same server process, and gets its own host port for guest port 8000, so
the three servers answer side by side, each from its own machine.
"""

import secrets
import time
import urllib.request

import kiln

PORT = 8000


def get(address: str, path: str, timeout: float = 60.0) -> str:
    """GET http://ADDRESS/PATH, waiting (with a deadline) for the server to answer."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"http://{address}{path}", timeout=10) as resp:
                return resp.read().decode()
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def main() -> None:
    tag = secrets.token_hex(3)
    with kiln.Sandbox.create(template="base", name=f"dev-{tag}", memory_mib=256) as dev:
        dev.files.write("/srv/who.txt", "the original\n")
        server = dev.processes.start(f"exec python3 -m http.server {PORT} --directory /srv")
        address = dev.get_host(PORT)  # publishes guest port 8000 on a free host port
        print(f"dev server (pid {server.pid}) at http://{address}/ says: {get(address, '/who.txt').strip()}")

        snap = dev.snapshot(name=f"dev-ready-{tag}")
        print(f"checkpoint {snap.id}: the running server is in it")
        forks = dev.fork(count=3, name=f"dev-{tag}-fork")
        try:
            addresses = set()
            for f in forks:
                f.files.write("/srv/who.txt", f"fork {f.name}\n")
                running = [p for p in f.processes.list() if p.pid == server.pid and p.running]
                assert running, f"{f.name} should go on running the server process"
                addr = f.get_host(PORT)
                addresses.add(addr)
                says = get(addr, "/who.txt").strip()
                print(f"{f.name}: same server pid {server.pid}, at http://{addr}/ says: {says}")
            assert len(addresses | {address}) == 4, "every copy needs its own host port"
            print(
                f"{len(forks)} forks serving on their own host ports, the original still says: "
                f"{get(address, '/who.txt').strip()}"
            )
        finally:
            for f in forks:
                f.delete()
            kiln.Snapshot.delete(snap.id)


if __name__ == "__main__":
    main()
