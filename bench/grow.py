#!/usr/bin/env python3
"""Cost of memory headroom: a plain `create --memory 256` on a daemon without default headroom
(`--memory-headroom 1`) and with it (the default, 2: a 512 MiB machine and a balloon). Create to first exec,
idle PSS, the RAM file's allocated size, resume to first exec with and without a memory/vCPU override.
Medians of N runs (warm spares off, so every resume is a cold one).

Usage: bench/grow.py [--runs 3] [--images DIR]
"""
import argparse
import os
import re
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kilnapi import Daemon  # noqa: E402
from bench import pss_bytes  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def med(xs):
    return round(statistics.median(xs), 1)


def ram_file_mib(work, sb_id):
    path = os.path.join(work, "ram", f"{sb_id}.ram")
    if not os.path.exists(path):
        path = os.path.join(work, "sandboxes", sb_id, "memory")
    return os.stat(path).st_blocks * 512 / 2**20


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--kiln", default=os.path.join(ROOT, "target/release/kiln"))
    ap.add_argument("--images", default=os.path.join(ROOT, ".kiln-data/images"))
    args = ap.parse_args()
    rows = {}
    for label, headroom in (("no headroom (--memory-headroom 1)", "1"), ("default headroom (2)", "2")):
        work = tempfile.mkdtemp(prefix="kg", dir="/tmp")
        d = Daemon(args.kiln, args.images, work,
                   extra=("--warm-spares", "0", "--max-vcpus", "2", "--memory-headroom", headroom))
        try:
            create, pss, ram, resume_same, resume_grow = [], [], [], [], []
            for i in range(args.runs):
                t0 = time.perf_counter()
                sb = d.api.create(template="tiny", memory_mib=256, cpus=1, name=f"g-{i}")
                d.api.exec(sb["id"], ["true"])
                create.append((time.perf_counter() - t0) * 1000)
                time.sleep(3)
                pss.append(pss_bytes(sb["pid"]) / 2**20)
                ram.append(ram_file_mib(work, sb["id"]))
                snap = d.api.call("POST", f"/v1/sandboxes/{sb['id']}/snapshots", {"name": f"g-s{i}"})
                for out, body in ((resume_same, {}), (resume_grow, {"memory_mib": 512, "cpus": 2})):
                    if out is resume_grow and not sb.get("max_memory_mib"):
                        continue
                    t0 = time.perf_counter()
                    c = d.api.call("POST", f"/v1/snapshots/{snap['id']}/resume", body)
                    d.api.exec(c["id"], ["true"])
                    out.append((time.perf_counter() - t0) * 1000)
                    d.api.delete(c["id"])
                d.api.delete(sb["id"])
            # Balloon settle times (the daemon logs them at debug level: run with KILN_LOG=debug).
            with open(os.path.join(work, "daemon.log"), errors="replace") as f:
                lines = [re.sub(r"\x1b\[[0-9;]*m", "", line) for line in f if "balloon settled" in line]
                settled = [int(m.group(1)) for m in (re.search(r" ms=(\d+)", x) for x in lines) if m]
            rows[label] = dict(create_to_first_exec_ms=med(create), idle_pss_mib=med(pss),
                               ram_file_allocated_mib=med(ram),
                               resume_to_first_exec_ms=med(resume_same),
                               resume_512mib_2cpu_to_first_exec_ms=med(resume_grow) if resume_grow else None,
                               balloon_settle_ms=settled)
        finally:
            d.stop()
            shutil.rmtree(work, ignore_errors=True)
    for k, v in rows.items():
        print(k, v)


if __name__ == "__main__":
    main()
