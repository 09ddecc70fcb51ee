// Continuous checkpoints and rewind against a real daemon: a policy takes checkpoints in the background,
// keeps the newest `keep`, and rewind brings back the files of one of them in the same sandbox.
import assert from "node:assert/strict";
import { after, before, test } from "node:test";

import { Client, Sandbox, setDefaultClient } from "../dist/index.js";
import { Daemon, uniqueName } from "./daemon.mjs";

let daemon;
let src;

before(async () => {
  daemon = await Daemon.start();
  setDefaultClient(new Client({ socket: daemon.socket }));
  src = await Sandbox.create({ name: uniqueName("ts-ckpt"), memoryMib: 256 });
});

after(async () => {
  await src?.dispose();
  daemon?.stop();
});

/** Waits until `n` checkpoints not in `seen` were taken (adding every id it sees). */
async function waitCheckpoints(sb, seen, n) {
  const deadline = Date.now() + 240_000;
  let fresh = 0;
  for (;;) {
    const now = await sb.checkpoints();
    for (const c of now) {
      if (!seen.has(c.id)) {
        seen.add(c.id);
        fresh += 1;
      }
    }
    if (fresh >= n) return now;
    assert.ok(Date.now() < deadline, `${fresh} of ${n} checkpoints of ${sb.name} in 240 s`);
    await new Promise((r) => setTimeout(r, 300));
  }
}

test("checkpoint policy, retention and rewind", async () => {
  const base = await src.snapshot({ name: uniqueName("ckpt-base"), resumeSource: true });
  const sb = await base.restore(uniqueName("ckpt"));
  try {
    await sb.files.write("/root/mark", "A");
    await sb.run("sync");
    await sb.setCheckpointPolicy(2, { keep: 2 });
    assert.deepEqual(sb.checkpointPolicy, { every: 2, keep: 2 });
    const seen = new Set();
    const atA = (await waitCheckpoints(sb, seen, 2)).at(-1);
    assert.ok(atA.pauseMs !== null && atA.sandboxId === sb.id);
    await sb.files.write("/root/mark", "B");
    await sb.run("sync");
    await waitCheckpoints(sb, seen, 3);
    await sb.clearCheckpointPolicy();
    assert.equal((await sb.refresh()).checkpointPolicy, null);
    const kept = await sb.checkpoints();
    assert.ok(seen.size > 2 && kept.length <= 2, `${seen.size} taken, ${kept.length} kept`);
    await sb.files.write("/root/mark", "C");
    const back = await sb.rewind(kept.at(-1).id);
    assert.deepEqual([back.id, back.state], [sb.id, "running"]);
    assert.equal(await sb.files.read("/root/mark"), "B");
  } finally {
    await sb.kill();
  }
});
