// A real `kiln serve` in a private data directory for a test file, with real QEMU VMs; on TCP too.
// Environment: KILN_BIN (default target/release/kiln), KILN_TEST_IMAGES (default .kiln-data/images).
import { spawn, spawnSync } from "node:child_process";
import { randomBytes } from "node:crypto";
import { existsSync, mkdtempSync, openSync, readFileSync, readdirSync, rmSync, symlinkSync, writeFileSync } from "node:fs";
import { connect, createServer } from "node:net";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const REPO = resolve(dirname(fileURLToPath(import.meta.url)), "../../..");

function freePort() {
  return new Promise((ok, fail) => {
    const srv = createServer().listen(0, "127.0.0.1", () => {
      const { port } = srv.address();
      srv.close(() => ok(port));
    });
    srv.on("error", fail);
  });
}

function canConnect(path) {
  return new Promise((ok) => {
    const s = connect(path, () => {
      s.destroy();
      ok(true);
    });
    s.on("error", () => ok(false));
  });
}

/** QEMU processes started for this data directory (they outlive the daemon by design). */
function qemuPidsUnder(dir) {
  const pids = [];
  for (const entry of readdirSync("/proc")) {
    if (!/^\d+$/.test(entry)) continue;
    let cmd;
    try {
      cmd = readFileSync(`/proc/${entry}/cmdline`, "latin1");
    } catch {
      continue;
    }
    if (cmd.startsWith("qemu-system") && cmd.includes(dir)) pids.push(Number(entry));
  }
  return pids;
}

export class Daemon {
  static async start(...extraArgs) {
    const bin = process.env.KILN_BIN || join(REPO, "target/release/kiln");
    const images = process.env.KILN_TEST_IMAGES || join(REPO, ".kiln-data/images");
    if (!existsSync(bin)) throw new Error(`${bin} is missing: run \`make build\` (or set KILN_BIN)`);
    if (!existsSync(join(images, "tiny/image.json"))) throw new Error(`image 'tiny' is not built in ${images}: run \`make image-tiny\``);

    const d = new Daemon();
    // Short path: unix socket paths are limited to 107 bytes.
    d.dir = mkdtempSync("/tmp/kn");
    symlinkSync(resolve(images), join(d.dir, "images"));
    d.socket = join(d.dir, "kiln.sock");
    d.token = randomBytes(16).toString("hex");
    d.url = `127.0.0.1:${await freePort()}`;
    writeFileSync(join(d.dir, "token"), d.token);
    const log = openSync(join(d.dir, "daemon.log"), "a");
    const args = ["--data-dir", d.dir, "--socket", d.socket, "serve", "--listen", d.url, "--token-file", join(d.dir, "token"), ...extraArgs];
    d.proc = spawn(bin, args, { stdio: ["ignore", log, log], env: { ...process.env, KILN_LOG: "info", KILN_NETWORK: "user", KILN_TEMPLATE_STORE: join(REPO, "target/tmp/kiln-template-store") } });
    const deadline = Date.now() + 30_000;
    while (!(await canConnect(d.socket))) {
      if (d.proc.exitCode !== null || Date.now() > deadline) {
        d.stop();
        throw new Error(`kiln serve did not start:\n${d.logTail()}`);
      }
      await new Promise((r) => setTimeout(r, 20));
    }
    return d;
  }

  logTail(lines = 40) {
    try {
      return readFileSync(join(this.dir, "daemon.log"), "utf8").split("\n").slice(-lines).join("\n");
    } catch {
      return "";
    }
  }

  stop() {
    if (this.proc && this.proc.exitCode === null) this.proc.kill("SIGKILL");
    for (const pid of qemuPidsUnder(this.dir)) {
      try {
        process.kill(pid, "SIGKILL");
      } catch {
        // already gone
      }
    }
    // The daemon mounts a tmpfs for guest RAM at <dir>/ram (it outlives the daemon, like its VMs).
    spawnSync("umount", [join(this.dir, "ram")], { stdio: "ignore" });
    rmSync(this.dir, { recursive: true, force: true });
  }
}

/** A unique, valid sandbox or snapshot name. */
export function uniqueName(prefix) {
  return `${prefix}-${randomBytes(3).toString("hex")}`;
}
