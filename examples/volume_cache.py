#!/usr/bin/env python3
"""Keep a cache on a volume: computed in one sandbox, reused by the next, and re-attached to snapshot copies.

A volume is a durable disk that lives outside any sandbox. Snapshots do not capture it: a sandbox resumed
from a snapshot starts without the volume its source had (the cache looks empty there) unless the volume
is given again in `volumes=`.
"""

import time
import uuid

import kiln

CACHE = "/cache"
RESULT = f"{CACHE}/checksums.txt"
# Stands in for a slow step worth caching (a dependency download, a build, a dataset preparation).
EXPENSIVE = "sleep 1; seq 1 200000 | md5sum | cut -d' ' -f1"


def cached(sb: kiln.Sandbox) -> tuple[str, bool]:
    """The result of EXPENSIVE, from the cache when it is there; also says whether it was."""
    if sb.files.exists(RESULT):
        return sb.files.read(RESULT), True
    result = sb.run(EXPENSIVE)
    assert result.ok, result.stderr
    sb.files.write(RESULT, result.stdout)
    # Deleting a sandbox stops its VM at once: flush what it wrote to the volume first.
    sb.run("sync")
    return result.stdout, False


def timed(sb: kiln.Sandbox) -> tuple[str, bool]:
    t = time.monotonic()
    out, hit = cached(sb)
    print(f"  {sb.name}: {'cache hit' if hit else 'cache miss, computed'} in {time.monotonic() - t:.2f} s")
    return out, hit


def main() -> None:
    tag = uuid.uuid4().hex[:6]
    vol = kiln.Volume.create(f"cache-{tag}", size_mib=64, labels={"example": "volume_cache"})
    print(f"volume {vol.name}: {vol.size_mib} MiB")
    snap = None
    try:
        # 1. The first sandbox fills the cache, then goes away; the volume keeps the data.
        with kiln.Sandbox.create(name=f"first-{tag}", memory_mib=256, volumes=[f"{vol.name}:{CACHE}"]) as sb:
            first, hit = timed(sb)
            assert not hit
        print(f"after deleting the first sandbox, attachments: {vol.refresh().attachments}")

        # 2. A new sandbox with the same volume finds it filled.
        second = kiln.Sandbox.create(name=f"second-{tag}", memory_mib=256, volumes=[(vol, CACHE)])
        with second:
            again, hit = timed(second)
            assert hit and again == first
            print(f"second sandbox mounts {second.volumes[0]}")

            # 3. Snapshot it and resume a copy: the copy does not get the volume.
            snap = second.snapshot(name=f"with-cache-{tag}")
            with snap.restore(name=f"plain-{tag}") as plain:
                print(f"resumed copy volumes: {plain.volumes}; {RESULT} there: {plain.files.exists(RESULT)}")
                assert plain.volumes == [] and not plain.files.exists(RESULT)

            # Read-write, the volume belongs to one sandbox at a time.
            try:
                snap.restore(name=f"rw-{tag}", volumes=[f"{vol.name}:{CACHE}"]).delete()
                raise AssertionError("a read-write volume should not attach to two sandboxes")
            except kiln.VolumeInUseError as e:
                print(f"re-attaching it while {second.name} holds it -> {type(e).__name__} [{e.code}]")

        # 4. Once the second sandbox is gone, a copy resumed with the volume given again sees the cache.
        with snap.restore(name=f"again-{tag}", volumes=[{"volume": vol.name, "path": CACHE, "read_only": True}]) as cp:
            out, hit = timed(cp)
            assert hit and out == first
            print("resumed copy with the volume re-attached: cache hit")
    finally:
        if snap is not None:
            snap.delete()
        kiln.Volume.delete(vol.name)


if __name__ == "__main__":
    main()
