// Background processes (sandbox.processes) against a real daemon.
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { after, before, test } from "node:test";

import { Client, NotFoundError, Sandbox, setDefaultClient } from "../dist/index.js";
import { Daemon } from "./daemon.mjs";

let daemon;
let sb;

before(async () => {
  daemon = await Daemon.start();
  setDefaultClient(new Client({ socket: daemon.socket }));
  sb = await Sandbox.create({ template: "tiny", name: `tsp-${randomBytes(3).toString("hex")}`, memoryMib: 256 });
});

after(async () => {
  await sb?.dispose();
  daemon?.stop();
});

test("start, stdin, logs, kill, wait", async () => {
  const p = await sb.processes.start('while read l; do echo "got $l"; done', { stdin: true });
  assert.equal(p.state, "running");
  assert.ok((await sb.processes.list()).some((q) => q.pid === p.pid));
  await sb.processes.write(p.pid, "x\n", { close: true });
  const done = await sb.processes.wait(p.pid, { timeoutMs: 20_000 });
  assert.deepEqual([done.state, done.exitCode], ["exited", 0]);
  const out = await sb.processes.logs(p.pid);
  assert.deepEqual([out.stdout, out.exited], ["got x\n", true]);

  const seen = [];
  const c = await sb.processes.start("for i in 1 2 3; do echo $i; sleep 0.2; done", { user: 1234 });
  const followed = await sb.processes.logs(c.pid, { follow: true, onStdout: (s) => seen.push(s) });
  assert.equal(followed.stdout, "1\n2\n3\n");
  assert.equal(seen.join(""), "1\n2\n3\n");

  const sl = await sb.processes.start(["sleep", "1000"]);
  assert.equal((await sb.processes.wait(sl.pid, { timeoutMs: 200 })).state, "running");
  await sb.processes.kill(sl.pid, "KILL");
  assert.equal((await sb.processes.wait(sl.pid, { timeoutMs: 20_000 })).signal, 9);
  await assert.rejects(sb.processes.get(999999), NotFoundError);
});
