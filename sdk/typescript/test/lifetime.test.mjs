// Sandbox lifetimes against a real daemon: idle hibernation, wake on exec, setTimeout, snapshot ttl.
import assert from "node:assert/strict";
import { after, before, test } from "node:test";

import { Client, Sandbox, setDefaultClient } from "../dist/index.js";
import { Daemon, uniqueName } from "./daemon.mjs";

let daemon;

before(async () => {
  daemon = await Daemon.start();
  setDefaultClient(new Client({ socket: daemon.socket }));
});

after(() => daemon?.stop());

test("an idle sandbox hibernates by itself and wakes on exec", async () => {
  const sb = await Sandbox.create({ name: uniqueName("ts-life"), idleTimeout: 3, timeout: 300 });
  try {
    assert.equal(sb.lifetime.idleTimeout, 3);
    assert.equal(sb.lifetime.onTimeout, "hibernate");
    assert.equal(sb.lifetime.autoResume, true);
    await sb.run("echo in-ram > /dev/shm/x");
    const t0 = Date.now();
    while ((await sb.refresh()).state !== "stopped") {
      assert.ok(Date.now() - t0 < 30000, `still ${sb.state}`);
      await new Promise((r) => setTimeout(r, 200));
    }
    assert.equal((await sb.run("cat /dev/shm/x")).stdout, "in-ram\n");
    assert.equal((await sb.refresh()).state, "running");
    const before = sb.lifetime.expiresAt;
    await sb.setTimeout(900, { onTimeout: "delete" });
    assert.equal(sb.lifetime.timeout, 900);
    assert.equal(sb.lifetime.onTimeout, "delete");
    assert.ok(sb.lifetime.expiresAt > before);
    const snap = await sb.snapshot({ name: uniqueName("ts-ttl"), ttl: 600, resumeSource: true });
    assert.ok(snap.expiresAt instanceof Date);
    await snap.delete();
  } finally {
    await sb.delete();
  }
});
