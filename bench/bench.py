#!/usr/bin/env python3
"""kiln benchmarks: run against real VMs, print a table, save JSON.

Usage: bench/bench.py [--runs N] [--out bench/results/NAME.json] [--memory MIB] [--delta-baselines stream,nodelta] [--only cold_boot,exec,...,dirs,idle,oci,bundle,delta,create,remote]
`--only disk,balloon,channel` compares QEMU device variants (bench/variants.py), each under a daemon of its own.
`--only idle` creates KILN_BENCH_IDLE_N sandboxes (default 5) of one template at once (create -> first exec
each, and the wall time) and measures idle host CPU and PSS of them over
KILN_BENCH_IDLE_SECS (default 60).
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
import variants  # noqa: E402

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


def own_bytes(path):
    """Bytes a snapshot wrote itself: files with a single link (hard links share existing data)."""
    total = 0
    for name in os.listdir(path):
        st = os.stat(os.path.join(path, name))
        if st.st_nlink == 1:
            total += st.st_blocks * 512
    return total


def start_counter(d, sb):
    d.api.call("POST", f"/v1/sandboxes/{sb}/exec", {"cmd": "(i=0; while true; do i=$((i+1)); echo $i > /tmp/n.new; mv /tmp/n.new /tmp/n; sleep 0.1; done) >/dev/null 2>&1 &"})


def wait_warm(d, snapshot, timeout=60.0):
    """Waits until the daemon holds a warm spare of the snapshot."""
    deadline = time.monotonic() + timeout
    while d.api.call("GET", f"/v1/snapshots/{snapshot}").get("warm_spares", 0) < 1:
        if time.monotonic() > deadline:
            raise RuntimeError(f"snapshot {snapshot} got no warm spare in {timeout} s")
        time.sleep(0.05)


def bench_snapshots(d, runs):
    """Snapshot create/resume/hibernate on a 256 MiB tiny sandbox, plus QEMU's own savevm/loadvm."""
    out = {}
    sb = d.api.create(template="tiny", memory_mib=256, cpus=1, name="snapsrc")
    start_counter(d, sb["id"])
    time.sleep(1)
    create, resume, sizes = [], [], []
    for i in range(runs):
        t0 = time.perf_counter()
        snap = d.api.call("POST", f"/v1/sandboxes/{sb['id']}/snapshots", {"name": f"full-{i}"})
        create.append(time.perf_counter() - t0)
        sizes.append(own_bytes(os.path.join(d.dir, "snapshots", snap["id"])))
    # Cold: the first resume of each snapshot starts a VM. Each leaves a warm spare behind; wait for it
    # so that its warming does not compete with the next measurement.
    for i in range(runs):
        t0 = time.perf_counter()
        child = d.api.call("POST", f"/v1/snapshots/full-{i}/resume", {"name": f"res-{i}"})
        d.api.exec(child["id"], ["true"])
        resume.append(time.perf_counter() - t0)
        d.api.delete(child["id"])
        wait_warm(d, f"full-{i}")
    # Warm: later resumes of a snapshot continue its spare (kiln serve --warm-spares, default 2).
    warm = []
    # full-0's spare was evicted by the later snapshots' (the pool keeps 2): one untimed resume makes one.
    prime = d.api.call("POST", "/v1/snapshots/full-0/resume", {"name": "warm-prime"})
    d.api.delete(prime["id"])
    for i in range(runs):
        wait_warm(d, "full-0")
        t0 = time.perf_counter()
        child = d.api.call("POST", "/v1/snapshots/full-0/resume", {"name": f"warm-{i}"})
        d.api.exec(child["id"], ["true"])
        warm.append(time.perf_counter() - t0)
        d.api.delete(child["id"])
    out["full_snapshot_create"] = dict(summary(create), target_ms=300.0, bytes_written_median=int(statistics.median(sizes)))
    out["resume_from_snapshot_to_first_exec"] = dict(summary(resume), target_ms=100.0)
    out["resume_warm_spare_to_first_exec"] = dict(summary(warm), target_ms=100.0)
    # Diff snapshots of a sandbox that changed little since it was resumed from a snapshot.
    child = d.api.call("POST", "/v1/snapshots/full-0/resume", {"name": "diffsrc"})
    diff_t, diff_b = [], []
    for i in range(runs):
        d.api.exec(child["id"], ["sh", "-c", f"echo {i} > /root/small"])
        t0 = time.perf_counter()
        snap = d.api.call("POST", f"/v1/sandboxes/{child['id']}/snapshots", {"name": f"diff-{i}", "type": "diff"})
        diff_t.append(time.perf_counter() - t0)
        diff_b.append(own_bytes(os.path.join(d.dir, "snapshots", snap["id"])))
    ram = 256 << 20
    out["diff_snapshot_create"] = dict(summary(diff_t), target_ms=None,
                                       bytes_written_median=int(statistics.median(diff_b)),
                                       percent_of_ram=round(100.0 * statistics.median(diff_b) / ram, 1),
                                       target_percent_of_ram=10.0)
    d.api.delete(child["id"])
    # Hibernate: stop, then start to first exec.
    stop_t, start_t = [], []
    for _ in range(runs):
        t0 = time.perf_counter()
        d.api.call("POST", f"/v1/sandboxes/{sb['id']}/stop")
        stop_t.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        d.api.call("POST", f"/v1/sandboxes/{sb['id']}/start")
        d.api.exec(sb["id"], ["true"])
        start_t.append(time.perf_counter() - t0)
    out["hibernate_stop"] = dict(summary(stop_t), target_ms=300.0)
    out["hibernate_start_to_first_exec"] = dict(summary(start_t), target_ms=150.0)
    d.api.delete(sb["id"])
    for i in range(runs):
        for name in (f"diff-{i}",):
            d.api.call("DELETE", f"/v1/snapshots/{name}")
    for i in range(runs):
        d.api.call("DELETE", f"/v1/snapshots/full-{i}")
    out.update(bench_qemu_savevm(d, runs))
    return out


