"""Minimal QMP client for benchmarks that drive QEMU directly."""
import json
import socket
import time


class Qmp:
    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.f = self.sock.makefile("rw")
        json.loads(self.f.readline())
        self.cmd("qmp_capabilities")

    def cmd(self, name, **args):
        msg = {"execute": name}
        if args:
            msg["arguments"] = args
        self.f.write(json.dumps(msg) + "\n")
        self.f.flush()
        while True:
            reply = json.loads(self.f.readline())
            if "return" in reply:
                return reply["return"]
            if "error" in reply:
                raise RuntimeError(f"{name}: {reply['error']}")

    def active_node(self):
        for b in self.cmd("query-block"):
            if "rootdisk" in (b.get("qdev") or ""):
                return b["inserted"]["node-name"]
        raise RuntimeError("no root disk")

    def job(self, name, **args):
        job_id = f"{name}-{time.monotonic_ns()}"
        self.cmd(name, **{"job-id": job_id, **args})
        while True:
            for j in self.cmd("query-jobs"):
                if j["id"] == job_id and j["status"] == "concluded":
                    if j.get("error"):
                        raise RuntimeError(f"{name}: {j['error']}")
                    self.cmd("job-dismiss", id=job_id)
                    return
            time.sleep(0.002)

    def close(self):
        self.sock.close()
