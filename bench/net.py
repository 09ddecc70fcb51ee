#!/usr/bin/env python3
"""Guest networking, user mode vs bridged, in one run (root; docs/networking.md).

Both daemons run in a network namespace this script creates; a second one, behind a veth pair, holds a
TCP sink (counts bytes, times them from the first to the last) and an echo server on 198.51.100.1. No
packet leaves the two namespaces. Per mode, a `tiny` sandbox sends SIZE MiB to the sink (guest -> host
TCP throughput, timed by the sink) and makes REQS one-line request/answer connections to the echo server
(request latency, timed in the guest from /proc/uptime). Medians of --runs; JSON saved, table printed.

Usage: sudo bench/net.py [--runs 3] [--size 32] [--reqs 20] [--images DIR] [--out bench/results/net.json]
"""
import argparse
import datetime
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kilnapi import Daemon  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SERVER = "198.51.100.1"

# Runs in the servers' namespace: a sink on 5001 (reads SIZE bytes, records how long they took) and an
# echo server on 5002 (answers each line).
SERVERS = r"""
import socket, sys, threading, time, json
size, out = int(sys.argv[1]), sys.argv[2]
def sink():
    l = socket.socket(); l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    l.bind((sys.argv[3], 5001)); l.listen(8)
    while True:
        c, _ = l.accept(); got = 0; first = None
        while got < size:
            b = c.recv(1 << 16)
            if not b: break
            if first is None: first = time.monotonic()
            got += len(b)
        end = time.monotonic(); c.close()
        with open(out, "a") as f:
            f.write(json.dumps({"bytes": got, "secs": end - (first or end)}) + "\n")
def echo():
    l = socket.socket(); l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    l.bind((sys.argv[3], 5002)); l.listen(64)
    while True:
        c, _ = l.accept()
        d = c.recv(64)
        c.sendall(d); c.close()
threading.Thread(target=sink, daemon=True).start()
echo()
"""


def sh(*args):
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL)


def namespaces(tag):
    d, s = f"kiln-bench{tag}d", f"kiln-bench{tag}s"
    for n in (d, s):
        subprocess.run(["ip", "netns", "del", n], stderr=subprocess.DEVNULL)
        sh("ip", "netns", "add", n)
    sh("ip", "-n", d, "link", "add", "vd", "type", "veth", "peer", "name", "vs", "netns", s)
    for n, dev, addr in ((d, "vd", "192.0.2.2/24"), (s, "vs", "192.0.2.1/24")):
        sh("ip", "-n", n, "addr", "add", addr, "dev", dev)
        sh("ip", "-n", n, "link", "set", dev, "up")
        sh("ip", "-n", n, "link", "set", "lo", "up")
    sh("ip", "-n", d, "route", "add", "default", "via", "192.0.2.1")
    sh("ip", "-n", s, "addr", "add", f"{SERVER}/32", "dev", "lo")
    return d, s


def guest(api, sb, script):
    r = api.call("POST", f"/v1/sandboxes/{sb}/exec", {"argv": ["sh", "-c", script]})
    return r.get("stdout", "")


def measure(api, sb, size_mib, reqs, sink_log):
    before = len(open(sink_log).read().splitlines()) if os.path.exists(sink_log) else 0
    guest(api, sb, f"dd if=/dev/zero bs=65536 count={size_mib * 16} 2>/dev/null | nc {SERVER} 5001 >/dev/null")
    deadline = time.time() + 30
    while True:
        lines = open(sink_log).read().splitlines() if os.path.exists(sink_log) else []
        if len(lines) > before or time.time() > deadline:
            break
        time.sleep(0.1)
    rec = json.loads(lines[-1])
    mbps = rec["bytes"] * 8 / 1e6 / rec["secs"] if rec["secs"] > 0 else 0.0
    out = guest(api, sb, f"s=$(cut -d' ' -f1 /proc/uptime); i=0; while [ $i -lt {reqs} ]; do "
                f"echo ping | nc {SERVER} 5002 >/dev/null; i=$((i+1)); done; "
                f"e=$(cut -d' ' -f1 /proc/uptime); echo $s $e")
    s, e = (float(x) for x in out.split())
    return {"mbit_s": round(mbps, 1), "request_ms": round((e - s) * 1000 / reqs, 1)}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--size", type=int, default=32, help="MiB sent per throughput run")
    p.add_argument("--reqs", type=int, default=20)
    p.add_argument("--images", default=os.environ.get("KILN_TEST_IMAGES", os.path.join(ROOT, ".kiln-data/images")))
    p.add_argument("--out", default=os.path.join(ROOT, "bench/results/net.json"))
    a = p.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/net.py needs root (network namespaces, TAP devices)")
    kiln = os.path.join(ROOT, "target/release/kiln")
    work = tempfile.mkdtemp(prefix="kiln-bench-net-", dir="/tmp")
    os.chmod(work, 0o711)  # VM uids traverse the data directory
    d, s = namespaces(str(os.getpid() % 10000))
    sink_log = os.path.join(work, "sink.jsonl")
    servers = subprocess.Popen(["ip", "netns", "exec", s, sys.executable, "-c", SERVERS,
                                str(a.size << 20), sink_log, SERVER])
    wrapper = os.path.join(work, "kiln-in-ns")
    with open(wrapper, "w") as f:
        f.write(f"#!/bin/sh\nexec ip netns exec {d} {kiln} \"$@\"\n")
    os.chmod(wrapper, 0o755)
    results = {}
    accel = "unknown"
    try:
        for mode in ("user", "bridged"):
            try:
                daemon = Daemon(wrapper, a.images, os.path.join(work, mode),
                                ["--network", mode, "--warm-spares", "0"])
            except RuntimeError:
                sys.stderr.write(open(os.path.join(work, mode, "daemon.log")).read()[-2000:])
                raise
            try:
                sb = daemon.api.create(template="tiny", memory_mib=256, cpus=1, name="net")
                accel = (sb or {}).get("accel", accel)
                runs = [measure(daemon.api, "net", a.size, a.reqs, sink_log) for _ in range(a.runs)]
            finally:
                daemon.stop()
            results[mode] = {
                "runs": runs,
                "median_mbit_s": statistics.median(r["mbit_s"] for r in runs),
                "median_request_ms": statistics.median(r["request_ms"] for r in runs),
            }
    finally:
        servers.terminate()
        servers.wait(timeout=10)
        for n in (d, s):
            subprocess.run(["ip", "netns", "del", n], stderr=subprocess.DEVNULL)
        shutil.rmtree(work, ignore_errors=True)
    doc = {
        "when": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "note": "guest -> host TCP throughput (sink in another namespace) and one-line request latency; "
                "vhost-net only where /dev/vhost-net exists",
        "accel": accel,
        "size_mib": a.size,
        "requests": a.reqs,
        "results": results,
    }
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(doc, f, indent=2)
    print(f"{'mode':<10}{'TCP Mbit/s':>12}{'request ms':>12}   (medians of {a.runs}, {accel})")
    for mode, r in results.items():
        print(f"{mode:<10}{r['median_mbit_s']:>12}{r['median_request_ms']:>12}")
    print(f"saved {a.out}")


if __name__ == "__main__":
    main()
