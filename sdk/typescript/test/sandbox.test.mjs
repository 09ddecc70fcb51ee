// Sandboxes, commands, files, errors and transports against a real daemon.
import assert from "node:assert/strict";
import { createHash, randomBytes } from "node:crypto";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, test } from "node:test";
import { pathToFileURL } from "node:url";

import ts from "typescript";

import {
  AuthenticationError,
  CapacityError,
  CapacityExceededError,
  Client,
  ConflictError,
  ExecFailedError,
  GuestPathNotFoundError,
  InvalidRequestError,
  KilnConnectionError,
  KilnError,
  NotFoundError,
  STATUS_BY_CODE,
  Sandbox,
  SandboxNotFoundError,
  SnapshotAlreadyExistsError,
  SnapshotNotFoundError,
  TimeoutError,
  errorFromCode,
  setDefaultClient,
} from "../dist/index.js";
import { Daemon } from "./daemon.mjs";

let daemon;
let sb;
const suite = randomBytes(3).toString("hex");
const local = mkdtempSync(join(tmpdir(), "kiln-ts-"));

before(async () => {
  daemon = await Daemon.start();
  setDefaultClient(new Client({ socket: daemon.socket }));
  sb = await Sandbox.create({
    template: "tiny",
    name: `ts-${suite}`,
    memoryMib: 256,
    cpus: 1,
    diskSizeGib: 1,
    env: { GREETING: "hello" },
    metadata: { suite, role: "main" },
    ports: [{ host: 20000 + Math.floor(Math.random() * 20000), guest: 8080 }],
  });
});

after(async () => {
  await sb?.dispose();
  daemon?.stop();
  rmSync(local, { recursive: true, force: true });
});

test("create reports what was asked", () => {
  assert.match(sb.id, /^sb-/);
  assert.equal(sb.name, `ts-${suite}`);
  assert.equal(sb.state, "running");
  assert.deepEqual([sb.template, sb.memoryMib, sb.cpus, sb.diskSizeBytes], ["tiny", 256, 1, 1 << 30]);
  assert.deepEqual(sb.env, { GREETING: "hello" });
  assert.deepEqual(sb.metadata, { suite, role: "main" });
  assert.equal(sb.ports[0].guest, 8080);
  assert.equal(sb.origin, "template:tiny");
  assert.ok(sb.createdAt instanceof Date && !Number.isNaN(sb.createdAt.getTime()));
});

test("getHost publishes a guest port on a free host port", async () => {
  const fixed = sb.ports[0];
  assert.equal(await sb.getHost(8080), `127.0.0.1:${fixed.host}`);
  const addr = await sb.getHost(9001);
  assert.match(addr, /^127\.0\.0\.1:\d+$/);
  assert.notEqual(addr, `127.0.0.1:${fixed.host}`);
  assert.equal(await sb.getHost(9001), addr);
  assert.ok(sb.ports.some((p) => p.guest === 9001 && p.auto));
  await sb.run("mkdir -p /www9 && echo ts-served > /www9/index.html && (httpd -p 9001 -h /www9 &)");
  let body = "";
  for (let i = 0; i < 50 && body !== "ts-served\n"; i++) {
    try {
      body = await (await fetch(`http://${addr}/index.html`)).text();
    } catch {
      await new Promise((r) => setTimeout(r, 200));
    }
  }
  assert.equal(body, "ts-served\n");
  await sb.unpublishPort(9001);
  assert.ok(!sb.ports.some((p) => p.guest === 9001));
  await assert.rejects(sb.unpublishPort(9001), (e) => e instanceof NotFoundError && e.code === "port_not_found");
});

test("connect, list, refresh and logs", async () => {
  assert.equal((await Sandbox.connect(sb.name)).id, sb.id);
  assert.equal((await Sandbox.connect(sb.id)).name, sb.name);
  assert.deepEqual((await Sandbox.list({ metadata: { suite, role: "main" } })).map((s) => s.id), [sb.id]);
  assert.deepEqual(await Sandbox.list({ metadata: { suite: "none" } }), []);
  assert.equal(await sb.refresh(), sb);
  assert.ok(sb.pid > 0);
  assert.match(await sb.logs(), /kiln-agent/);
});

