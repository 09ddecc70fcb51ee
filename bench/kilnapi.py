"""Tiny stdlib-only client for the kiln API over its unix socket, used by the benchmarks."""
import http.client
import json
import os
import socket
import subprocess
import time


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path, timeout=600):
        super().__init__("kiln", timeout=timeout)
        self.path = path

    def connect(self):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        s.connect(self.path)
        self.sock = s


class Api:
    def __init__(self, socket_path):
        self.socket_path = socket_path
        self.conn = None

    def call(self, method, path, body=None):
        # One keep-alive connection; reconnect once if the daemon closed it.
        for attempt in range(2):
            if self.conn is None:
                self.conn = UnixHTTPConnection(self.socket_path)
            try:
                data = json.dumps(body).encode() if body is not None else None
                headers = {"Content-Type": "application/json"} if data is not None else {}
                self.conn.request(method, path, body=data, headers=headers)
                resp = self.conn.getresponse()
                raw = resp.read()
                value = json.loads(raw) if raw else None
                if resp.status >= 400:
                    raise RuntimeError(f"{method} {path}: {resp.status} {value}")
                return value
            except (ConnectionError, http.client.HTTPException):
                self.conn = None
                if attempt:
                    raise

    def put_bytes(self, path, data, content_type="application/octet-stream"):
        """PUT a raw body (a file or a tar) on a fresh connection; returns the JSON answer."""
        conn = UnixHTTPConnection(self.socket_path)
        try:
            conn.request("PUT", path, body=data, headers={"Content-Type": content_type})
            resp = conn.getresponse()
            raw = resp.read()
            value = json.loads(raw) if raw else None
            if resp.status >= 400:
                raise RuntimeError(f"PUT {path}: {resp.status} {value}")
            return value
        finally:
            conn.close()

    def create(self, **kw):
        return self.call("POST", "/v1/sandboxes", kw)

    def exec(self, sb, argv):
        return self.call("POST", f"/v1/sandboxes/{sb}/exec", {"argv": argv})

    def delete(self, sb):
        return self.call("DELETE", f"/v1/sandboxes/{sb}")


class Daemon:
    """Starts `kiln serve` in a private data directory that links the built images."""

    def __init__(self, kiln, images, workdir, extra=()):
        self.kiln = kiln
        self.dir = workdir
        os.makedirs(workdir, exist_ok=True)
        link = os.path.join(workdir, "images")
        if not os.path.exists(link):
            os.symlink(os.path.abspath(images), link)
        self.socket = os.path.join(workdir, "kiln.sock")
        self.log = open(os.path.join(workdir, "daemon.log"), "ab")
        self.proc = subprocess.Popen(
            [kiln, "--data-dir", workdir, "--socket", self.socket, "serve", *extra],
            # User networking unless `extra` says --network (a flag beats the variable): a root
            # daemon's default (bridged) would build a bridge and NAT on the host.
            env={**os.environ, "KILN_NETWORK": "user"},
            stdout=self.log, stderr=self.log)
        deadline = time.time() + 60
        while not os.path.exists(self.socket):
            if self.proc.poll() is not None or time.time() > deadline:
                self.log.flush()
                tail = open(os.path.join(workdir, "daemon.log"), "rb").read()[-3000:].decode(errors="replace")
                raise RuntimeError(f"daemon did not start; see {workdir}/daemon.log:\n{tail}")
            time.sleep(0.02)
        self.api = Api(self.socket)

    def stop(self):
        for sb in self.api.call("GET", "/v1/sandboxes") or []:
            try:
                self.api.delete(sb["id"])
            except Exception:
                pass
        self.proc.terminate()
        self.proc.wait(timeout=30)
