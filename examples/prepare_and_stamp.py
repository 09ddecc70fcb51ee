#!/usr/bin/env python3
"""Prepare an environment once, snapshot it, and stamp out ready-to-use copies in well under a second each.

The copies resume from the snapshot's memory, so whatever the preparation left running or cached is there
at once: no boot, no setup.
"""

import time

import kiln

WORKER = """#!/bin/sh
# A "tool" whose set-up is the expensive part; the copies only run it.
echo "job $1 on $(hostname): $(cat /opt/tool/dataset | wc -l) records"
"""


def main() -> None:
    started = time.monotonic()
    with kiln.Sandbox.create(template="tiny", memory_mib=256) as builder:
        builder.run("mkdir -p /opt/tool && seq 1 50000 > /opt/tool/dataset")
        builder.files.write("/opt/tool/run.sh", WORKER, mode=0o755)
        golden = builder.snapshot(name=f"prepared-{builder.id}", metadata={"purpose": "worker"})
    # The builder is gone; the snapshot is durable and self-contained.
    print(f"prepared {golden.id} in {time.monotonic() - started:.1f} s")

    copies: list[kiln.Sandbox] = []
    try:
        for i in range(3):
            t = time.monotonic()
            copies.append(golden.restore(name=f"worker-{i}-{golden.sandbox_id}", metadata={"pool": golden.id}))
            print(f"copy {i} ready in {time.monotonic() - t:.2f} s")
        for i, copy in enumerate(copies):
            print(copy.run(["/opt/tool/run.sh", str(i)]).stdout.strip())
        print(f"{len(kiln.Sandbox.list(metadata={'pool': golden.id}))} copies in the pool")
    finally:
        for copy in copies:
            copy.delete()
        golden.delete()


if __name__ == "__main__":
    main()