test("commands: shell string, argv, env, cwd, stdin", async () => {
  let r = await sb.commands.run('echo "$GREETING"; echo oops >&2; exit 3');
  assert.deepEqual([r.stdout, r.stderr, r.exitCode, r.ok, r.timedOut], ["hello\n", "oops\n", 3, false, false]);
  r = await sb.run(["printf", "%s|", "a b", "$HOME"]);
  assert.equal(r.stdout, "a b|$HOME|");
  assert.ok(r.ok);
  r = await sb.run("echo $GREETING $EXTRA; pwd", { env: { EXTRA: "there" }, cwd: "/tmp" });
  assert.equal(r.stdout, "hello there\n/tmp\n");
  assert.equal((await sb.run("tr a-z A-Z", { stdin: "shout" })).stdout, "SHOUT");
  assert.equal((await sb.run("wc -c", { stdin: new Uint8Array(1000).fill(255) })).stdout.trim(), "1000");
});

test("commands: a timeout is reported, not thrown", async () => {
  const r = await sb.run("echo started; sleep 10", { timeoutMs: 500 });
  assert.equal(r.timedOut, true);
  assert.equal(r.ok, false);
  assert.equal(r.exitCode, null);
  assert.equal(r.signal, 9);
  assert.equal(r.stdout, "started\n");
});

test("commands: streaming callbacks, incl. UTF-8 split across chunks", async () => {
  const seen = [];
  const r = await sb.run("for i in 1 2 3; do echo out$i; echo err$i >&2; sleep 0.1; done; exit 4", {
    onStdout: (s) => seen.push(["out", s]),
    onStderr: (s) => seen.push(["err", s]),
  });
  assert.equal(r.exitCode, 4);
  assert.equal(r.stdout, "out1\nout2\nout3\n");
  assert.equal(r.stderr, "err1\nerr2\nerr3\n");
  assert.equal(seen.filter(([k]) => k === "out").map(([, s]) => s).join(""), r.stdout);
  assert.ok(seen.filter(([k]) => k === "out").length >= 2, "output should arrive in several chunks");

  const chunks = [];
  const u = await sb.run("printf '\\303'; sleep 0.3; printf '\\251!\\377'", { onStdout: (s) => chunks.push(s) });
  assert.equal(u.stdout, "é!\ufffd");
  assert.equal(chunks.join(""), u.stdout);

  const t = await sb.run("sleep 10", { timeoutMs: 300, onStdout: () => {} });
  assert.equal(t.timedOut, true);
});

test("commands: a missing or unrunnable program is exec_failed (422)", async () => {
  await assert.rejects(sb.run(["/no/such/program"]), (e) => {
    assert.ok(e instanceof ExecFailedError);
    assert.equal(e.code, "exec_failed");
    assert.equal(e.status, 422);
    assert.match(e.message, /\/no\/such\/program/);
    return true;
  });
  await assert.rejects(sb.run(["/etc"]), (e) => {
    assert.ok(e instanceof ExecFailedError);
    assert.equal(e.code, "exec_failed");
    assert.equal(e.status, 422);
    return true;
  });
});

test("files: write, read, stat, list, mkdir, exists, remove", async () => {
  const f = sb.files;
  const w = await f.write("/tmp/ts/notes/a.txt", "héllo\n", { mode: 0o600 });
  assert.deepEqual(w, { path: "/tmp/ts/notes/a.txt", bytes: 7 });
  assert.equal(await f.read("/tmp/ts/notes/a.txt"), "héllo\n");
  await f.write("/tmp/ts/notes/b.bin", new Uint8Array([0, 255, 10]), { mode: "0755" });
  assert.deepEqual([...(await f.readBytes("/tmp/ts/notes/b.bin"))], [0, 255, 10]);

  const st = await f.stat("/tmp/ts/notes/a.txt");
  assert.deepEqual([st.kind, st.size, st.mode], ["file", 7, 0o600]);
  assert.ok(st.mtime instanceof Date);
  assert.equal((await f.stat("/tmp/ts/notes/b.bin")).mode, 0o755);
  const entries = (await f.list("/tmp/ts/notes")).sort((a, b) => a.name.localeCompare(b.name));
  assert.deepEqual(entries.map((e) => [e.name, e.path, e.kind]), [
    ["a.txt", "/tmp/ts/notes/a.txt", "file"],
    ["b.bin", "/tmp/ts/notes/b.bin", "file"],
  ]);
  assert.equal((await sb.run("cat /tmp/ts/notes/a.txt")).stdout, "héllo\n");

  await f.mkdir("/tmp/ts/dirs/x/y");
  assert.equal((await f.stat("/tmp/ts/dirs/x/y")).kind, "dir");
  await f.remove("/tmp/ts/notes/a.txt");
  assert.equal(await f.exists("/tmp/ts/notes/a.txt"), false);
  await assert.rejects(f.remove("/tmp/ts/notes"), (e) => e instanceof KilnError && /not empty/.test(e.message));
  await f.remove("/tmp/ts", { recursive: true });
  assert.equal(await f.exists("/tmp/ts"), false);

  await assert.rejects(f.read("/tmp/ts/notes/b.bin"), GuestPathNotFoundError);
  await assert.rejects(f.read("relative"), (e) => e instanceof InvalidRequestError && /absolute/.test(e.message));
});

