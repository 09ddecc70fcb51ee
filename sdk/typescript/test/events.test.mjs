// The event stream against a real daemon: `for await (const e of kiln.events())` with filters, replay
// (`since`) and a live event. Volumes make the changes: no VM needed.
import assert from "node:assert/strict";
import { after, before, test } from "node:test";

import * as kiln from "../dist/index.js";
import { Daemon, uniqueName } from "./daemon.mjs";

let daemon;

before(async () => {
  daemon = await Daemon.start();
  kiln.setDefaultClient(new kiln.Client({ socket: daemon.socket }));
});

after(() => daemon?.stop());

test("events: replay, filter, a live event, a refused kind", async () => {
  const name = uniqueName("ev");
  await kiln.Volume.create({ name, sizeMib: 16 });
  let created;
  for await (const e of kiln.events({ kinds: ["volume.created"], since: 0 })) {
    if (e.id === name) {
      created = e;
      break;
    }
  }
  assert.equal(created.kind, "volume.created");
  assert.equal(created.object.name, name);
  assert.equal(created.sandbox, null);

  // Live: the deletion arrives while the loop waits (since= makes it certain even if it came first).
  const seen = [];
  const watching = (async () => {
    for await (const e of kiln.events({ kinds: "volume.", since: created.seq })) {
      seen.push(e);
      if (e.kind === "volume.deleted" && e.id === name) return;
    }
  })();
  await new Promise((r) => setTimeout(r, 500));
  await kiln.Volume.delete(name);
  await Promise.race([
    watching,
    new Promise((_, fail) => setTimeout(() => fail(new Error(`no volume.deleted; saw ${JSON.stringify(seen)}`)), 30_000)),
  ]);
  assert.deepEqual(
    seen.filter((e) => e.id === name).map((e) => e.kind),
    ["volume.deleted"],
  );
  assert.equal(seen.at(-1).object, null);
  assert.ok(seen.at(-1).seq > created.seq);

  await assert.rejects(async () => {
    for await (const _ of kiln.events({ kinds: "volume.creat" })) break;
  }, kiln.InvalidRequestError);
});