def bench_qemu_savevm(d, runs):
    """QEMU's internal snapshots (snapshot-save / snapshot-load into the qcow2 disk) on the same VM shape."""
    from qmpclient import Qmp
    sb = d.api.create(template="tiny", memory_mib=256, cpus=1, name="savevm")
    start_counter(d, sb["id"])
    time.sleep(1)
    qmp = Qmp(os.path.join(d.dir, "sandboxes", sb["id"], "vm", "qmp.sock"))
    node = qmp.active_node()
    save_t, load_t = [], []
    for i in range(runs):
        t0 = time.perf_counter()
        qmp.job("snapshot-save", tag=f"s{i}", vmstate=node, devices=[node])
        save_t.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        qmp.job("snapshot-load", tag=f"s{i}", vmstate=node, devices=[node])
        qmp.cmd("cont")
        d.api.exec(sb["id"], ["true"])
        load_t.append(time.perf_counter() - t0)
    qmp.close()
    d.api.delete(sb["id"])
    return {
        "qemu_snapshot_save_qcow2": dict(summary(save_t), target_ms=None),
        "qemu_snapshot_load_qcow2_to_first_exec": dict(summary(load_t), target_ms=None),
    }


def pss_bytes(pid):
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    return 0


def bench_fork(d, runs):
    """Fork a running 256 MiB sandbox: one child to first exec, and fan-outs of N children all answering."""
    out = {}
    src = d.api.create(template="tiny", memory_mib=256, cpus=1, name="forksrc")
    start_counter(d, src["id"])
    time.sleep(1)
    one = []
    for i in range(runs):
        t0 = time.perf_counter()
        kids = d.api.call("POST", f"/v1/sandboxes/{src['id']}/fork", {"count": 1, "name": f"one{i}"})["sandboxes"]
        d.api.exec(kids[0]["id"], ["true"])
        one.append(time.perf_counter() - t0)
        d.api.delete(kids[0]["id"])
    out["fork_1_child_to_first_exec"] = dict(summary(one), target_ms=150.0)
    for n in (1, 2, 5, 10):
        t0 = time.perf_counter()
        kids = d.api.call("POST", f"/v1/sandboxes/{src['id']}/fork", {"count": n, "name": f"fan{n}"})["sandboxes"]
        with concurrent.futures.ThreadPoolExecutor(n) as pool:
            from kilnapi import Api
            list(pool.map(lambda k: Api(d.socket).exec(k["id"], ["true"]), kids))
        elapsed = time.perf_counter() - t0
        time.sleep(2)
        pss = [pss_bytes(k["pid"]) for k in kids]
        out[f"fork_{n}_children_all_answering"] = dict(summary([elapsed]), target_ms=1500.0 if n == 10 else None,
                                                       child_pss_median_mib=round(statistics.median(pss) / 2**20, 1),
                                                       child_pss_percent_of_ram=round(100 * statistics.median(pss) / (256 << 20), 1))
        for k in kids:
            d.api.delete(k["id"])
    out["fork_1_child_to_first_exec"]["source_pss_mib"] = round(pss_bytes(d.api.call("GET", f"/v1/sandboxes/{src['id']}")["pid"]) / 2**20, 1)
    d.api.delete(src["id"])
    return out

def thread_ticks(pid):
    """{tid: (utime+stime clock ticks, context switches)} of one process's threads."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                st = f.read()
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                status = f.read()
        except (FileNotFoundError, ProcessLookupError):
            continue
        fields = st[st.rindex(")") + 2:].split()
        switches = sum(int(line.split()[1]) for line in status.splitlines()
                       if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")))
        out[tid] = (int(fields[11]) + int(fields[12]), switches)
    return out


def bench_idle(d, runs, n=None, window=None):
    """Host CPU and PSS of N idle sandboxes (KILN_BENCH_IDLE_N, default 5): utime+stime of every QEMU
    thread over a window (KILN_BENCH_IDLE_SECS, default 60 s) after they settle, and the daemon's own."""
    n = n or int(os.environ.get("KILN_BENCH_IDLE_N", "5"))
    window = window or float(os.environ.get("KILN_BENCH_IDLE_SECS", "60"))
    hz = os.sysconf("SC_CLK_TCK")
    # All N created at once from the one template (each resumes its template snapshot), each timed until it
    # answers a first exec.
    try:
        wait_template_ready(d)
    except RuntimeError as e:  # template snapshots off: they boot, and the bench says so in `modes`
        print(e, file=sys.stderr, flush=True)

    def one(i):
        from kilnapi import Api
        return create_to_exec(Api(d.socket), name=f"idle-{i}")
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        made = list(pool.map(one, range(n)))
    wall = time.perf_counter() - t0
    sbs = [sb for _, sb in made]
    created = {**summary([took for took, _ in made]), "wall_ms": ms(wall),
               "modes": sorted({(sb.get("boot") or {}).get("mode", "?") for sb in sbs}),
               "snapshots": sorted({(sb.get("boot") or {}).get("snapshot") or "-" for sb in sbs})}
    print(json.dumps({f"create_{n}_parallel_to_first_exec": created}), file=sys.stderr, flush=True)
    time.sleep(10)  # let boot-time work (module loading, first writeback) finish
    pids = [d.api.call("GET", f"/v1/sandboxes/{sb['id']}")["pid"] for sb in sbs]
    before = {pid: thread_ticks(pid) for pid in pids}
    daemon_before = thread_ticks(d.proc.pid)
    t0 = time.monotonic()
    time.sleep(window)
    elapsed = time.monotonic() - t0
    after = {pid: thread_ticks(pid) for pid in pids}
    daemon_after = thread_ticks(d.proc.pid)

    def pct(ticks):
        return 100.0 * ticks / hz / elapsed

    per_vm, main_thread, others, wakes_main = [], [], [], []
    for pid in pids:
        total = 0
        for tid, (ticks, switches) in after[pid].items():
            if tid not in before[pid]:
                continue
            dt = ticks - before[pid][tid][0]
            total += dt
            if tid == str(pid):
                main_thread.append(pct(dt))
                wakes_main.append((switches - before[pid][tid][1]) / elapsed)
        per_vm.append(pct(total))
        others.append(per_vm[-1] - main_thread[-1])
    daemon = sum(t - daemon_before[tid][0] for tid, (t, _) in daemon_after.items() if tid in daemon_before)
    pss = [pss_bytes(pid) for pid in pids]
    for sb in sbs:
        d.api.delete(sb["id"])
    return {
        f"create_{n}_parallel_to_first_exec": created,
        f"idle_{n}_sandboxes": {
            "sandboxes": n, "window_s": round(elapsed, 1),
            "cpu_percent_of_a_core_per_sandbox_median": round(statistics.median(per_vm), 3),
            "cpu_percent_of_a_core_all_sandboxes": round(sum(per_vm), 3),
            "qemu_main_thread_percent_median": round(statistics.median(main_thread), 3),
            "qemu_main_thread_wakeups_per_s_median": round(statistics.median(wakes_main), 1),
            # vCPU, I/O and RCU threads (QEMU names them all alike).
            "other_threads_percent_median": round(statistics.median(others), 3),
            "daemon_cpu_percent": round(pct(daemon), 3),
            "pss_mib_per_sandbox_median": round(statistics.median(pss) / 2**20, 1),
            "pss_mib_all_sandboxes": round(sum(pss) / 2**20, 1),
        }
    }


