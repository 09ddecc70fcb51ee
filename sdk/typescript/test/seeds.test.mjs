// The TypeScript SDK seed page, run as examples/seeds/typescript.mjs against a real daemon, and what the
// page states about each call (issue 12).
import assert from "node:assert/strict";
import { after, before, test } from "node:test";

import { main } from "../../../examples/seeds/typescript.mjs";
import { Client, InvalidRequestError, Sandbox, Snapshot, setDefaultClient } from "../dist/index.js";
import { Daemon, uniqueName } from "./daemon.mjs";

let daemon;

before(async () => {
  daemon = await Daemon.start();
  setDefaultClient(new Client({ socket: daemon.socket }));
});

after(() => daemon?.stop());

test("the seed page's workflow runs as written and does what the page says", async () => {
  const seen = await main();
  // snapshot() leaves the sandbox paused; resume() continues the same running processes.
  assert.equal(seen.afterSnapshot, "paused");
  assert.equal(seen.afterResume, "running");
  assert.equal(seen.counterGoesOn, true);
  // saveNamed: Snapshot.get(name) finds that very snapshot after its sandbox is gone.
  assert.equal(seen.loadedId, seen.snapshotId);
  assert.notEqual(seen.snapshotId, "after-pip-install");
  // restore(name, opts): new sandboxes with those names, continuing where the original was (no boot).
  assert.deepEqual(
    seen.workers.map((w) => [w.name, w.state, w.memoryMib, w.cpus, w.setup, w.sameBoot, w.counterGoesOn]),
    [
      ["worker-1", "running", 256, 1, "installed", true, true],
      ["worker-2", "running", 256, 1, "installed", true, true],
    ],
  );
  assert.equal(seen.ownFilesystem, true);
  assert.deepEqual(seen.listed, [seen.snapshotId]);
  assert.equal(seen.deletedGone, true);
  // Nothing is left behind.
  assert.deepEqual(await Sandbox.list(), []);
  assert.deepEqual(await Snapshot.list(), []);
});

test("saveNamed shares one namespace with ids; restore passes overrides to the daemon", async () => {
  const sb = await Sandbox.create({ name: uniqueName("ts-seed"), memoryMib: 256 });
  const snaps = [];
  try {
    const a = await sb.snapshot({ resumeSource: true });
    const b = await sb.snapshot({ resumeSource: true });
    snaps.push(a, b);
    assert.equal((await sb.refresh()).state, "running");
    const name = uniqueName("keep");
    assert.equal(await a.saveNamed(name), a);
    assert.deepEqual(a.names, [name]);
    await a.saveNamed(name); // again: no change
    assert.deepEqual((await Snapshot.get(name)).names, [name]);
    // Taken by another snapshot's name or id: 409 snapshot_already_exists.
    await assert.rejects(b.saveNamed(name), (e) => e.code === "snapshot_already_exists" && e.status === 409);
    await assert.rejects(a.saveNamed(b.id), (e) => e.code === "snapshot_already_exists");
    await assert.rejects(a.saveNamed("Not A Valid Name"), InvalidRequestError);

    // Overrides reach the daemon: shrinking a memory snapshot is refused with its explanation; a vCPU
    // count other than the snapshot's either works (the guest sees it) or is refused the same clear way.
    await assert.rejects(Snapshot.get(name).then((s) => s.restore(uniqueName("small"), { memoryMib: 128 })), (e) => e.code === "resource_override_refused" && /256 MiB/.test(e.message));
    let more;
    try {
      more = await (await Snapshot.get(name)).restore(uniqueName("more"), { cpus: 2 });
    } catch (e) {
      assert.ok(e.code === "resource_override_refused" && /vCPU/.test(e.message), `${e}`);
    }
    if (more) {
      try {
        assert.equal(more.cpus, 2);
        assert.equal((await more.run("nproc")).stdout.trim(), "2");
      } finally {
        await more.delete();
      }
    }
  } finally {
    await sb.delete();
    for (const s of snaps) await s.delete().catch(() => {});
  }
});