test("files: upload and download stream big files", async () => {
  const data = randomBytes(16 << 20);
  writeFileSync(join(local, "big.bin"), data);
  const w = await sb.files.upload(join(local, "big.bin"), "/tmp/big.bin", { mode: 0o640 });
  assert.equal(w.bytes, data.length);
  const digest = (await sb.run("sha256sum /tmp/big.bin")).stdout.split(" ")[0];
  assert.equal(digest, createHash("sha256").update(data).digest("hex"));
  assert.equal(await sb.files.download("/tmp/big.bin", join(local, "back.bin")), data.length);
  assert.ok(readFileSync(join(local, "back.bin")).equals(data));
  await sb.files.remove("/tmp/big.bin");
  await assert.rejects(sb.files.download("/tmp/big.bin", join(local, "never")), GuestPathNotFoundError);
});

test("pause and resume; a paused sandbox refuses commands", async () => {
  assert.equal((await sb.pause()).state, "paused");
  try {
    await assert.rejects(sb.run("true"), (e) => e instanceof ConflictError && e.code === "sandbox_not_running" && e.status === 409);
  } finally {
    assert.equal((await sb.resume()).state, "running");
  }
  assert.ok((await sb.run("true")).ok);
});

test("stop hibernates and start wakes the same machine", async () => {
  await sb.run("echo awake > /tmp/hibernated; sleep 1000 >/dev/null 2>&1 &");
  assert.equal((await sb.stop()).state, "stopped");
  assert.equal(sb.pid, null);
  try {
    await assert.rejects(sb.run("true"), ConflictError);
  } finally {
    assert.equal((await sb.start()).state, "running");
  }
  assert.equal(await sb.files.read("/tmp/hibernated"), "awake\n");
  assert.match((await sb.run("ps")).stdout, /sleep 1000/);
});

test("errors: not found, invalid request, name taken, malformed volumes", async () => {
  await assert.rejects(Sandbox.connect("no-such-sandbox"), (e) => {
    assert.ok(e instanceof SandboxNotFoundError && e instanceof NotFoundError && e instanceof KilnError);
    assert.deepEqual([e.code, e.status, e.name], ["sandbox_not_found", 404, "SandboxNotFoundError"]);
    assert.match(e.message, /no-such-sandbox/);
    return true;
  });
  await assert.rejects(Sandbox.create({ template: "no-such-image" }), (e) => e instanceof NotFoundError && e.code === "image_not_found");
  await assert.rejects(Sandbox.create({ memoryMib: 1 }), (e) => e instanceof InvalidRequestError && /out of range/.test(e.message));
  await assert.rejects(Sandbox.create({ name: sb.name, memoryMib: 256 }), (e) => e instanceof ConflictError && e.code === "sandbox_name_taken");
  const nowhere = new Client({ socket: "/nonexistent/kiln.sock" });
  // Malformed volume specs are refused before anything is sent.
  for (const bad of ["data", "data:/d:rx", ["data"], { host: "/d", guest: "/d" }]) {
    await assert.rejects(Sandbox.create({ volumes: [bad], client: nowhere }), (e) => e instanceof InvalidRequestError && /invalid volume/.test(e.message));
  }
});

test("TCP transport with a bearer token; a wrong token is an AuthenticationError", async () => {
  const tcp = new Client({ url: daemon.url, token: daemon.token });
  assert.equal(tcp.url, `http://${daemon.url}`);
  const remote = await Sandbox.connect(sb.id, { client: tcp });
  assert.equal((await remote.run("echo over tcp")).stdout, "over tcp\n");
  const chunks = [];
  await remote.run("echo streamed", { onStdout: (s) => chunks.push(s) });
  assert.deepEqual(chunks, ["streamed\n"]);
  await remote.files.write("/tmp/tcp.txt", "via tcp");
  assert.equal(await sb.files.read("/tmp/tcp.txt"), "via tcp");

  for (const token of ["wrong-token", ""]) {
    const bad = new Client({ url: `http://${daemon.url}`, token });
    await assert.rejects(Sandbox.list({ client: bad }), (e) => e instanceof AuthenticationError && e.code === "unauthorized" && e.status === 401);
  }
});

test("connection errors name the socket", async () => {
  const missing = join(local, "kiln.sock");
  await assert.rejects(Sandbox.list({ client: new Client({ socket: missing }) }), (e) => {
    assert.ok(e instanceof KilnConnectionError);
    assert.equal(e.code, "connection_failed");
    assert.equal(e.status, undefined);
    assert.ok(e.message.includes(missing) && e.message.includes("kiln serve"));
    return true;
  });
});

