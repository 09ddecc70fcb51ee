#!/usr/bin/env python3
"""kiln benchmarks: run against real VMs, print a table, save JSON.

Usage: bench/bench.py [--runs N] [--out bench/results/NAME.json] [--only cold_boot,exec,...]
"""
import argparse
import concurrent.futures
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kilnapi import Daemon  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def ms(seconds):
    return round(seconds * 1000.0, 2)


def summary(samples):
    s = sorted(samples)
    return {
        "median_ms": ms(statistics.median(s)),
        "min_ms": ms(s[0]),
        "max_ms": ms(s[-1]),
        "p90_ms": ms(s[min(len(s) - 1, int(len(s) * 0.9))]),
        "runs": len(s),
    }


def bench_cold_boot(d, runs):
    """Create (cold boot) to the first exec answering, one at a time."""
    samples = []
    for i in range(runs):
        t0 = time.perf_counter()
        sb = d.api.create(template="tiny", memory_mib=256, cpus=1, name=f"cold-{i}")
        d.api.exec(sb["id"], ["true"])
        samples.append(time.perf_counter() - t0)
        d.api.delete(sb["id"])
    return summary(samples)


def bench_exec(d, runs):
    """Round trip of `true` through the API and the guest agent, on a warm sandbox."""
    sb = d.api.create(template="tiny", memory_mib=256, cpus=1, name="exec-rt")
    for _ in range(5):
        d.api.exec(sb["id"], ["true"])
    samples = []
    for _ in range(runs * 10):
        t0 = time.perf_counter()
        r = d.api.exec(sb["id"], ["true"])
        samples.append(time.perf_counter() - t0)
        assert r["exit_code"] == 0
    d.api.delete(sb["id"])
    return summary(samples)


def bench_parallel_create(d, runs, n=5):
    """Wall time for n sandboxes created in parallel until each answers an exec."""
    samples = []
    for r in range(max(1, runs // 2)):
        def one(i):
            from kilnapi import Api
            api = Api(d.socket)
            sb = api.create(template="tiny", memory_mib=256, cpus=1, name=f"par-{r}-{i}")
            api.exec(sb["id"], ["true"])
            return sb["id"]
        t0 = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(n) as pool:
            ids = list(pool.map(one, range(n)))
        samples.append(time.perf_counter() - t0)
        for sb in ids:
            d.api.delete(sb)
    return summary(samples)


BENCHES = {
    "cold_boot_to_first_exec": (bench_cold_boot, 2000.0),
    "exec_true_round_trip": (bench_exec, 10.0),
    "parallel_create_5_to_first_exec": (bench_parallel_create, None),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--out", default=None)
    ap.add_argument("--only", default=None)
    ap.add_argument("--kiln", default=os.path.join(ROOT, "target/release/kiln"))
    ap.add_argument("--images", default=os.path.join(os.environ.get("KILN_DATA_DIR", os.path.join(ROOT, ".kiln-data")), "images"))
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="kb", dir="/tmp")
    d = Daemon(args.kiln, args.images, work)
    results = {}
    try:
        for name, (fn, target) in BENCHES.items():
            if args.only and name not in args.only.split(","):
                continue
            print(f"running {name} ...", file=sys.stderr, flush=True)
            res = fn(d, args.runs)
            res["target_ms"] = target
            results[name] = res
    finally:
        d.stop()
        shutil.rmtree(work, ignore_errors=True)
    info = subprocess.run([args.kiln, "--version"], capture_output=True, text=True).stdout.strip()
    accel = "tcg" if not os.path.exists("/sys/module/kvm_intel") and not os.path.exists("/sys/module/kvm_amd") else "kvm?"
    doc = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "host": platform.node(), "cpus": os.cpu_count(), "kiln": info, "accel": accel,
        "results": results,
    }
    print()
    print(f"{'benchmark':<36} {'median':>10} {'min':>10} {'p90':>10} {'max':>10} {'target':>10} {'runs':>5}")
    for name, r in results.items():
        tgt = f"{r['target_ms']:.0f}" if r["target_ms"] else "-"
        print(f"{name:<36} {r['median_ms']:>10.1f} {r['min_ms']:>10.1f} {r['p90_ms']:>10.1f} {r['max_ms']:>10.1f} {tgt:>10} {r['runs']:>5}")
    print("(milliseconds)")
    out = args.out or os.path.join(ROOT, "bench/results", datetime.datetime.now().strftime("%Y%m%d-%H%M%S") + ".json")
    with open(out, "w") as f:
        json.dump(doc, f, indent=2)
    print(f"saved {out}")


if __name__ == "__main__":
    main()