def bench_process_first_output(d, runs):
    """A background process: from the start request to the first byte of its output, read by a client
    that attaches to its log stream (follow) right after the start answered."""
    from kilnapi import UnixHTTPConnection

    sb = d.api.create(template="tiny", memory_mib=256, cpus=1, name="proc-first-out")
    samples = []
    for _ in range(runs * 4):
        t0 = time.perf_counter()
        proc = d.api.call("POST", f"/v1/sandboxes/{sb['id']}/processes", {"cmd": "echo ready; sleep 30"})
        conn = UnixHTTPConnection(d.socket)
        conn.request("GET", f"/v1/sandboxes/{sb['id']}/processes/{proc['pid']}/logs?follow=true")
        resp = conn.getresponse()
        assert resp.status == 200, resp.status
        while True:
            line = resp.readline()
            assert line, "the log stream ended before any output"
            if json.loads(line).get("type") == "stdout":
                break
        samples.append(time.perf_counter() - t0)
        conn.close()
        d.api.call("POST", f"/v1/sandboxes/{sb['id']}/processes/{proc['pid']}/signal", {"signal": "KILL"})
    d.api.delete(sb["id"])
    return summary(samples)


def bench_wake_on_exec(d, runs):
    """Exec against a hibernated sandbox (auto_resume) until its output arrives: the wake included."""
    sb = d.api.create(template="tiny", memory_mib=256, cpus=1, name="wake", auto_resume=True)
    d.api.exec(sb["id"], ["true"])
    samples = []
    for _ in range(runs):
        d.api.call("POST", f"/v1/sandboxes/{sb['id']}/stop")
        t0 = time.perf_counter()
        r = d.api.exec(sb["id"], ["echo", "awake"])
        samples.append(time.perf_counter() - t0)
        assert r["stdout"] == "awake\n", r
    d.api.delete(sb["id"])
    return summary(samples)