test("capacity and timeout errors from daemons with tight limits", async () => {
  const full = await Daemon.start("--memory-overcommit", "0.001");
  try {
    const t0 = Date.now();
    const client = new Client({ socket: full.socket, retry: { maxAttempts: 2 } });
    await assert.rejects(Sandbox.create({ memoryMib: 256, client }), (e) => {
      // The daemon says when to look again (Retry-After: 2), and the client tried once more after that.
      return e instanceof CapacityExceededError && e instanceof CapacityError && e.code === "capacity_exceeded" && e.status === 429 && e.retryAfter === 2;
    });
    assert.ok(Date.now() - t0 >= 2000);
  } finally {
    full.stop();
  }
  // --boot-timeout bounds boots; a create resuming the template's snapshot has its own deadline.
  const impatient = await Daemon.start("--boot-timeout", "1");
  try {
    await assert.rejects(Sandbox.create({ memoryMib: 256, boot: true, client: new Client({ socket: impatient.socket }) }), (e) => {
      return e instanceof TimeoutError && e.code === "timeout" && e.status === 504 && /within 1 s/.test(e.message);
    });
  } finally {
    impatient.stop();
  }
});

test("every documented code maps to its error class", () => {
  const byStatus = { 400: InvalidRequestError, 401: AuthenticationError, 404: NotFoundError, 409: ConflictError, 429: CapacityError, 504: TimeoutError };
  for (const [code, status] of Object.entries(STATUS_BY_CODE)) {
    const e = errorFromCode(code, "why");
    assert.deepEqual([e.code, e.status, e.message], [code, status, "why"]);
    assert.ok(e instanceof (byStatus[status] ?? KilnError), code);
  }
  assert.ok(errorFromCode("snapshot_already_exists", "") instanceof SnapshotAlreadyExistsError);
  assert.ok(errorFromCode("snapshot_not_found", "") instanceof SnapshotNotFoundError);
});

test("client configuration from the environment", () => {
  const keys = ["KILN_SOCKET", "KILN_URL", "KILN_TOKEN", "KILN_DATA_DIR", "XDG_DATA_HOME"];
  const saved = Object.fromEntries(keys.map((k) => [k, process.env[k]]));
  try {
    for (const k of keys) delete process.env[k];
    process.env.KILN_DATA_DIR = "/srv/kiln";
    assert.equal(new Client().socket, "/srv/kiln/kiln.sock");
    process.env.KILN_SOCKET = "/run/k.sock";
    assert.equal(new Client().socket, "/run/k.sock");
    process.env.KILN_URL = "10.0.0.5:7070";
    const c = new Client();
    assert.deepEqual([c.socket, c.url], [undefined, "http://10.0.0.5:7070"]);
    assert.equal(new Client({ socket: "/x.sock" }).socket, "/x.sock");
    assert.throws(() => new Client({ socket: "/x.sock", url: "h:1" }), TypeError);
  } finally {
    for (const [k, v] of Object.entries(saved)) {
      if (v === undefined) delete process.env[k];
      else process.env[k] = v;
    }
  }
});

test("await using deletes the sandbox when the block is left, also by an exception", async () => {
  // Node 20 cannot parse `await using`; TypeScript compiles it (as it does for SDK users) to calls of
  // Symbol.asyncDispose, which is what this checks end to end.
  const dist = pathToFileURL(join(import.meta.dirname, "../dist/index.js")).href;
  const source = `
    import { Sandbox } from ${JSON.stringify(dist)};
    export async function run(client: any, fail: boolean): Promise<string> {
      let id = "";
      try {
        await using sb = await Sandbox.create({ memoryMib: 256, diskSizeGib: 1, client });
        id = sb.id;
        if ((await sb.commands.run("echo in")).stdout !== "in\\n") throw new Error("exec failed");
        if (fail) throw new Error("boom");
      } catch (e) {
        if (!fail || (e as Error).message !== "boom") throw e;
      }
      return id;
    }`;
  const js = ts.transpileModule(source, { compilerOptions: { target: ts.ScriptTarget.ES2022, module: ts.ModuleKind.ES2022 } }).outputText;
  assert.ok(!js.includes("await using"), "TypeScript left `await using` for Node to parse");
  const mod = await import(`data:text/javascript;base64,${Buffer.from(js).toString("base64")}`);
  const client = new Client({ socket: daemon.socket });
  for (const fail of [false, true]) {
    const id = await mod.run(client, fail);
    assert.ok(id);
    await assert.rejects(Sandbox.connect(id, { client }), SandboxNotFoundError);
  }
});
