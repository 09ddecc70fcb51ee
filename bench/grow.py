#!/usr/bin/env python3
"""Cost of memory headroom (--max-memory): create to first exec, idle PSS, resume to first exec with and
without a memory/vCPU override. Medians of N runs (warm spares off, so every resume is a cold one).

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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--kiln", default=os.path.join(ROOT, "target/release/kiln"))
    ap.add_argument("--images", default=os.path.join(ROOT, ".kiln-data/images"))
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="kg", dir="/tmp")
    d = Daemon(args.kiln, args.images, work, extra=("--warm-spares", "0", "--max-vcpus", "2"))
    rows = {}
    try:
        for label, extra in (("plain", {}), ("headroom", {"max_memory_mib": 512})):
            create, pss, resume_same, resume_grow = [], [], [], []
            for i in range(args.runs):
                t0 = time.perf_counter()
                sb = d.api.create(template="tiny", memory_mib=256, cpus=1, name=f"{label}-{i}", **extra)
                d.api.exec(sb["id"], ["true"])
                create.append((time.perf_counter() - t0) * 1000)
                time.sleep(3)
                pss.append(pss_bytes(sb["pid"]) / 2**20)
                snap = d.api.call("POST", f"/v1/sandboxes/{sb['id']}/snapshots", {"name": f"{label}-s{i}"})
                for out, body in ((resume_same, {}), (resume_grow, {"memory_mib": 512, "cpus": 2})):
                    if out is resume_grow and label == "plain":
                        continue
                    t0 = time.perf_counter()
                    c = d.api.call("POST", f"/v1/snapshots/{snap['id']}/resume", body)
                    d.api.exec(c["id"], ["true"])
                    out.append((time.perf_counter() - t0) * 1000)
                    d.api.delete(c["id"])
                d.api.delete(sb["id"])
            rows[label] = dict(create_to_first_exec_ms=med(create), idle_pss_mib=med(pss),
                               resume_to_first_exec_ms=med(resume_same),
                               resume_512mib_2cpu_to_first_exec_ms=med(resume_grow) if resume_grow else None)
        # Balloon inflate at create (the daemon logs it at debug level: run with KILN_LOG=debug).
        with open(os.path.join(work, "daemon.log"), errors="replace") as f:
            lines = [re.sub(r"\x1b\[[0-9;]*m", "", line) for line in f if "balloon settled" in line]
            settled = [int(m.group(1)) for m in (re.search(r" ms=(\d+)", x) for x in lines) if m]
        print("balloon settle ms (create, then resumes):", settled)
    finally:
        d.stop()
        shutil.rmtree(work, ignore_errors=True)
    for k, v in rows.items():
        print(k, v)


if __name__ == "__main__":
    main()
