#!/usr/bin/env python3
"""Keep only a sandbox's disk, and later boot it fresh with more memory and a bigger disk.

A `disk` snapshot is small (no RAM) and restoring it is a cold boot, so unlike memory snapshots its
resources may change.
"""

import kiln


def main() -> None:
    with kiln.Sandbox.create(template="tiny", memory_mib=256) as sb:
        sb.run("mkdir -p /data && seq 1 100000 > /data/numbers && echo 'in RAM only' > /tmp/scratch")
        snap = sb.snapshot(name=f"disk-{sb.id}", type="disk")
        print(f"disk snapshot {snap.id}: {snap.size_bytes >> 20} MiB, parent {snap.parent}")
    # The source sandbox is deleted; the snapshot stands alone.
    try:
        with snap.restore(memory_mib=512, disk_size_gib=2) as big:
            print(f"cold-booted {big.name} with {big.memory_mib} MiB and {big.disk_size_bytes >> 30} GiB disk")
            print("lines in /data/numbers:", big.run("wc -l < /data/numbers").stdout.strip())
            print("uptime (fresh boot):", big.run("cut -d' ' -f1 /proc/uptime").stdout.strip(), "s")
            print("RAM-only /tmp/scratch survived:", big.files.exists("/tmp/scratch"))
    finally:
        snap.delete()


if __name__ == "__main__":
    main()