def bench_dirs(d, runs, files=500, size=16 << 10):
    """A tree of `files` files (`size` bytes each, in 10 directories) into a sandbox: one tar upload
    (PUT .../files/dir) against one PUT .../files per file. MiB/s counts file content."""
    import io
    import tarfile
    import urllib.parse

    src = tempfile.mkdtemp(prefix="kbtree", dir="/tmp")
    payload = os.urandom(size)
    for i in range(files):
        sub = os.path.join(src, f"d{i % 10}")
        os.makedirs(sub, exist_ok=True)
        with open(os.path.join(sub, f"f{i:04}"), "wb") as f:
            f.write(payload[i % 64:] + payload[:i % 64])
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name in sorted(os.listdir(src)):
            tar.add(os.path.join(src, name), arcname=name)
    tar_bytes = buf.getvalue()
    total = files * size
    sb = d.api.create(template="tiny", memory_mib=256, cpus=1, name="dirs")
    q = urllib.parse.quote
    tar_s, single_s = [], []
    for r in range(max(1, runs // 2)):
        t0 = time.perf_counter()
        d.api.put_bytes(f"/v1/sandboxes/{sb['id']}/files/dir?path={q(f'/root/tar{r}')}", tar_bytes, "application/x-tar")
        tar_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        for i in range(files):
            rel = f"d{i % 10}/f{i:04}"
            with open(os.path.join(src, rel), "rb") as f:
                data = f.read()
            d.api.put_bytes(f"/v1/sandboxes/{sb['id']}/files?path={q(f'/root/one{r}/{rel}')}", data)
        single_s.append(time.perf_counter() - t0)
    d.api.delete(sb["id"])
    shutil.rmtree(src, ignore_errors=True)
    mib = total / 2**20
    out = {}
    for name, samples in (("dir_upload_tar", tar_s), ("dir_upload_one_file_each", single_s)):
        out[f"{name}_{files}x{size // 1024}k"] = dict(summary(samples), mib_per_s=round(mib / statistics.median(samples), 2))
    return out


def bench_oci(d, runs):
    """Issue 18: `kiln image pull` of a ~100 MB image (the base rootfs as one gzip layer plus a small one)
    from a registry on loopback, then the first boot of a sandbox from it to its first exec; and a second
    image sharing the big layer, whose pull transfers only its small layer."""
    import gzip
    import hashlib
    import socket

    work = tempfile.mkdtemp(prefix="kboci", dir="/tmp")
    images = os.path.join(d.dir, "images")
    shared = os.path.realpath(images)
    if os.path.islink(images):
        os.remove(images)
        os.makedirs(images)
        for name in ("tiny", "base"):
            if os.path.isdir(os.path.join(shared, name)):
                os.symlink(os.path.join(shared, name), os.path.join(images, name))
    kernel = os.path.join(shared, "../cache/kernel")
    os.makedirs(os.path.join(d.dir, "cache"), exist_ok=True)
    if os.path.isdir(kernel) and not os.path.exists(os.path.join(d.dir, "cache/kernel")):
        subprocess.run(["cp", "-al", kernel, os.path.join(d.dir, "cache/kernel")], check=True)
    base_tar = sorted(__import__("glob").glob(os.path.join(shared, "../cache/base/debootstrap-*.tar")))[-1]
    layout = os.path.join(work, "layout")
    blobs = os.path.join(layout, "blobs/sha256")
    os.makedirs(blobs)

    def put(data):
        h = hashlib.sha256(data).hexdigest()
        with open(os.path.join(blobs, h), "wb") as f:
            f.write(data)
        return "sha256:" + h, len(data)

    def small_layer(text):
        import io
        import tarfile
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            info = tarfile.TarInfo("etc/kiln-bench")
            payload = text.encode()
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
        raw = buf.getvalue()
        return raw, gzip.compress(raw)

    with open(base_tar, "rb") as f:
        raw = f.read()
    big = gzip.compress(raw, compresslevel=1)
    big_digest, big_size = put(big)
    big_diff = "sha256:" + hashlib.sha256(raw).hexdigest()
    manifests = []
    for tag in ("a", "b"):
        sraw, sgz = small_layer(f"image {tag}\n")
        sd, ss = put(sgz)
        config = json.dumps({"architecture": "amd64", "os": "linux",
                             "config": {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"], "WorkingDir": "/root"},
                             "rootfs": {"type": "layers", "diff_ids": [big_diff, "sha256:" + hashlib.sha256(sraw).hexdigest()]}}).encode()
        cd, cs = put(config)
        manifest = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                               "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": cs},
                               "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": big_digest, "size": big_size},
                                          {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": sd, "size": ss}]}).encode()
        md, ms_ = put(manifest)
        manifests.append({"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": md, "size": ms_,
                          "annotations": {"org.opencontainers.image.ref.name": tag}})
    with open(os.path.join(layout, "index.json"), "w") as f:
        json.dump({"schemaVersion": 2, "manifests": manifests}, f)
    with open(os.path.join(layout, "oci-layout"), "w") as f:
        json.dump({"imageLayoutVersion": "1.0.0"}, f)

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    with open(os.path.join(work, "registry.yml"), "w") as f:
        f.write(f"version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {work}/registry\nhttp:\n  addr: 127.0.0.1:{port}\n")
    reg = subprocess.Popen(["docker-registry", "serve", os.path.join(work, "registry.yml")],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    out = {}
    try:
        deadline = time.time() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.time() > deadline:
                    raise
                time.sleep(0.05)
        for tag in ("a", "b"):
            subprocess.run(["skopeo", "copy", "--quiet", "--dest-tls-verify=false", f"oci:{layout}:{tag}",
                            f"docker://127.0.0.1:{port}/bench/img:{tag}"], check=True)

        def pull(tag):
            t0 = time.perf_counter()
            p = subprocess.run([d.kiln, "--data-dir", d.dir, "--json", "image", "pull", "--insecure",
                                "--name", f"bench-{tag}", f"127.0.0.1:{port}/bench/img:{tag}"],
                               capture_output=True, text=True, check=True)
            return time.perf_counter() - t0, json.loads(p.stdout)

        t, first = pull("a")
        out["oci_pull_100mb_image"] = {"median_ms": ms(t), "min_ms": ms(t), "max_ms": ms(t), "p90_ms": ms(t), "runs": 1,
                                       "fetched_bytes": first["fetched_bytes"], "layer_uncompressed_bytes": len(raw),
                                       "fetch_ms": ms(first["fetch_seconds"]), "build_ms": ms(first["build_seconds"])}
        t0 = time.perf_counter()
        sb = d.api.create(template="bench-a", memory_mib=256, cpus=1, name="oci-first")
        d.api.exec(sb["id"], ["true"])
        boot = time.perf_counter() - t0
        out["oci_first_boot_to_first_exec"] = {"median_ms": ms(boot), "min_ms": ms(boot), "max_ms": ms(boot), "p90_ms": ms(boot), "runs": 1}
        total = t + boot
        out["oci_pull_plus_first_boot_to_first_exec"] = {"median_ms": ms(total), "min_ms": ms(total), "max_ms": ms(total), "p90_ms": ms(total), "runs": 1}
        d.api.delete(sb["id"])
        t, second = pull("b")
        out["oci_second_pull_sharing_layers"] = {"median_ms": ms(t), "min_ms": ms(t), "max_ms": ms(t), "p90_ms": ms(t), "runs": 1,
                                                 "fetched_bytes": second["fetched_bytes"], "cached_bytes": second["cached_bytes"],
                                                 "fetched_layers": second["fetched_layers"], "cached_layers": second["cached_layers"],
                                                 "fetch_ms": ms(second["fetch_seconds"]), "build_ms": ms(second["build_seconds"])}
    finally:
        reg.kill()
        reg.wait()
        shutil.rmtree(work, ignore_errors=True)
    return out
def allocated_bytes(path):
    """Bytes a snapshot's files take on disk (holes excluded, hard-linked files counted)."""
    return sum(os.stat(os.path.join(path, n)).st_blocks * 512 for n in os.listdir(path))


def bench_bundle(d, runs):
    """Export a full memory snapshot of a 256 MiB tiny sandbox to a bundle file and import it again (CLI,
    unix socket): MiB/s of the snapshot's bytes on disk, and the bundle's size against them."""
    sb = d.api.create(template="tiny", memory_mib=256, cpus=1, name="bundlesrc")
    start_counter(d, sb["id"])
    time.sleep(1)
    d.api.call("POST", f"/v1/sandboxes/{sb['id']}/snapshots", {"name": "bsnap"})
    d.api.delete(sb["id"])
    on_disk = allocated_bytes(os.path.join(d.dir, "snapshots", "bsnap"))
    cli = [d.kiln, "--socket", d.socket, "--data-dir", d.dir, "snapshot"]
    bundle = os.path.join(d.dir, "bsnap.kiln")
    export, imp, sizes = [], [], []
    for i in range(runs):
        t0 = time.perf_counter()
        subprocess.run([*cli, "export", "bsnap", "-o", bundle], check=True, capture_output=True)
        export.append(time.perf_counter() - t0)
        sizes.append(os.path.getsize(bundle))
        t0 = time.perf_counter()
        subprocess.run([*cli, "import", bundle, "--name", f"bimp-{i}"], check=True, capture_output=True)
        imp.append(time.perf_counter() - t0)
        d.api.call("DELETE", f"/v1/snapshots/bimp-{i}")
    os.remove(bundle)
    mib = on_disk / 2**20
    e, i_ = summary(export), summary(imp)
    e["mib_per_s"] = round(mib / (e["median_ms"] / 1000), 1)
    i_["mib_per_s"] = round(mib / (i_["median_ms"] / 1000), 1)
    return {
        "bundle_export": e,
        "bundle_import": i_,
        "bundle_size": {
            "snapshot_bytes_on_disk": on_disk,
            "bundle_bytes_median": int(statistics.median(sizes)),
            "bundle_percent_of_snapshot": round(100.0 * statistics.median(sizes) / on_disk, 1),
        },
    }


def smaps_rollup(pid):
    vals = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 2 and parts[1].isdigit():
                vals[parts[0].rstrip(":")] = int(parts[1]) * 1024
    return vals


def pause_ms_from_log(d, count_before):
    """The pause of the last capture, as the daemon logged it ("source paused for capture pause_ms=N")."""
    import re
    ansi = re.compile(r"\x1b\[[0-9;]*m")
    with open(os.path.join(d.dir, "daemon.log"), errors="replace") as f:
        found = [ansi.sub("", line) for line in f if "source paused for capture" in line]
    if len(found) <= count_before:
        return None, len(found)
    tail = found[-1].split("pause_ms=")[1]
    return int("".join(c for c in tail if c.isdigit()) or "0"), len(found)


DELTA_MEMORY_MIB = 256
DELTA_BASELINES = ["stream", "nodelta"]


def delta_one_path(d, runs, label):
    """Snapshots of a sandbox resumed from a snapshot that changed little, resumes of them, and the private
    memory of the copies and of fork children (first generation: of a booted sandbox; second: of a copy)."""
    ram = DELTA_MEMORY_MIB << 20
    src = d.api.create(template="tiny", memory_mib=DELTA_MEMORY_MIB, cpus=1, name=f"{label}src")
    start_counter(d, src["id"])
    time.sleep(1)
    d.api.call("POST", f"/v1/sandboxes/{src['id']}/snapshots", {"name": f"{label}base"})
    res = d.api.call("POST", f"/v1/snapshots/{label}base/resume", {"name": f"{label}res"})
    d.api.exec(res["id"], ["true"])
    time.sleep(3)
    seen = pause_ms_from_log(d, 10**9)[1]
    create, pauses, sizes, state_sizes, resume, pss, private = [], [], [], [], [], [], []
    for i in range(runs):
        d.api.exec(res["id"], ["sh", "-c", f"echo {i} > /root/small"])
        t0 = time.perf_counter()
        snap = d.api.call("POST", f"/v1/sandboxes/{res['id']}/snapshots", {"name": f"{label}d{i}", "type": "diff"})
        create.append(time.perf_counter() - t0)
        p, seen = pause_ms_from_log(d, seen)
        if p is not None:
            pauses.append(p)
        sdir = os.path.join(d.dir, "snapshots", snap["id"])
        sizes.append(own_bytes(sdir))
        state_sizes.append(os.stat(os.path.join(sdir, "state")).st_size)
    for i in range(runs):
        t0 = time.perf_counter()
        child = d.api.call("POST", f"/v1/snapshots/{label}d{i}/resume", {"name": f"{label}c{i}"})
        d.api.exec(child["id"], ["true"])
        resume.append(time.perf_counter() - t0)
        time.sleep(2)
        r = smaps_rollup(child["pid"])
        pss.append(r.get("Pss", 0))
        private.append(r.get("Private_Dirty", 0) + r.get("Private_Clean", 0))
        d.api.delete(child["id"])
        # Its warm spare would compete with the next measurement.
        for spare in range(50):
            if d.api.call("GET", f"/v1/snapshots/{label}d{i}").get("warm_spares", 0) >= 1:
                break
            time.sleep(0.1)
    gens = {}
    for gen, parent in (("first", src), ("second", res)):
        kids = d.api.call("POST", f"/v1/sandboxes/{parent['id']}/fork", {"count": 1, "name": f"{label}f{gen}"})["sandboxes"]
        d.api.exec(kids[0]["id"], ["true"])
        time.sleep(3)
        r = smaps_rollup(kids[0]["pid"])
        gens[gen] = dict(pss_mib=round(r.get("Pss", 0) / 2**20, 1),
                         private_mib=round((r.get("Private_Dirty", 0) + r.get("Private_Clean", 0)) / 2**20, 1))
        d.api.delete(kids[0]["id"])
    for sb in (res, src):
        d.api.delete(sb["id"])
    for i in range(runs):
        d.api.call("DELETE", f"/v1/snapshots/{label}d{i}")
    d.api.call("DELETE", f"/v1/snapshots/{label}base")
    med = statistics.median
    return {
        f"delta_{label}_snapshot_of_resumed_create": dict(summary(create), target_ms=None,
            bytes_written_median=int(med(sizes)), percent_of_ram=round(100.0 * med(sizes) / ram, 2),
            target_percent_of_ram=2.0, state_bytes_median=int(med(state_sizes)), memory_mib=DELTA_MEMORY_MIB),
        f"delta_{label}_capture_pause": dict(summary([p / 1000.0 for p in pauses]) if pauses else {}, target_ms=100.0),
        f"delta_{label}_resume_to_first_exec": dict(summary(resume), target_ms=None,
            copy_pss_median_mib=round(med(pss) / 2**20, 1), copy_private_median_mib=round(med(private) / 2**20, 1)),
        f"delta_{label}_fork_children_idle": dict(gens),
    }


def bench_delta(d, runs):
    """Issue 16: memory deltas with device-only states (this daemon) beside earlier paths, each a second
    daemon in the same run: "stream" (KILN_DEVICE_STATE=stream: deltas, state from the migration stream
    without the RAM's pages) and "before" (KILN_MEMORY_DELTA=0: the whole private RAM in the state)."""
    out = delta_one_path(d, runs, "after")
    for label, (key, value) in (("stream", ("KILN_DEVICE_STATE", "stream")), ("before", ("KILN_MEMORY_DELTA", "0"))):
        if (label if label == "stream" else "nodelta") not in DELTA_BASELINES:
            continue
        os.environ[key] = value
        work = tempfile.mkdtemp(prefix="kbd", dir="/tmp")
        try:
            other = Daemon(d.kiln, os.path.realpath(os.path.join(d.dir, "images")), work)
        finally:
            del os.environ[key]
        try:
            out.update(delta_one_path(other, runs, label))
        finally:
            try:
                other.stop()
            except subprocess.TimeoutExpired:
                other.proc.kill()
                other.proc.wait()
            shutil.rmtree(work, ignore_errors=True)
    return out

def wait_template_ready(d, timeout=240.0):
    """Waits for the daemon's log line saying the default template's snapshot is ready."""
    path = os.path.join(d.dir, "daemon.log")
    deadline = time.monotonic() + timeout
    while "template snapshot ready" not in open(path, errors="replace").read():
        if time.monotonic() > deadline:
            raise RuntimeError("no template snapshot ready; see " + path)
        time.sleep(0.05)


def create_to_exec(api, **kw):
    t0 = time.perf_counter()
    sb = api.create(template="tiny", memory_mib=256, cpus=1, **kw)
    api.exec(sb["id"], ["true"])
    return time.perf_counter() - t0, sb


def parallel_create(d, n, tag, **kw):
    """Wall time for n creates in parallel, each until it answers an exec; deletes them after."""
    def one(i):
        from kilnapi import Api
        return create_to_exec(Api(d.socket), name=f"{tag}-{i}", **kw)[1]
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        sbs = list(pool.map(one, range(n)))
    took = time.perf_counter() - t0
    modes = sorted({(sb.get("boot") or {}).get("mode", "?") for sb in sbs})
    for sb in sbs:
        d.api.delete(sb["id"])
    return took, modes


def idle_of(d, sbs, window):
    hz = os.sysconf("SC_CLK_TCK")
    time.sleep(10)
    pids = [d.api.call("GET", f"/v1/sandboxes/{sb['id']}")["pid"] for sb in sbs]
    before = {pid: thread_ticks(pid) for pid in pids}
    t0 = time.monotonic()
    time.sleep(window)
    elapsed = time.monotonic() - t0
    after = {pid: thread_ticks(pid) for pid in pids}
    cpu = [100.0 * sum(t - before[pid][tid][0] for tid, (t, _) in after[pid].items() if tid in before[pid]) / hz / elapsed for pid in pids]
    pss = [pss_bytes(pid) / 2**20 for pid in pids]
    return {"sandboxes": len(sbs), "window_s": round(elapsed, 1),
            "cpu_percent_of_a_core_per_sandbox_median": round(statistics.median(cpu), 3),
            "cpu_percent_of_a_core_all": round(sum(cpu), 2),
            "pss_mib_per_sandbox_median": round(statistics.median(pss), 1),
            "pss_mib_all": round(sum(pss), 1)}


def bench_create(d, runs):
    """Issue 15, create is a resume: create -> first exec from the template snapshot (first create of a
    daemon whose snapshot is prepared, later ones from warm spares), 5 and 20 in parallel, against the
    cold boot (`boot: true`) in the same run; idle PSS and CPU of 20 sandboxes made each way
    (KILN_BENCH_CREATE_IDLE_SECS, default 30)."""
    out = {}
    wait_template_ready(d)
    # First create of a daemon: the template snapshot is prepared (imported), no warm spare yet.
    first = []
    for r in range(max(1, runs // 2)):
        work = tempfile.mkdtemp(prefix="kbf", dir="/tmp")
        fresh = Daemon(d.kiln, os.path.join(d.dir, "images"), work)
        try:
            wait_template_ready(fresh)
            took, sb = create_to_exec(fresh.api, name=f"first-{r}")
            assert sb["boot"]["mode"] == "resume", sb
            first.append(took)
        finally:
            fresh.stop()
            shutil.rmtree(work, ignore_errors=True)
    out["create_first_of_template_to_first_exec"] = {**summary(first), "target_ms": 600.0}
    # Later creates: the daemon keeps a warm spare of the template snapshot.
    later, snap = [], None
    for i in range(runs):
        if snap:
            wait_warm(d, snap)
        took, sb = create_to_exec(d.api, name=f"later-{i}")
        snap = sb["boot"].get("snapshot")
        later.append(took)
        d.api.delete(sb["id"])
    out["create_later_warm_to_first_exec"] = {**summary(later), "target_ms": 100.0}
    cold = []
    for i in range(max(1, runs // 2)):
        took, sb = create_to_exec(d.api, name=f"cold-{i}", boot=True)
        assert sb["boot"]["mode"] == "cold", sb
        cold.append(took)
        d.api.delete(sb["id"])
    out["create_cold_boot_to_first_exec"] = summary(cold)
    print(json.dumps(out), file=sys.stderr, flush=True)
    # Under a loaded TCG host, 5 cold boots at once may exceed the 60 s boot timeout: recorded, not fatal.
    for n, target, cold_too in ((5, 2000.0, True), (20, None, False)):
        if snap:
            try:
                wait_warm(d, snap)
            except RuntimeError as e:  # a loaded host may fail to warm one: measured without it
                print(e, file=sys.stderr, flush=True)
        took, modes = parallel_create(d, n, f"p{n}")
        out[f"create_{n}_parallel_resume"] = {**summary([took]), "target_ms": target, "modes": modes}
        if cold_too:
            try:
                took, modes = parallel_create(d, n, f"c{n}", boot=True)
                out[f"create_{n}_parallel_cold_boot"] = {**summary([took]), "modes": modes}
            except RuntimeError as e:
                out[f"create_{n}_parallel_cold_boot"] = {"error": str(e)[:300]}
                for sb in d.api.call("GET", "/v1/sandboxes") or []:
                    d.api.delete(sb["id"])
        print(json.dumps(out), file=sys.stderr, flush=True)
    window = float(os.environ.get("KILN_BENCH_CREATE_IDLE_SECS", "30"))
    for label, n, kw in (("resume", 20, {}), ("cold_boot", 5, {"boot": True})):
        sbs = [create_to_exec(d.api, name=f"idle-{label}-{i}", **kw)[1] for i in range(n)]
        out[f"idle_{n}_sandboxes_{label}"] = idle_of(d, sbs, window)
        for sb in sbs:
            d.api.delete(sb["id"])
        print(json.dumps(out), file=sys.stderr, flush=True)
    return out


def bench_remote(d, runs):
    """Snapshots through an S3 remote (moto from target/moto-venv on 127.0.0.1; a file:// remote when it
    is missing): push and pull MiB/s, bytes uploaded by the first and the second snapshot of a lineage,
    and `resume REMOTE/SNAP` on a host with nothing cached (a fresh daemon) to first exec."""
    import socket as _socket
    venv_py = os.path.join(ROOT, "target/moto-venv/bin/python")
    work = tempfile.mkdtemp(prefix="kbr", dir="/tmp")
    # mkdtemp makes it 0700; the daemons refuse to run VMs unconfined where per-sandbox uids cannot reach.
    os.chmod(work, 0o711)
    moto = None
    if os.path.exists(venv_py):
        s = _socket.socket()
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        moto = subprocess.Popen([venv_py, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_REGION="us-east-1")
        deadline = time.time() + 60
        while True:
            r = subprocess.run([venv_py, "-c", "import boto3,sys; boto3.client('s3', endpoint_url=sys.argv[1]).create_bucket(Bucket='kiln-bench')",
                                f"http://127.0.0.1:{port}"], capture_output=True)
            if r.returncode == 0:
                break
            if time.time() > deadline:
                raise RuntimeError("moto did not start")
            time.sleep(0.5)
        remote = {"name": "r", "url": "s3://kiln-bench/b", "endpoint": f"http://127.0.0.1:{port}"}
    else:
        remote = {"name": "r", "url": f"file://{work}/remote"}
        os.environ["KILN_REMOTE_DIRS"] = work  # the daemons allow a file:// remote only where told to
    hosts = []
    try:
        a = Daemon(d.kiln, os.path.join(d.dir, "images"), os.path.join(work, "a"))
        hosts.append(a)
        a.api.call("POST", "/v1/remotes", remote)
        sb = a.api.create(template="tiny", memory_mib=256, cpus=1, name="rsrc")
        start_counter(a, sb["id"])
        time.sleep(1)
        a.api.call("POST", f"/v1/sandboxes/{sb['id']}/snapshots", {"name": "rs1"})
        a.api.delete(sb["id"])
        first = a.api.call("POST", "/v1/remotes/r/push", {"snapshot": "rs1"})
        x = a.api.call("POST", "/v1/snapshots/rs1/resume", {"name": "rx"})
        a.api.exec(x["id"], ["sh", "-c", "echo change > /root/change && sync"])
        a.api.call("POST", f"/v1/sandboxes/{x['id']}/snapshots", {"name": "rs2"})
        a.api.delete(x["id"])
        second = a.api.call("POST", "/v1/remotes/r/push", {"snapshot": "rs2"})
        resume, pulls = [], []
        for i in range(runs):
            b = Daemon(d.kiln, os.path.join(d.dir, "images"), os.path.join(work, f"b{i}"))
            hosts.append(b)
            b.api.call("POST", "/v1/remotes", remote)
            t0 = time.perf_counter()
            pulled = b.api.call("POST", "/v1/remotes/r/pull", {"snapshot": "rs1"})
            c = b.api.call("POST", "/v1/snapshots/rs1/resume", {"name": "c"})
            b.api.exec(c["id"], ["true"])
            resume.append(time.perf_counter() - t0)
            pulls.append(pulled["pull"])
            b.stop()
            hosts.remove(b)
        r = summary(resume)
        mib = first["data_bytes"] / 2**20
        pull_s = statistics.median(p["seconds"] for p in pulls)
        return {
            "remote_resume_empty_host_to_first_exec": r,
            "remote_push": {
                "backend": "moto (S3 on loopback)" if moto else "file://",
                "first_push_data_bytes": first["data_bytes"],
                "first_push_uploaded_bytes": first["bytes_uploaded"],
                "first_push_seconds": round(first["seconds"], 2),
                "first_push_mib_per_s": round(mib / first["seconds"], 1),
                "second_push_new_data_bytes": second["new_data_bytes"],
                "second_push_uploaded_bytes": second["bytes_uploaded"],
                "second_push_seconds": round(second["seconds"], 2),
                "second_over_first_data_percent": round(100.0 * second["new_data_bytes"] / first["data_bytes"], 2),
            },
            "remote_pull": {
                "data_bytes": pulls[0]["data_bytes"],
                "bytes_downloaded_median": int(statistics.median(p["bytes_downloaded"] for p in pulls)),
                "files_copied_from_host": pulls[0]["files_local"],
                "seconds_median": round(pull_s, 2),
                "mib_per_s": round(pulls[0]["data_bytes"] / 2**20 / pull_s, 1) if pull_s else None,
            },
        }
    finally:
        for h in hosts:
            try:
                h.stop()
            except Exception:
                pass
        if moto:
            moto.terminate()
            moto.wait(timeout=30)
        shutil.rmtree(work, ignore_errors=True)


BENCHES = {
    "cold_boot_to_first_exec": (bench_cold_boot, 2000.0),
    "exec_true_round_trip": (bench_exec, 10.0),
    "parallel_create_5_to_first_exec": (bench_parallel_create, None),
    "snapshots": (bench_snapshots, None),
    "fork": (bench_fork, None),
    "process_start_to_first_output": (bench_process_first_output, None),
    # Issue 14: a hibernated sandbox wakes within the hibernate-start time.
    "wake_on_exec_to_first_output": (bench_wake_on_exec, 150.0),
    "dirs": (bench_dirs, None),
    "idle": (bench_idle, None),
    "oci": (bench_oci, None),
    "bundle": (bench_bundle, None),
    "delta": (bench_delta, None),
    "create": (bench_create, None),
    "remote": (bench_remote, None),
}

# Device variants, compared in one run (each starts daemons of its own): bench/variants.py.
VARIANT_BENCHES = {"disk": variants.bench_disk, "balloon": variants.bench_balloon, "channel": variants.bench_channel}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--out", default=None)
    ap.add_argument("--only", default=None)
    ap.add_argument("--kiln", default=os.path.join(ROOT, "target/release/kiln"))
    ap.add_argument("--memory", type=int, default=256, help="guest MiB of the delta bench's sandboxes")
    ap.add_argument("--delta-baselines", default="stream,nodelta",
                    help="earlier paths the delta bench also runs: stream (KILN_DEVICE_STATE=stream), nodelta (KILN_MEMORY_DELTA=0), or none")
    ap.add_argument("--images", default=os.path.join(os.environ.get("KILN_DATA_DIR", os.path.join(ROOT, ".kiln-data")), "images"))
    args = ap.parse_args()
    global DELTA_MEMORY_MIB, DELTA_BASELINES
    DELTA_MEMORY_MIB = args.memory
    DELTA_BASELINES = [b for b in args.delta_baselines.split(",") if b and b != "none"]
    work = tempfile.mkdtemp(prefix="kb", dir="/tmp")
    only = args.only.split(",") if args.only else None
    # Variant benches start daemons of their own.
    d = None if only and all(n in VARIANT_BENCHES for n in only) else Daemon(args.kiln, args.images, work)
    results = {}
    try:
        for name, (fn, target) in BENCHES.items():
            if args.only and name not in args.only.split(","):
                continue
            print(f"running {name} ...", file=sys.stderr, flush=True)
            res = fn(d, args.runs)
            if name in ("snapshots", "fork", "dirs", "idle", "oci", "bundle", "delta", "create", "remote"):
                results.update(res)
            else:
                res["target_ms"] = target
                results[name] = res
        for name, fn in VARIANT_BENCHES.items():
            if args.only and name in args.only.split(","):
                print(f"running {name} variants ...", file=sys.stderr, flush=True)
                results.update(fn(args.kiln, args.images, args.runs))
    finally:
        if d:
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
    print(f"{'benchmark':<40} {'median':>9} {'min':>9} {'p90':>9} {'max':>9} {'target':>8} {'runs':>5}")
    for name, r in results.items():
        if "median_ms" not in r:
            continue
        tgt = f"{r['target_ms']:.0f}" if r.get("target_ms") else "-"
        print(f"{name:<40} {r['median_ms']:>9.1f} {r['min_ms']:>9.1f} {r['p90_ms']:>9.1f} {r['max_ms']:>9.1f} {tgt:>8} {r['runs']:>5}")
    print("(milliseconds)")
    for name, r in results.items():
        if "child_pss_median_mib" in r:
            print(f"{name}: child PSS median {r['child_pss_median_mib']} MiB = {r['child_pss_percent_of_ram']}% of guest RAM (target 25%)")
        if "mib_per_s" in r:
            print(f"{name}: {r['mib_per_s']} MiB/s of file content")
        if "bytes_written_median" in r:
            extra = f" = {r['percent_of_ram']}% of guest RAM (target {r['target_percent_of_ram']}%)" if "percent_of_ram" in r else ""
            print(f"{name}: writes {r['bytes_written_median'] / 2**20:.1f} MiB{extra}")
        if "cpu_percent_of_a_core_per_sandbox_median" in r:
            # The create bench's idle rows carry no per-thread or daemon figures (the idle bench's do).
            threads = (f"; QEMU main thread {r['qemu_main_thread_percent_median']}%, "
                       f"{r['qemu_main_thread_wakeups_per_s_median']} wakeups/s"
                       if "qemu_main_thread_percent_median" in r else "")
            daemon = f", daemon {r['daemon_cpu_percent']}%" if "daemon_cpu_percent" in r else ""
            print(f"{name}: {r['cpu_percent_of_a_core_per_sandbox_median']}% of a core per idle sandbox "
                  f"(median{threads}), PSS {r['pss_mib_per_sandbox_median']} MiB each{daemon}")
    variant_rows = [(k, r) for k, r in results.items() if "variant" in r and "median_ms" not in r]
    for name, r in variant_rows:
        print(f"{name}: " + ", ".join(f"{k}={v}" for k, v in r.items() if k not in ("variant",)))
    cold = results.get("cold_boot_to_first_exec", {}).get("median_ms")
    ratios = {}
    for name in ("resume_from_snapshot_to_first_exec", "resume_warm_spare_to_first_exec", "hibernate_start_to_first_exec", "wake_on_exec_to_first_output", "qemu_snapshot_load_qcow2_to_first_exec"):
        if cold and name in results:
            ratios[f"{name} / cold_boot"] = round(results[name]["median_ms"] / cold, 3)
    qload = results.get("qemu_snapshot_load_qcow2_to_first_exec", {}).get("median_ms")
    qsave = results.get("qemu_snapshot_save_qcow2", {}).get("median_ms")
    if qload and "resume_from_snapshot_to_first_exec" in results:
        ratios["qemu_load / kiln_resume (speed-up)"] = round(qload / results["resume_from_snapshot_to_first_exec"]["median_ms"], 1)
    if qsave and "full_snapshot_create" in results:
        ratios["qemu_save / kiln_full_snapshot (speed-up)"] = round(qsave / results["full_snapshot_create"]["median_ms"], 1)
    for k, v in ratios.items():
        print(f"{k:<48} {v}")
    doc["ratios"] = ratios
    out = args.out or os.path.join(ROOT, "bench/results", datetime.datetime.now().strftime("%Y%m%d-%H%M%S") + ".json")
    with open(out, "w") as f:
        json.dump(doc, f, indent=2)
    print(f"saved {out}")
    if any(k.startswith("fork_") and k.endswith("_children_all_answering") for k in results):
        png = os.path.splitext(out)[0] + ".png"
        plot_fork(doc, png)
        print(f"saved {png}")


def plot_fork(doc, path):
    """Fan-out time and idle-child memory (PSS) against the number of children, as a PNG."""
    import matplotlib
    matplotlib.use("Agg")  # no display
    import matplotlib.pyplot as plt
    rows = sorted(
        (int(k.split("_")[1]), v) for k, v in doc["results"].items()
        if k.startswith("fork_") and k.endswith("_children_all_answering"))
    ns = [n for n, _ in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(ns, [v["median_ms"] for _, v in rows], "o-")
    a.set(xlabel="children (N)", ylabel="ms until all N answer an exec", title="fork fan-out time", xticks=ns)
    a.set_ylim(bottom=0)
    pss = [v["child_pss_median_mib"] for _, v in rows]
    b.plot(ns, pss, "o-", label="idle child PSS (median)")
    b.axhline(256 * 0.25, color="grey", linestyle="--", label="25% of guest RAM (256 MiB)")
    b.set(xlabel="children (N)", ylabel="MiB", title="memory per idle child", xticks=ns)
    b.set_ylim(bottom=0)
    b.legend()
    fig.suptitle(f"kiln fork, {doc['accel'].upper()}, {doc['cpus']} CPUs, {doc['date'][:10]}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
